"""The one evaluation harness every model uses: retrieval, ranking (CTR), i2i and popularity buckets.

Pure numpy / torch / faiss: no Ray, no file I/O, no logging of results. Callers (stages, tuning
trials, benchmarks) decide where numbers go.

- **Retrieval** (leave-one-out, full catalogue, no sampled negatives): :func:`target_ranks` scores
  cases chunk by chunk and keeps only the target's rank, so memory is bounded by
  ``chunk_size * n_items`` scores; :func:`metrics_from_ranks` turns ranks into Recall@K / NDCG@K,
  overall and per group; :func:`retrieval_metrics` does both. :func:`paired_difference` compares two
  models case by case (the same users and targets) with a bootstrap interval over the cases.
- **Ranking**: :func:`auc` (Mann–Whitney, ties count one half), :func:`gauc` (per-user AUC
  weighted by impressions), :func:`logloss`, and :func:`ranking_metrics` for all three per group.
- **Encoders**: :func:`i2i_hit_at_k` over held-out co-click pairs with an exact faiss index.
- **Buckets**: :func:`popularity_buckets` labels items head / torso / tail / cold from train counts.

Tie rule for retrieval ranks (deterministic and pessimistic): the target's 0-based rank is the
number of candidate items scoring strictly higher **plus** the number of other candidates scoring
exactly the same. A model therefore never gains from ties: constant scores, or a generative model
that fills unscored items with ``-inf``, cannot earn hits it did not rank. With continuous scores
ties are rare and the rule coincides with every other one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Union

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "BUCKETS",
    "COLD",
    "HEAD",
    "TAIL",
    "TORSO",
    "GaucResult",
    "PairedDifference",
    "auc",
    "bootstrap_means",
    "gauc",
    "i2i_hit_at_k",
    "logloss",
    "case_gains",
    "metrics_from_ranks",
    "paired_difference",
    "popularity_buckets",
    "ranking_metrics",
    "retrieval_metrics",
    "target_ranks",
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Any]]
ScoreFn = Callable[[Any], Union[np.ndarray, torch.Tensor]]
Exclude = Union[Sequence[Sequence[int]], np.ndarray, torch.Tensor]

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)

HEAD, TORSO, TAIL, COLD = "head", "torso", "tail", "cold"
BUCKETS: tuple[str, ...] = (HEAD, TORSO, TAIL, COLD)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks}")
    return ks


def _group_labels(groups: ArrayLike | None, n: int, name: str = "groups") -> np.ndarray | None:
    if groups is None:
        return None
    labels = np.asarray([str(g) for g in _as_1d(groups, name)])
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels for {n} cases; pass one label per case")
    return labels


# ----------------------------------------------------------------------------------------------
# Full-catalogue retrieval


def metrics_from_ranks(
    ranks: ArrayLike,
    ks: Sequence[int] = DEFAULT_KS,
    groups: ArrayLike | None = None,
) -> dict[str, float]:
    """Recall@K and NDCG@K from the 0-based rank of each case's single target.

    With one relevant item per case Recall@K is the hit rate ``rank < K`` and
    ``NDCG@K = 1 / log2(rank + 2)`` when ``rank < K`` (else 0); the ideal DCG is 1.

    Args:
        ranks: (n_cases,) non-negative integer ranks (0 = the target came first).
        ks: cut-offs K.
        groups: optional (n_cases,) label per case (e.g. the target's popularity bucket); labels
            are turned into strings for the keys.

    Returns:
        ``count``, ``recall@K`` and ``ndcg@K`` for every K, and for every group label ``g`` the same
        keys suffixed with ``/g`` (``recall@10/tail``, ``count/tail``). Means over zero cases are
        absent rather than NaN; groups are listed in sorted order.
    """
    ks = _check_ks(ks)
    r = _as_1d(ranks, "ranks")
    if r.size and (not np.issubdtype(r.dtype, np.integer) or r.min() < 0):
        raise ValueError("ranks must be non-negative integers (0-based rank of the target)")
    labels = _group_labels(groups, len(r))

    def summarise(sub: np.ndarray, suffix: str) -> dict[str, float]:
        out: dict[str, float] = {f"count{suffix}": int(sub.size)}
        if sub.size == 0:
            return out
        gain = 1.0 / np.log2(sub.astype(np.float64) + 2.0)
        for k in ks:
            out[f"recall@{k}{suffix}"] = float(np.mean(sub < k))
        for k in ks:
            out[f"ndcg@{k}{suffix}"] = float(np.mean(np.where(sub < k, gain, 0.0)))
        return out

    result = summarise(r, "")
    if labels is not None:
        for g in np.unique(labels):
            result.update(summarise(r[labels == g], f"/{g}"))
    return result


def case_gains(ranks: ArrayLike, metric: str) -> np.ndarray:
    """(n_cases,) per-case value of ``recall@K`` (hit) or ``ndcg@K`` whose mean :func:`metrics_from_ranks` reports."""
    r = _as_1d(ranks, "ranks")
    kind, _, k = metric.partition("@")
    if kind not in ("recall", "ndcg") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"metric must be recall@K or ndcg@K with K >= 1, got {metric!r}")
    hit = r < int(k)
    if kind == "recall":
        return hit.astype(np.float64)
    return np.where(hit, 1.0 / np.log2(r.astype(np.float64) + 2.0), 0.0)


def bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, k) column means of ``values`` (n, k) over resamples of its rows with replacement.

    One draw of rows serves every column, so columns that belong to the same case (a user's valid and
    test differences, say) stay paired. Resamples are drawn 64 at a time: memory is bounded by 64 x n.
    """
    n = len(values)
    out = np.empty((n_boot, values.shape[1]))
    for start in range(0, n_boot, 64):
        idx = rng.integers(0, n, size=(min(64, n_boot - start), n))
        out[start : start + len(idx)] = values[idx].mean(axis=1)
    return out


class PairedDifference(NamedTuple):
    """``other`` minus ``base`` on the same cases, with a bootstrap interval over the cases.

    ``base`` / ``other`` / ``diff`` average over the runs; ``low`` / ``high`` bound ``diff`` (percentile
    interval at the requested level); ``share_not_above`` is the share of bootstrap resamples where
    ``other`` does not beat ``base`` (a one-sided bootstrap p-value for "other is better");
    ``run_diffs`` is each run's own difference (their spread is the seed-to-seed variation, which the
    interval does not contain).
    """

    metric: str
    base: float
    other: float
    diff: float
    low: float
    high: float
    share_not_above: float
    cases: int
    run_diffs: tuple[float, ...]


def paired_difference(
    base: Sequence[ArrayLike],
    other: Sequence[ArrayLike],
    metric: str = "ndcg@10",
    *,
    joint: bool = True,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """How much ``other`` beats ``base`` on ``metric``, paired case by case, with a bootstrap interval.

    Run ``r`` of ``base`` and of ``other`` must rank the same cases in the same order (e.g. two models of
    one seed on one prepare). The difference is the mean over runs of each run's difference. Its interval
    resamples cases with replacement: with ``joint`` every run shares the case set (the same users across
    seeds), so one resample of case indices serves all runs and the users' correlation across seeds is
    kept; otherwise each run's cases are resampled on their own. The interval says how far the
    difference could move on another sample of users for these trained models; it does not include the
    variation from training seeds (``run_diffs`` shows that).

    Args:
        base, other: one (n_cases,) array of 0-based target ranks per run.
        metric: ``recall@K`` or ``ndcg@K``.
        joint: the runs share one case set (equal lengths required).
        n_boot: bootstrap resamples (>= 100).
        level: two-sided interval level in (0, 1).
        seed: seed of the resampling.
    """
    if len(base) == 0 or len(base) != len(other):
        raise ValueError(f"base and other need the same number of runs (>= 1), got {len(base)} and {len(other)}")
    if n_boot < 100 or not 0.0 < level < 1.0:
        raise ValueError(f"n_boot must be >= 100 and level in (0, 1), got {n_boot} and {level}")
    diffs, bases, others = [], [], []
    for i, (b, o) in enumerate(zip(base, other)):
        gb, go = case_gains(b, metric), case_gains(o, metric)
        if gb.size == 0 or gb.size != go.size:
            raise ValueError(f"run {i}: base and other must rank the same non-empty cases, got {gb.size} and "
                             f"{go.size} cases")
        diffs.append(go - gb)
        bases.append(gb.mean())
        others.append(go.mean())
    if joint and len({d.size for d in diffs}) != 1:
        raise ValueError("joint=True needs every run to rank the same cases; pass joint=False for runs on "
                         f"different case sets (sizes {sorted({d.size for d in diffs})})")
    rng = np.random.default_rng(seed)
    pooled = [np.mean(diffs, axis=0)] if joint else diffs
    # the statistic is the mean over runs, so each independently resampled part adds its share
    boot = sum(bootstrap_means(d[:, None], n_boot, rng)[:, 0] for d in pooled) / len(pooled)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    run_diffs = tuple(float(d.mean()) for d in diffs)
    return PairedDifference(metric, float(np.mean(bases)), float(np.mean(others)), float(np.mean(run_diffs)),
                            float(low), float(high), float(np.mean(boot <= 0.0)), int(diffs[0].size), run_diffs)


def _exclusion_pairs(
    exclude: Exclude, start: int, stop: int, targets: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs to remove from a chunk's candidates; never a case's own target."""
    if isinstance(exclude, torch.Tensor) or (isinstance(exclude, np.ndarray) and exclude.dtype != object):
        block = _to_numpy(exclude[start:stop])
        if block.ndim != 2:
            raise ValueError(
                f"an array exclude must be 2-D (n_cases, max_len) padded with -1, got {block.ndim}-D; "
                "pass a list of per-case item lists for ragged histories"
            )
        rows, pos = np.nonzero(block >= 0)  # negative entries are padding
        cols = block[rows, pos].astype(np.int64)
    else:
        per_case = [np.asarray(items, dtype=np.int64).reshape(-1) for items in exclude[start:stop]]
        lens = np.fromiter((len(c) for c in per_case), dtype=np.int64, count=len(per_case))
        rows = np.repeat(np.arange(len(per_case)), lens)
        cols = np.concatenate(per_case) if per_case else np.zeros(0, dtype=np.int64)
        keep = cols >= 0
        rows, cols = rows[keep], cols[keep]
    if cols.size and cols.max() >= n_items:
        raise ValueError(f"exclude holds item id {int(cols.max())} but score_fn returned {n_items} items")
    keep = cols != targets[rows]  # leave-one-out allows repeats: the target stays a candidate
    return rows[keep], cols[keep]


def _chunk_ranks(scores: torch.Tensor, targets: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Pessimistic 0-based ranks of one chunk's targets (see the module docstring)."""
    if not scores.is_floating_point():
        scores = scores.double()
    if torch.isnan(scores).any():
        bad = torch.nonzero(torch.isnan(scores).any(dim=1)).flatten()[:5].tolist()
        raise ValueError(
            f"score_fn returned NaN scores (chunk rows {bad}); fix the model, or give items it "
            "cannot score -inf"
        )
    if rows.size:
        # Clone: score_fn may return a view of a cached matrix. NaN compares false with everything,
        # so an excluded item neither outranks nor ties the target: it leaves the candidate set.
        scores = scores.clone()
        scores[torch.as_tensor(rows, device=scores.device), torch.as_tensor(cols, device=scores.device)] = (
            float("nan")
        )
    tgt = torch.as_tensor(targets, dtype=torch.long, device=scores.device)
    t = scores.gather(1, tgt[:, None])  # (B, 1)
    higher = (scores > t).sum(dim=1)
    tied = (scores == t).sum(dim=1) - 1  # minus the target itself
    return (higher + tied).cpu().numpy().astype(np.int64)


def target_ranks(
    score_fn: ScoreFn,
    cases: Any,
    targets: ArrayLike,
    *,
    exclude: Exclude | None = None,
    chunk_size: int = 1024,
    progress: bool = False,
) -> np.ndarray:
    """Full-catalogue rank of each case's target, scored chunk by chunk.

    Args:
        score_fn: called as ``score_fn(cases[start:stop])`` and returns (stop - start, n_items) scores
            (numpy or torch, any device; higher is better). Pass ``cases=np.arange(n)`` to receive
            case indices. Items a model cannot score should be ``-inf``; NaN is an error.
        cases: per-case model input supporting ``len`` and slicing: user ids, a padded
            (n_cases, T) history tensor, a list of history lists, ...
        targets: (n_cases,) target item id per case.
        exclude: items removed from each case's candidates (e.g. its history): a list of per-case
            item lists, or a (n_cases, L) integer array padded with negative values. A case's target
            is never removed even when it appears in its history (leave-one-out allows repeats).
        chunk_size: cases scored per ``score_fn`` call; peak memory is ``chunk_size * n_items``
            scores (plus one copy when ``exclude`` is given).
        progress: show a progress bar over chunks.

    Returns:
        (n_cases,) int64 0-based ranks: the number of candidates scoring strictly higher than the
        target plus the number of other candidates tied with it (pessimistic, deterministic).
    """
    tgt = _as_1d(targets, "targets").astype(np.int64)
    n = len(tgt)
    if len(cases) != n:
        raise ValueError(f"cases has {len(cases)} entries but targets has {n}; pass one target per case")
    if exclude is not None and len(exclude) != n:
        raise ValueError(f"exclude has {len(exclude)} entries for {n} cases; pass one item list per case")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ranks = np.empty(n, dtype=np.int64)
    n_items: int | None = None
    for start in tqdm(range(0, n, chunk_size), desc="ranking", disable=not progress):
        stop = min(start + chunk_size, n)
        scores = torch.as_tensor(score_fn(cases[start:stop]))
        if scores.ndim != 2 or scores.shape[0] != stop - start:
            raise ValueError(
                f"score_fn must return ({stop - start}, n_items) scores for a chunk of {stop - start} "
                f"cases, got shape {tuple(scores.shape)}"
            )
        n_items = n_items or scores.shape[1]
        if scores.shape[1] != n_items:
            raise ValueError(f"score_fn returned {scores.shape[1]} items after returning {n_items}")
        chunk_targets = tgt[start:stop]
        if chunk_targets.min() < 0 or chunk_targets.max() >= n_items:
            raise ValueError(f"targets must lie in [0, {n_items}) (the score_fn catalogue)")
        rows, cols = (
            _exclusion_pairs(exclude, start, stop, chunk_targets, n_items)
            if exclude is not None
            else (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        )
        ranks[start:stop] = _chunk_ranks(scores, chunk_targets, rows, cols)
    return ranks


def retrieval_metrics(
    score_fn: ScoreFn,
    cases: Any,
    targets: ArrayLike,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    exclude: Exclude | None = None,
    chunk_size: int = 1024,
    groups: ArrayLike | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Full-catalogue Recall@K / NDCG@K, overall and per group.

    :func:`target_ranks` followed by :func:`metrics_from_ranks`; see those for the arguments.
    ``cases`` is what the design calls the histories or users: it is sliced per chunk and handed to
    ``score_fn``.

    Returns:
        ``count``, ``recall@K``, ``ndcg@K`` and, per group label ``g``, ``count/g``, ``recall@K/g``,
        ``ndcg@K/g``.
    """
    ranks = target_ranks(score_fn, cases, targets, exclude=exclude, chunk_size=chunk_size, progress=progress)
    return metrics_from_ranks(ranks, ks, groups)


# ----------------------------------------------------------------------------------------------
# Ranking (CTR)


class GaucResult(NamedTuple):
    """GAUC and the number of users it averages over (users with both classes)."""

    value: float
    n_users: int


def _check_binary(labels: ArrayLike, scores: ArrayLike, score_name: str) -> tuple[np.ndarray, np.ndarray]:
    y = _as_1d(labels, "labels")
    s = _as_1d(scores, score_name).astype(np.float64)
    if len(y) != len(s):
        raise ValueError(f"labels has {len(y)} entries but {score_name} has {len(s)}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    if np.isnan(s).any():
        raise ValueError(f"{score_name} contains NaN")
    return y.astype(np.float64), s


def _per_group_auc(codes: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mann–Whitney AUC within each group code, with average ranks for ties.

    Returns:
        (n_groups,) AUC (NaN where a group has one class only) and (n_groups,) impression counts.
    """
    n_groups = int(codes.max()) + 1 if codes.size else 0
    order = np.lexsort((s, codes))  # by group, then score
    c, ss, yy = codes[order], s[order], y[order]
    n_imp = np.bincount(c, minlength=n_groups)
    first = np.concatenate(([0], np.cumsum(n_imp)[:-1]))  # position where each group starts
    pos = np.arange(len(c)) - first[c]  # 0-based position inside the group
    new_tie = np.ones(len(c), dtype=bool)
    new_tie[1:] = (c[1:] != c[:-1]) | (ss[1:] != ss[:-1])
    tie_id = np.cumsum(new_tie) - 1
    tie_size = np.bincount(tie_id)
    avg_rank = pos[new_tie] + (tie_size + 1) / 2.0  # 1-based average rank of each tie block
    rank = avg_rank[tie_id]
    n_pos = np.bincount(c, weights=yy, minlength=n_groups)
    n_neg = n_imp - n_pos
    rank_sum = np.bincount(c, weights=yy * rank, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        aucs = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    aucs[(n_pos == 0) | (n_neg == 0)] = np.nan
    return aucs, n_imp


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC as the Mann–Whitney statistic: P(score_pos > score_neg) + P(tie) / 2.

    Args:
        labels: (n,) binary labels.
        scores: (n,) scores or probabilities (higher = more likely positive).

    Returns:
        The AUC, or NaN when only one class is present.
    """
    y, s = _check_binary(labels, scores, "scores")
    if y.size == 0:
        return float("nan")
    aucs, _ = _per_group_auc(np.zeros(len(y), dtype=np.int64), y, s)
    return float(aucs[0])


def gauc(user_ids: ArrayLike, labels: ArrayLike, scores: ArrayLike) -> GaucResult:
    """Group AUC: each user's AUC weighted by that user's number of impressions.

    Users whose impressions are all positive or all negative have no AUC and are skipped (neither
    their AUC nor their weight counts).

    Args:
        user_ids: (n,) user of each impression (any hashable values).
        labels: (n,) binary labels.
        scores: (n,) scores or probabilities.

    Returns:
        ``GaucResult(value, n_users)``; ``value`` is NaN when no user has both classes.
    """
    y, s = _check_binary(labels, scores, "scores")
    users = _as_1d(user_ids, "user_ids")
    if len(users) != len(y):
        raise ValueError(f"user_ids has {len(users)} entries but labels has {len(y)}")
    if y.size == 0:
        return GaucResult(float("nan"), 0)
    codes = np.unique(users, return_inverse=True)[1].reshape(-1)
    aucs, n_imp = _per_group_auc(codes, y, s)
    valid = ~np.isnan(aucs)
    if not valid.any():
        return GaucResult(float("nan"), 0)
    value = float(np.sum(aucs[valid] * n_imp[valid]) / np.sum(n_imp[valid]))
    return GaucResult(value, int(valid.sum()))


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy with probabilities clipped to ``[eps, 1 - eps]``.

    Args:
        labels: (n,) binary labels.
        probs: (n,) predicted probabilities of the positive class.
        eps: clipping that keeps a confident mistake finite (``-log(eps)`` at most).

    Returns:
        The mean log loss in nats (NaN for empty input).
    """
    y, p = _check_binary(labels, probs, "probs")
    if y.size == 0:
        return float("nan")
    if p.min() < 0 or p.max() > 1:
        raise ValueError("probs must lie in [0, 1]; apply a sigmoid to logits first")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def ranking_metrics(
    user_ids: ArrayLike,
    labels: ArrayLike,
    probs: ArrayLike,
    groups: ArrayLike | None = None,
) -> dict[str, float]:
    """AUC, GAUC and LogLoss over all impressions and per group.

    Args:
        user_ids: (n,) user of each impression.
        labels: (n,) binary labels.
        probs: (n,) predicted probabilities.
        groups: optional (n,) label per impression (e.g. the candidate item's popularity bucket).

    Returns:
        ``count``, ``auc``, ``gauc``, ``gauc_users``, ``logloss`` and, per group label ``g``, the
        same keys suffixed with ``/g`` (``auc/cold``). AUC-type values are NaN where undefined.
    """
    users = _as_1d(user_ids, "user_ids")
    y, p = _check_binary(labels, probs, "probs")
    labels_g = _group_labels(groups, len(y))

    def summarise(mask: np.ndarray | slice, suffix: str) -> dict[str, float]:
        g = gauc(users[mask], y[mask], p[mask])
        return {
            f"count{suffix}": int(y[mask].size),
            f"auc{suffix}": auc(y[mask], p[mask]),
            f"gauc{suffix}": g.value,
            f"gauc_users{suffix}": g.n_users,
            f"logloss{suffix}": logloss(y[mask], p[mask]),
        }

    result = summarise(slice(None), "")
    if labels_g is not None:
        for g in np.unique(labels_g):
            result.update(summarise(labels_g == g, f"/{g}"))
    return result


# ----------------------------------------------------------------------------------------------
# Item-to-item retrieval


def _directed_pairs(pairs: ArrayLike, n_items: int) -> tuple[np.ndarray, int]:
    """Unique undirected pairs, expanded to both directions and sorted by anchor."""
    p = _to_numpy(pairs)
    if p.size == 0:
        raise ValueError("pairs is empty; pass at least one held-out (a, b) co-click pair")
    if p.ndim != 2 or p.shape[1] != 2 or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"pairs must be an (m, 2) integer array, got {p.dtype} of shape {p.shape}")
    if p.min() < 0 or p.max() >= n_items:
        raise ValueError(f"pairs hold item ids outside [0, {n_items}) (the embedding rows)")
    p = p.astype(np.int64)
    p = p[p[:, 0] != p[:, 1]]  # an item is never its own neighbour
    undirected = np.unique(np.sort(p, axis=1), axis=0)
    directed = np.concatenate([undirected, undirected[:, ::-1]])
    directed = directed[np.lexsort((directed[:, 1], directed[:, 0]))]
    return directed, len(undirected)


def _build_index(emb: np.ndarray, metric: str) -> tuple[faiss.Index, np.ndarray]:
    if metric == "l2":
        index: faiss.Index = faiss.IndexFlatL2(emb.shape[1])
    elif metric in ("ip", "cosine"):
        if metric == "cosine":
            norms = np.linalg.norm(emb, axis=1, keepdims=True)
            emb = np.ascontiguousarray(emb / np.where(norms > 0, norms, 1.0), dtype=np.float32)
        index = faiss.IndexFlatIP(emb.shape[1])
    else:
        raise ValueError(f"metric must be 'cosine', 'ip' or 'l2', got {metric!r}")
    index.add(emb)
    return index, emb


def _neighbours_without_self(
    index: faiss.Index, queries: np.ndarray, anchors: np.ndarray, k: int
) -> np.ndarray:
    """Top-k neighbour ids of each anchor with the anchor itself removed: (len(anchors), k)."""
    _, ids = index.search(queries, k + 1)  # (B, k + 1)
    is_self = ids == anchors[:, None]
    # Drop the anchor where it appears, else the (k+1)-th hit (the anchor is then tied or beaten).
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(len(ids)), drop] = False
    return ids[keep].reshape(len(ids), k)


def i2i_hit_at_k(
    embeddings: ArrayLike,
    pairs: ArrayLike,
    k: int = 30,
    metric: Literal["cosine", "ip", "l2"] = "cosine",
    batch_size: int = 4096,
) -> dict[str, float]:
    """Item-to-item Hit@K and Recall@K over held-out co-click pairs, exact faiss search.

    Every unique pair {a, b} (duplicates and self-pairs dropped) is scored in both directions: a→b
    hits when b is among a's k nearest neighbours other than a itself, and b→a likewise.

    Args:
        embeddings: (n_items, d) item embeddings (cast to float32).
        pairs: (m, 2) integer item ids of held-out co-click pairs.
        k: neighbours per anchor (the anchor itself excluded); at most ``n_items - 1``.
        metric: ``cosine`` (inner product of L2-normalised vectors), ``ip`` or ``l2``.
        batch_size: anchors queried per faiss call (bounds the (batch, k) result memory).

    Returns:
        ``hit@k``: fraction of directed pairs whose partner is in the anchor's top k;
        ``recall@k``: per anchor, the share of its partners found in its top k, averaged over
        anchors; ``anchors``: items with at least one partner; ``pairs``: unique undirected pairs.
    """
    emb = np.ascontiguousarray(_to_numpy(embeddings), dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (n_items, d), got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or inf")
    n_items = emb.shape[0]
    if not 1 <= k <= n_items - 1:
        raise ValueError(f"k must lie in [1, n_items - 1] = [1, {n_items - 1}], got {k}")
    directed, n_pairs = _directed_pairs(pairs, n_items)
    index, emb = _build_index(emb, metric)

    anchors, starts, counts = np.unique(directed[:, 0], return_index=True, return_counts=True)
    hit = np.zeros(len(directed), dtype=bool)
    for b0 in range(0, len(anchors), batch_size):
        batch = anchors[b0 : b0 + batch_size]
        nbrs = _neighbours_without_self(index, emb[batch], batch, k)  # (B, k)
        lo, hi = starts[b0], starts[b0 + len(batch) - 1] + counts[b0 + len(batch) - 1]
        row = np.repeat(np.arange(len(batch)), counts[b0 : b0 + len(batch)])  # pair -> batch row
        hit[lo:hi] = (nbrs[row] == directed[lo:hi, 1][:, None]).any(axis=1)
    per_anchor = np.add.reduceat(hit.astype(np.float64), starts) / counts
    return {
        f"hit@{k}": float(hit.mean()),
        f"recall@{k}": float(per_anchor.mean()),
        "anchors": int(len(anchors)),
        "pairs": int(n_pairs),
    }


# ----------------------------------------------------------------------------------------------
# Popularity buckets


def popularity_buckets(train_counts: ArrayLike) -> np.ndarray:
    """Label each item ``head``, ``torso``, ``tail`` or ``cold`` by its training interaction count.

    Items with count 0 are ``cold``. The ``m`` warm items (count > 0) are ordered by count,
    descending, ties broken by item id (the lower id ranks higher). The first ``m // 4`` are
    ``head``, the last ``m // 4`` are ``tail``, the rest ``torso``: each of head and tail is at most
    25 % of the warm items, so the two never overlap, and with fewer than 4 warm items all are
    torso. Equal counts can straddle a boundary; the id tie-break makes the split deterministic.

    Args:
        train_counts: (n_items,) non-negative interaction count of each item in the training split.

    Returns:
        (n_items,) array of bucket names (dtype ``<U5``).
    """
    counts = _as_1d(train_counts, "train_counts")
    if counts.size and (
        not np.issubdtype(counts.dtype, np.number) or np.isnan(counts).any() or counts.min() < 0
    ):
        raise ValueError("train_counts must be non-negative numbers, one per item")
    out = np.full(len(counts), TORSO, dtype="<U5")
    warm = np.flatnonzero(counts > 0)
    out[counts <= 0] = COLD
    order = warm[np.lexsort((warm, -counts[warm]))]  # by count desc, then id asc
    quarter = len(order) // 4
    out[order[:quarter]] = HEAD
    out[order[len(order) - quarter :]] = TAIL
    return out
