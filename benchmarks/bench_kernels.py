"""The host COO build per batch: ``sparsestore.kernels.coo_into`` (numba) against its numpy
fallback, on one thread and split over two (work per batch that scales with cores).

Batches of 1024 rows of the synthetic ~100 nnz/row matrix, in memory (no decode): each
path writes every batch's ``(row, column)`` int64 coordinates into a reused buffer; the two
thread case gives each thread every other batch.  Medians of interleaved rounds::

    python -m benchmarks.bench_kernels [--rows N] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

from sparsestore import kernels

from .common import BATCH_SIZE, make_matrix


def _pass(fn: Any, batches: list[tuple[np.ndarray, np.ndarray]], out: np.ndarray) -> None:
    for splits, indices in batches:
        fn(splits, indices, out[: indices.size])


def _timed(fn: Any, batches: list[Any], threads: int) -> float:
    outs = [np.empty((max(b[1].size for b in batches), 2), np.int64) for _ in range(threads)]
    t0 = time.perf_counter()
    if threads == 1:
        _pass(fn, batches, outs[0])
    else:
        workers = [threading.Thread(target=_pass, args=(fn, batches[i::threads], outs[i]))
                   for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    return time.perf_counter() - t0


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    X = make_matrix(args.rows, 30_000, 100)
    batches = []
    for a in range(0, X.shape[0], BATCH_SIZE):
        ptr = X.indptr[a : a + BATCH_SIZE + 1].astype(np.int64)
        batches.append((ptr - ptr[0], X.indices[ptr[0] : ptr[-1]]))
    paths: dict[str, Any] = {"numpy": kernels._numpy_coo_into}
    if kernels.ACCELERATED:
        paths["numba"] = kernels.coo_into
    times: dict[str, list[float]] = {f"{k} x{t}": [] for k in paths for t in (1, 2)}
    for fn in paths.values():
        _timed(fn, batches, 1)  # compile / warm
    for _ in range(args.rounds):
        for key in times:
            name, t = key.split(" x")
            times[key].append(_timed(paths[name], batches, int(t)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{X.shape[0]:,} x {X.shape[1]:,}, {X.nnz:,} nnz, {len(batches)} batches of "
          f"{BATCH_SIZE} rows; medians of {args.rounds} rounds")
    for name in paths:
        one, two = med[f"{name} x1"], med[f"{name} x2"]
        print(f"  {name:6s} {one / X.nnz * 1e9:5.2f} ns/nnz on 1 thread, "
              f"{two / X.nnz * 1e9:5.2f} on 2: {one / two:.2f}x")
    return med


if __name__ == "__main__":
    main(sys.argv[1:])
