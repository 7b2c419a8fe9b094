"""PyTorch backend against oracles: the in-memory scipy matrix and the numpy backend's batches."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import scipy.sparse as sp  # noqa: E402
import sparsestore.adapters.torch as sstorch  # noqa: E402

import sparsestore  # noqa: E402
from sparsestore.errors import (  # noqa: E402
    ChecksumError,
    InvalidInputError,
    LabelError,
    StoreChangedError,
)

ROOT = Path(__file__).resolve().parents[1]

# pytest resets warning filters per test: repeat the adapter's two (informational) ones.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled"),
    # JAX warns on every fork once imported (tests/test_jax.py runs first under `make test`);
    # the torch workers forked here never call JAX.
    pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning"),
]


def check_tensor(x, want: sp.csr_matrix, layout=torch.sparse_csr) -> None:
    """``x`` is a torch sparse tensor of ``layout`` holding exactly ``want`` (same dtype)."""
    assert x.layout == layout
    assert tuple(x.shape) == want.shape
    assert x.dtype == torch.from_numpy(want.data[:0]).dtype
    if layout == torch.sparse_csr:
        np.testing.assert_array_equal(x.crow_indices().numpy(), want.indptr)
        np.testing.assert_array_equal(x.col_indices().numpy(), want.indices)
    else:
        assert x.is_coalesced()
        coo = want.tocoo()
        np.testing.assert_array_equal(x.indices().numpy(), np.stack([coo.row, coo.col]))
    np.testing.assert_array_equal(x.to_dense().numpy(), want.toarray())


def damage(store) -> Path:
    """Flip one byte in the middle data chunk file; returns the file."""
    base = Path(store.path) / "data" / "c"
    files = sorted((p for p in base.rglob("*") if p.is_file()), key=lambda p: int(p.name))
    victim = files[len(files) // 2]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    victim.write_bytes(bytes(raw))
    return victim


# ------------------------------------------------------------------ backend plugin


@pytest.mark.parametrize("layout", ["csr", "coo"])
@pytest.mark.parametrize(("shuffle", "rank", "world"), [(False, 0, 1), (True, 1, 3)])
def test_backend_batches_equal_numpy_backend(small_store, layout, shuffle, rank, world):
    store, X, labels = small_store
    kw = dict(batch_size=257, shuffle=shuffle, seed=4, labels=["y", "w"], rank=rank,
              world_size=world)
    backend = "torch" if layout == "csr" else sstorch.TorchBackend(layout="coo")
    a = sparsestore.DataLoader(store, backend=backend, **kw)
    b = sparsestore.DataLoader(store, **kw)
    assert a.backend.name == "torch"
    n = 0
    for (x, y, w), (xb, yb, _) in zip(a, b, strict=True):
        want = X[yb]  # y holds the row ids: the in-memory matrix is the oracle
        assert (xb != want).nnz == 0
        check_tensor(x, want, torch.sparse_csr if layout == "csr" else torch.sparse_coo)
        np.testing.assert_array_equal(y.numpy(), yb)
        np.testing.assert_array_equal(w.numpy(), labels["w"][yb])
        n += y.numel()
    assert n == a.num_rows


def test_backend_without_labels_and_dense_stores(tmp_path, small_store, rng):
    store, X, _ = small_store
    x = next(iter(sparsestore.DataLoader(store, batch_size=100, backend="torch")))
    check_tensor(x, X[:100])
    D = rng.standard_normal((500, 7)).astype(np.float32)
    dstore = sparsestore.save(tmp_path / "d.zarr", D, sparse=False, labels={"y": np.arange(500)})
    got = [(x, y) for x, y in sparsestore.DataLoader(dstore, 128, labels="y", backend="torch")]
    assert all(x.layout == torch.strided for x, _ in got)
    np.testing.assert_array_equal(torch.cat([x for x, _ in got]).numpy(), D)


def test_sparse_tensors_do_torch_math(small_store, rng):
    """A batch multiplies like its scipy oracle (torch's own sparse kernels)."""
    store, X, _ = small_store
    x, y = next(iter(sparsestore.DataLoader(store, 300, shuffle=True, seed=1, labels="y",
                                            backend="torch")))
    W = rng.standard_normal((X.shape[1], 3)).astype(np.float32)
    np.testing.assert_allclose((x @ torch.from_numpy(W)).numpy(), X[y.numpy()] @ W, rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------ IterableDataset


def epoch_rows(dl) -> list[np.ndarray]:
    """Row ids (= ``y``) of each batch of one pass, checking each batch against the oracle."""
    return [y.numpy().copy() for _, y in dl]


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_dataloader_workers_and_ranks_split_rows(small_store, workers):
    """Workers x ranks read disjoint rows that cover the store; each batch equals its rows."""
    store, X, _ = small_store
    seen = []
    for rank in range(2):
        loader = sparsestore.DataLoader(store, batch_size=200, shuffle=True, seed=3, labels="y",
                                        rank=rank, world_size=2)
        ds = sstorch.SparseIterableDataset(loader, num_workers=workers)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        n = 0
        for x, y in dl:
            check_tensor(x, X[y.numpy()])
            seen.append(y.numpy().copy())
            n += 1
        assert n == len(ds)
    rows = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(rows), np.arange(store.n_rows))


def test_worker_split_matches_the_shards_of_the_loader(small_store):
    """With k workers, batches are those of the k row shards, round-robin (torch's order)."""
    store, _, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=256, shuffle=True, seed=9, labels="y")
    ds = sstorch.SparseIterableDataset(loader, num_workers=2)
    got = epoch_rows(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    shards = [[b.rows for b in loader.shard(w, 2).iter_batches()] for w in range(2)]
    want = [s[i] for i in range(max(map(len, shards))) for s in shards if i < len(s)]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(("ds_workers", "torch_workers"), [(2, 0), (2, 2), (3, 2), (0, 2)])
@pytest.mark.parametrize(("drop_last", "world"), [(False, 1), (True, 1), (False, 3)])
def test_len_is_what_the_workers_deliver(small_store, ds_workers, torch_workers, drop_last,
                                         world):
    """``len(ds)`` (what Keras and tqdm size an epoch by) counts the batches torch yields,
    whichever ``num_workers`` the torch DataLoader runs, and every row of the rank arrives."""
    store, _, _ = small_store
    loader = sparsestore.DataLoader(store, 190, shuffle=True, seed=4, labels="y",
                                    drop_last=drop_last, rank=world - 1, world_size=world)
    k = max(1, ds_workers)
    shards = [loader.shard(w, k) for w in range(k)]
    want = np.sort(np.concatenate([b.rows for s in shards for b in s.iter_batches()]))
    ds = sstorch.SparseIterableDataset(loader, num_workers=ds_workers)
    got = epoch_rows(torch.utils.data.DataLoader(ds, batch_size=None,
                                                 num_workers=torch_workers))
    assert len(got) == len(ds)
    np.testing.assert_array_equal(np.sort(np.concatenate(got)), want)


def test_without_workers_the_shards_come_in_the_workers_order(small_store):
    """A dataset built for 2 workers read in the main process (Keras's default torch
    DataLoader) yields the same batches in the same order as 2 torch workers, and moves
    the loader to the next epoch as an unsharded pass does."""
    store, _, _ = small_store
    loader = sparsestore.DataLoader(store, 256, shuffle=True, seed=9, labels="y")
    ds = sstorch.SparseIterableDataset(loader, num_workers=2)
    with_workers = epoch_rows(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    ds.set_epoch(0)
    in_process = epoch_rows(torch.utils.data.DataLoader(ds, batch_size=None))
    assert len(in_process) == len(with_workers) == len(ds)
    for g, w in zip(in_process, with_workers, strict=True):
        np.testing.assert_array_equal(g, w)
    assert loader.epoch == 1


def test_set_epoch_reshuffles_in_workers(small_store):
    store, _, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=500, shuffle=True, seed=2, labels="y")
    ds = sstorch.SparseIterableDataset(loader, num_workers=2)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    orders = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        orders.append(np.concatenate(epoch_rows(dl)))
    np.testing.assert_array_equal(orders[0], orders[2])  # reproducible
    assert not np.array_equal(orders[0], orders[1])  # a new shuffle
    np.testing.assert_array_equal(np.sort(orders[1]), np.arange(store.n_rows))


def test_pin_memory_passes_sparse_batches_through(small_store):
    """``pin_memory=True`` works with CSR batches (pinned only when an accelerator exists)."""
    store, X, _ = small_store
    ds = sstorch.SparseIterableDataset(sparsestore.DataLoader(store, 400, labels="y"))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, pin_memory=True)
    with pytest.warns(UserWarning, match="accelerator") if not torch.cuda.is_available() \
            else _nothing():
        batches = list(dl)
    for x, y in batches:
        check_tensor(x, X[y.numpy()])
        if torch.cuda.is_available():
            assert x.values().is_pinned() and y.is_pinned()
    # torch's own pinning routine on a CSR batch (the pin thread calls it per element)
    if torch.cuda.is_available():
        assert batches[0][0].pin_memory().values().is_pinned()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resumes_the_rest_of_the_epoch(small_store, workers):
    store, _, _ = small_store

    def make():
        loader = sparsestore.DataLoader(store, 128, shuffle=True, seed=5, labels="y")
        loader.set_epoch(1)
        ds = sstorch.SparseIterableDataset(loader, num_workers=workers)
        return ds, torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)

    ds, dl = make()
    full = epoch_rows(dl)
    ds, dl = make()
    it, head = iter(dl), []
    for _ in range(7):
        head.append(next(it)[1].numpy().copy())
    state = ds.state_dict(batches_seen=7 if workers else None)
    del it
    assert state["epoch"] == 1 and state["batches_seen"] == 7
    ds2, dl2 = make()
    ds2.loader.set_epoch(0)  # the state carries the epoch
    ds2.load_state_dict(state)
    rest = epoch_rows(dl2)
    assert len(head) + len(rest) == len(full)
    for g, w in zip(head + rest, full, strict=True):
        np.testing.assert_array_equal(g, w)
    ds2.load_state_dict(dict(state, num_workers=3))
    with pytest.raises(InvalidInputError, match="num_workers=3"):
        next(iter(ds2))  # in this process (in workers it fails the same way, re-raised)


def test_map_style_getitems_reads_whole_batches(small_store):
    store, X, labels = small_store
    ds = sstorch.SparseMapDataset(store, labels=["y", "w"])
    assert len(ds) == store.n_rows
    sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0))
    dl = torch.utils.data.DataLoader(ds, batch_size=300, sampler=sampler,
                                     collate_fn=sstorch.collate_batches, num_workers=0)
    rows = []
    for x, y, w in dl:
        check_tensor(x, X[y.numpy()])
        np.testing.assert_array_equal(w.numpy(), labels["w"][y.numpy()])
        rows.append(y.numpy())
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(store.n_rows))
    x = sstorch.SparseMapDataset(store, layout="coo")[5]
    check_tensor(x, X[[5]], torch.sparse_coo)


# ------------------------------------------------------------------ failures


def test_a_damaged_chunk_fails_with_its_name(small_store):
    store, _, _ = small_store
    victim = damage(store)
    loader = sparsestore.DataLoader(sparsestore.open(store.path), 64, backend="torch")
    with pytest.raises(ChecksumError, match=rf"chunk {victim.name}\b"):
        for _ in loader:
            pass
    ds = sstorch.SparseIterableDataset(sparsestore.DataLoader(sparsestore.open(store.path), 64))
    it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    try:
        with pytest.raises(ChecksumError, match=rf"chunk {victim.name}\b"):
            for _ in it:
                pass
    finally:
        # torch then takes seconds per worker to shut the others down (any exception in
        # an IterableDataset worker does it): end them now to keep the suite fast.
        for proc in it._workers:
            proc.terminate()


def test_bad_arguments(small_store):
    store, _, _ = small_store
    with pytest.raises(InvalidInputError, match="layout"):
        sstorch.TorchBackend(layout="bsr")
    with pytest.raises(InvalidInputError, match="DataLoader"):
        sstorch.SparseIterableDataset(store)
    with pytest.raises(InvalidInputError, match="layout"):
        sstorch.SparseMapDataset(store, layout="bsr")
    # the map view takes label names as the loader does
    for bad, match in (("nope", "no label named 'nope'"), (["y", "y"], "twice"),
                       ([3], "must be strings")):
        with pytest.raises(LabelError, match=match):
            sstorch.SparseMapDataset(store, labels=bad)


@pytest.mark.parametrize("ctx", ["fork", "spawn", "forkserver"])
def test_start_methods_deliver_the_in_process_batches(small_store, ctx):
    """Workers that get the dataset by pickle (spawn, forkserver) or by fork deliver the
    batches the main process reads without workers, in the same order, at the epoch set
    before the workers start: every row of the rank once, ``len(ds)`` of them."""
    store, X, _ = small_store
    loader = sparsestore.DataLoader(store, 150, shuffle=True, seed=6, labels="y", rank=1,
                                    world_size=2, columns=np.arange(0, 400, 3))
    ds = sstorch.SparseIterableDataset(loader, num_workers=2)
    ds.set_epoch(1)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                     multiprocessing_context=ctx)
    got = [(x, y.numpy().copy()) for x, y in dl]
    ds.set_epoch(1)
    want = epoch_rows(torch.utils.data.DataLoader(ds, batch_size=None))
    assert len(got) == len(want) == len(ds)
    for (x, y), w in zip(got, want, strict=True):
        np.testing.assert_array_equal(y, w)
        check_tensor(x, X[y][:, np.arange(0, 400, 3)])
    rows = np.concatenate(want)
    assert rows.size == loader.num_rows == np.unique(rows).size
    shards = [loader.shard(w, 2).epoch_rows(1) for w in range(2)]
    np.testing.assert_array_equal(np.sort(rows), np.sort(np.concatenate(shards)))


def test_worker_copies_start_the_epoch_at_the_datasets_position(small_store):
    """A loader broken off mid-pass reaches a worker by pickle with that position, yet the
    worker reads the whole epoch, as a forked one does: the dataset's position rules."""
    store, X, _ = small_store
    loader = sparsestore.DataLoader(store, 200, shuffle=True, seed=2, labels="y")
    it = loader.iter_batches()
    next(it), next(it)
    it.close()
    assert loader.state_dict()["batches_consumed"] == 2
    ds = sstorch.SparseIterableDataset(loader)
    got = epoch_rows(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                                 multiprocessing_context="forkserver"))
    assert len(got) == len(ds)
    np.testing.assert_array_equal(np.concatenate(got), loader.epoch_rows(0))


def test_a_worker_over_a_restored_store_raises_store_changed(tmp_path):
    """A pickled worker whose store went back to an earlier commit reports it (torch
    re-raises it in the main process) instead of dying before it starts."""
    import shutil

    path, backup = tmp_path / "s.zarr", tmp_path / "backup.zarr"
    X = sp.random(600, 30, density=0.1, format="csr", dtype=np.float32, random_state=0)
    sparsestore.save(path, X[:200], labels={"y": np.arange(200)}, chunk_bytes=4096)
    shutil.copytree(path, backup)
    with sparsestore.open(path, mode="r+") as w:
        w.append(X[200:], labels={"y": np.arange(200, 600)})
    ds = sstorch.SparseIterableDataset(sparsestore.DataLoader(sparsestore.open(path), 50))
    shutil.copytree(backup, path, dirs_exist_ok=True)
    it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                          multiprocessing_context="forkserver"))
    try:
        with pytest.raises(StoreChangedError, match="earlier commit"):
            next(it)
    finally:
        for proc in it._workers:  # see test_a_damaged_chunk_fails_with_its_name
            proc.terminate()


def test_the_datasets_pickle(small_store):
    store, X, _ = small_store
    ds = sstorch.SparseIterableDataset(sparsestore.DataLoader(store, 64, labels="y"),
                                       layout="coo", num_workers=3)
    ds.set_epoch(4)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.loader.epoch == 4 and copy.num_workers == 3 and len(copy) == len(ds)
    for (x, y), (_, w) in zip(copy, ds, strict=True):
        np.testing.assert_array_equal(y.numpy(), w.numpy())
        check_tensor(x, X[y.numpy()], torch.sparse_coo)
    m = pickle.loads(pickle.dumps(sstorch.SparseMapDataset(store, labels="y")))
    x, y = m.__getitems__([7, 3, 7])
    check_tensor(x, X[[7, 3, 7]])
    np.testing.assert_array_equal(y.numpy(), [7, 3, 7])


# ------------------------------------------------------------------ training


def test_torch_example_loss_falls(load_example, tmp_path, capsys):
    ex = load_example("torch_train")
    losses = ex.train(ex.build_store(tmp_path / "t.zarr", 6000, 300, seed=0), epochs=4,
                      workers=2, seed=0)
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    assert ex.main(["--rows", "2000", "--cols", "100", "--epochs", "1", "--out",
                    str(tmp_path)]) == 0
    assert "loss" in capsys.readouterr().out


def test_keras_on_torch_fits_csr_batches(tmp_path):
    """Keras 3 (torch backend) trains on the CSR batches through a dense ``keras.Input``."""
    pytest.importorskip("keras")
    script = textwrap.dedent(f"""
        import os, sys, warnings
        os.environ["KERAS_BACKEND"] = "torch"
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np, keras, torch, sparsestore
        import sparsestore.adapters.torch as sstorch
        sys.path.insert(0, {str(ROOT / "examples")!r})
        from torch_train import build_store
        store = build_store({str(tmp_path / "k.zarr")!r}, 4000, 200, seed=1)
        try:
            keras.Input(shape=(200,), sparse=True)
        except ValueError as e:
            print("SPARSE_INPUT_ERROR", e)
        loader = sparsestore.DataLoader(store, 128, shuffle=True, seed=1, labels="y")
        ds = sstorch.SparseIterableDataset(loader)
        dl = torch.utils.data.DataLoader(ds, batch_size=None)
        inp = keras.Input(shape=(200,))
        model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(inp))
        model.compile(keras.optimizers.Adam(0.05), "binary_crossentropy")
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*ran out of data")
            h = model.fit(dl, epochs=3, verbose=0)
        print("LOSS", *h.history["loss"])
    """)
    env = dict(os.environ, KERAS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "`sparse=True` is not supported with the torch backend" in out.stdout
    loss = [float(v) for v in out.stdout.split("LOSS")[1].split()]
    assert len(loss) == 3 and loss[-1] < 0.8 * loss[0]
