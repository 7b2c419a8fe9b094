"""Dense ``.npy`` files, memory-mapped (never loaded whole) and written block by block.

Each file is opened with ``np.load(mmap_mode="r", allow_pickle=False)``; several files
(a glob or list) are concatenated by rows.  Zeros are dropped on the way into a sparse
store; ``sparse=False`` keeps the matrix dense.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..blocks import dense_row_blocks
from ..errors import FormatError, UnsafeInputError
from .base import Source, check_n_cols, expand_paths, result_dtype

# Bytes of dense rows read per block (the CSR of a block is smaller still).
_BLOCK_BYTES = 32 * 2**20


def open_npy(path: str) -> np.ndarray:
    """Memory-map one ``.npy`` file, refusing pickled or non-2-D content."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        msg = str(exc)
        if "pickle" in msg.lower() or "object" in msg.lower():
            raise UnsafeInputError(
                f"{path} holds pickled Python objects; refusing to unpickle (allow_pickle=False)"
            ) from None
        raise FormatError(f"{path} is not a valid .npy file ({msg})") from None
    except (OSError, EOFError) as exc:
        raise FormatError(f"{path} is not a readable .npy file ({exc})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise FormatError(f"{path} is an .npz archive, not an .npy file; use format='npz'")
    if arr.ndim != 2:
        raise FormatError(f"{path} holds an array of shape {arr.shape}; a matrix must be 2-D")
    if arr.dtype.kind not in "biuf":
        raise FormatError(f"{path}: values of dtype {arr.dtype} cannot be stored")
    return arr


def npy_source(src: Any, *, dtype: Any = None, block_bytes: int = _BLOCK_BYTES) -> Source:
    """A :class:`Source` over one or many ``.npy`` files (a path, glob or list)."""
    paths = expand_paths(src, what="npy")
    arrays = [open_npy(p) for p in paths]
    n_cols = arrays[0].shape[1]
    for p, a in zip(paths[1:], arrays[1:], strict=True):
        check_n_cols(p, a.shape[1], n_cols)
    dt = np.dtype(dtype) if dtype is not None else result_dtype([a.dtype for a in arrays])
    n_rows = sum(int(a.shape[0]) for a in arrays)
    del arrays  # reopened lazily in blocks(); keep no mappings alive between calls

    def blocks() -> Iterator[tuple[Any, None]]:
        for p in paths:
            arr = open_npy(p)
            for _, _, block in dense_row_blocks(arr, target_bytes=block_bytes):
                yield block, None
            del arr

    return Source(name=paths[0] if len(paths) == 1 else f"{len(paths)} npy files",
                  n_cols=n_cols, dtype=dt, blocks=blocks, n_rows=n_rows, dense=True)


__all__ = ["npy_source", "open_npy"]
