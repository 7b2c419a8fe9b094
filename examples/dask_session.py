"""An interactive Dask session on a store: column statistics, a label query, a Keras epoch.

Opens a store (or builds a small synthetic one), computes per-column means and the ten
most frequent columns with ``store.to_dask()`` (lazy, chunk by chunk, never the whole
matrix), selects the rows whose label ``group`` is 1 and trains one Keras epoch on just those
rows through ``sparsestore.DataLoader(rows=mask)`` and ``sparsestore.adapters.tensorflow``.

    python examples/dask_session.py                       # synthetic store in a temp dir
    python examples/dask_session.py --store my.zarr --label group --value 1 --target y
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

import sparsestore


def synthetic_store(path: str, n_rows: int = 4000, n_cols: int = 300, seed: int = 0) -> Any:
    """Zipf-like column popularity, a learnable target ``y`` and a ``group`` label."""
    rng = np.random.default_rng(seed)
    nnz = n_rows * 15
    p = 1.0 / np.arange(1, n_cols + 1)  # column popularity: column 0 most frequent
    rows = rng.integers(0, n_rows, nnz)
    cols = rng.choice(n_cols, nnz, p=p / p.sum())
    vals = rng.random(nnz, dtype=np.float32) + 0.5
    X = sp.csr_matrix((vals, (rows, cols)), shape=(n_rows, n_cols))
    X.sum_duplicates()
    w = rng.standard_normal(n_cols).astype(np.float32)
    y = (X @ w > 0).astype(np.float32)
    group = rng.integers(0, 3, n_rows).astype(np.int64)
    return sparsestore.save(path, X, labels={"y": y, "group": group}, overwrite=True,
                            chunk_bytes=64 * 1024)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="store path or URL (default: a synthetic store)")
    ap.add_argument("--label", default="group", help="label to select rows by")
    ap.add_argument("--value", type=float, default=1, help="keep rows whose label equals this")
    ap.add_argument("--target", default="y", help="label to train on")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--no-train", action="store_true", help="skip the Keras epoch")
    args = ap.parse_args(argv)

    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory()
        store = synthetic_store(os.path.join(tmp.name, "session.zarr"))
    else:
        store = sparsestore.open(args.store)
    print(store)
    darr = store.to_dask()  # lazy: row blocks that follow the storage chunks
    print(darr)

    # Statistics in one pass over the chunks (dask shares the reads between them).
    means, counts = dask.compute(darr.mean(axis=0), da.count_nonzero(darr, axis=0))
    top10 = np.argsort(counts, kind="stable")[::-1][:10]
    print("mean of the first 5 columns:", np.round(means[:5], 4))
    print("10 most frequent columns:", top10.tolist(), "counts:", counts[top10].tolist())

    # Rows selected by a label, then the same rows as a dask array and as a loader.
    mask = np.asarray(store.labels[args.label][:]) == args.value
    print(f"{int(mask.sum())} of {store.n_rows} rows have {args.label} == {args.value:g}")
    sel_sum = darr[mask].sum(axis=1).compute()
    result: dict[str, Any] = {
        "means": means, "counts": counts, "top10": top10, "mask": mask, "selected_sums": sel_sum,
    }
    if not args.no_train and mask.any():
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from keras_train import import_tensorflow_quietly

        import_tensorflow_quietly()  # without TensorFlow's C++ start-up lines
        import keras
        import sparsestore.adapters.tensorflow as sstf

        loader = sparsestore.DataLoader(
            store, batch_size=args.batch_size, shuffle=True, seed=0, rows=mask,
            labels=args.target,
        )
        ds = sstf.to_dataset(loader)
        inp = keras.Input(shape=(store.n_cols,), sparse=True)
        out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Dense(16)(inp))
        model = keras.Model(inp, out)
        model.compile(optimizer="adam", loss="binary_crossentropy")
        hist = model.fit(ds, epochs=1, verbose=2, shuffle=False)  # the loader shuffles
        result["loss"] = float(hist.history["loss"][-1])
        result["batches"] = len(loader)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
