""":func:`sparsestore.convert`: any supported file (or set of files) into a new store.

The format comes from the file name (or ``format=``); the matching module in
:mod:`sparsestore.ingest` turns the file into row blocks, and
:func:`sparsestore.write_blocks` writes them atomically: nothing appears at ``dst`` unless
the whole source was read without error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

from . import storage
from .canonical import check_casting, check_nan_policy
from .errors import FormatError, InvalidInputError, LabelError, StoreExistsError
from .ingest.base import (
    DEFAULT_MEMORY_BYTES,
    IndptrView,
    Source,
    expand_paths,
    row_bounds,
    write_source,
)
from .ingest.shuffle import (
    DEFAULT_SOURCE_ROW_LABEL,
    check_seed,
    check_source_row_label,
    shuffled_store_source,
)
from .layout import Layout
from .store import SparseStore

# format name -> file name endings that select it (checked longest first).
FORMATS: dict[str, tuple[str, ...]] = {
    "npz": (".npz",),
    "npy": (".npy",),
    "mtx": (".mtx", ".mtx.gz", ".mtx.bz2", ".mm", ".mm.gz"),
    "svmlight": (".svm", ".svmlight", ".libsvm", ".svm.gz", ".svmlight.gz", ".libsvm.gz"),
    "h5ad": (".h5ad",),
    "zarr": (".zarr",),
}
_ALIASES = {"libsvm": "svmlight", "svm": "svmlight", "mm": "mtx", "matrixmarket": "mtx",
            "anndata": "h5ad", "store": "zarr", "sparsestore": "zarr"}


def supported_formats() -> str:
    return ", ".join(f"{name} ({'/'.join(ends)})" for name, ends in FORMATS.items())


def detect_format(path: str) -> str:
    """The format a file name implies; directories are zarr (anndata or store)."""
    low = path.lower().rstrip("/")
    best = ""
    found = None
    for name, ends in FORMATS.items():
        for end in ends:
            if low.endswith(end) and len(end) > len(best):
                best, found = end, name
    if found is not None:
        return found
    if os.path.isdir(path):
        return "zarr"
    raise FormatError(
        f"cannot tell the format of {path!r} from its name; pass format= (or --from) with one "
        f"of: {supported_formats()}"
    )


def _normalize_format(fmt: str) -> str:
    f = str(fmt).lower().lstrip(".")
    f = _ALIASES.get(f, f)
    if f not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; supported formats: {supported_formats()}")
    return f


def store_source(path: str, *, labels: Sequence[str] | None = None,
                 storage_options: dict[str, Any] | None = None) -> Source:
    """A :class:`Source` copying another store (sparsestore's or an anndata CSR group; a
    URL is opened with fsspec's ``storage_options``)."""
    from .store import open as open_store

    st = open_store(path, mode="r", storage_options=storage_options)
    names = list(st.labels) if labels is None else list(labels)
    for n in names:
        if n not in st.labels:
            raise LabelError(f"{path} has no label {n!r}; it has {sorted(st.labels)}")

    def blocks() -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
        src = open_store(path, mode="r", storage_options=storage_options)
        if src.is_dense:
            step = max(1, (32 * 2**20) // max(1, src.n_cols * src.dtype.itemsize))
            bounds: Iterator[tuple[int, int]] = (
                (a, min(src.n_rows, a + step)) for a in range(0, src.n_rows, step)
            )
        else:
            bounds = row_bounds(IndptrView(src), src.n_rows)
        for a, b in bounds:
            labs = {n: src.labels[n].read(a, b) for n in names} or None
            yield src[a:b], labs

    return Source(name=path, n_cols=st.n_cols, dtype=st.dtype, blocks=blocks,
                  n_rows=st.n_rows, labels=names, dense=st.is_dense, store_path=path,
                  store_options=storage_options)


def _refuse(fmt: str, **given: Any) -> None:
    bad = [k for k, v in given.items() if v is not None]
    if bad:
        raise InvalidInputError(
            f"option(s) {bad} do not apply to {fmt} sources; drop them"
        )


def open_source(
    src: Any,
    *,
    format: str | None = None,
    labels: Sequence[str] | None = None,
    key: str | None = None,
    keys: Mapping[str, str] | None = None,
    dtype: Any = None,
    sparse: bool = True,
    workers: int | None = None,
    executor: Executor | None = None,
    n_features: int | None = None,
    zero_based: bool | str | None = None,
    max_bytes: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    tmp_dir: str | os.PathLike[str] | None = None,
    casting: str = "same_value",
    storage_options: dict[str, Any] | None = None,
) -> Source:
    """Describe ``src`` as a :class:`Source` (format from its name unless ``format=``).

    ``casting``: how sources that cast while reading (mtx, svmlight, CSC anndata) cast
    values to ``dtype`` (see :func:`~sparsestore.canonical.cast_values`).  A URL
    (``s3://``...) must be a store (sparsestore's, or an AnnData zarr's X), opened with
    fsspec's ``storage_options``; files of the other formats are read from local disk.
    """
    if isinstance(labels, str):
        labels = [labels]
    if isinstance(src, (str, os.PathLike)):
        first = os.fspath(src)
    elif isinstance(src, Sequence) and src and isinstance(src[0], (str, os.PathLike)):
        first = os.fspath(src[0])
    else:
        raise InvalidInputError(
            f"src must be a path, a glob pattern or a list of paths, got {type(src).__name__}"
        )
    if storage.is_remote(first):
        try:
            fmt = _normalize_format(format) if format is not None else detect_format(first)
        except FormatError:  # no known ending: a store's URL
            fmt = "zarr"
        if fmt != "zarr" or not isinstance(src, (str, os.PathLike)):
            raise InvalidInputError(
                f"{first}: only stores (zarr) are read from object storage; copy {fmt} "
                "files to local disk first, and pass one store URL"
            )
        _refuse(fmt, n_features=n_features, zero_based=zero_based, key=key, keys=keys,
                max_bytes=max_bytes)
        return store_source(storage.normalize(first), labels=labels,
                            storage_options=storage_options)
    fmt = _normalize_format(format) if format is not None else detect_format(first)
    if fmt not in ("svmlight",):
        _refuse(fmt, n_features=n_features, zero_based=zero_based)
    if fmt != "npz":
        _refuse(fmt, key=key, keys=keys)
    if fmt in ("npz", "npy", "svmlight"):
        return _multi_file_source(fmt, src, labels=labels, key=key, keys=keys, dtype=dtype,
                                  sparse=sparse, workers=workers, executor=executor,
                                  n_features=n_features, zero_based=zero_based,
                                  max_bytes=max_bytes, tmp_dir=tmp_dir, casting=casting)
    paths = expand_paths(src, what=fmt)
    if len(paths) != 1:
        raise InvalidInputError(
            f"{fmt} sources are converted one file at a time; got {len(paths)} paths"
        )
    path = paths[0]
    from .ingest.anndata_io import anndata_source, is_anndata_zarr

    if fmt == "mtx" or (fmt == "zarr" and not is_anndata_zarr(path)):
        _refuse(fmt, max_bytes=max_bytes)
    if fmt == "mtx":
        _refuse(fmt, labels=labels)
        from .ingest.mtx import mtx_source

        return mtx_source(path, dtype=dtype, memory_bytes=memory_bytes, tmp_dir=tmp_dir,
                          casting=casting)
    if fmt == "h5ad" or is_anndata_zarr(path):
        from .ingest.zipsafe import DEFAULT_MAX_BYTES

        return anndata_source(path, labels=labels, dtype=dtype, memory_bytes=memory_bytes,
                              tmp_dir=tmp_dir, casting=casting,
                              max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    return store_source(path, labels=labels)


def _multi_file_source(fmt: str, src: Any, *, labels: Any, key: Any, keys: Any, dtype: Any,
                       sparse: bool, workers: Any, executor: Any, n_features: Any,
                       zero_based: Any, max_bytes: Any, tmp_dir: Any,
                       casting: str) -> Source:
    if fmt == "npz":
        from .ingest.npz import npz_source
        from .ingest.zipsafe import DEFAULT_MAX_BYTES

        return npz_source(src, key=key, keys=keys, labels=labels, workers=workers,
                          executor=executor, dtype=dtype, sparse=sparse,
                          max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    if fmt == "npy":
        _refuse(fmt, labels=labels, max_bytes=max_bytes)
        from .ingest.npy import npy_source

        return npy_source(src, dtype=dtype)
    _refuse(fmt, labels=labels, max_bytes=max_bytes)
    from .ingest.svmlight import svmlight_source

    return svmlight_source(src, n_features=n_features,
                           zero_based="auto" if zero_based is None else zero_based,
                           dtype=np.float64 if dtype is None else dtype, tmp_dir=tmp_dir,
                           casting=casting)


def convert(
    src: Any,
    dst: str | os.PathLike[str],
    *,
    format: str | None = None,
    overwrite: bool = False,
    progress: Any = None,
    workers: int | None = None,
    executor: Executor | None = None,
    labels: Sequence[str] | None = None,
    key: str | None = None,
    keys: Mapping[str, str] | None = None,
    dtype: Any = None,
    sparse: bool = True,
    n_features: int | None = None,
    zero_based: bool | str | None = None,
    max_bytes: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    tmp_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    nan_policy: str = "raise",
    casting: str = "same_value",
    shuffle_rows: int | None = None,
    source_row_label: str | None = None,
    source_storage_options: dict[str, Any] | None = None,
    **layout_options: Any,
) -> SparseStore:
    """Convert a file, glob or list of files of any supported format into a new store.

    Formats (from the name, or ``format=``): npz shards (scipy ``save_npz`` or
    ``np.savez_compressed`` COO/CSR parts or dense), npy, Matrix Market, svmlight/libsvm,
    h5ad, anndata zarr, or another store.  ``labels`` picks obs columns (anndata), label
    members (npz) or labels to copy (store).  ``workers``/``executor`` decompress npz shards
    in parallel.  ``progress=None`` shows a bar on a terminal.  Layout options
    (``compressor=``, ``chunk_bytes=``...) go to the new store.  ``nan_policy="raise"``
    refuses NaN and infinite values (naming the first one's row and column), ``"keep"``
    stores them; the store keeps the choice for its appends.  ``casting`` applies with
    ``dtype=``: ``"same_value"`` (default) refuses a value the dtype cannot hold (300 or
    0.7 as int8, 1e300 as float32), naming it, while floats may round to a narrower
    float; ``"unsafe"`` stores numpy's cast, dropping the zeros it makes.  Big-endian
    sources are stored in native byte order.  Atomic; returns the store opened read-only.

    ``shuffle_rows=SEED`` writes the rows in a seeded random order, so a cheap sequential
    or block shuffle of the new store mixes like a true permutation: with
    ``perm = np.random.default_rng(SEED).permutation(n_rows)``, new row ``i`` is source
    row ``perm[i]``, every label is permuted alike, and ``perm`` is stored as the int64
    label ``source_row_label`` (default ``"source_row"``; refused if a copied label has
    that name) so the original order stays recoverable.  It streams: about
    ``memory_bytes`` of rows are held at a time (plus 8 bytes a row for ``perm``), and
    each output block of random rows decodes nearly the whole source, so it costs about
    ``4 * uncompressed source bytes / memory_bytes`` full decodes of the source: give it
    a budget of a few GiB for a big store.  A source that is not a sparsestore store is first
    written to a temporary store under ``tmp_dir`` (removed afterwards, so ``tmp_dir``
    needs room for one compressed copy).

    Object storage: ``dst`` may be a URL (``s3://bucket/x.zarr``), written with fsspec's
    ``storage_options``; ``src`` may be the URL of a store, read with
    ``source_storage_options`` (credentials, ``endpoint_url``; None: fsspec's defaults,
    such as s3fs's environment variables).
    """
    Layout.from_options(**layout_options)  # name a bad option before reading anything
    check_nan_policy(nan_policy)
    check_casting(casting)
    if shuffle_rows is None:
        if source_row_label is not None:
            raise InvalidInputError("source_row_label= names the label shuffle_rows= records; "
                                    "pass shuffle_rows= too, or drop it")
    else:
        shuffle_rows = check_seed(shuffle_rows)
        source_row_label = (DEFAULT_SOURCE_ROW_LABEL if source_row_label is None
                            else source_row_label)
    p = storage.normalize(dst)
    if not overwrite and storage.exists(p, storage_options):
        raise StoreExistsError(
            f"{p} already exists; pass overwrite=True to replace it, or choose another path"
        )
    source = open_source(src, format=format, labels=labels, key=key, keys=keys, dtype=dtype,
                         sparse=sparse, workers=workers, executor=executor,
                         n_features=n_features, zero_based=zero_based, max_bytes=max_bytes,
                         memory_bytes=memory_bytes, tmp_dir=tmp_dir, casting=casting,
                         storage_options=source_storage_options)
    write = dict(dtype=dtype, sparse=sparse, progress=progress, nan_policy=nan_policy,
                 casting=casting)
    if shuffle_rows is None:
        return write_source(dst, source, overwrite=overwrite, storage_options=storage_options,
                            **write, **layout_options)
    return _convert_shuffled(dst, source, shuffle_rows, source_row_label or "",
                             overwrite=overwrite, storage_options=storage_options,
                             memory_bytes=memory_bytes, tmp_dir=tmp_dir, write=write,
                             layout_options=layout_options)


def _convert_shuffled(
    dst: Any, source: Source, seed: int, label: str, *, overwrite: bool,
    storage_options: dict[str, Any] | None, memory_bytes: int,
    tmp_dir: str | os.PathLike[str] | None, write: dict[str, Any],
    layout_options: dict[str, Any],
) -> SparseStore:
    """``convert(shuffle_rows=seed)`` once ``source`` is open: refuse a clashing label
    before anything is written, then shuffle from the source store, or from a temporary
    copy of a source of another format."""
    try:
        check_source_row_label(label, source.labels)
        if memory_bytes < 1:
            raise InvalidInputError(f"memory_bytes must be positive, got {memory_bytes}")
    except BaseException:
        if source.close is not None:
            source.close()
        raise
    final = dict(overwrite=overwrite, storage_options=storage_options, desc="shuffle",
                 **write, **layout_options)
    if source.store_path is not None:
        shuffled = shuffled_store_source(source.store_path, seed, labels=source.labels,
                                         source_row_label=label, memory_bytes=memory_bytes,
                                         storage_options=source.store_options)
        return write_source(dst, shuffled, **final)
    # Random row access needs a store: write the source to a temporary one first (default
    # layout: only this process reads it, once per output block), then shuffle from it.
    tmp = tempfile.mkdtemp(prefix="sparsestore-shuffle-", dir=tmp_dir)
    try:
        rows = os.path.join(tmp, "rows.zarr")
        # A terminal bar per step; a caller's own bar counts the shuffled rows only once.
        progress = write["progress"]
        first = {**write, "progress": progress if progress in (None, True, False) else False}
        write_source(rows, source, **first)
        shuffled = shuffled_store_source(rows, seed, source_row_label=label,
                                         memory_bytes=memory_bytes, name=source.name)
        return write_source(dst, shuffled, **final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["FORMATS", "convert", "detect_format", "open_source", "supported_formats"]
