"""Compressed ``.npz`` shards, decompressed in parallel and written in order.

Three kinds of shard are understood, detected from their member names:

* ``scipy.sparse.save_npz`` files (any of its formats; read with ``scipy.sparse.load_npz``);
* ``np.savez_compressed`` files holding COO parts (``row``/``col``/``data`` + ``shape``) or
  CSR parts (``data``/``indices``/``indptr`` + ``shape``), key names configurable;
* ``np.savez_compressed`` files holding one dense 2-D array (``key=`` picks it).

Before anything is written every shard's zip directory and array headers are read (no
decompression): member sizes are checked against ``max_bytes`` (decompression bombs),
column counts must agree, and the dtypes decide the store's.  Shards are then written in
the given order.  CSR shards (``save_npz``'s default format, or CSR parts) are streamed:
their ``indptr``, ``indices`` and ``data`` members are inflated in step, a unit of rows
(~4 MiB of values) at a time, by ``workers`` threads ahead of the writer within
``lookahead_bytes`` of decoded data (see :class:`ShardStreamer`), so no bigger shard is
ever whole in memory and the memory a conversion needs does not grow with the shards'
size.  Other kinds are loaded
whole by :func:`load_shard`; it is picklable, so with ``executor=`` (a thread or process
pool, a dask ``client.get_executor()``...) every shard is loaded whole by it, ahead of
the writer by ``workers - 1`` shards or up to ``lookahead_bytes`` (see
:class:`ShardLoader`).
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import sys
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..canonical import check_row_count
from ..errors import FormatError, InvalidInputError, SparseStoreError, UnsafeInputError
from .base import (
    DEFAULT_BLOCK_NNZ,
    Source,
    _view,
    check_n_cols,
    csr_blocks,
    expand_paths,
    result_dtype,
    write_source,
)
from .scipy import MAX_BLOCK_ROWS, coo_row_blocks

# Default limit on the decompressed size of one shard (sum of its members).
DEFAULT_MAX_BYTES = 8 * 2**30
# Decompressed bytes loaded ahead of the writer (besides the unit it is on): the writer
# takes data in bursts (a chunk of values and one of indices at a time), faster than one
# thread inflates it.  Measured on 64 shards of 20M nnz, 2 workers vs 1: float32, 1.45x
# with 8 MiB, ~1.6x with 16 or 24 MiB; float64, 1.39x with 4 MiB, ~1.5x with 8 or 16 MiB.
# With ``executor=``, whole shards beyond ``workers - 1``.
DEFAULT_LOOKAHEAD_BYTES = 16 * 2**20
_SCIPY_FORMATS = ("csr", "csc", "coo", "bsr", "dia")


@dataclass(frozen=True)
class NpzOptions:
    """How to read a shard (picklable, so executors on other processes can use it)."""

    key: str | None = None  # the dense array's member name (default: the only array)
    keys: Mapping[str, str] = field(default_factory=dict)  # role -> member name
    labels: tuple[str, ...] = ()  # members holding one label value per row
    max_bytes: int = DEFAULT_MAX_BYTES
    sparse: bool = True  # dense shards become CSR in the worker (smaller to hand back)

    def name(self, role: str) -> str:
        return self.keys.get(role, role)


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's headers say, read without decompressing its data."""

    path: str
    kind: str  # "scipy" | "csr" | "coo" | "dense"
    shape: tuple[int, int]
    dtype: np.dtype
    label_dtypes: tuple[tuple[str, np.dtype, tuple[int, ...]], ...] = ()
    nbytes: int = 0  # decompressed size (sum of the members' declared sizes)


# ------------------------------------------------------------------ safety checks

def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:1] == b"\x80":
            raise UnsafeInputError(
                f"{path} is a Python pickle, not an .npz file; pickled data is never loaded"
            ) from None
        if head[:6] == b"\x93NUMPY":
            raise FormatError(
                f"{path} is a .npy file, not an .npz archive; use format='npy'"
            ) from None
        raise FormatError(
            f"{path} is not a valid .npz file (not a zip archive, or truncated)"
        ) from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc})") from None


def check_zip_sizes(path: str, zf: zipfile.ZipFile, max_bytes: int) -> int:
    """Refuse a shard whose members would decompress to more than ``max_bytes`` in total."""
    total = 0
    for info in zf.infolist():
        total += int(info.file_size)
        if total > max_bytes:
            raise UnsafeInputError(
                f"{path} would decompress to more than {max_bytes} bytes (member "
                f"{info.filename!r} declares {info.file_size}); refusing a possible "
                "decompression bomb. Raise max_bytes= if the file is trusted"
            )
    return total


def _npy_header(f: Any, path: str, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` from an ``.npy`` header at ``f``'s position, read
    by numpy's own ``np.lib.format`` readers; object dtypes (which would need unpickling)
    are refused."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise UnsafeInputError(
            f"{path}: array {name!r} holds Python objects (it would need unpickling); "
            "refusing it. Save numeric arrays only"
        )
    return shape, fortran, dtype


def _member_header(
    path: str, zf: zipfile.ZipFile, member: str
) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one ``.npy`` member from its header alone."""
    try:
        with zf.open(member + ".npy") as f:
            shape, _fortran, dtype = _npy_header(f, path, member)
    except KeyError:
        raise FormatError(f"{path} has no array named {member!r}") from None
    except UnsafeInputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise FormatError(f"{path}: the header of {member!r} is unreadable ({exc})") from None
    return tuple(int(s) for s in shape), dtype


def _small_member(path: str, npz: Any, member: str) -> np.ndarray:
    try:
        return np.asarray(npz[member])
    except KeyError:
        raise FormatError(f"{path} has no array named {member!r}") from None


def _members(zf: zipfile.ZipFile) -> list[str]:
    return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]


def _kind(path: str, members: list[str], opts: NpzOptions) -> str:
    have = set(members)
    if "format" in have and "shape" in have and opts.key is None and not opts.keys:
        return "scipy"
    if {opts.name("data"), opts.name("indices"), opts.name("indptr")} <= have:
        return "csr"
    if {opts.name("row"), opts.name("col"), opts.name("data")} <= have:
        return "coo"
    arrays = [m for m in members if m not in opts.labels]
    if opts.key is not None:
        if opts.key not in have:
            raise FormatError(f"{path} has no array named {opts.key!r}; it holds {members}")
        return "dense"
    if len(arrays) == 1:
        return "dense"
    raise FormatError(
        f"{path} holds arrays {members}: not a scipy.sparse.save_npz file, no COO "
        "(row/col/data + shape) or CSR (data/indices/indptr + shape) parts, and more than "
        "one array; pass key= to pick the dense matrix, or keys= to name the parts"
    )


def _shape_member(path: str, npz: Any, opts: NpzOptions) -> tuple[int, int]:
    name = opts.name("shape")
    shape = _small_member(path, npz, name)
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or int(shape.min()) < 0:
        raise FormatError(f"{path}: {name!r} must hold two non-negative integers, got {shape}")
    return int(shape[0]), int(shape[1])


def scan_shard(path: str, opts: NpzOptions) -> ShardInfo:
    """Read a shard's zip directory and array headers: kind, shape, dtype (no data)."""
    try:
        with _open_zip(path) as zf:
            nbytes = check_zip_sizes(path, zf, opts.max_bytes)
            members = _members(zf)
            kind = _kind(path, members, opts)
            npz = _Members(path, zf)
            if kind == "scipy":
                fmt = _small_member(path, npz, "format")
                fmt = fmt.item().decode() if fmt.dtype.kind == "S" else str(fmt.item())
                if fmt not in _SCIPY_FORMATS:
                    raise FormatError(f"{path}: unknown scipy.sparse format {fmt!r}")
                shape = _shape_member(path, npz, opts)
                dshape, dtype = _member_header(path, zf, "data")
                if fmt != "csr":  # its row count is only declared: backed by the data?
                    check_row_count(shape[0], int(np.prod(dshape, dtype=np.int64)), path)
            elif kind in ("csr", "coo"):
                shape = _shape_member(path, npz, opts)
                dshape, dtype = _member_header(path, zf, opts.name("data"))
                if kind == "coo":
                    check_row_count(shape[0], int(np.prod(dshape, dtype=np.int64)), path)
            else:
                key = opts.key or [m for m in members if m not in opts.labels][0]
                dshape, dtype = _member_header(path, zf, key)
                if len(dshape) != 2:
                    raise FormatError(
                        f"{path}: array {key!r} has shape {dshape}; a dense shard must be 2-D"
                    )
                shape = (dshape[0], dshape[1])
            labels = []
            for lab in opts.labels:
                lshape, ldt = _member_header(path, zf, lab)
                if not lshape or lshape[0] != shape[0]:
                    raise FormatError(
                        f"{path}: label {lab!r} has shape {lshape} but the shard has "
                        f"{shape[0]} rows"
                    )
                labels.append((lab, ldt, lshape[1:]))
    except SparseStoreError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _as_format_error(path, exc) from None
    if dtype.kind not in "biuf":
        raise FormatError(f"{path}: values of dtype {dtype} cannot be stored")
    return ShardInfo(path, kind, shape, np.dtype(dtype), tuple(labels), nbytes)


def _as_format_error(path: str, exc: BaseException) -> SparseStoreError:
    msg = str(exc)
    if "pickle" in msg.lower():
        return UnsafeInputError(
            f"{path} contains pickled objects; refusing to unpickle (allow_pickle=False)"
        )
    return FormatError(f"{path} is corrupt or truncated ({type(exc).__name__}: {msg})")


# ------------------------------------------------------------------ the per-shard work

# Members bigger than this are inflated piece by piece into one buffer of their declared
# size: zlib's output grows in blocks joined at the end, so one read of a big member held
# it twice at peak.  Smaller members are read at once (one copy less, measured faster).
_ONE_READ = 16 * 2**20
_PIECE = 2**20


class _Members:
    """A shard's arrays by name, each member inflated (zlib releases the GIL, so shards
    decompress in parallel threads) and viewed without a further copy."""

    def __init__(self, path: str, zf: zipfile.ZipFile) -> None:
        self.path, self.zf = path, zf
        self.files = _members(zf)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            info = self.zf.getinfo(name + ".npy")
        except KeyError:
            raise FormatError(f"{self.path} has no array named {name!r}") from None
        size = int(info.file_size)
        raw: Any = None
        pos = 0
        with self.zf.open(info) as f:
            # Never more than the declared (and size-checked) length, whatever the stream
            # would inflate to; reading its end makes zipfile check the CRC.
            if size <= _ONE_READ:
                raw = f.read(size)
                pos = len(raw)
            else:
                raw = np.empty(size, dtype=np.uint8)
                while pos < size:
                    piece = f.read(min(_PIECE, size - pos))
                    if not piece:
                        break
                    raw[pos : pos + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                    pos += len(piece)
            if pos != size:
                raise FormatError(f"{self.path}: member {name!r} is truncated")
            if f.read(1):
                raise FormatError(
                    f"{self.path}: member {name!r} inflates to more than the {size} bytes "
                    "its zip entry declares"
                )
        return _npy_from_bytes(self.path, name, raw)


def _npy_from_bytes(path: str, name: str, raw: Any) -> np.ndarray:
    """An ``.npy`` payload (bytes or a uint8 array) as an array viewing it, no copy.

    The header is parsed by numpy's own ``np.lib.format`` readers; object dtypes (which
    would need unpickling) are refused.
    """
    view = memoryview(raw)
    lead = bytes(view[:12])
    end = len(lead)
    if lead[:6] == b"\x93NUMPY" and len(lead) >= 10:  # magic, version, header length
        end = 10 + int.from_bytes(lead[8:10], "little") if lead[6] == 1 else \
            12 + int.from_bytes(lead[8:12], "little")
    f = io.BytesIO(bytes(view[: min(end, len(view))]))
    shape, fortran, dtype = _npy_header(f, path, name)
    count = int(np.prod(shape, dtype=np.int64))
    offset = f.tell()
    if len(view) - offset != count * dtype.itemsize:
        raise FormatError(
            f"{path}: array {name!r} holds {len(view) - offset} bytes of data, its header "
            f"needs {count * dtype.itemsize}"
        )
    # Through the memoryview: the array's base is then not the uint8 buffer, whose larger
    # element count made scipy's _prune_array take the array for a small view and copy it.
    arr = np.frombuffer(view, dtype=dtype, count=count, offset=offset)
    if fortran:
        return arr.reshape(shape[::-1]).transpose()
    return arr.reshape(shape)


_SCIPY_CLASSES = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "bsr": sp.bsr_matrix}


def _scipy_matrix(path: str, npz: _Members, opts: NpzOptions) -> sp.spmatrix:
    """Rebuild a ``scipy.sparse.save_npz`` matrix from its members (as ``load_npz`` does)."""
    fmt = _small_member(path, npz, "format")
    fmt = fmt.item().decode() if fmt.dtype.kind == "S" else str(fmt.item())
    shape = _shape_member(path, npz, opts)
    data = _small_member(path, npz, "data")
    if fmt in _SCIPY_CLASSES:
        m = _SCIPY_CLASSES[fmt]((data, npz["indices"], npz["indptr"]), shape=shape)
        m.check_format(full_check=True)
        return m
    if fmt == "coo":
        return sp.coo_matrix((data, (npz["row"], npz["col"])), shape=shape)
    if fmt == "dia":
        return sp.dia_matrix((data, npz["offsets"]), shape=shape)
    raise FormatError(f"{path}: unknown scipy.sparse format {fmt!r}")


def load_shard(path: str, opts: NpzOptions) -> dict[str, np.ndarray]:
    """Decompress one shard into plain numpy arrays (runs in an executor worker).

    Returns ``{"data", "indices", "indptr", "shape"}`` (CSR parts), ``{"row", "col",
    "data", "shape"}`` (COO parts sorted by row, see :func:`_row_parts`) or ``{"dense",
    "shape"}``, plus ``"label:<name>"`` arrays.  Top-level and picklable on purpose.
    """
    try:
        with _open_zip(path) as zf:
            check_zip_sizes(path, zf, opts.max_bytes)  # before any decompression
            npz = _Members(path, zf)
            return _load_parts(path, zf, npz, _kind(path, npz.files, opts), opts)
    except SparseStoreError:
        raise
    except (ValueError, TypeError, IndexError, OSError, EOFError, zipfile.BadZipFile,
            zlib.error) as exc:
        raise _as_format_error(path, exc) from None


def _load_parts(path: str, zf: zipfile.ZipFile, npz: _Members, kind: str, opts: NpzOptions
                ) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if kind == "scipy":
        out.update(_row_parts(_scipy_matrix(path, npz, opts)))
    elif kind == "dense":
        key = opts.key or [m for m in npz.files if m not in opts.labels][0]
        arr = _small_member(path, npz, key)
        if arr.ndim != 2:
            raise FormatError(f"{path}: array {key!r} must be 2-D, got {arr.shape}")
        if opts.sparse:
            out.update(_csr_parts(sp.csr_matrix(arr)))
        else:
            out["dense"] = arr
            out["shape"] = np.array(arr.shape, dtype=np.int64)
    else:
        shape = _shape_member(path, npz, opts)
        data = _small_member(path, npz, opts.name("data"))
        if kind == "coo":
            row = _small_member(path, npz, opts.name("row"))
            col = _small_member(path, npz, opts.name("col"))
            m: Any = sp.coo_matrix((data, (row, col)), shape=shape)
        else:
            ind = _small_member(path, npz, opts.name("indices"))
            ptr = _small_member(path, npz, opts.name("indptr"))
            m = sp.csr_matrix((data, ind, ptr), shape=shape)
            m.check_format(full_check=True)
        out.update(_row_parts(m))
    for lab in opts.labels:
        out["label:" + lab] = _small_member(path, npz, lab)
    return out


def _row_parts(m: Any) -> dict[str, np.ndarray]:
    """CSR parts of a whole shard; or, when its declared rows outnumber its entries and
    ``MAX_BLOCK_ROWS``, its COO parts sorted by row (``row``, ``col``, ``data``), so that no
    indptr is built for rows the data does not fill (cut into blocks by the consumer)."""
    if m.format == "csr" or m.shape[0] <= max(MAX_BLOCK_ROWS, m.nnz):
        return _csr_parts(sp.csr_matrix(m))
    coo = m.tocoo()
    order = np.argsort(coo.row, kind="stable")
    return {"row": coo.row[order], "col": coo.col[order], "data": coo.data[order],
            "shape": np.array(m.shape, dtype=np.int64)}


def _csr_parts(m: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {"data": m.data, "indices": m.indices, "indptr": m.indptr,
            "shape": np.array(m.shape, dtype=np.int64)}


# ------------------------------------------------------------------ CSR shards, streamed

# Bytes of values per unit a streamed CSR shard is inflated in (a shard of 20M nnz in 64,
# float64, is one unit; so is any member up to this size, inflated in one call).
DEFAULT_UNIT_BYTES = 4 * 2**20
# Bytes of values per block cut from a unit for the writer (views; with int32 indices,
# 1.5 MiB of float64 entries): a quarter of a default chunk, which the writer takes as it
# is (it joins smaller blocks by copying), and what its canonical copy of a block holds.
DEFAULT_PIECE_BYTES = 2**20
# indptr entries inflated at a time while looking for a unit's end.
_PTR_WINDOW = 2**16

Reserve = Callable[[int], None]


def _no_reserve(nbytes: int) -> None:
    pass


class _NpyStream:
    """One 1-D ``.npy`` member of a shard, read in order, ``n`` values at a time.

    Read through the standard library's own member stream (``ZipFile.open``), which
    checks the local header, never inflates more than the declared size and checks the
    CRC-32 when the member's last byte is read.  Reads are few and long: each inflate
    drops and retakes the GIL, and the writer's thread wants it too (zipfile's stream read
    in small pieces made 2 workers ~10% slower).  A member of at most
    ``DEFAULT_UNIT_BYTES`` is read whole by one ``read`` at its first read of values (the
    arrays returned view that buffer), a bigger one a read at a time.

    The ``.npy`` header is peeked with a handle of its own (parsed by numpy's own
    ``np.lib.format`` readers; object dtypes, which would need unpickling, are refused;
    it must agree with the declared size), and the values are read by a second handle
    whose first read takes the header again with them: zipfile inflates at least 4 KiB a
    read, and what a header read left over would be joined to the next read by a copy of
    a whole unit.  Against the hand-written local-header parser and ``zlib`` inflater
    this replaced (64 shards, 20M nnz, float64, interleaved in one process): workers=1
    1.08 vs 1.08 s, workers=2 0.75 vs 0.72 s, the same bytes written; on 8 shards of
    29 MiB, 2 workers peak a few MiB higher (zipfile reads ``n`` compressed bytes ahead
    for ``n`` inflated ones).
    """

    def __init__(self, path: str, zf: zipfile.ZipFile, name: str) -> None:
        self.path, self.name, self.zf = path, name, zf
        try:
            self.info = zf.getinfo(name + ".npy")
        except KeyError:
            raise FormatError(f"{path} has no array named {name!r}") from None
        if self.info.flag_bits & 0x1:
            raise FormatError(f"{path}: member {name!r} is encrypted")
        self.size = int(self.info.file_size)
        self.f: Any = None  # the values' handle, from the first read of values
        self.whole: memoryview | None = None  # a member read at once
        with zf.open(self.info) as f:
            head = f.read(10)
            hlen = int.from_bytes(head[8:10], "little")
            if head[:6] == b"\x93NUMPY" and head[6:7] != b"\x01":
                head += f.read(2)
                hlen = int.from_bytes(head[8:12], "little")
            self.head = head + f.read(min(hlen, 2**20))
        shape, _fortran, dtype = _npy_header(io.BytesIO(self.head), path, name)
        self.pos = len(self.head)  # bytes of the member handed out (or skipped) so far
        if len(shape) != 1:
            raise FormatError(f"{path}: array {name!r} must be 1-D, got shape {shape}")
        self.dtype, self.count, self.done = np.dtype(dtype), int(shape[0]), 0
        if self.size - self.pos != self.count * self.dtype.itemsize:
            raise FormatError(
                f"{path}: array {name!r} holds {self.size - self.pos} bytes of data, "
                f"its header needs {self.count * self.dtype.itemsize}"
            )
        self.at_once = self.size <= DEFAULT_UNIT_BYTES

    def _bytes(self, n: int) -> Any:
        """The next ``n`` bytes of values, viewing the buffer they were inflated into."""
        if self.whole is not None:
            out = self.whole[self.pos : self.pos + n]
        elif self.f is None:  # the first read: the header again, and the values
            self.f = self.zf.open(self.info)
            want = self.size if self.at_once else self.pos + n
            got = memoryview(self.f.read(want))
            if got[: self.pos] != self.head:
                raise FormatError(f"{self.path}: member {self.name!r} changed while read")
            if self.at_once:
                self.whole = got
            out = got[self.pos : self.pos + n]
        else:
            out = self.f.read(n)
        if len(out) != n:
            raise FormatError(f"{self.path}: member {self.name!r} is truncated")
        self.pos += n
        return out

    def read(self, n: int) -> np.ndarray:
        """The next ``n`` values, in an array of their own (scipy keeps it, no copy)."""
        if n > self.count - self.done:
            raise FormatError(
                f"{self.path}: array {self.name!r} has {self.count} values, more are needed"
            )
        out = np.frombuffer(self._bytes(n * self.dtype.itemsize), dtype=self.dtype, count=n)
        self.done += n
        return out

    def finish(self) -> None:
        """Check that every value was read; zipfile checked the size and CRC-32 at the
        last byte (a member with no values is read for that now)."""
        try:
            if self.f is None:
                self._bytes(0)
            if self.done != self.count or self.pos != self.size:
                raise FormatError(
                    f"{self.path}: member {self.name!r} does not end where its zip entry "
                    "says"
                )
        finally:
            self.close()

    def close(self) -> None:
        self.whole = None
        if self.f is not None:
            self.f.close()


def _plain(info: zipfile.ZipInfo) -> bool:
    """Stored or deflated, not encrypted: the members ``_NpyStream`` streams (others are
    loaded whole)."""
    return not info.flag_bits & 0x1 and info.compress_type in (zipfile.ZIP_STORED,
                                                              zipfile.ZIP_DEFLATED)


def _csr_units(path: str, zf: zipfile.ZipFile, npz: _Members, opts: NpzOptions,
               shape: tuple[int, int], unit_nnz: int | None, reserve: Reserve
               ) -> Iterator[tuple[str, Any]]:
    """A CSR shard's rows as ``("unit", (csr, labels))`` items of about ``unit_nnz``
    entries (default: ``DEFAULT_UNIT_BYTES`` of values), at least one row each, and at
    least one unit.  Its three members are inflated in step, so the shard is never whole
    in memory; ``reserve(nbytes)`` is called before a unit is inflated.  Checked as
    ``check_format(full_check=True)`` would, unit by unit."""
    streams: list[_NpyStream] = []
    try:
        for role in ("indptr", "indices", "data"):
            streams.append(_NpyStream(path, zf, opts.name(role)))
        yield from _stream_units(path, npz, opts, shape, unit_nnz, reserve, *streams)
    finally:
        for s in streams:
            s.close()


def _stream_units(path: str, npz: _Members, opts: NpzOptions, shape: tuple[int, int],
                  unit_nnz: int | None, reserve: Reserve, ptr: _NpyStream, ind: _NpyStream,
                  dat: _NpyStream) -> Iterator[tuple[str, Any]]:
    n_rows, n_cols = shape
    for s, kinds in ((ptr, "iu"), (ind, "iu"), (dat, "biuf")):
        if s.dtype.kind not in kinds:
            raise FormatError(f"{path}: array {s.name!r} has unusable dtype {s.dtype}")
    if ptr.count != n_rows + 1:
        raise FormatError(f"{path}: indptr has {ptr.count} entries; {n_rows} rows need "
                          f"{n_rows + 1}")
    if ind.count != dat.count:
        raise FormatError(f"{path}: {ind.count} indices but {dat.count} values")
    if unit_nnz is None:
        unit_nnz = max(1024, DEFAULT_UNIT_BYTES // dat.dtype.itemsize)
    labs = {lab: _small_member(path, npz, lab) for lab in opts.labels}
    if int(ptr.read(1)[0]) != 0:
        raise FormatError(f"{path}: indptr does not start at 0")
    pending = np.empty(0, dtype=np.int64)  # indptr[row + 1 :], as far as inflated
    row = lo = 0  # rows and entries handed out so far
    while True:
        while (row + pending.size < n_rows and pending.size < _PTR_WINDOW
               and (not pending.size or pending[-1] - lo < unit_nnz)):
            more = ptr.read(min(_PTR_WINDOW, n_rows - row - pending.size)).astype(np.int64)
            pending = np.concatenate([pending, more]) if pending.size else more
        k = min(pending.size, int(np.searchsorted(pending, lo + unit_nnz)) + 1)
        ends = pending[:k]
        if k and (ends[0] < lo or (k > 1 and bool(np.any(ends[1:] < ends[:-1])))):
            raise FormatError(f"{path}: indptr is not monotone")
        hi = int(ends[-1]) if k else lo
        if hi > ind.count:
            raise FormatError(f"{path}: indptr points past the {ind.count} stored entries")
        reserve((k + 1) * 8 + (hi - lo) * (ind.dtype.itemsize + dat.dtype.itemsize))
        indices, data = ind.read(hi - lo), dat.read(hi - lo)
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n_cols):
            raise FormatError(f"{path}: a column index is out of range [0, {n_cols})")
        local = np.empty(k + 1, dtype=np.int64)
        local[0] = 0
        np.subtract(ends, lo, out=local[1:])
        unit = sp.csr_matrix((data, indices, local), shape=(k, n_cols), copy=False)
        del data, indices, local
        yield "unit", (unit, {n: v[row : row + k] for n, v in labs.items()} or None)
        del unit  # not pinned while the next unit inflates
        row, lo, pending = row + k, hi, pending[k:]
        if row >= n_rows:
            break
    if lo != ind.count:
        raise FormatError(f"{path}: indptr ends at {lo} but {ind.count} entries are stored")
    for s in (ptr, ind, dat):
        s.finish()


def _streamable(path: str, npz: _Members, kind: str, opts: NpzOptions) -> bool:
    """Whether a shard is CSR parts that can be streamed (not whole CSC/COO/dense...),
    stored or deflated."""
    if kind == "scipy":
        fmt = _small_member(path, npz, "format")
        if (fmt.item().decode() if fmt.dtype.kind == "S" else str(fmt.item())) != "csr":
            return False
    elif kind != "csr":
        return False
    names = [opts.name(r) + ".npy" for r in ("indptr", "indices", "data")]
    return all(n not in npz.zf.NameToInfo or _plain(npz.zf.getinfo(n)) for n in names)


def shard_units(path: str, opts: NpzOptions, shape: tuple[int, int] | None = None,
                unit_nnz: int | None = None, reserve: Reserve = _no_reserve
                ) -> Iterator[tuple[str, Any]]:
    """One shard as ``("unit", (rows, labels))`` items -- a CSR shard streamed in units
    (see :func:`_csr_units`) -- or, for other kinds, one ``("whole", parts)`` item
    (see :func:`load_shard`).  ``shape``: what the shard's headers said when scanned;
    ``reserve(nbytes)`` is called before each item is decompressed."""
    try:
        with _open_zip(path) as zf:
            total = check_zip_sizes(path, zf, opts.max_bytes)  # before any decompression
            npz = _Members(path, zf)
            kind = _kind(path, npz.files, opts)
            if not _streamable(path, npz, kind, opts):
                reserve(total)
                yield "whole", _load_parts(path, zf, npz, kind, opts)
                return
            got = _shape_member(path, npz, opts)
            if shape is not None and got != tuple(shape):
                raise _changed(path, got, tuple(shape))
            yield from _csr_units(path, zf, npz, opts, got, unit_nnz, reserve)
    except SparseStoreError:
        raise
    except (ValueError, TypeError, IndexError, OSError, EOFError, zipfile.BadZipFile,
            zlib.error) as exc:
        raise _as_format_error(path, exc) from None


def _changed(path: str, shape: tuple[int, ...], expect: tuple[int, ...]) -> FormatError:
    return FormatError(f"{path}: holds a {shape[0]}x{shape[1]} matrix but its header said "
                       f"{expect}; the file changed while being read")


class _Slot:
    """One shard's items, decoded by a worker and not yet taken by the consumer."""

    __slots__ = ("done", "error", "items", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.items: collections.deque[tuple[tuple[str, Any], int]] = collections.deque()
        self.done = False
        self.error: BaseException | None = None


class _Closed(Exception):
    """The loader was closed while a worker waited for room."""


class ShardStreamer:
    """Shards' items (see :func:`shard_units`) in the given order, CSR shards in units.

    ``workers=1`` reads each shard in the consuming thread when it is asked for: one
    thread, no overlap, one unit at a time.  Otherwise ``workers`` threads take shards in
    order and decompress them unit by unit ahead of the consumer, as long as the bytes
    decoded (or being decoded) and not yet taken stay within ``lookahead_bytes``: a
    worker reserves a unit's size (known from ``indptr``) before inflating it.  The shard
    the consumer is on may always decode a unit when it has none waiting, so a unit
    bigger than the budget cannot stall it.  Memory: the budget, a unit per worker at most
    beyond it, and the unit the writer is on -- not whole shards, whatever their size.

    The workers run ``DECODE_NICE`` steps lower in CPU priority (Linux), so that the
    writer, whose zarr encode-and-store chain hops between threads and paces the
    conversion, is not kept waiting behind them.
    """

    def __init__(self, paths: Sequence[str], opts: NpzOptions, *, workers: int | None = None,
                 shapes: Sequence[tuple[int, int]] | None = None,
                 unit_nnz: int | None = None,
                 lookahead_bytes: int = DEFAULT_LOOKAHEAD_BYTES) -> None:
        n_workers = _default_workers() if workers is None else int(workers)
        if n_workers < 1:
            raise InvalidInputError(f"workers must be at least 1, got {workers}")
        self.paths, self.opts, self.unit_nnz = list(paths), opts, unit_nnz
        self.shapes = list(shapes) if shapes is not None else [None] * len(self.paths)
        self.budget = int(lookahead_bytes)
        lock = threading.Lock()
        self.cv = threading.Condition(lock)  # the consumer waits on this for items
        self.room = threading.Condition(lock)  # the workers wait on this for budget
        self.slots: collections.deque[_Slot] = collections.deque()  # started, in order
        self.ahead = 0  # bytes reserved by the workers and not yet taken by the consumer
        self.next = 0  # the next shard to start
        self.closed = False
        self.inline: Iterator[tuple[str, Any]] | None = None  # workers=1: the current shard
        self.threads = [
            threading.Thread(target=self._work, name=f"sparsestore-npz-{i}", daemon=True)
            for i in range(n_workers if n_workers > 1 else 0)
        ]
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------- workers
    def _work(self) -> None:
        _background_priority()
        while True:
            with self.cv:
                # Start another shard only while the budget has room (or nothing waits).
                while (not self.closed and self.next < len(self.paths) and self.slots
                       and self.ahead >= self.budget):
                    self.room.wait()
                if self.closed or self.next >= len(self.paths):
                    return
                i = self.next
                self.next += 1
                slot = _Slot(self.paths[i])
                self.slots.append(slot)
            self._produce(slot, i)

    def _produce(self, slot: _Slot, i: int) -> None:
        reserved = 0

        def reserve(nbytes: int) -> None:
            nonlocal reserved
            with self.cv:
                while not self.closed and self.ahead + nbytes > self.budget and not (
                    slot is self.slots[0] and not slot.items
                ):
                    self.room.wait()
                if self.closed:
                    raise _Closed
                self.ahead += nbytes
                reserved += nbytes

        items = shard_units(self.paths[i], self.opts, self.shapes[i], self.unit_nnz,
                            reserve)
        try:
            for item in items:
                with self.cv:
                    slot.items.append((item, reserved))
                    reserved = 0
                    self.cv.notify()
                del item
        except _Closed:
            pass
        except BaseException as exc:  # handed to the consumer, in order
            slot.error = exc
        finally:
            items.close()
            with self.cv:
                self.ahead -= reserved  # reserved for an item that never came
                slot.done = True
                self.cv.notify()
                self.room.notify_all()

    # ------------------------------------------------------------- consumer
    def __iter__(self) -> ShardStreamer:
        return self

    def __next__(self) -> tuple[str, tuple[str, Any]]:
        if not self.threads:
            return self._next_inline()
        err: BaseException | None = None
        with self.cv:
            while not self.closed:
                if not self.slots:
                    if self.next >= len(self.paths):
                        break
                    self.cv.wait()
                    continue
                head = self.slots[0]
                if head.items:
                    item, size = head.items.popleft()
                    self.ahead -= size
                    self.room.notify_all()
                    return head.path, item
                if head.error is not None:
                    err = head.error
                    break
                if head.done:
                    self.slots.popleft()
                    self.room.notify_all()  # a new head may go beyond the budget
                    continue
                self.cv.wait()
        self.close()
        if err is not None:
            raise err
        raise StopIteration

    def _next_inline(self) -> tuple[str, tuple[str, Any]]:
        while not self.closed:
            if self.inline is None:
                if self.next >= len(self.paths):
                    break
                i = self.next
                self.next += 1
                self.inline = shard_units(self.paths[i], self.opts, self.shapes[i],
                                          self.unit_nnz)
            try:
                return self.paths[self.next - 1], next(self.inline)
            except StopIteration:
                self.inline = None
            except BaseException:
                self.close()
                raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Stop the workers (each finishes the piece it is inflating) and drop the rest."""
        with self.cv:
            self.closed = True
            self.slots.clear()
            self.cv.notify_all()
            self.room.notify_all()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join()
        if self.inline is not None:
            inline, self.inline = self.inline, None
            inline.close()  # type: ignore[attr-defined]


# ------------------------------------------------------------------ the source

class ShardLoader:
    """Shards loaded in the given order, decompressing ahead of the consumer from creation.

    ``workers=1`` (and no executor) loads each shard in the consuming thread when it is
    asked for: one thread, no overlap, least memory.  Otherwise a pool of ``workers``
    threads (or ``executor``) decompresses shards ahead of the consumer, ``workers`` at
    once: ``workers - 1`` shards ahead at least, more while their decompressed ``sizes``
    (bytes, from the zip headers) add up to ``lookahead_bytes`` at most.  The writer
    stores whole zarr chunks, so it takes small shards in bursts; shards ready beforehand
    keep both the writer and the decompressing threads busy.  Memory: the shard being
    written plus that bound.

    Our own pool's threads run ``DECODE_NICE`` steps lower in CPU priority (Linux), so
    that the writer, whose zarr encode-and-store chain hops between threads and paces the
    conversion, is not kept waiting behind them (measured: a few percent faster).  Call
    :meth:`close` (or exhaust it) to stop it.
    """

    def __init__(self, paths: Sequence[str], opts: NpzOptions, *, workers: int | None = None,
                 executor: Executor | None = None, sizes: Sequence[int] | None = None,
                 lookahead_bytes: int = DEFAULT_LOOKAHEAD_BYTES) -> None:
        n_workers = _default_workers() if workers is None else int(workers)
        if n_workers < 1:
            raise InvalidInputError(f"workers must be at least 1, got {workers}")
        self.paths, self.opts = list(paths), opts
        self.sizes = list(sizes) if sizes is not None else None  # unknown: no lookahead
        self.lookahead_bytes = int(lookahead_bytes)
        self.depth = max(1, n_workers - 1)
        self.own = executor is None and n_workers > 1
        self.ex: Executor | None = executor
        if self.own:
            self.ex = ThreadPoolExecutor(n_workers, thread_name_prefix="sparsestore-npz",
                                         initializer=_background_priority)
        self.pending: collections.deque[tuple[str, int, Future[Any]]] = collections.deque()
        self.ahead = 0  # decompressed bytes of the shards in ``pending``
        self.next = 0
        self._fill()

    def _fill(self) -> None:
        if self.ex is None:
            return
        while self.next < len(self.paths) and (
            len(self.pending) < self.depth
            or (self.sizes is not None
                and self.ahead + self.sizes[self.next] <= self.lookahead_bytes)
        ):
            path = self.paths[self.next]
            size = self.sizes[self.next] if self.sizes is not None else 0
            self.pending.append((path, size, self.ex.submit(load_shard, path, self.opts)))
            self.ahead += size
            self.next += 1

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> tuple[str, dict[str, np.ndarray]]:
        if self.ex is None:
            if self.next >= len(self.paths):
                raise StopIteration
            path = self.paths[self.next]
            self.next += 1
            return path, load_shard(path, self.opts)
        if not self.pending:
            self.close()
            raise StopIteration
        path, size, fut = self.pending.popleft()
        try:
            result = fut.result()
        except BaseException:
            self.close()
            raise
        self.ahead -= size
        self._fill()
        return path, result

    def close(self) -> None:
        """Cancel what has not started and stop our own pool (waits for running loads)."""
        for _, _, fut in self.pending:
            fut.cancel()
        self.pending.clear()
        self.next = len(self.paths)
        if self.own and self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)


# How much lower (``nice`` steps) our decompressing threads run than the writer.
DECODE_NICE = 10


def _background_priority() -> None:
    """Pool initializer: lower this thread's CPU priority (Linux threads have their own)."""
    if sys.platform.startswith("linux") and DECODE_NICE:
        with contextlib.suppress(OSError, AttributeError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid,
                           os.getpriority(os.PRIO_PROCESS, tid) + DECODE_NICE)


def iter_shards(
    paths: Sequence[str],
    opts: NpzOptions,
    *,
    workers: int | None = None,
    executor: Executor | None = None,
    sizes: Sequence[int] | None = None,
    lookahead_bytes: int = DEFAULT_LOOKAHEAD_BYTES,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(path, parts)`` of every shard in the given order (see :class:`ShardLoader`)."""
    loader = ShardLoader(paths, opts, workers=workers, executor=executor, sizes=sizes,
                         lookahead_bytes=lookahead_bytes)
    try:
        yield from loader
    finally:
        loader.close()


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def npz_source(
    src: Any,
    *,
    key: str | None = None,
    keys: Mapping[str, str] | None = None,
    labels: Sequence[str] | None = None,
    workers: int | None = None,
    executor: Executor | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    dtype: Any = None,
    sparse: bool = True,
    block_nnz: int = DEFAULT_BLOCK_NNZ,
    unit_nnz: int | None = None,
    piece_nnz: int | None = None,
    lookahead_bytes: int = DEFAULT_LOOKAHEAD_BYTES,
) -> Source:
    """A :class:`Source` over ``.npz`` shards (a path, glob or list), rows concatenated.

    CSR shards are inflated in units of ``unit_nnz`` entries and written in blocks of
    ``piece_nnz`` (defaults: ``DEFAULT_UNIT_BYTES`` and ``DEFAULT_PIECE_BYTES`` of
    values); whole shards (other kinds, or all with ``executor=``) in blocks of
    ``block_nnz``.
    """
    paths = expand_paths(src, what="npz")
    if keys is not None and not isinstance(keys, Mapping):
        raise FormatError("keys must map roles (row, col, data, indices, indptr, shape) to names")
    opts = NpzOptions(key=key, keys=dict(keys or {}), labels=tuple(labels or ()),
                      max_bytes=int(max_bytes), sparse=sparse)
    infos = [scan_shard(p, opts) for p in paths]
    n_cols = infos[0].shape[1]
    for info in infos[1:]:
        check_n_cols(info.path, info.shape[1], n_cols)
        if info.label_dtypes and [(n, s) for n, _, s in info.label_dtypes] != [
            (n, s) for n, _, s in infos[0].label_dtypes
        ]:
            raise FormatError(f"{info.path}: its labels' shapes differ from the first shard's")
    dt = np.dtype(dtype) if dtype is not None else result_dtype([i.dtype for i in infos])
    n_rows = sum(i.shape[0] for i in infos)
    is_dense = all(i.kind == "dense" for i in infos)
    expect = {i.path: i.shape for i in infos}
    sizes = [i.nbytes for i in infos]

    def blocks() -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
        if executor is not None:  # whole shards, loaded by the caller's executor
            shards = ShardLoader(paths, opts, workers=workers, executor=executor, sizes=sizes,
                                 lookahead_bytes=lookahead_bytes)
            try:
                for path, parts in shards:
                    yield from _whole_blocks(path, parts, expect[path], block_nnz)
                    del parts
            finally:
                shards.close()
            return
        loader = ShardStreamer(paths, opts, workers=workers, shapes=[i.shape for i in infos],
                               unit_nnz=unit_nnz, lookahead_bytes=lookahead_bytes)
        try:
            for path, (kind, value) in loader:
                if kind == "unit":
                    yield from _unit_blocks(*value, piece_nnz)
                else:
                    yield from _whole_blocks(path, value, expect[path], block_nnz)
                del value  # not pinned while the next item is fetched
        finally:
            loader.close()

    threads = _default_workers() if workers is None else int(workers)
    if executor is not None:
        threads = 2
    return Source(name=paths[0] if len(paths) == 1 else f"{len(paths)} npz shards",
                  n_cols=n_cols, dtype=dt, blocks=blocks, n_rows=n_rows,
                  labels=list(opts.labels), dense=is_dense, threads=threads)


def _whole_blocks(path: str, parts: dict[str, np.ndarray], expect: tuple[int, int],
                  block_nnz: int) -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
    """A whole shard's parts (see :func:`load_shard`) as row blocks with their labels."""
    shape = tuple(int(s) for s in parts["shape"])
    if shape != expect:
        raise _changed(path, shape, expect)
    labs = {k[6:]: v for k, v in parts.items() if k.startswith("label:")}
    if "dense" in parts:
        pieces = _dense_pieces(parts["dense"])
    elif "row" in parts:
        pieces = coo_row_blocks(parts["row"], parts["col"], parts["data"], shape,
                                target_nnz=block_nnz, rows_sorted=True)
    else:
        pieces = _with_bounds(csr_blocks(
            sp.csr_matrix((parts["data"], parts["indices"], parts["indptr"]), shape=shape),
            block_nnz))
    del parts  # held by ``pieces`` only, which goes before the next shard
    yield from _labelled(_last_copied(pieces), labs)


def _unit_blocks(unit: sp.csr_matrix, labs: dict[str, np.ndarray] | None,
                 piece_nnz: int | None) -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
    """A streamed unit as row blocks (views) of at least ``piece_nnz`` entries (but the
    last), so that the writer's canonical copy of a block stays about that small, and it
    takes the blocks as they are (it joins smaller ones by copying)."""
    if piece_nnz is None:
        piece_nnz = max(1024, DEFAULT_PIECE_BYTES // unit.data.itemsize)
    yield from _labelled(_last_copied(_cut(unit, piece_nnz)), labs or {})


def _cut(m: sp.csr_matrix, piece_nnz: int) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    ptr, n = m.indptr, m.shape[0]
    a = 0
    while True:
        b = min(n, max(a + 1, int(np.searchsorted(ptr, ptr[a] + piece_nnz)))) if n else 0
        if a == 0 and b == n:
            yield a, b, m
            return
        lo, hi = int(ptr[a]), int(ptr[b])
        yield a, b, sp.csr_matrix(
            (_view(m.data, lo, hi), _view(m.indices, lo, hi), ptr[a : b + 1] - lo),
            shape=(b - a, m.shape[1]), copy=False)
        if b >= n:
            return
        a = b


def _dense_pieces(m: np.ndarray) -> Iterator[tuple[int, int, Any]]:
    step = max(1, (16 * 2**20) // max(1, m.shape[1] * m.itemsize))
    for a in range(0, max(1, m.shape[0]), step):
        yield a, min(a + step, m.shape[0]), m[a : a + step]


def _last_copied(pieces: Iterator[tuple[int, int, Any]]) -> Iterator[tuple[int, int, Any]]:
    """The pieces of one shard, the last one copied if there were several.

    The writer still holds the last block it got while it asks for the next (and, with
    ``workers=1``, while the next shard decompresses): a view would pin the whole shard.
    """
    prev = next(pieces, None)
    several = False
    for cur in pieces:
        yield prev  # type: ignore[misc]
        prev, several = cur, True
    if prev is not None:
        a, b, block = prev
        yield a, b, (block.copy() if several else block)


def _labelled(pieces: Iterator[tuple[int, int, Any]], labs: dict[str, np.ndarray]
              ) -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
    for a, b, block in pieces:
        yield block, ({k: v[a:b] for k, v in labs.items()} or None)


def _with_bounds(blocks: Iterator[Any]) -> Iterator[tuple[int, int, Any]]:
    a = 0
    for block in blocks:
        yield a, a + block.shape[0], block
        a += block.shape[0]


def from_npz(dst: Any, src: Any, *, key: str | None = None,
             keys: Mapping[str, str] | None = None, labels: Sequence[str] | None = None,
             workers: int | None = None, executor: Executor | None = None,
             max_bytes: int = DEFAULT_MAX_BYTES, dtype: Any = None, sparse: bool = True,
             **options: Any) -> Any:
    """Store ``.npz`` shards (see :func:`npz_source`); atomic, in the given order."""
    source = npz_source(src, key=key, keys=keys, labels=labels, workers=workers,
                        executor=executor, max_bytes=max_bytes, dtype=dtype, sparse=sparse)
    return write_source(dst, source, sparse=sparse, **options)


__all__ = [
    "DEFAULT_LOOKAHEAD_BYTES",
    "DEFAULT_MAX_BYTES",
    "NpzOptions",
    "ShardInfo",
    "ShardLoader",
    "ShardStreamer",
    "check_zip_sizes",
    "from_npz",
    "iter_shards",
    "load_shard",
    "npz_source",
    "scan_shard",
    "shard_units",
]
