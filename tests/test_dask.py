"""sparsestore.dask: to_dask queries against scipy, decode-once chunking, from_dask."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsestore
import sparsestore.dask as sdask
from sparsestore.errors import InvalidInputError, ShapeMismatchError, SparseStoreError

pytestmark = pytest.mark.dask


@pytest.fixture(autouse=True)
def _threaded():
    with dask.config.set(scheduler="threads"):
        yield


def dense(x):
    if sp.issparse(x):
        return x.toarray()
    return np.asarray(x)


def check(got, expected, rtol=1e-5):
    """``got`` (dask or computed) equals ``expected`` in value and shape."""
    if isinstance(got, da.Array):
        got = got.compute()
    g, e = dense(got), dense(expected)
    assert g.shape == e.shape
    np.testing.assert_allclose(g, e, rtol=rtol, atol=1e-6)


# The dask queries checked (reductions, indexing, products, elementwise), as (name, dask
# query, oracle on the scipy matrix).
V = np.random.default_rng(0).standard_normal(400)
M = np.random.default_rng(1).standard_normal((400, 3))
W = np.random.default_rng(2).standard_normal((3000, 2))
MASK = np.random.default_rng(3).random(3000) < 0.3
IDX = np.array([5, 1, 2999, 5, 100, 0])


def _np_red(f, axis):
    def oracle(X):
        return f(X.toarray(), axis=axis)

    return oracle


QUERIES = [
    *[(f"sum{ax}", lambda D, a=ax: D.sum(axis=a), _np_red(np.sum, ax)) for ax in (0, 1, None)],
    *[(f"mean{ax}", lambda D, a=ax: D.mean(axis=a), _np_red(np.mean, ax)) for ax in (0, 1, None)],
    *[(f"max{ax}", lambda D, a=ax: D.max(axis=a), _np_red(np.max, ax)) for ax in (0, 1, None)],
    *[(f"min{ax}", lambda D, a=ax: D.min(axis=a), _np_red(np.min, ax)) for ax in (0, 1, None)],
    *[
        (f"count_nonzero{ax}", lambda D, a=ax: da.count_nonzero(D, axis=a),
         lambda X, a=ax: np.count_nonzero(X.toarray(), axis=a))
        for ax in (0, 1, None)
    ],
    ("np.sum", lambda D: np.sum(D, axis=0), lambda X: np.asarray(X.sum(axis=0)).ravel()),
    ("rows_slice", lambda D: D[17:2500], lambda X: X[17:2500]),
    ("rows_step", lambda D: D[3:2900:7], lambda X: X[3:2900:7]),
    ("rows_fancy", lambda D: D[IDX], lambda X: X[IDX]),
    ("rows_mask", lambda D: D[MASK], lambda X: X[MASK]),
    ("cols", lambda D: D[:, [399, 0, 7, 7]], lambda X: X[:, [399, 0, 7, 7]]),
    ("rows_cols", lambda D: D[IDX][:, 10:20], lambda X: X[IDX][:, 10:20]),
    ("matvec", lambda D: D @ V, lambda X: X @ V),
    ("matmat", lambda D: D @ M, lambda X: X @ M),
    ("T@dense", lambda D: D.T @ W, lambda X: X.T @ W),
    ("da.dot", lambda D: da.dot(D, M), lambda X: X @ M),
    ("log1p_abs", lambda D: np.log1p(abs(D)), lambda X: abs(X).log1p()),
    ("scale", lambda D: D * 2.5 / 5, lambda X: X * 0.5),
    ("astype", lambda D: D.astype(np.float64).sum(axis=1), lambda X: X.toarray().sum(axis=1)),
    ("map_blocks_dense", lambda D: D.map_blocks(lambda b: b.toarray(), meta=np.empty((0, 0))),
     lambda X: X.toarray()),
    ("selected_colsum", lambda D: D[MASK].sum(axis=0), lambda X: X[MASK].toarray().sum(0)),
    ("rechunked_rowsum", lambda D: D.rechunk((700, 400)).sum(axis=1),
     lambda X: X.toarray().sum(1)),
    ("var0", lambda D: D.var(axis=0), lambda X: X.toarray().var(axis=0)),
]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """A 3000 x 400 CSR with empty rows and a few long rows, in 16 KiB chunks."""
    rng = np.random.default_rng(7)
    X = sp.random(3000, 400, density=0.05, format="lil", dtype=np.float32, random_state=rng)
    X[100:120] = 0
    X[500, :] = rng.random(400) + 1  # full rows straddle chunk boundaries
    X[501, :] = -rng.random(400) - 1
    X = sp.csr_matrix(X)
    store = sparsestore.save(tmp_path_factory.mktemp("dask") / "s.zarr", X, chunk_bytes=16384)
    return store, X


@pytest.mark.parametrize("name,query,oracle", QUERIES, ids=[q[0] for q in QUERIES])
def test_queries_match_scipy(shared_store, name, query, oracle):
    store, X = shared_store
    D = store.to_dask()
    assert D.numblocks[0] > 5  # really several chunks
    check(query(D), oracle(X), rtol=1e-4)


def test_compute_gives_scipy_csr_and_keeps_scipy_semantics(shared_store):
    store, X = shared_store
    D = store.to_dask()
    assert isinstance(D._meta, sp.csr_matrix)
    out = D.compute()
    assert isinstance(out, sp.csr_matrix) and out.has_sorted_indices
    assert (out != X).nnz == 0
    # Without numpy keywords a block is an ordinary scipy matrix ...
    assert isinstance(out.sum(axis=0), np.matrix)
    np.testing.assert_allclose(out.max(axis=1).toarray(), X.max(axis=1).toarray())
    # ... with them it answers like numpy.
    r = np.sum(out, axis=0, keepdims=True)
    assert type(r) is np.ndarray and r.shape == (1, 400)
    assert out.size == 3000 * 400 and out.nnz == X.nnz
    assert isinstance(out.T, sdask.CSCBlock)
    assert out[:10].getnnz() == X[:10].getnnz()
    dense_first = np.ones((2, 3000)) @ out
    np.testing.assert_allclose(dense_first, np.ones((2, 3000)) @ X.toarray(), rtol=1e-5)


def test_blocks_follow_data_chunks_and_decode_each_chunk_once(shared_store, monkeypatch):
    store, X = shared_store
    reads = []
    orig = sdask._Chunks.read

    def spy(self, k, lo, hi, room=0):
        reads.append((self.name, lo, hi))
        return orig(self, k, lo, hi, room)

    monkeypatch.setattr(sdask._Chunks, "read", spy)
    D = store.to_dask()
    reads.clear()  # planning reads indptr only; count the computation
    with dask.config.set(scheduler="sync"):
        np.testing.assert_allclose(D.sum(axis=0).compute(), X.toarray().sum(0), rtol=1e-4)
    # One block per data chunk holding a row start: block j's rows start in chunk j.
    c = store.arrays["data"].chunks[0]
    bounds = np.r_[0, np.cumsum(D.chunks[0])]
    first_chunk = X.indptr[bounds[:-1]] // c
    assert len(set(first_chunk.tolist())) == len(first_chunk)
    # Every read is one whole storage chunk (or the committed tail), and no chunk twice.
    for arr in ("data", "indices", "indptr"):
        mine = sorted((lo, hi) for n, lo, hi in reads if n == arr)
        chunk = store.arrays[arr].chunks[0]
        limit = X.nnz if arr != "indptr" else X.shape[0] + 1
        assert [lo for lo, _ in mine] == list(range(0, limit, chunk))
        assert all(hi == min(lo + chunk, limit) for lo, hi in mine)
    assert not [n for n, _, _ in reads if n not in ("data", "indices", "indptr")]


LAYOUTS = {
    "default": {},  # blosc + crc32c: decoded by sparsestore.dask itself
    "sharded": {"shard_bytes": 65536},  # through zarr
    "raw": {"compressor": "none", "checksum": False},
    "zstd_nocrc": {"compressor": "zstd", "checksum": False},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_decodes_each_chunk_once(tmp_path, layout, monkeypatch):
    rng = np.random.default_rng(3)
    X = sp.random(2500, 300, density=0.04, format="csr", dtype=np.float64, random_state=rng)
    store = sparsestore.save(tmp_path / "l.zarr", X, chunk_bytes=4096, **LAYOUTS[layout])
    direct = sdask._Chunks(store.arrays["data"], "data").direct
    assert (direct is None) == (layout == "sharded")
    reads = []
    orig = sdask._Chunks.read

    def spy(self, k, lo, hi, room=0):
        reads.append((self.name, k))
        return orig(self, k, lo, hi, room)

    monkeypatch.setattr(sdask._Chunks, "read", spy)
    for chunk_rows in (None, 7, 1000):
        D = store.to_dask(chunk_rows=chunk_rows)
        reads.clear()
        out, colsum, rowmax = dask.compute(D, D.sum(axis=0), D.max(axis=1))
        assert (out != X).nnz == 0 and out.has_sorted_indices
        np.testing.assert_allclose(colsum, X.toarray().sum(0), rtol=1e-12)
        np.testing.assert_array_equal(rowmax, X.toarray().max(1))
        for arr in ("data", "indices"):
            ks = sorted(k for n, k in reads if n == arr)
            assert ks == list(range(store.arrays[arr].nchunks)), (arr, chunk_rows)


def test_each_block_needs_one_whole_chunk_and_a_head(shared_store):
    """One task decodes data+indices of a chunk; a block depends on its own chunk, the
    small head of the next one (all a cluster moves between workers) and indptr."""
    store, X = shared_store
    D = store.to_dask()
    c = store.arrays["data"].chunks[0]
    ends = X.indptr[np.cumsum(D.chunks[0])]
    deps = D.__dask_graph__().get_all_dependencies()
    blocks = [k for k in deps if k[0] == D.name]
    assert len(blocks) == D.numblocks[0]
    heads = 0
    for key in blocks:
        i = key[1]
        kinds = sorted((k[0][len(D.name) + 1 :], k[1]) for k in deps[key])
        expected = [("data+indices", i), ("indptr", 0)]
        if ends[i] > (i + 1) * c and i + 1 < len(blocks):  # its last row straddles
            expected.insert(1, ("data+indices-head", i + 1))
            heads += 1
        assert kinds == expected
    assert heads >= len(blocks) // 2


def test_blocks_are_independent_buffers(shared_store):
    """Blocks share decoded chunks only read-only: writing into one leaves the rest alone."""
    store, X = shared_store
    D = store.to_dask()
    bounds = np.r_[0, np.cumsum(D.chunks[0])]
    blocks = dask.compute(*D.to_delayed().ravel())
    for b in blocks[::2]:
        b.data[:] = -1
        b.indices[:] = 0
    for i in range(1, len(blocks), 2):  # neighbours of the blocks written to
        assert (blocks[i] != X[bounds[i] : bounds[i + 1]]).nnz == 0
    assert (D.compute() != X).nnz == 0  # nothing is kept between computations


def test_missing_chunk_raises_not_zeros(tmp_path):
    from sparsestore.errors import MissingChunkError

    X = sp.random(2000, 50, density=0.1, format="csr", dtype=np.float32, random_state=1)
    sparsestore.save(tmp_path / "m.zarr", X, chunk_bytes=4096)
    (tmp_path / "m.zarr" / "data" / "c" / "2").unlink()
    store = sparsestore.open(tmp_path / "m.zarr")
    with pytest.raises(MissingChunkError, match="chunk 2 of array 'data'"):
        store.to_dask().compute()


def test_damaged_chunks_raise(tmp_path):
    from sparsestore.errors import ChecksumError, CorruptStoreError

    X = sp.random(2000, 50, density=0.1, format="csr", dtype=np.float32, random_state=1)
    for opts, exc, match in (({}, ChecksumError, r"array 'indices', chunk 1\b"),
                             ({"checksum": False}, CorruptStoreError,
                              "chunk 1 of array 'indices'")):
        path = tmp_path / f"d{len(opts)}.zarr"
        sparsestore.save(path, X, chunk_bytes=4096, **opts)
        victim = path / "indices" / "c" / "1"
        raw = victim.read_bytes()
        victim.write_bytes(raw[: len(raw) // 2])  # truncated
        with pytest.raises(exc, match=match):
            sparsestore.open(path).to_dask().sum(axis=0).compute()


def test_chunk_rows_override(shared_store):
    store, X = shared_store
    D = store.to_dask(chunk_rows=333)
    assert D.chunks[0] == (333,) * 9 + (3,)
    check(D.sum(axis=0), X.toarray().sum(0), rtol=1e-4)
    check(D, X)
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(InvalidInputError, match="chunk_rows"):
            store.to_dask(chunk_rows=bad)


def test_graph_carries_the_path_not_the_data(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {}
    for n in (2000, 20000):
        X = sp.random(n, 300, density=0.02, format="csr", dtype=np.float32, random_state=rng)
        store = sparsestore.save(tmp_path / f"{n}.zarr", X, chunk_bytes=2**16)
        D = store.to_dask()
        graph = dict(D.__dask_graph__())
        nbytes = len(pickle.dumps(graph))
        sizes[n] = nbytes / len(graph)
        assert nbytes < 2000 * len(graph)  # ~ a path and a few ints per task
        assert nbytes < X.data.nbytes
    # Bytes per task do not grow with the data.
    assert sizes[20000] < 1.5 * sizes[2000]


def test_dense_and_empty_stores(tmp_path):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((500, 30)).astype(np.float32)
    st = sparsestore.save(tmp_path / "d.zarr", A, sparse=False, dense_chunk_bytes=4096)
    D = st.to_dask()
    assert isinstance(D._meta, np.ndarray) and D.numblocks[0] > 5
    check(D, A)
    check(D.mean(axis=0), A.mean(axis=0))
    check(D @ M[:30], A @ M[:30], rtol=1e-4)
    empty = sparsestore.create(tmp_path / "e.zarr", n_cols=7, dtype=np.float64)
    E = empty.to_dask()
    assert E.shape == (0, 7)
    out = E.compute()
    assert sp.issparse(out) and out.shape == (0, 7)
    check(E.sum(axis=0), np.zeros(7))


def test_to_dask_accepts_a_path(shared_store):
    store, X = shared_store
    D = sdask.to_dask(store.path)
    check(D.sum(axis=1), X.toarray().sum(1), rtol=1e-4)


def test_as_blocks_makes_plain_scipy_chunks_reducible():
    X = sp.random(200, 30, density=0.1, format="csr", dtype=np.float64, random_state=0)
    plain = da.from_array(X, chunks=(37, 30), asarray=False)
    with pytest.raises(TypeError):  # what dask does with scipy chunks out of the box
        plain.sum(axis=0).compute()
    check(sdask.as_blocks(plain).sum(axis=0), X.toarray().sum(0))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(0, 120),
    m=st.integers(1, 40),
    density=st.floats(0, 0.6),
    chunk_rows=st.one_of(st.none(), st.integers(1, 50)),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float32, np.float64, np.int32]),
)
def test_roundtrip_property(tmp_path_factory, n, m, density, chunk_rows, seed, dtype):
    rng = np.random.default_rng(seed)
    X = sp.random(n, m, density=density, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 9, k)).astype(dtype)
    path = tmp_path_factory.mktemp("prop") / "p.zarr"
    store = sparsestore.save(path, X, chunk_bytes=1024, indptr_chunk=16)
    D = store.to_dask(chunk_rows=chunk_rows)
    assert D.shape == X.shape and D.dtype == X.dtype
    out = D.compute()
    assert (out != X).nnz == 0
    if n:
        np.testing.assert_array_equal(D.sum(axis=0).compute(), X.toarray().sum(0))
        np.testing.assert_array_equal(D.max(axis=1).compute(), X.toarray().max(1))
    # and back through from_dask
    back = sparsestore.from_dask(path.with_name("back.zarr"), D, chunk_bytes=1024)
    assert back.shape == X.shape and (back[:] != X).nnz == 0


# ------------------------------------------------------------------ from_dask

def test_from_dask_dense_chunks_with_labels(tmp_path, small_csr):
    A = small_csr.toarray()
    darr = da.from_array(A, chunks=(700, 150))  # several column chunks too
    y = np.arange(A.shape[0])
    z = da.from_array(np.stack([y, -y], 1).astype(np.float32), chunks=(400, 2))
    st = sparsestore.from_dask(tmp_path / "x.zarr", darr, labels={"y": y, "z": z},
                               window=2, chunk_bytes=16384)
    assert (st[:] != small_csr).nnz == 0
    assert list(st.labels) == ["y", "z"]
    np.testing.assert_array_equal(st.labels["y"][:], y)
    np.testing.assert_array_equal(st.labels["z"][:], np.stack([y, -y], 1))
    st2 = sparsestore.from_dask(tmp_path / "dense.zarr", darr, sparse=False)
    assert st2.is_dense
    np.testing.assert_array_equal(st2[:], A)


def test_from_dask_sparse_chunks_and_store_copy(tmp_path, small_store):
    store, X, _ = small_store
    plain = da.from_array(X, chunks=(450, 400), asarray=False)
    st = sparsestore.from_dask(tmp_path / "a.zarr", plain)
    assert (st[:] != X).nnz == 0
    copy = sparsestore.from_dask(tmp_path / "b.zarr", store.to_dask())
    assert (copy[:] != X).nnz == 0 and copy.dtype == X.dtype
    with pytest.raises(SparseStoreError):
        sparsestore.from_dask(tmp_path / "b.zarr", store.to_dask())  # exists
    again = sparsestore.from_dask(tmp_path / "b.zarr", store.to_dask()[:10], overwrite=True)
    assert again.shape == (10, 400)


def _explode(block, block_info=None):
    if block_info is not None and block_info[0]["chunk-location"][0] == 3:
        raise RuntimeError("boom in block 3")
    return block


def test_from_dask_is_atomic(tmp_path, small_csr):
    darr = da.from_array(small_csr.toarray(), chunks=(300, 400))
    darr = darr.map_blocks(_explode, dtype=np.float32)
    path = tmp_path / "never.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        sparsestore.from_dask(path, darr, window=2)
    assert not path.exists()
    assert not list(tmp_path.iterdir())  # no staging leftovers either


def test_from_dask_bad_input(tmp_path, small_csr):
    darr = da.from_array(small_csr.toarray(), chunks=(1000, 400))
    with pytest.raises(InvalidInputError, match="dask.array"):
        sparsestore.from_dask(tmp_path / "a.zarr", small_csr)
    with pytest.raises(InvalidInputError, match="2-D"):
        sparsestore.from_dask(tmp_path / "a.zarr", da.ones(5))
    with pytest.raises(ShapeMismatchError, match="label 'y'"):
        sparsestore.from_dask(tmp_path / "a.zarr", darr, labels={"y": np.arange(5)})
    with pytest.raises(InvalidInputError, match="window"):
        sparsestore.from_dask(tmp_path / "a.zarr", darr, window=0)
    assert not (tmp_path / "a.zarr").exists()


def test_from_dask_unknown_row_chunks(tmp_path, small_csr):
    darr = da.from_array(small_csr.toarray(), chunks=(1000, 400))
    filtered = darr[darr.sum(axis=1) > 0]  # unknown chunk sizes
    assert np.isnan(filtered.shape[0])
    keep = np.asarray(small_csr.sum(axis=1)).ravel() > 0
    st = sparsestore.from_dask(tmp_path / "f.zarr", filtered)
    assert (st[:] != small_csr[keep]).nnz == 0


# ------------------------------------------------------------------ the example

def test_dask_session_example(tmp_path):
    pytest.importorskip("tensorflow")
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "examples"))
    try:
        import dask_session
    finally:
        sys.path.remove(str(root / "examples"))
    path = tmp_path / "session.zarr"
    store = dask_session.synthetic_store(str(path))
    res = dask_session.main(["--store", str(path), "--batch-size", "128"])
    X = store[:]
    np.testing.assert_allclose(res["means"], X.toarray().mean(0), rtol=1e-4)
    counts = X.getnnz(axis=0)
    np.testing.assert_array_equal(res["counts"], counts)
    assert set(res["top10"].tolist()) == set(np.argsort(-counts, kind="stable")[:10].tolist())
    mask = store.labels["group"][:] == 1
    np.testing.assert_array_equal(res["mask"], mask)
    np.testing.assert_allclose(res["selected_sums"], X[mask].toarray().sum(1), rtol=1e-4)
    assert res["batches"] == -(-int(mask.sum()) // 128)
    assert np.isfinite(res["loss"])
