"""Real passes: default shuffle against a sequential pass, rows/s and batch label quality.

A synthetic 200k x 30k store with 100 nnz per row and rows sorted into 50 label groups is
saved with the default layout and with small chunks; passes alternate between layouts and
modes (median of ``--repeats``).  With ``--epochs N`` (N > 1) each loader runs N epochs
and a run's figure is the median of epochs 2..N: training's steady state, where the
loader's buffer pool is warm (a first pass also pays the page faults of fresh memory).
Run ``python -m benchmarks shuffle_pass [--dir /tmp/x] [--epochs 4] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import sparsestore
from sparsestore.loader import DataLoader


def make_store(path: Path, n: int, m: int, k: int, groups: int, **layout) -> None:
    rng = np.random.default_rng(0)
    cols = np.sort(rng.integers(0, m, size=(n, k), dtype=np.int32), axis=1)
    keep = np.ones((n, k), bool)
    keep[:, 1:] = cols[:, 1:] != cols[:, :-1]  # unique columns per row
    indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
    X = sp.csr_matrix((rng.random(int(indptr[-1]), dtype=np.float32), cols[keep], indptr),
                      shape=(n, m))
    y = (np.arange(n) * groups // n).astype(np.int32)
    sparsestore.save(path, X, labels={"y": y}, **layout)


def one_pass(store, groups: int, epochs: int = 1, **kw) -> tuple[float, float]:
    """Rows/s through the numpy backend (a first pass, or the median of epochs 2..N of
    one loader) and the mean batch label TV."""
    loader = DataLoader(store, batch_size=1024, labels="y", **kw)
    rates, tvs = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = 0
        for _x, y in loader:
            n += y.size
            if y.size == 1024:
                tvs.append(0.5 * np.abs(np.bincount(y, minlength=groups) / y.size
                                        - 1 / groups).sum())
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates[1:] or rates), float(np.mean(tvs))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    ap.add_argument("--epochs", type=int, default=1,
                    help="epochs per loader; above 1, epochs 2..N are timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args(argv)
    d = args.dir or Path(tempfile.mkdtemp())
    d.mkdir(parents=True, exist_ok=True)
    groups = 50
    layouts = {"default (4 MiB chunks)": {}, "chunk_bytes=131072": {"chunk_bytes": 131072}}
    paths = {}
    for i, (name, layout) in enumerate(layouts.items()):
        paths[name] = d / f"s{i}.zarr"
        if not paths[name].exists():
            make_store(paths[name], args.rows, 30_000, 100, groups, **layout)
    modes = {"sequential": dict(shuffle=False), "default shuffle": dict(shuffle=True, seed=0)}
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for name, path in paths.items():
            store = sparsestore.open(path)
            for mode, kw in modes.items():
                runs.setdefault((name, mode), []).append(
                    one_pass(store, groups, args.epochs, **kw))
    perm = np.random.default_rng(1).permutation(args.rows) * groups // args.rows
    ptv = np.mean([0.5 * np.abs(np.bincount(perm[i:i + 1024], minlength=groups) / 1024
                                - 1 / groups).sum() for i in range(0, args.rows - 1023, 1024)])
    rows = []
    for name in layouts:
        seq = statistics.median(r for r, _ in runs[(name, "sequential")])
        for mode in modes:
            rate = statistics.median(r for r, _ in runs[(name, mode)])
            tv = statistics.median(t for _, t in runs[(name, mode)])
            rows.append(dict(layout=name, mode=mode, rows_per_s=rate, vs_sequential=rate / seq,
                             tv=tv, tv_over_permutation=tv / ptv, epochs=args.epochs))
    lines = [f"| layout | loader | rows/s (median of {args.repeats}) | x sequential | TV | "
             "TV x permutation |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['mode']} | {r['rows_per_s']:,.0f} | "
              f"{r['vs_sequential']:.2f} | {r['tv']:.3f} | {r['tv_over_permutation']:.2f} |"
              for r in rows]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shuffle_pass.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
