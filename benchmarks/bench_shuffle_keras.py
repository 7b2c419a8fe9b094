"""Does the loader's default shuffle train a Keras model as well as a true shuffle, on a
store whose rows are sorted by the label?

A label-sorted store is written: 300,000 x 5,000, ~30 nnz/row, 20 classes stored one
after another in uneven groups (as a single-cell atlas stores sample after sample).  Each
class prefers its own set of columns: a fifth of a row's entries are drawn from its
class's set, the rest uniformly, so the class is learnable but not trivially (the Bayes
classifier of this generator gets ~92% of the rows right).  A random
20% of the rows is held out (``DataLoader(rows=...)``; the training rows are visited in
storage order unless shuffled, so unshuffled training sees one class after another).

One softmax ``Dense`` layer on ``keras.Input(shape=(n_cols,), sparse=True)`` (Adam 1e-3,
batch 256) trains for ``--epochs`` epochs on each order:

* ``sequential``: ``shuffle=False``;
* ``shuffle (default)``: ``shuffle=True`` (a byte budget; a store that fits one unit is
  permuted whole);
* ``shuffle, buffer 4 blocks``: the fixed buffer that was the default before the budget;
* ``shuffle, budget N MiB``: a budget small enough to cut the epoch into several units;
* ``in-memory idiom``: the training rows loaded whole into a ``SparseTensor`` and fed
  through ``tf.data.Dataset.from_tensor_slices(...).shuffle(n_rows).batch(256)``,
  reshuffled every epoch.

Held-out accuracy is taken after every epoch; the epoch time is Keras's own ``fit``
epoch (the dataset consumed in the graph), evaluation excluded.  Every run is a fresh
subprocess (seeded: model, loader and tf.data shuffle by ``SEED + run``), runs of the
configs interleaved; accuracy and time are medians over ``--repeats`` runs.  Batch label
mix (mean TV between each batch's label histogram and all training rows',
:mod:`sparsestore.mixing`) comes from index math for the loaders and from the same seeded
tf.data shuffle over row ids for the idiom::

    python -m benchmarks.bench_shuffle_keras [--quick] [--out DIR]

writes ``shuffle_keras.json`` and ``shuffle_keras.md`` (``shuffle_keras_chunk<K>k.*`` with
``--chunk-bytes``: small chunks give a budget-cut epoch more, shorter runs to mix).
``--quick`` divides rows, chunk size and shuffle budgets by 10 (about half a minute on 2
cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from sparsestore.cli import parse_size

from .common import SEED, add_out_argument, child, csr_from_keys, reproduce_command, write_timed
from .records import run_meta, write_records

LABEL = "y"
BATCH = 256
EVAL_BATCH = 2048
GEN_ROWS = 8192  # rows generated per block: memory stays bounded whatever the store size
TEST_FRACTION = 0.2
TARGET = 0.01  # default shuffle's held-out accuracy within this of the idiom's


@dataclass(frozen=True)
class Spec:
    """The label-sorted store: its size, its classes and how strongly they show."""

    n_rows: int = 300_000
    n_cols: int = 5_000
    nnz_per_row: int = 30
    classes: int = 20
    class_cols: int = 200  # columns each class prefers (sets drawn independently)
    signal: float = 0.2  # fraction of a row's entries drawn from its class's columns
    chunk_bytes: int | None = None  # None: the library's default layout


def class_sizes(spec: Spec) -> np.ndarray:
    """Rows per class, uneven (a 1:8 spread), summing to ``n_rows``."""
    w = np.random.default_rng([SEED, 7]).permutation(np.geomspace(1, 8, spec.classes))
    ends = np.round(np.cumsum(w) / w.sum() * spec.n_rows).astype(np.int64)
    return np.diff(ends, prepend=0)


def sorted_blocks(spec: Spec) -> Iterator[tuple[sp.csr_matrix, dict[str, np.ndarray]]]:
    """Row blocks of the label-sorted matrix with their class labels, ``GEN_ROWS`` at a time.

    Row sizes are Poisson(``nnz_per_row``); each entry comes from the row's class's
    ``class_cols`` columns with probability ``signal``, else from all columns; duplicate
    columns merge (so rows end a little shorter).  Values are small counts (1 + geometric).
    """
    rng = np.random.default_rng([SEED, 8])
    prefs = np.stack([rng.choice(spec.n_cols, spec.class_cols, replace=False)
                      for _ in range(spec.classes)])
    y = np.repeat(np.arange(spec.classes, dtype=np.int32), class_sizes(spec))
    for k, start in enumerate(range(0, spec.n_rows, GEN_ROWS)):
        rng = np.random.default_rng([SEED, 9, k])
        yb = y[start:start + GEN_ROWS]
        rows = yb.size
        draws = np.maximum(1, rng.poisson(spec.nnz_per_row, rows))
        rid = np.repeat(np.arange(rows, dtype=np.int64), draws)
        from_class = rng.random(rid.size) < spec.signal
        cols = rng.integers(0, spec.n_cols, rid.size)
        pick = rng.integers(0, spec.class_cols, int(from_class.sum()))
        cols[from_class] = prefs[yb[rid[from_class]], pick]
        yield csr_from_keys(np.unique(rid * spec.n_cols + cols), rows, spec.n_cols, rng), \
            {LABEL: yb}


def split(n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted training and held-out row ids: a random ``TEST_FRACTION`` is held out."""
    test = np.zeros(n_rows, dtype=bool)
    test[np.random.default_rng([SEED, 10]).choice(n_rows, int(n_rows * TEST_FRACTION),
                                                  replace=False)] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def write_store(spec: Spec, path: Path) -> dict[str, Any]:
    """Write the store at ``path``; returns its facts."""
    layout = {} if spec.chunk_bytes is None else {"chunk_bytes": spec.chunk_bytes}
    return {**write_timed(path, sorted_blocks(spec), spec.n_cols, **layout),
            "classes": spec.classes, "class_rows": class_sizes(spec).tolist()}


# ------------------------------------------------------------------ configs


def configs(budgets: list[int], buffers: list[int]) -> list[dict[str, Any]]:
    """The orders compared: name -> DataLoader keywords (the idiom has none)."""
    out: list[dict[str, Any]] = [
        {"name": "sequential", "kw": {"shuffle": False}},
        {"name": "shuffle (default)", "kw": {"shuffle": True}},
    ]
    out += [{"name": f"shuffle, buffer {k} blocks",
             "kw": {"shuffle": True, "shuffle_buffer_blocks": k}} for k in buffers]
    out += [{"name": f"shuffle, budget {_mib(b)} MiB",
             "kw": {"shuffle": True, "shuffle_buffer_bytes": b}} for b in budgets]
    out.append({"name": "in-memory idiom (tf.data shuffle)", "idiom": True})
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:g}"


def train_loader(path: str, train: np.ndarray, kw: dict[str, Any], seed: int) -> Any:
    from sparsestore.loader import DataLoader

    return DataLoader(path, BATCH, seed=seed, labels=LABEL, rows=train, **kw)


def loader_quality(path: str, train: np.ndarray, cfg: dict[str, Any], epochs: int
                   ) -> dict[str, Any]:
    """Batch label mix of a loader config over ``epochs`` epochs, from index math."""
    from sparsestore.errors import ShuffleQualityWarning
    from sparsestore.mixing import shuffle_quality

    loader = train_loader(path, train, cfg["kw"], SEED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShuffleQualityWarning)
        rep = shuffle_quality(loader, LABEL, epochs, seed=SEED)
    warned = any(issubclass(w.category, ShuffleQualityWarning) for w in caught)
    units = None
    if cfg["kw"].get("shuffle"):
        s = loader._sampler_for_blocks()
        units, blocks = s.plan(loader.epoch).n_units, s.n_blocks
    else:
        blocks = None
    return {"tv": rep.tv, "tv_permutation": rep.tv_permutation,
            "tv_sequential": rep.tv_sequential, "ratio": rep.ratio,
            "distinct": rep.distinct, "n_blocks": blocks, "n_units": units,
            "warned": warned}


# ------------------------------------------------------------------ one run (subprocess)


def _quiet_tf() -> None:
    """Import TensorFlow and Keras without their C++ start-up lines (as the examples do)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from keras_train import import_tensorflow_quietly

    import_tensorflow_quietly()


def _idiom_dataset(tf: Any, path: str, train: np.ndarray, seed: int, epochs: int
                   ) -> tuple[Any, np.ndarray, np.ndarray]:
    """The in-memory idiom: training rows as one SparseTensor, shuffled whole every epoch.

    Also returns the same seeded shuffle's order of row ids over ``epochs`` epochs (a
    shuffle's order depends on its seed and buffer, not on the elements) and batch sizes.
    """
    import sparsestore

    store = sparsestore.open(path)
    X = store.to_scipy()[train]
    y = np.asarray(store.labels[LABEL])[train]
    coo = X.tocoo()
    st = tf.sparse.SparseTensor(np.stack([coo.row, coo.col], axis=1).astype(np.int64),
                                coo.data, X.shape)
    n = X.shape[0]
    ds = (tf.data.Dataset.from_tensor_slices((st, y))
          .shuffle(n, seed=seed, reshuffle_each_iteration=True)
          .batch(BATCH).prefetch(tf.data.AUTOTUNE))
    ids = tf.data.Dataset.from_tensor_slices(np.arange(n)).shuffle(
        n, seed=seed, reshuffle_each_iteration=True).batch(BATCH)
    order = [b.numpy() for _ in range(epochs) for b in ids]
    return ds, np.concatenate(order), np.array([b.size for b in order])


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in the subprocess: one seeded training run of one config, accuracy per epoch."""
    _quiet_tf()
    import keras
    import sparsestore.adapters.tensorflow as sstf
    import tensorflow as tf

    import sparsestore
    from sparsestore.loader import DataLoader
    from sparsestore.mixing import batch_mixing

    path, cfg, seed, epochs = job["path"], job["config"], job["seed"], job["epochs"]
    train, test = split(job["rows"])
    keras.utils.set_random_seed(seed)
    out: dict[str, Any] = {"seed": seed}
    if cfg.get("idiom"):
        t0 = time.perf_counter()
        ds, order, sizes = _idiom_dataset(tf, path, train, seed, epochs)
        out["load_s"] = time.perf_counter() - t0
        labels = np.asarray(sparsestore.open(path).labels[LABEL])[train]
        mix = batch_mixing(np.split(order, np.cumsum(sizes)[:-1]), labels)
        out["tv"], out["distinct"] = mix.tv, mix.distinct
    else:
        ds = sstf.to_dataset(train_loader(path, train, cfg["kw"], seed))
    test_ds = sstf.to_dataset(DataLoader(path, EVAL_BATCH, labels=LABEL, rows=test))

    inputs = keras.Input(shape=(job["cols"],), sparse=True)
    model = keras.Model(inputs, keras.layers.Dense(job["classes"], activation="softmax")(inputs))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])

    epoch_s: list[float] = []
    acc: list[float] = []

    class Measure(keras.callbacks.Callback):
        """Epoch time as Keras trains (evaluation afterwards, not in it), then accuracy."""

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            epoch_s.append(time.perf_counter() - self.t0)
            res = self.model.evaluate(test_ds, verbose=0, return_dict=True)
            acc.append(float(res["accuracy"]))

    model.fit(ds, epochs=epochs, shuffle=False, verbose=0, callbacks=[Measure()])
    out.update(epoch_s=epoch_s, accuracy=acc)
    return out


# ------------------------------------------------------------------ the run


def run(spec: Spec, cfgs: list[dict[str, Any]], epochs: int, repeats: int, work: Path
        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = work / "sorted.zarr"
    facts = write_store(spec, path)
    train, _ = split(spec.n_rows)
    print(f"store: {facts['rows']:,} x {facts['cols']:,}, {facts['nnz_per_row']:.1f} nnz/row, "
          f"{spec.classes} classes sorted, written in {facts['write_s']:.1f} s", flush=True)
    recs = [{"config": c["name"], "loader": c.get("kw"), "idiom": bool(c.get("idiom")),
             "runs": [], **({} if c.get("idiom") else
                            loader_quality(str(path), train, c, epochs))} for c in cfgs]
    for r in range(repeats):  # interleaved: a slow spell of the box hits every config
        for c, rec in zip(cfgs, recs, strict=True):
            job = {"path": str(path), "config": c, "seed": SEED + r, "epochs": epochs,
                   "rows": spec.n_rows, "cols": spec.n_cols, "classes": spec.classes}
            res = child("bench_shuffle_keras", "--child", json.dumps(job))
            rec["runs"].append(res)
            print(f"  run {r + 1} {c['name']}: accuracy "
                  f"{', '.join(f'{a:.4f}' for a in res['accuracy'])}, epoch s "
                  f"{', '.join(f'{t:.1f}' for t in res['epoch_s'])}", flush=True)
    for rec in recs:
        runs = rec["runs"]
        if rec["idiom"]:
            rec["tv"] = statistics.median(x["tv"] for x in runs)
            rec["distinct"] = statistics.median(x["distinct"] for x in runs)
            rec["load_s"] = statistics.median(x["load_s"] for x in runs)
        rec["accuracy"] = [statistics.median(x["accuracy"][e] for x in runs)
                           for e in range(epochs)]
        rec["accuracy_range"] = [[min(x["accuracy"][e] for x in runs),
                                  max(x["accuracy"][e] for x in runs)] for e in range(epochs)]
        rec["first_epoch_s"] = statistics.median(x["epoch_s"][0] for x in runs)
        rec["epoch_s"] = statistics.median(statistics.mean(x["epoch_s"]) for x in runs)
    return facts, recs


def verdict(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Default shuffle's held-out accuracy against the idiom's, after 1 and after all epochs."""
    by = {r["config"]: r for r in recs}
    ours, idiom = by.get("shuffle (default)"), next((r for r in recs if r["idiom"]), None)
    if ours is None or idiom is None:
        return {}
    gaps = [a - b for a, b in zip(ours["accuracy"], idiom["accuracy"], strict=True)]
    return {"gap_first_epoch": gaps[0], "gap_last_epoch": gaps[-1], "target": TARGET,
            "met": all(g >= -TARGET for g in gaps)}


TITLE = "Training on a label-sorted store: loader shuffles against a full in-memory shuffle"
FORMATS = {"TV": "{:.3f}", "x perm": "{:.2f}", "labels/batch": "{:.1f}", "accuracy": "{:.4f}",
           "accuracy min": "{:.4f}", "accuracy max": "{:.4f}", "1st epoch s": "{:.2f}",
           "mean epoch s": "{:.2f}", "epoch s": "{:.2f}", "load s": "{:.1f}", "seed": "{}"}


def note(meta: dict[str, Any]) -> str:
    """What the page's table shows and how it was made, from the run's facts in ``meta``."""
    m, f, s = meta["machine"], meta["store"], meta["spec"]
    return (
        f"TensorFlow {m['versions'].get('tensorflow-cpu')}, Keras {m['versions'].get('keras')}"
        f".  Load average when the run began: {', '.join(str(x) for x in m['load_avg'])} (a "
        "box shared with other work: times are noisy, accuracy and TV are not).\n\n"
        f"Store: {f['rows']:,} x {f['cols']:,}, {f['nnz_per_row']:.1f} nnz/row, float32, "
        f"{f['classes']} classes stored one after another ({min(f['class_rows']):,} to "
        f"{max(f['class_rows']):,} rows each); {s['signal']:.0%} of a row's entries come "
        f"from its class's {s['class_cols']} preferred columns.  "
        f"Chunks: {f['chunks']}.  A random {TEST_FRACTION:.0%} of the rows is held out "
        "(`rows=`); training rows are in storage order.  Model: one softmax `Dense` on "
        f"`keras.Input(sparse=True)`, Adam 1e-3, batch {meta['batch_size']}, {meta['epochs']} "
        f"epochs; {meta['repeats']} runs per config (seeds {SEED}+run, each a fresh process, "
        "configs interleaved): `accuracy` is the median held-out accuracy after each epoch "
        "(`min`, `max`: over the runs), epoch time the median over runs of Keras's mean `fit` "
        "epoch (evaluation excluded; the first epoch's apart: it decodes a shuffle's first unit "
        "before its first batch).  TV: mean total-variation distance between each batch's "
        "label histogram and all training rows' over the epochs (a true permutation's: "
        f"{meta['tv_permutation']:.3f}; storage order's: {meta['tv_sequential']:.3f}); "
        "units: how many parts a shuffled epoch is cut into (1: a true permutation); `warns`: "
        "the loader raises its poor-mixing `ShuffleQualityWarning`.  `runs`: each run's "
        "figures.")


def footer(meta: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    """The idiom's loading time and the verdict against the target."""
    lines = [f"The idiom's loading (store to one `SparseTensor`, outside the epochs): "
             f"{r['load_s']:.1f} s." for r in recs if r["idiom"]]
    if v := meta["verdict"]:
        lines.append(f"Target: default shuffle's held-out accuracy within {v['target']} of the "
                     f"in-memory fully shuffled idiom's: {'met' if v['met'] else 'NOT met'} "
                     f"(default minus idiom: {v['gap_first_epoch']:+.4f} after 1 epoch, "
                     f"{v['gap_last_epoch']:+.4f} after {meta['epochs']}).")
    return "\n\n".join(lines)


def to_records(recs: list[dict[str, Any]], tv_perm: float) -> list[dict[str, Any]]:
    """A row per order (medians over the runs), then a row per run."""
    out = [{"order": r["config"], "units": r.get("n_units"), "warns": r.get("warned"),
            "blocks": r.get("n_blocks"), "TV": r["tv"], "x perm": r["tv"] / tv_perm,
            "labels/batch": r["distinct"], "accuracy": r["accuracy"],
            "accuracy min": [lo for lo, _ in r["accuracy_range"]],
            "accuracy max": [hi for _, hi in r["accuracy_range"]],
            "1st epoch s": r["first_epoch_s"], "mean epoch s": r["epoch_s"]} for r in recs]
    return out + [{"group": "runs", "order": r["config"], "seed": x["seed"],
                   "accuracy": x["accuracy"], "epoch s": x["epoch_s"], "TV": x.get("tv"),
                   "labels/batch": x.get("distinct"), "load s": x.get("load_s")}
                  for r in recs for x in r["runs"]]


def to_doc_parts(recs: list[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Fill ``meta``'s page text and figures from the configs' results; returns the records."""
    ref = next((r for r in recs if not r["idiom"]), None)
    meta["tv_permutation"] = ref["tv_permutation"] if ref else float("nan")
    meta["tv_sequential"] = ref["tv_sequential"] if ref else float("nan")
    meta["verdict"] = verdict(recs)
    meta.update(title=TITLE, note=note(meta), footer=footer(meta, recs), formats=FORMATS)
    return to_records(recs, meta["tv_permutation"])


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_shuffle_keras",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a tenth of the rows, chunk size and shuffle budgets")
    p.add_argument("--rows", type=int, default=Spec.n_rows)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="runs per config (median)")
    p.add_argument("--budgets", default="16M", help="shuffle_buffer_bytes values to add")
    p.add_argument("--buffers", default="4", help="shuffle_buffer_blocks values to add (4: "
                   "the fixed buffer that was the default before the byte budget)")
    p.add_argument("--configs", default="", help="only configs whose name contains one of "
                   "these comma-separated words")
    p.add_argument("--chunk-bytes", type=parse_size, default=None,
                   help="write the store with this data chunk size (default: the library's)")
    add_out_argument(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        res = _child(json.loads(args.child))
        print(json.dumps(res))
        return res
    div = 10 if args.quick else 1
    chunk = args.chunk_bytes
    if chunk is None and div > 1:
        chunk = 4 * 2**20  # the library's default, divided below
    spec = Spec(n_rows=args.rows // div, chunk_bytes=None if chunk is None else chunk // div)
    budgets = [parse_size(b) // div for b in args.budgets.split(",") if b]
    buffers = [int(k) for k in args.buffers.split(",") if k]
    cfgs = configs(budgets, buffers)
    words = [w for w in args.configs.split(",") if w]
    if words:
        cfgs = [c for c in cfgs if any(w in c["name"] for w in words)]
    meta = run_meta(reproduce_command("benchmarks.bench_shuffle_keras", p, args,
                                      ("rows", "epochs", "repeats", "budgets", "buffers",
                                       "configs", "chunk_bytes", "quick")),
                    quick=args.quick, epochs=args.epochs, repeats=args.repeats,
                    batch_size=BATCH, spec=asdict(spec))
    with tempfile.TemporaryDirectory() as tmp:
        meta["store"], recs = run(spec, cfgs, args.epochs, args.repeats, Path(tmp))
    records = to_doc_parts(recs, meta)
    stem = "shuffle_keras" if args.chunk_bytes is None else \
        f"shuffle_keras_chunk{args.chunk_bytes >> 10}k"
    return write_records(stem, records, meta, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
