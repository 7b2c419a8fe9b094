"""Where a store lives: local paths and fsspec URLs, atomic creation, the writer lock.

Local stores are built in a hidden sibling directory and renamed into place, so an
interrupted ``save`` leaves no store at all and never clobbers an existing one.  Remote
stores (``s3://``...) cannot be renamed; they are written in place, marked incomplete
until the last step, and deleted on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zarr
from zarr.storage import FsspecStore, LocalStore

from .errors import LockError, StoreExistsError, StoreNotFoundError

try:  # POSIX advisory locks are released by the kernel when the holder dies.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".sparsestore.lock"


def _strip_file_url(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for fsspec URLs other than ``file://``."""
    p = os.fspath(path)
    return "://" in p and not p.startswith("file://")


def normalize(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if is_remote(p):
        return p.rstrip("/")
    return str(Path(_strip_file_url(p)).expanduser().absolute())


def zarr_store(path: str, *, read_only: bool, storage_options: dict[str, Any] | None = None):
    """The zarr store object for a normalised path or URL."""
    if is_remote(path):
        return FsspecStore.from_url(
            path, storage_options=storage_options or {}, read_only=read_only
        )
    return LocalStore(path, read_only=read_only)


def _fs(path: str, storage_options: dict[str, Any] | None):
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs, root


def exists(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether anything (file, directory, object prefix) is at ``path``."""
    if is_remote(path):
        fs, root = _fs(path, storage_options)
        return bool(fs.exists(root)) or bool(fs.exists(root + "/zarr.json"))
    return os.path.lexists(path)


def remove(path: str, storage_options: dict[str, Any] | None = None) -> None:
    if is_remote(path):
        fs, root = _fs(path, storage_options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(root, recursive=True)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def staged(
    path: str, *, overwrite: bool, storage_options: dict[str, Any] | None = None
) -> Iterator[str]:
    """Yield a location to build a new store in; publish it at ``path`` on success.

    On any exception (or a kill) nothing appears at ``path`` and an existing store there is
    untouched.  ``overwrite=False`` refuses an existing path up front.
    """
    if exists(path, storage_options) and not overwrite:
        raise StoreExistsError(
            f"{path} already exists; pass overwrite=True to replace it, or choose another path"
        )
    if is_remote(path):
        if overwrite:
            remove(path, storage_options)
        try:
            yield path
        except BaseException:
            remove(path, storage_options)
            raise
        return
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise StoreNotFoundError(f"parent directory {parent} does not exist; create it first")
    # Replacing a store that a writer has open would pull it from under that writer.
    existing = (
        WriteLock(path).acquire()
        if os.path.isdir(path) and not os.path.islink(path)
        and os.access(path, os.W_OK) else None
    )
    name = os.path.basename(path)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        if os.path.lexists(path):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            remove(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    finally:
        if existing is not None:
            existing.release()


class WriteLock:
    """An exclusive, non-blocking writer lock on a local store (``flock`` on a file inside).

    The kernel drops the lock when its holder dies, so a killed writer never leaves a
    stale lock behind.  Remote stores are not locked (object stores have no such
    primitive); one writer at a time is then the caller's responsibility.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> WriteLock:
        if is_remote(self.path) or fcntl is None:
            return self
        lock_file = os.path.join(self.path, LOCK_NAME)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LockError(
                f"{self.path} is open for writing by another writer; close it (or wait for it "
                "to finish) before appending, or open with mode='r' to read"
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None or is_remote(self.path)


def open_group(path: str, *, mode: str, storage_options: dict[str, Any] | None = None):
    """Open the zarr group at ``path`` (v2 or v3), raising our errors for missing paths."""
    store = zarr_store(path, read_only=(mode == "r"), storage_options=storage_options)
    try:
        return zarr.open_group(store=store, mode="r" if mode == "r" else "r+")
    except FileNotFoundError as exc:
        raise StoreNotFoundError(f"no store at {path}") from exc
