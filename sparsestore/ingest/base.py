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
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

from ..blocks import entry_bounds
from ..errors import FormatError, InvalidInputError, StoreNotFoundError
from ..progress import make_bar

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
    store_path: str | None = None  # a sparsestore store holding these rows (random access)
    store_options: dict[str, Any] | None = None  # fsspec options of a remote store_path


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


def row_bounds(
    indptr: Any, n_rows: int, target_nnz: int = DEFAULT_BLOCK_NNZ, max_rows: int = 2**18
) -> Iterator[tuple[int, int]]:
    """Row ranges cut by :func:`~sparsestore.blocks.entry_bounds`, reading a lazy ``indptr``
    (zarr, h5py, numpy: anything sliceable) ``max_rows + 1`` entries at a time, so a
    billion-row pointer array is never loaded whole."""
    for a in range(0, n_rows, max_rows):
        hi = min(n_rows, a + max_rows)
        bounds = entry_bounds(np.asarray(indptr[a : hi + 1], dtype=np.int64), target_nnz)
        for lo, up in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            yield a + lo, a + up


class IndptrView:
    """A store's ``indptr`` sliceable like an array (for :func:`row_bounds`)."""

    def __init__(self, store: Any) -> None:
        self._s = store

    def __getitem__(self, key: slice) -> np.ndarray:
        return self._s.indptr(key.start, key.stop - 1)


class Spill:
    """A private temporary directory of ``np.save`` records (``allow_pickle=False``).

    Created at the first :meth:`append` under ``tmp_dir`` (default: the system temp dir);
    :meth:`close` removes it.  A file holds groups of arrays appended one after another.
    """

    def __init__(self, tmp_dir: str | os.PathLike[str] | None = None) -> None:
        self.tmp_dir = tmp_dir
        self.dir: str | None = None

    def path(self, name: str) -> str:
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="sparsestore-spill-", dir=self.tmp_dir)
        return os.path.join(self.dir, name)

    def append(self, name: str, arrays: Iterable[np.ndarray]) -> None:
        """Append one group of arrays to file ``name``."""
        with open(self.path(name), "ab") as f:
            for arr in arrays:
                np.save(f, arr, allow_pickle=False)

    def size(self, name: str) -> int | None:
        """File ``name``'s size in bytes, ``None`` if nothing was appended to it."""
        if self.dir is None:
            return None
        try:
            return os.path.getsize(os.path.join(self.dir, name))
        except FileNotFoundError:
            return None

    def groups(self, name: str, k: int) -> Iterator[list[np.ndarray]]:
        """The groups of ``k`` arrays appended to ``name``, in order; the file goes after."""
        path = self.path(name)
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            while f.tell() < end:
                yield [np.load(f, allow_pickle=False) for _ in range(k)]
        os.remove(path)

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


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
    casting: str = "same_value",
    desc: str = "convert",
    **layout_options: Any,
) -> Any:
    """Write ``source`` to a new store at ``dst`` through ``write_blocks`` (atomic).

    ``desc``: the progress bar's verb (the source's file name follows it).
    ``nan_policy``: ``"raise"`` refuses NaN and infinite values, ``"keep"`` stores them.
    ``casting``: how block values are cast to ``dtype`` (see :func:`write_blocks`).
    """
    from ..layout import Layout
    from ..writer import write_blocks

    dt = np.dtype(source.dtype if dtype is None else dtype)
    # The store writes data/indices/indptr in whole chunks whatever the block sizes, so
    # joining blocks only saves per-block work (canonical checks, label writes) for tiny
    # blocks; a quarter chunk does that without copying blocks of that size or more.
    target = max(1, Layout.from_options(**layout_options).nnz_chunk(dt.itemsize) // 4)
    bar = make_bar(progress, source.n_rows, f"{desc} {os.path.basename(source.name)}")
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
            casting=casting,
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
    "IndptrView",
    "Source",
    "Spill",
    "check_n_cols",
    "coalesce",
    "expand_paths",
    "open_text",
    "result_dtype",
    "row_bounds",
    "write_source",
]
