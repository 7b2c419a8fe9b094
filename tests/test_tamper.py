"""Random tampering with a store's metadata and shard indexes: every read path either raises a
SparseStoreError or returns exactly what was saved (scipy / numpy as the oracle).

A hostile or unlucky edit may change any field of any ``zarr.json`` (the group's attrs and
manifest, an array's shape, dtype, chunk grid or codecs) or any byte of a shard's index
(with the index's own CRC32C recomputed, as a careful forger would). Nothing may read back
silently wrong through slices, fancy rows, labels, the loader (sequential and shuffled),
dask, or ``validate``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import event as _event
from hypothesis import strategies as st

import sparsestore
from sparsestore.errors import SparseStoreError
from sparsestore.validate import validate_store

TAMPER = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                        HealthCheck.too_slow])
N_ROWS, N_COLS = 600, 50
LAYOUTS = {
    "chunked": {"chunk_bytes": 1024, "indptr_chunk": 128},
    "sharded": {"chunk_bytes": 1024, "indptr_chunk": 128, "shard_bytes": 16384},
}


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tamper")
    rng = np.random.default_rng(7)
    X = sp.random(N_ROWS, N_COLS, density=0.1, format="csr", dtype=np.float32,
                  random_state=rng)
    X.data += 1.0  # no value rounds to a zero
    y = np.repeat(np.arange(6), N_ROWS // 6).astype(np.int64)
    for name, layout in LAYOUTS.items():
        sparsestore.save(root / name, X, labels={"y": y}, **layout)
    return {"root": root, "X": X, "y": y}


def event(what: str) -> None:
    """Count an outcome in hypothesis' statistics (a no-op outside a hypothesis test)."""
    with contextlib.suppress(Exception):
        _event(what)


def _leaves(obj: Any, path: tuple = ()) -> list[tuple]:
    """Every key path in a JSON document, containers included."""
    out = [path] if path else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _leaves(v, (*path, i))
    return out


def _replacement(old: Any, how: int) -> Any:
    """Another value for a JSON field: a nudge of the same type, or another type."""
    if isinstance(old, bool):
        return [not old, None, 0, "x"][how % 4]
    if isinstance(old, int):
        return [old + 1, old - 1, 0, -1, 2**40, old * 2, str(old), None][how % 8]
    if isinstance(old, float):
        return [old + 1.0, 0.0, -old, None][how % 4]
    if isinstance(old, str):
        alt = old[:-1] + ("A" if old[-1:] != "A" else "B") if old else "x"
        return [alt, "", old + old, 1, None][how % 5]
    if isinstance(old, list):
        return [old[:-1], old + old[-1:] if old else [0], [], {}, None][how % 5]
    if isinstance(old, dict):
        return [{}, [], None][how % 3]
    return ["x", 0][how % 2]


def _edit_json(path: Path, key_path: tuple, how: int, delete: bool) -> str:
    doc = json.loads(path.read_text())
    parent = doc
    for k in key_path[:-1]:
        parent = parent[k]
    last = key_path[-1]
    if delete:
        if isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
    else:
        parent[last] = _replacement(parent[last], how)
    path.write_text(json.dumps(doc))
    return f"{path.parent.name}/{'.'.join(map(str, key_path[:3]))}"


def _shard_index_edit(path: Path, per: int, how: str, data: st.DataObject) -> None:
    """Rewrite a shard's index (``per`` (offset, nbytes) u64 pairs, then a CRC32C) with one
    entry changed, two swapped or one duplicated, and the CRC made to match again."""
    raw = bytearray(path.read_bytes())
    size = per * 16 + 4
    index = np.frombuffer(bytes(raw[-size:-4]), "<u8").reshape(per, 2).copy()
    i, j = data.draw(st.lists(st.integers(0, per - 1), min_size=2, max_size=2, unique=True))
    if how == "swap":
        index[[i, j]] = index[[j, i]]
    elif how == "dup":
        index[j] = index[i]
    elif how == "offset":
        index[data.draw(st.integers(0, per - 1)), 0] += data.draw(st.sampled_from([1, 4, 16]))
    elif how == "nbytes":
        index[data.draw(st.integers(0, per - 1)), 1] -= data.draw(st.sampled_from([1, 4]))
    else:
        index[data.draw(st.integers(0, per - 1))] = np.iinfo(np.uint64).max
    body = index.astype("<u8").tobytes()
    raw[-size:] = body + struct.pack("<I", google_crc32c.value(body))
    path.write_bytes(bytes(raw))


ROWS = np.array([599, 0, 321, 17, 17, 450])


def _loader(store: Any, shuffle: bool) -> tuple[np.ndarray, sp.csr_matrix]:
    """All rows a loader pass gives, sorted by row id, with their labels checked."""
    got_rows, got = [], []
    y = store.labels["y"][:]
    for b in sparsestore.DataLoader(store, batch_size=64, shuffle=shuffle, seed=3, labels="y",
                                    block_rows=100).iter_batches():
        assert np.array_equal(b.labels[0], y[b.rows])
        got_rows.append(b.rows)
        got.append(b.to_scipy())
    rows = np.concatenate(got_rows)
    return np.sort(rows), sp.vstack(got, format="csr")[np.argsort(rows, kind="stable")]


# Each read path on its own: (name, read(store), expected(X, y)).
PATHS = [
    ("shape", lambda s: s.shape, lambda X, y: X.shape),
    ("full", lambda s: s[:], lambda X, y: X),
    ("slice", lambda s: s[123:457], lambda X, y: X[123:457]),
    ("fancy", lambda s: s[ROWS], lambda X, y: X[ROWS]),
    ("labels", lambda s: s.labels["y"][:], lambda X, y: y),
    ("loader", lambda s: _loader(s, False), lambda X, y: (np.arange(N_ROWS), X)),
    ("shuffled", lambda s: _loader(s, True), lambda X, y: (np.arange(N_ROWS), X)),
    ("dask", lambda s: s.to_dask(chunk_rows=150).compute(), lambda X, y: X),
]


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, tuple) and isinstance(b[0], int):
        return tuple(a) == b
    if isinstance(b, tuple):
        return all(_same(p, q) for p, q in zip(a, b, strict=True))
    if isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    a = sp.csr_matrix(a)
    return a.shape == b.shape and a.dtype == b.dtype and (a != b).nnz == 0


def _check(path: Path, X: sp.csr_matrix, y: np.ndarray) -> None:
    """Every read path raises a SparseStoreError or reads exactly; if any raised, validate
    must fail too."""
    raised = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            store = sparsestore.open(path)
        except SparseStoreError as e:
            event(f"open raised {type(e).__name__}")
            store = None
            raised.append("open")
        for name, read, want in PATHS if store is not None else []:
            try:
                got = read(store)
            except SparseStoreError as e:
                event(f"{name} raised {type(e).__name__}")
                raised.append(name)
                continue
            assert _same(got, want(X, y)), f"{name} read back silently wrong"
        if raised:
            try:
                ok = validate_store(path).ok
            except SparseStoreError:  # NotAStoreError: nothing left that is a store
                ok = False
            assert not ok, f"{raised} raised but validate says OK"
        else:
            event("every path read back exactly")


@TAMPER
@given(data=st.data(), layout=st.sampled_from(sorted(LAYOUTS)))
def test_random_metadata_edit_raises_or_reads_exactly(tmp_path, templates, data, layout):
    dst = Path(tempfile.mkdtemp(dir=tmp_path)) / "store"
    shutil.copytree(templates["root"] / layout, dst)
    files = sorted(dst.rglob("zarr.json"))
    target = data.draw(st.sampled_from(files))
    doc = json.loads(target.read_text())
    key_path = data.draw(st.sampled_from(_leaves(doc)))
    where = _edit_json(target, key_path, data.draw(st.integers(0, 7)), data.draw(st.booleans()))
    event(f"edited {where}")
    _check(dst, templates["X"], templates["y"])


@pytest.mark.parametrize("how", ["swap", "dup", "offset", "nbytes", "empty"])
@settings(TAMPER, max_examples=12)
@given(data=st.data())
def test_shard_index_edit_raises_or_reads_exactly(tmp_path, templates, how, data):
    dst = Path(tempfile.mkdtemp(dir=tmp_path)) / "store"
    shutil.copytree(templates["root"] / "sharded", dst)
    arrays = json.loads((dst / "zarr.json").read_text())["attributes"]["sparsestore"][
        "manifest"]["arrays"]
    sharded = sorted(name for name, am in arrays.items() if am["per_object"] > 1)
    assert {"data", "indices"} <= set(sharded)
    array = data.draw(st.sampled_from(sharded))
    per = arrays[array]["per_object"]
    shards = sorted(p for p in (dst / array / "c").rglob("*") if p.is_file())
    _shard_index_edit(data.draw(st.sampled_from(shards)), per, how, data)
    _check(dst, templates["X"], templates["y"])


def test_tamper_oracle_can_fail(tmp_path, templates):
    """The checks above do see a wrong read: an unverified copy with swapped data chunks."""
    dst = tmp_path / "swapped"
    shutil.copytree(templates["root"] / "chunked", dst)
    a, b = dst / "data" / "c" / "0", dst / "data" / "c" / "1"
    ta, tb = a.read_bytes(), b.read_bytes()
    a.write_bytes(tb)
    b.write_bytes(ta)
    _check(dst, templates["X"], templates["y"])  # the manifest catches it: every path raises
    X2 = templates["X"].copy()
    X2.data[0] += 1
    sparsestore.save(tmp_path / "other", X2, labels={"y": templates["y"]},
                     **LAYOUTS["chunked"])
    with pytest.raises(AssertionError):
        _check(tmp_path / "other", templates["X"], templates["y"])
