"""Writer/reader processes for the crash and concurrency tests and the reliability report
(run as a subprocess), and the :class:`Server` / :func:`run_batch` that drive them.

``python benchmarks/crash_worker.py server`` imports everything once, then reads JSON jobs on
stdin and runs each in a forked child (no interpreter start-up per job, so dozens of kills
stay cheap).  For every job it prints ``PID <job> <pid>`` when the child starts and
``EXIT <job> <status>`` when it is reaped; the test SIGKILLs children at random moments.
Children report progress by appending lines to the job's side file, written (one
``write`` each) before the next step starts, so a line always precedes the state it names.

Other modes: ``hold PATH`` (take the write lock and wait), ``read PATH SECONDS`` (re-open
and check the store against the expected prefix until time runs out).

The data are a pure function of the block number, so any process can rebuild the oracle.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

ROWS, COLS = 40, 30
LAYOUT = {"chunk_bytes": 1024, "indptr_chunk": 32, "dense_chunk_bytes": 1024}


def block(i: int) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
    """Block ``i``: ROWS x COLS float32 CSR (some empty rows) and its labels."""
    rng = np.random.default_rng(1000 + i)
    X = sp.random(ROWS, COLS, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    y = np.arange(i * ROWS, (i + 1) * ROWS, dtype=np.int64)
    w = rng.random((ROWS, 2)).astype(np.float32)
    return X, {"y": y, "w": w}


def blocks(start: int, stop: int) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
    """Blocks ``[start, stop)`` stacked."""
    parts = [block(i) for i in range(start, stop)]
    if not parts:
        return sp.csr_matrix((0, COLS), dtype=np.float32), {
            "y": np.zeros(0, np.int64), "w": np.zeros((0, 2), np.float32)}
    X = sp.vstack([p[0] for p in parts], format="csr")
    labels = {k: np.concatenate([p[1][k] for p in parts]) for k in ("y", "w")}
    return X, labels


def check_prefix(store, n_blocks_max: int) -> int:
    """Assert the store holds exactly blocks ``[0, k)`` for some k; return k."""
    n = store.n_rows
    if n % ROWS:
        raise AssertionError(f"{n} rows is not a whole number of blocks")
    k = n // ROWS
    if k > n_blocks_max:
        raise AssertionError(f"{k} blocks > {n_blocks_max} written")
    X, labels = blocks(0, k)
    got = store[:]
    if got.shape != X.shape or (got != X).nnz:
        raise AssertionError(f"matrix differs from the first {k} blocks")
    if k == 0 and not len(store.labels):
        return 0  # an empty store gets its labels with its first append
    for name, want in labels.items():
        if not np.array_equal(store.labels[name][:], want):
            raise AssertionError(f"label {name!r} differs from the first {k} blocks")
    return k


def _note(side: str, line: str) -> None:
    fd = os.open(side, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def run_job(job: dict) -> None:
    """One writer job, in a forked child."""
    import sparsestore

    op, path, side = job["op"], job["path"], job["side"]
    _note(side, "START")
    if op in ("save", "save_overwrite"):
        X, labels = blocks(0, job["n_blocks"])
        sparsestore.save(path, X, labels=labels, overwrite=op == "save_overwrite", **LAYOUT)
        _note(side, "DONE")
    elif op == "append":
        store = sparsestore.open(path, mode="r+")
        for i in range(job["start"], job["stop"]):
            X, labels = block(i)
            store.append(X, labels=labels)
            _note(side, f"COMMITTED {(i + 1) * ROWS}")
        store.close()
        _note(side, "DONE")
    elif op == "convert":
        from sparsestore.conversion import convert

        convert(job["src"], path, **LAYOUT)
        _note(side, "DONE")
    else:
        raise ValueError(op)


def serve() -> None:
    """Fork one child per job line on stdin; report pids and exit statuses on stdout."""
    import threading

    import sparsestore  # noqa: F401  (import once, before forking)
    import sparsestore.conversion  # noqa: F401

    lock = threading.Lock()
    running: dict[int, str] = {}
    done = threading.Event()

    def reaper() -> None:
        while not (done.is_set() and not running):
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.005)
                continue
            with lock:  # the forking thread registers the pid under this lock
                job_id = running.pop(pid, "?")
                print(f"EXIT {job_id} {status}", flush=True)

    threading.Thread(target=reaper, daemon=True).start()
    print("READY", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        job = json.loads(line)
        with lock:
            pid = os.fork()
            if pid == 0:  # child
                code = 0
                try:
                    run_job(job)
                except BaseException as exc:  # report, then exit without atexit hooks
                    _note(job["side"], f"ERROR {type(exc).__name__}: {exc}")
                    code = 1
                finally:
                    os._exit(code)
            running[pid] = job["id"]
            print(f"PID {job['id']} {pid}", flush=True)
    done.set()
    while running:
        time.sleep(0.01)


def hold(path: str) -> None:
    import sparsestore

    store = sparsestore.open(path, mode="r+")
    print("LOCKED", flush=True)
    time.sleep(600)
    store.close()


def read_loop(path: str, seconds: float, n_blocks_max: int) -> None:
    """Open and check the store repeatedly; print how many distinct prefixes were seen."""
    import sparsestore

    seen = set()
    deadline = time.monotonic() + seconds
    print("READY", flush=True)
    while time.monotonic() < deadline:
        store = sparsestore.open(path)
        seen.add(check_prefix(store, n_blocks_max))
        if max(seen) >= n_blocks_max:
            break
    print("SEEN " + " ".join(str(k) for k in sorted(seen)), flush=True)



# ------------------------------------------------------------------ the driving side


class Server:
    """The forked-child job server, with a thread collecting its PID/EXIT lines."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "server"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
        )
        assert self.proc.stdout.readline().strip() == "READY"
        self.pids: dict[str, int] = {}
        self.exits: dict[str, int] = {}
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.n = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            kind, job, value = line.split()
            with self.cond:
                (self.pids if kind == "PID" else self.exits)[job] = int(value)
                self.cond.notify_all()

    def submit(self, job: dict) -> tuple[str, int]:
        self.n += 1
        job_id = f"j{self.n}"
        self.proc.stdin.write(json.dumps({**job, "id": job_id}) + "\n")
        self.proc.stdin.flush()
        with self.cond:
            assert self.cond.wait_for(lambda: job_id in self.pids, timeout=60)
            return job_id, self.pids[job_id]

    def wait(self, job_id: str) -> int:
        with self.cond:
            assert self.cond.wait_for(lambda: job_id in self.exits, timeout=120)
            return self.exits[job_id]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run_batch(server: Server, jobs: list[dict], window: float | None, rng: Any,
              check_exit: bool = True) -> list[dict]:
    """Start jobs together; SIGKILL each at a random delay in ``[0, window)`` (None: no kill).

    Returns each job with ``killed`` (the kill landed while it ran) and ``seconds``;
    ``check_exit``: assert that a job not killed exited 0.
    """
    started = []
    for job in jobs:
        t0 = time.monotonic()
        job_id, pid = server.submit(job)
        delay = None if window is None else float(rng.uniform(0, window))
        started.append((job, job_id, pid, t0, delay))
    for _job, _id, pid, t0, delay in sorted(
        started, key=lambda s: float("inf") if s[4] is None else s[3] + s[4]
    ):
        if delay is None:
            continue
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):  # it finished first
            os.kill(pid, signal.SIGKILL)
    out = []
    for job, job_id, _pid, t0, _delay in started:
        status = server.wait(job_id)
        seconds = time.monotonic() - t0
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if check_exit and not killed:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
                job, Path(job["side"]).read_text()
            )
        out.append({**job, "killed": killed, "seconds": seconds})
    return out


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        serve()
    elif mode == "hold":
        hold(sys.argv[2])
    elif mode == "read":
        read_loop(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
