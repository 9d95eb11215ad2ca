"""A tiny run every serving test reads: configs/tiny.yaml's synthetic data written by hand (no Ray Data),
then the real align, tokenize (RQ-KMeans over z) and ranker (MBA + bi-directional attention) stages.

Built once per session (~5 s); tests copy it when they write to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config, load_config
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

REPO = Path(__file__).resolve().parents[2]

TINY = ("align.hidden=32", "align.epochs=3", "align.batch_size=128", "tokenize.source=align",
        "ranker.content=align", "ranker.epochs=2", "ranker.id_dim=16", "ranker.mba_dim=8", "ranker.mba_hidden=16",
        "ranker.attn_hidden=16", "ranker.mlp=[32]", "ranker.batch_size=256",
        "serve.candidates=40", "serve.top_k=10", "serve.max_history=50", "serve.max_candidates=120",
        "serve.max_items=8", "serve.max_body_kb=64", "serve.request_timeout_s=20")


def tiny_config(run_dir: Path, *overrides: str) -> Config:
    return load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *TINY, *overrides])


def write_run(cfg: Config) -> RunDir:
    """``prepare`` (interactions, item stats, co-clicks) and ``embed`` outputs from the synthetic generator."""
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
    cc = cfg.prepare.coclick
    a, b, c = coclick_counts(ub.user[train], ub.item[train], cc.window)
    pairs = finalize_coclicks(a, b, c, counts, min_count=cc.min_count, pop_alpha=cc.pop_alpha,
                              max_per_item=cc.max_per_item, holdout_fraction=cc.holdout_fraction, seed=cfg.seed)
    pq.write_table(pa.table(pairs, schema=COCLICKS), prep / "cocliks.parquet")
    feats = np.stack(synthetic_items(s, truth).column("feat_content").to_numpy(zero_copy_only=False))
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)  # embed.normalize
    run.stage_dir("embed").mkdir()
    pq.write_table(ItemEmbeddings(np.arange(s.num_items), {"content": feats.astype(np.float32)}).to_table(),
                   run.stage_dir("embed") / "item_embeddings.parquet")
    return run


def build_tiny_run(run_dir: Path) -> Config:
    """A complete tiny run under ``run_dir``: prepare + embed by hand, then align, tokenize and ranker."""
    import torch

    from sidforge.stages import align, ranker, tokenize

    cfg = tiny_config(run_dir)
    run = write_run(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        align.run(cfg, run)
        tokenize.run(cfg, run)
        ranker.run(cfg, run, run.stage_dir(cfg.tokenize.output_name))
    finally:
        torch.set_num_threads(threads)
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Config:
    """The tiny run's config (its ``run_dir`` holds every stage the server reads)."""
    return build_tiny_run(tmp_path_factory.mktemp("serving") / "run")
