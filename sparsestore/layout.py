"""On-disk encoding: anndata's ``csr_matrix`` group, codecs, dtypes and chunk sizing.

One place decides how a store looks on disk, so the writer, the reader and the validator
cannot disagree.  The root group carries anndata's attrs (``encoding-type``,
``encoding-version``, ``shape``) and our own bookkeeping under ``attrs["sparsestore"]``;
``shape[0]`` is the commit point of every append.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import (
    CorruptStoreError,
    DTypeError,
    InvalidInputError,
    LabelError,
    UnsafeInputError,
)

CSR_ENCODING = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
DENSE_ENCODING = {"encoding-type": "array", "encoding-version": "0.2.0"}
META_KEY = "sparsestore"
FORMAT_VERSION = 2
# Version 2 added the chunk manifest (see integrity.py); version 1 stores still open.
FIRST_MANIFEST_VERSION = 2
NAN_POLICIES = ("raise", "keep")
LABELS_GROUP = "labels"
DENSE_ARRAY = "X"

# Largest dimension we accept: far beyond any real matrix, far below int64 overflow in
# indptr arithmetic.  ``2**62`` rows is refused as absurd rather than attempted.
MAX_DIM = 2**48

Compressor = Literal["lz4", "zstd", "blosclz", "zlib", "lz4hc", "none"]


@dataclass(frozen=True)
class Layout:
    """How arrays are chunked and compressed.

    ``chunk_bytes`` sizes the nnz-axis chunks of ``data``/``indices`` (a few MB
    uncompressed streams well: big enough to amortise decode calls, small enough to
    shuffle at fine grain).  ``shard_bytes`` turns on zarr's sharding codec so a store on
    object storage is a few large objects rather than many small ones.  Small inner chunks
    in shards shuffle at fine grain and read random rows faster, but stream, read whole and
    write slower than 4 MiB chunks (benchmarks/results/layout.md), so they are not the
    default.
    """

    compressor: Compressor = "lz4"
    clevel: int = 5
    shuffle: Literal["shuffle", "bitshuffle", "noshuffle"] = "shuffle"
    chunk_bytes: int = 4 * 2**20
    indptr_chunk: int = 2**18
    dense_chunk_bytes: int = 4 * 2**20
    shard_bytes: int | None = None
    checksum: bool = True

    def __post_init__(self) -> None:
        if self.compressor not in ("lz4", "zstd", "blosclz", "zlib", "lz4hc", "none"):
            raise InvalidInputError(
                f"unknown compressor {self.compressor!r}; use one of lz4, zstd, blosclz, "
                "zlib, lz4hc or none"
            )
        if not 0 <= self.clevel <= 9:
            raise InvalidInputError(f"clevel must be in 0..9, got {self.clevel}")
        if self.chunk_bytes < 1024 or self.indptr_chunk < 1 or self.dense_chunk_bytes < 1024:
            raise InvalidInputError("chunk sizes must be positive (chunk_bytes >= 1 KiB)")
        if self.shard_bytes is not None and self.shard_bytes < self.chunk_bytes:
            raise InvalidInputError("shard_bytes must be at least chunk_bytes")

    @classmethod
    def from_options(cls, **options: Any) -> Layout:
        """Build a layout from keyword options, naming any unknown one."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown layout option(s) {unknown}; known options are {sorted(known)}"
            )
        return cls(**options)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def codecs(self) -> list[Any]:
        """The bytes-to-bytes codecs of every array: Blosc, then a CRC32C over its output."""
        out: list[Any] = []
        if self.compressor != "none":
            out.append(BloscCodec(cname=self.compressor, clevel=self.clevel, shuffle=self.shuffle))
        if self.checksum:
            out.append(Crc32cCodec())
        return out

    def nnz_chunk(self, itemsize: int) -> int:
        """Elements per chunk of a 1-D nnz-axis array of this item size."""
        return max(1024, self.chunk_bytes // max(1, itemsize))

    def nnz_shard(self, itemsize: int) -> int | None:
        if self.shard_bytes is None:
            return None
        chunk = self.nnz_chunk(itemsize)
        return max(chunk, (self.shard_bytes // max(1, itemsize)) // chunk * chunk)

    def dense_row_chunk(self, row_bytes: int) -> int:
        return max(1, self.dense_chunk_bytes // max(1, row_bytes))


@dataclass
class Meta:
    """Our bookkeeping in ``attrs["sparsestore"]`` (written with the commit)."""

    format: Literal["csr", "dense"] = "csr"
    format_version: int = FORMAT_VERSION
    labels: list[str] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)
    # Rows in the store when the last append committed; equals shape[0].  Kept here as a
    # cross-check so a hand-edited shape is caught by validation.
    committed_nnz: int = 0
    keep_zeros: bool = False
    # False while a remote save is in progress (remote stores cannot be renamed into place).
    complete: bool = True
    # New with every save/create: a reader notices its store was replaced under it.
    generation: str = ""
    # Per-array chunk tags and fingerprints (integrity.Manifest), committed with shape.
    manifest: dict[str, Any] = field(default_factory=dict)
    # What appends do with NaN/inf values: "raise" (refuse the block) or "keep".
    nan_policy: str = "raise"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> Meta:
        if not isinstance(obj, dict):
            return cls()
        known = {k: v for k, v in obj.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# ---------------------------------------------------------------- dtypes

def check_value_dtype(dtype: Any) -> np.dtype:
    """Return ``dtype`` as numpy dtype if it is storable (real numeric or bool), else raise."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise DTypeError(f"cannot interpret {dtype!r} as a numpy dtype") from exc
    if dt.kind not in "biuf" or dt.hasobject or dt.fields is not None:
        raise DTypeError(
            f"dtype {dt} cannot be stored: only bool, integer and floating point values are "
            "supported; convert with X.astype(np.float32) (or encode strings as integer codes)"
        )
    if dt.kind == "f" and dt.itemsize > 8:
        raise DTypeError(f"dtype {dt} (extended precision) is not portable; use float64")
    return dt.newbyteorder("=") if dt.byteorder not in ("=", "|") else dt


def check_matrix_dtype(dtype: Any, *, sparse: bool) -> np.dtype:
    """The dtype of a new store's values; float16 only for dense stores.

    scipy.sparse has no float16 kernels, so a sparse float16 store could not hand back
    the scipy CSR matrices it promises.
    """
    dt = check_value_dtype(dtype)
    if sparse and dt == np.float16:
        raise DTypeError(
            "float16 is not supported by scipy.sparse; store sparse values as float32 "
            "(X.astype(np.float32)), or save a dense matrix with sparse=False"
        )
    return dt


def check_label_dtype(dtype: Any, name: str) -> np.dtype:
    try:
        return check_value_dtype(dtype)
    except DTypeError as exc:
        raise DTypeError(f"label {name!r}: {exc}") from None


def index_dtype(n_cols: int) -> np.dtype:
    """int32 column indices while they fit, int64 beyond."""
    return np.dtype(np.int32) if n_cols < 2**31 else np.dtype(np.int64)


def check_dim(value: Any, what: str) -> int:
    """Validate one dimension: a non-negative integer below :data:`MAX_DIM`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if value < 0:
        raise InvalidInputError(f"{what} must be non-negative, got {value}")
    if value > MAX_DIM:
        raise UnsafeInputError(f"{what}={value} is absurdly large (limit {MAX_DIM})")
    return value


def check_label_name(name: Any) -> None:
    """Refuse a label name that cannot be an array's name in the labels group."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith((".", "__")):
        raise LabelError(
            f"label name {name!r} is not usable; use a non-empty string without '/' that does "
            "not start with '.' or '__'"
        )


# ---------------------------------------------------------------- reading the metadata

def read_meta(attrs: Mapping[str, Any], path: str) -> Meta:
    """``attrs["sparsestore"]`` as :class:`Meta`, every field type-checked (data, never code)."""
    raw = attrs.get(META_KEY)
    if raw is None:
        return Meta()
    if not isinstance(raw, dict):
        raise CorruptStoreError(f"{path}: attrs[{META_KEY!r}] must be a mapping, got {raw!r:.80}")
    meta = Meta.from_json(raw)
    fields = (
        ("format", str), ("format_version", int), ("labels", list), ("layout", dict),
        ("committed_nnz", int), ("keep_zeros", bool), ("complete", bool),
        ("generation", str), ("manifest", dict), ("nan_policy", str),
    )
    for fname, typ in fields:
        value = getattr(meta, fname)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise CorruptStoreError(
                f"{path}: attrs[{META_KEY!r}][{fname!r}] should be {typ.__name__}, got "
                f"{value!r:.80}; the store metadata is damaged"
            )
    if meta.format not in ("csr", "dense"):
        raise CorruptStoreError(f"{path}: unknown store format {meta.format!r:.80}")
    if meta.format_version > FORMAT_VERSION or meta.format_version < 1:
        raise CorruptStoreError(
            f"{path}: store format version {meta.format_version} is not supported (this "
            f"sparsestore reads version {FORMAT_VERSION}); upgrade sparsestore"
        )
    if meta.format_version < FIRST_MANIFEST_VERSION and (meta.manifest or meta.generation):
        # Only a format with the manifest writes these: the version was edited, and
        # believing it would turn off every chunk check.
        raise CorruptStoreError(
            f"{path}: attrs[{META_KEY!r}]['format_version'] is {meta.format_version}, a "
            "format without a chunk manifest, but the store carries the manifest or generation "
            f"that version {FIRST_MANIFEST_VERSION} added; its zarr.json was edited: restore "
            f"the store from a copy (or set format_version back to {FORMAT_VERSION})"
        )
    if meta.committed_nnz < 0:
        raise CorruptStoreError(f"{path}: negative committed nnz {meta.committed_nnz}")
    for name in meta.labels:
        try:
            check_label_name(name)
        except LabelError as exc:
            raise CorruptStoreError(f"{path}: bad label name in attrs: {exc}") from None
    return meta


def check_stored_dtype(dtype: Any, name: str, path: str, kinds: str | None = None) -> None:
    """Refuse a stored array whose dtype sparsestore cannot hold (or not of ``kinds``)."""
    try:
        dt = check_value_dtype(dtype)
    except DTypeError as exc:
        raise CorruptStoreError(f"{path}: array {name!r} has an unsupported dtype: {exc}") from None
    if kinds is not None and dt.kind not in kinds:
        raise CorruptStoreError(f"{path}: array {name!r} must hold integers, has dtype {dt}")


# Codecs a store may name: plain (de)compressors and checksums.  Anything else (a codec
# that unpickles, or one registered by some installed plugin) is refused before any read.
SAFE_CODECS = frozenset({
    "bytes", "blosc", "crc32c", "zstd", "gzip", "transpose", "sharding_indexed",
    "zlib", "lz4", "bz2", "lzma", "crc32", "adler32", "fletcher32", "jenkins_lookup3",
    "shuffle", "delta",
})


def _codec_names(spec: Any) -> list[str]:
    """Names of the codecs in a metadata codec list, nested (sharding) ones included."""
    names: list[str] = []
    for c in spec or ():
        if not isinstance(c, dict):
            names.append(repr(c))
            continue
        name = c.get("name", c.get("id"))
        names.append(str(name))
        conf = c.get("configuration") or {}
        if isinstance(conf, dict):
            names += _codec_names(conf.get("codecs")) + _codec_names(conf.get("index_codecs"))
    return names


def check_codecs(arr: Any, name: str, path: str) -> None:
    """Refuse arrays whose metadata names a codec outside :data:`SAFE_CODECS`."""
    try:
        meta = arr.metadata.to_dict()
    except Exception as exc:  # pragma: no cover - unreadable metadata
        raise CorruptStoreError(f"{path}: array {name!r} metadata is unreadable: {exc}") from None
    specs = list(meta.get("codecs") or ()) + list(meta.get("filters") or ())
    if meta.get("compressor"):
        specs.append(meta["compressor"])
    for codec in _codec_names(specs):
        short = codec[len("numcodecs."):] if codec.startswith("numcodecs.") else codec
        if short not in SAFE_CODECS:
            raise CorruptStoreError(
                f"{path}: array {name!r} uses codec {codec!r:.60}, which sparsestore does not "
                "read (allowed: " + ", ".join(sorted(SAFE_CODECS)) + "); re-encode the "
                "store with a trusted tool"
            )


def check_csr_arrays(data: Any, indices: Any, indptr: Any, path: str) -> None:
    """O(1) checks of the three CSR arrays: kinds, ranks, dtypes and codecs."""
    for name, arr in (("data", data), ("indices", indices), ("indptr", indptr)):
        if not hasattr(arr, "dtype") or arr.ndim != 1:
            raise CorruptStoreError(f"{path}: {name!r} must be a 1-D array")
        check_codecs(arr, name, path)
    check_stored_dtype(data.dtype, "data", path)
    check_stored_dtype(indices.dtype, "indices", path, kinds="iu")
    check_stored_dtype(indptr.dtype, "indptr", path, kinds="iu")
