"""Pure, vectorised log processing shared by the Ray Data stage and the single-process baseline.

Everything here works on numpy arrays of one batch of whole users (all of a user's interactions in
the same batch): ordering and de-duplication, leave-one-out splits, the cold-item hold-out, and
co-click pair counting. No Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRAIN, VALID, TEST, HELDOUT = 0, 1, 2, 3
SPLIT_NAMES = np.array(["train", "valid", "test", "heldout"])
OFFICIAL_CODES = {"train": TRAIN, "valid": VALID, "test": TEST}


@dataclass
class UserBatch:
    """Cleaned, ordered interactions of a batch of whole users (flat arrays, grouped by user)."""

    user: np.ndarray  # (N,) int64, non-decreasing
    item: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) int8 split code
    position: np.ndarray  # (N,) int64 rank within the user's cleaned sequence
    dup_index: np.ndarray  # indices into the *input* rows removed as exact duplicates
    short_users: np.ndarray  # users set aside for having too few interactions
    short_index: np.ndarray  # indices into the input rows of those users


def order_and_split(
    user: np.ndarray,
    item: np.ndarray,
    order: np.ndarray,
    min_seq_len: int,
    cold_items: np.ndarray | None = None,
    official_split: np.ndarray | None = None,
) -> UserBatch:
    """Sort each user's interactions, drop exact duplicates, and assign leave-one-out splits.

    Args:
        user, item, order: (N,) arrays; rows of one user may be in any order; ties in ``order``
            keep input order (stable sort).
        min_seq_len: users with fewer (de-duplicated) interactions are set aside.
        cold_items: optional (num_items,) bool mask of items held out of training; their
            train-part interactions get split HELDOUT.
        official_split: optional (N,) int8 codes shipped with the data, used instead of LOO.

    Returns:
        A :class:`UserBatch`; ``dup_index``/``short_index`` point at rows set aside.
    """
    # exact duplicates: same user, item and order value; sorting by item too makes them adjacent
    # even among ties in order, and the stable sort keeps the first in input order
    idx = np.lexsort((item, order, user))
    u, it, o = user[idx], item[idx], order[idx]
    dup = np.zeros(len(u), dtype=bool)
    dup[1:] = (u[1:] == u[:-1]) & (it[1:] == it[:-1]) & (o[1:] == o[:-1])
    keep = idx[~dup]
    keep = keep[np.lexsort((keep, order[keep], user[keep]))]  # by user, then order, then input position
    u, it = user[keep], item[keep]

    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, dtype=np.int64)
    lengths = np.diff(np.r_[starts, len(u)])
    short = lengths < min_seq_len
    row_short = np.repeat(short, lengths)
    short_index = keep[row_short]
    keep = keep[~row_short]
    u, it = user[keep], item[keep]
    lengths = lengths[~short]
    ends = np.cumsum(lengths)
    position = np.arange(len(u)) - np.repeat(ends - lengths, lengths)

    if official_split is not None:
        split = official_split[keep].astype(np.int8)
    else:
        from_end = np.repeat(ends, lengths) - np.arange(len(u))  # 1 for the last item
        split = np.where(from_end == 1, TEST, np.where(from_end == 2, VALID, TRAIN)).astype(np.int8)
    if cold_items is not None and len(it):
        split[(split == TRAIN) & cold_items[it]] = HELDOUT
    return UserBatch(
        user=u.astype(np.int64), item=it.astype(np.int64), split=split, position=position.astype(np.int64),
        dup_index=idx[dup], short_users=np.unique(user[short_index]), short_index=short_index,
    )


def coclick_counts(user: np.ndarray, item: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, for each unordered item pair, the users who co-clicked it within ``window`` positions.

    Args:
        user, item: (N,) training interactions, grouped by user and in order within each user.
        window: maximum distance in positions between the two clicks.

    Returns:
        (item_a, item_b, count) with item_a < item_b; a user counts a pair once however often
        the pair recurs in their sequence.
    """
    a_parts, b_parts, u_parts = [], [], []
    for d in range(1, window + 1):
        same = user[d:] == user[:-d]
        a, b = item[:-d][same], item[d:][same]
        ne = a != b
        a_parts.append(np.minimum(a, b)[ne])
        b_parts.append(np.maximum(a, b)[ne])
        u_parts.append(user[d:][same][ne])
    if not a_parts or not sum(len(x) for x in a_parts):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    a, b, u = np.concatenate(a_parts), np.concatenate(b_parts), np.concatenate(u_parts)
    order = np.lexsort((b, a, u))
    a, b, u = a[order], b[order], u[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1]) | (u[1:] != u[:-1])]
    return sum_pairs(a[first], b[first], np.ones(int(first.sum()), dtype=np.int64))


def sum_pairs(a: np.ndarray, b: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge duplicate (a, b) rows by summing their counts."""
    if not len(a):
        return a.astype(np.int64), b.astype(np.int64), count.astype(np.int64)
    order = np.lexsort((b, a))
    a, b, count = a[order], b[order], count[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
    starts = np.flatnonzero(first)
    return a[first].astype(np.int64), b[first].astype(np.int64), np.add.reduceat(count, starts).astype(np.int64)


def finalize_coclicks(
    a: np.ndarray, b: np.ndarray, count: np.ndarray, train_freq: np.ndarray, *, min_count: int,
    pop_alpha: float, max_per_item: int, holdout_fraction: float, seed: int,
) -> dict[str, np.ndarray]:
    """Filter, weight, cap and split the summed co-click pairs.

    ``weight = count / (freq_a * freq_b) ** pop_alpha``. A pair is kept only if it is among the
    ``max_per_item`` highest-weighted pairs of *both* its items, so no item (a bestseller in
    particular) has more than ``max_per_item`` partners. A stable hash of the pair and ``seed`` marks
    ``holdout_fraction`` of the pairs ``heldout``.
    """
    keep = count >= min_count
    a, b, count = a[keep], b[keep], count[keep]
    fa = np.maximum(train_freq[a], 1).astype(np.float64)
    fb = np.maximum(train_freq[b], 1).astype(np.float64)
    weight = count / (fa * fb) ** pop_alpha
    # rank each item's pairs on both sides together, so an item's partners as a and as b share one cap
    n = len(a)
    top = _within_top(np.concatenate([a, b]), np.concatenate([weight, weight]), max_per_item)
    ok = top[:n] & top[n:]
    a, b, count, weight = a[ok], b[ok], count[ok], weight[ok]
    h = _mix(a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ b.astype(np.uint64) ^ np.uint64(seed))
    heldout = (h % np.uint64(1_000_000)).astype(np.float64) < holdout_fraction * 1_000_000
    order = np.lexsort((b, a))
    return {
        "item_a": a[order], "item_b": b[order], "count": count[order], "weight": weight[order],
        "split": np.where(heldout[order], "heldout", "train"),
    }


def _within_top(key: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """True for rows ranked < k by weight (descending) within their key group."""
    if not len(key):
        return np.zeros(0, dtype=bool)
    order = np.lexsort((-weight, key))
    k_sorted = key[order]
    starts = np.r_[True, k_sorted[1:] != k_sorted[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(key)), 0))
    rank = np.arange(len(key)) - group_start
    out = np.empty(len(key), dtype=bool)
    out[order] = rank < k
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a stable, well-spread hash of uint64 values."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def choose_cold_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """(num_items,) bool mask: a random ``fraction`` of items held out of training."""
    mask = np.zeros(num_items, dtype=bool)
    n = int(round(fraction * num_items))
    if n:
        mask[np.random.default_rng(seed).choice(num_items, size=n, replace=False)] = True
    return mask
