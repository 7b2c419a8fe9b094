"""SparseStore: a CSR (or dense) matrix in a zarr group, opened like an array.

This module is the read side: :func:`open` checks a store's metadata and arrays
(:mod:`sparsestore.layout` owns the on-disk rules) and :class:`SparseStore` serves its
committed rows.  Writing lives beside it: an ``"r+"`` handle holds an
:class:`~sparsestore.appender.Appender` (lock, recovery, commit), which
:meth:`SparseStore.append` hands its work to; new stores are built by
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
from .checks import CheckedRows, check_chunk_size, check_column_indices, check_row_pointers
from .chunks import ChunkCache, ChunkDecoder, read_ranges, read_rows, read_slice
from .errors import (
    CorruptStoreError,
    InvalidInputError,
    NotAStoreError,
    ReadOnlyError,
    SparseStoreError,
    StoreChangedError,
    StoreNotFoundError,
    UnverifiedStoreWarning,
)
from .indexing import normalize_rows, split_key
from .integrity import Manifest, went_back
from .labels import LabelArray, Labels
from .layout import (
    DENSE_ARRAY,
    FIRST_MANIFEST_VERSION,
    LABELS_GROUP,
    META_KEY,
    Layout,
    Meta,
    check_codecs,
    check_csr_arrays,
    check_dim,
    check_stored_dtype,
    read_meta,
)
from .oserrors import os_errors
from .verified import VerifiedStore


class SparseStore:
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
    ) -> None:
        self._group = group
        self.path = path
        self.mode = mode
        self.storage_options = storage_options
        self._load()
        # The writing half of an "r+" handle: the lock, recovery, the arrays being written.
        self._appender = Appender(self, lock) if mode == "r+" else None

    # ------------------------------------------------------------------ state
    def _load(self, pinned: Mapping[str, Any] | None = None) -> None:
        """Read the committed state: header, matrix arrays (checked), labels.

        ``pinned``: the committed attrs of an earlier handle (see :meth:`__reduce__`), served
        instead of the latest commit when the store on disk still holds them.
        """
        attrs, meta = self._read_header(pinned)
        if meta.format == "csr":
            self._load_csr(meta, attrs)
        else:
            self._load_dense(meta, attrs)
        self._labels = self._load_labels(meta)
        # Rows whose column indices passed the check; only where the manifest keeps the
        # chunks from changing under this handle.
        self._checked_rows = CheckedRows() if self._manifest is not None else None

    def _read_header(
        self, pinned: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Any], Meta]:
        """The group's attrs and metadata, checked; sets format, shape and layout.

        An AnnData root serves its X matrix (read-only; obs columns via convert).
        """
        g = self._group
        attrs = dict(g.attrs)
        meta = read_meta(attrs, self.path)
        enc = attrs.get("encoding-type")
        if enc == "anndata" and "X" in g:
            self._group = g = g["X"]
            attrs = dict(g.attrs)
            meta = read_meta(attrs, self.path)
            enc = attrs.get("encoding-type")
        if META_KEY not in attrs and LABELS_GROUP in g:
            raise CorruptStoreError(
                f"{self.path}: attrs[{META_KEY!r}] is missing from zarr.json, yet the group "
                "holds sparsestore labels: its format, manifest and label list were deleted, "
                "so nothing read from it could be checked; restore zarr.json from a copy"
            )
        if pinned is not None:
            attrs = self._check_pinned(meta, attrs, dict(pinned))
            meta = read_meta(attrs, self.path)
            enc = attrs.get("encoding-type")
        self._attrs = attrs
        if enc == "csr_matrix":
            meta.format = "csr"
        elif meta.format == "dense" and META_KEY in attrs:
            pass
        elif enc is not None:
            raise NotAStoreError(
                f"{self.path} holds an anndata {enc!r} element, not a CSR matrix; convert it "
                "with sparsestore.convert(src, dst)"
            )
        else:
            raise NotAStoreError(
                f"{self.path} is a zarr group without a csr_matrix encoding; it is not a "
                "sparsestore store"
            )
        self._meta = meta
        shape = attrs.get("shape")
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2):
            raise CorruptStoreError(
                f"{self.path}: attrs['shape'] must be [n_rows, n_cols], got {shape!r}"
            )
        try:
            n_rows, n_cols = check_dim(shape[0], "n_rows"), check_dim(shape[1], "n_cols")
        except InvalidInputError as exc:
            raise CorruptStoreError(f"{self.path}: bad attrs['shape']: {exc}") from None
        self._shape = (n_rows, n_cols)
        try:
            self.layout = Layout.from_options(**meta.layout) if meta.layout else None
        except (InvalidInputError, TypeError) as exc:
            raise CorruptStoreError(f"{self.path}: bad layout in attrs: {exc}") from None
        return attrs, meta

    def _load_csr(self, meta: Meta, attrs: Mapping[str, Any]) -> None:
        """Open data/indices/indptr and check them against the shape, nnz and manifest."""
        g, (n_rows, n_cols) = self._group, self._shape
        for name in ("data", "indices", "indptr"):
            if name not in g:
                raise CorruptStoreError(f"{self.path}: CSR group has no {name!r} array")
        self._data, self._indices, self._indptr = g["data"], g["indices"], g["indptr"]
        check_csr_arrays(self._data, self._indices, self._indptr, self.path)
        if self._indptr.shape[0] < n_rows + 1:
            raise CorruptStoreError(
                f"{self.path}: indptr has {self._indptr.shape[0]} entries but shape says "
                f"{n_rows} rows (needs {n_rows + 1})"
            )
        self._install_manifest(g, meta, attrs, n_cols, {
            "data": (self._data, meta.committed_nnz), "indices": (
                self._indices, meta.committed_nnz), "indptr": (self._indptr, n_rows + 1),
        })
        end = read_slice(self._indptr, n_rows, n_rows + 1, name="indptr")
        self._nnz = int(end[0])
        if not 0 <= self._nnz <= min(self._data.shape[0], self._indices.shape[0]):
            raise CorruptStoreError(
                f"{self.path}: indptr[-1]={self._nnz} but data holds "
                f"{self._data.shape[0]} and indices {self._indices.shape[0]} values"
            )
        first = int(read_slice(self._indptr, 0, 1, name="indptr")[0])
        if first != 0:
            raise CorruptStoreError(f"{self.path}: indptr[0]={first}, must be 0")
        if META_KEY in attrs and meta.committed_nnz != self._nnz:
            raise CorruptStoreError(
                f"{self.path}: indptr[{n_rows}]={self._nnz} but the last commit recorded "
                f"nnz={meta.committed_nnz}; the store was modified outside sparsestore"
            )
        self._dtype = np.dtype(self._data.dtype)

    def _load_dense(self, meta: Meta, attrs: Mapping[str, Any]) -> None:
        """Open X and check it against the shape and manifest."""
        g, (n_rows, n_cols) = self._group, self._shape
        if DENSE_ARRAY not in g:
            raise CorruptStoreError(f"{self.path}: dense store has no {DENSE_ARRAY!r} array")
        self._X = g[DENSE_ARRAY]
        check_stored_dtype(self._X.dtype, DENSE_ARRAY, self.path)
        check_codecs(self._X, DENSE_ARRAY, self.path)
        check_chunk_size(self._X, DENSE_ARRAY, self.path)
        if self._X.ndim != 2 or self._X.shape[0] < n_rows or self._X.shape[1] != n_cols:
            raise CorruptStoreError(
                f"{self.path}: X has shape {self._X.shape}, attrs say {attrs.get('shape')}"
            )
        self._install_manifest(g, meta, attrs, n_cols, {DENSE_ARRAY: (self._X, n_rows)})
        self._nnz = n_rows * n_cols
        self._dtype = np.dtype(self._X.dtype)

    def _load_labels(self, meta: Meta) -> Labels:
        """The committed label arrays listed in the metadata, each checked."""
        g, n_rows = self._group, self._shape[0]
        arrays: dict[str, LabelArray] = {}
        if meta.labels:
            if LABELS_GROUP not in g:
                raise CorruptStoreError(
                    f"{self.path}: labels {meta.labels} listed but no labels group"
                )
            lg = g[LABELS_GROUP]
            for name in meta.labels:
                if not hasattr(lg, "arrays") or name not in lg:
                    raise CorruptStoreError(f"{self.path}: label {name!r} is listed but missing")
                arr = lg[name]
                if not hasattr(arr, "dtype") or arr.ndim < 1:
                    raise CorruptStoreError(f"{self.path}: label {name!r} is not an array")
                check_stored_dtype(arr.dtype, f"labels/{name}", self.path)
                check_codecs(arr, f"labels/{name}", self.path)
                if arr.shape[0] < n_rows:
                    raise CorruptStoreError(
                        f"{self.path}: label {name!r} has {arr.shape[0]} rows, store has {n_rows}"
                    )
                arrays[name] = LabelArray(arr, name, n_rows)
        return Labels(arrays)

    def _install_manifest(
        self, g: Any, meta: Meta, attrs: Mapping[str, Any], n_cols: int,
        arrays: dict[str, tuple[Any, int]],
    ) -> None:
        """Check the arrays against the committed manifest (metadata fingerprints, lengths)
        and have every later chunk read checked against it."""
        self._manifest: Manifest | None = None
        if meta.labels and LABELS_GROUP in g and hasattr(g[LABELS_GROUP], "arrays"):
            lg = g[LABELS_GROUP]
            for name in meta.labels:
                if name in lg and hasattr(lg[name], "dtype"):
                    arrays[f"{LABELS_GROUP}/{name}"] = (lg[name], self._shape[0])
        for name, (arr, _) in arrays.items():
            check_chunk_size(arr, name, self.path)
        if META_KEY in attrs and meta.format_version >= FIRST_MANIFEST_VERSION:
            if not meta.manifest:
                raise CorruptStoreError(
                    f"{self.path}: the store has no chunk manifest, which its format version "
                    f"{meta.format_version} requires; restore it from a copy"
                )
            man = Manifest.from_json(meta.manifest, self.path)
            if man.n_cols != n_cols:
                raise CorruptStoreError(
                    f"{self.path}: attrs['shape'] says {n_cols} columns but the store was "
                    f"committed with {man.n_cols}; its zarr.json was edited"
                )
            if man.generation != meta.generation:
                raise CorruptStoreError(f"{self.path}: the chunk manifest is from another store")
            expected = set(arrays) | {f"{LABELS_GROUP}/{n}" for n in meta.labels}
            if set(man.arrays) != expected:
                raise CorruptStoreError(
                    f"{self.path}: the store's arrays {sorted(expected)} are not the committed "
                    f"ones {sorted(man.arrays)}; it was modified outside sparsestore"
                )
            man.bind({k: a for k, (a, _) in arrays.items()}, self.path)
            for name, (_, length) in arrays.items():
                if man.arrays[name].length != length:
                    raise CorruptStoreError(
                        f"{self.path}: array {name!r} has {length} entries by the store's "
                        f"attrs, but the last commit recorded {man.arrays[name].length}; the "
                        "store was modified outside sparsestore"
                    )
            self._manifest = man
        store = g.store
        if isinstance(store, VerifiedStore):
            store.install(self._manifest, g.path)

    def _check_pinned(
        self, meta: Meta, attrs: dict[str, Any], pinned: dict[str, Any]
    ) -> dict[str, Any]:
        """``pinned`` (an earlier handle's committed attrs), if the commit on disk
        (``attrs``) can have followed it by appends; else :class:`StoreChangedError`.

        The rows are then checked against the pinned manifest as the earlier handle's were.
        """
        then = read_meta(pinned, self.path)
        since = "this handle was pickled"
        if then.generation != meta.generation:
            raise StoreChangedError(
                f"{self.path} was replaced by another store since this handle was pickled; "
                "open it again (sparsestore.open) to read the new one"
            )
        if pinned == attrs:
            return attrs
        if then.manifest:
            now = Manifest.from_json(meta.manifest, self.path) if meta.manifest else None
            if now is None or not now.follows(Manifest.from_json(then.manifest, self.path)):
                raise went_back(self.path, since)
        else:  # no manifest to compare (older or anndata stores): only the row count
            shape, old = attrs.get("shape"), pinned.get("shape")
            if not (isinstance(shape, list) and isinstance(old, list) and shape[0] >= old[0]):
                raise went_back(self.path, since)
        return pinned

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
            self._group = storage.open_group(
                self.path, mode="r", storage_options=self.storage_options
            )
        self._load()
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
            caches = (ChunkCache(self._data, 2, "data", pool),
                      ChunkCache(self._indices, 2, "indices", pool))
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
        edges = [lo, *range((lo // c + 1) * c, hi, c), hi]
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
    a store, for :func:`open` and :func:`~sparsestore.validate.validate_store` alike."""
    if not storage.exists(path, storage_options):
        raise_missing(path)
    if not storage.is_remote(path) and not os.path.isdir(path):
        raise NotAStoreError(
            f"{path} is a file, not a store directory; to import it use sparsestore.convert"
        )
    try:
        return storage.open_group(path, mode=mode, storage_options=storage_options)
    except SparseStoreError:
        raise
    except Exception as exc:
        raise NotAStoreError(f"{path} is not a zarr group ({type(exc).__name__}: {exc})") from exc


@os_errors("open")
def open(
    path: str | os.PathLike[str],
    mode: str = "r",
    storage_options: dict[str, Any] | None = None,
) -> SparseStore:
    """Open a store: ``mode="r"`` read-only, ``"r+"`` to append (takes the write lock).

    Reads stores written by sparsestore and CSR groups written by anndata (zarr v2 or v3).
    """
    if mode not in ("r", "r+"):
        raise InvalidInputError(f"mode must be 'r' or 'r+', got {mode!r}")
    p = storage.normalize(path)
    group = open_group(p, mode, storage_options)
    lock = storage.WriteLock(p).acquire() if mode == "r+" else None
    try:
        try:
            store = SparseStore(
                group, path=p, mode=mode, storage_options=storage_options, lock=lock
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
    store = open(path, "r", storage_options)
    store._load(pinned=attrs)
    return store


def raise_missing(path: str) -> None:
    """Raise :class:`StoreNotFoundError` for ``path``, saying how to make a store."""
    raise StoreNotFoundError(
        f"no store at {path}; check the path or create one with sparsestore.save"
    )

