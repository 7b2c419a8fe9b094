"""The chunk manifest: a chunk that is missing, misplaced or reinterpreted is an error on
every read and in ``validate``, never zeros or another chunk's numbers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsestore
from benchmarks.forge import unseal
from sparsestore.errors import (
    CorruptStoreError,
    MisplacedChunkError,
    MissingChunkError,
    NeedsUpgradeError,
    SparseStoreError,
    StoreChangedError,
)
from sparsestore.validate import validate_store

N, M = 4000, 300
LAYOUT = {"chunk_bytes": 4096, "indptr_chunk": 256, "dense_chunk_bytes": 4096}


def _matrix(seed: int = 0) -> sp.csr_matrix:
    X = sp.random(N, M, density=0.05, format="csr", dtype=np.float32, random_state=seed)
    X.data += 1  # no stored zeros: a zero-filled chunk would be visibly wrong
    return X


def _labels(seed: int = 0) -> dict[str, np.ndarray]:
    return {"y": np.random.default_rng(seed).integers(1, 9, N).astype(np.int64)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Pristine stores of every kind the table names, built once."""
    root = tmp_path_factory.mktemp("manifest")
    X, D = _matrix(), np.random.default_rng(1).random((N, 12)).astype(np.float32) + 1
    sparsestore.save(root / "s.zarr", X, labels=_labels(), **LAYOUT)
    sparsestore.save(root / "other.zarr", _matrix(5), labels=_labels(5), **LAYOUT)
    sparsestore.save(root / "d.zarr", D, sparse=False, **LAYOUT)
    sparsestore.save(root / "sh.zarr", X, shard_bytes=16384, **LAYOUT)
    Z = X.copy()
    Z.data[::3] = 0  # explicit zeros, kept
    sparsestore.save(root / "kz.zarr", Z, keep_zeros=True, **LAYOUT)
    sparsestore.save(root / "nock.zarr", X, checksum=False, **LAYOUT)
    return root, {"s": X, "other": _matrix(5), "d": D, "sh": X, "kz": Z, "nock": X}


@pytest.fixture
def fresh(stores, tmp_path):
    root, mats = stores

    def make(kind: str) -> tuple[Path, object]:
        dst = tmp_path / f"{kind}.zarr"
        shutil.copytree(root / f"{kind}.zarr", dst)
        return dst, mats[kind]

    return make


def chunk_file(store: Path, array: str, k: int) -> Path:
    base = store / array / "c" / str(k)
    return base / "0" if base.is_dir() else base


def assert_every_read_raises(path: Path, array: str, exc: type[BaseException],
                             *fragments: str) -> None:
    """Each way of reading what ``array`` holds raises ``exc``; validate reports it too."""
    s = sparsestore.open(path)
    rows = np.arange(0, s.n_rows, 3)[::-1]
    if array.startswith("labels/"):
        lab = s.labels[array.split("/", 1)[1]]
        readers = [lambda: lab[:], lambda: lab[rows],
                   lambda: list(sparsestore.DataLoader(s, batch_size=512, labels=lab.name)),
                   lambda: list(sparsestore.DataLoader(s, batch_size=512, labels=lab.name,
                                                       shuffle=True, seed=1))]
    else:
        readers = [lambda: s[:], lambda: s[rows], lambda: s.to_dask().compute(),
                   lambda: list(sparsestore.DataLoader(s, batch_size=512)),
                   lambda: list(sparsestore.DataLoader(s, batch_size=512, shuffle=True, seed=1))]
    for read in readers:
        with pytest.raises(exc) as info:
            read()
        for frag in fragments:
            assert frag in str(info.value)
    report = validate_store(path)
    assert not report.ok
    assert any(all(f in p for f in fragments) for p in report.problems), report.problems


# ------------------------------------------------------------------ missing chunks

@pytest.mark.parametrize("kind, array, k", [
    ("s", "data", 3), ("s", "indices", 0), ("s", "indptr", 2), ("s", "labels/y", 1),
    ("d", "X", 4), ("sh", "data", 1), ("kz", "data", 5), ("nock", "indices", 7),
])
def test_missing_chunk_is_an_error_on_every_read(fresh, kind, array, k):
    path, _ = fresh(kind)
    chunk_file(path, array, k).unlink()
    which = f"chunk {k} of" if kind != "sh" else "of"  # a shard's chunks are named one by one
    assert_every_read_raises(path, array, MissingChunkError, f"{which} array {array!r}",
                             "missing")


def test_a_missing_chunk_only_fails_the_reads_that_need_it(fresh):
    path, X = fresh("s")
    chunk_file(path, "data", (X.nnz - 1) // 1024).unlink()  # the last chunk of data
    s = sparsestore.open(path)
    assert (s[:100] != X[:100]).nnz == 0
    with pytest.raises(MissingChunkError):
        s[s.n_rows - 200 :]


# ---------------------------------------------------------------- misplaced chunks

@pytest.mark.parametrize("kind, array", [
    ("s", "data"), ("s", "indices"), ("s", "indptr"), ("s", "labels/y"), ("d", "X"),
    ("sh", "data"), ("kz", "data"), ("nock", "data"),
])
def test_chunk_copied_onto_another_position(fresh, kind, array):
    path, _ = fresh(kind)
    shutil.copyfile(chunk_file(path, array, 2), chunk_file(path, array, 1))
    which = "chunk 1 of" if kind != "sh" else "of"  # a shard's chunks are named one by one
    assert_every_read_raises(path, array, MisplacedChunkError, f"{which} array {array!r}")


@pytest.mark.parametrize("how", ["copy", "symlink"])
@pytest.mark.parametrize("array", ["data", "indices", "indptr", "labels/y"])
def test_same_chunk_from_another_store(fresh, stores, how, array):
    path, _ = fresh("s")
    other = stores[0] / "other.zarr"
    target = chunk_file(path, array, 1)
    target.unlink()
    if how == "copy":
        shutil.copyfile(chunk_file(other, array, 1), target)
    else:
        os.symlink(chunk_file(other, array, 1), target)
    assert_every_read_raises(path, array, MisplacedChunkError, f"chunk 1 of array {array!r}")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    array=st.sampled_from(["data", "indices", "indptr", "labels/y"]),
    k=st.integers(0, 40), j=st.integers(0, 40),
    op=st.sampled_from(["delete", "move", "foreign", "flip", "truncate"]),
)
def test_any_damage_raises_or_reads_exactly(fresh, stores, tmp_path_factory, array, k, j, op):
    """Whatever happens to one chunk file, a full read either raises a SparseStoreError or
    returns exactly the matrix and labels that were saved (numpy/scipy as the oracle)."""
    root, mats = stores
    path = tmp_path_factory.mktemp("h") / "s.zarr"
    shutil.copytree(root / "s.zarr", path)
    files = sorted((path / array / "c").iterdir(), key=lambda p: int(p.name))
    target = files[k % len(files)]
    if op == "move" and files[j % len(files)] == target:
        return
    if op == "delete":
        target.unlink()
    elif op == "move":
        shutil.copyfile(files[j % len(files)], target)
    elif op == "foreign":
        shutil.copyfile(chunk_file(root / "other.zarr", array, int(target.name)), target)
    elif op == "flip":
        raw = bytearray(target.read_bytes())
        raw[j % len(raw)] ^= 0x10
        target.write_bytes(bytes(raw))
    else:
        target.write_bytes(target.read_bytes()[: max(0, j % 64)])
    try:
        s = sparsestore.open(path)
        got, y = s[:], s.labels["y"][:]
    except SparseStoreError:
        return
    assert (got != mats["s"]).nnz == 0
    assert np.array_equal(y, _labels()["y"])


# ----------------------------------------------------------------- metadata edits

def edit_array_meta(path: Path, array: str, fn) -> None:
    f = path / array / "zarr.json"
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta))


def _codecs(meta):
    return meta["codecs"]


@pytest.mark.parametrize("array, change", [
    ("data", lambda m: m.update(data_type="int32")),
    ("data", lambda m: m.update(data_type="uint32")),
    ("indices", lambda m: m.update(data_type="uint32")),
    ("data", lambda m: _codecs(m)[0]["configuration"].update(endian="big")),
    ("labels/y", lambda m: m.update(data_type="float64")),
    ("data", lambda m: m.update(codecs=_codecs(m)[:-1])),  # crc32c removed
    ("indptr", lambda m: m.update(codecs=_codecs(m)[:-1])),
    ("data", lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[2048])),
    ("data", lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[2**40])),
    ("indptr", lambda m: m.update(fill_value=7)),
])
def test_edited_array_metadata_is_refused_on_open(fresh, array, change):
    path, _ = fresh("s")
    edit_array_meta(path, array, change)
    with pytest.raises(CorruptStoreError, match=array.replace("/", ".")):
        sparsestore.open(path)
    assert not validate_store(path).ok


def test_huge_chunk_shape_is_refused_without_allocating_even_without_manifest(fresh):
    path, _ = fresh("s")
    unseal(path)
    edit_array_meta(path, "data",
                    lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[2**40]))
    with pytest.raises(CorruptStoreError, match="chunks of shape"):
        sparsestore.open(path)


@pytest.mark.parametrize("shape", [[N, M + 50], [N, M - 1]])
def test_edited_column_count_is_refused(fresh, shape):
    path, _ = fresh("s")
    g = zarr.open_group(str(path), mode="r+")
    g.attrs["shape"] = shape
    with pytest.raises(CorruptStoreError, match="columns"):
        sparsestore.open(path)


def test_checksum_free_store_still_detects_damage(fresh):
    path, X = fresh("nock")
    assert (sparsestore.open(path)[:] != X).nnz == 0
    f = chunk_file(path, "data", 3)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 1
    f.write_bytes(bytes(raw))
    assert_every_read_raises(path, "data", MisplacedChunkError, "chunk 3 of array 'data'")


# ------------------------------------------------------------ overwrite under a reader

@pytest.mark.parametrize("rows", [N // 4, N, 2 * N])
def test_save_over_an_open_store(tmp_path, rows):
    path = tmp_path / "s.zarr"
    X = _matrix()
    sparsestore.save(path, X, labels=_labels(), **LAYOUT)
    old = sparsestore.open(path)
    B = sp.random(rows, M, density=0.05, format="csr", dtype=np.float32, random_state=9)
    B.data += 1
    sparsestore.save(path, B, labels={"y": np.zeros(rows, np.int64)}, overwrite=True, **LAYOUT)
    for read in (lambda: old[:], lambda: old.labels["y"][:],
                 lambda: list(sparsestore.DataLoader(old, batch_size=512))):
        with pytest.raises(StoreChangedError, match="replaced"):
            read()
    assert (sparsestore.open(path)[:] != B).nnz == 0  # a new handle reads the new store
    assert (old.refresh()[:] != B).nnz == 0


# ----------------------------------------------------------- indptr reaching readers

@pytest.mark.filterwarnings("ignore::sparsestore.errors.UnverifiedStoreWarning")
@pytest.mark.parametrize("where", ["middle", "last"])
def test_bad_indptr_is_caught_before_scipy(fresh, where):
    path, X = fresh("s")
    unseal(path)  # only a store without a manifest can carry such an indptr silently
    ip = zarr.open_array(str(path / "indptr"), mode="r+")
    vals = ip[:]
    if where == "middle":
        vals[1000] = vals[1002] + 5  # not monotone
    else:
        vals[N - 1] = X.nnz + 10  # beyond the data
    ip[:] = vals
    s = sparsestore.open(path)
    for read in (lambda: s[:], lambda: s[np.arange(0, N, 3)],
                 lambda: list(sparsestore.DataLoader(s, batch_size=256)),
                 lambda: list(sparsestore.DataLoader(s, batch_size=256, shuffle=True, seed=2))):
        with pytest.raises(CorruptStoreError, match="indptr"):
            read()


def test_edited_indptr_in_a_verified_store_is_misplaced(fresh):
    path, _ = fresh("s")
    ip = zarr.open_array(str(path / "indptr"), mode="r+")
    vals = ip[:]
    vals[1000] = vals[1002] + 5
    ip[:] = vals
    with pytest.raises(MisplacedChunkError, match="indptr"):
        sparsestore.open(path)[:]


# ------------------------------------------------------------ stores from before

def test_old_store_opens_validates_with_a_note_and_upgrades(fresh):
    path, X = fresh("s")
    unseal(path)
    with pytest.warns(sparsestore.errors.UnverifiedStoreWarning, match="sparsestore upgrade"):
        s = sparsestore.open(path)
    assert not s.verified and (s[:] != X).nnz == 0
    report = validate_store(path)
    assert report.ok and any("upgrade" in n for n in report.notes)
    with pytest.raises(NeedsUpgradeError, match="sparsestore upgrade"):
        sparsestore.open(path, mode="r+")
    done = sparsestore.upgrade(path)
    assert done["upgraded"]
    s = sparsestore.open(path)
    assert s.verified and (s[:] != X).nnz == 0
    assert np.array_equal(s.labels["y"][:], _labels()["y"])
    assert validate_store(path).ok and not validate_store(path).notes
    chunk_file(path, "data", 2).unlink()
    with pytest.raises(MissingChunkError):
        sparsestore.open(path)[:]
    assert not sparsestore.upgrade(path)["upgraded"]  # already has one


def test_upgrade_writes_out_chunks_zarr_never_stored(fresh):
    """An older store's all-zero chunk was never written; upgrade stores it explicitly."""
    path, _ = fresh("s")
    unseal(path)
    g = zarr.open_group(str(path), mode="r+")
    c = g["labels/y"].chunks[0]
    g["labels/y"][:c] = 0
    y = g["labels/y"][:]
    # zarr (by default) deletes a chunk that is all fill value, as older stores were written
    assert not chunk_file(path, "labels/y", 0).exists()
    assert sparsestore.upgrade(path)["written_chunks"] == 1
    assert np.array_equal(sparsestore.open(path).labels["y"][:], y)
    assert chunk_file(path, "labels/y", 0).exists()


def test_upgrade_refuses_a_damaged_store(fresh):
    path, _ = fresh("s")
    unseal(path)
    f = chunk_file(path, "data", 1)
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match="cannot upgrade"):
        sparsestore.upgrade(path)


def test_appends_keep_old_handles_exact_and_all_fill_chunks_stored(tmp_path):
    """An append rewrites the last, partly filled chunk: a handle opened before still reads
    its rows; all-zero chunks (labels of 0) are stored, so their absence would be damage."""
    path = tmp_path / "a.zarr"
    w = sparsestore.create(path, n_cols=M, **LAYOUT)
    X, y = _matrix(), np.zeros(N, np.int64)
    w.append(X[:1001], labels={"y": y[:1001]})
    old = sparsestore.open(path)
    for a in range(1001, N, 999):
        w.append(X[a : a + 999], labels={"y": y[a : a + 999]})
    w.close()
    assert (old[:] != X[:1001]).nnz == 0 and np.array_equal(old.labels["y"][:], y[:1001])
    new = sparsestore.open(path)
    assert (new[:] != X).nnz == 0
    assert validate_store(path).ok
    chunk_file(path, "labels/y", 0).unlink()
    with pytest.raises(MissingChunkError):
        sparsestore.open(path).labels["y"][:]


def test_cli_upgrade_and_validate_note(fresh):
    from sparsestore.cli import main

    path, X = fresh("s")
    unseal(path)
    assert main(["validate", "-q", str(path)]) == 0
    assert main(["upgrade", "-q", str(path)]) == 0
    assert sparsestore.open(path).verified
    assert main(["upgrade", "-q", str(path)]) == 0  # nothing to do
    chunk_file(path, "indices", 3).unlink()
    assert main(["validate", "-q", str(path)]) == 1


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("killed", [False, True])
def test_failed_append_then_append_again(tmp_path, monkeypatch, sparse, killed):
    """A failed append rolls back; a killed one (no rollback) leaves its chunks for the next
    writer to cut, rewriting the last partly filled chunks.  Either way the next append
    commits the tags of what is on disk, and everything reads back exactly."""
    from sparsestore.appender import Appender
    from sparsestore.store import SparseStore

    path = tmp_path / "f.zarr"
    X, y = _matrix(), _labels()["y"]
    D = X.toarray()
    w = sparsestore.create(path, n_cols=M, sparse=sparse, **LAYOUT)
    src = X if sparse else D
    w.append(src[:1500], labels={"y": y[:1500]})

    def blocks():
        yield src[1500:2500], {"y": y[1500:2500]}
        raise RuntimeError("source failed")

    with monkeypatch.context() as m:
        if killed:  # as if the process died: nothing cleans up
            m.setattr(Appender, "truncate", lambda *a, **k: None)
            m.setattr(SparseStore, "_load", lambda *a, **k: None)
        with pytest.raises(RuntimeError, match="source failed"):
            w.appender.append_blocks(blocks())
    w.close()
    with sparsestore.open(path, mode="r+") as again:  # a fresh writer cuts the tail first
        again.append(src[1500:], labels={"y": y[1500:]})
    s = sparsestore.open(path)
    got = s[:]
    assert np.array_equal(got, D) if not sparse else (got != X).nnz == 0
    assert np.array_equal(s.labels["y"][:], y)
    assert validate_store(path).ok
