"""TensorFlow ratios measured three ways.

sparsestore's ``to_dataset`` (sequential and shuffled loaders) against the idiom
``tf.data.Dataset.from_tensor_slices(SparseTensor).batch(1024)`` on the same matrix, each
pass timed

* ``eager``: a Python ``for`` loop over the dataset (what a hand-written loop sees);
* ``graph``: ``ds.reduce`` summing the values inside one ``tf.function`` (no Python per
  batch: the pipeline's own cost);
* ``keras``: one ``model.fit(..., epochs=1, shuffle=False, verbose=0)`` epoch of a tiny
  model (``keras.Input(shape=(n_cols,), sparse=True) -> Dense(1)``) with labels, the
  idiom being ``from_tensor_slices((SparseTensor, y)).batch(1024)``.

Each ratio is ``idiom seconds / sparsestore seconds`` (> 1: sparsestore faster), the
shuffled stream compared with the same sequential idiom.  Both sides alternate within each
round (order reversed every other round), several rounds in one process, medians.

Also: the 1 -> 2 core scaling of the stream and of the idiom (in-graph pass; every thread
of the process pinned with ``sched_setaffinity`` to ``{0}`` vs ``{0, 1}``, alternating in the
same run) and the stream's CPU time per non-zero (``time.process_time``, all threads).

Two matrices: ``dense100`` (200k x 30k, ~100 nnz/row, the suite's matrix) and ``sparse2``
(~2 nnz/row, 500k rows: per-row costs dominate)::

    python -m benchmarks.bench_tf_compare [--quick | --tiny] [--rounds N] [--work DIR]
                                          [--out DIR]   (default benchmarks/out)

writes ``tf_compare.json`` and ``tf_compare.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import (
    BATCH_SIZE,
    add_out_argument,
    coo_parts,
    idiom_dataset,
    quiet_tf_retracing,
    reproduce_command,
    rmtree,
    store_with_matrix,
)
from .records import run_meta, write_records

# name -> (rows, cols, nnz per row) per mode
MATRICES: dict[str, dict[str, tuple[int, int, int]]] = {
    "full": {"dense100": (200_000, 30_000, 100), "sparse2": (500_000, 50_000, 2)},
    "quick": {"dense100": (50_000, 30_000, 100), "sparse2": (500_000, 50_000, 2)},
    "tiny": {"dense100": (3_000, 1_000, 20), "sparse2": (6_000, 2_000, 2)},
}
ROUNDS = {"full": 9, "quick": 3, "tiny": 1}
KERAS_ROUNDS = {"full": 5, "quick": 2, "tiny": 1}
SIDES = ("idiom", "seq", "shuffled")
WAYS = {"eager loop": "eager", "in-graph": "graph", "Keras epoch": "keras"}


# ------------------------------------------------------------------ affinity


def set_cores(cores: set[int]) -> None:
    """Pin every thread of this process (``sched_setaffinity`` is per thread on Linux)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cores)
    os.sched_setaffinity(0, cores)


# ------------------------------------------------------------------ timing


def _timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _eager(ds: Any) -> Any:
    def run() -> None:
        for _b in ds:
            pass

    return run


def _graph(tf: Any, ds: Any) -> Any:
    """One pass of ``ds`` in a ``tf.function``: ``reduce`` summing the values."""

    @tf.function
    def run() -> Any:
        return ds.reduce(tf.constant(0.0, tf.float32),
                         lambda acc, x: acc + tf.reduce_sum(x.values))

    return run


def _keras(keras: Any, n_cols: int, ds: Any) -> Any:
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape=(n_cols,), sparse=True)
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    model.compile(optimizer="sgd", loss="mse", jit_compile=False)

    def run() -> None:
        model.fit(ds, epochs=1, shuffle=False, verbose=0)

    return run


def _interleaved(fns: dict[str, Any], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Warm each once, then ``rounds`` rounds of all, order reversed every other round."""
    for fn in fns.values():
        fn()
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys if r % 2 == 0 else keys[::-1]:
            wall, cpu = _timed(fns[k])
            out[k]["wall"].append(wall)
            out[k]["cpu"].append(cpu)
    return out


def _med(d: dict[str, list[float]], key: str | None = None) -> dict[str, float]:
    """The median of each list of ``d`` (of ``d[k][key]`` with ``key``)."""
    return {k: statistics.median(v if key is None else v[key]) for k, v in d.items()}


# ------------------------------------------------------------------ one matrix


def bench_matrix(name: str, shape: tuple[int, int, int], work: Path, rounds: int,
                 keras_rounds: int, log: Any = print) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    quiet_tf_retracing(tf)

    import sparsestore.adapters.tensorflow as sstf

    from sparsestore.loader import DataLoader

    n_rows, n_cols, per_row = shape
    path = work / f"{name}.zarr"
    store, X, y = store_with_matrix(path, n_rows, n_cols, per_row)
    nnz = int(X.nnz)
    log(f"{name}: {n_rows:,} x {n_cols:,}, {nnz:,} nnz ({nnz / n_rows:.1f}/row)")
    st = tf.sparse.SparseTensor(*coo_parts(X))

    def idiom(labels: bool) -> Any:
        return idiom_dataset(tf, st, y if labels else None)

    def ours(shuffle: bool, labels: bool) -> Any:
        return sstf.to_dataset(DataLoader(store, BATCH_SIZE, shuffle=shuffle, seed=0,
                                          labels="y" if labels else None))

    plain = {"idiom": idiom(False), "seq": ours(False, False), "shuffled": ours(True, False)}
    with_y = {"idiom": idiom(True), "seq": ours(False, True), "shuffled": ours(True, True)}
    graph_fns = {k: _graph(tf, ds) for k, ds in plain.items()}

    res: dict[str, Any] = {"shape": [n_rows, n_cols], "nnz": nnz,
                           "nnz_per_row": nnz / n_rows, "rounds": rounds,
                           "keras_rounds": keras_rounds, "seconds": {}, "cpu_seconds": {}}
    ways = {
        "eager": (lambda: {k: _eager(ds) for k, ds in plain.items()}, rounds),
        "graph": (lambda: graph_fns, rounds),
        "keras": (lambda: {k: _keras(keras, n_cols, ds) for k, ds in with_y.items()},
                  keras_rounds),
    }
    for way, (make, n) in ways.items():
        t = _interleaved(make(), n)
        res["seconds"][way], res["cpu_seconds"][way] = _med(t, "wall"), _med(t, "cpu")
        log(f"  {way:6s} " + "  ".join(
            f"{k} {s:.3f} s" for k, s in res["seconds"][way].items()))
    res["ratios"] = {
        way: {side: s["idiom"] / s[side] for side in ("seq", "shuffled")}
        for way, s in res["seconds"].items()
    }
    res["cpu_ns_per_nnz"] = {
        f"{side}_{way}": res["cpu_seconds"][way][side] / nnz * 1e9
        for way in ("eager", "graph") for side in SIDES
    }

    # 1 -> 2 cores: in-graph passes, the whole process pinned, alternating in this run
    usable = os.sched_getaffinity(0)
    if {0, 1} <= usable:
        masks = {"1": {0}, "2": {0, 1}}
        times: dict[str, list[float]] = {f"{side}_{c}": [] for side in ("idiom", "seq")
                                         for c in masks}
        try:
            for r in range(rounds):
                for c in (list(masks) if r % 2 == 0 else list(masks)[::-1]):
                    set_cores(masks[c])
                    for side in ("idiom", "seq"):
                        times[f"{side}_{c}"].append(_timed(graph_fns[side])[0])
        finally:
            set_cores(usable)
        med = _med(times)
        res["core_scaling"] = {
            "seconds": med,
            "stream": med["seq_1"] / med["seq_2"],
            "idiom": med["idiom_1"] / med["idiom_2"],
        }
        log(f"  1->2 cores: stream {res['core_scaling']['stream']:.2f}x, "
            f"idiom {res['core_scaling']['idiom']:.2f}x")
    else:
        res["core_scaling"] = {"skipped": f"cores 0 and 1 not both usable ({sorted(usable)})"}

    # Fixed cost per pass vs cost per batch: in-graph passes over the first tenth of the
    # rows and over all of them (a straight line through the two medians).
    n_long = -(-n_rows // BATCH_SIZE)
    n_short = max(1, n_long // 10)
    rows = slice(0, n_short * BATCH_SIZE)
    part = {"idiom": _graph(tf, idiom_dataset(tf, tf.sparse.SparseTensor(*coo_parts(X[rows])))),
            "seq": _graph(tf, sstf.to_dataset(DataLoader(store, BATCH_SIZE, rows=rows)))}
    t_short = _med(_interleaved(part, rounds), "wall")
    pp: dict[str, dict[str, float]] = {}
    for side in ("idiom", "seq"):
        per_batch = (res["seconds"]["graph"][side] - t_short[side]) / (n_long - n_short)
        pp[side] = {"batch_ms": per_batch * 1e3,
                    "fixed_ms": (t_short[side] - n_short * per_batch) * 1e3}
    res["per_pass"] = pp
    log(f"  per batch: idiom {pp['idiom']['batch_ms']:.3f} ms, stream "
        f"{pp['seq']['batch_ms']:.3f} ms; fixed per pass: idiom {pp['idiom']['fixed_ms']:.1f} "
        f"ms, stream {pp['seq']['fixed_ms']:.1f} ms")
    rmtree(path)
    return res


# ------------------------------------------------------------------ records


NOTE = ("Batch 1024.  Ratio = idiom seconds / sparsestore seconds (> 1: sparsestore faster); "
        "the idiom is `from_tensor_slices(SparseTensor).batch(1024)` (with labels for Keras), "
        "the shuffled stream is compared with the same sequential idiom.  Medians of rounds "
        "interleaved in one process.  Cores: the in-graph pass with the whole process pinned "
        "to {0} vs {0, 1}, alternating; CPU: `time.process_time`, all threads, 2 cores.  Per "
        "pass / per batch: a straight line through in-graph passes over the first tenth of "
        "the rows and over all of them (sequential stream); the fixed cost is paid once per "
        "Keras epoch.")


def to_records(matrices: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The page's rows from :func:`bench_matrix`'s results, one table per ``group``."""
    out: list[dict[str, Any]] = []
    for name, r in matrices.items():
        m = {"matrix": name, "shape": f"{r['shape'][0]:,} x {r['shape'][1]:,}",
             "nnz/row": r["nnz_per_row"]}
        out += [{"group": "ratios", **m, "stream": side,
                 **{w: r["ratios"][k][side] for w, k in WAYS.items()}}
                for side in ("seq", "shuffled")]
        out += [{"group": "seconds per pass", "matrix": name, "pass": w,
                 **{s: r["seconds"][k][s] for s in SIDES}} for w, k in WAYS.items()]
        cs, c, pp = r["core_scaling"], r["cpu_ns_per_nnz"], r["per_pass"]
        out.append({"group": "cores and CPU", "matrix": name,
                    "stream 1->2 cores": cs.get("stream"), "idiom 1->2 cores": cs.get("idiom"),
                    "stream CPU ns/nnz": c["seq_graph"], "idiom CPU ns/nnz": c["idiom_graph"],
                    "stream CPU ns/nnz, eager loop": c["seq_eager"]})
        out.append({"group": "per pass and per batch", "matrix": name,
                    **{f"{side} ms/{k}": pp[s][key] for k, key in (("batch", "batch_ms"),
                                                                   ("pass", "fixed_ms"))
                       for side, s in (("idiom", "idiom"), ("stream", "seq"))}})
    return out


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_tf_compare",
                                description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller dense matrix, fewer rounds")
    g.add_argument("--tiny", action="store_true", help="seconds: for tests only")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--work", default=None, help="where the stores are written (temp dir)")
    add_out_argument(p)
    args = p.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    rounds = args.rounds or ROUNDS[mode]
    command = reproduce_command("benchmarks.bench_tf_compare", p, args, ("quick", "tiny", "rounds"))
    if args.work is not None:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    matrices: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for name, shape in MATRICES[mode].items():
            matrices[name] = bench_matrix(name, shape, Path(tmp), rounds,
                                          min(rounds, KERAS_ROUNDS[mode]))
    meta = run_meta(command, title="TensorFlow ratios: eager loop, in-graph loop, Keras epoch",
                    note=NOTE, mode=mode, batch_size=BATCH_SIZE)
    return write_records("tf_compare", to_records(matrices), meta, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
