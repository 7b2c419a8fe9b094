"""Dense 2-D arrays and memory maps, read block by block so a memmap is never loaded whole."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import InvalidInputError


def dense_row_blocks(
    X: Any, *, target_bytes: int = 64 * 2**20
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(a, b, np.asarray(X[a:b]))`` with about ``target_bytes`` per block."""
    shape = getattr(X, "shape", None)
    if shape is None:
        X = np.asarray(X)
        shape = X.shape
    if len(shape) != 2:
        raise InvalidInputError(f"expected a 2-D matrix, got an array of shape {tuple(shape)}")
    n_rows, n_cols = int(shape[0]), int(shape[1])
    itemsize = np.dtype(X.dtype).itemsize
    step = max(1, target_bytes // max(1, n_cols * itemsize))
    if n_rows == 0:
        yield 0, 0, np.asarray(X[0:0])
        return
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        yield a, b, np.asarray(X[a:b])
