"""Turn numpy-style row/column keys into slices or validated index arrays.

The one place index keys are checked: store slicing, label slicing, the loader's row
subsets and samplers, and the reader's column subsets all ask :func:`normalize_rows`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidInputError, OutOfRangeError


def normalize_rows(key: Any, n: int, axis: str = "row") -> int | slice | np.ndarray:
    """Validate a 1-axis key against length ``n`` (``axis`` names the positions in errors).

    Returns a non-negative ``int``, a ``slice``, or an int64 array of non-negative
    positions (booleans masks become positions).  Raises :class:`OutOfRangeError` for
    positions outside ``[-n, n)`` and :class:`InvalidInputError` for unusable keys.
    """
    if isinstance(key, slice):
        try:
            key.indices(n)  # numpy's checks: integer bounds (TypeError), a non-zero step
        except ValueError:
            raise InvalidInputError(
                f"slice step cannot be zero in {axis} index {key}; use a positive step, or "
                "a negative one to go backwards"
            ) from None
        return key
    if isinstance(key, (bool, np.bool_)):
        raise InvalidInputError(f"a bare boolean is not a valid {axis} index; use a mask array")
    if isinstance(key, (int, np.integer)):
        i = int(key)
        if not -n <= i < n:
            raise OutOfRangeError(f"{axis} {i} is out of range for {n} {axis}s")
        return i + n if i < 0 else i
    if key is Ellipsis:
        return slice(None)
    arr = np.asarray(key)
    if arr.dtype == bool:
        if arr.ndim != 1 or arr.shape[0] != n:
            raise InvalidInputError(
                f"boolean mask has shape {arr.shape}; it must be 1-D of length {n}"
            )
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise InvalidInputError(
            f"{axis} index must be an int, slice, 1-D integer array or boolean mask; got "
            f"{arr.dtype} array of shape {arr.shape}"
        )
    arr = arr.astype(np.int64, copy=False)
    if arr.min() < -n or arr.max() >= n:
        bad = int(arr[(arr < -n) | (arr >= n)][0])
        raise OutOfRangeError(f"{axis} {bad} is out of range for {n} {axis}s")
    return np.where(arr < 0, arr + n, arr)


def split_key(key: Any) -> tuple[Any, Any]:
    """``store[rows]`` or ``store[rows, cols]`` into (rows, cols or None)."""
    if isinstance(key, tuple):
        if len(key) == 1:
            return key[0], None
        if len(key) == 2:
            return key
        raise InvalidInputError(f"a store is 2-D; got an index with {len(key)} parts")
    return key, None
