"""scipy.sparse inputs of any format, cut into CSR row blocks of bounded nnz and rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..canonical import check_row_count
from ..errors import InvalidInputError

# Rows per block at most, whatever the entries: a block's indptr (8 bytes a row) stays
# small even when the matrix declares far more rows than it has entries.
MAX_BLOCK_ROWS = 2**20


def _max_rows(target_nnz: int) -> int:
    """Rows per block: a block's indptr no bigger than about twice its entries' bytes."""
    return max(1, min(MAX_BLOCK_ROWS, target_nnz // 4))


def scipy_row_blocks(
    X: sp.spmatrix | sp.sparray, *, target_nnz: int = 8 * 2**20
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Yield ``(a, b, X[a:b] as CSR)`` with roughly ``target_nnz`` stored entries each.

    CSR input is sliced directly.  Other formats go through COO, reordered by row once (a
    stable argsort of the row indices) and cut by :func:`coo_row_blocks`: nothing is sized
    by the row count but the blocks, so a declared shape the entries do not fill costs no
    memory (and more rows than :func:`~sparsestore.canonical.check_row_count` allows are
    refused).
    """
    if X.ndim != 2:
        raise InvalidInputError(f"expected a 2-D matrix, got {X.ndim}-D")
    n_rows, n_cols = X.shape
    if X.format == "csr":
        indptr = np.asarray(X.indptr, dtype=np.int64)
        bounds = _bounds(indptr, n_rows, target_nnz)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            yield int(a), int(b), sp.csr_matrix(X[a:b])
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

    Each block holds at most ``target_nnz`` entries (unless one row holds more) and at most
    ``max_rows`` rows (default: ``target_nnz // 4``, capped at ``MAX_BLOCK_ROWS``), so
    memory follows the entries and the block size, never the row count.  Duplicates are
    summed.  ``rows_sorted``: ``row`` is already in ascending order (no argsort).
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
    nnz = rows.size
    a = s = 0
    while a < n_rows:
        b = min(n_rows, a + step)
        if s + target_nnz < nnz:  # the entry past the budget starts the next block
            b = min(b, max(a + 1, int(rows[s + target_nnz])))
        e = s + int(np.searchsorted(rows[s:], b, side="left"))
        sel: Any = slice(s, e) if order is None else order[s:e]
        block = sp.coo_matrix(
            (vals[sel], (rows[s:e] - np.int64(a), cols[sel])), shape=(b - a, n_cols)
        )
        yield a, b, block.tocsr()
        a, s = b, e


def _bounds(indptr: np.ndarray, n_rows: int, target_nnz: int) -> np.ndarray:
    """Row boundaries so each block holds about ``target_nnz`` entries (at least 1 row)."""
    nnz = int(indptr[-1]) if indptr.size else 0
    if n_rows == 0:
        return np.array([0, 0], dtype=np.int64)
    marks = np.searchsorted(indptr, np.arange(target_nnz, nnz, target_nnz), side="left")
    bounds = np.unique(np.concatenate([[0], marks, [n_rows]]).clip(0, n_rows))
    # Also bound the row count, so very sparse inputs do not make one huge indptr block.
    max_rows = _max_rows(target_nnz)
    out = [int(bounds[0])]
    for b in bounds[1:]:
        while int(b) - out[-1] > max_rows:
            out.append(out[-1] + max_rows)
        out.append(int(b))
    return np.asarray(out, dtype=np.int64)
