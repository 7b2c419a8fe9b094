"""Training on several processes, end to end: real launchers on loopback, 2 workers, CPU.

Each test launches ``examples/torch_ddp.py`` under torchrun (DistributedDataParallel, gloo,
2 ranks of 2 DataLoader workers each) over a few-MB store on local disk or on the moto S3
server, and checks what the processes report against numpy and scipy: every row served
exactly once per epoch across the ranks, in the order the sharding rules give; each rank
decoding about ``1/world`` of the store's chunks (unshuffled); the model equal to plain
numpy SGD over the same global batches (DDP averages the ranks' gradients, so a 2-process
step is a 1-process step on the union of the two batches); and, after a rank is killed
mid-epoch and the job relaunched, no row lost or repeated.

The TensorFlow tests do the same with ``examples/tf_multiworker.py``: 2 processes with
``TF_CONFIG`` training under MultiWorkerMirroredStrategy (a custom ``strategy.run`` loop;
the replicas' gradients are summed over losses divided by the global batch, so a step is
again a 1-process step on the union), each worker one ``DataLoader`` rank; the resume test
also drops the documented tail (rows past the last multiple of the global batch).

The JAX tests run ``examples/jax_multiprocess.py`` as 2 ``jax.distributed`` processes (CPU,
gloo), each reading rank ``jax.process_index()`` of the rows through
``ssjax.sharded_loader``; every step averages the processes' gradients of their batches'
mean losses (``process_allgather``), which with equal batches is again a 1-process step on
the union.  The local store runs with the dropped tail, the S3 one without.

    make test-distributed
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import sparsestore

ROOT = Path(__file__).resolve().parents[1]
N_ROWS, N_COLS, BATCH, EPOCHS, LR = 4096, 2000, 64, 2, 0.5
CHUNK_BYTES = 65536
LAUNCH_TIMEOUT = 120  # seconds per launch; a launch takes ~10-25 s on 2 busy cores
SURVIVOR_WAIT = 15  # seconds a worker gets to exit by itself once its peer died

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


# ------------------------------------------------------------------ data and oracles


@pytest.fixture(scope="module")
def data() -> tuple[sp.csr_matrix, np.ndarray]:
    """A learnable problem: ~3 MB of float32 CSR and binary labels from hidden weights."""
    rng = np.random.default_rng(7)
    X = sp.random(N_ROWS, N_COLS, density=0.05, format="csr", dtype=np.float32,
                  random_state=rng)
    y = (X @ rng.standard_normal(N_COLS) > 0).astype(np.float32)
    return X, y


def _labels(y: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": y, "row": np.arange(y.size, dtype=np.int64)}


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, data) -> str:
    X, y = data
    path = tmp_path_factory.mktemp("mw") / "train.zarr"
    sparsestore.save(path, X, labels=_labels(y), chunk_bytes=CHUNK_BYTES)
    return str(path)


@pytest.fixture(scope="module")
def s3_store(data) -> tuple[str, dict]:
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from s3server import S3Server

    X, y = data
    server = S3Server().start()
    try:
        url = f"s3://{server.new_bucket()}/train.zarr"
        sparsestore.save(url, X, labels=_labels(y), chunk_bytes=CHUNK_BYTES,
                         storage_options=server.storage_options)
        yield url, server.storage_options
    finally:
        server.stop()


def store_at(where: str, request: pytest.FixtureRequest) -> tuple[str, dict | None]:
    """The test store and its storage options: on local disk (none) or on the S3 server."""
    if where == "local":
        return request.getfixturevalue("local_store"), None
    return request.getfixturevalue("s3_store")


def data_chunks(X: sp.csr_matrix) -> int:
    """Chunks of the store's ``data`` array (float32 values, CHUNK_BYTES each)."""
    per_chunk = CHUNK_BYTES // 4
    return -(-X.nnz // per_chunk)


def sgd_reference(X: sp.csr_matrix, y: np.ndarray, batches: list[np.ndarray],
                  lr: float = LR) -> tuple[np.ndarray, float]:
    """Logistic regression by plain SGD (mean BCE) in float64, one step per global batch."""
    X64 = X.astype(np.float64)
    w, b = np.zeros(X.shape[1]), 0.0
    for rows in batches:
        Xb = X64[rows]
        p = 1.0 / (1.0 + np.exp(-(Xb @ w + b)))
        g = (p - y[rows]) / rows.size
        w -= lr * (Xb.T @ g)
        b -= lr * g.sum()
    return w, b


def read_rows_logs(out: Path, world: int) -> list[list[dict]]:
    """Each rank's logged steps (epoch, batch, step, row ids), in step order."""
    logs = []
    for r in range(world):
        lines = (out / f"rows-rank{r}.jsonl").read_text().splitlines()
        logs.append(sorted((json.loads(ln) for ln in lines), key=lambda e: e["step"]))
    return logs


def global_batches(logs: list[list[dict]]) -> list[np.ndarray]:
    """Step ``s``'s global batch: the union of every rank's step-``s`` rows."""
    steps = [[e["step"] for e in log] for log in logs]
    assert all(s == list(range(1, len(s) + 1)) for s in steps), "a step is missing or repeated"
    assert len({len(s) for s in steps}) == 1, "ranks ran different numbers of steps"
    return [np.concatenate([np.asarray(log[i]["rows"]) for log in logs])
            for i in range(len(logs[0]))]


def check_epoch_order(log: list[dict], epoch: int, want: list[np.ndarray]) -> None:
    """One rank's logged batches of ``epoch`` are exactly ``want``, batch by batch."""
    got = [np.asarray(e["rows"]) for e in log if e["epoch"] == epoch]
    assert len(got) == len(want)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, e)


def check_every_row_once_per_epoch(logs: list[list[dict]], epochs: int, n_rows: int) -> None:
    for epoch in range(epochs):
        rows = np.concatenate([np.asarray(e["rows"], dtype=np.int64)
                               for log in logs for e in log if e["epoch"] == epoch])
        np.testing.assert_array_equal(np.sort(rows), np.arange(n_rows),
                                      err_msg=f"epoch {epoch}")


def check_chunk_shares(out: Path, X: sp.csr_matrix, world: int, shards_per_rank: int,
                       epochs: int) -> None:
    """Each rank decodes about 1/world of the data chunks; together all of them."""
    total = data_chunks(X)
    per = {}
    for f in out.glob("chunks-*.jsonl"):
        for ln in f.read_text().splitlines():
            e = json.loads(ln)
            per.setdefault((e["epoch"], e["rank"]), []).append(e)
    for epoch in range(epochs):
        got = []
        for r in range(world):
            reports = per[(epoch, r)]
            assert sorted(e["shard"] for e in reports) == \
                list(range(r * shards_per_rank, (r + 1) * shards_per_rank))
            got.append(sum(e["decoded"]["data"] for e in reports))
        # a shard's first and last chunks may be shared with its neighbours
        assert all(g <= -(-total // world) + shards_per_rank for g in got), (got, total)
        assert sum(got) >= total, (got, total)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    return env


def wait_together(procs: list[subprocess.Popen]) -> tuple[list[str], list[bool]]:
    """Wait for processes that train together; returns their outputs and which were killed.

    Each gets ``LAUNCH_TIMEOUT`` seconds; once one has died, the others (blocked in their
    next collective, or failing it) get ``SURVIVOR_WAIT`` seconds to exit by themselves.
    """
    stopped = [False] * len(procs)
    outputs = []
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):  # one died: the others...
                deadline = min(deadline, time.monotonic() + SURVIVOR_WAIT)
            time.sleep(0.2)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                stopped[i] = True
            outputs.append(p.communicate()[0])
    return outputs, stopped


# ------------------------------------------------------------------ PyTorch


def test_torch_dataset_takes_rank_and_world_size_from_torch_distributed(local_store,
                                                                         monkeypatch):
    torch = pytest.importorskip("torch")
    import sparsestore.adapters.torch as sstorch

    loader = sparsestore.DataLoader(local_store, BATCH, labels="row")
    assert sstorch.SparseIterableDataset(loader).loader is loader  # no process group
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    ds = sstorch.SparseIterableDataset(loader)
    assert (ds.loader.rank, ds.loader.world_size) == (1, 2)
    rows = np.concatenate([y.numpy() for _, y in ds])
    np.testing.assert_array_equal(rows, np.arange(N_ROWS // 2, N_ROWS))
    # A loader the user sharded keeps its shard; explicit arguments win.
    mine = sparsestore.DataLoader(local_store, BATCH, labels="row", rank=2, world_size=3)
    assert sstorch.SparseIterableDataset(mine).loader is mine
    ds = sstorch.SparseIterableDataset(loader, rank=0, world_size=4)
    assert (ds.loader.rank, ds.loader.world_size) == (0, 4)
    with pytest.raises(sparsestore.errors.InvalidInputError):
        sstorch.SparseIterableDataset(loader, rank=0)


def torchrun(out: Path, store: str, *extra: str, opts: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(ROOT / "examples" / "torch_ddp.py"), "--store", store, "--out", str(out),
           "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--workers", "2",
           "--lr", str(LR), *extra]
    if opts is not None:
        cmd += ["--storage-options", json.dumps(opts)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def expected_torch_order(rank: int, world: int, workers: int, n_rows: int) -> list[np.ndarray]:
    """Unshuffled: rank ``r``'s worker ``k`` reads shard ``r*workers+k`` of ``world*workers``
    contiguous shards; torch takes one batch from each worker in turn."""
    shards = world * workers
    mine = [np.arange(n_rows * i // shards, n_rows * (i + 1) // shards)
            for i in range(rank * workers, (rank + 1) * workers)]
    per_worker = [[s[j:j + BATCH] for j in range(0, s.size - BATCH + 1, BATCH)] for s in mine]
    return [per_worker[step % workers][step // workers]
            for step in range(sum(len(p) for p in per_worker))]


def load_model(out: Path) -> tuple[np.ndarray, float]:
    with np.load(out / "model.npz") as m:
        return m["w"], float(m["b"][0])


def check_model(out: Path, X, y, batches) -> None:
    w, b = load_model(out)
    w_ref, b_ref = sgd_reference(X, y, batches)
    assert np.abs(w_ref).max() > 1e-2  # it learnt something
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(b, b_ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_torch_ddp_two_ranks(where, request, data, tmp_path):
    pytest.importorskip("torch")
    X, y = data
    store, opts = store_at(where, request)
    torchrun(tmp_path, store, opts=opts)
    logs = read_rows_logs(tmp_path, 2)
    check_every_row_once_per_epoch(logs, EPOCHS, N_ROWS)
    for r, log in enumerate(logs):  # unshuffled: the order follows from the sharding alone
        want = expected_torch_order(r, 2, 2, N_ROWS)
        for epoch in range(EPOCHS):
            check_epoch_order(log, epoch, want)
    check_chunk_shares(tmp_path, X, world=2, shards_per_rank=2, epochs=EPOCHS)
    check_model(tmp_path, X, y, global_batches(logs))


def test_torch_ddp_resumes_after_a_rank_is_killed(local_store, data, tmp_path):
    pytest.importorskip("torch")
    X, y = data
    steps_per_epoch = N_ROWS // 2 // BATCH
    crash = steps_per_epoch + 13  # mid-epoch 1, at an odd batch (workers' turn rotated)
    args = ("--shuffle", "--seed", "3", "--checkpoint-every", "1", "--crash-at-step",
            str(crash))
    first = torchrun(tmp_path, local_store, *args, check=False)
    assert first.returncode != 0, "the killed rank should fail the launch"
    ckpt_step = [json.loads(ln)["step"]
                 for ln in (tmp_path / "rows-rank0.jsonl").read_text().splitlines()]
    assert max(ckpt_step) >= crash and not (tmp_path / "model.npz").exists()
    second = torchrun(tmp_path, local_store, *args)  # the same command, relaunched
    assert f"resumed at epoch 1, batch {crash - steps_per_epoch}" in second.stdout
    logs = read_rows_logs(tmp_path, 2)
    check_every_row_once_per_epoch(logs, EPOCHS, N_ROWS)
    batches = global_batches(logs)
    assert len(batches) == EPOCHS * steps_per_epoch
    # The order is the one an uninterrupted run serves: the loaders' own plan.
    import sparsestore.adapters.torch as sstorch

    for r, log in enumerate(logs):
        for epoch in range(EPOCHS):
            loader = sparsestore.DataLoader(local_store, BATCH, shuffle=True, seed=3,
                                            drop_last=True, labels="row")
            ds = sstorch.SparseIterableDataset(loader, num_workers=2, rank=r, world_size=2)
            ds.set_epoch(epoch)
            want = [yb.numpy() for _, yb in ds]
            check_epoch_order(log, epoch, want)
    check_model(tmp_path, X, y, batches)


# ------------------------------------------------------------------ TensorFlow


TF_BATCH_TAIL = 48  # 4096 % (2 * 48) = 64: the last 64 rows are the dropped tail


def tf_launch(out: Path, store: str, *extra: str, batch: int = BATCH, opts: dict | None = None,
              check: bool = True) -> tuple[list[subprocess.CompletedProcess], list[bool]]:
    """Run ``examples/tf_multiworker.py`` as 2 MWMS workers (``TF_CONFIG``, loopback ports).

    Returns each worker's completed process and whether the test had to stop it: once a
    worker has died, the others get ``SURVIVOR_WAIT`` seconds to exit by themselves.
    """
    cluster = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    cmd = [sys.executable, str(ROOT / "examples" / "tf_multiworker.py"), "--store", store,
           "--out", str(out), "--batch-size", str(batch), "--epochs", str(EPOCHS),
           "--lr", str(LR), *extra]
    if opts is not None:
        cmd += ["--storage-options", json.dumps(opts)]
    procs = []
    for i in range(2):
        tf_config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": i}}
        env = dict(_env(), TF_CONFIG=json.dumps(tf_config))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs, stopped = wait_together(procs)
    done = [subprocess.CompletedProcess(cmd, p.returncode, o, "")
            for p, o in zip(procs, outputs, strict=True)]
    if check:
        for i, proc in enumerate(done):
            assert proc.returncode == 0, f"worker {i}:\n" + proc.stdout[-5000:]
    return done, stopped


def expected_tf_order(rank: int, world: int, n_rows: int, batch: int) -> list[np.ndarray]:
    """Unshuffled: worker ``r`` reads the ``r``-th contiguous share in consecutive batches."""
    lo, hi = n_rows * rank // world, n_rows * (rank + 1) // world
    return [np.arange(s, s + batch) for s in range(lo, hi - batch + 1, batch)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tf_multiworker_mirrored_two_workers(where, request, data, tmp_path):
    pytest.importorskip("tensorflow")
    X, y = data
    store, opts = store_at(where, request)
    tf_launch(tmp_path, store, opts=opts)
    logs = read_rows_logs(tmp_path, 2)
    check_every_row_once_per_epoch(logs, EPOCHS, N_ROWS)
    for r, log in enumerate(logs):
        want = expected_tf_order(r, 2, N_ROWS, BATCH)
        for epoch in range(EPOCHS):
            check_epoch_order(log, epoch, want)
    check_chunk_shares(tmp_path, X, world=2, shards_per_rank=1, epochs=EPOCHS)
    check_model(tmp_path, X, y, global_batches(logs))


def test_tf_multiworker_resumes_after_a_worker_is_killed(local_store, data, tmp_path):
    pytest.importorskip("tensorflow")
    X, y = data
    kept = N_ROWS - N_ROWS % (2 * TF_BATCH_TAIL)  # the rest: the dropped tail, never read
    steps_per_epoch = kept // 2 // TF_BATCH_TAIL
    crash = steps_per_epoch + 13  # mid-epoch 1
    args = ("--shuffle", "--seed", "3", "--checkpoint-every", "1", "--crash-at-step",
            str(crash))
    first, stopped = tf_launch(tmp_path, local_store, *args, batch=TF_BATCH_TAIL, check=False)
    assert first[1].returncode == -9, first[1].stdout[-3000:]  # the worker killed itself
    # MWMS's heartbeats fail the survivor's next collective (UnavailableError) within a
    # few seconds; tf_launch stops it after SURVIVOR_WAIT if not.  Both are relaunched.
    unavailable = "UnavailableError" in first[0].stdout
    print(f"after worker 1 died, worker 0 {'was stopped' if stopped[0] else 'exited'} "
          f"(rc={first[0].returncode}{', UnavailableError' if unavailable else ''})")
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == crash and not (tmp_path / "model.npz").exists()
    second, _ = tf_launch(tmp_path, local_store, *args, batch=TF_BATCH_TAIL)
    for proc in second:
        assert f"resumed at epoch 1, batch {crash - steps_per_epoch}" in proc.stdout
    logs = read_rows_logs(tmp_path, 2)
    check_every_row_once_per_epoch(logs, EPOCHS, kept)
    batches = global_batches(logs)
    assert len(batches) == EPOCHS * steps_per_epoch
    # The order is the one an uninterrupted run serves: the loaders' own plan.
    for r, log in enumerate(logs):
        loader = sparsestore.DataLoader(local_store, TF_BATCH_TAIL, shuffle=True, seed=3,
                                        drop_last=True, labels="row", rank=r, world_size=2,
                                        rows=np.arange(kept))
        for epoch in range(EPOCHS):
            want = loader.epoch_rows(epoch).reshape(-1, TF_BATCH_TAIL)
            got = np.array([e["rows"] for e in log if e["epoch"] == epoch])
            np.testing.assert_array_equal(got, want)
    check_model(tmp_path, X, y, batches)


# ------------------------------------------------------------------ JAX


def jax_launch(out: Path, store: str, batch: int = BATCH,
               opts: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``examples/jax_multiprocess.py`` as 2 ``jax.distributed`` processes on CPU (gloo),
    the coordinator on a free loopback port; fails the test unless both exit cleanly.

    A process that dies leaves the other blocked in its next all-gather: it gets
    ``SURVIVOR_WAIT`` seconds to exit by itself, then is killed.
    """
    cmd = [sys.executable, str(ROOT / "examples" / "jax_multiprocess.py"), "--store", store,
           "--out", str(out), "--label", "y", "--batch-size", str(batch),
           "--epochs", str(EPOCHS), "--lr", str(LR), "--coordinator",
           f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    if opts is not None:
        cmd += ["--storage-options", json.dumps(opts)]
    env = dict(_env(), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs, _ = wait_together(procs)
    for i, (p, o) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} (rc={p.returncode}):\n" + o[-5000:]
    return [subprocess.CompletedProcess(cmd, p.returncode, o, "")
            for p, o in zip(procs, outputs, strict=True)]


@pytest.mark.parametrize(("where", "batch"), [("local", TF_BATCH_TAIL), ("s3", BATCH)])
def test_jax_two_processes(where, batch, request, data, tmp_path):
    """2 JAX processes, each ``sharded_loader``'s rank ``process_index()``, train one model.

    The local store runs with a batch of 48, so the last ``4096 % 96 = 64`` rows are the
    dropped tail (never read: equal shares of full batches); the store on S3 with 64, so
    every row is read.  Each process's loss is its batch's mean and the processes average
    their gradients: with equal batches a step is one SGD step on the union's mean.
    """
    pytest.importorskip("jax")
    X, y = data
    store, opts = store_at(where, request)
    t0 = time.perf_counter()
    procs = jax_launch(tmp_path, store, batch=batch, opts=opts)
    print(f"jax launch ({where}, batch {batch}): {time.perf_counter() - t0:.1f} s; "
          + "; ".join(p.stdout.strip().splitlines()[-1] for p in procs))
    kept = N_ROWS - N_ROWS % (2 * batch)
    logs = read_rows_logs(tmp_path, 2)
    check_every_row_once_per_epoch(logs, EPOCHS, kept)
    for r, log in enumerate(logs):  # unshuffled: each process its contiguous share, in order
        want = expected_tf_order(r, 2, kept, batch)
        for epoch in range(EPOCHS):
            check_epoch_order(log, epoch, want)
    check_chunk_shares(tmp_path, X, world=2, shards_per_rank=1, epochs=EPOCHS)
    check_model(tmp_path, X, y, global_batches(logs))
