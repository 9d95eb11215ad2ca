"""Unit tests for the evaluation harness: every number here is worked out by hand or by brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sidforge.platform.metrics import (
    GaucResult,
    auc,
    case_gains,
    gauc,
    i2i_hit_at_k,
    logloss,
    metrics_from_ranks,
    paired_difference,
    popularity_buckets,
    ranking_metrics,
    retrieval_metrics,
    target_ranks,
)

# ----------------------------------------------------------------------------------------------
# Retrieval

# A 5-item catalogue, 4 cases. Pessimistic ranks: #higher + #other items tied with the target.
SCORES = np.array(
    [
        [0.1, 0.9, 0.5, 0.3, 0.7],  # target 2: 0.9, 0.7 higher             -> rank 2
        [1.0, 1.0, 1.0, 1.0, 1.0],  # target 0: all four others tied        -> rank 4
        [0.2, 0.4, 0.4, 0.8, 0.0],  # target 2: 0.8 higher, item 1 tied     -> rank 2
        [0.5, 0.6, 0.7, 0.8, 0.9],  # target 4: best                        -> rank 0
    ],
    dtype=np.float32,
)
TARGETS = np.array([2, 0, 2, 4])
HISTORY = [[4, 2], [1, 2], [3], []]  # case 0 repeats its target 2 in the history


def _lookup(matrix: np.ndarray):
    return lambda idx: matrix[idx]


def _brute_ranks(scores: np.ndarray, targets: np.ndarray, exclude: list[list[int]] | None) -> np.ndarray:
    out = []
    for i, t in enumerate(targets):
        banned = set(exclude[i]) - {int(t)} if exclude else set()
        out.append(
            sum(
                1
                for j in range(scores.shape[1])
                if j != t and j not in banned and scores[i, j] >= scores[i, t]
            )
        )
    return np.array(out)


def test_target_ranks_hand_computed_with_pessimistic_ties() -> None:
    ranks = target_ranks(_lookup(SCORES), np.arange(4), TARGETS)
    np.testing.assert_array_equal(ranks, [2, 4, 2, 0])


def test_exclude_removes_history_but_never_the_target() -> None:
    ranks = target_ranks(_lookup(SCORES), np.arange(4), TARGETS, exclude=HISTORY)
    # case 0: item 4 removed, target 2 kept -> only 0.9 higher; case 1: two tied items removed;
    # case 2: item 3 removed -> only the tie with item 1 remains.
    np.testing.assert_array_equal(ranks, [1, 2, 1, 0])
    padded = np.array([[4, 2], [1, 2], [3, -1], [-1, -1]])
    np.testing.assert_array_equal(target_ranks(_lookup(SCORES), np.arange(4), TARGETS, exclude=padded), ranks)
    np.testing.assert_array_equal(
        target_ranks(_lookup(SCORES), np.arange(4), TARGETS, exclude=torch.as_tensor(padded)), ranks
    )


def test_minus_inf_fill_cannot_earn_hits_and_excluded_items_do_not_tie() -> None:
    scores = np.array([[-np.inf, 3.0, -np.inf, -np.inf, 2.0]])
    # Target 0 was not generated: it ties with items 2 and 3 and goes behind them.
    assert target_ranks(_lookup(scores), np.arange(1), [0])[0] == 4
    # Excluded items leave the candidate set, so they no longer tie with a -inf target.
    assert target_ranks(_lookup(scores), np.arange(1), [0], exclude=[[2, 3]])[0] == 2


def test_metrics_from_ranks_values() -> None:
    m = metrics_from_ranks([2, 4, 2, 0], ks=(1, 3, 5))
    assert m["count"] == 4
    assert m["recall@1"] == pytest.approx(0.25)
    assert m["recall@3"] == pytest.approx(0.75)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["ndcg@1"] == pytest.approx(0.25)
    assert m["ndcg@3"] == pytest.approx((0.5 + 0.5 + 1.0) / 4)
    assert m["ndcg@5"] == pytest.approx((0.5 + 0.5 + 1.0 + 1 / math.log2(6)) / 4)


def test_case_gains_average_to_the_reported_metrics() -> None:
    ranks = np.random.default_rng(0).integers(0, 40, size=500)
    m = metrics_from_ranks(ranks, ks=(5, 10))
    for metric in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
        assert case_gains(ranks, metric).mean() == pytest.approx(m[metric], abs=1e-12)
    with pytest.raises(ValueError, match="recall@K or ndcg@K"):
        case_gains(ranks, "mrr@10")


def test_paired_difference_of_a_model_with_itself_is_exactly_zero() -> None:
    ranks = np.random.default_rng(1).integers(0, 50, size=300)
    d = paired_difference([ranks], [ranks.copy()], "ndcg@10", n_boot=200)
    assert d.diff == 0.0 and d.low == 0.0 and d.high == 0.0 and d.share_not_above == 1.0
    assert d.cases == 300 and d.run_diffs == (0.0,)


def test_paired_difference_finds_a_planted_gain_and_its_interval_matches_the_standard_error() -> None:
    rng = np.random.default_rng(2)
    base = rng.integers(0, 30, size=4000)
    other = base.copy()
    better = rng.random(4000) < 0.2
    other[better] = 0  # a fifth of the cases move to the top
    d = paired_difference([base], [other], "ndcg@10", n_boot=2000, seed=3)
    per_case = case_gains(other, "ndcg@10") - case_gains(base, "ndcg@10")
    assert d.diff == pytest.approx(per_case.mean(), abs=1e-12)
    assert d.base == pytest.approx(case_gains(base, "ndcg@10").mean()) and d.other > d.base
    assert 0.0 < d.low < d.diff < d.high and d.share_not_above == 0.0
    se = per_case.std(ddof=1) / np.sqrt(per_case.size)  # the normal approximation's 95 % half-width
    assert (d.high - d.low) / 2 == pytest.approx(1.96 * se, rel=0.15)


def test_joint_resampling_keeps_the_users_shared_across_seeds() -> None:
    rng = np.random.default_rng(4)
    base = rng.integers(0, 20, size=1000)
    up = base.copy()
    up[rng.random(1000) < 0.3] = 0  # some users move to the top
    # seed 0's model gains exactly where seed 1's loses: per user the two seeds cancel
    runs_base, runs_other = [base, up], [up, base.copy()]
    joint = paired_difference(runs_base, runs_other, "recall@10", n_boot=500)
    apart = paired_difference(runs_base, runs_other, "recall@10", joint=False, n_boot=500)
    assert joint.run_diffs[0] == pytest.approx(-joint.run_diffs[1]) and joint.run_diffs[0] > 0.1
    assert joint.diff == pytest.approx(0.0, abs=1e-12) == pytest.approx(apart.diff, abs=1e-12)
    # jointly a resample draws the same users for both seeds, so it cancels too; apart, the noise adds up
    assert joint.low == pytest.approx(0.0, abs=1e-12) and joint.high == pytest.approx(0.0, abs=1e-12)
    assert apart.high - apart.low > 0.01


def test_paired_difference_input_errors() -> None:
    a = np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="same number of runs"):
        paired_difference([a], [a, a])
    with pytest.raises(ValueError, match="run 0: base and other must rank the same"):
        paired_difference([a], [a[:5]])
    with pytest.raises(ValueError, match="joint=True needs every run"):
        paired_difference([a, a[:5]], [a, a[:5]])
    with pytest.raises(ValueError, match="n_boot"):
        paired_difference([a], [a], n_boot=10)


def test_retrieval_metrics_equals_ranks_then_metrics() -> None:
    m = retrieval_metrics(_lookup(SCORES), np.arange(4), TARGETS, ks=(1, 3), exclude=HISTORY)
    assert m == metrics_from_ranks([1, 2, 1, 0], ks=(1, 3))
    assert m["recall@1"] == pytest.approx(0.25) and m["recall@3"] == pytest.approx(1.0)


def test_groups_breakdown() -> None:
    m = metrics_from_ranks([0, 3, 10, 1, 60], ks=(5,), groups=["head", "tail", "tail", "cold", "head"])
    assert m["count"] == 5 and m["recall@5"] == pytest.approx(3 / 5)
    assert (m["count/head"], m["count/tail"], m["count/cold"]) == (2, 2, 1)
    assert m["recall@5/head"] == pytest.approx(0.5)
    assert m["recall@5/tail"] == pytest.approx(0.5)
    assert m["recall@5/cold"] == pytest.approx(1.0)
    assert m["ndcg@5/cold"] == pytest.approx(1 / math.log2(3))
    assert m["ndcg@5/tail"] == pytest.approx(1 / math.log2(5) / 2)
    assert "recall@5/torso" not in m


def test_chunking_matches_unchunked_and_brute_force() -> None:
    rng = np.random.default_rng(0)
    n, n_items = 37, 11
    scores = rng.integers(0, 4, size=(n, n_items)).astype(np.float32)  # many ties
    targets = rng.integers(0, n_items, size=n)
    exclude = [list(rng.choice(n_items, size=rng.integers(0, 5), replace=False)) for _ in range(n)]
    groups = rng.choice(["head", "torso", "tail"], size=n)
    expected = _brute_ranks(scores, targets, exclude)
    reference = metrics_from_ranks(expected, ks=(1, 3, 5), groups=groups)
    for chunk_size in (1, 4, 37, 1000):
        ranks = target_ranks(_lookup(scores), np.arange(n), targets, exclude=exclude, chunk_size=chunk_size)
        np.testing.assert_array_equal(ranks, expected)
        m = retrieval_metrics(
            _lookup(scores),
            np.arange(n),
            targets,
            (1, 3, 5),
            exclude=exclude,
            chunk_size=chunk_size,
            groups=groups,
        )
        assert m == reference


def test_score_fn_receives_case_slices_and_source_is_not_mutated() -> None:
    cache = torch.tensor(SCORES)
    users = np.array([10, 11, 12, 13])
    seen: list[list[int]] = []

    def score_fn(batch: np.ndarray) -> torch.Tensor:
        seen.append(batch.tolist())
        lo = int(batch[0]) - 10
        return cache[lo : lo + len(batch)]  # a view of the cache

    target_ranks(score_fn, users, TARGETS, exclude=HISTORY, chunk_size=3)
    assert seen == [[10, 11, 12], [13]]
    assert torch.equal(cache, torch.tensor(SCORES))


def test_retrieval_input_errors() -> None:
    nan_scores = SCORES.copy()
    nan_scores[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(_lookup(nan_scores), np.arange(4), TARGETS)
    with pytest.raises(ValueError, match="targets must lie"):
        target_ranks(_lookup(SCORES), np.arange(4), [2, 0, 2, 5])
    with pytest.raises(ValueError, match="one target per case"):
        target_ranks(_lookup(SCORES), np.arange(3), TARGETS)
    with pytest.raises(ValueError, match="score_fn must return"):
        target_ranks(lambda idx: SCORES[idx][:, None], np.arange(4), TARGETS)
    with pytest.raises(ValueError, match="exclude holds item id 7"):
        target_ranks(_lookup(SCORES), np.arange(4), TARGETS, exclude=[[7], [], [], []])
    with pytest.raises(ValueError, match="ks"):
        metrics_from_ranks([0, 1], ks=(0,))


# ----------------------------------------------------------------------------------------------
# Ranking


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def test_auc_hand_worked_with_ties() -> None:
    labels = [1, 0, 1, 0, 1, 0]
    scores = [0.9, 0.9, 0.5, 0.3, 0.3, 0.1]
    # positives .9/.5/.3 vs negatives .9/.3/.1: 2.5 + 2 + 1.5 wins out of 9 pairs
    assert auc(labels, scores) == pytest.approx(6 / 9)
    assert auc(np.array(labels, dtype=bool), torch.tensor(scores)) == pytest.approx(6 / 9)
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_auc_matches_pairwise_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        y = rng.integers(0, 2, size=60)
        s = rng.integers(0, 7, size=60) / 7.0
        assert auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)


# user a: AUC 3/4 over 4 impressions; user b: AUC 0 over 2; user c: positives only (skipped).
USERS = np.array(["a", "b", "c", "a", "c", "a", "b", "c", "a"])
LABELS = np.array([1, 1, 1, 0, 1, 1, 0, 1, 0])
PROBS = np.array([0.8, 0.1, 0.5, 0.6, 0.7, 0.4, 0.9, 0.3, 0.2])


def test_gauc_weights_users_by_impressions() -> None:
    result = gauc(USERS, LABELS, PROBS)
    assert isinstance(result, GaucResult)
    assert result.n_users == 2
    assert result.value == pytest.approx((4 * 0.75 + 2 * 0.0) / 6)  # unweighted would be 0.375
    assert gauc(["x", "x"], [1, 1], [0.1, 0.2]) == (pytest.approx(float("nan"), nan_ok=True), 0)


def test_logloss_values_and_clipping() -> None:
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    assert logloss([0], [1.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)
    with pytest.raises(ValueError, match="sigmoid"):
        logloss([1], [1.5])


def test_ranking_metrics_overall_and_groups() -> None:
    groups = np.where(USERS == "b", "cold", "head")
    m = ranking_metrics(USERS, LABELS, PROBS, groups=groups)
    assert m["count"] == 9
    assert m["auc"] == pytest.approx(_brute_auc(LABELS, PROBS))
    assert m["gauc"] == pytest.approx(0.5) and m["gauc_users"] == 2
    assert m["logloss"] == pytest.approx(logloss(LABELS, PROBS))
    # cold = user b only: one wrong-way pair
    assert (m["count/cold"], m["auc/cold"], m["gauc/cold"], m["gauc_users/cold"]) == (2, 0.0, 0.0, 1)
    # head = users a and c: positives .8 .4 .5 .7 .3 vs negatives .6 .2 -> 7 of 10 pairs
    assert m["auc/head"] == pytest.approx(0.7)
    assert m["gauc/head"] == pytest.approx(0.75) and m["gauc_users/head"] == 1
    assert m["logloss/cold"] == pytest.approx(-(math.log(0.1) + math.log(0.1)) / 2)


def test_ranking_input_errors() -> None:
    with pytest.raises(ValueError, match="binary"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="entries"):
        gauc(["a"], [0, 1], [0.1, 0.2])


# ----------------------------------------------------------------------------------------------
# Item-to-item

# Four 2-d points: 0 and 1 nearly parallel; 2 orthogonal to 0; 3 points left with a large norm.
POINTS = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-10.0, 0.5]], dtype=np.float32)
# Unique undirected pairs {0,1}, {0,2}, {2,3}; the duplicate (1, 0) and self-pair (3, 3) are dropped.
PAIRS = np.array([[0, 1], [2, 3], [1, 0], [0, 2], [3, 3]])


def test_i2i_cosine_hand_placed_points() -> None:
    # cosine top-1 excluding self: 0->1, 1->0, 2->1, 3->2
    # directed hits: 0->1 yes, 1->0 yes, 0->2 no, 2->0 no, 2->3 no, 3->2 yes
    m = i2i_hit_at_k(POINTS, PAIRS, k=1, metric="cosine")
    assert m == {
        "hit@1": pytest.approx(3 / 6),
        "recall@1": pytest.approx((0.5 + 1 + 0 + 1) / 4),
        "anchors": 4,
        "pairs": 3,
    }
    # with k=2 every anchor's two neighbours: 0->{1,2}, 1->{0,2}, 2->{1,3}, 3->{2,1}: 5 of 6 directed hits
    assert i2i_hit_at_k(POINTS, PAIRS, k=2)["hit@2"] == pytest.approx(5 / 6)


def test_i2i_inner_product_excludes_self_even_when_self_is_not_first() -> None:
    # raw inner product: 2->3 (0.5 beats 0.1); item 1's best match is item 0 (0.9 > its own 0.82)
    m = i2i_hit_at_k(POINTS, PAIRS, k=1, metric="ip")
    assert m["hit@1"] == pytest.approx(4 / 6)
    assert m["recall@1"] == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)
    # a tiny item 4: its own inner product (1e-4) is not even in the top 2, so nothing must be cut
    tiny = np.vstack([POINTS, [[0.01, 0.0]]]).astype(np.float32)
    m = i2i_hit_at_k(tiny, np.array([[4, 0]]), k=1, metric="ip")
    assert m["hit@1"] == pytest.approx(0.5)  # 4->0 hits (0.01 > 0.009); 0->4 misses (0->1)


def test_i2i_l2_and_batching_match_brute_force() -> None:
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    pairs = rng.integers(0, 50, size=(80, 2))
    k = 5
    dist = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    top = np.argsort(dist, axis=1)[:, :k]
    und = {tuple(sorted(p)) for p in pairs.tolist() if p[0] != p[1]}
    directed = [(a, b) for a, b in und] + [(b, a) for a, b in und]
    hits = [b in top[a] for a, b in directed]
    anchors = sorted({a for a, _ in directed})
    recall = np.mean(
        [np.mean([h for (a, _), h in zip(directed, hits, strict=True) if a == x]) for x in anchors]
    )
    for batch_size in (1, 7, 4096):
        m = i2i_hit_at_k(emb, pairs, k=k, metric="l2", batch_size=batch_size)
        assert m["hit@5"] == pytest.approx(np.mean(hits))
        assert m["recall@5"] == pytest.approx(recall)
        assert (m["anchors"], m["pairs"]) == (len(anchors), len(und))


def test_i2i_input_errors() -> None:
    with pytest.raises(ValueError, match="k must lie"):
        i2i_hit_at_k(POINTS, PAIRS, k=4)
    with pytest.raises(ValueError, match="metric"):
        i2i_hit_at_k(POINTS, PAIRS, k=1, metric="dot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        i2i_hit_at_k(POINTS, np.array([[0, 9]]), k=1)


# ----------------------------------------------------------------------------------------------
# Popularity buckets


def test_popularity_buckets_boundaries_and_id_tie_break() -> None:
    # 7 warm items -> 7 // 4 = 1 head and 1 tail; items 1 and 2 tie at count 1, the higher id is tail
    buckets = popularity_buckets(np.array([0, 1, 1, 2, 3, 5, 8, 13]))
    assert buckets.tolist() == ["cold", "torso", "tail", "torso", "torso", "torso", "torso", "head"]
    # 8 warm items -> 2 head, 2 tail; equal counts straddle both boundaries and split by id
    assert popularity_buckets([5, 5, 5, 1, 1, 1, 1, 1]).tolist() == (
        ["head", "head", "torso", "torso", "torso", "torso", "tail", "tail"]
    )
    # fewer than 4 warm items: no head or tail
    assert popularity_buckets([0, 3, 2]).tolist() == ["cold", "torso", "torso"]
    with pytest.raises(ValueError, match="non-negative"):
        popularity_buckets([1, -1])
