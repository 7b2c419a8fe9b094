"""Writing stores: create, save, write_blocks, append and upgrade.

Write path: every writer (:func:`save`, :meth:`SparseStore.append`, ``convert``) streams
row blocks through :func:`append_blocks`, which writes ``data``/``indices``, then
``indptr`` and labels, and commits by rewriting the group attrs (``shape``) last, in one
atomic metadata write (:func:`commit`).  Anything beyond the committed ``shape[0]`` rows
is invisible to readers and is cut by the next writer (:func:`truncate`), so a crash never
exposes or loses a committed row.  The functions here work on a :class:`SparseStore`
opened for writing and reload its committed state after each commit.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import storage
from .blocks import matrix_shape, row_blocks
from .canonical import (
    canonical_block,
    cast_values,
    check_casting,
    check_nan_policy,
    check_sparse_input,
    native,
    native_matrix,
)
from .chunks import ChunkEncoder
from .errors import (
    CorruptStoreError,
    InvalidInputError,
    NotAStoreError,
    ShapeMismatchError,
    UnverifiedStoreWarning,
)
from .integrity import VerifiedStore, build_manifest, new_generation
from .labels import LabelArray, Labels, check_append_labels, check_labels
from .layout import (
    CSR_ENCODING,
    DENSE_ARRAY,
    DENSE_ENCODING,
    FORMAT_VERSION,
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
from .zarr_compat import chunk_key

# The labels of one row block (name -> rows), or None for a store without labels.
LabelBlock = Mapping[str, np.ndarray] | None


# ------------------------------------------------------------------ appending

def append(
    store: SparseStore, X: Any, labels: Mapping[str, Any] | None = None,
    casting: str = "safe",
) -> None:
    """Append rows (any scipy sparse or 2-D array) and their labels: the work of
    :meth:`SparseStore.append`.

    ``casting`` (see :func:`~sparsestore.canonical.cast_values`): ``"safe"`` (default)
    takes only dtypes the store's holds by type, since the caller did not choose that
    dtype; ``"same_value"`` takes any values the store's dtype holds (checked before
    anything is written); ``"unsafe"`` stores numpy's cast.
    """
    store._check_writable()
    check_casting(casting)
    X = _as_input(X)
    n_new, n_cols = matrix_shape(X)
    check_dim(n_new, "n_rows")
    check_dim(store.n_rows + n_new, "n_rows after the append")
    if n_cols != store.n_cols:
        raise ShapeMismatchError(
            f"cannot append a block with {n_cols} columns to a store with {store.n_cols}"
        )
    src = getattr(X, "dtype", None)
    if src is None:
        src = np.asarray(X).dtype
    src = _check_append_dtype(store, np.dtype(src), sparse_input=sp.issparse(X),
                              casting=casting)
    full_labels = check_append_labels(labels, n_new, store.labels, creating=store.n_rows == 0)
    if casting == "same_value" and not np.can_cast(src, store.dtype, casting="safe"):
        # Every value checked first, block by block, so a refused append writes nothing.
        for a, _b, block in row_blocks(X):
            _cast_block(store, block, store.n_rows + a, casting)
    append_blocks(
        store, ((block, _slice_labels(full_labels, a, b)) for a, b, block in row_blocks(X)),
        casting=casting,
    )


def _check_append_dtype(
    store: SparseStore, src: np.dtype, *, sparse_input: bool = False, casting: str = "safe"
) -> np.dtype:
    """Refuse a dtype the store cannot take (by type, under ``casting="safe"``); return it
    in native byte order."""
    # Sparse input is held in scipy.sparse, which refuses float16 (as save does).
    src = check_matrix_dtype(src, sparse=sparse_input)
    if casting == "safe":
        cast_values(np.empty(0, src), store.dtype, casting="safe")
    return src


def _cast_block(store: SparseStore, block: Any, first_row: int, casting: str) -> None:
    """Check that one block's values cast to the store's dtype (as writing it would)."""
    if store.is_dense:
        _dense_block(block, store.n_cols, store.dtype, casting=casting, first_row=first_row)
    else:
        canonical_block(block, store.n_cols, dtype=store.dtype, keep_zeros=True,
                        nan_policy="keep", first_row=first_row, casting=casting)


def _ensure_label_arrays(store: SparseStore, first: Mapping[str, np.ndarray]) -> None:
    """Create the label arrays of a store's first labelled rows, empty and unpublished."""
    layout = store.layout or Layout()
    lg = store._group.require_group(LABELS_GROUP)
    for name, arr in first.items():
        dt = np.dtype(arr.dtype)
        tail = tuple(int(s) for s in arr.shape[1:])
        row_bytes = max(1, int(np.prod(tail)) * dt.itemsize)
        lg.create_array(
            name,
            shape=(0, *tail),
            dtype=dt,
            chunks=(layout.dense_row_chunk(row_bytes), *tail) if tail else
            (max(1024, layout.chunk_bytes // dt.itemsize),),
            compressors=layout.codecs(),
            fill_value=0,
        )
    # Labels become visible only with the commit (attrs), like rows.
    store._labels = Labels({n: LabelArray(lg[n], n, 0) for n in first})


def _label_arrays(store: SparseStore) -> dict[str, Any]:
    """The zarr arrays of the store's labels, by name."""
    return {name: lab.array for name, lab in store.labels.items()}


def append_blocks(
    store: SparseStore, blocks: Iterable[tuple[Any, LabelBlock]], progress: Any = None,
    encode_thread: bool = False, casting: str = "same_value",
) -> None:
    """Write row blocks, then commit them all at once; roll back on any error.

    ``encode_thread``: compress full chunks on a thread of their own (for sources that
    decode on other threads, so the writer's thread is the one everything waits for).
    ``casting``: how values are cast to the store's dtype (see
    :func:`~sparsestore.canonical.cast_values`).
    """
    store._check_writable()
    check_casting(casting)
    n0, nnz0 = store.n_rows, store.nnz
    n, nnz = n0, nnz0
    pending = list(store._meta.labels)  # the labels the commit publishes
    ex = ThreadPoolExecutor(1, thread_name_prefix="sparsestore-encode") \
        if encode_thread and not store.is_dense else None
    appenders = [] if store.is_dense else [
        _WholeChunks(store._data, nnz0, ex), _WholeChunks(store._indices, nnz0, ex),
        _WholeChunks(store._indptr, n0 + 1, ex),
    ]
    try:
        for block, labs in blocks:
            if labs and not len(store.labels):
                _ensure_label_arrays(store, labs)
                pending = list(labs)
            if store.is_dense:
                arr = _dense_block(block, store.n_cols, store.dtype, casting=casting,
                                   first_row=n)
                if store._meta.nan_policy == "raise":
                    _check_dense_finite(arr, n)
                m = arr.shape[0]
                if m:
                    store._X.resize((n + m, store.n_cols))
                    _writable(store._X)[n : n + m] = arr
                k = m * store.n_cols
            else:
                vals, ind, ptr = canonical_block(
                    block, store.n_cols, dtype=store.dtype, keep_zeros=store._meta.keep_zeros,
                    nan_policy=store._meta.nan_policy, first_row=n, casting=casting,
                )
                m, k = ptr.size - 1, vals.size
                appenders[0].add(vals)
                appenders[1].add(ind)
                appenders[2].add(ptr[1:] + nnz)
            for name, arr in _label_arrays(store).items():
                lab = np.asarray(labs[name]) if labs else None
                if lab is None or lab.shape[0] != m:
                    raise ShapeMismatchError(f"label {name!r} block does not match its rows")
                if m:
                    arr.resize((n + m, *arr.shape[1:]))
                    _writable(arr)[n : n + m] = lab
            n, nnz = n + m, nnz + k
            if progress is not None:
                progress.update(m)
        for app in appenders:
            app.flush()
        commit(store, n, nnz, pending)
    except BaseException:
        for app in appenders:  # no chunk may land after the rollback
            with contextlib.suppress(Exception):
                app.wait()
        with contextlib.suppress(Exception):
            truncate(store, n0, nnz0)
            store._load()
        raise
    finally:
        if ex is not None:
            ex.shutdown(wait=True)


def commit(
    store: SparseStore, n_rows: int, nnz: int, labels: list[str], *, complete: bool = True,
    scan: bool = False,
) -> None:
    """Publish rows ``[0, n_rows)`` with their manifest in one metadata write.

    ``scan``: take the tags of chunks this writer did not write from storage (only
    :func:`upgrade` does, after checking every chunk).
    """
    meta = Meta.from_json(store._meta.to_json())
    meta.generation = meta.generation or new_generation()
    meta.labels = list(labels)
    meta.committed_nnz = nnz if not store.is_dense else 0
    meta.complete = complete
    meta.format_version = FORMAT_VERSION
    if store.is_dense:
        lengths = {DENSE_ARRAY: (store._X, n_rows)}
    else:
        lengths = {"data": (store._data, nnz), "indices": (store._indices, nnz),
                   "indptr": (store._indptr, n_rows + 1)}
    for name, arr in _label_arrays(store).items():
        if name in labels:
            lengths[f"{LABELS_GROUP}/{name}"] = (arr, n_rows)
    meta.manifest = build_manifest(
        lengths, store._group.store, generation=meta.generation, n_cols=store.n_cols,
        old=store._manifest, scan=scan,
    ).to_json()
    attrs = {"shape": [n_rows, store.n_cols], META_KEY: meta.to_json()}
    # One metadata write: zarr's attrs.update() writes zarr.json once per key, and a
    # kill between those writes would commit a shape without its nnz.
    store._group.update_attributes(attrs)
    store._load()
    with contextlib.suppress(AttributeError):  # the manifest now holds every tag written
        store._group.store.written.clear()


def truncate(store: SparseStore, n_rows: int, nnz: int) -> None:
    """Drop anything written past the committed rows (after a failure or a crash)."""
    storage.settle()
    if store.is_dense:
        storage.shrink(store._X, n_rows)
    else:
        for arr in (store._data, store._indices):
            storage.shrink(arr, nnz)
        storage.shrink(store._indptr, n_rows + 1)
    if LABELS_GROUP in store._group:
        lg = store._group[LABELS_GROUP]
        for name, arr in lg.arrays():
            if name not in store._meta.labels:
                with contextlib.suppress(Exception):
                    del lg[name]
            else:
                storage.shrink(arr, n_rows)


# ------------------------------------------------------------------ chunks

def _writable(arr: Any) -> Any:
    """``arr`` writing every chunk, all-fill ones included: the manifest needs each chunk
    of the committed rows stored, so a missing one is damage, never an empty chunk.  Take
    it after any resize (a configured copy does not see the original's later resizes)."""
    return arr.with_config({"write_empty_chunks": True})


class _WholeChunks:
    """Appends to a 1-D zarr array in whole chunks (whole shards when sharded).

    A write ending inside a chunk makes the next write read, decode, merge and re-encode
    that chunk: row blocks of arbitrary nnz did that on nearly every block (measured:
    appends ~1.7x slower).  Values are copied into one chunk-sized buffer, allocated once
    and reused, and a chunk is written when the buffer is full (whole chunks within one
    block are written straight from the block).  So less than one chunk is held back
    between blocks (written by :meth:`flush` before the commit), and not as a list of
    blocks joined by a concatenation per chunk, which held a chunk twice and churned the
    allocator.  The array grows ahead of the writes (up to 64 chunks), not by one
    metadata rewrite per chunk, and chunks are written without zarr's all-fill-value
    scan (which took as long as compressing a float chunk).  zarr has encoded a chunk
    into new bytes when ``__setitem__`` returns, so the buffer is free again by then.

    Given an executor (``encode_on``), a full buffer is encoded and stored there while a
    second buffer fills, so the writer's thread does not wait for Blosc.
    """

    def __init__(self, arr: Any, end: int, encode_on: Executor | None = None) -> None:
        self.arr, self.start, self.end = arr, end, end
        self.step = int((getattr(arr, "shards", None) or arr.chunks)[0])
        self.buf: np.ndarray | None = None  # values of [end, end + fill), chunk-aligned end
        self.fill = 0
        # Encodes and stores chunks itself when it can (byte-identical to zarr's writes).
        self.encoder = ChunkEncoder.for_array(arr)
        # With an executor, a full buffer is encoded there while the other one fills.
        self.encode_on = encode_on if self.encoder is not None else None
        self.spare: np.ndarray | None = None
        self.pending: Future | None = None  # the encode of ``spare``

    def add(self, values: np.ndarray) -> None:
        pos, size = 0, int(values.size)
        while pos < size:
            stop = (self.end // self.step + 1) * self.step  # the end of the current chunk
            if not self.fill and self.end % self.step == 0 and size - pos >= self.step:
                k = (size - pos) // self.step * self.step  # whole chunks: no copy
                self._write(self.end + k, values[pos : pos + k])
                pos += k
                continue
            if self.buf is None:
                self.buf = np.empty(self.step, dtype=self.arr.dtype)
            take = min(stop - self.end - self.fill, size - pos)
            self.buf[self.fill : self.fill + take] = values[pos : pos + take]
            self.fill += take
            pos += take
            if self.end + self.fill == stop:
                self._write(stop, self.buf[: self.fill], from_buf=True)

    def flush(self) -> None:
        """Write what is held back, give the array its exact length, free the buffers."""
        self.wait()
        stop = self.end + self.fill
        if self.arr.shape[0] != stop:
            self.arr.resize((stop,))
        if self.fill:
            self._write(stop, self.buf[: self.fill])  # type: ignore[index]
        self.buf = self.spare = None

    def wait(self) -> None:
        """Wait for the chunk being encoded behind (raising its error, if any)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def _grow(self, stop: int) -> None:
        if self.arr.shape[0] < stop:
            self.arr.resize((stop + min(stop - self.start, 64 * self.step),))

    def _write(self, stop: int, values: np.ndarray, from_buf: bool = False) -> None:
        """Store ``values`` as elements ``[end, stop)``.  A full buffer (``from_buf``) goes
        to the executor, if any, while the spare buffer fills."""
        self._grow(stop)
        if self.encoder is not None and self.end % self.step == 0:
            k0 = self.end // self.step
            if from_buf and self.encode_on is not None:
                self.wait()  # the spare is free once its own encode is done
                self.pending = self.encode_on.submit(self.encoder.write, k0, self.buf)
                self.buf, self.spare = self.spare, self.buf
            else:
                for i, lo in enumerate(range(0, values.size, self.step)):
                    self.encoder.write(k0 + i, values[lo : lo + self.step])
        else:  # zarr merges a write that starts inside a stored chunk
            _writable(self.arr)[self.end : stop] = values
        self.end, self.fill = stop, 0


# ------------------------------------------------------------------ input

def _as_input(X: Any) -> Any:
    """Check a matrix argument's structure up front; array-likes with shape/dtype stay lazy."""
    if sp.issparse(X):
        check_sparse_input(X)
        return native_matrix(X)
    if hasattr(X, "shape") and hasattr(X, "dtype"):
        return X
    try:
        return np.asarray(X)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged lists and the like
        raise InvalidInputError(f"cannot read X as a 2-D matrix ({exc})") from None


def _slice_labels(labels: dict[str, Any], a: int, b: int) -> dict[str, np.ndarray] | None:
    """Rows ``[a, b)`` of each label, as numpy (None without labels)."""
    if not labels:
        return None
    return {k: np.asarray(v[a:b]) for k, v in labels.items()}


def _dense_block(
    block: Any, n_cols: int, dtype: np.dtype, *, casting: str = "same_value",
    first_row: int = 0,
) -> np.ndarray:
    """A row block of a dense store as a native ndarray of its dtype, cast by
    :func:`~sparsestore.canonical.cast_values` (``casting``)."""
    arr = native_matrix(block).toarray() if sp.issparse(block) else native(np.asarray(block))
    if arr.ndim != 2 or arr.shape[1] != n_cols:
        raise ShapeMismatchError(f"block has shape {arr.shape}; the store has {n_cols} columns")

    def where(k: int) -> str:
        return f"row {first_row + k // n_cols}, column {k % n_cols}"

    return cast_values(arr, dtype, casting=casting, where=where)


def _check_dense_finite(arr: np.ndarray, first_row: int) -> None:
    """Refuse NaN/inf values (``nan_policy="raise"``), naming the first."""
    if arr.dtype.kind == "f" and arr.size:
        bad = ~np.isfinite(arr)
        if bad.any():
            r, c = (int(v[0]) for v in np.nonzero(bad))
            raise InvalidInputError(
                f"row {first_row + r}, column {c} holds {arr[r, c]}: NaN and infinite values "
                "are refused; clean the data, or pass nan_policy='keep' to store them"
            )


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
        _writable(ip)[:] = np.zeros(1, dtype=np.int64)
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
        append_blocks(st, blocks, progress=progress, encode_thread=encode_thread,
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
    X = _as_input(X)
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
            ((block, _slice_labels(labs, a, b)) for a, b, block in row_blocks(X)),
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
    from zarr.core.sync import sync

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
        inner = group.store._store if isinstance(group.store, VerifiedStore) else group.store
        absent: list[str] = []
        for name, arr in arrays.items():
            c = int((getattr(arr, "shards", None) or arr.chunks)[0])
            for k in range(0, (lengths[name] + c - 1) // c):
                key = chunk_key(arr, f"{arr.path}/", k)
                if not sync(inner.exists(key)):
                    lo, hi = k * c, min((k + 1) * c, arr.shape[0])
                    _writable(arr)[lo:hi] = arr[lo:hi]
                    absent.append(f"{name}/{k}")
        commit(st, st.n_rows, st.nnz, list(st._meta.labels), scan=True)
    finally:
        lock.release()
    return {"path": p, "upgraded": True, "written_chunks": len(absent), "absent_chunks": absent}


def _progress(progress: Any, total: int, desc: str) -> Any:
    """A tqdm bar of ``total`` rows when ``progress`` asks for one."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=None)
