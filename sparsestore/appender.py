"""The writing half of a store opened for writing: :class:`Appender`.

An :class:`Appender` holds what writing needs and reading does not: the writer lock, the
crash recovery run when a store is opened with ``mode="r+"`` (:meth:`Appender.recover`),
and the arrays being written.  :meth:`SparseStore.append <sparsestore.store.SparseStore.append>`
and every new store (:mod:`sparsestore.writer`) go through it.

Write path: row blocks stream through :meth:`Appender.append_blocks`, which writes
``data``/``indices``, then ``indptr`` and labels, and commits by rewriting the group attrs
(``shape``) last, in one atomic metadata write (:meth:`Appender.commit`).  Anything beyond
the committed ``shape[0]`` rows is invisible to readers and is cut by the next writer
(:meth:`Appender.truncate`), so a crash never exposes or loses a committed row.  The
appender reads and reloads its store only through :class:`WritableStore`, the small
internal API a :class:`~sparsestore.store.SparseStore` gives it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from . import storage
from .blocks import matrix_shape, row_blocks
from .canonical import (
    canonical_block,
    cast_values,
    check_casting,
    check_sparse_input,
    native,
    native_matrix,
)
from .chunks import ChunkEncoder
from .errors import InvalidInputError, NeedsUpgradeError, ShapeMismatchError
from .integrity import Manifest, new_generation
from .labels import Labels, check_append_labels
from .layout import (
    DENSE_ARRAY,
    FORMAT_VERSION,
    LABELS_GROUP,
    META_KEY,
    Layout,
    Meta,
    check_dim,
    check_matrix_dtype,
)
from .verified import build_manifest

# The labels of one row block (name -> rows), or None for a store without labels.
LabelBlock = Mapping[str, np.ndarray] | None


class WritableStore(Protocol):
    """What an :class:`Appender` needs of its store (a :class:`~sparsestore.store.SparseStore`):
    the committed state, the zarr group and arrays, and a reload after each commit."""

    path: str
    layout: Layout | None

    @property
    def n_rows(self) -> int: ...
    @property
    def n_cols(self) -> int: ...
    @property
    def nnz(self) -> int: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def is_dense(self) -> bool: ...
    @property
    def verified(self) -> bool: ...
    @property
    def meta(self) -> Meta: ...
    @property
    def manifest(self) -> Manifest | None: ...
    @property
    def labels(self) -> Labels: ...
    @property
    def group(self) -> Any: ...
    @property
    def arrays(self) -> dict[str, Any]: ...
    def refresh(self) -> Any: ...


class Appender:
    """Appends rows to one store and commits them; holds its writer lock (if any).

    ``store``: the handle whose committed state the appender extends and reloads after
    each commit or rollback.  ``lock``: the :class:`~sparsestore.storage.WriteLock` it
    releases on :meth:`close`.
    """

    def __init__(self, store: WritableStore, lock: storage.WriteLock | None = None) -> None:
        self.store = store
        self._lock = lock
        # The label arrays being written: the committed ones, or those a store's first
        # labelled rows create (unpublished until the commit lists them).
        self._labels: dict[str, Any] = {}

    def close(self) -> None:
        """Release the write lock (the appender can still write; nothing else guards it)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------ recovery
    def recover(self) -> None:
        """Cut what a killed writer left past the commit (run when a store opens ``"r+"``).

        A store without a chunk manifest is refused: appending would have to trust chunks
        nothing vouches for (``sparsestore upgrade`` adds one).
        """
        st = self.store
        if not st.verified:
            raise NeedsUpgradeError(
                f"{st.path} was written without a chunk manifest (by an older sparsestore, or "
                f"by anndata); run `sparsestore upgrade {st.path}` (sparsestore.upgrade) once "
                "before appending to it"
            )
        self.truncate(st.n_rows, st.nnz)

    def truncate(
        self, n_rows: int, nnz: int, batch: storage.WriteBatch | None = None
    ) -> None:
        """Drop anything written past the committed rows (after a failure or a crash).

        ``batch``: the failed write's :class:`~sparsestore.storage.WriteBatch`, whose
        writes still in flight are waited for (and later ones dropped) first.
        """
        if batch is not None:
            batch.settle()
        st = self.store
        if st.is_dense:
            storage.shrink(st.arrays[DENSE_ARRAY], n_rows)
        else:
            for name in ("data", "indices"):
                storage.shrink(st.arrays[name], nnz)
            storage.shrink(st.arrays["indptr"], n_rows + 1)
        g = st.group
        if LABELS_GROUP in g:
            lg = g[LABELS_GROUP]
            for name, arr in lg.arrays():
                if name not in st.meta.labels:
                    with contextlib.suppress(Exception):
                        del lg[name]
                else:
                    storage.shrink(arr, n_rows)

    # ------------------------------------------------------------ appending
    def append(
        self, X: Any, labels: Mapping[str, Any] | None = None, casting: str = "safe"
    ) -> None:
        """Append rows (any scipy sparse or 2-D array) and their labels: the work of
        :meth:`SparseStore.append <sparsestore.store.SparseStore.append>`.

        ``casting`` (see :func:`~sparsestore.canonical.cast_values`): ``"safe"`` (default)
        takes only dtypes the store's holds by type, since the caller did not choose that
        dtype; ``"same_value"`` takes any values the store's dtype holds (checked before
        anything is written); ``"unsafe"`` stores numpy's cast.
        """
        st = self.store
        check_casting(casting)
        X = as_input(X)
        n_new, n_cols = matrix_shape(X)
        check_dim(n_new, "n_rows")
        check_dim(st.n_rows + n_new, "n_rows after the append")
        if n_cols != st.n_cols:
            raise ShapeMismatchError(
                f"cannot append a block with {n_cols} columns to a store with {st.n_cols}"
            )
        src = getattr(X, "dtype", None)
        if src is None:
            src = np.asarray(X).dtype
        # Sparse input is held in scipy.sparse, which refuses float16 (as save does).
        src = check_matrix_dtype(np.dtype(src), sparse=sp.issparse(X))
        if casting == "safe":
            cast_values(np.empty(0, src), st.dtype, casting="safe")
        full_labels = check_append_labels(labels, n_new, st.labels, creating=st.n_rows == 0)
        if casting == "same_value" and not np.can_cast(src, st.dtype, casting="safe"):
            # Every value checked first, block by block, so a refused append writes nothing.
            for a, _b, block in row_blocks(X):
                self._cast_block(block, st.n_rows + a, casting)
        self.append_blocks(
            ((block, slice_labels(full_labels, a, b)) for a, b, block in row_blocks(X)),
            casting=casting,
        )

    def _cast_block(self, block: Any, first_row: int, casting: str) -> None:
        """Check that one block's values cast to the store's dtype (as writing it would)."""
        st = self.store
        if st.is_dense:
            _dense_block(block, st.n_cols, st.dtype, casting=casting, first_row=first_row)
        else:
            canonical_block(block, st.n_cols, dtype=st.dtype, keep_zeros=True,
                            nan_policy="keep", first_row=first_row, casting=casting)

    def _new_label_arrays(self, first: Mapping[str, np.ndarray]) -> None:
        """Create the label arrays of a store's first labelled rows, empty and unpublished."""
        layout = self.store.layout or Layout()
        lg = self.store.group.require_group(LABELS_GROUP)
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
        self._labels = {n: lg[n] for n in first}

    def append_blocks(
        self, blocks: Iterable[tuple[Any, LabelBlock]], progress: Any = None,
        encode_thread: bool = False, casting: str = "same_value",
    ) -> None:
        """Write row blocks, then commit them all at once; roll back on any error.

        ``encode_thread``: compress full chunks on a thread of their own (for sources that
        decode on other threads, so the writer's thread is the one everything waits for).
        ``casting``: how values are cast to the store's dtype (see
        :func:`~sparsestore.canonical.cast_values`).
        """
        st = self.store
        check_casting(casting)
        n0, nnz0 = st.n_rows, st.nnz
        n, nnz = n0, nnz0
        meta, arrays = st.meta, st.arrays
        pending = list(meta.labels)  # the labels the commit publishes
        self._labels = {name: lab.array for name, lab in st.labels.items()}
        ex = ThreadPoolExecutor(1, thread_name_prefix="sparsestore-encode") \
            if encode_thread and not st.is_dense else None
        sinks = [] if st.is_dense else [
            _WholeChunks(arrays["data"], nnz0, ex), _WholeChunks(arrays["indices"], nnz0, ex),
            _WholeChunks(arrays["indptr"], n0 + 1, ex),
        ]
        batch = storage.WriteBatch()
        try:
            with batch.open():  # zarr's writes for these blocks, as this batch's
                for block, labs in blocks:
                    if labs and not self._labels:
                        self._new_label_arrays(labs)
                        pending = list(labs)
                    if st.is_dense:
                        arr = _dense_block(block, st.n_cols, st.dtype, casting=casting,
                                           first_row=n)
                        if meta.nan_policy == "raise":
                            _check_dense_finite(arr, n)
                        m = arr.shape[0]
                        if m:
                            x = arrays[DENSE_ARRAY]
                            x.resize((n + m, st.n_cols))
                            writable(x)[n : n + m] = arr
                        k = m * st.n_cols
                    else:
                        vals, ind, ptr = canonical_block(
                            block, st.n_cols, dtype=st.dtype, keep_zeros=meta.keep_zeros,
                            nan_policy=meta.nan_policy, first_row=n, casting=casting,
                        )
                        m, k = ptr.size - 1, vals.size
                        sinks[0].add(vals)
                        sinks[1].add(ind)
                        sinks[2].add(ptr[1:] + nnz)
                    for name, arr in self._labels.items():
                        lab = np.asarray(labs[name]) if labs else None
                        if lab is None or lab.shape[0] != m:
                            raise ShapeMismatchError(
                                f"label {name!r} block does not match its rows")
                        if m:
                            arr.resize((n + m, *arr.shape[1:]))
                            writable(arr)[n : n + m] = lab
                    n, nnz = n + m, nnz + k
                    if progress is not None:
                        progress.update(m)
                for sink in sinks:
                    sink.flush()
                self.commit(n, nnz, pending)
        except BaseException:
            for sink in sinks:  # no chunk may land after the rollback
                with contextlib.suppress(Exception):
                    sink.wait()
            with contextlib.suppress(Exception):
                self.truncate(n0, nnz0, batch)
                st.refresh()
            raise
        finally:
            self._labels = {}
            if ex is not None:
                ex.shutdown(wait=True)

    # ------------------------------------------------------------ commit
    def commit(
        self, n_rows: int, nnz: int, labels: list[str], *, complete: bool = True,
        scan: bool = False,
    ) -> None:
        """Publish rows ``[0, n_rows)`` with their manifest in one metadata write.

        ``scan``: take the tags of chunks this writer did not write from storage (only
        :func:`~sparsestore.writer.upgrade` does, after checking every chunk).
        """
        st = self.store
        meta = Meta.from_json(st.meta.to_json())
        meta.generation = meta.generation or new_generation()
        meta.labels = list(labels)
        meta.committed_nnz = nnz if not st.is_dense else 0
        meta.complete = complete
        meta.format_version = FORMAT_VERSION
        arrays = st.arrays
        if st.is_dense:
            lengths = {DENSE_ARRAY: (arrays[DENSE_ARRAY], n_rows)}
        else:
            lengths = {"data": (arrays["data"], nnz), "indices": (arrays["indices"], nnz),
                       "indptr": (arrays["indptr"], n_rows + 1)}
        label_arrays = self._labels or {name: lab.array for name, lab in st.labels.items()}
        for name, arr in label_arrays.items():
            if name in labels:
                lengths[f"{LABELS_GROUP}/{name}"] = (arr, n_rows)
        g = st.group
        meta.manifest = build_manifest(
            lengths, g.store, generation=meta.generation, n_cols=st.n_cols,
            old=st.manifest, scan=scan,
        ).to_json()
        attrs = {"shape": [n_rows, st.n_cols], META_KEY: meta.to_json()}
        # One metadata write: zarr's attrs.update() writes zarr.json once per key, and a
        # kill between those writes would commit a shape without its nnz.
        g.update_attributes(attrs)
        st.refresh()
        with contextlib.suppress(AttributeError):  # the manifest now holds every tag written
            g.store.written.clear()


# ------------------------------------------------------------------ chunks

def writable(arr: Any) -> Any:
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
            writable(self.arr)[self.end : stop] = values
        self.end, self.fill = stop, 0


# ------------------------------------------------------------------ input

def as_input(X: Any) -> Any:
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


def slice_labels(labels: dict[str, Any], a: int, b: int) -> dict[str, np.ndarray] | None:
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
