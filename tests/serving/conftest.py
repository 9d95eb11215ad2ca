"""A tiny run every serving test reads: configs/tiny.yaml's synthetic data written by hand (no Ray Data),
then the real align, tokenize (RQ-KMeans over z) and ranker (MBA + bi-directional attention) stages.

Built once per session (~5 s); tests copy it when they write to it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_run import write_prepare_and_embed

from sidforge.platform.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]

TINY = ("align.hidden=32", "align.epochs=3", "align.batch_size=128", "tokenize.source=align",
        "ranker.content=align", "ranker.epochs=2", "ranker.id_dim=16", "ranker.mba_dim=8", "ranker.mba_hidden=16",
        "ranker.attn_hidden=16", "ranker.mlp=[32]", "ranker.batch_size=256",
        "serve.candidates=40", "serve.top_k=10", "serve.max_history=50", "serve.max_candidates=120",
        "serve.max_items=8", "serve.max_body_kb=64", "serve.request_timeout_s=20")


def tiny_config(run_dir: Path, *overrides: str) -> Config:
    return load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *TINY, *overrides])


def build_tiny_run(run_dir: Path) -> Config:
    """A complete tiny run under ``run_dir``: prepare + embed by hand, then align, tokenize and ranker."""
    import torch

    from sidforge.stages import align, ranker, tokenize

    cfg = tiny_config(run_dir)
    run = write_prepare_and_embed(cfg, coclicks=True, normalize=True)
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
