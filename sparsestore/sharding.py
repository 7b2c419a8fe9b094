"""Sharding: which part of the epoch's row stream a loader's share is.

:func:`_share` is the one formula: rank ``r`` of ``w`` holds a near-equal piece of the
stream, and each sub-shard (:meth:`ShardedLoader.shard`) a run of its parent's batches;
:class:`_ShareSampler` is the block sampler it cuts.  With ``sampler``/``batch_sampler``
ranks and sub-shards deal the sampler's batches round-robin instead
(:meth:`ShardedLoader._slot`).  :func:`taken_in_turn` is where sub-shards read in turn
stand after some batches (a resumed torch worker split).  The loader supplies its
settings, ``_rows``, ``_store`` and ``with_shard``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .arguments import _check_int
from .errors import InvalidInputError
from .sampler import BlockSampler

if TYPE_CHECKING:
    from .loader import DataLoader
    from .store import SparseStore


def _share(total: int, rank: int, world_size: int, sub_shards: Sequence[tuple[int, int]],
           batch_size: int) -> tuple[int, int]:
    """``[lo, hi)``: the positions of a share in the epoch's row stream of ``total`` rows.

    Rank ``r`` of ``w`` holds ``[total * r // w, total * (r + 1) // w)`` (near-equal
    pieces); each sub-shard ``(i, n)`` then takes, of the ``B`` batches its parent's share
    is cut into (the last one maybe short), the rows of batches ``[B * i // n,
    B * (i + 1) // n)``.  Cutting on the batch grid keeps full batches full: the
    sub-shards' batches number ``B`` together whatever ``n``, and only the last sub-shard
    holds the short batch (which ``drop_last`` drops, as the parent would).
    """
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    for i, n in sub_shards:
        batches = -(-(hi - lo) // batch_size)
        lo, hi = (lo + batch_size * (batches * i // n),
                  min(hi, lo + batch_size * (batches * (i + 1) // n)))
    return lo, hi


def taken_in_turn(counts: Sequence[int], seen: int) -> list[int]:
    """How many batches of each sub-shard (``counts`` each) were read after ``seen`` were
    taken one from each sub-shard in turn, those run out skipped: where sub-shards read
    round-robin (torch's workers) stand when resumed after ``seen`` batches."""
    done = [0] * len(counts)
    for r in range(max(counts, default=0)):
        for w, n in enumerate(counts):
            if seen == 0:
                return done
            if n > r:
                done[w], seen = done[w] + 1, seen - 1
    return done


class _ShareSampler(BlockSampler):
    """The block sampler of a loader's share: its rank's, cut further by :func:`_share`
    for the loader's sub-shards (all of it without any)."""

    def __init__(self, bounds: np.ndarray, *, sub_shards: Sequence[tuple[int, int]],
                 batch_size: int, **options: Any) -> None:
        self.sub_shards, self.batch_size = tuple(sub_shards), batch_size
        super().__init__(bounds, **options)

    def _rank_range(self) -> tuple[int, int]:
        return _share(self.total_rows, self.rank, self.world_size, self.sub_shards,
                      self.batch_size)


class ShardedLoader:
    """A loader's share: its rows per epoch, its slot among samplers' batches, and
    :meth:`shard` (a copy reading a sub-shard of it)."""

    # Supplied by the loader.
    _store: SparseStore
    _rows: np.ndarray | None
    _rank: int
    _world_size: int
    _batch_size: int
    _sub_shards: tuple[tuple[int, int], ...]
    _rank_rows: int

    if TYPE_CHECKING:
        def with_shard(self, rank: int, world_size: int) -> DataLoader: ...

    def _share_rows(self) -> int:
        """Rows of this loader's share per epoch (its rank's, cut by its sub-shards)."""
        total = self._store.n_rows if self._rows is None else int(self._rows.size)
        lo, hi = _share(total, self._rank, self._world_size, self._sub_shards,
                        self._batch_size)
        return hi - lo

    def _slot(self) -> tuple[int, int]:
        """``(r, w)``: with a sampler, this loader reads the sampler's batches ``j`` with
        ``j % w == r``; each sub-shard ``(i, n)`` deals its parent's batches round-robin."""
        r, w = self._rank, self._world_size
        for i, n in self._sub_shards:
            r, w = r + w * i, w * n
        return r, w

    def shard(self, index: int, count: int) -> DataLoader:
        """A copy reading sub-shard ``index`` of ``count`` of this loader's share.

        How one rank's share is split further between readers of its own: torch workers,
        ``tf.data`` input pipelines, JAX host threads.  The ``count`` sub-shards are
        disjoint and together read this loader's rows exactly once per epoch; a
        sub-shard's order is reproducible from the seed and the epoch, like a rank's.

        Rows are split on this loader's batch grid: of the ``B = len(loader)`` batches
        (without ``drop_last``), sub-shard ``i`` reads the rows of the run
        ``[B * i // count, B * (i + 1) // count)`` of the epoch's row stream (the rank's
        blocks in shuffled order, before each shuffle unit is permuted), so the
        sub-shards' lengths sum to ``len(loader)`` and differ by at most one batch; a
        sub-shard may be empty when ``count > B``.  Only the last sub-shard can hold a
        short batch; with ``drop_last`` it drops it, so the sub-shards then read
        ``len(loader)`` full batches, exactly the rows ``drop_last`` keeps, the dropped
        ones (fewer than ``batch_size``) being the last of the rank's row stream, which
        for a shuffled loader are not always those the loader itself drops.  A shuffled
        sub-shard permutes its own units: its batches hold the same rows as the
        corresponding part of the stream, mixed in another order than the loader's.  On
        a store that fits one shuffle unit the stream is one permutation of the whole
        store, so the sub-shards' batches are exactly the loader's, dealt in runs.

        With ``sampler``/``batch_sampler`` the loader's batches are dealt round-robin
        instead, as ranks deal them: sub-shard ``i`` reads the loader's batches ``k`` with
        ``k % count == i``.

        The copy starts at this loader's epoch, at the epoch's start, and moves on
        independently; ``shard`` composes (``loader.shard(i, n).shard(j, m)``) and the
        copy's :attr:`sub_shards` records the calls.  ``shard(0, 1)`` is a copy reading
        the same rows in the same order.
        """
        index = _check_int(index, "index", 0)
        count = _check_int(count, "count", 1)
        if index >= count:
            raise InvalidInputError(f"index must be in [0, count={count}), got {index}")
        other = self.with_shard(self._rank, self._world_size)
        other._sub_shards = (*self._sub_shards, (index, count))
        other._rank_rows = other._share_rows()
        return other


__all__ = ["ShardedLoader", "taken_in_turn"]
