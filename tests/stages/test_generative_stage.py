"""The generative retrieval stage on a hand-built tiny run (planted clusters, RQ-KMeans IDs): examples and
protocol, training through the runner far above random, outputs, skip, `sidforge evaluate`, the CLI, and one
slow 2-worker Ray Train run."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny_run import write_prepare_and_embed

from sidforge import cli
from sidforge.models.generative import TIGER, TIGERConfig
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config, ConfigError, load_config
from sidforge.platform.schemas import DataError
from sidforge.stages import generative, tokenize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
TOKENIZE = ["tokenize.method=rqkmeans", "tokenize.levels=2", "tokenize.codebook_size=16"]
FAST = ["generative.epochs=3", "generative.eval_users=100", "generative.eval_batch_size=200",
        "generative.batch_size=64"]


# ----------------------------------------------------------------------------------------------
# examples (no Ray)


def test_train_examples_slide_a_window_over_each_users_train_items():
    P = 9
    user = np.array([0, 0, 0, 0, 1, 1, 2])
    item = np.array([1, 2, 3, 4, 5, 6, 7])
    hist, target, users = generative.train_examples(user, item, max_history=2, pad=P)
    assert hist.tolist() == [[P, 1], [1, 2], [2, 3], [P, 5]]  # never crosses users; user 2 has no example
    assert target.tolist() == [2, 3, 4, 6] and users.tolist() == [0, 0, 0, 1]


def test_user_buckets_are_stable_and_in_range():
    u = np.arange(1000)
    b = generative.user_buckets(u, 7)
    assert b.min() >= 0 and b.max() < 7 and np.array_equal(b, generative.user_buckets(u, 7))
    assert len(np.unique(b)) == 7


def test_generative_config_is_validated(tiny_config):
    with pytest.raises(ConfigError, match="generative.top_k"):
        tiny_config("generative.top_k=3")
    with pytest.raises(ConfigError, match="generative.heads"):
        tiny_config("generative.heads=0")
    assert tiny_config("generative.user_tokens=50").generative.user_tokens == 50


# ----------------------------------------------------------------------------------------------
# a hand-built run: prepare's tables from the synthetic generator, then the tokenize stage


def _write_run(cfg: Config) -> RunDir:
    """``prepare`` and ``embed`` outputs written directly, then RQ-KMeans IDs."""
    run = write_prepare_and_embed(cfg)
    tokenize.run(cfg, run)
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One hand-built tiny run; each test copies it."""
    tmp = tmp_path_factory.mktemp("tiny-generative")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={tmp / 'run'}", *TOKENIZE])
    return _write_run(cfg).path


def _copy(built: Path, cfg: Config) -> RunDir:
    import shutil

    shutil.copytree(built, cfg.run_dir)
    return RunDir(cfg.run_dir)


def test_data_follow_the_leave_one_out_protocol(built):
    run = RunDir(built)
    data = generative.load_data(run.stage_dir("prepare"), run.stage_dir("tokenize-rqkmeans"), max_history=20)
    n = data.num_items
    assert data.codes.shape == (n, 3) and data.level_sizes[:2] == (16, 16)  # 2 levels + collision digit
    assert len(np.unique(data.codes, axis=0)) == n
    stats = pq.read_table(run.stage_dir("prepare") / "item_stats.parquet").to_pandas()
    cold = stats["item_id"][stats["cold_holdout"]].to_numpy()
    assert len(cold) > 0
    # cold items are never in a training history or target, yet they have IDs (so they can be generated)
    assert not np.isin(data.train_target, cold).any() and not np.isin(data.train_hist, cold).any()
    assert (data.codes[cold] >= 0).all()
    # one valid and one test case per user, the user's train (+ valid) items as history
    assert len(np.unique(data.valid_user)) == len(data.valid_user) == len(data.test_user)
    assert data.valid_hist.shape[1] == data.test_hist.shape[1] == 20
    inter = pq.read_table(run.stage_dir("prepare") / "interactions").to_pandas()
    u = int(data.test_user[3])
    rows = inter[inter.user_id == u].sort_values("position")
    assert data.test_target[3] == rows[rows.split == "test"].item_id.item()
    seen = rows[rows.split.isin(["train", "valid"])].item_id.to_numpy()[-20:]
    assert data.test_hist[3][data.test_hist[3] != n].tolist() == seen.tolist()


def test_missing_ids_are_a_clear_error(built, tmp_path):
    sids = tmp_path / "tokenize-partial"
    sids.mkdir()
    table = pq.read_table(RunDir(built).stage_dir("tokenize-rqkmeans") / "sids.parquet")
    pq.write_table(table.slice(0, 100), sids / "sids.parquet")
    with pytest.raises(DataError, match="exactly one ID"):
        generative.load_sid_codes(sids, table.num_rows)


# ----------------------------------------------------------------------------------------------
# the stage


def test_stage_trains_in_process_far_above_random_and_writes_its_outputs(built, tiny_config):
    cfg = tiny_config(*TOKENIZE, *FAST)
    run = _copy(built, cfg)
    sids = run.stage_dir("tokenize-rqkmeans")
    res = generative.run(cfg, run, sids)

    assert res.out_dir == run.stage_dir("generative-rqkmeans")
    random_recall = 10 / res.rows["items"]
    metrics = json.loads((res.out_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [0, 1, 2]
    assert all("valid/ndcg@10" in row and "loss" in row for row in metrics["history"])
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]
    assert metrics["valid"]["recall@10"] > 5 * random_recall, metrics["valid"]
    assert metrics["test"]["recall@10"] > 5 * random_recall, metrics["test"]
    test = metrics["test"]
    for k in (5, 10, 20, 50):  # top_k=50: every cut-off is reported, and recall grows with K
        assert f"recall@{k}" in test and f"ndcg@{k}" in test
    assert test["recall@5"] <= test["recall@10"] <= test["recall@20"] <= test["recall@50"] <= 1
    buckets = [b for b in ("head", "torso", "tail", "cold") if f"count/{b}" in test]
    assert {"head", "tail", "cold"} <= set(buckets)
    assert sum(test[f"count/{b}"] for b in buckets) == test["count"] == res.rows["test_cases"]

    model, meta = generative.load_model(res.out_dir)
    assert isinstance(model, TIGER) and meta["sids"] == "tokenize-rqkmeans" and meta["top_k"] == 50
    assert model.config == TIGERConfig(**meta["config"])
    entry = run.read_manifest().stages["generative-rqkmeans"]
    assert entry.metrics["best_epoch"] == metrics["best_epoch"] and entry.rows == res.rows
    assert not (run.path / "_train").exists()  # checkpoints are removed once the outputs are written

    # the saved model re-scores to the same test metrics
    again = generative.evaluate_saved(res.out_dir)
    assert again["recall@10"] == pytest.approx(test["recall@10"])
    assert again["ndcg@50"] == pytest.approx(test["ndcg@50"])

    skipped = generative.run(cfg, run, sids)
    assert skipped.skipped and skipped.metrics == res.metrics
    changed = generative.stage_config_hash(tiny_config(*TOKENIZE, *FAST, "generative.lr=0.01"))
    assert not run.is_current("generative-rqkmeans", changed, entry.inputs)
    same = generative.stage_config_hash(tiny_config(*TOKENIZE, *FAST, "generative.eval_batch_size=7"))
    assert same == entry.config_hash
    assert generative.stage_config_hash(tiny_config(*TOKENIZE, *FAST, "generative.warmup_steps=5")) == same
    assert generative.stage_config_hash(tiny_config(*TOKENIZE, *FAST, "generative.lr_schedule=inverse_sqrt")) != same


def test_inverse_sqrt_schedule_is_tigers_and_reaches_the_optimiser(monkeypatch):
    lr = generative.learning_rate
    assert [lr(0.01, "inverse_sqrt", 100, s) for s in (1, 100)] == [0.01, 0.01]  # constant phase
    assert lr(0.01, "inverse_sqrt", 100, 400) == pytest.approx(0.005)  # sqrt(100 / 400) = 1/2
    assert lr(0.01, "inverse_sqrt", 100, 10_000) == pytest.approx(0.001)
    assert lr(0.01, "constant", 100, 10_000) == 0.01
    with pytest.raises(ValueError, match="unknown lr schedule 'cosine'"):
        lr(0.01, "cosine", 100, 1)

    # train_epoch sets the rate of step epoch * batches + i + 1 before every optimiser step
    seen: list[float] = []
    monkeypatch.setattr(generative, "_length_batches", lambda *a, **k: [np.arange(2)] * 3)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, hist, target, user):
            return type("Out", (), {"loss": (self.w**2).sum()})()

    step = Step()
    opt = torch.optim.SGD(step.parameters(), lr=1.0)
    original = opt.step
    opt.step = lambda: (seen.append(opt.param_groups[0]["lr"]), original())[1]  # type: ignore[method-assign]
    data = type("D", (), {"train_target": np.zeros(6, np.int64), "train_hist": np.zeros((6, 2), np.int64),
                          "train_user": np.zeros(6, np.int64), "num_items": 9})()
    tables = type("T", (), {"inputs": lambda self, h, u: (h, u), "target": torch.zeros(10, 1)})()
    ctx = type("C", (), {"shard": lambda self, n, seed: np.arange(n)})()
    config = {"seed": 0, "batch_size": 2, "lr": 0.01, "lr_schedule": "inverse_sqrt", "warmup_steps": 4}
    generative.train_epoch(ctx, step, opt, tables, data, config, epoch=2)  # steps 7, 8, 9
    assert seen == pytest.approx([0.01 * (4 / s) ** 0.5 for s in (7, 8, 9)])


def test_cli_trains_then_evaluates(built, tiny_config, capsys):
    cfg = tiny_config(*TOKENIZE)
    run = _copy(built, cfg)
    overrides = [*TOKENIZE, "generative.epochs=1", "generative.user_tokens=16", "generative.eval_users=50",
                 "generative.top_k=20"]
    common = ["-c", str(REPO / "configs" / "tiny.yaml"), "--run-dir", str(run.path),
              *(a for o in overrides for a in ("--set", o))]
    assert cli.main(["train", "generative", *common]) == 0  # --sids defaults to the config's tokenize output
    out = capsys.readouterr().out
    assert "train generative: trained" in out and "generative-rqkmeans" in out and "test/cold" in out
    model_dir = run.stage_dir("generative-rqkmeans")
    assert generative.load_model(model_dir)[0].config.user_tokens == 16

    assert cli.main(["evaluate", "--model", str(model_dir), "--beam-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "recall@20" in out and "recall@50" not in out and "test/head" in out  # top_k=20: no @50

    assert cli.main(["train", "generative", *common, "--sids", str(run.path / "nowhere")]) == 2
    assert "sids.parquet" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_train_and_score_every_case_once(built, ray_cluster, tiny_config, tmp_path, caplog):
    """Real Ray Train workers (not the in-process mode): 2 DDP workers share training and beam search."""
    base = tiny_config(*TOKENIZE, *FAST)
    cfg = dataclasses.replace(base, generative=dataclasses.replace(base.generative, num_workers=2))
    run = _copy(built, cfg)
    with caplog.at_level(logging.INFO, logger="sidforge.platform.training"):
        res = generative.run(cfg, run, run.stage_dir("tokenize-rqkmeans"))
    assert "training on 2 workers" in caplog.text
    assert res.metrics["valid"]["count"] == res.rows["valid_cases"]  # every case scored once across the ranks
    assert res.metrics["test"]["count"] == res.rows["test_cases"]
    assert res.metrics["test"]["recall@10"] > 5 * 10 / res.rows["items"], res.metrics["test"]
