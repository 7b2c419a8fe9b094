"""COO triplets (arrays, chunk iterables, dicts) into row blocks, out of core.

Entries may come in any order, with duplicates (summed, as scipy does).  :class:`CooSpill`
keeps up to ``memory_bytes`` of entries in memory; beyond that it appends them to one
temporary file per row bucket (a :class:`~sparsestore.ingest.base.Spill`), then reads the
buckets back in row order, each as one CSR block.  A bucket that is itself too big is
split again the same way, so memory stays bounded whatever the entry order.  Blocks are
bounded in rows as well as entries, so a shape declaring far more rows than the entries
fill costs no memory; one declaring more than
:func:`~sparsestore.canonical.check_row_count` allows is refused.  Matrix Market files and
CSC anndata matrices use the same path.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..blocks import coo_row_blocks
from ..canonical import _as_int_array, cast_values, check_row_count, native
from ..errors import InvalidInputError, ShapeMismatchError
from ..layout import check_dim, check_value_dtype, index_dtype
from .base import DEFAULT_BLOCK_NNZ, DEFAULT_MEMORY_BYTES, Source, Spill, write_source

# Entries handed to CooSpill.add at once when the input is one big array.
_ADD_STEP = 4 * 2**20


class CooSpill:
    """Collect COO entries in any order; give them back as CSR row blocks, in row order.

    Memory holds at most about ``memory_bytes`` of entries (plus one block being built);
    the rest waits in a temporary directory under ``tmp_dir`` (default: the system temp
    dir), removed by :meth:`close` or when :meth:`blocks` finishes.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: Any,
        *,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        tmp_dir: str | os.PathLike[str] | None = None,
        max_buckets: int = 256,
        source: str = "COO input",
        error: type[InvalidInputError] = InvalidInputError,
        casting: str = "safe",
        check_rows: bool = True,
    ) -> None:
        self.n_rows = check_dim(shape[0], "n_rows")
        self.n_cols = check_dim(shape[1], "n_cols")
        self.dtype = check_value_dtype(dtype)
        self.memory_bytes = max(1024, int(memory_bytes))
        self.tmp_dir = tmp_dir
        self.source = source
        self.error = error
        self.casting = casting
        self.check_rows = check_rows
        self._col_dtype = index_dtype(self.n_cols)
        self._entry_bytes = 8 + self._col_dtype.itemsize + self.dtype.itemsize
        self._n_buckets = max(1, min(max_buckets, self.n_rows))
        self._rows_per_bucket = max(1, math.ceil(self.n_rows / self._n_buckets))
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._spill = Spill(tmp_dir)
        self.nnz_added = 0

    # ------------------------------------------------------------ adding
    def add(self, row: Any, col: Any, data: Any) -> None:
        """Add entries (``row[k], col[k]) += data[k]``); indices are checked against shape."""
        r = _as_int_array(row, "row")
        c = _as_int_array(col, "col")
        d = np.asarray(data)
        if d.ndim != 1:
            raise self.error(f"{self.source}: data must be 1-D, got shape {d.shape}")
        if not (r.size == c.size == d.size):
            raise self.error(
                f"{self.source}: row, col and data must have the same length, got "
                f"{r.size}, {c.size} and {d.size}"
            )
        if r.size == 0:
            return
        check_value_dtype(d.dtype)
        d = cast_values(native(d), self.dtype, casting=self.casting,
                        where=lambda k: f"{self.source}: row {r[k]}, column {c[k]}")
        for name, idx, n in (("row", r, self.n_rows), ("column", c, self.n_cols)):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n:
                bad = lo if lo < 0 else hi
                raise self.error(
                    f"{self.source}: {name} index {bad} is out of range for a matrix with "
                    f"{n} {name}s"
                )
        self._buf.append(
            (r.astype(np.int64), c.astype(self._col_dtype), d)
        )
        self._buffered += r.size * self._entry_bytes
        self.nnz_added += int(r.size)
        if self._buffered > self.memory_bytes:
            self._flush()

    def _take_buffer(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._buf:
            return (np.empty(0, np.int64), np.empty(0, self._col_dtype),
                    np.empty(0, self.dtype))
        parts = self._buf
        self._buf, self._buffered = [], 0
        if len(parts) == 1:
            return parts[0]
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def _flush(self) -> None:
        """Append the buffered entries to their row buckets' spill files."""
        r, c, d = self._take_buffer()
        if r.size == 0:
            return
        bucket = r // self._rows_per_bucket
        order = np.argsort(bucket, kind="stable")
        bucket = bucket[order]
        edges = np.searchsorted(bucket, np.arange(self._n_buckets + 1), side="left")
        for b in np.flatnonzero(np.diff(edges)):
            sel = order[edges[b] : edges[b + 1]]
            self._spill.append(f"bucket-{b:05d}.npy", (r[sel], c[sel], d[sel]))

    # ------------------------------------------------------------ reading back
    def blocks(self, target_nnz: int = DEFAULT_BLOCK_NNZ) -> Iterator[tuple[int, int, Any]]:
        """Yield ``(a, b, csr)`` covering rows ``0..n_rows`` in order, duplicates summed.

        Refuses (:class:`UnsafeInputError`) a row count the entries added cannot back.
        """
        try:
            if self.check_rows:
                check_row_count(self.n_rows, self.nnz_added, self.source)
            if self._spill.dir is None:
                r, c, d = self._take_buffer()
                yield from self._emit(0, self.n_rows, r, c, d, target_nnz)
                return
            self._flush()
            for b in range(self._n_buckets):
                a0 = b * self._rows_per_bucket
                b0 = min(self.n_rows, a0 + self._rows_per_bucket)
                if a0 >= b0:
                    break
                name = f"bucket-{b:05d}.npy"
                size = self._spill.size(name)
                if size is None:
                    yield from self._emit_empty(a0, b0)
                elif size > 2 * self.memory_bytes and b0 - a0 > 1:
                    yield from self._split(name, a0, b0, target_nnz)
                else:
                    parts = list(self._spill.groups(name, 3))
                    r, c, d = (np.concatenate(p) for p in zip(*parts, strict=True))
                    del parts
                    yield from self._emit(a0, b0, r - a0, c, d, target_nnz)
        finally:
            self.close()

    def _split(
        self, name: str, a0: int, b0: int, target_nnz: int
    ) -> Iterator[tuple[int, int, Any]]:
        """A bucket too big for memory: spill it again into finer buckets under it."""
        sub = CooSpill(
            (b0 - a0, self.n_cols), self.dtype, memory_bytes=self.memory_bytes,
            tmp_dir=self._spill.dir, source=self.source, error=self.error, casting="unsafe",
            check_rows=False,
        )
        try:
            for r, c, d in self._spill.groups(name, 3):
                sub.add(r - a0, c, d)
            for a, b, block in sub.blocks(target_nnz):
                yield a + a0, b + a0, block
        finally:
            sub.close()

    def _emit(
        self, a0: int, b0: int, r: np.ndarray, c: np.ndarray, d: np.ndarray, target_nnz: int
    ) -> Iterator[tuple[int, int, Any]]:
        for a, b, block in coo_row_blocks(r, c, d, (b0 - a0, self.n_cols),
                                          target_nnz=target_nnz):
            yield a0 + a, a0 + b, block

    def _emit_empty(self, a0: int, b0: int) -> Iterator[tuple[int, int, Any]]:
        step = max(1, DEFAULT_BLOCK_NNZ // 4)
        for a in range(a0, b0, step):
            b = min(b0, a + step)
            yield a, b, sp.csr_matrix((b - a, self.n_cols), dtype=self.dtype)

    def close(self) -> None:
        """Remove the spill directory and drop buffered entries."""
        self._buf, self._buffered = [], 0
        self._spill.close()

    def __enter__(self) -> CooSpill:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- sources

def _label_slices(labels: Mapping[str, Any] | None, n_rows: int) -> dict[str, Any]:
    if not labels:
        return {}
    if not isinstance(labels, Mapping):
        raise InvalidInputError("labels must be a mapping of name -> array with one entry per row")
    out = {}
    for name, value in labels.items():
        arr = value if hasattr(value, "shape") and hasattr(value, "dtype") else np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] != n_rows:
            raise ShapeMismatchError(
                f"label {name!r} has {0 if arr.ndim == 0 else arr.shape[0]} entries but the "
                f"matrix has {n_rows} rows; labels need one entry per row"
            )
        out[name] = arr
    return out


def coo_source(
    chunks: Iterable[tuple[Any, Any, Any]],
    shape: tuple[int, int],
    *,
    dtype: Any = None,
    labels: Mapping[str, Any] | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    tmp_dir: str | os.PathLike[str] | None = None,
    name: str = "COO input",
) -> Source:
    """A :class:`Source` over an iterable of ``(row, col, data)`` chunks in any order."""
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2):
        raise InvalidInputError(f"shape must be (n_rows, n_cols), got {shape!r}")
    n_rows, n_cols = check_dim(shape[0], "n_rows"), check_dim(shape[1], "n_cols")
    it = iter(chunks)
    first: list[tuple[Any, Any, Any]] = []
    # An explicit dtype is a request: values it holds are taken (see cast_values).
    casting = "same_value" if dtype is not None else "safe"
    if dtype is None:  # the first chunk's values decide
        for chunk in it:
            first.append(_check_chunk(chunk, name))
            if np.asarray(first[-1][2]).size:
                break
        dtype = np.asarray(first[-1][2]).dtype if first else np.float32
    dt = check_value_dtype(dtype)
    labs = _label_slices(labels, n_rows)

    def blocks() -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
        spill = CooSpill((n_rows, n_cols), dt, memory_bytes=memory_bytes, tmp_dir=tmp_dir,
                         source=name, casting=casting)
        with spill:
            for chunk in itertools.chain(first, it):
                r, c, d = _check_chunk(chunk, name)
                spill.add(r, c, d)
            for a, b, block in spill.blocks():
                yield block, ({k: np.asarray(v[a:b]) for k, v in labs.items()} or None)

    return Source(name=name, n_cols=n_cols, dtype=dt, blocks=blocks, n_rows=n_rows,
                  labels=list(labs))


def _check_chunk(chunk: Any, name: str) -> tuple[Any, Any, Any]:
    try:
        r, c, d = chunk
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{name}: each chunk must be a (row, col, data) triple of arrays, got "
            f"{type(chunk).__name__}"
        ) from None
    return r, c, d


def _array_chunks(row: Any, col: Any, data: Any) -> Iterator[tuple[Any, Any, Any]]:
    r, c, d = np.asarray(row), np.asarray(col), np.asarray(data)
    if not (r.ndim == c.ndim == d.ndim == 1) or not (r.size == c.size == d.size):
        raise InvalidInputError(
            f"row, col and data must be 1-D arrays of one length, got shapes {r.shape}, "
            f"{c.shape} and {d.shape}"
        )
    if r.size == 0:
        yield r, c, d
    for s in range(0, r.size, _ADD_STEP):
        yield r[s : s + _ADD_STEP], c[s : s + _ADD_STEP], d[s : s + _ADD_STEP]


def from_coo(
    dst: Any,
    row: Any,
    col: Any = None,
    data: Any = None,
    shape: tuple[int, int] | None = None,
    *,
    dtype: Any = None,
    labels: Mapping[str, Any] | None = None,
    sparse: bool = True,
    overwrite: bool = False,
    progress: Any = False,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    tmp_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    **layout_options: Any,
) -> Any:
    """Store COO triplets: ``from_coo(dst, row, col, data, shape)`` or ``from_coo(dst, chunks,
    shape=shape)`` with an iterable of ``(row, col, data)`` chunks; duplicates are summed.
    """
    if shape is None:
        raise InvalidInputError("from_coo needs shape=(n_rows, n_cols)")
    if col is None and data is None:
        chunks: Iterable[Any] = row
        if isinstance(row, np.ndarray) or sp.issparse(row):
            raise InvalidInputError(
                "from_coo(dst, chunks, shape=...) needs an iterable of (row, col, data) chunks; "
                "for arrays pass from_coo(dst, row, col, data, shape)"
            )
    elif col is None or data is None:
        raise InvalidInputError("from_coo needs row, col and data (or one iterable of chunks)")
    else:
        if dtype is None:
            dtype = np.asarray(data).dtype
        chunks = _array_chunks(row, col, data)
    src = coo_source(chunks, shape, dtype=dtype, labels=labels, memory_bytes=memory_bytes,
                     tmp_dir=tmp_dir)
    return write_source(dst, src, sparse=sparse, overwrite=overwrite, progress=progress,
                        storage_options=storage_options, **layout_options)


def from_dict(
    dst: Any,
    entries: Mapping[tuple[int, int], Any],
    shape: tuple[int, int],
    *,
    dtype: Any = None,
    labels: Mapping[str, Any] | None = None,
    **options: Any,
) -> Any:
    """Store a ``{(row, col): value}`` dict of the given shape (see :func:`from_coo`)."""
    if not isinstance(entries, Mapping):
        raise InvalidInputError(
            f"from_dict needs a mapping {{(row, col): value}}, got {type(entries).__name__}"
        )
    n = len(entries)
    try:
        keys = np.array(list(entries.keys()), dtype=np.int64).reshape(n, 2)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(
            "from_dict keys must be (row, col) pairs of integers"
        ) from None
    values = np.asarray(list(entries.values()))
    if values.ndim != 1:
        raise InvalidInputError("from_dict values must be scalars")
    if n == 0:
        values = values.astype(dtype if dtype is not None else np.float32)
    return from_coo(dst, keys[:, 0], keys[:, 1], values, shape, dtype=dtype, labels=labels,
                    **options)


__all__ = ["CooSpill", "coo_source", "from_coo", "from_dict"]
