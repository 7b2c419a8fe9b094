"""sparsestore: huge sparse matrices on disk, streamed into training.

The core never imports TensorFlow; framework backends live in the ``adapters`` package.
"""

from __future__ import annotations

from . import errors
from .layout import Layout
from .store import SparseStore, open
from .writer import create, save, upgrade, write_blocks

__version__ = "0.1.0"

__all__ = [
    "Layout",
    "SparseStore",
    "__version__",
    "create",
    "errors",
    "open",
    "save",
    "upgrade",
    "write_blocks",
]


def __getattr__(name: str):  # lazy: keep ``import sparsestore`` light
    if name in ("DataLoader",):
        from .loader import DataLoader

        return DataLoader
    if name in ("convert",):
        from .conversion import convert

        return convert
    if name in ("from_dask",):
        from .dask_write import from_dask

        return from_dask
    raise AttributeError(f"module 'sparsestore' has no attribute {name!r}")
