"""A tiny run's ``prepare`` and ``embed`` outputs written straight from the synthetic generator (no Ray),
for the stage and serving tests that need a run directory to start from."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config
from sidforge.platform.logs import (
    SPLIT_NAMES,
    TRAIN,
    choose_cold_items,
    coclick_counts,
    finalize_coclicks,
    order_and_split,
)
from sidforge.platform.metrics import popularity_buckets
from sidforge.platform.schemas import COCLICKS, INTERACTIONS, ITEM_STATS
from sidforge.platform.synthetic import make_truth, sample_sequences, synthetic_items
from sidforge.stages.embed import ItemEmbeddings


def write_prepare_and_embed(cfg: Config, coclicks: bool = False, normalize: bool = False) -> RunDir:
    """``RUN/prepare`` (interactions, item_stats; ``cocliks.parquet`` with ``coclicks``) and ``RUN/embed``
    (the synthetic content features, unit-length with ``normalize``, as ``embed.normalize`` makes them)."""
    run = RunDir(cfg.run_dir)
    s = cfg.synthetic
    truth = make_truth(s)
    user, item, pos = sample_sequences(s, truth, s.num_users, np.random.default_rng(s.seed))
    cold = choose_cold_items(s.num_items, cfg.prepare.cold_item_fraction, cfg.seed)
    ub = order_and_split(user, item, pos, cfg.prepare.min_seq_len, cold)
    prep = run.stage_dir("prepare")
    (prep / "interactions").mkdir(parents=True)
    pq.write_table(pa.table({"user_id": ub.user, "item_id": ub.item, "position": ub.position,
                             "split": SPLIT_NAMES[ub.split].tolist()}, schema=INTERACTIONS),
                   prep / "interactions" / "part-0.parquet")
    train = ub.split == TRAIN
    counts = np.bincount(ub.item[train], minlength=s.num_items)
    pq.write_table(pa.table({"item_id": np.arange(s.num_items), "train_count": counts,
                             "bucket": popularity_buckets(counts), "cold_holdout": cold}, schema=ITEM_STATS),
                   prep / "item_stats.parquet")
    if coclicks:
        cc = cfg.prepare.coclick
        a, b, c = coclick_counts(ub.user[train], ub.item[train], cc.window)
        pairs = finalize_coclicks(a, b, c, counts, min_count=cc.min_count, pop_alpha=cc.pop_alpha,
                                  max_per_item=cc.max_per_item, holdout_fraction=cc.holdout_fraction, seed=cfg.seed)
        pq.write_table(pa.table(pairs, schema=COCLICKS), prep / "cocliks.parquet")
    feats = np.stack(synthetic_items(s, truth).column("feat_content").to_numpy(zero_copy_only=False))
    if normalize:
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    run.stage_dir("embed").mkdir()
    pq.write_table(ItemEmbeddings(np.arange(s.num_items), {"content": feats.astype(np.float32)}).to_table(),
                   run.stage_dir("embed") / "item_embeddings.parquet")
    return run
