"""The zarr internals sparsestore relies on, in one place, behind one version check.

The direct chunk paths (:class:`~sparsestore.chunks.ChunkDecoder`,
:class:`~sparsestore.chunks.ChunkEncoder`) read and write chunk bytes themselves, which needs
zarr internals: ``arr.store_path.store``, ``metadata.encode_chunk_key``, the stores'
``get_sync``/``set_sync``, the codec classes and zarr's Blosc configuration, the Blosc
header layout, and the sharding codec's configuration and index layout (inner chunks are
read by range: :func:`shard_plan`).  :data:`SUPPORTED` says whether the installed zarr is
in the range these were checked against (pyproject's pin); outside it :func:`direct_plan`
and :func:`shard_plan` give None and zarr does all the work.
:class:`~sparsestore.verified.VerifiedStore` wraps stores with the classes re-exported here.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import numcodecs.blosc
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import WrapperStore

if TYPE_CHECKING:
    from .buffers import BufferPool

#: The zarr releases the direct paths were checked against (pyproject: zarr>=3.1.6,<4).
ZARR_RANGE = ((3, 1, 6), (4,))


def _version(text: str) -> tuple[int, ...]:
    """``"3.2.0rc1"`` -> ``(3, 2, 0)``: the leading numeric release parts."""
    parts = []
    for p in text.split("."):
        m = re.match(r"\d+", p)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.end() != len(p):
            break
    return tuple(parts)


#: Whether the direct chunk paths may run; False leaves every chunk to zarr.
SUPPORTED = ZARR_RANGE[0] <= _version(zarr.__version__) < ZARR_RANGE[1]

#: A codec chain the direct paths handle, as decode steps.
Plan = tuple[Any, str, tuple[str, ...], Any]

#: Blosc header fields (little-endian uint32): uncompressed and compressed byte counts.
BLOSC_NBYTES = slice(4, 8)
BLOSC_CBYTES = slice(12, 16)
BLOSC_HEADER = 16


class ZarrCompatError(Exception):
    """A zarr internal did not behave as :mod:`sparsestore.zarr_compat` expects."""


def is_checksum_failure(exc: BaseException) -> bool:
    """Whether zarr's error is a CRC32C mismatch (zarr raises a plain ValueError for it)."""
    return "checksum" in str(exc).lower()


def le32(b: np.ndarray) -> int:
    """A little-endian unsigned integer from bytes."""
    return int.from_bytes(b.tobytes(), "little")


def blosc_sizes(raw: np.ndarray) -> tuple[int, int] | None:
    """``(uncompressed, compressed)`` byte counts from a Blosc header, None when too short."""
    if raw.size < BLOSC_HEADER:
        return None
    return le32(raw[BLOSC_NBYTES]), le32(raw[BLOSC_CBYTES])


def blosc_decompress(raw: Any, dest: Any = None) -> Any:
    """numcodecs Blosc decompression, into ``dest`` when given."""
    return numcodecs.blosc.decompress(raw) if dest is None else numcodecs.blosc.decompress(
        raw, dest)


def chunk_key(arr: Any, prefix: str, k: int) -> str:
    """The store key of chunk ``k`` along the first axis (the only chunk along the others)."""
    return prefix + arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))


def key_exists(store: Any, key: str) -> bool:
    """Whether ``key`` is stored, asked of the storage under any wrapper store (such as
    :class:`~sparsestore.verified.VerifiedStore`), from synchronous code."""
    from zarr.core.sync import sync

    while isinstance(store, WrapperStore):
        store = store._store
    return bool(sync(store.exists(key)))


def fetch(store: Any, key: str, pool: BufferPool | None) -> np.ndarray | None:
    """A chunk's stored bytes (checked against the manifest), or None when not covered."""
    read_chunk = getattr(store, "read_chunk", None)
    if read_chunk is not None:
        return read_chunk(key, pool)
    got = store.get_sync(key)
    return None if got is None else got.as_numpy_array()


def buffer_class() -> Any:
    """zarr's default Buffer class, which the stores' ``set_sync`` takes."""
    return default_buffer_prototype().buffer


def store_bytes(store: Any, key: str, raw: Any, buffer: Any) -> None:
    """Write ``raw`` under ``key`` through the store's synchronous path (``buffer``: see
    :func:`buffer_class`)."""
    store.set_sync(key, buffer.from_bytes(bytes(raw)))


def _decode_steps(codecs: list[Any], dtype: Any) -> tuple[str, ...] | None:
    """Decode steps of a ``bytes``[+Blosc][+CRC32C] chain in native byte order, else None."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    if not codecs or type(codecs[0]) is not BytesCodec:
        return None
    endian = codecs[0].endian
    if np.dtype(dtype).itemsize > 1 and endian is not None and (
        getattr(endian, "value", endian) != sys.byteorder
    ):
        return None
    steps = []
    for c in codecs[1:]:
        if type(c) is BloscCodec:
            steps.append("blosc")
        elif type(c) is Crc32cCodec:
            steps.append("crc32c")
        else:
            return None
    steps.reverse()  # decode order
    if steps not in ([], ["crc32c"], ["blosc"], ["crc32c", "blosc"]):
        return None
    return tuple(steps)


def run_sync(coro: Any) -> Any:
    """Run a coroutine on zarr's event loop and wait for its result (from any thread but
    that loop's)."""
    from zarr.core.sync import sync

    return sync(coro)


def run_async(coro: Any) -> Any:
    """Start a coroutine on zarr's event loop; a ``concurrent.futures.Future`` of it."""
    import asyncio

    from zarr.core.sync import _get_loop

    return asyncio.run_coroutine_threadsafe(coro, _get_loop())


def _sync_store(arr: Any) -> tuple[Any, str] | None:
    """``(store, key prefix)`` to read the array's chunks from synchronously: its store
    when that reads synchronously (local disk), else a
    :class:`~sparsestore.fetch.RemoteReads` over it (object storage), or None."""
    store = arr.store_path.store
    if not getattr(store, "supports_sync", callable(getattr(store, "get_sync", None))):
        from .fetch import remote_reads

        store = remote_reads(store)
        if store is None:
            return None
    prefix = arr.store_path.path
    return store, (prefix + "/" if prefix else "")


def direct_plan(arr: Any) -> Plan | None:
    """``(store, key prefix, decode steps, crc32c)`` for a chain sparsestore can decode
    itself (``bytes``, then optionally Blosc, then optionally CRC32C, unsharded, 1-D, a
    store with synchronous reads), or None (then zarr does)."""
    if not SUPPORTED:
        return None
    try:
        import google_crc32c

        md = arr.metadata
        if md.zarr_format != 3 or arr.ndim != 1 or getattr(arr, "shards", None) is not None:
            return None
        steps = _decode_steps(list(md.codecs), arr.dtype)
        where = _sync_store(arr)
        if steps is None or where is None:
            return None
        return where[0], where[1], steps, google_crc32c.value
    except Exception:  # a layout or zarr internal not as expected: zarr decodes
        return None


class ShardPlan(NamedTuple):
    """How to read inner chunks of a sharded 1-D array directly (see :func:`shard_plan`)."""

    store: Any
    prefix: str
    steps: tuple[str, ...]  # decode steps of one inner chunk
    crc: Any  # google_crc32c.value
    per: int  # inner chunks per shard
    index_bytes: int  # the index at the shard's end: per (offset, nbytes) u64 pairs + CRC32C


def shard_plan(arr: Any) -> ShardPlan | None:
    """A :class:`ShardPlan` for a sharded 1-D array whose inner chunks use a chain
    sparsestore decodes itself and whose index is at the end, little-endian, with a
    CRC32C (zarr's default), on a store with synchronous reads; else None (zarr decodes)."""
    if not SUPPORTED:
        return None
    try:
        import google_crc32c
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

        md = arr.metadata
        if md.zarr_format != 3 or arr.ndim != 1 or getattr(arr, "shards", None) is None:
            return None
        codecs = list(md.codecs)
        if len(codecs) != 1 or type(codecs[0]) is not ShardingCodec:
            return None
        sc = codecs[0]
        if getattr(sc.index_location, "value", sc.index_location) != "end":
            return None
        index_codecs = list(sc.index_codecs)
        if (len(index_codecs) != 2 or type(index_codecs[0]) is not BytesCodec
                or getattr(index_codecs[0].endian, "value", index_codecs[0].endian) != "little"
                or type(index_codecs[1]) is not Crc32cCodec):
            return None
        inner, outer = int(sc.chunk_shape[0]), int(arr.shards[0])
        if inner != int(arr.chunks[0]) or inner < 1 or outer % inner:
            return None
        steps = _decode_steps(list(sc.codecs), arr.dtype)
        where = _sync_store(arr)
        if steps is None or where is None:
            return None
        per = outer // inner
        return ShardPlan(where[0], where[1], steps, google_crc32c.value, per, per * 16 + 4)
    except Exception:  # a layout or zarr internal not as expected: zarr decodes
        return None


#: A shard index's offset (and size) for an inner chunk that was never stored.
SHARD_EMPTY = 2**64 - 1


def fetch_suffix(store: Any, key: str, n: int) -> np.ndarray | None:
    """The last ``n`` bytes of an object (checked against the manifest), None if absent."""
    read_suffix = getattr(store, "read_suffix", None)
    if read_suffix is not None:
        return read_suffix(key, n)
    got = store.get_sync(key, byte_range=SuffixByteRequest(n))
    return None if got is None else got.as_numpy_array().view(np.uint8)


def fetch_range(store: Any, key: str, start: int, stop: int, pool: BufferPool | None,
                into: np.ndarray | None = None) -> np.ndarray | None:
    """Bytes ``[start, stop)`` of an object (checked against the manifest), None if absent;
    read into ``into`` (scratch memory the caller reuses) where the store can."""
    read_range = getattr(store, "read_range", None)
    if read_range is not None:
        return read_range(key, start, stop, pool, into)
    got = store.get_sync(key, byte_range=RangeByteRequest(start, stop))
    return None if got is None else got.as_numpy_array().view(np.uint8)


def fetch_run(store: Any, key: str, ranges: list[tuple[int, int]], pool: BufferPool | None,
              into: np.ndarray | None = None) -> list[np.ndarray] | None:
    """Byte ranges of one object (ascending, not overlapping), fetched together and each
    checked against the manifest like a :func:`fetch_range` of it; None if the object is
    absent.  ``into`` (at least the bytes from the first range's start to the last's end)
    is scratch memory the caller reuses."""
    read_run = getattr(store, "read_run", None)
    if read_run is not None:
        return read_run(key, ranges, pool, into)
    if getattr(store, "read_range", None) is not None:  # reads served per range (prefetched)
        parts = [fetch_range(store, key, a, b, pool) for a, b in ranges]
        return None if any(p is None for p in parts) else parts  # type: ignore[misc]
    lo = ranges[0][0]
    got = store.get_sync(key, byte_range=RangeByteRequest(lo, ranges[-1][1]))
    if got is None:
        return None
    raw = got.as_numpy_array().view(np.uint8)
    return [raw[a - lo : b - lo] for a, b in ranges]


def blosc_codec(arr: Any) -> Any:
    """numcodecs ``Blosc`` built from ``arr``'s Blosc codec configuration (as zarr builds it),
    or None when it has none; :class:`ZarrCompatError` when the configuration is unreadable."""
    try:
        from numcodecs import Blosc
        from zarr.codecs import BloscCodec, ShardingCodec

        blosc = None
        codecs = list(arr.metadata.codecs)
        if len(codecs) == 1 and type(codecs[0]) is ShardingCodec:  # the inner chunks' chain
            codecs = list(codecs[0].codecs)
        for codec in codecs:
            if type(codec) is BloscCodec:
                cfg = codec.to_dict()["configuration"]
                shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[cfg["shuffle"]]
                blosc = Blosc.from_config({
                    "cname": cfg["cname"], "clevel": cfg["clevel"], "shuffle": shuffle,
                    "blocksize": cfg["blocksize"], "typesize": cfg["typesize"],
                })
        return blosc
    except Exception as exc:
        raise ZarrCompatError(f"cannot rebuild zarr's Blosc codec: {exc}") from exc


__all__ = [
    "BLOSC_CBYTES", "BLOSC_HEADER", "BLOSC_NBYTES", "SUPPORTED", "ZARR_RANGE", "ByteRequest",
    "OffsetByteRequest", "Plan", "RangeByteRequest", "SHARD_EMPTY", "ShardPlan",
    "SuffixByteRequest", "WrapperStore", "ZarrCompatError", "blosc_codec", "blosc_decompress",
    "blosc_sizes", "buffer_class", "chunk_key", "default_buffer_prototype", "direct_plan",
    "fetch", "fetch_range", "fetch_run", "fetch_suffix", "is_checksum_failure", "key_exists",
    "le32", "run_async", "run_sync", "shard_plan",
    "store_bytes",
]
