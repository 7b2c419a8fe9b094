"""The examples' learnable synthetic problem: sparse rows ``x`` and binary labels
``y = [x . w > 0]`` from hidden weights ``w`` (a few flipped as noise), written block by block."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import sparsestore

BLOCK_ROWS = 20_000


def synthetic_blocks(
    n_rows: int, n_cols: int, density: float, seed: int, noise: float = 0.02
) -> Iterator[tuple[sp.csr_matrix, dict[str, np.ndarray]]]:
    """Row blocks of a sparse matrix and labels ``y = [x . w > 0]`` from hidden weights ``w``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n_cols).astype(np.float32)
    for start in range(0, n_rows, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, n_rows - start)
        X = sp.random(rows, n_cols, density=density, format="csr", dtype=np.float32,
                      random_state=rng, data_rvs=lambda k: rng.random(k, dtype=np.float32) + 0.5)
        y = (X @ w > 0).astype(np.float32)
        flip = rng.random(rows) < noise
        y[flip] = 1.0 - y[flip]
        yield X, {"y": y}


def build_store(
    path: str | Path, n_rows: int, n_cols: int, density: float = 0.01, seed: int = 0,
    noise: float = 0.02,
) -> sparsestore.SparseStore:
    """Write the synthetic problem to ``path`` (overwriting), one block at a time."""
    return sparsestore.write_blocks(
        path, synthetic_blocks(n_rows, n_cols, density, seed, noise), n_cols=n_cols,
        dtype=np.float32, overwrite=True,
    )
