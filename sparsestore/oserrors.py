"""The one place where operating-system failures become sparsestore errors.

A full disk, a file size limit, a read-only mount, a busy mount point or a lock file that
is not a file reach the caller as a :class:`~sparsestore.errors.StorageError` subclass
that is still the ``OSError`` (same ``errno`` and ``filename``) and says what to do.
Public entry points wrap themselves with :class:`os_errors`; other ``OSError`` s pass
through unchanged.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from .errors import (
    CredentialsError,
    DiskFullError,
    FileTooLargeError,
    LockFileError,
    LockFileIsDirectoryError,
    ReadOnlyStorageError,
    SparseStoreError,
    StorageError,
    StoreBusyError,
)
from .storage import LOCK_NAME, normalize

F = TypeVar("F", bound=Callable[..., Any])


def _disk_full(action: str, path: str, exc: OSError) -> StorageError:
    what = "the disk quota is used up" if exc.errno == errno.EDQUOT else "the disk is full"
    writing = f" (writing {exc.filename})" if exc.filename else ""
    return DiskFullError(
        exc.errno, f"cannot {action} {path}: {what}{writing}; free space on that file system "
        "(or raise the quota) and retry; nothing past the last commit is kept",
        exc.filename,
    )


def _too_large(action: str, path: str, exc: OSError) -> StorageError:
    return FileTooLargeError(
        exc.errno, f"cannot {action} {path}: {exc.filename or 'a file'} would exceed the "
        "largest file allowed (the process's file size limit, RLIMIT_FSIZE / `ulimit -f`, or "
        "the file system's maximum); raise the limit (or pick a smaller chunk_bytes/"
        "shard_bytes) and retry",
        exc.filename,
    )


def _read_only(action: str, path: str, exc: OSError) -> StorageError:
    return ReadOnlyStorageError(
        exc.errno, f"cannot {action} {path}: it is on a read-only file system; remount it "
        "read-write, or open it with mode='r' to read (save writes to a writable path)",
        exc.filename,
    )


def _busy(action: str, path: str, exc: OSError) -> StorageError:
    return StoreBusyError(
        exc.errno, f"cannot {action} {path}: {exc.filename or path} is busy (a mount point, "
        "or in use by another program), so it cannot be renamed or replaced; save to a path "
        "inside it or elsewhere, or unmount it, and retry",
        exc.filename,
    )


_BY_ERRNO: dict[int, Callable[[str, str, OSError], StorageError]] = {
    errno.ENOSPC: _disk_full,
    errno.EDQUOT: _disk_full,
    errno.EFBIG: _too_large,
    errno.EROFS: _read_only,
    errno.EBUSY: _busy,
}


def _lock_file(action: str, path: str, exc: OSError) -> StorageError | None:
    """The refusal for a lock file path that is a directory or a symbolic link."""
    lock = exc.filename
    if exc.errno == errno.EISDIR:
        return LockFileIsDirectoryError(
            exc.errno, f"cannot {action} {path}: its lock file {lock} is a directory; remove "
            f"it (rmdir '{lock}') and retry",
            lock,
        )
    if exc.errno == errno.ELOOP:
        return LockFileError(
            exc.errno, f"cannot {action} {path}: its lock file {lock} is a symbolic link, "
            "which is not followed (it would create or lock a file outside the store); remove "
            f"the link (rm '{lock}') and retry",
            lock,
        )
    return None


def _no_credentials(exc: BaseException) -> bool:
    """Whether ``exc`` is botocore's "no (or partial) credentials" (s3fs lets it through)."""
    kind = type(exc)
    return kind.__module__.startswith("botocore") and kind.__name__.endswith(
        "CredentialsError")


def translate(exc: BaseException, action: str, path: str) -> BaseException:
    """The sparsestore error for ``exc`` (an ``OSError`` we know, or missing object storage
    credentials), else ``exc`` itself."""
    if _no_credentials(exc):
        return CredentialsError(
            errno.EACCES, f"cannot {action} {path}: no credentials for object storage "
            f"({exc}); pass them in storage_options (key, secret; the command line's "
            "--storage-options) or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(see the README's Object storage)",
        )
    if not isinstance(exc, OSError) or isinstance(exc, SparseStoreError):
        return exc
    name = exc.filename
    if isinstance(name, (str, os.PathLike)) and os.path.basename(os.fspath(name)) == LOCK_NAME:
        out = _lock_file(action, path, exc)
        if out is not None:
            return out
    make = _BY_ERRNO.get(exc.errno) if exc.errno is not None else None
    return exc if make is None else make(action, path, exc)


def _path_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The store path of a call: ``self.path``, else the ``path`` argument."""
    target = kwargs.get("path", args[0] if args else None)
    target = getattr(target, "path", target)
    try:
        return normalize(target)
    except TypeError:
        return repr(target)


class os_errors:  # noqa: N801 - used like contextlib's lower-case context managers
    """Raise known OS failures inside as :class:`StorageError` s naming ``action`` and ``path``.

    ``with os_errors("append to", path): ...``, or ``@os_errors("save")`` on a function whose
    first argument is the path (or an object with a ``path``).
    """

    def __init__(self, action: str, path: str | os.PathLike[str] | None = None) -> None:
        self.action = action
        self.path = path

    def __enter__(self) -> os_errors:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            return False
        out = translate(exc, self.action, os.fspath(self.path) if self.path else "")
        if out is exc:
            return False
        raise out from exc

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with os_errors(self.action, self.path or _path_of(args, kwargs)):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
