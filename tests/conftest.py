"""Shared fixtures and hypothesis profiles.

CI (``CI=true``) uses a smaller example budget so the whole suite stays well under 15
minutes on 2 cores; locally ``HYPOTHESIS_PROFILE=thorough`` runs more examples.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def small_csr(rng: np.random.Generator) -> sp.csr_matrix:
    """A 3000 x 400 float32 CSR with ~20 nnz per row and some empty rows."""
    X = sp.random(3000, 400, density=0.05, format="csr", dtype=np.float32, random_state=rng)
    X = X.tolil()
    X[100:120] = 0
    return sp.csr_matrix(X)


@pytest.fixture
def small_store(tmp_path, small_csr):
    """``small_csr`` saved with small chunks (many chunks) and two labels."""
    import sparsestore

    n = small_csr.shape[0]
    labels = {
        "y": np.arange(n, dtype=np.int64),
        "w": np.linspace(0, 1, n * 2, dtype=np.float32).reshape(n, 2),
    }
    store = sparsestore.save(tmp_path / "small.zarr", small_csr, labels=labels, chunk_bytes=16384)
    return store, small_csr, labels


@pytest.fixture
def load_example():
    """Import ``examples/<name>.py`` as a module (examples/ is not a package), once."""

    def load(name: str):
        if name in sys.modules:
            return sys.modules[name]
        path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the file runs
        spec.loader.exec_module(mod)
        return mod

    return load
