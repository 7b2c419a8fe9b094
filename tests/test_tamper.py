"""Random tampering with a store's metadata and shard indexes: every read path either raises a
SparseStoreError or returns exactly what was saved (scipy / numpy as the oracle).

A hostile or unlucky edit may change any field of any ``zarr.json`` (the group's attrs and
manifest, an array's shape, dtype, chunk grid or codecs) or any byte of a shard's index
(with the index's own CRC32C recomputed, as a careful forger would). Nothing may read back
silently wrong through slices, fancy rows, labels, the loader (sequential and shuffled),
dask, or ``validate``.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsestore
from benchmarks.tamper import (  # noqa: F401  (the helpers the tests below use)
    LAYOUTS,
    N_COLS,
    N_ROWS,
    ROWS,
    _check,
    _edit_json,
    _leaves,
    _loader,
    _replacement,
    _same,
    event,
)

TAMPER = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                        HealthCheck.too_slow])
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
