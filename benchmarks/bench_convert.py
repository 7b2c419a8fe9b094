"""Convert: many ``.npz`` shards into one store, with 1 vs 2 workers, and its peak memory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .baselines import shard_paths
from .common import Ctx, case, need, rmtree


def _convert(ctx: Ctx, workers: int) -> dict[str, Any]:
    import sparsestore

    convert = need("sparsestore.convert", "convert")
    paths = shard_paths(ctx)
    dst = Path(ctx.work) / f"converted_w{workers}"
    rmtree(dst)
    t0 = time.perf_counter()
    convert(paths, dst, workers=workers)
    dt = time.perf_counter() - t0
    store = sparsestore.open(dst)
    out = {"rows": store.n_rows, "nnz": store.nnz, "seconds": dt, "shards": len(paths),
           "shard_max_bytes": ctx.meta.get("shard_max_bytes", 0)}
    rmtree(dst)
    return out


def _register(workers: int) -> None:
    case(f"convert_w{workers}", "convert", f"convert .npz shards -> store, workers={workers}",
         f"sparsestore.convert(<compressed .npz row shards>, dst, workers={workers})",
         ours=True, needs=("sparsestore.convert",))(lambda ctx: _convert(ctx, workers))


for _w in (1, 2):
    _register(_w)
