"""Stores on S3 behind a loopback proxy that adds a fixed delay per request.

The proxy (:mod:`benchmarks.latency_proxy`) counts every request by method and the most
in flight at once, so these tests pin what a pass costs in requests: batches equal the
same pass over a local copy (and the matrix itself, by scipy), each stored chunk is one
GET (no HEAD before it, no re-read of a shard's index per inner chunk), reads of a unit
go out together, and opening a store is a handful of requests.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp

import sparsestore
from benchmarks.latency_proxy import LatencyProxy
from sparsestore import storage

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
from s3server import S3Server  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = [pytest.mark.s3, pytest.mark.timeout(300)]

LAYOUTS = {
    "default": {},
    "small_chunks": {"chunk_bytes": 128 * 1024},
    "sharded": {"chunk_bytes": 128 * 1024, "shard_bytes": 1 << 20},
}


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(5)
    M = sp.random(12000, 1500, density=0.01, format="csr", dtype=np.float32, random_state=rng)
    M.data[:] = rng.integers(1, 100, M.nnz)  # compressible, like counts
    return M


@pytest.fixture(scope="module")
def stores(s3, X, tmp_path_factory):
    """Each layout saved to S3 and to local disk: ``{layout: (url, local path)}``."""
    bucket = s3.new_bucket()
    out = {}
    for name, kw in LAYOUTS.items():
        url = f"s3://{bucket}/{name}.zarr"
        local = str(tmp_path_factory.mktemp("local") / f"{name}.zarr")
        labels = {"y": np.arange(X.shape[0], dtype=np.int64)}
        sparsestore.save(url, X, labels=labels, storage_options=s3.storage_options, **kw)
        sparsestore.save(local, X, labels=labels, **kw)
        out[name] = (url, local)
    return out


def _through(s3: S3Server, proxy: LatencyProxy) -> dict:
    return dict(s3.storage_options, endpoint_url=proxy.endpoint_url)


def _batches(store, shuffle: bool) -> list[tuple[sp.csr_matrix, np.ndarray]]:
    loader = sparsestore.DataLoader(store, batch_size=500, shuffle=shuffle, seed=11,
                                    labels="y")
    return [(xb.tocsr(), np.asarray(yb)) for xb, yb in loader]


def _value_objects(store) -> int:
    """Stored objects holding the values: every data and indices chunk (inner chunks of
    shards each one read) plus one index per shard."""
    n = 0
    for name in ("data", "indices"):
        arr = store.arrays[name]
        n += arr.nchunks
        if getattr(arr, "shards", None) is not None:
            n += -(-arr.shape[0] // arr.shards[0])
    return n


def _stored_objects(store) -> int:
    """Stored objects a pass reads: the values' objects, the indptr and label chunks."""
    return (_value_objects(store) + store.arrays["indptr"].nchunks
            + store.labels["y"].array.nchunks)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("delay", [0.0, 0.02])
def test_batches_through_latency_equal_local(s3, X, stores, layout, delay):
    url, local = stores[layout]
    with LatencyProxy(s3.endpoint_url, delay) as proxy:
        remote = sparsestore.open(url, storage_options=_through(s3, proxy))
        here = sparsestore.open(local)
        for shuffle in (False, True):
            got, want = _batches(remote, shuffle), _batches(here, shuffle)
            assert len(got) == len(want)
            for (xg, yg), (xw, yw) in zip(got, want, strict=True):
                np.testing.assert_array_equal(yg, yw)
                assert (xg != xw).nnz == 0
                assert (xg != X[yg]).nnz == 0  # the matrix itself (scipy), row by row
            ys = np.concatenate([y for _, y in got])
            np.testing.assert_array_equal(np.sort(ys), np.arange(X.shape[0]))
        assert proxy.snapshot()["by_method"].get("HEAD", 0) <= 1


@pytest.mark.parametrize("layout", ["small_chunks", "sharded"])
def test_a_pass_is_one_get_per_stored_chunk_and_concurrent(s3, stores, layout):
    url, _ = stores[layout]
    with LatencyProxy(s3.endpoint_url, 0.02) as proxy:
        store = sparsestore.open(url, storage_options=_through(s3, proxy))
        # Without labels= a pass reads no label chunk; a shuffled first pass's poor-mixing
        # check reads each label whole, once.
        objects = _value_objects(store) + store.arrays["indptr"].nchunks
        assert store.arrays["data"].nchunks >= 4  # several chunks, so there is a point
        decoded = store.nnz * 8 + store.n_rows * 8
        for shuffle in (False, True):
            proxy.reset()
            # Shuffled: several units, so neighbouring blocks fall in different units.
            loader = sparsestore.DataLoader(store, batch_size=500, shuffle=shuffle, seed=2,
                                            shuffle_buffer_bytes=decoded // 2)
            n = sum(xb.shape[0] for xb in loader)
            assert n == store.n_rows
            if shuffle:
                assert loader._sampler_for_blocks().plan(0).n_units >= 3
            counts = proxy.snapshot()
            by = counts["by_method"]
            assert by.get("HEAD", 0) == 0, proxy.log  # no HEAD before each GET
            # At most one GET per stored chunk, plus a few (units decoded side by side may
            # race for a chunk they share; 5 seen on the 2-core CI box): never a second GET
            # per chunk, an index per inner chunk, or the chunk a later unit needs one row of.
            check = store.labels["y"].array.nchunks if shuffle else 0
            assert by["GET"] <= objects + check + 5, proxy.log
            # The chunks of a unit were requested together, not one after the other.
            assert counts["max_in_flight"] >= 4, counts


@pytest.mark.parametrize("layout", ["default", "sharded"])
def test_opening_is_three_round_trips(s3, stores, layout):
    """The group's zarr.json; then the metadata of the three arrays, of the labels group
    and of its one array, together; then the indptr chunk(s) holding its first and last
    entries.  It was 20 requests one after another (38, 19 of them HEAD, before s3fs
    stopped sending a HEAD per GET): 1 s at 30 ms."""
    url, _ = stores[layout]
    with LatencyProxy(s3.endpoint_url, 0.1) as proxy:
        opts = _through(s3, proxy)
        sparsestore.open(url, storage_options=opts)  # s3fs's client, made once per options
        for reopen in (False, True):
            proxy.reset()
            store = sparsestore.open(url, storage_options=opts)
            if reopen:  # how a pickled handle (a dask task, a torch worker) reopens it
                proxy.reset()
                store = pickle.loads(pickle.dumps(store))
            counts, trips = proxy.snapshot(), proxy.round_trips()
            assert store.shape == (12000, 1500) and len(store.labels) == 1
            assert trips <= 3, (trips, proxy.log)
            assert counts["requests"] <= 8, proxy.log
            assert counts["by_method"].get("HEAD", 0) == 0, proxy.log
            # Each document read once (zarr asks for some twice): served from memory.
            assert len(set(proxy.log)) == len(proxy.log), proxy.log


def test_metadata_read_ahead_is_forgotten_once_open(s3, stores):
    """The documents read ahead answer zarr only while the handle opens: a later read of
    one goes to storage (no stale metadata after another writer's commit)."""
    url, _ = stores["default"]
    with LatencyProxy(s3.endpoint_url, 0.0) as proxy:
        store = sparsestore.open(url, storage_options=_through(s3, proxy))
        proxy.reset()
        store.refresh()
        assert store.shape == (12000, 1500)
        assert ("GET", proxy.log[0][1]) == proxy.log[0] and proxy.log[0][1].endswith(
            "/default.zarr/zarr.json"), proxy.log
        proxy.reset()
        from sparsestore import zarr_compat as zc

        assert zc.run_sync(store.group.store.get("zarr.json")) is not None
        assert proxy.snapshot()["requests"] == 1


def test_a_missing_remote_store_is_not_found(s3, stores):
    from sparsestore.errors import StoreNotFoundError

    url, _ = stores["default"]
    with pytest.raises(StoreNotFoundError):
        sparsestore.open(url.replace("default.zarr", "nothing.zarr"),
                         storage_options=s3.storage_options)


def test_user_options_override_the_remote_defaults():
    opts = storage.remote_options("s3://b/x.zarr", {"max_concurrency": 4, "config_kwargs": {
        "connect_timeout": 5}})
    assert opts["max_concurrency"] == 4
    assert opts["config_kwargs"] == {"connect_timeout": 5, "max_pool_connections": 64}
    assert storage.remote_options("s3://b/x", None)["max_concurrency"] == 1
    assert storage.remote_options("gs://b/x", {"token": "anon"}) == {"token": "anon"}


def test_proxy_counts_methods_and_in_flight(s3):
    """The proxy's own counters, against requests made here with boto3."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from botocore.config import Config

    bucket = s3.new_bucket()
    with LatencyProxy(s3.endpoint_url, 0.05) as proxy:
        client = boto3.client(
            "s3", endpoint_url=proxy.endpoint_url, aws_access_key_id="testing",
            aws_secret_access_key="testing", region_name="us-east-1",
            config=Config(max_pool_connections=8),
        )
        client.put_object(Bucket=bucket, Key="k", Body=b"x" * 100_000)
        client.head_object(Bucket=bucket, Key="k")
        with ThreadPoolExecutor(6) as ex:
            bodies = list(ex.map(lambda _: client.get_object(Bucket=bucket, Key="k")[
                "Body"].read(), range(6)))
        counts = proxy.snapshot()
    assert all(b == b"x" * 100_000 for b in bodies)
    assert counts["by_method"] == {"PUT": 1, "HEAD": 1, "GET": 6}
    assert 2 <= counts["max_in_flight"] <= 6


@pytest.mark.parametrize("layout", [{"chunk_bytes": 128 * 1024},
                                    {"chunk_bytes": 64 * 1024, "shard_bytes": 256 * 1024}])
def test_damaged_chunks_on_s3_fail_a_concurrent_pass(s3, X, layout):
    """Prefetched bytes are checked as before: a chunk swapped for another one is
    misplaced, a flipped byte a checksum mismatch, a deleted one missing."""
    from sparsestore.errors import ChecksumError, MisplacedChunkError, MissingChunkError

    bucket = s3.new_bucket()
    url = f"s3://{bucket}/d.zarr"
    sparsestore.save(url, X, storage_options=s3.storage_options, **layout)
    client = s3.client()
    keys = sorted(k for k in s3.keys(bucket, "d.zarr/data/c/"))
    assert len(keys) >= 2
    good = client.get_object(Bucket=bucket, Key=keys[1])["Body"].read()
    first = client.get_object(Bucket=bucket, Key=keys[0])["Body"].read()

    def a_pass() -> None:
        store = sparsestore.open(url, storage_options=s3.storage_options)
        for _ in sparsestore.DataLoader(store, batch_size=1000):
            pass

    # Another chunk's bytes (a shard swapped for the other: both hold whole shards).
    client.put_object(Bucket=bucket, Key=keys[1], Body=first)
    with pytest.raises((MisplacedChunkError, ChecksumError)):
        a_pass()
    flipped = bytearray(good)
    flipped[len(flipped) // 3] ^= 0xFF
    client.put_object(Bucket=bucket, Key=keys[1], Body=bytes(flipped))
    with pytest.raises((ChecksumError, MisplacedChunkError)):
        a_pass()
    client.delete_object(Bucket=bucket, Key=keys[1])
    with pytest.raises(MissingChunkError):
        a_pass()
    client.put_object(Bucket=bucket, Key=keys[1], Body=good)
    a_pass()  # restored: reads again


def test_a_sequential_pass_fetches_the_next_units_ahead(s3, X, stores, monkeypatch):
    """Units queued behind the ones being decoded have their chunks requested already, so
    a pass of many small units keeps more requests in flight than the decoding threads
    alone would (and reads the same batches, each chunk once)."""
    import sparsestore.loader as loader_mod

    url, local = stores["small_chunks"]
    seen = {}
    for io_ahead in (0, loader_mod.REMOTE_IO_AHEAD):
        monkeypatch.setattr(loader_mod, "REMOTE_IO_AHEAD", io_ahead)
        with LatencyProxy(s3.endpoint_url, 0.02) as proxy:
            store = sparsestore.open(url, storage_options=_through(s3, proxy))
            proxy.reset()
            loader = sparsestore.DataLoader(store, batch_size=500, labels="y",
                                            block_rows=600, num_workers=1)
            ys = np.concatenate([np.asarray(y) for _, y in loader])
            counts = proxy.snapshot()
        np.testing.assert_array_equal(ys, np.arange(X.shape[0]))
        assert counts["by_method"]["GET"] <= _stored_objects(store) + 4, proxy.log
        seen[io_ahead] = counts["max_in_flight"]
    assert seen[loader_mod.REMOTE_IO_AHEAD] > seen[0] + 2, seen


# ------------------------------------------------------------------ dask

def _dask_objects(store) -> tuple[int, int]:
    """(objects a column sum reads once: data and indices chunks and shard indexes,
    indptr chunks, which to_dask's plan reads and the tasks read again)."""
    return _value_objects(store), store.arrays["indptr"].nchunks


@pytest.mark.dask
@pytest.mark.parametrize("layout", ["default", "small_chunks", "sharded"])
def test_dask_column_sum_through_latency_equals_local(s3, X, stores, layout):
    """A column sum on the threaded scheduler reads each stored object once, a task's
    chunks requested together: with 2 threads, more than 2 requests in flight (it was one
    chunk after another per task: 2 in flight, data then indices)."""
    dask = pytest.importorskip("dask")
    url, local = stores[layout]
    with dask.config.set(scheduler="threads", num_workers=2):
        want = np.asarray(sparsestore.open(local).to_dask().sum(axis=0).compute())
        with LatencyProxy(s3.endpoint_url, 0.02) as proxy:
            store = sparsestore.open(url, storage_options=_through(s3, proxy))
            proxy.reset()
            got = np.asarray(store.to_dask().sum(axis=0).compute())
            counts = proxy.snapshot()
    np.testing.assert_array_equal(got, want)  # the same blocks, summed in the same tree
    np.testing.assert_allclose(got.ravel(), np.asarray(X.sum(axis=0)).ravel(), rtol=1e-5)
    once, ptr = _dask_objects(store)
    by = counts["by_method"]
    assert by.get("HEAD", 0) == 0, proxy.log
    assert by["GET"] <= once + 2 * ptr + 2, proxy.log  # 2: a shard index read twice at most
    if store.arrays["data"].nchunks >= 4:
        assert counts["max_in_flight"] >= 4, counts


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
        silence_logs=40,
    ) as cluster, distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.mark.dask
@pytest.mark.parametrize("layout", ["small_chunks", "sharded"])
def test_dask_column_sum_on_a_cluster_through_latency(s3, X, stores, layout, cluster_client):
    """On 2 worker processes: each opens the store once (a handful of requests, not one
    open per array with every document read twice: 224 requests in all at 16 chunks),
    and reads its chunks together."""
    url, local = stores[layout]
    want = np.asarray(sparsestore.open(local).to_dask().sum(axis=0).compute(
        scheduler="threads"))
    with LatencyProxy(s3.endpoint_url, 0.02) as proxy:
        store = sparsestore.open(url, storage_options=_through(s3, proxy))
        proxy.reset()
        got = np.asarray(cluster_client.compute(store.to_dask().sum(axis=0), sync=True))
        counts = proxy.snapshot()
    np.testing.assert_array_equal(got, want)
    once, ptr = _dask_objects(store)
    by = counts["by_method"]
    assert by.get("HEAD", 0) == 0, proxy.log
    # Each worker opens the store once (7 requests) and may read a shard index or an
    # indptr chunk the other also reads.
    assert by["GET"] <= once + 2 * ptr + 2 * 7 + 4, proxy.log
    assert counts["max_in_flight"] >= 4, counts
