"""Reading ranges of 1-D chunked arrays so that each storage chunk is decoded once.

``data`` and ``indices`` are chunked along nnz.  A row selection becomes a list of nnz
ranges; :func:`read_ranges` groups the chunks those ranges touch into contiguous runs,
reads each run with one zarr call (zarr decodes every chunk in it exactly once, in its
threads), and gathers the ranges from the decoded buffers.  :class:`ChunkCache` keeps the
few chunks shared by neighbouring row blocks so a sequential pass decodes each once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from .errors import ChecksumError


def range_positions(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, e)`` for every pair, vectorised."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(ends, dtype=np.int64) - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)


def _is_checksum_failure(exc: BaseException) -> bool:
    return "checksum" in str(exc).lower()


def read_slice(arr: Any, start: int, stop: int, *, name: str | None = None) -> np.ndarray:
    """``arr[start:stop]`` as numpy, turning a CRC32C failure into :class:`ChecksumError`."""
    try:
        return np.asarray(arr[start:stop])
    except ValueError as exc:
        if not _is_checksum_failure(exc):
            raise
        raise locate_checksum_error(arr, start, stop, name) from exc


def locate_checksum_error(
    arr: Any, start: int, stop: int, name: str | None, chunk_ids: Any = None
) -> ChecksumError:
    """Find which chunk of ``arr[start:stop]`` (or of ``chunk_ids``) is damaged (errors only)."""
    chunk = int(arr.chunks[0])
    label = name or arr.path or "array"
    unit = "elements" if arr.ndim == 1 else "rows"
    if chunk_ids is None:
        chunk_ids = range(start // chunk, max(start, stop - 1) // chunk + 1)
    for k in chunk_ids:
        k = int(k)
        lo, hi = k * chunk, min((k + 1) * chunk, arr.shape[0])
        try:
            arr[lo:hi]
        except ValueError as exc:
            if _is_checksum_failure(exc):
                return ChecksumError(
                    f"checksum mismatch in array {label!r}, chunk {k} ({unit} {lo}:{hi}): "
                    "the chunk is damaged on disk; restore the store from a copy"
                )
    return ChecksumError(f"checksum mismatch reading array {label!r}[{start}:{stop}]")


def read_rows(arr: Any, rows: np.ndarray, *, name: str | None = None) -> np.ndarray:
    """``arr[rows]`` for sorted unique ``rows`` (zarr orthogonal selection, whole trailing axes).

    Like :func:`read_slice`, a CRC32C failure becomes a :class:`ChecksumError` naming the chunk.
    """
    rows = np.asarray(rows, dtype=np.int64)
    sel = (rows,) + (slice(None),) * (arr.ndim - 1)
    try:
        return np.asarray(arr.get_orthogonal_selection(sel))
    except ValueError as exc:
        if not _is_checksum_failure(exc):
            raise
        ids = np.unique(rows // int(arr.chunks[0]))
        raise locate_checksum_error(arr, 0, 0, name, chunk_ids=ids) from exc


class ChunkCache:
    """A small LRU of decoded whole chunks of one 1-D array."""

    def __init__(self, arr: Any, capacity: int = 4, name: str | None = None) -> None:
        self.arr = arr
        self.chunk = int(arr.chunks[0])
        self.capacity = capacity
        self.name = name
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.decoded = 0  # chunks decoded through this cache (for tests and benchmarks)

    def _get(self, k: int, limit: int) -> np.ndarray:
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        lo = k * self.chunk
        out = read_slice(self.arr, lo, min(lo + self.chunk, limit), name=self.name)
        self.decoded += 1
        self._cache[k] = out
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return out

    def read(self, start: int, stop: int, limit: int) -> np.ndarray:
        """Elements ``[start, stop)``; boundary chunks come from (and go to) the cache.

        Interior chunks are read in one zarr call and not cached: no later block of the
        same pass needs them.
        """
        if stop <= start:
            return np.empty(0, dtype=self.arr.dtype)
        c = self.chunk
        k0, k1 = start // c, (stop - 1) // c
        if k0 == k1:
            buf = self._get(k0, limit)
            return buf[start - k0 * c : stop - k0 * c]
        parts = [self._get(k0, limit)[start - k0 * c :]]
        if k1 > k0 + 1:
            parts.append(read_slice(self.arr, (k0 + 1) * c, k1 * c, name=self.name))
            self.decoded += k1 - k0 - 1
        parts.append(self._get(k1, limit)[: stop - k1 * c])
        return np.concatenate(parts)


def read_ranges(
    arr: Any, starts: np.ndarray, ends: np.ndarray, *, name: str | None = None
) -> np.ndarray:
    """Concatenation of ``arr[s:e]`` for each range, decoding each touched chunk once.

    Ranges may come in any order and may repeat; output follows their order.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    nonempty = ends > starts
    if not nonempty.any():
        return np.empty(0, dtype=arr.dtype)
    c = int(arr.chunks[0])
    s, e = starts[nonempty], ends[nonempty]
    first, last = s // c, (e - 1) // c
    # Every chunk id touched by any range, as a sorted unique set.
    touched = np.unique(range_positions(first, last + 1))
    # Split into runs of consecutive chunk ids; read each run with one call.
    breaks = np.flatnonzero(np.diff(touched) != 1) + 1
    runs = np.split(touched, breaks)
    bufs = []
    run_starts = []  # element offset of each run
    buf_offsets = []  # where each run begins in the concatenated buffer
    offset = 0
    limit = arr.shape[0]
    for run in runs:
        lo, hi = int(run[0]) * c, min((int(run[-1]) + 1) * c, limit)
        bufs.append(read_slice(arr, lo, hi, name=name))
        run_starts.append(lo)
        buf_offsets.append(offset)
        offset += hi - lo
    buf = bufs[0] if len(bufs) == 1 else np.concatenate(bufs)
    # Map each range start into the buffer: find its run, shift by run's offset.
    run_starts_a = np.asarray(run_starts, dtype=np.int64)
    shift = np.asarray(buf_offsets, dtype=np.int64) - run_starts_a
    which = np.searchsorted(run_starts_a, s, side="right") - 1
    local = s + shift[which]
    return buf[range_positions(local, local + (e - s))]
