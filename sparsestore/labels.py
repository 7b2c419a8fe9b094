"""Row-aligned label arrays stored beside the matrix, sliceable like numpy."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .chunks import read_rows, read_slice
from .errors import LabelError
from .indexing import normalize_rows


class LabelArray:
    """One label column: a zarr array viewed through the store's committed row count.

    Indexing follows numpy (ints, slices, integer arrays in any order, boolean masks) and
    returns numpy arrays.  Only rows committed when the store was opened are visible.
    """

    def __init__(self, arr: Any, name: str, n_rows: int) -> None:
        self._arr = arr
        self.name = name
        self._n = n_rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self._arr.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._arr.dtype)

    @property
    def ndim(self) -> int:
        return self._arr.ndim

    def __len__(self) -> int:
        return self._n

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (already validated), as numpy."""
        return read_slice(self._arr, start, stop, name=f"labels/{self.name}")

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at validated non-negative ``rows`` (any order, repeats)."""
        if rows.size == 0:
            return np.empty((0, *self._arr.shape[1:]), dtype=self.dtype)
        uniq, inverse = np.unique(rows, return_inverse=True)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        # A dense covering range is cheapest when the selection is compact; otherwise let
        # zarr read only the chunks that hold the wanted rows.
        if hi - lo <= 4 * uniq.size:
            block = self.read(lo, hi)[uniq - lo]
        else:
            block = read_rows(self._arr, uniq, name=f"labels/{self.name}")
        return block[inverse]

    def __getitem__(self, key: Any) -> np.ndarray:
        sel = normalize_rows(key, self._n)
        if isinstance(sel, slice):
            start, stop, step = sel.indices(self._n)
            if step == 1:
                return self.read(start, stop)
            sel = np.arange(start, stop, step, dtype=np.int64)
        elif isinstance(sel, (int, np.integer)):
            return self.read(int(sel), int(sel) + 1)[0]
        return self.take(sel)

    def __repr__(self) -> str:
        return f"LabelArray({self.name!r}, shape={self.shape}, dtype={self.dtype})"


class Labels(Mapping[str, LabelArray]):
    """Mapping of label name to :class:`LabelArray`."""

    def __init__(self, arrays: dict[str, LabelArray]) -> None:
        self._arrays = arrays

    def __getitem__(self, name: str) -> LabelArray:
        try:
            return self._arrays[name]
        except KeyError:
            known = ", ".join(sorted(self._arrays)) or "none"
            raise LabelError(f"no label named {name!r}; this store has labels: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self._arrays.items())
        return f"Labels({inner})"
