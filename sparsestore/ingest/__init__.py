"""Sources that become stores: each yields canonical-able row blocks, never the whole matrix.

:func:`row_blocks` dispatches on the type of an in-memory object; file formats live in
their own modules (``npz``, ``npy``, ``mtx``, ``svmlight``, ``anndata_io``) and are reached
through :func:`sparsestore.convert`; COO triplets and dicts through :func:`from_coo` and
:func:`from_dict`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..errors import InvalidInputError
from .coo import from_coo, from_dict
from .dense import dense_row_blocks
from .scipy import scipy_row_blocks

Block = tuple[int, int, Any]  # (first row, stop row, scipy CSR or dense ndarray)


def row_blocks(
    X: Any, *, target_nnz: int = 8 * 2**20, target_bytes: int = 64 * 2**20
) -> Iterator[Block]:
    """Row blocks of an in-memory matrix: scipy sparse (any format), ndarray or memmap."""
    if sp.issparse(X):
        return scipy_row_blocks(X, target_nnz=target_nnz)
    if isinstance(X, np.ndarray) or hasattr(X, "__array__"):
        return dense_row_blocks(X, target_bytes=target_bytes)
    raise InvalidInputError(
        f"cannot store an object of type {type(X).__name__}; pass a scipy.sparse matrix, a "
        "2-D numpy array or memmap, or use sparsestore.convert for files"
    )


def matrix_shape(X: Any) -> tuple[int, int]:
    shape = getattr(X, "shape", None)
    if shape is None:
        X = np.asarray(X)
        shape = X.shape
    if len(shape) != 2:
        raise InvalidInputError(f"expected a 2-D matrix, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


__all__ = [
    "Block",
    "dense_row_blocks",
    "from_coo",
    "from_dict",
    "matrix_shape",
    "row_blocks",
    "scipy_row_blocks",
]
