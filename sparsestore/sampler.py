"""Which rows, in which order: row blocks, block shuffling, a bounded shuffle buffer, sharding.

Pure index math, no I/O: the loader streams ``indptr`` in and gets plans back.

Shuffling that still reads whole chunks
---------------------------------------
Rows are grouped into *blocks* aligned to the storage chunks of ``data`` (each block covers
about ``target_nnz`` stored values; one chunk when shuffling), so reading a block decodes
whole chunks it mostly needs.  An epoch then

1. orders the blocks at random (seeded by ``seed`` and ``epoch``, the same on every rank).
   With several ranks the order is stratified: the blocks are dealt in stored order,
   ``world_size`` at a time, one to each rank at random, and each rank's blocks follow in
   random order, so every rank's share samples the whole store evenly (on a store sorted
   by label, each rank sees every label in the store's proportions, not the labels of a
   random half of the blocks);
2. deals that row stream to ranks as ``world_size`` contiguous, near-equal pieces (sizes
   differ by at most one row; the block at a cut is split between two ranks, so a rank's
   piece is its dealt blocks give or take the few at its edges),
3. deals each rank's blocks into as few *units* as hold them within ``unit_bytes``
   decoded bytes (or of at most ``buffer_blocks`` blocks), stratified like the ranks: the
   share's blocks in stored order go ``n_units`` at a time, one to each unit at random.
   Units go in random order, and all rows inside a unit are permuted (the bounded shuffle
   buffer).

Each unit samples the rank's whole share evenly, so on a store sorted by a label of far
fewer groups than a unit holds blocks, every unit holds every label in about its share
and a batch mixes like a permutation's.  A label of about as many groups as a unit holds
blocks (or more) is the worst case: a batch then mixes rows of about as many runs of
consecutive stored rows as the unit holds blocks (:func:`mixing_ratio`).  When the whole
store fits one unit the epoch is a true permutation, on every rank: a share of it (a
rank's, a worker's) is its slice of one permutation of the whole store, and each share
decodes every block once per pass.  (A share of a larger store that fits one unit is
permuted whole, but holds only its dealt blocks.)  Two neighbouring
blocks share the chunk the first one's last row crosses into; when they fall in different
units that row is read with the later one (:func:`seams_to_later_units`), which takes the
row's piece of the chunk from a copy the earlier unit kept, so each chunk is still decoded
once per pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .blocks import cap_block_rows, entry_bounds
from .chunks import range_positions
from .errors import InvalidInputError

#: Upper bound on rows per block whatever the nnz (very sparse rows, empty rows, dense).
DEFAULT_MAX_BLOCK_ROWS = 1 << 18


def fixed_bounds(n_rows: int, block_rows: int) -> np.ndarray:
    """Block boundaries every ``block_rows`` rows: ``[0, b, 2b, ..., n_rows]``."""
    if n_rows == 0:
        return np.zeros(1, dtype=np.int64)
    return np.append(np.arange(0, n_rows, block_rows, dtype=np.int64), np.int64(n_rows))


def bounds_from_indptr(
    pieces: Iterable[tuple[int, np.ndarray]],
    n_rows: int,
    target_nnz: int,
    max_rows: int = DEFAULT_MAX_BLOCK_ROWS,
) -> np.ndarray:
    """Block boundaries cutting where ``indptr`` crosses each multiple of ``target_nnz``.

    ``pieces`` yields ``(row0, indptr[row0:row0 + len])`` covering ``indptr[0:n_rows+1]`` in
    order (chunk by chunk, so the whole indptr is never held).  With ``target_nnz`` equal to
    a multiple of the ``data`` chunk length, every block starts in the chunk where the
    previous one ended: neighbouring blocks share at most one chunk.
    """
    if target_nnz < 1:
        raise InvalidInputError(f"target_nnz must be positive, got {target_nnz}")
    cuts: list[np.ndarray] = [np.array([0, n_rows], dtype=np.int64)]
    last = np.zeros(1, dtype=np.int64)  # the previous piece's last indptr entry
    for row0, piece in pieces:
        piece = np.asarray(piece, dtype=np.int64)
        if piece.size == 0:
            continue
        # Led by the previous piece's end, so a multiple reached at this piece's first row
        # cuts there, and one reached before does not cut again.
        cuts.append(row0 - 1 + entry_bounds(np.concatenate([last, piece]), target_nnz,
                                            ends=False))
        last = piece[-1:]
    bounds = np.unique(np.concatenate(cuts))
    bounds = bounds[(bounds >= 0) & (bounds <= n_rows)]
    return cap_block_rows(bounds, max_rows)


@dataclass(frozen=True)
class UnitSpec:
    """One unit of work for the reader: the rows it must decode and the order to emit them.

    ``spans`` are sorted, disjoint global row ranges ``[a, b)`` to read; ``take`` indexes the
    rows of the concatenated spans in emission order (``None``: all of them, in order);
    ``rows`` are the emitted global row ids; ``offset`` is where the unit starts in the
    rank's epoch stream.  ``explicit`` units (torch-style samplers) have
    no spans: ``rows`` is read by random access, several batches at once (``cuts``: where
    each batch starts in ``rows``, and their end).
    """

    index: int
    spans: np.ndarray
    take: np.ndarray | None
    rows: np.ndarray
    explicit: bool = False
    offset: int = 0  # first row's position in the rank's epoch stream
    cuts: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return int(self.rows.size)


def explicit_unit(index: int, batches: list[np.ndarray]) -> UnitSpec:
    """A unit of consecutive batches of arbitrary (validated) row ids, read together and
    emitted batch by batch in the given order."""
    cuts = np.cumsum([0, *(b.size for b in batches)])
    rows = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    return UnitSpec(index, np.empty((0, 2), np.int64), None, rows, explicit=True, cuts=cuts)


class EpochPlan:
    """One rank's blocks for one epoch, grouped into units; lazily expands each unit."""

    def __init__(
        self,
        starts: np.ndarray,
        ends: np.ndarray,
        *,
        rows: np.ndarray | None,
        unit_cuts: np.ndarray,
        shuffle: bool,
        seed: int,
        epoch: int,
        rank: int,
        pick: tuple[int, int] | None = None,
    ) -> None:
        self._starts, self._ends = starts, ends  # position-space ranges, plan order
        self._rows = rows
        #: ``(lo, hi)``: the one unit reads every block and emits rows ``[lo, hi)`` of one
        #: permutation of them all, the same on every rank (a share of a small store).
        self._pick = pick
        #: block index where each unit starts, plus the number of blocks
        self.unit_cuts = np.asarray(unit_cuts, dtype=np.int64)
        self._shuffle = shuffle
        self._seed, self._epoch, self._rank = seed, epoch, rank
        self.n_units = max(0, self.unit_cuts.size - 1)
        cum = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        #: first row offset (within this rank's epoch stream) of each unit, plus the total
        self.unit_offsets = cum[self.unit_cuts] if self.n_units else np.zeros(1, np.int64)
        if pick is not None:
            self.unit_offsets = np.array([0, pick[1] - pick[0]], np.int64)
        self.n_rows = int(self.unit_offsets[-1])

    @property
    def blocks_per_unit(self) -> np.ndarray:
        return np.diff(self.unit_cuts)

    def locate(self, offset: int) -> tuple[int, int]:
        """``(unit, row within unit)`` of the ``offset``-th row of the epoch stream."""
        if offset >= self.n_rows:
            return self.n_units, 0
        u = int(np.searchsorted(self.unit_offsets, offset, side="right")) - 1
        return u, offset - int(self.unit_offsets[u])

    def units(self, first: int = 0) -> Iterator[UnitSpec]:
        for u in range(first, self.n_units):
            yield self.unit(u)

    def spans(self, u: int) -> np.ndarray | None:
        """Unit ``u``'s read spans (global row ranges) from index math alone, or None where
        that needs the unit expanded (a row subset)."""
        if self._rows is not None:
            return None
        sl = slice(int(self.unit_cuts[u]), int(self.unit_cuts[u + 1]))
        srt = np.argsort(self._starts[sl], kind="stable")
        ps, pe = self._starts[sl][srt], self._ends[sl][srt]
        brk = np.concatenate([[True], ps[1:] != pe[:-1]])
        last = np.concatenate([brk[1:], [True]])
        return np.stack([ps[brk], pe[last]], axis=1)

    def unit(self, u: int) -> UnitSpec:
        """Expand unit ``u``: spans to read, local gather order and global row ids."""
        sl = slice(int(self.unit_cuts[u]), int(self.unit_cuts[u + 1]))
        ps, pe = self._starts[sl], self._ends[sl]
        srt = np.argsort(ps, kind="stable")
        ps, pe = ps[srt], pe[srt]
        pos = range_positions(ps, pe)  # ascending: ranges are disjoint and sorted
        g = pos if self._rows is None else self._rows[pos]
        # One read span per range, merged when ranges touch in global rows.
        a = g[np.concatenate([[0], np.cumsum(pe - ps)[:-1]])]
        b = g[np.cumsum(pe - ps) - 1] + 1
        brk = np.concatenate([[True], a[1:] != b[:-1]])
        span_of_range = np.cumsum(brk) - 1
        last_of_span = np.concatenate([brk[1:], [True]])
        span_a, span_b = a[brk], b[last_of_span]
        spans = np.stack([span_a, span_b], axis=1)
        if self._rows is None:
            local = None  # the spans hold exactly these rows, in order
        else:
            span_off = np.concatenate([[0], np.cumsum(span_b - span_a)[:-1]])
            row_span = np.repeat(span_of_range, pe - ps)
            local = span_off[row_span] + (g - span_a[row_span])
        if self._pick is not None:
            lo, hi = self._pick
            perm = np.random.default_rng([self._seed, self._epoch]).permutation(g.size)[lo:hi]
            take = perm if local is None else local[perm]
            return UnitSpec(u, spans, take, g[perm])
        if self._shuffle:
            rng = np.random.default_rng([self._seed, self._epoch, self._rank, u])
            perm = rng.permutation(g.size)
            take = perm if local is None else local[perm]
            return UnitSpec(u, spans, take, g[perm], offset=int(self.unit_offsets[u]))
        return UnitSpec(u, spans, local, g, offset=int(self.unit_offsets[u]))


class BlockSampler:
    """Plans epochs over row blocks: block order, rank shards, shuffle-buffer units.

    ``bounds`` are global row block boundaries (``[0, ..., n_rows]``); ``rows`` an optional
    sorted, unique subset of rows to use (blocks then hold only those rows).  A shuffled
    unit holds as many blocks as fit ``unit_bytes`` decoded bytes, counted by
    ``block_bytes`` (bytes of each block of ``bounds``; a block cut by a row subset or a
    rank boundary counts in proportion to the rows it keeps), or ``buffer_blocks`` blocks
    when no byte budget is given.
    """

    def __init__(
        self,
        bounds: np.ndarray,
        *,
        rows: np.ndarray | None = None,
        shuffle: bool = False,
        seed: int = 0,
        buffer_blocks: int = 8,
        unit_bytes: int | None = None,
        block_bytes: np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if buffer_blocks < 1:
            raise InvalidInputError(f"shuffle_buffer_blocks must be >= 1, got {buffer_blocks}")
        if unit_bytes is not None and (unit_bytes < 1 or block_bytes is None):
            raise InvalidInputError(
                f"unit_bytes must be >= 1 and come with block_bytes, got {unit_bytes}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidInputError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        bounds = np.asarray(bounds, dtype=np.int64)
        pb = bounds if rows is None else np.searchsorted(rows, bounds, side="left")
        keep = np.diff(pb) > 0
        self.starts = pb[:-1][keep].astype(np.int64)
        self.ends = pb[1:][keep].astype(np.int64)
        self.rows = rows
        self.shuffle = shuffle
        self.seed = int(seed)
        self.buffer_blocks = int(buffer_blocks)
        self.unit_bytes = None if unit_bytes is None else int(unit_bytes)
        if unit_bytes is not None:
            bb = np.asarray(block_bytes, dtype=np.float64)
            if bb.shape != (bounds.size - 1,):
                raise InvalidInputError(
                    f"block_bytes needs one entry per block ({bounds.size - 1}), got {bb.shape}"
                )
            # Bytes per kept row of each kept block (a subset keeps a share of its rows).
            self._row_bytes = bb[keep] / np.diff(bounds)[keep]
        else:
            self._row_bytes = None
        self.rank, self.world_size = int(rank), int(world_size)
        self.total_rows = int((self.ends - self.starts).sum())
        lo, hi = self._rank_range()
        #: rows this rank gets per epoch (the same every epoch)
        self.n_rows = hi - lo

    @property
    def n_blocks(self) -> int:
        return int(self.starts.size)

    def _rank_range(self) -> tuple[int, int]:
        n, r, w = self.total_rows, self.rank, self.world_size
        return n * r // w, n * (r + 1) // w

    def fits_one_unit(self) -> bool:
        """Whether every block (of every rank) fits one shuffle unit."""
        if self._row_bytes is None:
            return self.n_blocks <= self.buffer_blocks
        total = float((self._row_bytes * (self.ends - self.starts)).sum())
        return total <= self.unit_bytes  # type: ignore[operator]

    def block_order(self, epoch: int) -> np.ndarray:
        """Permutation of blocks for ``epoch`` (identity without shuffle); rank-independent.

        With ``world_size`` > 1 the permutation is stratified (see the module docstring):
        the first ~1/world of it is rank 0's dealt blocks in random order, and so on.
        """
        n, w = self.n_blocks, self.world_size
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, int(epoch)])
        if w == 1:
            return rng.permutation(n)
        # Each run of w stored blocks goes one to each rank, in a random assignment.
        strata = -(-n // w)
        dealt = np.argsort(rng.random((strata, w)), axis=1).ravel()[:n]
        return np.lexsort((rng.random(n), dealt))

    def _deal_units(
        self, epoch: int, order: np.ndarray, s: np.ndarray, e: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """This rank's blocks regrouped into units, each a stratified sample of the share.

        As few units as hold the share within the budget; the share's blocks, in stored
        order, are dealt ``n_units`` at a time, one to each unit at random, so each unit
        spans the whole share (on a store sorted by label, every label in about its share).
        A block over half the budget is a unit of its own.  Units go in random order.
        Returns the blocks in plan order and the unit cuts.
        """
        n = int(order.size)
        if n == 0:
            return order, s, e, np.zeros(1, np.int64)
        stored = np.argsort(order, kind="stable")  # plan positions in stored order
        if self._row_bytes is not None:
            # Each block leaves room for the row its stored left neighbour may hand it
            # (see seams_to_later_units).
            left = self._row_bytes[np.maximum(order - 1, 0)] * (order > 0)
            nbytes = (self._row_bytes[order] * (e - s) + left)[stored]
            lone = nbytes > self.unit_bytes / 2
            dealt, nbytes = stored[~lone], nbytes[~lone]
            stored = np.concatenate([dealt, stored[lone]])
            n_units = int(np.ceil(nbytes.sum() / self.unit_bytes))
        else:
            dealt, nbytes = stored, None
            n_units = -(-n // self.buffer_blocks)
        k = int(dealt.size)
        n_units = min(max(1, n_units), k)
        while True:
            rng = np.random.default_rng([self.seed, int(epoch), self.rank, n_units])
            if not k:  # every block a unit of its own
                unit_of = np.zeros(0, np.int64)
                break
            unit_of = np.argsort(rng.random((-(-k // n_units), n_units)), axis=1).ravel()[:k]
            if nbytes is None or n_units >= k:
                break
            used = np.bincount(unit_of, nbytes, minlength=n_units)
            if used.max() <= self.unit_bytes:
                break
            n_units = min(k, max(n_units + 1, int(np.ceil(n_units * used.max()
                                                          / self.unit_bytes))))
        unit_of = np.concatenate([unit_of, n_units + np.arange(n - k)])  # lone blocks last
        place = rng.permutation(n_units + n - k)[unit_of]  # each block's unit, in plan order
        new = stored[np.lexsort((rng.random(n), place))]
        cuts = np.concatenate([[0], np.cumsum(np.bincount(place))])
        return order[new], s[new], e[new], cuts.astype(np.int64)

    def plan(self, epoch: int, head_rows: int | None = None) -> EpochPlan:
        """This rank's units for ``epoch``: reproducible from ``(seed, epoch)``.

        ``head_rows`` (unshuffled passes only): the first block's first ``head_rows`` rows
        become a unit of their own, so the pass's first batch waits for the decode of
        those rows' chunks rather than of the whole block (the chunk they share with the
        rest of the block is still decoded once, through the reader's cache).
        """
        lo, hi = self._rank_range()
        if self.shuffle and hi > lo and self.fits_one_unit():
            # A store that fits one unit: each share's rows are its slice of one
            # permutation of the whole store, which each share decodes.
            return EpochPlan(
                self.starts, self.ends, rows=self.rows,
                unit_cuts=np.array([0, self.n_blocks], np.int64), shuffle=True,
                seed=self.seed, epoch=epoch, rank=self.rank, pick=(lo, hi),
            )
        order = self.block_order(epoch)
        s, e = self.starts[order], self.ends[order]
        if hi > lo:
            cum = np.concatenate([[0], np.cumsum(e - s)])
            i0 = int(np.searchsorted(cum, lo, side="right")) - 1
            i1 = int(np.searchsorted(cum, hi, side="left"))
            order = order[i0:i1]
            s, e = s[i0:i1].copy(), e[i0:i1].copy()
            s[0] += lo - cum[i0]
            e[-1] -= cum[i1] - hi
        else:
            order = s = e = np.zeros(0, np.int64)
        if head_rows is not None and not self.shuffle and s.size and e[0] - s[0] > head_rows:
            s = np.concatenate([s[:1], s[:1] + head_rows, s[1:]])
            e = np.concatenate([s[:1] + head_rows, e])
        if not self.shuffle:
            # Without shuffling a unit is one block: no buffer to mix, and units in flight
            # (prefetch x unit bytes) stay small.
            cuts = np.arange(s.size + 1, dtype=np.int64)
        else:
            order, s, e, cuts = self._deal_units(epoch, order, s, e)
        if self.shuffle and cuts.size > 2:
            room = None
            if self._row_bytes is not None:
                room = (self._row_bytes[order], float(self.unit_bytes))  # type: ignore[arg-type]
            s, e = seams_to_later_units(order, s, e, cuts, room)
        return EpochPlan(
            s, e, rows=self.rows, unit_cuts=cuts, shuffle=self.shuffle,
            seed=self.seed, epoch=epoch, rank=self.rank,
        )


def seams_to_later_units(
    order: np.ndarray, s: np.ndarray, e: np.ndarray, cuts: np.ndarray,
    room: tuple[np.ndarray, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each block's last row moves to the next stored block when that block is read in a
    later unit.

    Blocks are cut where ``indptr`` reaches a chunk boundary, so a block's last row is the
    one that crosses into the next block's first chunk.  Read with its own block in an
    earlier unit, that row would decode the neighbour's chunk a unit early (and the
    neighbour's unit would decode it again); read with the later unit, it needs only its
    head from the chunk the earlier unit decoded, which the reader keeps for it (a row's
    worth, see :class:`~sparsestore.chunk_cache.SharedChunkCache`).  ``order``: block ids in
    plan order; ``s``/``e``: their row ranges; ``cuts``: unit boundaries over them;
    ``room``: each block's bytes per row and the unit byte budget, which a row moves into
    a unit only while the unit stays within it (or is one block, which may exceed it).
    """
    if order.size < 2:
        return s, e
    unit = np.repeat(np.arange(cuts.size - 1), np.diff(cuts))
    where = np.full(int(order.max()) + 2, -1, np.int64)
    where[order] = np.arange(order.size)
    right = where[order + 1]  # plan index of each block's stored right neighbour, or -1
    i = np.flatnonzero(right >= 0)
    j = right[i]
    move = (unit[i] < unit[j]) & (e[i] == s[j]) & (e[i] - s[i] > 1)
    if room is not None:
        per_row, budget = room
        i, j = i[move], j[move]
        used = np.bincount(unit, per_row * (e - s), minlength=cuts.size - 1)
        srt = np.argsort(unit[j], kind="stable")  # each receiving unit's moves in turn
        i, j = i[srt], j[srt]
        add = per_row[i]
        grown = np.cumsum(add) - add  # bytes moved into earlier receiving units
        first = np.searchsorted(unit[j], unit[j], side="left")
        lone = np.diff(cuts)[unit[j]] == 1  # a unit of one block may exceed the budget
        within = lone | (used[unit[j]] + (grown - grown[first] + add) <= budget)
        i, j = i[within], j[within]
        move = np.ones(i.size, bool)
    s, e = s.copy(), e.copy()
    e[i[move]] -= 1
    s[j[move]] -= 1
    return s, e


def mixing_ratio(blocks_per_unit: float, batch_size: int) -> float:
    """Expected batch label error over a true permutation's, for rows sorted by a label
    of about as many groups as a unit holds blocks or more (the worst case).

    A batch of ``B`` rows drawn from a unit of ``k`` blocks holds about
    ``m = k (1 - (1 - 1/k)^B)`` distinct blocks (runs of neighbouring rows, which share a
    label on a sorted store) and behaves like a sample of ``m`` rows: its total-variation
    distance is about ``sqrt(B / m)`` times a permutation's.  Labels of far fewer groups
    mix better, because units are stratified over the store.
    """
    k, b = max(1.0, float(blocks_per_unit)), max(1, int(batch_size))
    m = k * -np.expm1(b * np.log1p(-1.0 / k)) if k > 1 else 1.0
    return float(np.sqrt(b / max(1.0, m)))


def num_batches(n_rows: int, batch_size: int, drop_last: bool) -> int:
    """Batches from ``n_rows`` rows: torch's rule (last short batch kept unless drop_last)."""
    return n_rows // batch_size if drop_last else -(-n_rows // batch_size)


__all__ = [
    "DEFAULT_MAX_BLOCK_ROWS",
    "BlockSampler",
    "EpochPlan",
    "UnitSpec",
    "bounds_from_indptr",
    "cap_block_rows",
    "explicit_unit",
    "fixed_bounds",
    "mixing_ratio",
    "num_batches",
    "seams_to_later_units",
]
