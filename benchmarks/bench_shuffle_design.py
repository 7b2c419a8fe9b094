"""Shuffle quality against chunk size and buffer budget, by index math alone (no store).

For each store shape (rows x nnz/row, float32 values and int32 indices, rows sorted into
``--groups`` equal label groups), data chunk size and per-unit byte budget, this builds the
loader's shuffled plan (:class:`~sparsestore.sampler.BlockSampler`, one chunk per block),
cuts the rank's stream into batches on its global grid and measures the mean total-variation
distance between each batch's label histogram and the store's, against a seeded
permutation's.  It also counts the chunks each unit decodes (decoded bytes per useful
byte) and the memory a pass holds (two units: the one consumed and the one decoded ahead).

Run ``python -m benchmarks.bench_shuffle_design [--out DIR]``; writes ``shuffle_design.json``
and ``shuffle_design.md``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sparsestore.blocks import entry_bounds
from sparsestore.sampler import BlockSampler, mixing_ratio

from .common import MiB, add_out_argument, reproduce_command
from .records import run_meta, write_records

SHAPES = [(200_000, 20), (200_000, 800), (1_000_000, 20), (1_000_000, 100),
          (1_000_000, 2000), (10_000_000, 30), (10_000_000, 100)]
CHUNKS = [4 * MiB, MiB, 256 * 1024, 128 * 1024]
BUDGETS = [64 * MiB, 128 * MiB, 256 * MiB, 512 * MiB]
ENTRY_BYTES = 8  # float32 value + int32 column index
ROW_BYTES = 8  # int64 row pointer


def batch_tv(rows: np.ndarray, labels_of, n_groups: int, batch: int, n_batches: int) -> float:
    """Mean TV of the first ``n_batches`` full batches of ``rows`` against uniform groups."""
    n_batches = min(n_batches, rows.size // batch)
    lab = labels_of(rows[: n_batches * batch]).reshape(n_batches, batch)
    counts = np.zeros((n_batches, n_groups))
    np.add.at(counts, (np.repeat(np.arange(n_batches), batch), lab.ravel()), 1)
    return float(0.5 * np.abs(counts / batch - 1.0 / n_groups).sum(axis=1).mean())


def measure(n: int, nnz_row: int, chunk_bytes: int, unit_bytes: int, *, batch: int,
            groups: int, n_batches: int, seed: int = 0) -> dict:
    chunk_len = chunk_bytes // 4
    indptr_at = np.arange(n + 1, dtype=np.int64) * nnz_row  # same nnz in every row
    bounds = entry_bounds(indptr_at, chunk_len, max_rows=1 << 18)
    rows_per_block = np.diff(bounds)
    block_bytes = rows_per_block * (nnz_row * ENTRY_BYTES + ROW_BYTES)
    s = BlockSampler(bounds, shuffle=True, seed=seed, unit_bytes=unit_bytes,
                     block_bytes=block_bytes)
    plan = s.plan(0)
    per_unit = plan.blocks_per_unit

    def labels_of(r: np.ndarray) -> np.ndarray:
        return (r * groups // n).astype(np.int64)

    # The first units' rows in emission order, up to n_batches batches (the grid starts at 0).
    need = n_batches * batch
    got, have, u = [], 0, 0
    while have < need and u < plan.n_units:
        r = plan.unit(u).rows
        got.append(r)
        have += r.size
        u += 1
    stream = np.concatenate(got)
    tv = batch_tv(stream, labels_of, groups, batch, n_batches)
    perm = np.random.default_rng([seed, 1]).permutation(n)[:need]
    tv_perm = batch_tv(perm, labels_of, groups, batch, n_batches)
    # Decoded chunks, as the reader decodes them: a unit decodes each chunk its blocks touch
    # once, unless an earlier unit decoded it and this unit needs only a piece of at most a
    # quarter chunk (the row at a block edge), which that unit kept for it.
    lo_at = indptr_at[plan._starts]
    hi_at = indptr_at[plan._ends]
    seen = np.zeros(-(-n * nnz_row // chunk_len), bool)
    decoded = 0
    for a, b in zip(plan.unit_cuts[:-1], plan.unit_cuts[1:], strict=True):
        need: dict[int, int] = {}  # chunk -> elements this unit reads of it
        for lo, hi in zip(lo_at[a:b].tolist(), hi_at[a:b].tolist(), strict=True):
            for k in range(lo // chunk_len, (max(hi, lo + 1) - 1) // chunk_len + 1):
                part = min(hi, (k + 1) * chunk_len) - max(lo, k * chunk_len)
                need[k] = need.get(k, 0) + part
        for k, part in need.items():
            if not seen[k] or part > chunk_len // 4:
                decoded += 1
            seen[k] = True
    n_chunks = -(-n * nnz_row // chunk_len)
    total_bytes = int(block_bytes.sum())
    unit_real = max(int(block_bytes[:1].sum()), min(unit_bytes, total_bytes))
    return dict(
        rows=n, nnz_row=nnz_row, chunk=chunk_bytes, budget=unit_bytes,
        blocks=s.n_blocks, units=plan.n_units, blocks_per_unit=float(np.median(per_unit)),
        tv=tv, tv_perm=tv_perm, ratio=tv / tv_perm,
        predicted=1.0 if plan.n_units == 1 else mixing_ratio(np.median(per_unit), batch),
        decoded_per_useful=decoded / n_chunks,
        memory=min(2, plan.n_units) * unit_real + 6 * chunk_bytes * 2,
    )


def _size(b: int) -> str:
    return f"{b // MiB} MiB" if b >= MiB else f"{b // 1024} KiB"


FORMATS = {k: "{:.2f}" for k in ("TV x", "pred.", "decode x", "worst TV x", "worst decode x")}
FORMATS.update({k: "{:.0f}" for k in ("blocks/unit", "memory MiB", "memory MiB (at most)")})


def to_records(results: list[dict]) -> list[dict]:
    """The worst case of each chunk size and budget over the shapes, then a table per shape."""
    out = []
    for c in CHUNKS:
        for b in BUDGETS:
            sub = [r for r in results if r["chunk"] == c and r["budget"] == b]
            out.append({"group": "Summary: worst case over the shapes below", "chunk": _size(c),
                        "budget/unit": _size(b), "worst TV x": max(r["ratio"] for r in sub),
                        "worst decode x": max(r["decoded_per_useful"] for r in sub),
                        "memory MiB (at most)": max(r["memory"] for r in sub) / MiB})
    for r in results:
        gb = r["rows"] * r["nnz_row"] * ENTRY_BYTES / 1e9
        out.append({"group": f"{r['rows'] / 1e6:g}M rows x {r['nnz_row']} nnz/row "
                             f"({gb:.2f} GB decoded)",
                    "chunk": _size(r["chunk"]), "budget/unit": _size(r["budget"]),
                    "blocks": r["blocks"], "blocks/unit": r["blocks_per_unit"],
                    "units": r["units"], "TV x": r["ratio"], "pred.": r["predicted"],
                    "decode x": r["decoded_per_useful"], "memory MiB": r["memory"] / MiB,
                    "TV": r["tv"], "perm TV": r["tv_perm"]})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_shuffle_design",
                                 description=__doc__.splitlines()[0])
    add_out_argument(ap)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--batches", type=int, default=100, help="batches measured per case")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = [
        measure(n, k, c, b, batch=args.batch, groups=args.groups, n_batches=args.batches)
        for n, k in SHAPES for c in CHUNKS for b in BUDGETS
    ]
    note = (f"Index math only ({time.perf_counter() - t0:.0f} s): rows sorted into "
            f"{args.groups} equal label groups, batch {args.batch}, float32 values + int32 "
            "indices, one data chunk per block, the first units of epoch 0 on one rank. `TV x` "
            f"is the mean batch TV over a seeded permutation's (first {args.batches} batches; "
            "within 1.25x reads as 'like a permutation'); `pred.` is `sampler.mixing_ratio` of "
            "the median blocks per unit (what the loader's warning uses). `decode x`: chunks "
            "decoded per pass over chunks in the store. `memory`: two units (consumed + decoded "
            "ahead; one when the share is one unit) plus the chunk caches (6 data+indices "
            "chunks).")
    meta = run_meta(reproduce_command("benchmarks.bench_shuffle_design", ap, args,
                                      ("batch", "groups", "batches")),
                    title="Shuffle design: chunk size x buffer budget -> batch label quality",
                    note=note, formats=FORMATS, batch_size=args.batch, groups=args.groups,
                    batches=args.batches)
    return write_records("shuffle_design", to_records(results), meta, args.out)


if __name__ == "__main__":
    main()
