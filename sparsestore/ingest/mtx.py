"""Matrix Market files (``.mtx``, ``.mtx.gz``, ``.mtx.bz2``), streamed in entry chunks.

The header is parsed here; entries are parsed ``chunk_entries`` lines at a time with
``np.loadtxt`` and fed to the out-of-core COO path (:class:`~sparsestore.ingest.coo.CooSpill`),
because Matrix Market entries need not be sorted by row.  Supported: ``coordinate`` with
``real``/``double``/``integer``/``pattern`` values and ``general``/``symmetric``/
``skew-symmetric`` symmetry, and ``array`` ``general`` (dense, column-major).  Pattern
entries become ``float32`` ones.
"""

from __future__ import annotations

import itertools
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from ..canonical import check_row_count
from ..errors import FormatError, UnsafeInputError
from ..layout import MAX_DIM
from .base import DEFAULT_MEMORY_BYTES, Source, open_text
from .coo import CooSpill

_FIELDS = {"real": np.float64, "double": np.float64, "integer": np.int64, "pattern": np.float32}
_SYMMETRIES = ("general", "symmetric", "skew-symmetric")
# What reading a (possibly compressed) text file can raise on a damaged file.
_READ_ERRORS = (OSError, EOFError, UnicodeDecodeError, zlib.error)


@dataclass(frozen=True)
class MtxHeader:
    """What the banner and size line say."""

    format: str  # "coordinate" | "array"
    field: str
    symmetry: str
    shape: tuple[int, int]
    nnz: int  # entries listed in the file (before mirroring symmetric ones)
    data_line: int  # 1-based line number of the first entry


def _read_header(f: IO[str], path: str) -> MtxHeader:
    try:
        banner = f.readline()
    except _READ_ERRORS as exc:
        raise FormatError(f"{path}: cannot read the Matrix Market banner ({exc})") from None
    tokens = banner.strip().split()
    if len(tokens) != 5 or tokens[0].lower() != "%%matrixmarket" or tokens[1].lower() != "matrix":
        raise FormatError(
            f"{path} is not a Matrix Market file: the first line must read "
            "'%%MatrixMarket matrix <coordinate|array> <field> <symmetry>'"
        )
    fmt, field, sym = (t.lower() for t in tokens[2:])
    if fmt not in ("coordinate", "array"):
        raise FormatError(f"{path}: unknown Matrix Market format {fmt!r}")
    if field not in _FIELDS:
        raise FormatError(
            f"{path}: Matrix Market field {field!r} is not supported (real, integer or pattern "
            "only; complex values cannot be stored)"
        )
    if sym not in _SYMMETRIES:
        raise FormatError(
            f"{path}: Matrix Market symmetry {sym!r} is not supported (general, symmetric, "
            "skew-symmetric)"
        )
    if fmt == "array" and (sym != "general" or field == "pattern"):
        raise FormatError(f"{path}: only 'array real/integer general' dense files are supported")
    line_no = 1
    try:
        for line in f:
            line_no += 1
            s = line.strip()
            if not s or s.startswith("%"):
                continue
            sizes = s.split()
            break
        else:
            raise FormatError(f"{path}: the size line is missing (file truncated?)")
    except _READ_ERRORS as exc:
        raise FormatError(f"{path}: cannot read the header ({exc})") from None
    want = 3 if fmt == "coordinate" else 2
    try:
        nums = [int(x) for x in sizes]
    except ValueError:
        nums = []
    if len(nums) != want or min(nums) < 0:
        raise FormatError(
            f"{path}, line {line_no}: bad size line {s!r}; expected {want} non-negative integers"
        )
    n_rows, n_cols = nums[0], nums[1]
    if max(nums) > MAX_DIM:
        raise UnsafeInputError(
            f"{path}, line {line_no}: size line {s!r} declares more than {MAX_DIM} rows, "
            "columns or entries"
        )
    nnz = nums[2] if fmt == "coordinate" else n_rows * n_cols
    if sym != "general" and n_rows != n_cols:
        raise FormatError(f"{path}: a {sym} matrix must be square, header says {n_rows}x{n_cols}")
    return MtxHeader(fmt, field, sym, (n_rows, n_cols), nnz, line_no + 1)


def read_header(path: str | os.PathLike[str]) -> MtxHeader:
    """Parse the banner and size line of a Matrix Market file."""
    p = os.fspath(path)
    with open_text(p, "ascii") as f:
        return _read_header(f, p)


def _entry_chunks(
    f: IO[str], path: str, header: MtxHeader, chunk_entries: int
) -> Iterator[np.ndarray]:
    """Parsed entry rows, ``chunk_entries`` lines at a time; checks the entry count."""
    ncol = {"coordinate": 3, "array": 1}[header.format]
    if header.format == "coordinate" and header.field == "pattern":
        ncol = 2
    dt = np.int64 if header.field in ("integer", "pattern") else np.float64
    seen = 0
    line = header.data_line
    while True:
        try:
            lines = list(itertools.islice(f, chunk_entries))
        except (*_READ_ERRORS, ValueError) as exc:
            raise FormatError(f"{path}: cannot read entries near line {line} ({exc})") from None
        if not lines:
            break
        try:
            arr = np.loadtxt(lines, dtype=dt, comments="%", ndmin=2)
        except (ValueError, OverflowError) as exc:
            raise FormatError(
                f"{path}: malformed entry between lines {line} and {line + len(lines) - 1} "
                f"({exc})"
            ) from None
        line += len(lines)
        if arr.size == 0:
            continue
        if arr.shape[1] != ncol:
            raise FormatError(
                f"{path}: entries near line {line - len(lines)} have {arr.shape[1]} columns; a "
                f"{header.format} {header.field} file has {ncol}"
            )
        seen += arr.shape[0]
        if seen > header.nnz:
            raise FormatError(
                f"{path}: more entries than the {header.nnz} the size line promises"
            )
        yield arr
    if seen != header.nnz:
        raise FormatError(
            f"{path}: found {seen} entries but the size line promises {header.nnz}; the file is "
            "truncated or its header is wrong"
        )


def mtx_source(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    chunk_entries: int = 2**20,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    tmp_dir: str | os.PathLike[str] | None = None,
    casting: str = "same_value",
) -> Source:
    """A :class:`Source` reading a Matrix Market file once, in entry chunks.

    Values are cast to ``dtype`` as they are read, by
    :func:`~sparsestore.canonical.cast_values` (``casting``).

    Memory follows the entries, not the declared shape; a size line declaring more rows
    than its entries can back (see :func:`~sparsestore.canonical.check_row_count`) is
    refused here, before any entry is read.
    """
    p = os.fspath(path)
    header = read_header(p)
    n_rows, n_cols = header.shape
    mirrored = header.format == "coordinate" and header.symmetry != "general"
    check_row_count(n_rows, header.nnz * (2 if mirrored else 1), p)
    dt = np.dtype(dtype) if dtype is not None else np.dtype(_FIELDS[header.field])

    def blocks() -> Iterator[tuple[Any, None]]:
        spill = CooSpill(header.shape, dt, memory_bytes=memory_bytes, tmp_dir=tmp_dir,
                         source=p, error=FormatError, casting=casting)
        with spill, open_text(p, "ascii") as f:
            _read_header(f, p)
            pos = 0  # entries seen, for array files
            for arr in _entry_chunks(f, p, header, chunk_entries):
                if header.format == "array":
                    k = np.arange(pos, pos + arr.shape[0], dtype=np.int64)
                    pos += arr.shape[0]
                    rows, cols, vals = k % max(1, n_rows), k // max(1, n_rows), arr[:, 0]
                else:
                    rows = _indices(arr[:, 0], n_rows, "row", p)
                    cols = _indices(arr[:, 1], n_cols, "column", p)
                    if header.field == "pattern":
                        vals = np.ones(arr.shape[0], dtype=dt)
                    else:
                        vals = arr[:, 2]
                spill.add(rows, cols, vals)
                if header.symmetry != "general":
                    off = rows != cols
                    mirror = vals[off] if header.symmetry == "symmetric" else -vals[off]
                    spill.add(cols[off], rows[off], mirror)
            for _, _, block in spill.blocks():
                yield block, None

    return Source(name=p, n_cols=n_cols, dtype=dt, blocks=blocks, n_rows=n_rows)


def _indices(col: np.ndarray, n: int, what: str, path: str) -> np.ndarray:
    """1-based Matrix Market indices as checked 0-based int64."""
    if col.dtype.kind == "f" and not (np.isfinite(col).all()
                                      and np.array_equal(col, np.floor(col))):
        raise FormatError(f"{path}: a {what} index is not an integer")
    if col.size:
        lo, hi = col.min(), col.max()
        if lo < 1 or hi > n:
            bad = int(lo if lo < 1 else hi)
            raise FormatError(
                f"{path}: {what} index {bad} is outside 1..{n} (Matrix Market indices are "
                "1-based)"
            )
    return col.astype(np.int64) - 1


__all__ = ["MtxHeader", "mtx_source", "read_header"]
