"""JAX backend against oracles: the in-memory scipy matrix and the numpy backend's batches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import scipy.sparse as sp  # noqa: E402
import sparsestore.adapters.jax as ssjax  # noqa: E402
from jax.experimental import sparse as jsparse  # noqa: E402

import sparsestore  # noqa: E402
from sparsestore.errors import ChecksumError, InvalidInputError  # noqa: E402
from sparsestore.reader import THREAD_PREFIX  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def check_bcoo(x, want: sp.csr_matrix, padded: bool = False, todense: bool = True) -> None:
    """``x`` is a BCOO holding exactly ``want``: row-major coordinates, then any padding.

    ``todense`` also checks JAX's own densification (compiled once per shape: slow, so
    tests ask it for a few batches).
    """
    assert isinstance(x, jsparse.BCOO)
    assert x.shape == want.shape and x.dtype == want.dtype
    coo = want.tocoo()
    idx, data = np.asarray(x.indices), np.asarray(x.data)
    np.testing.assert_array_equal(idx[: coo.nnz], np.stack([coo.row, coo.col], axis=1))
    np.testing.assert_array_equal(data[: coo.nnz], coo.data)
    if padded:
        assert x.nse >= max(1, coo.nnz) and x.nse & (x.nse - 1) == 0  # a power of two
        assert (idx[coo.nnz:] == np.array(want.shape)).all() and not data[coo.nnz:].any()
    else:
        assert x.nse == coo.nnz
    if todense:
        np.testing.assert_array_equal(np.asarray(x.todense()), want.toarray())


def damage(store) -> Path:
    """Flip one byte in the middle data chunk file; returns the file."""
    base = Path(store.path) / "data" / "c"
    files = sorted((p for p in base.rglob("*") if p.is_file()), key=lambda p: int(p.name))
    victim = files[len(files) // 2]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    victim.write_bytes(bytes(raw))
    return victim


# ------------------------------------------------------------------ backend plugin


@pytest.mark.parametrize(("shuffle", "rank", "world"), [(False, 0, 1), (True, 1, 3)])
def test_backend_batches_equal_numpy_backend(small_store, shuffle, rank, world):
    store, X, labels = small_store
    kw = dict(batch_size=257, shuffle=shuffle, seed=4, labels=["y", "w"], rank=rank,
              world_size=world)
    a = sparsestore.DataLoader(store, backend="jax", **kw)
    b = sparsestore.DataLoader(store, **kw)
    assert isinstance(a.backend, ssjax.JaxBackend) and a.backend.name == "jax"
    n = 0
    for i, ((x, y, w), (xb, yb, _)) in enumerate(zip(a, b, strict=True)):
        want = X[yb]  # y holds the row ids: the in-memory matrix is the oracle
        assert (xb != want).nnz == 0
        check_bcoo(x, want, todense=i < 2)
        assert isinstance(y, jax.Array) and isinstance(w, jax.Array)
        np.testing.assert_array_equal(np.asarray(y), yb)
        np.testing.assert_array_equal(np.asarray(w), labels["w"][yb])
        n += y.shape[0]
    assert n == a.num_rows


def test_bcsr_and_padded_bcoo(small_store, rng):
    store, X, _ = small_store
    loader = sparsestore.DataLoader(store, 300, shuffle=True, seed=1, labels="y",
                                    backend=ssjax.JaxBackend(format="bcsr"))
    for i, (x, y) in enumerate(loader):
        assert isinstance(x, jsparse.BCSR)
        want = X[np.asarray(y)]
        np.testing.assert_array_equal(np.asarray(x.indptr), want.indptr)
        np.testing.assert_array_equal(np.asarray(x.indices), want.indices)
        np.testing.assert_array_equal(np.asarray(x.data), want.data)
        if i < 2:
            np.testing.assert_array_equal(np.asarray(x.todense()), want.toarray())
    W = rng.standard_normal((X.shape[1], 3)).astype(np.float32)
    padded = sparsestore.DataLoader(store, 300, labels="y",
                                    backend=ssjax.JaxBackend(pad_nnz=True))
    shapes = set()
    for i, (x, y) in enumerate(padded):
        want = X[np.asarray(y)]
        check_bcoo(x, want, padded=True, todense=i < 2)
        if i < 2:  # padding is ignored by JAX's own sparse kernels (matmul, sum_duplicates)
            np.testing.assert_allclose(np.asarray(x @ W), want @ W, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(
                np.asarray(x.sum_duplicates(nse=want.nnz).todense()), want.toarray())
        shapes.add(x.nse)
    assert len(shapes) <= 2 < len(padded)


def test_dense_store_and_dtypes(tmp_path, rng):
    D = rng.standard_normal((500, 7)).astype(np.float32)
    y = np.arange(500, dtype=np.int64)
    dstore = sparsestore.save(tmp_path / "d.zarr", D, sparse=False, labels={"y": y})
    got = list(sparsestore.DataLoader(dstore, 128, labels="y", backend="jax"))
    assert all(isinstance(x, jax.Array) for x, _ in got)
    np.testing.assert_array_equal(np.concatenate([np.asarray(x) for x, _ in got]), D)
    # without jax_enable_x64, int64 labels and float64 values take JAX's 32-bit types
    want = np.dtype(jax.dtypes.canonicalize_dtype(np.int64))
    assert all(lab.dtype == want for _, lab in got)
    X64 = sp.random(50, 9, density=0.3, format="csr", dtype=np.float64, random_state=rng)
    s64 = sparsestore.save(tmp_path / "f64.zarr", X64)
    x = next(iter(sparsestore.DataLoader(s64, 50, backend="jax")))
    assert x.dtype == jax.dtypes.canonicalize_dtype(np.float64)
    np.testing.assert_allclose(np.asarray(x.todense()), X64.toarray(), rtol=1e-6)


# ------------------------------------------------------------------ prefetch and sharding


def test_prefetch_to_device_gives_the_loaders_batches(small_store):
    store, X, _ = small_store
    a = sparsestore.DataLoader(store, 200, shuffle=True, seed=8, labels="y")
    b = sparsestore.DataLoader(store, 200, shuffle=True, seed=8, labels="y")
    got = list(ssjax.prefetch_to_device(a, size=3, device=jax.devices()[0]))
    want = [batch.rows for batch in b.iter_batches()]
    assert len(got) == len(want) and a.epoch == 1  # a whole pass: the next epoch
    for i, ((x, y), rows) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(np.asarray(y), rows)
        check_bcoo(x, X[rows], todense=i < 2)
        assert x.data.devices() == {jax.devices()[0]}


def test_prefetch_stops_its_thread_when_closed(small_store):
    store, _, _ = small_store
    stage = f"{THREAD_PREFIX}-host"
    # num_workers=0: no decode threads, yet the device puts still run ahead on one thread
    it = ssjax.prefetch_to_device(sparsestore.DataLoader(store, 50, labels="y",
                                                         num_workers=0), size=2)
    next(it)
    assert [t.name.startswith(stage) for t in threading.enumerate()].count(True) == 1
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
    with pytest.raises(InvalidInputError, match="size"):
        next(ssjax.prefetch_to_device(sparsestore.DataLoader(store, 50), size=0))


def test_device_put_runs_ahead_under_prefetch_and_in_the_consumer_otherwise(small_store,
                                                                           monkeypatch):
    store, X, _ = small_store
    puts: list[str] = []
    real = jax.device_put

    def spy(x, device=None):
        puts.append(threading.current_thread().name)
        return real(x, device)

    monkeypatch.setattr(jax, "device_put", spy)
    me = threading.current_thread().name
    plain = list(sparsestore.DataLoader(store, 500, backend="jax"))
    assert set(puts) == {me} and len(puts) == len(plain)
    puts.clear()
    staged = list(ssjax.prefetch_to_device(sparsestore.DataLoader(store, 500), size=2))
    assert set(puts) == {f"{THREAD_PREFIX}-host-feed"} and len(puts) == len(staged)
    for a, b in zip(plain, staged, strict=True):
        np.testing.assert_array_equal(np.asarray(a.todense()), np.asarray(b.todense()))


def test_sharded_loader_uses_the_jax_process(small_store, monkeypatch):
    store, _, _ = small_store
    one = ssjax.sharded_loader(store, batch_size=100)
    assert (one.rank, one.world_size) == (jax.process_index(), jax.process_count())
    rows = []
    for pid in range(3):  # three simulated JAX processes
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        monkeypatch.setattr(jax, "process_count", lambda: 3)
        loader = ssjax.sharded_loader(store, batch_size=128, shuffle=True, seed=2, labels="y")
        assert (loader.rank, loader.world_size) == (pid, 3)
        rows += [np.asarray(y) for _, y in loader]
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(store.n_rows))
    with pytest.raises(InvalidInputError, match="rank"):
        ssjax.sharded_loader(store, rank=0)


# ------------------------------------------------------------------ failures


def test_a_damaged_chunk_fails_with_its_name(small_store):
    store, _, _ = small_store
    victim = damage(store)
    with pytest.raises(ChecksumError, match=rf"chunk {victim.name}\b"):
        for _ in sparsestore.DataLoader(sparsestore.open(store.path), 64, backend="jax"):
            pass
    loader = sparsestore.DataLoader(sparsestore.open(store.path), 64)
    with pytest.raises(ChecksumError, match=rf"chunk {victim.name}\b"):
        for _ in ssjax.prefetch_to_device(loader):
            pass


def test_bad_arguments():
    with pytest.raises(InvalidInputError, match="format"):
        ssjax.JaxBackend(format="csc")
    with pytest.raises(InvalidInputError, match="pad_nnz"):
        ssjax.JaxBackend(format="bcsr", pad_nnz=True)


# ------------------------------------------------------------------ training


def test_jax_example_loss_falls(load_example, tmp_path, capsys):
    ex = load_example("jax_train")
    losses = ex.train(ex.build_store(tmp_path / "j.zarr", 6000, 300, seed=0), epochs=4, seed=0)
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    assert ex.main(["--rows", "2000", "--cols", "100", "--epochs", "1", "--out",
                    str(tmp_path)]) == 0
    assert "loss" in capsys.readouterr().out


def test_keras_on_jax_fits_bcoo_batches(tmp_path):
    """Keras 3 (JAX backend) trains a ``sparse=True`` input on BCOO batches via PyDataset."""
    pytest.importorskip("keras")
    script = textwrap.dedent(f"""
        import os, sys, time, warnings
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np, keras, sparsestore
        import sparsestore.adapters.jax as ssjax
        assert keras.backend.backend() == "jax"
        sys.path.insert(0, {str(ROOT / "examples")!r})
        from jax_train import build_store
        store = build_store({str(tmp_path / "k.zarr")!r}, 4000, 200, seed=1)
        # pad_nnz: Keras jit-compiles its train step once per BCOO shape, so unpadded
        # batches (each its own nse) would compile on every step.
        loader = sparsestore.DataLoader(store, 128, shuffle=True, seed=1, labels="y",
                                        backend=ssjax.JaxBackend(pad_nnz=True))
        inp = keras.Input(shape=(200,), sparse=True)
        model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(inp))
        model.compile(keras.optimizers.Adam(0.05), "binary_crossentropy")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*ran out of data")
            h = model.fit(ssjax.to_py_dataset(loader), epochs=3, shuffle=False, verbose=0)
        print("EPOCH", loader.epoch, "TIME", time.perf_counter() - t0)
        print("LOSS", *h.history["loss"])
    """)
    env = dict(os.environ, KERAS_BACKEND="jax")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EPOCH 3 " in out.stdout  # each Keras epoch was a loader epoch (a new shuffle)
    loss = [float(v) for v in out.stdout.split("LOSS")[1].split()]
    assert len(loss) == 3 and loss[-1] < 0.8 * loss[0]
