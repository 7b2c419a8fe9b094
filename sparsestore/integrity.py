"""The chunk manifest: every committed chunk bound to its array and position.

A CRC inside a chunk proves its bytes are intact, not that they belong where they are: a
chunk deleted, moved, or copied from another store reads back as valid data.  So every
commit records, per array, a 4-byte *tag* of each stored object (the object's trailing
CRC32C when the codec chain ends in one, else the CRC32C of the whole object), the CRC32C
of the committed prefix of a partly filled last object, a fingerprint of the array's
metadata, and a generation id that changes whenever a store is saved anew.

This module is the manifest itself and its arithmetic: tags, fingerprints, whether one
commit can follow another, binding it to the opened arrays.  It touches no storage;
:class:`~sparsestore.verified.VerifiedStore` checks reads and records writes against it
(a tag is the object's last 4 bytes, so the check costs no extra pass over the data), and
:func:`~sparsestore.verified.build_manifest` makes the next commit's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from . import zarr_compat as zc
from .errors import CorruptStoreError, StoreChangedError


def new_generation() -> str:
    """A fresh id for a newly saved store."""
    return uuid.uuid4().hex


def crc32c(raw: Any) -> int:
    """CRC32C of a bytes-like object or a contiguous numpy array (no copy)."""
    if isinstance(raw, np.ndarray):
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    return google_crc32c.value(raw) & 0xFFFFFFFF


def trailing_tag(raw: np.ndarray) -> int:
    return int.from_bytes(raw[-4:].tobytes(), "little") if raw.size >= 4 else -1


def split_chunk_key(key: str) -> tuple[str, int, bool] | None:
    """``"labels/y/c/3/0"`` -> ``("labels/y", 3, True)``; None for keys that are not chunks.

    The flag says whether the trailing chunk coordinates are all 0 (the only chunk along
    every axis but the first, as in every array sparsestore writes).
    """
    i = key.rfind("/c/")
    if i < 0:
        return None
    coords = key[i + 3 :].split("/")
    if not coords[0].isdigit():
        return None
    return key[:i], int(coords[0]), all(c == "0" for c in coords[1:])


def _codec_dicts(meta: Mapping[str, Any]) -> tuple[list[dict], bool]:
    """The array's codec specs, and whether its objects are shards."""
    codecs = [c for c in meta.get("codecs") or () if isinstance(c, dict)]
    if codecs and codecs[0].get("name") == "sharding_indexed":
        conf = codecs[0].get("configuration") or {}
        return [c for c in conf.get("codecs") or () if isinstance(c, dict)], True
    return codecs, False


def trailer_tagged(meta: Mapping[str, Any]) -> bool:
    """Whether a chunk's tag is its trailing CRC32C (chains ending in crc32c; for shards,
    the inner chunks' chain)."""
    codecs, _ = _codec_dicts(meta)
    return bool(codecs) and codecs[-1].get("name") == "crc32c"


EMPTY_OFFSET = 2**64 - 1  # a shard index's offset for an inner chunk that was not stored


def per_object(meta: Mapping[str, Any]) -> int:
    """Chunks per stored object along the first axis: 1, or the inner chunks of a shard."""
    codecs = [c for c in meta.get("codecs") or () if isinstance(c, dict)]
    if codecs and codecs[0].get("name") == "sharding_indexed":
        conf = codecs[0].get("configuration") or {}
        inner = int((conf.get("chunk_shape") or [1])[0])
        outer = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        return max(1, outer // max(1, inner))
    return 1


def inner_tags(raw: np.ndarray, per: int, trailer: bool) -> list[int | None]:
    """The tag of each inner chunk of a shard (index at its end), None where absent."""
    size = per * 16 + 4
    if raw.size < size:
        return [None] * per
    index = np.frombuffer(raw[-size:-4].tobytes(), "<u8").reshape(per, 2)
    out: list[int | None] = []
    for off, n in index.tolist():
        if off == EMPTY_OFFSET or off + n > raw.size - size or n < 4:
            out.append(None)
        else:
            piece = raw[off : off + n]
            out.append(trailing_tag(piece) if trailer else crc32c(piece))
    return out


def fingerprint(meta: Mapping[str, Any]) -> str:
    """A digest of everything in an array's metadata but its (growing) length."""
    meta = dict(meta)
    shape = list(meta.pop("shape", ()))
    meta["trailing_shape"] = shape[1:]
    text = json.dumps(meta, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def array_meta(arr: Any) -> dict[str, Any]:
    return json.loads(json.dumps(arr.metadata.to_dict(), default=str))


@dataclass
class ArrayManifest:
    """The committed tags of one array's stored objects (chunks, or shards)."""

    chunk: int  # rows (elements) per chunk
    length: int  # committed rows (elements)
    tags: np.ndarray  # uint32, one per chunk holding committed rows
    tail: int | None  # CRC32C of the committed rows of the last object, when partial
    fingerprint: str
    trailer: bool
    per_object: int = 1  # chunks per stored object (inner chunks of a shard)
    # Bound at open from the array itself (not stored): how to decode a whole object.
    steps: tuple[str, ...] | None = None
    row_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk": self.chunk,
            "length": self.length,
            "tags": base64.b64encode(self.tags.astype("<u4").tobytes()).decode(),
            "tail": self.tail,
            "fingerprint": self.fingerprint,
            "trailer": self.trailer,
            "per_object": self.per_object,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ArrayManifest:
        try:
            tags = np.frombuffer(base64.b64decode(obj["tags"], validate=True), "<u4")
            out = cls(int(obj["chunk"]), int(obj["length"]), tags.astype(np.uint32),
                      None if obj["tail"] is None else int(obj["tail"]),
                      str(obj["fingerprint"]), bool(obj["trailer"]),
                      int(obj.get("per_object", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"{where}: the chunk manifest is damaged ({exc})") from None
        if (out.chunk < 1 or out.per_object < 1 or out.length < 0
                or out.tags.size != n_objects(out.length, out.chunk)):
            raise CorruptStoreError(f"{where}: the chunk manifest is inconsistent")
        return out

    @property
    def full(self) -> int:
        """Objects wholly inside the committed rows (never rewritten by appends)."""
        return self.length // self.chunk


def n_objects(length: int, chunk: int) -> int:
    return 0 if length <= 0 else (length - 1) // chunk + 1


@dataclass
class Manifest:
    """Every committed array's tags, the store's generation and its column count."""

    generation: str
    n_cols: int
    arrays: dict[str, ArrayManifest]

    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "n_cols": self.n_cols,
                "arrays": {k: v.to_json() for k, v in self.arrays.items()}}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Manifest:
        if not isinstance(obj, dict) or not isinstance(obj.get("arrays"), dict):
            raise CorruptStoreError(f"{where}: the chunk manifest is damaged")
        try:
            gen, n_cols = str(obj["generation"]), int(obj["n_cols"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"{where}: the chunk manifest is damaged ({exc})") from None
        arrays = {str(k): ArrayManifest.from_json(v, where) for k, v in obj["arrays"].items()}
        return cls(gen, n_cols, arrays)

    def follows(self, earlier: Manifest) -> bool:
        """Whether this commit can have come from ``earlier``'s by appends alone: the same
        save, every array as long or longer, and the chunks wholly inside ``earlier``'s rows
        (which appends never rewrite) unchanged.  False after a restore to an older commit."""
        if self.generation != earlier.generation or self.n_cols != earlier.n_cols:
            return False
        for name, old in earlier.arrays.items():
            now = self.arrays.get(name)
            if (now is None or now.chunk != old.chunk or now.length < old.length
                    or now.fingerprint != old.fingerprint
                    or not np.array_equal(now.tags[: old.full], old.tags[: old.full])):
                return False
        return True

    def bind(self, arrays: Mapping[str, Any], where: str) -> None:
        """Check each array's metadata against its fingerprint; learn how to decode it."""
        if set(arrays) != set(self.arrays):
            raise CorruptStoreError(
                f"{where}: the store's arrays {sorted(arrays)} are not the committed ones "
                f"{sorted(self.arrays)}; the store was modified outside sparsestore"
            )
        for name, arr in arrays.items():
            am = self.arrays[name]
            meta = array_meta(arr)
            if fingerprint(meta) != am.fingerprint:
                raise CorruptStoreError(
                    f"{where}: the metadata of array {name!r} (zarr.json: data type, chunk "
                    "shape, codecs...) differs from what was committed, so its bytes would be "
                    "read as something they are not; restore the store's zarr.json from a copy"
                )
            if (int(arr.chunks[0]) != am.chunk or arr.shape[0] < am.length
                    or am.per_object != per_object(meta) or am.trailer != trailer_tagged(meta)):
                raise CorruptStoreError(f"{where}: array {name!r} does not match its manifest")
            am.row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
            am.steps = _decode_steps(meta, arr)


def _decode_steps(meta: Mapping[str, Any], arr: Any) -> tuple[str, ...] | None:
    """Decode order of an unsharded bytes[+blosc][+crc32c] chain in native byte order."""
    codecs, sharded = _codec_dicts(meta)
    if sharded or not codecs or codecs[0].get("name") != "bytes":
        return None
    endian = (codecs[0].get("configuration") or {}).get("endian")
    if np.dtype(arr.dtype).itemsize > 1 and endian not in (None, _native()):
        return None
    names = [c.get("name") for c in codecs[1:]]
    if names not in ([], ["blosc"], ["crc32c"], ["blosc", "crc32c"]):
        return None
    return tuple(reversed(names))


def _native() -> str:
    import sys

    return sys.byteorder


class DamagedChunk(ValueError):
    """A stored chunk's bytes that do not decode: ``what`` failed ("checksum", "header",
    "size" or "blosc"); callers turn it into the error that names the chunk."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def decode_chain(raw: np.ndarray, steps: tuple[str, ...],
                 dest: np.ndarray | None = None) -> np.ndarray:
    """A stored chunk's bytes through a plain codec chain (``steps``: ``"crc32c"`` checked
    and stripped, then ``"blosc"``), decoded into ``dest`` (``uint8``, the chunk's whole
    decoded size) when given.  The one decoder of stored chunks: the streaming reads and the
    manifest's check of a rewritten last chunk both use it.  Raises :class:`DamagedChunk`."""
    for step in steps:
        if step == "crc32c":
            if raw.size < 4 or crc32c(raw[:-4]) != trailing_tag(raw):
                raise DamagedChunk("checksum")
            raw = raw[:-4]
            continue
        sizes = zc.blosc_sizes(raw)  # blosc: always the last step
        if sizes is None or sizes[1] != raw.size or (dest is not None and sizes[0] != dest.size):
            raise DamagedChunk("header")
        try:
            out = zc.blosc_decompress(raw, dest)
        except Exception as exc:  # a damaged stream numcodecs refuses
            raise DamagedChunk("blosc") from exc
        return dest if dest is not None else np.frombuffer(out, np.uint8)
    if dest is None:
        return raw
    if raw.size != dest.size:
        raise DamagedChunk("size")
    dest[:] = raw
    return dest


def decode_many(raws: list[np.ndarray], steps: tuple[str, ...], dest: np.ndarray) -> bool:
    """Stored chunks ``raws`` through :func:`decode_chain`, chunk ``j`` into the ``j``-th of
    ``len(raws)`` equal slots of ``dest`` (``uint8``): a shard's inner chunks fetched
    together.  False at the first chunk that does not decode; the caller then decodes them
    one by one, which names it."""
    want = dest.size // max(1, len(raws))
    try:
        for j, raw in enumerate(raws):
            decode_chain(raw, steps, dest[j * want : (j + 1) * want])
    except DamagedChunk:
        return False
    return True


def went_back(label: str, since: str) -> StoreChangedError:
    """The error for a store whose committed rows on disk are older than a handle's."""
    return StoreChangedError(
        f"{label}: the store on disk went back to an earlier commit (it was restored from a "
        f"backup or an older copy) since {since}, so rows this handle holds are gone or "
        "different; open it again (sparsestore.open) to read what it holds now"
    )
