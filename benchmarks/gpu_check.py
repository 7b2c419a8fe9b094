"""Can ``to_dataset`` feed a GPU?  A short check (under 3 minutes).

Where TensorFlow sees a GPU, on a synthetic store (~100 nnz/row, float32, labels ``y``):

1. ``keras``: ``model.fit`` streaming from the store, ``jit_compile=False`` (sparse
   ``Dense`` has no XLA kernel), tiny model ``Input(sparse=True) -> Dense(1)``.
2. ``staging``: ``SparseTensor`` batches staged on the device, three ways tried in turn:
   ``tf.data.experimental.prefetch_to_device``; a ``map`` copying the parts under
   ``tf.device``; a copy in the Python loop.  Each reports whether it ran and where the
   batch's ``indices`` / ``values`` ended up.
3. ``bytes_per_nnz``: what crosses host -> device per non-zero, from the batches
   themselves (COO as built on the host, and the compact CSR parts for comparison).
4. ``epochs``: Keras epoch seconds, streamed vs cached (``to_dataset(...).cache()``) vs
   the idiom ``from_tensor_slices((SparseTensor, y)).batch``, interleaved, medians.

Without a GPU it says so and exits 0.  ``--device /CPU:0`` runs the same steps on the CPU
(to test the script itself)::

    python -m benchmarks.gpu_check [--rows 100000] [--json out.json] [--device /CPU:0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .common import BATCH_SIZE, coo_parts, idiom_dataset, store_with_matrix

BUDGET_S = 150.0  # steps still to run after this are skipped (the whole script < 3 min)


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:400]


def _where(x: Any) -> dict[str, str]:
    return {"indices": x.indices.device, "values": x.values.device}


def _on(dev: str, placed: dict[str, str]) -> bool:
    kind = dev.strip("/").split(":")[0].upper()
    return all(f"{kind}:" in d.upper() for d in placed.values())


def check(device: str, rows: int, cols: int, per_row: int, rounds: int,
          work: Path, log: Any = print) -> dict[str, Any]:
    import keras
    import sparsestore.adapters.tensorflow as sstf
    import tensorflow as tf

    from sparsestore.loader import DataLoader

    t_start = time.perf_counter()
    out: dict[str, Any] = {"device": device,
                           "tf_devices": [d.name for d in tf.config.list_logical_devices()]}

    def left() -> bool:
        return time.perf_counter() - t_start < BUDGET_S

    store, X, y = store_with_matrix(work / "store.zarr", rows, cols, per_row)
    out["matrix"] = {"shape": [rows, cols], "nnz": int(X.nnz)}
    log(f"store: {rows:,} x {cols:,}, {X.nnz:,} nnz ({time.perf_counter() - t_start:.0f} s)")

    def stream(labels: bool = True) -> Any:
        return sstf.to_dataset(DataLoader(store, BATCH_SIZE, labels="y" if labels else None))

    def model() -> Any:
        keras.utils.set_random_seed(0)
        with tf.device(device):
            inp = keras.Input(shape=(cols,), sparse=True)
            m = keras.Model(inp, keras.layers.Dense(1)(inp))
            m.compile(optimizer="sgd", loss="mse", jit_compile=False)
        return m

    def epoch(m: Any, ds: Any) -> float:
        t0 = time.perf_counter()
        with tf.device(device):
            m.fit(ds, epochs=1, shuffle=False, verbose=0)
        return time.perf_counter() - t0

    # 1. Keras fit, streaming, no XLA
    try:
        m = model()
        s = epoch(m, stream())
        kernel = m.layers[-1].kernel
        out["keras"] = {"ok": True, "first_epoch_s": s, "kernel_device": str(
            getattr(getattr(kernel, "value", kernel), "device", "unknown"))}
    except Exception as exc:
        out["keras"] = {"ok": False, "error": _err(exc), "trace": traceback.format_exc()[-1500:]}
    log(f"keras: {out['keras']}")

    # 2. staging SparseTensor batches on the device
    staging: dict[str, Any] = {}

    def staged_prefetch() -> Any:
        return stream(False).apply(tf.data.experimental.prefetch_to_device(device))

    def staged_map() -> Any:
        def copy(x: Any) -> Any:
            with tf.device(device):
                return tf.sparse.SparseTensor(tf.identity(x.indices), tf.identity(x.values),
                                              tf.identity(x.dense_shape))

        return stream(False).map(copy)

    def staged_loop() -> Any:
        for x in stream(False):
            with tf.device(device):
                yield tf.sparse.SparseTensor(tf.identity(x.indices), tf.identity(x.values),
                                             x.dense_shape)

    for name, make in (("prefetch_to_device", staged_prefetch), ("map_under_tf_device",
                       staged_map), ("python_loop_copy", staged_loop)):
        if not left():
            staging[name] = {"ok": False, "error": "skipped: time budget"}
            continue
        try:
            t0 = time.perf_counter()
            n = 0
            placed: dict[str, str] = {}
            for x in make():
                placed = _where(x)
                n += int(x.values.shape[0])
            s = time.perf_counter() - t0
            staging[name] = {"ok": True, "placed": placed, "on_device": _on(device, placed),
                             "seconds": s, "m_nnz_per_s": n / s / 1e6}
        except Exception as exc:
            staging[name] = {"ok": False, "error": _err(exc)}
        log(f"staging {name}: {staging[name]}")
    worked = [k for k, v in staging.items() if v.get("ok") and v.get("on_device")]
    out["staging"] = staging
    out["staging_worked"] = worked[0] if worked else None

    # 3. host -> device bytes per non-zero, from the batches
    nb = {"coo_host": 0, "labels": 0, "csr_compact": 0}
    nnz = 0
    for x, lab in stream():
        nb["coo_host"] += x.indices.numpy().nbytes + x.values.numpy().nbytes + 8 * 2
        nb["labels"] += lab.numpy().nbytes
        k = int(x.values.shape[0])
        nnz += k
        # values + int32 column ids + int64 row_splits: what expand="graph" hands over
        nb["csr_compact"] += k * (4 + 4) + 8 * (int(x.dense_shape[0]) + 1)
    out["bytes_per_nnz"] = {k: v / max(nnz, 1) for k, v in nb.items()}
    log(f"bytes per nnz: {out['bytes_per_nnz']}")

    # 4. streamed vs cached vs idiom epochs
    if left():
        try:
            idiom = idiom_dataset(tf, tf.sparse.SparseTensor(*coo_parts(X)), y)
            variants: dict[str, Any] = {"stream": stream(), "cached": stream().cache(),
                                        "idiom": idiom}
            if out["staging_worked"] == "prefetch_to_device":
                variants["stream_prefetch_to_device"] = stream().apply(
                    tf.data.experimental.prefetch_to_device(device))
            models = {k: model() for k in variants}
            failed: dict[str, str] = {}
            for k, ds in list(variants.items()):  # warm-up: tracing, fills the cache
                try:
                    epoch(models[k], ds)
                except Exception as exc:
                    if k in ("stream", "cached"):
                        raise
                    failed[k] = _err(exc)
                    del variants[k]
            times: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(rounds):
                if not left():
                    break
                keys = list(variants) if r % 2 == 0 else list(variants)[::-1]
                for k in keys:
                    times[k].append(epoch(models[k], variants[k]))
            med = {k: statistics.median(v) for k, v in times.items() if v}
            out["epochs"] = {"seconds": med, "times": times, "failed": failed,
                             "stream_over_cached": med["stream"] / med["cached"],
                             "stream_over_idiom": med["stream"] / med["idiom"]}
        except Exception as exc:
            out["epochs"] = {"error": _err(exc), "trace": traceback.format_exc()[-1500:]}
    else:
        out["epochs"] = {"error": "skipped: time budget"}
    log(f"epochs: {out['epochs']}")
    out["seconds_total"] = time.perf_counter() - t_start
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None,
                   help="default /GPU:0 when visible; /CPU:0 tests the script on a CPU host")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--cols", type=int, default=30_000)
    p.add_argument("--nnz-per-row", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    device = args.device
    if device is None:
        if not gpus:
            print("gpu_check: no GPU visible to TensorFlow "
                  f"(devices: {[d.name for d in tf.config.list_physical_devices()]}); "
                  "nothing to check")
            return 0
        device = "/GPU:0"
    for g in gpus:  # do not grab the whole card
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(g, True)
    with tempfile.TemporaryDirectory() as tmp:
        res = check(device, args.rows, args.cols, args.nnz_per_row, args.rounds, Path(tmp))
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
