"""Ray Tune sweeps: spaces are validated against the config, a trial's values reach the stage unchanged,
a crashed trial is recorded without stopping the sweep, ASHA stops weak trials, an interrupted sweep
resumes. The trials run a fast fake stage that trains through the shared runner in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray import cloudpickle as ray_cloudpickle

from sidforge.platform.artifacts import RunDir, StageResult
from sidforge.platform.config import Config, ConfigError, load_config
from sidforge.tuning import sweep
from sidforge.tuning.spaces import load_space

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trials run in Ray worker processes


def fake_stage(cfg: Config, run: RunDir, data_dir: Path | None) -> StageResult:
    """Trains nothing: 'valid/score' per epoch rises towards a value set by two config fields."""
    from sidforge.platform.training import RunSettings, ScalingSettings, fit

    run.path.mkdir(parents=True, exist_ok=True)
    seen = {"temperature": cfg.align.temperature, "lr": cfg.align.lr, "hidden": cfg.align.hidden}
    with open(run.path / "calls.jsonl", "a") as f:
        f.write(json.dumps(seen) + "\n")
    if cfg.align.hidden == 13:
        raise RuntimeError("planted failure: align.hidden=13")
    target = -abs(np.log(cfg.align.temperature / 0.1)) + cfg.align.hidden / 1000

    def train_fn(ctx, config):  # noqa: ANN001
        for epoch in ctx.epochs(config["epochs"]):
            time.sleep(config["sleep"])
            ctx.report(epoch, {"valid/score": config["target"] * (1 - 0.5 ** (epoch + 1))}, lambda: {})
        return {}

    res = fit(train_fn, {"epochs": cfg.align.epochs, "target": target, "sleep": float(os.environ.get("FAKE_SLEEP", 0))},
              ScalingSettings(0), RunSettings(name="fake", storage_path=run.path / "_train", monitor="valid/score"))
    best = res.best["valid/score"]
    return StageResult(run.path, False, {}, {"valid": {"score": best}, "test": {"score": best - 0.01}}, 0.0)


sweep.register_stage("fake", fake_stage)


def _space(tmp_path: Path, **fields) -> Path:
    raw = {"name": "fake", "stages": ["fake"], "metric": "valid/score", "mode": "max", "search": "grid",
           "max_concurrent": 2, "trial_cpus": 0.5, "scheduler": {"type": "none"},
           "params": {"align.temperature": {"choice": [0.05, 0.1]}, "align.hidden": {"choice": [13, 64]}}}
    raw.update(fields)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------------------------
# spaces (no Ray)


def test_shipped_spaces_load_against_their_configs():
    for path in sorted((REPO / "spaces").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# sidforge tune --config "), f"{path.name} must begin with its command"
        config = first.split("--config ")[1].split()[0]
        space = load_space(path, REPO / config)
        assert space.params and space.metric


@pytest.mark.parametrize("params, match", [
    ({"align.temprature": {"uniform": [0.1, 0.2]}}, "no such config field"),
    ({"align.temperature": {"loguniform": [0.0, 0.2]}}, "loguniform needs low > 0"),
    ({"align.temperature": {"uniform": [0.0, 0.2]}}, "rejected by the config"),  # temperature must be > 0
    ({"ranker.neg_ratio": {"choice": [0, 4]}}, "rejected by the config"),
    ({"align.hidden": {"uniform": [16, 64]}}, "integer"),
    ({"align.lr": {"normal": [0.1, 0.2]}}, "unknown distribution"),
])
def test_bad_spaces_are_refused_naming_the_parameter(tmp_path, params, match):
    with pytest.raises(ConfigError, match=match):
        load_space(_space(tmp_path, params=params, search="random"), TINY)


def test_typed_values_reach_the_config_unchanged():
    values = {"align.lr": 1.2345678901234e-05, "align.hidden": 77, "prepare.coclick.window": 4}
    cfg = sweep.apply_params(TINY, ["seed=3"], values)
    assert (cfg.align.lr, cfg.align.hidden, cfg.prepare.coclick.window, cfg.seed) == (1.2345678901234e-05, 77, 4, 3)


def test_pareto_front_keeps_only_undominated_points():
    x = np.array([1, 2, 2, 3, 4], dtype=float)
    y = np.array([0.5, 0.4, 0.7, 0.6, 0.9])
    assert sweep.pareto_front(x, y).tolist() == [0, 2, 4]


# ----------------------------------------------------------------------------------------------
# sweeps on the shared Ray cluster


@pytest.mark.ray
def test_sweep_records_every_trial_with_its_values_and_survives_a_crash(ray_cluster, tmp_path):
    space = load_space(_space(tmp_path), TINY)
    overrides = [f"run_dir={tmp_path / 'run'}", "align.epochs=3"]
    res = sweep.run_sweep(str(TINY), overrides, space)

    table = res.table
    assert len(table) == 4
    failed = table[table["status"] == "ERROR"]
    assert sorted(failed["align.hidden"]) == [13, 13] and all("align.hidden=13" in e for e in failed["error"])
    ok = table[table["status"] == "TERMINATED"]
    assert len(ok) == 2 and ok["valid/score"].notna().all()
    for row in table.to_dict("records"):
        trial = res.out_dir / "trials" / row["trial_id"]
        written = load_config(trial / "config.yaml")
        assert (written.align.temperature, written.align.hidden) == (row["align.temperature"], row["align.hidden"])
        assert written.align.epochs == 3  # the command-line override reached every trial too
        calls = [json.loads(line) for line in (trial / "run" / "calls.jsonl").read_text().splitlines()]
        # the stage ran once and saw exactly the sampled values (and the YAML's value for the rest)
        assert calls == [{"temperature": row["align.temperature"], "lr": load_config(TINY).align.lr,
                          "hidden": row["align.hidden"]}]
    # the best finished trial: temperature 0.1 (target peaks there), hidden 64
    assert res.best_params == {"align.temperature": 0.1, "align.hidden": 64}
    best = load_config(res.best_config)
    assert best.align.temperature == 0.1 and best.align.hidden == 64
    summary = json.loads((res.out_dir / "best.json").read_text())
    assert summary["failed"] == 2 and summary["test"] == {"test/score": pytest.approx(summary["valid"] - 0.01)}
    assert (res.out_dir / "results.csv").is_file() and (res.out_dir / "metric_vs_params.png").stat().st_size > 5000

    with pytest.raises(ConfigError, match="--resume"):  # an earlier sweep is never silently overwritten
        sweep.run_sweep(str(TINY), overrides, space)


@pytest.mark.ray
def test_asha_stops_weak_trials_early(ray_cluster, tmp_path):
    space = load_space(_space(tmp_path, params={"align.temperature": {"choice": [0.1, 0.5, 2.0, 8.0]}},
                              max_concurrent=1, scheduler={"type": "asha", "grace_period": 1,
                                                           "reduction_factor": 2}), TINY)
    res = sweep.run_sweep(str(TINY), [f"run_dir={tmp_path / 'run'}", "align.epochs=6"], space, evaluate=False)
    iters = dict(zip(res.table["align.temperature"], res.table["iterations"]))
    assert iters[0.1] == 7  # 6 epochs + the final report: never stopped
    assert min(iters.values()) < 7  # at least one weaker trial was cut short
    assert res.best_params == {"align.temperature": 0.1}


RESUME_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import test_sweep  # registers the fake stage
    from sidforge.platform.runtime import init_ray
    from sidforge.tuning.spaces import load_space
    from sidforge.tuning.sweep import run_sweep
    init_ray(num_cpus=2, extra_resources={{"train_driver": 2}})
    space = load_space({space!r}, {config!r})
    res = run_sweep({config!r}, [{override!r}, "align.epochs=3"], space, resume="--resume" in sys.argv, evaluate=False)
    print("TRIALS", len(res.table), (res.table["status"] == "TERMINATED").sum())
""")


@pytest.mark.ray
@pytest.mark.slow
def test_an_interrupted_sweep_resumes(tmp_path):
    space = _space(tmp_path, params={"align.temperature": {"choice": [0.05, 0.1, 0.2, 0.4]}}, max_concurrent=1)
    script = tmp_path / "sweep_script.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(REPO / "tests" / "tuning"), space=str(space), config=str(TINY),
                                           override=f"run_dir={tmp_path / 'run'}"))
    env = {**os.environ, "FAKE_SLEEP": "1.0", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    trials = tmp_path / "run" / "tune-fake" / "trials"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(trials.glob("*/run/calls.jsonl"))) < 2:
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGINT)  # Tune saves the experiment state and stops
    proc.wait(timeout=120)
    started = len(list(trials.glob("*/run/calls.jsonl")))
    assert 2 <= started < 4

    done = subprocess.run([sys.executable, str(script), "--resume"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert "TRIALS 4 4" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    # a trial that had finished before the interruption was not run again
    calls = [len(p.read_text().splitlines()) for p in trials.glob("*/run/calls.jsonl")]
    assert len(calls) == 4 and calls.count(1) >= 1
