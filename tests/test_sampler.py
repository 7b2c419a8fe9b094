"""Sampler: pure index math checked against brute-force numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsestore.errors import InvalidInputError
from sparsestore.mixing import batch_mixing
from sparsestore.sampler import (
    BlockSampler,
    bounds_from_indptr,
    cap_block_rows,
    fixed_bounds,
    mixing_ratio,
    num_batches,
    seams_to_later_units,
)


def _pieces(indptr: np.ndarray, step: int):
    for p in range(0, indptr.size, step):
        yield p, indptr[p : p + step]


def _epoch_rows(sampler: BlockSampler, epoch: int, head_rows: int | None = None) -> np.ndarray:
    """The rank's full row stream for an epoch, with each unit's spans/take checked."""
    plan = sampler.plan(epoch, head_rows=head_rows)
    out = []
    for unit in plan.units():
        span_rows = np.concatenate([np.arange(a, b) for a, b in unit.spans])
        emitted = span_rows if unit.take is None else span_rows[unit.take]
        np.testing.assert_array_equal(emitted, unit.rows)
        assert (np.diff(unit.spans[:, 0]) > 0).all()  # sorted, disjoint spans
        assert (unit.spans[1:, 0] > unit.spans[:-1, 1]).all() or len(unit.spans) == 1
        out.append(unit.rows)
    rows = np.concatenate(out) if out else np.zeros(0, np.int64)
    assert rows.size == plan.n_rows == sampler.n_rows
    return rows


@given(
    lengths=st.lists(st.integers(0, 50), min_size=0, max_size=300),
    target=st.integers(1, 200),
    step=st.integers(1, 64),
    max_rows=st.integers(1, 400),
)
def test_bounds_from_indptr_cut_at_each_nnz_target(lengths, target, step, max_rows):
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = len(lengths)
    b = bounds_from_indptr(_pieces(indptr, step), n, target, max_rows)
    assert b[0] == 0 and b[-1] == n and (np.diff(b) > 0).all() or n == 0
    assert (np.diff(b) <= max_rows).all()
    # Oracle: every row where indptr first reaches a multiple of target is a boundary.
    for k in range(1, int(indptr[-1]) // target + 1):
        r = int(np.argmax(indptr >= k * target))
        assert r in set(b.tolist())
    if max_rows >= n:  # no extra cuts: each block's nnz crosses the next multiple
        for a, c in zip(b[:-2], b[1:-1], strict=True):
            assert indptr[c] // target > indptr[a] // target or indptr[c] % target == 0


def test_cap_and_fixed_bounds():
    np.testing.assert_array_equal(fixed_bounds(10, 4), [0, 4, 8, 10])
    np.testing.assert_array_equal(fixed_bounds(0, 4), [0])
    capped = cap_block_rows(np.array([0, 10, 11]), 3)
    assert capped[0] == 0 and capped[-1] == 11 and (np.diff(capped) <= 3).all()
    assert 10 in capped


@given(
    n=st.integers(0, 400),
    block=st.integers(1, 60),
    buffer_blocks=st.integers(1, 5),
    world=st.integers(1, 5),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**32),
    subset=st.booleans(),
)
def test_ranks_disjoint_cover_every_row_once(n, block, buffer_blocks, world, shuffle, seed,
                                             subset):
    rows = None
    if subset:
        rows = np.flatnonzero(np.random.default_rng(seed).random(n) < 0.6)
    samplers = [
        BlockSampler(fixed_bounds(n, block), rows=rows, shuffle=shuffle, seed=seed,
                     buffer_blocks=buffer_blocks, rank=r, world_size=world)
        for r in range(world)
    ]
    per_rank = [_epoch_rows(s, 3) for s in samplers]
    everything = np.concatenate(per_rank)
    expect = np.arange(n) if rows is None else rows
    np.testing.assert_array_equal(np.sort(everything), expect)  # each row exactly once
    sizes = [r.size for r in per_rank]
    assert max(sizes) - min(sizes) <= 1  # near-equal
    if not shuffle:
        np.testing.assert_array_equal(everything, expect)  # storage order


@given(
    n=st.integers(0, 300),
    block=st.integers(1, 60),
    head=st.integers(1, 80),
    world=st.integers(1, 3),
    shuffle=st.booleans(),
    subset=st.booleans(),
)
def test_head_unit_splits_only_the_first_block(n, block, head, world, shuffle, subset):
    rows = np.flatnonzero(np.random.default_rng(n).random(n) < 0.6) if subset else None
    for rank in range(world):
        s = BlockSampler(fixed_bounds(n, block), rows=rows, shuffle=shuffle, seed=5,
                         buffer_blocks=3, rank=rank, world_size=world)
        stream = _epoch_rows(s, 2)
        np.testing.assert_array_equal(_epoch_rows(s, 2, head), stream)  # same row order
        plain, headed = s.plan(2), s.plan(2, head_rows=head)
        split = not shuffle and plain.n_units > 0 and plain.unit(0).n_rows > head
        assert headed.n_units == plain.n_units + split
        if split:  # the head, then the rest of the first block, then the same units
            assert headed.unit(0).n_rows == head
            np.testing.assert_array_equal(headed.unit(1).rows, plain.unit(0).rows[head:])
        for u in range(1 + split, headed.n_units):
            np.testing.assert_array_equal(headed.unit(u).rows, plain.unit(u - split).rows)
        for off in sorted({0, head - 1, head, stream.size // 2, stream.size - 1}):
            if 0 <= off < stream.size:
                u, k = headed.locate(off)
                assert headed.unit(u).rows[k] == stream[off]


def test_shuffle_reproducible_and_different_per_epoch():
    b = fixed_bounds(5000, 97)
    s1 = BlockSampler(b, shuffle=True, seed=7, buffer_blocks=4)
    s2 = BlockSampler(b, shuffle=True, seed=7, buffer_blocks=4)
    e0, e0b, e1 = _epoch_rows(s1, 0), _epoch_rows(s2, 0), _epoch_rows(s1, 1)
    np.testing.assert_array_equal(e0, e0b)
    assert not np.array_equal(e0, e1)
    other_seed = _epoch_rows(BlockSampler(b, shuffle=True, seed=8, buffer_blocks=4), 0)
    assert not np.array_equal(e0, other_seed)
    # Random enough for SGD: the first 500 rows come from all over the matrix, and the
    # order is far from sorted (rank correlation with position is small).
    assert np.ptp(e0[:500]) > 2500
    assert abs(np.corrcoef(e0, np.arange(e0.size))[0, 1]) < 0.2


def test_block_order_is_shared_by_ranks():
    b = fixed_bounds(1000, 10)
    orders = {tuple(BlockSampler(b, shuffle=True, seed=3, rank=r, world_size=4)
                    .block_order(2)) for r in range(4)}
    assert len(orders) == 1


def test_locate_matches_stream_offsets():
    s = BlockSampler(fixed_bounds(1000, 37), shuffle=True, seed=1, buffer_blocks=3)
    plan = s.plan(0)
    stream = _epoch_rows(s, 0)
    for off in (0, 1, 110, 111, 500, 999):
        u, k = plan.locate(off)
        assert plan.unit(u).rows[k] == stream[off]
    assert plan.locate(1000) == (plan.n_units, 0)


def test_bad_arguments():
    with pytest.raises(InvalidInputError):
        BlockSampler(fixed_bounds(10, 2), rank=2, world_size=2)
    with pytest.raises(InvalidInputError):
        BlockSampler(fixed_bounds(10, 2), buffer_blocks=0)
    with pytest.raises(InvalidInputError):
        bounds_from_indptr([], 0, 0)


def test_num_batches():
    assert num_batches(10, 3, False) == 4
    assert num_batches(10, 3, True) == 3
    assert num_batches(0, 3, False) == 0


# ------------------------------------------------------------------ byte-budget units


def _block_bytes_sampler(n, block, per_block_bytes, budget, rows, world, rank, seed):
    bounds = fixed_bounds(n, block)
    return BlockSampler(bounds, rows=rows, shuffle=True, seed=seed, unit_bytes=budget,
                        block_bytes=per_block_bytes * np.diff(bounds), rank=rank,
                        world_size=world)


@given(
    n=st.integers(0, 400),
    block=st.integers(1, 60),
    budget=st.integers(1, 3000),
    world=st.integers(1, 4),
    seed=st.integers(0, 2**32),
    subset=st.booleans(),
)
def test_byte_budget_units_cover_every_row_once_within_budget(n, block, budget, world, seed,
                                                              subset):
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(rng.random(n) < 0.6) if subset else None
    n_blocks = fixed_bounds(n, block).size - 1
    per_block = rng.integers(1, 20, size=max(n_blocks, 0))  # bytes per row, block by block
    row_bytes = np.repeat(per_block, np.diff(fixed_bounds(n, block)))
    per_rank = []
    for r in range(world):
        s = _block_bytes_sampler(n, block, per_block, budget, rows, world, r, seed)
        plan = s.plan(1)
        for u in range(plan.n_units):
            unit = plan.unit(u)
            nbytes = int(row_bytes[unit.rows].sum())  # oracle: the unit's rows' own bytes
            # Within the budget, unless the unit is one block bigger than it.
            assert nbytes <= budget or plan.blocks_per_unit[u] == 1
        per_rank.append(_epoch_rows(s, 1))
    expect = np.arange(n) if rows is None else rows
    np.testing.assert_array_equal(np.sort(np.concatenate(per_rank)), expect)
    sizes = [r.size for r in per_rank]
    assert max(sizes) - min(sizes) <= 1


def test_seam_rows_go_to_the_later_unit():
    # Blocks 0..5 of 10 rows; units read blocks [3, 0] then [1, 5] then [2, 4].
    order = np.array([3, 0, 1, 5, 2, 4])
    s, e = order * 10, order * 10 + 10
    cuts = np.array([0, 2, 4, 6])
    s2, e2 = seams_to_later_units(order, s, e, cuts)
    got = dict(zip(order.tolist(), zip(s2.tolist(), e2.tolist(), strict=True), strict=True))
    # Block 0 (unit 0) gives its last row to block 1 (unit 1); block 1 (unit 1) to block 2
    # (unit 2); block 2 keeps its last row (block 3 was read earlier); 3 gives to 4; 4 keeps.
    assert got == {0: (0, 9), 1: (9, 19), 2: (19, 30), 3: (30, 39), 4: (39, 50), 5: (50, 60)}
    # A byte budget that leaves no room: nothing moves.
    s3, e3 = seams_to_later_units(order, s, e, cuts, (np.ones(6), 20.0))
    assert np.array_equal(s3, s) and np.array_equal(e3, e)


def test_share_that_fits_the_budget_is_one_permuted_unit():
    bounds = fixed_bounds(10_000, 100)
    s = BlockSampler(bounds, shuffle=True, seed=3, unit_bytes=10**9,
                     block_bytes=np.full(bounds.size - 1, 1000))
    plan = s.plan(0)
    assert plan.n_units == 1
    rows = plan.unit(0).rows
    np.testing.assert_array_equal(np.sort(rows), np.arange(10_000))
    # A permutation of the whole share: neighbours in the stream are not neighbours in
    # storage (a block shuffle would keep runs of 100 together).
    assert np.mean(np.abs(np.diff(rows)) < 100) < 0.05


def test_units_draw_blocks_from_the_whole_share():
    """Each unit's blocks spread over all blocks, not runs of neighbouring blocks."""
    bounds = fixed_bounds(100_000, 100)  # 1000 blocks, 10 blocks per unit
    # 100 bytes a block, plus room for one row (1 byte) from its left neighbour.
    s = BlockSampler(bounds, shuffle=True, seed=0, unit_bytes=10 * 101,
                     block_bytes=np.full(bounds.size - 1, 100))
    plan = s.plan(0)
    assert plan.n_units == 100 and (plan.blocks_per_unit == 10).all()
    spreads = [np.ptp(plan.unit(u).rows) for u in range(plan.n_units)]
    # Ten blocks drawn at random from 1000 span most of the rows; neighbours would span
    # about 1000 rows.
    assert np.median(spreads) > 50_000


@pytest.mark.parametrize("budget_blocks", [7, 10, 33])
@pytest.mark.parametrize("seed", [0, 1])
def test_units_are_dealt_one_block_per_stratum(budget_blocks, seed):
    """Taken in stored order, each run of ``n_units`` blocks gives one block to every unit
    (the last run one to as many units as it has blocks)."""
    block, n_blocks = 100, 1000
    bounds = fixed_bounds(block * n_blocks, block)
    s = BlockSampler(bounds, shuffle=True, seed=seed, unit_bytes=budget_blocks * 101,
                     block_bytes=np.full(n_blocks, 100))
    plan = s.plan(2)
    unit_of = np.full(n_blocks, -1)
    for u in range(plan.n_units):
        # A block's rows, but for the last one, which may go to its neighbour's unit.
        blocks = np.flatnonzero(np.bincount(plan.unit(u).rows // block) > 1)
        assert (unit_of[blocks] == -1).all()
        unit_of[blocks] = u
    n_units = plan.n_units
    assert n_units == -(-n_blocks // budget_blocks) and (unit_of >= 0).all()
    for start in range(0, n_blocks, n_units):
        run = unit_of[start : start + n_units]
        assert np.unique(run).size == run.size


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_units_hold_every_label_in_its_share(seed):
    """On a label-sorted store, each unit's count of a label is the label's share of the
    unit give or take the two blocks at the label's ends (an oracle from the label sizes);
    so batches mix about like a permutation's, where units of randomly drawn blocks do not.
    """
    block = 200
    sizes = np.random.default_rng(7).integers(4_000, 12_000, size=12)
    labels = np.repeat(np.arange(sizes.size), sizes)
    bounds = fixed_bounds(labels.size, block)
    n_blocks = bounds.size - 1
    s = BlockSampler(bounds, shuffle=True, seed=seed, unit_bytes=60 * block,
                     block_bytes=np.diff(bounds) * 1.0)
    plan = s.plan(0)
    assert plan.n_units > 5
    for u in range(plan.n_units):
        rows = plan.unit(u).rows
        got = np.bincount(labels[rows], minlength=sizes.size)
        want = sizes * rows.size / labels.size
        assert np.abs(got - want).max() <= 2 * block + 2 * block * rows.size / labels.size
    stream = _epoch_rows(s, 0)
    B = 256
    n = stream.size // B * B
    mine = batch_mixing(stream[:n].reshape(-1, B), labels).tv
    perm = np.random.default_rng(seed).permutation(labels.size)[:n]
    best = batch_mixing(perm.reshape(-1, B), labels).tv
    # Units of 60 blocks drawn at random: about mixing_ratio(60, 256) ~ 2.2x.
    assert mine / best < 1.3 < mixing_ratio(60, B)
    assert n_blocks > 60 * 5


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_shares_sample_the_whole_store_evenly(world, seed):
    """Each rank gets every label of a label-sorted store in the store's proportions.

    Blocks are dealt ``world`` at a time in stored order, so a group spanning k strata
    gives each rank k of its blocks; a rank's count of a group is off by at most the blocks
    at the group's two ends and one block moved at a rank edge.  An unstratified split (a
    run of randomly ordered blocks per rank) misses this bound by about sqrt(k) blocks.
    """
    block = 500
    sizes = np.random.default_rng(99).integers(5_000, 15_000, size=20)
    labels = np.repeat(np.arange(sizes.size), sizes)
    bounds = fixed_bounds(labels.size, block)
    counts = np.bincount(labels)
    for rank in range(world):
        s = BlockSampler(bounds, shuffle=True, seed=seed, buffer_blocks=8,
                         rank=rank, world_size=world)
        got = np.bincount(labels[_epoch_rows(s, 3)], minlength=sizes.size)
        assert np.abs(got - counts / world).max() <= 3 * block


def test_mixing_ratio_against_simulated_batches():
    """The warning's rule: batch TV over a permutation's ~ sqrt(B / distinct runs)."""
    rng = np.random.default_rng(0)
    B, groups = 256, 32
    for k in (4, 64, 4096):
        # k blocks, each one label; a batch is B rows drawn from those blocks uniformly.
        tvs, ptvs = [], []
        for _ in range(200):
            lab = rng.integers(0, groups, size=k)[rng.integers(0, k, size=B)]
            tvs.append(0.5 * np.abs(np.bincount(lab, minlength=groups) / B - 1 / groups).sum())
            lab = rng.integers(0, groups, size=B)
            ptvs.append(0.5 * np.abs(np.bincount(lab, minlength=groups) / B - 1 / groups).sum())
        measured = np.mean(tvs) / np.mean(ptvs)
        assert 0.75 < measured / mixing_ratio(k, B) < 1.3, (k, measured)
    assert mixing_ratio(10**9, B) == pytest.approx(1.0, abs=0.01)


def test_byte_budget_needs_block_bytes():
    with pytest.raises(InvalidInputError):
        BlockSampler(fixed_bounds(10, 2), unit_bytes=100)
    with pytest.raises(InvalidInputError):
        BlockSampler(fixed_bounds(10, 2), unit_bytes=100, block_bytes=np.ones(3))
