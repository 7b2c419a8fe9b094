"""Store layouts compared: 4 MiB chunks (the default), small chunks, small inner chunks in
shards.  Per layout: write (``save``) time, full read (``store[:]``), a sequential loader
pass and random access (``store[sorted random 1024 rows]``), configs interleaved in one
process, median of ``--rounds``.

``python -m benchmarks.bench_layout [--rows N] [--rounds R] [--shapes cell,synthetic]``

Shapes: ``cell`` is single-cell-shaped (20k columns, ~800 nnz/row, Zipf-like column
popularity, float32 counts: :func:`benchmarks.bench_shuffle.zipf_blocks`); ``synthetic`` is
30k columns x 100 nnz/row uniform (:func:`benchmarks.common.make_matrix`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .bench_shuffle import zipf_blocks
from .common import add_out_argument, dir_bytes, make_matrix, reproduce_command, rmtree
from .records import run_meta, write_records

LAYOUTS: dict[str, dict[str, Any]] = {
    "4MiB": {},
    "128KiB": {"chunk_bytes": 2**17},
    "128KiB/8MiB shards": {"chunk_bytes": 2**17, "shard_bytes": 8 * 2**20},
    "64KiB/16MiB shards": {"chunk_bytes": 2**16, "shard_bytes": 16 * 2**20},
    "256KiB/16MiB shards": {"chunk_bytes": 2**18, "shard_bytes": 16 * 2**20},
    "512KiB/16MiB shards": {"chunk_bytes": 2**19, "shard_bytes": 16 * 2**20},
    "1MiB/16MiB shards": {"chunk_bytes": 2**20, "shard_bytes": 16 * 2**20},
    "1MiB": {"chunk_bytes": 2**20},
}
RANDOM_ROWS = 1024
RANDOM_DRAWS = 5


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _loader_pass(store: Any, block_rows: int | None = None) -> int:
    import sparsestore

    n = 0
    for b in sparsestore.DataLoader(store, batch_size=1024,
                                    block_rows=block_rows).iter_batches():
        n += b.n_rows
    return n


def run_shape(name: str, X: sp.csr_matrix, rounds: int, work: Path,
              layouts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import sparsestore

    paths = {lay: work / f"{name}-{i}.zarr" for i, lay in enumerate(layouts)}
    times: dict[str, dict[str, list[float]]] = {
        lay: {"write": [], "full_read": [], "loader": [], "loader_matched": [], "random": []}
        for lay in layouts}
    # The loader cuts blocks of 2 chunks of ``data``: with small chunks its units shrink
    # too.  "matched" reads every layout in the default layout's block size (2 x 4 MiB of
    # values), so only the chunk decoding differs.
    matched = max(1, int(2 * 2**20 * X.shape[0] / max(1, X.nnz)))
    rng = np.random.default_rng(0)
    order = list(layouts)
    for r in range(rounds):
        rot = order[r % len(order):] + order[: r % len(order)]  # rotate who goes first
        for lay in rot:
            rmtree(paths[lay])
            times[lay]["write"].append(
                _timed(lambda lay=lay: sparsestore.save(paths[lay], X, **layouts[lay])))
        for lay in rot:
            store = sparsestore.open(paths[lay])
            times[lay]["full_read"].append(_timed(lambda store=store: store[:]))
            seen: list[int] = []
            times[lay]["loader"].append(_timed(lambda store=store, seen=seen: seen.append(
                _loader_pass(store))))
            times[lay]["loader_matched"].append(_timed(
                lambda store=store, seen=seen: seen.append(_loader_pass(store, matched))))
            assert seen == [X.shape[0]] * 2
            draws = [np.sort(rng.choice(X.shape[0], RANDOM_ROWS, replace=False))
                     for _ in range(RANDOM_DRAWS)]
            times[lay]["random"].append(
                sum(_timed(lambda rows=rows, store=store: store[rows]) for rows in draws)
                / RANDOM_DRAWS)
        if r == 0:  # the layouts agree with the matrix (once; outside the timings)
            for lay in order:
                got = sparsestore.open(paths[lay])[:]
                assert (got != X).nnz == 0, lay
    n = X.shape[0]
    out: dict[str, Any] = {"shape": list(X.shape), "nnz": int(X.nnz), "layouts": {},
                           "matched_block_rows": matched}
    for lay in order:
        t = {k: statistics.median(v) for k, v in times[lay].items()}
        out["layouts"][lay] = {
            "options": layouts[lay],
            "bytes": dir_bytes(paths[lay]),
            "files": sum(1 for p in paths[lay].rglob("*") if p.is_file()),
            "write_s": t["write"],
            "full_read_s": t["full_read"],
            "loader_rows_per_s": n / t["loader"],
            "loader_matched_rows_per_s": n / t["loader_matched"],
            "random_rows_per_s": RANDOM_ROWS / t["random"],
            "raw_s": times[lay],
        }
        rmtree(paths[lay])
    return out


NOTE = ("Median of interleaved rounds, warm page cache.  `x`: the layout's figure over the "
        "default's (4 MiB).  `loader matched`: every layout read in the default layout's loader "
        "block size, so only the chunk decoding differs.  What these figures decided, and the "
        "decode floor under small chunks: `design_notes.md`, \"The store layout\".")
RATIOS = {"write s": "write x", "full read s": "read x", "loader rows/s": "loader x",
          "loader matched rows/s": "matched x", "random 1024 rows/s": "random x"}


def to_records(shapes: dict[str, Any], label: str = "") -> list[dict[str, Any]]:
    """One row per layout, a table per shape (``label`` added to its heading)."""
    out = []
    for name, res in shapes.items():
        rows, cols = res["shape"]
        group = (f"{name}: {rows:,} x {cols:,}, {res['nnz'] / rows:.0f} nnz/row{label} "
                 f"(loader matched: block_rows={res['matched_block_rows']})")
        recs = [{"group": group, "layout": lay, "files": v["files"], "MB": v["bytes"] / 1e6,
                 "write s": v["write_s"], "full read s": v["full_read_s"],
                 "loader rows/s": v["loader_rows_per_s"],
                 "loader matched rows/s": v["loader_matched_rows_per_s"],
                 "random 1024 rows/s": v["random_rows_per_s"]}
                for lay, v in res["layouts"].items()]
        for r in recs:
            r.update({x: r[k] / recs[0][k] for k, x in RATIOS.items()})
        out += recs
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", default="cell,synthetic")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="comma-separated layout names (4MiB, the baseline, always runs)")
    add_out_argument(p)
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args(argv)
    chosen = {"4MiB", *args.layouts.split(",")}
    layouts = {name: opts for name, opts in LAYOUTS.items() if name in chosen}
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_layout_"))
    work.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for name in args.shapes.split(","):
        X = (sp.vstack(list(zipf_blocks(args.rows, 20_000, 800)), format="csr")
             if name == "cell" else make_matrix(args.rows, 30_000, 100))
        shapes[name] = run_shape(name, X, args.rounds, work, layouts)
        del X
    meta = run_meta(reproduce_command("benchmarks.bench_layout", p, args,
                                      ["rows", "rounds", "shapes", "layouts"]),
                    title="Store layouts: chunk size and sharding", note=NOTE,
                    rounds=args.rounds)
    return write_records("layout", to_records(shapes), meta, args.out)


if __name__ == "__main__":
    main()
