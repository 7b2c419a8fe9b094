"""Multi-process training: rows/s with 1 and 2 processes, one core each, per framework.

The question: with the hand-off to the framework done in each process (no GIL shared
between ranks), do 2 processes on 2 cores train at least 1.7x the rows per second of 1
process on 1 core?  For each framework installed (torch, tf, jax) the benchmark launches
its multi-process example (``examples/torch_ddp.py``, ``examples/tf_multiworker.py``,
``examples/jax_multiprocess.py``) over one store built once, with 1 process pinned to core
0 (``taskset -c 0``) and with 2 processes pinned to cores 0 and 1, the per-process batch
the same (data parallel: 2 processes train twice the rows per step).  torch ranks are
started directly (``RANK``/``WORLD_SIZE``/``MASTER_*``, as torchrun would set them) so each
can be pinned, with no DataLoader worker processes (``--workers 0``): one process per core.

Each process runs with one thread for its math (``OMP_NUM_THREADS=1``, TF and XLA
intra-op threads 1), so the pinned core is the process's whole budget.

Figures come from what the examples write to ``--out``: ``epochs-rank<r>.jsonl`` (each
epoch's wall time, time waiting on the input pipeline, rows) and ``chunks-*.jsonl`` (the
storage chunks each rank decoded per epoch).  The first epoch is warm-up (process start,
jit/trace, first reads) and is not timed; rows/s is the global rows of the timed epochs
over their wall time (per epoch, the slowest rank's).  1- and 2-process runs alternate
for ``--repeats`` rounds and the median is reported, so a change in the box's load hits
both alike.  ``input share`` is the fraction of the epoch spent waiting for the next
batch: near 0 means the step (model, gradients, collectives), not the loader, bounds it.

    python -m benchmarks multiworker --rows 50000 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import add_out_argument, dir_bytes, load_avg, matrix_blocks
from .records import header, run_meta, table, write_records

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = {"torch": "torch", "tf": "tensorflow", "jax": "jax"}
TARGET = 1.7
LAUNCH_TIMEOUT = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_store(path: Path, rows: int, cols: int, nnz_per_row: int) -> None:
    """The benchmark matrix (count-like values, 0/1 labels ``y``) at ``path``, unless a
    complete one of that shape is already there."""
    import sparsestore

    try:
        s = sparsestore.open(path)
        if (s.n_rows, s.n_cols) == (rows, cols):
            return
    except Exception:  # missing or half-written: rebuild
        pass
    sparsestore.write_blocks(path, matrix_blocks(rows, cols, nnz_per_row), n_cols=cols,
                             dtype=np.float32, overwrite=True)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
               TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    env.pop("TF_CONFIG", None)
    return env


def commands(fw: str, n: int, store: Path, out: Path, args: argparse.Namespace, batch: int,
             source: str) -> list[tuple[list[str], dict[str, str]]]:
    """One ``(argv, env)`` per process of framework ``fw`` with ``n`` processes of
    ``batch`` rows a step, each pinned to its own core when ``taskset`` is there;
    ``source`` "memory" trains from the first batches held in memory."""
    common = ["--store", str(store), "--out", str(out), "--batch-size", str(batch),
              "--epochs", str(args.epochs), "--lr", "0.1",
              *(["--memory-input"] if source == "memory" else [])]
    pin = shutil.which("taskset")
    port = free_port()
    cluster = [f"127.0.0.1:{free_port()}" for _ in range(n)]
    procs = []
    for i in range(n):
        env = _env()
        if fw == "torch":
            argv = [str(ROOT / "examples" / "torch_ddp.py"), *common, "--workers", "0"]
            env.update(RANK=str(i), LOCAL_RANK=str(i), WORLD_SIZE=str(n),
                       LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        elif fw == "tf":
            argv = [str(ROOT / "examples" / "tf_multiworker.py"), *common]
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": cluster},
                                           "task": {"type": "worker", "index": i}})
        else:
            argv = [str(ROOT / "examples" / "jax_multiprocess.py"), *common, "--label", "y",
                    "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                    "--process-id", str(i)]
        argv = [sys.executable, *argv]
        procs.append(([pin, "-c", str(args.cores[i]), *argv] if pin else argv, env))
    return procs


def launch(fw: str, n: int, store: Path, out: Path, args: argparse.Namespace, batch: int,
           source: str) -> float:
    """Run the ``n`` processes to the end (all fail if one does); returns the wall time."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(a, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for a, e in commands(fw, n, store, out, args, batch, source)]
    deadline = t0 + LAUNCH_TIMEOUT
    while any(p.poll() is None for p in procs) and time.perf_counter() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            deadline = min(deadline, time.perf_counter() + 15)
        time.sleep(0.2)
    logs = []
    for p in procs:
        if p.poll() is None:
            p.kill()
        logs.append(p.communicate()[0])
    for i, p in enumerate(procs):
        if p.returncode != 0:
            raise RuntimeError(f"{fw} x{n}, process {i} rc={p.returncode}:\n{logs[i][-3000:]}")
    return time.perf_counter() - t0


def measure(out: Path, n: int, warmup: int) -> dict[str, Any]:
    """Rows/s of the timed epochs, input share, and the data chunks each rank decoded."""
    epochs: dict[int, list[dict]] = {}
    for r in range(n):
        for ln in (out / f"epochs-rank{r}.jsonl").read_text().splitlines():
            e = json.loads(ln)
            epochs.setdefault(e["epoch"], []).append(e)
    timed = [es for ep, es in sorted(epochs.items()) if ep >= warmup]
    if not timed or any(len(es) != n for es in timed):
        raise RuntimeError(f"no complete timed epoch in {out}")
    rows = sum(e["rows"] for es in timed for e in es)
    seconds = sum(max(e["seconds"] for e in es) for es in timed)
    waited = sum(e["data_s"] for es in timed for e in es) / sum(
        e["seconds"] for es in timed for e in es)
    chunks: dict[int, dict[str, int]] = {}
    for f in out.glob("chunks-*.jsonl"):
        for ln in f.read_text().splitlines():
            e = json.loads(ln)
            if e["epoch"] == warmup:  # one timed epoch's reads
                got = chunks.setdefault(e["rank"], {})
                for k, v in e["decoded"].items():
                    got[k] = got.get(k, 0) + v
    steps = sum(es[0]["steps"] for es in timed)
    input_s = sum(e["data_s"] for es in timed for e in es) / n
    return {"rows_per_s": rows / seconds, "input_share": waited, "epoch_s": seconds / len(timed),
            "step_ms": 1e3 * seconds / steps, "input_ms": 1e3 * input_s / steps,
            "data_chunks": [chunks.get(r, {}).get("data", 0) for r in range(n)],
            "all_chunks": [sum(chunks.get(r, {}).values()) for r in range(n)]}


def markdown(doc: dict[str, Any]) -> str:
    """The page: the table, then the verdict and what bounds the speed-up."""
    m = doc["meta"]
    lines = header(doc, "Multi-process training: 1 vs 2 processes, one core each")
    lines += [f"Store: {m['rows']:,} x {m['cols']:,} float32, ~{m['nnz_per_row']} nnz/row "
              f"({m['store_mib']:.0f} MiB on disk); per-process batch {m['batch_size']} "
              "(each a table), "
              f"{m['epochs']} epochs of which the first is warm-up (not timed); medians of "
              f"{m['repeats']} interleaved rounds; pinned with taskset: {m['pinned']}.  "
              f"Load average before {m['load_before']}, after {m['load_after']}.", ""]
    lines += table(doc["records"])
    lines += ["`rows/s`: global rows of the timed epochs per second (per epoch, the slowest "
              "rank's wall time).  `input share`: fraction of each process's epoch spent "
              "waiting for its next batch.  `ms/step`: wall time per step (each process "
              "trains the same per-process batch, so with no overhead from the second process "
              "it stays the same) and `input ms/step` the part of it spent waiting for the "
              "batch.  `data chunks per rank`: chunks of the `data` array each rank decoded in "
              "one epoch, and `share`: each rank's chunks over the 1-process run's (a rank "
              "reading half the store: 0.5; a chunk across the boundary between two ranks' "
              "rows is decoded by both, which shows on a store of few chunks).  `input`: "
              "`store`, batches read through the loader; `memory`, the first 4 batches served "
              "again and again from memory (`--memory-input` of the examples), so the "
              "speed-up there is what the framework's step and collectives allow on these "
              "cores with no loader at all.", ""]
    lines += [f"Target: >= {TARGET}x rows/s from 1 to 2 processes.", ""]
    lines += [f"- {v}" for v in verdict(doc["records"])]
    if m.get("skipped"):
        lines += [f"- skipped (not installed): {', '.join(m['skipped'])}"]
    return "\n".join([*lines, ""])


def verdict(records: list[dict[str, Any]]) -> list[str]:
    """Per batch size and framework: the speed-up from the store against the target, what
    grew in a step from 1 to 2 processes (the wait for the batch, or the rest: model,
    gradient exchange), and the speed-up the same training reaches with its batches from
    memory: the ceiling the framework sets on these cores, without the loader."""
    by = {(r.get("group", ""), r["framework"], r.get("input", "store"), r["processes"]): r
          for r in records}
    out = []
    for g, fw in dict.fromkeys((r.get("group", ""), r["framework"]) for r in records):
        if (g, fw, "store", 2) not in by:
            continue
        one, two = by[g, fw, "store", 1], by[g, fw, "store", 2]
        d_step = two["ms/step"] - one["ms/step"]
        d_input = two["input ms/step"] - one["input ms/step"]
        line = (f"{g + ', ' if g else ''}{fw}: {two['speed-up']:.2f}x from 1 to 2 processes, "
                f"target {TARGET}x {'met' if two['speed-up'] >= TARGET else 'NOT met'}; a "
                f"step of the same per-process batch took {one['ms/step']:.1f} -> "
                f"{two['ms/step']:.1f} ms, the wait for the batch {one['input ms/step']:.1f} "
                f"-> {two['input ms/step']:.1f} ms")
        if d_step > 0.1 * one["ms/step"]:
            line += (": the growth is mostly the wait for the batch (the input pipeline and "
                     "whatever shares its core)" if d_input > d_step / 2
                     else ": the growth is outside the loader (the model step, the gradient "
                     "exchange between the processes, CPU contention)")
        mem = by.get((g, fw, "memory", 2))
        if mem is not None:
            bound = mem["speed-up"]
            line += (f".  With its batches from memory the same training reaches {bound:.2f}x"
                     + (": the loader is not what holds it back" if two["speed-up"]
                        >= 0.9 * bound else ": the loader costs the difference"))
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks multiworker",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--cols", type=int, default=30_000)
    ap.add_argument("--nnz-per-row", type=int, default=100)
    ap.add_argument("--batch-size", default="1024",
                    help="per process; several, comma-separated, each its own table")
    ap.add_argument("--inputs", default="store,memory",
                    help="store: batches from the store through the loader; memory: the "
                    "first batches again and again from memory (the framework's ceiling)")
    ap.add_argument("--epochs", type=int, default=3, help="per launch; the first is warm-up")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved 1/2-process rounds")
    ap.add_argument("--frameworks", default="torch,tf,jax")
    ap.add_argument("--cores", default="0,1", help="the cores processes 0 and 1 are pinned to")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the store and runs (default: a temporary one)")
    ap.add_argument("--note", default="", help="a line for the page (e.g. the box's load)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    args.cores = [int(c) for c in args.cores.split(",")]
    sizes = [int(b) for b in str(args.batch_size).split(",")]
    inputs = [i for i in args.inputs.split(",") if i]
    if set(inputs) - {"store", "memory"}:
        ap.error("--inputs takes store and/or memory")
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first is not timed)")
    fws = [f for f in args.frameworks.split(",")
           if importlib.util.find_spec(FRAMEWORKS[f]) is not None]
    skipped = sorted(set(args.frameworks.split(",")) - set(fws))
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_mw_")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / f"mw_{args.rows}x{args.cols}.zarr"
    t0 = time.perf_counter()
    build_store(store, args.rows, args.cols, args.nnz_per_row)
    store_mib = dir_bytes(store) / 2**20
    print(f"store {store}: {store_mib:.0f} MiB, {time.perf_counter() - t0:.1f} s", flush=True)
    load_before = load_avg()
    runs: dict[tuple[int, str, str, int], list[dict]] = {}
    cases = [(b, fw, i) for b in sizes for fw in fws for i in inputs]
    try:
        for rep in range(args.repeats):
            for batch, fw, source in cases:
                for n in ((1, 2) if rep % 2 == 0 else (2, 1)):
                    out = args.work / f"run_{fw}_{n}"
                    wall = launch(fw, n, store, out, args, batch, source)
                    got = {**measure(out, n, warmup=1), "launch_s": wall}
                    runs.setdefault((batch, fw, source, n), []).append(got)
                    print(f"round {rep} batch {batch} {fw} {source} x{n}: "
                          f"{got['rows_per_s']:,.0f} rows/s, input {got['input_share']:.0%}, "
                          f"launch {wall:.1f} s", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    records = []
    for b, fw, inp in cases:
        one = statistics.median(r["rows_per_s"] for r in runs[b, fw, inp, 1])
        total = runs[b, fw, inp, 1][0]["data_chunks"][0]
        for n in (1, 2):
            rs = runs[b, fw, inp, n]
            rate = statistics.median(r["rows_per_s"] for r in rs)
            per_rank = rs[0]["data_chunks"] if inp == "store" else None
            records.append({
                "group": f"per-process batch {b}", "framework": fw, "input": inp,
                "processes": n, "rows/s": rate,
                "rows/s per round": [round(r["rows_per_s"]) for r in rs],
                "speed-up": rate / one, "epoch s": statistics.median(r["epoch_s"] for r in rs),
                "input share": statistics.median(r["input_share"] for r in rs),
                "ms/step": statistics.median(r["step_ms"] for r in rs),
                "input ms/step": statistics.median(r["input_ms"] for r in rs),
                "data chunks per rank": per_rank,
                "share": [round(c / total, 3) for c in per_rank] if per_rank and total
                else None,
                "launch s": statistics.median(r["launch_s"] for r in rs)})
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--note" in shown:  # the note is on the page already
        del shown[shown.index("--note"):shown.index("--note") + 2]
    meta = run_meta("python -m benchmarks multiworker " + " ".join(shown),
                    rows=args.rows, cols=args.cols, nnz_per_row=args.nnz_per_row,
                    batch_size=sizes, epochs=args.epochs, repeats=args.repeats,
                    pinned=shutil.which("taskset") is not None, store_mib=store_mib,
                    load_before=load_before,
                    load_after=load_avg(), skipped=skipped)
    if args.note:
        meta["note"] = args.note
    return write_records("multiworker", records, meta, args.out, markdown)


if __name__ == "__main__":
    main()
