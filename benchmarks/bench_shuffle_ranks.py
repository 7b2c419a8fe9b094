"""Per-rank shuffle quality: each rank's batches against the whole store's label mix.

``python -m benchmarks.bench_shuffle_ranks [--quick] [--out DIR]``

A rank's share of a shuffled epoch is the blocks dealt to it, one of every ``world_size``
neighbouring blocks, so its label mix follows the store's at block granularity: with few,
large blocks (4 MiB chunks) a rank still misses the labels of the blocks it was not dealt.
This writes bench_shuffle's label-sorted ``tall`` store with the
default chunks and with small chunks in shards, and reports the mean batch total-variation
distance to the whole store's label histogram, per rank, for ``world_size`` 1-3, beside a
true permutation's.  Index math only (``DataLoader.epoch_rows``): no data is decoded.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .bench_shuffle import BATCH_SIZE, STORES, StoreSpec, write_store
from .common import machine_info, reproduce_command, save_results

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
            out.append({"world_size": w, "rank": r, "tv_vs_store": m.tv,
                        "tv_permutation": perm_tv, "ratio": m.tv / perm_tv,
                        "labels_per_batch": m.distinct})
    return out


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Per-rank shuffle quality", "",
        f"Reproduce: `{record['command']}`", "",
        "Mean batch label TV of each rank's batches against the whole store's label "
        "histogram, over a true permutation's; default `shuffle=True` (byte budget), batch "
        f"{BATCH_SIZE}, epoch 0.  Index math only.", "",
        "| store | layout | world | rank | TV | x perm | labels/batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in record["results"]:
        for r in rec["ranks"]:
            lines.append(f"| {rec['store']} | {rec['layout']} | {r['world_size']} | "
                         f"{r['rank']} | {r['tv_vs_store']:.3f} | {r['ratio']:.2f} | "
                         f"{r['labels_per_batch']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_shuffle_ranks",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tenth of the rows")
    p.add_argument("--worlds", default="1,2,3", help="world sizes to score")
    p.add_argument("--out", default=str(Path(__file__).parent / "out"),
                   help="results folder (benchmarks/results to replace the committed ones)")
    args = p.parse_args(argv)
    base = next(s for s in STORES if s.name == "tall")
    div = 10 if args.quick else 1
    spec = StoreSpec(base.name, base.n_rows // div, base.n_cols, base.nnz_per_row,
                     base.groups, base.zipf)
    worlds = [int(w) for w in args.worlds.split(",") if w]
    record: dict[str, Any] = {
        "command": reproduce_command("benchmarks.bench_shuffle_ranks", p, args, ("worlds",))
        + (" --quick" if args.quick else ""),
        "machine": machine_info(), "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, layout in LAYOUTS.items():
            path = Path(tmp) / f"{len(record['results'])}.zarr"
            facts = write_store(spec, path, **layout)
            record["results"].append({"store": f"{spec.name} ({facts['rows']:,} rows)",
                                      "layout": name, "ranks": measure(path, worlds)})
    save_results(record, markdown(record), args.out, "shuffle_ranks")
    return record


if __name__ == "__main__":
    main()
