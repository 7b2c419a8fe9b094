"""The zarr version gate: outside the supported range zarr does all chunk work, and reads,
writes and damage detection stay the same."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import sparsestore
from sparsestore import zarr_compat
from sparsestore.chunk_cache import ChunkCache, SharedChunkCache
from sparsestore.chunks import ChunkDecoder, ChunkEncoder
from sparsestore.errors import ChecksumError


@pytest.mark.parametrize(("text", "want"), [
    ("3.1.6", (3, 1, 6)), ("3.2.0rc1", (3, 2, 0)), ("3.10.1.dev3+g12", (3, 10, 1)), ("dev", ()),
])
def test_version_parts(text, want):
    assert zarr_compat._version(text) == want


def test_installed_zarr_is_supported():
    assert zarr_compat.SUPPORTED


@pytest.mark.parametrize("supported", [True, False])
def test_gate_switches_the_direct_paths_and_keeps_results(tmp_path, monkeypatch, supported):
    monkeypatch.setattr(zarr_compat, "SUPPORTED", supported)
    X = sp.random(600, 80, density=0.08, format="csr", dtype=np.float32, random_state=5)
    store = sparsestore.save(tmp_path / "g.zarr", X, chunk_bytes=4096)
    arr = store.arrays["data"]
    assert ChunkDecoder(arr, "data").is_direct == supported
    assert (ChunkEncoder.for_array(arr) is not None) == supported
    for cache in (ChunkCache(arr, name="data"), SharedChunkCache(arr, name="data")):
        np.testing.assert_array_equal(cache.read(0, X.nnz, X.nnz), X.data)
    chunk = sorted((tmp_path / "g.zarr" / "data" / "c").iterdir())[1]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    chunk.write_bytes(bytes(raw))
    damaged = sparsestore.open(tmp_path / "g.zarr").arrays["data"]
    with pytest.raises(ChecksumError):
        ChunkCache(damaged, name="data").read(0, X.nnz, X.nnz)
