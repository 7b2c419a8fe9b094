"""Shuffle quality: the TV / distinct-labels measure against hand computations and an
exact hypergeometric expectation, ``DataLoader.epoch_rows`` against the rows a real pass
serves, and the ``shuffle-check`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import hypergeom

import sparsestore
from sparsestore import mixing
from sparsestore.cli import main
from sparsestore.errors import InvalidInputError, LabelError
from sparsestore.loader import DataLoader
from sparsestore.mixing import (
    MAX_SCORED_LABELS,
    batch_mixing,
    label_codes,
    ratio_to_permutation,
    shuffle_quality,
)

N_ROWS, N_GROUPS = 6000, 12


@pytest.fixture(scope="module")
def sorted_store(tmp_path_factory):
    """6000 rows sorted by a label of 12 uneven groups, with small chunks (many blocks)."""
    path = tmp_path_factory.mktemp("mix") / "sorted.zarr"
    rng = np.random.default_rng(7)
    X = sp.random(N_ROWS, 80, density=0.1, format="csr", dtype=np.float32, random_state=rng)
    sizes = np.array([900, 700, 650, 600, 550, 500, 450, 400, 350, 320, 300, 280])
    assert sizes.sum() == N_ROWS and sizes.size == N_GROUPS
    y = np.repeat(np.arange(N_GROUPS, dtype=np.int32), sizes)
    store = sparsestore.save(path, X, labels={"y": y}, chunk_bytes=4096)
    return store, y


def naive_mixing(batches, labels):
    """The oracle: a Python loop over batches and dict histograms."""
    labels = list(np.asarray(labels).tolist())
    served = [labels[r] for b in batches for r in b]
    p_all = {lab: served.count(lab) / len(served) for lab in set(served)}
    tvs, distinct = [], []
    for b in batches:
        labs = [labels[r] for r in b]
        p = {lab: labs.count(lab) / len(labs) for lab in set(labs)}
        tvs.append(0.5 * sum(abs(p.get(lab, 0.0) - q) for lab, q in p_all.items()))
        distinct.append(len(p))
    return float(np.mean(tvs)), float(np.mean(distinct))


# ------------------------------------------------------------------ the measure

def test_hand_computed_examples():
    m = batch_mixing([[0, 1], [2, 3]], [0, 0, 1, 1])
    assert (m.tv, m.distinct, m.batches, m.rows) == (0.5, 1.0, 2, 4)
    m = batch_mixing([[0, 2], [1, 3]], np.array(["a", "a", "b", "b"]))
    assert (m.tv, m.distinct) == (0.0, 2.0)
    # p_all = (1/2, 1/3, 1/6); batch TVs 1/2, 1/6, 1/2; distinct 1, 2, 2
    m = batch_mixing([[0, 1], [2, 3], [4, 5]], [0, 0, 0, 1, 1, 2])
    assert m.tv == pytest.approx(7 / 18) and m.distinct == pytest.approx(5 / 3)


def test_last_short_batch_follows_drop_last():
    labels = [0, 1, 0, 1, 0, 1, 2]
    batches = [[0, 1, 2], [3, 4, 5], [6]]
    # Kept: p_all = (3/7, 3/7, 1/7); TVs 5/21, 5/21, 6/7.
    kept = batch_mixing(batches, labels)
    assert kept.tv == pytest.approx(4 / 9) and kept.distinct == pytest.approx(5 / 3)
    assert (kept.batches, kept.rows) == (3, 7)
    # Dropped: the short batch's row is not served either, p_all = (1/2, 1/2).
    dropped = batch_mixing(batches, labels, drop_last=True)
    assert dropped.tv == pytest.approx(1 / 6) and dropped.distinct == 2.0
    assert (dropped.batches, dropped.rows) == (2, 6)
    assert batch_mixing(batches[:1], labels, drop_last=True, batch_size=4).batches == 0


@pytest.mark.parametrize("cells", [mixing._CELLS, 7])  # 7: one batch per scoring group
def test_matches_a_naive_loop_on_random_batches(monkeypatch, cells):
    monkeypatch.setattr(mixing, "_CELLS", cells)
    rng = np.random.default_rng(3)
    labels = rng.choice(np.array(["x", "yy", "z", "w", "v"]), size=500, p=[.4, .3, .15, .1, .05])
    order = rng.permutation(500)[:433]
    cuts = np.sort(rng.choice(np.arange(1, 433), size=20, replace=False))
    batches = np.split(order, cuts)
    m = batch_mixing(batches, labels)
    tv, distinct = naive_mixing(batches, labels)
    assert m.tv == pytest.approx(tv) and m.distinct == pytest.approx(distinct)
    assert (m.batches, m.rows) == (21, 433)


def test_label_codes_and_bad_input():
    codes, k = label_codes(np.array([[5.0], [-1.0], [5.0]]))
    assert codes.tolist() == [1, 0, 1] and k == 2
    with pytest.raises(LabelError, match="one label per row"):
        label_codes(np.zeros((3, 2)))
    with pytest.raises(InvalidInputError, match="row ids"):
        batch_mixing([[0, 3]], [0, 1, 2])


# ------------------------------------------------------------------ epoch_rows

def _served(loader):
    return [b.rows for b in loader.iter_batches()]


def _cut(rows, bs):
    return [rows[i:i + bs] for i in range(0, rows.size, bs)]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("subset", [False, True])
def test_epoch_rows_is_what_a_pass_serves(sorted_store, shuffle, drop_last, subset):
    store, _ = sorted_store
    rows = np.flatnonzero(np.random.default_rng(1).random(N_ROWS) < 0.6) if subset else None
    per_rank = []
    for rank in range(2):
        loader = DataLoader(store, 100, shuffle=shuffle, seed=5, drop_last=drop_last,
                            rank=rank, world_size=2, rows=rows, shuffle_buffer_blocks=3)
        # Asked ahead of time, epoch 1's order is the one its pass serves.
        ahead = {0: loader.epoch_rows(), 1: loader.epoch_rows(1)}
        for epoch in range(2):
            predicted = loader.epoch_rows()
            assert predicted.dtype == np.int64
            assert np.array_equal(predicted, ahead[epoch])
            got = _served(loader)
            # Batches are consecutive batch_size slices of the predicted order.
            assert [g.tolist() for g in got] == [p.tolist() for p in _cut(predicted, 100)]
        if shuffle:
            assert not np.array_equal(ahead[0], ahead[1])
        per_rank.append(ahead[0])
    both = np.concatenate(per_rank)
    universe = np.arange(N_ROWS) if rows is None else rows
    assert np.unique(both).size == both.size  # ranks are disjoint
    if drop_last:
        assert set(both.tolist()) <= set(universe.tolist())
    else:
        assert np.array_equal(np.sort(both), universe)
    if not shuffle:
        assert all(np.all(np.diff(r) > 0) for r in per_rank)


def test_epoch_rows_with_samplers(sorted_store):
    store, _ = sorted_store
    order = np.random.default_rng(2).permutation(N_ROWS)[:1234]
    for rank in range(2):
        loader = DataLoader(store, 100, sampler=order.tolist(), rank=rank, world_size=2)
        predicted = loader.epoch_rows()
        # Global batches of 100 dealt round-robin: this rank gets every other one.
        expect = np.concatenate(_cut(order, 100)[rank::2])
        assert np.array_equal(predicted, expect)
        assert np.array_equal(np.concatenate(_served(loader)), predicted)
        with pytest.raises(InvalidInputError, match="set_epoch"):
            loader.epoch_rows(loader.epoch + 1)
    bsamp = [[5, 1], [9, 2, 7], [3]]
    loader = DataLoader(store, 100, batch_sampler=bsamp)
    assert loader.epoch_rows().tolist() == [5, 1, 9, 2, 7, 3]
    assert [g.tolist() for g in _served(loader)] == bsamp


# ------------------------------------------------------------------ shuffle_quality

def _expected_permutation_tv(counts, batch_size):
    """Exact E[TV] of a batch of ``batch_size`` rows drawn without replacement."""
    n = int(counts.sum())
    total = 0.0
    for c in counts:
        x = np.arange(0, min(c, batch_size) + 1)
        pmf = hypergeom.pmf(x, n, c, batch_size)
        total += float((pmf * np.abs(x / batch_size - c / n)).sum())
    return 0.5 * total


def test_permutation_baseline_is_close_to_the_exact_expectation(sorted_store):
    store, y = sorted_store
    loader = DataLoader(store, 200, shuffle=True, seed=11)
    report = shuffle_quality(loader, "y", epochs=8, seed=4)
    expect = _expected_permutation_tv(np.bincount(y), 200)
    assert report.batches == 8 * 30 and report.rows == 8 * N_ROWS
    assert report.tv_permutation == pytest.approx(expect, rel=0.06)
    # Sequential on 12 sorted groups: most batches hold one label.
    seq = naive_mixing(_cut(np.arange(N_ROWS), 200), y)
    assert report.tv_sequential == pytest.approx(seq[0])
    assert report.distinct_sequential == pytest.approx(seq[1])
    assert report.ratio == pytest.approx(report.tv / report.tv_permutation)
    assert report.n_labels == N_GROUPS and report.epochs == 8


def test_quality_matches_the_served_batches_and_reads_no_data(sorted_store):
    store, y = sorted_store
    loader = DataLoader(store, 128, shuffle=True, seed=3, rank=1, world_size=2,
                        shuffle_buffer_blocks=2)
    loader.set_epoch(2)
    report = shuffle_quality(loader, y.astype(str))
    assert loader.decoded_chunks == {} and loader.epoch == 2
    tv, distinct = naive_mixing(_served(loader), y)
    assert report.tv == pytest.approx(tv) and report.distinct == pytest.approx(distinct)
    # A small buffer on sorted rows mixes far worse than a permutation, better than none.
    assert report.tv_permutation < report.tv < report.tv_sequential


def test_a_permutation_sampler_scores_like_a_permutation_and_speed_restores_the_epoch(
        sorted_store):
    store, _ = sorted_store
    order = np.random.default_rng(9).permutation(N_ROWS)
    loader = DataLoader(store, 200, sampler=order.tolist())
    report = shuffle_quality(loader, "y", measure_speed=True)
    assert 0.8 < report.ratio < 1.25
    assert report.rows_per_s > 0 and report.mnnz_per_s > 0
    assert loader.epoch == 0
    with pytest.raises(InvalidInputError, match="epochs"):
        shuffle_quality(loader, "y", epochs=0)
    with pytest.raises(LabelError):
        shuffle_quality(loader, "nope")
    with pytest.raises(LabelError, match="rows"):
        shuffle_quality(loader, np.zeros(5))


# ------------------------------------------------------------------ the command

def test_shuffle_check_command(sorted_store, capsys):
    store, y = sorted_store
    assert main(["shuffle-check", str(store.path), "--label", "y", "--batch-size", "200",
                 "--seed", "3", "--shuffle-buffer-blocks", "2", "--speed"]) == 0
    out = capsys.readouterr().out
    for word in ("this loader", "permutation", "sequential", "rows/s", "30 batches of 200"):
        assert word in out
    assert main(["shuffle-check", str(store.path), "--label", "y", "--batch-size", "200",
                 "--seed", "3", "--shuffle-buffer-blocks", "2", "--epoch", "1",
                 "--world-size", "2", "--rank", "1", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    loader = DataLoader(store, 200, shuffle=True, seed=3, shuffle_buffer_blocks=2,
                        rank=1, world_size=2)
    loader.set_epoch(1)
    assert got["tv"] == pytest.approx(naive_mixing(_cut(loader.epoch_rows(), 200), y)[0])
    assert got["rows_per_s"] is None and got["rows"] == N_ROWS // 2


@pytest.mark.parametrize("tail, match", [
    (["--label", "nope"], "nope"),
    (["--label", "y", "--rank", "2", "--world-size", "2"], "rank"),
    (["--label", "y", "--batch-size", "0"], "batch_size"),
    (["--label", "y", "--shuffle-buffer-blocks", "0"], "shuffle_buffer_blocks"),
])
def test_shuffle_check_errors_are_one_line(sorted_store, capsys, tail, match):
    store, _ = sorted_store
    assert main(["shuffle-check", str(store.path), *tail]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsestore: error:") and "\n" not in err and match in err


def test_shuffle_check_on_a_missing_store_is_one_line(tmp_path, capsys):
    assert main(["shuffle-check", str(tmp_path / "none.zarr"), "--label", "y"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsestore: error:") and "\n" not in err


# ------------------------------------------------------------------ the benchmark's data

def test_bench_shuffle_stores_are_label_sorted_and_shaped_as_described():
    from benchmarks.bench_shuffle import group_labels, zipf_blocks

    y = group_labels(10_000, 30)
    sizes = np.bincount(y)
    assert y.size == 10_000 and np.all(np.diff(y) >= 0) and sizes.size == 30
    assert sizes.max() / sizes.min() > 5  # uneven groups
    X = sp.vstack(list(zipf_blocks(9000, 2000, 200)), format="csr")
    assert X.shape == (9000, 2000) and X.has_canonical_format
    assert 170 < X.nnz / 9000 < 230
    col = np.bincount(X.indices, minlength=2000)
    top = np.sort(col)[::-1]
    assert top[:20].sum() > 5 * top[-20:].sum()  # popular columns, rare ones


def test_batches_against_every_row_of_the_labels():
    """By hand: rows 0-1 (label 0) served alone mix perfectly among themselves, but are 0.5
    from the mix of all four rows; four batches each holding every label are 0 from it."""
    labels = np.array([0, 0, 1, 1])
    assert batch_mixing([[0, 1]], labels).tv == pytest.approx(0.0)
    assert batch_mixing([[0, 1]], labels, against_all_labels=True).tv == pytest.approx(0.5)
    codes = np.repeat(np.arange(4), 8)
    blocks = np.arange(32).reshape(4, 8)
    assert batch_mixing(blocks, codes, against_all_labels=True).tv == pytest.approx(0.75)
    assert batch_mixing(blocks.T.reshape(4, 8), codes,
                        against_all_labels=True).tv == pytest.approx(0.0)


def test_ratio_to_permutation_against_hand_computed_tv():
    # 4 labels in 4 sorted runs; batches of 4 rows.
    labels = np.repeat(np.arange(4), 8)
    rows = np.arange(32)  # storage order: every batch one label, TV 0.75 each
    pick = np.random.default_rng(3).permutation(32)
    codes = labels[pick]
    best = np.mean([0.5 * np.abs(np.bincount(codes[i:i + 4], minlength=4) / 4 - 0.25).sum()
                    for i in range(0, 32, 4)])  # reference: the drawn rows' mix, uniform
    assert ratio_to_permutation(labels, rows, 4, seed=3) == pytest.approx(0.75 / best)
    # Served in the permutation's own order: exactly 1.
    assert ratio_to_permutation(labels, pick, 4, seed=3) == pytest.approx(1.0)
    # Drawn from a population (a rows= subset): the permutation is of those rows.
    half = np.arange(0, 32, 2)
    got = ratio_to_permutation(labels, half, 4, population=half, seed=3)
    drawn = labels[half[np.random.default_rng(3).permutation(16)]]
    ref = np.bincount(drawn, minlength=4) / 16
    best = np.mean([0.5 * np.abs(np.bincount(drawn[i:i + 4], minlength=4) / 4 - ref).sum()
                    for i in range(0, 16, 4)])
    mine = np.mean([0.5 * np.abs(np.bincount(labels[half][i:i + 4], minlength=4) / 4
                                 - ref).sum() for i in range(0, 16, 4)])
    assert got == pytest.approx(mine / best)


def test_ratio_to_permutation_declines_labels_it_cannot_score():
    rows = np.arange(100)
    assert ratio_to_permutation(np.zeros(100), rows, 10) is None  # one value
    assert ratio_to_permutation(np.arange(100.0) / 7, rows, 10) is not None
    many = np.arange(MAX_SCORED_LABELS + 1, dtype=np.float64)
    assert ratio_to_permutation(many, np.arange(many.size), many.size) is None
    assert ratio_to_permutation(np.zeros((100, 2)), rows, 10) is None  # not one per row
    assert ratio_to_permutation(np.arange(100) % 3, rows[:5], 10) is None  # no full batch
