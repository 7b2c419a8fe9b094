"""sparsestore.dask on a real dask.distributed cluster (2 worker processes, 1 thread each)."""

from __future__ import annotations

import os
import pickle

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp

import sparsestore

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.dask, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
        silence_logs=40,
    ) as cluster, distributed.Client(cluster, set_as_default=True) as c:
        yield c


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    rng = np.random.default_rng(11)
    X = sp.random(4000, 300, density=0.04, format="csr", dtype=np.float32, random_state=rng)
    y = rng.integers(0, 3, X.shape[0])
    path = tmp_path_factory.mktemp("dist") / "s.zarr"
    store = sparsestore.save(path, X, labels={"y": y}, chunk_bytes=16384)
    return store, X, y


def _opened_here() -> list[tuple[int, str]]:
    """Runs on each worker: the store paths this process opened for dask tasks."""
    import os as _os

    import sparsestore.dask as sd

    return [(_os.getpid(), key[0]) for key in sd._OPEN]


def test_queries_on_cluster_match_scipy(client, shared):
    store, X, y = shared
    A = X.toarray()
    D = store.to_dask()
    assert D.numblocks[0] >= 8
    v = np.linspace(-1, 1, 300)
    W = np.ones((4000, 2))
    mask = y == 1
    idx = np.array([3999, 0, 17, 17, 2500])
    lazy = {
        "sum0": D.sum(axis=0), "sum1": D.sum(axis=1), "sum": D.sum(),
        "mean0": D.mean(axis=0), "mean1": D.mean(axis=1),
        "max0": D.max(axis=0), "min1": D.min(axis=1), "max": D.max(),
        "nnz0": da.count_nonzero(D, axis=0), "nnz1": da.count_nonzero(D, axis=1),
        "matvec": D @ v, "T@": D.T @ W,
        "mask_colsum": D[mask].sum(axis=0),
    }
    expected = {
        "sum0": A.sum(0), "sum1": A.sum(1), "sum": A.sum(),
        "mean0": A.mean(0), "mean1": A.mean(1),
        "max0": A.max(0), "min1": A.min(1), "max": A.max(),
        "nnz0": np.count_nonzero(A, 0), "nnz1": np.count_nonzero(A, 1),
        "matvec": A @ v, "T@": A.T @ W,
        "mask_colsum": A[mask].sum(0),
    }
    got = dict(zip(lazy, client.compute(list(lazy.values()), sync=True), strict=True))
    for k, e in expected.items():
        np.testing.assert_allclose(np.asarray(got[k]), e, rtol=1e-4, atol=1e-6, err_msg=k)
    rows = client.compute(D[idx][:, 5:50], sync=True)
    assert isinstance(rows, sp.csr_matrix)
    np.testing.assert_array_equal(rows.toarray(), A[idx][:, 5:50])
    whole = client.compute(D, sync=True)
    assert isinstance(whole, sp.csr_matrix) and (whole != X).nnz == 0


def test_workers_open_the_store_from_its_path(client, shared):
    store, X, _ = shared
    D = store.to_dask()
    # The graph ships a path and offsets, never matrix data.
    graph = dict(D.__dask_graph__())
    assert len(pickle.dumps(graph)) < X.data.nbytes / 4
    assert len(pickle.dumps(graph)) < 1500 * len(graph)
    client.run(lambda: __import__("sparsestore.dask").dask._OPEN.clear())
    np.testing.assert_allclose(
        D.sum(axis=0).compute(), X.toarray().sum(0), rtol=1e-4
    )
    opened = [entry for entries in client.run(_opened_here).values() for entry in entries]
    assert opened, "no worker opened the store"
    assert {path for _, path in opened} == {store.path}
    assert os.getpid() not in {pid for pid, _ in opened}


def test_from_dask_on_cluster(client, shared, tmp_path):
    store, X, y = shared
    A = X.toarray()
    darr = da.from_array(A, chunks=(500, 100))
    labels = {"y": da.from_array(y, chunks=700), "row": np.arange(4000)}
    out = sparsestore.from_dask(tmp_path / "fd.zarr", darr, labels=labels, window=3,
                                chunk_bytes=16384)
    assert (out[:] != X).nnz == 0
    np.testing.assert_array_equal(out.labels["y"][:], y)
    np.testing.assert_array_equal(out.labels["row"][:], np.arange(4000))
    # store -> dask -> store, all on the workers
    copy = sparsestore.from_dask(tmp_path / "copy.zarr", store.to_dask()[::2])
    assert (copy[:] != X[::2]).nnz == 0


def test_npz_convert_with_the_cluster_executor(client, tmp_path):
    rng = np.random.default_rng(5)
    parts = [
        sp.random(300 + 50 * i, 120, density=0.05, format="csr", dtype=np.float32,
                  random_state=rng)
        for i in range(5)
    ]
    paths = []
    for i, p in enumerate(parts):
        paths.append(str(tmp_path / f"shard{i}.npz"))
        sp.save_npz(paths[-1], p)
    with client.get_executor() as ex:
        store = sparsestore.convert(paths, str(tmp_path / "conv.zarr"), executor=ex)
    expected = sp.vstack(parts, format="csr")
    assert store.shape == expected.shape
    assert (store[:] != expected).nnz == 0
