"""Convert: many ``.npz`` shards into one store, with 1 vs 2 workers, and its peak memory.

The suite's cases ``convert_w1``/``convert_w2`` use the setup's shards.  Run this module for
the criterion: 64 shards totalling >= 20M nnz convert >= 1.6x faster with 2 workers
than with 1, and peak RSS growth stays below 3x one shard's decompressed size::

    python -m benchmarks.bench_convert --reps 11 --wait 600

By default the matrix is 200k x 30k with ~100 nnz/row (~20M nnz), saved as
``scipy.sparse.save_npz`` does by default (float64 values, int32 indices, compressed) in
64 shards (~3.6 MiB each decompressed) and, as a larger-shard case, in 8 (~29 MiB each);
the shards are generated once under ``--work``.

Peak RSS growth -- the peak sampled during ``sparsestore.convert`` minus the RSS once the
libraries (numpy, scipy, zarr, sparsestore and its convert/ingest modules) are imported --
is measured in a fresh interpreter per case and ``workers`` value (``--rss-reps`` times;
the median is reported, with the range), and printed in MiB and as a multiple of the
largest shard's decompressed size (data + indices + indptr).  Times are taken in this one
process on the 64 shards, workers=1 and workers=2 interleaved in pairs (order
alternating); on a shared machine a pair during which other processes used CPU is
retried (``--max-others``), and a pure two-thread control (numpy sorts, 1 vs 2 threads)
shows what speed-up the machine could give at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .baselines import shard_paths
from .common import Ctx, MiB, RssSampler, case, child, load_avg, make_matrix, need, rmtree


def _convert(ctx: Ctx, workers: int) -> dict[str, Any]:
    import sparsestore

    convert = need("sparsestore.conversion", "convert")
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
         ours=True, needs=("sparsestore.conversion",))(lambda ctx: _convert(ctx, workers))


for _w in (1, 2):
    _register(_w)


# ------------------------------------------------------------------ standalone ratio


def make_shards(out: Path, n_rows: int, n_cols: int, nnz_per_row: int, n_shards: int,
                dtype: str = "float32", X: Any = None) -> dict[str, Any]:
    """Compressed scipy ``.npz`` row shards of the suite's matrix (once; reused after).

    ``X``: the matrix, if the caller has it already (else generated).
    """
    import numpy as np
    import scipy.sparse as sp

    meta_file = out / "meta.json"
    want = {"rows": n_rows, "cols": n_cols, "nnz_per_row": nnz_per_row, "shards": n_shards,
            "dtype": dtype}
    if meta_file.exists():
        meta: dict[str, Any] = json.loads(meta_file.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return meta
    rmtree(out)
    out.mkdir(parents=True)
    if X is None:
        X = make_matrix(n_rows, n_cols, nnz_per_row)
    bounds = np.linspace(0, n_rows, n_shards + 1).astype(int)
    biggest = 0
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = X[a:b].astype(dtype)
        sp.save_npz(out / f"shard_{i:04d}.npz", part, compressed=True)
        biggest = max(biggest, part.data.nbytes + part.indices.nbytes + part.indptr.nbytes)
    meta = {**want, "nnz": int(X.nnz), "shard_max_bytes": int(biggest)}
    meta_file.write_text(json.dumps(meta))
    return meta


def shard_sets(work: Path, n_rows: int, n_cols: int, nnz_per_row: int,
               counts: list[int], dtype: str) -> dict[int, tuple[Path, dict[str, Any]]]:
    """``{n_shards: (folder, meta)}``: the same matrix in each number of shards."""
    out: dict[int, tuple[Path, dict[str, Any]]] = {}
    X = None
    for n in counts:
        folder = work / f"shards_{n_rows}x{n_cols}_{nnz_per_row}_{n}_{dtype}"
        meta_file = folder / "meta.json"
        fresh = not meta_file.exists() or json.loads(meta_file.read_text()).get("dtype") != dtype
        if fresh and X is None:
            X = make_matrix(n_rows, n_cols, nnz_per_row)
        out[n] = (folder, make_shards(folder, n_rows, n_cols, nnz_per_row, n, dtype, X))
    return out


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
    import sparsestore.conversion  # noqa: F401
    import sparsestore.ingest.npz  # noqa: F401

    paths = sorted(str(p) for p in Path(shards).glob("*.npz"))
    rmtree(dst)
    with RssSampler(0.001) as rss:
        sparsestore.convert(paths, dst, workers=workers, progress=False)
    rmtree(dst)
    return {"workers": workers, "rss_growth": rss.growth}


def _rss(shards: Path, dst: Path, workers: int, reps: int) -> list[float]:
    """Peak RSS growth (MiB) of ``reps`` conversions, each in a fresh interpreter."""
    return [child("bench_convert", "--child", shards, dst, workers)["rss_growth"] / MiB
            for _ in range(reps)]


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
    ap.add_argument("--big-shards", type=int, default=8,
                    help="the same matrix in this many (larger) shards, for peak RSS; 0: skip")
    ap.add_argument("--dtype", default="float64",
                    help="values' dtype in the shards (save_npz keeps the matrix's; "
                    "float64 is scipy's default)")
    ap.add_argument("--reps", type=int, default=9, help="timed (workers=1, workers=2) pairs")
    ap.add_argument("--rss-reps", type=int, default=3,
                    help="fresh-interpreter conversions per peak RSS figure (median)")
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
    counts = [args.shards] + ([args.big_shards] if args.big_shards else [])
    sets = shard_sets(work, args.rows, args.cols, args.nnz_per_row, counts, args.dtype)

    # Peak RSS: each run in a fresh interpreter, so that its peak is its own.
    for n, (folder, meta) in sets.items():
        shard_mib = meta["shard_max_bytes"] / MiB
        print(f"{meta['nnz']:,} nnz ({args.dtype}) in {n} shards; largest shard decompressed "
              f"{shard_mib:.2f} MiB")
        for w in (1, 2):
            got = _rss(folder, work / "rss.zarr", w, args.rss_reps)
            growth = statistics.median(got)
            print(f"  workers={w}: peak RSS growth {growth:.1f} MiB = {growth / shard_mib:.2f}x "
                  f"one shard (runs {min(got):.1f}-{max(got):.1f} MiB); criterion < 3x: "
                  f"{'met' if growth < 3 * shard_mib else 'NOT met'}")

    # Time: both in this process, interleaved (order alternating), paired, median.
    folder, meta = sets[args.shards]
    paths = sorted(str(p) for p in folder.glob("*.npz"))
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
              f"{got[1][0] / got[2][0]:.2f}, load {load_avg()}{'  (noisy)' if noisy else ''}")
    t1 = statistics.median(a for a, _ in pairs)
    t2 = statistics.median(b for _, b in pairs)
    ratio = statistics.median(a / b for a, b in pairs)
    print(f"{args.shards} shards: median workers=1 {t1:.3f} s, workers=2 {t2:.3f} s; speed-up "
          f"{t1 / t2:.2f}x (median of pair ratios {ratio:.2f}x; criterion >= 1.6x: "
          f"{'met' if ratio >= 1.6 else 'NOT met'}); two-thread control (numpy sorts) "
          f"{statistics.median(controls):.2f}x; load average {load_avg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
