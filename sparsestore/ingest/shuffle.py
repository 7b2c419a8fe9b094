"""Shuffle once on write: a store's rows in a seeded random order, as a :class:`Source`.

A store written with its rows permuted at random mixes under a cheap sequential or block
shuffle like a true permutation does, so users who want the most speed shuffle once, when
they write it.  The new store's row ``i`` is the source's row ``perm[i]``, with
``perm = np.random.default_rng(seed).permutation(n_rows)``; every label is permuted the
same way, and ``perm`` itself is stored as one more label so the original order can be
recovered.

The source must be a sparsestore store (random row access); :func:`sparsestore.convert`
first writes any other format to a temporary store.  Output rows are produced in blocks
sized from a memory budget: a block's rows ``perm[a:b]``, sorted, are read window by
window of the source (each window's chunks decoded once, so only a window's decoded
chunks are held at a time), then put in ``perm[a:b]`` order.  A block of random rows
touches almost every chunk of the source, so the cost is about (number of output blocks)
x (one full decode of the source): a bigger budget means fewer, cheaper passes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..errors import InvalidInputError, LabelError
from ..layout import check_label_name
from .base import BlockPair, IndptrView, Source, row_bounds

DEFAULT_SOURCE_ROW_LABEL = "source_row"
# Of the memory budget: an output block's rows (held twice while they are reordered, and
# copied once more by the writer's canonical checks) take a quarter, a window of decoded
# source chunks an eighth; the rest is headroom for the writer's chunk buffers.
_BLOCK_SHARE = 4
_WINDOW_SHARE = 8


def check_seed(seed: Any) -> int:
    """``seed`` as a non-negative int (what :func:`numpy.random.default_rng` accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"shuffle_rows must be a non-negative integer seed, got {seed!r}")
    return int(seed)


def row_permutation(n_rows: int, seed: int) -> np.ndarray:
    """The permutation a shuffled convert applies: new row ``i`` is source row ``perm[i]``."""
    return np.random.default_rng(check_seed(seed)).permutation(n_rows).astype(np.int64)


def check_source_row_label(name: Any, labels: Sequence[str]) -> None:
    """Refuse an unusable name, or one the copied labels already use."""
    check_label_name(name)
    if name in labels:
        raise LabelError(
            f"the source already has a label named {name!r}; the shuffled store records the "
            "permutation as a label, so name it otherwise (source_row_label=, or "
            "--source-row-label), or leave that label out (labels=)"
        )


def plan_blocks(store: Any, labels: Sequence[str], memory_bytes: int) -> tuple[int, int]:
    """``(rows per output block, entries per source window)`` for ``memory_bytes``.

    A block's size is estimated from the mean row (entries, labels and the recorded
    permutation): random rows average out, so blocks stay near the budget unless a few
    rows hold most of the matrix.
    """
    if memory_bytes < 1:
        raise InvalidInputError(f"memory_bytes must be positive, got {memory_bytes}")
    n = max(1, store.n_rows)
    per_row = 8.0 + sum(
        store.labels[k].dtype.itemsize * int(np.prod(store.labels[k].shape[1:], dtype=np.int64))
        for k in labels
    )
    if store.is_dense:
        entry = store.dtype.itemsize
        per_row += store.n_cols * entry
        chunk = 1
    else:
        entry = store.dtype.itemsize + store.arrays["indices"].dtype.itemsize
        per_row += 8 + entry * store.nnz / n
        chunk = int(store.arrays["indices"].chunks[0])
    rows = max(1, int(memory_bytes // _BLOCK_SHARE / per_row))
    # A window smaller than a chunk would decode its chunks again in the next window.
    window = max(chunk, int(memory_bytes // _WINDOW_SHARE // entry))
    return rows, window


def _window_bounds(store: Any, window: int) -> np.ndarray:
    """Source row boundaries ``[0, ..., n_rows]`` cutting windows of about ``window``
    entries (dense stores: ``window`` values), read from ``indptr`` piece by piece."""
    n = store.n_rows
    if store.is_dense:
        step = max(1, window // max(1, store.n_cols))
        return np.append(np.arange(0, n, step, dtype=np.int64), n)
    ends = [b for _, b in row_bounds(IndptrView(store), n, target_nnz=window)]
    return np.array([0, *ends], dtype=np.int64)


def read_sorted_rows(store: Any, rows: np.ndarray, bounds: np.ndarray) -> Any:
    """Sorted unique ``rows`` of ``store`` (scipy CSR, or numpy for a dense store), read one
    source window (``bounds``) at a time so only that window's chunks are decoded at once."""
    cuts = np.searchsorted(rows, bounds)
    pieces = [rows[p:q] for p, q in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True)
              if q > p]
    if store.is_dense:
        if not pieces:
            return np.empty((0, store.n_cols), dtype=store.dtype)
        return np.concatenate([store[r] for r in pieces])
    vals, ind, lens = [], [], []
    for r in pieces:
        v, j, p = store.take_parts(r)
        vals.append(v)
        ind.append(j)
        lens.append(np.diff(p))
    ptr = np.zeros(rows.size + 1, dtype=np.int64)
    if lens:
        np.cumsum(np.concatenate(lens), out=ptr[1:])
        data, indices = np.concatenate(vals), np.concatenate(ind)
    else:
        data = np.empty(0, store.dtype)
        indices = np.empty(0, store.arrays["indices"].dtype)
    return sp.csr_matrix((data, indices, ptr), shape=(rows.size, store.n_cols))


def shuffled_blocks(
    store: Any, perm: np.ndarray, labels: Sequence[str], source_row_label: str,
    block_rows: int, window: int,
) -> Iterator[BlockPair]:
    """``(rows perm[a:b] of store, their labels + source_row_label)`` for each output block."""
    bounds = _window_bounds(store, window)
    if perm.size == 0:  # no rows, but the labels (source_row too) still get their arrays
        empty = read_sorted_rows(store, perm, bounds)
        yield empty, {**{k: store.labels[k].take(perm) for k in labels},
                      source_row_label: perm.copy()}
    for a in range(0, perm.size, block_rows):
        want = perm[a : a + block_rows]
        order = np.argsort(want, kind="stable")
        block = read_sorted_rows(store, want[order], bounds)
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        block = block[inv]  # sorted row inv[i] is want[i]
        labs = {k: store.labels[k].take(want) for k in labels}
        labs[source_row_label] = want.copy()
        yield block, labs


def shuffled_store_source(
    path: str,
    seed: int,
    *,
    labels: Sequence[str] | None = None,
    source_row_label: str = DEFAULT_SOURCE_ROW_LABEL,
    memory_bytes: int,
    name: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Source:
    """A :class:`Source` of the store at ``path`` (fsspec ``storage_options`` for a URL)
    with its rows in the order
    ``row_permutation(n_rows, seed)``, its labels (all, or ``labels``) permuted alike and
    the permutation recorded as label ``source_row_label`` (int64).

    Holds the permutation (8 bytes a row) and about ``memory_bytes`` of rows at a time;
    costs about ``4 * stored bytes / memory_bytes`` full decodes of the source (see
    :func:`plan_blocks`).
    """
    from ..store import open as open_store

    seed = check_seed(seed)
    st = open_store(path, mode="r", storage_options=storage_options)
    names = list(st.labels) if labels is None else list(labels)
    for k in names:
        if k not in st.labels:
            raise LabelError(f"{path} has no label {k!r}; it has {sorted(st.labels)}")
    check_source_row_label(source_row_label, names)
    block_rows, window = plan_blocks(st, names, memory_bytes)

    def blocks() -> Iterator[BlockPair]:
        src = open_store(path, mode="r", storage_options=storage_options)
        perm = row_permutation(src.n_rows, seed)
        yield from shuffled_blocks(src, perm, names, source_row_label, block_rows, window)

    return Source(name=name or path, n_cols=st.n_cols, dtype=st.dtype, blocks=blocks,
                  n_rows=st.n_rows, labels=[*names, source_row_label], dense=st.is_dense)


__all__ = [
    "DEFAULT_SOURCE_ROW_LABEL",
    "check_seed",
    "check_source_row_label",
    "plan_blocks",
    "read_sorted_rows",
    "row_permutation",
    "shuffled_blocks",
    "shuffled_store_source",
]
