"""Value casts on the way into a store, and big-endian input.

A cast to the store's dtype either keeps every value (checked per block, against numpy as
the oracle) or is refused naming the value, nothing left at the destination; only
``casting="unsafe"`` stores what numpy's ``astype`` makes, and then without the zeros it
creates.  Big-endian input is read as the same values in native byte order.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsestore
from sparsestore.cli import main as cli_main
from sparsestore.dask_write import from_dask
from sparsestore.errors import DTypeError, InvalidInputError, UnsafeInputError
from sparsestore.validate import validate_store


def nothing_at(tmp_path: Path, name: str) -> None:
    """No store, and no hidden staging directory, for ``name``."""
    assert not (tmp_path / name).exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(f".{name}.")]


def stored(store) -> np.ndarray:
    X = store[:]
    return X.toarray() if sp.issparse(X) else np.asarray(X)


LOSSY = [  # (values, target dtype, the value the message must name)
    ([[300.0, 1.0]], np.int8, "300"),
    ([[0.7, 1.0]], np.int8, "0.7"),
    ([[2.0, -1.5]], np.uint8, "-1.5"),
    ([[1.0, 1e300]], np.float32, "1e+300"),  # overflows to inf
    ([[1.0, 1e-50]], np.float32, "1e-50"),  # underflows to 0: the entry would vanish
    ([[70000, 1]], np.float16, "70000"),
    ([[3, 1]], np.bool_, "3"),
]


# ------------------------------------------------------------------ lossy casts

@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize(("values", "dtype", "shown"), LOSSY)
def test_save_refuses_a_cast_that_changes_a_value(tmp_path, values, dtype, shown, sparse):
    if sparse and dtype == np.float16:
        pytest.skip("float16 is for dense stores only")
    X = np.array(values)
    for name, inp in (("a.zarr", X), ("b.zarr", sp.csr_matrix(X))):
        with pytest.raises(InvalidInputError) as info:
            sparsestore.save(tmp_path / name, inp, dtype=dtype, sparse=sparse,
                             nan_policy="keep")
        msg = str(info.value)
        assert shown in msg and np.dtype(dtype).name in msg and "casting='unsafe'" in msg
        assert "row 0, column" in msg
        nothing_at(tmp_path, name)


@pytest.mark.parametrize("sparse", [True, False])
def test_save_keeps_casts_that_fit_and_rounds_floats(tmp_path, sparse):
    X = np.array([[3.0, 0.0, -128.0], [0.0, 127.0, 1.0]])
    got = stored(sparsestore.save(tmp_path / "i.zarr", X, dtype=np.int8, sparse=sparse))
    np.testing.assert_array_equal(got, X.astype(np.int8))
    assert got.dtype == np.int8
    F = np.array([[0.1, 0.0], [1 / 3, -2.5e38]])
    got = stored(sparsestore.save(tmp_path / "f.zarr", F, dtype=np.float32, sparse=sparse))
    np.testing.assert_array_equal(got, F.astype(np.float32))  # rounded to nearest, as numpy


@pytest.mark.parametrize("sparse", [True, False])
def test_unsafe_casting_stores_numpy_astype_without_created_zeros(tmp_path, sparse):
    X = np.array([[300.0, 0.7, 0.0], [-1.5, 2.0, 1e-50]])
    for dtype in (np.int8, np.uint8, np.float32):
        with np.errstate(all="ignore"):
            oracle = X.astype(dtype)
        st_ = sparsestore.save(tmp_path / f"{np.dtype(dtype).name}.zarr", sp.csr_matrix(X),
                               dtype=dtype, sparse=sparse, casting="unsafe")
        np.testing.assert_array_equal(stored(st_), oracle)
        if sparse:  # 0.7 -> 0 and 1e-50 -> 0.0 are not stored as explicit zeros
            assert st_.nnz == np.count_nonzero(oracle)
        assert validate_store(st_.path).ok


def test_casting_option_is_checked(tmp_path):
    with pytest.raises(InvalidInputError, match="casting must be"):
        sparsestore.save(tmp_path / "a.zarr", np.eye(2), dtype=np.int8, casting="same_kind")
    nothing_at(tmp_path, "a.zarr")


_TARGETS = [np.int8, np.uint8, np.int16, np.uint32, np.int64, np.float16, np.float32,
            np.bool_]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, width=64),
        st.integers(-(2**40), 2**40).map(float),
        st.sampled_from([0.0, 1.0, -1.0, 255.0, 256.0, 127.5, 1e-40, 65504.0, 65520.0]),
    ), min_size=1, max_size=12),
    target=st.sampled_from(_TARGETS),
    sparse=st.booleans(),
)
def test_any_values_are_refused_or_stored_as_numpy_casts_them(tmp_path_factory, values,
                                                                target, sparse):
    if sparse and target == np.float16:
        sparse = False
    X = np.array(values, dtype=np.float64).reshape(1, -1)
    path = tmp_path_factory.mktemp("h") / "s.zarr"
    try:
        got = stored(sparsestore.save(path, X, dtype=target, sparse=sparse))
    except InvalidInputError:
        with np.errstate(all="ignore"):
            cast = X.astype(target)
        back = cast.astype(np.float64)
        if np.dtype(target).kind == "f":  # refused only for overflow or underflow to zero
            assert (~np.isfinite(cast) | ((cast == 0) & (X != 0))).any()
        else:
            assert (back != X).any()
        assert not path.exists()
        return
    expected = X.astype(target)
    np.testing.assert_array_equal(got, expected)
    if np.dtype(target).kind != "f":
        np.testing.assert_array_equal(got.astype(np.float64), X)  # integers: exact
    else:
        assert np.isfinite(got).all() and ((got != 0) == (X != 0)).all()


def _write_npy(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr, allow_pickle=False)
    return path


def test_convert_refuses_lossy_dtype_for_every_source(tmp_path, capsys):
    X = np.array([[300.0, 0.0], [0.0, 1.5]])
    npy = _write_npy(tmp_path / "x.npy", X)
    mtx = tmp_path / "x.mtx"
    import scipy.io as sio

    sio.mmwrite(mtx, sp.coo_matrix(X))
    svm = tmp_path / "x.svm"
    svm.write_text("1 1:300 \n0 2:1.5\n")
    npz = tmp_path / "x.npz"
    sp.save_npz(npz, sp.csr_matrix(X))
    for src in (npy, mtx, svm, npz):
        with pytest.raises(InvalidInputError, match=r"300.*int8.*casting='unsafe'"):
            sparsestore.convert(src, tmp_path / "o.zarr", dtype="int8")
        nothing_at(tmp_path, "o.zarr")
    assert cli_main(["convert", str(npy), str(tmp_path / "c.zarr"), "-q", "--dtype",
                     "int8"]) != 0
    assert "300" in capsys.readouterr().err
    nothing_at(tmp_path, "c.zarr")
    assert cli_main(["convert", str(npy), str(tmp_path / "c.zarr"), "-q", "--dtype", "int8",
                     "--casting", "unsafe"]) == 0
    np.testing.assert_array_equal(stored(sparsestore.open(tmp_path / "c.zarr")),
                                  np.load(npy).astype(np.int8))
    fits = tmp_path / "fits.mtx"
    sio.mmwrite(fits, sp.coo_matrix(np.array([[300.0, 0.0], [0.0, -2.0]])))
    ok = sparsestore.convert(fits, tmp_path / "u.zarr", dtype="int16")
    assert ok.dtype == np.int16
    np.testing.assert_array_equal(stored(ok), [[300, 0], [0, -2]])


def test_convert_unsafe_casting_drops_created_zeros(tmp_path):
    X = np.array([[300.0, 0.0], [0.0, 0.5]])
    src = _write_npy(tmp_path / "x.npy", X)
    st_ = sparsestore.convert(src, tmp_path / "o.zarr", dtype="int8", casting="unsafe")
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(stored(st_), X.astype(np.int8))
    assert st_.nnz == 1 and validate_store(st_.path).ok


def _lying(block):
    return block  # float64 values under int16 metadata


def test_from_dask_checks_values_against_the_claimed_dtype(tmp_path):
    X = np.array([[300.25, 0.0], [0.0, 2.0]])
    darr = da.from_array(X, chunks=(1, 2)).map_blocks(_lying, dtype=np.int16)
    with pytest.raises(InvalidInputError, match=r"300\.25.*int16"):
        from_dask(tmp_path / "d.zarr", darr)
    nothing_at(tmp_path, "d.zarr")
    ok = da.from_array(np.array([[300.0, 0.0], [0.0, 2.0]]), chunks=(1, 2)).map_blocks(
        _lying, dtype=np.int16)
    got = from_dask(tmp_path / "e.zarr", ok)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(stored(got), [[300, 0], [0, 2]])


@pytest.mark.parametrize("sparse", [True, False])
def test_append_to_a_narrower_store(tmp_path, sparse):
    st_ = sparsestore.create(tmp_path / "a.zarr", n_cols=2, dtype=np.int8, sparse=sparse)
    st_.append(np.array([[1, 0]], dtype=np.int8))
    before = stored(st_).copy()
    with pytest.raises(DTypeError, match="casting='same_value'"):  # by type, as before
        st_.append(np.array([[5, 0]], dtype=np.int64))
    with pytest.raises(InvalidInputError, match=r"row 2, column 1 holds 300"):
        st_.append(np.array([[5, 0], [0, 300]], dtype=np.int64), casting="same_value")
    np.testing.assert_array_equal(stored(sparsestore.open(tmp_path / "a.zarr")), before)
    st_.append(sp.csr_matrix(np.array([[5.0, 0.0], [0.0, -7.0]])), casting="same_value")
    np.testing.assert_array_equal(stored(st_), [[1, 0], [5, 0], [0, -7]])
    st_.append(np.array([[0.5, 2.0]]), casting="unsafe")
    np.testing.assert_array_equal(stored(st_), [[1, 0], [5, 0], [0, -7], [0, 2]])
    assert validate_store(st_.path).ok


# ------------------------------------------------------------------ big-endian input

def _be(a: np.ndarray) -> np.ndarray:
    return a.astype(a.dtype.newbyteorder(">"))


def _be_csr(X: np.ndarray) -> sp.csr_matrix:
    m = sp.csr_matrix(X.astype(np.float32))
    m.data = _be(m.data)
    m.indices = _be(m.indices.astype(np.int32))
    m.indptr = _be(m.indptr.astype(np.int32))
    return m


_BE_X = np.array([[1.5, 0.0, -2.0], [0.0, 0.0, 0.0], [3.25, 4.0, 0.0]], dtype=np.float32)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("kind", ["dense", "csr", "csr_indices_only", "coo"])
def test_big_endian_save_append_write_blocks(tmp_path, kind, sparse):
    if kind == "dense":
        X = _be(_BE_X)
    elif kind == "csr":
        X = _be_csr(_BE_X)
    elif kind == "coo":
        c = sp.coo_matrix(_BE_X)
        c.data = _be(c.data)
        X = c
    else:
        X = sp.csr_matrix(_BE_X)
        X.indices = _be(X.indices)
    got = sparsestore.save(tmp_path / "s.zarr", X, sparse=sparse)
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(stored(got), _BE_X)
    st_ = sparsestore.create(tmp_path / "a.zarr", n_cols=3, dtype=np.float32, sparse=sparse)
    st_.append(X)
    st_.append(X)
    np.testing.assert_array_equal(stored(st_), np.vstack([_BE_X, _BE_X]))
    wb = sparsestore.write_blocks(tmp_path / "w.zarr", [(X, None), (X, None)], n_cols=3,
                                  dtype=">f4", sparse=sparse)
    np.testing.assert_array_equal(stored(wb), np.vstack([_BE_X, _BE_X]))
    for p in ("s.zarr", "a.zarr", "w.zarr"):
        assert validate_store(tmp_path / p).ok


def test_big_endian_convert_npy_and_npz(tmp_path):
    npy = _write_npy(tmp_path / "x.npy", _be(_BE_X))
    np.savez(tmp_path / "d.npz", X=_be(_BE_X))
    sp.save_npz(tmp_path / "s.npz", _be_csr(_BE_X), compressed=False)
    np.savez(tmp_path / "p.npz", data=_be(_BE_X[_BE_X != 0]),
             row=_be(np.nonzero(_BE_X)[0].astype(np.int32)),
             col=_be(np.nonzero(_BE_X)[1].astype(np.int64)), shape=np.array([3, 3]))
    for src in ("x.npy", "d.npz", "s.npz", "p.npz"):
        for sparse in (True, False):
            out = tmp_path / f"{src}-{sparse}.zarr"
            st_ = sparsestore.convert(tmp_path / src, out, sparse=sparse)
            assert st_.dtype == np.float32 and st_.dtype.isnative
            np.testing.assert_array_equal(stored(st_), _BE_X)
            assert validate_store(out).ok
    assert npy.exists()


# ------------------------------------------------------------------ anndata size bombs

def _h5ad_bomb(path: Path, shape=(2**31, 2**20)) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        f.create_dataset("X", shape=shape, dtype="f4", chunks=tuple(min(64, n) for n in shape),
                         fillvalue=0,
                         compression="gzip")
    return path


def _zarr_bomb(path: Path, shape=(2**31, 2**20)) -> Path:
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    g.create_array("X", shape=shape, dtype="f4", chunks=(1024, 1024), fill_value=0)
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", [_h5ad_bomb, _zarr_bomb])
def test_anndata_declaring_a_huge_dense_x_is_refused_up_front(tmp_path, make, capsys):
    src = make(tmp_path / ("x.h5ad" if make is _h5ad_bomb else "x.zarr"))
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) < 64 * 2**10
    with pytest.raises(UnsafeInputError, match="max_bytes"):
        sparsestore.convert(src, tmp_path / "o.zarr")
    nothing_at(tmp_path, "o.zarr")
    assert cli_main(["convert", str(src), str(tmp_path / "c.zarr"), "-q"]) != 0
    assert "max_bytes" in capsys.readouterr().err
    nothing_at(tmp_path, "c.zarr")


def test_anndata_max_bytes_is_the_limit_and_can_be_raised(tmp_path):
    """A small file declaring more than max_bytes and far more than it stores is refused;
    raising max_bytes lets it through."""
    src = _h5ad_bomb(tmp_path / "s.h5ad", shape=(2**14, 2**10))  # 64 MiB declared
    with pytest.raises(UnsafeInputError, match="max_bytes"):
        sparsestore.convert(src, tmp_path / "o.zarr", max_bytes=2**20)
    nothing_at(tmp_path, "o.zarr")
    got = sparsestore.convert(src, tmp_path / "o.zarr", max_bytes=2**26)
    assert got.shape == (2**14, 2**10) and got.nnz == 0


def test_anndata_over_max_bytes_that_stores_its_bytes_is_converted(tmp_path):
    """A genuinely large X (here: over a lowered max_bytes, stored at its own size) is no
    bomb: the limit scales with what the file holds."""
    X = np.random.default_rng(0).random((400, 50)).astype(np.float32)
    src = _h5ad_bomb(tmp_path / "s.h5ad", shape=X.shape)
    import h5py

    with h5py.File(src, "r+") as f:
        f["X"][...] = X
    got = sparsestore.convert(src, tmp_path / "o.zarr", max_bytes=1000)
    np.testing.assert_array_equal(stored(got), X)
