"""SparseStore: a CSR (or dense) matrix in a zarr group, opened like an array.

This module is the read side: :func:`open` finds a store and :class:`SparseStore` serves
its committed rows, once :class:`~sparsestore.opening.CommittedState` (the half of the
handle that reads and checks the committed metadata, arrays, labels and manifest) has
loaded them; :mod:`sparsestore.layout` owns the on-disk rules.  Writing lives beside it:
an ``"r+"`` handle holds an :class:`~sparsestore.appender.Appender` (lock, recovery,
commit), which :meth:`SparseStore.append` hands its work to; new stores are built by
:mod:`sparsestore.writer`.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import storage
from .appender import Appender
from .buffers import BufferPool
from .checks import check_column_indices, check_row_pointers
from .chunk_cache import ChunkCache
from .chunks import RANGE_READ_WORKERS as READ_WORKERS
from .chunks import ChunkDecoder, read_ranges, read_rows, read_slice
from .errors import (
    CorruptStoreError,
    InvalidInputError,
    NotAStoreError,
    ReadOnlyError,
    SparseStoreError,
    StoreNotFoundError,
    UnverifiedStoreWarning,
)
from .indexing import normalize_rows, split_key
from .integrity import Manifest
from .labels import Labels
from .layout import DENSE_ARRAY, META_KEY, Meta
from .opening import CommittedState, metadata_keys
from .oserrors import os_errors, translate

#: Bytes of column indices a whole-range read decodes and checks at a time.
CHECK_STRETCH = 4 * 2**20


class SparseStore(CommittedState):
    """A matrix on disk: ``store[a:b]`` gives scipy CSR (numpy for dense stores).

    Open with :func:`sparsestore.open`; build with :func:`sparsestore.save`,
    :func:`sparsestore.create` or :func:`sparsestore.convert`.  The object sees the rows
    committed when it was opened (a consistent snapshot); :meth:`refresh` looks again.
    """

    def __init__(
        self,
        group: Any,
        *,
        path: str,
        mode: str = "r",
        storage_options: dict[str, Any] | None = None,
        lock: storage.WriteLock | None = None,
        pinned: Mapping[str, Any] | None = None,
    ) -> None:
        self._group = group
        self.path = path
        self.mode = mode
        self.storage_options = storage_options
        try:
            self._load(pinned)
        finally:
            loaded(group)
        # The writing half of an "r+" handle: the lock, recovery, the arrays being written.
        self._appender = Appender(self, lock) if mode == "r+" else None

    # ------------------------------------------------------------------ state
    @property
    def generation(self) -> str:
        """Id of this save of the store (empty for stores written before it existed)."""
        return self._meta.generation

    @property
    def meta(self) -> Meta:
        """The committed sparsestore metadata (format, policies, labels, manifest); the
        writer copies it to make the next commit's, never changes it in place."""
        return self._meta

    @property
    def manifest(self) -> Manifest | None:
        """The committed chunk manifest every read is checked against (None: unverified)."""
        return self._manifest

    @property
    def committed_attrs(self) -> dict[str, Any]:
        """The group attrs of the commit this handle serves (what a reopened copy of the
        handle is pinned to: shape, generation, manifest)."""
        return self._attrs

    @property
    def verified(self) -> bool:
        """Whether every chunk read is checked against a committed manifest (stores written
        before the manifest existed, and anndata's, are not: see :func:`upgrade`)."""
        return self._manifest is not None

    def refresh(self) -> SparseStore:
        """Re-read the committed state (see rows appended by another process)."""
        if self.mode == "r":
            self._group = open_group(self.path, "r", self.storage_options)
        try:
            self._load()
        finally:
            loaded(self._group)
        return self

    # ----------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def n_rows(self) -> int:
        return self._shape[0]

    @property
    def n_cols(self) -> int:
        return self._shape[1]

    @property
    def nnz(self) -> int:
        """Stored entries (``n_rows * n_cols`` for a dense store)."""
        return self._nnz

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def format(self) -> str:
        """``"csr"`` or ``"dense"``."""
        return self._meta.format

    @property
    def is_dense(self) -> bool:
        return self._meta.format == "dense"

    @property
    def labels(self) -> Labels:
        return self._labels

    @property
    def group(self) -> Any:
        """The underlying zarr group (for advanced use; do not write to it directly)."""
        return self._group

    @property
    def arrays(self) -> dict[str, Any]:
        """The zarr arrays holding the matrix: data/indices/indptr, or X."""
        if self.is_dense:
            return {DENSE_ARRAY: self._X}
        return {"data": self._data, "indices": self._indices, "indptr": self._indptr}

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self._shape[0]

    # -------------------------------------------------------------- reading
    def indptr(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``indptr[start:stop+1]`` as int64: the row pointers of rows ``[start, stop)``."""
        stop = self.n_rows if stop is None else stop
        if self.is_dense:
            return np.arange(start, stop + 1, dtype=np.int64) * self.n_cols
        ptr = read_slice(self._indptr, start, stop + 1, name="indptr").astype(np.int64, copy=False)
        return check_row_pointers(ptr, self._nnz, self.path, start)

    def read_parts(
        self, start: int, stop: int, caches: tuple[ChunkCache, ChunkCache] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Compact CSR parts ``(values, indices, local indptr)`` of rows ``[start, stop)``.

        ``caches`` (one :class:`ChunkCache` for data, one for indices) lets a sequential
        reader decode chunks shared by neighbouring blocks only once.
        """
        ptr = self.indptr(start, stop)
        lo, hi = int(ptr[0]), int(ptr[-1])
        c = int(self._indices.chunks[0])
        if caches is None and hi - lo > c and self._direct:
            # Several chunks: decoded here straight into the result (faster than zarr's
            # pipeline), each indices chunk checked while it is still in cache.
            pool = self._read_pool
            caches = (ChunkCache(self._data, 2, "data", pool, READ_WORKERS),
                      ChunkCache(self._indices, 2, "indices", pool, READ_WORKERS))
        if caches is None:
            vals = read_slice(self._data, lo, hi, name="data")
            ind = read_slice(self._indices, lo, hi, name="indices")
            check_column_indices(ind, ptr, self.n_cols, self.path, start, chunk=c)
            return vals, ind, ptr - lo
        vals = caches[0].read(lo, hi, self._nnz)
        if self._rows_checked(start, stop):
            return vals, caches[1].read(lo, hi, self._nnz), ptr - lo
        dt, pool = self._indices.dtype, caches[1].pool
        ind = np.empty(hi - lo, dt) if pool is None else pool.take(hi - lo, dt)
        # Checked a stretch at a time while it is in cache: a chunk, or as many small (inner)
        # chunks as fill 4 MiB of indices, fetched and decoded together.
        step = c * max(1, CHECK_STRETCH // (c * dt.itemsize))
        edges = [lo, *range((lo // step + 1) * step, hi, step), hi]
        for p, q in zip(edges[:-1], edges[1:], strict=True):
            caches[1].read_to(p, q, ind[p - lo : q - lo], self._nnz)
            r0 = int(np.searchsorted(ptr, p, "right")) - 1
            r1 = int(np.searchsorted(ptr, q, "left"))
            check_column_indices(ind[p - lo : q - lo], np.clip(ptr[r0 : r1 + 1], p, q),
                                 self.n_cols, self.path, start + r0, chunk=c)
        for e in edges[1:-1]:  # a row running across a chunk edge: its two sides in order
            r = int(np.searchsorted(ptr, e, "right")) - 1
            if ptr[r] != e:
                check_column_indices(ind[e - 1 - lo : e + 1 - lo], np.array([e - 1, e + 1]),
                                     self.n_cols, self.path, start + r, chunk=c)
        if self._checked_rows is not None:
            self._checked_rows.add(start, stop)
        return vals, ind, ptr - lo

    def _rows_checked(self, start: int, stop: int) -> bool:
        return self._checked_rows is not None and self._checked_rows.covers(start, stop)

    def check_indices(self, indices: np.ndarray, ptr: np.ndarray, first_row: int) -> None:
        """:func:`check_column_indices` for rows ``[first_row, first_row + len(ptr) - 1)``
        read through this handle (``ptr``: their pointers into the store), done once per
        handle where the manifest vouches that the rows' chunks cannot change."""
        stop = first_row + len(ptr) - 1
        if self._rows_checked(first_row, stop):
            return
        check_column_indices(indices, ptr, self.n_cols, self.path, first_row,
                             chunk=int(self._indices.chunks[0]))
        if self._checked_rows is not None:
            self._checked_rows.add(first_row, stop)

    @functools.cached_property
    def _read_pool(self) -> BufferPool:
        """Recycled memory for whole-range reads: chunk temporaries and results come back
        once unused, and at most a few chunks' worth stays idle between reads."""
        return BufferPool(max_free=8, max_idle_bytes=64 * 2**20)

    @functools.cached_property
    def _direct(self) -> bool:
        """Whether ``data`` and ``indices`` chunks are decoded by sparsestore itself."""
        return ChunkDecoder(self._data).is_direct and ChunkDecoder(self._indices).is_direct

    def read_dense(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of a dense store."""
        return read_slice(self._X, start, stop, name=DENSE_ARRAY)

    def _rows_contiguous(self, start: int, stop: int) -> Any:
        if self.is_dense:
            return self.read_dense(start, stop)
        vals, ind, ptr = self.read_parts(start, stop)
        return sp.csr_matrix((vals, ind, ptr), shape=(stop - start, self.n_cols))

    def take_parts(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Compact CSR parts of sorted, unique, validated ``rows`` (each chunk decoded once)."""
        pos = np.union1d(rows, rows + 1)
        ptr_vals = read_ranges(self._indptr, pos, pos + 1, name="indptr").astype(np.int64)
        lo = ptr_vals[np.searchsorted(pos, rows)]
        hi = ptr_vals[np.searchsorted(pos, rows + 1)]
        check_row_pointers(np.stack([lo, hi], 1).ravel(), self._nnz, self.path,
                           row_of=np.repeat(rows, 2))
        vals = read_ranges(self._data, lo, hi, name="data")
        ind = read_ranges(self._indices, lo, hi, name="indices")
        ptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(hi - lo, out=ptr[1:])
        check_column_indices(ind, ptr, self.n_cols, self.path, row_of=rows)
        return vals, ind, ptr

    def _rows_take(self, rows: np.ndarray) -> Any:
        if rows.size == 0:
            return self._rows_contiguous(0, 0)
        uniq, inverse = np.unique(rows, return_inverse=True)
        if self.is_dense:
            block = read_rows(self._X, uniq, name=DENSE_ARRAY)
        else:
            vals, ind, ptr = self.take_parts(uniq)
            block = sp.csr_matrix((vals, ind, ptr), shape=(uniq.size, self.n_cols))
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return block
        return block[inverse]

    def __getitem__(self, key: Any) -> Any:
        rows, cols = split_key(key)
        sel = normalize_rows(rows, self.n_rows)
        if isinstance(sel, (int, np.integer)):
            out = self._rows_contiguous(int(sel), int(sel) + 1)
        elif isinstance(sel, slice):
            start, stop, step = sel.indices(self.n_rows)
            if step == 1:
                out = self._rows_contiguous(start, max(start, stop))
            else:
                out = self._rows_take(np.arange(start, stop, step, dtype=np.int64))
        else:
            out = self._rows_take(sel)
        if cols is not None:
            out = self._select_cols(out, cols)
        return out

    def _select_cols(self, block: Any, cols: Any) -> Any:
        csel = normalize_rows(cols, self.n_cols, axis="column")
        if isinstance(csel, (int, np.integer)):
            csel = np.array([int(csel)])
        if self.is_dense:
            return block[:, csel]
        out = sp.csr_matrix(block[:, csel])
        out.sort_indices()
        return out

    def to_scipy(self) -> sp.csr_matrix:
        """The whole matrix in memory (only for matrices that fit)."""
        return self[:]

    def __iter__(self) -> Iterator[Any]:
        raise TypeError(
            "iterating a store row by row is slow; use store[a:b] or sparsestore.DataLoader"
        )

    def to_dask(self, chunk_rows: int | None = None) -> Any:
        """A lazy dask array of row blocks (scipy CSR chunks); see :mod:`sparsestore.dask`."""
        from .dask import to_dask

        return to_dask(self, chunk_rows=chunk_rows)

    # ---------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        """Shape, nnz, density, dtype, chunking, stored and raw bytes, compression ratio."""
        n, m = self.shape
        stored = 0
        raw = 0
        chunks: dict[str, Any] = {}
        for name, arr in self.arrays.items():
            stored += _nbytes_stored(arr)
            chunks[name] = list(arr.chunks)
        if self.is_dense:
            raw += n * m * self.dtype.itemsize
        else:
            raw += self.nnz * (self.dtype.itemsize + np.dtype(self._indices.dtype).itemsize)
            raw += (n + 1) * np.dtype(self._indptr.dtype).itemsize
        labels = {}
        for name, lab in self.labels.items():
            stored += _nbytes_stored(lab.array)
            raw += int(np.prod(lab.shape)) * lab.dtype.itemsize
            labels[name] = {"dtype": str(lab.dtype), "shape": list(lab.shape)}
        cells = n * m
        return {
            "path": self.path,
            "format": self.format,
            "shape": [n, m],
            "nnz": self.nnz,
            "density": (self.nnz / cells) if cells else 0.0,
            "dtype": str(self.dtype),
            "chunks": chunks,
            "layout": self._meta.layout,
            "bytes_stored": stored,
            "bytes_uncompressed": raw,
            "compression_ratio": (raw / stored) if stored else float("nan"),
            "labels": labels,
        }

    def __repr__(self) -> str:
        n, m = self.shape
        cells = n * m
        dens = f"{self.nnz / cells:.3g}" if cells else "0"
        labs = f", labels={list(self.labels)}" if len(self.labels) else ""
        kind = "dense" if self.is_dense else f"nnz={self.nnz}, density={dens}"
        return (
            f"<SparseStore {self.path!r} shape={n}x{m} {kind}, dtype={self.dtype}{labs}, "
            f"mode={self.mode!r}>"
        )

    # --------------------------------------------------------------- writing
    @property
    def appender(self) -> Appender:
        """The :class:`~sparsestore.appender.Appender` that writes this handle's rows
        (internal: :mod:`sparsestore.writer` builds stores through it); a read-only handle
        has none and raises :class:`~sparsestore.errors.ReadOnlyError`."""
        if self._appender is None:
            raise ReadOnlyError(
                f"{self.path} is open read-only; open it with sparsestore.open(path, mode='r+') "
                "to append"
            )
        return self._appender

    @os_errors("append to")
    def append(
        self, X: Any, labels: Mapping[str, Any] | None = None, casting: str = "safe"
    ) -> SparseStore:
        """Append rows (any scipy sparse or 2-D array) and their labels, atomically.

        Either every row lands (and is visible after the call), or none does.
        ``casting="safe"`` takes only dtypes the store's holds by type; ``"same_value"``
        any values it holds exactly (floats may round), ``"unsafe"`` numpy's cast.
        """
        self.appender.append(X, labels, casting=casting)
        return self

    # --------------------------------------------------------------- closing
    def close(self) -> None:
        """Release the write lock (a no-op for read-only stores)."""
        appender = getattr(self, "_appender", None)  # None too if __init__ failed
        if appender is not None:
            appender.close()

    def __enter__(self) -> SparseStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:  # noqa: SIM105 - at interpreter exit contextlib may already be gone
            self.close()
        except Exception:  # a finaliser must not raise
            pass

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickle by reference: workers reopen the store from its path (read-only) at the
        # commit this handle sees (its attrs: shape, generation, manifest), as this handle
        # would read it: later appends are not seen, a replaced or restored store raises.
        return (reopen_at, (self.path, self.storage_options, self._attrs))




def _nbytes_stored(arr: Any) -> int:
    try:
        return int(arr.nbytes_stored())
    except Exception:  # pragma: no cover - stores that cannot list
        return 0


# ------------------------------------------------------------------ public API

def open_group(path: str, mode: str = "r", storage_options: dict[str, Any] | None = None) -> Any:
    """The zarr group of the store at normalized ``path``: the one check that a path holds
    a store, for :func:`open` and :func:`~sparsestore.validate.validate_store` alike.

    On object storage the metadata a handle loads is requested at once, in two round
    trips (:func:`~sparsestore.storage.preload_metadata`), and served from memory until
    :func:`loaded` is called on the group."""
    remote = storage.is_remote(path)
    if not remote and not storage.exists(path, storage_options):
        raise_missing(path)
    if not remote and not os.path.isdir(path):
        raise NotAStoreError(
            f"{path} is a file, not a store directory; to import it use sparsestore.convert"
        )
    try:
        return storage.open_group(path, mode=mode, storage_options=storage_options,
                                  children=metadata_keys if remote else None)
    except StoreNotFoundError:
        raise_missing(path)
        raise
    except SparseStoreError:
        raise
    except Exception as exc:
        known = translate(exc, "open", path)  # e.g. no credentials for object storage
        if known is not exc:
            raise known from exc
        raise NotAStoreError(f"{path} is not a zarr group ({type(exc).__name__}: {exc})") from exc


@os_errors("open")
def open(
    path: str | os.PathLike[str],
    mode: str = "r",
    storage_options: dict[str, Any] | None = None,
    *,
    _pinned: Mapping[str, Any] | None = None,
) -> SparseStore:
    """Open a store: ``mode="r"`` read-only, ``"r+"`` to append (takes the write lock).

    Reads stores written by sparsestore and CSR groups written by anndata (zarr v2 or v3).
    ``storage_options`` go to fsspec for a URL (``s3://``: s3fs's ``key``, ``secret``,
    ``endpoint_url``...; see the README's "Object storage").
    """
    if mode not in ("r", "r+"):
        raise InvalidInputError(f"mode must be 'r' or 'r+', got {mode!r}")
    p = storage.normalize(path)
    group = open_group(p, mode, storage_options)
    lock = storage.WriteLock(p).acquire() if mode == "r+" else None
    try:
        try:
            store = SparseStore(
                group, path=p, mode=mode, storage_options=storage_options, lock=lock,
                pinned=_pinned,
            )
        except SparseStoreError:
            raise
        except Exception as exc:  # zarr refusing damaged array metadata, unknown codecs...
            raise CorruptStoreError(
                f"{p}: the store's metadata cannot be read ({type(exc).__name__}: {exc}); "
                "it is damaged or was not written by sparsestore/anndata"
            ) from exc
        if not store._meta.complete:
            raise CorruptStoreError(
                f"{p} is an incomplete store (its save was interrupted); delete it and save again"
            )
        if mode == "r+":
            store.appender.recover()  # what a killed writer left past the commit
        elif not store.verified:
            _warn_unverified(store)
        return store
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def loaded(group: Any) -> None:
    """A handle on ``group`` has loaded: its store reads metadata from storage again
    (see :func:`open_group`)."""
    forget = getattr(group.store, "forget_preloaded", None)
    if forget is not None:
        forget()


def _warn_unverified(store: SparseStore) -> None:
    """Say, once per open, that this store's chunks are not checked, and how to fix it."""
    p = store.path
    if META_KEY in store.group.attrs:
        fix = f"run `sparsestore upgrade {p}` (sparsestore.upgrade) once to add one"
    else:
        fix = (f"copy it into a store that has one with `sparsestore convert {p} NEW` "
               "(`sparsestore upgrade` adds one only to stores an older sparsestore wrote)")
    warnings.warn(
        f"{p} has no chunk manifest (written by an older sparsestore, or by anndata): its "
        "chunks are not checked, so a missing, moved or replaced chunk reads as valid data; "
        + fix, UnverifiedStoreWarning, stacklevel=4,
    )


def reopen_at(
    path: str, storage_options: dict[str, Any] | None, attrs: Mapping[str, Any]
) -> SparseStore:
    """Open ``path`` read-only at the commit described by ``attrs`` (how handles unpickle)."""
    return open(path, "r", storage_options, _pinned=attrs)


def raise_missing(path: str) -> None:
    """Raise :class:`StoreNotFoundError` for ``path``, saying how to make a store."""
    raise StoreNotFoundError(
        f"no store at {path}; check the path or create one with sparsestore.save"
    )

