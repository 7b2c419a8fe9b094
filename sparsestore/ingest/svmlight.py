"""svmlight / libsvm text files (``label [qid:n] idx:val ...  # comment``), streamed.

Lines are parsed ``chunk_lines`` at a time into CSR row blocks; the target becomes
``labels["y"]`` (float64, as scikit-learn reads it) and query ids, when present,
``labels["qid"]`` (int64).  With ``n_features`` given and ``zero_based`` True/False the
file is written as it is parsed.  Otherwise (the defaults, like scikit-learn's
``load_svmlight_file``) the column count or index base is only known after the last line,
so parsed blocks are spilled to a temporary directory (a
:class:`~sparsestore.ingest.base.Spill`) and written from there: one parse, bounded memory,
one extra pass over local disk.
"""

from __future__ import annotations

import itertools
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..canonical import cast_values
from ..errors import FormatError, InvalidInputError
from ..layout import MAX_DIM
from .base import Source, Spill, expand_paths, open_text


@dataclass
class _Block:
    values: np.ndarray
    indices: np.ndarray  # as written in the file (base not yet removed)
    indptr: np.ndarray
    y: np.ndarray
    qid: np.ndarray | None


def _number(tok: str, dtype: type, what: str) -> Any:
    """One token as numpy parses it in a chunk, or a ValueError saying what is wrong."""
    try:
        return np.array([tok], dtype=dtype)[0]
    except (ValueError, OverflowError):
        kind = "an integer in the int64 range" if dtype is np.int64 else "a number"
        raise ValueError(f"{what}: {tok!r} is not {kind}") from None


def _check_line(toks: list[str]) -> None:
    """Parse one line's tokens one by one, raising ValueError at the first bad one."""
    _number(toks[0], np.float64, "bad label")
    rest = toks[1:]
    if rest and rest[0].startswith("qid:"):
        _number(rest[0][4:], np.int64, "bad qid")
        rest = rest[1:]
    for t in rest:
        if t.count(":") != 1:
            raise ValueError(f"feature {t!r} is not of the form index:value")
        i, v = t.split(":")
        if int(_number(i, np.int64, f"bad index:value pair {t!r}, index")) < 0:
            raise ValueError(f"bad index:value pair {t!r}: negative feature index")
        _number(v, np.float64, f"bad index:value pair {t!r}, value")


def _bad_line(lines: list[str], path: str, first_line: int, exc: Exception) -> FormatError:
    """The error for a chunk that did not parse, naming its first bad line (found again
    line by line: only failures pay for it)."""
    for k, raw in enumerate(lines):
        toks = raw.split("#", 1)[0].split()
        if not toks:
            continue
        try:
            _check_line(toks)
        except ValueError as err:
            return FormatError(f"{path}, line {first_line + k}: {err}")
    return FormatError(
        f"{path}, lines {first_line}-{first_line + len(lines) - 1}: cannot parse them ({exc})"
    )


def _parse_lines(lines: list[str], path: str, first_line: int, dtype: np.dtype,
                 casting: str = "same_value") -> _Block:
    """Parse a chunk of lines into CSR parts (indices still in the file's base)."""
    ys: list[str] = []
    qids: list[str] = []
    feats: list[str] = []
    counts: list[int] = []
    has_qid: bool | None = None
    for k, raw in enumerate(lines):
        hash_at = raw.find("#")
        toks = (raw if hash_at < 0 else raw[:hash_at]).split()
        if not toks:
            continue
        ys.append(toks[0])
        rest = toks[1:]
        q = bool(rest) and rest[0].startswith("qid:")
        if has_qid is None:
            has_qid = q
        elif q != has_qid:
            raise FormatError(
                f"{path}, line {first_line + k}: some lines have qid:... and some do not"
            )
        if q:
            qids.append(rest[0][4:])
            rest = rest[1:]
        feats.extend(rest)
        counts.append(len(rest))
    n = len(ys)
    joined = " ".join(feats)
    pairs = joined.replace(":", " ").split()
    try:
        y = np.array(ys, dtype=np.float64)
        qid = np.array(qids, dtype=np.int64) if has_qid else None
        if len(pairs) != 2 * len(feats) or any(t.count(":") != 1 for t in feats):
            raise ValueError("a feature is not of the form index:value")
        idx = np.array(pairs[0::2], dtype=np.int64)
        vals = np.array(pairs[1::2], dtype=np.float64)
        if idx.size and int(idx.min()) < 0:
            raise ValueError(f"negative feature index {int(idx.min())}")
    except (ValueError, OverflowError) as exc:
        raise _bad_line(lines, path, first_line, exc) from None
    vals = cast_values(vals, dtype, casting=casting, where=lambda k: (
        f"{path}, lines {first_line}-{first_line + len(lines) - 1}, feature {int(idx[k])}"))
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.asarray(counts, dtype=np.int64), out=indptr[1:])
    return _Block(vals, idx, indptr, y, qid)


def _parsed_blocks(
    paths: Sequence[str], chunk_lines: int, dtype: np.dtype, casting: str = "same_value"
) -> Iterator[tuple[str, _Block]]:
    for path in paths:
        try:
            with open_text(path) as f:
                line = 1
                while True:
                    lines = list(itertools.islice(f, chunk_lines))
                    if not lines:
                        break
                    block = _parse_lines(lines, path, line, dtype, casting)
                    line += len(lines)
                    if block.y.size:
                        yield path, block
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
            raise FormatError(f"{path}: cannot read it as svmlight text ({exc})") from None


def svmlight_source(
    src: Any,
    *,
    n_features: int | None = None,
    zero_based: bool | str = "auto",
    dtype: Any = np.float64,
    chunk_lines: int = 65536,
    tmp_dir: str | os.PathLike[str] | None = None,
    casting: str = "same_value",
) -> Source:
    """A :class:`Source` over svmlight file(s) (a path, glob or list, rows concatenated).

    ``zero_based="auto"`` treats indices as one-based unless some index is 0 (as
    scikit-learn does); ``n_features`` defaults to the largest index seen.  Values are
    parsed as float64 and cast to ``dtype`` by :func:`~sparsestore.canonical.cast_values`
    (``casting``).
    """
    paths = expand_paths(src, what="svmlight")
    dt = np.dtype(dtype)
    if zero_based not in (True, False, "auto"):
        raise InvalidInputError(f"zero_based must be True, False or 'auto', got {zero_based!r}")
    if n_features is not None and (not isinstance(n_features, (int, np.integer))
                                   or n_features < 0):
        raise InvalidInputError(f"n_features must be a non-negative integer, got {n_features!r}")
    streaming = n_features is not None and zero_based != "auto"
    has_qid = _first_has_qid(paths)
    label_names = ["y", "qid"] if has_qid else ["y"]

    def to_pair(block: _Block, base: int, n_cols: int, path: str) -> tuple[Any, dict]:
        ind = block.indices - base
        if ind.size and (int(ind.min()) < 0 or int(ind.max()) >= n_cols):
            bad = int(block.indices.min()) if int(ind.min()) < 0 else int(block.indices.max())
            raise FormatError(
                f"{path}: feature index {bad} is out of range for {n_cols} features "
                f"({'zero' if base == 0 else 'one'}-based); pass n_features= or zero_based="
            )
        m = sp.csr_matrix((block.values, ind, block.indptr), shape=(block.y.size, n_cols))
        labs = {"y": block.y}
        if has_qid:
            if block.qid is None:
                raise FormatError(f"{path}: qid:... is missing on some lines")
            labs["qid"] = block.qid
        elif block.qid is not None:
            raise FormatError(f"{path}: qid:... appears on some lines but not the first")
        return m, labs

    if streaming:
        base = 0 if zero_based else 1

        def blocks() -> Iterator[tuple[Any, dict]]:
            for path, block in _parsed_blocks(paths, chunk_lines, dt, casting):
                yield to_pair(block, base, int(n_features), path)

        return Source(name=_name(paths), n_cols=int(n_features), dtype=dt, blocks=blocks,
                      labels=label_names)

    # One parse into a spill directory: the column count / base is known at the end.
    spill = Spill(tmp_dir)
    names: list[str] = []  # the file each spilled block came from
    lo, hi = None, -1
    try:
        for path, block in _parsed_blocks(paths, chunk_lines, dt, casting):
            if block.indices.size:
                bmin, bmax = int(block.indices.min()), int(block.indices.max())
                lo = bmin if lo is None else min(lo, bmin)
                hi = max(hi, bmax)
                if n_features is None and hi >= MAX_DIM:
                    raise FormatError(
                        f"{path}: feature index {hi} is beyond the largest column count a "
                        f"store allows ({MAX_DIM})"
                    )
            qid = block.qid if block.qid is not None else np.empty(0, dtype=np.int64)
            spill.append("blocks.npy", (block.values, block.indices, block.indptr, block.y, qid))
            names.append(path)
    except BaseException:
        spill.close()
        raise
    if zero_based == "auto":
        base = 0 if (lo == 0 or lo is None) else 1
    else:
        base = 0 if zero_based else 1
    n_cols = int(n_features) if n_features is not None else max(0, hi + 1 - base)

    def spilled_blocks() -> Iterator[tuple[Any, dict]]:
        try:
            if not names:
                return
            groups = spill.groups("blocks.npy", 5)
            for path, (values, indices, indptr, y, qid) in zip(names, groups, strict=True):
                block = _Block(values, indices, indptr, y, qid if qid.size else None)
                yield to_pair(block, base, n_cols, path)
        finally:
            spill.close()

    return Source(name=_name(paths), n_cols=n_cols, dtype=dt, blocks=spilled_blocks,
                  labels=label_names, close=spill.close)


def _first_has_qid(paths: Sequence[str]) -> bool:
    """Whether the first data line carries a query id (then every line must)."""
    for path in paths:
        try:
            with open_text(path) as f:
                for raw in itertools.islice(f, 1_000_000):
                    toks = raw.split("#", 1)[0].split()
                    if toks:
                        return len(toks) > 1 and toks[1].startswith("qid:")
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
            raise FormatError(f"{path}: cannot read it as svmlight text ({exc})") from None
    return False


def _name(paths: Sequence[str]) -> str:
    return paths[0] if len(paths) == 1 else f"{len(paths)} svmlight files"


__all__ = ["svmlight_source"]
