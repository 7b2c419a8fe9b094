"""A CSR shard's rows inflated in units, so that no shard is ever whole in memory.

A shard holding CSR parts (``indptr``, ``indices``, ``data`` members, stored or deflated)
is read by :func:`csr_units`: its three members are inflated in step, a unit of rows
(``DEFAULT_UNIT_BYTES`` of values by default) at a time, and each unit is checked as
``check_format(full_check=True)`` would check the whole matrix.  :class:`NpyStream` reads
one member in order through ``ZipFile.open``, which never inflates more than the declared
size and checks the CRC-32 at the member's last byte.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..canonical import native
from ..errors import FormatError
from .zipsafe import Shard, npy_header

# Bytes of values per unit a streamed CSR shard is inflated in; a member up to this size is
# inflated by one read.
DEFAULT_UNIT_BYTES = 4 * 2**20
# indptr entries inflated at a time while looking for a unit's end.
_PTR_WINDOW = 2**16


class NpyStream:
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
            shape, _fortran, dtype = npy_header(f, path, name)
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


def csr_units(shard: Shard, names: tuple[str, str, str], labels: tuple[str, ...],
              shape: tuple[int, int], unit_nnz: int | None,
              reserve: Callable[[int], None]) -> Iterator[tuple[str, Any]]:
    """A CSR shard's rows as ``("unit", (csr, labels))`` items of about ``unit_nnz``
    entries (default: ``DEFAULT_UNIT_BYTES`` of values), at least one row each, and at
    least one unit.  ``names``: its ``indptr``, ``indices`` and ``data`` members, inflated
    in step, so the shard is never whole in memory; ``labels``: members holding a label
    per row, loaded whole.  ``reserve(nbytes)`` is called before a unit is inflated.
    Checked as ``check_format(full_check=True)`` would, unit by unit."""
    path = shard.path
    streams: list[NpyStream] = []
    try:
        for name in names:
            streams.append(NpyStream(path, shard.zip, name))
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
        labs = {lab: shard.array(lab) for lab in labels}
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


__all__ = ["DEFAULT_UNIT_BYTES", "NpyStream", "csr_units"]
