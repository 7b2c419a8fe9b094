"""Recycled decode memory (BufferPool), direct chunk decoding (ChunkDecoder) and the pooled
row gather: each checked against numpy / zarr / scipy as the oracle."""

from __future__ import annotations

import gc
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsestore
from sparsestore import reader, rows
from sparsestore.buffers import ALIGN, BufferPool, size_class
from sparsestore.chunks import ChunkDecoder
from sparsestore.errors import ChecksumError, CorruptStoreError, MissingChunkError
from sparsestore.rows import gather_csr

# ------------------------------------------------------------------ BufferPool


def test_pool_arrays_are_aligned_writable_and_sized():
    pool = BufferPool()
    for shape, dtype in [((1000, 2), np.int64), (777, np.float32), ((3, 5, 7), np.float64)]:
        a = pool.take(shape, dtype)
        assert a.shape == (shape if isinstance(shape, tuple) else (shape,))
        assert a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % ALIGN == 0
        a[...] = 7
        assert (a == 7).all()
    assert pool.take(0, np.int32).shape == (0,)


def test_pool_memory_returns_only_when_every_view_is_gone():
    pool = BufferPool()
    a = pool.take(10_000, np.float32)
    addr = a.ctypes.data
    view = a.reshape(100, 100)[5:10, ::2]  # views of views keep the block alive
    del a
    gc.collect()
    assert pool.idle_blocks() == 0
    b = pool.take(10_000, np.float32)
    assert b.ctypes.data != addr  # still in use through `view`: not handed out twice
    b[...] = 0.0
    view[...] = 1.0  # writes through to the block `view` still owns, not to `b`
    assert (b == 0.0).all()
    del view
    assert pool.idle_blocks() == 1
    c = pool.take(9_900, np.float32)  # same size class: the freed block again
    assert c.ctypes.data == addr and pool.reused == 1 and pool.allocated == 2


def test_pool_reuses_a_block_up_to_a_quarter_larger_but_no_more():
    pool = BufferPool()
    a = pool.take(1_000_000, np.uint8)
    addr = a.ctypes.data
    del a
    b = pool.take(900_000, np.uint8)  # fits with < 25% to spare: reused
    assert b.ctypes.data == addr
    del b
    c = pool.take(500_000, np.uint8)  # would waste half of it: a new block
    assert c.ctypes.data != addr and pool.idle_blocks() == 1
    d = pool.take(1_100_000, np.uint8)  # too big for it
    assert d.ctypes.data != addr and pool.allocated == 3


def test_pool_keeps_at_most_its_idle_budget():
    pool = BufferPool(max_free=3, max_idle_bytes=1 << 20)
    arrays = [pool.take(100_000, np.uint8) for _ in range(5)]  # 5 x ~100 kB
    del arrays
    assert pool.idle_blocks() == 3
    big = [pool.take(400_000, np.uint8) for _ in range(3)]  # 3 x ~400 kB > 1 MiB
    del big
    assert pool.idle_bytes() <= 1 << 20
    assert pool.idle_blocks() <= 3


def test_pool_keeps_in_use_plus_idle_within_max_bytes():
    """Idle blocks go first when what is in use and idle together would pass max_bytes."""
    pool = BufferPool(max_free=100, max_idle_bytes=10 << 20, max_bytes=3 << 20)
    first = [pool.take(1 << 20, np.uint8) for _ in range(2)]
    del first
    assert pool.idle_bytes() >= 2 << 20  # nothing in use: two 1 MiB blocks wait
    held = [pool.take(600_000, np.uint8) for _ in range(3)]  # other sizes: fresh blocks
    assert pool.idle_bytes() + sum(a.nbytes for a in held) <= (3 << 20) + 4 * 70_000
    block = size_class(600_000) + ALIGN
    assert pool.in_use_bytes() == 3 * block
    part = held[0][:10]
    del held
    assert pool.in_use_bytes() == block  # a view keeps its block in use
    del part
    assert pool.in_use_bytes() == 0 and pool.idle_bytes() <= 3 << 20


@pytest.mark.filterwarnings("ignore::sparsestore.errors.ShuffleQualityWarning")
def test_a_shuffled_unit_is_never_copied_out_of_its_pooled_memory(tmp_path):
    """The decoded unit stays in the pool's arrays (no scipy constructor copying a view of
    under half its buffer), and units of different sizes take blocks of one size: the two
    units in flight (consumed, decoded ahead) reuse the same four blocks all pass long."""
    X = sp.random(20_000, 100, density=0.2, format="csr", dtype=np.float32, random_state=3)
    store = sparsestore.save(tmp_path / "u.zarr", X, chunk_bytes=16384)
    loader = sparsestore.DataLoader(store, batch_size=256, shuffle=True, seed=0,
                                    shuffle_buffer_bytes=2 << 20)  # units of 1 MiB
    assert loader._unit_nnz() is not None
    for _ in range(2):
        for _b in loader.iter_batches():
            pass
    big = [k for k, blocks in loader._pool._by_size.items() for _ in blocks
           if k >= 2**18]
    assert len(big) == 4 and len(set(big)) == 1, big  # values and indices of two units


@given(st.integers(1, 1 << 40))
def test_size_class_slack_is_at_most_an_eighth(n):
    c = size_class(n)
    assert c >= n and (c <= 4096 or c - n <= n // 8 + 4096)


# ------------------------------------------------------------------ ChunkDecoder


@pytest.fixture(scope="module")
def small_chunked(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    X = sp.random(700, 90, density=0.07, format="csr", dtype=np.float32, random_state=3)
    stores = {
        "default": sparsestore.save(root / "d.zarr", X, chunk_bytes=4096, indptr_chunk=64),
        "sharded": sparsestore.save(root / "s.zarr", X, chunk_bytes=4096, shard_bytes=16384,
                                    indptr_chunk=64),
        "raw": sparsestore.save(root / "r.zarr", X, chunk_bytes=4096, indptr_chunk=64,
                                compressor="none", checksum=False),
    }
    return X, stores


@pytest.mark.parametrize("layout", ["default", "sharded", "raw"])
def test_decoder_equals_zarr_for_every_chunk(small_chunked, layout):
    X, stores = small_chunked
    store = stores[layout]
    pool = BufferPool()
    assert (store.arrays["data"].shards is not None) == (layout == "sharded")
    for name in ("data", "indices", "indptr"):
        arr = store.arrays[name]
        dec = ChunkDecoder(arr, name)
        assert dec.is_direct  # sharded arrays too: inner chunks by range reads
        assert (dec.sharded is not None) == (arr.shards is not None)
        assert arr.shards is None or layout == "sharded"
        n_chunks = -(-arr.shape[0] // dec.chunk)
        assert n_chunks >= 3
        for k in range(n_chunks):
            lo, hi = dec.bounds(k)
            want = np.asarray(arr[lo:hi])
            np.testing.assert_array_equal(dec.read(k, pool=pool), want)
            np.testing.assert_array_equal(dec.read(k), want)
            exact = np.empty(hi - lo, dec.dtype)  # the last chunk also fits an exact buffer
            if hi - lo == dec.chunk or k == n_chunks - 1:
                dec.decode_into(k, exact, pool)
                np.testing.assert_array_equal(exact, want)
            room = dec.read(k, room=5)
            assert room.shape == (hi - lo + 5,)
            np.testing.assert_array_equal(room[: hi - lo], want)


def test_decoder_names_the_damaged_chunk(small_chunked, tmp_path):
    _, stores = small_chunked
    path = shutil.copytree(stores["default"].path, tmp_path / "bad.zarr")
    victim = path / "indices" / "c" / "2"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    victim.write_bytes(bytes(raw))
    dec = ChunkDecoder(sparsestore.open(path).arrays["indices"], "indices")
    with pytest.raises(ChecksumError, match=r"'indices', chunk 2\b"):
        dec.read(2, pool=BufferPool())
    dec.read(1)  # the others still decode
    victim.write_bytes(bytes(raw[:10]))  # truncated below a Blosc header
    with pytest.raises((ChecksumError, CorruptStoreError)):
        dec.read(2)


@pytest.mark.filterwarnings("ignore::sparsestore.errors.UnverifiedStoreWarning")
def test_decoder_refuses_a_missing_chunk_and_matches_zarr_without_a_manifest(
    small_chunked, tmp_path
):
    """A chunk the manifest lists is never read as the fill value; a store without one (as
    anndata writes them) reads an unwritten chunk as zarr does."""
    _, stores = small_chunked
    path = shutil.copytree(stores["raw"].path, tmp_path / "sparse.zarr")
    (path / "data" / "c" / "1").unlink()
    dec = ChunkDecoder(sparsestore.open(path).arrays["data"], "data")
    with pytest.raises(MissingChunkError, match="chunk 1 of array 'data'"):
        dec.read(1, pool=BufferPool())
    g = zarr.open_group(str(path), mode="r+")
    meta = dict(g.attrs["sparsestore"])
    meta.update(format_version=1, manifest={}, generation="")
    g.attrs["sparsestore"] = meta
    arr = sparsestore.open(path).arrays["data"]
    dec = ChunkDecoder(arr, "data")
    lo, hi = dec.bounds(1)
    np.testing.assert_array_equal(dec.read(1, pool=BufferPool()), np.asarray(arr[lo:hi]))


# ------------------------------------------------------------------ gather and loader memory


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_gather_csr_equals_scipy_row_indexing(data):
    n_rows = data.draw(st.integers(1, 40))
    density = data.draw(st.floats(0, 1))
    seed = data.draw(st.integers(0, 2**16))
    X = sp.random(n_rows, 9, density=density, format="csr", dtype=np.float64,
                  random_state=seed)
    take = np.asarray(data.draw(st.lists(st.integers(0, n_rows - 1), max_size=60)), np.int64)
    values = X.data.astype(data.draw(st.sampled_from([np.float64, np.float32, np.int16])))
    indices = X.indices.astype(data.draw(st.sampled_from([np.int32, np.int64])))
    want = X[take]
    kernel = rows._csr_row_index
    try:
        for k in (kernel, None):  # scipy's kernel, then the numpy fallback
            rows._csr_row_index = k
            for ptr in (X.indptr.astype(np.int64), X.indptr.astype(np.int32)):
                v, i, p = gather_csr(values, indices, ptr, take, BufferPool())
                np.testing.assert_array_equal(p, want.indptr)
                np.testing.assert_array_equal(i, want.indices)
                np.testing.assert_array_equal(v, want.data.astype(values.dtype))
                assert v.dtype == values.dtype and i.dtype == indices.dtype
    finally:
        rows._csr_row_index = kernel


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_second_pass_reuses_the_first_pass_memory(tmp_path, shuffle):
    X = sp.random(6000, 200, density=0.05, format="csr", dtype=np.float32, random_state=1)
    store = sparsestore.save(tmp_path / "m.zarr", X, chunk_bytes=16384)
    loader = sparsestore.DataLoader(store, batch_size=128, shuffle=shuffle, seed=2)
    rows = []
    for b in loader.iter_batches():
        np.testing.assert_array_equal(b.to_scipy().toarray(), X[b.rows].toarray())
        rows.append(b.rows)
    first = loader._pool.allocated
    for _b in loader.iter_batches():
        pass
    again = loader._pool.allocated - first
    # A few new blocks at most (how many batches are alive at once varies with thread
    # timing), not a first pass's worth.
    assert loader._pool.reused > first and again <= first // 3
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(X.shape[0]))


def test_kept_batches_stay_valid_while_the_pool_recycles(tmp_path):
    X = sp.random(3000, 50, density=0.1, format="csr", dtype=np.float32, random_state=4)
    store = sparsestore.save(tmp_path / "k.zarr", X, chunk_bytes=8192)
    loader = sparsestore.DataLoader(store, batch_size=100, shuffle=True, seed=0)
    kept = list(loader.iter_batches())  # held while two more passes reuse freed memory
    for _ in range(2):
        for _b in loader.iter_batches():
            pass
    for b in kept:
        np.testing.assert_array_equal(b.to_scipy().toarray(), X[b.rows].toarray())


def test_a_block_returned_while_the_pool_lock_is_held_does_not_deadlock():
    """A finalizer can run in the thread that holds the pool's lock (a garbage collection
    triggered by an allocation inside take); returning the block then must not block."""
    pool = BufferPool()
    block = np.empty(4096 + 64, np.uint8)

    def finalizer_inside_take():
        with pool._lock:  # what take() holds while it searches the idle blocks
            pool._give(block)

    t = threading.Thread(target=finalizer_inside_take, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "returning a block under the pool's own lock deadlocked"
    assert pool.idle_blocks() == 1  # filed by the next call
    again = pool.take(4000, np.uint8)
    assert again.base is not None and pool.reused == 1


_FRAGMENTED_HEAP = """
import threading, psutil, numpy as np
from sparsestore.buffers import release_free_heap
rss = lambda: psutil.Process().memory_info().rss
big = np.ones(8 << 20, np.uint8); del big  # raises glibc's dynamic mmap threshold to 8 MiB
base = rss()
kept = []
def work():  # 100 MiB in a thread's arena, all freed but the last block (the heap's top)
    arrs = [np.ones(256 << 10, np.uint8) for _ in range(400)]
    kept.append(arrs.pop())
t = threading.Thread(target=work); t.start(); t.join()
before = rss(); released = release_free_heap(); after = rss()
print(base, before, after, released)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_heap_returns_memory_freed_into_a_thread_arena():
    """The pattern of a pass (buffers freed into a worker thread's arena, one still held)
    leaves ~100 MiB free but resident; release_free_heap hands it back.  In a subprocess:
    TensorFlow, imported by other tests, pins glibc's thresholds so the heap never holds it."""
    out = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True,
                         text=True, check=True).stdout.split()
    base, before, after, released = int(out[0]), int(out[1]), int(out[2]), out[3]
    assert released == "True"
    # Whatever the freed ~100 MiB did meanwhile (glibc may already have returned some),
    # none of it is resident after the release: the kept 256 KiB block and slack only.
    assert after - base < 24 * 2**20, (base, before, after)
    assert before - base > 80 * 2**20 or before - after < 8 * 2**20, (base, before, after)


@pytest.mark.parametrize("whole", [True, False])
def test_each_pass_releases_free_heap_once_after_its_threads_end(tmp_path, monkeypatch, whole):
    X = sp.random(4000, 100, density=0.05, format="csr", dtype=np.float32, random_state=3)
    store = sparsestore.save(tmp_path / "t.zarr", X, chunk_bytes=8192)
    loader = sparsestore.DataLoader(store, batch_size=100, num_workers=2)
    calls = []

    def spy() -> bool:
        calls.append([t.name for t in threading.enumerate()
                      if t.name.startswith(reader.THREAD_PREFIX)])
        return False

    monkeypatch.setattr(sparsestore.loader, "release_free_heap", spy)
    for _ in range(2):
        batches = loader.iter_batches()
        for i, _b in enumerate(batches):
            if not whole and i == 3:
                batches.close()
                break
    assert calls == [[], []]


def test_release_free_heap_trims_first_then_only_after_rss_grew(monkeypatch):
    """The first call trims; later ones only once RSS has grown by TRIM_GROWTH (or an
    eighth) since the last trim, or when forced: trimming every pass made the next pass
    fault its memory back in."""
    from sparsestore import buffers

    rss = [400 * 2**20]
    trims = []
    monkeypatch.setattr(buffers, "_malloc_trim", lambda: trims.append)
    monkeypatch.setattr(buffers, "_rss_bytes", lambda: rss[0])
    monkeypatch.setattr(buffers, "_rss_after_trim", None)
    margin = max(buffers.TRIM_GROWTH, rss[0] // 8)  # 50 MiB over 400
    assert buffers.release_free_heap() and len(trims) == 1
    rss[0] += margin - 1
    assert not buffers.release_free_heap() and len(trims) == 1
    assert buffers.release_free_heap(force=True) and len(trims) == 2  # baseline moves up
    margin = max(buffers.TRIM_GROWTH, rss[0] // 8)
    rss[0] += margin - 1
    assert not buffers.release_free_heap()
    rss[0] += 1
    assert buffers.release_free_heap() and trims == [0, 0, 0]


@pytest.mark.parametrize("layout", [{}, {"chunk_bytes": 2**17, "shard_bytes": 8 * 2**20}],
                         ids=["chunks", "shards"])
def test_shuffled_passes_keep_their_unit_buffers(tmp_path, layout):
    """A pass ends with everything it held idle in the pool; the pool must keep it rather
    than release the oldest blocks (a shuffled unit's) and page-fault them in again in
    every later pass.  Its bound must cover all a pass holds at once, the caches of row
    pointers and labels, the compressed chunks being decoded and the shards a gather
    decodes together included: a pass that outgrows it sheds idle blocks, unit blocks
    among them, as it goes."""
    n_rows, per_row = 300_000, 40
    rng = np.random.default_rng(0)
    indices = np.tile(np.arange(0, 2000, 2000 // per_row, dtype=np.int32), n_rows)
    X = sp.csr_matrix((rng.random(n_rows * per_row, dtype=np.float32), indices,
                       np.arange(0, n_rows * per_row + 1, per_row)), shape=(n_rows, 2000))
    # 96 MB decoded: three 32 MiB units
    store = sparsestore.save(tmp_path / "u.zarr", X, labels={
        "y": np.arange(n_rows) // 1000, "w": rng.random(n_rows)}, **layout)
    # Small batches: the pool's allowance for batches held leaves no room to spare.
    loader = sparsestore.DataLoader(store, batch_size=512, shuffle=True, seed=0,
                                    shuffle_buffer_bytes=64 * 2**20, labels=["y", "w"])
    unit_bytes = loader._unit_nnz() * 4  # a unit's values (or indices) array
    pool, fresh, peak = loader._pool, [], [0]
    take = pool.take

    def counting_take(shape, dtype):
        made = pool.allocated
        out = take(shape, dtype)
        if pool.allocated > made:
            fresh.append(out.nbytes)
        peak[0] = max(peak[0], pool.in_use_bytes())
        return out

    pool.take = counting_take
    for epoch in range(3):
        fresh.clear()
        loader.set_epoch(epoch)
        seen = np.sort(np.concatenate([b.rows for b in loader.iter_batches()]))
        np.testing.assert_array_equal(seen, np.arange(n_rows))
        assert peak[0] <= pool.max_bytes
        if epoch == 0:
            assert sum(n >= unit_bytes for n in fresh) >= 4  # two units in flight
        else:
            assert not [n for n in fresh if n >= unit_bytes], fresh


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_a_scipy_batch_is_built_over_the_batch_arrays(index_dtype):
    """scipy's own constructor copies a part that is a view of under half its buffer (a
    batch cut from a decoded block always is); the batch's matrix must be the same one,
    index dtypes included, over the batch's memory."""
    from sparsestore.batch import Batch

    X = sp.random(40, 30, density=0.2, format="csr", dtype=np.float32, random_state=5)
    X[3] = 0  # an empty row
    X.eliminate_zeros()
    block_v = np.concatenate([X.data, np.ones(5 * X.nnz, np.float32)])
    block_i = np.concatenate([X.indices, np.zeros(5 * X.nnz, np.int32)]).astype(index_dtype)
    v, i, p = block_v[: X.nnz], block_i[: X.nnz], X.indptr.astype(np.int64)
    got = Batch(v, i, p, None, (), np.arange(40), 30).to_scipy()
    want = sp.csr_matrix((v, i, p), shape=(40, 30))
    assert got.shape == want.shape and (got != X).nnz == 0
    assert got.indices.dtype == want.indices.dtype and got.indptr.dtype == want.indptr.dtype
    assert got.data.dtype == np.float32 and got.has_canonical_format
    assert np.shares_memory(got.data, block_v) and not np.shares_memory(want.data, block_v)
    np.testing.assert_array_equal(got @ np.arange(30.0), X @ np.arange(30.0))


def test_batches_joined_across_blocks_come_from_the_pool():
    """A batch that straddles two decoded blocks is joined into pooled memory (equal to
    numpy's own concatenation), dense and sparse alike."""
    from sparsestore.batch import Batch

    X = sp.random(30, 12, density=0.3, format="csr", dtype=np.float32, random_state=2)
    whole = Batch(X.data, X.indices, X.indptr.astype(np.int64), None,
                  (np.arange(30) % 4,), np.arange(30), 12)
    pool = BufferPool()
    for cuts in ([0, 7, 30], [0, 1, 2, 29, 30]):
        parts = [whole.slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        made = pool.allocated
        got = Batch.concat(parts, pool)
        assert pool.allocated - made == 2  # values and indices
        assert (got.to_scipy() != X).nnz == 0
        np.testing.assert_array_equal(got.labels[0], np.arange(30) % 4)
        np.testing.assert_array_equal(got.rows, np.arange(30))
        np.testing.assert_array_equal(got.values, Batch.concat(parts).values)
    dense = Batch(None, None, None, X.toarray(), (), np.arange(30), 12)
    got = Batch.concat([dense.slice(0, 11), dense.slice(11, 30)], pool)
    np.testing.assert_array_equal(got.dense, X.toarray())
    assert got.dense.base is not None  # a pooled view, not a fresh array


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and RUSAGE_THREAD")
def test_restore_mmap_threshold_undoes_a_pinned_threshold():
    """With the mmap threshold pinned at 128 KiB (as TensorFlow pins it), glibc maps every
    larger request afresh; restore_mmap_threshold serves them from the heap again."""
    from sparsestore import buffers

    if buffers._malloc_trim() is None:
        pytest.skip("not glibc")
    code = """
import ctypes
from page_faults import faults_per_alloc
from sparsestore import buffers
ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, as TensorFlow pins it
pinned = faults_per_alloc()
assert buffers.restore_mmap_threshold()
print(pinned, faults_per_alloc())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr[-2000:]
    pinned, restored = (float(v) for v in out.stdout.split())
    assert pinned > 40 and restored < 8, (pinned, restored)


def test_a_pass_left_open_at_exit_closes_quietly(tmp_path):
    """A pass the program never finished is closed while the interpreter shuts down; its
    heap upkeep must not need imports then (a traceback at every such exit)."""
    script = tmp_path / "left_open.py"
    script.write_text(
        "import numpy as np, scipy.sparse as sp, sparsestore\n"
        "X = sp.random(2000, 50, density=0.1, format='csr', random_state=0, dtype=np.float32)\n"
        f"s = sparsestore.save({str(tmp_path / 'a.zarr')!r}, X)\n"
        "it = iter(sparsestore.DataLoader(s, batch_size=10, shuffle=True, seed=0)"
        ".iter_batches())\n"
        "print(next(it).n_rows)\n")
    done = subprocess.run([sys.executable, "-W", "ignore", str(script)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "10", done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, \
        done.stderr
