"""One writer at a time (flock, across processes, released when the writer dies); any number
of readers, each seeing a consistent committed prefix while a writer appends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import sparsestore
from benchmarks import crash_worker as cw
from sparsestore.errors import LockError, ReadOnlyError
from sparsestore.validate import validate_store

WORKER = Path(cw.__file__)


def _store(path: Path, n_blocks: int):
    st = sparsestore.create(path, n_cols=cw.COLS, dtype=np.float32, **cw.LAYOUT)
    if n_blocks:
        X, labels = cw.blocks(0, n_blocks)
        st.append(X, labels=labels)
    return st


def test_second_writer_in_the_same_process(tmp_path):
    st = _store(tmp_path / "s.zarr", 2)
    with pytest.raises(LockError, match="another writer"):
        sparsestore.open(tmp_path / "s.zarr", mode="r+")
    with pytest.raises(LockError):  # replacing it would pull it from under the writer
        sparsestore.save(tmp_path / "s.zarr", np.ones((2, cw.COLS)), overwrite=True)
    reader = sparsestore.open(tmp_path / "s.zarr")  # readers are never blocked
    assert reader.n_rows == 2 * cw.ROWS
    with pytest.raises(ReadOnlyError):
        reader.append(*cw.block(2))
    st.close()
    with sparsestore.open(tmp_path / "s.zarr", mode="r+") as again:
        again.append(*cw.block(2))
    assert cw.check_prefix(sparsestore.open(tmp_path / "s.zarr"), 3) == 3


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(WORKER), "hold", str(path)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line == "LOCKED", line
    return proc


def test_second_writer_in_another_process_and_lock_freed_by_kill(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path, 1).close()
    proc = _holder(path)
    try:
        with pytest.raises(LockError):
            sparsestore.open(path, mode="r+")
        with pytest.raises(LockError):
            sparsestore.save(path, np.ones((2, cw.COLS)), overwrite=True)
        assert sparsestore.open(path).n_rows == cw.ROWS
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The kernel dropped the dead writer's flock: no stale lock to clear by hand.
    with sparsestore.open(path, mode="r+") as st:
        st.append(*cw.block(1))
    assert cw.check_prefix(sparsestore.open(path), 2) == 2


def test_lock_held_here_blocks_another_process(tmp_path):
    path = tmp_path / "s.zarr"
    st = _store(path, 1)
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys, sparsestore\n"
         "from sparsestore.errors import LockError\n"
         "try:\n    sparsestore.open(sys.argv[1], mode='r+')\n"
         "except LockError:\n    sys.exit(7)\n",
         str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 7, proc.stderr
    st.close()


def test_many_reader_threads(small_store):
    store, X, labels = small_store
    rng = np.random.default_rng(0)
    keys = [rng.integers(0, X.shape[0], size=50) for _ in range(16)]

    def read(i: int) -> bool:
        s = sparsestore.open(store.path) if i % 2 else store  # shared and private handles
        rows = keys[i]
        assert (s[rows] != X[rows]).nnz == 0
        a = int(rows[0])
        assert (s[a : a + 300] != X[a : a + 300]).nnz == 0
        np.testing.assert_array_equal(s.labels["w"][rows], labels["w"][rows])
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, range(16)))


def test_readers_during_appends_see_committed_prefixes(tmp_path):
    """Reader threads and reader processes re-open the store while a writer appends:
    every view is exactly blocks [0, k) for some k, and an old handle keeps its snapshot."""
    path = tmp_path / "s.zarr"
    writer = _store(path, 1)
    total = 15
    old = sparsestore.open(path)
    procs = [subprocess.Popen([sys.executable, str(WORKER), "read", str(path), "60", str(total)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY"
    seen: set[int] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.add(cw.check_prefix(sparsestore.open(path), total))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(1, total):
            writer.append(*cw.block(i))
            time.sleep(0.01)
    finally:
        writer.close()
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert len(seen) > 1, seen  # the readers really read while rows were landing
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        assert out.startswith("SEEN"), out
    # A handle opened before the appends still sees its own snapshot, exactly.
    assert cw.check_prefix(old, total) == 1
    assert cw.check_prefix(old.refresh(), total) == total
    assert validate_store(path).ok


def test_reader_processes_in_parallel(small_store):
    store, X, _ = small_store
    code = (
        "import sys, numpy as np, sparsestore\n"
        "s = sparsestore.open(sys.argv[1])\n"
        "m = s[:]\n"
        "print(m.nnz, float(m.sum()), int(s.labels['y'][:].sum()))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, store.path], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    want = f"{X.nnz} {float(X.sum())} {int(np.arange(X.shape[0]).sum())}"
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        nnz, total, ysum = out.split()
        assert int(nnz) == X.nnz and int(ysum) == int(want.split()[2])
        assert abs(float(total) - float(X.sum())) <= 1e-3 * abs(float(X.sum()))


def test_lock_file_is_not_part_of_the_data(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path, 1).close()
    assert os.path.exists(path / ".sparsestore.lock")
    assert validate_store(path).ok
