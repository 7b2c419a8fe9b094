"""Compressed ``.npz`` shards, read by background threads ahead of the writer, in order.

Three kinds of shard are understood, told apart by their member names:

* ``scipy.sparse.save_npz`` files (any of its formats);
* ``np.savez``/``np.savez_compressed`` files holding COO parts (``row``/``col``/``data`` +
  ``shape``) or CSR parts (``data``/``indices``/``indptr`` + ``shape``), key names
  configurable;
* ``np.savez``/``np.savez_compressed`` files holding one dense 2-D array (``key=`` picks it).

A shard is opened by its zip directory alone: the members' declared sizes must add up to
at most ``max_bytes`` (decompression bombs).  A member's ``.npy`` header is read before the
member and must describe exactly its declared size and no Python objects.  Before anything
is written every shard's directory and value headers are checked so; column counts must
agree and the dtypes decide the store's.

CSR shards (``save_npz``'s default format, or CSR parts) stored or deflated are streamed:
their ``indptr``, ``indices`` and ``data`` members are inflated in step, a unit of rows
(``DEFAULT_UNIT_BYTES`` of values) at a time, so no shard is ever whole in memory.  Other
shards are loaded whole by :func:`load_shard` (``np.load(allow_pickle=False)``,
``scipy.sparse.load_npz``); it is picklable, so with ``executor=`` (a thread or process pool,
a dask ``client.get_executor()``...) every shard is loaded whole there.  Either way a
:class:`Reader` runs ``workers`` threads ahead of the writer within ``lookahead_bytes`` of
decoded data.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..blocks import MAX_BLOCK_ROWS, coo_row_blocks, csr_views
from ..canonical import check_row_count, native, native_matrix
from ..errors import FormatError, InvalidInputError, SparseStoreError, UnsafeInputError
from .base import (
    DEFAULT_BLOCK_NNZ,
    Source,
    check_n_cols,
    expand_paths,
    result_dtype,
    write_source,
)

# Default limit on the decompressed size of one shard (sum of its members).
DEFAULT_MAX_BYTES = 8 * 2**30
# Decompressed bytes read ahead of the writer (besides the unit it is on): the writer takes
# data in bursts (a chunk of values and one of indices at a time), faster than one thread
# inflates it.  With ``executor=``, ``workers - 1`` whole shards ahead at least.
DEFAULT_LOOKAHEAD_BYTES = 16 * 2**20
# Bytes of values per unit a streamed CSR shard is inflated in; a member up to this size is
# inflated by one read.
DEFAULT_UNIT_BYTES = 4 * 2**20
# Bytes of values per block cut from a unit for the writer (views): about half a default
# chunk, above the quarter chunk below which the writer joins blocks by copying.
DEFAULT_PIECE_BYTES = 2 * 2**20
# indptr entries inflated at a time while looking for a unit's end.
_PTR_WINDOW = 2**16
_SCIPY_FORMATS = ("csr", "csc", "coo", "bsr", "dia")
# What a damaged shard makes numpy, scipy or zipfile raise.
_READ_ERRORS = (ValueError, TypeError, IndexError, KeyError, OSError, EOFError,
                zipfile.BadZipFile, zlib.error)


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


Header = tuple[tuple[int, ...], np.dtype]  # an .npy member's shape and dtype


# ------------------------------------------------------------------ opening, with checks

def _not_a_zip(path: str, head: bytes) -> SparseStoreError:
    """The error for a shard that is not a zip archive, saying what it is."""
    if head[:1] == b"\x80":
        return UnsafeInputError(
            f"{path} is a Python pickle, not an .npz file; pickled data is never loaded"
        )
    if head[:6] == b"\x93NUMPY":
        return FormatError(f"{path} is a .npy file, not an .npz archive; use format='npy'")
    return FormatError(f"{path} is not a valid .npz file (not a zip archive, or truncated)")


def check_declared_bytes(path: str, nbytes: int, max_bytes: int, what: str) -> None:
    """Refuse a source whose headers declare more than ``max_bytes`` of decompressed data
    (``what`` says which part declares it), before anything is inflated or allocated: a
    small file can declare petabytes of zeros."""
    if nbytes > max_bytes:
        raise UnsafeInputError(
            f"{path} would decompress to more than {max_bytes} bytes ({what}); refusing a "
            "possible decompression bomb. Raise max_bytes= (--max-bytes) if the file is "
            "trusted"
        )


def check_zip_sizes(path: str, zf: zipfile.ZipFile, max_bytes: int) -> int:
    """Refuse a shard whose members would decompress to more than ``max_bytes`` in total."""
    total = 0
    for info in zf.infolist():
        total += int(info.file_size)
        check_declared_bytes(path, total, max_bytes,
                             f"member {info.filename!r} declares {info.file_size}")
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


def _member_header(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Header:
    """Shape and dtype of one ``.npy`` member from its header alone, which must describe
    exactly the size its zip entry declares (so loading it allocates no more)."""
    name = info.filename[: -len(".npy")]
    with zf.open(info) as f:
        shape, _fortran, dtype = _npy_header(f, path, name)
        data = info.file_size - f.tell()
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if data != need:
        raise FormatError(
            f"{path}: array {name!r} holds {data} bytes of data, its header needs {need}"
        )
    return tuple(int(s) for s in shape), dtype


class _Shard:
    """An open shard: numpy's ``NpzFile`` of it and its file.  A member's ``.npy`` header is
    checked (see :func:`_member_header`) before the member is loaded."""

    def __init__(self, path: str, npz: Any, file: Any, nbytes: int) -> None:
        self.path, self.npz, self.file, self.zip = path, npz, file, npz.zip
        self.nbytes = nbytes  # decompressed size (sum of the members' declared sizes)
        self.members = [n[: -len(".npy")] for n in self.zip.namelist() if n.endswith(".npy")]
        self._headers: dict[str, Header] = {}

    def header(self, name: str) -> Header:
        if name not in self._headers:
            try:
                info = self.zip.getinfo(name + ".npy")
            except KeyError:
                raise FormatError(f"{self.path} has no array named {name!r}") from None
            self._headers[name] = _member_header(self.path, self.zip, info)
        return self._headers[name]

    def array(self, name: str) -> np.ndarray:
        """A whole member, read by ``np.load`` once its header is checked, in native byte
        order (scipy refuses big-endian arrays)."""
        self.header(name)
        return native(self.npz[name])


@contextlib.contextmanager
def _opened(path: str, max_bytes: int) -> Iterator[_Shard]:
    """The shard opened by ``np.load(allow_pickle=False)``, its zip directory's sizes
    checked: nothing is inflated before."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):  # what np.load takes for a zip
            raise _not_a_zip(path, head)
        f.seek(0)
        with np.load(f, allow_pickle=False) as npz:
            yield _Shard(path, npz, f, check_zip_sizes(path, npz.zip, max_bytes))


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


def _scipy_format(shard: _Shard) -> str:
    fmt = shard.array("format")
    fmt = fmt.item().decode() if fmt.dtype.kind == "S" else str(fmt.item())
    if fmt not in _SCIPY_FORMATS:
        raise FormatError(f"{shard.path}: unknown scipy.sparse format {fmt!r}")
    return fmt


def _shape_member(shard: _Shard, opts: NpzOptions) -> tuple[int, int]:
    name = opts.name("shape")
    shape = shard.array(name)
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or int(shape.min()) < 0:
        raise FormatError(
            f"{shard.path}: {name!r} must hold two non-negative integers, got {shape}"
        )
    return int(shape[0]), int(shape[1])


def scan_shard(path: str, opts: NpzOptions) -> ShardInfo:
    """Check a shard's zip directory and array headers: kind, shape, dtype (no data)."""
    try:
        with _opened(path, opts.max_bytes) as shard:
            kind = _kind(path, shard.members, opts)
            if kind == "scipy":
                fmt = _scipy_format(shard)
                shape = _shape_member(shard, opts)
                dshape, dtype = shard.header("data")
                if fmt != "csr":  # its row count is only declared: backed by the data?
                    check_row_count(shape[0], int(np.prod(dshape, dtype=np.int64)), path)
            elif kind in ("csr", "coo"):
                shape = _shape_member(shard, opts)
                dshape, dtype = shard.header(opts.name("data"))
                if kind == "coo":
                    check_row_count(shape[0], int(np.prod(dshape, dtype=np.int64)), path)
            else:
                key = opts.key or [m for m in shard.members if m not in opts.labels][0]
                dshape, dtype = shard.header(key)
                if len(dshape) != 2:
                    raise FormatError(
                        f"{path}: array {key!r} has shape {dshape}; a dense shard must be 2-D"
                    )
                shape = (dshape[0], dshape[1])
            labels = []
            for lab in opts.labels:
                lshape, ldt = shard.header(lab)
                if not lshape or lshape[0] != shape[0]:
                    raise FormatError(
                        f"{path}: label {lab!r} has shape {lshape} but the shard has "
                        f"{shape[0]} rows"
                    )
                labels.append((lab, ldt, lshape[1:]))
    except SparseStoreError:
        raise
    except _READ_ERRORS as exc:
        raise _as_format_error(path, exc) from None
    if dtype.kind not in "biuf":
        raise FormatError(f"{path}: values of dtype {dtype} cannot be stored")
    return ShardInfo(path, kind, shape, np.dtype(dtype), tuple(labels), shard.nbytes)


def _as_format_error(path: str, exc: BaseException) -> SparseStoreError:
    msg = str(exc)
    if "pickle" in msg.lower():
        return UnsafeInputError(
            f"{path} contains pickled objects; refusing to unpickle (allow_pickle=False)"
        )
    return FormatError(f"{path} is corrupt or truncated ({type(exc).__name__}: {msg})")


def _changed(path: str, shape: tuple[int, ...], expect: tuple[int, ...]) -> FormatError:
    return FormatError(f"{path}: holds a {shape[0]}x{shape[1]} matrix but its header said "
                       f"{expect}; the file changed while being read")


# ------------------------------------------------------------------ whole shards

def load_shard(path: str, opts: NpzOptions) -> dict[str, np.ndarray]:
    """Decompress one shard into plain numpy arrays (runs in an executor worker).

    Returns ``{"data", "indices", "indptr", "shape"}`` (CSR parts), ``{"row", "col",
    "data", "shape"}`` (COO parts sorted by row, see :func:`_row_parts`) or ``{"dense",
    "shape"}``, plus ``"label:<name>"`` arrays.  Top-level and picklable on purpose.
    """
    try:
        with _opened(path, opts.max_bytes) as shard:
            return _load_parts(shard, _kind(path, shard.members, opts), opts)
    except SparseStoreError:
        raise
    except _READ_ERRORS as exc:
        raise _as_format_error(path, exc) from None


def _load_parts(shard: _Shard, kind: str, opts: NpzOptions) -> dict[str, np.ndarray]:
    path = shard.path
    out: dict[str, np.ndarray] = {}
    if kind == "scipy":
        for name in shard.members:
            shard.header(name)
        shard.file.seek(0)
        m: Any = native_matrix(sp.load_npz(shard.file))
        if m.format in ("csr", "csc", "bsr"):
            m.check_format(full_check=True)
        out.update(_row_parts(m))
    elif kind == "dense":
        key = opts.key or [m for m in shard.members if m not in opts.labels][0]
        arr = shard.array(key)
        if arr.ndim != 2:
            raise FormatError(f"{path}: array {key!r} must be 2-D, got {arr.shape}")
        if opts.sparse:
            out.update(_csr_parts(sp.csr_matrix(arr)))
        else:
            out["dense"] = arr
            out["shape"] = np.array(arr.shape, dtype=np.int64)
    else:
        shape = _shape_member(shard, opts)
        data = shard.array(opts.name("data"))
        if kind == "coo":
            row = shard.array(opts.name("row"))
            col = shard.array(opts.name("col"))
            m = sp.coo_matrix((data, (row, col)), shape=shape)
        else:
            ind = shard.array(opts.name("indices"))
            ptr = shard.array(opts.name("indptr"))
            m = sp.csr_matrix((data, ind, ptr), shape=shape)
            m.check_format(full_check=True)
        out.update(_row_parts(m))
    for lab in opts.labels:
        out["label:" + lab] = shard.array(lab)
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

Reserve = Callable[[int], None]


def _no_reserve(nbytes: int) -> None:
    pass


class _NpyStream:
    """One 1-D ``.npy`` member of a shard, read in order, ``n`` values at a time.

    Read through ``ZipFile.open``, which never inflates more than the declared size and
    checks the CRC-32 when the member's last byte is read.  Reads are few and long (each
    inflate drops and retakes the GIL, which the writer's thread wants too): a member of at
    most ``DEFAULT_UNIT_BYTES`` is read whole by its first read of values (the arrays
    returned view that buffer), a bigger one a read at a time.  The header is read first by
    a handle of its own; the values' handle reads it again with the first values, so no
    leftover of a small header read is joined to a unit by a copy.
    """

    def __init__(self, path: str, zf: zipfile.ZipFile, name: str) -> None:
        self.path, self.name, self.zf = path, name, zf
        try:
            self.info = zf.getinfo(name + ".npy")
        except KeyError:
            raise FormatError(f"{path} has no array named {name!r}") from None
        self.size = int(self.info.file_size)
        self.f: Any = None  # the values' handle, from the first read of values
        self.whole: memoryview | None = None  # a member read at once
        with zf.open(self.info) as f:
            shape, _fortran, dtype = _npy_header(f, path, name)
            self.pos = f.tell()  # bytes of the member handed out (or skipped) so far
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
            got = memoryview(self.f.read(self.size if self.at_once else self.pos + n))
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
        return native(out)  # scipy refuses big-endian arrays

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


def _streamable(shard: _Shard, kind: str, opts: NpzOptions) -> bool:
    """Whether a shard is CSR parts, stored or deflated and not encrypted (others are
    loaded whole)."""
    if kind not in ("scipy", "csr") or (kind == "scipy" and _scipy_format(shard) != "csr"):
        return False
    for role in ("indptr", "indices", "data"):
        info = shard.zip.NameToInfo.get(opts.name(role) + ".npy")
        if info is not None and (info.flag_bits & 0x1 or info.compress_type not in (
                zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)):
            return False
    return True


def _csr_units(shard: _Shard, opts: NpzOptions, shape: tuple[int, int],
               unit_nnz: int | None, reserve: Reserve) -> Iterator[tuple[str, Any]]:
    """A CSR shard's rows as ``("unit", (csr, labels))`` items of about ``unit_nnz``
    entries (default: ``DEFAULT_UNIT_BYTES`` of values), at least one row each, and at
    least one unit.  Its three members are inflated in step, so the shard is never whole
    in memory; ``reserve(nbytes)`` is called before a unit is inflated.  Checked as
    ``check_format(full_check=True)`` would, unit by unit."""
    path = shard.path
    streams: list[_NpyStream] = []
    try:
        for role in ("indptr", "indices", "data"):
            streams.append(_NpyStream(path, shard.zip, opts.name(role)))
        ptr, ind, dat = streams
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
        labs = {lab: shard.array(lab) for lab in opts.labels}
        if int(ptr.read(1)[0]) != 0:
            raise FormatError(f"{path}: indptr does not start at 0")
        pending = np.empty(0, dtype=np.int64)  # indptr[row + 1 :], as far as inflated
        row = lo = 0  # rows and entries handed out so far
        while True:
            while (row + pending.size < n_rows and pending.size < _PTR_WINDOW
                   and (not pending.size or pending[-1] - lo < unit_nnz)):
                more = ptr.read(min(_PTR_WINDOW, n_rows - row - pending.size))
                more = more.astype(np.int64)
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
        for s in streams:
            s.finish()
    finally:
        for s in streams:
            s.close()


def shard_items(path: str, opts: NpzOptions, shape: tuple[int, int] | None = None,
                unit_nnz: int | None = None, reserve: Reserve = _no_reserve
                ) -> Iterator[tuple[str, Any]]:
    """One shard as ``("unit", (rows, labels))`` items -- a CSR shard streamed in units
    (see :func:`_csr_units`) -- or, for other kinds, one ``("whole", parts)`` item
    (see :func:`load_shard`).  ``shape``: what the shard's headers said when scanned;
    ``reserve(nbytes)`` is called before each item is decompressed."""
    try:
        with _opened(path, opts.max_bytes) as shard:
            kind = _kind(path, shard.members, opts)
            if not _streamable(shard, kind, opts):
                reserve(shard.nbytes)
                yield "whole", _load_parts(shard, kind, opts)
                return
            got = _shape_member(shard, opts)
            if shape is not None and got != tuple(shape):
                raise _changed(path, got, tuple(shape))
            yield from _csr_units(shard, opts, got, unit_nnz, reserve)
    except SparseStoreError:
        raise
    except _READ_ERRORS as exc:
        raise _as_format_error(path, exc) from None


# ------------------------------------------------------------------ the background reader

class _Slot:
    """One shard's items, produced by a worker and not yet taken by the consumer."""

    __slots__ = ("done", "error", "items")

    def __init__(self) -> None:
        self.items: collections.deque[tuple[Any, int]] = collections.deque()
        self.done = False
        self.error: BaseException | None = None


class _Closed(Exception):
    """The reader was closed while a worker waited for room."""


Produce = Callable[[int, Reserve], Iterator[Any]]


class Reader:
    """``(shard index, item)`` of ``produce(i, reserve)`` for every shard, in shard order.

    ``workers=1`` produces each shard in the consuming thread when it is asked for: one
    thread, no overlap, one item at a time.  Otherwise ``workers`` threads take shards in
    order and produce their items ahead of the consumer, as long as the bytes reserved and
    not yet taken stay within ``lookahead_bytes``: a worker calls ``reserve(nbytes)`` before
    decoding an item.  The first ``free`` shards not yet taken may always produce an item
    when they have none waiting, so an item bigger than the budget cannot stall the
    consumer.  Memory: the budget, an item per worker at most beyond it, and the item the
    consumer is on.  Call :meth:`close` (or exhaust it) to stop the workers.
    """

    def __init__(self, n: int, produce: Produce, *, workers: int,
                 lookahead_bytes: int = DEFAULT_LOOKAHEAD_BYTES, free: int = 1) -> None:
        self.n, self.produce = n, produce
        self.budget, self.free = int(lookahead_bytes), max(1, int(free))
        lock = threading.Lock()
        self.cv = threading.Condition(lock)  # the consumer waits on this for items
        self.room = threading.Condition(lock)  # the workers wait on this for budget
        self.slots: collections.deque[_Slot] = collections.deque()  # started, in order
        self.ahead = 0  # bytes reserved by the workers and not yet taken by the consumer
        self.next = 0  # the next shard to start
        self.closed = False
        self.inline: Iterator[Any] | None = None  # workers=1: the current shard's items
        self.threads = [
            threading.Thread(target=self._work, name=f"sparsestore-npz-{i}", daemon=True)
            for i in range(workers if workers > 1 else 0)
        ]
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------- workers
    def _work(self) -> None:
        while True:
            with self.cv:
                # Start another shard only while the budget has room (or few wait).
                while (not self.closed and self.next < self.n
                       and len(self.slots) >= self.free and self.ahead >= self.budget):
                    self.room.wait()
                if self.closed or self.next >= self.n:
                    return
                i = self.next
                self.next += 1
                slot = _Slot()
                self.slots.append(slot)
            self._fill(slot, i)

    def _may_exceed(self, slot: _Slot) -> bool:
        """Whether ``slot`` is among the first ``free`` and has nothing waiting (lock held)."""
        if slot.items:
            return False
        for k, s in enumerate(self.slots):
            if s is slot:
                return k < self.free
        return False

    def _fill(self, slot: _Slot, i: int) -> None:
        reserved = 0

        def reserve(nbytes: int) -> None:
            nonlocal reserved
            with self.cv:
                while (not self.closed and self.ahead + nbytes > self.budget
                       and not self._may_exceed(slot)):
                    self.room.wait()
                if self.closed:
                    raise _Closed
                self.ahead += nbytes
                reserved += nbytes

        items = self.produce(i, reserve)
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
            close = getattr(items, "close", None)
            if close is not None:
                close()
            with self.cv:
                self.ahead -= reserved  # reserved for an item that never came
                slot.done = True
                self.cv.notify()
                self.room.notify_all()

    # ------------------------------------------------------------- consumer
    def __iter__(self) -> Reader:
        return self

    def __next__(self) -> tuple[int, Any]:
        if not self.threads:
            return self._next_inline()
        err: BaseException | None = None
        with self.cv:
            while not self.closed:
                if not self.slots:
                    if self.next >= self.n:
                        break
                    self.cv.wait()
                    continue
                head = self.slots[0]
                if head.items:
                    item, size = head.items.popleft()
                    self.ahead -= size
                    self.room.notify_all()
                    return self.next - len(self.slots), item
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

    def _next_inline(self) -> tuple[int, Any]:
        while not self.closed:
            if self.inline is None:
                if self.next >= self.n:
                    break
                self.inline = iter(self.produce(self.next, _no_reserve))
                self.next += 1
            try:
                return self.next - 1, next(self.inline)
            except StopIteration:
                self.inline = None
            except BaseException:
                self.close()
                raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Stop the workers (each finishes the item it is decoding) and drop the rest."""
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
            close = getattr(inline, "close", None)
            if close is not None:
                close()


# ------------------------------------------------------------------ the source

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
    n_workers = _default_workers() if workers is None else int(workers)
    if n_workers < 1:
        raise InvalidInputError(f"workers must be at least 1, got {workers}")
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

    def streamed(i: int, reserve: Reserve) -> Iterator[tuple[str, Any]]:
        return shard_items(paths[i], opts, infos[i].shape, unit_nnz, reserve)

    def loaded(i: int, reserve: Reserve) -> Iterator[tuple[str, Any]]:
        reserve(infos[i].nbytes)
        yield "whole", executor.submit(load_shard, paths[i], opts).result()  # type: ignore[union-attr]

    def blocks() -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
        if executor is None:
            reader = Reader(len(paths), streamed, workers=n_workers,
                            lookahead_bytes=lookahead_bytes)
        else:  # whole shards, loaded by the caller's executor; our threads only wait
            reader = Reader(len(paths), loaded, workers=max(2, n_workers),
                            lookahead_bytes=lookahead_bytes, free=n_workers)
        try:
            for i, (kind, value) in reader:
                if kind == "unit":
                    yield from _unit_blocks(*value, piece_nnz)
                else:
                    yield from _whole_blocks(paths[i], value, infos[i].shape, block_nnz)
                del value  # not pinned while the next item is fetched
        finally:
            reader.close()

    return Source(name=paths[0] if len(paths) == 1 else f"{len(paths)} npz shards",
                  n_cols=n_cols, dtype=dt, blocks=blocks,
                  n_rows=sum(i.shape[0] for i in infos), labels=list(opts.labels),
                  dense=all(i.kind == "dense" for i in infos),
                  threads=2 if executor is not None else n_workers)


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
        m = sp.csr_matrix((parts["data"], parts["indices"], parts["indptr"]), shape=shape)
        pieces = csr_views(m, block_nnz, MAX_BLOCK_ROWS)
        del m
    del parts  # held by ``pieces`` only, which goes before the next shard
    yield from _labelled(_last_copied(pieces), labs)


def _unit_blocks(unit: sp.csr_matrix, labs: dict[str, np.ndarray] | None,
                 piece_nnz: int | None) -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
    """A streamed unit as row blocks (views) of about ``piece_nnz`` entries, so that the
    writer's canonical copy of a block stays about that small."""
    if piece_nnz is None:
        piece_nnz = max(1024, DEFAULT_PIECE_BYTES // unit.data.itemsize)
    yield from _labelled(_last_copied(csr_views(unit, piece_nnz)), labs or {})


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
    "Reader",
    "ShardInfo",
    "check_zip_sizes",
    "from_npz",
    "load_shard",
    "npz_source",
    "scan_shard",
    "shard_items",
]
