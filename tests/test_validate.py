"""Structural validation: a store edited by hand to break any invariant is reported by
``open`` (cheap O(1) checks) or by ``validate_store`` (deep, streaming), never read as
garbage."""

from __future__ import annotations

import shutil
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import sparsestore
from sparsestore.errors import (
    CorruptStoreError,
    NotAStoreError,
    SparseStoreError,
    StoreNotFoundError,
)
from sparsestore.validate import ValidationReport, validate_store

N, M = 600, 40


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    X = sp.random(N, M, density=0.15, format="csr", dtype=np.float32, random_state=3)
    labels = {"y": np.arange(N, dtype=np.int64)}
    sparsestore.save(root / "s.zarr", X, labels=labels, chunk_bytes=1024, indptr_chunk=64)
    return root / "s.zarr", X


@pytest.fixture
def sealed(base, tmp_path):
    src, X = base
    dst = tmp_path / "t.zarr"
    shutil.copytree(src, dst)
    return dst, X


@pytest.fixture
def copy(sealed):
    """A copy without its chunk manifest, as an older sparsestore wrote it: the structural
    checks below are what stands between such a store (or anndata's) and garbage."""
    path, X = sealed
    meta = dict(group(path).attrs["sparsestore"])
    meta.update(format_version=1)
    for key in ("manifest", "generation"):
        meta.pop(key)
    attrs_edit(path, sparsestore=meta)
    return path, X


def group(path):
    return zarr.open_group(str(path), mode="r+")


def attrs_edit(path, **changes):
    g = group(path)
    g.attrs.update(changes)


def meta_edit(path, **changes):
    g = group(path)
    meta = dict(g.attrs["sparsestore"])
    meta.update(changes)
    g.attrs["sparsestore"] = meta


def assert_reported(path, *fragments):
    """Open refuses it with CorruptStoreError, or validate reports a matching problem."""
    opened = True
    try:
        sparsestore.open(path)
    except CorruptStoreError:
        opened = False
    report = validate_store(path)
    assert not report.ok, "validate passed a broken store"
    text = " | ".join(report.problems)
    for frag in fragments:
        assert frag in text, f"{frag!r} not in {text!r}"
    return opened, report


def test_pristine_store_is_ok(base):
    path, X = base
    report = validate_store(path)
    assert isinstance(report, ValidationReport)
    assert report.ok and bool(report), report.summary()
    assert report.problems == [] and report.checked_chunks > 10
    assert report.shape == (N, M) and report.nnz == X.nnz
    assert "OK" in report.summary()
    report.raise_if_failed()
    shallow = validate_store(sparsestore.open(path), deep=False)
    assert shallow.ok and shallow.checked_chunks == 0


def test_progress_bar_and_callback(base):
    path, _ = base

    class Counter:
        n = 0

        def update(self, k=1):
            self.n += k

    c = Counter()
    report = validate_store(path, progress=c)
    assert report.ok and c.n == report.checked_chunks
    assert validate_store(path, progress=True).ok


def test_non_stores_raise(tmp_path):
    with pytest.raises(StoreNotFoundError):
        validate_store(tmp_path / "missing.zarr")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotAStoreError):
        validate_store(tmp_path / "file.txt")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(NotAStoreError):
        validate_store(tmp_path / "plain.zarr")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(SparseStoreError):
        validate_store(tmp_path / "emptydir")


# ------------------------------------------------------------ cheap checks (open)

@pytest.mark.parametrize(
    "shape, fragment",
    [
        ([N + 5, M], "indptr has"),
        ([N - 1, M], "last commit recorded"),
        ([N], "shape"),
        ("600x40", "shape"),
        ([-1, M], "non-negative"),
        ([True, M], "integer"),
        ([2**62, M], "absurdly large"),
        ([N, "40"], "integer"),
        (None, "shape"),
    ],
)
def test_bad_shape_attr(copy, shape, fragment):
    path, _ = copy
    attrs_edit(path, shape=shape)
    opened, report = assert_reported(path, fragment)
    assert not opened


def test_indptr_first_not_zero(copy):
    path, _ = copy
    g = group(path)
    g["indptr"][0] = 1
    opened, _ = assert_reported(path, "indptr[0]=1")
    assert not opened


def test_indptr_last_not_nnz(copy):
    path, X = copy
    g = group(path)
    g["indptr"][N] = X.nnz - 3
    opened, _ = assert_reported(path, "last commit recorded")
    assert not opened


def test_data_shorter_than_nnz(copy):
    path, X = copy
    group(path)["data"].resize((X.nnz - 10,))
    opened, _ = assert_reported(path, "data holds")
    assert not opened


def test_label_shorter_than_rows(copy):
    path, _ = copy
    group(path)["labels/y"].resize((N - 1,))
    opened, _ = assert_reported(path, "label 'y' has")
    assert not opened


def test_label_listed_but_missing(copy):
    path, _ = copy
    del group(path)["labels"]["y"]
    opened, _ = assert_reported(path, "missing")
    assert not opened


@pytest.mark.parametrize(
    "array, dtype, fragment",
    [("data", "U4", "unsupported dtype"), ("indices", np.float64, "must hold integers"),
     ("indptr", np.float32, "must hold integers"), ("data", np.complex64, "unsupported")],
)
def test_bad_array_dtype(copy, array, dtype, fragment):
    path, X = copy
    g = group(path)
    length = g[array].shape[0]
    del g[array]
    g.create_array(array, shape=(length,), dtype=dtype, chunks=(1024,))
    opened, _ = assert_reported(path, fragment)
    assert not opened


def test_array_with_wrong_rank(copy):
    path, X = copy
    g = group(path)
    del g["data"]
    g.create_array("data", shape=(X.nnz, 1), dtype=np.float32, chunks=(1024, 1))
    opened, _ = assert_reported(path, "1-D")
    assert not opened


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"format": "pickle"}, ""),
        ({"format_version": 99}, "not supported"),
        ({"format_version": "1"}, "format_version"),
        ({"labels": "y"}, "labels"),
        ({"labels": ["../../etc"]}, "label name"),
        ({"labels": [7]}, "label name"),
        ({"layout": {"compressor": "os.system"}}, "unknown compressor"),
        ({"layout": {"__class__": "x"}}, "unknown layout option"),
        ({"layout": "lz4"}, "layout"),
        ({"committed_nnz": -4}, "negative"),
        ({"committed_nnz": "7"}, "committed_nnz"),
        ({"complete": "yes"}, "complete"),
        ({"complete": False}, "incomplete"),
        ({"keep_zeros": 1}, "keep_zeros"),
    ],
)
def test_bad_metadata(copy, changes, fragment):
    path, _ = copy
    meta_edit(path, **changes)
    opened, _ = assert_reported(path, fragment)
    assert not opened


def test_metadata_not_a_mapping(copy):
    path, _ = copy
    attrs_edit(path, sparsestore=["format", "csr"])
    opened, _ = assert_reported(path, "must be a mapping")
    assert not opened


# ----------------------------------------------------------- deep checks (validate)

@pytest.mark.filterwarnings("ignore::sparsestore.errors.UnverifiedStoreWarning")
def test_non_monotone_indptr(copy):
    path, _ = copy
    g = group(path)
    ip = g["indptr"][:]
    ip[300] = ip[302] + 1
    g["indptr"][:] = ip
    opened, report = assert_reported(path, "indptr is not monotone: indptr[301]")
    assert opened  # only the deep pass can see this one


@pytest.mark.filterwarnings("ignore::sparsestore.errors.UnverifiedStoreWarning")
def test_column_index_out_of_range(copy):
    path, X = copy
    g = group(path)
    ind = g["indices"][:]
    pos = int(X.indptr[250]) + 1
    ind[pos] = M + 3
    g["indices"][:] = ind
    assert_reported(path, "row 250: column index 43 is outside [0, 40)")


@pytest.mark.filterwarnings("ignore::sparsestore.errors.UnverifiedStoreWarning")
def test_negative_column_index(copy):
    path, X = copy
    g = group(path)
    ind = g["indices"][:]
    ind[int(X.indptr[10])] = -1
    g["indices"][:] = ind
    assert_reported(path, "row 10: column index -1")


@pytest.mark.filterwarnings("ignore::sparsestore.errors.UnverifiedStoreWarning")
def test_fewer_columns_than_indices(copy):
    path, _ = copy
    attrs_edit(path, shape=[N, M // 2])
    assert_reported(path, "is outside [0, 20)")


@pytest.mark.filterwarnings("ignore::sparsestore.errors.UnverifiedStoreWarning")
@pytest.mark.parametrize("how", ["swap", "duplicate"])
def test_unsorted_or_duplicate_indices(copy, how):
    path, X = copy
    row = next(i for i in range(400, N) if X.indptr[i + 1] - X.indptr[i] >= 3)
    p = int(X.indptr[row])
    g = group(path)
    ind = g["indices"][:]
    if how == "swap":
        ind[p], ind[p + 1] = ind[p + 1], ind[p]
    else:
        ind[p + 1] = ind[p]
    g["indices"][:] = ind
    assert_reported(path, f"row {row}: column indices are not strictly increasing")


def test_row_boundaries_are_not_order_violations(tmp_path):
    """Indices restart at each row: descending across rows is fine (no false positive)."""
    X = sp.csr_matrix(np.triu(np.ones((300, 300), dtype=np.float32))[::-1])
    sparsestore.save(tmp_path / "t.zarr", X, chunk_bytes=1024, indptr_chunk=16)
    report = validate_store(tmp_path / "t.zarr")
    assert report.ok, report.summary()


@pytest.mark.filterwarnings("ignore::sparsestore.errors.UnverifiedStoreWarning")
def test_missing_data_chunk_is_reported(copy):
    """zarr reads a deleted chunk as zeros; a store without keep_zeros has no zeros."""
    path, _ = copy
    (path / "data" / "c" / "2").unlink()
    assert_reported(path, "chunk 2 of 'data' is missing")


@pytest.mark.filterwarnings("ignore::sparsestore.errors.UnverifiedStoreWarning")
@pytest.mark.parametrize("fixture", ["copy", "sealed"])
def test_uncommitted_tail_is_not_a_fault(fixture, request):
    """Bytes past the commit (a killed append) are invisible: the store validates clean,
    with or without a manifest (the last chunk's committed rows are still the same)."""
    path, X = request.getfixturevalue(fixture)
    g = group(path)
    for name in ("data", "indices"):
        g[name].resize((X.nnz + 500,))
        g[name][X.nnz :] = 7
    g["indptr"].resize((N + 51,))
    g["indptr"][N + 1 :] = 10**9
    g["labels/y"].resize((N + 50,))
    report = validate_store(path)
    assert report.ok, report.summary()
    store = sparsestore.open(path)
    assert store.shape == (N, M) and (store[:] != X).nnz == 0


def test_dense_store(tmp_path):
    D = np.arange(300 * 7, dtype=np.float64).reshape(300, 7)
    sparsestore.save(tmp_path / "d.zarr", D, sparse=False, dense_chunk_bytes=1024)
    assert validate_store(tmp_path / "d.zarr").ok
    attrs_edit(tmp_path / "d.zarr", shape=[300, 8])
    opened, _ = assert_reported(tmp_path / "d.zarr", "X has shape")
    assert not opened


def test_anndata_written_store_validates(tmp_path):
    ad = pytest.importorskip("anndata")
    X = sp.random(200, 30, density=0.2, format="csr", dtype=np.float32, random_state=1)
    g = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    ad.io.write_elem(g, "X", X)
    report = validate_store(tmp_path / "a.zarr" / "X")
    assert report.ok, report.summary()


def test_validate_memory_is_flat_as_the_store_grows(tmp_path):
    """The deep pass streams: peak memory is a few chunks, the same for a 4x larger store."""
    peaks, raws = [], []
    for n in (10_000, 40_000):
        X = sp.random(n, 500, density=0.02, format="csr", dtype=np.float32, random_state=2)
        path = tmp_path / f"s{n}.zarr"
        sparsestore.save(path, X, chunk_bytes=16384, indptr_chunk=4096)
        validate_store(path, deep=False)  # warm imports and caches outside the measurement
        tracemalloc.start()
        try:
            report = validate_store(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert report.ok, report.summary()
        peaks.append(peak)
        raws.append(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)
    assert peaks[1] < 1.3 * peaks[0] + 65536, peaks
    assert peaks[1] < raws[1] / 2, (peaks, raws)
