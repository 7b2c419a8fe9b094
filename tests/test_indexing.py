"""Row and column keys of ``store[...]`` and ``store.labels[name][...]`` against scipy and
numpy: every key either selects what they select or raises a SparseStoreError."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import sparsestore
from sparsestore.errors import InvalidInputError, OutOfRangeError, SparseStoreError

N_ROWS, N_COLS = 37, 11


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    X = sp.random(N_ROWS, N_COLS, density=0.3, format="csr", dtype=np.float32,
                  random_state=np.random.default_rng(7))
    y = np.arange(N_ROWS, dtype=np.int64) * 10
    path = tmp_path_factory.mktemp("idx") / "s.zarr"
    sparsestore.save(path, X, labels={"y": y}, chunk_bytes=1024)  # several chunks
    return sparsestore.open(path), X, y


bounds = st.one_of(st.none(), st.integers(-N_ROWS - 5, N_ROWS + 5))
steps = st.one_of(st.none(), st.integers(-7, 7).filter(lambda s: s != 0))


@given(start=bounds, stop=bounds, step=steps)
def test_row_slices_match_scipy_and_numpy(stored, start, stop, step):
    store, X, y = stored
    key = slice(start, stop, step)
    want = X[key]
    got = store[key]
    assert got.shape == want.shape
    assert (got != want).nnz == 0
    np.testing.assert_array_equal(store.labels["y"][key], y[key])


@given(start=bounds, stop=bounds, step=steps)
def test_column_slices_match_scipy(stored, start, stop, step):
    store, X, _ = stored
    key = slice(start, stop, step)
    got, want = store[3:9, key], X[3:9, key]
    assert got.shape == want.shape
    assert (got != want).nnz == 0


@pytest.mark.parametrize("step", [0, np.int64(0), False])
def test_a_zero_step_is_a_sparsestore_error(stored, step):
    store, _, _ = stored
    key = slice(1, 5, step)
    for read in (lambda: store[key], lambda: store.labels["y"][key],
                 lambda: store[:, key]):
        with pytest.raises(InvalidInputError, match="step cannot be zero"):
            read()
    with pytest.raises(ValueError):  # numpy's class too, so existing handlers still work
        store[key]


@pytest.mark.parametrize("key", [
    1.5, [1.0, 2.0], np.array([0.5]), np.ones(N_ROWS - 1, dtype=bool),
    np.ones((N_ROWS, 1), dtype=bool), np.zeros((2, 2), dtype=np.int64), True,
])
def test_unusable_keys_are_invalid_input(stored, key):
    store, _, _ = stored
    with pytest.raises(InvalidInputError):
        store[key]
    with pytest.raises(InvalidInputError):
        store.labels["y"][key]


@pytest.mark.parametrize("key", [N_ROWS, -N_ROWS - 1, [0, N_ROWS], np.array([-N_ROWS - 1])])
def test_out_of_range_positions(stored, key):
    store, X, _ = stored
    with pytest.raises(IndexError):  # the oracle agrees they are out of range
        X[key]
    with pytest.raises(OutOfRangeError):
        store[key]
    with pytest.raises(OutOfRangeError):
        store.labels["y"][key]


def test_integer_arrays_and_masks_match_scipy(stored):
    store, X, y = stored
    rng = np.random.default_rng(3)
    for key in (rng.integers(-N_ROWS, N_ROWS, 20), rng.random(N_ROWS) < 0.4,
                np.array([], dtype=np.int64), [5, 5, -1, 0]):
        want = X[key]
        got = store[key]
        assert got.shape == want.shape and (got != want).nnz == 0
        np.testing.assert_array_equal(store.labels["y"][key], y[key])
    assert issubclass(InvalidInputError, SparseStoreError)
