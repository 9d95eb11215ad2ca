"""Semantic-ID bookkeeping shared by every tokenizer: collision handling and quality figures (numpy).

Two items with the same codes ``[c_1 .. c_L]`` cannot be told apart by a model that generates IDs, so
every tokenizer ends with a collision step, chosen by name from :data:`COLLISION_RESOLVERS`:

* ``digit`` (TIGER): append one more token, the item's rank among the items sharing its codes
  (0 for the first, so items without a collision end in 0). IDs get one level longer.
* ``reassign``: keep the item closest to the shared code, and move each other colliding item to the
  nearest *free* code of the last level under the same prefix. IDs keep their length. When a prefix has
  no free last-level code left (more than K items under it), the remaining items fall back to a digit;
  the quality report counts them.

**Variable-length IDs** (ADA-SID drops codes) are handled as ``(N, L)`` arrays with ``-1`` where a code is
dropped: two items collide when their rows are equal (same codes, dropped in the same places), the
``digit`` resolver and :func:`quality` work on such rows, and :func:`variable_length` turns them into the
lists an ID table stores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLLISION_RESOLVERS",
    "Resolved",
    "behavior_coherence",
    "collision_digits",
    "quality",
    "reassign_collisions",
    "resolve_collisions",
    "variable_length",
]


@dataclass
class Resolved:
    """Codes after collision handling.

    Attributes:
        codes: (N, L) int64 codes (changed only by ``reassign``).
        digit: (N,) int64 disambiguation digit (0 when the codes alone are unique).
        reassigned: number of items moved to another last-level code.
        with_digit: whether the unique ID carries the digit (always for ``digit``; for ``reassign`` only
            when some prefix ran out of free codes).
    """

    codes: np.ndarray
    digit: np.ndarray
    reassigned: int = 0
    with_digit: bool = True

    def sids(self) -> np.ndarray:
        """(N, L) or (N, L + 1) unique IDs."""
        return np.concatenate([self.codes, self.digit[:, None]], axis=1) if self.with_digit else self.codes


def _group_ids(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group index of each row of ``codes`` and the size of each group."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def collision_digits(codes: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Rank of each item among the items sharing its codes: (N, L) → (N,) int64.

    Args:
        codes: (N, L) codes.
        order: optional (N,) key; within a group, smaller keys get smaller digits (default: row order).
    """
    group, _ = _group_ids(codes)
    key = np.arange(len(codes)) if order is None else np.asarray(order)
    idx = np.lexsort((key, group))
    g = group[idx]
    start = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    run_start = np.repeat(start, np.diff(np.r_[start, len(g)]))
    digit = np.empty(len(codes), dtype=np.int64)
    digit[idx] = np.arange(len(g)) - run_start
    return digit


def reassign_collisions(codes: np.ndarray, last_distances: np.ndarray) -> Resolved:
    """Move colliding items to the nearest free last-level code under their prefix.

    Args:
        codes: (N, L) codes.
        last_distances: (N, K) distance of each item's last-level residual to every last-level code.

    Returns:
        :class:`Resolved`; the item of a group nearest to the shared code keeps it.
    """
    codes = np.array(codes, dtype=np.int64, copy=True)
    n, num_levels = codes.shape
    own = last_distances[np.arange(n), codes[:, -1]]
    digit = collision_digits(codes, order=own)  # 0 = the item nearest to the shared code
    used: dict[tuple[int, ...], set[int]] = {}
    for row in codes:
        used.setdefault(tuple(row[:-1]), set()).add(int(row[-1]))
    moved = 0
    movers = np.flatnonzero(digit > 0)
    for i in movers[np.argsort(own[movers], kind="stable")]:  # the best-placed movers choose first
        taken = used[tuple(codes[i, :-1])]
        for c in np.argsort(last_distances[i], kind="stable"):
            if int(c) not in taken:
                codes[i, -1] = c
                taken.add(int(c))
                digit[i] = 0
                moved += 1
                break
    # Items left (their prefix is full) keep a digit; recompute so digits stay dense per group.
    leftover = bool((digit > 0).any())
    if leftover:
        digit = collision_digits(codes, order=own)
    return Resolved(codes, digit, moved, with_digit=leftover)


def resolve_collisions(method: str, codes: np.ndarray, last_distances: np.ndarray | None = None) -> Resolved:
    """Apply the collision resolver called ``method`` (see :data:`COLLISION_RESOLVERS`)."""
    try:
        resolver = COLLISION_RESOLVERS[method]
    except KeyError:
        raise ValueError(f"unknown collision method {method!r}; use one of {', '.join(COLLISION_RESOLVERS)}") from None
    return resolver(codes, last_distances)


def _digit(codes: np.ndarray, last_distances: np.ndarray | None) -> Resolved:
    order = None
    if last_distances is not None:
        order = last_distances[np.arange(len(codes)), codes[:, -1]]
    return Resolved(np.asarray(codes, dtype=np.int64), collision_digits(codes, order))


def _reassign(codes: np.ndarray, last_distances: np.ndarray | None) -> Resolved:
    if last_distances is None:
        raise ValueError("collision method 'reassign' needs the last-level distances; this tokenizer has none "
                         "(use tokenize.collision=digit)")
    return reassign_collisions(codes, last_distances)


COLLISION_RESOLVERS: dict[str, Callable[[np.ndarray, np.ndarray | None], Resolved]] = {
    "digit": _digit,
    "reassign": _reassign,
}


# ----------------------------------------------------------------------------------------------
# quality


def quality(codes: np.ndarray, codebook_size: int, x: np.ndarray | None = None,
            x_hat: np.ndarray | None = None) -> dict[str, float | list[float]]:
    """Tokenizer quality figures over the catalogue.

    Args:
        codes: (N, L) codes before collision handling.
        codebook_size: K.
        x, x_hat: optional (N, D) inputs and their reconstructions from the codes.

    A ``-1`` code is a dropped one (variable-length IDs): the per-level figures count the items that
    have a code at that level, and ``presence`` (per level: share of items with a code there) and
    ``avg_codes`` (codes per item) are added.

    Returns:
        ``utilization`` (per level: share of the K codes used by at least one item), ``entropy``
        (per level, bits), ``entropy_norm`` (entropy / log2 K), ``perplexity`` (2^entropy),
        ``collision_rate`` (share of items whose codes are shared with another item),
        ``duplicate_rate`` (share of items that need a non-zero digit: 1 - distinct / N),
        ``max_group`` (most items sharing one ID), ``unique_prefix`` (per level l: share of items whose
        prefix ``c_1..c_l`` no other item has), and ``recon_rel`` = Σ‖x - x̂‖² / Σ‖x‖² when ``x`` is given.
    """
    n, num_levels = codes.shape
    util, ent, uniq = [], [], []
    for level in range(num_levels):
        col = codes[:, level]
        col = col[col >= 0]
        counts = np.bincount(col, minlength=codebook_size)
        util.append(float((counts > 0).mean()))
        p = counts[counts > 0] / max(len(col), 1)
        ent.append(float(-(p * np.log2(p)).sum()))
        _, inverse, sizes = np.unique(codes[:, : level + 1], axis=0, return_inverse=True, return_counts=True)
        uniq.append(float((sizes[inverse.reshape(-1)] == 1).mean()))
    _, inverse, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    out: dict[str, float | list[float]] = {
        "items": float(n),
        "utilization": util,
        "entropy": ent,
        "entropy_norm": [e / np.log2(codebook_size) for e in ent],
        "perplexity": [float(2.0**e) for e in ent],
        "collision_rate": float((sizes[inverse.reshape(-1)] > 1).mean()),
        "duplicate_rate": float(1.0 - len(sizes) / n),
        "max_group": float(sizes.max()),
        "unique_prefix": uniq,
    }
    if (codes < 0).any():
        out["presence"] = [float(v) for v in (codes >= 0).mean(axis=0)]
        out["avg_codes"] = float((codes >= 0).sum(axis=1).mean())
    if x is not None and x_hat is not None:
        out["recon_rel"] = float(((x - x_hat) ** 2).sum() / max(float((x**2).sum()), 1e-12))
    return out


def variable_length(codes: np.ndarray, offsets: np.ndarray | None = None) -> list[np.ndarray]:
    """Each row's kept codes (``>= 0``, in column order), plus the column's offset when given.

    Args:
        codes: (N, L) codes, -1 where dropped.
        offsets: optional (L,) integers added to the codes of each column (e.g. ``expert * K``, so a
            token names the codebook it came from whatever position it ends up in).

    Returns:
        N int64 arrays of lengths between 0 and L.
    """
    codes = np.asarray(codes, dtype=np.int64)
    shifted = codes + (0 if offsets is None else np.asarray(offsets, dtype=np.int64)[None, :])
    kept = codes >= 0
    return [row[k] for row, k in zip(shifted, kept)]


def behavior_coherence(codes: np.ndarray, behavior: np.ndarray) -> list[float]:
    """How much more alike in behavior items sharing a code prefix are than random pairs.

    For each level l: the mean cosine similarity of the behavior embeddings over pairs of distinct items
    sharing the prefix ``c_1..c_l``, minus the mean over all pairs of distinct items. 0 means the codes
    ignore behavior; the larger, the more the IDs group items users treat alike.

    Args:
        codes: (N, L) codes before collision handling.
        behavior: (N, H) behavior embeddings (e.g. SASRec's item embeddings e_b) of the same items.

    Returns:
        L floats (NaN at a level where no two items share a prefix).
    """
    v = np.asarray(behavior, dtype=np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    n = len(v)
    total = v.sum(axis=0)
    # sum over ordered pairs i != j of cos(i, j) = ||sum v||^2 - n for unit vectors
    base = (float(total @ total) - n) / max(n * (n - 1), 1)
    out = []
    for level in range(codes.shape[1]):
        _, group = np.unique(codes[:, : level + 1], axis=0, return_inverse=True)
        group = group.reshape(-1)
        sums = np.zeros((group.max() + 1, v.shape[1]))
        np.add.at(sums, group, v)
        sizes = np.bincount(group).astype(np.float64)
        pairs = float((sizes * (sizes - 1)).sum())
        within = (float((sums**2).sum()) - n) / pairs if pairs else float("nan")
        out.append(within - base)
    return out
