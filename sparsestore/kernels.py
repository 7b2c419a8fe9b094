"""Per-batch numeric kernels shared by the framework adapters.

``coo_into`` writes a CSR batch's COO coordinates (row id, column id per value) into a
caller's buffer.  With numba installed (the ``tf`` extra brings it) this is one compiled
pass that releases the GIL, so several adapter threads build batches at once; without it,
numpy does the same in two passes holding the GIL for part of the time.  Both give the same
bytes; ``ACCELERATED`` says which one runs.

``index_scan`` sums up a CSR block's column indices for the read-side check
(:func:`sparsestore.checks.check_column_indices`) in one pass: numba fuses it, numpy
takes three.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["ACCELERATED", "coo_into", "index_scan"]


def _numpy_coo_into(row_splits: np.ndarray, indices: np.ndarray, coords: np.ndarray) -> None:
    n_rows = row_splits.size - 1
    coords[:, 0] = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(row_splits))
    coords[:, 1] = indices


def _compiled() -> Any:
    """numba's one-pass kernel, or ``None`` where numba is missing, too old for this numpy,
    or switched off (``SPARSESTORE_NO_NUMBA=1``)."""
    if os.environ.get("SPARSESTORE_NO_NUMBA"):
        return None
    try:
        import numba
    except ImportError:  # not installed, or built for another numpy
        return None

    @numba.njit(nogil=True, cache=True)
    def coo_kernel(row_splits: Any, indices: Any, coords: Any) -> None:  # pragma: no cover
        base = row_splits[0]
        for r in range(row_splits.shape[0] - 1):
            for k in range(row_splits[r] - base, row_splits[r + 1] - base):
                coords[k, 0] = r
                coords[k, 1] = indices[k]

    return coo_kernel


_KERNEL = _compiled()
ACCELERATED: bool = _KERNEL is not None


def coo_into(row_splits: np.ndarray, indices: np.ndarray, coords: np.ndarray) -> None:
    """Write ``coords[k] = (row of value k, indices[k])`` for a CSR batch.

    ``row_splits`` (int64, ``n_rows + 1``, may start above 0: the batch's values are then
    ``indices[0:row_splits[-1] - row_splits[0]]``), ``coords`` an int64 ``(nnz, >= 2)``
    array (only its first two columns are written; an int32 one where every row and
    column id fits, as JAX's 32-bit sparse indices want).
    """
    nnz = int(row_splits[-1] - row_splits[0]) if row_splits.size else 0
    if coords.shape[0] != nnz or indices.shape[0] != nnz or coords.ndim != 2:
        raise ValueError(
            f"coo_into: {nnz} values by row_splits, {indices.shape[0]} indices, coords of shape "
            f"{coords.shape}; they must agree"
        )
    if nnz == 0:
        return
    if _KERNEL is None:
        _numpy_coo_into(row_splits - row_splits[0], indices, coords)
    else:
        _KERNEL(np.asarray(row_splits, dtype=np.int64), indices, coords)


def _numpy_index_scan(indices: np.ndarray, ptr: np.ndarray) -> tuple[int, int, int]:
    n = indices.size
    descents = int(np.count_nonzero(indices[1:] <= indices[:-1]))
    if descents:  # those where a (non-empty) row starts are allowed
        starts = ptr[1:-1] - ptr[0]
        starts = starts[(starts > 0) & (starts < n) & (ptr[2:] > ptr[1:-1])]
        descents -= int(np.count_nonzero(indices[starts] <= indices[starts - 1]))
    return int(indices.min()), int(indices.max()), descents


def _compiled_scan() -> Any:
    """numba's fused :func:`index_scan`, or ``None`` (as for :func:`_compiled`)."""
    if os.environ.get("SPARSESTORE_NO_NUMBA"):
        return None
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(nogil=True, cache=True)
    def scan_kernel(indices: Any, ptr: Any) -> Any:  # pragma: no cover
        n = indices.shape[0]
        lo = hi = indices[0]
        descents = 0
        for k in range(1, n):
            v = indices[k]
            lo = min(lo, v)
            hi = max(hi, v)
            descents += v <= indices[k - 1]
        base = ptr[0]
        for r in range(1, ptr.shape[0] - 1):
            s = ptr[r] - base
            if 0 < s < n and ptr[r + 1] > ptr[r]:
                descents -= indices[s] <= indices[s - 1]
        return lo, hi, descents

    return scan_kernel


_SCAN = _compiled_scan()


def index_scan(indices: np.ndarray, ptr: np.ndarray) -> tuple[int, int, int]:
    """``(min, max, descents)`` of non-empty CSR column ``indices``; a descent is a value
    not above the one before it inside a row (unsorted or duplicated).

    ``ptr`` (int64) holds the rows' pointers, ``ptr[0]`` at ``indices[0]``.  Rows hold
    sorted, unique indices in ``[0, n_cols)`` exactly when ``descents == 0``,
    ``min >= 0`` and ``max < n_cols``.
    """
    if _SCAN is None:
        return _numpy_index_scan(indices, ptr)
    lo, hi, descents = _SCAN(indices, ptr)
    return int(lo), int(hi), int(descents)

