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
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

import sparsestore

from .latency_proxy import LatencyProxy


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
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)
    from tests.s3server import S3Server

    X = _matrix(args.rows, args.cols, args.density)
    layout = {} if args.chunk_bytes is None else {"chunk_bytes": args.chunk_bytes}
    server = S3Server().start()
    record: dict[str, Any] = {
        "rows": args.rows, "cols": args.cols, "nnz": int(X.nnz), "layout": layout,
        "batch_size": args.batch_size, "repeats": args.repeats, "passes": [],
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = sparsestore.save(Path(tmp) / "x.zarr", X, **layout)
            record["chunks"] = int(local.arrays["data"].nchunks)
            url = f"s3://{server.new_bucket()}/x.zarr"
            sparsestore.save(url, X, storage_options=server.storage_options, **layout)
            for shuffle in (False, True):
                _pass(local, shuffle, args.batch_size)
                record["passes"].append({
                    "where": "local", "delay_ms": None, "shuffle": shuffle,
                    "rows_per_s": statistics.median(
                        _pass(local, shuffle, args.batch_size) for _ in range(args.repeats))})
            for ms in (float(d) for d in args.delays.split(",")):
                with LatencyProxy(server.endpoint_url, ms / 1000) as proxy:
                    opts = dict(server.storage_options, endpoint_url=proxy.endpoint_url)
                    proxy.reset()
                    t = time.perf_counter()
                    store = sparsestore.open(url, storage_options=opts)
                    open_s = time.perf_counter() - t
                    open_counts = proxy.snapshot()
                    for shuffle in (False, True):
                        _pass(store, shuffle, args.batch_size)  # warm-up
                        rates = []
                        for _ in range(args.repeats):
                            fresh = sparsestore.open(url, storage_options=opts)  # not timed
                            proxy.reset()
                            rates.append(_pass(fresh, shuffle, args.batch_size))
                            counts = proxy.snapshot()
                        rate = statistics.median(rates)
                        record["passes"].append({
                            "where": "s3", "delay_ms": ms, "shuffle": shuffle,
                            "rows_per_s": rate, "requests": counts["by_method"],
                            "max_in_flight": counts["max_in_flight"],
                            "open_s": open_s, "open_requests": open_counts["by_method"],
                        })
    finally:
        server.stop()
    for shuffle in (False, True):
        base = [p for p in record["passes"] if p["where"] == "s3" and p["shuffle"] == shuffle]
        zero = next((p["rows_per_s"] for p in base if p["delay_ms"] == 0), None)
        for p in base:
            p["vs_0ms"] = None if not zero else p["rows_per_s"] / zero
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "s3_latency.json").write_text(json.dumps(record, indent=1))
    lines = [f"# S3 under latency: {args.rows} x {args.cols}, {X.nnz} nnz, "
             f"{record['chunks']} data chunks", "",
             "Reproduce: `python -m benchmarks s3_latency " + " ".join(argv or []) + "`; median "
             f"of {args.repeats} passes, each on a freshly opened store through the proxy.", "",
             "| where | delay ms | pass | rows/s | vs 0 ms | requests | max in flight |",
             "|---|---|---|---|---|---|---|"]
    for p in record["passes"]:
        vs = p.get("vs_0ms")
        lines.append(
            f"| {p['where']} | {'' if p['delay_ms'] is None else int(p['delay_ms'])} | "
            f"{'shuffled' if p['shuffle'] else 'sequential'} | {p['rows_per_s']:,.0f} | "
            f"{'' if vs is None else f'{vs:.2f}'} | {p.get('requests', '')} | "
            f"{p.get('max_in_flight', '')} |")
    (out / "s3_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
