"""sparsestore.kernels against scipy's own CSR -> COO, on the numba and the numpy paths."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsestore import kernels


@pytest.fixture(params=["compiled", "numpy"])
def path(request, monkeypatch):
    """Run the test on numba's kernel (where installed) and on the numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(kernels, "ACCELERATED", False)
    elif not kernels.ACCELERATED:
        pytest.skip("numba is not installed")
    else:  # loaded in the caller, so the compiled kernel is the one that runs
        monkeypatch.setattr(kernels._COO, "eager", True)
    return request.param


def oracle(X: sp.csr_matrix) -> np.ndarray:
    coo = X.tocoo()  # row-major for a canonical CSR
    return np.stack([coo.row, coo.col], axis=1).astype(np.int64)


# the fixture only patches a module global, the same for every example
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_rows=st.integers(0, 40), n_cols=st.integers(1, 30), density=st.floats(0, 1),
       seed=st.integers(0, 2**32 - 1), index_dtype=st.sampled_from([np.int32, np.int64]))
def test_coo_into_matches_scipy(path, n_rows, n_cols, density, seed, index_dtype):
    X = sp.random(n_rows, n_cols, density=density, format="csr", random_state=seed)
    coords = np.full((X.nnz, 2), -1, np.int64)
    kernels.coo_into(X.indptr.astype(np.int64), X.indices.astype(index_dtype), coords)
    np.testing.assert_array_equal(coords, oracle(X))


def test_row_splits_may_start_above_zero_and_coords_may_be_strided(path):
    X = sp.random(50, 20, density=0.3, format="csr", random_state=1)
    X[7] = 0  # an empty row
    X.eliminate_zeros()
    a, b = 10, 31  # rows a..b-1, as a batch cut from the middle of a chunk
    splits = X.indptr[a:b + 1].astype(np.int64)
    indices = X.indices[splits[0]:splits[-1]]
    want = oracle(X[a:b])
    wide = np.zeros((want.shape[0], 3), np.int64)  # only the first two columns are written
    kernels.coo_into(splits, indices, wide)
    np.testing.assert_array_equal(wide[:, :2], want)
    assert not wide[:, 2].any()
    transposed = np.empty((2, want.shape[0]), np.int64)  # torch's (2, nnz) layout
    kernels.coo_into(splits, indices, transposed.T)
    np.testing.assert_array_equal(transposed.T, want)


def test_int32_coords_and_rows_cut_from_a_larger_buffer(path):
    """JAX's layout: int32 coordinates, the batch's rows first in a padded buffer."""
    X = sp.random(40, 25, density=0.2, format="csr", random_state=3)
    want = oracle(X)
    padded = np.full((want.shape[0] + 5, 2), -1, np.int32)
    kernels.coo_into(X.indptr.astype(np.int64), X.indices, padded[: want.shape[0]])
    np.testing.assert_array_equal(padded[: want.shape[0]], want)
    assert (padded[want.shape[0]:] == -1).all()


def test_disagreeing_sizes_raise(path):
    with pytest.raises(ValueError, match="must agree"):
        kernels.coo_into(np.array([0, 2, 3]), np.array([0, 1, 2]), np.empty((2, 2), np.int64))
    with pytest.raises(ValueError, match="must agree"):
        kernels.coo_into(np.array([0, 2]), np.array([0, 1]), np.empty((2, 2, 1), np.int64))


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
def test_numba_installed_means_the_compiled_kernel_runs():
    """A numba that fails to import (e.g. built for another numpy) would silently leave the
    slow path on; where numba is installed the kernel must be the one in use."""
    assert kernels.ACCELERATED
    assert kernels.warm(wait=True)


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
def test_a_fresh_process_does_not_wait_for_numba():
    """The first large call runs numpy while numba loads on a background thread; once that
    is done the compiled kernel serves the same types, and a forked child loads its own."""
    code = """
import os, numpy as np
from sparsestore import kernels
ind = np.arange(1 << 17, dtype=np.int32); ptr = np.array([0, 5, ind.size], np.int64)
want = np.stack([np.repeat([0, 1], [5, ind.size - 5]), ind], 1)
assert 'numba' not in __import__('sys').modules
coords = np.zeros((ind.size, 2), np.int64)
kernels.coo_into(ptr, ind, coords)
assert (coords == want).all()
assert kernels._COO.ready(ptr, ind, coords) is None
kernels._COO.join(120)
assert kernels._COO.ready(ptr, ind, coords) is not None
coords[:] = 0
kernels.coo_into(ptr, ind, coords)
assert (coords == want).all()
pid = os.fork()
if pid == 0:
    coords[:] = 0
    kernels.coo_into(ptr, ind, coords)
    os._exit(0 if kernels._COO._thread is None and (coords == want).all() else 1)
assert os.waitpid(pid, 0)[1] == 0
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items()
                                           if k != "SPARSESTORE_NO_NUMBA"})
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_switch_turns_numba_off():
    env = dict(os.environ, SPARSESTORE_NO_NUMBA="1")
    out = subprocess.run(
        [sys.executable, "-c", "from sparsestore import kernels; print(kernels.ACCELERATED)"],
        env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
