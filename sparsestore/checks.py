"""The structural checks every read runs before scipy or a framework sees the data: chunk
sizes a store may declare, row pointers, and column indices (in range, strictly increasing
within each row), plus the record of rows a verified handle has already checked."""

from __future__ import annotations

import bisect
import threading
from typing import Any

import numpy as np

from .errors import CorruptStoreError
from .kernels import index_scan

#: Largest decoded chunk a store may declare: beyond this its metadata is damaged.
MAX_CHUNK_BYTES = 2**31


def check_chunk_size(arr: Any, name: str, where: str) -> None:
    """Refuse chunk shapes whose decoded size is absurd, before anything is allocated."""
    chunks = tuple(int(c) for c in (getattr(arr, "shards", None) or arr.chunks))
    nbytes = int(np.prod(chunks, dtype=object)) * np.dtype(arr.dtype).itemsize
    if nbytes > MAX_CHUNK_BYTES or min(chunks, default=1) < 1:
        raise CorruptStoreError(
            f"{where}: array {name!r} declares chunks of shape {chunks} ({nbytes} bytes "
            "decoded), which no store sparsestore writes has; its zarr.json is damaged"
        )


def check_row_pointers(ptr: np.ndarray, nnz: int, where: str, first_row: int = 0,
                       row_of: np.ndarray | None = None) -> np.ndarray:
    """Refuse ``indptr`` values that are not non-decreasing within ``[0, nnz]`` (before
    scipy, or an index into ``data``, sees them); returns ``ptr``.  ``row_of`` maps a
    position in ``ptr`` to its row when they are not consecutive."""
    if ptr.size and (
        int(ptr[0]) < 0 or int(ptr[-1]) > nnz or (ptr.size > 1 and (np.diff(ptr) < 0).any())
    ):
        bad = np.flatnonzero(np.diff(ptr) < 0) if ptr.size > 1 else np.empty(0)
        pos = int(bad[0]) if bad.size else 0
        row = int(row_of[pos]) if row_of is not None else first_row + pos
        raise CorruptStoreError(
            f"{where}: indptr is damaged near row {row} (values must rise from 0 to nnz={nnz}, "
            f"got {ptr[:4].tolist()}...); restore the store from a copy"
        )
    return ptr


class CheckedRows:
    """Row ranges whose column indices already passed :func:`check_column_indices` through
    one handle of a verified store: their chunks cannot change under the handle (every read
    is checked against the manifest), so later passes skip the scan.  Thread-safe; adjacent
    ranges merge, so it holds at most one range per block ever read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._ends: list[int] = []

    def covers(self, a: int, b: int) -> bool:
        with self._lock:
            i = bisect.bisect_right(self._starts, a) - 1
            return i >= 0 and self._ends[i] >= b

    def add(self, a: int, b: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts, a)
            j = bisect.bisect_right(self._starts, b)
            if i > 0 and self._ends[i - 1] >= a:  # touches the range before
                i -= 1
            if i < j:
                a, b = min(a, self._starts[i]), max(b, self._ends[j - 1])
            self._starts[i:j], self._ends[i:j] = [a], [b]


def check_column_indices(indices: np.ndarray, ptr: np.ndarray, n_cols: int, where: str,
                         first_row: int = 0, row_of: np.ndarray | None = None,
                         chunk: int = 0) -> None:
    """Refuse column indices outside ``[0, n_cols)`` or not strictly increasing in a row.

    The first make scipy read out of bounds and JAX drop entries; the second (unsorted or
    duplicated) break what every reader trusts: scipy's canonical flag, torch's coalesced
    COO, JAX's sorted BCOO, TensorFlow's row-major order.  One fused pass over the indices
    just read (:func:`~sparsestore.kernels.index_scan`).  ``ptr`` holds the rows' pointers
    (int64), ``ptr[0]`` at ``indices[0]``; rows are ``first_row + i``, or ``row_of[i]``.
    With ``chunk`` (the indices array's chunk length) ``ptr`` holds the store's positions,
    and the message names the indices chunk.
    """
    if indices.size == 0:
        return
    ptr = np.asarray(ptr, dtype=np.int64)
    lo, hi, descents = index_scan(indices, ptr)
    if lo >= 0 and hi < n_cols and descents == 0:
        return
    # Rare: find the first bad entry, and what is wrong with it.
    local = ptr - ptr[0]
    ind = indices.astype(np.int64, copy=False)
    out = np.flatnonzero((ind < 0) | (ind >= n_cols))
    starts = np.zeros(ind.size, dtype=bool)
    starts[local[:-1][local[:-1] < ind.size]] = True
    down = np.flatnonzero((ind[1:] <= ind[:-1]) & ~starts[1:]) + 1
    j = min(int(out[0]) if out.size else ind.size, int(down[0]) if down.size else ind.size)
    i = int(np.searchsorted(local, j, side="right")) - 1
    row = int(row_of[i]) if row_of is not None else first_row + i
    place = f" (indices chunk {(int(ptr[0]) + j) // chunk})" if chunk else ""
    if out.size and int(out[0]) == j:
        what = f"has column index {int(ind[j])}, outside [0, {n_cols})"
    else:
        what = (f"has column indices that are not strictly increasing ({int(ind[j - 1])} "
                f"then {int(ind[j])}: unsorted or duplicated)")
    raise CorruptStoreError(
        f"{where}: row {row} {what}{place}; the store is damaged or was written with bad "
        "column indices (by another tool): restore it from a copy, or rewrite it from its "
        "source (sparsestore.convert sorts and sums an anndata matrix's indices); "
        "`sparsestore validate` lists every bad row"
    )
