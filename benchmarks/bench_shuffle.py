"""How well does the loader's shuffle mix a label that the rows are sorted by, and at what cost?

Three label-sorted stores are written (rows of one group stored together, groups of uneven
sizes, as a single-cell atlas stores sample after sample):

* ``synthetic``: 200k x 30k, ~100 nnz/row, uniform columns, 50 groups;
* ``tall``: 1M x 4k, ~20 nnz/row, 50 groups;
* ``singlecell``: 100k x 20k, ~800 nnz/row, Zipf-like column popularity and lognormal
  library sizes, 30 groups.

Each is read sequentially, with the default ``shuffle=True``, with larger shuffle buffers
(``shuffle_buffer_blocks``) and with a true permutation through ``sampler=``.  Quality
(:func:`sparsestore.mixing.shuffle_quality`: mean TV between each batch's label histogram
and all rows', its ratio to a true permutation's, distinct labels per batch) comes from
index math over a whole epoch.  Speed and peak RSS come from one pass per config in a fresh
subprocess, configs interleaved, median of ``--repeats``; the permutation reads rows at
random and is timed on its first ``--perm-rows`` rows only::

    python -m benchmarks.bench_shuffle [--quick] [--out DIR]

writes ``shuffle.json`` and ``shuffle.md``.  ``--quick`` divides every store's rows by 10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from sparsestore.cli import parse_size

from .common import (
    BATCH_SIZE,
    SEED,
    MiB,
    RssSampler,
    add_out_argument,
    child,
    csr_from_keys,
    matrix_blocks,
    reproduce_command,
    rmtree,
    stream,
    write_timed,
)
from .records import run_meta, write_records

LABEL = "group"
GEN_ROWS = 8192  # rows generated per block: memory stays bounded whatever the store size


@dataclass(frozen=True)
class StoreSpec:
    name: str
    n_rows: int
    n_cols: int
    nnz_per_row: int
    groups: int
    zipf: bool  # single-cell-shaped: Zipf-like column popularity, lognormal row sizes


STORES = (
    StoreSpec("synthetic", 200_000, 30_000, 100, 50, False),
    StoreSpec("tall", 1_000_000, 4_000, 20, 50, False),
    StoreSpec("singlecell", 100_000, 20_000, 800, 30, True),
)


def group_labels(n_rows: int, groups: int, seed: int = SEED) -> np.ndarray:
    """Group ids ``0..groups-1`` in storage order, group sizes uneven (a 1:10 spread)."""
    w = np.random.default_rng([seed, groups]).permutation(np.geomspace(1, 10, groups))
    ends = np.round(np.cumsum(w) / w.sum() * n_rows).astype(np.int64)
    return np.repeat(np.arange(groups, dtype=np.int32), np.diff(ends, prepend=0))


def zipf_blocks(n_rows: int, n_cols: int, nnz_per_row: int, seed: int = SEED
                ) -> Iterator[sp.csr_matrix]:
    """Count-like rows shaped like single-cell data, one block of ``GEN_ROWS`` at a time.

    Column popularity falls as ``1 / (rank + 20)`` (a few genes in every cell, most in
    few); row sizes are lognormal around ``nnz_per_row``.  Columns are drawn with
    replacement and deduplicated, so draws are oversampled to land near ``nnz_per_row``.
    """
    rng = np.random.default_rng([seed, 1])
    w = 1.0 / (np.arange(n_cols) + 20.0)
    cdf = np.cumsum(w[rng.permutation(n_cols)])
    for k, start in enumerate(range(0, n_rows, GEN_ROWS)):
        rng = np.random.default_rng([seed, 2, k])
        rows = min(GEN_ROWS, n_rows - start)
        size = rng.lognormal(-0.125, 0.5, rows)  # mean 1
        draws = np.maximum(1, rng.poisson(nnz_per_row * 1.4 * size))
        rid = np.repeat(np.arange(rows, dtype=np.int64), draws)
        keys = np.sort(rid * n_cols + np.searchsorted(cdf, rng.random(rid.size) * cdf[-1]))
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
        yield csr_from_keys(keys, rows, n_cols, rng)


def write_store(spec: StoreSpec, path: Path, **layout: Any) -> dict[str, Any]:
    """Write ``spec`` at ``path`` with its group labels (and ``layout`` options); returns
    its facts."""
    y = group_labels(spec.n_rows, spec.groups)
    if spec.zipf:
        mats: Iterator[sp.csr_matrix] = zipf_blocks(spec.n_rows, spec.n_cols, spec.nnz_per_row)
    else:
        mats = (X for X, _ in matrix_blocks(spec.n_rows, spec.n_cols, spec.nnz_per_row,
                                            block_rows=GEN_ROWS))

    def blocks() -> Iterator[tuple[sp.csr_matrix, dict[str, np.ndarray]]]:
        start = 0
        for X in mats:
            yield X, {LABEL: y[start:start + X.shape[0]]}
            start += X.shape[0]

    return {**write_timed(path, blocks(), spec.n_cols, **layout), "groups": spec.groups}


# ------------------------------------------------------------------ configs


def configs(buffers: list[int], budgets: list[int] = ()) -> list[dict[str, Any]]:
    """Loader settings compared on every store: name -> DataLoader keywords."""
    out: list[dict[str, Any]] = [
        {"name": "sequential", "kw": {"shuffle": False}},
        {"name": "shuffle (default)", "kw": {"shuffle": True}},
    ]
    out += [{"name": f"shuffle, budget {b >> 20} MiB", "kw": {"shuffle": True,
                                                             "shuffle_buffer_bytes": b}}
            for b in budgets]
    out += [{"name": f"shuffle, buffer {k} blocks", "kw": {"shuffle": True,
                                                          "shuffle_buffer_blocks": k}}
            for k in buffers]
    out.append({"name": "permutation (sampler=)", "kw": {}, "permutation": True})
    return out


def make_loader(path: str, cfg: dict[str, Any], perm_rows: int | None = None) -> Any:
    """The config's loader; a permutation's sampler is cut to ``perm_rows`` rows if given."""
    import sparsestore
    from sparsestore.loader import DataLoader

    store = sparsestore.open(path)
    if cfg.get("permutation"):
        order = np.random.default_rng([SEED, 3]).permutation(store.n_rows)
        if perm_rows is not None:
            order = order[:perm_rows]
        return DataLoader(store, BATCH_SIZE, sampler=order.tolist())
    return DataLoader(store, BATCH_SIZE, seed=SEED, **cfg["kw"])


def _child(path: str, cfg: dict[str, Any], perm_rows: int) -> dict[str, Any]:
    """Runs in the subprocess: one pass of ``cfg`` over the store, timed, RSS sampled."""
    from sparsestore.loader import DataLoader

    # One batch of another loader first: a process's first pass pays one-off setup
    # (lazy imports, first calls) that would swamp the shorter passes.
    warm = DataLoader(path, BATCH_SIZE).iter_batches()
    next(warm, None)
    warm.close()
    loader = make_loader(path, cfg, perm_rows)
    with RssSampler() as rss:
        res = stream(loader.iter_batches(), lambda b: (b.n_rows, b.nnz), float("inf"))
    dt = max(res["seconds"], 1e-9)
    # Sampled, not ru_maxrss: Linux carries the parent's peak across fork and exec.
    return {"rows": res["rows"], "nnz": res["nnz"], "seconds": dt,
            "rows_per_s": res["rows"] / dt, "mnnz_per_s": res["nnz"] / dt / 1e6,
            "peak_rss_mib": rss.peak / MiB, "rss_growth_mib": rss.growth / MiB}


def quality(path: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Shuffle quality of ``cfg`` over one whole epoch, from index math and the labels."""
    from sparsestore.mixing import shuffle_quality

    loader = make_loader(path, cfg)
    rep = shuffle_quality(loader, LABEL, seed=SEED)
    n_blocks = None if cfg.get("permutation") else loader._sampler_for_blocks().n_blocks
    return {"tv": rep.tv, "tv_permutation": rep.tv_permutation, "ratio": rep.ratio,
            "tv_sequential": rep.tv_sequential, "distinct": rep.distinct,
            "distinct_permutation": rep.distinct_permutation, "batches": rep.batches,
            "n_blocks": n_blocks}


def run(specs: list[StoreSpec], buffers: list[int], repeats: int, perm_rows: int,
        work: Path, budgets: list[int] = (), chunk_bytes: int | None = None,
        ) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    layout = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    for spec in specs:
        path = work / f"{spec.name}.zarr"
        facts = write_store(spec, path, **layout)
        print(f"{spec.name}: {facts['rows']:,} x {facts['cols']:,}, "
              f"{facts['nnz_per_row']:.0f} nnz/row, written in {facts['write_s']:.1f} s",
              flush=True)
        cfgs = configs(buffers, budgets)
        recs = [{"store": spec.name, **{k: facts[k] for k in ("rows", "cols", "nnz",
                                                            "nnz_per_row", "groups")},
                 "config": c["name"], "loader": c.get("kw", {}),
                 "permutation": bool(c.get("permutation")),
                 **quality(str(path), c), "runs": []} for c in cfgs]
        for _ in range(repeats):  # interleaved: a slow spell of the box hits every config
            for c, rec in zip(cfgs, recs, strict=True):
                rec["runs"].append(child("bench_shuffle", "--child", path, "--config",
                                         json.dumps(c), "--perm-rows", perm_rows))
        for rec in recs:
            runs = rec["runs"]
            rec["timed_rows"] = runs[0]["rows"]
            for key in ("rows_per_s", "mnnz_per_s", "peak_rss_mib", "rss_growth_mib"):
                rec[key] = statistics.median(r[key] for r in runs)
            print(f"  {rec['config']}: TV {rec['tv']:.3f} ({rec['ratio']:.2f}x perm), "
                  f"{rec['rows_per_s']:,.0f} rows/s, peak RSS {rec['peak_rss_mib']:.0f} MiB",
                  flush=True)
        records += recs
        rmtree(path)
    return records


NOTE = ("Batch 1024; each store's rows sorted by a label of uneven groups.  TV: mean "
        "total-variation distance between a batch's label histogram and all rows', over one "
        "epoch from index math; `x perm`: TV over a true permutation's TV on the same rows (1 "
        "is perfect mixing; `perm TV` is that permutation's).  Speed and RSS: one pass per "
        "config in a fresh subprocess after a one-batch warm-up, median (and range) of the "
        "runs, configs interleaved; peak RSS is the subprocess's during the pass (psutil, "
        "sampled every 5 ms; imports included), growth is above its RSS when the pass began.  "
        "The permutation (`sampler=`) reads rows at random and is timed on its first rows "
        "only (`rows timed`).  `blocks`: row blocks the loader cuts the store into.  Speeds "
        "are noisy on a shared box; quality figures are not.")


def to_records(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per store and config, a table per store."""
    return [{"group": f"{r['store']}: {r['rows']:,} x {r['cols']:,}, {r['nnz_per_row']:.0f} "
                      f"nnz/row, {r['groups']} groups",
             "store": r["store"], "config": r["config"], "blocks": r["n_blocks"], "TV": r["tv"],
             "x perm": r["ratio"], "perm TV": r["tv_permutation"],
             "labels/batch": r["distinct"], "rows timed": r["timed_rows"],
             "rows/s": r["rows_per_s"],
             "rows/s range": [min(x["rows_per_s"] for x in r["runs"]),
                              max(x["rows_per_s"] for x in r["runs"])],
             "M nnz/s": r["mnnz_per_s"], "peak RSS MiB": r["peak_rss_mib"],
             "RSS growth MiB": r["rss_growth_mib"]} for r in results]


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_shuffle",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="stores of a tenth of the rows")
    p.add_argument("--stores", default=",".join(s.name for s in STORES))
    p.add_argument("--buffers", default="4", help="shuffle_buffer_blocks values to add (4: "
                   "the fixed buffer that was the default before the byte budget)")
    p.add_argument("--budgets", default="128M", help="shuffle_buffer_bytes values to add")
    p.add_argument("--chunk-bytes", type=parse_size, default=None,
                   help="write the stores with this data chunk size (default: the library's)")
    p.add_argument("--repeats", type=int, default=3, help="passes per config (median)")
    p.add_argument("--perm-rows", "--perm_rows", type=int, default=20_000,
                   help="rows the permutation is timed on (default 20000; 2000 with --quick)")
    add_out_argument(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        res = _child(args.child, json.loads(args.config), args.perm_rows)
        print(json.dumps(res))
        return res
    div = 10 if args.quick else 1
    perm_rows = args.perm_rows if args.perm_rows != p.get_default("perm_rows") or not \
        args.quick else 2_000
    names = [s for s in args.stores.split(",") if s]
    specs = [StoreSpec(s.name, s.n_rows // div, s.n_cols, s.nnz_per_row, s.groups, s.zipf)
             for s in STORES if s.name in names]
    buffers = [int(k) for k in args.buffers.split(",") if k]
    budgets = [parse_size(b) for b in args.budgets.split(",") if b]
    command = reproduce_command("benchmarks.bench_shuffle", p, args,
                                ("stores", "buffers", "budgets", "chunk_bytes", "repeats",
                                 "perm_rows", "quick"))
    with tempfile.TemporaryDirectory() as tmp:
        results = run(specs, buffers, args.repeats, perm_rows, Path(tmp), budgets,
                      args.chunk_bytes)
    meta = run_meta(command, title="Shuffle quality on label-sorted stores", note=NOTE,
                    quick=args.quick, repeats=args.repeats, perm_rows=perm_rows,
                    batch_size=BATCH_SIZE)
    name = "shuffle" if args.chunk_bytes is None else f"shuffle_chunk{args.chunk_bytes >> 10}k"
    return write_records(name, to_records(results), meta, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
