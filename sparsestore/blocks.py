"""Cutting rows into blocks: one rule for the writer, every source, the checker and the sampler.

:func:`entry_bounds` cuts where ``indptr`` reaches each multiple of ``target_nnz`` (counted
from 0, so the blocks of a stored matrix line up with its ``data`` chunks): a block holds
about ``target_nnz`` entries, at most one row more.  :func:`row_blocks` cuts an in-memory
matrix (scipy sparse of any format, ndarray, memmap) by that rule into CSR or dense row
blocks; nothing is sized by the declared row count but the blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

from .canonical import check_row_count
from .chunks import range_positions
from .errors import InvalidInputError

Block = tuple[int, int, Any]  # (first row, stop row, scipy CSR or dense ndarray)

# Rows per block at most, whatever the entries: a block's indptr (8 bytes a row) stays
# small even when the matrix declares far more rows than it has entries.
MAX_BLOCK_ROWS = 2**20


def cap_block_rows(bounds: np.ndarray, max_rows: int) -> np.ndarray:
    """Split blocks longer than ``max_rows`` rows into near-equal pieces (vectorised)."""
    bounds = np.asarray(bounds, dtype=np.int64)
    if bounds.size < 2:
        return bounds
    lengths = np.diff(bounds)
    pieces = np.maximum(1, -(-lengths // max_rows))
    if (pieces == 1).all():
        return bounds
    # Extra cut j of block i (j = 1..pieces-1) at start + j * length // pieces.
    extra = pieces - 1
    blk = np.repeat(np.arange(lengths.size), extra)
    j = range_positions(np.ones(lengths.size, np.int64), pieces)
    cuts = bounds[:-1][blk] + j * lengths[blk] // pieces[blk]
    return np.union1d(bounds, cuts)


def entry_bounds(
    indptr: Any, target_nnz: int, max_rows: int | None = None, *, ends: bool = True
) -> np.ndarray:
    """Row boundaries ``[0, ..., n]`` of the ``n`` rows ``indptr`` describes, one at the first
    row where ``indptr`` reaches each multiple of ``target_nnz`` above ``indptr[0]``, blocks
    split to at most ``max_rows`` rows.

    ``ends=False``: only those cuts (no ``0``/``n``, no row cap), for an ``indptr`` read piece
    by piece (see :func:`sparsestore.sampler.bounds_from_indptr`).
    """
    if target_nnz < 1:
        raise InvalidInputError(f"target_nnz must be positive, got {target_nnz}")
    ptr = np.asarray(indptr, dtype=np.int64)
    if ptr.size == 0:
        return np.zeros(1 if ends else 0, dtype=np.int64)
    first, last = int(ptr[0]) // target_nnz + 1, int(ptr[-1]) // target_nnz
    targets = np.arange(first, last + 1, dtype=np.int64) * target_nnz
    cuts = np.searchsorted(ptr, targets, side="left")
    if not ends:
        return np.unique(cuts)
    bounds = np.unique(np.concatenate([[0], cuts, [ptr.size - 1]]).astype(np.int64))
    return bounds if max_rows is None else cap_block_rows(bounds, max_rows)


def _max_rows(target_nnz: int) -> int:
    """Rows per block: a block's indptr no bigger than about twice its entries' bytes."""
    return max(1, min(MAX_BLOCK_ROWS, target_nnz // 4))


def csr_views(
    X: sp.csr_matrix, target_nnz: int, max_rows: int | None = None
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """``(a, b, X[a:b])`` cut by :func:`entry_bounds`, each block viewing ``X``'s arrays (no
    copy of values or indices); ``X`` itself when one block holds it all."""
    n = X.shape[0]
    bounds = entry_bounds(X.indptr, target_nnz, max_rows)
    if bounds.size <= 2:
        yield 0, n, X
        return
    ptr = X.indptr
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        lo, hi = int(ptr[a]), int(ptr[b])
        yield a, b, sp.csr_matrix(
            (_view(X.data, lo, hi), _view(X.indices, lo, hi), ptr[a : b + 1] - lo),
            shape=(b - a, X.shape[1]), copy=False)


def _view(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``a[lo:hi]`` as a view scipy keeps: it copies a slice of a much larger ndarray (its
    ``_prune_array``), not one whose base is a memoryview."""
    if isinstance(a, np.ndarray) and a.ndim == 1 and a.flags.c_contiguous and a.size:
        try:
            return np.asarray(memoryview(a)[lo:hi])
        except (TypeError, ValueError):  # a dtype memoryview cannot express
            pass
    return a[lo:hi]


def row_blocks(
    X: Any, *, target_nnz: int = 8 * 2**20, target_bytes: int = 64 * 2**20
) -> Iterator[Block]:
    """Row blocks of an in-memory matrix: scipy sparse (any format), ndarray or memmap."""
    if sp.issparse(X):
        return scipy_row_blocks(X, target_nnz=target_nnz)
    if isinstance(X, np.ndarray) or hasattr(X, "__array__"):
        return dense_row_blocks(X, target_bytes=target_bytes)
    raise InvalidInputError(
        f"cannot store an object of type {type(X).__name__}; pass a scipy.sparse matrix, a "
        "2-D numpy array or memmap, or use sparsestore.convert for files"
    )


def matrix_shape(X: Any) -> tuple[int, int]:
    """``(n_rows, n_cols)`` of a 2-D matrix-like object."""
    shape = getattr(X, "shape", None)
    if shape is None:
        X = np.asarray(X)
        shape = X.shape
    if len(shape) != 2:
        raise InvalidInputError(f"expected a 2-D matrix, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def scipy_row_blocks(
    X: sp.spmatrix | sp.sparray, *, target_nnz: int = 8 * 2**20
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Yield ``(a, b, X[a:b] as CSR)`` with about ``target_nnz`` stored entries each.

    CSR input is sliced (copies: the writer may change a block in place).  Other formats go
    through COO cut by :func:`coo_row_blocks`, so a declared shape the entries do not fill
    costs no memory (and more rows than :func:`~sparsestore.canonical.check_row_count`
    allows are refused).
    """
    if X.ndim != 2:
        raise InvalidInputError(f"expected a 2-D matrix, got {X.ndim}-D")
    n_rows, n_cols = X.shape
    if X.format == "csr":
        if n_rows == 0:
            yield 0, 0, sp.csr_matrix(X[0:0])
            return
        bounds = entry_bounds(X.indptr, target_nnz, _max_rows(target_nnz))
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            yield a, b, sp.csr_matrix(X[a:b])
        return
    check_row_count(n_rows, X.nnz, f"a {X.format} matrix of shape {n_rows}x{n_cols}")
    coo = X.tocoo()
    yield from coo_row_blocks(coo.row, coo.col, coo.data, (n_rows, n_cols),
                              target_nnz=target_nnz)


def coo_row_blocks(
    row: Any, col: Any, data: Any, shape: tuple[int, int], *, target_nnz: int,
    max_rows: int | None = None, rows_sorted: bool = False,
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """COO entries as ``(a, b, csr)`` row blocks covering rows ``0..n_rows`` in order.

    Cut by :func:`entry_bounds` over the rows that hold entries, so each block holds about
    ``target_nnz`` entries (one row more at most) and at most ``max_rows`` rows (default:
    ``target_nnz // 4``, capped at ``MAX_BLOCK_ROWS``): memory follows the entries and the
    block size, never the row count.  Duplicates are summed.  ``rows_sorted``: ``row`` is
    already in ascending order (no argsort).
    """
    n_rows, n_cols = int(shape[0]), int(shape[1])
    step = _max_rows(target_nnz) if max_rows is None else max(1, int(max_rows))
    rows, cols, vals = np.asarray(row), np.asarray(col), np.asarray(data)
    order = None if rows_sorted else np.argsort(rows, kind="stable")
    if order is not None:
        rows = rows[order]
    if n_rows == 0:
        yield 0, 0, sp.csr_matrix((0, n_cols), dtype=vals.dtype)
        return
    # The indptr of the rows holding entries; a cut before the k-th of them is at its row.
    present, starts = np.unique(rows, return_index=True)
    cuts = entry_bounds(np.append(starts, rows.size), target_nnz, ends=False)
    marks = np.append(present, n_rows)[cuts]
    bounds = np.unique(np.concatenate([[0], marks, [n_rows]]).astype(np.int64))
    bounds = cap_block_rows(bounds, step)
    edges = np.searchsorted(rows, bounds, side="left")
    for k in range(bounds.size - 1):
        a, b, s, e = int(bounds[k]), int(bounds[k + 1]), int(edges[k]), int(edges[k + 1])
        sel: Any = slice(s, e) if order is None else order[s:e]
        block = sp.coo_matrix(
            (vals[sel], (rows[s:e] - np.int64(a), cols[sel])), shape=(b - a, n_cols)
        )
        yield a, b, block.tocsr()


def dense_row_blocks(
    X: Any, *, target_bytes: int = 64 * 2**20
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(a, b, np.asarray(X[a:b]))`` with about ``target_bytes`` per block, so a
    memmap is never loaded whole."""
    shape = getattr(X, "shape", None)
    if shape is None:
        X = np.asarray(X)
        shape = X.shape
    if len(shape) != 2:
        raise InvalidInputError(f"expected a 2-D matrix, got an array of shape {tuple(shape)}")
    n_rows, n_cols = int(shape[0]), int(shape[1])
    itemsize = np.dtype(X.dtype).itemsize
    step = max(1, target_bytes // max(1, n_cols * itemsize))
    if n_rows == 0:
        yield 0, 0, np.asarray(X[0:0])
        return
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        yield a, b, np.asarray(X[a:b])


__all__ = [
    "MAX_BLOCK_ROWS",
    "Block",
    "cap_block_rows",
    "coo_row_blocks",
    "csr_views",
    "dense_row_blocks",
    "entry_bounds",
    "matrix_shape",
    "row_blocks",
    "scipy_row_blocks",
]
