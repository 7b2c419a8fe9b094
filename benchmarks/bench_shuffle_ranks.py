"""Per-rank shuffle quality: each rank's batches against the whole store's label mix.

``python -m benchmarks.bench_shuffle_ranks [--quick] [--stores tall,singlecell] [--out DIR]``

A store that fits one shuffle unit is one permutation of all its rows, each rank reading
its slice.  On a bigger store a rank's share is the blocks dealt to it, one of every
``world_size`` neighbouring blocks, so its label mix follows the store's at block
granularity: with few, large blocks (4 MiB chunks) a unit of the share still misses the
labels of the blocks it was not dealt.  This writes bench_shuffle's label-sorted stores
with the default chunks and with small chunks in shards, and reports the mean batch
total-variation distance to the whole store's label histogram, per rank, for
``world_size`` 1-3, beside a true permutation's.  Index math only
(``DataLoader.epoch_rows``): no data is decoded.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .bench_shuffle import BATCH_SIZE, STORES, StoreSpec, write_store
from .common import add_out_argument, reproduce_command
from .records import run_meta, write_records

LAYOUTS = {"4 MiB chunks (default)": {},
           "1 MiB chunks, 16 MiB shards": {"chunk_bytes": 2**20, "shard_bytes": 16 * 2**20},
           "128 KiB chunks, 8 MiB shards": {"chunk_bytes": 128 * 2**10, "shard_bytes": 8 * 2**20}}
LABEL = "group"


def measure(path: Path, worlds: list[int]) -> list[dict[str, Any]]:
    import sparsestore
    from sparsestore.mixing import batch_mixing

    store = sparsestore.open(path)
    labels = store.labels[LABEL][:]
    n = labels.shape[0] // BATCH_SIZE * BATCH_SIZE

    def mix(rows: np.ndarray) -> Any:  # full batches against the whole store's mix
        rows = rows[: rows.size // BATCH_SIZE * BATCH_SIZE].reshape(-1, BATCH_SIZE)
        return batch_mixing(rows, labels, against_all_labels=True)

    perm_tv = mix(np.random.default_rng(1).permutation(labels.shape[0])[:n]).tv
    out = []
    for w in worlds:
        for r in range(w):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the poor-mixing warning, reported below
                loader = sparsestore.DataLoader(store, BATCH_SIZE, shuffle=True, seed=0,
                                                rank=r, world_size=w)
                m = mix(loader.epoch_rows(0))
            out.append({"world": w, "rank": r, "TV": m.tv, "x perm": m.tv / perm_tv,
                        "labels/batch": m.distinct, "perm TV": perm_tv})
    return out


NOTE = ("Mean batch label TV of each rank's batches against the whole store's label "
        "histogram, over a true permutation's (`perm TV`); default `shuffle=True` (byte "
        f"budget), batch {BATCH_SIZE}, epoch 0.  Index math only.")
FORMATS = {"TV": "{:.3f}", "x perm": "{:.2f}", "perm TV": "{:.3f}", "labels/batch": "{:.1f}"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_shuffle_ranks",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tenth of the rows")
    p.add_argument("--worlds", default="1,2,3", help="world sizes to score")
    p.add_argument("--stores", default="tall,singlecell",
                   help="bench_shuffle stores: tall fits one unit, singlecell does not")
    add_out_argument(p)
    args = p.parse_args(argv)
    div = 10 if args.quick else 1
    worlds = [int(w) for w in args.worlds.split(",") if w]
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for base in (s for s in STORES if s.name in args.stores.split(",")):
            spec = StoreSpec(base.name, base.n_rows // div, base.n_cols, base.nnz_per_row,
                             base.groups, base.zipf)
            for i, (name, layout) in enumerate(LAYOUTS.items()):
                path = Path(tmp) / f"{spec.name}{i}.zarr"
                facts = write_store(spec, path, **layout)
                records += [{"store": f"{spec.name} ({facts['rows']:,} rows)", "layout": name,
                             **r} for r in measure(path, worlds)]
    meta = run_meta(reproduce_command("benchmarks.bench_shuffle_ranks", p, args,
                                      ("worlds", "stores", "quick")),
                    title="Per-rank shuffle quality", note=NOTE, formats=FORMATS,
                    quick=args.quick, batch_size=BATCH_SIZE)
    return write_records("shuffle_ranks", records, meta, args.out)


if __name__ == "__main__":
    main()
