"""Where a store lives: local paths and fsspec URLs, atomic creation, the writer lock, and
cutting arrays back to their committed length after a failed or killed write.

Local stores are built in a hidden sibling directory and renamed into place, so an
interrupted ``save`` leaves no store at all and never clobbers an existing one.  Remote
stores (``s3://``...) cannot be renamed; they are written in place, marked incomplete
until the last step, and deleted on failure.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from .errors import LockError, StoreExistsError, StoreNotFoundError

try:  # POSIX advisory locks are released by the kernel when the holder dies.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".sparsestore.lock"

# zarr's LocalStore writes a key to ``<key without suffix>.<uuid4 hex>.partial`` and renames
# it into place; a writer killed in between leaves that file behind.
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial\Z")


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


#: fsspec options sparsestore sets for a protocol unless the caller's ``storage_options``
#: say otherwise.  s3fs reads a whole object (``cat_file`` without a range, how zarr reads
#: every chunk and metadata document) by first asking its size with a HEAD request whenever
#: ``max_concurrency`` > 1 (its default, 10), so that an object over its block size (50 MB)
#: can be fetched in parallel parts.  Chunks are far smaller than that, so the HEAD only
#: doubled the round trips per chunk; with 1 each read is a single GET.  (The option also
#: bounds parallel parts of one multipart upload; a chunk is one part.)  botocore keeps
#: 10 connections per client by default, which would cap the requests sparsestore keeps in
#: flight (:mod:`sparsestore.fetch`) at 10; ``config_kwargs`` entries are merged one by one.
REMOTE_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {"max_concurrency": 1, "config_kwargs": {"max_pool_connections": 64}},
    "s3a": {"max_concurrency": 1, "config_kwargs": {"max_pool_connections": 64}},
}


def remote_options(path: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` over :data:`REMOTE_DEFAULTS` for ``path``'s protocol: what the
    caller passes always wins (``config_kwargs`` key by key)."""
    protocol = path.split("://", 1)[0].lower() if "://" in path else ""
    defaults = REMOTE_DEFAULTS.get(protocol, {})
    user = dict(storage_options or {})
    out = {**defaults, **user}
    if isinstance(defaults.get("config_kwargs"), dict) and isinstance(
            user.get("config_kwargs", {}), dict):
        out["config_kwargs"] = {**defaults["config_kwargs"], **user.get("config_kwargs", {})}
    return out


def zarr_store(path: str, *, read_only: bool, storage_options: dict[str, Any] | None = None):
    """The zarr store object for a normalised path or URL, checking chunks against the
    store's manifest once one is installed (:class:`~sparsestore.verified.VerifiedStore`)."""
    from .verified import VerifiedStore

    if is_remote(path):
        inner = FsspecStore.from_url(
            path, storage_options=remote_options(path, storage_options), read_only=read_only
        )
    else:
        inner = LocalStore(path, read_only=read_only)
    return VerifiedStore(inner)


def _fs(path: str, storage_options: dict[str, Any] | None):
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **remote_options(path, storage_options))
    return fs, root


def exists(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether anything (file, directory, object prefix) is at ``path``."""
    if is_remote(path):
        fs, root = _fs(path, storage_options)
        # A store's own document first: one request where a store is (opening one), the
        # prefix (a HEAD, then a listing) only where none is.
        return bool(fs.exists(root + "/zarr.json")) or bool(fs.exists(root))
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
            except BaseException as exc:
                _undo(exc, os.rename, old, path,
                      hint=f"the previous store is at {old}; rename it back to {path}")
                raise
            with contextlib.suppress(OSError):  # the new store is in place either way
                remove(old)
        else:
            os.rename(tmp, path)
    except BaseException as exc:
        _undo(exc, remove, tmp, hint=f"delete the partial copy {tmp}")
        raise
    finally:
        if existing is not None:
            existing.release()


def _undo(exc: BaseException, fn: Any, *args: Any, hint: str) -> None:
    """Run a rollback step; if it fails, note that on ``exc`` instead of replacing it."""
    try:
        fn(*args)
    except Exception as failed:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"rolling back also failed ({type(failed).__name__}: {failed}); {hint}")


def remove_partials(path: str) -> int:
    """Delete the ``*.<uuid>.partial`` files killed writers left in the local store at ``path``.

    Only regular files with zarr's temporary name, found without following links, and only
    in a zarr store; call it holding the write lock, so no live writer owns one.  Returns
    how many were removed.
    """
    if not any(os.path.isfile(os.path.join(path, m)) for m in ("zarr.json", ".zgroup")):
        return 0
    removed, todo = 0, [path]
    while todo:
        try:
            with os.scandir(todo.pop()) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
                elif _PARTIAL.search(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
    return removed


class WriteBatch:
    """The zarr writes one writer call starts, so that its rollback waits for exactly those.

    When one chunk write of a zarr call fails, zarr raises at once and leaves the call's
    other writes running (or queued on its concurrency limit); landing after the rollback,
    they would take back the space it gave and leave chunks past the commit point.  zarr
    runs a call's writes as tasks that inherit the calling thread's context, so the batch
    :meth:`open` sets is what every write of those calls sees, and
    :class:`~sparsestore.verified.VerifiedStore` (this store's, no other) counts them in and
    out (:meth:`enter`, :meth:`leave`).  :meth:`settle` closes the batch, drops its writes
    that have not started yet, and waits for those in flight.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self.closed = False

    @contextlib.contextmanager
    def open(self) -> Iterator[WriteBatch]:
        """Make the zarr writes started in this block (on this thread) the batch's."""
        token = _BATCH.set(self)
        try:
            yield self
        finally:
            _BATCH.reset(token)

    def enter(self) -> bool:
        """A write of the batch starts; False once the batch is closed (drop it)."""
        with self._cond:
            if self.closed:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        """A write that :meth:`enter` let through has finished (or failed)."""
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def settle(self, timeout: float = 120.0) -> None:
        """Close the batch and wait (up to ``timeout`` seconds) for its writes in flight."""
        with self._cond:
            self.closed = True
            self._cond.wait_for(lambda: self._active <= 0, timeout)


_BATCH: contextvars.ContextVar[WriteBatch | None] = contextvars.ContextVar(
    "sparsestore_write_batch", default=None
)


def current_batch() -> WriteBatch | None:
    """The :class:`WriteBatch` the running write belongs to, if any."""
    return _BATCH.get()


def shrink(arr: Any, n: int) -> None:
    """Cut a zarr array to ``n`` entries along its first axis, giving back the space written
    past them (by a failed or killed append).

    zarr deletes the chunks past ``n``; the chunk holding entry ``n`` is rewritten with fill
    values after it, as it was before anything was written past ``n``.  A kill at any point
    leaves entries ``[0, n)`` intact: that chunk is replaced whole, never emptied first.
    """
    old, tail = int(arr.shape[0]), tuple(arr.shape[1:])
    if old == n:
        return
    step = int((getattr(arr, "shards", None) or arr.chunks)[0])
    start = n // step * step
    whole = None
    if old > n > start:
        try:
            whole = np.full((step, *tail), arr.fill_value, dtype=arr.dtype)
        except (TypeError, ValueError):  # a fill value numpy cannot broadcast: keep the tail
            whole = None
    if whole is None:
        arr.resize((n, *tail))
        return
    whole[: n - start] = arr[start:n]
    arr.resize((start + step, *tail))  # deletes the chunks past the one holding entry n
    try:
        arr.with_config({"write_empty_chunks": True})[start : start + step] = whole
    except OSError:
        # The OS refuses the rewrite (e.g. the chunk is past RLIMIT_FSIZE): the chunk keeps
        # its bytes past n, which no read sees (the manifest covers the committed rows only)
        # and the next append overwrites; the other arrays are still cut.
        pass
    finally:
        arr.resize((n, *tail))


class WriteLock:
    """An exclusive, non-blocking writer lock on a local store (``flock`` on a file inside).

    The kernel drops the lock when its holder dies, so a killed writer never leaves a
    stale lock behind; the temporary files such a writer left are removed by the next
    holder.  The lock file is never followed through a symbolic link (which could create or
    lock a file outside the store).  Remote stores are not locked (object stores have no
    such primitive); one writer at a time is then the caller's responsibility.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> WriteLock:
        if is_remote(self.path) or fcntl is None:
            return self
        lock_file = os.path.join(self.path, LOCK_NAME)
        # A symlink fails with ELOOP, a directory with EISDIR (see oserrors).
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(lock_file, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockError(
                f"{self.path} is open for writing by another writer; close it (or wait for it "
                "to finish) before appending, or open with mode='r' to read"
            ) from None
        self._fd = fd
        remove_partials(self.path)
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None


def preload_metadata(store: Any, children: Callable[[dict[str, Any]], list[str]]) -> bool:
    """Read a remote store's metadata documents ahead, in two round trips: the root's
    ``zarr.json``, then every key ``children(root document)`` names, all at once; zarr's
    reads of them are then answered from memory (see
    :meth:`~sparsestore.verified.VerifiedStore.preload`).  False when there is no root
    ``zarr.json`` (nothing preloaded)."""
    from .fetch import get_many

    root = get_many(store, ["zarr.json"])
    if root["zarr.json"] is None:
        return False
    docs: dict[str, bytes | None] = dict(root)
    try:
        doc = json.loads(docs["zarr.json"] or b"")
        wanted = [k for k in children(doc) if k not in docs] if isinstance(doc, dict) else []
    except ValueError:  # not JSON: zarr refuses it, as it would have anyway
        wanted = []
    docs.update(get_many(store, wanted))
    store.preload(docs)
    return True


def open_group(path: str, *, mode: str, storage_options: dict[str, Any] | None = None,
               children: Callable[[dict[str, Any]], list[str]] | None = None):
    """Open the zarr group at ``path`` (v2 or v3), raising our errors for missing paths.

    Consolidated metadata (``zarr.consolidate_metadata``) is ignored: it is a copy of the
    arrays' metadata that no append updates, so it would name their old shapes; and the
    group's attrs written at a commit then drop that copy instead of keeping it stale.
    On object storage ``children`` (the root document -> the metadata keys a handle will
    read) has those read together first (:func:`preload_metadata`): the caller calls the
    store's ``forget_preloaded()`` once its handle has loaded.  A missing root ``zarr.json``
    then raises :class:`StoreNotFoundError` unless something else is at ``path``.
    """
    store = zarr_store(path, read_only=(mode == "r"), storage_options=storage_options)
    zmode = "r" if mode == "r" else "r+"
    if children is not None and is_remote(path) and not preload_metadata(store, children):
        fs, root = _fs(path, storage_options)
        if not fs.exists(root):
            raise StoreNotFoundError(f"no store at {path}")
    try:
        if is_remote(path):
            # zarr probes for a v2 group (.zgroup, .zattrs, .zmetadata) beside zarr.json when
            # no format is named: three more requests per open of a remote v3 store.
            with contextlib.suppress(FileNotFoundError):
                return zarr.open_group(store=store, mode=zmode, use_consolidated=False,
                                       zarr_format=3)
        return zarr.open_group(store=store, mode=zmode, use_consolidated=False)
    except FileNotFoundError as exc:
        raise StoreNotFoundError(f"no store at {path}") from exc
