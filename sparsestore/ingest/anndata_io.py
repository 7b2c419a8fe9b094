"""anndata ``.h5ad`` files and anndata zarr stores: ``X`` plus chosen ``obs`` columns.

``X`` is read lazily with ``anndata.io.sparse_dataset`` (sparse) or array slicing (dense),
in row blocks of about ``block_nnz`` entries; ``indptr`` is read piece by piece too.
Chosen ``obs`` columns become labels: numeric columns as they are, categorical columns as
their integer codes (-1 marks a missing value), both sliced lazily per block.

CSC on disk cannot be cut by rows cheaply (every column holds some of every row).  It is
read once in column blocks of about ``block_nnz`` entries, each turned into COO entries
for the out-of-core COO path (:class:`~sparsestore.ingest.coo.CooSpill`), which keeps at
most ``memory_bytes`` in memory and spills the rest to a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import FormatError, LabelError
from .base import (
    DEFAULT_BLOCK_NNZ,
    DEFAULT_MEMORY_BYTES,
    Source,
    row_bounds,
    write_source,
)
from .coo import CooSpill


def _attrs(elem: Any) -> dict[str, Any]:
    return dict(elem.attrs)


def _enc(elem: Any) -> str | None:
    enc = _attrs(elem).get("encoding-type")
    return enc.decode() if isinstance(enc, bytes) else enc


@contextlib.contextmanager
def open_root(path: str) -> Iterator[Any]:
    """Open an ``.h5ad`` (h5py) or anndata zarr store (zarr) read-only as its root group."""
    if os.path.isdir(path):
        import zarr

        try:
            g = zarr.open_group(path, mode="r")
        except Exception as exc:
            raise FormatError(f"{path} is not a zarr group ({type(exc).__name__}: {exc})") \
                from None
        yield g
        return
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FormatError(f"{path} is not a readable .h5ad (HDF5) file ({exc})") from None
    try:
        yield f
    finally:
        f.close()


def _is_sparse(elem: Any) -> bool:
    return _enc(elem) in ("csr_matrix", "csc_matrix")


def _x_info(path: str, root: Any) -> tuple[str, tuple[int, int], np.dtype]:
    """Kind (``csr``/``csc``/``dense``), shape and dtype of ``X``."""
    if _enc(root) not in (None, "anndata"):
        raise FormatError(f"{path}: root encoding {_enc(root)!r} is not an AnnData object")
    if "X" not in root:
        raise FormatError(f"{path} has no X matrix (an AnnData object with X=None?)")
    X = root["X"]
    if _is_sparse(X):
        from anndata.io import sparse_dataset

        try:
            ds = sparse_dataset(X)
        except Exception as exc:
            raise FormatError(f"{path}: X is not a readable sparse matrix ({exc})") from None
        kind, shape, dtype = ds.format, tuple(int(s) for s in ds.shape), np.dtype(ds.dtype)
    elif hasattr(X, "shape") and hasattr(X, "dtype"):
        if len(X.shape) != 2:
            raise FormatError(f"{path}: X has shape {tuple(X.shape)}; it must be 2-D")
        kind, shape, dtype = "dense", (int(X.shape[0]), int(X.shape[1])), np.dtype(X.dtype)
    else:
        raise FormatError(f"{path}: X has encoding {_enc(X)!r}, not a matrix sparsestore reads")
    if dtype.kind not in "biuf":
        raise FormatError(f"{path}: X values of dtype {dtype} cannot be stored")
    return kind, shape, dtype  # type: ignore[return-value]


class _ObsColumn:
    """One obs column, sliceable by rows without reading the whole column."""

    def __init__(self, path: str, obs: Any, name: str, n_rows: int) -> None:
        if name not in obs:
            known = [k for k in obs if k != _attrs(obs).get("_index", "_index")]
            raise LabelError(f"{path}: obs has no column {name!r}; it has {sorted(known)}")
        elem = obs[name]
        enc = _enc(elem)
        self.mask = None
        if enc == "categorical":
            self.arr = elem["codes"]
        elif enc in ("nullable-integer", "nullable-boolean"):
            self.arr, self.mask = elem["values"], elem["mask"]
        elif enc in (None, "array") and hasattr(elem, "dtype"):
            self.arr = elem
        else:
            raise LabelError(
                f"{path}: obs column {name!r} has encoding {enc!r}; only numeric and "
                "categorical columns can become labels (e.g. adata.obs[col].astype('category'))"
            )
        dt = np.dtype(self.arr.dtype)
        if dt.kind not in "biuf" or len(self.arr.shape) != 1 or self.arr.shape[0] != n_rows:
            raise LabelError(
                f"{path}: obs column {name!r} ({dt}, shape {tuple(self.arr.shape)}) is not a "
                "numeric column with one value per row"
            )
        self.name, self.path, self.dtype = name, path, dt

    def read(self, a: int, b: int) -> np.ndarray:
        out = np.asarray(self.arr[a:b])
        if self.mask is not None and np.any(np.asarray(self.mask[a:b])):
            raise LabelError(
                f"{self.path}: obs column {self.name!r} has missing values; fill them "
                "(adata.obs[col].fillna(...)) or make it categorical"
            )
        return out


def anndata_source(
    path: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    dtype: Any = None,
    block_nnz: int = DEFAULT_BLOCK_NNZ,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    tmp_dir: str | os.PathLike[str] | None = None,
) -> Source:
    """A :class:`Source` over an anndata file or zarr store: ``X`` and ``obs`` columns."""
    p = os.fspath(path)
    if isinstance(labels, str):
        labels = [labels]
    names = list(labels or [])
    if len(set(names)) != len(names):
        raise LabelError(f"obs columns {names} are listed more than once")
    with open_root(p) as root:
        kind, shape, x_dtype = _x_info(p, root)
        if names:
            if "obs" not in root:
                raise LabelError(f"{p} has no obs table; cannot read labels {names}")
            for n in names:
                _ObsColumn(p, root["obs"], n, shape[0])  # validate up front
    dt = np.dtype(dtype) if dtype is not None else x_dtype

    def blocks() -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
        with open_root(p) as root:
            cols = [_ObsColumn(p, root["obs"], n, shape[0]) for n in names]

            def labs(a: int, b: int) -> dict[str, np.ndarray] | None:
                return {c.name: c.read(a, b) for c in cols} or None

            X = root["X"]
            if kind == "dense":
                row_bytes = max(1, shape[1] * x_dtype.itemsize)
                step = max(1, (32 * 2**20) // row_bytes)
                for a in range(0, shape[0], step):
                    b = min(shape[0], a + step)
                    yield np.asarray(X[a:b]), labs(a, b)
                return
            from anndata.io import sparse_dataset

            ds = sparse_dataset(X)
            if kind == "csr":
                for a, b in row_bounds(X["indptr"], shape[0], block_nnz):
                    yield ds[a:b], labs(a, b)
                return
            spill = CooSpill(shape, dt, memory_bytes=memory_bytes, tmp_dir=tmp_dir,
                             source=p, error=FormatError, casting="unsafe")
            with spill:
                for c0, c1 in row_bounds(X["indptr"], shape[1], block_nnz):
                    part = ds[:, c0:c1].tocoo()
                    spill.add(part.row, part.col.astype(np.int64) + c0, part.data)
                    del part
                for a, b, block in spill.blocks(block_nnz):
                    yield block, labs(a, b)

    return Source(name=p, n_cols=shape[1], dtype=dt, blocks=blocks, n_rows=shape[0],
                  labels=names, dense=kind == "dense")


def is_anndata_zarr(path: str) -> bool:
    """Whether a directory is a zarr store holding an AnnData object (v2 or v3)."""
    import json

    for meta in ("zarr.json", ".zattrs"):
        f = os.path.join(path, meta)
        if os.path.isfile(f):
            try:
                with open(f) as fh:
                    obj = json.load(fh)
            except (OSError, ValueError):
                return False
            attrs = obj.get("attributes", obj) if meta == "zarr.json" else obj
            return isinstance(attrs, dict) and attrs.get("encoding-type") == "anndata"
    return False


def from_anndata(dst: Any, path: str | os.PathLike[str], *,
                 labels: Sequence[str] | None = None, dtype: Any = None,
                 tmp_dir: Any = None, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 block_nnz: int = DEFAULT_BLOCK_NNZ, **options: Any) -> Any:
    """Store an anndata file's ``X`` with ``obs`` columns ``labels`` as labels."""
    src = anndata_source(path, labels=labels, dtype=dtype, tmp_dir=tmp_dir,
                         memory_bytes=memory_bytes, block_nnz=block_nnz)
    return write_source(dst, src, **options)


__all__ = ["anndata_source", "from_anndata", "is_anndata_zarr", "open_root"]
