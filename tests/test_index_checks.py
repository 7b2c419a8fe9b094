"""Column indices out of range, negative, unsorted or duplicated never reach a reader.

Such indices come from stores written by other tools (anndata writes whatever its matrix
holds) or edited after the fact; scipy then reads out of bounds, and every consumer trusts
sorted, unique indices per row.  Every read path must refuse them, naming the row, while
reads of the rows around them stay exact (scipy is the oracle).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import sparsestore
from benchmarks.forge import unseal
from sparsestore.errors import CorruptStoreError
from sparsestore.loader import DataLoader
from sparsestore.validate import validate_store

N, M = 3000, 400
BAD_ROW = 1700


@pytest.fixture(scope="module")
def matrix() -> sp.csr_matrix:
    X = sp.random(N, M, density=0.05, format="csr", dtype=np.float32, random_state=7)
    assert X.indptr[BAD_ROW + 1] - X.indptr[BAD_ROW] >= 3
    return X


def _forge(indices: np.ndarray, lo: int, kind: str) -> None:
    """Damage the column indices of the row starting at ``lo`` in place."""
    if kind == "huge":
        indices[lo + 1] = 10**6
    elif kind == "negative":
        indices[lo + 1] = -1
    elif kind == "n_cols":
        indices[lo + 1] = M
    elif kind == "unsorted":
        indices[lo], indices[lo + 1] = indices[lo + 1], indices[lo]
    elif kind == "duplicate":
        indices[lo + 1] = indices[lo]
    else:  # pragma: no cover
        raise AssertionError(kind)


KINDS = ["huge", "negative", "n_cols", "unsorted", "duplicate"]


@pytest.fixture
def forged(tmp_path, matrix):
    """A store of ``matrix`` (many small chunks) whose row ``BAD_ROW`` got bad indices."""

    def make(kind: str) -> Path:
        path = tmp_path / f"{kind}.zarr"
        sparsestore.save(path, matrix, labels={"y": np.arange(N)}, chunk_bytes=16384)
        unseal(path)
        arr = zarr.open_array(str(path / "indices"), mode="r+")
        vals = arr[:]
        _forge(vals, int(matrix.indptr[BAD_ROW]), kind)
        arr[:] = vals
        return path

    return make


def _readers(s: sparsestore.SparseStore) -> dict[str, object]:
    around = np.array([5, BAD_ROW, 2999, 40])
    return {
        "slice all": lambda: s[:],
        "slice": lambda: s[BAD_ROW - 3 : BAD_ROW + 2],
        "one row": lambda: s[BAD_ROW],
        "row list": lambda: s[around],
        "stepped": lambda: s[::3] if BAD_ROW % 3 == 0 else s[BAD_ROW % 3 :: 3],
        "with columns": lambda: s[BAD_ROW - 1 : BAD_ROW + 1, 10:200],
        "read_parts": lambda: s.read_parts(BAD_ROW - 50, BAD_ROW + 50),
        "take_parts": lambda: s.take_parts(np.sort(around)),
        "loader": lambda: list(DataLoader(s, batch_size=256, labels="y")),
        "loader shuffled": lambda: list(DataLoader(s, batch_size=256, shuffle=True, seed=3)),
        "loader columns": lambda: list(DataLoader(s, batch_size=256, columns=np.arange(0, M, 2))),
        "loader shuffled columns": lambda: list(DataLoader(
            s, batch_size=256, shuffle=True, seed=3, columns=np.arange(M)[::-1])),
        "loader no threads": lambda: list(DataLoader(s, batch_size=100, num_workers=0)),
        "loader sampler": lambda: list(DataLoader(s, batch_size=7, sampler=around)),
        "dask": lambda: s.to_dask().compute(),
        "dask rows": lambda: s.to_dask(chunk_rows=123).compute(),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_read_of_the_row_refuses_bad_indices(forged, kind):
    s = sparsestore.open(forged(kind))
    assert not s.verified  # nothing but the index check stands between them and scipy
    for name, read in _readers(s).items():
        with pytest.raises(CorruptStoreError) as info:
            read()
        msg = str(info.value)
        assert f"row {BAD_ROW}" in msg, (name, msg)
        assert "column ind" in msg and "restore" in msg, (name, msg)


@pytest.mark.parametrize("kind", ["huge", "unsorted"])
def test_reads_that_miss_the_row_stay_exact(forged, matrix, kind):
    s = sparsestore.open(forged(kind))
    assert (s[: BAD_ROW] != matrix[:BAD_ROW]).nnz == 0
    assert (s[BAD_ROW + 1 :] != matrix[BAD_ROW + 1 :]).nnz == 0
    rows = np.array([2999, 3, BAD_ROW + 1, 3])
    assert (s[rows] != matrix[rows]).nnz == 0
    got = sp.vstack([b.to_scipy() for b in DataLoader(
        s, batch_size=50, rows=np.arange(BAD_ROW + 1, N)).iter_batches()])
    assert (got != matrix[BAD_ROW + 1 :]).nnz == 0


@pytest.mark.parametrize("kind", KINDS)
def test_the_message_names_the_indices_chunk(forged, matrix, kind):
    s = sparsestore.open(forged(kind))
    chunk = int(s.arrays["indices"].chunks[0])
    lo = int(matrix.indptr[BAD_ROW])
    want = {f"indices chunk {lo // chunk}", f"indices chunk {(lo + 1) // chunk}"}
    with pytest.raises(CorruptStoreError) as info:
        s[:]
    assert any(w in str(info.value) for w in want), str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_validate_reports_the_row(forged, kind):
    report = validate_store(forged(kind))
    assert not report.ok
    assert any(f"row {BAD_ROW}" in p for p in report.problems), report.problems


@pytest.mark.parametrize("kind", ["huge", "negative", "unsorted", "duplicate"])
def test_anndata_written_bad_indices_are_refused(tmp_path, matrix, kind):
    """anndata writes whatever its matrix holds; the store opens (unverified) and refuses
    the rows on read, not out-of-bounds memory or silently dropped entries."""
    ad = pytest.importorskip("anndata")
    X = matrix.copy()
    X.indices = X.indices.astype(np.int64)
    _forge(X.indices, int(X.indptr[BAD_ROW]), kind)
    path = tmp_path / "bad.zarr"
    ad.AnnData(X=X).write_zarr(path)
    s = sparsestore.open(path)
    with pytest.raises(CorruptStoreError, match=f"row {BAD_ROW}"):
        s[:]
    with pytest.raises(CorruptStoreError, match=f"row {BAD_ROW}"):
        list(DataLoader(s, batch_size=512, shuffle=True, seed=0))
    assert (s[:BAD_ROW] != matrix[:BAD_ROW]).nnz == 0


def test_empty_rows_and_row_boundaries_are_not_mistaken_for_disorder(tmp_path):
    """A row may start below where the previous one ended, and empty rows sit between."""
    X = sp.csr_matrix(np.array([
        [0, 0, 0, 5],
        [0, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 2, 3, 4],
        [7, 0, 0, 0],
    ], dtype=np.float32))
    s = sparsestore.save(tmp_path / "s.zarr", X)
    assert (s[:] != X).nnz == 0
    for k in range(X.shape[0]):
        assert (s[k:] != X[k:]).nnz == 0
        assert (s[:k] != X[:k]).nnz == 0
    got = [b.to_scipy() for b in DataLoader(s, batch_size=2, shuffle=True, seed=1)
           .iter_batches()]
    assert sum(g.nnz for g in got) == X.nnz


@pytest.mark.parametrize("kind", ["unsorted", "duplicate"])
def test_disorder_across_an_indices_chunk_edge_is_refused(tmp_path, matrix, kind):
    """A whole-range read checks each indices chunk while it is in cache, so a row that runs
    across a chunk edge must also be checked across it."""
    path = tmp_path / "edge.zarr"
    sparsestore.save(path, matrix, chunk_bytes=16384)
    unseal(path)
    arr = zarr.open_array(str(path / "indices"), mode="r+")
    c = int(arr.chunks[0])
    ptr = matrix.indptr
    edge = next(e for e in range(c, matrix.nnz, c)
                if e not in set(ptr.tolist()) and ptr[np.searchsorted(ptr, e) - 1] < e - 1)
    row = int(np.searchsorted(ptr, edge, side="right")) - 1
    vals = arr[:]
    _forge(vals, edge - 1, kind)  # the pair (edge - 1, edge) sits on the chunk edge
    arr[:] = vals
    with pytest.warns(UserWarning):
        s = sparsestore.open(path)
    for read in (lambda: s[:], lambda: s[row - 5 : row + 5], lambda: s.read_parts(0, N)):
        with pytest.raises(CorruptStoreError, match=f"row {row} "):
            read()
    lo, hi = max(0, row - 400), row  # rows before it, over several chunks, read exactly
    assert (s[lo:hi] != matrix[lo:hi]).nnz == 0


def test_a_verified_handle_checks_each_row_once_an_unverified_one_every_read(
        tmp_path, matrix, monkeypatch):
    """The manifest keeps a verified store's chunks from changing under a handle, so rows
    whose indices passed are not scanned again on later passes; without a manifest the
    bytes may change between reads, so every read checks."""
    import sparsestore.store as store_mod

    calls: list[int] = []
    real = store_mod.check_column_indices

    def counting(indices, *a, **k):
        calls.append(int(indices.size))
        return real(indices, *a, **k)

    monkeypatch.setattr(store_mod, "check_column_indices", counting)
    sealed = tmp_path / "sealed.zarr"
    sparsestore.save(sealed, matrix, chunk_bytes=16384)
    plain = tmp_path / "plain.zarr"
    sparsestore.save(plain, matrix, chunk_bytes=16384)
    unseal(plain)
    for path, verified in ((sealed, True), (plain, False)):
        with pytest.warns(UserWarning) if not verified else contextlib.nullcontext():
            s = sparsestore.open(path)
        per_pass = []
        for shuffle in (False, False, True, True):
            calls.clear()
            got = list(DataLoader(s, batch_size=256, shuffle=shuffle, seed=1).iter_batches())
            assert (sp.vstack([b.to_scipy() for b in got])[
                np.argsort(np.concatenate([b.rows for b in got]))] != matrix).nnz == 0
            per_pass.append(sum(calls))
        calls.clear()
        assert (s[:] != matrix).nnz == 0
        per_pass.append(sum(calls))
        if verified:
            assert per_pass[0] == matrix.nnz and per_pass[1:] == [0, 0, 0, 0]
        else:
            assert all(n >= matrix.nnz for n in per_pass)  # s[:] rechecks pairs at chunk edges
