"""sparsestore's streaming paths: DataLoader, the TensorFlow dataset, Keras fit, scaling."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any

import numpy as np

from .baselines import tf_module, timed_pass
from .common import TF_NEEDS, Ctx, case, need, stream


def _store(ctx: Ctx, key: str = "store") -> Any:
    import sparsestore

    return sparsestore.open(ctx.path(key))


def _loader(store: Any, ctx: Ctx, **kw: Any) -> Any:
    DataLoader = need("sparsestore.loader", "DataLoader")
    return DataLoader(store, batch_size=ctx.batch_size, **kw)


def _count_batch(b: Any) -> tuple[int, int]:
    return b.n_rows, b.nnz


def _loader_pass(ctx: Ctx, pipeline: str | None = None, key: str = "store",
                 **kw: Any) -> dict[str, Any]:
    if pipeline is not None:
        zarr = need("zarr")
        need(pipeline.split(".")[0])
        cfg: Any = zarr.config.set({"codec_pipeline.path": pipeline})
    else:
        cfg = nullcontext()
    with cfg:
        store = _store(ctx, key)
        loader = _loader(store, ctx, **kw)
        res = stream(loader.iter_batches(), _count_batch, float("inf"))
    res["fraction"] = res["rows"] / store.n_rows
    res["store_rows"], res["store_nnz"] = store.n_rows, store.nnz
    return res


@case("ss_loader_seq", "stream", "sparsestore DataLoader, sequential (compact batches, no TF)",
      "DataLoader(store, 1024).iter_batches(): decoded compact CSR batches (values, indices, "
      "row_splits), no framework conversion", ours=True, needs=("sparsestore.loader",))
def ss_loader_seq(ctx: Ctx) -> dict[str, Any]:
    return _loader_pass(ctx)


@case("ss_loader_seq_zarrs", "stream",
      "sparsestore DataLoader, sequential, zarrs codec pipeline (no TF)",
      "as ss_loader_seq with zarr.config codec_pipeline.path=zarrs.ZarrsCodecPipeline",
      ours=True, needs=("sparsestore.loader", "zarrs"))
def ss_loader_seq_zarrs(ctx: Ctx) -> dict[str, Any]:
    return _loader_pass(ctx, "zarrs.ZarrsCodecPipeline")


def _tf_pass(ctx: Ctx, key: str = "store", **kw: Any) -> dict[str, Any]:
    tf_module()
    to_dataset = need("sparsestore.adapters.tensorflow", "to_dataset")
    store = _store(ctx, key)
    ds = to_dataset(_loader(store, ctx, **kw))
    res = timed_pass(ds, store.n_rows, float("inf"))
    res["store_rows"] = store.n_rows
    res["store_nnz"] = store.nnz
    return res


@case("ss_tf_seq", "stream", "sparsestore -> sparsestore.adapters.tensorflow, sequential (disk)",
      "to_dataset(DataLoader(store, 1024)): SparseTensor batches streamed from the store",
      ours=True, needs=TF_NEEDS)
def ss_tf_seq(ctx: Ctx) -> dict[str, Any]:
    return _tf_pass(ctx)


@case("ss_tf_shuffled", "stream", "sparsestore -> sparsestore.adapters.tensorflow, shuffled (disk)",
      "to_dataset(DataLoader(store, 1024, shuffle=True, seed=0)): block shuffle + 4-block "
      "row-shuffle buffer (each row once per epoch, each chunk decoded once)", ours=True,
      needs=TF_NEEDS)
def ss_tf_shuffled(ctx: Ctx) -> dict[str, Any]:
    return _tf_pass(ctx, shuffle=True, seed=0)


@case("ss_tf_random", "stream",
      "sparsestore -> sparsestore.adapters.tensorflow, random batches (disk)",
      "to_dataset(DataLoader(store, 1024, sampler=rng.permutation(n))): fully random rows per "
      "batch read by random access (the analogue of anndata random batches)", ours=True,
      needs=TF_NEEDS)
def ss_tf_random(ctx: Ctx) -> dict[str, Any]:
    tf_module()
    to_dataset = need("sparsestore.adapters.tensorflow", "to_dataset")
    store = _store(ctx)
    perm = np.random.default_rng(0).permutation(store.n_rows)
    ds = to_dataset(_loader(store, ctx, sampler=perm))
    return timed_pass(ds, store.n_rows, ctx.size.time_budget)


# ------------------------------------------------------------------ Keras


def _model(keras: Any, n_cols: int) -> Any:
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape=(n_cols,), sparse=True)
    h = keras.layers.Dense(64, activation="relu")(inp)
    out = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def _epoch_seconds(model: Any, ds: Any) -> float:
    t0 = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    return time.perf_counter() - t0


@case("keras_fit", "train", "Keras fit epoch: streamed from disk vs cached in memory",
      "2-layer model (sparse Input -> Dense 64 relu -> Dense 1 sigmoid, Adam, BCE); epoch "
      "time of model.fit(to_dataset(DataLoader(store, 1024, labels='y'))) vs the same dataset "
      "with .cache() filled by a first epoch, and vs a shuffled loader; median of the timed "
      "epochs after one warm-up epoch each, interleaved", ours=True,
      needs=(*TF_NEEDS, "keras"))
def keras_fit(ctx: Ctx) -> dict[str, Any]:
    tf_module()
    keras = need("keras")
    to_dataset = need("sparsestore.adapters.tensorflow", "to_dataset")
    store = _store(ctx)
    variants = {
        "stream": to_dataset(_loader(store, ctx, labels="y")),
        "cached": to_dataset(_loader(store, ctx, labels="y")).cache(),
        "shuffled": to_dataset(_loader(store, ctx, labels="y", shuffle=True, seed=0)),
    }
    models = {k: _model(keras, store.n_cols) for k in variants}
    for k, ds in variants.items():  # warm-up: tracing, and fills the cache
        _epoch_seconds(models[k], ds)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(ctx.size.keras_reps):
        for k, ds in variants.items():
            times[k].append(_epoch_seconds(models[k], ds))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rows": store.n_rows, "nnz": store.nnz, "seconds": med["stream"],
        "cached_seconds": med["cached"], "shuffled_seconds": med["shuffled"],
        "stream_over_cached": med["stream"] / med["cached"],
        "shuffled_over_sequential_throughput": med["stream"] / med["shuffled"],
        "epoch_times": times,
    }


# ------------------------------------------------------------------ scaling


def _register_scaling(mult: int) -> None:
    case(f"scaling_x{mult}", "scaling", f"sparsestore -> tensorflow, sequential, x{mult} rows",
         f"ss_tf_seq on a store with {mult}x the scaling base rows (same columns and density)",
         ours=True, needs=TF_NEEDS)(lambda ctx: _tf_pass(ctx, key=f"scaling_x{mult}"))
    case(f"scaling_loader_x{mult}", "scaling", f"sparsestore DataLoader (no TF), x{mult} rows",
         f"ss_loader_seq on the x{mult} scaling store: separates the loader's memory from "
         "TensorFlow's", ours=True, needs=("sparsestore.loader",))(
        lambda ctx: _loader_pass(ctx, key=f"scaling_x{mult}"))


for _m in (1, 4, 16):
    _register_scaling(_m)
