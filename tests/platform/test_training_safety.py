"""Trainer checkpoints are loaded with ``weights_only=True``: the optimiser and model state the stages
save round-trips, state that could not be read back is refused when saved, and a pickle payload planted
as ``state.pt`` is refused on resume without running. In-process (``num_workers=0``), no Ray."""

from __future__ import annotations

import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sidforge.platform.schemas import DataError
from sidforge.platform.training import RunSettings, ScalingSettings, WorkerContext, fit, load_state

IN_PROCESS = ScalingSettings(num_workers=0)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol")]  # the pickle.dump payloads


class Payload:
    """Unpickling it creates ``marker``: what a malicious checkpoint would do (harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return pathlib.Path.touch, (self.marker,)


def adamw_train_fn(ctx: WorkerContext, config: dict[str, Any]) -> dict[str, Any]:
    """What the stages checkpoint: model and AdamW state dicts, plus whatever ``extra`` holds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    state = ctx.load_checkpoint()
    resumed_steps = None if state is None else int(state["opt"]["state"][0]["step"])
    if state is not None:
        model.load_state_dict(state["model"])
    step = ctx.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    if state is not None:
        opt.load_state_dict(state["opt"])
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    for epoch in ctx.epochs(config["epochs"]):
        loss = step(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.report(epoch, {"loss": loss.detach()},
                   lambda: {"model": model.state_dict(), "opt": opt.state_dict(), **config.get("extra", {})})
    return {"start_epoch": ctx.start_epoch, "resumed_steps": resumed_steps}


def _run(tmp_path: Path, **kwargs: Any) -> RunSettings:
    return RunSettings(name="safe", storage_path=tmp_path / "train", **kwargs)


def _plant(path: Path, marker: Path, how: str) -> None:
    payload = {"model": {}, "opt": Payload(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as fh:
            pickle.dump(payload, fh)


def test_model_and_optimizer_state_round_trip_with_weights_only(tmp_path):
    run = _run(tmp_path)
    extra = {"steps": 3, "note": "x", "none": None, "betas": (0.9, 0.99), "ids": [1, 2], "dtype": torch.float32}
    first = fit(adamw_train_fn, {"epochs": 2, "extra": extra}, IN_PROCESS, run)
    state = load_state(first.latest_checkpoint)
    assert {k: state[k] for k in extra} == extra
    assert int(state["opt"]["state"][0]["step"]) == 2 and isinstance(state["model"]["0.weight"], torch.Tensor)
    resumed = fit(adamw_train_fn, {"epochs": 4, "extra": extra}, IN_PROCESS, run)
    assert resumed.value["start_epoch"] == 2 and resumed.value["resumed_steps"] == 2
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2, 3]


@pytest.mark.parametrize(("extra", "key"), [
    ({"codes": np.zeros(3)}, "state['codes']"),
    ({"figures": {"best": np.float64(0.5)}}, "state['figures']['best']"),
    ({"table": [1, {"rows": object()}]}, "state['table'][1]['rows']"),
])
def test_state_that_weights_only_cannot_read_is_refused_when_saved(tmp_path, extra, key):
    with pytest.raises(TypeError, match=rf"checkpoint {re.escape(key)}: .*plain values"):
        fit(adamw_train_fn, {"epochs": 1, "extra": extra}, IN_PROCESS, _run(tmp_path))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_planted_checkpoint_payload_is_never_executed(tmp_path, how):
    run = _run(tmp_path)
    first = fit(adamw_train_fn, {"epochs": 1}, IN_PROCESS, run)
    marker = tmp_path / "payload-ran"
    _plant(first.latest_checkpoint / "state.pt", marker, how)
    with pytest.raises(DataError, match=r"epoch_0000/state\.pt: cannot be loaded.*delete the training run") as err:
        load_state(first.latest_checkpoint)
    assert str(run.path) in str(err.value) and "weights_only=False" not in str(err.value)
    with pytest.raises(DataError, match=r"state\.pt: cannot be loaded"):  # a restart resumes from it: refused
        fit(adamw_train_fn, {"epochs": 2}, IN_PROCESS, run)
    assert not marker.exists()


def test_a_damaged_or_missing_checkpoint_is_a_clear_error(tmp_path):
    first = fit(adamw_train_fn, {"epochs": 1}, IN_PROCESS, _run(tmp_path))
    state = first.latest_checkpoint / "state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(DataError, match=r"state\.pt: cannot be loaded .*re-run the stage"):
        load_state(first.latest_checkpoint)
    state.unlink()
    with pytest.raises(DataError, match=r"state\.pt not found; delete the training run"):
        load_state(first.latest_checkpoint)
