"""Streaming from S3 under request latency: rows/s of loader passes through a proxy adding
0, 10 and 30 ms per request, beside the same passes from local disk.

A local S3 server (moto) answers in well under a millisecond; real object storage takes
10-30 ms per request.  The store is saved to moto and read through
:class:`~benchmarks.latency_proxy.LatencyProxy`, which holds each request for the given
delay and counts requests per method and the most in flight.  Each pass (sequential, and
the default shuffle) is timed on a freshly opened store (opening not timed), after one
warm-up pass; the median of ``--repeats`` passes.

``python -m benchmarks s3_latency [--rows N] [--delays 0,10,30] [--out DIR]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

import sparsestore

from .common import add_out_argument, reproduce_command
from .latency_proxy import LatencyProxy
from .records import run_meta, write_records


def _matrix(rows: int, cols: int, density: float) -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    M = sp.random(rows, cols, density=density, format="csr", dtype=np.float32,
                  random_state=rng)
    M.data[:] = rng.integers(1, 100, M.nnz)
    return M


def _pass(store: Any, shuffle: bool, batch_size: int) -> float:
    """Rows per second of one loader pass."""
    t = time.perf_counter()
    n = sum(xb.shape[0] for xb in sparsestore.DataLoader(
        store, batch_size=batch_size, shuffle=shuffle, seed=1))
    return n / (time.perf_counter() - t)


NOTE = ("Median of the passes, each on a freshly opened store through the proxy (opening not "
        "timed), after a warm-up pass; `requests`: the GETs of the last timed pass, `vs 0 "
        "ms`: rows/s over the same pass at 0 ms.")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--cols", type=int, default=20_000)
    ap.add_argument("--density", type=float, default=0.002)
    ap.add_argument("--delays", default="0,10,30", help="ms added per request")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--chunk-bytes", type=int, default=None,
                    help="stored chunk size (default: the library's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per case (median)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    from tests.s3server import S3Server

    X = _matrix(args.rows, args.cols, args.density)
    layout = {} if args.chunk_bytes is None else {"chunk_bytes": args.chunk_bytes}
    server = S3Server().start()
    records: list[dict[str, Any]] = []

    def add(where: str, ms: float | None, shuffle: bool, store: Any,
            proxy: Any = None) -> None:
        _pass(store, shuffle, args.batch_size)  # warm-up
        rates, counts = [], {}
        for _ in range(args.repeats):
            if proxy is not None:
                store = sparsestore.open(url, storage_options=opts)  # not timed
                proxy.reset()
            rates.append(_pass(store, shuffle, args.batch_size))
            if proxy is not None:
                counts = proxy.snapshot()
        records.append({"group": "", "where": where, "delay ms": ms,
                        "pass": "shuffled" if shuffle else "sequential",
                        "rows/s": statistics.median(rates),
                        "requests": counts.get("requests"),
                        "max in flight": counts.get("max_in_flight")})

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = sparsestore.save(Path(tmp) / "x.zarr", X, **layout)
            chunks = int(local.arrays["data"].nchunks)
            url = f"s3://{server.new_bucket()}/x.zarr"
            sparsestore.save(url, X, storage_options=server.storage_options, **layout)
            for shuffle in (False, True):
                add("local", None, shuffle, local)
            for ms in (float(d) for d in args.delays.split(",")):
                with LatencyProxy(server.endpoint_url, ms / 1000) as proxy:
                    opts = dict(server.storage_options, endpoint_url=proxy.endpoint_url)
                    store = sparsestore.open(url, storage_options=opts)
                    for shuffle in (False, True):
                        add("s3", ms, shuffle, store, proxy)
    finally:
        server.stop()
    zero = {r["pass"]: r["rows/s"] for r in records if r["delay ms"] == 0}
    for r in records:
        r["vs 0 ms"] = r["rows/s"] / zero[r["pass"]] if r["where"] == "s3" and zero else None
    meta = run_meta(reproduce_command("benchmarks s3_latency", ap, args,
                                      ("rows", "cols", "density", "delays", "batch_size",
                                       "chunk_bytes", "repeats")),
                    title=f"S3 under latency: {args.rows:,} x {args.cols:,}, {X.nnz:,} nnz, "
                          f"{chunks} data chunks", note=NOTE)
    return write_records("s3_latency", records, meta, args.out)


if __name__ == "__main__":
    main()
