"""Column sums through dask: sparsestore's ``to_dask`` vs scipy in memory vs anndata's lazy
dask path."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .bench_store import best_of
from .common import Ctx, case, load_matrix, need


@case("dask_colsum_store", "dask", "column sums: store.to_dask().sum(axis=0) (disk)",
      "sparsestore store.to_dask().sum(axis=0).compute() with dask's default threaded "
      "scheduler", ours=True, needs=("dask.array", "sparsestore.dask"))
def dask_colsum_store(ctx: Ctx) -> dict[str, Any]:
    import sparsestore

    need("dask.array")
    need("sparsestore.dask", "to_dask")
    store = sparsestore.open(ctx.path("store"))
    t0 = time.perf_counter()
    arr = store.to_dask()
    sums = np.asarray(arr.sum(axis=0).compute()).ravel()
    dt = time.perf_counter() - t0
    return {"rows": store.n_rows, "nnz": store.nnz, "seconds": dt, "checksum": float(sums.sum())}


@case("dask_colsum_scipy", "dask", "column sums: scipy X.sum(axis=0) (memory)",
      "scipy CSR already in memory, X.sum(axis=0) (best of 2; loading not timed)",
      baseline=True, needs=("dask.array",))
def dask_colsum_scipy(ctx: Ctx) -> dict[str, Any]:
    X = load_matrix(ctx)
    dt, sums = best_of(lambda: np.asarray(X.sum(axis=0)).ravel())
    return {"rows": X.shape[0], "nnz": X.nnz, "seconds": dt, "checksum": float(sums.sum())}


@case("dask_colsum_scipy_load", "dask", "column sums: scipy load_npz + X.sum(axis=0) (disk)",
      "scipy.sparse.load_npz of the compressed .npz, then X.sum(axis=0): the in-memory route "
      "from the same disk", baseline=True, needs=("dask.array",))
def dask_colsum_scipy_load(ctx: Ctx) -> dict[str, Any]:
    src = Path(ctx.work) / "layouts" / "matrix_compressed.npz"
    if not src.exists():
        sp.save_npz(src, load_matrix(ctx), compressed=True)
    t0 = time.perf_counter()
    X = sp.load_npz(src)
    sums = np.asarray(X.sum(axis=0)).ravel()
    dt = time.perf_counter() - t0
    return {"rows": X.shape[0], "nnz": X.nnz, "seconds": dt, "checksum": float(sums.sum())}


@case("dask_colsum_anndata", "dask", "column sums: anndata read_elem_lazy (disk)",
      "anndata.experimental.read_elem_lazy(zarr group 'X') -> dask array of scipy CSR chunks; "
      "its .sum(axis=0) fails on scipy chunks (no keepdims), so map_blocks(b.sum(axis=0))"
      ".sum(axis=0), the usual workaround", baseline=True,
      needs=("dask.array", "anndata", "anndata.experimental"))
def dask_colsum_anndata(ctx: Ctx) -> dict[str, Any]:
    zarr = need("zarr")
    read_elem_lazy = need("anndata.experimental", "read_elem_lazy")
    need("dask.array")
    t0 = time.perf_counter()
    arr = read_elem_lazy(zarr.open_group(ctx.path("anndata_zarr"), mode="r")["X"])
    n_cols = arr.shape[1]
    part = arr.map_blocks(lambda b: np.asarray(b.sum(axis=0)), chunks=(1, n_cols),
                          dtype=np.float64, meta=np.empty((0, 0), np.float64))
    sums = np.asarray(part.sum(axis=0).compute()).ravel()
    dt = time.perf_counter() - t0
    return {"rows": arr.shape[0], "nnz": int(ctx.meta["nnz"]), "seconds": dt,
            "checksum": float(sums.sum())}
