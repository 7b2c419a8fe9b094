"""What verification must not let through: a shard index pointing an inner chunk at other
bytes, and a store whose metadata claims it predates the manifest.  Every read either
raises a :class:`SparseStoreError` or returns exactly what was saved (scipy/numpy as the
oracle), and ``validate`` reports the damage."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import sparsestore
from benchmarks.forge import unseal
from sparsestore.errors import (
    CorruptStoreError,
    MisplacedChunkError,
    UnverifiedStoreWarning,
)
from sparsestore.validate import validate_store

N, M = 3000, 60
PER = 4  # inner chunks per shard


def _matrix() -> sp.csr_matrix:
    X = sp.random(N, M, density=0.1, format="csr", dtype=np.float32, random_state=11)
    X.data += 1  # no stored zeros: a zero-filled chunk would be visibly wrong
    return X


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("verification")
    X = _matrix()
    y = np.random.default_rng(3).integers(1, 9, N).astype(np.int64)
    # data/indices: 1024-element inner chunks, 4 per shard
    sparsestore.save(root / "sh.zarr", X, chunk_bytes=2048, shard_bytes=16384)
    sparsestore.save(root / "s.zarr", X, labels={"y": y}, chunk_bytes=4096, indptr_chunk=256,
                     dense_chunk_bytes=4096)
    return root, X, y


@pytest.fixture
def copy(pristine, tmp_path):
    root, X, y = pristine

    def make(name: str) -> Path:
        return Path(shutil.copytree(root / name, tmp_path / name))

    return make


# ------------------------------------------------------------- shard index entries

def _read_index(shard: Path) -> tuple[bytes, np.ndarray]:
    raw = shard.read_bytes()
    size = PER * 16 + 4
    return raw, np.frombuffer(raw[-size:-4], "<u8").reshape(PER, 2).copy()


def _write_index(shard: Path, raw: bytes, index: np.ndarray) -> None:
    """Replace a shard's index, with its CRC32C recomputed: the index itself is valid."""
    body = index.astype("<u8").tobytes()
    tag = (google_crc32c.value(body) & 0xFFFFFFFF).to_bytes(4, "little")
    shard.write_bytes(raw[: -(PER * 16 + 4)] + body + tag)


def _readers(s):
    rows = np.arange(0, s.n_rows, 3)[::-1]
    return {
        "slice": lambda: s[:],
        "row slices": lambda: [s[a : a + 40] for a in range(0, s.n_rows, 40)],
        "rows": lambda: s[rows],
        "dask": lambda: s.to_dask().compute(),
        "loader": lambda: list(sparsestore.DataLoader(s, batch_size=128)),
        "shuffled loader": lambda: list(sparsestore.DataLoader(s, batch_size=128, shuffle=True,
                                                               seed=1)),
    }


@pytest.mark.parametrize("array", ["data", "indices"])
@pytest.mark.parametrize("src, dst", [(1, 2), (2, 1), (0, 3), (3, 0)])
def test_shard_index_entry_pointed_at_another_inner_chunk(copy, array, src, dst):
    """Inner chunk ``src`` of shard 1 points at inner chunk ``dst``'s bytes (both entries
    now hold the same range): every read that needs that shard raises, none is wrong."""
    path = copy("sh.zarr")
    shard = path / array / "c" / "1"
    raw, index = _read_index(shard)
    index[src] = index[dst]
    _write_index(shard, raw, index)
    s = sparsestore.open(path)
    for what, read in _readers(s).items():
        with pytest.raises(MisplacedChunkError, match=f"array {array!r}"):
            read()
            pytest.fail(f"{what} read the damaged shard without an error")
    report = validate_store(path)
    assert not report.ok
    assert any("MisplacedChunk" in p or "not committed at that position" in p
               for p in report.problems), report.problems


@pytest.mark.parametrize("array", ["data", "indices"])
def test_shard_index_entries_swapped(copy, pristine, array):
    """Two entries swapped: each inner chunk is intact, but in the other's place."""
    _, X, _ = pristine
    path = copy("sh.zarr")
    shard = path / array / "c" / "0"
    raw, index = _read_index(shard)
    index[[1, 2]] = index[[2, 1]]
    _write_index(shard, raw, index)
    s = sparsestore.open(path)
    for read in _readers(s).values():
        with pytest.raises(MisplacedChunkError):
            read()
    assert not validate_store(path).ok
    assert (s[N - 100 :] != X[N - 100 :]).nnz == 0  # other shards read exactly


def test_row_slice_inside_one_inner_chunk_is_checked(copy, pristine):
    """A read needing only the first inner chunk of a shard, whose entry points at the
    next one's bytes, raises instead of returning that chunk's values."""
    _, X, _ = pristine
    path = copy("sh.zarr")
    shard = path / "data" / "c" / "1"
    raw, index = _read_index(shard)
    index[0] = index[1]
    _write_index(shard, raw, index)
    s = sparsestore.open(path)
    first = 1 * PER * 1024  # first element of shard 1
    row = int(np.searchsorted(X.indptr, first, side="right"))  # starts inside inner chunk 0
    with pytest.raises(MisplacedChunkError, match="'data'"):
        s[row : row + 2]


def test_a_range_the_index_does_not_name_fails_closed(copy):
    """A range read of a shard that matches no entry of its index is refused, not passed
    through unchecked (here: the second half of an inner chunk)."""
    from sparsestore.zarr_compat import RangeByteRequest

    path = copy("sh.zarr")
    s = sparsestore.open(path)
    _, index = _read_index(path / "data" / "c" / "1")
    off, n = (int(v) for v in index[2])
    store = s.group.store
    key = "data/c/1"
    assert store.get_sync(key, byte_range=RangeByteRequest(off, off + n)) is not None
    with pytest.raises(MisplacedChunkError):
        store.get_sync(key, byte_range=RangeByteRequest(off + 8, off + n))


# ------------------------------------------------- stores claiming to predate the manifest

def _attrs(path: Path) -> dict:
    return dict(zarr.open_group(str(path), mode="r").attrs)


def _set_meta(path: Path, **fields) -> None:
    """Edit ``attrs["sparsestore"]``; a field set to None is removed."""
    g = zarr.open_group(str(path), mode="r+")
    meta = dict(g.attrs["sparsestore"])
    for k, v in fields.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    g.attrs["sparsestore"] = meta


def _chunk(path: Path, array: str, k: int) -> Path:
    base = path / array / "c" / str(k)
    return base / "0" if base.is_dir() else base


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("drop", [None, "manifest", "generation"])
def test_old_format_version_with_manifest_fields_is_refused(copy, drop):
    """format_version edited 2 -> 1 while the manifest (or the generation) is still there:
    refused on open, by validate and by upgrade (which writes nothing), naming the field;
    never opened unverified so that a moved chunk reads as valid data."""
    path = copy("s.zarr")
    shutil.copyfile(_chunk(path, "labels/y", 2), _chunk(path, "labels/y", 1))
    fields = {"format_version": 1}
    if drop:
        fields[drop] = None
    _set_meta(path, **fields)
    before = _snapshot(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CorruptStoreError, match="format_version") as info:
            sparsestore.open(path)
    assert "format_version" in str(info.value) and "2" in str(info.value)
    report = validate_store(path)
    assert not report.ok and any("format_version" in p for p in report.problems)
    with pytest.raises(CorruptStoreError, match="format_version"):
        sparsestore.upgrade(path)
    assert _snapshot(path) == before


@pytest.mark.parametrize("how", ["old format", "no sparsestore attrs"])
def test_unverified_store_warns_once_at_open(copy, pristine, how):
    _, X, _ = pristine
    path = copy("s.zarr")
    if how == "old format":
        unseal(path)
    else:  # as anndata writes a CSR group: no labels either
        g = zarr.open_group(str(path), mode="r+")
        g.attrs.__delitem__("sparsestore")
        shutil.rmtree(path / "labels")
    with pytest.warns(UnverifiedStoreWarning) as record:
        s = sparsestore.open(path)
    ours = [w for w in record if issubclass(w.category, UnverifiedStoreWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "not checked" in msg and "sparsestore upgrade" in msg and str(path) in msg
    assert ours[0].filename == __file__  # points at the caller's open()
    assert not s.verified and (s[:] != X).nnz == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s[:10]  # reads do not repeat it


def test_deleted_sparsestore_attrs_beside_labels_are_refused(copy):
    """Deleting attrs["sparsestore"] would drop the manifest and the labels and read the rest
    unchecked; a group that still holds our labels says it was ours: refused, never read."""
    path = copy("s.zarr")
    shutil.copyfile(_chunk(path, "data", 2), _chunk(path, "data", 1))  # a moved chunk
    g = zarr.open_group(str(path), mode="r+")
    g.attrs.__delitem__("sparsestore")
    with pytest.raises(CorruptStoreError, match=r"attrs\['sparsestore'\] is missing"):
        sparsestore.open(path)
    assert not validate_store(path).ok
    before = _snapshot(path)
    with pytest.raises(CorruptStoreError):
        sparsestore.upgrade(path)
    assert _snapshot(path) == before


@pytest.mark.parametrize("field, value", [("per_object", 2**40), ("per_object", 2),
                                          ("trailer", False)])
def test_manifest_fields_that_disagree_with_the_array_are_refused_at_open(copy, field, value):
    """A manifest entry saying how an array's objects are tagged must match the array's own
    codecs: per_object 2**40 made the first read allocate a 2**40-long list."""
    path = copy("s.zarr")
    g = zarr.open_group(str(path), mode="r+")
    meta = dict(g.attrs["sparsestore"])
    meta["manifest"]["arrays"]["labels/y"][field] = value
    g.attrs["sparsestore"] = meta
    with pytest.raises(CorruptStoreError, match="does not match its manifest"):
        sparsestore.open(path)
    assert not validate_store(path).ok


def test_verified_store_opens_without_a_warning(copy):
    path = copy("s.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sparsestore.open(path).verified


def _edit_array(path: Path, name: str, fn) -> None:
    arr = zarr.open_array(str(path / name), mode="r+")
    vals = arr[:]
    fn(vals)
    arr[:] = vals


@pytest.mark.parametrize("damage", ["index out of range", "negative index", "unsorted row",
                                    "duplicate in row", "indptr not monotone",
                                    "indptr[0] not 0", "short label"])
def test_upgrade_refuses_a_structurally_broken_store_and_writes_nothing(copy, pristine, damage):
    _, X, _ = pristine
    path = copy("s.zarr")
    unseal(path)
    r = next(i for i in range(N) if X.indptr[i + 1] - X.indptr[i] >= 3)
    a = int(X.indptr[r])
    if damage == "index out of range":
        _edit_array(path, "indices", lambda v: v.__setitem__(a + 2, M + 5))
    elif damage == "negative index":
        _edit_array(path, "indices", lambda v: v.__setitem__(a, -1))
    elif damage == "unsorted row":
        _edit_array(path, "indices", lambda v: v.__setitem__(slice(a, a + 2), v[a : a + 2][::-1]))
    elif damage == "duplicate in row":
        _edit_array(path, "indices", lambda v: v.__setitem__(a + 1, v[a]))
    elif damage == "indptr not monotone":
        _edit_array(path, "indptr", lambda v: v.__setitem__(r + 1, v[r + 3] + 1))
    elif damage == "indptr[0] not 0":
        _edit_array(path, "indptr", lambda v: v.__setitem__(0, 1))
    else:
        g = zarr.open_group(str(path), mode="r+")
        g["labels/y"].resize((N - 7,))
    before = _snapshot(path)
    with pytest.raises(CorruptStoreError):
        sparsestore.upgrade(path)
    assert _snapshot(path) == before
    assert not _attrs(path)["sparsestore"].get("manifest")


@pytest.mark.parametrize("cli", [False, True])
def test_upgrade_cannot_tell_a_deleted_chunk_from_one_never_stored(copy, pristine, capsys, cli):
    """An old store's absent chunk reads as zeros: upgrade stores it, but says it may have
    been deleted, naming it, rather than claiming it was an all-zero chunk never written."""
    from sparsestore.cli import main

    _, _, y = pristine
    path = copy("s.zarr")
    unseal(path)
    _chunk(path, "labels/y", 1).unlink()
    if cli:
        assert main(["upgrade", "-q", str(path)]) == 0
        out = capsys.readouterr().out
        assert "never stored are" not in out
        assert "cannot tell" in out and "deleted" in out and "labels/y" in out
    else:
        done = sparsestore.upgrade(path)
        assert done["written_chunks"] == 1 and done["absent_chunks"] == ["labels/y/1"]
    got = sparsestore.open(path).labels["y"][:]
    c = zarr.open_array(str(path / "labels/y")).chunks[0]
    assert np.array_equal(got[c : 2 * c], np.zeros(c, y.dtype))  # stored as read: zeros
    assert np.array_equal(np.delete(got, np.s_[c : 2 * c]), np.delete(y, np.s_[c : 2 * c]))
