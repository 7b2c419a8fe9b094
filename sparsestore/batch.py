"""Batch: the compact, backend-agnostic unit the reader decodes and the loader hands on.

CSR parts (or a dense block), the requested labels and the global row ids, with the
slicing and joining the loader needs to cut batches out of decoded units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .buffers import BufferPool


@dataclass(frozen=True, eq=False)
class Batch:
    """A backend-agnostic compact batch: CSR parts (or a dense block), labels and row ids."""

    values: np.ndarray | None  # (nnz,) in the store's dtype; None for dense stores
    indices: np.ndarray | None  # (nnz,) column ids, sorted and unique within each row
    row_splits: np.ndarray | None  # (n_rows + 1,) int64, starts at 0
    dense: np.ndarray | None  # (n_rows, n_cols) for dense stores, else None
    labels: tuple[np.ndarray, ...]  # one array per requested label, aligned with the rows
    rows: np.ndarray  # int64 global row ids, in batch order
    n_cols: int  # columns after any column subset

    @property
    def n_rows(self) -> int:
        return int(self.rows.size)

    @property
    def nnz(self) -> int:
        return int(self.dense.size if self.dense is not None else self.values.size)

    def to_scipy(self) -> sp.csr_matrix:
        """The batch as a scipy CSR matrix (canonical) over the batch's own arrays.

        Not built by ``csr_matrix((data, indices, indptr))``: its check copies any part
        that is a view of under half its buffer, which every batch cut from a decoded
        block is, into fresh memory, batch after batch.  A kept batch keeps its block
        alive instead (the blocks a pass's batches share are those batches' rows).
        Index arrays come out as scipy's constructor makes them: int32 where every index
        fits, else int64.
        """
        if self.dense is not None:
            return sp.csr_matrix(self.dense)
        values, indices, ptr = self.values, self.indices, self.row_splits
        n_rows, n_cols = self.n_rows, self.n_cols
        idt = np.int32 if max(n_rows, n_cols, values.size) < 2**31 else np.int64
        out = sp.csr_matrix((n_rows, n_cols), dtype=values.dtype)
        out.indptr = ptr.astype(idt, copy=False)
        out.indices = indices.astype(idt, copy=False)
        out.data = values
        out.has_canonical_format = True  # the reader guarantees sorted, unique indices
        return out

    def slice(self, start: int, stop: int) -> Batch:
        """Rows ``[start, stop)`` of this batch (views, no copy of values)."""
        labels = tuple(lab[start:stop] for lab in self.labels)
        rows = self.rows[start:stop]
        if self.dense is not None:
            return Batch(None, None, None, self.dense[start:stop], labels, rows, self.n_cols)
        p0, p1 = int(self.row_splits[start]), int(self.row_splits[stop])
        return Batch(
            self.values[p0:p1], self.indices[p0:p1], self.row_splits[start : stop + 1] - p0,
            None, labels, rows, self.n_cols,
        )

    @staticmethod
    def concat(parts: Sequence[Batch], pool: BufferPool | None = None) -> Batch:
        """Rows of several batches, one after the other; values and indices (or the dense
        block) into ``pool`` memory where one is given (fresh arrays page-fault)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]

        def joined(arrays: list[np.ndarray]) -> np.ndarray:
            if pool is None:
                return np.concatenate(arrays)
            out = pool.take((sum(a.shape[0] for a in arrays), *arrays[0].shape[1:]),
                            arrays[0].dtype)
            return np.concatenate(arrays, out=out)

        labels = tuple(
            np.concatenate([p.labels[i] for p in parts]) for i in range(len(first.labels))
        )
        rows = np.concatenate([p.rows for p in parts])
        if first.dense is not None:
            dense = joined([p.dense for p in parts])
            return Batch(None, None, None, dense, labels, rows, first.n_cols)
        splits = [np.zeros(1, np.int64)]
        off = 0
        for p in parts:
            splits.append(p.row_splits[1:] + off)
            off += int(p.row_splits[-1])
        return Batch(
            joined([p.values for p in parts]), joined([p.indices for p in parts]),
            np.concatenate(splits), None, labels, rows, first.n_cols,
        )


__all__ = ["Batch"]
