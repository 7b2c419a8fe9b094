"""Shuffle quality: how far each batch's label mix is from the mix of all rows served.

On a store whose rows are sorted by a label (a single-cell atlas sample after sample, a log
day after day), a shuffle that only mixes nearby rows gives batches drawn from a few label
groups.  The measure here is the mean total-variation distance (TV) between each batch's
label histogram and the histogram of every row served, beside the same figure for a true
permutation of the same rows (the best a shuffle can do) and for storage order (the worst).

The loader's order comes from :meth:`DataLoader.epoch_rows`, index math only: measuring
reads the label array, never a data chunk (unless ``measure_speed`` asks for a real pass).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidInputError, LabelError

if TYPE_CHECKING:
    from .loader import DataLoader

# Batches scored together: a (batches x labels) count matrix of at most this many cells.
_CELLS = 1 << 22


@dataclass(frozen=True)
class Mixing:
    """Label mix of a sequence of batches: mean TV, mean distinct labels per batch."""

    tv: float
    distinct: float
    batches: int
    rows: int


@dataclass(frozen=True)
class ShuffleReport:
    """A loader's label mix per batch beside a true permutation's and storage order's.

    ``ratio = tv / tv_permutation``: 1 is as good as a permutation; on a sorted store,
    storage order's ratio shows how bad it can get.  ``rows_per_s`` and ``mnnz_per_s`` come
    from one real pass (``measure_speed=True``), else they are None.
    """

    tv: float
    distinct: float
    batches: int
    rows: int
    tv_permutation: float
    distinct_permutation: float
    tv_sequential: float
    distinct_sequential: float
    ratio: float
    n_labels: int
    batch_size: int
    epochs: int
    rows_per_s: float | None = None
    mnnz_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A small text table: this loader, a permutation and storage order side by side."""
        head = f"{'order':<14}{'TV':>9}{'x perm':>9}{'labels/batch':>14}"
        lines = [head, "-" * len(head)]
        for name, tv, distinct in (
            ("this loader", self.tv, self.distinct),
            ("permutation", self.tv_permutation, self.distinct_permutation),
            ("sequential", self.tv_sequential, self.distinct_sequential),
        ):
            ratio = tv / self.tv_permutation if self.tv_permutation > 0 else float("nan")
            r = f"{ratio:.2f}" if np.isfinite(ratio) else "n/a"
            lines.append(f"{name:<14}{tv:>9.4f}{r:>9}{distinct:>14.2f}")
        lines.append(f"{self.batches} batches of {self.batch_size} ({self.rows} rows, "
                     f"{self.epochs} epoch(s)), {self.n_labels} labels")
        if self.rows_per_s is not None:
            lines.append(f"speed: {self.rows_per_s:,.0f} rows/s, "
                         f"{self.mnnz_per_s:.1f} M nnz/s (one real pass)")
        return "\n".join(lines)


# ------------------------------------------------------------------ the measure

def label_codes(labels: Any) -> tuple[np.ndarray, int]:
    """One label per row as codes ``0..K-1`` (via ``np.unique``, any dtype) and ``K``."""
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise LabelError(f"shuffle quality needs one label per row, got shape {arr.shape}")
    uniq, codes = np.unique(arr, return_inverse=True)
    return codes.reshape(-1).astype(np.int64, copy=False), int(uniq.size)


def _score(codes: np.ndarray, sizes: np.ndarray, k: int,
           reference: np.ndarray | None = None) -> tuple[float, float]:
    """Sums over batches of TV and of distinct labels; ``codes`` in serving order, cut into
    consecutive batches of ``sizes`` (none empty), compared with ``reference`` (a label
    mix summing to 1; default: that of all rows served)."""
    n = codes.size
    if n == 0:
        return 0.0, 0.0
    p_all = np.bincount(codes, minlength=k) / n if reference is None else reference
    ends = np.cumsum(sizes)
    starts = ends - sizes
    group = max(1, _CELLS // max(k, 1))
    tv_sum = distinct_sum = 0.0
    for g0 in range(0, sizes.size, group):
        sz = sizes[g0:g0 + group]
        a, b = int(starts[g0]), int(ends[g0 + sz.size - 1])
        bid = np.repeat(np.arange(sz.size, dtype=np.int64), sz)
        counts = np.bincount(bid * k + codes[a:b], minlength=sz.size * k).reshape(sz.size, k)
        tv_sum += float((0.5 * np.abs(counts / sz[:, None] - p_all).sum(axis=1)).sum())
        distinct_sum += float((counts > 0).sum())
    return tv_sum, distinct_sum


def _sizes(batches: Sequence[np.ndarray], drop_last: bool, batch_size: int | None) -> np.ndarray:
    sizes = np.array([b.size for b in batches], dtype=np.int64)
    if drop_last and sizes.size:
        full = int(sizes[0]) if batch_size is None else int(batch_size)
        if sizes[-1] < full:
            sizes = sizes[:-1]
    return sizes


def batch_mixing(
    batches: Iterable[Any],
    labels: Any,
    *,
    drop_last: bool = False,
    batch_size: int | None = None,
    against_all_labels: bool = False,
) -> Mixing:
    """Mean TV between each batch's label histogram and that of all rows served, and mean
    distinct labels per batch, for ``batches`` of row ids into ``labels``.

    ``drop_last`` leaves out a last batch shorter than ``batch_size`` (default: the first
    batch's size), as the loader does, so it counts neither in the means nor in the rows
    served.  Empty batches are skipped (their histogram is undefined).
    ``against_all_labels`` compares each batch with the mix of every row of ``labels``
    instead (a rank's batches against the whole store, say).
    """
    codes, k = label_codes(labels)
    parts = [np.asarray(b, dtype=np.int64).reshape(-1) for b in batches]
    sizes = _sizes(parts, drop_last, batch_size)
    parts = [p for p in parts[: sizes.size] if p.size]
    sizes = sizes[sizes > 0]
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= codes.size):
        raise InvalidInputError(f"row ids must be in [0, {codes.size}), the label array's rows")
    reference = np.bincount(codes, minlength=k) / codes.size if against_all_labels and \
        codes.size else None
    tv, distinct = _score(codes[rows], sizes, k, reference)
    nb = int(sizes.size)
    return Mixing(tv / nb if nb else 0.0, distinct / nb if nb else 0.0, nb, int(rows.size))


#: Labels of more distinct values than this are not scored by :func:`ratio_to_permutation`
#: (a regression target, an id): a batch could not hold a fair share of each anyway.
MAX_SCORED_LABELS = 4096


def ratio_to_permutation(
    label: Any, rows: np.ndarray, batch_size: int, population: np.ndarray | None = None,
    seed: int = 0,
) -> float | None:
    """Mean batch TV of ``rows`` (serving order, cut into full batches of ``batch_size``)
    over that of as many rows drawn by a seeded permutation of ``population`` (default: all
    rows), both against the label mix of the permutation's rows (``label``: one value per
    row, as an array).  None where the label cannot say: not one value per row, fewer than
    2 or more than :data:`MAX_SCORED_LABELS` values, no full batch."""
    nb = rows.size // max(1, batch_size)
    if nb == 0:
        return None
    n = nb * batch_size
    pop_size = len(label) if population is None else population.size
    pick = np.random.default_rng(seed).permutation(pop_size)[:n]
    drawn = pick if population is None else population[pick]
    want = np.concatenate([rows[:n], drawn]).astype(np.int64, copy=False)
    values = np.asarray(label)[want]
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        return None
    uniq, codes = np.unique(values, return_inverse=True)
    k = int(uniq.size)
    if not 2 <= k <= MAX_SCORED_LABELS or drawn.size < n:
        return None
    codes = codes.reshape(-1).astype(np.int64, copy=False)
    reference = np.bincount(codes[n:], minlength=k) / n
    sizes = np.full(nb, batch_size, dtype=np.int64)
    mine = _score(codes[:n], sizes, k, reference)[0]
    best = _score(codes[n:], sizes, k, reference)[0]
    return mine / best if best > 0 else None


# ------------------------------------------------------------------ a loader's quality

def _loader_labels(loader: DataLoader, label: Any) -> np.ndarray:
    if isinstance(label, str):
        return np.asarray(loader.store.labels[label])  # LabelError names the known labels
    arr = np.asarray(label)
    if arr.shape[:1] != (loader.store.n_rows,):
        raise LabelError(
            f"label array has {arr.shape[0] if arr.ndim else 0} rows, the store "
            f"{loader.store.n_rows}"
        )
    return arr


def _epoch_batches(loader: DataLoader, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's rows of ``epoch`` in serving order, and the batch sizes cutting them."""
    if getattr(loader, "_batch_sampler", None) is not None:
        # A batch sampler's batches have sizes of their own: take them as the loader deals
        # them to this rank (read-only; the same iteration epoch_rows does).
        parts = [np.asarray(b, np.int64) for b in loader._rank_row_batches()]
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return rows, np.array([p.size for p in parts if p.size], dtype=np.int64)
    rows = loader.epoch_rows(epoch)
    bs = loader.batch_size
    sizes = np.full(rows.size // bs, bs, dtype=np.int64)
    if rows.size % bs:  # the loader's last short batch (already cut by drop_last)
        sizes = np.append(sizes, rows.size % bs)
    return rows, sizes


def _speed(loader: DataLoader, max_seconds: float | None) -> tuple[float, float]:
    rows = nnz = 0
    it = loader.iter_batches()
    t0 = time.perf_counter()
    try:
        for b in it:
            rows += b.n_rows
            nnz += b.nnz
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                break
    finally:
        it.close()
    dt = max(time.perf_counter() - t0, 1e-9)
    return rows / dt, nnz / dt / 1e6


def shuffle_quality(
    loader: DataLoader,
    label: str | np.ndarray,
    epochs: int = 1,
    *,
    seed: int = 0,
    measure_speed: bool = False,
    speed_seconds: float | None = None,
) -> ShuffleReport:
    """Score ``loader``'s batches over ``epochs`` epochs (from its current one) by ``label``
    (a store label name or an array with one label per store row).

    Each epoch's rows come from index math; the permutation baseline permutes the same rows
    (seeded by ``seed`` and the epoch) and storage order sorts them, both cut into the same
    batch sizes.  Means are over all batches of all epochs, each batch against the
    histogram of its epoch's rows.  ``measure_speed`` streams one real pass (cut after
    ``speed_seconds`` if given); the loader's epoch is restored afterwards.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise InvalidInputError(f"epochs must be an integer >= 1, got {epochs!r}")
    codes, k = label_codes(_loader_labels(loader, label))
    explicit = getattr(loader, "_is_explicit", False)
    first = loader.epoch
    sums = np.zeros(6)
    batches = rows = 0
    try:
        for e in range(first, first + int(epochs)):
            if explicit:
                loader.set_epoch(e)  # a sampler gives only its current epoch's order
            order, sizes = _epoch_batches(loader, e)
            c = codes[order]
            perm = c[np.random.default_rng([seed, e]).permutation(c.size)]
            sums += [*_score(c, sizes, k), *_score(perm, sizes, k),
                     *_score(codes[np.sort(order)], sizes, k)]
            batches += int(sizes.size)
            rows += int(order.size)
    finally:
        if explicit:
            loader.set_epoch(first)
    m = sums / batches if batches else np.zeros(6)
    rps = mnnz = None
    if measure_speed:
        try:
            rps, mnnz = _speed(loader, speed_seconds)
        finally:
            loader.set_epoch(first)
    ratio = float(m[0] / m[2]) if m[2] > 0 else float("nan")
    return ShuffleReport(
        tv=float(m[0]), distinct=float(m[1]), batches=batches, rows=rows,
        tv_permutation=float(m[2]), distinct_permutation=float(m[3]),
        tv_sequential=float(m[4]), distinct_sequential=float(m[5]), ratio=ratio,
        n_labels=k, batch_size=loader.batch_size, epochs=int(epochs),
        rows_per_s=rps, mnnz_per_s=mnnz,
    )


__all__ = ["Mixing", "ShuffleReport", "batch_mixing", "label_codes", "shuffle_quality"]
