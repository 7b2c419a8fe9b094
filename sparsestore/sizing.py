"""Memory sizing: the bytes a loader's pass decodes and holds at once.

Where the store's row blocks are cut and what each decodes to
(:meth:`MemorySizing._plan_bounds`), how large a sequential block is
(:func:`_sequential_block_chunks`), what an average batch takes from the decode pool, a
pass's working set (the pool's idle budget) and a byte-budgeted shuffle unit's size.
:class:`MemorySizing` is the half of :class:`~sparsestore.loader.DataLoader` that computes
them from its store and settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .chunks import ChunkDecoder, read_rows, read_slice
from .reader import ROW_META_CACHE_BYTES, boundary_capacity, meta_cache_bytes
from .sampler import DEFAULT_MAX_BLOCK_ROWS, bounds_from_indptr, fixed_bounds

if TYPE_CHECKING:
    from .store import SparseStore

#: Stored values a sequential block covers at least (two chunks of the default layout), so
#: stores with small chunks still hand the reader's threads units of a useful size.
SEQUENTIAL_BLOCK_BYTES = 8 * 2**20
#: Decoded bytes of the rows a sampler's pass reads at once (several batches): random rows
#: touch most chunks, so each chunk decoded serves all of them, not one batch.
SAMPLER_READ_BYTES = 128 * 2**20
#: Batches' worth of memory the decode pool may hold beyond a pass's working set: the
#: batches gathered ahead, the one consumed and the ones an adapter still holds.
BATCHES_POOLED = 16


def _sequential_block_chunks(store: SparseStore) -> int:
    """Chunks per sequential block: two, or as many as hold ``SEQUENTIAL_BLOCK_BYTES``."""
    if store.is_dense:
        return 2
    arr = store.arrays["data"]
    chunk = int(arr.chunks[0]) * np.dtype(arr.dtype).itemsize
    return max(2, -(-SEQUENTIAL_BLOCK_BYTES // max(1, chunk)))


class MemorySizing:
    """A loader's memory arithmetic, from its store's layout and its settings."""

    # Supplied by the loader.
    _store: SparseStore
    _batch_size: int
    _shuffle: bool
    _num_workers: int
    _prefetch: int
    _block_chunks: int
    _buffer_blocks: int | None
    _buffer_bytes: int | None
    _block_rows: int | None
    _sampler: object
    _batch_sampler: object
    _label_names: tuple[str, ...]

    def _entry_bytes(self) -> int:
        """Decoded bytes of one stored value of a sparse store: the value and its column."""
        arrs = self._store.arrays
        return int(arrs["data"].dtype.itemsize + arrs["indices"].dtype.itemsize)

    def _row_bytes(self) -> float:
        """Decoded bytes of an average row: its values, their columns and its row pointer
        (a dense store's row of values)."""
        st = self._store
        if st.is_dense:
            return float(st.n_cols * st.arrays["X"].dtype.itemsize)
        return st.nnz / max(1, st.n_rows) * self._entry_bytes() + 8

    def _batch_bytes(self) -> int:
        """Decoded bytes of an average batch (what a gathered batch takes from the pool)."""
        return int(self._batch_size * self._row_bytes())

    def _working_set_bytes(self) -> int:
        """Bytes a pass holds at once: units in flight plus what its caches and decoding
        threads hold (:meth:`_cache_bytes`).

        With :data:`BATCHES_POOLED` batches, the decode pool's bound: a whole working set
        freed at once can wait there for the next units, so a pass allocates nothing new
        once warm (what is allocated beyond it would be freed and re-faulted, and
        fragments the heap).
        Independent of the matrix size, so memory stays flat as the matrix grows.
        """
        caches = self._cache_bytes()
        if self._shuffle and self._buffer_bytes is not None:
            return max(32 * 2**20, self._buffer_bytes + caches)
        if self._sampler is not None or self._batch_sampler is not None:
            # One group of batches consumed, one decoded (see explicit_samplers).
            return max(32 * 2**20, 2 * SAMPLER_READ_BYTES + caches)
        unit = self._chunk_bytes() * self._block_chunks
        if self._shuffle:
            unit *= self._buffer_blocks  # its batches are gathered as they are consumed
        in_flight = self._prefetch + max(1, self._num_workers) + 1
        return max(32 * 2**20, in_flight * unit + caches)

    def _chunk_bytes(self) -> int:
        """Decoded bytes of one chunk of rows' values (a sparse store's: with their columns)."""
        st = self._store
        if st.is_dense:
            arr = st.arrays["X"]
            return int(np.prod(arr.chunks)) * arr.dtype.itemsize
        return int(st.arrays["data"].chunks[0]) * self._entry_bytes()

    def _cache_bytes(self) -> int:
        """Decoded chunks a pass's caches hold at most (two boundary chunks per decoding
        thread, and slack; row pointers' and labels' chunks up to their caches' room), and
        what each decoding thread and the consumer's hold while they decode: a compressed
        chunk and the chunks of one stored object (a shard's, up to ``STAGE_BYTES``) that a
        shuffled unit's gather decodes together.  All of it is pool memory."""
        st = self._store
        threads = max(1, self._num_workers)
        chunk = self._chunk_bytes()
        values = ["X"] if st.is_dense else ["data", "indices"]
        # Per array: a compressed chunk (at most its decoded bytes: Blosc stores what does
        # not compress as it is) and a gather's stage.
        stored = stage = 0
        for name in values:
            dec = ChunkDecoder(st.arrays[name], name)
            one = dec.chunk * dec.row_bytes
            stored, stage = max(stored, one), max(stage, dec.group_chunks() * one)
        metas = [] if st.is_dense else [st.arrays["indptr"]]
        metas += [st.labels[name].array for name in self._label_names]
        meta = sum(meta_cache_bytes(arr) for arr in metas)
        return boundary_capacity(threads) * chunk + meta + (threads + 1) * (stored + stage)

    def _plan_bounds(self) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray] | None]:
        """Block boundaries; for a byte-budgeted shuffle, each block's decoded bytes
        (values, indices, row pointers; sequential passes skip them); and ``indptr``'s
        chunks as streamed to cut them, when small enough to keep (None otherwise): every
        pass's reader starts with them instead of reading them again."""
        st = self._store
        n = st.n_rows
        if st.is_dense:
            arr = st.arrays["X"]
            b = fixed_bounds(n, self._block_rows or max(1, int(arr.chunks[0])))
            return b, np.diff(b) * st.n_cols * arr.dtype.itemsize, None
        ip = st.arrays["indptr"]
        # indptr as streamed for the bounds, kept when small: a byte-budgeted shuffle then
        # sizes its blocks without reading it again (a round trip on object storage).
        kept: list[np.ndarray] | None = [] if (n + 1) * 8 <= ROW_META_CACHE_BYTES else None
        if self._block_rows is not None:
            b = fixed_bounds(n, self._block_rows)
        else:
            step = int(ip.chunks[0])

            def pieces() -> Iterator[tuple[int, np.ndarray]]:
                for p in range(0, n + 1, step):
                    piece = read_slice(ip, p, min(p + step, n + 1), name="indptr")
                    if kept is not None:
                        kept.append(piece)
                    yield p, piece

            target = int(st.arrays["data"].chunks[0]) * self._block_chunks
            b = bounds_from_indptr(pieces(), n, target, DEFAULT_MAX_BLOCK_ROWS)
        kept = kept or None
        if not (self._shuffle and self._buffer_bytes is not None):
            return b, None, kept  # only a byte-budgeted shuffle sizes its blocks
        if kept:
            at = np.concatenate(kept)[b].astype(np.int64)
        else:
            at = read_rows(ip, b, name="indptr").astype(np.int64) if b.size > 1 else \
                np.zeros(b.size, np.int64)
        return b, np.diff(at) * self._entry_bytes() + np.diff(b) * 8, kept

    def _unit_nnz(self) -> int | None:
        """Stored values a byte-budgeted shuffle unit holds at most (None: no such units)."""
        ub = self._unit_bytes
        if not self._shuffle or ub is None or self._store.is_dense:
            return None
        return ub // self._entry_bytes()

    @property
    def _unit_bytes(self) -> int | None:
        """Decoded bytes per shuffled unit: half the budget (one consumed, one ahead)."""
        return None if self._buffer_bytes is None else max(1, self._buffer_bytes // 2)


__all__ = ["BATCHES_POOLED", "SAMPLER_READ_BYTES", "SEQUENTIAL_BLOCK_BYTES", "MemorySizing"]
