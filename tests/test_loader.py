"""DataLoader against scipy/numpy oracles: coverage, order, sharding, resume, threads."""

from __future__ import annotations

import gc
import json
import pickle
import re
import tempfile
import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsestore
from sparsestore.backends import NumpyBackend, TwoStepBackend, available_backends, get_backend
from sparsestore.errors import InvalidInputError, LabelError, OutOfRangeError, SparseStoreError
from sparsestore.loader import Batch, DataLoader, Position
from sparsestore.reader import THREAD_PREFIX


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def check_pass(loader: DataLoader, X: sp.csr_matrix, y: np.ndarray | None = None) -> np.ndarray:
    """Run one pass; check every batch against scipy and the labels; return the row order."""
    seen = []
    nb = 0
    for b in loader.iter_batches():
        assert isinstance(b, Batch)
        nb += 1
        assert b.row_splits[0] == 0 and b.row_splits.dtype == np.int64
        got = b.to_scipy()
        want = X[b.rows]
        assert got.shape == want.shape
        assert (got != want).nnz == 0
        # canonical: sorted, unique indices in every row
        for i in range(b.n_rows):
            ind = b.indices[b.row_splits[i] : b.row_splits[i + 1]]
            assert (np.diff(ind) > 0).all()
        if y is not None:
            np.testing.assert_array_equal(b.labels[0], y[b.rows])
        seen.append(b.rows)
    assert nb == len(loader)
    return np.concatenate(seen) if seen else np.zeros(0, np.int64)


def batch_sizes(loader: DataLoader) -> list[int]:
    return [b.n_rows for b in loader.iter_batches()]


# ------------------------------------------------------------------ coverage


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("bs", [1, 7, 256, 5000])
def test_every_row_once_and_batches_match_scipy(small_store, shuffle, drop_last, bs):
    store, X, labels = small_store
    n = X.shape[0]
    loader = DataLoader(store, batch_size=bs, shuffle=shuffle, seed=3, drop_last=drop_last,
                        labels="y", shuffle_buffer_blocks=3)
    if bs == 1 and shuffle:  # keep the per-row test cheap: check the order only
        order = np.concatenate([b.rows for b in loader.iter_batches()])
    else:
        order = check_pass(loader, X, labels["y"])
    if drop_last:
        assert order.size == (n // bs) * bs
        assert np.unique(order).size == order.size
    else:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    if not shuffle:
        np.testing.assert_array_equal(order, np.arange(order.size))
    sizes = batch_sizes(loader)
    assert all(s == bs for s in sizes[:-1])
    assert len(sizes) == len(loader)
    assert loader.num_rows == sum(sizes)


def test_numpy_backend_yields_csr_and_labels(small_store):
    store, X, labels = small_store
    loader = DataLoader(store, batch_size=500, shuffle=True, seed=1, labels=["y", "w"])
    for xb, yb, wb in loader:
        assert isinstance(xb, sp.csr_matrix) and xb.has_canonical_format
        assert (xb != X[yb]).nnz == 0
        np.testing.assert_array_equal(wb, labels["w"][yb])
    plain = DataLoader(store, batch_size=500)
    first = next(iter(plain))
    assert isinstance(first, sp.csr_matrix)
    assert (first != X[:500]).nnz == 0


def _save(X, labels=None, **kw):
    d = tempfile.mkdtemp()
    return sparsestore.save(f"{d}/s.zarr", X, labels=labels, **kw)


@settings(max_examples=25)
@given(
    n=st.integers(0, 120),
    m=st.integers(1, 30),
    density=st.floats(0, 0.5),
    bs=st.integers(1, 50),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    buffer_blocks=st.integers(1, 4),
    block_rows=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 1000),
)
def test_roundtrip_random_stores(n, m, density, bs, shuffle, drop_last, buffer_blocks,
                                 block_rows, seed):
    X = sp.random(n, m, density=density, format="csr", dtype=np.float64,
                  random_state=np.random.default_rng(seed))
    y = np.arange(n, dtype=np.int32) * 3
    store = _save(X, labels={"y": y}, chunk_bytes=1024)
    loader = DataLoader(store, batch_size=bs, shuffle=shuffle, seed=seed, drop_last=drop_last,
                        labels="y", shuffle_buffer_blocks=buffer_blocks, block_rows=block_rows,
                        num_workers=seed % 3)
    order = check_pass(loader, X, y)
    expect = (n // bs) * bs if drop_last else n
    assert order.size == expect == loader.num_rows
    assert np.unique(order).size == order.size


def test_zero_row_and_all_empty_rows(tmp_path):
    empty = sparsestore.create(tmp_path / "e.zarr", n_cols=5, dtype=np.float32)
    loader = DataLoader(empty, batch_size=4, shuffle=True, seed=0)
    assert len(loader) == 0 and list(loader) == [] and loader.num_rows == 0
    Z = sp.csr_matrix((37, 6), dtype=np.float32)
    zs = sparsestore.save(tmp_path / "z.zarr", Z)
    loader = DataLoader(zs, batch_size=10, shuffle=True, seed=0)
    order = check_pass(loader, Z)
    np.testing.assert_array_equal(np.sort(order), np.arange(37))


# ------------------------------------------------------------------ epochs and seeds


def _order(loader):
    return np.concatenate([b.rows for b in loader.iter_batches()])


def test_epochs_differ_same_epoch_repeats(small_store):
    store, _, _ = small_store
    loader = DataLoader(store, batch_size=64, shuffle=True, seed=11)
    loader.set_epoch(0)
    e0 = _order(loader)
    assert loader.epoch == 1  # a completed pass advances the epoch
    e1 = _order(loader)
    loader.set_epoch(0)
    np.testing.assert_array_equal(_order(loader), e0)
    assert not np.array_equal(e0, e1)
    other = DataLoader(store, batch_size=64, shuffle=True, seed=11)
    np.testing.assert_array_equal(_order(other), e0)
    # seed=None draws a seed once: two passes of one epoch agree, and it is in the state
    anon = DataLoader(store, batch_size=64, shuffle=True)
    a = _order(anon)
    anon.set_epoch(0)
    np.testing.assert_array_equal(_order(anon), a)
    assert anon.state_dict()["seed"] == anon.seed


def test_early_break_does_not_advance_epoch(small_store):
    store, _, _ = small_store
    loader = DataLoader(store, batch_size=64, shuffle=True, seed=2)
    for _ in loader:
        break
    assert loader.epoch == 0
    full = _order(loader)  # a new pass restarts the epoch from its first batch
    loader.set_epoch(0)
    np.testing.assert_array_equal(full, _order(loader))


# ------------------------------------------------------------------ sharding


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [2, 3, 7])
def test_ranks_disjoint_and_covering(small_store, shuffle, world):
    store, X, labels = small_store
    base = DataLoader(store, batch_size=100, shuffle=shuffle, seed=5, labels="y")
    orders = []
    for r in range(world):
        ld = base.with_shard(r, world)
        assert ld.rank == r and ld.world_size == world and ld.seed == base.seed
        orders.append(check_pass(ld, X, labels["y"]))
    allrows = np.concatenate(orders)
    np.testing.assert_array_equal(np.sort(allrows), np.arange(X.shape[0]))
    sizes = [o.size for o in orders]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("counts", [[3, 1, 2], [0, 4], [2, 2, 2], [5], []])
def test_taken_in_turn_is_where_sub_shards_read_in_turn_stand(counts):
    from collections import deque

    from sparsestore.sharding import taken_in_turn

    turn, order = deque(iter([w] * n) for w, n in enumerate(counts)), []
    while turn:  # one batch from each sub-shard in turn, until each runs out
        it = turn.popleft()
        w = next(it, None)
        if w is not None:
            order.append(w)
            turn.append(it)
    for seen in range(len(order) + 3):
        want = [order[:seen].count(w) for w in range(len(counts))]
        assert taken_in_turn(counts, seen) == want, seen


def test_drop_last_per_rank(small_store):
    store, _, _ = small_store  # 3000 rows, 7 ranks -> 428 or 429 rows each
    for r in range(7):
        ld = DataLoader(store, batch_size=100, drop_last=True, rank=r, world_size=7)
        assert batch_sizes(ld) == [100] * 4 and len(ld) == 4
        ld = DataLoader(store, batch_size=100, rank=r, world_size=7)
        sizes = batch_sizes(ld)
        assert sizes[:4] == [100] * 4 and sizes[4] in (28, 29) and len(sizes) == 5


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("count", [1, 2, 3, 7, 40])
def test_sub_shards_split_the_share_once(small_store, shuffle, drop_last, count):
    """``shard(i, n)``: disjoint sub-shards reading the parent's rows exactly once per epoch
    (with ``drop_last``, exactly its ``len`` full batches), on the parent's batch grid,
    reproducibly, and in the parent's order when unshuffled."""
    store, X, labels = small_store
    parent = DataLoader(store, batch_size=97, shuffle=shuffle, seed=5, labels="y",
                        drop_last=drop_last, rank=1, world_size=2, shuffle_buffer_blocks=3)
    parent.set_epoch(2)
    want = parent.epoch_rows()
    shards = [parent.shard(i, count) for i in range(count)]
    assert all(s.epoch == 2 and s.sub_shards == ((i, count),) for i, s in enumerate(shards))
    assert sum(len(s) for s in shards) == len(parent)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    orders = [check_pass(s, X, labels["y"]) for s in shards]
    assert [o.size for o in orders] == [s.num_rows for s in shards]
    allrows = np.concatenate(orders)
    assert np.unique(allrows).size == allrows.size  # disjoint
    if drop_last:
        assert all(b.n_rows == 97 for s in shards for b in s.iter_batches())
        assert allrows.size == parent.num_rows == len(parent) * 97
    else:
        np.testing.assert_array_equal(np.sort(allrows), np.sort(want))  # covering
    if not shuffle:
        np.testing.assert_array_equal(allrows, want[: allrows.size])
    again = [parent.shard(i, count).epoch_rows(2) for i in range(count)]
    for a, b in zip(orders, again, strict=True):
        np.testing.assert_array_equal(a, b)  # reproducible from seed and epoch


def test_sub_shards_compose_and_reshuffle(small_store):
    store, _, _ = small_store
    parent = DataLoader(store, batch_size=50, shuffle=True, seed=8).shard(1, 2)
    inner = [parent.shard(j, 3) for j in range(3)]
    assert inner[2].sub_shards == ((1, 2), (2, 3))
    got = np.concatenate([s.epoch_rows(0) for s in inner])
    np.testing.assert_array_equal(np.sort(got), np.sort(parent.epoch_rows(0)))
    assert not np.array_equal(inner[0].epoch_rows(0), inner[0].epoch_rows(1))
    with pytest.raises(InvalidInputError, match="index"):
        parent.shard(3, 3)
    with pytest.raises(InvalidInputError, match="count"):
        parent.shard(0, 0)
    assert parent.with_shard(0, 2).sub_shards == ()


def test_sub_shards_of_a_sampler_deal_its_batches(small_store):
    store, _, _ = small_store
    batches = [[i, i + 1] for i in range(0, 22, 2)]
    ld = DataLoader(store, batch_sampler=batches, rank=1, world_size=2)
    mine = [b.rows.tolist() for b in ld.iter_batches()]
    got = [[b.rows.tolist() for b in ld.shard(i, 3).iter_batches()] for i in range(3)]
    assert got == [mine[0::3], mine[1::3], mine[2::3]]
    assert [len(ld.shard(i, 3)) for i in range(3)] == [2, 2, 1]


def test_sub_shard_resumes_pickles_and_refuses_another_shards_state(small_store):
    store, _, _ = small_store
    shard = DataLoader(store, batch_size=64, shuffle=True, seed=4).shard(1, 3)
    full = [b.rows for b in shard.shard(0, 1).iter_batches()]
    it = shard.iter_batches()
    head = [next(it).rows for _ in range(4)]
    state = json.loads(json.dumps(shard.state_dict()))
    copy = pickle.loads(pickle.dumps(shard))
    it.close()
    assert state["sub_shards"] == [[1, 3]] and copy.sub_shards == ((1, 3),)
    resumed = DataLoader(store, batch_size=64, shuffle=True).shard(1, 3)
    resumed.load_state_dict(state)
    for rest in (resumed, copy):
        for a, b in zip(head + [b.rows for b in rest.iter_batches()], full, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidInputError, match="sub-shard"):
        DataLoader(store, batch_size=64, shuffle=True).shard(0, 3).load_state_dict(state)


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("stop_after", [0, 1, 5, 11, 12])
def test_resume_equals_uninterrupted(small_store, shuffle, stop_after):
    store, _, _ = small_store
    kw = dict(batch_size=250, shuffle=shuffle, labels="y", rank=1, world_size=2,
              shuffle_buffer_blocks=2)
    ref = DataLoader(store, **kw, seed=9)
    ref.set_epoch(4)
    full = [b.rows for b in ref.iter_batches()]
    assert len(full) == 6
    first = DataLoader(store, **kw, seed=9)
    first.set_epoch(4)
    it = first.iter_batches()
    got = [next(it).rows for _ in range(min(stop_after, 6))]
    state = json.loads(json.dumps(first.state_dict()))
    it.close()
    assert state["batches_consumed"] == min(stop_after, 6) and state["epoch"] == 4
    resumed = DataLoader(store, **kw)  # seed comes from the state
    resumed.load_state_dict(state)
    rest = [b.rows for b in resumed.iter_batches()]
    for a, b in zip(got + rest, full, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.epoch == 5 and resumed.state_dict()["batches_consumed"] == 0


def test_resume_across_epochs_with_set_epoch(small_store):
    store, _, _ = small_store
    ld = DataLoader(store, batch_size=300, shuffle=True, seed=1)
    ld.set_epoch(2)
    it = iter(ld)
    next(it), next(it)
    state = ld.state_dict()
    it.close()
    ref = DataLoader(store, batch_size=300, shuffle=True, seed=1)
    ref.set_epoch(2)
    want = [b.rows for b in ref.iter_batches()][2:]
    again = DataLoader(store, batch_size=300, shuffle=True, seed=123)
    again.load_state_dict(state)
    again.set_epoch(2)  # the usual "set_epoch at the start of each epoch" keeps the resume
    got = [b.rows for b in again.iter_batches()]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_position_follows_the_pass_and_the_state(small_store):
    """``position`` is the state's epoch and batches consumed: mid-pass, after a pass broken
    off, after a completed one and after ``load_state_dict``; it cannot be assigned."""
    store, _, _ = small_store
    ld = DataLoader(store, batch_size=300, shuffle=True, seed=1)
    assert ld.position == Position(0, 0)
    it = ld.iter_batches()
    next(it), next(it), next(it)
    assert ld.position == Position(0, 3)
    state = ld.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (0, 3)
    it.close()
    assert ld.position == Position(0, 3)  # broken off: a checkpoint now resumes at batch 3
    for _ in ld.iter_batches():
        pass
    assert ld.position == Position(1, 0) and ld.epoch == 1
    other = DataLoader(store, batch_size=300, shuffle=True)
    other.load_state_dict(state)
    assert other.position == Position(0, 3)
    other.set_epoch(5)
    assert other.position == Position(5, 0)
    with pytest.raises(AttributeError):
        ld.position = Position(2, 0)
    with pytest.raises(AttributeError):
        ld.position.epoch = 2


def test_position_listeners_hear_every_move(small_store):
    store, _, _ = small_store
    ld = DataLoader(store, batch_size=1000, shuffle=True, seed=1)
    heard = []
    ld.add_position_listener(lambda event, pos: heard.append((event, pos)))
    ld.set_epoch(0)  # to the epoch it already has: still a move
    for _ in ld.iter_batches():
        pass
    state = ld.state_dict()
    it = ld.iter_batches()
    next(it)
    it.close()  # broken off: no event
    ld.load_state_dict(dict(state, batches_consumed=1))
    assert heard == [("set_epoch", Position(0, 0)), ("epoch_end", Position(1, 0)),
                     ("load_state_dict", Position(1, 1))]
    assert not pickle.loads(pickle.dumps(ld))._listeners and not ld.shard(0, 2)._listeners
    ld.remove_position_listener(ld._listeners[0])
    ld.set_epoch(3)
    assert len(heard) == 3
    with pytest.raises(InvalidInputError):
        ld.remove_position_listener(print)
    with pytest.raises(InvalidInputError):
        ld.add_position_listener(3)


def test_state_dict_has_the_documented_keys(small_store):
    store, _, _ = small_store
    state = DataLoader(store, batch_size=10, shuffle=True, seed=3).state_dict()
    doc = DataLoader.state_dict.__doc__
    for key in state:
        assert f"``{key}``" in doc, key
    assert json.loads(json.dumps(state)) == state


def test_load_state_rejects_mismatch(small_store):
    store, _, _ = small_store
    state = DataLoader(store, batch_size=10).state_dict()
    with pytest.raises(InvalidInputError, match="batch_size"):
        DataLoader(store, batch_size=11).load_state_dict(state)
    with pytest.raises(InvalidInputError):
        DataLoader(store, batch_size=10).load_state_dict({"epoch": 1})
    with pytest.raises(InvalidInputError, match="rows"):
        DataLoader(store, batch_size=10, rows=np.arange(5)).load_state_dict(state)


# ------------------------------------------------------------------ decoding and threads


def test_sequential_pass_decodes_each_chunk_once(small_store):
    store, X, _ = small_store
    chunk = store.arrays["data"].chunks[0]
    n_chunks = -(-X.nnz // chunk)
    assert n_chunks > 10
    for workers in (0, 1, 3):
        loader = DataLoader(store, batch_size=37, labels="y", num_workers=workers,
                            block_chunks=1)
        check_pass(loader, X, None)
        dec = loader.decoded_chunks
        assert dec["data"] == n_chunks and dec["indices"] == -(-X.nnz // store.arrays[
            "indices"].chunks[0])
        assert dec["indptr"] == 0  # read once, to plan the blocks: the passes start with it
        assert dec["labels/y"] == -(-X.shape[0] // store.labels["y"].array.chunks[0]) == 2


def test_sequential_blocks_hold_a_fixed_byte_size_whatever_the_chunks(tmp_path, monkeypatch):
    """Small chunks do not shrink sequential blocks (and the reader's units) with them."""
    import sparsestore.sizing as sizing

    monkeypatch.setattr(sizing, "SEQUENTIAL_BLOCK_BYTES", 256 * 2**10)
    rng = np.random.default_rng(0)
    X = sp.random(4_000, 500, density=0.4, format="csr", dtype=np.float32, random_state=rng)
    for chunk_bytes in (16 * 2**10, 4 * 2**20):
        store = sparsestore.save(tmp_path / f"c{chunk_bytes}.zarr", X, chunk_bytes=chunk_bytes)
        loader = DataLoader(store, batch_size=100)
        bounds = loader._plan_bounds()[0]
        values = np.diff(X.indptr[bounds])  # stored values per block
        chunk = store.arrays["data"].chunks[0]
        want = max(2 * chunk, sizing.SEQUENTIAL_BLOCK_BYTES // 4)
        assert values.size > 1 or want >= X.nnz
        assert (values[:-1] >= want - X.getnnz(axis=1).max()).all(), (chunk_bytes, values)
        check_pass(loader, X)


def test_first_batch_waits_only_for_its_own_chunks(small_store):
    # Sequential passes start with a unit of one batch: with no worker threads (nothing
    # decoded ahead), the first batch has decoded only the chunks its rows touch, not the
    # whole first block; the pass then still decodes each chunk once.
    store, X, _ = small_store
    chunk = store.arrays["data"].chunks[0]
    loader = DataLoader(store, batch_size=5, num_workers=0, block_chunks=4)
    it = loader.iter_batches()
    first = next(it)
    assert (first.to_scipy() != X[:5]).nnz == 0
    touched = len(range(0, int(X.indptr[5]), chunk)) or 1
    assert loader.decoded_chunks["data"] == touched < 4
    for _ in it:
        pass
    assert loader.decoded_chunks["data"] == -(-X.nnz // chunk)


def test_shuffled_pieces_are_gathered_on_several_threads(small_store, monkeypatch):
    """The consumer gathers every num_workers-th piece of a shuffled unit; the pass's other
    threads gather the rest ahead of it (a unit's gathers do not all queue on one thread)."""
    from sparsestore.reader import BlockReader

    store, X, labels = small_store
    seen: list[str] = []
    piece = BlockReader._piece

    def spy(self, *args):
        seen.append(threading.current_thread().name)
        return piece(self, *args)

    monkeypatch.setattr(BlockReader, "_piece", spy)
    loader = DataLoader(store, batch_size=16, shuffle=True, seed=1, num_workers=2, labels="y")
    check_pass(loader, X, labels["y"])
    assert len(set(seen)) >= 2 and len(seen) >= X.shape[0] // 16


@pytest.mark.parametrize("units", [{"shuffle_buffer_blocks": 2},
                                   {"shuffle_buffer_bytes": 3 * 16384}])
def test_shuffled_pass_of_many_units_decodes_each_chunk_once(small_store, units):
    # Neighbouring blocks read in different units share the chunk their boundary row
    # crosses: that row is read with the later unit, from a copy of its piece the earlier
    # unit kept, so the chunk is not decoded a second time.
    store, X, labels = small_store
    n_chunks = {a: -(-X.nnz // store.arrays[a].chunks[0]) for a in ("data", "indices")}
    loader = DataLoader(store, batch_size=64, shuffle=True, seed=0, block_chunks=1,
                        num_workers=0, labels="y", **units)
    for _ in range(2):
        rows = check_pass(loader, X, labels["y"])
        np.testing.assert_array_equal(np.sort(rows), np.arange(X.shape[0]))
        assert loader._sampler_for_blocks().plan(0).n_units > 4
        for a, n in n_chunks.items():
            assert loader.decoded_chunks[a] == n, a
        assert all(c.kept_bytes() == 0 for c in loader._last_reader.caches.values())


def test_a_share_that_fits_one_unit_stays_decoded_between_epochs(small_store):
    # Every epoch permutes the same decoded rows: only the first pass decodes them.
    store, X, labels = small_store
    n_chunks = -(-X.nnz // store.arrays["data"].chunks[0])
    loader = DataLoader(store, batch_size=64, shuffle=True, seed=0, labels="y")
    assert loader._sampler_for_blocks().plan(0).n_units == 1
    orders = []
    for epoch in range(3):
        orders.append(check_pass(loader, X, labels["y"]))
        # (a chunk where two threads' shares of the unit meet may be decoded by both)
        decoded = loader.decoded_chunks.get("data", 0)
        assert n_chunks <= decoded <= n_chunks + 1 if epoch == 0 else decoded == 0
    assert not np.array_equal(orders[1], orders[2])
    it = loader.iter_batches()  # a pass stopped early keeps it too
    next(it)
    it.close()
    check_pass(loader, X, labels["y"])
    assert loader.decoded_chunks.get("data", 0) == 0
    # A rank's share of a store that fits one unit is its slice of one permutation of the
    # whole store: each rank decodes the whole store once, then keeps it.
    ranks = [DataLoader(store, batch_size=64, shuffle=True, seed=0, labels="y", rank=r,
                        world_size=2) for r in range(2)]
    for epoch in range(2):
        rows = [check_pass(ld, X, labels["y"]) for ld in ranks]
        np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(X.shape[0]))
        for ld in ranks:
            decoded = ld.decoded_chunks.get("data", 0)
            assert n_chunks <= decoded <= n_chunks + 1 if epoch == 0 else decoded == 0


def test_chunk_cache_keeps_a_piece_for_a_later_read(small_store):
    from sparsestore.chunk_cache import SharedChunkCache

    store, X, _ = small_store
    arr = store.arrays["data"]
    c = int(arr.chunks[0])
    cache = SharedChunkCache(arr, capacity=1)
    cache.keep({1: [(c + 3, c + 10)]}, max_bytes=2**20)
    np.testing.assert_array_equal(cache.read(c, c + 3, X.nnz), X.data[c : c + 3])
    cache.read(2 * c, 2 * c + 1, X.nnz)  # chunk 1 leaves the cache
    assert cache.decoded == 2 and cache.kept_bytes() == 7 * X.data.itemsize
    np.testing.assert_array_equal(cache.read(c + 3, c + 10, X.nnz), X.data[c + 3 : c + 10])
    assert cache.decoded == 2 and cache.kept_bytes() == 0  # from the copy, which is gone
    # Over its byte budget nothing is copied: the later read decodes the chunk again.
    cache.keep({1: [(c + 3, c + 10)]}, max_bytes=4)
    cache.read(c, c + 3, X.nnz)
    cache.read(2 * c, 2 * c + 1, X.nnz)
    assert cache.kept_bytes() == 0
    np.testing.assert_array_equal(cache.read(c + 3, c + 10, X.nnz), X.data[c + 3 : c + 10])
    assert cache.decoded == 5


def test_shuffled_pass_on_threads_decodes_boundary_chunks_at_most_twice(small_store):
    # Units decoded side by side may race for a boundary chunk: never more than twice.
    store, X, _ = small_store
    chunk = store.arrays["data"].chunks[0]
    n_chunks = -(-X.nnz // chunk)
    loader = DataLoader(store, batch_size=64, shuffle=True, seed=0, block_chunks=1,
                        shuffle_buffer_blocks=2, num_workers=3)
    check_pass(loader, X)
    n_blocks = loader._sampler_for_blocks().n_blocks
    assert n_chunks <= loader.decoded_chunks["data"] <= n_chunks + n_blocks - 1


@pytest.mark.parametrize("how", ["break", "exception", "gc"])
def test_threads_stop_when_iteration_stops(small_store, how):
    store, _, _ = small_store
    loader = DataLoader(store, batch_size=16, shuffle=True, seed=0, num_workers=3, prefetch=4,
                        block_chunks=1, shuffle_buffer_blocks=1)
    if how == "break":
        for i, _ in enumerate(loader):
            if i == 2:
                break
    elif how == "exception":
        with pytest.raises(RuntimeError):
            for i, _ in enumerate(loader):
                if i == 2:
                    raise RuntimeError("boom")
    else:
        it = iter(loader)
        next(it)
        assert reader_threads()
        del it
    gc.collect()
    assert reader_threads() == []


def test_worker_error_propagates_and_threads_stop(small_store, monkeypatch):
    store, _, _ = small_store
    from sparsestore import reader

    def broken(self, unit):
        raise sparsestore.errors.ChecksumError("damaged chunk")

    monkeypatch.setattr(reader.BlockReader, "decode", broken)
    with pytest.raises(sparsestore.errors.ChecksumError):
        list(DataLoader(store, batch_size=16, num_workers=2))
    gc.collect()
    assert reader_threads() == []


# ------------------------------------------------------------------ subsets and samplers


@pytest.mark.parametrize(
    "cols",
    [slice(10, 200, 3), np.array([5, 17, 250, 399]), np.array([399, 3, 120, 4, 0]),
     np.arange(400) % 3 == 0, np.array([-1, 2])],
)
def test_column_subsets_match_scipy(small_store, cols):
    store, X, _ = small_store
    loader = DataLoader(store, batch_size=333, shuffle=True, seed=0, columns=cols)
    want_cols = np.arange(400)[cols]
    assert loader.n_cols == want_cols.size
    for b in loader.iter_batches():
        got = b.to_scipy()
        want = X[b.rows][:, want_cols]
        assert got.shape == want.shape and (got != want).nnz == 0
        for i in range(b.n_rows):
            assert (np.diff(b.indices[b.row_splits[i] : b.row_splits[i + 1]]) > 0).all()


def test_row_subset(small_store):
    store, X, labels = small_store
    mask = np.zeros(X.shape[0], bool)
    mask[::7] = True
    mask[100:130] = True
    for rows in (mask, np.flatnonzero(mask)[::-1].copy()):
        for shuffle in (False, True):
            ld = DataLoader(store, batch_size=50, rows=rows, shuffle=shuffle, seed=1,
                            labels="y")
            order = check_pass(ld, X, labels["y"])
            np.testing.assert_array_equal(np.sort(order), np.flatnonzero(mask))
            if not shuffle:
                np.testing.assert_array_equal(order, np.flatnonzero(mask))
    with pytest.raises(InvalidInputError):
        DataLoader(store, rows=[1, 1, 2])


@pytest.mark.parametrize("read_bytes", [None, 40_000])
def test_a_samplers_batches_are_read_together(small_store, monkeypatch, read_bytes):
    # Random rows touch most chunks: several batches are read at once, so each chunk is
    # decoded once per group of batches, not once per batch; batches stay in order.
    import sparsestore.chunks as chunks
    import sparsestore.explicit_samplers as es

    decoded = []
    real = chunks.ChunkDecoder.decode_into

    def spy(self, k, out, pool=None):
        decoded.append(self.name)
        return real(self, k, out, pool)

    monkeypatch.setattr(chunks.ChunkDecoder, "decode_into", spy)
    if read_bytes is not None:
        monkeypatch.setattr(es, "SAMPLER_READ_BYTES", read_bytes)
    store, X, labels = small_store
    n_chunks = -(-X.nnz // store.arrays["data"].chunks[0])
    perm = np.random.default_rng(1).permutation(X.shape[0])
    ld = DataLoader(store, batch_size=16, sampler=perm, labels="y", num_workers=1)
    np.testing.assert_array_equal(check_pass(ld, X, labels["y"]), perm)
    groups = len(list(es._grouped(iter([np.zeros(16)] * len(ld)), ld._sampler_read_rows())))
    assert len(ld) > 100 and (groups == 1) == (read_bytes is None)
    assert groups < len(ld) / 5  # per batch, a pass would decode about n_chunks * len(ld)
    assert n_chunks <= decoded.count("data") <= groups * n_chunks


def test_sampler_and_batch_sampler(small_store):
    store, X, labels = small_store
    rng = np.random.default_rng(0)
    ids = rng.integers(0, X.shape[0], 1000).tolist()  # repeats allowed, any order
    ld = DataLoader(store, batch_size=64, sampler=ids, labels="y")
    order = check_pass(ld, X, labels["y"])
    np.testing.assert_array_equal(order, ids)
    assert ld.num_rows == 1000
    batches = [[5, 3, 3], [2999], [], list(range(100, 0, -1))]
    ld = DataLoader(store, batch_sampler=batches, labels="y")
    got = [b.rows.tolist() for b in ld.iter_batches()]
    assert got == batches
    check_pass(ld, X, labels["y"])
    # two ranks deal batches round-robin: disjoint, covering
    parts = [
        [b.rows.tolist() for b in DataLoader(store, batch_sampler=batches, rank=r,
                                             world_size=2).iter_batches()]
        for r in range(2)
    ]
    assert parts == [[batches[0], batches[2]], [batches[1], batches[3]]]
    # drop_last with sampler, and resume skips consumed batches
    ld = DataLoader(store, batch_size=300, sampler=ids, drop_last=True)
    assert len(ld) == 3 and batch_sizes(ld) == [300] * 3
    it = ld.iter_batches()
    next(it)
    state = ld.state_dict()
    it.close()
    again = DataLoader(store, batch_size=300, sampler=ids, drop_last=True)
    again.load_state_dict(state)
    rest = [b.rows for b in again.iter_batches()]
    np.testing.assert_array_equal(np.concatenate(rest), ids[300:900])
    with pytest.raises(OutOfRangeError):
        list(DataLoader(store, sampler=[0, 5000]))


def test_sampler_set_epoch_forwarded(small_store):
    store, _, _ = small_store

    class Sampler:
        epoch = None

        def __iter__(self):
            return iter(range(10))

        def __len__(self):
            return 10

        def set_epoch(self, e):
            self.epoch = e

    s = Sampler()
    ld = DataLoader(store, batch_size=4, sampler=s)
    ld.set_epoch(3)
    assert s.epoch == 3 and len(ld) == 3


# ------------------------------------------------------------------ dense stores


@pytest.mark.parametrize("shuffle", [False, True])
def test_dense_store_batches_match_numpy(tmp_path, shuffle):
    rng = np.random.default_rng(1)
    A = rng.random((500, 12)).astype(np.float32)
    y = rng.integers(0, 5, 500)
    store = sparsestore.save(tmp_path / "d.zarr", A, labels={"y": y}, sparse=False,
                             dense_chunk_bytes=2048)
    ld = DataLoader(store, batch_size=64, shuffle=shuffle, seed=0, labels="y",
                    columns=[0, 5, 11])
    assert ld.is_dense and ld.n_cols == 3
    for xb, yb in ld:
        assert isinstance(xb, np.ndarray) and xb.dtype == np.float32
        assert xb.shape == (yb.size, 3)
    order = []
    for b in ld.iter_batches():
        np.testing.assert_array_equal(b.dense, A[b.rows][:, [0, 5, 11]])
        np.testing.assert_array_equal(b.labels[0], y[b.rows])
        assert b.values is None and b.row_splits is None
        order.append(b.rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(order)), np.arange(500))
    full = DataLoader(store, batch_size=100, sampler=[4, 1, 4])
    np.testing.assert_array_equal(next(iter(full)), A[[4, 1, 4]])


# ------------------------------------------------------------------ API surface


def test_properties_and_path_input(small_store):
    store, _, labels = small_store
    ld = DataLoader(store.path, batch_size=128, labels=("w", "y"), drop_last=True)
    assert ld.store.path == store.path and ld.n_cols == 400 and ld.batch_size == 128
    assert ld.label_names == ("w", "y") and not ld.is_dense and ld.dtype == np.float32
    assert ld.label_specs == (("w", np.dtype(np.float32), (2,)), ("y", np.dtype(np.int64), ()))
    assert ld.num_rows == 23 * 128 and len(ld) == 23
    json.dumps(ld.state_dict())
    assert "DataLoader" in repr(ld)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(batch_size=0), InvalidInputError),
        (dict(batch_size=2.5), InvalidInputError),
        (dict(batch_size=True), InvalidInputError),
        (dict(rank=2, world_size=2), InvalidInputError),
        (dict(rank=-1), InvalidInputError),
        (dict(world_size=0), InvalidInputError),
        (dict(labels="nope"), LabelError),
        (dict(labels=["y", "y"]), LabelError),
        (dict(shuffle="yes"), InvalidInputError),
        (dict(seed=-1), InvalidInputError),
        (dict(shuffle_buffer_blocks=0), InvalidInputError),
        (dict(sampler=[1], batch_sampler=[[1]]), InvalidInputError),
        (dict(sampler=[1], shuffle=True), InvalidInputError),
        (dict(columns=[1, 1]), InvalidInputError),
        (dict(columns=[400]), OutOfRangeError),
        (dict(columns=np.ones(3, bool)), InvalidInputError),
        (dict(rows=[3000]), OutOfRangeError),
        (dict(backend="nope"), InvalidInputError),
        (dict(backend=object()), InvalidInputError),
    ],
)
def test_bad_arguments(small_store, kwargs, exc):
    store, _, _ = small_store
    with pytest.raises(exc) as info:
        DataLoader(store, **kwargs)
    assert isinstance(info.value, SparseStoreError)


def test_bad_store_argument():
    with pytest.raises(InvalidInputError):
        DataLoader(np.zeros((3, 3)))
    with pytest.raises(sparsestore.errors.StoreNotFoundError):
        DataLoader("/nonexistent/store.zarr")


def test_backends(small_store):
    store, X, _ = small_store
    assert "numpy" in available_backends()
    assert isinstance(get_backend("numpy"), NumpyBackend)
    with pytest.raises(InvalidInputError, match="numpy"):
        get_backend("no-such-backend")

    class Sizes:
        name = "sizes"

        def convert(self, batch, loader):
            return batch.n_rows, batch.nnz

    ld = DataLoader(store, batch_size=1000, backend=Sizes())
    out = list(ld)
    assert [n for n, _ in out] == [1000] * 3 and sum(k for _, k in out) == X.nnz
    assert list(DataLoader(store, batch_size=1000, backend=Sizes)) == out
    with pytest.raises(InvalidInputError, match="host.*wrap.*convert"):
        DataLoader(store, backend=object())


class Recording(TwoStepBackend):
    """The numpy backend, noting the thread each step ran on; ``host`` fails at ``fail_at``."""

    name = "recording"

    def __init__(self, fail_at: int | None = None) -> None:
        self.hosts: list[str] = []
        self.wraps: list[str] = []
        self.fail_at = fail_at

    def host(self, batch, loader):
        self.hosts.append(threading.current_thread().name)
        if len(self.hosts) - 1 == self.fail_at:
            raise sparsestore.errors.ChecksumError("host failed")
        return NumpyBackend().host(batch, loader), batch.rows

    def wrap(self, parts, loader):
        self.wraps.append(threading.current_thread().name)
        return parts


@pytest.mark.parametrize(("num_workers", "threads"), [(0, None), (2, None), (2, 3)])
def test_host_runs_on_the_stage_wrap_in_the_consumer(small_store, num_workers, threads):
    store, X, labels = small_store
    y = labels["y"]
    be = Recording()
    loader = DataLoader(store, batch_size=300, shuffle=True, seed=4, labels="y",
                        num_workers=num_workers, prefetch=3, backend=be)
    want = [b.rows for b in DataLoader(store, batch_size=300, shuffle=True, seed=4,
                                       labels="y").iter_batches()]
    got = list(loader.iter_converted(threads=threads))
    assert len(got) == len(want) == len(be.hosts) == len(be.wraps)
    for ((x, lab), rows), w in zip(got, want, strict=True):
        np.testing.assert_array_equal(rows, w)
        assert (x != X[w]).nnz == 0 and x.has_canonical_format
        np.testing.assert_array_equal(lab, y[w])
    me = threading.current_thread().name
    assert set(be.wraps) == {me}
    if threads:  # on host threads fed by the pass's stage thread
        assert {h.rsplit("_", 1)[0] for h in be.hosts} == {f"{THREAD_PREFIX}-host"}
    elif num_workers:  # off the consumer's thread, on the pass's own stage thread
        assert set(be.hosts) == {f"{THREAD_PREFIX}-host-feed"}
    else:  # num_workers=0: no thread at all
        assert set(be.hosts) == {me}
    assert reader_threads() == []


def test_convert_only_backend_converts_in_the_consumer(small_store):
    store, X, _ = small_store
    seen: list[str] = []

    class Legacy:  # the one-step contract of earlier releases
        name = "legacy"

        def convert(self, batch, loader):
            seen.append(threading.current_thread().name)
            return batch.to_scipy()

    loader = DataLoader(store, batch_size=256, backend=Legacy())
    parts = list(loader)
    assert set(seen) == {threading.current_thread().name} and len(seen) == len(loader)
    assert (sp.vstack(parts) != X).nnz == 0
    assert loader.epoch == 1


def test_position_counts_batches_handed_out_not_those_computed_ahead(small_store):
    store, _, _ = small_store
    loader = DataLoader(store, batch_size=1000, prefetch=8, backend=Recording())
    it = iter(loader)
    next(it)
    # the stage has already pulled the whole (3-batch) pass: the position says 1, and the
    # epoch has not moved on
    deadline = time.monotonic() + 10
    while len(loader.backend.hosts) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert loader.position == Position(0, 1)
    state = loader.state_dict()
    it.close()
    assert loader.epoch == 0 and reader_threads() == []
    other = DataLoader(store, batch_size=1000)
    other.load_state_dict(state)
    assert [b.rows[0] for b in other.iter_batches()] == [1000, 2000]
    assert len(list(loader)) == 3 and loader.position == Position(1, 0)


def test_a_host_failure_reaches_the_consumer_in_order(small_store):
    store, _, _ = small_store
    loader = DataLoader(store, batch_size=100, prefetch=4, backend=Recording(fail_at=3))
    got = []
    with pytest.raises(sparsestore.errors.ChecksumError, match="host failed"):
        for item in loader:
            got.append(item[1][0])
    assert got == [0, 100, 200]
    gc.collect()
    assert reader_threads() == [] and loader.epoch == 0


# ------------------------------------------------------------------ resume after a re-layout


def _interrupted_then_resumed(src, dst, stop_after, **kw):
    """Rows of ``stop_after`` batches from a loader over ``src``, then of a loader over
    ``dst`` resumed from its state (through JSON, as a checkpoint would carry it)."""
    first = DataLoader(src, **kw)
    it = first.iter_batches()
    got = [next(it).rows for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))
    it.close()
    resumed = DataLoader(dst, **kw)
    resumed.load_state_dict(state)
    return np.concatenate(got + [b.rows for b in resumed.iter_batches()])


def test_shuffled_resume_over_another_block_layout_is_refused(tmp_path, small_csr):
    """The same rows saved with another chunk size cut into other blocks, so the shuffled
    plan of the epoch differs: resuming there would serve some rows twice and skip others."""
    a = sparsestore.save(tmp_path / "a.zarr", small_csr, chunk_bytes=16384)
    b = sparsestore.save(tmp_path / "b.zarr", small_csr, chunk_bytes=65536)
    kw = dict(batch_size=100, shuffle=True, seed=5, shuffle_buffer_blocks=2)
    assert DataLoader(a, **kw)._sampler_for_blocks().n_blocks != \
        DataLoader(b, **kw)._sampler_for_blocks().n_blocks
    with pytest.raises(InvalidInputError, match="block"):
        _interrupted_then_resumed(a, b, 7, **kw)
    # Another shuffle buffer is another plan too.
    first = DataLoader(a, **kw)
    next(first.iter_batches())
    state = first.state_dict()
    with pytest.raises(InvalidInputError, match="shuffle_buffer_blocks"):
        DataLoader(a, **dict(kw, shuffle_buffer_blocks=3)).load_state_dict(state)


def test_resume_serves_every_row_once_where_the_plan_is_the_same(tmp_path, small_csr):
    n = small_csr.shape[0]
    a = sparsestore.save(tmp_path / "a.zarr", small_csr, chunk_bytes=16384)
    again = sparsestore.save(tmp_path / "again.zarr", small_csr, chunk_bytes=16384)
    other = sparsestore.save(tmp_path / "b.zarr", small_csr, chunk_bytes=65536)
    kw = dict(batch_size=100, shuffle=True, seed=5, shuffle_buffer_blocks=2)
    # A copy saved again with the same layout: the same blocks, the same plan.
    order = _interrupted_then_resumed(a, again, 7, **kw)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    # Unshuffled, rows come in storage order whatever the blocks: accepted, exactly once.
    order = _interrupted_then_resumed(a, other, 7, batch_size=100)
    np.testing.assert_array_equal(order, np.arange(n))


def test_state_without_a_plan_record_still_loads(small_store):
    """A state saved before the plan was recorded resumes as before (nothing to check)."""
    store, X, _ = small_store
    kw = dict(batch_size=250, shuffle=True, seed=2)
    ref = [b.rows for b in DataLoader(store, **kw).iter_batches()]
    first = DataLoader(store, **kw)
    it = first.iter_batches()
    next(it), next(it)
    state = first.state_dict()
    it.close()
    state.pop("plan", None)
    resumed = DataLoader(store, **kw)
    resumed.load_state_dict(state)
    rest = [b.rows for b in resumed.iter_batches()]
    np.testing.assert_array_equal(np.concatenate(rest), np.concatenate(ref[2:]))


# ------------------------------------------------------------------ byte-budget shuffle


def _sorted_label_store(tmp_path, n=20_000, groups=20, chunk_bytes=16384):
    """Rows stored group after group (label-sorted), ~5 nnz per row, many chunks."""
    rng = np.random.default_rng(0)
    X = sp.random(n, 50, density=0.1, format="csr", dtype=np.float32, random_state=rng)
    y = (np.arange(n) * groups // n).astype(np.int64)
    store = sparsestore.save(tmp_path / "sorted.zarr", X, labels={"y": y},
                             chunk_bytes=chunk_bytes)
    return store, X, y


def _mean_tv(label_batches, groups):
    return float(np.mean([0.5 * np.abs(np.bincount(b, minlength=groups) / b.size
                                       - 1 / groups).sum() for b in label_batches]))


def test_default_shuffle_mixes_like_a_permutation_when_the_store_fits(tmp_path):
    store, X, y = _sorted_label_store(tmp_path)
    n, groups, bs = y.size, 20, 256
    assert store.arrays["data"].nchunks > 20  # many chunks: a block shuffle would cluster
    loader = DataLoader(store, batch_size=bs, shuffle=True, seed=0, labels="y",
                        drop_last=True)
    got = _mean_tv([lab for _, lab in loader], groups)
    perm = y[np.random.default_rng(0).permutation(n)]
    want = _mean_tv([perm[i:i + bs] for i in range(0, n - bs + 1, bs)], groups)
    assert got <= 1.25 * want, (got, want)


@pytest.mark.parametrize("world", [2, 3])
def test_every_share_of_a_store_that_fits_mixes_like_a_permutation(tmp_path, world):
    """A store that fits one unit is one permutation of all its rows; each rank (and each
    sub-shard) reads its slice of it, not its few dealt blocks permuted."""
    from sparsestore.sampler import mixing_ratio

    groups, bs = 100, 256
    store, X, y = _sorted_label_store(tmp_path, groups=groups, chunk_bytes=65536)
    n = y.size
    blocks = store.arrays["data"].nchunks
    # Dealt blocks alone would mix far worse than a permutation.
    assert mixing_ratio(blocks / world, bs) > 2
    kw = dict(batch_size=bs, shuffle=True, seed=3, labels="y")
    whole = DataLoader(store, **kw).epoch_rows(1)
    ranks = [DataLoader(store, rank=r, world_size=world, **kw) for r in range(world)]
    ranks[0].set_epoch(1)
    rows = [ld.epoch_rows(1) for ld in ranks]
    np.testing.assert_array_equal(np.concatenate(rows), whole)
    subs = [DataLoader(store, **kw).shard(i, world).epoch_rows(1) for i in range(world)]
    np.testing.assert_array_equal(np.concatenate(subs), whole)
    perm = y[np.random.default_rng(0).permutation(n)]
    best = _mean_tv([perm[i:i + bs] for i in range(0, n - bs + 1, bs)], groups)
    for ld in ranks:
        got = check_pass(ld, X, y)  # the batches read hold these rows, values exact
        full = got[: got.size // bs * bs].reshape(-1, bs)
        assert _mean_tv(list(y[full]), groups) <= 1.25 * best
    np.testing.assert_array_equal(np.sort(np.concatenate(
        [ld.epoch_rows(0) for ld in ranks])), np.arange(n))


@pytest.mark.parametrize("workers", [2, 3])
def test_units_decoded_at_once_still_decode_each_chunk_once(tmp_path, monkeypatch, workers):
    """Units of many blocks, two or more in flight on different threads: the later one
    reads its seam rows from the copy the earlier one keeps, waiting for that decode when
    it is under way, so no chunk is decoded twice in a pass."""
    import time

    from sparsestore.chunks import ChunkDecoder
    from sparsestore.reader import MANY_SPANS

    store, X, y = _sorted_label_store(tmp_path, chunk_bytes=2048)
    real = ChunkDecoder.decode_chunks

    def slow(self, *args, **kwargs):  # decodes take long enough for units to overlap
        time.sleep(0.001)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ChunkDecoder, "decode_chunks", slow)
    n_chunks = {a: -(-X.nnz // store.arrays[a].chunks[0]) for a in ("data", "indices")}
    loader = DataLoader(store, batch_size=64, shuffle=True, seed=0, num_workers=workers,
                        labels="y", shuffle_buffer_bytes=640 * 1024)
    plan = loader._sampler_for_blocks().plan(0)
    assert plan.n_units >= 3 and plan.blocks_per_unit.min() > 2 * MANY_SPANS
    for epoch in range(2):
        loader.set_epoch(epoch)
        rows = check_pass(loader, X, y)
        np.testing.assert_array_equal(np.sort(rows), np.arange(X.shape[0]))
        for a, n in n_chunks.items():
            assert loader.decoded_chunks[a] == n, (a, epoch)


def test_a_damaged_chunk_fails_a_pass_of_units_in_flight_without_hanging(tmp_path):
    """A unit that fails while a later one waits for its decodes releases that wait: the
    pass raises the damage, every time, and its threads end."""
    import threading

    from sparsestore.errors import SparseStoreError

    store, X, y = _sorted_label_store(tmp_path, chunk_bytes=2048)
    kw = dict(batch_size=64, shuffle=True, seed=0, num_workers=2,
              shuffle_buffer_bytes=640 * 1024)
    n_chunks = store.arrays["data"].nchunks
    for k in (1, n_chunks // 3, n_chunks // 2, n_chunks - 2):
        chunk = tmp_path / "sorted.zarr" / "data" / "c" / str(k)
        good = chunk.read_bytes()
        chunk.write_bytes(good[:20] + bytes([good[20] ^ 0x5A]) + good[21:])
        failed = []

        def run(kw=kw, failed=failed) -> None:
            try:
                for _ in DataLoader(sparsestore.open(store.path), **kw):
                    pass
            except SparseStoreError as exc:
                failed.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), f"the pass hung with chunk {k} damaged"
        assert failed, k
        chunk.write_bytes(good)
        assert not [t for t in threading.enumerate() if t.name.startswith("sparsestore-reader")]


def test_shuffle_units_respect_the_byte_budget(tmp_path):
    store, X, y = _sorted_label_store(tmp_path)
    budget = 64 * 1024
    loader = DataLoader(store, batch_size=100, shuffle=True, seed=1,
                        shuffle_buffer_bytes=budget)
    plan = loader._sampler_for_blocks().plan(0)
    assert plan.n_units > 4
    entry = store.arrays["data"].dtype.itemsize + store.arrays["indices"].dtype.itemsize
    row_bytes = np.diff(X.indptr) * entry + 8  # oracle: values, indices and a row pointer
    for u in range(plan.n_units):
        unit_bytes = int(row_bytes[plan.unit(u).rows].sum())
        assert unit_bytes <= budget // 2 or plan.blocks_per_unit[u] == 1
    # The pass still serves every row once.
    order = check_pass(loader, X, None)
    np.testing.assert_array_equal(np.sort(order), np.arange(y.size))


def test_poor_mixing_warns_once_naming_the_fix(tmp_path, monkeypatch):
    import warnings

    import sparsestore.mixing_check as mixing_check
    from sparsestore.cli import build_parser
    from sparsestore.errors import ShuffleQualityWarning

    store, _, _ = _sorted_label_store(tmp_path)
    # A unit of ~one 16 KiB-chunk block: batches of 256 rows draw from a couple of runs.
    loader = DataLoader(store, batch_size=256, shuffle=True, seed=0,
                        shuffle_buffer_bytes=64 * 1024)
    with pytest.warns(ShuffleQualityWarning, match="shuffle_buffer_bytes=") as rec:
        list(loader.iter_batches())
        list(loader.iter_batches())
    got = [w for w in rec if issubclass(w.category, ShuffleQualityWarning)]
    assert len(got) == 1
    # Its chunks are already small, so the fix is a budget, not a rewrite; and the budget
    # it names mixes well.
    text = str(got[0].message)
    assert "already small" in text and "convert" not in text
    advised = int(re.search(r"shuffle_buffer_bytes=(\d+)MiB", text).group(1)) * 2**20
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShuffleQualityWarning)
        list(DataLoader(store, batch_size=256, shuffle=True, seed=0,
                        shuffle_buffer_bytes=advised).iter_batches())
    # A store of large chunks is told the rewrite, by a command the CLI accepts.
    monkeypatch.setattr(mixing_check, "SMALL_BLOCK_BYTES", 0)
    command = mixing_check.SHUFFLE_LAYOUT_COMMAND
    with pytest.warns(ShuffleQualityWarning, match=re.escape(command)):
        list(DataLoader(store, batch_size=256, shuffle=True, seed=0,
                        shuffle_buffer_bytes=64 * 1024).iter_batches())
    args = build_parser().parse_args(command.split()[1:])
    assert (args.chunk_bytes, args.shard_bytes) == (128 * 1024, 8 * 2**20)
    # Default budget, store fits: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShuffleQualityWarning)
        list(DataLoader(store, batch_size=256, shuffle=True, seed=0).iter_batches())


def test_poor_mixing_warning_judges_by_the_stores_own_labels(tmp_path, monkeypatch):
    """Units hold every label of few groups in its share, so a store whose labels mix
    like a permutation is not warned even where the worst case (a label of about as many
    groups as a unit has blocks) would be; a label of many groups still is, by name."""
    import warnings

    import sparsestore.mixing_check as mixing_check
    from sparsestore.errors import ShuffleQualityWarning
    from sparsestore.mixing_check import ACCEPTABLE_MIXING_RATIO
    from sparsestore.sampler import mixing_ratio

    n, bs = 20_000, 256
    X = sp.random(n, 50, density=0.1, format="csr", dtype=np.float32,
                  random_state=np.random.default_rng(0))
    y = (np.arange(n) * 3 // n).astype(np.int64)
    donor = (np.arange(n) * 300 // n).astype(np.int64)
    kw = dict(batch_size=bs, shuffle=True, seed=0, shuffle_buffer_bytes=640 * 1024,
              drop_last=True)
    store = sparsestore.save(tmp_path / "y.zarr", X, labels={"y": y}, chunk_bytes=4096)
    loader = DataLoader(store, labels="y", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShuffleQualityWarning)
        plan = loader._sampler_for_blocks().plan(0)
        got = [lab for _, lab in loader]
    blocks = float(np.median(plan.blocks_per_unit))
    assert plan.n_units > 1 and mixing_ratio(blocks, bs) > ACCEPTABLE_MIXING_RATIO

    def over_permutation(labels, groups, batches):
        perm = labels[np.random.default_rng(1).permutation(n)]
        best = _mean_tv([perm[i:i + bs] for i in range(0, n - bs + 1, bs)], groups)
        return _mean_tv(batches, groups) / best

    assert over_permutation(y, 3, got) <= ACCEPTABLE_MIXING_RATIO
    both = sparsestore.save(tmp_path / "both.zarr", X, labels={"y": y, "donor": donor},
                            chunk_bytes=4096)
    loader = DataLoader(both, labels="donor", **kw)
    with pytest.warns(ShuffleQualityWarning, match="label 'donor'") as rec:
        got = [lab for _, lab in loader]
    assert over_permutation(donor, 300, got) > ACCEPTABLE_MIXING_RATIO
    # The budget it names is one under which that label mixes well.
    text = str(next(w for w in rec if w.category is ShuffleQualityWarning).message)
    advised = int(re.search(r"shuffle_buffer_bytes=(\d+)MiB", text).group(1)) * 2**20
    loader = DataLoader(both, labels="donor", **dict(kw, shuffle_buffer_bytes=advised))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShuffleQualityWarning)
        got = [lab for _, lab in loader]
    assert over_permutation(donor, 300, got) <= ACCEPTABLE_MIXING_RATIO
    # With no label to score, the warning is the worst case, and says so; so too where
    # the labels are too big to read for the check.
    bare = sparsestore.save(tmp_path / "bare.zarr", X, chunk_bytes=4096)
    with pytest.warns(ShuffleQualityWarning, match="the worst case"):
        list(DataLoader(bare, **kw).iter_batches())
    monkeypatch.setattr(mixing_check, "MIXING_CHECK_LABEL_BYTES", y.nbytes - 1)
    with pytest.warns(ShuffleQualityWarning, match="the worst case"):
        list(DataLoader(store, **kw).iter_batches())
    # A rank's share that fits one unit is permuted whole but holds only its dealt
    # blocks: on a store bigger than a unit it can still mix poorly, and is warned.
    monkeypatch.undo()
    decoded = X.nnz * 8 + n * 8
    ranked = DataLoader(both, labels="donor", rank=1, world_size=4,
                        **dict(kw, shuffle_buffer_bytes=decoded))
    with pytest.warns(ShuffleQualityWarning, match="label 'donor'"):
        got = [lab for _, lab in ranked]
    assert ranked._sampler_for_blocks().plan(0).n_units == 1
    assert over_permutation(donor, 300, got) > ACCEPTABLE_MIXING_RATIO


def test_resume_refused_with_another_byte_budget(small_store):
    store, _, _ = small_store
    kw = dict(batch_size=100, shuffle=True, seed=5, shuffle_buffer_bytes=40_000)
    first = DataLoader(store, **kw)
    next(first.iter_batches())
    state = first.state_dict()
    with pytest.raises(InvalidInputError, match="shuffle_buffer_bytes"):
        DataLoader(store, **dict(kw, shuffle_buffer_bytes=80_000)).load_state_dict(state)
    with pytest.raises(InvalidInputError, match="not both"):
        DataLoader(store, shuffle_buffer_bytes=1 << 20, shuffle_buffer_blocks=2)


@settings(max_examples=12)
@given(
    n=st.integers(1, 400),
    bs=st.integers(1, 60),
    budget=st.integers(2, 20_000),
    world=st.integers(1, 3),
    appended=st.integers(0, 100),
    stop=st.integers(0, 8),
    seed=st.integers(0, 1000),
)
def test_byte_budget_resume_exactly_once_across_ranks(n, bs, budget, world, appended, stop,
                                                      seed):
    rng = np.random.default_rng(seed)
    X = sp.random(n, 20, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    store = _save(X, labels={"y": np.arange(n)}, chunk_bytes=1024)
    if appended:  # rows appended after the save: the plan covers them too
        X2 = sp.random(appended, 20, density=0.3, format="csr", dtype=np.float32,
                       random_state=rng)
        w = sparsestore.open(store.path, mode="r+")
        w.append(X2, labels={"y": np.arange(n, n + appended)})
        w.close()
        store = sparsestore.open(store.path)
        X = sp.vstack([X, X2]).tocsr()
    total = X.shape[0]
    kw = dict(batch_size=bs, shuffle=True, seed=seed, shuffle_buffer_bytes=budget,
              labels="y", world_size=world, num_workers=seed % 3)
    everything = []
    for r in range(world):
        ref = [b.rows for b in DataLoader(store, rank=r, **kw).iter_batches()]
        first = DataLoader(store, rank=r, **kw)
        it = first.iter_batches()
        got = [next(it).rows for _ in range(min(stop, len(ref)))]
        state = json.loads(json.dumps(first.state_dict()))
        it.close()
        resumed = DataLoader(store, rank=r, **kw)
        resumed.load_state_dict(state)
        got += [b.rows for b in resumed.iter_batches()]
        np.testing.assert_array_equal(np.concatenate(got or [np.zeros(0, np.int64)]),
                                      np.concatenate(ref or [np.zeros(0, np.int64)]))
        everything.extend(got)
    np.testing.assert_array_equal(np.sort(np.concatenate(everything)), np.arange(total))


def test_a_shuffles_block_sizes_come_from_the_indptr_read_for_its_bounds(small_store,
                                                                        monkeypatch):
    # indptr is streamed once to cut the blocks; a byte-budgeted shuffle sizes the blocks
    # from what it streamed (no second read, a round trip on object storage), unless the
    # indptr is too big to keep.
    import sparsestore.sizing as sizing

    store, X, labels = small_store
    want = DataLoader(store, batch_size=64, shuffle=True, seed=3)._plan_bounds()
    reads = []
    real = sizing.read_rows
    monkeypatch.setattr(sizing, "read_rows", lambda *a, **k: reads.append(1) or real(*a, **k))
    got = DataLoader(store, batch_size=64, shuffle=True, seed=3)._plan_bounds()
    assert not reads
    monkeypatch.setattr(sizing, "ROW_META_CACHE_BYTES", 0)
    again = DataLoader(store, batch_size=64, shuffle=True, seed=3)._plan_bounds()
    assert reads == [1]
    assert got[2] is not None and again[2] is None  # the indptr kept for the passes or not
    for b, nbytes, _ in (got, again):
        np.testing.assert_array_equal(b, want[0])
        np.testing.assert_array_equal(nbytes, want[1])
        np.testing.assert_array_equal(nbytes, np.diff(X.indptr[b]) * 8 + np.diff(b) * 8)
