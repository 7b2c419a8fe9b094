"""Convert: many ``.npz`` shards into one store, with 1 vs 2 workers, and its peak memory.

The suite's cases ``convert_w1``/``convert_w2`` use the setup's shards.  Run this module to
measure at any size (default 200k x 30k, ~100 nnz/row: ~20M nnz in 64 compressed shards,
generated once under ``--work``)::

    python -m benchmarks.bench_convert --rows 200000 --shards 64 --reps 9

Peak RSS growth is measured in a fresh interpreter per ``workers`` value.  Times are taken
in this one process, workers=1 and workers=2 interleaved in pairs (order alternating); on a
shared machine a pair during which other processes used CPU is retried (``--max-others``),
and a pure two-thread control (numpy sorts, 1 vs 2 threads) shows what speed-up the machine
could give at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .baselines import shard_paths
from .common import Ctx, MiB, RssSampler, case, make_matrix, need, rmtree


def _convert(ctx: Ctx, workers: int) -> dict[str, Any]:
    import sparsestore

    convert = need("sparsestore.convert", "convert")
    paths = shard_paths(ctx)
    dst = Path(ctx.work) / f"converted_w{workers}"
    times = []
    for _ in range(REPS):  # a conversion takes about a second: the median of a few
        rmtree(dst)
        t0 = time.perf_counter()
        convert(paths, dst, workers=workers, progress=False)
        times.append(time.perf_counter() - t0)
    store = sparsestore.open(dst)
    out = {"rows": store.n_rows, "nnz": store.nnz, "seconds": statistics.median(times),
           "all_seconds": times, "shards": len(paths),
           "shard_max_bytes": ctx.meta.get("shard_max_bytes", 0)}
    rmtree(dst)
    return out


REPS = 3


def _register(workers: int) -> None:
    case(f"convert_w{workers}", "convert", f"convert .npz shards -> store, workers={workers}",
         f"sparsestore.convert(<compressed .npz row shards>, dst, workers={workers})",
         ours=True, needs=("sparsestore.convert",))(lambda ctx: _convert(ctx, workers))


for _w in (1, 2):
    _register(_w)


# ------------------------------------------------------------------ standalone ratio


def make_shards(out: Path, n_rows: int, n_cols: int, nnz_per_row: int, n_shards: int
                ) -> dict[str, Any]:
    """Compressed scipy ``.npz`` row shards of the suite's matrix (once; reused after)."""
    import numpy as np
    import scipy.sparse as sp

    meta_file = out / "meta.json"
    want = {"rows": n_rows, "cols": n_cols, "nnz_per_row": nnz_per_row, "shards": n_shards}
    if meta_file.exists():
        meta: dict[str, Any] = json.loads(meta_file.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return meta
    rmtree(out)
    out.mkdir(parents=True)
    X = make_matrix(n_rows, n_cols, nnz_per_row)
    bounds = np.linspace(0, n_rows, n_shards + 1).astype(int)
    biggest = 0
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = X[a:b]
        sp.save_npz(out / f"shard_{i:04d}.npz", part, compressed=True)
        biggest = max(biggest, part.data.nbytes + part.indices.nbytes + part.indptr.nbytes)
    meta = {**want, "nnz": int(X.nnz), "shard_max_bytes": int(biggest)}
    meta_file.write_text(json.dumps(meta))
    return meta


def _busy_seconds() -> float:
    """CPU seconds every process on this machine has used so far (Linux; else 0)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _timed(paths: list[str], dst: Path, workers: int) -> tuple[float, float, float]:
    """(seconds, this process's CPU seconds, other processes' CPU seconds) of one run."""
    import sparsestore

    rmtree(dst)
    b0, c0, t0 = _busy_seconds(), time.process_time(), time.perf_counter()
    sparsestore.convert(paths, dst, workers=workers, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    others = max(0.0, _busy_seconds() - b0 - cpu)
    rmtree(dst)
    return wall, cpu, others


def _rss_child(shards: str, dst: str, workers: int) -> dict[str, Any]:
    """One conversion in this fresh interpreter: its peak RSS growth (libraries imported)."""
    import numpy as np  # noqa: F401  (imports are not the conversion's memory)
    import scipy.sparse  # noqa: F401
    import zarr  # noqa: F401

    import sparsestore

    paths = sorted(str(p) for p in Path(shards).glob("*.npz"))
    rmtree(dst)
    with RssSampler(0.002) as rss:
        sparsestore.convert(paths, dst, workers=workers, progress=False)
    rmtree(dst)
    return {"workers": workers, "rss_growth": rss.growth}


def _control() -> float:
    """1-thread / 2-thread time of GIL-free numpy sorts: the parallelism available now."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.random.default_rng(0).random(2_000_000)

    def work(n: int) -> None:
        for _ in range(n):
            np.sort(a)

    with ThreadPoolExecutor(2) as ex:
        t0 = time.perf_counter()
        work(8)
        t1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(ex.map(work, [4, 4]))
        return t1 / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_convert",
                                 description="npz conversion: workers=2 vs workers=1, peak RSS")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--cols", type=int, default=30_000)
    ap.add_argument("--nnz-per-row", type=int, default=100)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--reps", type=int, default=9, help="timed (workers=1, workers=2) pairs")
    ap.add_argument("--max-others", type=float, default=0.04,
                    help="retry a pair if other processes used more than this fraction of a "
                    "core during it (0 keeps every pair); gives up after --wait seconds")
    ap.add_argument("--wait", type=float, default=300.0)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ssbench-convert"))
    ap.add_argument("--child", nargs=3, metavar=("SHARDS", "DST", "WORKERS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_rss_child(args.child[0], args.child[1], int(args.child[2]))))
        return 0
    work = Path(args.work)
    shards = work / f"shards_{args.rows}x{args.cols}_{args.nnz_per_row}_{args.shards}"
    meta = make_shards(shards, args.rows, args.cols, args.nnz_per_row, args.shards)
    paths = sorted(str(p) for p in shards.glob("*.npz"))
    shard_mib = meta["shard_max_bytes"] / MiB
    print(f"{meta['nnz']:,} nnz in {args.shards} shards; largest shard decompressed "
          f"{shard_mib:.2f} MiB")

    # Peak RSS: each run in a fresh interpreter, so that its peak is its own.
    for w in (1, 2):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_convert", "--child", str(shards),
             str(work / "rss.zarr"), str(w)],
            capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent.parent)
        growth = json.loads(proc.stdout.strip().splitlines()[-1])["rss_growth"] / MiB
        print(f"workers={w}: peak RSS growth {growth:.1f} MiB = {growth / shard_mib:.1f}x the "
              f"largest shard ({growth - 3 * shard_mib:.1f} MiB over 3 shards)")

    # Time: both in this process, interleaved (order alternating), paired, median.
    dst = work / "timed.zarr"
    for w in (1, 2):
        _timed(paths, dst, w)  # warm caches and imports
    pairs: list[tuple[float, float]] = []
    controls: list[float] = []
    deadline = time.time() + args.wait
    while len(pairs) < args.reps:
        order = (1, 2) if len(pairs) % 2 == 0 else (2, 1)
        got = {w: _timed(paths, dst, w) for w in order}
        noisy = any(o > args.max_others * t for t, _, o in got.values())
        if args.max_others and noisy and time.time() < deadline:
            time.sleep(0.5)
            continue
        controls.append(_control())
        pairs.append((got[1][0], got[2][0]))
        print(f"pair {len(pairs)}: workers=1 {got[1][0]:.3f} s (cpu {got[1][1]:.2f}), "
              f"workers=2 {got[2][0]:.3f} s (cpu {got[2][1]:.2f}), ratio "
              f"{got[1][0] / got[2][0]:.2f}{'  (noisy)' if noisy else ''}")
    t1 = statistics.median(a for a, _ in pairs)
    t2 = statistics.median(b for _, b in pairs)
    print(f"median: workers=1 {t1:.3f} s, workers=2 {t2:.3f} s; speed-up {t1 / t2:.2f}x "
          f"(median of pair ratios {statistics.median(a / b for a, b in pairs):.2f}x); "
          f"two-thread control (numpy sorts) {statistics.median(controls):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
