"""Crash safety: writers SIGKILLed at random moments during save, append and convert.

After every kill the destination either does not exist (interrupted save/convert; any
orphaned staging dir refuses to open) or opens and equals exactly the committed blocks,
validates clean, and takes the next append.  A forked-child server (benchmarks/crash_worker.py)
keeps each kill cheap; kill delays are drawn from a window calibrated on unkilled runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import sparsestore
from benchmarks import crash_worker as cw
from benchmarks.crash_worker import Server
from sparsestore.errors import SparseStoreError, StoreNotFoundError
from sparsestore.validate import validate_store

WORKER = Path(cw.__file__)
SAVE_BLOCKS = 60
APPEND_BLOCKS = 6
MIN_KILLS = {"save": 16, "append": 24, "convert": 14}
PARALLEL = 3


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def run_batch(server: Server, jobs: list[dict], window: float | None, rng) -> list[dict]:
    """:func:`benchmarks.crash_worker.run_batch`, asserting every job not killed exited 0."""
    return cw.run_batch(server, jobs, window, rng, check_exit=True)


def side_lines(job: dict) -> list[str]:
    p = Path(job["side"])
    return p.read_text().splitlines() if p.exists() else []


def assert_no_store_left(dst: Path, n_blocks: int, labels: bool) -> None:
    """An interrupted build left nothing at ``dst``; an orphaned hidden staging dir never
    opens as a partial store (it is marked incomplete until its last commit, so it either
    refuses to open or, killed between that commit and the rename, holds every row)."""
    assert not dst.exists()
    with pytest.raises(StoreNotFoundError):
        sparsestore.open(dst)
    for p in dst.parent.iterdir():
        if p.name.startswith(f".{dst.name}."):
            try:
                sparsestore.open(p)
            except SparseStoreError:
                continue
            assert_full(p, n_blocks, labels)


def assert_full(dst: Path, n_blocks: int, labels: bool) -> None:
    store = sparsestore.open(dst)
    X, labs = cw.blocks(0, n_blocks)
    assert store.shape == X.shape
    assert (store[:] != X).nnz == 0
    if labels:
        for k, v in labs.items():
            np.testing.assert_array_equal(store.labels[k][:], v)
    report = validate_store(dst)
    assert report.ok, report.summary()


def calibrate(server: Server, make_job, rng) -> float:
    """Seconds an unkilled batch of PARALLEL jobs takes (the kill window)."""
    jobs = [make_job() for _ in range(PARALLEL)]
    done = run_batch(server, jobs, None, rng)
    for job in done:
        check(job)
    return max(j["seconds"] for j in done) * 1.1


def check(job: dict) -> dict:
    """Verify the state one job left behind; return what was observed."""
    dst = Path(job["path"])
    op = job["op"]
    lines = side_lines(job)
    assert not any(line.startswith("ERROR") for line in lines), lines
    if op in ("save", "convert"):
        if not dst.exists():
            assert job["killed"]
            assert "DONE" not in lines
            assert_no_store_left(dst, job["n_blocks"], labels=(op == "save"))
            return {"outcome": "absent"}
        assert_full(dst, job["n_blocks"], labels=(op == "save"))
        return {"outcome": "complete"}
    # append: exactly the committed blocks, maybe plus the one whose commit landed unreported
    reported = max([int(x.split()[1]) // cw.ROWS for x in lines if x.startswith("COMMITTED")]
                   + [job["start"]])
    store = sparsestore.open(dst)
    k = cw.check_prefix(store, job["stop"])
    assert k in (reported, reported + 1), (k, reported)
    report = validate_store(dst)
    assert report.ok, report.summary()
    # The killed writer's lock is gone, the uncommitted tail is cut, and appends go on.
    with sparsestore.open(dst, mode="r+") as st:
        X, labs = cw.block(k)
        st.append(X, labels=labs)
    assert cw.check_prefix(sparsestore.open(dst), k + 1) == k + 1
    assert validate_store(dst).ok
    return {"outcome": f"{k - job['start']}/{job['stop'] - job['start']}"}


def kill_loop(server, make_job, need: int, rng, max_batches: int = 40) -> dict:
    window = calibrate(server, make_job, rng)
    kills, outcomes = 0, {}
    for _ in range(max_batches):
        if kills >= need:
            break
        jobs = run_batch(server, [make_job() for _ in range(PARALLEL)], window, rng)
        for job in jobs:
            got = check(job)
            if job["killed"]:
                kills += 1
                outcomes[got["outcome"]] = outcomes.get(got["outcome"], 0) + 1
            shutil.rmtree(Path(job["path"]).parent, ignore_errors=True)
        # Jobs that finished before their kill say how long a job takes now: a window
        # calibrated while the box was busier would let most kills land after the end.
        finished = [j["seconds"] for j in jobs if not j["killed"]]
        if finished:
            window = min(window, max(finished) * 1.1)
    assert kills >= need, f"only {kills} kills landed mid-write (window {window:.3f}s)"
    return outcomes


@pytest.fixture
def counter():
    n = [0]

    def nxt():
        n[0] += 1
        return n[0]

    return nxt


def test_kill_during_save(server, tmp_path, counter):
    rng = np.random.default_rng(1)

    def make_job():
        d = tmp_path / f"t{counter()}"
        d.mkdir()
        return {"op": "save", "path": str(d / "s.zarr"), "side": str(d / "side.txt"),
                "n_blocks": SAVE_BLOCKS}

    outcomes = kill_loop(server, make_job, MIN_KILLS["save"], rng)
    assert outcomes.get("absent", 0) > 0, outcomes


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """An empty store (labels get created by the first append) and one with 3 blocks."""
    root = tmp_path_factory.mktemp("templates")
    empty = sparsestore.create(root / "empty.zarr", n_cols=cw.COLS, dtype=np.float32,
                               **cw.LAYOUT)
    empty.close()
    X, labels = cw.blocks(0, 3)
    st = sparsestore.create(root / "three.zarr", n_cols=cw.COLS, dtype=np.float32, **cw.LAYOUT)
    st.append(X, labels=labels)
    st.close()
    return {0: root / "empty.zarr", 3: root / "three.zarr"}


def test_kill_during_append(server, tmp_path, templates, counter):
    rng = np.random.default_rng(2)

    def make_job():
        i = counter()
        start = 0 if i % 3 == 0 else 3
        d = tmp_path / f"t{i}"
        d.mkdir()
        shutil.copytree(templates[start], d / "s.zarr")
        return {"op": "append", "path": str(d / "s.zarr"), "side": str(d / "side.txt"),
                "start": start, "stop": start + APPEND_BLOCKS}

    outcomes = kill_loop(server, make_job, MIN_KILLS["append"], rng)
    # Kills landed at several points of the sequence of appends, not just one.
    assert len(outcomes) >= 3, outcomes


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    paths = []
    for s in range(0, SAVE_BLOCKS, 10):
        X, _ = cw.blocks(s, s + 10)
        p = root / f"part{s:03d}.npz"
        sp.save_npz(p, X)
        paths.append(str(p))
    return paths


def test_kill_during_convert(server, tmp_path, shards, counter):
    rng = np.random.default_rng(3)

    def make_job():
        d = tmp_path / f"t{counter()}"
        d.mkdir()
        return {"op": "convert", "path": str(d / "s.zarr"), "side": str(d / "side.txt"),
                "src": shards, "n_blocks": SAVE_BLOCKS}

    outcomes = kill_loop(server, make_job, MIN_KILLS["convert"], rng)
    assert outcomes.get("absent", 0) > 0, outcomes


def test_killed_overwrite_keeps_a_store(server, tmp_path, counter):
    """save(overwrite=True) killed at any point: the path holds the old or the new store."""
    rng = np.random.default_rng(4)
    old = tmp_path / "old.zarr"
    sparsestore.save(old, *cw.blocks(0, 2)[:1], labels=cw.blocks(0, 2)[1], **cw.LAYOUT)
    kills = 0
    for _ in range(3):
        jobs = []
        for _ in range(PARALLEL):
            d = tmp_path / f"t{counter()}"
            d.mkdir()
            shutil.copytree(old, d / "s.zarr")
            jobs.append({"op": "save_overwrite", "path": str(d / "s.zarr"),
                         "side": str(d / "side.txt"), "n_blocks": SAVE_BLOCKS})
        for job in run_batch(server, jobs, 0.4, rng):
            kills += job["killed"]
            dst = Path(job["path"])
            if dst.exists():
                k = cw.check_prefix(sparsestore.open(dst), SAVE_BLOCKS)
                assert k in (2, SAVE_BLOCKS)
            else:  # killed between the two renames: the old store is parked beside it
                parked = [p for p in dst.parent.iterdir() if p.name.startswith(".s.zarr.old-")]
                assert parked and cw.check_prefix(sparsestore.open(parked[0]), 2) == 2
    assert kills > 0
