"""The shared Ray Train runner: per-epoch reports and checkpoints, early stopping, resume after a
restart and after a failure. In-process (``num_workers=0``) except one slow 1-worker test in which a
Ray Train worker process really dies."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sidforge.platform.training import (
    RunSettings,
    ScalingSettings,
    WorkerContext,
    fit,
    load_state,
    shard_indices,
)

IN_PROCESS = ScalingSettings(num_workers=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_train_fn(ctx: WorkerContext, config: dict[str, Any]) -> dict[str, Any]:
    """Linear regression; metrics may be scripted per epoch; can fail once at a given epoch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    state = ctx.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
    step = ctx.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if state is not None:
        opt.load_state_dict(state["opt"])
    steps = state["steps"] if state is not None else 0
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5])
    scripted = config.get("scores")
    for epoch in ctx.epochs(config["epochs"]):
        _maybe_fail(config, epoch)
        loss = ((step(x).squeeze(-1) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        metrics: dict[str, Any] = {"loss": loss.detach()}
        if scripted is not None and scripted[epoch] is not None:
            metrics["score"] = scripted[epoch]
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "steps": steps}
        ctx.report(epoch, metrics, lambda state=state: state)
    return {"start_epoch": ctx.start_epoch, "steps": steps, "world_size": ctx.world_size}


def _maybe_fail(config: dict[str, Any], epoch: int) -> None:
    """Fail at ``fail_at`` on the first attempt only (a marker file remembers the attempt)."""
    if epoch != config.get("fail_at") or Path(config["marker"]).exists():
        return
    Path(config["marker"]).write_text("failed once")
    if config.get("hard_exit"):
        time.sleep(2.0)  # let the controller collect the earlier epochs' reports first
        os._exit(1)  # the worker process dies, as on an OOM kill
    raise RuntimeError("injected failure")


def _run(tmp_path: Path, name: str = "toy", **kwargs: Any) -> RunSettings:
    return RunSettings(name=name, storage_path=tmp_path / "train", **kwargs)


def _epochs(history: list[dict[str, Any]]) -> list[int]:
    return [row["epoch"] for row in history]


# ----------------------------------------------------------------------------------------------
# in-process


def test_in_process_fit_reports_every_epoch_and_checkpoints(tmp_path):
    run = _run(tmp_path, checkpoints_to_keep=2)
    result = fit(toy_train_fn, {"epochs": 6}, IN_PROCESS, run)

    assert _epochs(result.history) == list(range(6))
    losses = [row["loss"] for row in result.history]
    assert all(isinstance(v, float) for v in losses) and losses[-1] < losses[0] / 2
    assert result.value == {"start_epoch": 0, "steps": 6, "world_size": 1}
    # without a monitor the best checkpoint is the latest; retention keeps at most 2
    assert result.best_epoch == 5 and result.best == result.history[-1] and not result.stopped_early
    assert result.latest_checkpoint == result.best_checkpoint == run.path / "epoch_0005"
    assert sorted(p.name for p in run.path.glob("epoch_*")) == ["epoch_0004", "epoch_0005"]
    assert load_state(result.latest_checkpoint)["steps"] == 6
    progress = json.loads((result.latest_checkpoint / "progress.json").read_text())
    assert _epochs(progress["history"]) == list(range(6))


@pytest.mark.parametrize("mode", ["max", "min"])
def test_early_stopping_stops_at_the_right_epoch(tmp_path, mode):
    # None = an epoch without evaluation: it neither improves nor uses up patience
    scores = [0.1, None, 0.3, None, 0.2, 0.3, None, 0.25, 0.9, 0.95]
    if mode == "min":
        scores = [None if s is None else -s for s in scores]
    run = _run(tmp_path, monitor="score", mode=mode, patience=3, checkpoints_to_keep=1)
    result = fit(toy_train_fn, {"epochs": len(scores), "scores": scores}, IN_PROCESS, run)

    # best at epoch 2; 4, 5 (a tie is no improvement) and 7 exhaust the patience of 3
    assert result.stopped_early
    assert _epochs(result.history) == list(range(8))
    assert result.best_epoch == 2 and result.best["score"] == scores[2]
    assert result.best_checkpoint == run.path / "epoch_0002"
    # the best and the latest checkpoints survive retention (num_to_keep=1)
    assert sorted(p.name for p in run.path.glob("epoch_*")) == ["epoch_0002", "epoch_0007"]


def test_restart_with_the_same_name_resumes_at_the_next_epoch(tmp_path):
    run = _run(tmp_path)
    first = fit(toy_train_fn, {"epochs": 3}, IN_PROCESS, run)
    assert first.value["start_epoch"] == 0 and first.value["steps"] == 3

    again = fit(toy_train_fn, {"epochs": 5}, IN_PROCESS, run)
    assert again.value["start_epoch"] == 3
    assert again.value["steps"] == 5  # optimiser/model state and step count carried over
    assert _epochs(again.history) == list(range(5))
    assert again.history[:3] == first.history

    fresh = fit(toy_train_fn, {"epochs": 2}, IN_PROCESS, run, fresh=True)
    assert fresh.value["start_epoch"] == 0 and _epochs(fresh.history) == [0, 1]


def test_restart_with_larger_patience_continues_after_an_early_stop(tmp_path):
    scores = [0.5, 0.4, 0.3, 0.6, 0.7]
    config = {"epochs": 5, "scores": scores}
    stopped = fit(toy_train_fn, config, IN_PROCESS, _run(tmp_path, monitor="score", patience=1))
    assert stopped.stopped_early and _epochs(stopped.history) == [0, 1]

    resumed = fit(toy_train_fn, config, IN_PROCESS, _run(tmp_path, monitor="score", patience=3))
    assert resumed.value["start_epoch"] == 2
    assert not resumed.stopped_early and resumed.best_epoch == 4


def test_in_process_failure_is_retried_from_the_latest_checkpoint(tmp_path):
    config = {"epochs": 4, "fail_at": 2, "marker": str(tmp_path / "marker")}
    result = fit(toy_train_fn, config, IN_PROCESS, _run(tmp_path, max_failures=1))

    assert Path(config["marker"]).exists()
    assert result.value["start_epoch"] == 2  # the retry resumed after epoch 1
    assert result.value["steps"] == 4
    assert _epochs(result.history) == [0, 1, 2, 3]


def test_in_process_failure_without_retries_raises(tmp_path):
    config = {"epochs": 4, "fail_at": 1, "marker": str(tmp_path / "marker")}
    with pytest.raises(RuntimeError, match="injected failure"):
        fit(toy_train_fn, config, IN_PROCESS, _run(tmp_path, max_failures=0))


# ----------------------------------------------------------------------------------------------
# pure helpers and settings


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 2), (7, 3), (2, 4)])
def test_shards_are_even_for_training_and_exact_for_evaluation(n, world):
    train = [shard_indices(n, r, world, seed=3) for r in range(world)]
    assert len({len(s) for s in train}) == 1  # DDP ranks take the same number of steps
    assert set(np.concatenate(train)) == set(range(n))
    evaluation = [shard_indices(n, r, world, even=False) for r in range(world)]
    assert sorted(np.concatenate(evaluation).tolist()) == list(range(n))  # each case exactly once


def test_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="monitor"):
        RunSettings(name="x", storage_path=tmp_path, patience=3)
    with pytest.raises(ValueError, match="name"):
        RunSettings(name="a/b", storage_path=tmp_path)
    with pytest.raises(ValueError, match="num_workers"):
        ScalingSettings(num_workers=-1)


# ----------------------------------------------------------------------------------------------
# a real worker process dies


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, tmp_path):
    from ray import cloudpickle  # Ray's vendored copy is the one that pickles the train function

    # Ray workers cannot import this test module by name: ship the train function by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        config = {"epochs": 4, "fail_at": 2, "marker": str(tmp_path / "marker"), "hard_exit": True}
        result = fit(toy_train_fn, config, ScalingSettings(num_workers=1), _run(tmp_path, max_failures=1))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    assert Path(config["marker"]).exists()  # the first attempt did die
    assert result.value["world_size"] == 1
    assert result.value["start_epoch"] >= 1  # resumed from a checkpoint, not from scratch
    assert result.value["steps"] == 4
    assert _epochs(result.history) == [0, 1, 2, 3]
    assert (result.path / "epoch_0003" / "state.pt").is_file()
