"""Decode row blocks once, in background threads, with bounded prefetch.

The reader turns :class:`~sparsestore.sampler.UnitSpec` s into decoded, already ordered
units (a :class:`~sparsestore.batch.Batch` holding all rows of the unit).  Every array
(``data``, ``indices``, ``indptr``, labels) goes through one thread-safe
:class:`~sparsestore.chunk_cache.SharedChunkCache` per pass: a chunk needed by two neighbouring
units is decoded by whichever asks first while the other waits for it, so a sequential pass
decodes every storage chunk exactly once even with several workers.  A shuffled pass reads
blocks in random order; the chunk two neighbouring blocks share is decoded by the earlier
of their units, which keeps a copy of the piece the later one needs (:meth:`keep_seams`),
so it too decodes each chunk once (twice at most when two units in flight race for it).
``indptr`` and label chunks are small and cached up to
a fixed byte budget, so they are decoded once per pass for stores whose row metadata fits
in it.

Memory is bounded by ``prefetch`` units in flight (plus the one being consumed), whatever
the size of the matrix; threads are joined when iteration stops, however it stops.  Chunks
are decoded (:class:`~sparsestore.chunks.ChunkDecoder`) and units assembled into memory
from a :class:`~sparsestore.buffers.BufferPool` the loader keeps across passes, so a pass
reuses the same few blocks instead of page-faulting fresh ones.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .batch import Batch
from .buffers import BufferPool
from .checks import check_row_pointers
from .chunk_cache import SharedChunkCache
from .chunks import chunk_pieces, read_rows
from .engine import OrderedMap, Tickets
from .fetch import Prefetch, prefetch_unit
from .rows import ColumnSelection, DecodedRows, cat_parts, concat_ptr, gather_csr, narrowed
from .sampler import UnitSpec

if TYPE_CHECKING:
    from .store import SparseStore

#: Byte budget of the ``indptr`` and of each label cache (row metadata, small per row).
ROW_META_CACHE_BYTES = 64 * 2**20
#: Bytes per array of chunk pieces kept for a later unit of the pass (see keep_seams).
KEPT_PIECE_BYTES = 16 * 2**20
THREAD_PREFIX = "sparsestore-reader"


#: Fewest stored values per decode piece of a unit: 8 MiB of float32 values, so a piece over
#: small inner chunks decodes a run of them by one read (what 4 MiB chunks hold two of).
PIECE_NNZ = 2**21
#: Spans in a unit from which it is read by chunk runs rather than span by span.
MANY_SPANS = 8


class ResidentUnit:
    """A shuffled pass's one unit (the whole share) kept decoded for the next pass.

    When a share fits one shuffle unit, every epoch decodes the same rows and only permutes
    them differently; the loader keeps that unit (memory its buffer pool would otherwise
    hold idle between passes) and the next pass over the same rows of the same commit
    gathers from it instead of decoding again.
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.parts: tuple[Any, list[np.ndarray]] | None = None

    def clear(self) -> None:
        """Drop the kept unit (its buffers go back to the pool)."""
        self.key = self.parts = None


# ------------------------------------------------------------------ reader

class BlockReader:
    """Decodes units of one pass; create one per pass (its caches count that pass)."""

    def __init__(
        self,
        store: SparseStore,
        *,
        label_names: Sequence[str] = (),
        columns: ColumnSelection | None = None,
        num_workers: int = 2,
        prefetch: int = 2,
        piece_rows: int | None = None,
        pool: BufferPool | None = None,
        unit_nnz: int | None = None,
        io_ahead: int = 0,
        resident: ResidentUnit | None = None,
    ) -> None:
        self.store = store
        # Where a one-unit shuffled pass keeps its decoded rows for the next pass.
        self.resident = resident
        # Units beyond those submitted for decoding whose chunks are fetched already (object
        # storage: hides the round trips of a pass of many small units).
        self.io_ahead = int(io_ahead)
        # Stored values a full unit can hold (a shuffled pass's units are packed up to a
        # byte budget): every unit takes arrays of exactly that size, so the pool hands
        # each next unit the memory the last one freed instead of allocating beside it
        # when their sizes differ (a pass's last unit is smaller).  Pages a smaller unit
        # never writes are never touched, so they cost address space, not memory.
        self.unit_nnz = unit_nnz
        self.piece_rows = piece_rows
        self.pool = pool if pool is not None else BufferPool()
        self.columns = columns
        self.label_names = tuple(label_names)
        self.num_workers = int(num_workers)
        self.prefetch = max(1, int(prefetch))
        self.n_cols = store.n_cols if columns is None else columns.n_cols
        self._span_ex: ThreadPoolExecutor | None = None  # set while a pass streams
        cap = boundary_capacity(self.num_workers)
        self.caches: dict[str, SharedChunkCache] = {}
        if not store.is_dense:
            arrs = store.arrays
            pool = self.pool
            self.caches["data"] = SharedChunkCache(arrs["data"], cap, "data", pool)
            self.caches["indices"] = SharedChunkCache(arrs["indices"], cap, "indices", pool)
            self.caches["indptr"] = SharedChunkCache(
                arrs["indptr"], _meta_capacity(arrs["indptr"]), "indptr", pool
            )
        self._labels = [store.labels[n] for n in self.label_names]
        self.label_caches = [
            SharedChunkCache(lab.array, _meta_capacity(lab.array), f"labels/{lab.name}", self.pool)
            for lab in self._labels
        ]

    def decoded_chunks(self) -> dict[str, int]:
        """Chunks decoded so far in this pass, per array (the "each chunk once" counter)."""
        out = {name: c.decoded for name, c in self.caches.items()}
        for lab, c in zip(self._labels, self.label_caches, strict=True):
            out[f"labels/{lab.name}"] = c.decoded
        return out

    def seed_row_pointers(self, chunks: Sequence[np.ndarray] | None) -> None:
        """Start the ``indptr`` cache with its decoded chunks (the loader's, from planning)."""
        if chunks and "indptr" in self.caches:
            self.caches["indptr"].put(chunks)

    def keep_seams(self, spans_by_unit: Sequence[np.ndarray]) -> None:
        """Before a pass of several units (in this order): where a later unit reads a small
        piece of a ``data``/``indices`` chunk an earlier unit decodes (the row that crosses
        a chunk boundary between two blocks of a shuffled pass), the earlier decode copies
        that piece out for it, so the chunk is decoded once per pass rather than twice."""
        st = self.store
        if st.is_dense or len(spans_by_unit) < 2:
            return
        unit_of = np.repeat(np.arange(len(spans_by_unit)), [len(sp) for sp in spans_by_unit])
        rows = np.concatenate([np.asarray(sp, np.int64).reshape(-1, 2) for sp in spans_by_unit])
        if not rows.size:
            return
        at = self._row_pointers(np.unique(rows))
        lo = at[np.searchsorted(at[:, 0], rows[:, 0]), 1]
        hi = at[np.searchsorted(at[:, 0], rows[:, 1]), 1]
        nonempty = hi > lo
        unit_of, lo, hi = unit_of[nonempty], lo[nonempty], hi[nonempty]
        if not lo.size:
            return
        for name in ("data", "indices"):
            cache = self.caches[name]
            c = cache.chunk
            k, a, b, rng = chunk_pieces(lo, hi, c)  # a range's interior chunks are its own
            u = unit_of[rng]
            first = np.full(int(k.max()) + 1, len(spans_by_unit), np.int64)
            np.minimum.at(first, k, u)
            later = (u > first[k]) & (b - a <= c // 4)
            pieces: dict[int, list[tuple[int, int]]] = {}
            for kk, aa, bb in zip(k[later].tolist(), a[later].tolist(), b[later].tolist(),
                                  strict=True):
                pieces.setdefault(kk, []).append((aa, bb))
            cache.keep(pieces, KEPT_PIECE_BYTES)

    def _row_pointers(self, rows: np.ndarray) -> np.ndarray:
        """``[[row, indptr[row]], ...]`` for sorted ``rows``, through the indptr cache."""
        c_ptr, limit = self.caches["indptr"], self.store.n_rows + 1
        c = c_ptr.chunk
        vals = np.empty(rows.size, np.int64)
        chunk_of = rows // c
        for k in np.unique(chunk_of).tolist():
            sel = chunk_of == k
            vals[sel] = c_ptr.get(k, limit)[rows[sel] - k * c]
        return np.stack([rows, vals], axis=1)

    # -- one unit
    def decode(self, unit: UnitSpec) -> Iterable[Batch]:
        """All rows of ``unit`` in emission order, as pieces cut on the batch grid.

        Pieces end where the loader's batches end (``piece_rows`` apart in the rank's
        stream), so full batches come out ready-made.  A shuffled unit's pieces are
        gathered lazily, by whoever iterates them (the consumer), each just before it is
        used: its output is still in cache when the batch is consumed, and only the
        unit's decoded rows (not a gathered copy of all of them) wait in the prefetch
        queue.
        """
        if unit.explicit:
            return self._decode_explicit(unit)
        if unit.take is not None and self.resident is not None:
            src, labels = self._resident_rows(unit, self.resident)
        else:
            src, labels = self._read_spans(unit.spans, unit.index)
        n = unit.n_rows
        if self.piece_rows is None:
            cuts = [0, n]
        else:
            first = (-unit.offset) % self.piece_rows
            cuts = [0, *range(first or self.piece_rows, n, self.piece_rows), n]
        spans = [(i, j) for i, j in zip(cuts[:-1], cuts[1:], strict=True) if j > i]
        if unit.take is not None:
            return self._gathered(narrowed(src), labels, unit, spans)
        return [self._piece(src, labels, unit, i, j) for i, j in spans]

    def _resident_rows(self, unit: UnitSpec, res: ResidentUnit) -> tuple[Any, list[np.ndarray]]:
        """The unit's decoded rows from the loader's kept unit when it holds these rows of
        this commit, else decoded (and kept in its place)."""
        st = self.store
        key = (st.generation, st.n_rows, st.nnz, unit.spans.tobytes())
        if res.key != key or res.parts is None:
            res.clear()  # its buffers back to the pool before this unit takes its own
            src, labels = self._read_spans(unit.spans, unit.index)
            res.key, res.parts = key, (narrowed(src), labels)
        return res.parts

    def _gathered(self, src: Any, labels: list[np.ndarray], unit: UnitSpec,
                  spans: list[tuple[int, int]]) -> Iterator[Batch]:
        """A shuffled unit's pieces, gathered as they are consumed: the consumer gathers
        every ``num_workers``-th piece itself and the pass's other threads gather the rest
        a few pieces ahead, so their Python work (labels, pointers, pool) overlaps the
        consumer's rather than all of it queuing on the consumer's thread."""
        ex, w = self._span_ex, max(1, self.num_workers)
        if ex is None or w < 2 or len(spans) < 2 or not isinstance(src, DecodedRows):
            for i, j in spans:
                yield self._piece(src, labels, unit, i, j)
            return
        ahead: dict[int, Future] = {}
        try:
            for k, (i, j) in enumerate(spans):
                for m in range(k, min(len(spans), k + 2 * w)):
                    if m % w and m not in ahead:
                        ahead[m] = ex.submit(self._piece, src, labels, unit, *spans[m])
                fut = ahead.pop(k, None)
                yield self._piece(src, labels, unit, i, j) if fut is None else fut.result()
        finally:
            for fut in ahead.values():
                fut.cancel()

    def _read_spans(self, spans: np.ndarray, order: int = 0) -> tuple[Any, list[np.ndarray]]:
        """Decode the spans (through the caches) and concatenate them, labels included;
        ``order``: the unit's place in the pass."""
        st = self.store
        if not st.is_dense and len(spans) >= MANY_SPANS:
            return self._read_many_spans(np.asarray(spans, np.int64).reshape(-1, 2), order)
        labels = [
            cat_parts([cache.read(int(a), int(b), st.n_rows) for a, b in spans])
            for cache in self.label_caches
        ]
        if st.is_dense:
            return cat_parts([st.read_dense(int(a), int(b)) for a, b in spans]), labels
        c_ptr, c_val, c_ind = self.caches["indptr"], self.caches["data"], self.caches["indices"]
        ptrs = [check_row_pointers(
            c_ptr.read(int(a), int(b) + 1, st.n_rows + 1).astype(np.int64, copy=False),
            st.nnz, st.path, int(a)) for a, b in spans]
        ptr = concat_ptr([p - p[0] for p in ptrs])
        nnz = int(ptr[-1])
        # Decoded into pooled memory (reused pass after pass: fresh unit-sized arrays cost
        # more in page faults than the copies); the pool takes it back when the unit's
        # batches are gone.
        cap = self.unit_nnz if self.unit_nnz and nnz <= self.unit_nnz else nnz
        values = self.pool.take(cap, st.dtype)[:nnz]
        indices = self.pool.take(cap, c_ind.arr.dtype)[:nnz]
        # Pieces of about two data chunks (at least PIECE_NNZ values: small inner chunks of
        # shards are read in runs), cut at rows: a big unit (a shuffle's) is decoded by
        # every worker thread at once instead of by the one that took the unit.
        piece_nnz = max(PIECE_NNZ, 2 * int(c_val.arr.chunks[0]))
        work: list[tuple[int, np.ndarray]] = []  # (first row, its pointers into the store)
        for (a, _), p in zip(spans, ptrs, strict=True):
            rel = p - p[0]
            cuts = np.unique(np.searchsorted(rel, np.arange(piece_nnz, rel[-1], piece_nnz)))
            edges = [0, *cuts[(cuts > 0) & (cuts < rel.size - 1)].tolist(), rel.size - 1]
            for i, j in zip(edges[:-1], edges[1:], strict=True):
                work.append((int(a) + i, p[i : j + 1]))
        offs = np.cumsum([0] + [int(q[-1] - q[0]) for _, q in work])

        def fill(k: int) -> None:
            first, q = work[k]
            lo, hi, o = int(q[0]), int(q[-1]), int(offs[k])
            c_val.read_to(lo, hi, values[o : o + hi - lo], st.nnz)
            c_ind.read_to(lo, hi, indices[o : o + hi - lo], st.nnz)
            st.check_indices(indices[o : o + hi - lo], q, first)

        # On object storage, every chunk the unit needs is requested at once (none locally).
        ahead = prefetch_unit((c_val, c_ind), [(int(q[0]), int(q[-1])) for _, q in work])
        try:
            # The threads take the next piece in turn, so the chunk two consecutive pieces
            # share is asked for twice in quick succession: one decode, the other a cache hit.
            self._run_jobs([functools.partial(fill, k) for k in range(len(work))])
        finally:
            if ahead is not None:
                ahead.release()
        return DecodedRows(values, indices, ptr), labels

    def _read_many_spans(self, spans: np.ndarray, order: int) -> tuple[Any, list[np.ndarray]]:
        """:meth:`_read_spans` for many short spans (a shuffled unit's blocks): each array's
        touched chunks are decoded once, those of one shard together, and every span's
        pieces copied out of them (:meth:`SharedChunkCache.gather_jobs`), not a span at a
        time.  ``order``: the unit's place in the pass."""
        st = self.store
        lo_row, hi_row = spans[:, 0], spans[:, 1]
        lens = hi_row - lo_row
        row_at = np.cumsum(lens) - lens
        c_ptr, c_val, c_ind = self.caches["indptr"], self.caches["data"], self.caches["indices"]
        labels = []
        for cache in self.label_caches:
            out = self.pool.take((int(lens.sum()), *cache.decoder.tail), cache.arr.dtype)
            self._run_jobs(cache.gather_jobs(lo_row, hi_row, row_at, out, st.n_rows))
            labels.append(out)
        # Each span's row pointers, its first row's included: [lo, hi] inclusive.
        p_at = row_at + np.arange(lens.size)
        got = np.empty(int(lens.sum()) + lens.size, c_ptr.arr.dtype)
        self._run_jobs(c_ptr.gather_jobs(lo_row, hi_row + 1, p_at, got, st.n_rows + 1))
        raw = got.astype(np.int64, copy=False)
        first, last = raw[p_at], raw[p_at + lens]
        step = np.diff(raw)
        step[p_at[1:] - 1] = 0  # between spans: not a step of one
        if raw.size and (raw.min() < 0 or raw.max() > st.nnz or (step < 0).any()):
            for i in range(lens.size):  # the first damaged span names its row
                seg = raw[p_at[i] : p_at[i] + lens[i] + 1]
                check_row_pointers(seg, st.nnz, st.path, int(lo_row[i]))
        nnz_of = last - first
        val_at = np.cumsum(nnz_of) - nnz_of
        # ptr: 0, then each span's pointers past its first, shifted to its place
        shift = np.repeat(val_at - first, lens + 1)
        tail = np.ones(raw.size, bool)
        tail[p_at] = False
        ptr = np.empty(int(lens.sum()) + 1, np.int64)
        ptr[0] = 0
        ptr[1:] = (raw + shift)[tail]
        nnz = int(ptr[-1])
        cap = self.unit_nnz if self.unit_nnz and nnz <= self.unit_nnz else nnz
        values = self.pool.take(cap, st.dtype)[:nnz]
        indices = self.pool.take(cap, c_ind.arr.dtype)[:nnz]
        ranges = [(int(a), int(b)) for a, b in zip(first.tolist(), last.tolist(), strict=True)]
        ahead = prefetch_unit((c_val, c_ind), ranges)
        jobs: list[Callable[[], None]] = []
        try:
            jobs = (c_val.gather_jobs(first, last, val_at, values, st.nnz, order)
                    + c_ind.gather_jobs(first, last, val_at, indices, st.nnz, order))
            self._run_jobs(jobs)
        finally:
            SharedChunkCache.release(jobs)
            if ahead is not None:
                ahead.release()
        for i in range(lens.size):
            o, n = int(val_at[i]), int(nnz_of[i])
            st.check_indices(indices[o : o + n], raw[p_at[i] : p_at[i] + lens[i] + 1],
                             int(lo_row[i]))
        return DecodedRows(values, indices, ptr), labels

    def _run_jobs(self, jobs: list[Callable[[], None]]) -> None:
        """Run jobs, in order, on this pass's span threads and the caller's: each thread
        takes the next job not yet taken (a shared counter)."""
        ex = self._span_ex
        if ex is None or len(jobs) < 2:
            for job in jobs:
                job()
            return
        order = Tickets(len(jobs))

        def work() -> None:
            for i in order:
                jobs[i]()

        futs = [ex.submit(work) for _ in range(min(self.num_workers - 1, len(jobs) - 1))]
        work()
        for f in futs:
            f.result()

    def _piece(
        self, src: Any, labels: list[np.ndarray], unit: UnitSpec, i: int, j: int
    ) -> Batch:
        sel: Any = slice(i, j) if unit.take is None else unit.take[i:j]
        labs = tuple(lab[sel] for lab in labels)
        rows = unit.rows[i:j]
        if isinstance(src, np.ndarray):
            dense = src[sel]
            if self.columns is not None:
                dense = dense[:, self.columns.keep]
            return Batch(None, None, None, dense, labs, rows, self.n_cols)
        if unit.take is None:
            p0, p1 = int(src.indptr[i]), int(src.indptr[j])
            values, indices = src.data[p0:p1], src.indices[p0:p1]
            ptr = src.indptr[i : j + 1].astype(np.int64) - p0
        else:
            values, indices, ptr = gather_csr(src.data, src.indices, src.indptr, sel, self.pool)
        if self.columns is not None:
            values, indices, ptr = self.columns.apply_csr(values, indices, ptr)
        return Batch(values, indices, ptr, None, labs, rows, self.n_cols)

    def _decode_explicit(self, unit: UnitSpec) -> list[Batch]:
        """A sampler's batches: the rows of all of them decoded at once (each chunk they
        touch decoded once for the lot, not once per batch), then gathered batch by batch."""
        st, rows = self.store, unit.rows
        cuts = unit.cuts if unit.cuts is not None else np.array([0, rows.size])
        uniq, inverse = np.unique(rows, return_inverse=True)
        inverse = inverse.ravel()
        labels = tuple(lab.take(uniq) for lab in self._labels)
        if st.is_dense:
            dense = np.asarray(
                read_rows(st.arrays["X"], uniq, name="X")
            ) if uniq.size else np.empty((0, st.n_cols), st.dtype)
            if self.columns is not None:
                dense = dense[:, self.columns.keep]
        elif uniq.size:
            values, indices, ptr = st.take_parts(uniq)
            src = narrowed(DecodedRows(values, indices, ptr))
        else:
            idt = st.arrays["indices"].dtype
            src = DecodedRows(np.empty(0, st.dtype), np.empty(0, idt), np.zeros(1, np.int64))
        out = []
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
            take = inverse[a:b]
            labs = tuple(lab[take] for lab in labels)
            if st.is_dense:
                out.append(Batch(None, None, None, dense[take], labs, rows[a:b], self.n_cols))
                continue
            values, indices, ptr = gather_csr(src.data, src.indices, src.indptr, take,
                                              self.pool)
            if self.columns is not None:
                values, indices, ptr = self.columns.apply_csr(values, indices, ptr)
            out.append(Batch(values, indices, ptr, None, labs, rows[a:b], self.n_cols))
        return out

    def _fetch_ahead(self, unit: UnitSpec) -> Prefetch | None:
        """Start fetching the ``data``/``indices`` chunks of ``unit`` from object storage
        (its row pointers come from the cache); None where there is nothing to fetch."""
        if unit.explicit or self.store.is_dense or not unit.spans.size:
            return None
        c_ptr = self.caches["indptr"]
        n = self.store.n_rows + 1
        ranges = []
        for a, b in unit.spans:
            p = c_ptr.read(int(a), int(b) + 1, n)
            ranges.append((int(p[0]), int(p[-1])))
        return prefetch_unit((self.caches["data"], self.caches["indices"]), ranges)

    def _decode_fetched(self, unit: UnitSpec, ahead: Prefetch | None) -> Iterable[Batch]:
        try:
            return self.decode(unit)
        finally:
            if ahead is not None:
                ahead.release()  # what the decode did not take (nothing, normally)

    # -- a pass
    def stream(self, units: Iterable[UnitSpec]) -> Iterator[Iterable[Batch]]:
        """Decoded units in order, ``prefetch`` ahead, on ``num_workers`` threads (an
        :class:`~sparsestore.engine.OrderedMap`).

        A generator: closing it (``break``, an exception, garbage collection) cancels the
        queued work and joins the threads before returning.
        """
        if self.num_workers > 1:  # the other threads' share of one big unit's pieces
            self._span_ex = ThreadPoolExecutor(max_workers=self.num_workers - 1,
                                               thread_name_prefix=THREAD_PREFIX)
        stage = OrderedMap(lambda job: self._decode_fetched(*job), self._fetching(units),
                           ahead=self.prefetch, threads=self.num_workers, name=THREAD_PREFIX)
        try:
            yield from stage
        finally:
            stage.close()
            if self._span_ex is not None:
                self._span_ex.shutdown(wait=True, cancel_futures=True)
                self._span_ex = None

    def _fetching(self, units: Iterable[UnitSpec]) -> Iterator[tuple[UnitSpec, Prefetch | None]]:
        """Units with their chunks' fetches started ``io_ahead`` units before they are
        decoded (object storage: their round trips overlap the units decoded before)."""
        fetching: deque[tuple[UnitSpec, Prefetch | None]] = deque()
        try:
            for unit in units:
                fetching.append((unit, self._fetch_ahead(unit) if self.io_ahead else None))
                if len(fetching) > self.io_ahead:
                    yield fetching.popleft()
            while fetching:
                yield fetching.popleft()
        finally:
            for _, ahead in fetching:
                if ahead is not None:
                    ahead.release()


def boundary_capacity(num_workers: int) -> int:
    """Chunks a ``data`` / ``indices`` cache holds.

    Units are decoded in order by ``num_workers`` threads and each caches only its two
    boundary chunks, so a chunk shared by units u and u+1 is still cached when u+1 asks
    for it with room for two chunks per running unit (plus slack).  Every cached chunk is
    resident memory, so no more than that.
    """
    return 2 * max(1, int(num_workers)) + 2


def _chunk_nbytes(arr: Any) -> int:
    return int(np.prod(arr.chunks)) * np.dtype(arr.dtype).itemsize


def _meta_capacity(arr: Any) -> int:
    """Chunks a row-metadata cache (row pointers, labels) holds: as many as fit in
    ``ROW_META_CACHE_BYTES``, and at least four."""
    return max(4, ROW_META_CACHE_BYTES // max(1, _chunk_nbytes(arr)))


def meta_cache_bytes(arr: Any) -> int:
    """Decoded bytes a row-metadata cache of ``arr`` holds at most: its capacity, or all
    of the array's chunks when it has fewer."""
    n_chunks = -(-int(arr.shape[0]) // max(1, int(arr.chunks[0])))
    return min(_meta_capacity(arr), n_chunks) * _chunk_nbytes(arr)


__all__ = ["BlockReader", "ResidentUnit", "SharedChunkCache", "THREAD_PREFIX", "boundary_capacity",
           "meta_cache_bytes"]
