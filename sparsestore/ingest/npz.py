"""Compressed ``.npz`` shards, read by background threads ahead of the writer, in order.

Three kinds of shard are understood, told apart by their member names:

* ``scipy.sparse.save_npz`` files (any of its formats);
* ``np.savez``/``np.savez_compressed`` files holding COO parts (``row``/``col``/``data`` +
  ``shape``) or CSR parts (``data``/``indices``/``indptr`` + ``shape``), key names
  configurable;
* ``np.savez``/``np.savez_compressed`` files holding one dense 2-D array (``key=`` picks it).

A shard is opened by its zip directory alone (:mod:`.zipsafe`): the members' declared
sizes must add up to at most ``max_bytes`` (decompression bombs).  A member's ``.npy``
header is read before the member and must describe exactly its declared size and no Python
objects.  Before anything is written every shard's directory and value headers are checked
so; column counts must agree and the dtypes decide the store's.

CSR shards (``save_npz``'s default format, or CSR parts) stored or deflated are streamed
(:mod:`.inflate`): their ``indptr``, ``indices`` and ``data`` members are inflated in step,
a unit of rows (``DEFAULT_UNIT_BYTES`` of values) at a time, so no shard is ever whole in
memory.  Other shards are loaded whole by :func:`load_shard` (``np.load(allow_pickle=False)``,
``scipy.sparse.load_npz``); it is picklable, so with ``executor=`` (a thread or process pool,
a dask ``client.get_executor()``...) every shard is loaded whole there.  Either way the
shards run on an :class:`~sparsestore.engine.OrderedStreams`: ``workers`` threads ahead of
the writer within ``lookahead_bytes`` of decoded data, handed over in order.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..blocks import MAX_BLOCK_ROWS, coo_row_blocks, csr_views
from ..canonical import check_row_count, native_matrix
from ..engine import OrderedStreams
from ..errors import FormatError, InvalidInputError, SparseStoreError
from .base import (
    DEFAULT_BLOCK_NNZ,
    Source,
    check_n_cols,
    expand_paths,
    result_dtype,
    write_source,
)
from .inflate import csr_units
from .zipsafe import DEFAULT_MAX_BYTES, READ_ERRORS, Shard, as_format_error, opened

# Decompressed bytes read ahead of the writer (besides the unit it is on): the writer takes
# data in bursts (a chunk of values and one of indices at a time), faster than one thread
# inflates it.  With ``executor=``, ``workers - 1`` whole shards ahead at least.
DEFAULT_LOOKAHEAD_BYTES = 16 * 2**20
# Bytes of values per block cut from a unit for the writer (views): about half a default
# chunk, above the quarter chunk below which the writer joins blocks by copying.
DEFAULT_PIECE_BYTES = 2 * 2**20
_SCIPY_FORMATS = ("csr", "csc", "coo", "bsr", "dia")

Reserve = Callable[[int], None]


def _no_reserve(nbytes: int) -> None:
    """A ``reserve`` that reserves nothing (a shard read in the consuming thread)."""


@dataclass(frozen=True)
class NpzOptions:
    """How to read a shard (picklable, so executors on other processes can use it)."""

    key: str | None = None  # the dense array's member name (default: the only array)
    keys: Mapping[str, str] = field(default_factory=dict)  # role -> member name
    labels: tuple[str, ...] = ()  # members holding one label value per row
    max_bytes: int = DEFAULT_MAX_BYTES
    sparse: bool = True  # dense shards become CSR in the worker (smaller to hand back)

    def name(self, role: str) -> str:
        return self.keys.get(role, role)


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's headers say, read without decompressing its data."""

    path: str
    kind: str  # "scipy" | "csr" | "coo" | "dense"
    shape: tuple[int, int]
    dtype: np.dtype
    label_dtypes: tuple[tuple[str, np.dtype, tuple[int, ...]], ...] = ()
    nbytes: int = 0  # decompressed size (sum of the members' declared sizes)


# ------------------------------------------------------------------ what a shard holds

def _kind(path: str, members: list[str], opts: NpzOptions) -> str:
    have = set(members)
    if "format" in have and "shape" in have and opts.key is None and not opts.keys:
        return "scipy"
    if {opts.name("data"), opts.name("indices"), opts.name("indptr")} <= have:
        return "csr"
    if {opts.name("row"), opts.name("col"), opts.name("data")} <= have:
        return "coo"
    arrays = [m for m in members if m not in opts.labels]
    if opts.key is not None:
        if opts.key not in have:
            raise FormatError(f"{path} has no array named {opts.key!r}; it holds {members}")
        return "dense"
    if len(arrays) == 1:
        return "dense"
    raise FormatError(
        f"{path} holds arrays {members}: not a scipy.sparse.save_npz file, no COO "
        "(row/col/data + shape) or CSR (data/indices/indptr + shape) parts, and more than "
        "one array; pass key= to pick the dense matrix, or keys= to name the parts"
    )


def _scipy_format(shard: Shard) -> str:
    fmt = shard.array("format")
    fmt = fmt.item().decode() if fmt.dtype.kind == "S" else str(fmt.item())
    if fmt not in _SCIPY_FORMATS:
        raise FormatError(f"{shard.path}: unknown scipy.sparse format {fmt!r}")
    return fmt


def _shape_member(shard: Shard, opts: NpzOptions) -> tuple[int, int]:
    name = opts.name("shape")
    shape = shard.array(name)
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or int(shape.min()) < 0:
        raise FormatError(
            f"{shard.path}: {name!r} must hold two non-negative integers, got {shape}"
        )
    return int(shape[0]), int(shape[1])


def scan_shard(path: str, opts: NpzOptions) -> ShardInfo:
    """Check a shard's zip directory and array headers: kind, shape, dtype (no data)."""
    try:
        with opened(path, opts.max_bytes) as shard:
            kind = _kind(path, shard.members, opts)
            if kind == "scipy":
                fmt = _scipy_format(shard)
                shape = _shape_member(shard, opts)
                dshape, dtype = shard.header("data")
                if fmt != "csr":  # its row count is only declared: backed by the data?
                    check_row_count(shape[0], int(np.prod(dshape, dtype=np.int64)), path)
            elif kind in ("csr", "coo"):
                shape = _shape_member(shard, opts)
                dshape, dtype = shard.header(opts.name("data"))
                if kind == "coo":
                    check_row_count(shape[0], int(np.prod(dshape, dtype=np.int64)), path)
            else:
                key = opts.key or [m for m in shard.members if m not in opts.labels][0]
                dshape, dtype = shard.header(key)
                if len(dshape) != 2:
                    raise FormatError(
                        f"{path}: array {key!r} has shape {dshape}; a dense shard must be 2-D"
                    )
                shape = (dshape[0], dshape[1])
            labels = []
            for lab in opts.labels:
                lshape, ldt = shard.header(lab)
                if not lshape or lshape[0] != shape[0]:
                    raise FormatError(
                        f"{path}: label {lab!r} has shape {lshape} but the shard has "
                        f"{shape[0]} rows"
                    )
                labels.append((lab, ldt, lshape[1:]))
    except SparseStoreError:
        raise
    except READ_ERRORS as exc:
        raise as_format_error(path, exc) from None
    if dtype.kind not in "biuf":
        raise FormatError(f"{path}: values of dtype {dtype} cannot be stored")
    return ShardInfo(path, kind, shape, np.dtype(dtype), tuple(labels), shard.nbytes)


def _changed(path: str, shape: tuple[int, ...], expect: tuple[int, ...]) -> FormatError:
    return FormatError(f"{path}: holds a {shape[0]}x{shape[1]} matrix but its header said "
                       f"{expect}; the file changed while being read")


# ------------------------------------------------------------------ whole shards

def load_shard(path: str, opts: NpzOptions) -> dict[str, np.ndarray]:
    """Decompress one shard into plain numpy arrays (runs in an executor worker).

    Returns ``{"data", "indices", "indptr", "shape"}`` (CSR parts), ``{"row", "col",
    "data", "shape"}`` (COO parts sorted by row, see :func:`_row_parts`) or ``{"dense",
    "shape"}``, plus ``"label:<name>"`` arrays.  Top-level and picklable on purpose.
    """
    try:
        with opened(path, opts.max_bytes) as shard:
            return _load_parts(shard, _kind(path, shard.members, opts), opts)
    except SparseStoreError:
        raise
    except READ_ERRORS as exc:
        raise as_format_error(path, exc) from None


def _load_parts(shard: Shard, kind: str, opts: NpzOptions) -> dict[str, np.ndarray]:
    path = shard.path
    out: dict[str, np.ndarray] = {}
    if kind == "scipy":
        for name in shard.members:
            shard.header(name)
        shard.file.seek(0)
        m: Any = native_matrix(sp.load_npz(shard.file))
        if m.format in ("csr", "csc", "bsr"):
            m.check_format(full_check=True)
        out.update(_row_parts(m))
    elif kind == "dense":
        key = opts.key or [m for m in shard.members if m not in opts.labels][0]
        arr = shard.array(key)
        if arr.ndim != 2:
            raise FormatError(f"{path}: array {key!r} must be 2-D, got {arr.shape}")
        if opts.sparse:
            out.update(_csr_parts(sp.csr_matrix(arr)))
        else:
            out["dense"] = arr
            out["shape"] = np.array(arr.shape, dtype=np.int64)
    else:
        shape = _shape_member(shard, opts)
        data = shard.array(opts.name("data"))
        if kind == "coo":
            row = shard.array(opts.name("row"))
            col = shard.array(opts.name("col"))
            m = sp.coo_matrix((data, (row, col)), shape=shape)
        else:
            ind = shard.array(opts.name("indices"))
            ptr = shard.array(opts.name("indptr"))
            m = sp.csr_matrix((data, ind, ptr), shape=shape)
            m.check_format(full_check=True)
        out.update(_row_parts(m))
    for lab in opts.labels:
        out["label:" + lab] = shard.array(lab)
    return out


def _row_parts(m: Any) -> dict[str, np.ndarray]:
    """CSR parts of a whole shard; or, when its declared rows outnumber its entries and
    ``MAX_BLOCK_ROWS``, its COO parts sorted by row (``row``, ``col``, ``data``), so that no
    indptr is built for rows the data does not fill (cut into blocks by the consumer)."""
    if m.format == "csr" or m.shape[0] <= max(MAX_BLOCK_ROWS, m.nnz):
        return _csr_parts(sp.csr_matrix(m))
    coo = m.tocoo()
    order = np.argsort(coo.row, kind="stable")
    return {"row": coo.row[order], "col": coo.col[order], "data": coo.data[order],
            "shape": np.array(m.shape, dtype=np.int64)}


def _csr_parts(m: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {"data": m.data, "indices": m.indices, "indptr": m.indptr,
            "shape": np.array(m.shape, dtype=np.int64)}


# ------------------------------------------------------------------ CSR shards, streamed

def _streamable(shard: Shard, kind: str, opts: NpzOptions) -> bool:
    """Whether a shard is CSR parts, stored or deflated and not encrypted (others are
    loaded whole)."""
    if kind not in ("scipy", "csr") or (kind == "scipy" and _scipy_format(shard) != "csr"):
        return False
    for role in ("indptr", "indices", "data"):
        info = shard.zip.NameToInfo.get(opts.name(role) + ".npy")
        if info is not None and (info.flag_bits & 0x1 or info.compress_type not in (
                zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)):
            return False
    return True


def shard_items(path: str, opts: NpzOptions, shape: tuple[int, int] | None = None,
                unit_nnz: int | None = None, reserve: Reserve = _no_reserve
                ) -> Iterator[tuple[str, Any]]:
    """One shard as ``("unit", (rows, labels))`` items -- a CSR shard streamed in units
    (see :func:`~.inflate.csr_units`) -- or, for other kinds, one ``("whole", parts)`` item
    (see :func:`load_shard`).  ``shape``: what the shard's headers said when scanned;
    ``reserve(nbytes)`` is called before each item is decompressed."""
    try:
        with opened(path, opts.max_bytes) as shard:
            kind = _kind(path, shard.members, opts)
            if not _streamable(shard, kind, opts):
                reserve(shard.nbytes)
                yield "whole", _load_parts(shard, kind, opts)
                return
            got = _shape_member(shard, opts)
            if shape is not None and got != tuple(shape):
                raise _changed(path, got, tuple(shape))
            names = (opts.name("indptr"), opts.name("indices"), opts.name("data"))
            yield from csr_units(shard, names, opts.labels, got, unit_nnz, reserve)
    except SparseStoreError:
        raise
    except READ_ERRORS as exc:
        raise as_format_error(path, exc) from None


# ------------------------------------------------------------------ the source

THREAD_NAME = "sparsestore-npz"  # the shard readers' threads


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def npz_source(
    src: Any,
    *,
    key: str | None = None,
    keys: Mapping[str, str] | None = None,
    labels: Sequence[str] | None = None,
    workers: int | None = None,
    executor: Executor | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    dtype: Any = None,
    sparse: bool = True,
    block_nnz: int = DEFAULT_BLOCK_NNZ,
    unit_nnz: int | None = None,
    piece_nnz: int | None = None,
    lookahead_bytes: int = DEFAULT_LOOKAHEAD_BYTES,
) -> Source:
    """A :class:`Source` over ``.npz`` shards (a path, glob or list), rows concatenated.

    CSR shards are inflated in units of ``unit_nnz`` entries and written in blocks of
    ``piece_nnz`` (defaults: ``DEFAULT_UNIT_BYTES`` and ``DEFAULT_PIECE_BYTES`` of
    values); whole shards (other kinds, or all with ``executor=``) in blocks of
    ``block_nnz``.
    """
    paths = expand_paths(src, what="npz")
    if keys is not None and not isinstance(keys, Mapping):
        raise FormatError("keys must map roles (row, col, data, indices, indptr, shape) to names")
    n_workers = _default_workers() if workers is None else int(workers)
    if n_workers < 1:
        raise InvalidInputError(f"workers must be at least 1, got {workers}")
    opts = NpzOptions(key=key, keys=dict(keys or {}), labels=tuple(labels or ()),
                      max_bytes=int(max_bytes), sparse=sparse)
    infos = [scan_shard(p, opts) for p in paths]
    n_cols = infos[0].shape[1]
    for info in infos[1:]:
        check_n_cols(info.path, info.shape[1], n_cols)
        if info.label_dtypes and [(n, s) for n, _, s in info.label_dtypes] != [
            (n, s) for n, _, s in infos[0].label_dtypes
        ]:
            raise FormatError(f"{info.path}: its labels' shapes differ from the first shard's")
    dt = np.dtype(dtype) if dtype is not None else result_dtype([i.dtype for i in infos])

    def streamed(i: int, reserve: Reserve) -> Iterator[tuple[str, Any]]:
        return shard_items(paths[i], opts, infos[i].shape, unit_nnz, reserve)

    def loaded(i: int, reserve: Reserve) -> Iterator[tuple[str, Any]]:
        reserve(infos[i].nbytes)
        yield "whole", executor.submit(load_shard, paths[i], opts).result()  # type: ignore[union-attr]

    # Shards start while the bytes ahead fit the budget, however many that is.
    budget, ahead = max(0, int(lookahead_bytes)), max(1, len(paths))

    def blocks() -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
        if executor is None:  # workers=1: each shard read in this thread when its turn comes
            reader = OrderedStreams(streamed, range(len(paths)), budget=budget, ahead=ahead,
                                    threads=n_workers if n_workers > 1 else 0,
                                    name=THREAD_NAME)
        else:  # whole shards, loaded by the caller's executor; our threads only wait
            reader = OrderedStreams(loaded, range(len(paths)), budget=budget, ahead=ahead,
                                    free=n_workers, threads=max(2, n_workers),
                                    name=THREAD_NAME)
        try:
            for i, (kind, value) in reader:
                if kind == "unit":
                    yield from _unit_blocks(*value, piece_nnz)
                else:
                    yield from _whole_blocks(paths[i], value, infos[i].shape, block_nnz)
                del value  # not pinned while the next item is fetched
        finally:
            reader.close()

    return Source(name=paths[0] if len(paths) == 1 else f"{len(paths)} npz shards",
                  n_cols=n_cols, dtype=dt, blocks=blocks,
                  n_rows=sum(i.shape[0] for i in infos), labels=list(opts.labels),
                  dense=all(i.kind == "dense" for i in infos),
                  threads=2 if executor is not None else n_workers)


def _whole_blocks(path: str, parts: dict[str, np.ndarray], expect: tuple[int, int],
                  block_nnz: int) -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
    """A whole shard's parts (see :func:`load_shard`) as row blocks with their labels."""
    shape = tuple(int(s) for s in parts["shape"])
    if shape != expect:
        raise _changed(path, shape, expect)
    labs = {k[6:]: v for k, v in parts.items() if k.startswith("label:")}
    if "dense" in parts:
        pieces = _dense_pieces(parts["dense"])
    elif "row" in parts:
        pieces = coo_row_blocks(parts["row"], parts["col"], parts["data"], shape,
                                target_nnz=block_nnz, rows_sorted=True)
    else:
        m = sp.csr_matrix((parts["data"], parts["indices"], parts["indptr"]), shape=shape)
        pieces = csr_views(m, block_nnz, MAX_BLOCK_ROWS)
        del m
    del parts  # held by ``pieces`` only, which goes before the next shard
    yield from _labelled(_last_copied(pieces), labs)


def _unit_blocks(unit: sp.csr_matrix, labs: dict[str, np.ndarray] | None,
                 piece_nnz: int | None) -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
    """A streamed unit as row blocks (views) of about ``piece_nnz`` entries, so that the
    writer's canonical copy of a block stays about that small."""
    if piece_nnz is None:
        piece_nnz = max(1024, DEFAULT_PIECE_BYTES // unit.data.itemsize)
    yield from _labelled(_last_copied(csr_views(unit, piece_nnz)), labs or {})


def _dense_pieces(m: np.ndarray) -> Iterator[tuple[int, int, Any]]:
    step = max(1, (16 * 2**20) // max(1, m.shape[1] * m.itemsize))
    for a in range(0, max(1, m.shape[0]), step):
        yield a, min(a + step, m.shape[0]), m[a : a + step]


def _last_copied(pieces: Iterator[tuple[int, int, Any]]) -> Iterator[tuple[int, int, Any]]:
    """The pieces of one shard, the last one copied if there were several.

    The writer still holds the last block it got while it asks for the next (and, with
    ``workers=1``, while the next shard decompresses): a view would pin the whole shard.
    """
    prev = next(pieces, None)
    several = False
    for cur in pieces:
        yield prev  # type: ignore[misc]
        prev, several = cur, True
    if prev is not None:
        a, b, block = prev
        yield a, b, (block.copy() if several else block)


def _labelled(pieces: Iterator[tuple[int, int, Any]], labs: dict[str, np.ndarray]
              ) -> Iterator[tuple[Any, dict[str, np.ndarray] | None]]:
    for a, b, block in pieces:
        yield block, ({k: v[a:b] for k, v in labs.items()} or None)


def from_npz(dst: Any, src: Any, *, key: str | None = None,
             keys: Mapping[str, str] | None = None, labels: Sequence[str] | None = None,
             workers: int | None = None, executor: Executor | None = None,
             max_bytes: int = DEFAULT_MAX_BYTES, dtype: Any = None, sparse: bool = True,
             **options: Any) -> Any:
    """Store ``.npz`` shards (see :func:`npz_source`); atomic, in the given order."""
    source = npz_source(src, key=key, keys=keys, labels=labels, workers=workers,
                        executor=executor, max_bytes=max_bytes, dtype=dtype, sparse=sparse)
    return write_source(dst, source, sparse=sparse, **options)


__all__ = [
    "NpzOptions",
    "ShardInfo",
    "from_npz",
    "load_shard",
    "npz_source",
    "scan_shard",
    "shard_items",
]
