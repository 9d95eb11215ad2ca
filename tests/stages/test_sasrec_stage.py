"""The SASRec stage: sequences and protocol, training through the runner on configs/tiny.yaml,
outputs, skip/resume, and one slow test where a 1-worker and a 2-worker Ray Train run both learn."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from sidforge.models.sasrec import SASRec, SASRecConfig, sample_unseen_negatives
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config, ConfigError, load_config
from sidforge.stages import prepare, sasrec

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# sequences (no Ray)


def _table(rows: list[tuple[int, int, int, str]]) -> pa.Table:
    u, i, p, s = zip(*rows)
    return pa.table({"user_id": np.array(u, dtype=np.int64), "item_id": np.array(i, dtype=np.int64),
                     "position": np.array(p, dtype=np.int64), "split": list(s)})


def test_sequences_follow_the_leave_one_out_protocol():
    P = 9  # pad id = num_items
    rows = [  # rows deliberately out of order
        (0, 5, 3, "valid"), (0, 1, 0, "train"), (0, 2, 1, "train"), (0, 3, 2, "train"), (0, 6, 4, "test"),
        (1, 4, 0, "train"), (1, 8, 1, "heldout"), (1, 7, 2, "train"), (1, 2, 3, "valid"), (1, 0, 4, "test"),
        (2, 8, 0, "heldout"), (2, 1, 1, "valid"), (2, 4, 2, "test"),
    ]
    data = sasrec.build_sequences(_table(rows), np.array(["head"] * 8 + ["cold"]), max_len=2)

    assert data.num_items == P
    # training: the last max_len + 1 train items; a target after every real input
    assert data.train_inputs.tolist() == [[1, 2], [P, 4]]
    assert data.train_targets.tolist() == [[2, 3], [P, 7]]
    # valid: train prefix (heldout interactions of cold items never enter a history)
    assert data.valid_hist.tolist() == [[2, 3], [4, 7], [P, P]]
    assert data.valid_target.tolist() == [5, 2, 1]
    # test: train + valid prefix, truncated to the most recent max_len
    assert data.test_hist.tolist() == [[3, 5], [7, 2], [P, 1]]
    assert data.test_target.tolist() == [6, 0, 4]
    assert data.valid_user.tolist() == data.test_user.tolist() == [0, 1, 2]  # the user of each case

    # holding out each user's last train item: it leaves training (user 1 keeps no target) but stays in
    # the valid and test inputs, so the valid input, like the test input, ends with an untrained item
    held = sasrec.build_sequences(_table(rows), np.array(["head"] * 8 + ["cold"]), max_len=2,
                                  hold_out_last_train=True)
    assert held.train_inputs.tolist() == [[P, 1]] and held.train_targets.tolist() == [[P, 2]]
    for name in ("valid_hist", "valid_target", "test_hist", "test_target", "valid_user", "test_user"):
        assert np.array_equal(getattr(held, name), getattr(data, name)), name

    # the refit's sequences run up to the test item: the valid item becomes the last training target
    # (user 2, with a valid item only, still has no target); the evaluation arrays stay as they were
    refit = sasrec.build_sequences(_table(rows), np.array(["head"] * 8 + ["cold"]), max_len=2, include_valid=True)
    assert refit.train_inputs.tolist() == [[2, 3], [4, 7]] and refit.train_targets.tolist() == [[3, 5], [7, 2]]
    for name in ("valid_hist", "valid_target", "test_hist", "test_target", "valid_user", "test_user"):
        assert np.array_equal(getattr(refit, name), getattr(data, name)), name


class _OneProcess:
    """The slice of WorkerContext that ``sasrec.evaluate`` uses, for one process."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def shard(self, n: int, seed: int | None = None, even: bool = True) -> np.ndarray:
        return np.arange(n)

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]


def test_excluding_history_only_removes_history_items():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=30, max_len=5, hidden=8, num_layers=1, num_heads=1, ffn_hidden=16))
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 30, size=(40, 5))
    hist[:5, :2] = 30  # some left padding
    target = rng.integers(0, 30, size=40)
    target[0] = hist[0, -1]  # a repeat: the target stays a candidate even though it is in the history
    keep = sasrec.evaluate(_OneProcess(), model, hist, target, exclude_history=False)
    drop = sasrec.evaluate(_OneProcess(), model, hist, target, exclude_history=True)
    # without a worker context (a saved model, outside training) every case is scored here, the same way
    assert np.array_equal(sasrec.case_ranks(None, model, hist, target, True),
                          sasrec.case_ranks(_OneProcess(), model, hist, target, True))
    assert keep["count"] == drop["count"] == 40
    for k in (5, 10, 20):
        assert drop[f"recall@{k}"] >= keep[f"recall@{k}"]
    assert drop["recall@10"] > keep["recall@10"] or drop["ndcg@10"] > keep["ndcg@10"]


def test_sasrec_config_is_validated(tiny_config):
    with pytest.raises(ConfigError, match="sasrec.hidden"):
        tiny_config("sasrec.hidden=30", "sasrec.heads=4")
    with pytest.raises(ConfigError, match="sasrec.loss"):
        tiny_config("sasrec.loss=bpr")
    assert tiny_config("sasrec.seed=7").sasrec.seed == 7


# ----------------------------------------------------------------------------------------------
# the stage on configs/tiny.yaml


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory) -> Path:
    """One prepare run of configs/tiny.yaml; each test copies its outputs into its own run dir."""
    tmp = tmp_path_factory.mktemp("tiny-sasrec")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={tmp / 'run'}"])
    return prepare.run(cfg, RunDir(cfg.run_dir), tmp).out_dir


def _run_dir(prepared: Path, cfg: Any) -> RunDir:
    run = RunDir(cfg.run_dir)
    shutil.copytree(prepared, run.stage_dir("prepare"))
    return run


@pytest.mark.ray
def test_stage_trains_in_process_far_above_random_and_writes_its_outputs(prepared, tiny_config):
    cfg = tiny_config("sasrec.epochs=4")
    run = _run_dir(prepared, cfg)
    res = sasrec.run(cfg, run)

    num_items = res.rows["items"]
    random_recall = 10 / num_items
    metrics = json.loads((res.out_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == list(range(4))
    assert all("valid/ndcg@10" in row and "loss" in row for row in metrics["history"])
    assert metrics["valid"]["recall@10"] > 5 * random_recall, metrics["valid"]
    assert metrics["test"]["recall@10"] > 5 * random_recall, metrics["test"]
    # the other candidate protocol (history items excluded) is reported beside, over the same cases
    assert metrics["test_history_excluded"]["count"] == metrics["test"]["count"]
    best = max(metrics["history"], key=lambda row: row["valid/ndcg@10"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["valid"]["ndcg@10"] == pytest.approx(best["valid/ndcg@10"])  # the best epoch was scored
    # test metrics per popularity bucket of the target; counts add up
    buckets = [b for b in ("head", "torso", "tail", "cold") if f"count/{b}" in metrics["test"]]
    assert {"head", "tail"} <= set(buckets)
    assert sum(metrics["test"][f"count/{b}"] for b in buckets) == metrics["test"]["count"] == res.rows["test_cases"]

    emb = pq.read_table(res.out_dir / "item_embeddings.parquet")
    assert emb.schema == sasrec.ITEM_EMBEDDINGS
    assert emb.column("item_id").to_pylist() == list(range(num_items))
    vectors = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    assert vectors.shape == (num_items, cfg.sasrec.hidden) and vectors.dtype == np.float32
    np.testing.assert_allclose(emb.column("norm").to_numpy(), np.linalg.norm(vectors, axis=1), rtol=1e-5)
    saved = torch.load(res.out_dir / "model.pt", weights_only=False)
    model = SASRec(SASRecConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    np.testing.assert_allclose(model.item_embeddings().detach().numpy(), vectors)

    # per-case ranks: they give back the reported metrics exactly, and pair runs user by user
    ranks = sasrec.read_case_ranks(res.out_dir)
    data = sasrec.load_sequences(run.stage_dir("prepare"), cfg.sasrec.max_len)
    for split, users, targets in (("valid", data.valid_user, data.valid_target),
                                  ("test", data.test_user, data.test_target)):
        part = ranks.filter(pc.equal(ranks["split"], split))
        assert part["user_id"].to_numpy().tolist() == users.tolist()
        assert part["item_id"].to_numpy().tolist() == targets.tolist()
        again_metrics = sasrec.metrics_from_ranks(part["rank"].to_numpy(), groups=data.bucket[targets])
        assert again_metrics == pytest.approx(metrics[split])
    same = sasrec.compare_case_ranks([res.out_dir], [res.out_dir], ["ndcg@10"], n_boot=100)
    assert [(r["split"], r["diff"], r["low"], r["high"]) for r in same] == [("valid", 0, 0, 0), ("test", 0, 0, 0)]

    entry = run.read_manifest().stages["sasrec"]
    assert entry.metrics["best_epoch"] == metrics["best_epoch"] and entry.rows == res.rows
    assert not (run.path / "_train").exists()  # checkpoints are removed once the outputs are written

    again = sasrec.run(cfg, run)
    assert again.skipped and again.metrics == res.metrics
    assert not run.is_current("sasrec", sasrec.stage_config_hash(tiny_config("sasrec.lr=0.01")), entry.inputs)
    assert sasrec.stage_config_hash(tiny_config("sasrec.epochs=4", "sasrec.max_failures=3")) == entry.config_hash


def test_the_negative_sampler_counts_in_the_hash_only_where_it_changes_training(tiny_config):
    ce, bce = tiny_config("sasrec.loss=ce"), tiny_config("sasrec.loss=bce")
    assert sasrec.stage_config_hash(tiny_config("sasrec.loss=ce", "sasrec.negatives=unseen")) == \
        sasrec.stage_config_hash(ce)
    assert sasrec.stage_config_hash(tiny_config("sasrec.loss=bce", "sasrec.negatives=any")) == \
        sasrec.stage_config_hash(bce)
    assert sasrec.stage_config_hash(tiny_config("sasrec.loss=bce", "sasrec.negatives=unseen")) != \
        sasrec.stage_config_hash(bce)
    with pytest.raises(ConfigError, match="sasrec.negatives"):
        tiny_config("sasrec.negatives=popular")


def test_the_block_layout_counts_in_the_hash_only_when_post(tiny_config):
    plain = sasrec.stage_config_hash(tiny_config())
    assert sasrec.stage_config_hash(tiny_config("sasrec.norm=pre")) == plain
    assert sasrec.stage_config_hash(tiny_config("sasrec.norm=post")) != plain
    catalogue = SimpleNamespace(num_items=5)
    assert sasrec.loop_config(tiny_config("sasrec.norm=post"), catalogue)["model"]["norm"] == "post"
    with pytest.raises(ConfigError, match="sasrec.norm"):
        tiny_config("sasrec.norm=sandwich")


class _ScaleProbe(torch.nn.Module):
    """A training step whose loss is 1 * p: after backward, p.grad is the weight the batch got."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.p, self.pad, self.weights, self.positions = torch.nn.Parameter(torch.zeros(())), pad, [], []

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, negatives: Any = None) -> Any:
        self.positions.append(int((targets != self.pad).sum()))
        return SimpleNamespace(loss=self.p + 1.0)


class _Record(torch.optim.Optimizer):
    def __init__(self, probe: _ScaleProbe) -> None:
        super().__init__([probe.p], {})
        self.probe = probe

    def step(self, closure: Any = None) -> None:
        self.probe.weights.append(float(self.probe.p.grad))


@pytest.mark.parametrize("average", ["batch", "epoch"])
def test_loss_average_weighs_every_batch_or_every_target_position_the_same(average):
    P, rng = 50, np.random.default_rng(0)
    lengths = np.r_[np.full(64, 2), np.full(64, 12)]  # short and long histories, bucketed apart
    inputs = np.full((128, 12), P)
    for row, n in enumerate(lengths):
        inputs[row, -n:] = rng.integers(0, P, n)
    data = SimpleNamespace(train_inputs=inputs, train_targets=inputs.copy(), num_items=P)
    probe = _ScaleProbe(P)
    config = {"batch_size": 16, "seed": 0, "unseen_negatives": False, "loss_average": average}
    sasrec._train_epoch(_OneProcess(), probe, _Record(probe), data, config, epoch=0)

    weights, positions = np.array(probe.weights), np.array(probe.positions)
    assert len(weights) == 8 and set(positions) == {2 * 16, 12 * 16}  # the buckets did separate the lengths
    if average == "batch":
        np.testing.assert_allclose(weights, 1.0)
    else:  # weight per target position is the same everywhere; the epoch's total weight is unchanged
        np.testing.assert_allclose(weights / positions, weights[0] / positions[0])
        assert weights.sum() == pytest.approx(len(weights))


def test_holding_out_the_last_train_item_counts_in_the_hash_only_when_on(tiny_config):
    plain = sasrec.stage_config_hash(tiny_config())
    assert sasrec.stage_config_hash(tiny_config("sasrec.hold_out_last_train=false")) == plain
    assert sasrec.stage_config_hash(tiny_config("sasrec.hold_out_last_train=true")) != plain


@pytest.mark.ray
def test_the_stage_trains_without_the_held_out_items_when_asked(prepared, tiny_config, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def capture(fn, config, *args, **kwargs):
        seen["targets"] = int((config["data"].train_targets != config["data"].num_items).sum())
        raise Stop

    monkeypatch.setattr(sasrec, "fit", capture)
    counts = {}
    run = _run_dir(prepared, tiny_config())
    for flag in ("false", "true"):
        cfg = tiny_config(f"sasrec.hold_out_last_train={flag}")
        with pytest.raises(Stop):
            sasrec.run(cfg, run)
        counts[flag] = seen["targets"]
    data = sasrec.load_sequences(prepared, cfg.sasrec.max_len)
    # one target fewer per user with a training sequence (a user left with one item has no target)
    assert 0 < counts["false"] - counts["true"] <= len(data.train_inputs)


def test_the_refit_budget_counts_in_the_hash_only_when_set_and_replaces_the_selection_settings(tiny_config):
    plain = sasrec.stage_config_hash(tiny_config())
    assert sasrec.stage_config_hash(tiny_config("sasrec.refit_epochs=0")) == plain
    refit = sasrec.stage_config_hash(tiny_config("sasrec.refit_epochs=3"))
    assert refit != plain != sasrec.stage_config_hash(tiny_config("sasrec.refit_epochs=4"))
    # a fixed budget: the selection run's epoch cap and patience do not reach the refit's outputs
    assert sasrec.stage_config_hash(tiny_config("sasrec.refit_epochs=3", "sasrec.patience=2",
                                                "sasrec.epochs=50")) == refit
    with pytest.raises(ConfigError, match="sasrec.refit_epochs"):
        tiny_config("sasrec.refit_epochs=-1")
    with pytest.raises(ConfigError, match="hold_out_last_train"):
        tiny_config("sasrec.refit_epochs=3", "sasrec.hold_out_last_train=true")


@pytest.mark.ray
def test_refit_overrides_give_best_epoch_plus_one_epochs_beside_the_selection_stage(tiny_config):
    selected = SimpleNamespace(metrics={"best_epoch": 6})  # epochs are counted from 0
    for name, folder in ((None, "sasrec-refit"), ("rw-bbq", "sasrec-rw-bbq-refit")):
        cfg = tiny_config(*([f"sasrec.name={name}"] if name else []))
        refit = tiny_config(*([f"sasrec.name={name}"] if name else []), *sasrec.refit_overrides(cfg, selected))
        assert refit.sasrec.refit_epochs == 7 and refit.sasrec.output_name == folder
        assert cfg.sasrec.output_name != folder  # never the selection run's own folder


def test_a_refit_trains_on_the_valid_items_for_its_budget_and_scores_test_only(prepared, tiny_config):
    cfg = tiny_config("sasrec.epochs=3", "sasrec.patience=1")
    run = _run_dir(prepared, cfg)
    selected = sasrec.run(cfg, run)
    refit = sasrec.run(tiny_config("sasrec.refit_epochs=2", "sasrec.name=ce-refit"), run)
    m = json.loads((refit.out_dir / "metrics.json").read_text())
    assert len(m["history"]) == 2 and m["best_epoch"] == 1  # the budget, all of it, no early stop
    assert not any(k.startswith("valid/") for row in m["history"] for k in row)  # valid was trained on
    assert "valid" not in refit.metrics and refit.metrics["test"]["ndcg@10"] > 0.05  # random: about 0.01
    assert refit.rows["valid_cases"] == 0
    ranks = sasrec.read_case_ranks(refit.out_dir)
    assert set(ranks["split"].to_pylist()) == {"test"}
    assert ranks["user_id"].to_pylist() == pq.read_table(selected.out_dir / "ranks.parquet").filter(
        pc.equal(pc.field("split"), "test"))["user_id"].to_pylist()
    # the model saved is the one that scored test (the last epoch of the refit)
    saved = torch.load(refit.out_dir / "model.pt", weights_only=True)
    model = SASRec(SASRecConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    data = sasrec.load_sequences(run.stage_dir("prepare"), cfg.sasrec.max_len)
    again = sasrec.case_ranks(None, model, data.test_hist, data.test_target, cfg.sasrec.exclude_history)
    assert again.tolist() == ranks["rank"].to_pylist()
    # refits compare on test alone
    rows = sasrec.compare_case_ranks([refit.out_dir], [refit.out_dir], n_boot=100)
    assert {r["split"] for r in rows} == {"test"} and all(r["diff"] == 0 for r in rows)
    rows = sasrec.compare_case_ranks([selected.out_dir], [refit.out_dir], ["ndcg@10"], n_boot=100)
    assert [r["split"] for r in rows] == ["test"]
    assert rows[0]["other"] == pytest.approx(refit.metrics["test"]["ndcg@10"])
    assert rows[0]["base"] == pytest.approx(selected.metrics["test"]["ndcg@10"])


def test_loss_average_counts_in_the_hash_only_when_epoch(tiny_config):
    plain = sasrec.stage_config_hash(tiny_config())
    assert sasrec.stage_config_hash(tiny_config("sasrec.loss_average=batch")) == plain
    assert sasrec.stage_config_hash(tiny_config("sasrec.loss_average=epoch")) != plain
    with pytest.raises(ConfigError, match="sasrec.loss_average"):
        tiny_config("sasrec.loss_average=user")


@pytest.mark.ray
def test_unseen_negatives_never_sample_the_users_own_items(prepared, tiny_config, monkeypatch):
    cfg = tiny_config("sasrec.epochs=2", "sasrec.loss=bce", "sasrec.negatives=unseen")
    calls = []

    def spy(targets, seen, num_items, *args, **kwargs):
        negatives = sample_unseen_negatives(targets, seen, num_items, *args, **kwargs)
        calls.append(bool((negatives.unsqueeze(-1) == seen.unsqueeze(1)).any()))  # a draw among its row's items
        return negatives

    monkeypatch.setattr(sasrec, "sample_unseen_negatives", spy)
    res = sasrec.run(cfg, _run_dir(prepared, cfg))
    assert calls and not any(calls)  # every batch drew its negatives outside the users' sequences
    assert res.metrics["test"]["recall@10"] > 5 * 10 / res.rows["items"]


@pytest.mark.ray
def test_an_interrupted_stage_resumes_its_training_run(prepared, tiny_config, monkeypatch, caplog):
    cfg = tiny_config("sasrec.epochs=3", "sasrec.loss=bce")
    run = _run_dir(prepared, cfg)

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sasrec, "_write_outputs", disk_full)
    with pytest.raises(OSError, match="disk full"):
        sasrec.run(cfg, run)
    assert not run.stage_dir("sasrec").exists() and "sasrec" not in run.read_manifest().stages
    kept = list((run.path / "_train").glob("sasrec-*/epoch_0002"))
    assert len(kept) == 1  # the training run's last checkpoint survived the failure

    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="sidforge.platform.training"):
        res = sasrec.run(cfg, run)
    assert "resuming after epoch 2" in caplog.text
    history = json.loads((res.out_dir / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [0, 1, 2]  # resumed at the end: nothing retrained
    assert res.metrics["valid"]["recall@10"] > 5 * 10 / res.rows["items"]


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_match_one_worker(prepared, tiny_config, tmp_path, caplog):
    """Real Ray Train workers both times (not the in-process mode): 1 worker vs 2 DDP workers."""
    base = tiny_config("sasrec.epochs=4")

    def on(workers: int) -> Config:
        return dataclasses.replace(base, run_dir=str(tmp_path / f"{workers}w"),
                                   sasrec=dataclasses.replace(base.sasrec, num_workers=workers))

    one, two = on(1), on(2)
    with caplog.at_level(logging.INFO, logger="sidforge.platform.training"):
        res_one = sasrec.run(one, _run_dir(prepared, one))
        res_two = sasrec.run(two, _run_dir(prepared, two))
    assert "training on 1 workers" in caplog.text and "training on 2 workers" in caplog.text

    random_recall = 10 / res_one.rows["items"]
    v1, v2 = res_one.metrics["valid"], res_two.metrics["valid"]
    for res, v in ((res_one, v1), (res_two, v2)):
        assert v["recall@10"] > 5 * random_recall, v  # both trained, far above random
        assert v["count"] == res.rows["valid_cases"]  # every valid case scored exactly once across the ranks
    assert abs(v1["ndcg@10"] - v2["ndcg@10"]) < 0.08, (v1["ndcg@10"], v2["ndcg@10"])
    assert abs(v1["recall@10"] - v2["recall@10"]) < 0.08, (v1["recall@10"], v2["recall@10"])
    # the ranks gathered from the two workers cover every case once, in case order
    ranks = sasrec.read_case_ranks(res_two.out_dir)
    assert ranks.select(["split", "user_id", "item_id"]).equals(
        sasrec.read_case_ranks(res_one.out_dir).select(["split", "user_id", "item_id"]))
    valid_two = ranks.filter(pc.equal(ranks["split"], "valid"))["rank"].to_numpy()
    assert sasrec.metrics_from_ranks(valid_two)["ndcg@10"] == pytest.approx(v2["ndcg@10"])
