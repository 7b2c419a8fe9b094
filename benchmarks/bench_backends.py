"""JAX and PyTorch backends against each framework's own in-memory idiom, interleaved in one
process (the fairest comparison on a shared machine).

* JAX: ``DataLoader(store, backend="jax")`` (BCOO batches, sequential and shuffled) against
  ``jax.experimental.sparse.bcoo_slice`` of a BCOO holding the whole matrix in memory.
* PyTorch: ``SparseIterableDataset`` through ``torch.utils.data.DataLoader(batch_size=None)``
  (CSR batches, sequential and shuffled, no workers) against a ``DataLoader`` over the whole
  matrix in memory (a coalesced COO tensor: torch 2.13 has no CSR ``index_select`` on CPU)
  whose batches are ``index_select(0, ids).to_sparse_csr()`` (contiguous or shuffled ids).

Both also face a hand-written in-memory upper bound: contiguous slices of the CSR parts
wrapped as the framework's sparse batch (no loader, no decoding, no shuffling).

Each round times one pass of each case, in turn; a case stops at ``--budget`` seconds
(rows/s then counts the rows it delivered).  Medians over the rounds go to
``backends.json``/``.md`` in ``--out`` (default ``benchmarks/out``)::

    python -m benchmarks.bench_backends [--rows 100000 --cols 10000 --nnz-per-row 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

import sparsestore

from .common import add_out_argument, reproduce_command
from .records import run_meta, write_records

BATCH = 1024


def synthetic(n_rows: int, n_cols: int, per_row: int, seed: int = 0) -> sp.csr_matrix:
    """A random float32 CSR with ``per_row`` non-zeros per row on average (canonical)."""
    rng = np.random.default_rng(seed)
    return sp.random(n_rows, n_cols, density=per_row / n_cols, format="csr", dtype=np.float32,
                     random_state=rng)


def timed_pass(make: Callable[[], Iterator[Any]], sync: Callable[[Any], Any] | None,
               budget: float) -> tuple[int, float]:
    """Rows delivered by one pass (cut at ``budget`` seconds) and the seconds taken, the
    last batch waited for by ``sync`` (a framework that computes asynchronously)."""
    it = make()
    rows, last = 0, None
    t0 = time.perf_counter()
    for item in it:
        rows += int(item.shape[0])
        last = item
        if time.perf_counter() - t0 > budget:
            break
    if last is not None and sync is not None:
        sync(last)
    dt = time.perf_counter() - t0
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return rows, dt


def jax_cases(store: sparsestore.SparseStore, X: sp.csr_matrix) -> dict[str, tuple]:
    """JAX cases: (iterator factory, wait-for-device)."""
    import jax
    from jax.experimental import sparse as jsparse

    full = jsparse.BCOO.from_scipy_sparse(X)
    n, m = X.shape

    def in_memory() -> Iterator[Any]:
        for i in range(0, n, BATCH):
            yield jsparse.bcoo_slice(full, start_indices=(i, 0),
                                     limit_indices=(min(i + BATCH, n), m))

    def scipy_slices() -> Iterator[Any]:  # hand-written: numpy slicing of the CSR parts
        ip = X.indptr
        for i in range(0, n, BATCH):
            j = min(i + BATCH, n)
            a, b = ip[i], ip[j]
            rows_ = np.repeat(np.arange(j - i, dtype=np.int32), np.diff(ip[i:j + 1]))
            coords = np.stack([rows_, X.indices[a:b]], axis=1)
            data, coords = jax.device_put((X.data[a:b], coords))
            yield jsparse.BCOO((data, coords), shape=(j - i, m), indices_sorted=True,
                               unique_indices=True)

    seq = sparsestore.DataLoader(store, BATCH, backend="jax")
    shuf = sparsestore.DataLoader(store, BATCH, shuffle=True, seed=0, backend="jax")

    def sync(x: Any) -> None:
        jax.block_until_ready(x.data)

    return {
        "jax_in_memory_bcoo_slice": (in_memory, sync),
        "jax_in_memory_csr_hand_slices": (scipy_slices, sync),
        "jax_ours_sequential": (seq.__iter__, sync),
        "jax_ours_shuffled": (shuf.__iter__, sync),
    }


def torch_cases(store: sparsestore.SparseStore, X: sp.csr_matrix) -> dict[str, tuple]:
    """PyTorch cases: (iterator factory, no sync)."""
    import sparsestore.adapters.torch as sstorch
    import torch

    coo = X.tocoo()
    full = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([coo.row, coo.col]).astype(np.int64)),
        torch.from_numpy(coo.data), size=X.shape).coalesce()

    class InMemory(torch.utils.data.Dataset):
        """Rows of the in-memory tensor; one ``index_select`` per batch."""

        def __len__(self) -> int:
            return X.shape[0]

        def __getitems__(self, ids: list[int]) -> Any:
            return full.index_select(0, torch.as_tensor(ids)).to_sparse_csr()

    def csr_slices() -> Iterator[Any]:  # hand-written: slices of the in-memory CSR parts
        crow, col = torch.from_numpy(X.indptr.astype(np.int64)), torch.from_numpy(
            X.indices.astype(np.int64))
        vals, n = torch.from_numpy(X.data), X.shape[0]
        for i in range(0, n, BATCH):
            j = min(i + BATCH, n)
            a, b = int(crow[i]), int(crow[j])
            yield torch.sparse_csr_tensor(crow[i:j + 1] - a, col[a:b], vals[a:b],
                                          size=(j - i, X.shape[1]), check_invariants=False)

    def mem_loader(shuffle: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(InMemory(), batch_size=BATCH, shuffle=shuffle,
                                           collate_fn=sstorch.collate_batches)

    def ours(shuffle: bool) -> torch.utils.data.DataLoader:
        loader = sparsestore.DataLoader(store, BATCH, shuffle=shuffle, seed=0)
        return torch.utils.data.DataLoader(sstorch.SparseIterableDataset(loader),
                                           batch_size=None)

    return {
        "torch_in_memory_index_select": (mem_loader(False).__iter__, None),
        "torch_in_memory_index_select_shuffled": (mem_loader(True).__iter__, None),
        "torch_in_memory_csr_hand_slices": (csr_slices, None),
        "torch_ours_sequential": (ours(False).__iter__, None),
        "torch_ours_shuffled": (ours(True).__iter__, None),
    }


RATIOS = {
    "jax_sequential_vs_in_memory": ("jax_ours_sequential", "jax_in_memory_bcoo_slice"),
    "jax_shuffled_vs_in_memory": ("jax_ours_shuffled", "jax_in_memory_bcoo_slice"),
    "jax_sequential_vs_hand_slices": ("jax_ours_sequential", "jax_in_memory_csr_hand_slices"),
    "torch_sequential_vs_in_memory": ("torch_ours_sequential", "torch_in_memory_index_select"),
    "torch_shuffled_vs_in_memory_shuffled": ("torch_ours_shuffled",
                                             "torch_in_memory_index_select_shuffled"),
    "torch_sequential_vs_hand_slices": ("torch_ours_sequential",
                                        "torch_in_memory_csr_hand_slices"),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--cols", type=int, default=10_000)
    p.add_argument("--nnz-per-row", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", type=float, default=5.0, help="seconds per pass at most")
    add_out_argument(p)
    args = p.parse_args(argv)
    X = synthetic(args.rows, args.cols, args.nnz_per_row)
    with tempfile.TemporaryDirectory() as tmp:
        store = sparsestore.save(Path(tmp) / "bench.zarr", X)
        cases = {**jax_cases(store, X), **torch_cases(store, X)}
        for make, sync in cases.values():  # warm up: compile, fault in, open files
            timed_pass(make, sync, budget=0.5)
        runs: dict[str, list[tuple[int, float]]] = {k: [] for k in cases}
        for _ in range(args.rounds):
            for name, (make, sync) in cases.items():
                runs[name].append(timed_pass(make, sync, args.budget))
    nnz_per_row = X.nnz / X.shape[0]
    results = {}
    for name, rs in runs.items():
        rate = statistics.median(r / s for r, s in rs)
        results[name] = {"rows_per_s": round(rate), "M_nnz_per_s": round(rate * nnz_per_row / 1e6,
                                                                            2),
                         "rows_timed": [r for r, _ in rs],
                         "complete_pass": all(r == X.shape[0] for r, _ in rs)}
    ratios = {k: round(results[a]["rows_per_s"] / results[b]["rows_per_s"], 2)
              for k, (a, b) in RATIOS.items()}
    import jax
    import torch

    meta = run_meta(
        reproduce_command("benchmarks.bench_backends", p, args,
                          ("rows", "cols", "nnz_per_row", "rounds", "budget")),
        matrix={"rows": X.shape[0], "cols": X.shape[1], "nnz": int(X.nnz), "dtype": "float32"},
        batch_size=BATCH, rounds=args.rounds, budget_s=args.budget,
        versions={"jax": jax.__version__, "torch": torch.__version__})
    records = [{"group": "rows/s (median of rounds)", "case": k, **r} for k, r in results.items()]
    records += [{"group": "ratios", "ratio": k, "x": v} for k, v in ratios.items()]
    report = write_records("backends", records, meta, args.out, echo=False)
    for name, r in results.items():
        print(f"{name:40s} {r['rows_per_s']:>10,} rows/s {r['M_nnz_per_s']:>7.2f} M nnz/s"
              f"{'' if r['complete_pass'] else '  (cut at the budget)'}")
    for k, v in ratios.items():
        print(f"{k:40s} {v:.2f}x")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
