"""VerifiedStore: the zarr store wrapper that holds every read to the chunk manifest.

Each opened store's zarr store is wrapped: every chunk read is checked against the
committed :class:`~sparsestore.integrity.Manifest` (absent -> :class:`MissingChunkError`,
another tag -> :class:`MisplacedChunkError`, another generation or an earlier commit on
disk -> :class:`StoreChangedError`), and every chunk write records its tag, from which
:func:`build_manifest` makes the next commit's manifest.  The manifest's arithmetic lives
in :mod:`sparsestore.integrity`; this module is where it meets storage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import (
    ChecksumError,
    CorruptStoreError,
    MisplacedChunkError,
    MissingChunkError,
    StoreChangedError,
)
from .integrity import (
    EMPTY_OFFSET,
    ArrayManifest,
    DamagedChunk,
    Manifest,
    array_meta,
    crc32c,
    decode_chain,
    fingerprint,
    inner_tags,
    n_objects,
    per_object,
    split_chunk_key,
    trailer_tagged,
    trailing_tag,
    went_back,
)
from .localfiles import pread, pread_each, read_whole
from .storage import current_batch
from .zarr_compat import (
    OffsetByteRequest,
    RangeByteRequest,
    SuffixByteRequest,
    WrapperStore,
    chunk_key,
    default_buffer_prototype,
)

if TYPE_CHECKING:
    from .buffers import BufferPool


def _as_np(buf: Any) -> np.ndarray | None:
    return None if buf is None else buf.as_numpy_array().view(np.uint8)

class VerifiedStore(WrapperStore):
    """A zarr store that checks every chunk read against the committed manifest and
    records the tag of every chunk written (see the module docstring)."""

    def __init__(self, store: Any, prefix: str = "") -> None:
        super().__init__(store)
        self.manifest: Manifest | None = None
        self.prefix = prefix  # path of the matrix group inside the store
        self.label = str(getattr(store, "root", store))
        self.written: dict[str, dict[int, int | None]] = {}
        self._kinds: dict[str, tuple[bool, int]] = {}  # array -> (trailer tag, per object)
        self._offsets: dict[str, dict[int, int]] = {}  # shard key -> inner chunk by offset
        # Metadata documents read ahead while a handle opens (see preload), shared with the
        # copies zarr makes of this store.
        self._preloaded: dict[str, bytes | None] = {}

    def _with_store(self, store: Any) -> VerifiedStore:
        out = type(self)(store, self.prefix)
        out.manifest, out.label, out.prefix = self.manifest, self.label, self.prefix
        out._preloaded = self._preloaded
        return out

    # ------------------------------------------------------------ opening
    def preload(self, docs: Mapping[str, bytes | None]) -> None:
        """Answer whole reads of these keys (metadata documents; None: absent) from memory
        until :meth:`forget_preloaded`, so opening a remote store reads each once, all
        requested together, instead of one round trip per document as zarr asks for it.
        Chunk keys are never preloaded: their reads stay checked against the manifest."""
        self._preloaded.update(docs)

    def forget_preloaded(self) -> None:
        """Read every key from storage again (called once the handle has loaded)."""
        self._preloaded.clear()

    # ------------------------------------------------------------ manifest
    def install(self, manifest: Manifest | None, prefix: str = "") -> None:
        """Check reads against ``manifest`` from now on.  Tags recorded for writes stay:
        they describe the bytes on disk until the commit that publishes them."""
        self.manifest, self.prefix = manifest, (prefix + "/" if prefix else "")

    @property
    def supports_sync(self) -> bool:
        return callable(getattr(self._store, "get_sync", None))

    @property
    def root(self) -> Path | None:
        root = getattr(self._store, "root", None)
        return root if isinstance(root, Path) else None

    def _ref(self, key: str) -> tuple[str, ArrayManifest, int] | None:
        """(array, its manifest, object index) for a chunk key the manifest covers."""
        if self.manifest is None or not key.startswith(self.prefix):
            return None
        parts = split_chunk_key(key[len(self.prefix):])
        if parts is None:
            return None
        name, k, _ = parts
        am = self.manifest.arrays.get(name)
        if am is None or k * am.per_object >= am.tags.size:
            return None
        return name, am, k

    def _verdict(self, am: ArrayManifest, k: int, raw: np.ndarray | None, whole: bool) -> str:
        """"ok", "missing" or "misplaced" for chunk ``k``'s bytes."""
        if raw is None:
            return "missing"
        if am.trailer:
            tag = trailing_tag(raw)
        elif whole:
            tag = crc32c(raw)
        else:
            return "ok"  # a part of an object without a trailing tag: nothing to compare
        if tag == int(am.tags[k]):
            return "ok"
        if whole and k == am.tags.size - 1 and am.tail is not None and am.steps is not None:
            # An append since this handle opened rewrote the last, partly filled chunk: its
            # committed rows must be the same bytes.
            try:
                dec = decode_chain(raw, am.steps)
            except DamagedChunk:
                return "misplaced"
            n = (am.length - k * am.chunk) * am.row_bytes
            if dec.size >= n and crc32c(dec[:n]) == am.tail:
                return "ok"
        return "misplaced"

    def _failure(self, key: str, am: ArrayManifest, s: int, raw: np.ndarray | None,
                 byte_range: Any) -> tuple[str, int, np.ndarray | None] | None:
        """The first failing (verdict, chunk, its bytes) of a read of object ``s``, or None.

        A shard is read as its index (a suffix), then inner chunks (ranges): the index says
        which inner chunk a range is, and each is checked against its own tag.  An index
        naming the same bytes twice is misplaced; a range that no index read here names is
        "unknown" (the caller reads the index afresh, see :meth:`_after_index`).
        """
        if am.per_object == 1:
            if isinstance(byte_range, (RangeByteRequest, OffsetByteRequest)):
                return None if raw is not None else ("missing", s, None)
            verdict = self._verdict(am, s, raw, byte_range is None)
            return None if verdict == "ok" else (verdict, s, raw)
        per, first = am.per_object, s * am.per_object
        if raw is None:
            return "missing", first, None
        if byte_range is None:
            for i, tag in enumerate(inner_tags(raw, per, am.trailer)):
                k = first + i
                if k < am.tags.size and tag != int(am.tags[k]):
                    return ("missing" if tag is None else "misplaced"), k, None
            return None
        if isinstance(byte_range, SuffixByteRequest):
            size = per * 16 + 4
            if raw.size < size:
                return "misplaced", first, None
            index = np.frombuffer(raw[-size:-4].tobytes(), "<u8").reshape(per, 2).tolist()
            if len(self._offsets) > 4096:
                self._offsets.clear()
            entries: dict[int, tuple[int, int]] = {}
            self._offsets[key] = entries
            for i, (off, n) in enumerate(index):
                if off == EMPTY_OFFSET:
                    if first + i < am.tags.size:
                        return "missing", first + i, None
                    continue
                if off in entries:
                    # Two inner chunks name the same bytes: at most one of them is its own.
                    j = entries[off][0]
                    if first + j < am.tags.size:
                        return "misplaced", first + j, None
                entries[off] = (i, off + n)
            return None
        if isinstance(byte_range, RangeByteRequest):
            # The range is checked against the tag of the inner chunk whose index entry
            # names exactly these bytes; a range no entry names fails closed.
            entry = self._offsets.get(key, {}).get(byte_range.start)
            if entry is None or entry[1] != byte_range.end:
                return "unknown", first, None
            i = entry[0]
            if first + i >= am.tags.size:
                return None
            verdict = self._verdict(am, first + i, raw, True)
            return None if verdict == "ok" else (verdict, first + i, raw)
        return None

    @staticmethod
    def _index_request(am: ArrayManifest) -> Any:
        """The read of a shard's index (at its end: an index and its CRC32C)."""
        return SuffixByteRequest(am.per_object * 16 + 4)

    def _after_index(self, key: str, am: ArrayManifest, s: int, index: np.ndarray | None,
                     raw: np.ndarray | None, byte_range: Any
                     ) -> tuple[str, int, np.ndarray | None] | None:
        """Check a range read again once the shard's index has been read afresh (the one
        it came from was not known here); a range the index does not name is misplaced."""
        bad = self._failure(key, am, s, index, self._index_request(am))
        if bad is None:
            bad = self._failure(key, am, s, raw, byte_range)
        if bad is not None and bad[0] == "unknown":
            return "misplaced", bad[1], None
        return bad

    def check_sync(self, key: str, raw: np.ndarray | None, byte_range: Any = None) -> None:
        """Check a chunk read synchronously (raises on failure)."""
        ref = self._ref(key)
        if ref is None:
            return
        name, am, s = ref
        bad = self._failure(key, am, s, raw, byte_range)
        if bad is not None and bad[0] == "unknown":
            index = self._store.get_sync(key, byte_range=self._index_request(am))
            bad = self._after_index(key, am, s, _as_np(index), raw, byte_range)
        if bad is not None:
            root = self._store.get_sync(self._root_key()) if self.supports_sync else None
            self._recheck(name, am, bad[1], bad[2], bad[0],
                          None if root is None else root.to_bytes())

    async def _check(self, key: str, buf: Any, byte_range: Any) -> None:
        ref = self._ref(key)
        if ref is None:
            return
        name, am, s = ref
        raw = _as_np(buf)
        bad = self._failure(key, am, s, raw, byte_range)
        if bad is not None and bad[0] == "unknown":
            index = await self._store.get(key, default_buffer_prototype(),
                                          self._index_request(am))
            bad = self._after_index(key, am, s, _as_np(index), raw, byte_range)
        if bad is not None:
            root = await self._store.get(self._root_key(), default_buffer_prototype())
            self._recheck(name, am, bad[1], bad[2], bad[0],
                          None if root is None else root.to_bytes())

    def _root_key(self) -> str:
        return self.prefix + "zarr.json"

    def _recheck(self, name: str, am: ArrayManifest, k: int, raw: np.ndarray | None,
                 verdict: str, root_json: bytes | None) -> None:
        """Raise the error for a failed check, after looking at what is committed now."""
        current = _manifest_in(root_json)
        if current is not None and self.manifest is not None:
            if current.generation != self.manifest.generation:
                raise StoreChangedError(
                    f"{self.label} was replaced by another store since it was opened here; "
                    "open it again (sparsestore.open) to read the new one"
                )
            if not current.follows(self.manifest):
                raise went_back(self.label, "it was opened here")
            now = current.arrays.get(name)
            if (raw is not None and now is not None and k >= am.full and k < now.tags.size
                    and am.trailer and trailing_tag(raw) == int(now.tags[k])):
                return  # the partly filled object, rewritten by a committed append
        lo = k * am.chunk
        where = f"chunk {k} of array {name!r} (rows/elements {lo}:{min(lo + am.chunk, am.length)})"
        if raw is not None and am.trailer and (
                raw.size < 4 or crc32c(raw[:-4]) != trailing_tag(raw)):
            raise ChecksumError(  # not even self-consistent: damaged, not misplaced
                f"checksum mismatch in array {name!r}, chunk {k} (elements {lo}:"
                f"{min(lo + am.chunk, am.length)}): the chunk is damaged on disk; restore the "
                "store from a copy"
            )
        if verdict == "missing":
            raise MissingChunkError(
                f"{self.label}: {where} is missing from storage; the store is damaged: restore "
                "it from a copy (`sparsestore validate` lists every missing chunk)"
            )
        raise MisplacedChunkError(
            f"{self.label}: {where} holds a chunk that was not committed at that position (it "
            "was moved, copied from another store, or changed outside sparsestore); restore "
            "the store from a copy"
        )

    # ---------------------------------------------------------------- reads
    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        prototype = prototype or default_buffer_prototype()
        if byte_range is None and key in self._preloaded:
            doc = self._preloaded[key]
            return None if doc is None else prototype.buffer.from_bytes(doc)
        buf = await self._store.get(key, prototype, byte_range)
        await self._check(key, buf, byte_range)
        return buf

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[Any]) -> list[Any]:
        key_ranges = list(key_ranges)
        out = await self._store.get_partial_values(prototype, key_ranges)
        for (key, byte_range), buf in zip(key_ranges, out, strict=True):
            await self._check(key, buf, byte_range)
        return out

    async def _get_many(self, requests: Iterable[Any]) -> Any:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    def get_sync(self, key: str, *, prototype: Any = None, byte_range: Any = None) -> Any:
        buf = self._store.get_sync(key, prototype=prototype, byte_range=byte_range)
        self.check_sync(key, _as_np(buf), byte_range)
        return buf

    def read_chunk(self, key: str, pool: BufferPool | None = None) -> np.ndarray | None:
        """A whole stored object's bytes, checked; on local disk read into ``pool`` memory.

        None only for objects the manifest does not cover (never-written chunks of stores
        without a manifest, or beyond the committed rows): those read as the fill value.
        """
        raw: np.ndarray | None
        if pool is not None and self._local is not None:
            raw = read_whole(self._local + key, pool)
        else:
            raw = _as_np(self._store.get_sync(key))
        self.check_sync(key, raw)
        return raw

    def _pread(self, key: str, start: int | None, stop: int,
               pool: BufferPool | None, into: np.ndarray | None = None) -> np.ndarray | None:
        """:func:`~sparsestore.localfiles.pread` of an object of this local store."""
        return pread(self._local + key, start, stop, pool, into)  # type: ignore[operator]

    @property
    def _local(self) -> str | None:
        """The local root as a path prefix ("/root/"), None when the store is not local."""
        root = self.root
        return None if root is None else str(root) + os.sep

    def read_suffix(self, key: str, n: int) -> np.ndarray | None:
        """The last ``n`` bytes of an object (a shard's index), checked as a shard index
        read; None only for objects the manifest does not cover."""
        if self._local is not None:
            raw = self._pread(key, None, n, None)
        else:
            raw = _as_np(self._store.get_sync(key, byte_range=SuffixByteRequest(n)))
        self.check_sync(key, raw, SuffixByteRequest(n))
        return raw

    def read_range(self, key: str, start: int, stop: int, pool: BufferPool | None = None,
                   into: np.ndarray | None = None) -> np.ndarray | None:
        """Bytes ``[start, stop)`` of an object (an inner chunk of a shard), checked against
        the tag of the inner chunk the shard's index (read here) names there; on local disk
        read into ``into`` (if large enough) or ``pool`` memory."""
        request = RangeByteRequest(start, stop)
        if self._local is not None:
            raw = self._pread(key, start, stop, pool, into)
        else:
            raw = _as_np(self._store.get_sync(key, byte_range=request))
        self.check_sync(key, raw, request)
        return raw

    def read_run(self, key: str, ranges: list[tuple[int, int]], pool: BufferPool | None = None,
                 into: np.ndarray | None = None) -> list[np.ndarray] | None:
        """Inner chunks of one shard (``ranges`` ascending) read together: one read from
        the first's start to the last's end when that wastes at most as many bytes as the
        chunks take, else one read each; each checked as :meth:`read_range` checks one.
        None when the object is absent."""
        lo, hi = ranges[0][0], ranges[-1][1]
        payload = sum(b - a for a, b in ranges)
        if self._local is not None and hi - lo > 2 * payload:
            parts = pread_each(self._local + key, ranges, into)
        else:
            if self._local is not None:
                raw = self._pread(key, lo, hi, pool, into)
            else:
                raw = _as_np(self._store.get_sync(key, byte_range=RangeByteRequest(lo, hi)))
            parts = None if raw is None else [raw[a - lo : b - lo] for a, b in ranges]
        if parts is None:
            self.check_sync(key, None, RangeByteRequest(*ranges[0]))
            return None
        ref = self._ref(key)
        if ref is None:
            return parts
        _, am, s = ref
        quick = am.per_object > 1 and am.trailer
        entries = self._offsets.get(key, {})
        first, tags = s * am.per_object, am.tags
        for (a, b), part in zip(ranges, parts, strict=True):
            # The quick check: the range is an inner chunk the shard's index (read here)
            # names, and its trailing tag is the manifest's; anything else is checked in
            # full, which names what is wrong.
            entry = entries.get(a) if quick else None
            if entry is not None and entry[1] == b and part.size == b - a and (
                    first + entry[0] >= tags.size
                    or trailing_tag(part) == int(tags[first + entry[0]])):
                continue
            self.check_sync(key, part, RangeByteRequest(a, b))
        return parts

    # --------------------------------------------------------------- writes
    def _record(self, key: str, raw: np.ndarray | None, meta_json: bytes | None) -> None:
        """Remember the tag(s) of a stored (or deleted, ``raw`` None) object."""
        if not key.startswith(self.prefix):
            return
        parts = split_chunk_key(key[len(self.prefix):])
        if parts is None:
            return
        name, s, _ = parts
        kind = self._kinds.get(name)
        if kind is None:
            if not meta_json:  # an array without metadata: nothing can be read from it
                self.written.pop(name, None)
                return
            meta = json.loads(meta_json)
            kind = self._kinds[name] = (trailer_tagged(meta), per_object(meta))
        trailer, per = kind
        written = self.written.setdefault(name, {})
        if per == 1:
            written[s] = None if raw is None else (trailing_tag(raw) if trailer else crc32c(raw))
        else:
            tags = [None] * per if raw is None else inner_tags(raw, per, trailer)
            for i, tag in enumerate(tags):
                written[s * per + i] = tag

    def _meta_key(self, key: str) -> str | None:
        if not key.startswith(self.prefix):
            return None
        parts = split_chunk_key(key[len(self.prefix):])
        if parts is None or parts[0] in self._kinds:
            return None
        return self.prefix + parts[0] + "/zarr.json"

    async def _meta_of(self, key: str) -> bytes | None:
        """The array's zarr.json, when this key's array is not known yet."""
        mk = self._meta_key(key)
        got = None if mk is None else await self._store.get(mk, default_buffer_prototype())
        return None if got is None else got.to_bytes()

    def _meta_of_sync(self, key: str) -> bytes | None:
        mk = self._meta_key(key)
        got = None if mk is None else self._store.get_sync(mk)
        return None if got is None else got.to_bytes()

    async def set(self, key: str, value: Any) -> None:
        batch = current_batch()
        if batch is not None and not batch.enter():
            return  # a failed write's straggler after its rollback began: dropped
        self._preloaded.pop(key, None)
        try:
            meta = await self._meta_of(key)
            await self._store.set(key, value)
            self._record(key, value.as_numpy_array().view(np.uint8), meta)
        finally:
            if batch is not None:
                batch.leave()

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        if not await self._store.exists(key):
            await self.set(key, value)

    async def _set_many(self, values: Iterable[tuple[str, Any]]) -> None:
        for key, value in values:
            await self.set(key, value)

    def set_sync(self, key: str, value: Any) -> None:
        self._preloaded.pop(key, None)
        meta = self._meta_of_sync(key)
        self._store.set_sync(key, value)
        self._record(key, value.as_numpy_array().view(np.uint8), meta)

    async def delete(self, key: str) -> None:
        batch = current_batch()
        if batch is not None and not batch.enter():
            return  # as in set()
        self._preloaded.pop(key, None)
        try:
            meta = await self._meta_of(key)
            await self._store.delete(key)
            self._record(key, None, meta)
        finally:
            if batch is not None:
                batch.leave()

    def delete_sync(self, key: str) -> None:
        self._preloaded.pop(key, None)
        meta = self._meta_of_sync(key)
        self._store.delete_sync(key)
        self._record(key, None, meta)

    async def delete_dir(self, prefix: str) -> None:
        for key in [k for k in self._preloaded if k.startswith(prefix)]:
            self._preloaded.pop(key, None)
        await self._store.delete_dir(prefix)
        name = prefix[len(self.prefix):].rstrip("/") if prefix.startswith(self.prefix) else None
        if name is not None:
            self.written.pop(name, None)
            self._kinds.pop(name, None)


def _manifest_in(root_json: bytes | None) -> Manifest | None:
    """The manifest committed in a group's zarr.json bytes, if readable."""
    if not root_json:
        return None
    try:
        attrs = json.loads(root_json).get("attributes") or {}
        return Manifest.from_json(attrs["sparsestore"]["manifest"], "")
    except Exception:  # unreadable or absent: no second opinion to offer
        return None


# ------------------------------------------------------------------ commit side

def build_manifest(
    arrays: Mapping[str, tuple[Any, int]],
    store: VerifiedStore,
    *,
    generation: str,
    n_cols: int,
    old: Manifest | None,
    scan: bool = False,
) -> Manifest:
    """The manifest of the rows about to be committed.

    ``arrays``: name -> (zarr array, committed rows).  Each object's tag comes from this
    writer's own writes, else from the previous commit; ``scan`` (upgrading a store that
    has no manifest yet) reads the tags of the objects already stored.  An object that
    committed rows need but nobody wrote is an error: nothing may be committed over a hole.
    """
    import zarr

    out: dict[str, ArrayManifest] = {}
    for name, (arr, length) in arrays.items():
        meta = array_meta(arr)
        step, per = int(arr.chunks[0]), per_object(meta)
        trailer = trailer_tagged(meta)
        scanned: dict[int, list[int | None]] = {}
        n = 0 if any(int(d) == 0 for d in arr.shape[1:]) else n_objects(length, step)
        written = store.written.get(name, {})
        prev = old.arrays.get(name) if old is not None else None
        tags = np.empty(n, np.uint32)
        for k in range(n):
            if k in written:
                tag = written[k]
            elif prev is not None and k < prev.tags.size:
                tag = int(prev.tags[k])
            elif scan:
                s = k // per
                if s not in scanned:
                    raw = _as_np(store._store.get_sync(chunk_key(arr, f"{arr.path}/", s)))
                    scanned = {s: [None] * per if raw is None else inner_tags(raw, per, trailer)
                               if per > 1 else [trailing_tag(raw) if trailer else crc32c(raw)]}
                tag = scanned[s][k % per]
            else:
                tag = None
            if tag is None:
                raise CorruptStoreError(
                    f"{store.label}: chunk {k} of array {name!r} holds committed rows but was "
                    "not written; the write is not committed"
                )
            tags[k] = tag
        tail = None
        if n and length % step:
            raw_arr = zarr.open_array(store=store._store, path=store.prefix + name, mode="r")
            lo = (n - 1) * step
            tail = crc32c(np.ascontiguousarray(raw_arr[lo:length]).view(np.uint8).reshape(-1))
        out[name] = ArrayManifest(step, length, tags, tail, fingerprint(meta), trailer, per)
    return Manifest(generation, n_cols, out)
