"""The ranker stage: samples and protocol, training through the runner on configs/tiny.yaml, outputs,
skip, errors, and one 2-worker Ray Train run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny_run import write_prepare_and_embed

from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config, ConfigError, load_config
from sidforge.platform.schemas import DataError
from sidforge.stages import ranker, tokenize

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# samples (no Ray)


def test_previous_items_stay_within_each_user():
    P = 99
    user = np.array([0, 0, 0, 1, 1, 2])
    item = np.array([5, 6, 7, 1, 2, 3])
    assert ranker.previous_items(user, item, 2, P).tolist() == [[P, P], [P, 5], [5, 6], [P, P], [P, 1], [P, P]]


def test_negatives_come_from_the_pool_and_never_equal_their_positive():
    rng = np.random.default_rng(0)
    pool = np.array([1, 2, 3])
    pos = np.array([1, 2, 3] * 200)
    neg = ranker.sample_negatives(rng, pos, 4, pool, None)
    assert neg.shape == (600, 4) and np.isin(neg, pool).all() and not (neg == pos[:, None]).any()
    p = ranker.sampling_probs(np.array([0, 10, 100]), "popularity", 1.0)
    np.testing.assert_allclose(p, np.array([1, 11, 101]) / 113)
    assert ranker.sampling_probs(np.array([1, 2]), "uniform", 1.0) is None


def _write_run(cfg: Config) -> RunDir:
    """``prepare`` and ``embed`` outputs written directly, then RQ-KMeans IDs."""
    run = write_prepare_and_embed(cfg)
    tokenize.run(cfg, run)
    return run


FULL = ("ranker.content=embed", "ranker.epochs=4", "ranker.id_dim=16", "ranker.mba_dim=8", "ranker.attn_hidden=16",
        "ranker.mlp=[32]", "ranker.batch_size=256")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny-ranker")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={tmp / 'run'}"])
    return _write_run(cfg).path


def _copy(built: Path, cfg: Config) -> RunDir:
    shutil.copytree(built, cfg.run_dir)
    return RunDir(cfg.run_dir)


def test_samples_follow_the_leave_one_out_protocol(built, tiny_config):
    cfg = tiny_config(*FULL, "ranker.max_len=50")
    run = RunDir(built)
    data = ranker.load_data(run, cfg.ranker, run.stage_dir("tokenize-rqkmeans"))
    inter = pq.read_table(run.stage_dir("prepare") / "interactions").to_pandas().sort_values(["user_id", "position"])
    pad = data.num_items
    seqs = {u: g for u, g in inter.groupby("user_id")}
    cold = set(np.flatnonzero(pq.read_table(run.stage_dir("prepare") / "item_stats.parquet")
                              .column("cold_holdout").to_numpy()))
    assert cold and not np.isin(data.train_hist, list(cold)).any() and not np.isin(data.train_target, list(cold)).any()
    assert not np.isin(data.pool, list(cold)).any()  # cold items are never even a training negative
    r = 1 + cfg.ranker.neg_ratio
    for imp, name, hist_splits in ((data.valid, "valid", ("train",)), (data.test, "test", ("train", "valid"))):
        assert len(imp.labels) == r * len(imp.hist)
        assert (imp.labels.reshape(-1, r)[:, 0] == 1).all() and (imp.labels.reshape(-1, r)[:, 1:] == 0).all()
        for case in (0, 7, len(imp.hist) - 1):
            u = imp.user[case * r]
            g = seqs[u]
            expect = g[g["split"].isin(hist_splits)]["item_id"].tolist()
            got = [i for i in imp.hist[case].tolist() if i != pad]
            assert got == expect[-50:]
            assert imp.item[case * r] == g[g["split"] == name]["item_id"].item()
    # evaluation negatives are fixed: another training seed sees the very same impressions
    other = ranker.load_data(run, tiny_config(*FULL, "ranker.max_len=50", "seed=5").ranker,
                             run.stage_dir("tokenize-rqkmeans"))
    assert np.array_equal(other.test.item, data.test.item)
    assert data.codes is not None and data.codes.shape[0] == data.num_items and len(data.codebook_sizes) == 2


@pytest.mark.ray
def test_stage_trains_the_full_model_far_above_random_and_writes_its_outputs(built, tiny_config):
    cfg = tiny_config(*FULL)
    run = _copy(built, cfg)
    sids = run.stage_dir("tokenize-rqkmeans")
    res = ranker.run(cfg, run, sids)

    metrics = json.loads((res.out_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == list(range(4))
    assert metrics["valid"]["auc"] > 0.7 and metrics["test"]["auc"] > 0.7, metrics["test"]
    best = max(metrics["history"], key=lambda row: row["valid/auc"])
    assert metrics["best_epoch"] == best["epoch"] and metrics["valid"]["auc"] == pytest.approx(best["valid/auc"])
    test = metrics["test"]
    groups = [g for g in ("head", "torso", "tail", "cold") if f"count/{g}" in test]
    assert {"head", "tail", "cold"} <= set(groups)
    assert sum(test[f"count/{g}"] for g in groups) == test["count"] == res.rows["test_impressions"]
    assert all(v > 0 for v in metrics["mba_codebook_mean_abs"].values())  # MBA learned something

    # the saved model reproduces the reported test AUC
    saved = torch.load(res.out_dir / "model.pt", weights_only=True)
    data = ranker.load_data(run, cfg.ranker, sids)
    model = ranker.build_model(saved["config"], data)
    model.load_state_dict(saved["state_dict"])
    probs = ranker.predict(model, data.test, np.arange(len(data.test.labels)), torch.device("cpu"))
    from sidforge.platform.metrics import auc

    assert auc(data.test.labels, probs) == pytest.approx(test["auc"], abs=1e-6)

    again = ranker.run(cfg, run, sids)
    assert again.skipped and again.metrics == res.metrics
    assert not (run.path / "_train").exists()


@pytest.mark.ray
def test_item_id_only_ranker_runs_without_content_or_ids(built, tiny_config):
    cfg = tiny_config(*FULL, "ranker.content=none", "ranker.mba=false", "ranker.attention=one_way",
                      "ranker.name=idonly")
    run = _copy(built, cfg)
    res = ranker.run(cfg, run)
    assert res.out_dir.name == "ranker-idonly"
    assert res.metrics["test"]["auc"] > 0.6
    assert res.metrics["mba_codebook_mean_abs"] == {}


def test_errors_name_what_is_missing(built, tiny_config, tmp_path):
    cfg = tiny_config(*FULL)
    run = _copy(built, cfg)
    with pytest.raises(DataError, match="--sids"):
        ranker.run(cfg, run, None)
    with pytest.raises(DataError, match="sidforge tokenize"):
        ranker.run(cfg, run, tmp_path / "nowhere")
    with pytest.raises(DataError, match="sidforge train align"):
        ranker.run(tiny_config(*FULL, "ranker.content=align"), run, run.stage_dir("tokenize-rqkmeans"))
    with pytest.raises(ConfigError, match="ranker.mba needs a content embedding"):
        tiny_config("ranker.content=none")
    with pytest.raises(ConfigError, match="ranker.neg_ratio"):
        tiny_config("ranker.neg_ratio=0")


@pytest.mark.ray
def test_two_workers_train_and_score_every_impression_once(built, ray_cluster, tiny_config):
    base = tiny_config(*FULL, "ranker.epochs=2")
    cfg = dataclasses.replace(base, ranker=dataclasses.replace(base.ranker, num_workers=2))
    run = _copy(built, cfg)
    res = ranker.run(cfg, run, run.stage_dir("tokenize-rqkmeans"))
    assert res.metrics["test"]["count"] == res.rows["test_impressions"]
    assert res.metrics["valid"]["auc"] > 0.65, res.metrics["valid"]
