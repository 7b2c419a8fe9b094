"""scipy.sparse inputs of any format, cut into CSR row blocks of bounded nnz."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from ..errors import InvalidInputError


def scipy_row_blocks(
    X: sp.spmatrix | sp.sparray, *, target_nnz: int = 8 * 2**20
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Yield ``(a, b, X[a:b] as CSR)`` with roughly ``target_nnz`` stored entries each.

    CSR input is sliced directly.  COO and CSC are reordered by row once (a stable argsort
    of the row indices, no dense intermediate) and cut into blocks; other formats go
    through COO.
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
    coo = X.tocoo()
    rows = np.asarray(coo.row)
    order = np.argsort(rows, kind="stable")
    rows_sorted = rows[order]
    starts = np.searchsorted(rows_sorted, np.arange(n_rows + 1), side="left").astype(np.int64)
    bounds = _bounds(starts, n_rows, target_nnz)
    cols, data = np.asarray(coo.col), np.asarray(coo.data)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        s, e = starts[a], starts[b]
        sel = order[s:e]
        block = sp.coo_matrix(
            (data[sel], (rows_sorted[s:e] - a, cols[sel])), shape=(int(b - a), n_cols)
        )
        yield int(a), int(b), block.tocsr()


def _bounds(indptr: np.ndarray, n_rows: int, target_nnz: int) -> np.ndarray:
    """Row boundaries so each block holds about ``target_nnz`` entries (at least 1 row)."""
    nnz = int(indptr[-1]) if indptr.size else 0
    if n_rows == 0:
        return np.array([0, 0], dtype=np.int64)
    marks = np.searchsorted(indptr, np.arange(target_nnz, nnz, target_nnz), side="left")
    bounds = np.unique(np.concatenate([[0], marks, [n_rows]]).clip(0, n_rows))
    # Also bound the row count, so very sparse inputs do not make one huge indptr block.
    max_rows = max(1, target_nnz // 4)
    out = [int(bounds[0])]
    for b in bounds[1:]:
        while int(b) - out[-1] > max_rows:
            out.append(out[-1] + max_rows)
        out.append(int(b))
    return np.asarray(out, dtype=np.int64)
