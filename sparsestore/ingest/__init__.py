"""Sources that become stores: each yields canonical-able row blocks, never the whole matrix.

File formats live in their own modules (``npz``, ``npy``, ``mtx``, ``svmlight``,
``anndata_io``) and are reached through :func:`sparsestore.convert`; COO triplets and dicts
through :func:`from_coo` and :func:`from_dict`.  In-memory matrices are cut by
:mod:`sparsestore.blocks` (re-exported here).
"""

from __future__ import annotations

from ..blocks import Block, dense_row_blocks, matrix_shape, row_blocks, scipy_row_blocks
from .coo import from_coo, from_dict

__all__ = [
    "Block",
    "dense_row_blocks",
    "from_coo",
    "from_dict",
    "matrix_shape",
    "row_blocks",
    "scipy_row_blocks",
]
