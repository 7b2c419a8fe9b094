"""The usual ways to feed a scipy sparse matrix to TensorFlow, as comparison baselines.

Each yields ``tf.sparse.SparseTensor`` batches of ``ctx.batch_size`` rows of the same
reference matrix, through ``tf.data`` with ``prefetch(AUTOTUNE)``, and is timed over one
pass (cut after the size's time budget: the row fraction reached is reported).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .common import (
    TF_NEEDS,
    Ctx,
    case,
    coo_parts,
    count_sparse_tensor,
    idiom_dataset,
    load_matrix,
    need,
    stream,
)

AD_NEEDS = (*TF_NEEDS, "anndata", "h5py")


def tf_module() -> Any:
    """TensorFlow, quietly imported (or the case is skipped)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return need("tensorflow")


def coo_signature(tf: Any, dtype: Any = np.float32) -> tuple[Any, ...]:
    return (tf.TensorSpec((None, 2), tf.int64), tf.TensorSpec((None,), tf.as_dtype(dtype)),
            tf.TensorSpec((2,), tf.int64))


def to_sparse_tensor(tf: Any) -> Any:
    """``map`` function building the SparseTensor from ``coo_parts`` in the graph."""
    return lambda i, v, s: tf.sparse.SparseTensor(i, v, s)


def timed_pass(ds: Any, n_rows: int, budget: float) -> dict[str, Any]:
    """Trace/warm the pipeline with one element of a first iterator, then time a full pass."""
    warm = iter(ds)
    next(warm)
    del warm
    res = stream(ds, count_sparse_tensor, budget)
    res["fraction"] = res["rows"] / max(1, n_rows)
    return res


def csr_batches(X: sp.csr_matrix, bs: int) -> Any:
    for a in range(0, X.shape[0], bs):
        yield coo_parts(X[a : a + bs])


# ------------------------------------------------------------------ in memory


@case("tf_from_tensor_slices", "stream", "tf from_tensor_slices(SparseTensor).batch (memory)",
      "whole matrix as one tf.SparseTensor in memory; Dataset.from_tensor_slices(st)"
      ".batch(1024) slices it row by row in TF's C++ and re-batches", baseline=True, needs=TF_NEEDS)
def tf_from_tensor_slices(ctx: Ctx) -> dict[str, Any]:
    tf = tf_module()
    X = load_matrix(ctx)
    ds = idiom_dataset(tf, tf.sparse.SparseTensor(*coo_parts(X)), batch_size=ctx.batch_size)
    return timed_pass(ds, X.shape[0], ctx.size.time_budget)


@case("tf_from_generator", "stream", "tf from_generator, scipy CSR -> COO per batch (memory)",
      "in-memory scipy CSR; a Python generator slices X[a:a+1024], calls tocoo() and "
      "stacks row/col ids; SparseTensor built in Dataset.map", baseline=True, needs=TF_NEEDS)
def tf_from_generator(ctx: Ctx) -> dict[str, Any]:
    tf = tf_module()
    X = load_matrix(ctx)
    bs = ctx.batch_size
    ds = tf.data.Dataset.from_generator(lambda: csr_batches(X, bs),
                                        output_signature=coo_signature(tf, X.dtype))
    ds = ds.map(to_sparse_tensor(tf)).prefetch(tf.data.AUTOTUNE)
    return timed_pass(ds, X.shape[0], ctx.size.time_budget)


@case("tf_ragged_rows", "stream", "tf from_tensor_slices((ragged cols, ragged vals)) (memory)",
      "the per-row recipe: column ids and values as RaggedTensors split by indptr, "
      "from_tensor_slices gives one ragged row per element, .batch(1024) regroups them, "
      "Dataset.map turns each ragged batch into a SparseTensor (value_rowids + flat_values)",
      baseline=True, needs=TF_NEEDS)
def tf_ragged_rows(ctx: Ctx) -> dict[str, Any]:
    tf = tf_module()
    X = load_matrix(ctx)
    n_cols = X.shape[1]
    splits = X.indptr.astype(np.int64)
    cols = tf.RaggedTensor.from_row_splits(X.indices.astype(np.int64), splits)
    vals = tf.RaggedTensor.from_row_splits(X.data, splits)

    def to_sparse(c: Any, v: Any) -> Any:
        idx = tf.stack([c.value_rowids(), c.flat_values], axis=1)
        shape = tf.stack([c.nrows(), tf.constant(n_cols, tf.int64)])
        return tf.sparse.SparseTensor(idx, v.flat_values, shape)

    ds = tf.data.Dataset.from_tensor_slices((cols, vals)).batch(ctx.batch_size)
    ds = ds.map(to_sparse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return timed_pass(ds, X.shape[0], ctx.size.time_budget)


# ------------------------------------------------------------------ from disk


def _anndata_dataset(ctx: Ctx, kind: str) -> tuple[Any, Any]:
    """``anndata.io.sparse_dataset`` over the CSR group anndata wrote in the setup."""
    sparse_dataset = need("anndata.io", "sparse_dataset")
    if kind == "zarr":
        zarr = need("zarr")
        group = zarr.open_group(ctx.path("anndata_zarr"), mode="r")["X"]
        return sparse_dataset(group), None
    h5py = need("h5py")
    f = h5py.File(ctx.path("anndata_h5"), "r")
    return sparse_dataset(f["X"]), f


def _anndata_case(ctx: Ctx, kind: str, random: bool) -> dict[str, Any]:
    tf = tf_module()
    data, handle = _anndata_dataset(ctx, kind)
    n, bs = data.shape[0], ctx.batch_size
    rng = np.random.default_rng(0)

    def gen() -> Any:
        if random:
            perm = rng.permutation(n)
            for a in range(0, n, bs):
                yield coo_parts(data[np.sort(perm[a : a + bs])])
        else:
            for a in range(0, n, bs):
                yield coo_parts(data[a : a + bs])

    try:
        ds = tf.data.Dataset.from_generator(gen, output_signature=coo_signature(tf, data.dtype))
        ds = ds.map(to_sparse_tensor(tf)).prefetch(tf.data.AUTOTUNE)
        return timed_pass(ds, n, ctx.size.time_budget)
    finally:
        if handle is not None:
            handle.close()


def _register_anndata(kind: str, random: bool) -> None:
    fmt, order = ("zarr", "zarr") if kind == "zarr" else ("h5", "HDF5")
    how = "random batches" if random else "sequential"
    case(f"anndata_{fmt}_{'random' if random else 'seq'}", "stream",
         f"anndata sparse_dataset, {order}, {how} (disk)",
         f"anndata.io.sparse_dataset over the CSR group anndata.io.write_elem wrote "
         f"({'zarr' if kind == 'zarr' else 'HDF5 via h5py'}, anndata's default chunking); "
         f"{'random (sorted random row ids)' if random else 'sequential'} batches of 1024 rows "
         "read with ds[...], tocoo per batch in a from_generator, SparseTensor in Dataset.map",
         baseline=True, needs=AD_NEEDS)(lambda ctx: _anndata_case(ctx, kind, random))


for _kind in ("zarr", "h5"):
    for _random in (False, True):
        _register_anndata(_kind, _random)


def shard_paths(ctx: Ctx) -> list[str]:
    return sorted(str(p) for p in Path(ctx.paths["shards"]).glob("*.npz"))


@case("npz_interleave", "stream", "np.load of .npz shards in Dataset.interleave (disk)",
      "the matrix as compressed scipy .npz row shards; Dataset.from_tensor_slices(paths)"
      ".interleave(from_generator(load_npz + tocoo per 1024 rows), cycle_length=2, "
      "num_parallel_calls=AUTOTUNE); batches do not cross shard boundaries",
      baseline=True, needs=TF_NEEDS)
def npz_interleave(ctx: Ctx) -> dict[str, Any]:
    tf = tf_module()
    paths = shard_paths(ctx)
    bs = ctx.batch_size
    sig = coo_signature(tf)

    def gen(path: bytes) -> Any:
        X = sp.load_npz(path.decode()).tocsr()
        yield from csr_batches(X, bs)

    ds = tf.data.Dataset.from_tensor_slices(paths).interleave(
        lambda p: tf.data.Dataset.from_generator(gen, output_signature=sig, args=(p,)),
        cycle_length=2, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.map(to_sparse_tensor(tf)).prefetch(tf.data.AUTOTUNE)
    return timed_pass(ds, ctx.size.n_rows, ctx.size.time_budget)
