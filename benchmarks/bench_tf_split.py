"""Where an in-graph ``to_dataset`` pass spends its CPU, stage by stage (the bound).

One sequential pass over the synthetic ~100 nnz/row matrix (batch 1024), consumed in graph
(``ds.reduce`` summing the values), with parts of the pipeline replaced by data already in
memory, so each stage's cost is the difference between two rows:

* ``loader``: ``loader.iter_batches()`` in a Python loop (decode and cut batches; no TF);
* ``tf only``: the adapter's own dataset, its batches and wire parts prebuilt in memory
  (``numpy_function`` hand-offs, ``SparseTensor``, the consumer);
* ``tf + build``: prebuilt batches, the COO build done for real (builder threads);
* ``tf + loader``: the real loader, prebuilt wire parts (no build);
* ``stream``: ``to_dataset`` as users get it;
* ``idiom``: ``from_tensor_slices(SparseTensor).batch(1024)``;
* ``2 readers``: the design of several independent readers interleaved by ``tf.data``:
  two ``to_dataset`` over each half of the rows, taken in turn (``choose_from_datasets``;
  each has its own threads and prefetch).

Every case runs with the whole process pinned to one core, then to two (interleaved
rounds, medians), reporting wall and process CPU time::

    python -m benchmarks.bench_tf_split [--rows N] [--rounds N] [--out DIR]

writes ``tf_split.json`` and ``tf_split.md``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .bench_tf_compare import _graph, set_cores
from .common import (
    BATCH_SIZE,
    add_out_argument,
    coo_parts,
    idiom_dataset,
    machine_info,
    quiet_tf_retracing,
    reproduce_command,
    save_results,
    store_with_matrix,
)

CASES = ("loader", "tf only", "tf + build", "tf + loader", "stream", "idiom", "2 readers")


def _harness(tf: Any, loader: Any, batches: list[Any] | None,
             parts: list[Any] | None) -> Any:
    """The adapter's dataset with its batches (``batches``) and/or its wire parts
    (``parts``) taken from memory instead of the loader / the builders."""
    import sparsestore.adapters._tf_passes as tfpasses
    import sparsestore.adapters._tf_plan as tfplan

    class Passes(tfpasses._Passes):
        def _start(self, _unused: Any) -> Any:
            if batches is None:
                gen = self.run()
                first = next(gen)
                n = len(self.loader) - self.loader.state_dict()["batches_consumed"] + 1
                gen = tfpasses._after(first, gen)
            else:
                gen = (b for b in batches)
                n = len(batches)
            build = self.plan.wire_parts
            if parts is not None:
                count = itertools.count()

                def build(group: Any) -> Any:
                    return parts[next(count) % len(parts)]

            open_pass = tfpasses._OpenPass(gen, build, n, self.loader.num_workers,
                                           self.plan.bundle)
            with self._lock:
                pid = next(self._ids)
                self._open[pid] = open_pass
            return np.int64(pid)

    plan = tfplan._Plan.for_loader(loader)
    ds = Passes(loader, plan).dataset()
    opts = tf.data.Options()  # as to_dataset sets them
    opts.autotune.enabled = False
    opts.experimental_optimization.apply_default_optimizations = False
    return ds.with_options(opts).prefetch(tf.data.AUTOTUNE)


def run(rows: int, rounds: int, work: Path) -> dict[str, Any]:
    import tensorflow as tf

    quiet_tf_retracing(tf)

    import sparsestore.adapters._tf_plan as tfplan
    import sparsestore.adapters.tensorflow as sstf

    from sparsestore.loader import DataLoader

    store, X, _ = store_with_matrix(work / "dense100.zarr", rows, 30_000, 100)
    loader = DataLoader(store, BATCH_SIZE)
    batches = list(DataLoader(store, BATCH_SIZE).iter_batches())
    plan = tfplan._Plan.for_loader(loader)
    # Kept referenced, the pooled (aligned) parts stay out of the pool: reused as they are.
    parts = [plan.wire_parts([b]) for b in batches]
    half = (X.shape[0] // (2 * BATCH_SIZE)) * BATCH_SIZE

    def two_readers() -> Any:
        halves = [sstf.to_dataset(DataLoader(store, BATCH_SIZE, rows=r), cardinality=False)
                  for r in (slice(0, half), slice(half, X.shape[0]))]
        return tf.data.Dataset.choose_from_datasets(halves, tf.data.Dataset.range(2).repeat(),
                                                    stop_on_empty_dataset=False)

    def loader_pass() -> None:
        for _ in loader.iter_batches():
            pass

    fns = {
        "loader": loader_pass,
        "tf only": _graph(tf, _harness(tf, DataLoader(store, BATCH_SIZE), batches, parts)),
        "tf + build": _graph(tf, _harness(tf, DataLoader(store, BATCH_SIZE), batches, None)),
        "tf + loader": _graph(tf, _harness(tf, DataLoader(store, BATCH_SIZE), None, parts)),
        "stream": _graph(tf, sstf.to_dataset(DataLoader(store, BATCH_SIZE))),
        "idiom": _graph(tf, idiom_dataset(tf, tf.sparse.SparseTensor(*coo_parts(X)))),
        "2 readers": _graph(tf, two_readers()),
    }
    usable = os.sched_getaffinity(0)
    masks = {"1": {0}, "2": {0, 1}} if {0, 1} <= usable else {str(len(usable)): usable}
    times: dict[str, dict[str, list[tuple[float, float]]]] = {c: {k: [] for k in fns}
                                                               for c in masks}
    try:
        for c, mask in masks.items():
            set_cores(mask)
            for fn in fns.values():
                fn()  # warm: trace, pools
            for r in range(rounds):
                for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    c0, t0 = time.process_time(), time.perf_counter()
                    fns[k]()
                    times[c][k].append((time.perf_counter() - t0, time.process_time() - c0))
    finally:
        set_cores(usable)
    return {
        "rows": X.shape[0], "nnz": int(X.nnz), "batches": len(batches), "rounds": rounds,
        "wall_ms": {c: {k: statistics.median(w for w, _ in v) * 1e3 for k, v in t.items()}
                    for c, t in times.items()},
        "cpu_ms": {c: {k: statistics.median(u for _, u in v) * 1e3 for k, v in t.items()}
                   for c, t in times.items()},
    }


def markdown(record: dict[str, Any]) -> str:
    m, r = record["machine"], record["result"]
    cores = list(r["wall_ms"])
    lines = [
        "# Where an in-graph `to_dataset` pass spends its CPU",
        "",
        f"Reproduce: `{record['command']}`",
        "",
        f"{m['cpu']}, {m['cores']} usable cores, TensorFlow {m['versions']['tensorflow-cpu']}, "
        f"commit {m['commit']}, load average {m['load_avg']} at start.  {r['rows']:,} x "
        f"30,000, {r['nnz']:,} nnz, {r['batches']} batches of {BATCH_SIZE}, one sequential "
        f"pass consumed in graph; medians of {r['rounds']} interleaved rounds.  Cases: see "
        "the module docstring of `benchmarks/bench_tf_split.py`.",
        "",
        "| case | " + " | ".join(f"{c} core{'s' if c != '1' else ''}: wall ms / CPU ms"
                                  for c in cores) + " |",
        "|---" * (1 + len(cores)) + "|",
    ]
    for k in CASES:
        cells = [f"{r['wall_ms'][c][k]:.1f} / {r['cpu_ms'][c][k]:.1f}" for c in cores]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if "1" in r["cpu_ms"]:
        one = r["cpu_ms"]["1"]
        stages = {
            "decode and cut batches (`loader`)": one["loader"],
            "COO build (`tf + build` - `tf only`)": one["tf + build"] - one["tf only"],
            "TensorFlow side (`tf only`)": one["tf only"],
        }
        lines += ["", "CPU per stage on one core (ns per non-zero):", "",
                  "| stage | ns/nnz |", "|---|---|"]
        lines += [f"| {k} | {v / r['nnz'] * 1e6:.1f} |" for k, v in stages.items()]
        lines += [f"| sum | {sum(stages.values()) / r['nnz'] * 1e6:.1f} |",
                  f"| `stream` measured | {one['stream'] / r['nnz'] * 1e6:.1f} |",
                  f"| `idiom` measured | {one['idiom'] / r['nnz'] * 1e6:.1f} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_tf_split",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=7)
    add_out_argument(p)
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    record: dict[str, Any] = {
        "command": reproduce_command("benchmarks.bench_tf_split", p, args, ("rows", "rounds")),
        "machine": machine_info(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        record["result"] = run(args.rows, args.rounds, Path(tmp))
    save_results(record, markdown(record), args.out, "tf_split")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
