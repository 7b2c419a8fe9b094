"""Inner chunks of sharded arrays decoded directly (:class:`ChunkDecoder` with a shard
plan): exactly what zarr decodes, each shard's index read once per decoder, and damage
still raising the errors the zarr path raises."""

from __future__ import annotations

import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsestore
from sparsestore.buffers import BufferPool
from sparsestore.chunk_cache import ChunkCache
from sparsestore.chunks import ChunkDecoder, read_ranges
from sparsestore.errors import ChecksumError, MisplacedChunkError, MissingChunkError
from sparsestore.verified import VerifiedStore


def _matrix(n: int, m: int, density: float, seed: int) -> sp.csr_matrix:
    X = sp.random(n, m, density=density, format="csr", dtype=np.float32, random_state=seed)
    X.data += 1  # no stored zeros: a zero-filled chunk would be visibly wrong
    return X


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 900), m=st.integers(1, 300), density=st.floats(0.0, 0.2),
       inner_kib=st.sampled_from([4, 8]), per=st.integers(1, 6), seed=st.integers(0, 99))
def test_direct_inner_chunks_equal_zarr(tmp_path_factory, n, m, density, inner_kib, per, seed):
    """Every inner chunk the direct path decodes (through the store's VerifiedStore, and on
    a plain zarr array) equals zarr's own read of those elements."""
    X = _matrix(n, m, density, seed)
    path = tmp_path_factory.mktemp("hyp") / "s.zarr"
    inner = inner_kib * 1024
    store = sparsestore.save(path, X, chunk_bytes=inner, shard_bytes=inner * per)
    for name in ("data", "indices"):
        oracle = np.asarray(zarr.open_array(str(path / name), mode="r")[...])
        for arr in (store.arrays[name], zarr.open_array(str(path / name), mode="r")):
            dec = ChunkDecoder(arr, name)
            assert dec.sharded is not None and dec.sharded.per == per  # 4-byte elements
            for k in range(-(-arr.shape[0] // dec.chunk)):
                lo, hi = dec.bounds(k)
                np.testing.assert_array_equal(dec.read(k, pool=BufferPool()), oracle[lo:hi])
        cache = ChunkCache(store.arrays[name], name=name)
        np.testing.assert_array_equal(cache.read(0, oracle.size, oracle.size), oracle)
    assert (store[:] != X).nnz == 0


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_direct")
    X = _matrix(4000, 80, 0.1, 3)
    # data/indices: 1024-element inner chunks, 4 per shard
    sparsestore.save(root / "sh.zarr", X, chunk_bytes=4096, shard_bytes=16384)
    return root / "sh.zarr", X


@pytest.fixture
def copy(sharded, tmp_path):
    path, X = sharded
    return Path(shutil.copytree(path, tmp_path / "sh.zarr")), X


def test_index_read_once_per_shard_per_pass(sharded, monkeypatch):
    """A sequential loader pass and a random-rows read each read every shard's index once
    (counted at the store), where zarr reads it before every inner chunk."""
    path, X = sharded
    reads: list[str] = []
    orig = VerifiedStore.read_suffix

    def spy(self, key, n):
        reads.append(key)
        return orig(self, key, n)

    monkeypatch.setattr(VerifiedStore, "read_suffix", spy)
    store = sparsestore.open(path)
    shards = {name: -(-store.arrays[name].shape[0] // store.arrays[name].shards[0])
              for name in ("data", "indices")}
    got = sp.vstack([b.to_scipy() for b in sparsestore.DataLoader(store, batch_size=256)
                     .iter_batches()], format="csr")
    assert (got != X).nnz == 0
    for name, n in shards.items():
        keys = [k for k in reads if k.startswith(f"{name}/")]
        assert sorted(keys) == sorted(f"{name}/c/{s}" for s in range(n))  # each once
    reads.clear()
    rows = np.sort(np.random.default_rng(1).choice(X.shape[0], 500, replace=False))
    assert (store[rows] != X[rows]).nnz == 0
    for name in shards:
        keys = [k for k in reads if k.startswith(f"{name}/")]
        assert len(keys) == len(set(keys)) > 1


def _index(shard: Path, per: int) -> tuple[bytes, np.ndarray]:
    raw = shard.read_bytes()
    size = per * 16 + 4
    return raw, np.frombuffer(raw[-size:-4], "<u8").reshape(per, 2).copy()


def _write_index(shard: Path, raw: bytes, index: np.ndarray, fix_crc: bool = True) -> None:
    body = index.astype("<u8").tobytes()
    crc = google_crc32c.value(body) & 0xFFFFFFFF
    if not fix_crc:
        crc ^= 1
    shard.write_bytes(raw[: -(len(body) + 4)] + body + crc.to_bytes(4, "little"))


def _decode_all(store, name: str) -> None:
    arr = store.arrays[name]
    dec = ChunkDecoder(arr, name)
    assert dec.sharded is not None
    for k in range(-(-arr.shape[0] // dec.chunk)):
        dec.read(k)


def test_empty_index_entry_is_missing(copy):
    path, _ = copy
    raw, index = _index(path / "data" / "c" / "1", 4)
    index[2] = np.iinfo(np.uint64).max
    _write_index(path / "data" / "c" / "1", raw, index)
    store = sparsestore.open(path)
    with pytest.raises(MissingChunkError, match="chunk 6 of array 'data'"):
        _decode_all(store, "data")
    with pytest.raises(MissingChunkError):
        read_ranges(store.arrays["data"], np.array([6 * 1024]), np.array([6 * 1024 + 5]),
                    name="data")


def test_missing_shard_is_missing(copy):
    path, _ = copy
    (path / "indices" / "c" / "2").unlink()
    store = sparsestore.open(path)
    with pytest.raises(MissingChunkError, match="array 'indices'"):
        _decode_all(store, "indices")


def test_swapped_entries_are_misplaced(copy):
    path, _ = copy
    raw, index = _index(path / "data" / "c" / "0", 4)
    index[[0, 3]] = index[[3, 0]]
    _write_index(path / "data" / "c" / "0", raw, index)
    with pytest.raises(MisplacedChunkError, match="array 'data'"):
        _decode_all(sparsestore.open(path), "data")


def test_damaged_index_crc_is_a_checksum_error_without_manifest(copy):
    """A plain zarr array (no manifest to check against): the index's own CRC32C."""
    path, _ = copy
    raw, index = _index(path / "data" / "c" / "1", 4)
    _write_index(path / "data" / "c" / "1", raw, index, fix_crc=False)
    arr = zarr.open_array(str(path / "data"), mode="r")
    dec = ChunkDecoder(arr, "data")
    dec.read(0)  # other shards read
    with pytest.raises(ChecksumError, match="index of shard 1 of array 'data'"):
        dec.read(4)
    with pytest.raises(ValueError, match="(?i)checksum"):  # zarr agrees the shard is damaged
        arr[4 * 1024 : 5 * 1024]


def test_flipped_inner_chunk_byte_is_a_checksum_error(copy):
    path, _ = copy
    shard = path / "indices" / "c" / "1"
    raw, index = _index(shard, 4)
    off, nbytes = (int(v) for v in index[1])
    b = bytearray(raw)
    b[off + nbytes // 2] ^= 0x40
    shard.write_bytes(bytes(b))
    arr = zarr.open_array(str(path / "indices"), mode="r")
    with pytest.raises(ChecksumError, match="chunk 5"):
        ChunkDecoder(arr, "indices").read(5)
    with pytest.raises((ChecksumError, MisplacedChunkError)):
        _decode_all(sparsestore.open(path), "indices")


def test_kept_index_survives_an_append_rewriting_the_last_shard(copy):
    """A decoder keeps the last shard's index; an append through another handle rewrites
    that shard: the committed rows still read exactly (the index is read afresh)."""
    path, X = copy
    reader = sparsestore.open(path)
    arr = reader.arrays["data"]
    dec = ChunkDecoder(arr, "data")
    n = X.nnz
    last = (n - 1) // dec.chunk
    before = [dec.read(k) for k in range(last + 1)]
    reads = dec.index_reads
    sparsestore.open(path, mode="r+").append(_matrix(700, 80, 0.1, 9))
    for k in range(last + 1):
        lo, hi = dec.bounds(k)
        np.testing.assert_array_equal(dec.read(k)[: hi - lo], before[k][: hi - lo])
    assert dec.index_reads > reads  # the rewritten shard's index, read afresh
    np.testing.assert_array_equal(np.concatenate(before)[:n], X.data)


@pytest.mark.parametrize("n", [1, 1023, 4096, 4097, 9000])
def test_shard_encoder_writes_what_zarr_writes(tmp_path, n):
    """Shards written by :class:`ShardEncoder` are byte for byte zarr's own (whole shards,
    and a last shard cut inside an inner chunk)."""
    from sparsestore.chunks import ChunkEncoder, ShardEncoder
    from sparsestore.layout import Layout

    values = np.random.default_rng(n).integers(0, 50, n).astype(np.float32)
    codecs = Layout().codecs()
    arrays = []
    for name in ("ours", "zarr"):
        where = zarr.storage.LocalStore(str(tmp_path / name))
        arr = zarr.create_array(VerifiedStore(where) if name == "ours" else where,
                                shape=(n,), dtype=np.float32,
                                chunks=(1024,), shards=(4096,), compressors=codecs,
                                fill_value=0, config={"write_empty_chunks": True})
        arrays.append(arr)
    enc = ChunkEncoder.for_array(arrays[0])
    assert isinstance(enc, ShardEncoder)
    for k, lo in enumerate(range(0, n, 4096)):
        enc.write(k, values[lo : lo + 4096])
    arrays[1][:] = values
    ours = sorted((tmp_path / "ours" / "c").iterdir())
    theirs = sorted((tmp_path / "zarr" / "c").iterdir())
    assert [p.name for p in ours] == [p.name for p in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours"))[:], values)


# ------------------------------------------------------------------ inner chunks read together


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.booleans(), min_size=1, max_size=60), seed=st.integers(0, 99))
def test_decode_chunks_fetches_each_shard_once_and_equals_zarr(sharded, monkeypatch, picks,
                                                              seed):
    """Any ascending choice of inner chunks decodes to zarr's elements, each shard's chosen
    chunks by one fetch (counted at the store) however far apart they lie in it."""
    path, _ = sharded
    store = sparsestore.open(path)
    arr = store.arrays["data"]
    oracle = np.asarray(zarr.open_array(str(path / "data"), mode="r")[...])
    dec = ChunkDecoder(arr, "data")
    n = -(-arr.shape[0] // dec.chunk)
    ks = [k for k, p in zip(range(n), picks * (n // len(picks) + 1), strict=False) if p]
    if not ks:
        return
    fetches: list[tuple[str, int]] = []
    for name in ("read_run", "read_range"):
        real = getattr(VerifiedStore, name)

        def spy(self, key, *args, _real=real, _name=name, **kw):
            fetches.append((key, len(args[0]) if _name == "read_run" else 1))
            return _real(self, key, *args, **kw)

        monkeypatch.setattr(VerifiedStore, name, spy)
    out = np.empty(len(ks) * dec.chunk, arr.dtype)
    dec.decode_chunks(ks, out)
    for slot, k in enumerate(ks):
        lo, hi = dec.bounds(k)
        np.testing.assert_array_equal(out[slot * dec.chunk : slot * dec.chunk + hi - lo],
                                      oracle[lo:hi])
    per_shard = {}
    for k in ks:
        per_shard[f"data/c/{k // dec.sharded.per}"] = per_shard.get(
            f"data/c/{k // dec.sharded.per}", 0) + 1
    assert sorted(fetches) == sorted(per_shard.items())


def _exchange_inner_chunks(shard: Path, per: int, i: int, j: int) -> None:
    """Rewrite a shard with inner chunks ``i`` and ``j`` (neighbours, i < j) trading places,
    bytes and index alike, every CRC32C valid: each is a well-formed chunk in the wrong
    place, which only the manifest can tell."""
    raw, index = _index(shard, per)
    (oi, ni), (oj, nj) = (int(v) for v in index[i]), (int(v) for v in index[j])
    assert oi + ni == oj
    body = raw[:oi] + raw[oj : oj + nj] + raw[oi : oi + ni] + raw[oj + nj :]
    index[i], index[j] = (oi, nj), (oi + nj, ni)
    _write_index(shard, body, index)


@pytest.mark.parametrize("shard", [1, 2, 3])
def test_a_whole_read_decodes_shards_in_parallel_and_still_names_damage(copy, monkeypatch,
                                                                          shard):
    """``store[a:b]`` decodes interior shards on two threads: the result equals scipy, and
    damage in any shard (whichever thread decodes it) is the error, never zeros."""
    import threading

    path, X = copy
    store = sparsestore.open(path)
    assert store.arrays["data"].shape[0] > 4 * store.arrays["data"].shards[0]
    threads = set()
    real = ChunkDecoder._decode_shard_chunks

    def spy(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ChunkDecoder, "_decode_shard_chunks", spy)
    assert (store[:] != X).nnz == 0 and (store[100:3900] != X[100:3900]).nnz == 0
    assert len(threads) == 2, threads
    raw, index = _index(path / "data" / "c" / str(shard), 4)
    index[1] = np.iinfo(np.uint64).max  # inner chunk 1 of the shard: never stored
    _write_index(path / "data" / "c" / str(shard), raw, index)
    with pytest.raises(MissingChunkError, match=f"chunk {4 * shard + 1} of array 'data'"):
        sparsestore.open(path)[:]
    shutil.copyfile(path / "indices" / "c" / "0", path / "indices" / "c" / str(shard))
    with pytest.raises((ChecksumError, MisplacedChunkError, MissingChunkError)):
        sparsestore.open(path)[:]


def test_exchanged_inner_chunks_are_misplaced_on_every_read_path(copy):
    path, X = copy
    _exchange_inner_chunks(path / "data" / "c" / "1", 4, 1, 2)
    store = sparsestore.open(path)
    with pytest.raises(MisplacedChunkError, match="array 'data'"):
        store[:]
    with pytest.raises(MisplacedChunkError):
        read_ranges(store.arrays["data"], np.array([4 * 1024]), np.array([8 * 1024]),
                    name="data")
    for kw in ({}, {"shuffle": True, "shuffle_buffer_bytes": 3 * 16384}):
        with pytest.raises(MisplacedChunkError):
            for _ in sparsestore.DataLoader(store, batch_size=64, **kw):
                pass


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffled_pass_over_small_inner_chunks(sharded, workers):
    """A shuffled pass of many units over 4 KiB inner chunks (read by the unit's chunks,
    not span by span): every row once with its own values, and each inner chunk decoded
    once (one thread; with threads a chunk two running units share may be decoded twice)."""
    path, X = sharded
    store = sparsestore.open(path)
    loader = sparsestore.DataLoader(store, batch_size=64, shuffle=True, seed=2,
                                    shuffle_buffer_bytes=8 * 16384, num_workers=workers)
    assert loader._sampler_for_blocks().plan(0).n_units > 4
    rows, parts = [], []
    for b in loader.iter_batches():
        rows.append(b.rows)
        parts.append(b.to_scipy())
    rows = np.concatenate(rows)
    np.testing.assert_array_equal(np.sort(rows), np.arange(X.shape[0]))
    assert (sp.vstack(parts, format="csr") != X[rows]).nnz == 0
    if workers == 0:
        assert loader.decoded_chunks["data"] == -(-X.nnz // store.arrays["data"].chunks[0])


def test_sequential_pass_reads_inner_chunks_by_shard(sharded, monkeypatch):
    """A block's inner chunks are fetched a shard at a time: per shard its index and one
    read (plus a block's two edge chunks, read through the cache), not a read a chunk."""
    path, X = sharded
    store = sparsestore.open(path)
    reads: list[str] = []
    real = VerifiedStore._pread

    def spy(self, key, *args, **kw):
        reads.append(key)
        return real(self, key, *args, **kw)

    monkeypatch.setattr(VerifiedStore, "_pread", spy)
    got = sp.vstack([b.to_scipy() for b in sparsestore.DataLoader(
        store, batch_size=500, block_rows=2000).iter_batches()], format="csr")
    assert (got != X).nnz == 0
    arr = store.arrays["data"]
    inner, shards = -(-X.nnz // arr.chunks[0]), -(-X.nnz // arr.shards[0])
    data_reads = [k for k in reads if k.startswith("data/")]
    assert len(data_reads) <= 2 * shards + 2 * 2 < inner + shards, (len(data_reads), inner)
