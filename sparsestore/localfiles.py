"""Reads of a local store's objects: a whole object into pooled memory, a byte range (or an
object's end) by one ``preadv`` into memory the caller reuses, or several ranges through
one open file."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .buffers import BufferPool

__all__ = ["pread", "pread_each", "read_whole"]

_ABSENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def read_whole(path: str, pool: BufferPool) -> np.ndarray | None:
    """A whole file's bytes in ``pool`` memory; None when the file is absent."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = f.seek(0, 2)
            f.seek(0)
            buf = pool.take(size, np.uint8)
            return buf[: f.readinto(buf)]
    except _ABSENT:
        return None


def pread(path: str, start: int | None, stop: int, pool: BufferPool | None,
          into: np.ndarray | None = None) -> np.ndarray | None:
    """Bytes ``[start, stop)`` of a file (its last ``stop`` bytes when ``start`` is None) by
    one ``preadv`` into ``into`` (when it is large enough) or ``pool`` memory; None when the
    file is absent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except _ABSENT:
        return None
    try:
        if start is None:
            size = os.fstat(fd).st_size
            start, stop = max(0, size - stop), size
        n = max(0, stop - start)
        if into is not None and into.size >= n:
            buf = into
        else:
            buf = np.empty(n, np.uint8) if pool is None else pool.take(n, np.uint8)
        got = os.preadv(fd, [buf[:n]], start) if n else 0
        return buf[:got]
    finally:
        os.close(fd)


def pread_each(path: str, ranges: list[tuple[int, int]],
               into: np.ndarray | None) -> list[np.ndarray] | None:
    """Byte ranges of a file, one ``preadv`` each through one open file, side by side in
    ``into`` (when large enough); None when the file is absent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except _ABSENT:
        return None
    try:
        total = sum(b - a for a, b in ranges)
        buf = into if into is not None and into.size >= total else np.empty(total, np.uint8)
        parts, at = [], 0
        for a, b in ranges:
            got = os.preadv(fd, [buf[at : at + b - a]], a)
            parts.append(buf[at : at + got])
            at += b - a
        return parts
    finally:
        os.close(fd)
