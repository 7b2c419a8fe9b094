"""Opening a store's committed state: the header, the matrix arrays, the labels and the
chunk manifest, each checked before a handle serves a row.

:class:`CommittedState` is the half of :class:`~sparsestore.store.SparseStore` that reads
what the last commit left (or, for a reopened handle, the commit it is pinned to) and
refuses what does not hold together: attrs and metadata (:mod:`sparsestore.layout`'s
rules), the shape, the arrays' dtypes, codecs, chunk sizes and lengths, the committed nnz,
the manifest's generation, columns, arrays and fingerprints, and labels.  It installs the
manifest on the store's :class:`~sparsestore.verified.VerifiedStore`, so every later chunk
read is checked against it.  The handle supplies ``_group`` and ``path``; :meth:`_load`
sets the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .checks import CheckedRows, check_chunk_size
from .chunks import ChunkDecoder, read_slice
from .errors import CorruptStoreError, InvalidInputError, NotAStoreError, StoreChangedError
from .fetch import prefetch_chunks
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
from .verified import VerifiedStore


def metadata_keys(root: Mapping[str, Any]) -> list[str]:
    """The metadata documents opening a store reads, from its root ``zarr.json`` (parsed):
    its matrix arrays' (or an AnnData root's ``X`` group and arrays'), and its labels
    group's and label arrays'.  What a remote open requests all at once
    (:func:`~sparsestore.storage.preload_metadata`); a key it misses is still read when
    zarr asks for it, one it names in vain costs one request in the same round trip."""
    attrs = root.get("attributes")
    attrs = attrs if isinstance(attrs, Mapping) else {}
    if attrs.get("encoding-type") == "anndata":
        return ["X/zarr.json"] + [f"X/{n}/zarr.json" for n in ("data", "indices", "indptr")]
    meta = attrs.get(META_KEY)
    meta = meta if isinstance(meta, Mapping) else {}
    if meta.get("format") == "dense":
        keys = [f"{DENSE_ARRAY}/zarr.json"]
    else:
        keys = [f"{n}/zarr.json" for n in ("data", "indices", "indptr")]
    labels = meta.get("labels")
    if isinstance(labels, list) and labels:
        keys.append(f"{LABELS_GROUP}/zarr.json")
        keys += [f"{LABELS_GROUP}/{n}/zarr.json" for n in labels
                 if isinstance(n, str) and n and "/" not in n]
    return keys


def _indptr_ends(indptr: Any, n_rows: int) -> tuple[int, int]:
    """``indptr[0]`` and ``indptr[n_rows]``; on object storage their chunks are requested
    together (one round trip, not two)."""
    dec = ChunkDecoder(indptr, "indptr")
    if dec.remote is None:
        return (int(read_slice(indptr, 0, 1, name="indptr")[0]),
                int(read_slice(indptr, n_rows, n_rows + 1, name="indptr")[0]))
    last = n_rows // dec.chunk
    pending = prefetch_chunks([(dec, sorted({0, last}))])
    try:
        head = dec.read(0)
        tail = head if last == 0 else dec.read(last)
        return int(head[0]), int(tail[n_rows - last * dec.chunk])
    finally:
        if pending is not None:
            pending.release()


class CommittedState:
    """A handle's committed state, read and checked by :meth:`_load` (at open, on
    :meth:`~sparsestore.store.SparseStore.refresh`, and pinned to an earlier commit when a
    pickled handle is reopened)."""

    # Supplied by the handle.
    _group: Any
    path: str
    # Set by _load.
    _attrs: dict[str, Any]
    _meta: Meta
    _shape: tuple[int, int]
    layout: Layout | None
    _data: Any
    _indices: Any
    _indptr: Any
    _X: Any
    _manifest: Manifest | None
    _nnz: int
    _dtype: np.dtype
    _labels: Labels
    _checked_rows: CheckedRows | None

    def _load(self, pinned: Mapping[str, Any] | None = None) -> None:
        """Read the committed state: header, matrix arrays (checked), labels.

        ``pinned``: the committed attrs of an earlier handle (see
        :meth:`SparseStore.__reduce__ <sparsestore.store.SparseStore.__reduce__>`), served
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
        first, end = _indptr_ends(self._indptr, n_rows)
        self._nnz = end
        if not 0 <= self._nnz <= min(self._data.shape[0], self._indices.shape[0]):
            raise CorruptStoreError(
                f"{self.path}: indptr[-1]={self._nnz} but data holds "
                f"{self._data.shape[0]} and indices {self._indices.shape[0]} values"
            )
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
