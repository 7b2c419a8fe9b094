"""The store against scipy as the oracle: round-trips, slicing, labels, append, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import sparsestore
from sparsestore import errors

DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
          np.uint64, np.float32, np.float64]


def canonical(X) -> sp.csr_matrix:
    """scipy's own canonical form: the oracle every store read is compared with."""
    m = sp.csr_matrix(X, copy=True)
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


def assert_csr_equal(got, want) -> None:
    assert isinstance(got, sp.csr_matrix)
    want = canonical(want)
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    assert got.has_canonical_format
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)


@st.composite
def coo_inputs(draw):
    """Random COO triplets: any shape incl. 0 rows/cols, duplicates, unsorted, zeros."""
    n_rows = draw(st.integers(0, 40))
    n_cols = draw(st.integers(0, 30))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    nnz = draw(st.integers(0, 200)) if n_rows and n_cols else 0
    rows = np.asarray(draw(st.lists(st.integers(0, max(0, n_rows - 1)), min_size=nnz,
                                    max_size=nnz)), dtype=np.int64)
    cols = np.asarray(draw(st.lists(st.integers(0, max(0, n_cols - 1)), min_size=nnz,
                                    max_size=nnz)), dtype=np.int64)
    if dtype == np.bool_:
        vals = np.asarray(draw(st.lists(st.booleans(), min_size=nnz, max_size=nnz)), dtype=bool)
    else:
        vals = np.asarray(draw(st.lists(st.integers(0, 3), min_size=nnz, max_size=nnz)),
                          dtype=dtype)
    fmt = draw(st.sampled_from(["csr", "csc", "coo", "lil", "dok", "bsr", "dense"]))
    return sp.coo_matrix((vals, (rows, cols)), shape=(n_rows, n_cols)), fmt


def convert(coo: sp.coo_matrix, fmt: str):
    if fmt == "dense":
        return coo.toarray()
    if fmt == "csr":
        # Deliberately unsorted, with duplicates: a raw CSR straight from the triplets.
        order = np.argsort(coo.row, kind="stable")
        indptr = np.zeros(coo.shape[0] + 1, dtype=np.int64)
        np.add.at(indptr, coo.row[order] + 1, 1)
        return sp.csr_matrix((coo.data[order], coo.col[order], np.cumsum(indptr)),
                             shape=coo.shape)
    return coo.asformat(fmt)


@given(coo_inputs(), st.sampled_from([1024, 4096]))
def test_roundtrip_any_format_matches_scipy(tmp_path_factory, inp, chunk_bytes):
    coo, fmt = inp
    X = convert(coo, fmt)
    path = tmp_path_factory.mktemp("rt") / "s.zarr"
    store = sparsestore.save(path, X, chunk_bytes=chunk_bytes)
    want = canonical(coo.tocsr())
    assert store.shape == coo.shape
    assert store.nnz == want.nnz
    assert store.dtype == coo.dtype
    assert_csr_equal(store[:], want)
    if coo.shape[0]:
        assert_csr_equal(store[coo.shape[0] - 1], want[coo.shape[0] - 1])


def _chunk_bytes(root) -> dict[str, bytes]:
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and "/c/" in p.as_posix()}


@pytest.mark.parametrize("options", [
    {}, {"compressor": "zstd", "clevel": 3}, {"shuffle": "bitshuffle"}, {"checksum": False},
    {"compressor": "none"}, {"dtype": np.float32}, {"dtype": np.int16, "casting": "unsafe"},
])
def test_writer_encodes_chunks_byte_for_byte_as_zarr(tmp_path, monkeypatch, options):
    """The writer's own chunk encoder (ChunkEncoder) stores exactly what zarr would."""
    from sparsestore.chunks import ChunkEncoder

    X = sp.random(3000, 700, density=0.03, format="csr", random_state=5) * 100
    used = []
    real = ChunkEncoder.write

    def counted(self, k, values):
        used.append(k)
        return real(self, k, values)

    monkeypatch.setattr(ChunkEncoder, "write", counted)
    ours = sparsestore.save(tmp_path / "ours.zarr", X, chunk_bytes=4096, **options)
    assert used, "the writer should encode these chunks itself"
    monkeypatch.setattr(ChunkEncoder, "for_array", classmethod(lambda cls, arr: None))
    sparsestore.save(tmp_path / "zarr.zarr", X, chunk_bytes=4096, **options)
    mine, theirs = _chunk_bytes(tmp_path / "ours.zarr"), _chunk_bytes(tmp_path / "zarr.zarr")
    assert len(mine) > 10 and mine.keys() == theirs.keys()
    assert [k for k in mine if mine[k] != theirs[k]] == []
    want = X.astype(options.get("dtype", X.dtype))
    want.eliminate_zeros()
    assert (ours[:] != want).nnz == 0


def test_scipy_sparray_and_memmap(tmp_path, small_csr):
    arr = sp.csr_array(small_csr)
    assert_csr_equal(sparsestore.save(tmp_path / "a", arr)[:], small_csr)
    dense = small_csr[:500].toarray()
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32,
                                   shape=dense.shape)
    mm[:] = dense
    mm.flush()
    ro = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert_csr_equal(sparsestore.save(tmp_path / "m", ro)[:], small_csr[:500])


def test_keep_zeros_keeps_explicit_zeros(tmp_path):
    X = sp.csr_matrix((np.array([0.0, 1.0, 0.0], dtype=np.float32), [0, 1, 2], [0, 3]),
                      shape=(1, 3))
    assert sparsestore.save(tmp_path / "drop", X).nnz == 1
    kept = sparsestore.save(tmp_path / "keep", X, keep_zeros=True)
    assert kept.nnz == 3
    np.testing.assert_array_equal(kept[:].data, [0.0, 1.0, 0.0])


def test_on_disk_layout_is_anndata_csr(small_store):
    store, X, _ = small_store
    attrs = dict(store.group.attrs)
    assert attrs["encoding-type"] == "csr_matrix"
    assert attrs["encoding-version"] == "0.1.0"
    assert attrs["shape"] == list(X.shape)
    arrays = store.arrays
    assert arrays["indptr"].dtype == np.int64
    assert arrays["indices"].dtype == np.int32
    codecs = [type(c).__name__ for c in arrays["data"].compressors]
    assert codecs == ["BloscCodec", "Crc32cCodec"]
    assert arrays["data"].chunks[0] == 16384 // 4
    assert store.group.metadata.zarr_format == 3


@pytest.mark.parametrize(
    "key",
    [
        0, -1, 2999, slice(None), slice(10, 500), slice(10, 500, 7), slice(None, None, -3),
        slice(2990, 5000), slice(500, 10), [5, 5, 0, 2999, -2], np.array([], dtype=int),
        np.arange(0, 3000, 97)[::-1],
    ],
)
def test_row_indexing_matches_scipy(small_store, key):
    store, X, _ = small_store
    want = X[[key]] if isinstance(key, int) else X[key]
    assert_csr_equal(store[key], want)


def test_bool_mask_and_columns(small_store, rng):
    store, X, _ = small_store
    mask = rng.random(X.shape[0]) < 0.3
    assert_csr_equal(store[mask], X[mask])
    rows = rng.integers(0, X.shape[0], 50)
    cols = rng.integers(0, X.shape[1], 30)
    assert_csr_equal(store[rows, cols], X[rows][:, cols])
    assert_csr_equal(store[10:90, 5:300:3], X[10:90, 5:300:3])
    assert_csr_equal(store[:, 7], X[:, [7]])
    colmask = rng.random(X.shape[1]) < 0.5
    assert_csr_equal(store[rows, colmask], X[rows][:, colmask])


def test_fancy_indexing_decodes_each_chunk_once(small_store, monkeypatch):
    """A random selection touching every chunk decodes each chunk once, not per row."""
    store, X, _ = small_store
    calls = []
    import sparsestore.chunks as chunks

    real = chunks.ChunkDecoder.decode_into

    def spy(self, k, out, pool=None):
        calls.append((self.name, k))
        return real(self, k, out, pool)

    monkeypatch.setattr(chunks.ChunkDecoder, "decode_into", spy)
    rows = np.arange(0, X.shape[0], 3)  # every chunk touched
    assert_csr_equal(store[rows], X[rows])
    data_chunks = [k for name, k in calls if name == "data"]
    n_chunks = -(-store.nnz // store.arrays["data"].chunks[0])
    assert sorted(data_chunks) == list(range(n_chunks))


def test_random_rows_hold_one_chunk_per_thread_not_every_chunk_they_touch(tmp_path, rng):
    """A few rows from every chunk: memory is the rows plus a chunk per decoding thread,
    not all the chunks at once."""
    import tracemalloc

    X = sp.random(4000, 2000, density=0.1, format="csr", dtype=np.float32, random_state=rng)
    store = sparsestore.save(tmp_path / "m.zarr", X, chunk_bytes=32 * 1024)
    chunk_bytes = store.arrays["data"].chunks[0] * 4
    n_chunks = -(-X.nnz // store.arrays["data"].chunks[0])
    assert n_chunks >= 90
    indptr_chunk = store.arrays["indptr"].chunks[0] * 8  # read whole, whatever the rows
    rows = np.arange(0, X.shape[0], 97)
    store[rows]  # warm: open caches, codec objects
    tracemalloc.start()
    try:
        got = store[rows]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_csr_equal(got, X[rows])
    assert peak - indptr_chunk < 16 * chunk_bytes < n_chunks * chunk_bytes / 5, peak


def test_labels_roundtrip_and_slicing(small_store, rng):
    store, X, labels = small_store
    assert set(store.labels) == {"y", "w"}
    idx = rng.integers(-X.shape[0], X.shape[0], 100)
    np.testing.assert_array_equal(store.labels["y"][idx], labels["y"][idx])
    np.testing.assert_array_equal(store.labels["w"][5:900:4], labels["w"][5:900:4])
    np.testing.assert_array_equal(np.asarray(store.labels["w"]), labels["w"])
    assert store.labels["y"][7] == 7
    with pytest.raises(errors.LabelError, match="no label named 'nope'"):
        store.labels["nope"]


def test_append_is_visible_and_matches_vstack(tmp_path, rng):
    store = sparsestore.create(tmp_path / "s", n_cols=50, dtype=np.float64, chunk_bytes=2048)
    parts, ys = [], []
    for i in range(5):
        block = sp.random(int(rng.integers(0, 40)), 50, density=0.2, format="coo",
                          random_state=rng)
        y = rng.integers(0, 9, block.shape[0])
        store.append(block, labels={"y": y} if i == 0 or store.labels else None)
        parts.append(block)
        ys.append(y)
    store.close()
    ro = sparsestore.open(tmp_path / "s")
    assert_csr_equal(ro[:], sp.vstack(parts).tocsr())
    np.testing.assert_array_equal(ro.labels["y"][:], np.concatenate(ys))


def test_failed_append_leaves_store_unchanged(tmp_path, small_csr):
    store = sparsestore.save(tmp_path / "s", small_csr[:100], labels={"y": np.arange(100)})
    w = sparsestore.open(tmp_path / "s", mode="r+")
    bad = small_csr[:10].copy()
    bad.indices[0] = 10_000  # out of range, caught while writing
    with pytest.raises(errors.InvalidInputError):
        w.append(bad, labels={"y": np.arange(10)})
    with pytest.raises(errors.ShapeMismatchError):
        w.append(small_csr[:10], labels={"y": np.arange(9)})
    with pytest.raises(errors.LabelError):
        w.append(small_csr[:10])
    with pytest.raises(errors.DTypeError):
        w.append(small_csr[:10].astype(np.float64), labels={"y": np.arange(10)})
    w.close()
    again = sparsestore.open(tmp_path / "s")
    assert_csr_equal(again[:], small_csr[:100])
    assert again.arrays["data"].shape[0] == store.nnz
    np.testing.assert_array_equal(again.labels["y"][:], np.arange(100))


def test_float16_dense_only(tmp_path):
    X = np.eye(4, dtype=np.float16)
    with pytest.raises(errors.DTypeError, match="float16"):
        sparsestore.save(tmp_path / "s", X)
    with pytest.raises(errors.DTypeError, match="float16"):
        sparsestore.create(tmp_path / "c", n_cols=3, dtype=np.float16)
    np.testing.assert_array_equal(sparsestore.save(tmp_path / "d", X, sparse=False)[:], X)
    # float16 input appended to a float32 store is widened exactly.
    w = sparsestore.create(tmp_path / "f", n_cols=4, dtype=np.float32)
    w.append(X)
    assert_csr_equal(w[:], sp.csr_matrix(X.astype(np.float32)))


def test_dense_store(tmp_path, rng):
    X = rng.standard_normal((257, 13)).astype(np.float32)
    store = sparsestore.save(tmp_path / "d", X, sparse=False, labels={"y": np.arange(257)},
                             dense_chunk_bytes=2048)
    assert store.is_dense and store.shape == X.shape
    np.testing.assert_array_equal(store[:], X)
    np.testing.assert_array_equal(store[3:200:5, 2:9], X[3:200:5, 2:9])
    np.testing.assert_array_equal(store[[5, 1, 5]], X[[5, 1, 5]])
    np.testing.assert_array_equal(store[-1], X[[-1]])
    w = sparsestore.open(tmp_path / "d", mode="r+")
    w.append(X[:3], labels={"y": np.arange(3)})
    w.close()
    np.testing.assert_array_equal(sparsestore.open(tmp_path / "d")[:], np.vstack([X, X[:3]]))


def test_anndata_reads_our_store(small_store):
    anndata = pytest.importorskip("anndata")
    import zarr

    store, X, _ = small_store
    ds = anndata.io.sparse_dataset(zarr.open_group(store.path, mode="r"))
    assert ds.shape == X.shape
    assert_csr_equal(sp.csr_matrix(ds.to_memory()), X)
    assert_csr_equal(sp.csr_matrix(ds[10:200]), X[10:200])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_we_read_anndata_written_csr(tmp_path, small_csr, zarr_format):
    anndata = pytest.importorskip("anndata")
    import zarr

    g = zarr.open_group(tmp_path / "ad.zarr", mode="w", zarr_format=zarr_format)
    anndata.io.write_elem(g, "X", small_csr)
    with pytest.warns(errors.UnverifiedStoreWarning, match="not checked"):
        store = sparsestore.open(tmp_path / "ad.zarr" / "X")
    assert store.shape == small_csr.shape
    assert_csr_equal(store[:], small_csr)
    assert_csr_equal(store[[7, 3, 2999]], small_csr[[7, 3, 2999]])
    # A whole AnnData written to zarr opens through its X.
    adata = anndata.AnnData(X=small_csr)
    adata.write_zarr(tmp_path / "full.zarr")
    with pytest.warns(errors.UnverifiedStoreWarning):
        full = sparsestore.open(tmp_path / "full.zarr")
    assert_csr_equal(full[:50], small_csr[:50])


def test_info_and_repr(small_store):
    store, X, _ = small_store
    info = store.info()
    assert info["shape"] == list(X.shape) and info["nnz"] == X.nnz
    assert info["density"] == pytest.approx(X.nnz / (X.shape[0] * X.shape[1]))
    assert info["bytes_stored"] > 0 and info["compression_ratio"] > 0
    assert info["chunks"]["data"] == [4096]
    assert "3000x400" in repr(store) and "labels=['y', 'w']" in repr(store)


def test_save_refuses_existing_and_overwrite_replaces(tmp_path, small_csr):
    sparsestore.save(tmp_path / "s", small_csr[:10])
    with pytest.raises(errors.StoreExistsError, match="overwrite=True"):
        sparsestore.save(tmp_path / "s", small_csr[:20])
    assert sparsestore.open(tmp_path / "s").shape[0] == 10
    sparsestore.save(tmp_path / "s", small_csr[:20], overwrite=True)
    assert sparsestore.open(tmp_path / "s").shape[0] == 20
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_failed_save_leaves_nothing_and_keeps_old(tmp_path, small_csr):
    sparsestore.save(tmp_path / "s", small_csr[:10])

    def blocks():
        yield small_csr[:5], None
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError):
        sparsestore.write_blocks(tmp_path / "s", blocks(), n_cols=400, dtype=np.float32,
                                 overwrite=True)
    with pytest.raises(RuntimeError):
        sparsestore.write_blocks(tmp_path / "new", blocks(), n_cols=400, dtype=np.float32)
    assert sorted(os.listdir(tmp_path)) == ["s"]
    assert_csr_equal(sparsestore.open(tmp_path / "s")[:], small_csr[:10])


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda p: sparsestore.save(p, np.zeros(3)), errors.InvalidInputError, "2-D"),
        (lambda p: sparsestore.save(p, np.zeros((2, 2, 2))), errors.InvalidInputError, "2-D"),
        (lambda p: sparsestore.save(p, np.array([["a"]], dtype=object)), errors.DTypeError,
         "cannot be stored"),
        (lambda p: sparsestore.save(p, np.array([["a"]])), errors.DTypeError, "cannot be stored"),
        (lambda p: sparsestore.save(p, sp.eye(3, dtype=complex)), errors.DTypeError,
         "cannot be stored"),
        (lambda p: sparsestore.save(p, sp.eye(3), labels={"y": [1, 2]}),
         errors.ShapeMismatchError, "one entry per row"),
        (lambda p: sparsestore.save(p, sp.eye(3), labels={"a/b": [1, 2, 3]}),
         errors.LabelError, "not usable"),
        (lambda p: sparsestore.save(p, sp.csr_matrix(
            (np.ones(2), np.array([0, -1]), np.array([0, 2])), shape=(1, 3))),
         errors.InvalidInputError, "negative"),
        (lambda p: sparsestore.save(p, sp.csr_matrix(
            (np.ones(2), np.array([0, 5]), np.array([0, 2])), shape=(1, 3))),
         errors.InvalidInputError, "out of range"),
        (lambda p: sparsestore.create(p, n_cols=-1), errors.InvalidInputError, "non-negative"),
        (lambda p: sparsestore.create(p, n_cols=2**62), errors.UnsafeInputError, "absurd"),
        (lambda p: sparsestore.save(p, sp.eye(3), chunk_bytes=1), errors.InvalidInputError,
         "chunk"),
        (lambda p: sparsestore.save(p, sp.eye(3), bogus=1), errors.InvalidInputError,
         "unknown layout option"),
    ],
)
def test_bad_input_raises_named_error_and_writes_nothing(tmp_path, make, exc, match):
    with pytest.raises(exc, match=match):
        make(tmp_path / "s")
    assert not os.path.exists(tmp_path / "s")
    assert os.listdir(tmp_path) == []


def test_canonical_parts_rejects_bad_indptr():
    from sparsestore.canonical import check_parts

    with pytest.raises(errors.InvalidInputError, match="NaN"):
        check_parts(np.ones(1), np.zeros(1), np.array([0.0, np.nan]), 3)
    with pytest.raises(errors.InvalidInputError, match="monotone"):
        check_parts(np.ones(2), np.zeros(2), np.array([0, 2, 1, 2]), 3)
    with pytest.raises(errors.InvalidInputError, match="start at 0"):
        check_parts(np.ones(1), np.zeros(1), np.array([1, 1]), 3)
    with pytest.raises(errors.InvalidInputError, match="must all be equal"):
        check_parts(np.ones(2), np.zeros(1), np.array([0, 1]), 3)


def test_open_errors(tmp_path, small_csr):
    with pytest.raises(errors.StoreNotFoundError):
        sparsestore.open(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(errors.NotAStoreError):
        sparsestore.open(tmp_path / "file.txt")
    import zarr

    zarr.open_group(tmp_path / "plain", mode="w")
    with pytest.raises(errors.NotAStoreError, match="csr_matrix"):
        sparsestore.open(tmp_path / "plain")
    g = zarr.open_group(tmp_path / "csc", mode="w")
    g.attrs.update({"encoding-type": "csc_matrix", "encoding-version": "0.1.0"})
    with pytest.raises(errors.NotAStoreError, match="csc_matrix"):
        sparsestore.open(tmp_path / "csc")
    store = sparsestore.save(tmp_path / "s", small_csr)
    with pytest.raises(errors.ReadOnlyError):
        store.append(small_csr)
    with pytest.raises(errors.InvalidInputError):
        sparsestore.open(tmp_path / "s", mode="w")
    with pytest.raises(errors.OutOfRangeError):
        store[3000]
    with pytest.raises(IndexError):
        store[[0, -3001]]


def test_second_writer_is_refused(tmp_path, small_csr):
    sparsestore.save(tmp_path / "s", small_csr[:10])
    w = sparsestore.open(tmp_path / "s", mode="r+")
    with pytest.raises(errors.LockError):
        sparsestore.open(tmp_path / "s", mode="r+")
    w.close()
    sparsestore.open(tmp_path / "s", mode="r+").close()


def test_sharded_layout_roundtrip(tmp_path, small_csr):
    store = sparsestore.save(tmp_path / "s", small_csr, chunk_bytes=4096, shard_bytes=65536)
    assert store.arrays["data"].shards == (16384,)
    assert_csr_equal(store[:], small_csr)
    assert_csr_equal(store[::7], small_csr[::7])


def test_zstd_compressor(tmp_path, small_csr):
    store = sparsestore.save(tmp_path / "s", small_csr, compressor="zstd", clevel=3)
    assert store.arrays["data"].compressors[0].cname.value == "zstd"
    assert_csr_equal(store[:], small_csr)


def test_a_rollback_waits_for_its_own_writes_and_drops_their_stragglers(tmp_path):
    """zarr leaves a failed call's other writes running: the rollback settles that call's
    WriteBatch, after which a write of it that had not started yet is dropped, while
    writes of no batch (the rollback's own, another store's) go through."""
    import asyncio
    import contextvars

    from sparsestore import storage
    from sparsestore.zarr_compat import buffer_class, key_exists

    vs = storage.zarr_store(str(tmp_path / "x"), read_only=False)
    buf = buffer_class().from_bytes(b"chunk")
    batch = storage.WriteBatch()
    with batch.open():
        failed_call = contextvars.copy_context()  # what zarr's tasks for the call inherit
    failed_call.run(asyncio.run, vs.set("early", buf))
    batch.settle(timeout=5)
    failed_call.run(asyncio.run, vs.set("straggler", buf))
    asyncio.run(vs.set("rollback", buf))
    assert storage.current_batch() is None
    assert [key_exists(vs, k) for k in ("early", "straggler", "rollback")] == [
        True, False, True]
