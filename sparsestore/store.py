"""SparseStore: a CSR (or dense) matrix in a zarr group, opened like an array.

Write path: every writer (``save``, ``append``, ``convert``) streams row blocks through
:meth:`SparseStore._append_blocks`, which writes ``data``/``indices``, then ``indptr`` and
labels, and commits by rewriting the group attrs (``shape``) last, in one atomic metadata
write.  Anything beyond the committed ``shape[0]`` rows is invisible to readers and is
truncated by the next writer, so a crash never exposes or loses a committed row.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import storage
from .canonical import canonical_block, check_nan_policy, check_sparse_input
from .chunks import ChunkCache, ChunkEncoder, read_ranges, read_rows, read_slice
from .errors import (
    CorruptStoreError,
    DTypeError,
    InvalidInputError,
    LabelError,
    NeedsUpgradeError,
    NotAStoreError,
    ReadOnlyError,
    ShapeMismatchError,
    SparseStoreError,
)
from .indexing import normalize_rows, split_key
from .integrity import (
    Manifest,
    VerifiedStore,
    build_manifest,
    check_chunk_size,
    check_row_pointers,
    new_generation,
)
from .labels import LabelArray, Labels
from .layout import (
    CSR_ENCODING,
    DENSE_ARRAY,
    DENSE_ENCODING,
    FIRST_MANIFEST_VERSION,
    FORMAT_VERSION,
    LABELS_GROUP,
    META_KEY,
    Layout,
    Meta,
    check_dim,
    check_label_dtype,
    check_matrix_dtype,
    check_value_dtype,
    index_dtype,
)
from .oserrors import os_errors

# (values, indices, local indptr) for CSR stores, or a dense ndarray; plus label rows.
Parts = tuple[np.ndarray, np.ndarray, np.ndarray] | np.ndarray
LabelBlock = Mapping[str, np.ndarray] | None


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
        self._lock = lock
        self._load()

    # ------------------------------------------------------------------ state
    def _load(self) -> None:
        g = self._group
        attrs = dict(g.attrs)
        meta = _read_meta(attrs, self.path)
        enc = attrs.get("encoding-type")
        if enc == "anndata" and "X" in g:
            # An AnnData root: serve its X matrix (read-only; obs columns via convert).
            self._group = g = g["X"]
            attrs = dict(g.attrs)
            meta = _read_meta(attrs, self.path)
            enc = attrs.get("encoding-type")
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
        if meta.format == "csr":
            for name in ("data", "indices", "indptr"):
                if name not in g:
                    raise CorruptStoreError(f"{self.path}: CSR group has no {name!r} array")
            self._data, self._indices, self._indptr = g["data"], g["indices"], g["indptr"]
            _check_csr_arrays(self._data, self._indices, self._indptr, self.path)
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
        else:
            if DENSE_ARRAY not in g:
                raise CorruptStoreError(f"{self.path}: dense store has no {DENSE_ARRAY!r} array")
            self._X = g[DENSE_ARRAY]
            _check_stored_dtype(self._X.dtype, DENSE_ARRAY, self.path)
            check_codecs(self._X, DENSE_ARRAY, self.path)
            check_chunk_size(self._X, DENSE_ARRAY, self.path)
            if self._X.ndim != 2 or self._X.shape[0] < n_rows or self._X.shape[1] != n_cols:
                raise CorruptStoreError(
                    f"{self.path}: X has shape {self._X.shape}, attrs say {shape}"
                )
            self._install_manifest(g, meta, attrs, n_cols, {DENSE_ARRAY: (self._X, n_rows)})
            self._nnz = n_rows * n_cols
            self._dtype = np.dtype(self._X.dtype)
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
                _check_stored_dtype(arr.dtype, f"labels/{name}", self.path)
                check_codecs(arr, f"labels/{name}", self.path)
                if arr.shape[0] < n_rows:
                    raise CorruptStoreError(
                        f"{self.path}: label {name!r} has {arr.shape[0]} rows, store has {n_rows}"
                    )
                arrays[name] = LabelArray(arr, name, n_rows)
        self._labels = Labels(arrays)

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

    @property
    def generation(self) -> str:
        """Id of this save of the store (empty for stores written before it existed)."""
        return self._meta.generation

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
        if caches is None:
            vals = read_slice(self._data, lo, hi, name="data")
            ind = read_slice(self._indices, lo, hi, name="indices")
        else:
            vals = caches[0].read(lo, hi, self._nnz)
            ind = caches[1].read(lo, hi, self._nnz)
        return vals, ind, ptr - lo

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
        csel = normalize_rows(cols, self.n_cols)
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
            stored += _nbytes_stored(lab._arr)
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
    def _check_writable(self) -> None:
        if self.mode == "r":
            raise ReadOnlyError(
                f"{self.path} is open read-only; open it with sparsestore.open(path, mode='r+') "
                "to append"
            )

    @os_errors("append to")
    def append(self, X: Any, labels: Mapping[str, Any] | None = None) -> SparseStore:
        """Append rows (any scipy sparse or 2-D array) and their labels, atomically.

        Either every row lands (and is visible after the call), or none does.
        """
        self._check_writable()
        from .ingest import matrix_shape, row_blocks

        X = _as_input(X)
        n_new, n_cols = matrix_shape(X)
        check_dim(n_new, "n_rows")
        check_dim(self.n_rows + n_new, "n_rows after the append")
        if n_cols != self.n_cols:
            raise ShapeMismatchError(
                f"cannot append a block with {n_cols} columns to a store with {self.n_cols}"
            )
        src = getattr(X, "dtype", None)
        if src is None:
            src = np.asarray(X).dtype
        self._check_append_dtype(np.dtype(src), sparse_input=sp.issparse(X))
        full_labels = self._check_labels(labels, n_new, creating=self.n_rows == 0)
        self._append_blocks(
            (block, _slice_labels(full_labels, a, b)) for a, b, block in row_blocks(X)
        )
        return self

    def _check_append_dtype(self, src: np.dtype, *, sparse_input: bool = False) -> None:
        # Sparse input is held in scipy.sparse, which refuses float16 (as save does).
        check_matrix_dtype(src, sparse=sparse_input)
        if not np.can_cast(src, self.dtype, casting="safe"):
            raise DTypeError(
                f"cannot append {src} values to a {self.dtype} store without losing "
                f"information; convert first with X.astype(np.{self.dtype.name})"
            )

    def _check_labels(
        self, labels: Mapping[str, Any] | None, n_new: int, *, creating: bool
    ) -> dict[str, np.ndarray]:
        known = list(self.labels)
        if labels is None:
            if known:
                raise LabelError(
                    f"this store has labels {known}; pass labels={{name: array}} for the new rows"
                )
            return {}
        if not isinstance(labels, Mapping):
            raise LabelError("labels must be a mapping of name -> array with one entry per row")
        out: dict[str, np.ndarray] = {}
        for name, value in labels.items():
            _check_label_name(name)
            arr = _as_label_array(value)
            if arr.ndim == 0 or arr.shape[0] != n_new:
                raise ShapeMismatchError(
                    f"label {name!r} has {0 if arr.ndim == 0 else arr.shape[0]} entries but there "
                    f"are {n_new} rows; labels need one entry per row"
                )
            check_label_dtype(arr.dtype, name)
            if name in self.labels:
                have = self.labels[name]
                if tuple(arr.shape[1:]) != tuple(have.shape[1:]):
                    raise ShapeMismatchError(
                        f"label {name!r} rows have shape {arr.shape[1:]}, the store's have "
                        f"{have.shape[1:]}"
                    )
                if not np.can_cast(arr.dtype, have.dtype, casting="safe"):
                    raise DTypeError(
                        f"label {name!r}: cannot store {arr.dtype} in a {have.dtype} label "
                        "without losing information"
                    )
            out[name] = arr
        if known and set(out) != set(known):
            raise LabelError(
                f"labels must match the store's labels {sorted(known)} exactly; got {sorted(out)}"
            )
        if not known and out and not creating:
            raise LabelError(
                "this store has rows but no labels; labels can only be defined on an empty store"
            )
        return out

    def _ensure_label_arrays(self, first: LabelBlock) -> None:
        if not first or len(self.labels):
            return
        layout = self.layout or Layout()
        lg = self._group.require_group(LABELS_GROUP)
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
        self._pending_labels = list(first)
        self._labels = Labels({n: LabelArray(lg[n], n, 0) for n in first})

    def _label_arrays(self) -> dict[str, Any]:
        return {name: lab._arr for name, lab in self.labels.items()}

    def _append_blocks(
        self, blocks: Iterable[tuple[Any, LabelBlock]], progress: Any = None,
        encode_thread: bool = False,
    ) -> None:
        """Write row blocks, then commit them all at once; roll back on any error.

        ``encode_thread``: compress full chunks on a thread of their own (for sources that
        decode on other threads, so the writer's thread is the one everything waits for).
        """
        self._check_writable()
        n0, nnz0 = self.n_rows, self.nnz
        n, nnz = n0, nnz0
        meta_labels = list(self._meta.labels)
        self._pending_labels = meta_labels
        ex = ThreadPoolExecutor(1, thread_name_prefix="sparsestore-encode") \
            if encode_thread and not self.is_dense else None
        appenders = [] if self.is_dense else [
            _WholeChunks(self._data, nnz0, ex), _WholeChunks(self._indices, nnz0, ex),
            _WholeChunks(self._indptr, n0 + 1, ex),
        ]
        try:
            for block, labs in blocks:
                if labs and not len(self.labels):
                    self._ensure_label_arrays(labs)
                if self.is_dense:
                    arr = _dense_block(block, self.n_cols, self.dtype)
                    if self._meta.nan_policy == "raise":
                        _check_dense_finite(arr, n)
                    m = arr.shape[0]
                    if m:
                        self._X.resize((n + m, self.n_cols))
                        _writable(self._X)[n : n + m] = arr
                    k = m * self.n_cols
                else:
                    vals, ind, ptr = canonical_block(
                        block, self.n_cols, dtype=self.dtype, keep_zeros=self._meta.keep_zeros,
                        nan_policy=self._meta.nan_policy, first_row=n,
                    )
                    m, k = ptr.size - 1, vals.size
                    appenders[0].add(vals)
                    appenders[1].add(ind)
                    appenders[2].add(ptr[1:] + nnz)
                for name, arr in self._label_arrays().items():
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
            self._commit(n, nnz, self._pending_labels)
        except BaseException:
            for app in appenders:  # no chunk may land after the rollback
                with contextlib.suppress(Exception):
                    app.wait()
            with contextlib.suppress(Exception):
                self._truncate(n0, nnz0)
                self._load()
            raise
        finally:
            if ex is not None:
                ex.shutdown(wait=True)

    def _commit(
        self, n_rows: int, nnz: int, labels: list[str], *, complete: bool = True,
        scan: bool = False,
    ) -> None:
        """Publish rows ``[0, n_rows)`` with their manifest in one metadata write.

        ``scan``: take the tags of chunks this writer did not write from storage (only
        :func:`upgrade` does, after checking every chunk).
        """
        meta = Meta.from_json(self._meta.to_json())
        meta.generation = meta.generation or new_generation()
        meta.labels = list(labels)
        meta.committed_nnz = nnz if not self.is_dense else 0
        meta.complete = complete
        meta.format_version = FORMAT_VERSION
        if self.is_dense:
            lengths = {DENSE_ARRAY: (self._X, n_rows)}
        else:
            lengths = {"data": (self._data, nnz), "indices": (self._indices, nnz),
                       "indptr": (self._indptr, n_rows + 1)}
        for name, arr in self._label_arrays().items():
            if name in labels:
                lengths[f"{LABELS_GROUP}/{name}"] = (arr, n_rows)
        meta.manifest = build_manifest(
            lengths, self._group.store, generation=meta.generation, n_cols=self.n_cols,
            old=self._manifest, scan=scan,
        ).to_json()
        attrs = {"shape": [n_rows, self.n_cols], META_KEY: meta.to_json()}
        # One metadata write: zarr's attrs.update() writes zarr.json once per key, and a
        # kill between those writes would commit a shape without its nnz.
        self._group.update_attributes(attrs)
        self._load()
        with contextlib.suppress(AttributeError):  # the manifest now holds every tag written
            self._group.store.written.clear()

    def _truncate(self, n_rows: int, nnz: int) -> None:
        """Drop anything written past the committed rows (after a failure or a crash)."""
        storage.settle()
        if self.is_dense:
            storage.shrink(self._X, n_rows)
        else:
            for arr in (self._data, self._indices):
                storage.shrink(arr, nnz)
            storage.shrink(self._indptr, n_rows + 1)
        if LABELS_GROUP in self._group:
            lg = self._group[LABELS_GROUP]
            for name, arr in lg.arrays():
                if name not in self._meta.labels:
                    with contextlib.suppress(Exception):
                        del lg[name]
                else:
                    storage.shrink(arr, n_rows)

    # --------------------------------------------------------------- closing
    def close(self) -> None:
        """Release the write lock (a no-op for read-only stores)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> SparseStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickle by reference: workers reopen the store from its path (read-only).
        return (open, (self.path, "r", self.storage_options))


# ------------------------------------------------------------------ helpers

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


def _read_meta(attrs: Mapping[str, Any], path: str) -> Meta:
    """``attrs["sparsestore"]`` as :class:`Meta`, every field type-checked (data, never code)."""
    raw = attrs.get(META_KEY)
    if raw is None:
        return Meta()
    if not isinstance(raw, dict):
        raise CorruptStoreError(f"{path}: attrs[{META_KEY!r}] must be a mapping, got {raw!r:.80}")
    meta = Meta.from_json(raw)
    fields = (
        ("format", str), ("format_version", int), ("labels", list), ("layout", dict),
        ("committed_nnz", int), ("keep_zeros", bool), ("complete", bool),
        ("generation", str), ("manifest", dict), ("nan_policy", str),
    )
    for fname, typ in fields:
        value = getattr(meta, fname)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise CorruptStoreError(
                f"{path}: attrs[{META_KEY!r}][{fname!r}] should be {typ.__name__}, got "
                f"{value!r:.80}; the store metadata is damaged"
            )
    if meta.format not in ("csr", "dense"):
        raise CorruptStoreError(f"{path}: unknown store format {meta.format!r:.80}")
    if meta.format_version > FORMAT_VERSION or meta.format_version < 1:
        raise CorruptStoreError(
            f"{path}: store format version {meta.format_version} is not supported (this "
            f"sparsestore reads version {FORMAT_VERSION}); upgrade sparsestore"
        )
    if meta.committed_nnz < 0:
        raise CorruptStoreError(f"{path}: negative committed nnz {meta.committed_nnz}")
    for name in meta.labels:
        try:
            _check_label_name(name)
        except LabelError as exc:
            raise CorruptStoreError(f"{path}: bad label name in attrs: {exc}") from None
    return meta


def _check_stored_dtype(dtype: Any, name: str, path: str, kinds: str | None = None) -> None:
    try:
        dt = check_value_dtype(dtype)
    except DTypeError as exc:
        raise CorruptStoreError(f"{path}: array {name!r} has an unsupported dtype: {exc}") from None
    if kinds is not None and dt.kind not in kinds:
        raise CorruptStoreError(f"{path}: array {name!r} must hold integers, has dtype {dt}")


# Codecs a store may name: plain (de)compressors and checksums.  Anything else (a codec
# that unpickles, or one registered by some installed plugin) is refused before any read.
SAFE_CODECS = frozenset({
    "bytes", "blosc", "crc32c", "zstd", "gzip", "transpose", "sharding_indexed",
    "zlib", "lz4", "bz2", "lzma", "crc32", "adler32", "fletcher32", "jenkins_lookup3",
    "shuffle", "delta",
})


def _codec_names(spec: Any) -> list[str]:
    names: list[str] = []
    for c in spec or ():
        if not isinstance(c, dict):
            names.append(repr(c))
            continue
        name = c.get("name", c.get("id"))
        names.append(str(name))
        conf = c.get("configuration") or {}
        if isinstance(conf, dict):
            names += _codec_names(conf.get("codecs")) + _codec_names(conf.get("index_codecs"))
    return names


def check_codecs(arr: Any, name: str, path: str) -> None:
    """Refuse arrays whose metadata names a codec outside :data:`SAFE_CODECS`."""
    try:
        meta = arr.metadata.to_dict()
    except Exception as exc:  # pragma: no cover - unreadable metadata
        raise CorruptStoreError(f"{path}: array {name!r} metadata is unreadable: {exc}") from None
    specs = list(meta.get("codecs") or ()) + list(meta.get("filters") or ())
    if meta.get("compressor"):
        specs.append(meta["compressor"])
    for codec in _codec_names(specs):
        short = codec[len("numcodecs."):] if codec.startswith("numcodecs.") else codec
        if short not in SAFE_CODECS:
            raise CorruptStoreError(
                f"{path}: array {name!r} uses codec {codec!r:.60}, which sparsestore does not "
                "read (allowed: " + ", ".join(sorted(SAFE_CODECS)) + "); re-encode the "
                "store with a trusted tool"
            )


def _check_csr_arrays(data: Any, indices: Any, indptr: Any, path: str) -> None:
    """O(1) checks of the three CSR arrays: kinds, ranks, dtypes and codecs."""
    for name, arr in (("data", data), ("indices", indices), ("indptr", indptr)):
        if not hasattr(arr, "dtype") or arr.ndim != 1:
            raise CorruptStoreError(f"{path}: {name!r} must be a 1-D array")
        check_codecs(arr, name, path)
    _check_stored_dtype(data.dtype, "data", path)
    _check_stored_dtype(indices.dtype, "indices", path, kinds="iu")
    _check_stored_dtype(indptr.dtype, "indptr", path, kinds="iu")


def _nbytes_stored(arr: Any) -> int:
    try:
        return int(arr.nbytes_stored())
    except Exception:  # pragma: no cover - stores that cannot list
        return 0


def _as_input(X: Any) -> Any:
    """Check a matrix argument's structure up front; array-likes with shape/dtype stay lazy."""
    if sp.issparse(X):
        check_sparse_input(X)
        return X
    if hasattr(X, "shape") and hasattr(X, "dtype"):
        return X
    try:
        return np.asarray(X)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged lists and the like
        raise InvalidInputError(f"cannot read X as a 2-D matrix ({exc})") from None


def _check_label_name(name: Any) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith((".", "__")):
        raise LabelError(
            f"label name {name!r} is not usable; use a non-empty string without '/' that does "
            "not start with '.' or '__'"
        )


def _as_label_array(value: Any) -> Any:
    """Keep array-likes with shape/dtype (memmaps, zarr, h5py) lazy; coerce the rest."""
    return value if hasattr(value, "shape") and hasattr(value, "dtype") else np.asarray(value)


def _slice_labels(labels: dict[str, Any], a: int, b: int) -> dict[str, np.ndarray] | None:
    if not labels:
        return None
    return {k: np.asarray(v[a:b]) for k, v in labels.items()}


def _dense_block(block: Any, n_cols: int, dtype: np.dtype) -> np.ndarray:
    arr = block.toarray() if sp.issparse(block) else np.asarray(block)
    if arr.ndim != 2 or arr.shape[1] != n_cols:
        raise ShapeMismatchError(f"block has shape {arr.shape}; the store has {n_cols} columns")
    if not np.can_cast(arr.dtype, dtype, casting="safe"):
        raise DTypeError(f"cannot store {arr.dtype} values in a {dtype} store without loss")
    return arr.astype(dtype, copy=False)


def _check_dense_finite(arr: np.ndarray, first_row: int) -> None:
    if arr.dtype.kind == "f" and arr.size:
        bad = ~np.isfinite(arr)
        if bad.any():
            r, c = (int(v[0]) for v in np.nonzero(bad))
            raise InvalidInputError(
                f"row {first_row + r}, column {c} holds {arr[r, c]}: NaN and infinite values "
                "are refused; clean the data, or pass nan_policy='keep' to store them"
            )


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


# ------------------------------------------------------------------ public API

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
    if not storage.exists(p, storage_options):
        raise_missing(p)
    if not storage.is_remote(p) and not os.path.isdir(p):
        raise NotAStoreError(
            f"{p} is a file, not a store directory; to import it use sparsestore.convert"
        )
    try:
        group = storage.open_group(p, mode=mode, storage_options=storage_options)
    except (NotAStoreError, CorruptStoreError):
        raise
    except Exception as exc:
        raise NotAStoreError(f"{p} is not a zarr group ({type(exc).__name__}: {exc})") from exc
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
            if not store.verified:
                raise NeedsUpgradeError(
                    f"{p} was written without a chunk manifest (by an older sparsestore, or "
                    f"by anndata); run `sparsestore upgrade {p}` (sparsestore.upgrade) once "
                    "before appending to it"
                )
            store._truncate(store.n_rows, store.nnz)
        return store
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def upgrade(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Add the chunk manifest to a store written before it existed (format version 1).

    Every committed chunk is decoded first (a damaged store is refused, not blessed);
    chunks zarr never stored (all fill value) are written out, since from now on a missing
    chunk is an error.  Returns what was done; a store that has a manifest is left as is.
    """
    from zarr.core.sync import sync

    from .validate import validate_store

    p = storage.normalize(path)
    store = open(p, mode="r", storage_options=storage_options)
    if store.verified:
        return {"path": p, "upgraded": False, "written_chunks": 0}
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
            arrays[f"{LABELS_GROUP}/{name}"] = lab._arr
            lengths[f"{LABELS_GROUP}/{name}"] = st.n_rows
        inner = group.store._store if isinstance(group.store, VerifiedStore) else group.store
        written = 0
        for name, arr in arrays.items():
            c = int((getattr(arr, "shards", None) or arr.chunks)[0])
            for k in range(0, (lengths[name] + c - 1) // c):
                key = f"{arr.path}/{arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))}"
                if not sync(inner.exists(key)):
                    lo, hi = k * c, min((k + 1) * c, arr.shape[0])
                    _writable(arr)[lo:hi] = arr[lo:hi]
                    written += 1
        st._commit(st.n_rows, st.nnz, list(st._meta.labels), scan=True)
    finally:
        lock.release()
    return {"path": p, "upgraded": True, "written_chunks": written}


def raise_missing(path: str) -> None:
    from .errors import StoreNotFoundError

    raise StoreNotFoundError(
        f"no store at {path}; check the path or create one with sparsestore.save"
    )


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
    **layout_options: Any,
) -> SparseStore:
    """Build a new store from an iterable of ``(row block, labels block)``, atomically.

    The one write path for :func:`save` and every ingest source: nothing appears at
    ``path`` unless every block was written.  ``encode_thread``: compress chunks on a
    thread of their own, for block sources that decode on several threads.
    ``nan_policy``: ``"raise"`` refuses NaN/inf values (the block's row and column named),
    ``"keep"`` stores them; appends follow the store's policy.
    """
    layout = Layout.from_options(**layout_options)
    check_nan_policy(nan_policy)
    n_cols = check_dim(n_cols, "n_cols")
    dt = check_matrix_dtype(dtype, sparse=sparse)
    p = storage.normalize(path)
    with storage.staged(p, overwrite=overwrite, storage_options=storage_options) as where:
        # Marked incomplete until the one commit at the end of _append_blocks: a remote
        # store is written in place, and a local staging dir orphaned by a kill must not
        # open as a store either.
        g = _init_group(where, n_cols=n_cols, dtype=dt, layout=layout, sparse=sparse,
                        keep_zeros=keep_zeros, complete=False,
                        storage_options=storage_options, nan_policy=nan_policy)
        st = SparseStore(g, path=where, mode="r+", storage_options=storage_options)
        st._append_blocks(blocks, progress=progress, encode_thread=encode_thread)
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
    **layout_options: Any,
) -> SparseStore:
    """Write ``X`` (any scipy sparse matrix/array, 2-D ndarray or memmap) as a new store.

    Input is streamed in row blocks: a memmap bigger than memory is never loaded whole.
    ``sparse=False`` keeps a dense matrix dense (slices give numpy).  ``nan_policy``:
    ``"raise"`` (default) refuses NaN/inf values, naming the first; ``"keep"`` stores them.
    Returns the store opened read-only.
    """
    from .ingest import matrix_shape, row_blocks

    if isinstance(X, SparseStore):
        raise InvalidInputError("X is already a store; use sparsestore.convert to copy it")
    X = _as_input(X)
    n_rows, n_cols = matrix_shape(X)
    check_dim(n_rows, "n_rows")
    src_dtype = getattr(X, "dtype", None)
    if src_dtype is None:
        src_dtype = np.asarray(X).dtype
    dt = check_matrix_dtype(dtype if dtype is not None else src_dtype, sparse=sparse)
    labs = _check_full_labels(labels, n_rows)
    bar = _progress(progress, n_rows, "save")
    try:
        return write_blocks(
            path,
            ((block, _slice_labels(labs, a, b)) for a, b, block in row_blocks(X)),
            n_cols=n_cols, dtype=dt, sparse=sparse, keep_zeros=keep_zeros,
            overwrite=overwrite, storage_options=storage_options, progress=bar,
            nan_policy=nan_policy, **layout_options,
        )
    finally:
        if bar is not None:
            bar.close()


def _check_full_labels(labels: Mapping[str, Any] | None, n_rows: int) -> dict[str, Any]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise LabelError("labels must be a mapping of name -> array with one entry per row")
    out = {}
    for name, value in labels.items():
        _check_label_name(name)
        arr = _as_label_array(value)
        if arr.ndim == 0 or arr.shape[0] != n_rows:
            raise ShapeMismatchError(
                f"label {name!r} has {0 if arr.ndim == 0 else arr.shape[0]} entries but the "
                f"matrix has {n_rows} rows; labels need one entry per row"
            )
        check_label_dtype(arr.dtype, name)
        out[name] = arr
    return out


def _progress(progress: Any, total: int, desc: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=None)
