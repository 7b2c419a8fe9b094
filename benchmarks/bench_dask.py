"""Column sums through dask: sparsestore's ``to_dask`` vs scipy in memory vs anndata's lazy
dask path, and the decode-only floor under all of them.

Every timed case first runs one untimed tiny dask computation: a process's first
``compute`` imports ``distributed`` to look for a client (~0.2 s on the 2-core box),
whoever computes.  It then reports the median of ``REPEATS`` runs; each run builds a new
graph and decodes every chunk again (nothing decoded is kept between runs).
``dask_colsum_compare`` times all of them interleaved in one process (the fairest
comparison on a shared machine) and reports the ratios.  From a shell it needs ``WORK``,
the folder where the suite wrote its inputs (the store, the npz, ``ctx.json``): pass the
suite a ``--work`` folder of your own, so it is kept, then point this at it::

    python -m benchmarks suite --quick --work /tmp/daskwork --cases dask_colsum_compare
    python -m benchmarks dask /tmp/daskwork [rounds]
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .common import Ctx, case, load_matrix, need

REPEATS = 3  # timed runs per case (median)
ROUNDS = 5  # interleaved rounds of dask_colsum_compare


def _warm_dask() -> None:
    """Pay dask's once-per-process costs (scheduler lookup, thread pool) untimed."""
    import dask.array as da

    da.ones(4, chunks=2).sum().compute()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _median_of(fn: Callable[[], Any], repeats: int = REPEATS) -> tuple[float, list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        out = None
        dt, out = _timed(fn)
        times.append(dt)
    return statistics.median(times), times, out


def _ours(path: Any) -> Callable[[], np.ndarray]:
    import sparsestore

    store = sparsestore.open(path)

    def run() -> np.ndarray:
        # Graph construction (reading indptr for the block bounds) is timed too.
        return np.asarray(store.to_dask().sum(axis=0).compute()).ravel()

    return run


def _anndata(path: Any) -> Callable[[], np.ndarray]:
    zarr = need("zarr")
    read_elem_lazy = need("anndata.experimental", "read_elem_lazy")

    def run() -> np.ndarray:
        arr = read_elem_lazy(zarr.open_group(path, mode="r")["X"])
        n_cols = arr.shape[1]
        # Its chunks are plain scipy CSR, whose .sum has no keepdims: dask's own
        # arr.sum(axis=0) fails on them, so the usual workaround.
        part = arr.map_blocks(lambda b: np.asarray(b.sum(axis=0)), chunks=(1, n_cols),
                              dtype=np.float64, meta=np.empty((0, 0), np.float64))
        return np.asarray(part.sum(axis=0).compute()).ravel()

    return run


def _decode_only(path: Any, workers: int = 2) -> Callable[[], int]:
    """Every storage chunk of ``data`` and ``indices`` decoded (as to_dask's tasks decode
    them) in ``workers`` threads, nothing else: the floor of any column sum from disk."""
    import sparsestore
    from sparsestore.dask import _Chunks

    store = sparsestore.open(path)
    jobs = []
    for name in ("data", "indices"):
        reader = _Chunks(store.arrays[name], name)
        c = reader.chunk
        jobs += [(reader, k, lo, min(lo + c, store.nnz))
                 for k, lo in enumerate(range(0, store.nnz, c))]
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode-floor")

    def run() -> int:
        return sum(pool.map(lambda j: j[0].read(j[1], j[2], j[3]).size, jobs))

    return run


@case("dask_colsum_store", "dask", "column sums: store.to_dask().sum(axis=0) (disk)",
      f"sparsestore store.to_dask().sum(axis=0).compute() with dask's default threaded "
      f"scheduler, graph construction included (median of {REPEATS}, after an untimed tiny "
      "dask compute)", ours=True, needs=("dask.array", "sparsestore.dask"))
def dask_colsum_store(ctx: Ctx) -> dict[str, Any]:
    import sparsestore

    need("dask.array")
    need("sparsestore.dask", "to_dask")
    _warm_dask()
    store = sparsestore.open(ctx.path("store"))
    dt, times, sums = _median_of(_ours(ctx.path("store")))
    return {"rows": store.n_rows, "nnz": store.nnz, "seconds": dt, "runs": times,
            "checksum": float(sums.sum())}


@case("dask_colsum_decode", "dask", "decode only: every data+indices chunk (disk)",
      "the chunks of data and indices decoded as to_dask's tasks decode them (CRC32C check, "
      f"Blosc into a fresh array), 2 threads, no sum: the floor (median of {REPEATS})",
      baseline=True, needs=("sparsestore.dask",))
def dask_colsum_decode(ctx: Ctx) -> dict[str, Any]:
    import sparsestore

    store = sparsestore.open(ctx.path("store"))
    dt, times, _ = _median_of(_decode_only(ctx.path("store")))
    return {"rows": store.n_rows, "nnz": store.nnz, "seconds": dt, "runs": times}


@case("dask_colsum_scipy", "dask", "column sums: scipy X.sum(axis=0) (memory)",
      f"scipy CSR already in memory, X.sum(axis=0) (median of {REPEATS}; loading not timed)",
      baseline=True, needs=("dask.array",))
def dask_colsum_scipy(ctx: Ctx) -> dict[str, Any]:
    X = load_matrix(ctx)
    dt, times, sums = _median_of(lambda: np.asarray(X.sum(axis=0)).ravel())
    return {"rows": X.shape[0], "nnz": X.nnz, "seconds": dt, "runs": times,
            "checksum": float(sums.sum())}


@case("dask_colsum_scipy_load", "dask", "column sums: scipy load_npz + X.sum(axis=0) (disk)",
      "scipy.sparse.load_npz of the compressed .npz, then X.sum(axis=0): the in-memory route "
      "from the same disk", baseline=True, needs=("dask.array",))
def dask_colsum_scipy_load(ctx: Ctx) -> dict[str, Any]:
    src = Path(ctx.work) / "layouts" / "matrix_compressed.npz"
    if not src.exists():
        src.parent.mkdir(parents=True, exist_ok=True)
        sp.save_npz(src, load_matrix(ctx), compressed=True)
    t0 = time.perf_counter()
    X = sp.load_npz(src)
    sums = np.asarray(X.sum(axis=0)).ravel()
    dt = time.perf_counter() - t0
    return {"rows": X.shape[0], "nnz": X.nnz, "seconds": dt, "checksum": float(sums.sum())}


@case("dask_colsum_anndata", "dask", "column sums: anndata read_elem_lazy (disk)",
      "anndata.experimental.read_elem_lazy(zarr group 'X') -> dask array of scipy CSR chunks; "
      "its .sum(axis=0) fails on scipy chunks (no keepdims), so map_blocks(b.sum(axis=0))"
      f".sum(axis=0), the usual workaround (median of {REPEATS}, after an untimed tiny dask "
      "compute)", baseline=True, needs=("dask.array", "anndata", "anndata.experimental"))
def dask_colsum_anndata(ctx: Ctx) -> dict[str, Any]:
    need("dask.array")
    _warm_dask()
    dt, times, sums = _median_of(_anndata(ctx.path("anndata_zarr")))
    return {"rows": ctx.size.n_rows, "nnz": int(ctx.meta["nnz"]), "seconds": dt,
            "runs": times, "checksum": float(sums.sum())}


def compare(ctx: Ctx, rounds: int = ROUNDS) -> dict[str, Any]:
    """ours, anndata, scipy in memory and the decode floor, interleaved, ``rounds`` times."""
    _warm_dask()
    X = load_matrix(ctx)
    fns: dict[str, Callable[[], Any]] = {
        "ours": _ours(ctx.path("store")),
        "decode": _decode_only(ctx.path("store")),
        "scipy": lambda: np.asarray(X.sum(axis=0)).ravel(),
    }
    with contextlib.suppress(Exception):  # anndata missing: compare the rest
        fns["anndata"] = _anndata(ctx.path("anndata_zarr"))
    ref = fns["scipy"]()
    np.testing.assert_allclose(fns["ours"](), ref, rtol=1e-4)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_timed(fn)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {f"{k}_s": v for k, v in med.items()}
    out["runs"] = times
    out["ours_vs_scipy"] = med["scipy"] / med["ours"]  # speed ratio; target >= 0.5
    out["decode_vs_scipy"] = med["scipy"] / med["decode"]  # the best ours could reach
    if "anndata" in med:
        out["ours_vs_anndata"] = med["anndata"] / med["ours"]  # target >= 3
    return out


@case("dask_colsum_compare", "dask", "column sums: ours, anndata, scipy, decode interleaved",
      f"one process, {ROUNDS} interleaved rounds of to_dask().sum(axis=0) (seconds: its "
      "median), anndata's read_elem_lazy path, scipy in memory and the decode-only floor; "
      "ratios in results.json", ours=True,
      needs=("dask.array", "sparsestore.dask"))
def dask_colsum_compare(ctx: Ctx) -> dict[str, Any]:
    res = compare(ctx)
    return {"rows": ctx.size.n_rows, "nnz": int(ctx.meta["nnz"]), "seconds": res["ours_s"],
            **res}


def main(argv: list[str]) -> dict[str, Any]:
    import json

    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    work = Path(argv[0])
    if not (work / "ctx.json").is_file():
        raise SystemExit(
            f"bench_dask: error: {work} holds no ctx.json; WORK is the --work folder of a "
            f"suite run (python -m benchmarks suite --quick --work {work})"
        )
    ctx = Ctx.from_json(json.loads((work / "ctx.json").read_text()))
    rounds = int(argv[1]) if len(argv) > 1 else ROUNDS
    res = compare(ctx, rounds)
    nnz = int(ctx.meta["nnz"])
    print(f"{ctx.size.n_rows:,} x {ctx.size.n_cols:,}, {nnz:,} nnz; median of {rounds} "
          "interleaved rounds")
    for k in ("ours", "anndata", "scipy", "decode"):
        if f"{k}_s" in res:
            s = res[f"{k}_s"]
            print(f"  {k:8s} {s * 1e3:9.1f} ms  {nnz / s / 1e6:8.1f} M nnz/s")
    for k in ("ours_vs_anndata", "ours_vs_scipy", "decode_vs_scipy"):
        if k in res:
            print(f"  {k:16s} {res[k]:.3f}x")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
