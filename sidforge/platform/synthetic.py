"""Synthetic logs with a planted truth, for tests, the demo and benchmarks.

Items belong to latent clusters. An item's content vector is its cluster centre plus noise, and its
title names its cluster; a user's next item stays in the current cluster with probability
``stickiness`` (otherwise a new cluster is drawn by popularity mass), and within a cluster items are
drawn by a Zipf law over popularity. So tests know the truth: items of one cluster should share
semantic-ID prefixes, co-click, and be predictable from a history in that cluster.

Logs are written in Parquet shards of ``shard_rows`` rows so that 20 M interactions never sit in
memory at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sidforge.platform.adapters import RawSource, _items_table, fixed_size_feature
from sidforge.platform.config import SyntheticConfig

log = logging.getLogger(__name__)

_WORDS = ["amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "jasper",
          "kelp", "lumen", "maple", "nectar", "onyx", "pearl", "quartz", "russet", "sage", "tundra"]


@dataclass(frozen=True)
class SyntheticTruth:
    """The planted structure: each item's cluster and popularity weight."""

    item_cluster: np.ndarray  # (num_items,) int
    item_weight: np.ndarray  # (num_items,) float, Zipf popularity
    centres: np.ndarray  # (num_clusters, feature_dim)


def make_truth(cfg: SyntheticConfig) -> SyntheticTruth:
    rng = np.random.default_rng(cfg.seed)
    ranks = rng.permutation(cfg.num_items) + 1
    weight = 1.0 / ranks.astype(np.float64) ** cfg.zipf_a
    # every cluster gets at least one item, the rest at random
    cluster = np.concatenate([np.arange(cfg.num_clusters), rng.integers(0, cfg.num_clusters,
                                                                         cfg.num_items - cfg.num_clusters)])
    rng.shuffle(cluster)
    centres = rng.normal(size=(cfg.num_clusters, cfg.feature_dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return SyntheticTruth(item_cluster=cluster, item_weight=weight, centres=centres)


def synthetic_items(cfg: SyntheticConfig, truth: SyntheticTruth) -> pa.Table:
    """Items with a content vector (``feat_content``), a title and a category naming the cluster."""
    rng = np.random.default_rng(cfg.seed + 1)
    feats = truth.centres[truth.item_cluster] + cfg.noise * rng.normal(size=(cfg.num_items, cfg.feature_dim))
    words = np.array([f"{_WORDS[c % len(_WORDS)]}{c // len(_WORDS) or ''}" for c in range(cfg.num_clusters)])
    cw = words[truth.item_cluster]
    titles = np.char.add(np.char.add(cw, " item "), np.arange(cfg.num_items).astype(str))
    return _items_table(
        pa.array(np.arange(cfg.num_items), pa.int64()),
        {
            "title": titles.tolist(),
            "categories": [[w] for w in cw.tolist()],
            "brand": [f"brand{c % 7}" for c in truth.item_cluster.tolist()],
            "feat_content": fixed_size_feature(feats),
            "cluster": pa.array(truth.item_cluster, pa.int64()),
        },
    )


def sample_sequences(cfg: SyntheticConfig, truth: SyntheticTruth, num_users: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``num_users`` sequences; returns flat (user offsets within the chunk, items, positions)."""
    extra = max(cfg.mean_seq_len - cfg.min_seq_len, 1e-9)
    lengths = cfg.min_seq_len + rng.geometric(1.0 / (1.0 + extra), size=num_users) - 1
    total = int(lengths.sum())
    starts = np.zeros(total, dtype=bool)
    starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    user = np.repeat(np.arange(num_users), lengths)
    pos = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)

    # cluster walk: jump at sequence starts and with prob 1 - stickiness; forward-fill otherwise
    mass = np.bincount(truth.item_cluster, weights=truth.item_weight, minlength=cfg.num_clusters)
    jump = starts | (rng.random(total) >= cfg.stickiness)
    drawn = rng.choice(cfg.num_clusters, size=total, p=mass / mass.sum())
    last_jump = np.maximum.accumulate(np.where(jump, np.arange(total), 0))
    clusters = drawn[last_jump]

    # item within cluster by popularity: one global CDF, cluster c occupying [c, c+1)
    order = np.lexsort((-truth.item_weight, truth.item_cluster))
    w = truth.item_weight[order]
    c = truth.item_cluster[order]
    cum = np.cumsum(w)
    cluster_start = np.searchsorted(c, np.arange(cfg.num_clusters))
    base = np.concatenate([[0.0], cum])[cluster_start]
    cdf = c + (cum - base[c]) / mass[c]
    u = clusters + rng.random(total) * (1 - 1e-12)
    idx = np.minimum(np.searchsorted(cdf, u, side="right"), len(order) - 1)
    return user, order[idx], pos


def write_synthetic(cfg: SyntheticConfig, out_dir: Path) -> RawSource:
    """Generate the logs into ``out_dir`` (Parquet shards) and return them as a raw source."""
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = make_truth(cfg)
    users_per_shard = max(1, int(cfg.shard_rows / cfg.mean_seq_len))
    files: list[Path] = []
    first_user = 0
    shard = 0
    while first_user < cfg.num_users:
        n = min(users_per_shard, cfg.num_users - first_user)
        rng = np.random.default_rng([cfg.seed, shard])
        user, item, pos = sample_sequences(cfg, truth, n, rng)
        path = out_dir / f"interactions-{shard:05d}.parquet"
        pq.write_table(
            pa.table({"user_id": pa.array(user + first_user, pa.int64()), "item_id": pa.array(item, pa.int64()),
                      "position": pa.array(pos, pa.int64())}),
            path,
        )
        files.append(path)
        first_user += n
        shard += 1
    log.info("synthetic: %d users in %d shards under %s", cfg.num_users, len(files), out_dir)
    return RawSource(interactions=[str(f) for f in files], items=synthetic_items(cfg, truth), files=files,
                     info={"format": "synthetic"})
