"""What every file source shares: a :class:`Source` description and the one write call.

A source knows its column count and dtype up front (``write_blocks`` needs them before the
first block) and yields ``(row block, labels block or None)`` pairs on demand, so
nothing ever holds the whole matrix.  :func:`write_source` hands those blocks to
:func:`sparsestore.write_blocks`, the single atomic write path.
"""

from __future__ import annotations

import bz2
import contextlib
import glob as _glob
import gzip
import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

from ..errors import FormatError, InvalidInputError, StoreNotFoundError
from .scipy import scipy_row_blocks

BlockPair = tuple[Any, Mapping[str, np.ndarray] | None]

# Stored entries per row block handed to the writer: big enough to amortise zarr calls,
# small enough that the writer's canonicalisation copy stays small.
DEFAULT_BLOCK_NNZ = 2**20
# Bytes of COO entries a source may hold in memory before spilling to disk.
DEFAULT_MEMORY_BYTES = 256 * 2**20


@dataclass
class Source:
    """A matrix to import: shape and dtype known up front, row blocks produced on demand.

    ``blocks`` is called once and yields ``(block, labels)`` pairs covering rows
    ``0..n_rows`` in order (``n_rows`` may be ``None`` when only a full pass can tell).
    """

    name: str
    n_cols: int
    dtype: np.dtype
    blocks: Callable[[], Iterator[BlockPair]]
    n_rows: int | None = None
    labels: list[str] = field(default_factory=list)
    dense: bool = False  # the source is dense (a dense store keeps it as is with sparse=False)
    close: Callable[[], None] | None = None  # frees temporary files if blocks() never ran
    threads: int = 1  # threads blocks() decodes on; > 1: the writer encodes on one more


def expand_paths(src: Any, *, what: str = "source") -> list[str]:
    """A path, glob pattern or list of paths as a list of existing file paths.

    A glob is expanded in sorted order; a list keeps its order.  Missing files raise
    :class:`StoreNotFoundError` naming them.
    """
    if isinstance(src, (str, os.PathLike)):
        p = os.path.expanduser(os.fspath(src))
        if _glob.has_magic(p) and not os.path.exists(p):
            found = sorted(_glob.glob(p))
            if not found:
                raise StoreNotFoundError(f"no files match {p!r}; check the {what} pattern")
            return found
        items = [p]
    elif isinstance(src, Iterable):
        items = [os.path.expanduser(os.fspath(s)) for s in src]
        if not items:
            raise InvalidInputError(f"the list of {what} files is empty; pass at least one path")
    else:
        raise InvalidInputError(
            f"{what} must be a path, a glob pattern or a list of paths, got {type(src).__name__}"
        )
    for p in items:
        if not os.path.exists(p):
            raise StoreNotFoundError(f"no such file: {p}; check the {what} path")
    return items


def open_text(path: str, encoding: str = "utf-8") -> IO[str]:
    """Open a text file, gzip- or bz2-compressed or not (judged by its magic bytes)."""
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic[:2] == b"\x1f\x8b":
        opener: Callable[..., Any] = gzip.open
    elif magic == b"BZh":
        opener = bz2.open
    else:
        opener = open
    return io.TextIOWrapper(opener(path, "rb"), encoding=encoding, newline=None)


def csr_blocks(X: Any, target_nnz: int = DEFAULT_BLOCK_NNZ) -> Iterator[sp.csr_matrix]:
    """Cut one in-memory matrix into CSR row blocks of about ``target_nnz`` entries.

    A CSR input is cut into views of its arrays (no copy of values or indices).
    """
    if sp.issparse(X) and X.format == "csr":
        n = X.shape[0]
        for a, b in row_bounds(X.indptr, n, target_nnz) if n else [(0, 0)]:
            lo, hi = int(X.indptr[a]), int(X.indptr[b])
            yield sp.csr_matrix(
                (_view(X.data, lo, hi), _view(X.indices, lo, hi), X.indptr[a : b + 1] - lo),
                shape=(b - a, X.shape[1]), copy=False,
            )
        return
    for _, _, block in scipy_row_blocks(X, target_nnz=target_nnz):
        yield block


def _view(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``a[lo:hi]`` as a view scipy keeps: it copies a slice of a much larger ndarray (its
    ``_prune_array``), not one whose base is a memoryview."""
    if isinstance(a, np.ndarray) and a.ndim == 1 and a.flags.c_contiguous and a.size:
        try:
            return np.asarray(memoryview(a)[lo:hi])
        except (TypeError, ValueError):  # a dtype memoryview cannot express
            pass
    return a[lo:hi]


def row_bounds(
    indptr: Any, n_rows: int, target_nnz: int = DEFAULT_BLOCK_NNZ, max_rows: int = 2**18
) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``target_nnz`` entries, reading a lazy ``indptr`` piece by piece.

    ``indptr`` is anything sliceable (zarr, h5py, numpy); at most ``max_rows + 1`` entries
    are read at a time, so a billion-row pointer array is never loaded whole.
    """
    a = 0
    while a < n_rows:
        hi = min(n_rows, a + max_rows)
        ptr = np.asarray(indptr[a : hi + 1], dtype=np.int64)
        k = int(np.searchsorted(ptr, ptr[0] + target_nnz, side="right")) - 1
        b = min(hi, a + max(1, k))
        yield a, b
        a = b


def write_source(
    dst: Any,
    source: Source,
    *,
    dtype: Any = None,
    sparse: bool = True,
    overwrite: bool = False,
    progress: Any = None,
    storage_options: dict[str, Any] | None = None,
    nan_policy: str = "raise",
    **layout_options: Any,
) -> Any:
    """Write ``source`` to a new store at ``dst`` through ``write_blocks`` (atomic).

    ``nan_policy``: ``"raise"`` refuses NaN and infinite values, ``"keep"`` stores them.
    """
    from ..layout import Layout
    from ..store import write_blocks

    dt = np.dtype(source.dtype if dtype is None else dtype)
    # The store writes data/indices/indptr in whole chunks whatever the block sizes, so
    # joining blocks only saves per-block work (canonical checks, label writes) for tiny
    # blocks; a quarter chunk does that without copying blocks of that size or more.
    target = max(1, Layout.from_options(**layout_options).nnz_chunk(dt.itemsize) // 4)
    bar = make_progress(progress, source.n_rows, f"convert {os.path.basename(source.name)}")
    gen = source.blocks()
    try:
        return write_blocks(
            dst,
            coalesce(gen, target),
            n_cols=source.n_cols,
            dtype=dt,
            sparse=sparse,
            overwrite=overwrite,
            storage_options=storage_options,
            progress=bar,
            encode_thread=source.threads > 1,
            nan_policy=nan_policy,
            **layout_options,
        )
    finally:
        close = getattr(gen, "close", None)
        if close is not None:  # release open files and spill directories now, not at GC
            with contextlib.suppress(Exception):
                close()
        if source.close is not None:
            with contextlib.suppress(Exception):
                source.close()
        if bar is not None:
            bar.close()


def coalesce(
    pairs: Iterable[BlockPair], target_nnz: int, max_rows: int = 2**20
) -> Iterator[BlockPair]:
    """Join consecutive small sparse blocks (and their labels) into ~``target_nnz`` blocks.

    Big blocks and dense blocks pass through unchanged (what is held goes first, on its
    own); at most ``target_nnz`` entries (or ``max_rows`` rows) are held back.
    """
    buf: list[Any] = []
    labs: list[Mapping[str, np.ndarray] | None] = []
    nnz = rows = 0

    def flush() -> BlockPair:
        nonlocal buf, labs, nnz, rows
        if len(buf) == 1:
            out: BlockPair = (buf[0], labs[0])
        else:
            joined = None
            if labs[0] is not None:
                joined = {k: np.concatenate([np.asarray(lab[k]) for lab in labs])  # type: ignore[index]
                          for k in labs[0]}
            out = (sp.vstack(buf, format="csr"), joined)
        buf, labs, nnz, rows = [], [], 0, 0
        return out

    for block, lab in pairs:
        joinable = sp.issparse(block) and block.ndim == 2
        if buf and (not joinable or block.shape[1] != buf[0].shape[1]
                    or _keys(lab) != _keys(labs[0]) or block.nnz >= target_nnz):
            yield flush()  # a big block is not copied to join what is held
        if not joinable or (not buf and block.nnz >= target_nnz):
            yield block, lab
            continue
        buf.append(block)
        labs.append(lab)
        nnz += int(block.nnz)
        rows += int(block.shape[0])
        if nnz >= target_nnz or rows >= max_rows:
            yield flush()
    if buf:
        yield flush()


def _keys(lab: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    return None if lab is None else tuple(lab)


def make_progress(progress: Any, total: int | None, desc: str) -> Any:
    """A tqdm bar in rows: ``None`` shows it on a terminal only, ``False`` never."""
    if progress is False:
        return None
    if progress is not None and progress is not True:
        return progress  # a caller-made bar (anything with update/close)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True,
                disable=None if progress is None else False)


def check_n_cols(name: str, n_cols: int, expected: int) -> None:
    """Refuse a file whose column count differs from the first file's."""
    if n_cols != expected:
        raise FormatError(
            f"{name} has {n_cols} columns but the first file has {expected}; all files of one "
            "store must have the same number of columns"
        )


def result_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    """The dtype that holds every file's values without loss."""
    return np.result_type(*dtypes) if dtypes else np.dtype(np.float32)


__all__ = [
    "BlockPair",
    "DEFAULT_BLOCK_NNZ",
    "DEFAULT_MEMORY_BYTES",
    "Source",
    "check_n_cols",
    "coalesce",
    "csr_blocks",
    "expand_paths",
    "make_progress",
    "open_text",
    "result_dtype",
    "row_bounds",
    "write_source",
]
