"""Tampering with a store's metadata, and the oracle every read path must meet: raise a
SparseStoreError or return exactly what was saved.  Shared by tests/test_tamper.py and the
reliability report."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

import sparsestore
from sparsestore.errors import SparseStoreError
from sparsestore.validate import validate_store

N_ROWS, N_COLS = 600, 50
LAYOUTS = {
    "chunked": {"chunk_bytes": 1024, "indptr_chunk": 128},
    "sharded": {"chunk_bytes": 1024, "indptr_chunk": 128, "shard_bytes": 16384},
}



def event(what: str) -> None:
    """Count an outcome in hypothesis' statistics (a no-op outside a hypothesis test)."""
    with contextlib.suppress(Exception):
        from hypothesis import event as _event

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


ROWS = np.array([599, 0, 321, 17, 17, 450])

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
