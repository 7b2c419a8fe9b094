"""Dask column sums from S3 under request latency: ``store.to_dask().sum(axis=0)`` on the
threaded scheduler and on a 2-worker ``LocalCluster``, from local disk and from S3 through
:class:`~benchmarks.latency_proxy.LatencyProxy` at 0 and 30 ms per request.

The issue's target: at 30 ms a column sum completes in at most 2x its local-disk time.
The S3 server is moto, run in a process of its own (so its work never holds the client's
GIL) but sharing the machine's cores with the client and the proxy, so the 0 ms figure
(same server, same proxy, no delay) is reported beside it: what latency costs is 30 ms
against 0 ms; 0 ms against local disk is what moto and the proxy cost.  ``server_cpu_s``
is the moto process's CPU time during the sum.

Each timed run builds a new graph (``to_dask`` on the opened store: its plan reads
``indptr``) and computes it; on the cluster every run's tasks reopen the store on each
worker (a new graph's token), as a user's new computation would.  The cases run in
interleaved rounds (median per case), the store opened once per delay, untimed.

``python -m benchmarks s3_dask [--rows N] [--delays 0,30] [--rounds 3] [--out DIR]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import sparsestore

from .bench_s3_latency import _matrix
from .common import add_out_argument, reproduce_command
from .latency_proxy import LatencyProxy
from .records import run_meta, write_records

TARGET = 2.0  # the issue: at 30 ms, at most 2x the local-disk time


def _colsum(store: Any, client: Any) -> tuple[float, np.ndarray]:
    """Seconds to build the graph and compute its column sum, and the sum."""
    t = time.perf_counter()
    lazy = store.to_dask().sum(axis=0)
    got = client.compute(lazy, sync=True) if client is not None else lazy.compute(
        scheduler="threads")
    return time.perf_counter() - t, np.asarray(got).ravel()


def _fetch_all(store: Any) -> float:
    """Seconds to fetch every stored object of ``data`` and ``indices`` at once, nothing
    decoded: the floor under any reader of this server through this proxy."""
    from sparsestore import zarr_compat as zc
    from sparsestore.fetch import get_many

    keys = []
    for name in ("data", "indices"):
        arr = store.arrays[name]
        step = int((getattr(arr, "shards", None) or arr.chunks)[0])
        keys += [zc.chunk_key(arr, arr.path + "/", k) for k in range(-(-arr.shape[0] // step))]
    t = time.perf_counter()
    got = get_many(store.group.store, keys)
    assert all(v is not None for v in got.values())
    return time.perf_counter() - t


def _open_record(ms: float, which: str, took: list[float], proxy: Any) -> dict[str, Any]:
    """A record of opening the store through ``proxy`` (the last open's requests)."""
    counts = proxy.snapshot()
    return {"group": "open (target at 30 ms: < 0.2 s)", "delay_ms": round(ms), "open": which,
            "seconds": statistics.median(took), "requests": counts["requests"],
            "round_trips": proxy.round_trips() if proxy.delay else None}


def _median(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--cols", type=int, default=20_000)
    ap.add_argument("--density", type=float, default=0.002)
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20)
    ap.add_argument("--shard-bytes", type=int, default=None)
    ap.add_argument("--delays", default="0,30", help="ms added per request")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    ap.add_argument("--schedulers", default="threads,cluster")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    from distributed import Client, LocalCluster

    from tests.s3server import S3Server

    X = _matrix(args.rows, args.cols, args.density)
    want = np.asarray(X.sum(axis=0)).ravel()
    layout: dict[str, Any] = {"chunk_bytes": args.chunk_bytes}
    if args.shard_bytes:
        layout["shard_bytes"] = args.shard_bytes
    delays = [float(d) for d in args.delays.split(",")]
    schedulers = args.schedulers.split(",")
    server = S3Server(process=True).start()
    proxies = {ms: LatencyProxy(server.endpoint_url, ms / 1000).start() for ms in delays}
    times: dict[tuple[str, str], list[float]] = {}
    counts: dict[tuple[str, str], dict[str, Any]] = {}
    cpus: dict[tuple[str, str], list[float | None]] = {}
    opens: list[dict[str, Any]] = []
    cluster = client = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = sparsestore.save(Path(tmp) / "x.zarr", X, **layout)
            url = f"s3://{server.new_bucket()}/x.zarr"
            sparsestore.save(url, X, storage_options=server.storage_options, **layout)
            stores: dict[str, Any] = {"local": local}
            for ms, proxy in proxies.items():
                opts = dict(server.storage_options, endpoint_url=proxy.endpoint_url)
                proxy.reset()
                t = time.perf_counter()  # the first open: s3fs makes its client
                stores[f"s3 {ms:g} ms"] = sparsestore.open(url, storage_options=opts)
                opens.append(_open_record(ms, "first (s3fs client made)",
                                          [time.perf_counter() - t], proxy))
            if "cluster" in schedulers:
                cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
                client = Client(cluster, set_as_default=False)
            runners = {"threads": None, "cluster": client}
            for sched in schedulers:  # warm-up: imports, s3fs clients, worker start-up
                for store in stores.values():
                    _colsum(store, runners[sched])
            for ms, proxy in proxies.items():
                opts = dict(server.storage_options, endpoint_url=proxy.endpoint_url)
                took = []
                for _ in range(args.rounds):
                    proxy.reset()
                    t = time.perf_counter()
                    sparsestore.open(url, storage_options=opts)
                    took.append(time.perf_counter() - t)
                opens.append(_open_record(ms, "again", took, proxy))
            for _ in range(args.rounds):
                for where, store in stores.items():
                    if where != "local":
                        times.setdefault(("fetch only", where), []).append(_fetch_all(store))
                for sched in schedulers:
                    for where, store in stores.items():
                        proxy = next((p for ms, p in proxies.items()
                                      if where == f"s3 {ms:g} ms"), None)
                        if proxy is not None:
                            proxy.reset()
                        cpu = server.cpu_seconds()
                        dt, got = _colsum(store, runners[sched])
                        cpu = None if cpu is None else server.cpu_seconds() - cpu
                        if proxy is not None:
                            cpus.setdefault((sched, where), []).append(cpu)
                        np.testing.assert_allclose(got, want, rtol=1e-4)
                        times.setdefault((sched, where), []).append(dt)
                        if proxy is not None:  # waves of requests: only with a delay
                            counts[sched, where] = dict(proxy.snapshot(), round_trips=(
                                proxy.round_trips() if proxy.delay else None))
            n_chunks = int(local.arrays["data"].nchunks)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        for proxy in proxies.values():
            proxy.stop()
        server.stop()
    records = []
    for (sched, where), ts in times.items():
        med = statistics.median(ts)
        base = statistics.median(times["threads" if sched == "fetch only" else sched, "local"])
        zero = times.get((sched, "s3 0 ms"))
        c = counts.get((sched, where), {})
        records.append({
            "group": "column sum", "scheduler": sched, "where": where, "seconds": med,
            "vs_local": med / base, "vs_0ms": med / statistics.median(zero) if zero and (
                where != "local") else None,
            "requests": c.get("requests"), "max_in_flight": c.get("max_in_flight"),
            "round_trips": c.get("round_trips"),
            "server_cpu_s": _median(cpus.get((sched, where), [])),
        })
    records += opens
    verdicts = []
    for sched in schedulers:
        r = next((r for r in records if r["scheduler"] == sched and r["where"] == "s3 30 ms"),
                 None)
        if r is not None:
            verdicts.append(f"{sched}: {r['vs_local']:.2f}x local disk "
                            f"({'met' if r['vs_local'] <= TARGET else 'not met'}), "
                            f"{r['vs_0ms']:.2f}x the 0 ms pass")
    note = (f"{args.rows:,} x {args.cols:,}, {int(X.nnz):,} nnz, {n_chunks} data chunks "
            f"({layout}); median of {args.rounds} interleaved rounds, each a new graph.  "
            f"Target at 30 ms: <= {TARGET:g}x local disk.  " + "; ".join(verdicts) + ".  "
            "'fetch only': every data and indices object requested at once and nothing "
            "decoded (vs_local against the threaded local sum), the floor this server and "
            "proxy leave any reader.")
    meta = run_meta(reproduce_command("benchmarks s3_dask", ap, args,
                                      ("rows", "cols", "density", "chunk_bytes", "shard_bytes",
                                       "delays", "rounds", "schedulers")),
                    title="Dask column sums from S3 under latency", note=note)
    return write_records("s3_dask", records, meta, args.out)


if __name__ == "__main__":
    main()
