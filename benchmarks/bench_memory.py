"""Does memory stay flat as the matrix grows and as passes go by?  RSS over many passes.

For each matrix size (the synthetic ~100 nnz/row matrix, 30,000 columns) a store is
written, then a fresh subprocess streams it for several passes and samples its RSS:

* ``tf``: ``to_dataset(DataLoader(store, 1024))`` iterated eagerly (what ``model.fit``
  pulls, one ``SparseTensor`` at a time);
* ``loader``: ``DataLoader(store, 1024).iter_batches()`` (the loader's own working set).

The baseline RSS is taken after the first batch of a first iterator (imports, TensorFlow's
runtime and the traced functions are then in place: a one-off cost of the process, not of
the matrix).  Reported per pass: the peak RSS above that baseline (sampled every 5 ms by a
thread) and a trace every ``--every`` batches.  Flat memory means the peaks neither grow
with the matrix nor drift up pass after pass::

    python -m benchmarks.bench_memory [--rows 200000,800000] [--passes 12] [--out DIR]

writes ``memory.json`` and ``memory.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    BATCH_SIZE,
    MiB,
    RssSampler,
    add_out_argument,
    child,
    matrix_blocks,
    reproduce_command,
    rmtree,
    rss_bytes,
)
from .records import run_meta, write_records

N_COLS, NNZ_PER_ROW = 30_000, 100
MODES = ("tf", "loader")


def _child(path: str, mode: str, passes: int, every: int) -> dict[str, Any]:
    """Runs in the subprocess: ``passes`` passes of ``mode`` over the store at ``path``."""
    import sparsestore
    from sparsestore.loader import DataLoader

    store = sparsestore.open(path)
    if mode == "tf":
        import sparsestore.adapters.tensorflow as sstf

        ds = sstf.to_dataset(DataLoader(store, BATCH_SIZE))

        def new_pass() -> Any:
            return iter(ds)
    else:
        loader = DataLoader(store, BATCH_SIZE)

        def new_pass() -> Any:
            return loader.iter_batches()

    warm = new_pass()
    next(warm)
    del warm
    gc.collect()
    base = rss_bytes()
    peaks, traces, batches = [], [], 0
    for _ in range(passes):
        trace = []
        with RssSampler() as rss:
            rss.start_rss = base  # growth over the warm baseline, not over this pass's start
            for i, _batch in enumerate(new_pass()):
                if i % every == 0:
                    trace.append(round((rss_bytes() - base) / MiB, 1))
                batches = i + 1
        peaks.append(round(rss.growth / MiB, 1))
        traces.append(trace)
    return {"rows": store.n_rows, "nnz": store.nnz, "batches_per_pass": batches,
            "warm_rss_mib": round(base / MiB, 1), "peak_growth_mib": peaks,
            "trace_mib": traces, "every": every}


def run(sizes: list[int], passes: int, every: int, modes: list[str],
        work: Path) -> dict[str, Any]:
    import sparsestore

    out: dict[str, Any] = {mode: {} for mode in modes}
    for rows in sizes:
        path = work / f"m{rows}.zarr"
        sparsestore.write_blocks(path, matrix_blocks(rows, N_COLS, NNZ_PER_ROW),
                                 n_cols=N_COLS, dtype=np.float32, overwrite=True)
        for mode in modes:
            out[mode][str(rows)] = child("bench_memory", "--child", path, "--mode", mode,
                                         "--passes", passes, "--every", every)
            print(f"{mode} {rows:,} rows: peaks {out[mode][str(rows)]['peak_growth_mib']}",
                  flush=True)
        rmtree(path)
    return out


NOTE = ("Synthetic matrix, 30,000 columns, ~100 nnz/row, float32, batch 1024; each size and "
        "mode in a fresh subprocess.  Growth is RSS above the process's RSS after the first "
        "batch of a first iterator (imports, TensorFlow's runtime, traced functions: paid "
        "once per process), peak sampled every 5 ms; `first half` / `second half`: the "
        "largest peak of each half of the passes.  The trace is of the largest size's passes, "
        "MiB above warm every `every` batches.")


def to_records(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per mode and size its peaks per pass; per mode the largest size's RSS traces."""
    out: list[dict[str, Any]] = []
    for mode, per_size in result.items():
        for rows, s in per_size.items():
            p = s["peak_growth_mib"]
            half = max(1, len(p) // 2)
            out.append({"group": "peak RSS growth per pass", "mode": mode, "rows": int(rows),
                        "nnz": s["nnz"], "batches/pass": s["batches_per_pass"],
                        "warm RSS MiB": s["warm_rss_mib"], "peak growth MiB": p,
                        "first half": max(p[:half]), "second half": max(p[half:] or p)})
    for mode, per_size in result.items():
        rows, s = max(per_size.items(), key=lambda kv: int(kv[0]))
        out += [{"group": "trace", "mode": mode, "rows": int(rows), "pass": i,
                 "every": s["every"], "MiB above warm": tr}
                for i, tr in enumerate(s["trace_mib"])]
    return out


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="200000,800000", help="comma-separated row counts")
    p.add_argument("--passes", type=int, default=12)
    p.add_argument("--every", type=int, default=100, help="trace RSS every N batches")
    p.add_argument("--modes", default=",".join(MODES))
    add_out_argument(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        res = _child(args.child, args.mode, args.passes, args.every)
        print(json.dumps(res))
        return res
    sizes = [int(s) for s in args.rows.split(",")]
    modes = [s for s in args.modes.split(",") if s]
    command = reproduce_command("benchmarks.bench_memory", p, args,
                                ("rows", "passes", "every", "modes"))
    with tempfile.TemporaryDirectory() as tmp:
        result = run(sizes, args.passes, args.every, modes, Path(tmp))
    meta = run_meta(command, title="RSS over many passes, at two matrix sizes: is RSS flat?",
                    note=NOTE)
    return write_records("memory", to_records(result), meta, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
