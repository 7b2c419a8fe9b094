"""Pickled loaders against the loader they were pickled from and scipy: the same batches
from the same position, nothing of a pass carried, and a store restored to an earlier
commit (or saved over) refused with StoreChangedError when the copy is used."""

from __future__ import annotations

import copy
import pickle
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

import sparsestore
from sparsestore.errors import StoreChangedError
from sparsestore.loader import DataLoader

SETTINGS = {
    "plain": dict(batch_size=256),
    "shuffled": dict(batch_size=200, shuffle=True, seed=7),
    "rank": dict(batch_size=150, shuffle=True, seed=3, rank=2, world_size=3, drop_last=True),
    "rows": dict(batch_size=128, shuffle=True, seed=1, rows=np.arange(5, 3000, 3)),
    "columns": dict(batch_size=300, columns=np.arange(0, 400, 7), rows=np.arange(2500)),
    "buffer": dict(batch_size=100, shuffle=True, seed=5, shuffle_buffer_blocks=2,
                   columns=slice(50, 350), num_workers=0),
}


def rows_of(loader: DataLoader, X: sp.csr_matrix, it=None) -> list[np.ndarray]:
    """Row ids of each batch of a pass (or of the rest of ``it``), each batch checked
    against scipy (the ``y`` label holds the row ids)."""
    cols = loader._columns
    Xc = X if cols is None else X[:, cols.keep]
    out = []
    for b in loader.iter_batches() if it is None else it:
        np.testing.assert_array_equal(b.labels[0], b.rows)
        assert (b.to_scipy() != Xc[b.rows]).nnz == 0
        out.append(b.rows)
    return out


def same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", SETTINGS)
def test_a_pickled_loader_yields_the_same_batches(small_store, name):
    store, X, _ = small_store
    loader = DataLoader(store, labels="y", **SETTINGS[name])
    loader.set_epoch(2)
    clone = pickle.loads(pickle.dumps(loader))
    assert clone.state_dict() == loader.state_dict() and len(clone) == len(loader)
    want = rows_of(loader, X)
    same(rows_of(clone, X), want)
    assert clone.epoch == loader.epoch == 3
    same(rows_of(clone, X), rows_of(loader, X))  # the next epoch too


def test_reopened_is_a_pickle_round_trip_without_pickle(small_store):
    store, X, _ = small_store
    loader = DataLoader(store, labels="y", **SETTINGS["shuffled"])
    loader.set_epoch(1)
    copy = loader.reopened()
    assert copy.store is not loader.store and copy.store.path == loader.store.path
    assert copy.state_dict() == loader.state_dict()
    same(rows_of(copy, X), rows_of(loader, X))


@pytest.mark.parametrize("name", ["shuffled", "rows", "buffer"])
@pytest.mark.parametrize("taken", [0, 1, 4])
def test_a_loader_pickled_mid_pass_resumes_where_state_dict_says(small_store, name, taken):
    """A copy taken while a pass runs yields the rest of that epoch (as load_state_dict of
    its state_dict would); the original pass goes on unaffected."""
    store, X, _ = small_store
    loader = DataLoader(store, labels="y", **SETTINGS[name])
    it = loader.iter_batches()
    head = [next(it).rows for _ in range(taken)]
    clone = copy.deepcopy(loader)  # copy goes through the same __getstate__
    again = pickle.loads(pickle.dumps(loader))
    assert clone.state_dict() == again.state_dict() == loader.state_dict()
    assert loader.state_dict()["batches_consumed"] == taken
    rest = rows_of(loader, X, it)
    same(rows_of(clone, X), rest)
    same(rows_of(again, X), rest)
    full = DataLoader(store, labels="y", **SETTINGS[name])
    same(head + rest, rows_of(full, X))


def test_a_resume_pending_and_a_drawn_seed_travel(small_store):
    store, X, _ = small_store
    loader = DataLoader(store, 128, shuffle=True, labels="y")  # seed drawn at random
    want = rows_of(loader, X)
    other = DataLoader(store, 128, shuffle=True, labels="y")
    state = loader.state_dict()
    state.update(epoch=0, batches_consumed=5)
    other.load_state_dict(state)
    clone = pickle.loads(pickle.dumps(other))
    assert clone.seed == loader.seed
    same(rows_of(clone, X), want[5:])


class EveryThird:
    """A picklable torch-style sampler: rows 0, 3, 6... reversed on odd epochs."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rows = range(0, self.n, 3)
        return iter(reversed(rows) if self.epoch % 2 else rows)

    def __len__(self) -> int:
        return len(range(0, self.n, 3))


def test_samplers_travel_when_they_pickle(small_store):
    store, X, _ = small_store
    loader = DataLoader(store, 100, labels="y", sampler=EveryThird(store.n_rows), rank=1,
                        world_size=2)
    loader.set_epoch(1)
    clone = pickle.loads(pickle.dumps(loader))
    same(rows_of(clone, X), rows_of(loader, X))
    assert clone.epoch == loader.epoch == 2
    batches = [[5, 1], [2999], [7, 8, 9]]
    loader = DataLoader(store, labels="y", batch_sampler=batches)
    same(rows_of(pickle.loads(pickle.dumps(loader)), X), [np.array(b) for b in batches])
    one_shot = DataLoader(store, 10, sampler=(i for i in range(50)))  # a generator
    with pytest.raises(TypeError):
        pickle.dumps(one_shot)


def test_nothing_of_a_pass_is_pickled(small_store):
    """A loader that has run passes pickles as small as a fresh one: no decoded chunks,
    buffers, threads or locks (any of those would fail to pickle, or weigh megabytes)."""
    store, X, _ = small_store
    loader = DataLoader(store, 64, shuffle=True, seed=0, labels="y", num_workers=2)
    fresh = len(pickle.dumps(loader))
    rows_of(loader, X)
    it = loader.iter_batches()
    next(it)
    assert len(pickle.dumps(loader)) < fresh + 100 < 10_000
    it.close()


def test_dense_stores_and_backends_travel(tmp_path, rng):
    D = rng.standard_normal((700, 9)).astype(np.float32)
    store = sparsestore.save(tmp_path / "d.zarr", D, sparse=False,
                             labels={"y": np.arange(700)})
    loader = DataLoader(store, 64, shuffle=True, seed=2, labels="y")
    clone = pickle.loads(pickle.dumps(loader))
    assert type(clone.backend) is type(loader.backend)
    for (a, ya), (b, yb) in zip(clone, loader, strict=True):
        np.testing.assert_array_equal(a, D[ya])
        np.testing.assert_array_equal(b, D[yb])
        np.testing.assert_array_equal(ya, yb)


# ------------------------------------------------------------------ the store moved


def _grown(tmp_path):
    """A store of 1000 rows copied to a backup, then grown to 3000 by an append."""
    path, backup = tmp_path / "s.zarr", tmp_path / "backup.zarr"
    X = sp.random(3000, 50, density=0.1, format="csr", dtype=np.float32, random_state=0)
    y = np.arange(3000)
    w = sparsestore.create(path, n_cols=50, dtype=np.float32, chunk_bytes=4096,
                           indptr_chunk=256)
    w.append(X[:1000], labels={"y": y[:1000]})
    w.close()
    shutil.copytree(path, backup)
    with sparsestore.open(path, mode="r+") as w:
        w.append(X[1000:], labels={"y": y[1000:]})
    return path, backup, X


def test_a_pickled_loader_over_a_restored_store_raises_when_used(tmp_path):
    path, backup, X = _grown(tmp_path)
    loader = DataLoader(sparsestore.open(path), 256, shuffle=True, seed=0, labels="y")
    blob = pickle.dumps(loader)
    same(rows_of(pickle.loads(blob), X), rows_of(loader, X))  # before the restore
    shutil.copytree(backup, path, dirs_exist_ok=True)  # the later chunks stay on disk
    clone = pickle.loads(blob)  # unpickles (a torch worker starts and reports the error)
    assert "could not be reopened" in repr(clone)
    for use in (lambda c: list(c), lambda c: len(c), lambda c: c.state_dict(),
                lambda c: c.epoch, lambda c: pickle.loads(pickle.dumps(c)).num_rows):
        with pytest.raises(StoreChangedError, match="earlier commit"):
            use(clone)
    assert not hasattr(clone, "no_such_attribute")


def test_a_pickled_loader_over_a_replaced_store_raises_when_used(small_store):
    store, X, labels = small_store
    blob = pickle.dumps(DataLoader(store, 100, labels="y"))
    sparsestore.save(store.path, X[:10], labels={"y": labels["y"][:10]}, overwrite=True)
    with pytest.raises(StoreChangedError, match="replaced"):
        next(iter(pickle.loads(blob)))
