"""Row-aligned label arrays stored beside the matrix, sliceable like numpy, and the checks
every writer applies to the labels it is given."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .chunks import read_rows, read_slice
from .errors import DTypeError, LabelError, ShapeMismatchError
from .indexing import normalize_rows
from .layout import check_label_dtype, check_label_name


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
    def array(self) -> Any:
        """The zarr array behind this label: every stored row, committed or not (for the
        writer, the validator and chunk-level readers; slice the label itself to read)."""
        return self._arr

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

    def select(self, labels: Any) -> tuple[str, ...]:
        """``labels`` (``None``, a name or names) as the names a reader yields, each one this
        store holds and none twice (a :class:`LabelError` otherwise)."""
        if labels is None:
            return ()
        names = (labels,) if isinstance(labels, str) else tuple(labels)
        for name in names:
            if not isinstance(name, str):
                raise LabelError(f"label names must be strings, got {name!r}")
            self[name]  # raises LabelError naming the known labels
        if len(set(names)) != len(names):
            raise LabelError(f"labels lists a name twice: {list(names)}")
        return names

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self._arrays.items())
        return f"Labels({inner})"


# ------------------------------------------------------------------ checks of given labels

def as_label_array(value: Any) -> Any:
    """Keep array-likes with shape/dtype (memmaps, zarr, h5py) lazy; coerce the rest."""
    return value if hasattr(value, "shape") and hasattr(value, "dtype") else np.asarray(value)


def _check_mapping(labels: Any) -> None:
    if not isinstance(labels, Mapping):
        raise LabelError("labels must be a mapping of name -> array with one entry per row")


def _check_label(name: Any, value: Any, n_rows: int, rows_text: str) -> Any:
    """One given label: a usable name, one entry per row, a storable dtype."""
    check_label_name(name)
    arr = as_label_array(value)
    if arr.ndim == 0 or arr.shape[0] != n_rows:
        raise ShapeMismatchError(
            f"label {name!r} has {0 if arr.ndim == 0 else arr.shape[0]} entries but "
            f"{rows_text}; labels need one entry per row"
        )
    check_label_dtype(arr.dtype, name)
    return arr


def check_labels(labels: Mapping[str, Any] | None, n_rows: int) -> dict[str, Any]:
    """The labels of a new matrix of ``n_rows`` rows, checked (array-likes stay lazy)."""
    if labels is None:
        return {}
    _check_mapping(labels)
    rows_text = f"the matrix has {n_rows} rows"
    return {name: _check_label(name, value, n_rows, rows_text) for name, value in labels.items()}


def check_append_labels(
    labels: Mapping[str, Any] | None, n_new: int, have: Labels, *, creating: bool
) -> dict[str, Any]:
    """The labels of ``n_new`` appended rows, checked against the store's labels ``have``.

    ``creating``: the store has no rows yet, so the append may define its labels.
    """
    known = list(have)
    if labels is None:
        if known:
            raise LabelError(
                f"this store has labels {known}; pass labels={{name: array}} for the new rows"
            )
        return {}
    _check_mapping(labels)
    out: dict[str, Any] = {}
    for name, value in labels.items():
        arr = _check_label(name, value, n_new, f"there are {n_new} rows")
        if name in have:
            old = have[name]
            if tuple(arr.shape[1:]) != tuple(old.shape[1:]):
                raise ShapeMismatchError(
                    f"label {name!r} rows have shape {arr.shape[1:]}, the store's have "
                    f"{old.shape[1:]}"
                )
            if not np.can_cast(arr.dtype, old.dtype, casting="safe"):
                raise DTypeError(
                    f"label {name!r}: cannot store {arr.dtype} in a {old.dtype} label "
                    "without losing information"
                )
        out[name] = arr
    if known and set(out) != set(known):
        raise LabelError(
            f"labels must match the store's labels {sorted(known)} exactly; got {sorted(out)}"
        )
    if not known and out and not creating:
        raise LabelError(
            "this store has rows but no labels; labels can only be defined on an empty store"
        )
    return out
