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

from ..canonical import check_row_count
from ..errors import FormatError, LabelError
from .base import (
    DEFAULT_BLOCK_NNZ,
    DEFAULT_MEMORY_BYTES,
    Source,
    row_bounds,
)
from .coo import CooSpill
from .zipsafe import DEFAULT_MAX_BYTES, check_declared_bytes

# Declared-to-stored bytes beyond which X over max_bytes is taken for a decompression bomb:
# real count matrices compress a few times, an all-fill-value chunk grid millions of times.
BOMB_RATIO = 1000


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
            # The arrays' own metadata, not a consolidated copy that may be stale.
            g = zarr.open_group(path, mode="r", use_consolidated=False)
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


def _is_array(elem: Any) -> bool:
    return hasattr(elem, "shape") and hasattr(elem, "dtype")


def _sparse_x(path: str, X: Any) -> tuple[str, tuple[int, int], np.dtype]:
    """Kind, shape and dtype of a sparse ``X`` group, its structure checked against its
    shape from array headers and two ``indptr`` entries, before anything reads it."""
    enc = _enc(X)
    if _is_array(X) or not hasattr(X, "keys"):
        raise FormatError(
            f"{path}: X is tagged {enc!r} but is an array, not a group of data, indices and "
            "indptr arrays"
        )
    parts = {}
    for name in ("data", "indices", "indptr"):
        if name not in X or not _is_array(X[name]) or len(X[name].shape) != 1:
            raise FormatError(f"{path}: X ({enc}) has no 1-D {name!r} array")
        parts[name] = X[name]
    raw = _attrs(X).get("shape")
    try:
        shape = tuple(int(s) for s in raw)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 2 or min(shape) < 0:
        raise FormatError(f"{path}: X ({enc}) has shape attribute {raw!r}, not two sizes")
    data, indices, indptr = parts["data"], parts["indices"], parts["indptr"]
    kind = "csr" if enc == "csr_matrix" else "csc"
    major = shape[0] if kind == "csr" else shape[1]
    nnz = int(data.shape[0])
    if int(indptr.shape[0]) != major + 1 or int(indices.shape[0]) != nnz:
        raise FormatError(
            f"{path}: X ({enc}, shape {shape}) has {indptr.shape[0]} indptr entries (needs "
            f"{major + 1}), {indices.shape[0]} indices and {nnz} values (must be equal)"
        )
    if np.dtype(indptr.dtype).kind not in "iu" or np.dtype(indices.dtype).kind not in "iu":
        raise FormatError(f"{path}: X's indptr and indices must hold integers")
    with _reading(path, "X/indptr"):
        first, last = (int(np.asarray(indptr[k : k + 1])[0]) for k in (0, major))
    if first != 0 or last != nnz:
        raise FormatError(
            f"{path}: X/indptr runs from {first} to {last}; it must run from 0 to the {nnz} "
            "stored values"
        )
    if kind == "csc":  # rows are only declared: the COO path cuts them, if data backs them
        check_row_count(shape[0], nnz, path)
    return kind, (shape[0], shape[1]), np.dtype(data.dtype)


@contextlib.contextmanager
def _reading(path: str, what: str) -> Iterator[None]:
    """Report what the reading library (h5py, zarr, anndata) refuses in a read of the file
    as a :class:`FormatError` naming the file and the part read."""
    try:
        yield
    except (ValueError, IndexError, KeyError, OSError) as exc:
        raise FormatError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") \
            from None


def _x_info(path: str, root: Any) -> tuple[str, tuple[int, int], np.dtype]:
    """Kind (``csr``/``csc``/``dense``), shape and dtype of ``X``."""
    if _enc(root) not in (None, "anndata"):
        raise FormatError(f"{path}: root encoding {_enc(root)!r} is not an AnnData object")
    if "X" not in root:
        raise FormatError(f"{path} has no X matrix (an AnnData object with X=None?)")
    X = root["X"]
    if _is_sparse(X):
        kind, shape, dtype = _sparse_x(path, X)
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
    casting: str = "same_value",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Source:
    """A :class:`Source` over an anndata file or zarr store: ``X`` and ``obs`` columns.

    ``X`` whose arrays declare more than ``max_bytes`` in all (a dense shape's full size)
    and more than ``BOMB_RATIO`` times the bytes the file holds is refused before anything
    is read, as an ``.npz`` shard is: chunked storage makes a tiny file declaring a
    2^31 x 2^20 matrix of fill values, while a real atlas of any size passes.

    ``casting``: how CSC values are cast to ``dtype`` as they are spilled (other layouts
    are cast by the writer); see :func:`~sparsestore.canonical.cast_values`.
    """
    p = os.fspath(path)
    if isinstance(labels, str):
        labels = [labels]
    names = list(labels or [])
    if len(set(names)) != len(names):
        raise LabelError(f"obs columns {names} are listed more than once")
    with open_root(p) as root:
        kind, shape, x_dtype = _x_info(p, root)
        stored = _stored_bytes(p)
        check_declared_bytes(p, _x_bytes(root["X"], kind), max(max_bytes, BOMB_RATIO * stored),
                             f"X declares {kind} {shape[0]} x {shape[1]} {x_dtype} in "
                             f"{stored} stored bytes")
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
                    with _reading(p, f"X rows {a}-{b}"):
                        dense = np.asarray(X[a:b])
                    yield dense, labs(a, b)
                return
            from anndata.io import sparse_dataset

            with _reading(p, "X"):
                ds = sparse_dataset(X)
            if kind == "csr":
                for a, b in row_bounds(X["indptr"], shape[0], block_nnz):
                    with _reading(p, f"X rows {a}-{b}"):
                        rows = ds[a:b]
                    yield rows, labs(a, b)
                return
            spill = CooSpill(shape, dt, memory_bytes=memory_bytes, tmp_dir=tmp_dir,
                             source=p, error=FormatError, casting=casting)
            with spill:
                for c0, c1 in row_bounds(X["indptr"], shape[1], block_nnz):
                    with _reading(p, f"X columns {c0}-{c1}"):
                        part = ds[:, c0:c1].tocoo()
                    spill.add(part.row, part.col.astype(np.int64) + c0, part.data)
                    del part
                for a, b, block in spill.blocks(block_nnz):
                    yield block, labs(a, b)

    return Source(name=p, n_cols=shape[1], dtype=dt, blocks=blocks, n_rows=shape[0],
                  labels=names, dense=kind == "dense")


def _stored_bytes(path: str) -> int:
    """Bytes the file (or the zarr directory's files) hold on disk."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _x_bytes(X: Any, kind: str) -> int:
    """Bytes ``X``'s arrays declare (their shapes times their itemsizes), read from their
    metadata alone."""
    arrays = [X] if kind == "dense" else [X[n] for n in ("data", "indices", "indptr")]
    return sum(int(np.prod(a.shape, dtype=object)) * np.dtype(a.dtype).itemsize
               for a in arrays)


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


__all__ = ["anndata_source", "is_anndata_zarr", "open_root"]
