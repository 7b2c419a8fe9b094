"""TensorFlow backend against oracles: scipy batches of the same loader, TF's own sparse ops."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import scipy.sparse as sp  # noqa: E402
import sparsestore.adapters._tf_plan as tfplan  # noqa: E402
import sparsestore.adapters.tensorflow as sstf  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sparsestore  # noqa: E402
from sparsestore.errors import (  # noqa: E402
    DTypeError,
    InvalidInputError,
    ShapeMismatchError,
    SparseStoreError,
)

pytestmark = pytest.mark.tf

ROOT = Path(__file__).resolve().parents[1]


def loader_pair(store, **kw):
    """Two identical loaders: one feeds TensorFlow, the other is the scipy oracle."""
    return sparsestore.DataLoader(store, **kw), sparsestore.DataLoader(store, **kw)


def check_sparse(x, want: sp.csr_matrix) -> None:
    """``x`` (a tf SparseTensor) holds exactly ``want``: canonical int64 COO, same dtype."""
    assert isinstance(x, tf.SparseTensor)
    assert x.indices.dtype == tf.int64
    assert x.values.dtype == tf.as_dtype(want.dtype)
    np.testing.assert_array_equal(x.dense_shape.numpy(), want.shape)
    coo = want.tocoo()  # scipy: row-major order for a canonical CSR
    np.testing.assert_array_equal(x.indices.numpy(), np.stack([coo.row, coo.col], axis=1))
    np.testing.assert_array_equal(x.values.numpy(), coo.data)
    # TensorFlow's own oracles: canonical order (reorder is a no-op) and the dense values.
    r = tf.sparse.reorder(x)
    np.testing.assert_array_equal(r.indices.numpy(), x.indices.numpy())
    np.testing.assert_array_equal(tf.sparse.to_dense(x).numpy(), want.toarray())


def rows_of(ds, label_index: int = 1) -> np.ndarray:
    """Concatenated ``y`` labels (= row ids in ``small_store``) of one pass of ``ds``."""
    return np.concatenate([el[label_index].numpy() for el in ds])


# ------------------------------------------------------------------ equality with the loader


@pytest.mark.parametrize("expand", ["host", "graph"])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("bs", [1, 257, 5000])
def test_batches_equal_loader_batches(small_store, shuffle, bs, expand):
    store, X, labels = small_store
    # bs=1: a short row range (empty rows 100..119 included) keeps it quick
    kw = dict(rows=slice(90, 160)) if bs == 1 else {}
    a, b = loader_pair(store, batch_size=bs, shuffle=shuffle, seed=7, labels=["y", "w"], **kw)
    ds = sstf.to_dataset(a, expand=expand)
    # host COO: batches of 1 and 257 rows cross in bundles (70 batches of 1: the last
    # bundle is partial), 5000 rows alone
    bundle = tfplan._Plan.for_loader(a, expand=expand).bundle
    assert bundle == (1 if expand == "graph" or bs == 5000 else {1: 32, 257: 12}[bs])
    spec = ds.element_spec
    assert spec[0] == tf.SparseTensorSpec([None, X.shape[1]], tf.float32)
    assert spec[1].dtype == tf.int64 and spec[1].shape.as_list() == [None]
    assert spec[2].dtype == tf.float32 and spec[2].shape.as_list() == [None, 2]
    assert int(ds.cardinality()) == len(a)
    assert sstf.element_spec(a) == spec
    n = 0
    for (x, y, w), batch in zip(ds, b.iter_batches(), strict=True):
        want = batch.to_scipy()
        check_sparse(x, want)
        check_sparse(x, X[batch.rows])
        np.testing.assert_array_equal(y.numpy(), labels["y"][batch.rows])
        np.testing.assert_array_equal(y.numpy(), batch.labels[0])
        np.testing.assert_array_equal(w.numpy(), labels["w"][batch.rows])
        n += 1
    assert n == len(b)


def test_no_labels_gives_bare_sparse_tensors(small_store):
    store, X, _ = small_store
    a, b = loader_pair(store, batch_size=700)
    ds = sstf.to_dataset(a, prefetch=None)
    assert isinstance(ds.element_spec, tf.SparseTensorSpec)
    got = [x for x in ds]
    assert len(got) == 5 and [int(x.dense_shape[0]) for x in got] == [700] * 4 + [200]
    for x, batch in zip(got, b.iter_batches(), strict=True):
        check_sparse(x, X[batch.rows])


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.float16])
def test_values_keep_the_store_dtype(tmp_path, rng, dtype):
    X = sp.random(300, 50, density=0.1, format="csr", random_state=rng) * 100
    if dtype == np.float16:  # sparse float16 is refused by the store: use a dense one
        dense = X.toarray().astype(dtype)
        store = sparsestore.save(tmp_path / "d.zarr", dense, sparse=False)
        ds = sstf.to_dataset(sparsestore.DataLoader(store, batch_size=64))
        got = np.concatenate([x.numpy() for x in ds])
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, dense)
        return
    X = X.astype(dtype)
    X.eliminate_zeros()  # values rounded to 0 by the cast are not stored
    store = sparsestore.save(tmp_path / "s.zarr", X)
    ds = sstf.to_dataset(sparsestore.DataLoader(store, batch_size=64))
    assert ds.element_spec.dtype == tf.as_dtype(dtype)
    got = tf.sparse.concat(0, list(ds))
    check_sparse(got, X.astype(dtype))


@settings(max_examples=20, deadline=None)
@given(
    n_rows=st.integers(0, 60),
    n_cols=st.integers(1, 40),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    bs=st.integers(1, 25),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(tmp_path_factory, n_rows, n_cols, density, bs, shuffle, drop_last,
                            seed):
    rng = np.random.default_rng(seed)
    X = sp.random(n_rows, n_cols, density=density, format="csr", dtype=np.float32,
                  random_state=rng)
    path = tmp_path_factory.mktemp("prop") / "p.zarr"
    store = sparsestore.save(path, X, labels={"y": np.arange(n_rows)}, chunk_bytes=1024)
    a, b = loader_pair(store, batch_size=bs, shuffle=shuffle, seed=seed, drop_last=drop_last,
                       labels="y")
    ds = sstf.to_dataset(a)
    got = list(ds)
    want = list(b.iter_batches())
    assert len(got) == len(want) == len(b)
    for (x, y), batch in zip(got, want, strict=True):
        check_sparse(x, X[batch.rows])
        np.testing.assert_array_equal(y.numpy(), batch.rows)


def test_compact_parts_cross_the_host_boundary(small_store):
    """expand='graph': ~8 bytes per non-zero (float32 values + int32 column ids) + row_splits."""
    store, _, _ = small_store
    plan = tfplan._Plan.for_loader(sparsestore.DataLoader(store, labels="y"), expand="graph")
    sig = plan.signature()
    assert [s.dtype for s in sig] == [tf.float32, tf.int32, tf.int64, tf.int64]
    assert [s.shape.as_list() for s in sig[:3]] == [[None]] * 3


def test_host_coo_parts_are_aligned_and_recycled(small_store):
    """expand='host': int64 COO in 64-byte-aligned buffers that return to the pool when freed."""
    store, X, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=300)
    plan = tfplan._Plan.for_loader(loader)
    sig = plan.signature()
    assert [s.dtype for s in sig] == [tf.int64, tf.float32, tf.int64]
    batch = next(iter(loader.iter_batches()))
    coords, values, n_rows = plan.parts(batch)
    assert coords.ctypes.data % 64 == 0 and values.ctypes.data % 64 == 0
    coo = X[batch.rows].tocoo()
    np.testing.assert_array_equal(coords, np.stack([coo.row, coo.col], axis=1))
    np.testing.assert_array_equal(values, coo.data)
    assert int(n_rows) == 300
    pool = plan.buffers
    made, idle = pool.allocated, pool.idle_blocks()
    addr = coords.ctypes.data
    del coords, values
    assert pool.idle_blocks() == idle + 2  # both returned once TensorFlow-side refs are gone
    again, _, _ = plan.parts(batch)  # the freed memory is taken again, not new memory
    assert again.ctypes.data == addr and pool.allocated == made
    np.testing.assert_array_equal(again, np.stack([coo.row, coo.col], axis=1))
    with pytest.raises(InvalidInputError, match="expand"):
        sstf.to_dataset(loader, expand="gpu")


def test_host_pool_keeps_a_bounded_amount_of_idle_memory(small_store):
    """Batches of many sizes pass through; idle pooled memory stays within the budget of
    HOST_IDLE_BATCHES average batches (it used to grow with the number of sizes seen)."""
    store, X, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=64, shuffle=True, seed=1)
    plan = tfplan._Plan.for_loader(loader)
    pool = plan.buffers
    per_batch = 64 * X.nnz / X.shape[0] * (2 * 8 + 4)
    assert pool.max_idle_bytes == max(8 * 2**20, int(tfplan.HOST_IDLE_BATCHES * per_batch))
    pool.max_idle_bytes = int(4 * per_batch)  # small, so the bound is exercised here
    held = [plan.parts(b) for b in loader.iter_batches()]  # all alive at once, then freed
    sizes = {parts[1].size for parts in held}
    assert len(sizes) > 5
    del held
    assert 0 < pool.idle_bytes() <= pool.max_idle_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and RUSAGE_THREAD")
def test_a_pass_serves_blosc_sized_allocations_from_the_heap_again(small_store):
    """Building the dataset pins glibc's mmap threshold at 128 KiB (TensorFlow sets
    M_MMAP_THRESHOLD): every larger malloc, such as Blosc's scratch on each chunk, would be
    a fresh mmap faulted in page by page.  A pass sets the threshold back to 4 MiB."""
    from page_faults import faults_per_alloc

    from sparsestore import buffers

    if buffers._malloc_trim() is None:
        pytest.skip("not glibc")
    store, _, _ = small_store
    ds = sstf.to_dataset(sparsestore.DataLoader(store, batch_size=64))
    next(iter(ds))
    assert faults_per_alloc() < 8  # a fresh mmap each time: 65


# ------------------------------------------------------------------ epochs


def test_each_pass_is_a_new_reproducible_epoch(small_store):
    store, _, _ = small_store
    a, b = loader_pair(store, batch_size=256, shuffle=True, seed=3, labels="y")
    ds_a, ds_b = sstf.to_dataset(a), sstf.to_dataset(b)
    e0, e1 = rows_of(ds_a), rows_of(ds_a)
    assert a.epoch == 2
    n = store.n_rows
    for order in (e0, e1):
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(e0, e1)
    # Same seed -> the same epochs; and they are the loader's own epochs 0 and 1.
    np.testing.assert_array_equal(rows_of(ds_b), e0)
    np.testing.assert_array_equal(rows_of(ds_b), e1)
    oracle = sparsestore.DataLoader(store, batch_size=256, shuffle=True, seed=3)
    oracle.set_epoch(1)
    np.testing.assert_array_equal(np.concatenate([bt.rows for bt in oracle.iter_batches()]), e1)


def test_interrupted_pass_still_advances_epoch(small_store):
    store, _, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=256, shuffle=True, seed=5, labels="y")
    # cardinality=False: the resumed pass at the end is shorter than a whole epoch
    ds = sstf.to_dataset(loader, cardinality=False)
    assert int(ds.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    first = next(iter(ds))[1].numpy()
    full = rows_of(ds)  # a new iteration: epoch 1, not a replay of epoch 0
    oracle = sparsestore.DataLoader(store, batch_size=256, shuffle=True, seed=5)
    orders = {}
    for e in (0, 1):
        oracle.set_epoch(e)
        orders[e] = np.concatenate([bt.rows for bt in oracle.iter_batches()])
    np.testing.assert_array_equal(first, orders[0][:256])
    np.testing.assert_array_equal(full, orders[1])
    # An explicit set_epoch between passes wins.
    loader.set_epoch(0)
    np.testing.assert_array_equal(rows_of(ds), orders[0])
    # So does load_state_dict after a cut pass: the next pass resumes, it does not skip ahead.
    it = iter(ds)
    next(it)
    del it
    state = dict(loader.state_dict(), epoch=1, batches_consumed=3)
    loader.load_state_dict(state)
    np.testing.assert_array_equal(rows_of(ds), orders[1][3 * 256 :])


def test_dropped_iterator_closes_its_pass(small_store, monkeypatch):
    from sparsestore.reader import THREAD_PREFIX

    monkeypatch.setattr(tfplan, "BUNDLE_NNZ", 1)  # one batch per hand-off: the pass stays open

    def decoders() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]

    store, _, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=128, labels="y")
    ds = sstf.to_dataset(loader)
    it = iter(ds)
    next(it)
    names = {t.name.rsplit("_", 1)[0] for t in decoders()}
    # the loader's decoders, the adapter's feeder and its COO builders (same prefix)
    assert {f"{THREAD_PREFIX}-build-feed", f"{THREAD_PREFIX}-build"} <= names, names
    del it
    deadline = time.monotonic() + 10
    while decoders() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert not decoders(), "TensorFlow dropped the iterator but the pass kept its threads"
    # The loader is free again: the next iteration is a whole new epoch.
    np.testing.assert_array_equal(np.sort(rows_of(ds)), np.arange(store.n_rows))
    assert loader.epoch == 2


@pytest.mark.parametrize("where", ["first", "middle"])
def test_a_damaged_chunk_fails_the_pass_with_its_name(small_store, where):
    """The loader's ChecksumError reaches the TensorFlow caller (first batch or later)."""
    store, _, _ = small_store
    base = Path(store.path) / "data" / "c"
    files = sorted((p for p in base.rglob("*") if p.is_file()), key=lambda p: int(p.name))
    victim = files[0] if where == "first" else files[len(files) // 2]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    victim.write_bytes(bytes(raw))
    ds = sstf.to_dataset(sparsestore.DataLoader(sparsestore.open(store.path), batch_size=64))
    with pytest.raises(sparsestore.errors.ChecksumError, match=rf"chunk {victim.name}\b"):
        for _ in ds:
            pass
    # TensorFlow calling on after the error (ignore_errors) ends the pass: no hang, and
    # only batches from before the damaged chunk (cardinality=False: TensorFlow's
    # assert_cardinality would repeat its own error for ever under ignore_errors)
    loader = sparsestore.DataLoader(sparsestore.open(store.path), batch_size=64)
    got = sum(int(x.dense_shape[0])
              for x in sstf.to_dataset(loader, cardinality=False).ignore_errors())
    assert got < store.n_rows


def test_a_failed_build_ends_the_pass_without_skipping_a_batch(small_store, monkeypatch):
    """A batch whose parts fail to build is an error, and no later batch takes its place
    (TensorFlow keeps calling after an error: ``ignore_errors`` shows what it would get)."""
    store, X, _ = small_store
    monkeypatch.setattr(tfplan, "BUNDLE_NNZ", 1)  # one batch per hand-off
    real, calls = tfplan._Plan.wire_parts, []

    def flaky(self, batches):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("simulated build failure")
        return real(self, batches)

    monkeypatch.setattr(tfplan._Plan, "wire_parts", flaky)
    loader, oracle = loader_pair(store, batch_size=300)
    with pytest.raises(tf.errors.OpError, match="simulated build failure"):
        list(sstf.to_dataset(loader))
    calls.clear()
    got = list(sstf.to_dataset(loader, cardinality=False).ignore_errors())
    assert len(got) == 2
    for x, batch in zip(got, oracle.iter_batches(), strict=False):
        check_sparse(x, X[batch.rows])


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_wire_parts_are_built_on_the_loaders_threads_in_order(small_store, monkeypatch,
                                                             workers):
    """``num_workers=0`` builds each batch's parts in TensorFlow's calling thread, more on
    builder threads of the pass; either way the batches come in the loader's order."""
    from sparsestore.reader import THREAD_PREFIX

    store, X, _ = small_store
    monkeypatch.setattr(tfplan, "BUNDLE_NNZ", 1)  # one batch per hand-off
    real, built_on = tfplan._Plan.wire_parts, set()

    def spy(self, batches):
        built_on.add(threading.current_thread().name.rsplit("_", 1)[0])
        return real(self, batches)

    monkeypatch.setattr(tfplan._Plan, "wire_parts", spy)
    loader, oracle = loader_pair(store, batch_size=150, shuffle=True, seed=3,
                                 num_workers=workers)
    got = list(sstf.to_dataset(loader))
    for x, batch in zip(got, oracle.iter_batches(), strict=True):
        check_sparse(x, X[batch.rows])
    if workers:
        assert built_on == {f"{THREAD_PREFIX}-build"}
    else:
        assert built_on and not any(n.startswith(THREAD_PREFIX) for n in built_on)
    assert loader.epoch == 1


def test_a_loader_with_no_batches_gives_an_empty_dataset(small_store):
    store, _, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=store.n_rows + 1, drop_last=True)
    assert len(loader) == 0
    ds = sstf.to_dataset(loader, repeat_epochs=3)
    assert list(ds) == []
    assert loader.epoch == 3


def test_repeat_epochs_and_infinite(small_store):
    store, _, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=1000, shuffle=True, seed=1, labels="y")
    ds = sstf.to_dataset(loader, repeat_epochs=2)
    assert int(ds.cardinality()) == 2 * len(loader)
    rows = rows_of(ds)
    n = store.n_rows
    np.testing.assert_array_equal(np.sort(rows[:n]), np.arange(n))
    np.testing.assert_array_equal(np.sort(rows[n:]), np.arange(n))
    assert not np.array_equal(rows[:n], rows[n:])
    inf = sstf.to_dataset(loader, repeat_epochs=None)
    assert int(inf.cardinality()) == tf.data.INFINITE_CARDINALITY
    assert len(list(inf.take(3 * len(loader) + 1))) == 3 * len(loader) + 1


def test_resumed_loader_yields_the_remaining_batches(small_store):
    store, X, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=300, shuffle=True, seed=9, labels="y")
    it = loader.iter_batches()
    seen = [next(it).rows for _ in range(4)]
    state = loader.state_dict()
    it.close()
    loader.load_state_dict(state)
    rest = [bt.rows for bt in loader.iter_batches()]  # the oracle: the rest of epoch 0
    resumed = sparsestore.DataLoader(store, batch_size=300, shuffle=True, seed=0, labels="y")
    resumed.load_state_dict(state)
    ds = sstf.to_dataset(resumed)
    assert int(ds.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    got = [(x, y.numpy()) for x, y in ds]
    assert len(got) == len(rest) and len(seen) + len(rest) == len(loader)
    for (x, y), want in zip(got, rest, strict=True):
        np.testing.assert_array_equal(y, want)
        check_sparse(x, X[want])


# ------------------------------------------------------------------ dense and 3-D samples


def test_dense_store_streams_dense_tensors(tmp_path, rng):
    X = rng.standard_normal((500, 24)).astype(np.float32)
    y = rng.integers(0, 3, 500)
    store = sparsestore.save(tmp_path / "dense.zarr", X, labels={"y": y}, sparse=False)
    a, b = loader_pair(store, batch_size=64, shuffle=True, seed=2, labels="y")
    ds = sstf.to_dataset(a)
    assert ds.element_spec[0] == tf.TensorSpec([None, 24], tf.float32)
    assert sstf.element_spec(a) == ds.element_spec
    for (x, yy), batch in zip(ds, b.iter_batches(), strict=True):
        assert isinstance(x, tf.Tensor)
        np.testing.assert_array_equal(x.numpy(), X[batch.rows])
        np.testing.assert_array_equal(yy.numpy(), y[batch.rows])
    ds3 = sstf.to_dataset(sparsestore.DataLoader(store, batch_size=100), sample_shape=(4, 6))
    got = np.concatenate([x.numpy() for x in ds3])
    np.testing.assert_array_equal(got, X.reshape(500, 4, 6))


@pytest.mark.parametrize("expand", ["host", "graph"])
def test_sample_shape_gives_3d_sparse_tensors(tmp_path, rng, expand):
    r, c = 5, 7
    X = sp.random(400, r * c, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    store = sparsestore.save(tmp_path / "img.zarr", X, chunk_bytes=2048)
    a, b = loader_pair(store, batch_size=48, shuffle=True, seed=4)
    ds = sstf.to_dataset(a, sample_shape=(r, c), expand=expand)
    assert ds.element_spec == tf.SparseTensorSpec([None, r, c], tf.float32)
    assert sstf.element_spec(a, sample_shape=(r, c)) == ds.element_spec
    for x, batch in zip(ds, b.iter_batches(), strict=True):
        want = X[batch.rows].toarray().reshape(-1, r, c)
        np.testing.assert_array_equal(x.dense_shape.numpy(), want.shape)
        np.testing.assert_array_equal(tf.sparse.to_dense(x).numpy(), want)
        np.testing.assert_array_equal(tf.sparse.reorder(x).indices.numpy(), x.indices.numpy())
        np.testing.assert_array_equal(x.indices.numpy(), np.argwhere(want != 0))


def test_autotune_switches_tensorflows_dataset_tuning(small_store):
    """Off by default (autotuner and default graph rewrites), on with autotune=True."""
    store, X, _ = small_store
    for on in (False, True):
        ds = sstf.to_dataset(sparsestore.DataLoader(store, batch_size=1000), autotune=on)
        opts = ds.options()
        assert opts.autotune.enabled is on
        assert opts.experimental_optimization.apply_default_optimizations is on
        got = sum(float(tf.sparse.reduce_sum(x)) for x in ds)
        assert got == pytest.approx(float(X.sum(dtype=np.float64)), rel=1e-5)


def test_bad_arguments_raise_clear_errors(small_store):
    store, _, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=10)
    with pytest.raises(ShapeMismatchError, match="400"):
        sstf.to_dataset(loader, sample_shape=(3, 7))
    with pytest.raises(InvalidInputError, match="sample_shape"):
        sstf.to_dataset(loader, sample_shape=(0, 400))
    with pytest.raises(InvalidInputError, match="DataLoader"):
        sstf.to_dataset(store)
    with pytest.raises(InvalidInputError, match="prefetch"):
        sstf.to_dataset(loader, prefetch=-5)
    with pytest.raises(InvalidInputError, match="repeat_epochs"):
        sstf.to_dataset(loader, repeat_epochs=0)
    with pytest.raises(InvalidInputError, match="InputContext"):
        sstf.to_dataset(loader, input_context=object())
    with pytest.raises(SparseStoreError, match="label 'z'"):
        tfplan._tf_dtype(np.dtype(object), "label 'z'")
    with pytest.raises(DTypeError, match="numeric"):
        tfplan._tf_dtype(np.dtype("datetime64[s]"), "label 'when'")


# ------------------------------------------------------------------ distribution and devices


def test_input_context_shards_are_disjoint_and_cover(small_store):
    store, X, _ = small_store
    n = store.n_rows
    for base_world in (1, 2):
        parts, rank_batches = [], 0
        for rank in range(base_world):
            loader = sparsestore.DataLoader(store, batch_size=128, shuffle=True, seed=11,
                                            labels="y", rank=rank, world_size=base_world)
            rank_batches += len(loader)
            for pid in range(3):
                ctx = tf.distribute.InputContext(
                    num_input_pipelines=3, input_pipeline_id=pid, num_replicas_in_sync=3
                )
                ds = sstf.to_dataset(loader, input_context=ctx)
                opts = ds.options().experimental_distribute
                assert opts.auto_shard_policy == tf.data.experimental.AutoShardPolicy.OFF
                rows = []
                for x, y in ds:
                    check_sparse(x, X[y.numpy()])
                    rows.append(y.numpy())
                parts.append(np.concatenate(rows))
        allrows = np.concatenate(parts)
        assert allrows.size == n  # disjoint (no row twice) ...
        np.testing.assert_array_equal(np.sort(allrows), np.arange(n))  # ... and covering
        batches = [-(-p.size // 128) for p in parts]  # pipelines split a rank's batches
        assert sum(batches) == rank_batches
        assert max(batches) - min(batches) <= 1


def test_input_context_refuses_a_loader_resumed_mid_epoch(small_store):
    """A shard copy starts at the epoch's start: splitting a resumed loader into pipelines
    would silently serve its first batches again, so it is refused."""
    store, _, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=128, labels="y", drop_last=True)
    state = loader.state_dict()
    state["batches_consumed"] = 2
    loader.load_state_dict(state)
    two = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                     num_replicas_in_sync=2)
    with pytest.raises(InvalidInputError, match="at batch 2 of epoch 0"):
        sstf.to_dataset(loader, input_context=two)
    one = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                     num_replicas_in_sync=2)
    assert len(list(sstf.to_dataset(loader, input_context=one))) == len(loader) - 2
    # A worker's own loader, resumed and given without input_context, is what works.
    mine = sparsestore.DataLoader(store, batch_size=128, labels="y", drop_last=True,
                                  rank=1, world_size=2)
    state = mine.state_dict()
    state["batches_consumed"] = 1
    mine.load_state_dict(state)
    assert len(list(sstf.to_dataset(mine))) == len(mine) - 1


def test_distribute_with_mirrored_strategy_on_cpu(small_store):
    store, X, _ = small_store
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    loader = sparsestore.DataLoader(store, batch_size=512, labels="y")
    dist = sstf.distribute(strategy, loader)
    rows = []
    for x, y in dist:
        x = strategy.experimental_local_results(x)[0]
        y = strategy.experimental_local_results(y)[0].numpy()
        check_sparse(x, X[y])
        rows.append(y)
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(store.n_rows))
    with pytest.raises(InvalidInputError):
        sstf.distribute(strategy, loader, device="/GPU:0")


TWO_REPLICAS = """
import sys
import numpy as np, scipy.sparse as sp
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import sparsestore, sparsestore.adapters.tensorflow as sstf
store = sparsestore.open(sys.argv[1])
X = store[:]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
loader = sparsestore.DataLoader(store, batch_size=100, shuffle=True, seed=3, labels="y")
w = np.random.default_rng(0).standard_normal((X.shape[1], 1)).astype(np.float32)
with strategy.scope():
    wv = tf.Variable(w)

@tf.function
def step(x, y):
    def fn(x, y):  # a custom-loop step on each replica: the sparse matmul of its batch
        return tf.sparse.sparse_dense_matmul(x, wv), y
    return strategy.run(fn, args=(x, y))

rows, devices = [], set()
for x, y in sstf.distribute(strategy, loader):
    for xs, ys in zip(strategy.experimental_local_results(x),
                      strategy.experimental_local_results(y), strict=True):
        devices.add(xs.values.device[-5:])
        want = X[ys.numpy()]
        assert np.array_equal(tf.sparse.to_dense(xs).numpy(), want.toarray())
        rows.append(ys.numpy())
    for p, ys in zip(*(strategy.experimental_local_results(v) for v in step(x, y))):
        np.testing.assert_allclose(p.numpy(), X[ys.numpy()] @ w, rtol=1e-4, atol=1e-4)
rows = np.concatenate(rows)
assert np.array_equal(np.sort(rows), np.arange(X.shape[0])), "rows not covered exactly once"
print("OK", sorted(devices))
"""


def test_distribute_over_two_mirrored_cpu_replicas(small_store, tmp_path):
    """Two logical CPUs need a fresh TensorFlow runtime: run in a subprocess."""
    store, _, _ = small_store
    script = tmp_path / "two_replicas.py"
    script.write_text(TWO_REPLICAS)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(script), store.path], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK ['CPU:0', 'CPU:1']" in res.stdout


def test_prefetch_to_device_path(small_store):
    store, X, _ = small_store
    a, b = loader_pair(store, batch_size=512, shuffle=True, seed=8, labels="y")
    ds = sstf.to_dataset(a, device="/CPU:0", prefetch=2)
    n = 0
    for (x, y), batch in zip(ds, b.iter_batches(), strict=True):
        assert "CPU" in x.values.device
        check_sparse(x, X[batch.rows])
        np.testing.assert_array_equal(y.numpy(), batch.rows)
        n += 1
    assert n == len(b)
    if not tf.config.list_logical_devices("GPU"):
        with pytest.warns(RuntimeWarning, match="GPU"):
            gpu = sstf.to_dataset(sparsestore.DataLoader(store, batch_size=512), device="/GPU:0")
        assert sum(1 for _ in gpu) == 6  # still streams, from the host


# ------------------------------------------------------------------ backend plugin


def test_tensorflow_backend_by_name(small_store):
    store, X, labels = small_store
    a = sparsestore.DataLoader(store, batch_size=400, shuffle=True, seed=6, labels="w",
                               backend="tensorflow")
    b = sparsestore.DataLoader(store, batch_size=400, shuffle=True, seed=6, labels="w")
    assert isinstance(a.backend, sstf.TensorFlowBackend) and a.backend.name == "tensorflow"
    for (x, w), batch in zip(a, b.iter_batches(), strict=True):
        check_sparse(x, X[batch.rows])
        np.testing.assert_array_equal(w.numpy(), labels["w"][batch.rows])
    plain = sparsestore.DataLoader(store, batch_size=1000,
                                   backend=sstf.TensorFlowBackend(sample_shape=(20, 20)))
    x = next(iter(plain))
    np.testing.assert_array_equal(tf.sparse.to_dense(x).numpy(),
                                  X[:1000].toarray().reshape(-1, 20, 20))


def test_a_loader_with_the_tensorflow_backend_pickles(small_store):
    import pickle

    store, X, _ = small_store
    loader = sparsestore.DataLoader(store, batch_size=300, shuffle=True, seed=2,
                                    backend=sstf.TensorFlowBackend(sample_shape=(20, 20)))
    for _ in loader:  # a whole epoch: the backend now holds a plan for this loader
        pass
    copy = pickle.loads(pickle.dumps(loader))
    assert copy.backend.sample_shape == (20, 20)
    for a, b in zip(copy, loader, strict=True):
        np.testing.assert_array_equal(tf.sparse.to_dense(a).numpy(),
                                      tf.sparse.to_dense(b).numpy())


# ------------------------------------------------------------------ keras


def test_keras_fit_learns_from_a_sparse_store(load_example, tmp_path):
    kt = load_example("keras_train")
    store = kt.build_store(tmp_path / "k.zarr", n_rows=4000, n_cols=300, density=0.03, seed=1)
    train_ds, val_ds, loader = kt.make_datasets(store, batch_size=128, seed=1)
    model = kt.build_model(store.n_cols, hidden=16, seed=1)
    assert model.inputs[0].sparse and tuple(model.inputs[0].shape) == (None, 300)
    with warnings.catch_warnings():
        # the declared cardinality tells Keras the epoch length: no "ran out of data"
        warnings.filterwarnings("error", message=".*ran out of data")
        hist = model.fit(train_ds, epochs=4, validation_data=val_ds, shuffle=False, verbose=0)
    loss = hist.history["loss"]
    assert len(loss) == 4 and loss[-1] < 0.8 * loss[0]
    assert hist.history["val_loss"][-1] < hist.history["val_loss"][0]
    assert hist.history["val_accuracy"][-1] > 0.7  # labels from a hidden linear model
    assert loader.epoch == 4  # every Keras epoch was a fresh loader epoch (new shuffle)
    # predict() takes the same SparseTensors; its rows line up with the validation labels.
    val = sparsestore.DataLoader(store, batch_size=500, rows=kt.split_rows(store, 0.1)[1])
    pred = model.predict(sstf.to_dataset(val), verbose=0)
    assert pred.shape == (400, 1)


def test_keras_example_main_runs(load_example, tmp_path, capsys):
    kt = load_example("keras_train")
    rc = kt.main(["--rows", "3000", "--cols", "200", "--epochs", "2", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "rows/s" in out and "M nnz/s" in out and "peak RSS" in out
    assert sparsestore.open(tmp_path / "train.zarr").shape == (3000, 200)


# ------------------------------------------------------------------ store errors through TF


def damage(store, how: str) -> Path:
    """Flip a byte in (or delete) a chunk file of ``data`` in the middle of the store."""
    base = Path(store.path) / "data" / "c"
    files = sorted((p for p in base.rglob("*") if p.is_file()), key=lambda p: int(p.name))
    victim = files[len(files) // 2]
    if how == "flip":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x5A
        victim.write_bytes(bytes(raw))
    else:
        victim.unlink()
    return victim


def loader_error(path, **kw) -> SparseStoreError:
    """The oracle: what the loader itself raises on the damaged store, without TensorFlow."""
    with pytest.raises(SparseStoreError) as info:
        for _ in sparsestore.DataLoader(sparsestore.open(path), **kw).iter_batches():
            pass
    return info.value


@pytest.mark.parametrize("how", ["flip", "delete"])
@pytest.mark.parametrize("expand,bs", [("host", 64), ("host", 3), ("graph", 64)])
def test_store_errors_reach_eager_iteration_as_themselves(small_store, how, expand, bs):
    """Iterating the dataset raises the store's own error class (TensorFlow's as its cause),
    so ``except ChecksumError`` / ``except SparseStoreError`` work around a TF loop."""
    store, _, _ = small_store
    victim = damage(store, how)
    want = loader_error(store.path, batch_size=bs)
    assert type(want).__name__ == ("ChecksumError" if how == "flip" else "MissingChunkError")
    ds = sstf.to_dataset(sparsestore.DataLoader(sparsestore.open(store.path), batch_size=bs),
                         expand=expand)
    with pytest.raises(type(want)) as info:
        for _ in ds:
            pass
    assert type(info.value) is type(want)
    assert str(info.value) == str(want) and victim.name in str(info.value)
    assert isinstance(info.value.__cause__, tf.errors.OpError)
    assert sstf.unwrap_error(info.value.__cause__) is info.value


def test_unwrap_error_gives_back_store_errors_raised_in_graph(small_store):
    """Where TensorFlow raises its own error (in-graph ``reduce``, a dataset mapped further),
    ``unwrap_error`` returns the store's exception; other errors give None."""
    store, _, _ = small_store
    damage(store, "flip")
    want = loader_error(store.path, batch_size=64)

    def dataset():
        return sstf.to_dataset(sparsestore.DataLoader(sparsestore.open(store.path),
                                                      batch_size=64, labels="y"))

    with pytest.raises(tf.errors.OpError) as info:
        dataset().reduce(np.int64(0), lambda acc, el: acc + tf.size(el[1], tf.int64))
    got = sstf.unwrap_error(info.value)
    assert type(got) is type(want) and str(got) == str(want)
    with pytest.raises(tf.errors.OpError) as info:
        for _ in dataset().map(lambda x, y: y):
            pass
    got = sstf.unwrap_error(info.value)
    assert type(got) is type(want) and str(got) == str(want)
    assert sstf.unwrap_error(tf.errors.UnknownError(None, None, "not from a store")) is None
    assert sstf.unwrap_error(ValueError("plain")) is None


def test_a_failed_build_is_not_taken_for_a_store_error(small_store, monkeypatch):
    store, _, _ = small_store

    def broken(self, batches):
        raise ValueError("simulated build failure")

    monkeypatch.setattr(tfplan._Plan, "wire_parts", broken)
    with pytest.raises(tf.errors.OpError, match="simulated build failure") as info:
        list(sstf.to_dataset(sparsestore.DataLoader(store, batch_size=64)))
    assert sstf.unwrap_error(info.value) is None


def test_unwrap_error_after_keras_fit_on_a_damaged_store(load_example, tmp_path):
    kt = load_example("keras_train")
    store = kt.build_store(tmp_path / "k.zarr", n_rows=3000, n_cols=100, density=0.05, seed=1)
    damage(store, "flip")
    train_ds, _, _ = kt.make_datasets(sparsestore.open(store.path), batch_size=128, seed=1)
    model = kt.build_model(store.n_cols, hidden=8, seed=1)
    with pytest.raises(Exception) as info:  # noqa: B017 - Keras decides the class; see below
        model.fit(train_ds, epochs=1, shuffle=False, verbose=0)
    assert not isinstance(info.value, SparseStoreError)  # TensorFlow's own, in graph
    got = sstf.unwrap_error(info.value)
    assert isinstance(got, sparsestore.errors.ChecksumError)
