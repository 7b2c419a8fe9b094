"""The operating system saying no: full disks, file size limits, read-only mounts, busy
mount points, lock files that are not files, and the debris of killed writers.

Each failure must arrive as a sparsestore error that is also the builtin ``OSError`` (same
``errno``), leave the committed rows exactly as they were, give back the space written
past the commit point, and leave the store usable once the cause is gone.  Real mounts
(tmpfs, read-only and self bind mounts) run in a private mount namespace (``unshare``) and
skip where mounting is not permitted; the same failures are also simulated in-process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

import sparsestore
from sparsestore import storage
from sparsestore.errors import (
    DiskFullError,
    FileTooLargeError,
    LockFileError,
    LockFileIsDirectoryError,
    ReadOnlyStorageError,
    SparseStoreError,
    StorageError,
    StoreBusyError,
)
from sparsestore.storage import LOCK_NAME

TESTS = Path(__file__).parent
PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial\Z")
LAYOUT = {"chunk_bytes": 4096, "indptr_chunk": 300, "dense_chunk_bytes": 4096}


# ------------------------------------------------------------------ helpers

def _matrix(n_rows: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.random(n_rows, 200, density=0.05, format="csr", dtype=np.float32,
                     random_state=rng)


def _labels(n_rows: int, first: int) -> dict[str, np.ndarray]:
    y = np.arange(first, first + n_rows, dtype=np.int64)
    return {"y": y, "w": np.stack([y, -y], 1).astype(np.float32)}


def _files(root: Path) -> dict[str, str]:
    """Every regular file under ``root`` (but the lock file): path -> size and digest."""
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            f = Path(d, name)
            if name != LOCK_NAME and f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                out[str(f.relative_to(root))] = f"{len(data)}:{hashlib.sha256(data).hexdigest()}"
    return out


def _size(path: Path) -> int:
    """A file's size, 0 when it is gone (another writer thread renamed or deleted it)."""
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


def _bytes(root: Path) -> int:
    return sum(_size(Path(d, n)) for d, _, names in os.walk(root) for n in names)


def _assert_holds(path: Path, X: sp.csr_matrix, labels: dict[str, np.ndarray]) -> None:
    """The store at ``path`` holds exactly ``X`` and ``labels`` (compared with scipy)."""
    with sparsestore.open(path) as st:
        got = st[:]
        if sp.issparse(got):
            assert got.shape == X.shape and got.dtype == X.dtype
            assert (got != X).nnz == 0
        else:
            np.testing.assert_array_equal(got, X.toarray())
        assert set(st.labels) == set(labels)
        for name, value in labels.items():
            np.testing.assert_array_equal(np.asarray(st.labels[name]), value)


def _save(path: Path, n_rows: int, *, dense: bool = False) -> tuple[sp.csr_matrix, dict]:
    X, labels = _matrix(n_rows, 0), _labels(n_rows, 0)
    src = X.toarray() if dense else X
    layout = {**LAYOUT, "dense_chunk_bytes": 32768} if dense else LAYOUT  # 40-row chunks
    sparsestore.save(path, src, labels=labels, sparse=not dense, **layout).close()
    return X, labels


def _limit_space(monkeypatch: pytest.MonkeyPatch, root: Path, free: int) -> None:
    """Have every zarr write under ``root`` fail with ENOSPC once ``root`` would hold more than
    ``free`` bytes beyond what it holds now: a file system with that much space left
    (deleting a file gives its space back)."""
    import zarr.storage._local as local

    put, cap = local._put, _bytes(root) + free

    def limited(path: Path, value: Any, exclusive: bool = False) -> int:
        path = Path(path)
        if root in path.parents:
            old = _size(path)
            if _bytes(root) - old + len(value) > cap:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", limited)


def _fail_writes(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Have every zarr write fail with ``code`` (as the kernel would for every write)."""
    import zarr.storage._local as local

    def failing(path: Path, value: Any, exclusive: bool = False) -> int:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(local, "_put", failing)


def _child(func: str, *args: Any, private_mounts: bool = False) -> dict[str, Any]:
    """Run ``func(*args)`` of this module in a fresh interpreter (in a private mount namespace
    when asked) and return the JSON it prints; skip when the namespace cannot be made."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_environment as t; "
            f"t.{func}(*{[str(a) for a in args]!r})")
    cmd = [sys.executable, "-c", code]
    if private_mounts:
        if shutil.which("unshare") is None or shutil.which("mount") is None:
            pytest.skip("needs unshare(1) and mount(8)")
        user = [] if os.geteuid() == 0 else ["--map-root-user"]  # a user namespace may mount
        cmd = ["unshare", *user, "--mount", "--propagation", "private", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if private_mounts and proc.returncode != 0 and proc.stderr.startswith("unshare:"):
        pytest.skip(f"cannot make a private mount namespace: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


def _mount(*args: str) -> None:
    """Run mount(8) in a child; print a skip line and exit when it is not permitted."""
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(json.dumps({"skip": f"mount {' '.join(args)}: {proc.stderr.strip()}"}))
        sys.exit(0)


def _report(exc: BaseException) -> dict[str, Any]:
    return {"classes": [c.__name__ for c in type(exc).__mro__],
            "errno": getattr(exc, "errno", None), "message": str(exc)}


# ------------------------------------------------------------------ the classes

@pytest.mark.parametrize("cls, builtin, code", [
    (DiskFullError, OSError, errno.ENOSPC),
    (FileTooLargeError, OSError, errno.EFBIG),
    (ReadOnlyStorageError, PermissionError, errno.EROFS),
    (StoreBusyError, OSError, errno.EBUSY),
    (LockFileError, OSError, errno.ELOOP),
    (LockFileIsDirectoryError, IsADirectoryError, errno.EISDIR),
])
def test_storage_errors_are_oserrors_that_pickle(cls, builtin, code):
    exc = cls(code, "cannot append to /s: what to do", "/s/data/c/3")
    assert isinstance(exc, StorageError) and isinstance(exc, SparseStoreError)
    assert isinstance(exc, builtin) and isinstance(exc, OSError)
    assert (exc.errno, exc.filename, str(exc)) == (code, "/s/data/c/3",
                                                    "cannot append to /s: what to do")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls and (back.errno, back.filename, str(back)) == (
        exc.errno, exc.filename, str(exc))


def test_other_os_errors_pass_through_unchanged(tmp_path, monkeypatch):
    X, labels = _save(tmp_path / "s.zarr", 500)
    st = sparsestore.open(tmp_path / "s.zarr", "r+")
    _fail_writes(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as info:
        st.append(_matrix(300, 1), labels=_labels(300, 500))
    assert info.value.errno == errno.EIO and not isinstance(info.value, SparseStoreError)
    st.close()
    monkeypatch.undo()
    _assert_holds(tmp_path / "s.zarr", X, labels)


# ------------------------------------------------------------------ ENOSPC

@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
@pytest.mark.parametrize("free", [0, 30_000, 150_000])
def test_disk_full_append_keeps_committed_rows_and_gives_space_back(
    tmp_path, monkeypatch, dense, free
):
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 998, dense=dense)
    st = sparsestore.open(p, "r+")
    before = _files(p)
    _limit_space(monkeypatch, tmp_path, free)
    big, big_labels = _matrix(5000, 1), _labels(5000, 998)
    with pytest.raises(OSError) as info:
        st.append(big.toarray() if dense else big, labels=big_labels)
    exc = info.value
    assert isinstance(exc, DiskFullError) and exc.errno == errno.ENOSPC
    assert str(p) in str(exc) and "free space" in str(exc)
    assert exc.filename and Path(exc.filename).is_relative_to(p)
    assert st.n_rows == 998
    assert _files(p) == before  # every byte written past the commit point is gone
    _assert_holds(p, X, labels)
    monkeypatch.undo()  # space freed: the same handle appends
    small, small_labels = _matrix(300, 2), _labels(300, 998)
    st.append(small.toarray() if dense else small, labels=small_labels)
    st.close()
    _assert_holds(p, sp.vstack([X, small], format="csr"),
                  {k: np.concatenate([labels[k], small_labels[k]]) for k in labels})


def test_disk_quota_exceeded_is_disk_full(tmp_path, monkeypatch):
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 500)
    st = sparsestore.open(p, "r+")
    _fail_writes(monkeypatch, errno.EDQUOT)
    with pytest.raises(DiskFullError) as info:
        st.append(_matrix(300, 1), labels=_labels(300, 500))
    assert isinstance(info.value, OSError) and info.value.errno == errno.EDQUOT
    assert "quota" in str(info.value)
    st.close()
    monkeypatch.undo()
    _assert_holds(p, X, labels)


def test_disk_full_rollback_failing_does_not_hide_the_error(tmp_path, monkeypatch):
    """The rollback's own failure never replaces the real one; the next writer truncates."""
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 998)
    st = sparsestore.open(p, "r+")
    before = _files(p)
    _limit_space(monkeypatch, tmp_path, 30_000)

    def broken(arr: Any, n: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(storage, "shrink", broken)
    with pytest.raises(DiskFullError) as info:
        st.append(_matrix(5000, 1), labels=_labels(5000, 998))
    assert info.value.errno == errno.ENOSPC
    st.close()
    assert _files(p) != before  # the rollback did not run: chunks past the commit remain
    monkeypatch.undo()
    _assert_holds(p, X, labels)
    sparsestore.open(p, "r+").close()  # the next writer gives the space back
    assert _files(p) == before


def test_disk_full_save_leaves_nothing_and_keeps_the_old_store(tmp_path, monkeypatch):
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 500)
    before = _files(p)
    _limit_space(monkeypatch, tmp_path, 20_000)
    big = _matrix(5000, 1)
    with pytest.raises(OSError) as info:
        sparsestore.save(tmp_path / "new.zarr", big, **LAYOUT)
    assert isinstance(info.value, DiskFullError) and info.value.errno == errno.ENOSPC
    with pytest.raises(DiskFullError):
        sparsestore.save(p, big, overwrite=True, **LAYOUT)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]  # no staging directory left behind
    assert _files(p) == before
    _assert_holds(p, X, labels)


def _tmpfs_child(where: str) -> None:
    """In a private mount namespace: fill a 1 MiB tmpfs with an append, check the store."""
    mnt = Path(where)
    _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt))
    p = mnt / "s.zarr"
    X, labels = _save(p, 998)
    st = sparsestore.open(p, "r+")
    before, free0 = _files(p), os.statvfs(mnt).f_bfree
    out: dict[str, Any] = {}
    try:
        st.append(_matrix(40_000, 1), labels=_labels(40_000, 998))
    except Exception as exc:  # reported to the test
        out["error"] = _report(exc)
    out["same_files"] = _files(p) == before
    out["free_blocks"] = [free0, os.statvfs(mnt).f_bfree]
    _assert_holds(p, X, labels)
    small, small_labels = _matrix(100, 2), _labels(100, 998)
    st.append(small, labels=small_labels)
    st.close()
    _assert_holds(p, sp.vstack([X, small], format="csr"),
                  {k: np.concatenate([labels[k], small_labels[k]]) for k in labels})
    out["rows"] = sparsestore.open(p).n_rows
    print(json.dumps(out))


def test_real_full_tmpfs(tmp_path):
    (tmp_path / "mnt").mkdir()
    out = _child("_tmpfs_child", tmp_path / "mnt", private_mounts=True)
    assert out["error"]["classes"][:2] == ["DiskFullError", "StorageError"]
    assert "OSError" in out["error"]["classes"] and out["error"]["errno"] == errno.ENOSPC
    assert out["same_files"] and out["free_blocks"][0] == out["free_blocks"][1]
    assert out["rows"] == 1098


# ------------------------------------------------------------------ EFBIG

def _efbig_child(path: str, big: str, small: str, limit: str) -> None:
    """Append past RLIMIT_FSIZE, report; lift the limit and append on the same handle."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG, no kill
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    st = sparsestore.open(path, "r+")
    X = sp.load_npz(big)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), hard))
    out: dict[str, Any] = {}
    try:
        st.append(X, labels=_labels(X.shape[0], st.n_rows))
    except Exception as exc:  # reported to the test
        out["error"] = _report(exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    out["files"] = _files(Path(path))
    Y = sp.load_npz(small)
    st.append(Y, labels=_labels(Y.shape[0], st.n_rows))
    st.close()
    print(json.dumps(out))


def test_file_size_limit_append(tmp_path):
    p = tmp_path / "s.zarr"
    X, labels = _matrix(998, 0), _labels(998, 0)
    sparsestore.save(p, X, labels=labels, chunk_bytes=256 * 1024).close()
    sparsestore.open(p, "r+").close()
    before = _files(p)
    assert max(os.path.getsize(p / f) for f in before) < 64 * 1024  # all under the limit
    big, small = _matrix(30_000, 1), _matrix(300, 2)
    sp.save_npz(tmp_path / "big.npz", big)
    sp.save_npz(tmp_path / "small.npz", small)
    out = _child("_efbig_child", p, tmp_path / "big.npz", tmp_path / "small.npz", 128 * 1024)
    assert out["error"]["classes"][:2] == ["FileTooLargeError", "StorageError"]
    assert "OSError" in out["error"]["classes"] and out["error"]["errno"] == errno.EFBIG
    assert "RLIMIT_FSIZE" in out["error"]["message"] and str(p) in out["error"]["message"]
    assert out["files"] == before  # rolled back to the committed bytes exactly
    _assert_holds(p, sp.vstack([X, small], format="csr"),
                  {k: np.concatenate([labels[k], _labels(300, 998)[k]]) for k in labels})


def test_file_size_limit_below_the_last_chunk_rolls_back_exactly(tmp_path):
    """The limit is below the size the partly filled last chunk already has: the append
    fails writing it, and the rollback (which cannot rewrite that chunk either) still gives
    back every byte: the store is what it was."""
    p = tmp_path / "s.zarr"
    X, labels = _matrix(4000, 0), _labels(4000, 0)
    sparsestore.save(p, X, labels=labels, chunk_bytes=1024 * 1024).close()
    sparsestore.open(p, "r+").close()
    before = _files(p)
    limit = 16 * 1024
    assert max(os.path.getsize(p / f) for f in before) > limit
    big, small = _matrix(3000, 1), _matrix(300, 2)
    sp.save_npz(tmp_path / "big.npz", big)
    sp.save_npz(tmp_path / "small.npz", small)
    out = _child("_efbig_child", p, tmp_path / "big.npz", tmp_path / "small.npz", limit)
    assert out["error"]["classes"][0] == "FileTooLargeError"
    assert out["files"] == before
    _assert_holds(p, sp.vstack([X, small], format="csr"),
                  {k: np.concatenate([labels[k], _labels(300, 4000)[k]]) for k in labels})


# ------------------------------------------------------------------ EROFS

def _enter_lock_readonly(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.open

    def readonly(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.path.basename(os.fspath(path)) == LOCK_NAME:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", readonly)


def test_read_only_file_system_open_for_append(tmp_path, monkeypatch):
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 500)
    _enter_lock_readonly(monkeypatch)
    with pytest.raises(PermissionError) as info:
        sparsestore.open(p, "r+")
    exc = info.value
    assert isinstance(exc, ReadOnlyStorageError) and exc.errno == errno.EROFS
    assert "read-only" in str(exc) and "mode='r'" in str(exc) and str(p) in str(exc)
    _assert_holds(p, X, labels)  # reading needs no write


def test_read_only_remount_under_an_open_writer(tmp_path, monkeypatch):
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 500)
    st = sparsestore.open(p, "r+")
    _fail_writes(monkeypatch, errno.EROFS)
    with pytest.raises(OSError) as info:
        st.append(_matrix(300, 1), labels=_labels(300, 500))
    assert isinstance(info.value, ReadOnlyStorageError) and info.value.errno == errno.EROFS
    assert isinstance(info.value, PermissionError)
    st.close()
    monkeypatch.undo()
    _assert_holds(p, X, labels)


def _readonly_child(where: str) -> None:
    """In a private mount namespace: the store's directory bind-mounted read-only."""
    d = Path(where)
    p = d / "s.zarr"
    X, labels = _save(p, 500)
    sparsestore.open(p, "r+").close()
    _mount("--bind", str(d), str(d))
    _mount("-o", "remount,ro,bind", str(d))
    out: dict[str, Any] = {}
    for name, call in (("append", lambda: sparsestore.open(p, "r+")),
                       ("save", lambda: sparsestore.save(p, X, overwrite=True))):
        try:
            call()
        except Exception as exc:  # reported to the test
            out[name] = _report(exc)
    _assert_holds(p, X, labels)
    print(json.dumps(out))


def test_real_read_only_mount(tmp_path):
    (tmp_path / "d").mkdir()
    out = _child("_readonly_child", tmp_path / "d", private_mounts=True)
    for what in ("append", "save"):
        assert out[what]["classes"][:2] == ["ReadOnlyStorageError", "StorageError"], out
        assert "PermissionError" in out[what]["classes"]
        assert out[what]["errno"] == errno.EROFS


# ------------------------------------------------------------------ EBUSY

def test_busy_target_on_save_overwrite_keeps_the_old_store(tmp_path, monkeypatch):
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 500)
    before = _files(p)
    real = os.rename

    def busy(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(src) == str(p):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), os.fspath(src), None,
                          os.fspath(dst))
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", busy)
    with pytest.raises(OSError) as info:
        sparsestore.save(p, _matrix(700, 1), overwrite=True)
    exc = info.value
    assert isinstance(exc, StoreBusyError) and exc.errno == errno.EBUSY
    assert exc.filename == str(p) and "mount point" in str(exc)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]
    assert _files(p) == before
    _assert_holds(p, X, labels)
    Y = _matrix(700, 1)
    sparsestore.save(p, Y, overwrite=True).close()
    _assert_holds(p, Y, {})


def test_failed_rollback_of_save_keeps_the_real_error(tmp_path, monkeypatch):
    """The new store cannot be moved in (EBUSY) nor the old one back (EIO): the EBUSY is
    raised, with a note saying where the old store is."""
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 500)
    real = os.rename

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(dst) == str(p):
            code = errno.EIO if ".old-" in os.fspath(src) else errno.EBUSY
            raise OSError(code, os.strerror(code), os.fspath(src), None, os.fspath(dst))
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(StoreBusyError) as info:
        sparsestore.save(p, _matrix(700, 1), overwrite=True)
    assert info.value.errno == errno.EBUSY
    monkeypatch.undo()
    (old,) = tmp_path.glob(".s.zarr.old-*")
    assert any(str(old) in note for note in getattr(info.value, "__notes__", [str(old)]))
    assert sorted(os.listdir(tmp_path)) == [old.name]  # the staging copy is gone
    _assert_holds(old, X, labels)


def _busy_child(where: str) -> None:
    """In a private mount namespace: the store is a mount point (bound onto itself)."""
    d = Path(where)
    p = d / "s.zarr"
    X, labels = _save(p, 500)
    _mount("--bind", str(p), str(p))
    out: dict[str, Any] = {}
    try:
        sparsestore.save(p, _matrix(700, 1), overwrite=True)
    except Exception as exc:  # reported to the test
        out["error"] = _report(exc)
    out["listing"] = sorted(os.listdir(d))
    _assert_holds(p, X, labels)
    print(json.dumps(out))


def test_real_mount_point_save_overwrite(tmp_path):
    (tmp_path / "d").mkdir()
    out = _child("_busy_child", tmp_path / "d", private_mounts=True)
    assert out["error"]["classes"][:2] == ["StoreBusyError", "StorageError"]
    assert "OSError" in out["error"]["classes"] and out["error"]["errno"] == errno.EBUSY
    assert out["listing"] == ["s.zarr"]


# ------------------------------------------------------------------ the lock file

def test_lock_path_that_is_a_directory(tmp_path):
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 500)
    lock = p / LOCK_NAME
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    lock.mkdir()
    (lock / "keep").write_text("mine")
    for call in (lambda: sparsestore.open(p, "r+"),
                 lambda: sparsestore.save(p, _matrix(10, 1), overwrite=True),
                 lambda: sparsestore.create(p, 200, overwrite=True)):
        with pytest.raises(IsADirectoryError) as info:
            call()
        exc = info.value
        assert isinstance(exc, LockFileIsDirectoryError) and isinstance(exc, LockFileError)
        assert exc.errno == errno.EISDIR and exc.filename == str(lock)
        assert f"rmdir '{lock}'" in str(exc)
    assert (lock / "keep").read_text() == "mine"
    _assert_holds(p, X, labels)
    shutil.rmtree(lock)  # as the message says
    sparsestore.open(p, "r+").close()


@pytest.mark.parametrize("target_exists", [False, True], ids=["dangling", "to-a-file"])
def test_symlinked_lock_is_refused_and_never_followed(tmp_path, target_exists):
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 500)
    outside = tmp_path / "elsewhere" / "victim"
    outside.parent.mkdir()
    if target_exists:
        outside.write_bytes(b"not a lock")
    lock = p / LOCK_NAME
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    lock.symlink_to(outside)
    for call in (lambda: sparsestore.open(p, "r+"),
                 lambda: sparsestore.save(p, _matrix(10, 1), overwrite=True)):
        with pytest.raises(OSError) as info:
            call()
        exc = info.value
        assert isinstance(exc, LockFileError) and exc.errno == errno.ELOOP
        assert exc.filename == str(lock) and f"rm '{lock}'" in str(exc)
    if target_exists:
        assert outside.read_bytes() == b"not a lock"
    else:
        assert not os.path.lexists(outside)  # nothing created outside the store
    assert os.listdir(outside.parent) == (["victim"] if target_exists else [])
    _assert_holds(p, X, labels)
    lock.unlink()
    sparsestore.open(p, "r+").close()


# ------------------------------------------------------------------ killed writers

def _killed_writer_child(path: str, big: str) -> None:
    """Append, dying (no clean-up runs) just before zarr renames a chunk's temporary file."""
    import pathlib

    rename, seen = pathlib.Path.replace, [0]

    def replace(self: pathlib.Path, target: Any) -> Any:
        if PARTIAL.search(self.name) and "c" in self.parts:
            seen[0] += 1
            if seen[0] == 12:
                os._exit(9)
        return rename(self, target)

    pathlib.Path.replace = replace  # type: ignore[method-assign]
    st = sparsestore.open(path, "r+")
    X = sp.load_npz(big)
    st.append(X, labels=_labels(X.shape[0], st.n_rows))
    print(json.dumps({"survived": True}))


def _partials(root: Path) -> list[str]:
    return sorted(str(f.relative_to(root)) for f in root.rglob("*")
                  if PARTIAL.search(f.name) and f.is_file() and not f.is_symlink())


def test_killed_writers_partial_files_are_removed_by_the_next_writer_only(tmp_path):
    p = tmp_path / "s.zarr"
    X, labels = _save(p, 998)
    sparsestore.open(p, "r+").close()
    before = _files(p)
    sp.save_npz(tmp_path / "big.npz", _matrix(5000, 1))
    code = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
            f"import test_environment as t; t._killed_writer_child({str(p)!r}, "
            f"{str(tmp_path / 'big.npz')!r})"]
    assert subprocess.run(code, capture_output=True, timeout=120).returncode == 9
    left = _partials(p)
    assert left, "the killed writer left no temporary file"
    # Look-alikes that are not zarr's temporary files, and a link pointing out of the store.
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep")
    decoys = [p / "notes.partial", p / f"zarr.{'A' * 32}.partial", p / f"x.{'0' * 31}.partial"]
    for f in decoys:
        f.write_bytes(b"user file")
    link = p / f"zarr.{'b' * 32}.partial"
    link.symlink_to(outside)
    folder = p / "data" / "c" / f"9.{'c' * 32}.partial"
    folder.mkdir()

    with sparsestore.open(p) as reader:  # readers never delete anything
        reader[:]
    assert _partials(p) == left

    sparsestore.open(p, "r+").close()
    assert _partials(p) == []
    assert all(f.read_bytes() == b"user file" for f in decoys)
    assert link.is_symlink() and outside.read_bytes() == b"keep" and folder.is_dir()
    for f in (*decoys, link):
        f.unlink()
    folder.rmdir()
    assert _files(p) == before  # the killed writer's chunks are gone as well
    _assert_holds(p, X, labels)


def test_save_over_a_store_with_partial_files(tmp_path):
    p = tmp_path / "s.zarr"
    _save(p, 500)
    stale = p / "data" / "c" / f"0.{'d' * 32}.partial"
    stale.write_bytes(b"debris")
    Y = _matrix(300, 1)
    sparsestore.save(p, Y, overwrite=True).close()
    assert _partials(p) == [] and sorted(os.listdir(tmp_path)) == ["s.zarr"]
    _assert_holds(p, Y, {})
