"""Every chunk carries a CRC32C: a flipped byte anywhere is an error naming the chunk, never
silently wrong numbers, on every read path, and ``validate_store`` reports it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsestore
from sparsestore.chunk_cache import ChunkCache
from sparsestore.errors import ChecksumError
from sparsestore.validate import validate_store

N, M = 2000, 60


def _matrix() -> sp.csr_matrix:
    return sp.random(N, M, density=0.1, format="csr", dtype=np.float32, random_state=7)


def _labels() -> dict[str, np.ndarray]:
    return {
        "y": np.arange(N, dtype=np.int64),
        "w": np.linspace(0, 1, 2 * N, dtype=np.float32).reshape(N, 2),
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One sparse and one dense store with many small chunks, built once per module."""
    root = tmp_path_factory.mktemp("integrity")
    X = _matrix()
    sparsestore.save(root / "s.zarr", X, labels=_labels(), chunk_bytes=2048, indptr_chunk=128,
                     dense_chunk_bytes=2048)
    D = np.arange(N * 12, dtype=np.float32).reshape(N, 12)
    sparsestore.save(root / "d.zarr", D, sparse=False, dense_chunk_bytes=2048)
    sparsestore.save(root / "sh.zarr", X, chunk_bytes=2048, shard_bytes=8192)
    return root, X, D


def chunk_files(store: Path, array: str) -> list[Path]:
    base = store / array / "c"
    files = [p for p in base.rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: tuple(int(x) for x in p.relative_to(base).parts))


def flip(path: Path, pos: int | None = None, mask: int = 0x5A) -> None:
    raw = bytearray(path.read_bytes())
    i = len(raw) // 2 if pos is None else pos % len(raw)
    raw[i] ^= mask
    path.write_bytes(bytes(raw))


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def chunk_of(path: Path, store: Path, array: str) -> int:
    return int(path.relative_to(store / array / "c").parts[0])


# Every way of reading rows a user or the loader can take.
def _read_paths(store):
    n = store.n_rows
    rows = np.arange(0, n, 3)
    mask = np.zeros(n, dtype=bool)
    mask[::2] = True
    paths = {
        "slice": lambda: store[:],
        "int": lambda: [store[i] for i in range(0, n, 7)],
        "step": lambda: store[::5],
        "fancy": lambda: store[rows[::-1]],
        "repeat": lambda: store[np.repeat(rows, 2)],
        "mask": lambda: store[mask],
        "rows_cols": lambda: store[rows, [0, 3, 5]],
        "loader": lambda: list(sparsestore.DataLoader(store, batch_size=128)),
        "loader_shuffled": lambda: list(
            sparsestore.DataLoader(store, batch_size=128, shuffle=True, seed=1)
        ),
    }
    if not store.is_dense:
        arrs = store.arrays
        paths["read_parts_cached"] = lambda: [
            store.read_parts(a, min(n, a + 100), (ChunkCache(arrs["data"]),
                                                  ChunkCache(arrs["indices"])))
            for a in range(0, n, 100)
        ]
        paths["take_parts"] = lambda: store.take_parts(rows)
    return paths


SPARSE_ARRAYS = ["data", "indices", "indptr"]


@pytest.mark.parametrize("array", SPARSE_ARRAYS)
def test_flip_in_matrix_chunk_raises_on_every_read_path(pristine, tmp_path, array):
    root, X, _ = pristine
    path = copy(root / "s.zarr", tmp_path / "t.zarr")
    files = chunk_files(path, array)
    victim = files[len(files) // 2]
    k = chunk_of(victim, path, array)
    flip(victim)
    store = sparsestore.open(path)
    for name, read in _read_paths(store).items():
        with pytest.raises(ChecksumError, match=rf"array '{array}', chunk {k}\b"):
            read()
        assert name  # every path raised
    report = validate_store(path)
    assert not report.ok
    assert f"{array}/{k}" in report.damaged_chunks
    assert any(f"'{array}', chunk {k}" in p for p in report.problems)


def test_reads_away_from_the_damage_are_exact(pristine, tmp_path):
    """A damaged chunk fails only the reads that need it; others still equal scipy."""
    root, X, _ = pristine
    path = copy(root / "s.zarr", tmp_path / "t.zarr")
    files = chunk_files(path, "data")
    flip(files[-1])  # the last data chunk: holds the last rows only
    store = sparsestore.open(path)
    first = store[:100]
    assert (first != X[:100]).nnz == 0
    np.testing.assert_array_equal(store[np.array([5, 1, 50])].toarray(),
                                  X[[5, 1, 50]].toarray())
    with pytest.raises(ChecksumError):
        store[N - 5 :]


@pytest.mark.parametrize("label", ["y", "w"])
def test_flip_in_label_chunk(pristine, tmp_path, label):
    root, X, _ = pristine
    path = copy(root / "s.zarr", tmp_path / "t.zarr")
    files = chunk_files(path, f"labels/{label}")
    assert len(files) >= 2
    victim = files[1]
    k = chunk_of(victim, path, f"labels/{label}")
    flip(victim)
    store = sparsestore.open(path)
    lab = store.labels[label]
    c = int(lab.array.chunks[0])
    inside = k * c + 3
    pattern = rf"array 'labels/{label}', chunk {k}\b"
    for read in (
        lambda: lab[:],
        lambda: lab[inside],
        lambda: lab[::7],
        lambda: lab[np.array([N - 1, inside, 0])],  # sparse selection: orthogonal read
        lambda: lab.take(np.array([inside, inside + 1])),  # compact selection
        lambda: lab.read(inside, inside + 1),
        lambda: np.asarray(lab),
        lambda: list(sparsestore.DataLoader(store, batch_size=200, labels=label)),
    ):
        with pytest.raises(ChecksumError, match=pattern):
            read()
    # Matrix reads do not touch labels and stay exact.
    assert (store[:] != X).nnz == 0
    report = validate_store(path)
    assert not report.ok and f"labels/{label}/{k}" in report.damaged_chunks


def test_flip_in_dense_chunk(pristine, tmp_path):
    root, _, D = pristine
    path = copy(root / "d.zarr", tmp_path / "t.zarr")
    files = chunk_files(path, "X")
    victim = files[len(files) // 2]
    k = chunk_of(victim, path, "X")
    flip(victim)
    store = sparsestore.open(path)
    assert store.is_dense
    for read in list(_read_paths(store).values()) + [lambda: store.read_dense(0, N)]:
        with pytest.raises(ChecksumError, match=rf"array 'X', chunk {k}\b"):
            read()
    report = validate_store(path)
    assert not report.ok and f"X/{k}" in report.damaged_chunks


def test_to_dask_raises_checksum_error(pristine, tmp_path):
    pytest.importorskip("sparsestore.dask")
    root, _, _ = pristine
    path = copy(root / "s.zarr", tmp_path / "t.zarr")
    flip(chunk_files(path, "data")[2])
    store = sparsestore.open(path)
    with pytest.raises(ChecksumError):
        store.to_dask(chunk_rows=300).compute(scheduler="synchronous")


@settings(max_examples=25, deadline=None)
@given(
    array=st.sampled_from(["data", "indices", "indptr", "labels/y", "labels/w"]),
    sharded=st.booleans(),
    which=st.integers(0, 10**6),
    pos=st.integers(0, 10**6),
    mask=st.integers(1, 255),
)
def test_any_flipped_byte_is_detected(pristine, tmp_path_factory, array, sharded, which, pos,
                                      mask):
    """Any single corrupted byte in any chunk (or shard) file: a full read raises
    ChecksumError and validate reports it; never a silently different matrix."""
    root, X, _ = pristine
    src = root / ("sh.zarr" if sharded and not array.startswith("labels") else "s.zarr")
    path = copy(src, tmp_path_factory.mktemp("flip") / "t.zarr")
    files = chunk_files(path, array)
    victim = files[which % len(files)]
    flip(victim, pos, mask)
    store = sparsestore.open(path) if array != "indptr" else None
    if store is None:
        try:
            store = sparsestore.open(path)
        except ChecksumError:  # open reads the first and the last indptr chunk
            store = None
    if store is not None:
        with pytest.raises(ChecksumError):
            if array.startswith("labels/"):
                store.labels[array.split("/")[1]][:]
            else:
                store[:]
    report = validate_store(path)
    assert not report.ok
    assert report.damaged_chunks
    shutil.rmtree(path)


def test_validate_counts_every_chunk(pristine):
    root, X, _ = pristine
    path = root / "s.zarr"
    report = validate_store(path)
    assert report.ok, report.summary()
    n_files = sum(len(chunk_files(path, a)) for a in ["data", "indices", "indptr",
                                                      "labels/y", "labels/w"])
    assert report.checked_chunks == n_files
    assert os.path.isdir(path)


def test_the_one_chain_decoder_against_numcodecs():
    import numcodecs

    from sparsestore.integrity import DamagedChunk, crc32c, decode_chain

    values = np.arange(5000, dtype=np.float32) % 7
    packed = np.frombuffer(numcodecs.Blosc(cname="lz4", clevel=5).encode(values), np.uint8)
    stored = np.concatenate([packed, np.frombuffer(crc32c(packed).to_bytes(4, "little"),
                                                   np.uint8)])
    got = decode_chain(stored, ("crc32c", "blosc"))
    np.testing.assert_array_equal(got.view(np.float32), values)
    dest = np.empty(values.nbytes, np.uint8)
    assert decode_chain(stored, ("crc32c", "blosc"), dest) is dest
    np.testing.assert_array_equal(dest.view(np.float32), values)
    np.testing.assert_array_equal(decode_chain(values.view(np.uint8), ()), values.view(np.uint8))
    bad = stored.copy()
    bad[20] ^= 1
    for raw, steps, what, out in [
        (bad, ("crc32c", "blosc"), "checksum", None),
        (stored[:3], ("crc32c", "blosc"), "checksum", None),
        (packed[:-10], ("blosc",), "header", None),
        (packed, ("blosc",), "header", np.empty(8, np.uint8)),
        (values.view(np.uint8), (), "size", np.empty(8, np.uint8)),
    ]:
        with pytest.raises(DamagedChunk) as info:
            decode_chain(raw, steps, out)
        assert info.value.what == what


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), flip=st.integers(-1, 5), at=st.integers(0, 10**6))
def test_decode_many_equals_the_chain_decoder_and_refuses_damage(n, flip, at):
    import numcodecs

    from sparsestore.integrity import crc32c, decode_chain, decode_many

    rng = np.random.default_rng(at)
    chunks = [rng.poisson(2, 4096).astype(np.int32) for _ in range(n)]
    stored = []
    for c in chunks:
        packed = np.frombuffer(numcodecs.Blosc(cname="lz4", clevel=5, shuffle=1).encode(c),
                               np.uint8)
        stored.append(np.concatenate([packed, np.frombuffer(
            crc32c(packed).to_bytes(4, "little"), np.uint8)]))
    if 0 <= flip < n:  # one byte of one stored chunk flipped: the batch refuses it
        stored[flip] = stored[flip].copy()
        stored[flip][at % stored[flip].size] ^= 1 << (at % 8)
    dest = np.zeros(n * 4096 * 4, np.uint8)
    ok = decode_many(stored, ("crc32c", "blosc"), dest)
    assert ok == (not 0 <= flip < n)
    if ok:
        np.testing.assert_array_equal(dest.view(np.int32), np.concatenate(chunks))
        # a chain without the CRC step agrees with the chain decoder chunk by chunk
        bare = [s[:-4] for s in stored]
        other = np.zeros_like(dest)
        assert decode_many(bare, ("blosc",), other)
        for j, s in enumerate(bare):
            np.testing.assert_array_equal(other[j * 16384 : (j + 1) * 16384],
                                          decode_chain(s, ("blosc",)))
    # a chunk that decodes to another size than its slot is refused
    assert not decode_many(stored[:1], ("crc32c", "blosc"), np.zeros(4096 * 4 + 8, np.uint8))
