"""Chunk reads from object storage, many requests in flight at once.

On local disk a chunk read costs microseconds and the reader's threads read chunk after
chunk.  On object storage every request waits some 10-30 ms before its first byte comes,
whatever its size, so reading one chunk at a time per thread leaves the link idle nearly
all the time.  For a store without synchronous reads (zarr's ``FsspecStore``: ``s3://``
and other fsspec URLs), :class:`RemoteReads` gives :class:`~sparsestore.chunks.ChunkDecoder`
the synchronous reads it decodes from, and lets a caller start the reads it will need
before it needs them (:meth:`RemoteReads.prefetch`): each runs on zarr's event loop, with
at most :data:`BUDGET_BYTES` (and :data:`MAX_REQUESTS` requests) in flight.  A read the
decoder then asks for takes the prefetched bytes (waiting for them if they are still on
their way); one nobody prefetched is fetched there and then.

Every read goes through the zarr store sparsestore opened, so the bytes are checked
against the manifest by :class:`~sparsestore.integrity.VerifiedStore` exactly as zarr's
own reads are, and then decoded (CRC32C, Blosc) by the decoder as on local disk.  Stores
with synchronous reads (local disk, memory) never get here.

:func:`prefetch_chunks` starts the reads of a set of chunks of several arrays (a row
unit's ``data`` and ``indices``); the reader calls it once per unit and releases the
unconsumed prefetches when the unit is decoded, so fetched bytes wait in memory for one
unit at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from . import zarr_compat as zc

#: Bytes of requests in flight at once (per store handle), summed over their expected
#: sizes: enough to keep a link of a few Gbit/s busy at 30 ms per request, and a bound on
#: the memory the responses take before they are decoded.
BUDGET_BYTES = 64 * 2**20
#: Requests in flight at once (per store handle), whatever their sizes.
MAX_REQUESTS = 64

#: What a read asks for: ``(key, start, stop)``; ``start`` None is the whole object,
#: ``stop`` None with a negative ``start`` is the last ``-start`` bytes.
Request = tuple[str, int | None, int | None]


def _byte_request(req: Request) -> Any:
    _, start, stop = req
    if start is None:
        return None
    if stop is None:
        return zc.SuffixByteRequest(-start)
    return zc.RangeByteRequest(start, stop)


class _Gate:
    """At most ``budget`` bytes and ``slots`` requests held at once (on one event loop)."""

    def __init__(self, budget: int, slots: int) -> None:
        self.budget = budget
        self.free = budget
        self.slots = slots
        self.cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        n = min(max(0, nbytes), self.budget)  # one request over the budget runs alone
        async with self.cond:
            await self.cond.wait_for(lambda: self.free >= n and self.slots > 0)
            self.free -= n
            self.slots -= 1
        try:
            yield
        finally:
            async with self.cond:
                self.free += n
                self.slots += 1
                self.cond.notify_all()


class RemoteReads:
    """Synchronous, prefetchable reads of a zarr store that reads only asynchronously.

    Has the read methods :mod:`sparsestore.zarr_compat` looks for (``read_chunk``,
    ``read_suffix``, ``read_range``, as :class:`~sparsestore.integrity.VerifiedStore`
    has for local disk) and no synchronous writes (``supports_sync`` is False, so chunk
    writers leave writing to zarr).  One per store object (see :func:`remote_reads`).
    """

    supports_sync = False

    def __init__(self, store: Any, budget_bytes: int = BUDGET_BYTES,
                 max_requests: int = MAX_REQUESTS) -> None:
        self.store = store
        self.budget_bytes = int(budget_bytes)
        self.max_requests = int(max_requests)
        self._lock = threading.Lock()
        self._pending: dict[Request, Future[np.ndarray | None]] = {}
        self._gate: _Gate | None = None  # made on zarr's event loop, on first use
        self.fetched = 0  # requests sent (for tests and benchmarks)
        self.prefetched = 0  # of which started ahead by prefetch
        self.waited = 0  # prefetched reads taken before their bytes had come

    async def _get(self, req: Request, nbytes: int) -> np.ndarray | None:
        if self._gate is None:
            self._gate = _Gate(self.budget_bytes, self.max_requests)
        async with self._gate.hold(nbytes):
            self.fetched += 1
            buf = await self.store.get(req[0], zc.default_buffer_prototype(),
                                       _byte_request(req))
        return None if buf is None else buf.as_numpy_array().view(np.uint8)

    def _take(self, req: Request, nbytes: int) -> np.ndarray | None:
        with self._lock:
            fut = self._pending.pop(req, None)
        if fut is not None:
            if not fut.done():
                self.waited += 1
            with contextlib.suppress(asyncio.CancelledError):
                return fut.result()
        return zc.run_sync(self._get(req, nbytes))

    # ------------------------------------------------------------ what decoders call
    def read_chunk(self, key: str, pool: Any = None) -> np.ndarray | None:
        """A whole object's bytes, checked by the store; None when absent and uncovered."""
        return self._take((key, None, None), 0)

    def read_suffix(self, key: str, n: int) -> np.ndarray | None:
        """The last ``n`` bytes of an object (a shard's index)."""
        return self._take((key, -int(n), None), int(n))

    def read_range(self, key: str, start: int, stop: int, pool: Any = None,
                   into: np.ndarray | None = None) -> np.ndarray | None:
        """Bytes ``[start, stop)`` of an object (an inner chunk of a shard)."""
        return self._take((key, int(start), int(stop)), int(stop) - int(start))

    # ------------------------------------------------------------ reading ahead
    def prefetch(self, requests: Iterable[tuple[Request, int]]) -> list[Request]:
        """Start the reads ``(request, expected bytes)`` now; returns those this call
        started (the others were already on their way), for :meth:`release`."""
        mine: list[Request] = []
        with self._lock:
            for req, nbytes in requests:
                if req in self._pending:
                    continue
                self._pending[req] = zc.run_async(self._get(req, nbytes))
                mine.append(req)
        self.prefetched += len(mine)
        return mine

    def release(self, requests: Iterable[Request]) -> None:
        """Forget prefetched reads nobody took (cancelling those still in flight)."""
        with self._lock:
            dropped = [self._pending.pop(r, None) for r in requests]
        for fut in dropped:
            if fut is not None:
                fut.cancel()


def get_many(store: Any, keys: Sequence[str]) -> dict[str, bytes | None]:
    """Whole objects ``keys`` of a zarr store, requested together on zarr's event loop
    (one round trip for all of them on object storage); None for an absent key."""

    async def one(key: str) -> bytes | None:
        buf = await store.get(key, zc.default_buffer_prototype())
        return None if buf is None else buf.to_bytes()

    async def all_of() -> list[bytes | None]:
        return await asyncio.gather(*(one(k) for k in keys))

    return dict(zip(keys, zc.run_sync(all_of()), strict=True)) if keys else {}


def remote_reads(store: Any) -> RemoteReads | None:
    """The :class:`RemoteReads` of a zarr store that has async reads but no synchronous
    ones (made once per store object), else None."""
    if callable(getattr(store, "get_sync", None)) and getattr(store, "supports_sync", True):
        return None
    if not callable(getattr(store, "get", None)):
        return None
    reads = getattr(store, "_sparsestore_reads", None)
    if reads is None:
        reads = RemoteReads(store)
        # A store that takes no attributes gets one per decoder instead.
        with contextlib.suppress(AttributeError):
            store._sparsestore_reads = reads
    return reads


class Prefetch:
    """Reads :func:`prefetch_chunks` started; :meth:`release` once the chunks are decoded."""

    def __init__(self) -> None:
        self.started: list[tuple[RemoteReads, list[Request]]] = []

    def release(self) -> None:
        for reads, reqs in self.started:
            reads.release(reqs)
        self.started.clear()


def prefetch_chunks(jobs: Sequence[tuple[Any, Iterable[int]]]) -> Prefetch | None:
    """Start reading chunks ``ks`` of each ``(decoder, ks)``
    (:class:`~sparsestore.chunks.ChunkDecoder`) on remote stores, all at once.

    Sharded arrays need the index of each shard first: those not kept by the decoder yet
    are fetched together, then the inner chunks.  None when no decoder reads remotely
    (local stores: nothing to do).
    """
    todo = [(d, list(ks)) for d, ks in jobs if d.remote is not None]
    if not todo:
        return None
    out = Prefetch()
    shards = [(d, d.missing_indexes(ks)) for d, ks in todo]
    if any(s for _, s in shards):
        index_reqs = Prefetch()
        for d, ss in shards:
            if ss:
                index_reqs.started.append((d.remote, d.remote.prefetch(d.index_requests(ss))))
        try:
            for d, ss in shards:
                for s in ss:
                    with contextlib.suppress(Exception):  # the decode raises it again
                        d.load_index(s)
        finally:
            index_reqs.release()
    for d, ks in todo:
        out.started.append((d.remote, d.remote.prefetch(d.chunk_requests(ks))))
    return out


def prefetch_unit(caches: Sequence[Any], ranges: Sequence[tuple[int, int]]) -> Prefetch | None:
    """Start reading every chunk that elements ``[lo, hi)`` of each range touch, in each
    :class:`~sparsestore.chunk_cache.ChunkCache` (a unit's ``data`` and ``indices``), except
    those the cache holds (or holds the needed piece of); None for local stores."""
    jobs = []
    for cache in caches:
        if cache.decoder.remote is None:
            return None
        jobs.append((cache.decoder, cache.wanted(ranges)))
    return prefetch_chunks(jobs)


__all__ = ["BUDGET_BYTES", "MAX_REQUESTS", "Prefetch", "RemoteReads", "Request", "get_many",
           "prefetch_chunks", "prefetch_unit", "remote_reads"]
