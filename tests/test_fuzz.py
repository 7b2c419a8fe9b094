"""Fuzzing save/append with malformed input: every case either round-trips exactly (against
scipy's own canonicalisation) or raises a SparseStoreError, leaving nothing half-written."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sparsestore
from sparsestore.errors import SparseStoreError

FUZZ = settings(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

def _cast(values: list, dtype: str) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if dtype == "object":
            return np.array(values + [None], dtype=object)[: len(values)]
        if dtype == "U1":
            return np.array([str(v)[:1] for v in values], dtype="U1")
        if np.dtype(dtype).kind in "iub":
            return np.nan_to_num(np.array(values, dtype=np.float64)).astype(dtype)
        return np.array(values, dtype=np.float64).astype(dtype)


MUTATIONS = [
    "indptr_nonmono", "indptr_start", "indptr_end", "indptr_short", "indptr_long",
    "indptr_float", "indptr_nan", "indptr_empty", "indices_neg", "indices_big",
    "indices_len", "indices_float", "indices_bool", "indices_object", "data_len",
    "data_dtype", "data_2d", "indices_2d", "indptr_2d",
]


@st.composite
def raw_parts(draw):
    """Valid CSR parts (unsorted, duplicated, zeros, NaN allowed), with 0-2 faults added."""
    n_rows, n_cols = draw(st.integers(0, 5)), draw(st.integers(1, 6))
    nnz = draw(st.integers(0, 10)) if n_rows else 0
    cuts = sorted(draw(st.lists(st.integers(0, nnz), min_size=max(0, n_rows - 1),
                                max_size=max(0, n_rows - 1))))
    indptr = np.array([0, *cuts, nnz] if n_rows else [0], dtype=draw(
        st.sampled_from(["int64", "int32"])))
    indices = np.array(draw(st.lists(st.integers(0, n_cols - 1), min_size=nnz, max_size=nnz)),
                       dtype=draw(st.sampled_from(["int32", "int64", "uint16"])))
    vals = draw(st.lists(st.one_of(st.floats(-5, 5, width=32), st.sampled_from(
        [0.0, np.nan, np.inf, -np.inf, 1e30])), min_size=nnz, max_size=nnz))
    data = _cast(vals, draw(st.sampled_from(["float32", "float64", "int32", "int64", "bool"])))
    for fault in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        event(f"fault: {fault}")
        if fault == "indptr_nonmono" and indptr.ndim == 1 and indptr.size > 2:
            indptr = indptr.copy()
            indptr[1] = indptr[-1] + 1
        elif fault == "indptr_start":
            indptr = indptr + draw(st.integers(1, 3))
        elif fault == "indptr_end" and indptr.ndim == 1 and indptr.size:  # not emptied/2-D
            indptr = indptr.copy()
            indptr[-1] += draw(st.sampled_from([-1, 1, 5]))
        elif fault == "indptr_short":
            indptr = indptr[:-1]
        elif fault == "indptr_long" and indptr.ndim == 1 and indptr.size:
            indptr = np.append(indptr, indptr[-1])
        elif fault == "indptr_float":
            indptr = indptr.astype(np.float64) + draw(st.sampled_from([0.0, 0.5]))
        elif fault == "indptr_nan" and indptr.ndim == 1 and indptr.size:
            indptr = indptr.astype(np.float64)
            indptr[-1] = np.nan
        elif fault == "indptr_empty":
            indptr = indptr[:0]
        elif fault == "indices_neg" and indices.size:
            indices = indices.astype(np.int64)
            indices[draw(st.integers(0, indices.size - 1))] = -1
        elif fault == "indices_big" and indices.size:
            indices = indices.astype(np.int64)
            indices[draw(st.integers(0, indices.size - 1))] = n_cols + draw(
                st.sampled_from([0, 1, 2**40]))
        elif fault == "indices_len":
            indices = np.append(indices, indices[:1]) if draw(st.booleans()) else indices[1:]
        elif fault == "indices_float":
            indices = indices.astype(np.float64)
        elif fault == "indices_bool":
            indices = indices.astype(bool)
        elif fault == "indices_object":
            indices = indices.astype(object)
        elif fault == "data_len":
            data = np.append(data, data[:1]) if draw(st.booleans()) else data[1:]
        elif fault == "data_dtype" and data.dtype.kind in "biuf":  # not twice: "-" is no float
            data = _cast(data.astype(np.float64).tolist(), draw(st.sampled_from(
                ["float16", "complex64", "object", "U1"])))
        elif fault == "data_2d":
            data = data.reshape(1, -1)
        elif fault == "indices_2d":
            indices = indices.reshape(-1, 1)
        elif fault == "indptr_2d":
            indptr = indptr.reshape(1, -1)
    return data, indices, indptr, (n_rows, n_cols)


def raw_csr(data, indices, indptr, shape) -> sp.csr_matrix:
    """A scipy CSR holding the parts as given, bypassing scipy's checks."""
    m = sp.csr_matrix(shape, dtype=np.float64)
    m.data, m.indices, m.indptr = data, indices, indptr
    return m


def oracle(data, indices, indptr, shape, store_dtype=None):
    """scipy's canonical form of the parts (values first cast to the store's dtype, as an
    append does), or None when scipy itself rejects them."""
    try:
        if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
            return None
        if data.dtype.kind not in "biuf" or (store_dtype is None and data.dtype == np.float16):
            return None
        values = data.astype(store_dtype) if store_dtype is not None else data.copy()
        m = sp.csr_matrix((values, indices.astype(np.int64), indptr.astype(np.int64)),
                          shape=shape)
        m.check_format(full_check=True)
        m.sum_duplicates()
        m.eliminate_zeros()
        return m
    except Exception:
        return None


def assert_same(got: sp.csr_matrix, want: sp.csr_matrix) -> None:
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data.astype(want.data.dtype), want.data)


def nothing_at(path: Path) -> None:
    assert not path.exists()
    strays = [p for p in os.listdir(path.parent) if p.startswith(f".{path.name}.")]
    assert strays == []


@pytest.fixture
def counter():
    n = [0]

    def nxt():
        n[0] += 1
        return n[0]

    return nxt


@FUZZ
@given(parts=raw_parts())
def test_save_raw_csr(tmp_path, counter, parts):
    data, indices, indptr, shape = parts
    dst = tmp_path / f"s{counter()}.zarr"
    want = oracle(data, indices, indptr, shape)
    try:
        store = sparsestore.save(dst, raw_csr(data, indices, indptr, shape))
    except SparseStoreError as exc:
        event(f"refused: {type(exc).__name__}")
        nothing_at(dst)
        return
    event("accepted")
    assert want is not None, "accepted parts that scipy itself rejects"
    assert_same(store[:], want)
    assert store.dtype == want.dtype


@FUZZ
@given(parts=raw_parts())
def test_append_raw_csr(tmp_path, counter, parts):
    data, indices, indptr, shape = parts
    n_cols = shape[1]
    dst = tmp_path / f"a{counter()}.zarr"
    base = sp.random(3, n_cols, density=0.5, format="csr", dtype=np.float64, random_state=0)
    st_ = sparsestore.save(dst, base)
    st_ = sparsestore.open(dst, mode="r+")
    want = oracle(data, indices, indptr, shape, store_dtype=np.float64)
    try:
        st_.append(raw_csr(data, indices, indptr, shape))
    except SparseStoreError as exc:
        event(f"refused: {type(exc).__name__}")
        st_.close()
        again = sparsestore.open(dst)
        assert again.shape == base.shape and (again[:] != base).nnz == 0
        from sparsestore.validate import validate_store

        assert validate_store(dst).ok
        return
    finally:
        st_.close()
    event("accepted")
    assert want is not None, "appended parts that scipy itself rejects"
    got = sparsestore.open(dst)[:]
    full = sp.vstack([base, want], format="csr")
    assert_same(got, full)


@st.composite
def coo_input(draw):
    n_rows, n_cols = draw(st.integers(0, 5)), draw(st.integers(1, 5))
    k = draw(st.integers(0, 8))
    row = np.array(draw(st.lists(st.integers(-2, n_rows + 1), min_size=k, max_size=k)),
                   dtype=np.int64)
    col = np.array(draw(st.lists(st.integers(-2, n_cols + 1), min_size=k, max_size=k)),
                   dtype=np.int64)
    val = np.array(draw(st.lists(st.floats(-3, 3, width=32), min_size=k, max_size=k)),
                   dtype=np.float32)
    m = sp.coo_matrix((n_rows, n_cols), dtype=np.float32)
    m.row, m.col, m.data = row, col, val  # raw, unchecked
    return m, row, col, val


@FUZZ
@given(case=coo_input())
def test_save_raw_coo(tmp_path, counter, case):
    m, row, col, val = case
    dst = tmp_path / f"c{counter()}.zarr"
    valid = bool(np.all((row >= 0) & (row < m.shape[0]) & (col >= 0) & (col < m.shape[1])))
    try:
        store = sparsestore.save(dst, m)
    except SparseStoreError:
        assert not valid, "refused a valid COO matrix"
        nothing_at(dst)
        return
    assert valid, "accepted COO entries outside the matrix"
    want = sp.coo_matrix((val, (row, col)), shape=m.shape).tocsr()
    want.sum_duplicates()
    want.eliminate_zeros()
    assert_same(store[:], want)


ODD_INPUTS = st.sampled_from([
    None, 3, "abc", b"xy", {"a": 1}, [[1, 2], [3]], [[1.0, 2.0], [3.0, 4.0]],
    np.zeros((2, 2, 2)), np.zeros(4), np.zeros(()), np.array([["a", "b"]]),
    np.array([[1 + 2j]]), np.array([[object()]], dtype=object), np.zeros((0, 3)),
    np.zeros((3, 0)), np.full((2, 2), np.nan), np.ones((2, 2), dtype=np.float16),
    np.array([[True, False]]), np.ma.masked_array(np.ones((2, 2)), mask=[[1, 0], [0, 0]]),
    sp.random(3, 3, density=0.5, format="lil"), sp.random(3, 3, density=0.5, format="dok"),
    sp.random(3, 3, density=0.5, format="bsr"), sp.random(3, 3, density=0.5, format="dia"),
    sp.csr_array(np.eye(3)), sp.coo_array(np.eye(2)),
])


@settings(deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(X=ODD_INPUTS, sparse=st.booleans())
def test_save_odd_inputs(tmp_path, counter, X, sparse):
    dst = tmp_path / f"o{counter()}.zarr"
    try:
        store = sparsestore.save(dst, X, sparse=sparse)
    except SparseStoreError:
        nothing_at(dst)
        return
    ref = X.toarray() if sp.issparse(X) else np.asarray(X)
    got = store[:]
    got = got.toarray() if sp.issparse(got) else got
    np.testing.assert_array_equal(got, ref.astype(got.dtype) if ref.size else ref.reshape(
        got.shape))


LABEL_VALUES = st.sampled_from([
    "ok", "short", "long", "object", "str", "scalar", "2d", "complex", "list", "nan",
])


@FUZZ
@given(kinds=st.dictionaries(
    st.sampled_from(["y", "w", "", "../x", ".h", "__d", "a/b", "z"]), LABEL_VALUES, max_size=3),
    as_list=st.booleans())
def test_save_fuzzed_labels(tmp_path, counter, kinds, as_list):
    n = 4
    X = sp.random(n, 3, density=0.5, format="csr", dtype=np.float32, random_state=1)
    make = {
        "ok": lambda: np.arange(n), "short": lambda: np.arange(n - 1),
        "long": lambda: np.arange(n + 1), "object": lambda: np.array([object()] * n),
        "str": lambda: np.array(["a"] * n), "scalar": lambda: np.float32(1),
        "2d": lambda: np.ones((n, 2), dtype=np.float32), "complex": lambda: np.ones(n, complex),
        "list": lambda: list(range(n)), "nan": lambda: np.full(n, np.nan),
    }
    labels = {k: make[v]() for k, v in kinds.items()}
    arg = list(labels.items()) if as_list else labels
    dst = tmp_path / f"l{counter()}.zarr"
    try:
        store = sparsestore.save(dst, X, labels=arg)
    except SparseStoreError:
        nothing_at(dst)
        return
    assert not as_list or not labels
    for k, v in labels.items():
        np.testing.assert_array_equal(store.labels[k][:], np.asarray(v))
    assert (store[:] != X).nnz == 0


@FUZZ
@given(kinds=st.dictionaries(st.sampled_from(["y", "w", "q"]), LABEL_VALUES, max_size=3))
def test_append_fuzzed_labels_leaves_store_unchanged_on_error(tmp_path, counter, kinds):
    n = 4
    X = sp.random(n, 3, density=0.5, format="csr", dtype=np.float32, random_state=1)
    base = {"y": np.arange(n, dtype=np.int64), "w": np.ones((n, 2), np.float32)}
    dst = tmp_path / f"al{counter()}.zarr"
    sparsestore.save(dst, X, labels=base)
    make = {
        "ok": lambda: np.arange(n), "short": lambda: np.arange(n - 1),
        "long": lambda: np.arange(n + 1), "object": lambda: np.array([object()] * n),
        "str": lambda: np.array(["a"] * n), "scalar": lambda: np.float32(1),
        "2d": lambda: np.ones((n, 2), dtype=np.float32), "complex": lambda: np.ones(n, complex),
        "list": lambda: list(range(n)), "nan": lambda: np.full(n, np.nan),
    }
    labels = {k: make[v]() for k, v in kinds.items()}
    with sparsestore.open(dst, mode="r+") as s:
        try:
            s.append(X, labels=labels)
            ok = True
        except SparseStoreError:
            ok = False
    again = sparsestore.open(dst)
    if not ok:
        assert again.shape == X.shape and (again[:] != X).nnz == 0
        for k, v in base.items():
            np.testing.assert_array_equal(again.labels[k][:], v)
        return
    assert again.shape == (2 * n, 3)
    for k, v in base.items():
        np.testing.assert_array_equal(again.labels[k][:n], v)
        np.testing.assert_array_equal(again.labels[k][n:], np.asarray(labels[k]))
