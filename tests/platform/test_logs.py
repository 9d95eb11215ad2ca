"""Pure log processing: ordering, de-duplication, leave-one-out, cold items and co-click pairs."""

from __future__ import annotations

import numpy as np
import pytest

from sidforge.platform.logs import (
    HELDOUT,
    TEST,
    TRAIN,
    VALID,
    choose_cold_items,
    coclick_counts,
    finalize_coclicks,
    order_and_split,
    sum_pairs,
)


def _arr(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# order_and_split

# (user, item, order), deliberately unsorted
_ROWS = [
    (2, 10, 5),  # 0
    (1, 20, 3),  # 1
    (2, 11, 1),  # 2
    (1, 21, 1),  # 3
    (2, 12, 5),  # 4  tie with row 0: input order puts 10 before 12
    (3, 30, 1),  # 5  user 3 is short
    (1, 22, 2),  # 6
    (2, 11, 1),  # 7  exact duplicate of row 2
    (3, 31, 2),  # 8
    (1, 23, 9),  # 9
    (2, 13, 7),  # 10
    (2, 10, 5),  # 11 exact duplicate of row 0, with row 4 tied between them
    (4, 40, 1),  # 12 user 4 has 3 rows but only 2 distinct → short
    (4, 41, 2),  # 13
    (4, 40, 1),  # 14 duplicate
]


def _split_rows(rows, min_seq_len: int = 3, **kwargs):
    user, item, order = (np.array(c, dtype=np.int64) for c in zip(*rows))
    return order_and_split(user, item, order, min_seq_len, **kwargs)


def test_order_and_split_hand_built_case():
    res = _split_rows(_ROWS)
    np.testing.assert_array_equal(res.user, _arr(1, 1, 1, 1, 2, 2, 2, 2))
    np.testing.assert_array_equal(res.item, _arr(21, 22, 20, 23, 11, 10, 12, 13))
    np.testing.assert_array_equal(res.position, _arr(0, 1, 2, 3, 0, 1, 2, 3))
    np.testing.assert_array_equal(res.split, np.array([TRAIN, TRAIN, VALID, TEST] * 2, dtype=np.int8))
    np.testing.assert_array_equal(np.sort(res.dup_index), _arr(7, 11, 14))
    np.testing.assert_array_equal(res.short_users, _arr(3, 4))
    np.testing.assert_array_equal(np.sort(res.short_index), _arr(5, 8, 12, 13))
    assert res.split.dtype == np.int8 and res.user.dtype == np.int64
    # every input row is accounted for exactly once
    assert len(res.user) + len(res.dup_index) + len(res.short_index) == len(_ROWS)


def test_ties_keep_input_order():
    rows = [(0, 5, 1), (0, 3, 1), (0, 9, 1), (0, 1, 1)]
    np.testing.assert_array_equal(_split_rows(rows).item, _arr(5, 3, 9, 1))
    np.testing.assert_array_equal(_split_rows(rows[::-1]).item, _arr(1, 9, 3, 5))


def test_first_of_tied_duplicates_is_kept():
    rows = [(0, 5, 1), (0, 3, 1), (0, 5, 1), (0, 7, 2)]
    res = _split_rows(rows)
    np.testing.assert_array_equal(res.item, _arr(5, 3, 7))
    np.testing.assert_array_equal(res.dup_index, _arr(2))


def test_same_item_at_different_times_is_not_a_duplicate():
    res = _split_rows([(0, 5, 1), (0, 6, 2), (0, 5, 3)])
    np.testing.assert_array_equal(res.item, _arr(5, 6, 5))
    assert len(res.dup_index) == 0


def test_min_seq_len_boundary():
    rows = [(0, 1, 1), (0, 2, 2), (0, 3, 3), (1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4)]
    assert set(_split_rows(rows, min_seq_len=3).user) == {0, 1}
    assert set(_split_rows(rows, min_seq_len=4).user) == {1}
    np.testing.assert_array_equal(_split_rows(rows, min_seq_len=4).short_users, _arr(0))


def test_leave_one_out_on_random_users():
    rng = np.random.default_rng(0)
    user = rng.integers(0, 50, 2000)
    item = rng.integers(0, 300, 2000)
    order = rng.permutation(2000)  # distinct, so no duplicates
    res = order_and_split(user, item, order, 3)
    starts = np.flatnonzero(np.r_[True, res.user[1:] != res.user[:-1]])
    ends = np.r_[starts[1:], len(res.user)]
    assert np.all(np.diff(res.user) >= 0)
    for s, e in zip(starts, ends):
        u = res.user[s]
        expected = item[user == u][np.argsort(order[user == u])]
        np.testing.assert_array_equal(res.item[s:e], expected)
        np.testing.assert_array_equal(res.position[s:e], np.arange(e - s))
        assert res.split[e - 1] == TEST and res.split[e - 2] == VALID
        assert np.all(res.split[s:e - 2] == TRAIN)


def test_cold_items_turn_train_rows_into_heldout_only():
    cold = np.zeros(50, dtype=bool)
    cold[[20, 23, 13]] = True  # 20 is valid and 23 test for user 1; 13 test for user 2
    res = _split_rows(_ROWS, cold_items=cold)
    # user 1: 21 22 20 23 ; user 2: 11 10 12 13
    np.testing.assert_array_equal(res.split, np.array([TRAIN, TRAIN, VALID, TEST, TRAIN, TRAIN, VALID, TEST],
                                                      dtype=np.int8))
    cold[[22, 11]] = True
    res = _split_rows(_ROWS, cold_items=cold)
    np.testing.assert_array_equal(res.split, np.array(
        [TRAIN, HELDOUT, VALID, TEST, HELDOUT, TRAIN, VALID, TEST], dtype=np.int8))


def test_official_split_is_carried_with_its_rows():
    rows = [(0, 1, 3), (0, 2, 1), (0, 3, 2), (0, 4, 4)]
    official = np.array([VALID, TRAIN, TRAIN, TEST], dtype=np.int8)  # per input row
    res = _split_rows(rows, official_split=official)
    np.testing.assert_array_equal(res.item, _arr(2, 3, 1, 4))
    np.testing.assert_array_equal(res.split, np.array([TRAIN, TRAIN, VALID, TEST], dtype=np.int8))


def test_empty_batch():
    e = np.zeros(0, dtype=np.int64)
    res = order_and_split(e, e, e, 3)
    assert len(res.user) == len(res.split) == len(res.dup_index) == len(res.short_users) == 0


# ----------------------------------------------------------------------------------------------
# co-click counting


def _brute_coclicks(user: np.ndarray, item: np.ndarray, window: int) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for u in np.unique(user):
        seq = item[user == u].tolist()
        pairs = {(min(x, y), max(x, y)) for i, x in enumerate(seq) for y in seq[i + 1:i + 1 + window] if x != y}
        for p in pairs:
            counts[p] = counts.get(p, 0) + 1
    return counts


def test_coclick_counts_hand_built():
    user = _arr(0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3)
    item = _arr(1, 2, 3, 1, 4, 2, 2, 3, 4, 5, 6, 7)
    a, b, c = coclick_counts(user, item, window=2)
    # (2, 4) is 3 apart in user 0; (2, 2) is a self-pair; (5, 6) would cross users 2 and 3;
    # user 0 sees (1, 2) and (1, 3) twice each but counts them once; users 0 and 1 both see (2, 3)
    assert list(zip(a.tolist(), b.tolist(), c.tolist())) == [
        (1, 2, 1), (1, 3, 1), (1, 4, 1), (2, 3, 2), (3, 4, 1), (4, 5, 1), (6, 7, 1)]
    a, b, c = coclick_counts(user, item, window=1)
    assert list(zip(a.tolist(), b.tolist(), c.tolist())) == [
        (1, 2, 1), (1, 3, 1), (1, 4, 1), (2, 3, 2), (4, 5, 1), (6, 7, 1)]
    assert a.dtype == b.dtype == c.dtype == np.int64


@pytest.mark.parametrize("window", [1, 3, 10])
def test_coclick_counts_match_brute_force(window: int):
    rng = np.random.default_rng(window)
    lengths = rng.integers(1, 12, 80)
    user = np.repeat(np.arange(80), lengths)
    item = rng.integers(0, 15, len(user))
    a, b, c = coclick_counts(user, item, window)
    assert np.all(a < b)
    assert dict(zip(zip(a.tolist(), b.tolist()), c.tolist())) == _brute_coclicks(user, item, window)


def test_coclick_counts_of_nothing():
    for user, item in ((_arr(), _arr()), (_arr(0, 1, 2), _arr(5, 5, 5)), (_arr(0, 0), _arr(4, 4))):
        a, b, c = coclick_counts(user, item, 3)
        assert len(a) == len(b) == len(c) == 0


def test_sum_pairs_merges_partition_results():
    a, b, c = sum_pairs(_arr(3, 1, 3, 1), _arr(4, 2, 4, 5), _arr(2, 1, 5, 1))
    assert list(zip(a.tolist(), b.tolist(), c.tolist())) == [(1, 2, 1), (1, 5, 1), (3, 4, 7)]


# ----------------------------------------------------------------------------------------------
# finalize_coclicks

_DEFAULTS = dict(min_count=1, pop_alpha=0.5, max_per_item=50, holdout_fraction=0.0, seed=0)


def _finalize(a, b, count, freq, **kwargs):
    return finalize_coclicks(np.asarray(a), np.asarray(b), np.asarray(count), np.asarray(freq),
                             **{**_DEFAULTS, **kwargs})


def test_min_count_filter_and_weight_formula():
    freq = _arr(4, 1, 9, 0, 16)
    out = _finalize([0, 0, 1, 2], [1, 2, 3, 4], [3, 1, 5, 2], freq, min_count=2, pop_alpha=0.5)
    pairs = list(zip(out["item_a"].tolist(), out["item_b"].tolist()))
    assert pairs == [(0, 1), (1, 3), (2, 4)]  # (0, 2) has count 1 < 2; output sorted by (a, b)
    np.testing.assert_array_equal(out["count"], _arr(3, 5, 2))
    # weight = count / (freq_a * freq_b) ** alpha, a zero frequency counting as 1
    np.testing.assert_allclose(out["weight"], [3 / (4 * 1) ** 0.5, 5 / (1 * 1) ** 0.5, 2 / (9 * 16) ** 0.5])
    raw = _finalize([0, 2], [1, 4], [3, 2], freq, pop_alpha=0.0)
    np.testing.assert_allclose(raw["weight"], [3.0, 2.0])
    assert set(out["split"].tolist()) == {"train"}  # holdout_fraction = 0


def test_cap_keeps_the_heaviest_partners():
    # item 0 pairs with 1..5, heavier with higher partner; partners have no other pairs
    out = _finalize([0, 0, 0, 0, 0], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], np.ones(6, dtype=np.int64),
                    max_per_item=2)
    assert list(zip(out["item_a"].tolist(), out["item_b"].tolist())) == [(0, 4), (0, 5)]


def test_cap_counts_partners_on_both_sides():
    # item 2 is the larger id in (0, 2), (1, 2) and the smaller in (2, 3), (2, 4)
    out = _finalize([0, 1, 2, 2], [2, 2, 3, 4], [4, 3, 2, 1], np.ones(5, dtype=np.int64), max_per_item=2)
    assert list(zip(out["item_a"].tolist(), out["item_b"].tolist())) == [(0, 2), (1, 2)]


@pytest.mark.parametrize("seed, cap", [(0, 1), (1, 3), (2, 10)])
def test_cap_property_on_random_pairs(seed: int, cap: int):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 60, 5000), rng.integers(0, 60, 5000)
    keep = x != y
    a, b, c = sum_pairs(np.minimum(x, y)[keep], np.maximum(x, y)[keep], rng.integers(1, 6, int(keep.sum())))
    freq = rng.integers(0, 100, 60)
    out = _finalize(a, b, c, freq, max_per_item=cap, min_count=2)
    degree = np.bincount(np.r_[out["item_a"], out["item_b"]], minlength=60)
    assert degree.max() <= cap
    assert len(out["item_a"]) > 0
    # every kept pair is within the top `cap` candidate pairs of both its items
    valid = c >= 2
    a, b, c = a[valid], b[valid], c[valid]
    w = c / (np.maximum(freq[a], 1) * np.maximum(freq[b], 1)) ** 0.5
    for pa_, pb_, pw in zip(out["item_a"], out["item_b"], out["weight"]):
        for it in (pa_, pb_):
            heavier = np.sum(w[(a == it) | (b == it)] > pw)
            assert heavier < cap


def test_holdout_is_stable_and_close_to_the_fraction():
    rng = np.random.default_rng(0)
    xy = np.sort(rng.integers(0, 2000, (30000, 2)), axis=1)
    xy = np.unique(xy[xy[:, 0] != xy[:, 1]], axis=0)
    a, b = xy[:, 0], xy[:, 1]
    c = np.ones(len(a), dtype=np.int64)
    freq = np.ones(2000, dtype=np.int64)
    kw = dict(holdout_fraction=0.2, max_per_item=10_000, seed=7)
    first = _finalize(a, b, c, freq, **kw)
    again = _finalize(a, b, c, freq, **kw)
    np.testing.assert_array_equal(first["split"], again["split"])
    held = np.mean(first["split"] == "heldout")
    assert abs(held - 0.2) < 0.015, held
    # a pair's split does not depend on the other rows or their order
    perm = rng.permutation(len(a))[: len(a) // 3]
    part = _finalize(a[perm], b[perm], c[perm], freq, **kw)
    lookup = dict(zip(zip(first["item_a"].tolist(), first["item_b"].tolist()), first["split"].tolist()))
    assert all(lookup[p] == s for p, s in zip(zip(part["item_a"].tolist(), part["item_b"].tolist()),
                                              part["split"].tolist()))
    # another seed draws another holdout of about the same size
    other = _finalize(a, b, c, freq, **{**kw, "seed": 8})
    assert np.mean(other["split"] != first["split"]) > 0.2
    assert abs(np.mean(other["split"] == "heldout") - 0.2) < 0.015


def test_finalize_of_nothing():
    out = _finalize(_arr(), _arr(), _arr(), _arr(1, 2), holdout_fraction=0.5)
    assert all(len(v) == 0 for v in out.values())


# ----------------------------------------------------------------------------------------------
# cold items


def test_choose_cold_items_fraction_and_determinism():
    mask = choose_cold_items(1000, 0.05, seed=3)
    assert mask.dtype == bool and mask.shape == (1000,) and mask.sum() == 50
    np.testing.assert_array_equal(mask, choose_cold_items(1000, 0.05, seed=3))
    assert not np.array_equal(mask, choose_cold_items(1000, 0.05, seed=4))
    assert choose_cold_items(1000, 0.0, seed=3).sum() == 0
    assert choose_cold_items(7, 0.3, seed=0).sum() == 2  # rounds 2.1
