"""Train a Keras model on a sparse store streamed through ``sparsestore.adapters.tensorflow``.

A synthetic but learnable problem: sparse rows ``x`` and a binary label from a hidden
linear model, ``y = [x . w > 0]`` (a few labels flipped as noise).  The store is written
block by block (never whole in memory), the first rows train a
``keras.Input(shape=(n_cols,), sparse=True) -> Dense -> Dense`` model and the last rows
(``DataLoader(rows=...)``) validate it.  Prints rows/s, M nnz/s and peak RSS.

    python examples/keras_train.py --rows 100000 --cols 2000 --epochs 3 --out demo_data
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ info lines quiet


import sparsestore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import BLOCK_ROWS, build_store, synthetic_blocks  # noqa: E402, F401

# absl's preamble and glog-style INFO/WARNING lines ("I0000 00:00:1796... 5475 port.cc:153] ...").
_TF_NOISE = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\)"
                       rb"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] ")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and Keras with the C++ log lines they print at import dropped.

    Those lines go straight to file descriptor 2, before ``TF_CPP_MIN_LOG_LEVEL`` applies,
    so fd 2 points at a temporary file during the import; lines that are not TensorFlow's
    start-up log (a Python warning, an error) are written to stderr afterwards.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured if not _TF_NOISE.match(line)]
            if kept:
                sys.stderr.buffer.write(b"".join(kept))
                sys.stderr.flush()


# ------------------------------------------------------------------ data


def split_rows(store: sparsestore.SparseStore, val_fraction: float) -> tuple[slice, slice]:
    """Train on the first rows, validate on the held-out last ``val_fraction`` of them."""
    n_val = max(1, int(round(store.n_rows * val_fraction)))
    cut = store.n_rows - n_val
    return slice(0, cut), slice(cut, store.n_rows)


def make_datasets(
    store: sparsestore.SparseStore, batch_size: int = 512, seed: int = 0,
    val_fraction: float = 0.1,
) -> tuple[Any, Any, sparsestore.DataLoader]:
    """Shuffled training dataset, sequential validation dataset, and the training loader."""
    import sparsestore.adapters.tensorflow as sstf

    train_rows, val_rows = split_rows(store, val_fraction)
    train = sparsestore.DataLoader(store, batch_size, shuffle=True, seed=seed, labels="y",
                                   rows=train_rows)
    val = sparsestore.DataLoader(store, batch_size, labels="y", rows=val_rows)
    return sstf.to_dataset(train), sstf.to_dataset(val), train


# ------------------------------------------------------------------ model


def build_model(n_cols: int, hidden: int = 64, seed: int = 0) -> Any:
    """``Input(sparse=True) -> Dense(relu) -> Dense(sigmoid)``; the first matmul is sparse."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(n_cols,), sparse=True, name="x")
    h = keras.layers.Dense(hidden, activation="relu")(inputs)
    out = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(inputs, out)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy",
                  metrics=["accuracy"])
    return model


# ------------------------------------------------------------------ measuring


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def rss_mb() -> float:
    """Current resident memory of this process, in MiB (Linux; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mb()


@dataclass
class Throughput:
    rows: int
    nnz: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mnnz_per_s(self) -> float:
        return self.nnz / self.seconds / 1e6 if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        return (f"{self.rows:,} rows, {self.nnz / 1e6:.2f} M nnz in {self.seconds:.2f} s: "
                f"{self.rows_per_s:,.0f} rows/s, {self.mnnz_per_s:.2f} M nnz/s")


def rows_nnz(store: sparsestore.SparseStore, rows: slice) -> tuple[int, int]:
    """Rows and non-zeros of a contiguous row range (from indptr, nothing else read)."""
    ip = store.indptr(rows.start, rows.stop)
    return rows.stop - rows.start, int(ip[-1] - ip[0])


def stream_epoch(ds: Any) -> Throughput:
    """One pass of a dataset with no model: the input pipeline's own throughput."""
    import tensorflow as tf

    rows = nnz = 0
    t0 = time.perf_counter()
    for element in ds:
        x = element[0] if isinstance(element, tuple) else element
        rows += int(x.dense_shape[0]) if isinstance(x, tf.SparseTensor) else int(x.shape[0])
        nnz += int(tf.size(x.values)) if isinstance(x, tf.SparseTensor) else int(tf.size(x))
    return Throughput(rows, nnz, time.perf_counter() - t0)


def train(
    store: sparsestore.SparseStore, *, epochs: int = 3, batch_size: int = 512, hidden: int = 64,
    seed: int = 0, val_fraction: float = 0.1, verbose: int = 2,
) -> tuple[Any, Throughput]:
    """Fit the model on the store; returns the Keras history and the training throughput."""
    train_ds, val_ds, loader = make_datasets(store, batch_size, seed, val_fraction)
    model = build_model(store.n_cols, hidden, seed)
    train_rows, _ = split_rows(store, val_fraction)
    n_rows, n_nnz = rows_nnz(store, train_rows)
    t0 = time.perf_counter()
    # shuffle=False: the loader already shuffles (Keras cannot shuffle a tf.data.Dataset).
    history = model.fit(train_ds, epochs=epochs, validation_data=val_ds, shuffle=False,
                        verbose=verbose)
    seconds = time.perf_counter() - t0
    return history, Throughput(n_rows * epochs, n_nnz * epochs, seconds)


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="rows of the synthetic matrix")
    p.add_argument("--cols", type=int, default=2_000, help="columns (features)")
    p.add_argument("--density", type=float, default=0.01, help="fraction of non-zeros")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64, help="units of the hidden Dense layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_data", help="directory for the store (overwritten)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.out) / "train.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = build_store(path, args.rows, args.cols, args.density, args.seed)
    import_tensorflow_quietly()
    print(f"wrote {store!r} in {time.perf_counter() - t0:.1f} s")
    history, tp = train(store, epochs=args.epochs, batch_size=args.batch_size,
                        hidden=args.hidden, seed=args.seed)
    loss = history.history["loss"]
    print(f"loss {loss[0]:.4f} -> {loss[-1]:.4f}, "
          f"val_accuracy {history.history['val_accuracy'][-1]:.3f}")
    print(f"training: {tp}")
    print(f"peak RSS {peak_rss_mb():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
