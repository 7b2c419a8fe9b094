"""Stores on S3: a real S3-compatible server (moto, server mode) reached through s3fs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp

import sparsestore
from sparsestore.errors import (
    CorruptStoreError,
    ShapeMismatchError,
    StoreExistsError,
    StoreNotFoundError,
)

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
from s3server import S3Server  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = [pytest.mark.s3, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3):
    return s3.new_bucket()


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(21)
    M = sp.random(1500, 120, density=0.05, format="lil", dtype=np.float32, random_state=rng)
    M[40:60] = 0
    return sp.csr_matrix(M)


def _labels(n):
    return {"y": np.arange(n, dtype=np.int64), "w": np.linspace(0, 1, n, dtype=np.float32)}


def test_save_open_and_slice(s3, bucket, X):
    url = f"s3://{bucket}/a.zarr"
    saved = sparsestore.save(url, X, labels=_labels(X.shape[0]), chunk_bytes=8192,
                             storage_options=s3.storage_options)
    assert saved.path == url and saved.shape == X.shape
    store = sparsestore.open(url, storage_options=s3.storage_options)
    assert store.nnz == X.nnz and store.dtype == X.dtype
    assert (store[:] != X).nnz == 0
    idx = np.array([1499, 0, 45, 45, 700])
    mask = np.arange(X.shape[0]) % 3 == 0
    for key in (slice(10, 900), slice(5, 1400, 9), idx, mask, (idx, slice(3, 50))):
        got = store[key]
        assert (got != X[key]).nnz == 0
    np.testing.assert_array_equal(store.labels["y"][idx], idx)
    np.testing.assert_allclose(store.labels["w"][10:20], _labels(X.shape[0])["w"][10:20])
    assert store.info()["nnz"] == X.nnz
    # The objects are really on the server (listed with boto3, not through our code).
    keys = s3.keys(bucket, "a.zarr/")
    assert "a.zarr/zarr.json" in keys and any(k.startswith("a.zarr/data/c/") for k in keys)


def test_missing_and_existing_paths(s3, bucket, X):
    opts = s3.storage_options
    with pytest.raises(StoreNotFoundError):
        sparsestore.open(f"s3://{bucket}/nothing.zarr", storage_options=opts)
    url = f"s3://{bucket}/b.zarr"
    sparsestore.save(url, X, storage_options=opts)
    with pytest.raises(StoreExistsError):
        sparsestore.save(url, X[:10], storage_options=opts)
    assert sparsestore.open(url, storage_options=opts).shape == X.shape
    small = sparsestore.save(url, X[:10], storage_options=opts, overwrite=True)
    assert small.shape == (10, X.shape[1]) and (small[:] != X[:10]).nnz == 0
    # Nothing of the old, bigger store is left behind.
    assert sparsestore.open(url, storage_options=opts).nnz == X[:10].nnz


def test_append_is_atomic(s3, bucket, X):
    opts = s3.storage_options
    url = f"s3://{bucket}/c.zarr"
    sparsestore.save(url, X[:1000], labels=_labels(1000), chunk_bytes=8192, storage_options=opts)
    store = sparsestore.open(url, mode="r+", storage_options=opts)
    store.append(X[1000:], labels={k: v[1000:] for k, v in _labels(1500).items()} | {
        "y": np.arange(1000, 1500)})
    with pytest.raises(ShapeMismatchError):
        store.append(X[:5], labels={"y": np.arange(4), "w": np.zeros(5, np.float32)})
    store.close()
    back = sparsestore.open(url, storage_options=opts)
    assert back.shape == X.shape and (back[:] != X).nnz == 0
    np.testing.assert_array_equal(back.labels["y"][:], np.arange(1500))


def _failing_blocks(X):
    yield X[:500], None
    raise RuntimeError("source broke")


def test_failed_save_leaves_no_objects(s3, bucket, X):
    with pytest.raises(RuntimeError, match="source broke"):
        sparsestore.write_blocks(f"s3://{bucket}/d.zarr", _failing_blocks(X), n_cols=X.shape[1],
                                 dtype=np.float32, storage_options=s3.storage_options)
    assert s3.keys(bucket, "d.zarr") == []


def test_killed_save_is_refused_until_overwritten(s3, bucket, X, tmp_path):
    url = f"s3://{bucket}/e.zarr"
    script = textwrap.dedent(f"""
        import os, numpy as np, scipy.sparse as sp, sparsestore
        X = sp.load_npz({str(tmp_path / "x.npz")!r})
        def blocks():
            yield X[:700], None
            os._exit(3)  # killed mid-save: no cleanup runs
        sparsestore.write_blocks({url!r}, blocks(), n_cols=X.shape[1], dtype=np.float32,
                                 storage_options={s3.storage_options!r})
    """)
    sp.save_npz(tmp_path / "x.npz", X)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]
    assert s3.keys(bucket, "e.zarr/")  # objects were written ...
    with pytest.raises(CorruptStoreError, match="incomplete"):  # ... but it is no store
        sparsestore.open(url, storage_options=s3.storage_options)
    fixed = sparsestore.save(url, X, storage_options=s3.storage_options, overwrite=True)
    assert (fixed[:] != X).nnz == 0


def test_loader_streams_from_s3(s3, bucket, X):
    url = f"s3://{bucket}/f.zarr"
    store = sparsestore.save(url, X, labels=_labels(X.shape[0]), chunk_bytes=8192,
                             storage_options=s3.storage_options)
    loader = sparsestore.DataLoader(store, batch_size=128, labels="y")
    seen = 0
    for xb, yb in loader:
        n = xb.shape[0]
        assert (xb != X[seen : seen + n]).nnz == 0
        np.testing.assert_array_equal(yb, np.arange(seen, seen + n))
        seen += n
    assert seen == X.shape[0]
    shuffled = sparsestore.DataLoader(store, batch_size=100, shuffle=True, seed=3, labels="y")
    ys = np.concatenate([yb for _, yb in shuffled])
    np.testing.assert_array_equal(np.sort(ys), np.arange(X.shape[0]))


def test_tensorflow_backend_from_s3(s3, bucket, X):
    tf = pytest.importorskip("tensorflow")
    import sparsestore.adapters.tensorflow as sstf

    url = f"s3://{bucket}/g.zarr"
    store = sparsestore.save(url, X, labels=_labels(X.shape[0]), chunk_bytes=8192,
                             storage_options=s3.storage_options)
    loader = sparsestore.DataLoader(store, batch_size=256, labels="y")
    start = 0
    for xs, ys in sstf.to_dataset(loader, prefetch=None):
        dense = tf.sparse.to_dense(xs).numpy()
        n = dense.shape[0]
        np.testing.assert_array_equal(dense, X[start : start + n].toarray())
        np.testing.assert_array_equal(ys.numpy(), np.arange(start, start + n))
        start += n
    assert start == X.shape[0]


def test_dask_reads_and_writes_s3(s3, bucket, X):
    import dask

    opts = s3.storage_options
    store = sparsestore.save(f"s3://{bucket}/h.zarr", X, chunk_bytes=8192, storage_options=opts)
    D = store.to_dask()
    assert D.numblocks[0] > 3
    with dask.config.set(scheduler="threads"):
        np.testing.assert_allclose(D.sum(axis=0).compute(), X.toarray().sum(0), rtol=1e-5)
        copy = sparsestore.from_dask(f"s3://{bucket}/h2.zarr", D[::2], storage_options=opts)
    assert (copy[:] != X[::2]).nnz == 0


def test_sharded_store_has_few_objects(s3, bucket, X):
    opts = s3.storage_options
    plain = sparsestore.save(f"s3://{bucket}/plain.zarr", X, chunk_bytes=1024,
                             indptr_chunk=4096, storage_options=opts)
    sharded = sparsestore.save(f"s3://{bucket}/sharded.zarr", X, chunk_bytes=1024,
                               shard_bytes=32768, indptr_chunk=4096, storage_options=opts)
    assert (sharded[:] != X).nnz == 0
    n_plain = len(s3.keys(bucket, "plain.zarr/"))
    n_sharded = len(s3.keys(bucket, "sharded.zarr/"))
    per_shard = sharded.arrays["data"].shards[0]
    shards = -(-X.nnz // per_shard)
    # group + 3 array metadata, one object per shard of data and of indices, 1 indptr chunk
    assert n_sharded == 4 + 2 * shards + 1
    assert n_plain == 4 + 2 * -(-X.nnz // plain.arrays["data"].chunks[0]) + 1
    assert shards < plain.arrays["data"].nchunks and n_sharded < n_plain


# ------------------------------------------------------------------ the command line

def test_cli_convert_info_validate_to_and_from_s3(s3, bucket, X, tmp_path, capsys):
    """``sparsestore convert`` into S3 and back out, ``info`` and ``validate`` on the URL,
    options given as JSON (and as @FILE for the source)."""
    import json

    from sparsestore.cli import main

    opts = json.dumps(s3.storage_options)
    npz = tmp_path / "x.npz"
    sp.save_npz(npz, X)
    url = f"s3://{bucket}/cli.zarr"
    assert main(["convert", str(npz), url, "--chunk-bytes", "8192", "-q",
                 "--storage-options", opts]) == 0
    assert (sparsestore.open(url, storage_options=s3.storage_options)[:] != X).nnz == 0
    capsys.readouterr()
    assert main(["info", url, "--json", "--storage-options", opts]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == url and info["shape"] == list(X.shape) and info["nnz"] == X.nnz
    assert main(["validate", url, "-q", "--storage-options", opts]) == 0
    # Out of S3 into a local store, and into another bucket's store, shuffled (the shuffle
    # reads the source store by row, with the source's options).
    (tmp_path / "opts.json").write_text(opts)
    local = tmp_path / "back.zarr"
    assert main(["convert", url, str(local), "-q",
                 "--source-storage-options", f"@{tmp_path / 'opts.json'}"]) == 0
    assert (sparsestore.open(local)[:] != X).nnz == 0
    other = f"s3://{s3.new_bucket()}/shuffled.zarr"
    assert main(["convert", url, other, "--shuffle-rows", "4", "-q",
                 "--storage-options", opts]) == 0
    shuffled = sparsestore.open(other, storage_options=s3.storage_options)
    perm = shuffled.labels["source_row"][:]
    assert (shuffled[:] != X[perm]).nnz == 0
    # A damaged store fails validation (exit 1, the chunk named); a missing one is an error.
    key = sorted(k for k in s3.keys(bucket, "cli.zarr/data/c/"))[0]
    s3.client().delete_object(Bucket=bucket, Key=key)
    capsys.readouterr()
    assert main(["validate", url, "-q", "--storage-options", opts]) == 1
    assert "missing" in capsys.readouterr().err.lower()
    assert main(["info", f"s3://{bucket}/nothing.zarr", "--storage-options", opts]) == 1
    assert "no store at" in capsys.readouterr().err


def test_cli_refuses_bad_storage_options_and_remote_files(s3, bucket, capsys):
    import json

    from sparsestore.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["info", f"s3://{bucket}/x.zarr", "--storage-options", "[1, 2]"])
    assert exc.value.code == 2 and "JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", f"s3://{bucket}/x.zarr", "--storage-options", "{nope"])
    assert "not JSON" in capsys.readouterr().err
    assert main(["convert", f"s3://{bucket}/x.npz", f"s3://{bucket}/y.zarr",
                 "--storage-options", json.dumps(s3.storage_options)]) == 1
    assert "only stores (zarr)" in capsys.readouterr().err


def test_cli_takes_credentials_and_endpoint_from_the_environment(s3, bucket, X, tmp_path):
    """No options at all: s3fs (botocore) reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    and AWS_ENDPOINT_URL; fsspec reads FSSPEC_S3_* as s3fs's keyword arguments."""
    import json

    url = f"s3://{bucket}/env.zarr"
    sparsestore.save(url, X, storage_options=s3.storage_options)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1", "PYTHONWARNINGS": "ignore"}
    for extra in ({"AWS_ENDPOINT_URL": s3.endpoint_url},
                  {"FSSPEC_S3_ENDPOINT_URL": s3.endpoint_url}):
        proc = subprocess.run([sys.executable, "-m", "sparsestore", "info", url, "--json"],
                              capture_output=True, timeout=120,
                              env={**base, **creds, **extra})
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert json.loads(proc.stdout)["nnz"] == X.nnz
    # No credentials anywhere (no instance role either): one line saying what to pass.
    proc = subprocess.run([sys.executable, "-m", "sparsestore", "info", url],
                          capture_output=True, timeout=120,
                          env={**base, "HOME": str(tmp_path), "PYTHONWARNINGS": "ignore",
                               "AWS_EC2_METADATA_DISABLED": "true",
                               "AWS_ENDPOINT_URL": s3.endpoint_url})
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert "no credentials for object storage" in err and "--storage-options" in err, err
