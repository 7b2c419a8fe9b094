"""Open handles and the store on disk moving under them: a store restored from a backup,
pickled handles reopened after a save or an append, and consolidated zarr metadata.  A
handle reads exactly the rows it committed to, or raises StoreChangedError; never zeros,
never another commit's rows."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import sparsestore
from sparsestore.errors import StoreChangedError
from sparsestore.validate import validate_store

N, M, N0 = 4000, 300, 1000
SMALL = {"chunk_bytes": 4096, "indptr_chunk": 256, "dense_chunk_bytes": 4096}
LAYOUTS = {"default": {}, "small": SMALL, "sharded": {**SMALL, "shard_bytes": 16384}}
WENT_BACK = "earlier commit"


def _matrix(seed: int = 0, n: int = N) -> sp.csr_matrix:
    X = sp.random(n, M, density=0.05, format="csr", dtype=np.float32, random_state=seed)
    X.data += 1  # no stored zeros: a zero-filled chunk would be visibly wrong
    return X


def _y(seed: int = 0, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 9, n).astype(np.int64)  # never 0


def _same(got: sp.spmatrix, want: sp.spmatrix) -> bool:
    return got.shape == want.shape and (sp.csr_matrix(got) != want).nnz == 0


def _restore(backup: Path, path: Path, how: str) -> None:
    """Put ``backup`` back at ``path``: replacing the directory, or copying over it (the
    chunks written after the backup stay on disk beside the older metadata)."""
    if how == "replace":
        shutil.rmtree(path)
        shutil.copytree(backup, path)
    else:
        shutil.copytree(backup, path, dirs_exist_ok=True)


def _grown(tmp_path: Path, layout: dict) -> tuple[Path, Path, sp.csr_matrix, np.ndarray]:
    """A store of N0 rows copied to a backup, then grown to N rows by an append."""
    path, backup = tmp_path / "s.zarr", tmp_path / "backup.zarr"
    X, y = _matrix(), _y()
    w = sparsestore.create(path, n_cols=M, dtype=np.float32, **layout)
    w.append(X[:N0], labels={"y": y[:N0]})
    w.close()
    shutil.copytree(path, backup)
    with sparsestore.open(path, mode="r+") as w:
        w.append(X[N0:], labels={"y": y[N0:]})
    return path, backup, X, y


def _readers(h: sparsestore.SparseStore) -> dict:
    """Every read path, each reading rows past the backup's length."""
    rows = np.arange(N0 - 7, N, 5)[::-1]
    return {
        "tail": lambda: h[3000:3010],
        "cross": lambda: h[N0 - 100 : N0 + 100],
        "take": lambda: h[rows],
        "labels": lambda: h.labels["y"][3000:3010],
        "labels_take": lambda: h.labels["y"][rows],
        "indptr": lambda: h.indptr(3000, 3010),
        "loader": lambda: list(sparsestore.DataLoader(h, batch_size=512, labels="y")),
        "shuffled": lambda: list(sparsestore.DataLoader(h, batch_size=512, labels="y",
                                                        shuffle=True, seed=1)),
        "dask": lambda: h.to_dask().compute(),
    }


def _expected(name: str, X: sp.csr_matrix, y: np.ndarray):
    """What each of :func:`_readers` must give when it does not raise."""
    rows = np.arange(N0 - 7, N, 5)[::-1]
    return {"tail": X[3000:3010], "cross": X[N0 - 100 : N0 + 100], "take": X[rows],
            "labels": y[3000:3010], "labels_take": y[rows], "indptr": None,
            "loader": None, "shuffled": None, "dask": X}[name]


# ------------------------------------------------------------ restored from a backup

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_backup_restored_under_an_open_handle(tmp_path, layout):
    """The directory is replaced by a copy taken before the last append: every read of the
    rows the handle saw past the copy's length says the store went back, never zeros."""
    path, backup, X, y = _grown(tmp_path, LAYOUTS[layout])
    h = sparsestore.open(path)
    assert h.shape == (N, M)
    _restore(backup, path, "replace")
    for name, read in _readers(h).items():
        with pytest.raises(StoreChangedError, match=WENT_BACK) as info:
            read()
        assert "open it again" in str(info.value), name
    # Rows in chunks wholly inside the copy's rows (never rewritten) still read; a new
    # handle and refresh() see the restored store.
    if layout == "small":
        assert _same(h[: N0 // 2], X[: N0 // 2])
    assert _same(sparsestore.open(path)[:], X[:N0])
    assert _same(h.refresh()[:], X[:N0]) and np.array_equal(h.labels["y"][:], y[:N0])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_backup_copied_over_a_grown_store(tmp_path, layout):
    """The backup is copied over the live directory, so the chunks past its length stay:
    each read gives exactly the handle's rows or says the store went back; reads across
    the copy's last, partly filled chunks always do."""
    path, backup, X, y = _grown(tmp_path, LAYOUTS[layout])
    h = sparsestore.open(path)
    _restore(backup, path, "over")
    raised = set()
    for name, read in _readers(h).items():
        try:
            got = read()
        except StoreChangedError as exc:
            assert WENT_BACK in str(exc) and "open it again" in str(exc)
            raised.add(name)
            continue
        want = _expected(name, X, y)
        if name == "indptr":
            assert np.array_equal(got, X.indptr[3000:3011])
        elif isinstance(want, np.ndarray):
            assert np.array_equal(got, want), name
        elif want is not None:
            assert _same(got, want), name
        else:
            pytest.fail(f"{name}: read the whole matrix across the restored chunks")
    assert {"cross", "loader", "shuffled", "dask"} <= raised


def test_restore_then_other_rows_appended(tmp_path):
    """After the restore a writer appends other rows, past the handle's length: the handle
    must not read them as its own."""
    path, backup, X, y = _grown(tmp_path, SMALL)
    h = sparsestore.open(path)
    _restore(backup, path, "replace")
    Z, z = _matrix(7), _y(7)
    with sparsestore.open(path, mode="r+") as w:
        w.append(Z[N0:], labels={"y": z[N0:]})
    for name, read in _readers(h).items():
        with pytest.raises(StoreChangedError, match=WENT_BACK):
            read()
        assert name
    new = sparsestore.open(path)
    assert _same(new[:], sp.vstack([X[:N0], Z[N0:]]).tocsr())


def test_handles_opened_before_appends_still_read(tmp_path):
    """The check only fires when the store went back: appends after a handle opened keep
    every read path of that handle exact (the partly filled chunks they rewrite too)."""
    path = tmp_path / "a.zarr"
    X, y = _matrix(), _y()
    for layout in LAYOUTS.values():
        sparsestore.create(path, n_cols=M, overwrite=True, **layout).close()
        with sparsestore.open(path, mode="r+") as w:
            w.append(X[:N0 + 3], labels={"y": y[:N0 + 3]})
        h = sparsestore.open(path)
        with sparsestore.open(path, mode="r+") as w:
            w.append(X[N0 + 3 :], labels={"y": y[N0 + 3 :]})
        assert _same(h[:], X[: N0 + 3]) and np.array_equal(h.labels["y"][:], y[: N0 + 3])
        assert _same(h.to_dask().compute(), X[: N0 + 3])
        got = list(sparsestore.DataLoader(h, batch_size=256, labels="y"))
        assert _same(sp.vstack([b[0] for b in got]), X[: N0 + 3])
        assert np.array_equal(np.concatenate([b[1] for b in got]), y[: N0 + 3])


# ------------------------------------------------------------------ pickled handles

def test_pickled_handle_after_the_store_was_replaced(tmp_path):
    path = tmp_path / "s.zarr"
    X = _matrix(n=N0)
    h = sparsestore.save(path, X, labels={"y": _y(n=N0)}, **SMALL)
    early = pickle.dumps(h)
    sparsestore.save(path, _matrix(3, n=N0), labels={"y": _y(3, n=N0)}, overwrite=True,
                     **SMALL)
    for blob in (early, pickle.dumps(h)):
        with pytest.raises(StoreChangedError, match="replaced"):
            pickle.loads(blob)


def test_pickled_handle_keeps_its_snapshot_after_an_append(tmp_path):
    """Unpickling gives the rows the pickled handle saw (as the handle itself does), not
    rows committed after it; refresh() then looks again."""
    path = tmp_path / "s.zarr"
    X, y = _matrix(), _y()
    for layout in (SMALL, {}):
        with sparsestore.create(path, n_cols=M, overwrite=True, **layout) as w:
            w.append(X[: N0 + 3], labels={"y": y[: N0 + 3]})
            blob = pickle.dumps(w)
            w.append(X[N0 + 3 :], labels={"y": y[N0 + 3 :]})
        h = pickle.loads(blob)
        assert h.shape == (N0 + 3, M) and h.nnz == X[: N0 + 3].nnz and h.mode == "r"
        assert _same(h[:], X[: N0 + 3]) and np.array_equal(h.labels["y"][:], y[: N0 + 3])
        assert _same(h.to_dask().compute(), X[: N0 + 3])
        assert _same(h.refresh()[:], X) and np.array_equal(h.labels["y"][:], y)


def test_pickled_handle_of_an_empty_store_ignores_later_labels(tmp_path):
    path = tmp_path / "s.zarr"
    w = sparsestore.create(path, n_cols=M, **SMALL)
    blob = pickle.dumps(w)
    w.append(_matrix(n=10), labels={"y": _y(n=10)})
    w.close()
    h = pickle.loads(blob)
    assert h.shape == (0, M) and list(h.labels) == [] and h[:].shape == (0, M)


def test_pickled_handle_after_a_restore(tmp_path):
    path, backup, X, y = _grown(tmp_path, SMALL)
    blob = pickle.dumps(sparsestore.open(path))
    _restore(backup, path, "replace")
    with pytest.raises(StoreChangedError, match=WENT_BACK):
        pickle.loads(blob)
    Z = _matrix(7)
    with sparsestore.open(path, mode="r+") as w:  # other rows, as many
        w.append(Z[N0:], labels={"y": y[N0:]})
    with pytest.raises(StoreChangedError, match=WENT_BACK):
        pickle.loads(blob)


def _child_reads(blob: bytes) -> tuple:
    """In a spawned process: unpickle a handle and read it (an unpickling error would kill a
    pool's worker, so it comes back as a value)."""
    try:
        store = pickle.loads(blob)
    except StoreChangedError as exc:
        return "StoreChangedError", str(exc)
    return store.shape, store[:]


def test_spawned_worker_reads_the_pickled_snapshot(tmp_path):
    path = tmp_path / "s.zarr"
    X = _matrix()
    w = sparsestore.create(path, n_cols=M, **SMALL)
    w.append(X[:N0])
    h = sparsestore.open(path)
    w.append(X[N0:])
    w.close()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        shape, got = pool.apply(_child_reads, (pickle.dumps(h),))
        assert shape == (N0, M) and _same(got, X[:N0])
        sparsestore.save(path, X, overwrite=True)
        kind, msg = pool.apply(_child_reads, (pickle.dumps(h),))
        assert kind == "StoreChangedError" and "replaced" in msg


# ------------------------------------------------------------ consolidated metadata

def _consolidated_store(tmp_path: Path) -> tuple[Path, sp.csr_matrix, np.ndarray]:
    path = tmp_path / "c.zarr"
    X, y = _matrix(), _y()
    sparsestore.save(path, X[:N0], labels={"y": y[:N0]}, **SMALL)
    with pytest.warns(UserWarning, match="onsolidated"):
        zarr.consolidate_metadata(str(path))
    return path, X, y


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_append_to_a_consolidated_store(tmp_path):
    """zarr.consolidate_metadata() copies every array's metadata into the root; an append
    must neither trust that copy nor leave it stale for zarr readers."""
    path, X, y = _consolidated_store(tmp_path)
    assert _same(sparsestore.open(path)[:], X[:N0])
    with sparsestore.open(path, mode="r+") as w:
        w.append(X[N0:], labels={"y": y[N0:]})
        assert w.shape == (N, M)
    s = sparsestore.open(path)
    assert s.shape == (N, M) and _same(s[:], X) and np.array_equal(s.labels["y"][:], y)
    assert validate_store(path).ok
    with sparsestore.open(path, mode="r+") as w:  # and again: nothing stuck
        w.append(X[:5], labels={"y": y[:5]})
    s = sparsestore.open(path)
    assert _same(s[:], sp.vstack([X, X[:5]]).tocsr())
    # zarr's own readers (anndata) see the arrays as they are, not the stale copy.
    g = zarr.open_group(str(path), mode="r")
    assert g["indptr"].shape == (N + 6,) and g["labels"]["y"].shape == (N + 5,)


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_stale_consolidated_metadata_is_not_read(tmp_path):
    """A consolidated copy left stale (by another tool) names the old array shapes:
    opening reads the arrays' own metadata."""
    path, X, y = _consolidated_store(tmp_path)
    stale = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]
    with sparsestore.open(path, mode="r+") as w:
        w.append(X[N0:], labels={"y": y[N0:]})
    root = json.loads((path / "zarr.json").read_text())
    root["consolidated_metadata"] = stale
    (path / "zarr.json").write_text(json.dumps(root))
    s = sparsestore.open(path)
    assert s.shape == (N, M) and _same(s[:], X) and np.array_equal(s.labels["y"][:], y)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dask_workers_in_other_processes_after_a_restore(tmp_path):
    """Workers reopen the store by path: they read the commit the dask array was made from,
    or raise; never rows appended after a restore."""
    path, backup, X, y = _grown(tmp_path, SMALL)
    h = sparsestore.open(path)
    D = h.to_dask()
    with sparsestore.open(path, mode="r+") as w:  # a later append is not seen
        w.append(X[:10], labels={"y": y[:10]})
    assert _same(D.compute(scheduler="processes", num_workers=1), X)
    _restore(backup, path, "replace")
    with sparsestore.open(path, mode="r+") as w:
        w.append(_matrix(7)[N0:], labels={"y": y[N0:]})
    with pytest.raises(StoreChangedError, match=WENT_BACK):
        D.compute(scheduler="processes", num_workers=1)
