"""Pictures of a store: the nnz-per-row histogram and a density map, streamed by row blocks.

matplotlib is an optional extra, imported only when a plot is drawn.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .chunk_cache import ChunkCache
from .errors import InvalidInputError
from .progress import make_bar

__all__ = ["plot_store", "store_profile"]


def store_profile(
    store: Any, *, grid: int = 256, progress: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """nnz per row (streamed) and a ``grid x grid`` nnz count map, by row blocks.

    Each chunk of ``indices`` is decoded once; only one row block is in memory.  Returns
    ``(lengths, counts)``: ``lengths[k]`` rows hold ``k`` entries; ``counts`` the map.
    """
    n, m = store.shape
    gr, gc = max(1, min(grid, n)), max(1, min(grid, m))
    counts = np.zeros(gr * gc, dtype=np.int64)
    lengths = np.zeros(1, dtype=np.int64)  # bincount of row nnz, grown as needed
    with make_bar(progress, n, "profile") as bar:
        step = 2**16
        if store.is_dense:
            for a in range(0, n, step):
                b = min(n, a + step)
                block = store.read_dense(a, b)
                nz = block != 0
                lengths = _add_bincount(lengths, nz.sum(axis=1))
                r, c = np.nonzero(nz)
                counts += np.bincount(((r + a) * gr // n) * gc + c * gc // m,
                                      minlength=gr * gc)
                bar.update(b - a)
        else:
            cache = ChunkCache(store.arrays["indices"], name="indices")
            for a in range(0, n, step):
                b = min(n, a + step)
                ptr = store.indptr(a, b)
                per_row = np.diff(ptr)
                lengths = _add_bincount(lengths, per_row)
                ind = cache.read(int(ptr[0]), int(ptr[-1]), store.nnz).astype(np.int64)
                rows = np.repeat(np.arange(a, b, dtype=np.int64), per_row)
                counts += np.bincount((rows * gr // n) * gc + ind * gc // m, minlength=gr * gc)
                bar.update(b - a)
    return lengths, counts.reshape(gr, gc)


def _add_bincount(acc: np.ndarray, values: np.ndarray) -> np.ndarray:
    bc = np.bincount(np.asarray(values, dtype=np.int64))
    if bc.size > acc.size:
        acc = np.concatenate([acc, np.zeros(bc.size - acc.size, dtype=np.int64)])
    acc[: bc.size] += bc
    return acc


def _bin_sizes(n: int, bins: int) -> np.ndarray:
    """How many of ``0..n-1`` fall in each bin ``k = i * bins // n``."""
    k = np.arange(bins + 1, dtype=np.int64)
    return np.diff(-(-k * n // bins))


def _check_picture_path(out: str) -> None:
    """Refuse a file name matplotlib cannot draw to, before the store is streamed."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(os.fspath(out))[1][1:].lower()
    if ext and ext not in formats:
        raise InvalidInputError(
            f"unknown picture format {ext!r} for the plot {os.fspath(out)!r}: name it "
            f".png, .pdf or .svg (all that matplotlib writes: "
            f"{', '.join('.' + f for f in sorted(formats))})"
        )


def plot_store(store: Any, out: str, *, grid: int = 256, progress: Any = None) -> str:
    """Write a picture (format from ``out``'s suffix, PNG without one) with the nnz-per-row
    histogram and a density map of ``store``.

    Raises :class:`ImportError` naming the extra to install when matplotlib is missing and
    :class:`~sparsestore.errors.InvalidInputError` for a suffix matplotlib cannot write.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib, an optional extra: pip install 'sparsestore[plot]'",
            name="matplotlib",
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    _check_picture_path(out)
    n, m = store.shape
    lengths, counts = store_profile(store, grid=grid, progress=progress)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    if lengths.sum():
        ax1.hist(np.arange(lengths.size), bins=min(60, lengths.size), weights=lengths,
                 color="tab:blue")
        ax1.set_yscale("log")
    ax1.set_xlabel("stored entries per row")
    ax1.set_ylabel("rows")
    ax1.set_title(f"nnz per row ({n} rows, mean {store.nnz / max(1, n):.3g})")
    gr, gc = counts.shape
    dens = counts / np.outer(_bin_sizes(n, gr), _bin_sizes(m, gc)).clip(1)
    shown = np.where(dens > 0, dens, np.nan)
    if np.isfinite(shown).any():
        vmin = float(np.nanmin(shown))
        vmax = max(float(np.nanmax(shown)), vmin * 1.0001)
        im = ax2.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis",
                        norm=LogNorm(vmin=vmin, vmax=vmax), extent=(0, m, n, 0))
        fig.colorbar(im, ax=ax2, label="density")
    ax2.set_xlabel("column")
    ax2.set_ylabel("row")
    ax2.set_title(f"density map ({gr}x{gc} cells)")
    fig.suptitle(os.path.basename(store.path.rstrip("/")))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
