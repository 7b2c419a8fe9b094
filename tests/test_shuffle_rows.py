"""convert(shuffle_rows=SEED): the new store is the source's rows in the order of a seeded
permutation, checked against scipy/numpy indexing of the matrix in memory."""

from __future__ import annotations

import math
import os
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

import sparsestore
from sparsestore.cli import main
from sparsestore.errors import InvalidInputError, LabelError
from sparsestore.ingest import shuffle as shuffle_mod
from sparsestore.mixing import batch_mixing


def _matrix(n: int = 3000, m: int = 40, density: float = 0.1, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = sp.random(n, m, density=density, format="csr", random_state=rng, dtype=np.float32)
    X.data += 1  # no stored value rounds to zero
    X.data[X.indptr[5] : X.indptr[6]] = 0  # an empty row, kept as one
    X.eliminate_zeros()
    assert X.getrow(5).nnz == 0
    return X


def _same(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    return a.shape == b.shape and (a != b).nnz == 0


def _perm(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


@pytest.fixture
def source(tmp_path):
    X = _matrix()
    n = X.shape[0]
    labels = {"y": np.arange(n) % 7, "w": np.random.default_rng(1).random((n, 3))}
    sparsestore.save(tmp_path / "src.zarr", X, labels, chunk_bytes=16 * 1024)
    return tmp_path / "src.zarr", X, labels


class _CountBlocks:
    """Wraps ``shuffled_blocks`` to count the output blocks a convert reads."""

    def __init__(self, monkeypatch, fail_after: int | None = None) -> None:
        self.blocks = 0
        self.fail_after = fail_after
        real = shuffle_mod.shuffled_blocks

        def counting(*args, **kwargs):
            for pair in real(*args, **kwargs):
                if self.fail_after is not None and self.blocks == self.fail_after:
                    raise OSError("disk on fire")
                self.blocks += 1
                yield pair

        monkeypatch.setattr(shuffle_mod, "shuffled_blocks", counting)


@pytest.mark.parametrize("memory_bytes", [2**30, 40_000])
def test_rows_and_labels_follow_the_seeded_permutation(source, tmp_path, memory_bytes,
                                                       monkeypatch):
    path, X, labels = source
    count = _CountBlocks(monkeypatch)
    new = sparsestore.convert(path, tmp_path / "new.zarr", shuffle_rows=7,
                              memory_bytes=memory_bytes, progress=False)
    perm = _perm(X.shape[0], 7)
    assert _same(new[:], X[perm])
    np.testing.assert_array_equal(new.labels["y"][:], labels["y"][perm])
    np.testing.assert_array_equal(new.labels["w"][:], labels["w"][perm])
    assert new.labels["source_row"].dtype == np.int64
    np.testing.assert_array_equal(new.labels["source_row"][:], perm)
    # the original order comes back from the recorded label
    back = np.argsort(new.labels["source_row"][:])
    assert _same(new[back], X)
    assert new.nnz == X.nnz
    if memory_bytes < 2**20:  # a tiny budget: many blocks, the output still exact
        rows, _ = shuffle_mod.plan_blocks(sparsestore.open(path), list(labels), memory_bytes)
        assert count.blocks == math.ceil(X.shape[0] / rows) >= 20
    else:
        assert count.blocks == 1


def test_the_seed_decides_the_order_and_repeats_it(source, tmp_path):
    path, X, _ = source
    a = sparsestore.convert(path, tmp_path / "a.zarr", shuffle_rows=3, progress=False)
    b = sparsestore.convert(path, tmp_path / "b.zarr", shuffle_rows=3, progress=False,
                            memory_bytes=50_000)
    c = sparsestore.convert(path, tmp_path / "c.zarr", shuffle_rows=4, progress=False)
    np.testing.assert_array_equal(a.labels["source_row"][:], b.labels["source_row"][:])
    assert _same(a[:], b[:])
    assert not np.array_equal(a.labels["source_row"][:], c.labels["source_row"][:])
    assert _same(c[:], X[_perm(X.shape[0], 4)])


def test_labels_option_copies_only_those_beside_source_row(source, tmp_path):
    path, X, labels = source
    new = sparsestore.convert(path, tmp_path / "new.zarr", shuffle_rows=1, labels=["y"],
                              progress=False)
    assert sorted(new.labels) == ["source_row", "y"]
    np.testing.assert_array_equal(new.labels["y"][:], labels["y"][_perm(X.shape[0], 1)])


def test_from_npz_and_npy_through_a_temporary_store(tmp_path):
    X = _matrix(n=1500, seed=2)
    perm = _perm(1500, 11)
    sp.save_npz(tmp_path / "x.npz", X)
    spill = tmp_path / "spill"
    spill.mkdir()
    new = sparsestore.convert(tmp_path / "x.npz", tmp_path / "n.zarr", shuffle_rows=11,
                              memory_bytes=30_000, tmp_dir=spill, progress=False)
    assert _same(new[:], X[perm])
    np.testing.assert_array_equal(new.labels["source_row"][:], perm)
    assert os.listdir(spill) == []  # the temporary store is gone
    D = X.toarray()
    np.save(tmp_path / "d.npy", D)
    new = sparsestore.convert(tmp_path / "d.npy", tmp_path / "d.zarr", shuffle_rows=11,
                              memory_bytes=30_000, tmp_dir=spill, progress=False)
    np.testing.assert_array_equal(new[:].toarray(), D[perm])
    dense = sparsestore.convert(tmp_path / "d.npy", tmp_path / "dd.zarr", shuffle_rows=11,
                                sparse=False, memory_bytes=30_000, tmp_dir=spill,
                                progress=False)
    assert dense.is_dense
    np.testing.assert_array_equal(dense[:], D[perm])
    np.testing.assert_array_equal(dense.labels["source_row"][:], perm)
    assert os.listdir(spill) == []


def test_a_dense_store_source(tmp_path):
    D = np.random.default_rng(3).random((500, 6)).astype(np.float32)
    sparsestore.save(tmp_path / "d.zarr", D, {"y": np.arange(500)}, sparse=False)
    new = sparsestore.convert(tmp_path / "d.zarr", tmp_path / "n.zarr", shuffle_rows=2,
                              sparse=False, memory_bytes=4000, progress=False)
    perm = _perm(500, 2)
    np.testing.assert_array_equal(new[:], D[perm])
    np.testing.assert_array_equal(new.labels["y"][:], perm)


def test_an_empty_store_keeps_its_labels(tmp_path):
    sparsestore.save(tmp_path / "e.zarr", sp.csr_matrix((0, 4), dtype=np.float32),
                     {"y": np.zeros(0, np.int32)})
    new = sparsestore.convert(tmp_path / "e.zarr", tmp_path / "n.zarr", shuffle_rows=0,
                              progress=False)
    assert new.shape == (0, 4)
    assert sorted(new.labels) == ["source_row", "y"]


def test_a_label_name_clash_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    X = _matrix(n=200)
    sparsestore.save(tmp_path / "s.zarr", X, {"source_row": np.arange(200)})
    spill = tmp_path / "spill"
    spill.mkdir()
    with pytest.raises(LabelError, match="already has a label named 'source_row'"):
        sparsestore.convert(tmp_path / "s.zarr", tmp_path / "n.zarr", shuffle_rows=1,
                            progress=False)
    assert not (tmp_path / "n.zarr").exists()
    np.savez(tmp_path / "x.npz", data=X.data, indices=X.indices, indptr=X.indptr,
             shape=X.shape, format="csr", source_row=np.arange(200))
    with pytest.raises(LabelError, match="source_row"):
        sparsestore.convert(tmp_path / "x.npz", tmp_path / "n.zarr", shuffle_rows=1,
                            labels=["source_row"], tmp_dir=spill, progress=False)
    assert not (tmp_path / "n.zarr").exists() and os.listdir(spill) == []
    # a name of the user's choice, or leaving the clashing label out, works
    new = sparsestore.convert(tmp_path / "s.zarr", tmp_path / "n.zarr", shuffle_rows=1,
                              source_row_label="orig", progress=False)
    np.testing.assert_array_equal(new.labels["orig"][:], _perm(200, 1))
    np.testing.assert_array_equal(new.labels["source_row"][:], _perm(200, 1))
    # and the command line says it in one line, writing nothing
    assert main(["convert", str(tmp_path / "s.zarr"), str(tmp_path / "c.zarr"),
                 "--shuffle-rows", "1", "-q"]) == 1
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("kwargs,match", [
    ({"shuffle_rows": -1}, "non-negative integer seed"),
    ({"shuffle_rows": 1.5}, "non-negative integer seed"),
    ({"shuffle_rows": True}, "non-negative integer seed"),
    ({"source_row_label": "orig"}, "pass shuffle_rows"),
    ({"shuffle_rows": 1, "memory_bytes": 0}, "memory_bytes must be positive"),
])
def test_bad_options_are_refused(source, tmp_path, kwargs, match):
    path, _, _ = source
    with pytest.raises(InvalidInputError, match=match):
        sparsestore.convert(path, tmp_path / "n.zarr", progress=False, **kwargs)
    assert not (tmp_path / "n.zarr").exists()


def test_bad_label_name_is_refused(source, tmp_path):
    path, _, _ = source
    with pytest.raises(LabelError, match="not usable"):
        sparsestore.convert(path, tmp_path / "n.zarr", shuffle_rows=1,
                            source_row_label="a/b", progress=False)


def test_a_failure_midway_leaves_no_destination_and_no_temporary_store(tmp_path,
                                                                       monkeypatch):
    X = _matrix(n=1000)
    sp.save_npz(tmp_path / "x.npz", X)
    spill = tmp_path / "spill"
    spill.mkdir()
    _CountBlocks(monkeypatch, fail_after=3)
    with pytest.raises(OSError, match="disk on fire"):
        sparsestore.convert(tmp_path / "x.npz", tmp_path / "n.zarr", shuffle_rows=1,
                            memory_bytes=20_000, tmp_dir=spill, progress=False)
    assert not (tmp_path / "n.zarr").exists()
    assert os.listdir(spill) == []
    assert sorted(os.listdir(tmp_path)) == ["spill", "x.npz"]  # no staging left either
    # over an existing store with overwrite=True, the old store survives the failure
    old = sparsestore.save(tmp_path / "n.zarr", X[:10])
    assert old.n_rows == 10
    with pytest.raises(OSError, match="disk on fire"):
        sparsestore.convert(tmp_path / "x.npz", tmp_path / "n.zarr", shuffle_rows=1,
                            memory_bytes=20_000, tmp_dir=spill, overwrite=True,
                            progress=False)
    assert _same(sparsestore.open(tmp_path / "n.zarr")[:], X[:10])


def test_memory_stays_bounded_by_the_budget(tmp_path, monkeypatch):
    # 8 MB of entries (float32 values, int32 indices); a 1 MiB budget must hold neither the
    # matrix nor a decoded copy of all its chunks.  Small chunks (indptr's too) keep the
    # layout's fixed buffers out of the measure.
    n, per_row = 4000, 250
    rng = np.random.default_rng(5)
    indices = np.sort(rng.random((n, 400)).argsort(axis=1)[:, :per_row], axis=1).ravel()
    X = sp.csr_matrix((rng.random(n * per_row, dtype=np.float32) + 1, indices,
                       np.arange(n + 1) * per_row), shape=(n, 400))
    data_bytes = X.data.nbytes + X.indices.nbytes
    layout = {"chunk_bytes": 64 * 1024, "indptr_chunk": 4096}
    sparsestore.save(tmp_path / "s.zarr", X, **layout)
    del X
    # warm up: compiled kernels and lazy imports are not the convert's memory
    sparsestore.convert(tmp_path / "s.zarr", tmp_path / "w.zarr", shuffle_rows=9,
                        memory_bytes=2**30, progress=False, **layout)
    count = _CountBlocks(monkeypatch)
    tracemalloc.start()
    try:
        new = sparsestore.convert(tmp_path / "s.zarr", tmp_path / "n.zarr", shuffle_rows=9,
                                  memory_bytes=2**20, progress=False, **layout)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count.blocks >= 25
    assert peak < data_bytes / 4, (peak, data_bytes)
    X = sparsestore.open(tmp_path / "s.zarr")[:]
    assert _same(new[:], X[_perm(n, 9)])


def test_a_sequential_pass_over_a_shuffled_copy_mixes_like_a_permutation(tmp_path):
    n, k, batch = 20_000, 20, 256
    X = _matrix(n=n, m=10, density=0.2, seed=6)
    y = np.repeat(np.arange(k), n // k)  # sorted by label: storage order mixes nothing
    sparsestore.save(tmp_path / "sorted.zarr", X, {"y": y})
    new = sparsestore.convert(tmp_path / "sorted.zarr", tmp_path / "shuf.zarr",
                              shuffle_rows=0, memory_bytes=200_000, progress=False)

    def sequential(path):
        loader = sparsestore.DataLoader(sparsestore.open(path), batch_size=batch,
                                        labels="y")
        return [b.rows for b in loader.iter_batches()]

    ys = new.labels["y"][:]
    shuffled = batch_mixing(sequential(tmp_path / "shuf.zarr"), ys)
    in_order = batch_mixing(sequential(tmp_path / "sorted.zarr"), y)
    perm = np.random.default_rng(123).permutation(n)
    true = batch_mixing(np.array_split(perm, math.ceil(n / batch)), y)
    assert in_order.tv > 0.9
    assert abs(shuffled.tv - true.tv) < 0.25 * true.tv, (shuffled, true)
    assert shuffled.distinct > 0.95 * true.distinct


def test_the_command_line_shuffles_with_a_budget_and_a_label_name(source, tmp_path, capsys):
    path, X, labels = source
    assert main(["convert", str(path), str(tmp_path / "c.zarr"), "--shuffle-rows", "5",
                 "--memory-bytes", "64KiB", "--source-row-label", "orig", "-q"]) == 0
    assert "rows shuffled (seed 5)" in capsys.readouterr().out
    new = sparsestore.open(tmp_path / "c.zarr")
    perm = _perm(X.shape[0], 5)
    assert _same(new[:], X[perm])
    np.testing.assert_array_equal(new.labels["orig"][:], perm)
    np.testing.assert_array_equal(new.labels["y"][:], labels["y"][perm])
    assert main(["convert", str(path), str(tmp_path / "d.zarr"), "--source-row-label", "o",
                 "-q"]) == 1
    assert "pass shuffle_rows" in capsys.readouterr().err
    assert not (tmp_path / "d.zarr").exists()
