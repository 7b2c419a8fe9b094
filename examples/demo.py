"""``make demo``: build a store, stream it through TensorFlow, train a Keras model on it.

Everything printed is measured on this machine: the store in ``./demo_data`` is written
fresh (overwritten), one epoch is streamed through
``sparsestore.adapters.tensorflow.to_dataset`` (and checked: every row and non-zero
arrives), then the small Keras model of ``examples/keras_train.py`` trains on it with a
held-out validation range.  It ends with a
summary (rows/s, M nnz/s, peak RSS, where the store is) and what to try next.

TensorFlow's C++ start-up lines (absl's "All log messages before absl::InitializeLog()"
preamble, the oneDNN notice) are dropped: ``TF_CPP_MIN_LOG_LEVEL`` does not reach them, so
the import runs with stderr captured and anything else it printed is passed on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Before TensorFlow loads: its C++ INFO and WARNING lines off, Keras on TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

import keras_train as kt  # noqa: E402

import sparsestore  # noqa: E402

DEFAULT_OUT = "demo_data"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _shown(path: Path | str) -> str:
    """``path`` relative to the working directory when it is below it, else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def print_summary(store: sparsestore.SparseStore, out: Path, tps: dict[str, kt.Throughput],
                  epochs: int, accuracy: float, tf_mib: float) -> None:
    """What a newcomer should take away, and what to run next."""
    info = store.info()
    n, m = info["shape"]
    print()
    print("Summary")
    print(f"  store      {_shown(store.path)}: {n:,} x {m:,} {info['dtype']}, "
          f"{info['nnz'] / 1e6:.2f} M non-zeros, {_mib(info['bytes_stored'])} on disk "
          f"({_mib(info['bytes_uncompressed'])} raw)")
    what = {"read": "DataLoader, shuffled, scipy CSR batches",
            "to TF": "the same batches as tf.SparseTensor, through tf.data",
            "training": f"Keras fit, {epochs} epochs, held-out accuracy {accuracy:.3f}"}
    for name, tp in tps.items():
        print(f"  {name:<10} {tp.rows_per_s:>11,.0f} rows/s  {tp.mnnz_per_s:6.2f} M nnz/s  "
              f"({what[name]})")
    print(f"  memory     peak RSS {kt.peak_rss_mb():,.0f} MiB, ~{tf_mib:,.0f} MiB of it "
          f"TensorFlow + Keras themselves")
    print("             (the matrix is streamed chunk by chunk, never loaded whole)")
    bin_dir = Path(sys.executable).parent
    cli = bin_dir / "sparsestore"
    cli_cmd = _shown(cli) if cli.exists() else f"{_shown(sys.executable)} -m sparsestore.cli"
    store_path = _shown(store.path)
    demo = f"{_shown(sys.executable)} {_shown(__file__)}"
    out_arg = "" if out == Path(DEFAULT_OUT) else f" --out {_shown(out)}"
    print("Try next")
    for cmd, why in [
        (f"{cli_cmd} info {store_path}", "shape, chunking, compression"),
        (f"{cli_cmd} bench {store_path} --shuffle", "the loader alone, one epoch"),
        (f"{demo} --rows 2000000 --epochs 1{out_arg}", "5x the rows"),
        ("make test", "adds the test stack, runs ruff + pytest"),
    ]:
        print(f"  {cmd:<58}  # {why}")
    print("  README.md: the Python API (sparsestore.save/open, DataLoader, to_dataset), "
          "converting your own files")


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
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for the store (overwritten)")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"1. writing a {args.rows:,} x {args.cols:,} synthetic sparse problem to {out}/")
    t0 = time.perf_counter()
    store = kt.build_store(out / "demo.zarr", args.rows, args.cols, args.density, seed=0)
    print(f"   written in {time.perf_counter() - t0:.2f} s")
    print_info(store)

    print("2. streaming one epoch (shuffled) through sparsestore.DataLoader")
    rss_before_tf = kt.rss_mb()
    kt.import_tensorflow_quietly()
    import sparsestore.adapters.tensorflow as sstf

    rss0 = kt.rss_mb()
    tf_mib = rss0 - rss_before_tf
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
    print_summary(store, out, {"read": np_tp, "to TF": tf_tp, "training": train_tp},
                  args.epochs, h["val_accuracy"][-1], tf_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
