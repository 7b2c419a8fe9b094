"""Safety checks for ``.npz`` archives and their ``.npy`` members, run before any inflating.

An archive is opened by its zip directory alone: the members' declared sizes must add up to
at most ``max_bytes`` (decompression bombs; :func:`check_zip_sizes`).  A member's ``.npy``
header is read before the member and must describe exactly its declared size and no Python
objects (:func:`member_header`).  A pickle or a bare ``.npy`` file given as an archive is
named for what it is, and whatever a damaged archive makes numpy, scipy or zipfile raise
(:data:`READ_ERRORS`) becomes a :class:`~sparsestore.errors.FormatError` naming the file
(:func:`as_format_error`).
"""

from __future__ import annotations

import contextlib
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..canonical import native
from ..errors import FormatError, SparseStoreError, UnsafeInputError

# Default limit on the decompressed size of one shard (sum of its members).
DEFAULT_MAX_BYTES = 8 * 2**30
# What a damaged shard makes numpy, scipy or zipfile raise.
READ_ERRORS = (ValueError, TypeError, IndexError, KeyError, OSError, EOFError,
               zipfile.BadZipFile, zlib.error)

Header = tuple[tuple[int, ...], np.dtype]  # an .npy member's shape and dtype


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


def npy_header(f: Any, path: str, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
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


def member_header(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Header:
    """Shape and dtype of one ``.npy`` member from its header alone, which must describe
    exactly the size its zip entry declares (so loading it allocates no more)."""
    name = info.filename[: -len(".npy")]
    with zf.open(info) as f:
        shape, _fortran, dtype = npy_header(f, path, name)
        data = info.file_size - f.tell()
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if data != need:
        raise FormatError(
            f"{path}: array {name!r} holds {data} bytes of data, its header needs {need}"
        )
    return tuple(int(s) for s in shape), dtype


class Shard:
    """An open shard: numpy's ``NpzFile`` of it and its file.  A member's ``.npy`` header is
    checked (see :func:`member_header`) before the member is loaded."""

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
            self._headers[name] = member_header(self.path, self.zip, info)
        return self._headers[name]

    def array(self, name: str) -> np.ndarray:
        """A whole member, read by ``np.load`` once its header is checked, in native byte
        order (scipy refuses big-endian arrays)."""
        self.header(name)
        return native(self.npz[name])


@contextlib.contextmanager
def opened(path: str, max_bytes: int) -> Iterator[Shard]:
    """The shard opened by ``np.load(allow_pickle=False)``, its zip directory's sizes
    checked: nothing is inflated before."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):  # what np.load takes for a zip
            raise _not_a_zip(path, head)
        f.seek(0)
        with np.load(f, allow_pickle=False) as npz:
            yield Shard(path, npz, f, check_zip_sizes(path, npz.zip, max_bytes))


def as_format_error(path: str, exc: BaseException) -> SparseStoreError:
    """The library error for what reading a damaged shard raised (:data:`READ_ERRORS`)."""
    msg = str(exc)
    if "pickle" in msg.lower():
        return UnsafeInputError(
            f"{path} contains pickled objects; refusing to unpickle (allow_pickle=False)"
        )
    return FormatError(f"{path} is corrupt or truncated ({type(exc).__name__}: {msg})")


__all__ = [
    "DEFAULT_MAX_BYTES",
    "READ_ERRORS",
    "Header",
    "Shard",
    "as_format_error",
    "check_declared_bytes",
    "check_zip_sizes",
    "member_header",
    "npy_header",
    "opened",
]
