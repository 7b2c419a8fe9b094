"""Chunk I/O: every storage chunk sparsestore reads or writes itself goes through here.

``data`` and ``indices`` are chunked along nnz.  :class:`ChunkDecoder` decodes one whole
chunk into a buffer the caller owns and :class:`ChunkEncoder` stores one, both directly for
the codec chains sparsestore writes and through zarr otherwise; the zarr internals they need
live in :mod:`sparsestore.zarr_compat`, which turns the direct paths off outside the zarr
releases it supports (the caches that keep decoded chunks are in
:mod:`sparsestore.chunk_cache`).  :func:`read_ranges` reads scattered nnz ranges, each
touched chunk decoded once, straight into its output; damage raises
:class:`ChecksumError` / :class:`CorruptStoreError` naming the chunk on every path.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import zarr_compat as zc
from .buffers import BufferPool
from .errors import ChecksumError, CorruptStoreError, SparseStoreError
from .fetch import RemoteReads
from .integrity import DamagedChunk, decode_chain, decode_many

#: Threads that decode the chunks one scattered read (``store[rows]``) touches.
RANGE_READ_WORKERS = 2


def range_positions(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, e)`` for every pair, vectorised."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(ends, dtype=np.int64) - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)


def chunk_pieces(starts: np.ndarray, ends: np.ndarray, chunk: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Non-empty element ranges ``[s, e)`` cut at chunk boundaries: each piece's chunk,
    its ``[a, b)`` and the range it came from, ranges in order."""
    first, last = starts // chunk, (ends - 1) // chunk
    k = range_positions(first, last + 1)
    rng = np.repeat(np.arange(starts.size), last - first + 1)
    return (k, np.maximum(starts[rng], k * chunk), np.minimum(ends[rng], (k + 1) * chunk),
            rng)


def read_slice(arr: Any, start: int, stop: int, *, name: str | None = None) -> np.ndarray:
    """``arr[start:stop]`` as numpy, turning a CRC32C failure into :class:`ChecksumError`."""
    try:
        return np.asarray(arr[start:stop])
    except SparseStoreError:
        raise
    except ValueError as exc:
        if not zc.is_checksum_failure(exc):
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
            if zc.is_checksum_failure(exc):
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
    except SparseStoreError:
        raise
    except ValueError as exc:
        if not zc.is_checksum_failure(exc):
            raise
        ids = np.unique(rows // int(arr.chunks[0]))
        raise locate_checksum_error(arr, 0, 0, name, chunk_ids=ids) from exc


#: Most decoded bytes a gather stages at once: the inner chunks it needs of one shard are
#: fetched and decoded together (see :meth:`ChunkDecoder.decode_chunks`), then their pieces
#: are copied out.
STAGE_BYTES = 8 * 2**20


class RangeGather:
    """Element ranges of one array, written one after another into an output: cut into
    per-chunk pieces and grouped by chunk, so each touched chunk is decoded once and all
    its pieces are copied out of it together (ranges may come in any order and repeat)."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray, out_at: np.ndarray,
                 chunk: int) -> None:
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        out_at = np.asarray(out_at, dtype=np.int64)
        keep = ends > starts
        s, e, o = starts[keep], ends[keep], out_at[keep]
        self.chunk = int(chunk)
        k, a, b, rng = chunk_pieces(s, e, self.chunk)
        at = o[rng] + (a - s[rng])
        srt = np.argsort(k, kind="stable")
        self.k, self.a, self.b, self.at = k[srt], a[srt], b[srt], at[srt]
        self.chunk_ids, first = np.unique(self.k, return_index=True)
        self.edges = np.append(first, self.k.size)

    def groups(self, js: np.ndarray | range, max_chunks: int, per: int) -> list[np.ndarray]:
        """``js`` (positions in :attr:`chunk_ids`, ascending) in groups decoded together: at
        most ``max_chunks`` chunks of one stored object (``per`` chunks an object)."""
        js = np.asarray(js, dtype=np.int64)
        if not js.size:
            return []
        obj = self.chunk_ids[js] // per
        out: list[np.ndarray] = []
        for grp in np.split(js, np.flatnonzero(obj[1:] != obj[:-1]) + 1):
            out.extend(grp[i : i + max_chunks] for i in range(0, grp.size, max_chunks))
        return out

    def copy(self, js: np.ndarray, src: np.ndarray, out: np.ndarray) -> None:
        """Copy the pieces of chunks ``chunk_ids[js]`` into ``out``; ``src`` holds those
        chunks decoded, one whole-chunk slot each, in that order."""
        c = self.chunk
        for slot, j in enumerate(js.tolist()):
            base = int(self.chunk_ids[j]) * c - slot * c
            p = slice(int(self.edges[j]), int(self.edges[j + 1]))
            # One slice copy a piece (a memcpy): pieces are whole rows' values.
            for a, b, at in zip(self.a[p].tolist(), self.b[p].tolist(), self.at[p].tolist(),
                                strict=True):
                out[at : at + b - a] = src[a - base : b - base]


def read_ranges(
    arr: Any, starts: np.ndarray, ends: np.ndarray, *, name: str | None = None,
    workers: int = RANGE_READ_WORKERS,
) -> np.ndarray:
    """Concatenation of ``arr[s:e]`` for each range, decoding each touched chunk once.

    Ranges may come in any order and may repeat; output follows their order.  Touched
    chunks are decoded on ``workers`` threads (Blosc and CRC32C run without the GIL), those
    of one shard together, and their pieces copied straight into the output, so memory is
    the output plus a chunk (a shard's chunks, at most :data:`STAGE_BYTES`) per thread,
    however many chunks scattered ranges touch.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    lens = np.maximum(ends - starts, 0)
    out_at = np.concatenate([[0], np.cumsum(lens)])
    out = np.empty((int(out_at[-1]), *arr.shape[1:]), dtype=arr.dtype)
    if not out.shape[0]:
        return out
    c = int(arr.chunks[0])
    plan = RangeGather(starts, ends, out_at[:-1], c)
    decoder = ChunkDecoder(arr, name)
    most = decoder.group_chunks()
    runs = plan.groups(range(plan.chunk_ids.size), most, decoder.chunks_per_object)

    def run(mine: list[np.ndarray]) -> None:
        stage = np.empty((most * c, *arr.shape[1:]), arr.dtype)
        for js in mine:
            decoder.decode_chunks(plan.chunk_ids[js], stage[: js.size * c])
            plan.copy(js, stage, out)

    on_threads(run, runs, workers, "sparsestore-ranges")
    return out


def on_threads(run: Any, items: list[Any], workers: int, name: str) -> None:
    """``run`` on ``workers`` shares of ``items`` (dealt in turn): the caller's thread takes
    one, short-lived threads the others; the first failure is raised."""
    w = max(1, min(int(workers), len(items)))
    if w == 1:
        run(items)
        return
    with ThreadPoolExecutor(max_workers=w - 1, thread_name_prefix=name) as ex:
        futs = [ex.submit(run, items[i::w]) for i in range(1, w)]
        run(items[0::w])
        for f in futs:
            f.result()


# ------------------------------------------------------------------ direct chunk decoding


class ChunkDecoder:
    """Decodes whole storage chunks of one 1-D zarr array into buffers the caller owns.

    For the codec chains sparsestore writes (``bytes``, then optionally Blosc, then
    optionally CRC32C) on a store with synchronous reads, a chunk's bytes are fetched
    (read straight into a pooled buffer on local disk), its CRC32C checked and
    Blosc-decompressed straight into the destination: no event-loop round trip, no
    intermediate arrays.  The streaming path decodes the same chunk sizes over and over,
    so this is where reused memory pays (see :mod:`sparsestore.buffers`).

    In a sharded array a chunk is an inner chunk of a shard: the shard's index is read
    once (checked against its CRC32C and, through
    :class:`~sparsestore.verified.VerifiedStore`, the manifest) and kept in a small LRU,
    then each inner chunk is one range read, checked against its own tag.  zarr instead
    reads the index again before every inner chunk it fetches.  On object storage the
    bytes come through :class:`~sparsestore.fetch.RemoteReads` (:attr:`remote`), which can
    fetch the chunks a caller is about to decode ahead, many at once
    (:func:`~sparsestore.fetch.prefetch_chunks`, with :meth:`chunk_requests`).  Anything
    else (other codecs) goes through zarr; either way each call decodes exactly one storage
    chunk and damage raises :class:`ChecksumError` / :class:`CorruptStoreError` naming the
    chunk.
    """

    #: Shard indexes kept per decoder (each ``16 * inner chunks per shard`` bytes).
    INDEX_CACHE = 256

    def __init__(self, arr: Any, name: str | None = None) -> None:
        self.arr = arr
        self.name = name or arr.path or "array"
        self.chunk = int(arr.chunks[0])
        self.size = int(arr.shape[0])
        self.tail = tuple(int(d) for d in arr.shape[1:])  # trailing axes (labels may have them)
        self.dtype = np.dtype(arr.dtype)
        self.fill = arr.fill_value
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.tail, dtype=np.int64))
        self.direct = zc.direct_plan(arr)
        self.sharded = None if self.direct is not None else zc.shard_plan(arr)
        #: Chunks one stored object holds, fetched together: a shard's inner chunks, else 1.
        self.chunks_per_object = 1 if self.sharded is None else self.sharded.per
        self._indexes: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._index_lock = threading.Lock()
        self.index_reads = 0  # shard indexes read (for tests and benchmarks)
        self._scratch = threading.local()  # each thread's buffer for compressed inner chunks

    def group_chunks(self) -> int:
        """Chunks decoded together by a gather: those of one stored object (one fetch), at
        most :data:`STAGE_BYTES` of them."""
        stage = STAGE_BYTES // max(1, self.chunk * self.row_bytes)
        return max(1, min(self.chunks_per_object, stage))

    @property
    def is_direct(self) -> bool:
        """Whether chunks are decoded here (True) or through zarr's codec pipeline."""
        return self.direct is not None or self.sharded is not None

    @property
    def remote(self) -> Any:
        """The :class:`~sparsestore.fetch.RemoteReads` chunks are read through (object
        storage), None for stores read synchronously or chunks zarr decodes."""
        plan = self.direct if self.direct is not None else self.sharded
        store = None if plan is None else plan[0]
        return store if isinstance(store, RemoteReads) else None

    def missing_indexes(self, ks: Any) -> list[int]:
        """Shards holding chunks ``ks`` whose index is not kept here yet (sharded only)."""
        if self.sharded is None:
            return []
        per = self.sharded.per
        return sorted({int(k) // per for k in ks} - set(self._indexes))

    def index_requests(self, shards: Any) -> list[tuple[tuple[str, int, None], int]]:
        """The reads of shards' indexes, as :meth:`~sparsestore.fetch.RemoteReads.prefetch`
        takes them."""
        plan = self.sharded
        assert plan is not None
        n = plan.index_bytes
        return [((zc.chunk_key(self.arr, plan.prefix, int(s)), -n, None), n) for s in shards]

    def load_index(self, s: int) -> None:
        """Read and keep shard ``s``'s index (a prefetched one is taken)."""
        assert self.sharded is not None
        self._index(int(s), zc.chunk_key(self.arr, self.sharded.prefix, int(s)), False)

    def chunk_requests(self, ks: Any) -> list[tuple[tuple[str, int | None, int | None], int]]:
        """The reads decoding chunks ``ks`` makes, with their expected sizes, as
        :meth:`~sparsestore.fetch.RemoteReads.prefetch` takes them: whole objects, or inner
        chunks of shards whose index is kept here (others are left to the decode)."""
        want = self.chunk * self.dtype.itemsize * max(1, int(np.prod(self.tail)))
        out: list[tuple[tuple[str, int | None, int | None], int]] = []
        if self.direct is not None:
            prefix = self.direct[1]
            for k in ks:
                out.append(((zc.chunk_key(self.arr, prefix, int(k)), None, None), want))
            return out
        plan = self.sharded
        if plan is None:
            return out
        for k in ks:
            s, i = divmod(int(k), plan.per)
            index = self._indexes.get(s)
            if index is None:
                continue
            off, nbytes = (int(v) for v in index[i])
            if off == zc.SHARD_EMPTY or nbytes > want + 1024:
                continue
            out.append(((zc.chunk_key(self.arr, plan.prefix, s), off, off + nbytes), nbytes))
        return out

    def bounds(self, k: int) -> tuple[int, int]:
        """Elements ``[lo, hi)`` chunk ``k`` holds."""
        lo = k * self.chunk
        return lo, min(lo + self.chunk, self.size)

    def decode_into(self, k: int, out: np.ndarray, pool: BufferPool | None = None) -> None:
        """Decode chunk ``k`` into ``out[:hi - lo]``.

        ``out`` (this array's dtype and trailing axes, C-contiguous) must hold a whole chunk
        (``self.chunk`` elements) unless ``k`` is the last chunk and ``out`` holds exactly
        its elements: Blosc writes the whole stored chunk.  ``pool`` lends the buffer the
        compressed bytes are read into.
        """
        lo, hi = self.bounds(k)
        n = hi - lo
        if not self.is_direct:
            out[:n] = read_slice(self.arr, lo, hi, name=self.name)
            return
        want = self.chunk * self.dtype.itemsize
        dest = out.view(np.uint8)
        if dest.size < want:  # the last chunk is stored whole: decode it aside
            whole = np.empty(self.chunk, self.dtype) if pool is None else pool.take(
                self.chunk, self.dtype)
            self.decode_into(k, whole, pool)
            out[:n] = whole[:n]
            return
        if self.direct is not None:
            store, prefix, steps, crc = self.direct
            raw = zc.fetch(store, zc.chunk_key(self.arr, prefix, k), pool)
            if raw is None:  # never written: zarr's fill value
                out[:n] = self.fill
                return
            self._decode_raw(k, raw, steps, crc, dest[:want])
            return
        kept = k // self.sharded.per in self._indexes
        try:
            stored = self._decode_inner(k, dest[:want], pool, fresh=False)
        except SparseStoreError:
            if not kept:
                raise
            # The index kept here may predate a committed append that rewrote this (last,
            # partly filled) shard: read it afresh once; damage fails again.
            stored = self._decode_inner(k, dest[:want], pool, fresh=True)
        if not stored:  # never written: zarr's fill value
            out[:n] = self.fill

    def decode_chunks(self, ks: Sequence[int], out: np.ndarray,
                      pool: BufferPool | None = None, workers: int = 1) -> None:
        """Decode chunks ``ks`` (ascending) into ``out``, one whole-chunk slot each, in
        order, as :meth:`decode_into` each.

        In a sharded array the inner chunks of one shard are fetched together (one read
        for neighbours, one request on object storage) and checked one by one, so small
        inner chunks cost a decode each, not a read and a lookup each.  ``workers`` > 1
        (a caller on no thread pool of its own) decodes several shards at once: an inner
        chunk is too small for Blosc to split across its own threads.
        """
        c, ks, per = self.chunk, [int(k) for k in ks], self.chunks_per_object
        runs, i = [], 0
        while i < len(ks):
            j = i + 1
            while j < len(ks) and ks[j] // per == ks[i] // per:
                j += 1
            runs.append((i, j))
            i = j

        def decode(mine: list[tuple[int, int]]) -> None:
            for i, j in mine:
                part = out[i * c : j * c]
                if j - i < 2 or not self._decode_shard_chunks(ks[i:j], part, pool):
                    for n, k in enumerate(ks[i:j]):
                        self.decode_into(k, part[n * c : (n + 1) * c], pool)

        on_threads(decode, runs, workers if self.sharded is not None else 1, "sparsestore-shards")

    def _decode_shard_chunks(self, ks: list[int], out: np.ndarray,
                             pool: BufferPool | None) -> bool:
        """Inner chunks ``ks`` of one shard into ``out`` by one fetch; False when one is not
        stored, or the fetch or a decode fails: the caller then decodes them one by one
        (rewriting ``out``), which reads a stale kept index afresh or names what is wrong."""
        plan = self.sharded
        assert plan is not None
        s = ks[0] // plan.per
        key = zc.chunk_key(self.arr, plan.prefix, s)
        try:
            index = self._index(s, key, False)
        except SparseStoreError:
            return False
        if index is None:
            return False
        ent = index[np.asarray(ks, np.int64) - s * plan.per]
        offs, sizes = ent[:, 0], ent[:, 1]
        want = out.nbytes // len(ks)
        if ((offs == zc.SHARD_EMPTY).any() or (sizes > want + 1024).any()
                or (offs[1:] < offs[:-1] + sizes[:-1]).any()):
            return False
        ranges = list(zip(offs.tolist(), (offs + sizes).tolist(), strict=True))
        total = ranges[-1][1] - ranges[0][0]
        scratch = getattr(self._scratch, "run", None)
        if scratch is None or scratch.size < total:  # per thread, reused fetch after fetch
            scratch = self._scratch.run = np.empty(max(total, 2 * want), np.uint8)
        try:
            raws = zc.fetch_run(plan.store, key, ranges, pool, scratch)
        except SparseStoreError:
            return False
        if raws is None:
            return False
        # On failure, one by one: a kept index that went stale is read afresh, and damage
        # is named.
        return decode_many(raws, plan.steps, out.reshape(-1).view(np.uint8))

    def _decode_inner(self, k: int, dest: np.ndarray, pool: BufferPool | None,
                      fresh: bool) -> bool:
        """Inner chunk ``k`` of a shard into ``dest``; False when it was never stored."""
        plan = self.sharded
        assert plan is not None
        s, i = divmod(k, plan.per)
        key = zc.chunk_key(self.arr, plan.prefix, s)
        index = self._index(s, key, fresh)
        if index is None:
            return False
        off, nbytes = (int(v) for v in index[i])
        if off == zc.SHARD_EMPTY:
            return False
        if nbytes > dest.size + 1024 or off + nbytes > 2**62:  # beyond any encoding of it
            raise CorruptStoreError(
                f"the index of shard {s} of array {self.name!r} gives chunk {k} {nbytes} "
                "bytes, more than any encoding of it takes: the shard is damaged; restore "
                "the store from a copy"
            )
        scratch = getattr(self._scratch, "buf", None)
        if scratch is None:  # per thread: the compressed bytes live only until decoded
            scratch = self._scratch.buf = np.empty(dest.size + 1024, np.uint8)
        raw = zc.fetch_range(plan.store, key, off, off + nbytes, pool, scratch)
        if raw is None:  # the shard vanished since its index was read
            return False
        self._decode_raw(k, raw, plan.steps, plan.crc, dest)
        return True

    def _index(self, s: int, key: str, fresh: bool) -> np.ndarray | None:
        """Shard ``s``'s index as ``(inner chunks, 2)`` (offset, nbytes), read once and
        kept; None when the shard was never stored."""
        plan = self.sharded
        assert plan is not None
        with self._index_lock:
            if not fresh and s in self._indexes:
                self._indexes.move_to_end(s)
                return self._indexes[s]
            raw = zc.fetch_suffix(plan.store, key, plan.index_bytes)
            self.index_reads += 1
            index = None
            if raw is not None:
                if raw.size != plan.index_bytes or plan.crc(raw[:-4]) != zc.le32(raw[-4:]):
                    lo = s * plan.per * self.chunk
                    raise ChecksumError(
                        f"checksum mismatch in the index of shard {s} of array {self.name!r} "
                        f"(elements {lo}:{min(lo + plan.per * self.chunk, self.size)}): the "
                        "shard is damaged on disk; restore the store from a copy"
                    )
                index = np.frombuffer(raw[:-4].tobytes(), "<u8").reshape(plan.per, 2)
            self._indexes[s] = index
            while len(self._indexes) > self.INDEX_CACHE:
                self._indexes.popitem(last=False)
            return index

    def _decode_raw(self, k: int, raw: np.ndarray, steps: tuple[str, ...], crc: Any,
                    dest: np.ndarray) -> None:
        """A stored chunk's bytes, checked and decoded into ``dest`` (its whole decoded size)."""
        try:
            decode_chain(raw, steps, dest)
        except DamagedChunk as exc:
            if exc.what == "checksum":
                lo, hi = self.bounds(k)
                raise locate_checksum_error(self.arr, lo, hi, self.name, chunk_ids=[k]) from None
            what = {"header": "has a bad Blosc header", "blosc": "does not decompress",
                    "size": f"is not {dest.size} bytes"}[exc.what]
            raise CorruptStoreError(
                f"chunk {k} of array {self.name!r} {what}: the chunk is damaged; restore the "
                "store from a copy"
            ) from None

    def read(self, k: int, room: int = 0, pool: BufferPool | None = None) -> np.ndarray:
        """Chunk ``k``'s elements in a new array (from ``pool`` if given), ``room`` spare after."""
        lo, hi = self.bounds(k)
        shape = (max(self.chunk, hi - lo + room), *self.tail)
        out = np.empty(shape, self.dtype) if pool is None else pool.take(shape, self.dtype)
        self.decode_into(k, out, pool)
        return out[: hi - lo + room]


class ChunkEncoder:
    """Encodes whole chunks of one 1-D zarr array and stores them, byte for byte as zarr's
    own codec pipeline would, without its event-loop round trip per chunk.

    The write-side twin of :class:`ChunkDecoder`, for the same codec chains (``bytes``,
    then optionally Blosc, then optionally CRC32C, unsharded) on a store with synchronous
    writes: Blosc is numcodecs' ``Blosc`` built from the array's own codec configuration
    (as zarr builds it), the checksum is ``google_crc32c``, and the bytes go to the store's
    ``set_sync``.  :meth:`for_array` gives None for anything else, and the caller lets zarr
    write.  Measured in the convert writer, the round trip per chunk was the serial part
    that kept a second decode worker waiting.
    """

    def __init__(self, arr: Any, plan: tuple[Any, str, tuple[str, ...], Any], blosc: Any,
                 buffer: Any) -> None:
        self.arr = arr
        self.chunk = int(arr.chunks[0])
        self.dtype = np.dtype(arr.dtype)
        self.fill = arr.fill_value
        self.store, self.prefix, steps, self.crc = plan
        self.steps = tuple(reversed(steps))  # encode order
        self.blosc = blosc
        self.buffer = buffer  # zarr's Buffer class for the store's set_sync
        self._pad: np.ndarray | None = None

    @classmethod
    def for_array(cls, arr: Any) -> ChunkEncoder | None:
        """An encoder for ``arr``, or None when zarr must write it (see the class doc)."""
        plan = zc.direct_plan(arr)
        shard = None if plan is not None else zc.shard_plan(arr)
        if shard is not None:
            plan = (shard.store, shard.prefix, shard.steps, shard.crc)
        if plan is None or not getattr(plan[0], "supports_sync", False):
            return None
        try:
            if shard is not None:
                return ShardEncoder(arr, plan, zc.blosc_codec(arr), zc.buffer_class(), shard.per)
            return cls(arr, plan, zc.blosc_codec(arr), zc.buffer_class())
        except Exception:  # zarr internals not as expected: zarr writes
            return None

    def encode(self, values: np.ndarray) -> bytes:
        """One chunk's stored bytes: ``values`` (a whole chunk, or its start: the rest is the
        fill value, as zarr stores a chunk at the array's end) through the codec chain."""
        if values.size < self.chunk:
            if self._pad is None:
                self._pad = np.empty(self.chunk, self.dtype)
            self._pad[: values.size] = values
            self._pad[values.size :] = self.fill
            values = self._pad
        raw: Any = np.ascontiguousarray(values, dtype=self.dtype).view(np.uint8)
        for step in self.steps:
            if step == "blosc":
                raw = self.blosc.encode(raw)
            else:  # crc32c, appended little-endian (join: one copy of the chunk)
                raw = b"".join((raw, (self.crc(raw) & 0xFFFFFFFF).to_bytes(4, "little")))
        return bytes(raw)

    def write(self, k: int, values: np.ndarray) -> None:
        """Store ``values`` as chunk ``k``: a whole chunk, or the start of one (the rest is
        the fill value, as zarr stores a chunk at the array's end)."""
        zc.store_bytes(self.store, zc.chunk_key(self.arr, self.prefix, k), self.encode(values),
                       self.buffer)


class ShardEncoder(ChunkEncoder):
    """Encodes whole shards of a sharded 1-D array as zarr's sharding codec lays them out:
    the inner chunks (each through the inner codec chain) one after another, then the index
    (an (offset, nbytes) little-endian u64 pair per inner chunk, empty ones all ones) and its
    CRC32C.  Inner chunks past the array's end are not stored, as zarr leaves them."""

    def __init__(self, arr: Any, plan: tuple[Any, str, tuple[str, ...], Any], blosc: Any,
                 buffer: Any, per: int) -> None:
        super().__init__(arr, plan, blosc, buffer)
        self.per = per

    def write(self, k: int, values: np.ndarray) -> None:
        """Store ``values`` as shard ``k``: a whole shard, or its start at the array's end."""
        parts: list[bytes] = []
        index = np.full((self.per, 2), zc.SHARD_EMPTY, dtype="<u8")
        off = 0
        for i, lo in enumerate(range(0, min(values.size, self.per * self.chunk), self.chunk)):
            raw = self.encode(values[lo : lo + self.chunk])
            index[i] = (off, len(raw))
            parts.append(raw)
            off += len(raw)
        body = index.tobytes()
        parts += [body, (self.crc(body) & 0xFFFFFFFF).to_bytes(4, "little")]
        zc.store_bytes(self.store, zc.chunk_key(self.arr, self.prefix, k), b"".join(parts),
                       self.buffer)

