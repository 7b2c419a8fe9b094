"""A unit's decoded rows and the cuts that make batches of them: the column selection a
loader applies, the row gather of a shuffled unit (into pooled memory), and concatenation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .buffers import BufferPool
from .errors import InvalidInputError
from .indexing import normalize_rows


@dataclass(frozen=True)
class ColumnSelection:
    """A validated column subset: ``keep`` (original ids, output order) and the inverse map."""

    keep: np.ndarray
    colmap: np.ndarray  # original column -> output column, -1 when dropped
    monotone: bool  # output order follows original order (no re-sort needed)

    @property
    def n_cols(self) -> int:
        return int(self.keep.size)

    @classmethod
    def build(cls, columns: Any, n_cols: int) -> ColumnSelection | None:
        """From a slice, integer array or boolean mask; ``None`` means all columns."""
        if columns is None:
            return None
        if isinstance(columns, slice):
            keep = np.arange(n_cols, dtype=np.int64)[columns]
        else:
            arr = np.asarray(columns)
            if arr.ndim != 1 and not (arr.dtype == bool or arr.size == 0):
                raise InvalidInputError(
                    "columns must be a slice, a 1-D integer array or a boolean mask; got "
                    f"{arr.dtype} array of shape {arr.shape}"
                )
            keep = np.asarray(normalize_rows(arr, n_cols, axis="column"), dtype=np.int64)
        if np.unique(keep).size != keep.size:
            raise InvalidInputError(
                "columns contains duplicates; pass each column once (duplicate feature columns "
                "would only repeat data)"
            )
        cdt = np.int32 if n_cols < 2**31 else np.int64
        colmap = np.full(n_cols, -1, dtype=cdt)
        colmap[keep] = np.arange(keep.size, dtype=cdt)
        monotone = bool(keep.size < 2 or (np.diff(keep) > 0).all())
        return cls(keep, colmap, monotone)

    def apply_csr(
        self, values: np.ndarray, indices: np.ndarray, ptr: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keep only the selected columns, re-indexed and canonical within each row."""
        mapped = self.colmap[indices]
        keep = mapped >= 0
        cs = np.zeros(keep.size + 1, dtype=np.int64)
        np.cumsum(keep, out=cs[1:])
        new_ptr = cs[ptr]
        new_ind = mapped[keep].astype(indices.dtype, copy=False)
        new_val = values[keep]
        if not self.monotone and new_ind.size:
            row = np.repeat(np.arange(ptr.size - 1, dtype=np.int64), np.diff(new_ptr))
            order = np.lexsort((new_ind, row))
            new_ind, new_val = new_ind[order], new_val[order]
        return new_val, new_ind, new_ptr


try:  # scipy's compiled kernel behind ``csr[rows]``, with output arrays we provide
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
except ImportError:  # pragma: no cover - another scipy layout: the numpy gather below
    _csr_row_index = None


def gather_csr(
    values: np.ndarray, indices: np.ndarray, ptr: np.ndarray, take: np.ndarray,
    pool: BufferPool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``take`` (any order, repeats allowed) of a CSR, into memory from ``pool``.

    scipy's own row-gather kernel (what ``csr[rows]`` runs: one copy per row) writes
    straight into pooled output: ``csr[rows]`` itself would allocate fresh arrays per
    batch, and on a shuffled pass those page faults cost more than the gather.  ``ptr`` in
    ``indices``' dtype saves the kernel a conversion per call.  Without that kernel, a
    numpy gather (positions by one cumulative sum, then ``np.take``, ~4x slower) does the
    same.
    """
    pool = pool if pool is not None else BufferPool(max_free=0)
    take = np.asarray(take, dtype=np.int64)
    starts = ptr[take].astype(np.int64, copy=False)
    lens = ptr[take + 1] - starts
    new_ptr = np.zeros(take.size + 1, np.int64)
    np.cumsum(lens, out=new_ptr[1:])
    total = int(new_ptr[-1])
    out_v = pool.take(total, values.dtype)
    out_i = pool.take(total, indices.dtype)
    if total == 0:
        return out_v, out_i, new_ptr
    idt = indices.dtype
    if _csr_row_index is not None and idt in (np.int32, np.int64) and \
            int(ptr[-1]) <= np.iinfo(idt).max:
        try:
            _csr_row_index(take.size, take.astype(idt, copy=False),
                           ptr.astype(idt, copy=False), indices, values, out_i, out_v)
            return out_v, out_i, new_ptr
        except (TypeError, ValueError):  # a dtype the kernel lacks: numpy below
            pass
    pos = pool.take(total, np.int64)
    nz = lens > 0
    s, n, o = starts[nz], lens[nz], new_ptr[:-1][nz]
    pos[:] = 1
    pos[0] = s[0]
    pos[o[1:]] = s[1:] - (s[:-1] + n[:-1] - 1)  # jump from the last value of a run
    np.cumsum(pos, out=pos)
    np.take(values, pos, out=out_v, mode="clip")  # "clip": positions are valid; unbuffered
    np.take(indices, pos, out=out_i, mode="clip")
    return out_v, out_i, new_ptr


class DecodedRows(NamedTuple):
    """A unit's decoded rows as CSR parts (int64 ``indptr`` from 0).  Not a scipy matrix:
    its constructor may copy the parts (``prune`` copies a view of under half its buffer),
    and batches only slice or gather them."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray


def narrowed(src: Any) -> Any:
    """Decoded rows with ``indptr`` in the indices' dtype where it fits (what the row
    gather's kernel wants; done once per unit, not per batch)."""
    if isinstance(src, DecodedRows) and src.indptr.dtype != src.indices.dtype and \
            src.indptr[-1] <= np.iinfo(src.indices.dtype).max:
        return src._replace(indptr=src.indptr.astype(src.indices.dtype))
    return src


def concat_ptr(ptrs: Sequence[np.ndarray]) -> np.ndarray:
    """Row pointers (each from 0) of consecutive pieces, as one ``indptr`` from 0."""
    if len(ptrs) == 1:
        return ptrs[0]
    out = [np.zeros(1, np.int64)]
    off = 0
    for p in ptrs:
        out.append(p[1:] + off)
        off += int(p[-1])
    return np.concatenate(out)


def cat_parts(parts: list[np.ndarray]) -> np.ndarray:
    """The parts one after another (the part itself when there is one: no copy)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


__all__ = ["ColumnSelection", "DecodedRows", "cat_parts", "concat_ptr", "gather_csr", "narrowed"]
