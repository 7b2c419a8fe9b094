"""What the chunk manifest costs readers: the same store read with its manifest (every chunk
checked) and without it (format version 1), interleaved in one process; optionally also
against an older checkout of sparsestore, in alternating subprocesses.

``python -m benchmarks.bench_integrity [--rows N] [--rounds R] [--baseline-src DIR]``

``--baseline-src``: a checkout of an older sparsestore (e.g. ``git worktree add /tmp/old
a6a1c16``); its code reads a copy of the store without the manifest (``--baseline-reads
plain``, for a checkout older than the manifest) or the same store (``sealed``), this code
reads the store with it, in alternating fresh processes (each timed as its best of a few
passes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .common import add_out_argument, reproduce_command
from .records import run_meta, write_records

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("full_read", "loader_seq", "loader_shuffled")
WARM_PASSES = 3  # per subprocess: its best pass (the first one pays for cold caches)


def unseal(path: Path) -> None:
    """Drop the manifest: the store then reads as one written before it existed."""
    import zarr

    g = zarr.open_group(str(path), mode="r+")
    meta = dict(g.attrs["sparsestore"])
    meta.update(format_version=1)
    meta.pop("manifest", None)
    meta.pop("generation", None)
    meta.pop("nan_policy", None)
    g.attrs["sparsestore"] = meta


def one_pass(path: str, kind: str) -> float:
    """Seconds for one pass of ``kind`` over the store at ``path``."""
    import sparsestore

    st = sparsestore.open(path)
    t0 = time.perf_counter()
    if kind == "full_read":
        st[:]
    else:
        loader = sparsestore.DataLoader(st, batch_size=1024, shuffle=kind == "loader_shuffled",
                                        seed=0)
        for _ in loader:
            pass
    return time.perf_counter() - t0


def _subprocess_pass(src: Path, path: str, kind: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = (f"import sys; sys.path.append({str(ROOT)!r}); "  # src first: its sparsestore
            "from benchmarks.bench_integrity import one_pass; "
            f"print(min(one_pass({path!r}, {kind!r}) for _ in range({WARM_PASSES})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=src)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--cols", type=int, default=20_000)
    ap.add_argument("--nnz-per-row", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--baseline-reads", choices=["plain", "sealed"], default="plain",
                    help="the store the baseline checkout reads (sealed: the same one)")
    add_out_argument(ap)
    args = ap.parse_args(argv)

    import sparsestore

    rng = np.random.default_rng(0)
    n, m, k = args.rows, args.cols, args.nnz_per_row
    X = sp.random(n, m, density=k / m, format="csr", dtype=np.float32, random_state=rng)
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as d:
        sealed, plain = Path(d) / "sealed.zarr", Path(d) / "plain.zarr"
        sparsestore.save(sealed, X, labels={"y": np.arange(n)})
        shutil.copytree(sealed, plain)
        unseal(plain)
        assert sparsestore.open(sealed).verified and not sparsestore.open(plain).verified
        times: dict[str, dict[str, list[float]]] = {p: {"manifest": [], "none": []}
                                                    for p in PASSES}
        for r in range(args.rounds):
            for kind in PASSES:
                order = [("manifest", sealed), ("none", plain)]
                for label, path in order if r % 2 == 0 else order[::-1]:
                    times[kind][label].append(one_pass(str(path), kind))
        result: list[dict[str, object]] = []
        lines = []
        for kind in PASSES:
            a = statistics.median(times[kind]["manifest"])
            b = statistics.median(times[kind]["none"])
            result.append({"group": "with the manifest vs without", "pass": kind,
                           "with_manifest_s": a, "without_s": b, "ratio": b / a})
            lines.append(f"{kind:16s} with manifest {X.nnz / a / 1e6:7.1f} M nnz/s, without "
                         f"{X.nnz / b / 1e6:7.1f} M nnz/s: {b / a:.3f}x")
        if args.baseline_src is not None:
            for kind in PASSES:
                old, new = [], []
                for r in range(args.rounds):
                    base = sealed if args.baseline_reads == "sealed" else plain
                    pair = [(new, str(ROOT), str(sealed)),
                            (old, str(args.baseline_src), str(base))]
                    for bucket, src, path in pair if r % 2 == 0 else pair[::-1]:
                        bucket.append(_subprocess_pass(Path(src), path, kind))
                a, b = statistics.median(new), statistics.median(old)
                result.append({"group": "this code vs the baseline checkout", "pass": kind,
                               "this_s": a, "baseline_s": b, "ratio": b / a})
                lines.append(f"{kind:16s} this code {X.nnz / a / 1e6:7.1f} M nnz/s, baseline "
                             f"{X.nnz / b / 1e6:7.1f} M nnz/s: {b / a:.3f}x")
    print("\n".join(lines))
    meta = run_meta(reproduce_command("benchmarks.bench_integrity", ap, args,
                                      ("rows", "cols", "nnz_per_row", "rounds", "baseline_src",
                                       "baseline_reads")),
                    rows=n, cols=m, nnz=int(X.nnz), rounds=args.rounds,
                    load_avg=os.getloadavg()[0])
    name = "integrity" if args.baseline_src is None else "integrity_vs_previous"
    write_records(name, result, meta, args.out, echo=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
