"""Real passes: default shuffle against a sequential pass, rows/s and batch label quality.

:mod:`benchmarks.bench_shuffle`'s synthetic store (200k x 30k, ~100 nnz per row, rows sorted
into 50 label groups) is saved with the default layout and with small chunks; passes
alternate between layouts and modes (median of ``--repeats``).  With ``--epochs N`` (N > 1)
each loader runs N epochs and a run's figure is the median of epochs 2..N: training's steady
state, where the loader's buffer pool is warm (a first pass also pays the page faults of
fresh memory).  ``--singlecell`` adds bench_shuffle's single-cell-shaped store (three shuffle
units at the default budget), in the default layout and in 128 KiB chunks in 8 MiB shards
(units of ~40-row runs), and ``--tf`` consumes every loader inside TensorFlow's graph too
(``ds.reduce`` over ``to_dataset``, as Keras does).  Run ``python -m benchmarks shuffle_pass
[--dir /tmp/x] [--epochs 4] [--singlecell] [--tf] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import sparsestore
from sparsestore.loader import DataLoader

from .bench_shuffle import LABEL, STORES, StoreSpec, write_store
from .common import add_out_argument
from .records import run_meta, write_records


def mean_tv(labels: np.ndarray, whole: np.ndarray) -> float:
    """Mean total-variation distance between each full 1024-row batch of ``labels`` (label
    codes in serving order) and the label mix ``whole``.  (``sparsestore.mixing`` scores row
    ids; the numpy loop yields labels.)"""
    full = labels[: labels.size // 1024 * 1024].reshape(-1, 1024)
    counts = np.stack([np.bincount(b, minlength=whole.size) for b in full])
    return float(np.mean(0.5 * np.abs(counts / 1024 - whole).sum(axis=1)))


def one_pass(store, groups: int, epochs: int = 1, **kw) -> tuple[float, float]:
    """Rows/s through the numpy backend (a first pass, or the median of epochs 2..N of
    one loader) and the mean batch label TV."""
    loader = DataLoader(store, batch_size=1024, **kw)
    rates, seen = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = 0
        for _x, y in loader:
            n += y.size
            if y.size == 1024:
                seen.append(y)
        rates.append(n / (time.perf_counter() - t0))
    whole = np.bincount(np.asarray(store.labels[kw["labels"]][:]), minlength=groups)
    return statistics.median(rates[1:] or rates), mean_tv(np.concatenate(seen),
                                                          whole / whole.sum())


def graph_pass(store, groups: int, epochs: int = 1, **kw) -> tuple[float, float]:
    """Rows/s of the same loader consumed inside TensorFlow's graph (``ds.reduce`` over
    ``sparsestore.adapters.tensorflow.to_dataset``: how Keras consumes it), first pass or
    the median of epochs 2..N; and the numpy loop's TV (the same batches)."""
    import sparsestore.adapters.tensorflow as sstf
    import tensorflow as tf

    loader = DataLoader(store, batch_size=1024, **kw)
    ds = sstf.to_dataset(loader)

    @tf.function
    def run() -> tf.Tensor:
        return ds.reduce(tf.constant(0, tf.int64), lambda n, x: n + x.dense_shape[0])

    rates = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = int(run())
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates[1:] or rates), float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None)
    add_out_argument(ap)
    ap.add_argument("--epochs", type=int, default=1,
                    help="epochs per loader; above 1, epochs 2..N are timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--singlecell", action="store_true",
                    help="also the single-cell-shaped store of bench_shuffle (100k x 20k, "
                         "~800 nnz/row, 30 groups), default layout")
    ap.add_argument("--tf", action="store_true",
                    help="also consume each loader in TensorFlow's graph (ds.reduce)")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    d = args.dir or Path(tempfile.mkdtemp())
    d.mkdir(parents=True, exist_ok=True)
    synthetic = StoreSpec("synthetic", args.rows, 30_000, 100, 50, False)
    singlecell = next(s for s in STORES if s.name == "singlecell")
    stores = {"default (4 MiB chunks)": (synthetic, {}),
              "chunk_bytes=131072": (synthetic, {"chunk_bytes": 131072})}
    if args.singlecell:
        shape = (f"singlecell ({singlecell.n_rows // 1000}k x {singlecell.n_cols // 1000}k, "
                 f"{singlecell.nnz_per_row} nnz/row)")
        stores[f"{shape}, default layout"] = (singlecell, {})
        stores[f"{shape}, 128 KiB chunks in 8 MiB shards"] = (
            singlecell, {"chunk_bytes": 2**17, "shard_bytes": 8 * 2**20})
    paths, groups_of = {}, {}
    for i, (name, (spec, layout)) in enumerate(stores.items()):
        paths[name], groups_of[name] = d / f"s{i}.zarr", spec.groups
        if not paths[name].exists():
            write_store(spec, paths[name], **layout)
    modes = {"sequential": dict(shuffle=False), "default shuffle": dict(shuffle=True, seed=0)}
    ways = {"numpy loop": one_pass}
    if args.tf:
        ways["TF in-graph"] = graph_pass
    runs: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for name, path in paths.items():
            store = sparsestore.open(path)
            for way, fn in ways.items():
                for mode, kw in modes.items():
                    if fn is one_pass:
                        kw = dict(kw, labels=LABEL)
                    runs.setdefault((name, way, mode), []).append(
                        fn(store, groups_of[name], args.epochs, **kw))
    rows = []
    for name, path in paths.items():
        y = np.asarray(sparsestore.open(path).labels[LABEL][:])
        g = groups_of[name]
        whole = np.bincount(y, minlength=g) / y.size
        ptv = mean_tv(y[np.random.default_rng(1).permutation(y.size)], whole)
        for way in ways:
            seq = statistics.median(r for r, _ in runs[(name, way, "sequential")])
            for mode in modes:
                rate = statistics.median(r for r, _ in runs[(name, way, mode)])
                tv = statistics.median(t for _, t in runs[(name, way, mode)])
                rows.append(dict(store=name, consumer=way, mode=mode, rows_per_s=rate,
                                 vs_sequential=rate / seq, tv=tv, tv_over_permutation=tv / ptv,
                                 epochs=args.epochs))
    steady = "the median of epochs 2-" + str(args.epochs) + " of one loader (training's " \
        "steady state: the pool warm, a one-unit share kept decoded)" if args.epochs > 1 \
        else "a loader's first pass"
    meta = run_meta(
        title="Real passes: default shuffle against sequential",
        note=f"Batch 1024, default loader settings (`shuffle_buffer_bytes` 512 MiB: the "
             f"synthetic store is one shuffle unit, a permutation; the single-cell store "
             f"three).  rows/s: {steady}; median of {args.repeats} runs, stores, consumers "
             f"and modes interleaved in one process.  `numpy loop`: `for x, y in loader`; "
             f"`TF in-graph`: `ds.reduce` over `to_dataset(loader)` inside a `tf.function` "
             f"(how Keras consumes it).  TV: mean total-variation distance between a batch's "
             f"label histogram and the store's (numpy loop's batches).  Load average at the "
             f"start: {', '.join(f'{x:.2f}' for x in load0)}.")
    write_records("shuffle_pass", [{"group": "", **r} for r in rows], meta, args.out)


if __name__ == "__main__":
    main()
