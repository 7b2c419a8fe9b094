"""``make demo``: build a store, stream it through TensorFlow, train a Keras model on it.

Everything printed is measured on this machine: the store in ``./demo_data`` is written
fresh (overwritten), one epoch is streamed through ``adapters.tensorflow.to_dataset`` (and
checked: every row and non-zero arrives), then the small Keras model of
``examples/keras_train.py`` trains on it with a held-out validation range.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

import keras_train as kt  # noqa: E402

import sparsestore  # noqa: E402


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_info(store: sparsestore.SparseStore) -> None:
    """A short summary of ``store.info()``."""
    info = store.info()
    n, m = info["shape"]
    print(f"  path        {info['path']}")
    print(f"  shape       {n:,} x {m:,}  ({info['format']}, {info['dtype']})")
    print(f"  nnz         {info['nnz']:,}  (density {info['density']:.4g})")
    print("  chunks      " + ", ".join(f"{k}={v}" for k, v in info["chunks"].items()))
    print(f"  on disk     {_mib(info['bytes_stored'])} for {_mib(info['bytes_uncompressed'])} "
          f"raw (ratio {info['compression_ratio']:.2f})")
    print(f"  labels      {info['labels']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--cols", type=int, default=10_000)
    p.add_argument("--density", type=float, default=0.002)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--out", default="demo_data", help="directory for the store (overwritten)")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"1. writing a {args.rows:,} x {args.cols:,} synthetic sparse problem to {out}/")
    t0 = time.perf_counter()
    store = kt.build_store(out / "demo.zarr", args.rows, args.cols, args.density, seed=0)
    print(f"   written in {time.perf_counter() - t0:.2f} s")
    print_info(store)

    print("2. streaming one epoch (shuffled) through sparsestore.DataLoader")
    import adapters.tensorflow as sstf

    rss0 = kt.rss_mb()
    loader = sparsestore.DataLoader(store, args.batch_size, shuffle=True, seed=0)
    t0 = time.perf_counter()
    rows = nnz = 0
    for X in loader:  # scipy CSR batches
        rows += X.shape[0]
        nnz += X.nnz
    np_tp = kt.Throughput(rows, nnz, time.perf_counter() - t0)
    print(f"   numpy (scipy CSR):         {np_tp}")
    tf_tp = kt.stream_epoch(sstf.to_dataset(loader))
    print(f"   tf.data (SparseTensor):    {tf_tp}")
    for tp in (np_tp, tf_tp):
        if (tp.rows, tp.nnz) != (store.n_rows, store.nnz):
            print(f"   MISMATCH: streamed {tp.rows} rows / {tp.nnz} nnz, store has "
                  f"{store.n_rows} / {store.nnz}")
            return 1
    print(f"   every row and non-zero arrived ({store.n_rows:,} rows, {store.nnz:,} nnz); "
          f"RSS {rss0:,.0f} -> {kt.rss_mb():,.0f} MiB for a matrix of "
          f"{_mib(store.info()['bytes_uncompressed'])}")

    print(f"3. training keras Input(sparse=True) -> Dense -> Dense for {args.epochs} epochs")
    history, train_tp = kt.train(store, epochs=args.epochs, batch_size=args.batch_size)
    h = history.history
    print(f"   loss {h['loss'][0]:.4f} -> {h['loss'][-1]:.4f}; held-out accuracy "
          f"{h['val_accuracy'][-1]:.3f}")
    print(f"   training throughput:       {train_tp}")
    print(f"4. memory: peak RSS {kt.peak_rss_mb():,.0f} MiB (TensorFlow included); "
          f"now {kt.rss_mb():,.0f} MiB; store on disk {_mib(store.info()['bytes_stored'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
