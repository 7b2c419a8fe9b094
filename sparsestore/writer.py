"""New stores: create, save, write_blocks, and upgrade (adding the chunk manifest).

Every writer (:func:`save`, :func:`write_blocks`, ``convert``, :meth:`SparseStore.append`)
streams row blocks through :meth:`Appender.append_blocks
<sparsestore.appender.Appender.append_blocks>`, which writes and commits them atomically
(see :mod:`sparsestore.appender`).  A new store is built in a staging location and opened
once every block is committed, so nothing appears at its path before that.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import storage
from .appender import LabelBlock, as_input, slice_labels, writable
from .blocks import matrix_shape, row_blocks
from .canonical import check_casting, check_nan_policy
from .errors import CorruptStoreError, InvalidInputError, NotAStoreError, UnverifiedStoreWarning
from .integrity import new_generation
from .labels import check_labels
from .layout import (
    CSR_ENCODING,
    DENSE_ARRAY,
    DENSE_ENCODING,
    LABELS_GROUP,
    META_KEY,
    Layout,
    Meta,
    check_dim,
    check_matrix_dtype,
    index_dtype,
)
from .oserrors import os_errors
from .store import SparseStore, open
from .validate import validate_store
from .verified import build_manifest
from .zarr_compat import chunk_key, key_exists

# ------------------------------------------------------------------ new stores

def _init_group(
    where: str,
    *,
    n_cols: int,
    dtype: np.dtype,
    layout: Layout,
    sparse: bool,
    keep_zeros: bool,
    complete: bool,
    storage_options: dict[str, Any] | None,
    nan_policy: str = "raise",
) -> Any:
    """A new empty store group at ``where``: arrays, encoding attrs, metadata, manifest."""
    import zarr

    zstore = storage.zarr_store(where, read_only=False, storage_options=storage_options)
    g = zarr.open_group(store=zstore, mode="w", zarr_format=3)
    codecs = layout.codecs()
    meta = Meta(
        format="csr" if sparse else "dense",
        layout=layout.to_json(),
        keep_zeros=keep_zeros,
        complete=complete,
        generation=new_generation(),
        nan_policy=nan_policy,
    )
    if sparse:
        idt = index_dtype(n_cols)
        for name, dt in (("data", dtype), ("indices", idt)):
            g.create_array(
                name,
                shape=(0,),
                dtype=dt,
                chunks=(layout.nnz_chunk(dt.itemsize),),
                shards=(layout.nnz_shard(dt.itemsize),) if layout.shard_bytes else None,
                compressors=codecs,
                fill_value=0,
            )
        ip = g.create_array(
            "indptr",
            shape=(1,),
            dtype=np.int64,
            chunks=(layout.indptr_chunk,),
            compressors=codecs,
            fill_value=0,
        )
        writable(ip)[:] = np.zeros(1, dtype=np.int64)
        lengths = {"data": (g["data"], 0), "indices": (g["indices"], 0), "indptr": (ip, 1)}
        attrs = {**CSR_ENCODING, "shape": [0, n_cols]}
    else:
        rows = layout.dense_row_chunk(max(1, n_cols) * dtype.itemsize)
        x = g.create_array(
            DENSE_ARRAY,
            shape=(0, n_cols),
            dtype=dtype,
            chunks=(rows, max(1, n_cols)),
            compressors=codecs,
            fill_value=0,
        )
        x.attrs.update(DENSE_ENCODING)
        lengths = {DENSE_ARRAY: (x, 0)}
        attrs = {"shape": [0, n_cols]}
    meta.manifest = build_manifest(
        lengths, g.store, generation=meta.generation, n_cols=n_cols, old=None
    ).to_json()
    g.update_attributes({**attrs, META_KEY: meta.to_json()})
    return g


@os_errors("create")
def create(
    path: str | os.PathLike[str],
    n_cols: int,
    dtype: Any = np.float32,
    *,
    sparse: bool = True,
    keep_zeros: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    nan_policy: str = "raise",
    **layout_options: Any,
) -> SparseStore:
    """Create an empty (0-row) store and open it for appending (``mode="r+"``).

    ``nan_policy``: what appends do with NaN/inf values, ``"raise"`` or ``"keep"``.
    """
    layout = Layout.from_options(**layout_options)
    check_nan_policy(nan_policy)
    n_cols = check_dim(n_cols, "n_cols")
    dt = check_matrix_dtype(dtype, sparse=sparse)
    p = storage.normalize(path)
    with storage.staged(p, overwrite=overwrite, storage_options=storage_options) as where:
        _init_group(where, n_cols=n_cols, dtype=dt, layout=layout, sparse=sparse,
                    keep_zeros=keep_zeros, complete=True, storage_options=storage_options,
                    nan_policy=nan_policy)
    return open(p, mode="r+", storage_options=storage_options)


@os_errors("save")
def write_blocks(
    path: str | os.PathLike[str],
    blocks: Iterable[tuple[Any, LabelBlock]],
    *,
    n_cols: int,
    dtype: Any,
    sparse: bool = True,
    keep_zeros: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: Any = None,
    encode_thread: bool = False,
    nan_policy: str = "raise",
    casting: str = "same_value",
    **layout_options: Any,
) -> SparseStore:
    """Build a new store from an iterable of ``(row block, labels block)``, atomically.

    The one write path for :func:`save` and every ingest source: nothing appears at
    ``path`` unless every block was written.  ``encode_thread``: compress chunks on a
    thread of their own, for block sources that decode on several threads.
    ``nan_policy``: ``"raise"`` refuses NaN/inf values (the block's row and column named),
    ``"keep"`` stores them; appends follow the store's policy.  ``casting``: how block
    values are cast to ``dtype``: ``"same_value"`` refuses a value the dtype cannot hold
    (floats may round, not overflow or vanish), ``"unsafe"`` stores numpy's cast without
    the zeros it makes, ``"safe"`` refuses a block dtype that could lose values (see
    :func:`~sparsestore.canonical.cast_values`).
    """
    layout = Layout.from_options(**layout_options)
    check_nan_policy(nan_policy)
    check_casting(casting)
    n_cols = check_dim(n_cols, "n_cols")
    dt = check_matrix_dtype(dtype, sparse=sparse)
    p = storage.normalize(path)
    with storage.staged(p, overwrite=overwrite, storage_options=storage_options) as where:
        # Marked incomplete until the one commit at the end of append_blocks: a remote
        # store is written in place, and a local staging dir orphaned by a kill must not
        # open as a store either.
        g = _init_group(where, n_cols=n_cols, dtype=dt, layout=layout, sparse=sparse,
                        keep_zeros=keep_zeros, complete=False,
                        storage_options=storage_options, nan_policy=nan_policy)
        st = SparseStore(g, path=where, mode="r+", storage_options=storage_options)
        st.appender.append_blocks(blocks, progress=progress, encode_thread=encode_thread,
                                  casting=casting)
    return open(p, mode="r", storage_options=storage_options)


@os_errors("save")
def save(
    path: str | os.PathLike[str],
    X: Any,
    labels: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    sparse: bool = True,
    keep_zeros: bool = False,
    dtype: Any = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    nan_policy: str = "raise",
    casting: str = "same_value",
    **layout_options: Any,
) -> SparseStore:
    """Write ``X`` (any scipy sparse matrix/array, 2-D ndarray or memmap) as a new store.

    Input is streamed in row blocks: a memmap bigger than memory is never loaded whole.
    ``sparse=False`` keeps a dense matrix dense (slices give numpy).  ``nan_policy``:
    ``"raise"`` (default) refuses NaN/inf values, naming the first; ``"keep"`` stores them.
    ``casting`` applies when ``dtype`` differs from X's: ``"same_value"`` (default) refuses
    a value ``dtype`` cannot hold (300 or 0.7 as int8, 1e300 as float32), naming it;
    floats may round to the nearest value of a narrower float; ``"unsafe"`` stores what
    numpy's ``astype`` makes, dropping the zeros it creates.  Big-endian input is stored in
    native byte order.  Returns the store opened read-only.
    """
    check_casting(casting)
    if isinstance(X, SparseStore):
        raise InvalidInputError("X is already a store; use sparsestore.convert to copy it")
    X = as_input(X)
    n_rows, n_cols = matrix_shape(X)
    check_dim(n_rows, "n_rows")
    src_dtype = getattr(X, "dtype", None)
    if src_dtype is None:
        src_dtype = np.asarray(X).dtype
    dt = check_matrix_dtype(dtype if dtype is not None else src_dtype, sparse=sparse)
    labs = check_labels(labels, n_rows)
    bar = _progress(progress, n_rows, "save")
    try:
        return write_blocks(
            path,
            ((block, slice_labels(labs, a, b)) for a, b, block in row_blocks(X)),
            n_cols=n_cols, dtype=dt, sparse=sparse, keep_zeros=keep_zeros,
            overwrite=overwrite, storage_options=storage_options, progress=bar,
            nan_policy=nan_policy, casting=casting, **layout_options,
        )
    finally:
        if bar is not None:
            bar.close()


def upgrade(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Add the chunk manifest to a store written before it existed (format version 1).

    Every committed chunk is decoded first (a damaged store is refused, not blessed);
    chunks absent from storage are written out as the fill value they read as, since from
    now on a missing chunk is an error.  An old store cannot tell such a chunk (all fill
    value, never stored by zarr) from a deleted one: ``absent_chunks`` names them.  Returns
    what was done; a store that has a manifest is left as is.
    """
    p = storage.normalize(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedStoreWarning)  # what upgrade is here to fix
        store = open(p, mode="r", storage_options=storage_options)
    if store.verified:
        return {"path": p, "upgraded": False, "written_chunks": 0, "absent_chunks": []}
    if META_KEY not in store.group.attrs:
        raise NotAStoreError(
            f"{p} was written by anndata, not sparsestore; copy it into a store with "
            "sparsestore.convert(src, dst)"
        )
    report = validate_store(p, storage_options=storage_options, progress=progress)
    if not report.ok:
        raise CorruptStoreError(f"cannot upgrade a damaged store:\n{report.summary()}")
    lock = storage.WriteLock(p).acquire()
    try:
        group = storage.open_group(p, mode="r+", storage_options=storage_options)
        st = SparseStore(group, path=p, mode="r+", storage_options=storage_options, lock=lock)
        lengths = {DENSE_ARRAY: st.n_rows} if st.is_dense else {
            "data": st.nnz, "indices": st.nnz, "indptr": st.n_rows + 1}
        arrays = {name: st.arrays[name] for name in lengths}
        for name, lab in st.labels.items():
            arrays[f"{LABELS_GROUP}/{name}"] = lab.array
            lengths[f"{LABELS_GROUP}/{name}"] = st.n_rows
        absent: list[str] = []
        for name, arr in arrays.items():
            c = int((getattr(arr, "shards", None) or arr.chunks)[0])
            for k in range(0, (lengths[name] + c - 1) // c):
                key = chunk_key(arr, f"{arr.path}/", k)
                if not key_exists(group.store, key):
                    lo, hi = k * c, min((k + 1) * c, arr.shape[0])
                    writable(arr)[lo:hi] = arr[lo:hi]
                    absent.append(f"{name}/{k}")
        st.appender.commit(st.n_rows, st.nnz, list(st.meta.labels), scan=True)
    finally:
        lock.release()
    return {"path": p, "upgraded": True, "written_chunks": len(absent), "absent_chunks": absent}


def _progress(progress: Any, total: int, desc: str) -> Any:
    """A tqdm bar of ``total`` rows when ``progress`` asks for one."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=None)
