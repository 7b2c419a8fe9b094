"""The chunk caches of the streaming path: decoded whole chunks, kept while neighbours need them.

:class:`ChunkCache` keeps the few chunks neighbouring row blocks share, so a sequential pass
decodes each once; :class:`SharedChunkCache`, its thread-safe form, is what the reader's
workers share in a pass, and it also keeps copies of the small pieces of a chunk a later
unit of the pass will read (see :meth:`SharedChunkCache.keep`).  Chunks are decoded by
:class:`~sparsestore.chunks.ChunkDecoder`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import numpy as np

from .buffers import BufferPool
from .chunks import ChunkDecoder, RangeGather


class ChunkCache:
    """A small LRU of decoded whole chunks of one 1-D array.

    Chunks (and :meth:`read` results) live in memory from ``pool`` when one is given, so
    a pass recycles the same few chunk-sized buffers instead of page-faulting fresh ones.
    """

    def __init__(
        self, arr: Any, capacity: int = 4, name: str | None = None,
        pool: BufferPool | None = None, workers: int = 1,
    ) -> None:
        self.arr = arr
        self.workers = workers  # threads decoding a read's interior shards (see read_to)
        self.chunk = int(arr.chunks[0])
        self.capacity = capacity
        self.name = name
        self.pool = pool
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.decoded = 0  # chunks decoded through this cache (for tests and benchmarks)
        self.decoder = ChunkDecoder(arr, name)

    def _decode(self, k: int, limit: int) -> np.ndarray:
        """Chunk ``k``, cut at ``limit`` (the committed length)."""
        lo = k * self.chunk
        return self.decoder.read(k, pool=self.pool)[: max(0, min(lo + self.chunk, limit) - lo)]

    def _count(self, n: int) -> None:
        self.decoded += n

    def _get(self, k: int, limit: int) -> np.ndarray:
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        out = self._decode(k, limit)
        self._count(1)
        self._cache[k] = out
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return out

    def get(self, k: int, limit: int) -> np.ndarray:
        """Chunk ``k``'s elements below ``limit`` (the committed length), decoded once."""
        return self._get(k, limit)

    def put(self, chunks: Iterable[np.ndarray]) -> None:
        """Hold chunks ``0, 1, ...`` decoded elsewhere (each cut at the committed length)."""
        for k, arr in enumerate(chunks):
            self._cache[k] = arr
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)

    def wanted(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """Chunks reading elements ``[lo, hi)`` of each range would decode now: those
        touched and not held (a snapshot: one cached meanwhile is fetched for nothing)."""
        c = self.chunk
        ks: set[int] = set()
        for lo, hi in ranges:
            if hi > lo:
                ks.update(k for k in range(lo // c, (hi - 1) // c + 1) if not
                          self._holds(k, max(lo, k * c), min(hi, (k + 1) * c)))
        return sorted(ks)

    def _holds(self, k: int, a: int, b: int) -> bool:
        return k in self._cache

    def _part(self, k: int, a: int, b: int, limit: int) -> np.ndarray:
        """Elements ``[a, b)`` of chunk ``k`` (a sub-range of it)."""
        lo = k * self.chunk
        return self._get(k, limit)[a - lo : b - lo]

    def read_to(self, start: int, stop: int, out: np.ndarray, limit: int) -> None:
        """Elements ``[start, stop)`` into ``out``: the two boundary chunks (which the
        neighbouring blocks share) through the cache, interior chunks decoded straight
        into ``out`` (no later block needs them, and no intermediate copy)."""
        if stop <= start:
            return
        c = self.chunk
        k0, k1 = start // c, (stop - 1) // c
        if k0 == k1:
            out[: stop - start] = self._part(k0, start, stop, limit)
            return
        head = self._part(k0, start, (k0 + 1) * c, limit)
        pos = head.shape[0]
        out[:pos] = head
        self.decoder.decode_chunks(range(k0 + 1, k1), out[pos : pos + (k1 - k0 - 1) * c],
                                   self.pool, self.workers)
        pos += (k1 - k0 - 1) * c
        self._count(k1 - k0 - 1)
        out[pos : stop - start] = self._part(k1, k1 * c, stop, limit)

    def read(self, start: int, stop: int, limit: int) -> np.ndarray:
        """Elements ``[start, stop)`` in a new array (from the pool, if any)."""
        shape = (max(0, stop - start), *self.decoder.tail)
        out = np.empty(shape, self.arr.dtype) if self.pool is None else self.pool.take(
            shape, self.arr.dtype)
        self.read_to(start, stop, out, limit)
        return out


class SharedChunkCache(ChunkCache):
    """A :class:`ChunkCache` several threads can share; each chunk is decoded by one of them.

    Concurrent requests for a chunk being decoded wait for that decode instead of
    repeating it; the lock only guards the bookkeeping, decodes run in parallel.
    Decoded memory always comes from a pool (its own unless one is given).

    A pass that will come back for a small piece of a chunk long after the chunk has left
    the cache (a shuffled pass: a row a later unit reads crosses into a chunk an earlier
    unit decoded) says so with :meth:`keep`; decoding the chunk then copies those pieces
    out, and the later read takes its copy instead of decoding the chunk again.
    """

    def __init__(
        self, arr: Any, capacity: int = 4, name: str | None = None,
        pool: BufferPool | None = None,
    ) -> None:
        super().__init__(arr, capacity=capacity, name=name,
                         pool=pool if pool is not None else BufferPool())
        self._lock = threading.Lock()
        self._inflight: dict[int, Future] = {}
        self._keep: dict[int, list[tuple[int, int]]] = {}  # chunk -> pieces to copy out
        self._kept: dict[int, list[tuple[int, int, np.ndarray]]] = {}  # ... copied out
        self._kept_room = 0  # bytes still allowed for copies
        #: chunk -> (unit order, done) of each gather's decode of it not finished yet
        self._decoding: dict[int, list[tuple[int, threading.Event]]] = {}

    def keep(self, pieces: dict[int, list[tuple[int, int]]], max_bytes: int) -> None:
        """When chunk ``k`` is next decoded, copy out its element ranges ``pieces[k]``
        (absolute ``[a, b)``) for one later read each, within ``max_bytes`` in all."""
        with self._lock:
            self._keep = {int(k): list(v) for k, v in pieces.items()}
            self._kept.clear()
            self._kept_room = int(max_bytes)

    def kept_bytes(self) -> int:
        """Bytes of copied-out pieces not read yet."""
        with self._lock:
            return sum(int(a.nbytes) for v in self._kept.values() for *_, a in v)

    def _holds(self, k: int, a: int, b: int) -> bool:
        with self._lock:
            return k in self._cache or any(
                fa <= a and b <= fb for fa, fb, _ in self._kept.get(k, ()))

    def _part(self, k: int, a: int, b: int, limit: int) -> np.ndarray:
        if self._kept:
            with self._lock:
                for n, (fa, fb, arr) in enumerate(self._kept.get(k, ())):
                    if fa <= a and b <= fb:
                        if b == fb:  # read to its end: the later read is done with it
                            del self._kept[k][n]
                            self._kept_room += int(arr.nbytes)
                        return arr[a - fa : b - fa]
        out = super()._part(k, a, b, limit)
        if self._kept:  # a copy made for this very read (its unit decoded the chunk first)
            with self._lock:
                left = []
                for piece in self._kept.pop(k, ()):
                    if a <= piece[0] and piece[1] <= b:
                        self._kept_room += int(piece[2].nbytes)
                    else:
                        left.append(piece)
                if left:
                    self._kept[k] = left
        return out

    def gather_jobs(self, starts: np.ndarray, ends: np.ndarray, out_at: np.ndarray,
                    out: np.ndarray, limit: int, order: int = 0) -> list[Callable[[], None]]:
        """Jobs (for any threads, in any order) that write elements ``[starts[i], ends[i])``
        at ``out[out_at[i]:]``, for many short ranges at once (a shuffled unit's blocks).

        A chunk this cache holds (whole, or as a kept piece) is read from here; the others
        are decoded into a pooled stage, one job a chunk or (sharded) a shard's chunks
        fetched together, and their pieces copied out.  A decode copies out the pieces
        :meth:`keep` asked for, as a cached decode does.

        ``order``: the unit's place in the pass.  A chunk of which this read wants only
        pieces :meth:`keep` awaits (the head of a row whose chunk an earlier unit decodes,
        perhaps at this moment on other threads) is read last, from the copy, after the
        decodes of it by earlier units' gathers end: units in flight at once still decode
        it once.  Those waits only go to earlier units, whose jobs never wait on later
        ones.  The caller calls :meth:`release` with the jobs once they have run or failed.
        """
        c = self.chunk
        plan = RangeGather(starts, ends, out_at, c)
        with self._lock:
            held = np.fromiter((int(k) in self._cache or int(k) in self._kept
                                for k in plan.chunk_ids), bool, plan.chunk_ids.size)
            awaited = ~held & np.fromiter(
                (self._awaits(int(k), plan, j) for j, k in enumerate(plan.chunk_ids)),
                bool, plan.chunk_ids.size)
        jobs: list[Callable[[], None]] = []
        held_js = np.flatnonzero(held)
        if held_js.size:
            jobs.append(lambda: self._copy_parts(plan, held_js, out, limit))
        most = self.decoder.group_chunks()
        for js in plan.groups(np.flatnonzero(~held & ~awaited), most,
                              self.decoder.chunks_per_object):
            ks = plan.chunk_ids[js].tolist()

            def decode(js: np.ndarray = js, ks: list[int] = ks) -> None:
                # One size for every group: the pool hands the same blocks back pass after pass.
                whole = self.pool.take((most * c, *self.decoder.tail), self.arr.dtype)
                stage = whole[: js.size * c]
                self.decoder.decode_chunks(ks, stage, self.pool)
                with self._lock:
                    self.decoded += js.size
                    if self._keep:
                        for slot, kk in enumerate(ks):
                            if kk in self._keep:
                                i = slot * c
                                self._copy_out(kk, stage[i : i + min(c, limit - kk * c)])
                plan.copy(js, stage, out)

            jobs.append(_Decode(self, decode, ks, order))
        awaited_js = np.flatnonzero(awaited)
        if awaited_js.size:
            def from_copies(js: np.ndarray = awaited_js) -> None:
                for j in js.tolist():
                    with self._lock:
                        earlier = [done for o, done in self._decoding.get(
                            int(plan.chunk_ids[j]), ()) if o < order]
                    for done in earlier:
                        done.wait()
                self._copy_parts(plan, js, out, limit)
            jobs.append(from_copies)
        return jobs

    @staticmethod
    def release(jobs: list[Callable[[], None]]) -> None:
        """Mark the decodes of :meth:`gather_jobs`' ``jobs`` as over, run or not (after a
        failure or a cancel), so later units stop waiting for them."""
        for job in jobs:
            if isinstance(job, _Decode):
                job.finish()

    def _awaits(self, k: int, plan: RangeGather, j: int) -> bool:
        """Whether :meth:`keep` awaits every piece of chunk ``k`` that ``plan`` reads."""
        want = self._keep.get(k)
        if not want:
            return False
        return all(any(fa <= a and b <= fb for fa, fb in want)
                   for a, b in zip(plan.a[plan.edges[j] : plan.edges[j + 1]].tolist(),
                                   plan.b[plan.edges[j] : plan.edges[j + 1]].tolist(),
                                   strict=True))

    def _copy_parts(self, plan: RangeGather, js: np.ndarray, out: np.ndarray,
                    limit: int) -> None:
        """Write ``plan``'s pieces of chunks ``chunk_ids[js]`` from this cache (a kept copy,
        a cached chunk, or a decode through the cache)."""
        for j in js.tolist():
            kk = int(plan.chunk_ids[j])
            for p in range(int(plan.edges[j]), int(plan.edges[j + 1])):
                a, b, at = int(plan.a[p]), int(plan.b[p]), int(plan.at[p])
                out[at : at + b - a] = self._part(kk, a, b, limit)

    def _copy_out(self, k: int, out: np.ndarray) -> None:
        """Copy the pieces :meth:`keep` asked for out of freshly decoded chunk ``k``."""
        lo = k * self.chunk
        for a, b in self._keep.pop(k, ()):
            if b - lo > out.shape[0]:
                continue
            piece = out[a - lo : b - lo]
            if piece.nbytes <= self._kept_room:
                self._kept_room -= int(piece.nbytes)
                self._kept.setdefault(k, []).append((a, b, piece.copy()))

    def _count(self, n: int) -> None:
        with self._lock:
            self.decoded += n

    def _get(self, k: int, limit: int) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(k)
            if hit is not None:
                self._cache.move_to_end(k)
                return hit
            fut = self._inflight.get(k)
            owner = fut is None
            if owner:
                fut = self._inflight[k] = Future()
        if not owner:
            return fut.result()
        try:
            out = self._decode(k, limit)
        except BaseException as exc:
            with self._lock:
                del self._inflight[k]
            fut.set_exception(exc)
            raise
        with self._lock:
            self.decoded += 1
            if self._keep:
                self._copy_out(k, out)
            self._cache[k] = out
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            del self._inflight[k]
        fut.set_result(out)
        return out


class _Decode:
    """A gather's decode of some chunks: registered as under way for them from its
    creation until it has run (or is released), for later units to wait on."""

    def __init__(self, cache: SharedChunkCache, run: Callable[[], None], ks: list[int],
                 order: int) -> None:
        self._cache, self._run, self._ks = cache, run, ks
        self._entry = (order, threading.Event())
        with cache._lock:
            for k in ks:
                cache._decoding.setdefault(k, []).append(self._entry)

    def __call__(self) -> None:
        try:
            self._run()
        finally:
            self.finish()

    def finish(self) -> None:
        if self._entry[1].is_set():
            return
        cache = self._cache
        with cache._lock:
            for k in self._ks:
                left = [e for e in cache._decoding.get(k, ()) if e is not self._entry]
                if left:
                    cache._decoding[k] = left
                else:
                    cache._decoding.pop(k, None)
        self._entry[1].set()


__all__ = ["ChunkCache", "SharedChunkCache"]
