"""Every ingest source against an independent oracle (scipy, numpy, anndata).

Each format round-trips; bad files of each format raise a clear sparsestore error and leave
no store behind (no destination, no staging directory, no spill directory).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsestore
from sparsestore.errors import (
    DTypeError,
    FormatError,
    InvalidInputError,
    LabelError,
    StoreExistsError,
    StoreNotFoundError,
    UnsafeInputError,
)
from sparsestore.ingest import from_coo, from_dict
from sparsestore.ingest.base import coalesce
from sparsestore.ingest.coo import CooSpill
from sparsestore.ingest.npz import NpzOptions, load_shard


def same(store, expected) -> None:
    """Store contents equal a scipy/numpy oracle exactly, in canonical CSR form."""
    got = store[:]
    exp = sp.csr_matrix(expected)
    exp.sum_duplicates()
    exp.eliminate_zeros()
    assert got.shape == exp.shape
    assert got.has_sorted_indices
    np.testing.assert_array_equal(got.indptr, exp.indptr)
    np.testing.assert_array_equal(got.indices, exp.indices)
    np.testing.assert_array_equal(got.data, exp.data.astype(got.dtype))


def leftovers(dst: Path) -> list[str]:
    """What a failed conversion may have left: dst itself, staging dirs, and anything in
    the test's private temp dir (spill directories)."""
    out = [str(dst)] if os.path.lexists(dst) else []
    out += [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    return out + sorted(os.listdir(tempfile.gettempdir()))


@pytest.fixture(autouse=True)
def _private_tempdir(tmp_path_factory, monkeypatch):
    """An empty temp dir of the test's own, so what is in it at the end the test left."""
    d = str(tmp_path_factory.mktemp("tmpdir"))
    monkeypatch.setenv("TMPDIR", d)
    monkeypatch.setattr(tempfile, "tempdir", d)
    return d


def rand(n, m, density=0.1, dtype=np.float32, seed=0, fmt="csr"):
    return sp.random(n, m, density=density, format=fmt, dtype=dtype,
                     random_state=np.random.default_rng(seed))


# ---------------------------------------------------------------------------- npz

def save_shards(tmp_path, mats, name="s{:02d}.npz") -> list[Path]:
    """``mats`` as scipy ``.npz`` files in ``tmp_path``, named in order (sorted = given)."""
    paths = [tmp_path / name.format(i) for i in range(len(mats))]
    for p, m in zip(paths, mats, strict=True):
        sp.save_npz(p, m)
    return paths


@pytest.fixture
def mixed_shards(tmp_path):
    """Eight shards of every npz kind, with their matrices in order."""
    mats, paths = [], []
    for i, fmt in enumerate(["csr", "csc", "coo", "bsr"]):
        X = rand(60 + 7 * i, 40, seed=i, fmt=fmt)
        paths.append(tmp_path / f"s{i}.npz")
        sp.save_npz(paths[-1], X)
        mats.append(sp.csr_matrix(X))
    X = rand(50, 40, seed=10, fmt="coo")
    paths.append(tmp_path / "s4.npz")
    np.savez_compressed(paths[-1], row=X.row, col=X.col, data=X.data, shape=np.array(X.shape))
    mats.append(X.tocsr())
    X = rand(45, 40, seed=11)
    paths.append(tmp_path / "s5.npz")
    np.savez_compressed(paths[-1], data=X.data, indices=X.indices, indptr=X.indptr,
                        shape=np.array(X.shape))
    mats.append(X)
    X = rand(30, 40, seed=12)
    paths.append(tmp_path / "s6.npz")
    np.savez_compressed(paths[-1], X=X.toarray())
    mats.append(X)
    X = rand(0, 40, seed=13)  # an empty shard is fine
    paths.append(tmp_path / "s7.npz")
    sp.save_npz(paths[-1], X)
    mats.append(X)
    return paths, mats


def test_npz_every_kind_glob_in_sorted_order(tmp_path, mixed_shards):
    paths, mats = mixed_shards
    store = sparsestore.convert(str(tmp_path / "s*.npz"), tmp_path / "out.zarr",
                                chunk_bytes=4096)
    same(store, sp.vstack(mats))
    assert store.dtype == np.float32


def test_npz_list_keeps_given_order_and_parallel_equals_sequential(tmp_path, mixed_shards):
    paths, mats = mixed_shards
    order = [5, 0, 6, 3, 1, 7, 2, 4]
    listed = [paths[i] for i in order]
    expected = sp.vstack([mats[i] for i in order])
    seq = sparsestore.convert(listed, tmp_path / "seq.zarr", workers=1)
    par = sparsestore.convert(listed, tmp_path / "par.zarr", workers=3)
    with ThreadPoolExecutor(2) as ex:
        ext = sparsestore.convert(listed, tmp_path / "ext.zarr", executor=ex)
    for st_ in (seq, par, ext):
        same(st_, expected)
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(seq.arrays[name][:], par.arrays[name][:])


def test_npz_many_small_shards_in_order(tmp_path):
    mats = [rand(3 + i % 5, 17, seed=i) for i in range(40)]
    paths = save_shards(tmp_path, mats, "part-{:03d}.npz")
    store = sparsestore.convert(paths, tmp_path / "o.zarr", workers=2, chunk_bytes=2048)
    same(store, sp.vstack(mats))


class _Recorder(ThreadPoolExecutor):
    """A thread pool that counts shards submitted."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize("lookahead, workers, most", [
    (0, 2, 1),  # workers - 1 shards ahead at least
    (0, 4, 3),
    (10**9, 2, 11),  # all, while their sizes fit the lookahead
])
def test_npz_shards_ahead_of_the_writer_are_bounded(tmp_path, lookahead, workers, most):
    import time

    from sparsestore.ingest.npz import npz_source

    mats = [rand(4, 6, seed=i) for i in range(12)]
    paths = [str(p) for p in save_shards(tmp_path, mats, "p{:02d}.npz")]
    with _Recorder(2) as ex:
        src = npz_source(paths, workers=workers, executor=ex, lookahead_bytes=lookahead)
        got, ahead = [], []
        for block, _ in src.blocks():
            got.append(block)
            # A slow writer: wait until the reader has run into its bound (or submitted
            # every shard), then a little longer so that running past it would show.
            deadline = time.monotonic() + 5
            while (ex.submitted - len(got) < most and ex.submitted < len(mats)
                   and time.monotonic() < deadline):
                time.sleep(0.002)
            time.sleep(0.02)
            ahead.append(ex.submitted - len(got))  # submitted beyond those written
    assert (sp.vstack(got) != sp.vstack(mats)).nnz == 0
    assert max(ahead) == most


def test_convert_writes_whole_chunks_until_the_last(tmp_path, monkeypatch):
    import zarr

    from sparsestore.chunks import ChunkEncoder

    writes: dict[str, list[tuple[int, int]]] = {}
    real = zarr.Array.__setitem__
    real_encode = ChunkEncoder.write

    def spy(self, key, value):  # writes through zarr
        if isinstance(key, slice):
            writes.setdefault(self.basename, []).append((key.start, key.stop))
        return real(self, key, value)

    def spy_encode(self, k, values):  # chunks the writer encodes itself
        lo = k * self.chunk
        writes.setdefault(self.arr.basename, []).append((lo, lo + values.size))
        return real_encode(self, k, values)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    monkeypatch.setattr(ChunkEncoder, "write", spy_encode)
    mats = [rand(20 + i % 4, 50, density=0.3, seed=i) for i in range(30)]
    paths = save_shards(tmp_path, mats)
    store = sparsestore.convert(paths, tmp_path / "o.zarr", workers=2, chunk_bytes=1024)
    same(store, sp.vstack(mats))
    for name in ("data", "indices"):
        chunk = store.arrays[name].chunks[0]
        spans = sorted(writes[name])  # a chunk may be encoded on the writer's encode thread
        assert len(spans) > 3
        assert spans[0][0] == 0 and spans[-1][1] == store.nnz
        for (a, b), (c, _) in zip(spans, spans[1:], strict=False):
            assert b == c and a % chunk == 0 and b % chunk == 0  # no chunk written twice


@pytest.mark.parametrize("compressor", ["none", "lz4"])
def test_convert_chunk_buffer_reuse_keeps_every_chunk(tmp_path, compressor):
    # The writer reuses one buffer per array for every chunk: what zarr stored must not
    # alias it (uncompressed chunks included), whatever the block sizes.
    mats = [rand(7 + 13 * (i % 5), 50, density=0.3, seed=i) for i in range(25)]
    mats.append(rand(400, 50, density=0.5, seed=99))  # blocks of several whole chunks
    paths = save_shards(tmp_path, mats)
    store = sparsestore.convert(paths, tmp_path / "o.zarr", workers=2, chunk_bytes=1024,
                                compressor=compressor)
    same(store, sp.vstack(mats))
    w = sparsestore.open(tmp_path / "o.zarr", mode="r+")  # an append from a partial chunk
    w.append(mats[3])
    w.close()
    same(sparsestore.open(tmp_path / "o.zarr"), sp.vstack([*mats, mats[3]]))


def test_npz_dense_key_custom_keys_labels_and_dtype_promotion(tmp_path):
    A = rand(20, 8, seed=1).toarray()
    np.savez_compressed(tmp_path / "a.npz", M=np.asfortranarray(A), other=np.zeros((3, 3)),
                        y=np.arange(20, dtype=np.int64))
    B = rand(10, 8, seed=2, dtype=np.float64, fmt="coo")
    np.savez_compressed(tmp_path / "b.npz", M=B.toarray(), other=np.zeros(1),
                        y=np.arange(20, 30, dtype=np.int64))
    store = sparsestore.convert([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "o.zarr",
                                key="M", labels=["y"])
    assert store.dtype == np.float64  # float32 + float64 shards -> float64, no loss
    same(store, np.vstack([A, B.toarray()]))
    np.testing.assert_array_equal(store.labels["y"][:], np.arange(30))
    C = rand(12, 5, seed=3, fmt="coo")
    np.savez_compressed(tmp_path / "c.npz", i=C.row, j=C.col, v=C.data, dims=np.array(C.shape))
    store = sparsestore.convert(tmp_path / "c.npz", tmp_path / "c.zarr",
                                keys={"row": "i", "col": "j", "data": "v", "shape": "dims"})
    same(store, C)


def test_npz_dense_kept_dense(tmp_path):
    A = np.arange(60, dtype=np.float32).reshape(12, 5)
    np.savez_compressed(tmp_path / "d.npz", A)
    store = sparsestore.convert(tmp_path / "d.npz", tmp_path / "o.zarr", sparse=False)
    assert store.is_dense
    np.testing.assert_array_equal(store[:], A)


def test_npz_load_shard_is_picklable_work(tmp_path):
    X = rand(30, 9, seed=4)
    sp.save_npz(tmp_path / "x.npz", X)
    fn, opts = pickle.loads(pickle.dumps((load_shard, NpzOptions())))
    out = fn(str(tmp_path / "x.npz"), opts)
    assert all(isinstance(v, np.ndarray) for v in out.values())
    same_parts = sp.csr_matrix((out["data"], out["indices"], out["indptr"]),
                               shape=tuple(out["shape"]))
    assert (same_parts != X).nnz == 0


def _corrupt_copy(src: Path, dst: Path) -> None:
    raw = bytearray(src.read_bytes())
    mid = len(raw) // 3
    raw[mid : mid + 64] = b"\x00" * 64  # inside compressed member data
    dst.write_bytes(bytes(raw))


@pytest.mark.parametrize("bad", ["truncated", "corrupt", "pickled", "object", "npy_named_npz",
                                 "columns", "bomb", "not_2d", "ambiguous"])
def test_npz_bad_shard_fails_cleanly_naming_the_file(tmp_path, bad):
    good = []
    for i in range(3):
        good.append(tmp_path / f"g{i}.npz")
        sp.save_npz(good[-1], rand(200, 30, seed=i), compressed=True)
    p = tmp_path / "bad.npz"
    kwargs = {}
    if bad == "truncated":
        p.write_bytes(good[0].read_bytes()[:-200])
    elif bad == "corrupt":
        _corrupt_copy(good[0], p)
    elif bad == "pickled":
        p.write_bytes(pickle.dumps({"data": [1, 2, 3]}))
    elif bad == "object":
        np.savez(p, X=np.array([[1, None]], dtype=object))
    elif bad == "npy_named_npz":
        with open(p, "wb") as f:
            np.save(f, np.ones((3, 30)))
    elif bad == "columns":
        sp.save_npz(p, rand(10, 31, seed=9))
    elif bad == "bomb":
        np.savez_compressed(p, X=np.zeros((4000, 30)))  # ~1 MB of zeros, tiny on disk
        kwargs["max_bytes"] = 100_000
    elif bad == "not_2d":
        np.savez_compressed(p, X=np.zeros(5))
    elif bad == "ambiguous":
        np.savez_compressed(p, a=np.zeros((2, 30)), b=np.zeros((2, 30)))
    dst = tmp_path / "out.zarr"
    expected = UnsafeInputError if bad in ("pickled", "object", "bomb") else FormatError
    with pytest.raises(expected) as info:
        sparsestore.convert([*good[:2], p, good[2]], dst, workers=2, **kwargs)
    assert "bad.npz" in str(info.value)
    assert leftovers(dst) == []


def test_npz_member_bigger_than_its_zip_entry_says_is_refused(tmp_path):
    import io
    import struct
    import zipfile

    def npy(a):
        b = io.BytesIO()
        np.lib.format.write_array(b, a)
        return b.getvalue()

    X = rand(50, 30, seed=3)
    p = tmp_path / "lying.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.npy", npy(X.data))
        zf.writestr("indices.npy", npy(X.indices))
        zf.writestr("indptr.npy", npy(X.indptr))
        zf.writestr("shape.npy", npy(np.array(X.shape, dtype=np.int64)))
    raw = bytearray(p.read_bytes())
    at = raw.index(b"PK\x01\x02")  # the first central directory entry: data.npy
    name_len = struct.unpack_from("<H", raw, at + 28)[0]
    assert raw[at + 46 : at + 46 + name_len] == b"data.npy"
    size = struct.unpack_from("<I", raw, at + 24)[0]
    struct.pack_into("<I", raw, at + 24, size - 8)  # declare 8 bytes (2 values) fewer
    p.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="lying.npz"):
        sparsestore.convert([p], tmp_path / "o.zarr")
    assert leftovers(tmp_path / "o.zarr") == []
    with pytest.raises(FormatError, match="lying.npz"):  # the loader on its own, too
        load_shard(str(p), NpzOptions())


def test_csr_views_are_views_scipy_keeps():
    from sparsestore.blocks import csr_views

    X = rand(400, 30, density=0.3, seed=5)
    blocks = [b for _, _, b in csr_views(X, target_nnz=500)]
    assert len(blocks) > 4
    assert all(np.shares_memory(b.data, X.data) and np.shares_memory(b.indices, X.indices)
               for b in blocks)
    assert (sp.vstack(blocks) != X).nnz == 0


def test_npz_bomb_is_refused_before_decompressing(tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "b.npz", X=np.zeros((1000, 100)))
    import zipfile

    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, *a, **k: opened.append(a) or real_open(self, *a, **k))
    with pytest.raises(UnsafeInputError, match="decompression bomb"):
        load_shard(str(tmp_path / "b.npz"), NpzOptions(max_bytes=10_000))
    assert opened == []


def test_npz_error_mid_way_commits_nothing_even_with_overwrite(tmp_path):
    old = sparsestore.save(tmp_path / "out.zarr", rand(5, 30, seed=1))
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"s{i}.npz")
        sp.save_npz(paths[-1], rand(50, 30, seed=i))
    _corrupt_copy(paths[0], tmp_path / "s9.npz")
    with pytest.raises(FormatError):
        sparsestore.convert([*paths, tmp_path / "s9.npz"], tmp_path / "out.zarr",
                            overwrite=True, workers=2)
    again = sparsestore.open(tmp_path / "out.zarr")
    assert again.shape == old.shape  # the old store is untouched
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.zarr.")]


# ------------------------------------------------------------------ npz: CSR shards streamed

def _raw_files(root: Path) -> dict[str, bytes]:
    """Every file's bytes; the root zarr.json without the store's own generation id (new
    with every save), which the manifest also carries."""
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
           if p.is_file() and p.name != ".lock"}
    meta = json.loads(out["zarr.json"])
    ours = meta["attributes"]["sparsestore"]
    ours.pop("generation")
    ours["manifest"].pop("generation")
    out["zarr.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def test_npz_csr_shards_stream_in_units_never_whole(tmp_path, monkeypatch):
    import sparsestore.ingest.inflate as inflate
    import sparsestore.ingest.npz as npz

    monkeypatch.setattr(inflate, "_PTR_WINDOW", 7)  # indptr inflated a few entries at a time
    monkeypatch.setattr(inflate, "DEFAULT_UNIT_BYTES", 64)  # members inflated as they are read
    mats = [rand(120, 30, density=0.2, seed=i) for i in range(3)]
    m = mats[1].tolil()
    m[10:40] = 0  # empty rows, some units of empty rows only
    mats[1] = m.tocsr()
    paths = save_shards(tmp_path, mats)
    widest = max(int(np.diff(m.indptr).max()) for m in mats)
    units = [u for p in paths for kind, (u, _) in npz.shard_items(str(p), NpzOptions(),
                                                                    unit_nnz=120)]
    assert len(units) > 6 and all(u.nnz < 120 + widest for u in units)
    assert (sp.vstack(units) != sp.vstack(mats)).nnz == 0
    src = npz.npz_source([str(p) for p in paths], workers=1, unit_nnz=120, piece_nnz=50)
    blocks = [b for b, _ in src.blocks()]
    assert len(blocks) > 10 and all(b.nnz < 50 + widest for b in blocks)
    assert (sp.vstack(blocks) != sp.vstack(mats)).nnz == 0
    for w in (1, 2, 3):
        store = npz.from_npz(tmp_path / f"o{w}.zarr", paths, workers=w, chunk_bytes=2048)
        same(store, sp.vstack(mats))


def test_npz_streamed_store_is_byte_identical_to_whole_shards(tmp_path):
    mats = [rand(300 + 17 * i, 50, density=0.1, dtype=np.float64, seed=i) for i in range(9)]
    mats.append(rand(0, 50, seed=99))  # an empty shard
    mats.append(rand(40, 50, density=0.1, dtype=np.float64, seed=5, fmt="csc"))  # whole
    paths = save_shards(tmp_path, mats)
    with ThreadPoolExecutor(2) as ex:  # an executor loads whole shards
        sparsestore.convert(paths, tmp_path / "whole.zarr", executor=ex, chunk_bytes=4096)
    ref = _raw_files(tmp_path / "whole.zarr")
    for w in (1, 2):
        sparsestore.convert(paths, tmp_path / f"s{w}.zarr", workers=w, chunk_bytes=4096)
        assert _raw_files(tmp_path / f"s{w}.zarr") == ref


def test_npz_streamed_pieces_carry_their_labels(tmp_path):
    paths, mats, ys = [], [], []
    for i in range(4):
        X = rand(70 + i, 12, density=0.3, seed=i)
        y = np.arange(X.shape[0], dtype=np.int32) + 1000 * i
        paths.append(tmp_path / f"s{i}.npz")
        np.savez_compressed(paths[-1], data=X.data, indices=X.indices, indptr=X.indptr,
                            shape=np.array(X.shape), y=y)
        mats.append(X)
        ys.append(y)
    for w in (1, 2):
        store = sparsestore.convert(paths, tmp_path / f"o{w}.zarr", labels=["y"], workers=w)
        same(store, sp.vstack(mats))
        np.testing.assert_array_equal(store.labels["y"][:], np.concatenate(ys))


def _units_reader(paths, workers, unit_nnz, lookahead_bytes):
    """The npz source's shard reader over ``paths`` (units, not blocks), and the bytes each
    shard's stream reserved before each of its units, in order."""
    import threading

    from sparsestore.engine import OrderedStreams
    from sparsestore.ingest.npz import THREAD_NAME, shard_items

    reserved: dict[int, list[int]] = {}
    lock = threading.Lock()

    def produce(i, reserve):
        with lock:
            reserved[i] = []

        def counted(nbytes):
            reserve(nbytes)
            with lock:
                reserved[i].append(nbytes)

        return shard_items(paths[i], NpzOptions(), None, unit_nnz, counted)

    reader = OrderedStreams(produce, range(len(paths)), budget=lookahead_bytes,
                            ahead=len(paths), threads=workers, name=THREAD_NAME)
    return reader, reserved, lock


def _npz_threads():
    import threading

    from sparsestore.ingest.npz import THREAD_NAME

    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


def test_npz_reader_bounds_the_bytes_ahead_of_the_writer(tmp_path):
    import time

    mats = [rand(200, 40, density=0.25, seed=i) for i in range(6)]
    paths = [str(p) for p in save_shards(tmp_path, mats)]
    budget = 3000
    reader, reserved, lock = _units_reader(paths, 3, 100, budget)
    taken: dict[int, int] = {}  # shard -> units taken

    def ahead() -> int:
        """Bytes reserved for units made and not yet taken (and all shards started?)."""
        with lock:
            made = sum(sum(r) for r in reserved.values())
            return made - sum(sum(reserved[i][:n]) for i, n in taken.items()), \
                len(reserved) == len(paths)

    most, units, order = 0, [], []
    for i, (kind, (unit, _)) in reader:
        assert kind == "unit"
        order.append(i)
        taken[i] = taken.get(i, 0) + 1
        # A slow writer: wait until the workers have filled half the budget (or started
        # every shard), then a little longer so that running past it would show.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            now, started_all = ahead()
            if now > budget // 2 or started_all:
                break
            time.sleep(0.001)
        time.sleep(0.002)
        most = max(most, ahead()[0])
        units.append(unit)
    size = max(u.data.nbytes + u.indices.nbytes + 8 * (u.shape[0] + 1) for u in units)
    assert budget // 2 < most <= budget + 2 * size
    assert order == sorted(order) and set(order) == set(range(len(paths)))
    assert (sp.vstack(units) != sp.vstack(mats)).nnz == 0
    assert not _npz_threads()


def test_npz_reader_closed_early_stops_its_workers(tmp_path):
    paths = [str(p) for p in save_shards(tmp_path, [rand(100, 20, seed=i) for i in range(8)])]
    reader, reserved, _ = _units_reader(paths, 2, 10, 500)
    next(reader)
    assert _npz_threads()
    reader.close()
    assert not _npz_threads()
    assert len(reserved) <= 2  # two threads: the shards queued behind them were cancelled
    with pytest.raises(StopIteration):
        next(reader)


@pytest.mark.parametrize("bad", ["corrupt", "truncated", "crc"])
@pytest.mark.parametrize("inflated", ["at_once", "as_read"])
def test_npz_streamed_member_damage_fails_naming_the_file(tmp_path, monkeypatch, bad,
                                                          inflated):
    import sparsestore.ingest.inflate as inflate

    if inflated == "as_read":
        monkeypatch.setattr(inflate, "DEFAULT_UNIT_BYTES", 256)
    good = save_shards(tmp_path, [rand(300, 30, density=0.3, seed=i) for i in range(2)])
    p = tmp_path / "bad.npz"
    raw = bytearray(good[0].read_bytes())
    if bad == "corrupt":
        _corrupt_copy(good[0], p)
    elif bad == "truncated":
        p.write_bytes(good[0].read_bytes()[:-300])
    else:  # flip a bit of the CRC-32 the central directory keeps for data.npy
        at = raw.index(b"PK\x01\x02")
        while raw[at + 46 : at + 54] != b"data.npy":
            at = raw.index(b"PK\x01\x02", at + 4)
        raw[at + 16] ^= 1
        p.write_bytes(bytes(raw))
    dst = tmp_path / "out.zarr"
    for w in (1, 2):
        with pytest.raises(FormatError, match="bad.npz"):
            sparsestore.convert([good[1], p], dst, workers=w)
        assert leftovers(dst) == []


def test_npz_stored_and_other_compressions(tmp_path):
    import io
    import zipfile

    mats = [rand(80, 20, density=0.2, dtype=np.float64, seed=i) for i in range(4)]
    paths = [tmp_path / f"s{i}.npz" for i in range(4)]
    sp.save_npz(paths[0], mats[0], compressed=False)  # stored members, read into arrays
    np.savez(paths[1], data=mats[1].data, indices=mats[1].indices, indptr=mats[1].indptr,
             shape=np.array(mats[1].shape))
    sp.save_npz(paths[2], mats[2])
    with zipfile.ZipFile(paths[3], "w", zipfile.ZIP_BZIP2) as zf:  # zipfile reads these
        for name, arr in (("data", mats[3].data), ("indices", mats[3].indices),
                          ("indptr", mats[3].indptr), ("shape", np.array(mats[3].shape))):
            b = io.BytesIO()
            np.lib.format.write_array(b, arr)
            zf.writestr(name + ".npy", b.getvalue())
    for w in (1, 2):
        same(sparsestore.convert(paths, tmp_path / f"o{w}.zarr", workers=w), sp.vstack(mats))


def _csr_parts_file(path: Path, data, indices, indptr, shape) -> None:
    np.savez_compressed(path, data=np.asarray(data), indices=np.asarray(indices),
                        indptr=np.asarray(indptr), shape=np.array(shape))


@pytest.mark.parametrize("fault", ["not_monotone", "index_range", "negative_index",
                                   "ptr_end", "ptr_length", "ptr_start", "lengths",
                                   "indices_2d", "float_indices"])
@pytest.mark.parametrize("workers", [1, 2])
def test_npz_malformed_csr_parts_fail_naming_the_file(tmp_path, fault, workers):
    X = rand(50, 10, density=0.3, seed=1)
    data, ind, ptr = X.data, X.indices.copy(), X.indptr.copy()
    if fault == "not_monotone":
        ptr[20] = ptr[30]
    elif fault == "index_range":
        ind[-1] = 10
    elif fault == "negative_index":
        ind[0] = -1
    elif fault == "ptr_end":
        ptr[-1] -= 1
    elif fault == "ptr_length":
        ptr = ptr[:-1]
    elif fault == "ptr_start":
        ptr = ptr + 1
    elif fault == "lengths":
        data = data[:-1]
    elif fault == "indices_2d":
        ind = ind[: ind.size // 2 * 2].reshape(2, -1)
    elif fault == "float_indices":
        ind = ind.astype(np.float64)
    good = save_shards(tmp_path, [rand(30, 10, seed=i) for i in range(2)], "g{}.npz")
    _csr_parts_file(tmp_path / "bad.npz", data, ind, ptr, X.shape)
    dst = tmp_path / "out.zarr"
    with pytest.raises(FormatError, match="bad.npz"):
        sparsestore.convert([good[0], tmp_path / "bad.npz", good[1]], dst, workers=workers)
    assert leftovers(dst) == []


def test_npz_unsorted_duplicate_csr_parts_are_canonicalised(tmp_path):
    indptr = np.array([0, 3, 3, 6])
    indices = np.array([4, 1, 4, 0, 2, 0], dtype=np.int32)
    data = np.array([1.0, 2.0, 3.0, 0.0, 5.0, 6.0])
    _csr_parts_file(tmp_path / "a.npz", data, indices, indptr, (3, 5))
    from sparsestore.ingest.npz import from_npz

    store = from_npz(tmp_path / "o.zarr", [tmp_path / "a.npz"], workers=1)
    expected = sp.csr_matrix((data, indices, indptr), shape=(3, 5))
    same(store, expected)


def test_coalesce_passes_a_big_block_through_after_what_it_holds():
    small = [(rand(2, 6, density=0.5, seed=i), None) for i in range(3)]
    big = rand(40, 6, density=0.5, seed=9)
    out = list(coalesce(iter([*small, (big, None)]), target_nnz=20))
    assert out[-1][0] is big  # not copied into a join with the small ones
    assert (sp.vstack([b for b, _ in out]) != sp.vstack([b for b, _ in small] + [big])).nnz == 0


# ---------------------------------------------------------------------------- npy

def test_npy_memmap_sparsified_and_dense(tmp_path):
    A = rand(300, 20, density=0.2, seed=3).toarray()
    B = rand(50, 20, density=0.2, seed=4, dtype=np.float64).toarray()
    np.save(tmp_path / "a.npy", A)
    np.save(tmp_path / "b.npy", B)
    store = sparsestore.convert([tmp_path / "a.npy", tmp_path / "b.npy"], tmp_path / "s.zarr")
    same(store, np.vstack([A, B]))
    assert store.dtype == np.float64 and store.nnz == np.count_nonzero(np.vstack([A, B]))
    dense = sparsestore.convert(tmp_path / "a.npy", tmp_path / "d.zarr", sparse=False)
    assert dense.is_dense
    np.testing.assert_array_equal(dense[:], A)


def test_npy_is_memory_mapped_not_loaded(tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", np.eye(50, dtype=np.float32))
    calls = []
    real = np.load

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(np, "load", spy)
    sparsestore.convert(tmp_path / "a.npy", tmp_path / "s.zarr")
    assert calls and all(k.get("mmap_mode") == "r" and k.get("allow_pickle") is False
                         for k in calls)


@pytest.mark.parametrize("bad", ["pickled", "object", "one_d", "garbage", "columns"])
def test_npy_bad_files(tmp_path, bad):
    np.save(tmp_path / "ok.npy", np.ones((4, 3)))
    p = tmp_path / "bad.npy"
    if bad == "pickled":
        p.write_bytes(pickle.dumps([1, 2]))
    elif bad == "object":
        np.save(p, np.array([[1, "a"]], dtype=object), allow_pickle=True)
    elif bad == "one_d":
        np.save(p, np.ones(4))
    elif bad == "garbage":
        p.write_bytes(b"\x93NUMPY\x01\x00garbage")
    elif bad == "columns":
        np.save(p, np.ones((2, 4)))
    dst = tmp_path / "o.zarr"
    with pytest.raises((FormatError, UnsafeInputError)) as info:
        sparsestore.convert([tmp_path / "ok.npy", p], dst)
    assert "bad.npy" in str(info.value)
    if bad in ("pickled", "object"):
        assert isinstance(info.value, UnsafeInputError)
    assert leftovers(dst) == []


# ---------------------------------------------------------------------------- COO / dict

def test_coo_arrays_and_chunks_with_spill(tmp_path):
    rng = np.random.default_rng(7)
    n, m, k = 700, 90, 30000
    r, c = rng.integers(0, n, k), rng.integers(0, m, k)
    d = rng.standard_normal(k).astype(np.float32)
    expected = sp.coo_matrix((d, (r, c)), shape=(n, m))
    labels = {"y": np.arange(n)}
    a = from_coo(tmp_path / "a.zarr", r, c, d, (n, m), labels=labels)
    chunks = ((r[s : s + 997], c[s : s + 997], d[s : s + 997]) for s in range(0, k, 997))
    b = from_coo(tmp_path / "b.zarr", chunks, shape=(n, m), labels=labels,
                 memory_bytes=20_000, tmp_dir=tmp_path)  # forces spilling
    for store in (a, b):
        got = store[:]
        assert np.allclose(got.toarray(), expected.toarray(), atol=1e-5)  # summing order
        np.testing.assert_array_equal(store.labels["y"][:], np.arange(n))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("sparsestore-spill-")]


def test_coo_spill_splits_oversized_buckets(tmp_path):
    rng = np.random.default_rng(1)
    n, m, k = 400, 50, 20000
    r, c = rng.integers(0, n, k), rng.integers(0, m, k)
    d = rng.integers(1, 5, k).astype(np.int64)  # integers: sums are exact
    spill = CooSpill((n, m), np.int64, memory_bytes=4096, max_buckets=2, tmp_dir=tmp_path)
    for s in range(0, k, 1000):
        spill.add(r[s : s + 1000], c[s : s + 1000], d[s : s + 1000])
    blocks = list(spill.blocks(target_nnz=500))
    assert [a for a, _, _ in blocks] == sorted(a for a, _, _ in blocks)
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    got = sp.vstack([b for _, _, b in blocks]).tocsr()
    exp = sp.coo_matrix((d, (r, c)), shape=(n, m)).tocsr()
    assert (got != exp).nnz == 0
    assert os.listdir(tmp_path) == []


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40), m=st.integers(1, 30),
    entries=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6),
                               st.integers(-3, 3)), max_size=150),
    chunk=st.integers(1, 50), mem=st.sampled_from([1024, 10**6]),
)
def test_coo_roundtrip_hypothesis(n, m, entries, chunk, mem):
    rows = np.array([e[0] % n for e in entries], dtype=np.int64)
    cols = np.array([e[1] % m for e in entries], dtype=np.int64)
    vals = np.array([e[2] for e in entries], dtype=np.int64)
    expected = sp.coo_matrix((vals, (rows, cols)), shape=(n, m)).tocsr()
    chunks = [(rows[s : s + chunk], cols[s : s + chunk], vals[s : s + chunk])
              for s in range(0, len(entries), chunk)]
    with tempfile.TemporaryDirectory() as d:
        store = from_coo(os.path.join(d, "s.zarr"), chunks, shape=(n, m), dtype=np.int64,
                         memory_bytes=mem)
        same(store, expected)
        store2 = from_dict(os.path.join(d, "d.zarr"), _as_dict(rows, cols, vals), (n, m),
                           dtype=np.int64)
        same(store2, _dict_oracle(rows, cols, vals, (n, m)))


def _as_dict(rows, cols, vals):
    return {(int(r), int(c)): int(v) for r, c, v in zip(rows, cols, vals, strict=True)}


def _dict_oracle(rows, cols, vals, shape):
    d = _as_dict(rows, cols, vals)  # last value of a key wins, as in a dict
    if not d:
        return sp.csr_matrix(shape, dtype=np.int64)
    k = np.array(list(d), dtype=np.int64)
    return sp.coo_matrix((np.array(list(d.values())), (k[:, 0], k[:, 1])), shape=shape)


def test_from_dict_and_coo_errors(tmp_path):
    store = from_dict(tmp_path / "d.zarr", {(0, 1): 2.5, (2, 0): -1.0}, (3, 2))
    np.testing.assert_array_equal(store[:].toarray(), [[0, 2.5], [0, 0], [-1, 0]])
    with pytest.raises(InvalidInputError, match="out of range"):
        from_coo(tmp_path / "e.zarr", [0, 5], [0, 0], [1.0, 1.0], (3, 2))
    with pytest.raises(InvalidInputError, match="same length"):
        from_coo(tmp_path / "e.zarr", iter([([0, 1], [0], [1.0])]), shape=(3, 2))
    with pytest.raises(DTypeError):
        from_coo(tmp_path / "e.zarr", iter([([0], [0], np.array([1], np.int8)),
                                            ([1], [1], np.array([1.5]))]), shape=(3, 2))
    with pytest.raises(InvalidInputError, match="pairs"):
        from_dict(tmp_path / "e.zarr", {"a": 1}, (3, 2))
    assert leftovers(tmp_path / "e.zarr") == []


# ---------------------------------------------------------------------------- Matrix Market

def _gz(src: Path) -> Path:
    out = Path(str(src) + ".gz")
    with open(src, "rb") as f, gzip.open(out, "wb") as g:
        g.write(f.read())
    return out


def test_mtx_kinds_against_scipy_mmread(tmp_path):
    X = rand(120, 70, density=0.05, seed=1, dtype=np.float64, fmt="coo")
    S = rand(60, 60, density=0.05, seed=2, dtype=np.float64)
    S = (S + S.T).tocoo()
    K = rand(50, 50, density=0.05, seed=3, dtype=np.float64)
    K = (K - K.T).tocoo()
    files = {}
    sio.mmwrite(tmp_path / "g.mtx", X)
    files["g.mtx"] = X
    files["g.mtx.gz"] = X
    _gz(tmp_path / "g.mtx")
    sio.mmwrite(tmp_path / "s.mtx", S, symmetry="symmetric")
    files["s.mtx"] = S
    sio.mmwrite(tmp_path / "k.mtx", K, symmetry="skew-symmetric")
    files["k.mtx"] = K
    P = S.copy()
    P.data[:] = 1
    sio.mmwrite(tmp_path / "p.mtx", P, field="pattern", symmetry="symmetric")
    files["p.mtx"] = P
    Ii = sp.coo_matrix((np.array([5, -7, 9]), ([0, 3, 3], [2, 1, 4])), shape=(4, 5))
    sio.mmwrite(tmp_path / "i.mtx", Ii, field="integer")
    files["i.mtx"] = Ii
    D = np.arange(12.0).reshape(3, 4)
    sio.mmwrite(tmp_path / "d.mtx", D)
    files["d.mtx"] = D
    head = (tmp_path / "s.mtx").read_text().splitlines()[0]
    assert "symmetric" in head
    for name, oracle in files.items():
        store = sparsestore.convert(tmp_path / name, tmp_path / f"{name}.zarr")
        ref = sp.csr_matrix(sio.mmread(tmp_path / name))  # scipy's reader is the oracle
        assert (sp.csr_matrix(oracle) != ref).nnz == 0  # and agrees with what was written
        same(store, ref)
    assert sparsestore.open(tmp_path / "i.mtx.zarr").dtype == np.int64
    assert sparsestore.open(tmp_path / "p.mtx.zarr").dtype == np.float32


def test_mtx_unsorted_entries_small_chunks_spill(tmp_path):
    rng = np.random.default_rng(3)
    X = rand(300, 40, density=0.1, seed=5, dtype=np.float64, fmt="coo")
    perm = rng.permutation(X.nnz)
    lines = ["%%MatrixMarket matrix coordinate real general", "% a comment",
             f"{X.shape[0]} {X.shape[1]} {X.nnz}"]
    lines += [f"{X.row[i] + 1} {X.col[i] + 1} {float(X.data[i])!r}" for i in perm]
    (tmp_path / "u.mtx").write_text("\n".join(lines) + "\n")
    from sparsestore.ingest.base import write_source
    from sparsestore.ingest.mtx import mtx_source

    src = mtx_source(tmp_path / "u.mtx", chunk_entries=64, memory_bytes=2048,
                     tmp_dir=tmp_path)
    store = write_source(tmp_path / "u.zarr", src)
    same(store, X)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("sparsestore-spill-")]


@pytest.mark.parametrize("bad,match", [
    ("%%MatrixMarket matrix coordinate complex general\n2 2 1\n1 1 1 0\n", "complex"),
    ("hello\n", "not a Matrix Market"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 3\n1 1 1\n2 2 2\n", "truncated"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 1\n3 1 1\n", "outside 1..2"),
    ("%%MatrixMarket matrix coordinate real general\n2 2 2\n1 1 1\n1 x 1\n", "malformed"),
    ("%%MatrixMarket matrix coordinate real symmetric\n2 3 1\n1 1 1\n", "square"),
    ("%%MatrixMarket matrix coordinate real general\n2 2\n", "size line"),
])
def test_mtx_bad_files(tmp_path, bad, match):
    p = tmp_path / "bad.mtx"
    p.write_text(bad)
    dst = tmp_path / "o.zarr"
    with pytest.raises(FormatError, match=match) as info:
        sparsestore.convert(p, dst)
    assert "bad.mtx" in str(info.value)
    assert leftovers(dst) == []


def test_mtx_truncated_gzip(tmp_path):
    sio.mmwrite(tmp_path / "g.mtx", rand(400, 50, density=0.2, seed=1, dtype=np.float64))
    gz = _gz(tmp_path / "g.mtx")
    bad = tmp_path / "bad.mtx.gz"
    bad.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(FormatError, match="bad.mtx.gz"):
        sparsestore.convert(bad, tmp_path / "o.zarr")
    assert leftovers(tmp_path / "o.zarr") == []


# ---------------------------------------------------------------------------- svmlight

def _write_svm(path, X, y, *, qid=None, one_based=True, comments=True):
    X = sp.csr_matrix(X)
    base = 1 if one_based else 0
    with open(path, "w") as f:
        if comments:
            f.write("# made by the test\n\n")
        for i in range(X.shape[0]):
            a, b = X.indptr[i], X.indptr[i + 1]
            feats = " ".join(f"{j + base}:{float(v)!r}" for j, v in
                             zip(X.indices[a:b], X.data[a:b], strict=True))
            q = f"qid:{qid[i]} " if qid is not None else ""
            f.write(f"{float(y[i])!r} {q}{feats}{'  # row' if comments else ''}\n")


def _sklearn(path, **kwargs):
    """scikit-learn's reading of svmlight file(s): the oracle."""
    datasets = pytest.importorskip("sklearn.datasets")
    if isinstance(path, list):
        got = datasets.load_svmlight_files([str(p) for p in path], **kwargs)
        return sp.vstack(got[0::2], format="csr"), np.concatenate(got[1::2])
    return datasets.load_svmlight_file(str(path), **kwargs)


def test_svmlight_labels_qid_and_bases(tmp_path):
    X = rand(250, 30, density=0.15, seed=2, dtype=np.float64)
    y = np.random.default_rng(0).standard_normal(250)
    q = np.repeat(np.arange(25), 10)
    _write_svm(tmp_path / "a.svm", X, y, qid=q)
    auto = sparsestore.convert(tmp_path / "a.svm", tmp_path / "a.zarr")
    Xs, ys, qs = _sklearn(tmp_path / "a.svm", query_id=True)
    same(auto, Xs)
    np.testing.assert_array_equal(auto.labels["y"][:], ys)
    np.testing.assert_array_equal(auto.labels["qid"][:], qs)
    fixed = sparsestore.convert(tmp_path / "a.svm", tmp_path / "b.zarr", n_features=30,
                                zero_based=False)
    same(fixed, _sklearn(tmp_path / "a.svm", n_features=30, zero_based=False)[0])
    _write_svm(tmp_path / "z.libsvm", X, y, one_based=False, comments=False)
    zero = sparsestore.convert(tmp_path / "z.libsvm", tmp_path / "z.zarr", n_features=30,
                               zero_based=True)
    Xs, ys = _sklearn(tmp_path / "z.libsvm", n_features=30, zero_based=True)
    same(zero, Xs)
    np.testing.assert_array_equal(zero.labels["y"][:], ys)
    assert list(zero.labels) == ["y"]


@pytest.mark.parametrize("text", ["1 0:1.5 3:2\n0 2:1\n", "1 1:1.5 3:2\n-1 2:1\n",
                                  "1 qid:3 1:1.5\n2 qid:3\n0 qid:4 7:-2 # c\n",
                                  "# only a comment\n\n1 2:0.5\n-1 1:2 2:1e-3\n"])
def test_svmlight_auto_zero_based_as_sklearn(tmp_path, text):
    # An index 0 anywhere means zero-based; otherwise one-based (scikit-learn's rule).
    p = tmp_path / "a.svmlight"
    p.write_text(text)
    s = sparsestore.convert(p, tmp_path / "a.zarr")
    got = _sklearn(p, query_id="qid" in text)
    same(s, got[0])
    np.testing.assert_array_equal(s.labels["y"][:], got[1])
    if "qid" in text:
        np.testing.assert_array_equal(s.labels["qid"][:], got[2])


def test_svmlight_streams_many_chunks_and_files(tmp_path):
    from sparsestore.ingest.base import write_source
    from sparsestore.ingest.svmlight import svmlight_source

    X = rand(300, 12, density=0.3, seed=3, dtype=np.float64)
    y = np.arange(300.0)
    _write_svm(tmp_path / "p1.svm", X[:100], y[:100])
    _write_svm(tmp_path / "p2.svm", X[100:], y[100:])
    for nf in (12, None):
        src = svmlight_source(str(tmp_path / "p*.svm"), n_features=nf, zero_based=False,
                              chunk_lines=7, tmp_dir=tmp_path)
        store = write_source(tmp_path / f"o{nf}.zarr", src)
        Xs, ys = _sklearn([tmp_path / "p1.svm", tmp_path / "p2.svm"], n_features=nf,
                          zero_based=False)
        same(store, Xs)
        np.testing.assert_array_equal(store.labels["y"][:], ys)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("sparsestore-")]


@pytest.mark.parametrize("text,match", [
    ("1 1:2 3\n", "index:value"),
    ("abc 1:2\n", "bad label"),
    ("1 1:x\n", "index:value"),
    ("1 qid:1 1:2\n0 1:1\n", "qid"),
    ("1 5:1\n", "out of range"),
])
def test_svmlight_bad_files(tmp_path, text, match):
    p = tmp_path / "bad.svm"
    p.write_text(text)
    dst = tmp_path / "o.zarr"
    with pytest.raises(FormatError, match=match) as info:
        sparsestore.convert(p, dst, n_features=3, zero_based=False)
    assert "bad.svm" in str(info.value)
    assert leftovers(dst) == []
    if match != "qid":  # scikit-learn takes lines with and without qid in one file
        with pytest.raises(ValueError):
            _sklearn(p, n_features=3, zero_based=False)


# ---------------------------------------------------------------------------- anndata

@pytest.fixture
def adata():
    ad = pytest.importorskip("anndata")
    pd = pytest.importorskip("pandas")
    n = 240
    X = rand(n, 35, density=0.15, seed=8)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.array(["b", "t", "nk"])[np.arange(n) % 3]),
            "n_counts": np.arange(n, dtype=np.int32) * 2,
            "score": np.linspace(0, 1, n),
            "name": [f"c{i % 5}" for i in range(n)],
            "nullable": pd.array([1, None] * (n // 2), dtype="Int64"),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    return ad, X, obs


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
@pytest.mark.parametrize("container", ["h5ad", "zarr"])
def test_anndata_X_and_obs_labels(tmp_path, adata, fmt, container):
    ad, X, obs = adata
    Xi = X.toarray() if fmt == "dense" else X.asformat(fmt)
    a = ad.AnnData(Xi, obs=obs)
    path = tmp_path / f"a.{container}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(path) if container == "h5ad" else a.write_zarr(path)
    from sparsestore.ingest.anndata_io import anndata_source
    from sparsestore.ingest.base import write_source

    src = anndata_source(path, labels=["cell_type", "n_counts", "score"], block_nnz=200,
                         memory_bytes=4096, tmp_dir=tmp_path)
    store = write_source(tmp_path / "s.zarr", src)
    back = ad.read_h5ad(path) if container == "h5ad" else ad.read_zarr(path)
    same(store, back.X)  # anndata's own reader is the oracle
    np.testing.assert_array_equal(store.labels["cell_type"][:],
                                  back.obs["cell_type"].cat.codes.to_numpy())
    np.testing.assert_array_equal(store.labels["n_counts"][:], back.obs["n_counts"])
    np.testing.assert_array_equal(store.labels["score"][:], back.obs["score"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith("sparsestore-spill-")]
    # through convert too (format from the name)
    conv = sparsestore.convert(path, tmp_path / "c.zarr", labels=["cell_type"])
    same(conv, back.X)


def test_anndata_bad_labels_and_files(tmp_path, adata):
    ad, X, obs = adata
    a = ad.AnnData(X, obs=obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_h5ad(tmp_path / "a.h5ad")
    dst = tmp_path / "o.zarr"
    with pytest.raises(LabelError, match="no column 'nope'"):
        sparsestore.convert(tmp_path / "a.h5ad", dst, labels=["nope"])
    with pytest.raises(LabelError, match="missing values"):
        sparsestore.convert(tmp_path / "a.h5ad", dst, labels=["nullable"])
    (tmp_path / "bad.h5ad").write_bytes(b"not hdf5 at all")
    with pytest.raises(FormatError, match="bad.h5ad"):
        sparsestore.convert(tmp_path / "bad.h5ad", dst)
    assert leftovers(dst) == []


def test_anndata_written_by_anndata_is_read_via_its_csr_group(tmp_path, adata):
    ad, X, obs = adata
    a = ad.AnnData(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_zarr(tmp_path / "a.zarr")
    from sparsestore.conversion import detect_format
    from sparsestore.ingest.anndata_io import is_anndata_zarr

    assert detect_format(str(tmp_path / "a.zarr")) == "zarr"
    assert is_anndata_zarr(str(tmp_path / "a.zarr"))
    store = sparsestore.convert(tmp_path / "a.zarr", tmp_path / "o.zarr")
    same(store, X)


# ---------------------------------------------------------------------------- stores, dispatch

def test_store_to_store_copy_with_new_layout_and_labels(tmp_path, small_store):
    store, X, labels = small_store
    copy = sparsestore.convert(store.path, tmp_path / "copy.zarr", compressor="zstd",
                               chunk_bytes=8192)
    same(copy, X)
    assert copy.layout.compressor == "zstd"
    np.testing.assert_array_equal(copy.labels["w"][:], labels["w"])
    only_y = sparsestore.convert(store.path, tmp_path / "y.zarr", labels=["y"])
    assert list(only_y.labels) == ["y"]


def test_convert_dispatch_errors(tmp_path):
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(FormatError, match="npz") as info:
        sparsestore.convert(tmp_path / "x.csv", tmp_path / "o.zarr")
    assert "svmlight" in str(info.value) and "h5ad" in str(info.value)
    with pytest.raises(FormatError, match="unknown format 'csv'"):
        sparsestore.convert(tmp_path / "x.csv", tmp_path / "o.zarr", format="csv")
    with pytest.raises(StoreNotFoundError):
        sparsestore.convert(tmp_path / "missing.npz", tmp_path / "o.zarr")
    with pytest.raises(StoreNotFoundError, match="no files match"):
        sparsestore.convert(str(tmp_path / "nothing-*.npz"), tmp_path / "o.zarr")
    np.save(tmp_path / "a.npy", np.eye(3))
    with pytest.raises(InvalidInputError, match="n_features"):
        sparsestore.convert(tmp_path / "a.npy", tmp_path / "o.zarr", n_features=3)
    with pytest.raises(InvalidInputError, match="unknown layout option"):
        sparsestore.convert(tmp_path / "a.npy", tmp_path / "o.zarr", chunk_size=3)
    sparsestore.convert(tmp_path / "a.npy", tmp_path / "o.zarr")
    with pytest.raises(StoreExistsError):
        sparsestore.convert(tmp_path / "a.npy", tmp_path / "o.zarr")
    # format= overrides the name: an .npy payload under another name
    os.replace(tmp_path / "a.npy", tmp_path / "a.bin")
    s = sparsestore.convert(tmp_path / "a.bin", tmp_path / "p.zarr", format="npy")
    same(s, np.eye(3))


def test_convert_is_the_function_even_after_importing_the_module(tmp_path):
    import sparsestore.conversion as mod

    assert sparsestore.convert is mod.convert
    np.save(tmp_path / "a.npy", np.eye(2))
    s = sparsestore.convert(tmp_path / "a.npy", tmp_path / "o.zarr")
    same(s, np.eye(2))


def test_coalesce_joins_small_blocks_and_labels():
    blocks = [(rand(5, 4, density=0.5, seed=i), {"y": np.arange(5) + 5 * i}) for i in range(7)]
    out = list(coalesce(iter(blocks), target_nnz=25))
    assert len(out) < len(blocks)
    joined = sp.vstack([b for b, _ in out])
    assert (joined != sp.vstack([b for b, _ in blocks])).nnz == 0
    np.testing.assert_array_equal(np.concatenate([lab["y"] for _, lab in out]), np.arange(35))
    dense = [(np.ones((2, 4)), None), (rand(2, 4, seed=1), None)]
    assert [type(b) for b, _ in coalesce(iter(dense), 100)] == [np.ndarray, sp.csr_matrix]
