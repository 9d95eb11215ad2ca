"""``sidforge tune``: Ray Tune sweeps over any config field, trials that run the pipeline's own stages.

A trial is a Tune function trainable that

1. builds its config from the experiment YAML, the command-line overrides and the sampled values
   (:func:`~sidforge.tuning.spaces.apply_params`: the values reach the stages unchanged, no text round
   trip), and writes it to ``trials/<trial_id>/config.yaml``;
2. gets its own run directory ``trials/<trial_id>/run``, seeded with hard links to the base run's stage
   outputs, so every stage whose config and inputs the trial does not change is skipped by the stage
   cache (a co-click ``window`` trial re-runs prepare and align, a temperature trial only align);
3. runs the space's stages in order; the last one's per-epoch report reaches Tune through
   :func:`~sidforge.platform.training.epoch_reporting` (in-process training, or ``TuneReportCallback``
   when that stage trains on ``num_workers > 0`` Ray Train workers), so ASHA can stop it early;
4. reports, once more at the end, the stage's best validation value and the ``extra_metrics``.

Selection looks only at validation keys; a trial's test figures are never read. After the sweep the
best config is written as ``best.yaml`` (runs directly with ``sidforge``), re-run once into
``best-run/`` and only then is its test split read (``best.json``). Outputs under
``RUN/tune-<space>/``: ``results.csv`` (every trial: status, params, metric, iterations, error),
``best.yaml``, ``best.json``, ``metric_vs_params.png`` and, when the space asks, ``pareto.png``.

An interrupted sweep (Ctrl-C, a killed driver) continues with ``--resume`` (``Tuner.restore``:
finished trials are kept, unfinished ones restart and their stages resume from their own epoch
checkpoints). A trial that raises is recorded as ``ERROR`` with its message; the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sidforge.pipeline import STAGES as PIPELINE_STAGES
from sidforge.pipeline import StageFn, stage_workers
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config, ConfigError, dump_config
from sidforge.tuning.spaces import SearchSpace, apply_params

log = logging.getLogger(__name__)

EXPERIMENT = "sweep"

# the stages a trial can run: the pipeline's own (register_stage adds more)
STAGES: dict[str, StageFn] = dict(PIPELINE_STAGES)


def register_stage(name: str, fn: StageFn) -> None:
    """Make ``fn`` runnable as stage ``name`` in a space (used by tests for fast fake stages).

    Trials run in other processes: the functions travel with the sweep (pickled), so ``fn`` must be
    picklable there (a module-level function of an installed module, or registered with
    ``cloudpickle.register_pickle_by_value``).
    """
    from sidforge.tuning.spaces import STAGE_NAMES

    STAGES[name] = fn
    STAGE_NAMES.add(name)


# ----------------------------------------------------------------------------------------------
# one trial


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its sampled values (sent once with ``tune.with_parameters``)."""

    space: SearchSpace
    config_path: str | None
    overrides: tuple[str, ...]
    sweep_dir: str
    base_run: str
    data_dir: str | None
    stages: dict[str, StageFn]


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested stage metrics → ``{"valid/auc": 0.8, ...}`` (numbers only)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def seed_run_dir(base: Path, target: Path) -> None:
    """A trial's run directory: hard links to the base run's stage outputs, a real copy of the manifest.

    Stages replace their folder as a whole (write, then rename), so a linked file is never rewritten
    in place; the manifest is rewritten by every stage and must not be shared.
    """
    if (target / "manifest.json").is_file() or not base.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.mkdir(parents=True, exist_ok=True)
    for entry in base.iterdir():
        if entry.name.startswith(("_", ".", "tune-")) or not entry.is_dir():
            continue
        try:
            shutil.copytree(entry, target / entry.name, copy_function=os.link, dirs_exist_ok=True)
        except OSError:  # another filesystem: fall back to copies
            shutil.copytree(entry, target / entry.name, dirs_exist_ok=True)
    if (base / "manifest.json").is_file():
        shutil.copy2(base / "manifest.json", target / "manifest.json")


def run_trial(params: dict[str, Any], ctx: SweepContext) -> None:
    """The Tune function trainable (see the module doc)."""
    import torch
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sidforge.platform.training import epoch_reporting

    space = ctx.space
    trial_id = tune.get_context().get_trial_id()
    root = Path(ctx.sweep_dir) / "trials" / trial_id
    cfg = apply_params(ctx.config_path, list(ctx.overrides), params)
    cfg = dataclasses.replace(cfg, run_dir=str(root / "run"))
    seed_run_dir(Path(ctx.base_run), Path(cfg.run_dir))
    (root / "config.yaml").write_text(dump_config(cfg))
    torch.set_num_threads(max(1, int(space.trial_cpus)))
    run = RunDir(cfg.run_dir)
    data_dir = Path(ctx.data_dir) if ctx.data_dir else None
    earlier: dict[str, float] = {}
    for stage in space.stages[:-1]:
        earlier.update(flatten(ctx.stages[stage](cfg, run, data_dir).metrics))
    # extras an earlier stage already knows (the tokenizer's ID length) go with every report, so a trial
    # that ASHA stops early still has them in the table
    known = {k: earlier[k] for k in space.extra_metrics if k in earlier}
    best: list[float] = []

    def forward(row: dict[str, Any]) -> None:
        if space.metric in row and row[space.metric] is not None:
            best.append(float(row[space.metric]))
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tune.report({**known, **numbers})

    distributed = stage_workers(cfg, space.stage) > 0
    with epoch_reporting(forward, callbacks=[TuneReportCallback()] if distributed else ()):
        result = ctx.stages[space.stage](cfg, run, data_dir)
    final = flatten(result.metrics)
    value = final.get(space.metric)
    if value is None and best:
        value = max(best) if space.mode == "max" else min(best)
    if value is None or not math.isfinite(value):
        raise RuntimeError(f"stage {space.stage} reported no {space.metric!r}; check the space's metric "
                           f"(it reported: {sorted(final)[:12]})")
    extras = {**known, **{k: final[k] for k in space.extra_metrics if k in final}}
    tune.report({space.metric: value, **extras, "final": 1})


# ----------------------------------------------------------------------------------------------
# the sweep


def default_point(space: SearchSpace, base: Config) -> dict[str, Any] | None:
    """The base config's value of every swept field, or None when one lies outside the space."""
    point: dict[str, Any] = {}
    for param in space.params:
        node: Any = base
        for part in param.path.split("."):
            node = getattr(node, part)
        inside = (node in param.args if param.kind in ("choice", "grid")
                  else param.args[0] <= node < param.args[1] if param.kind == "randint"
                  else param.args[0] <= node <= param.args[1])
        if not inside:
            return None
        point[param.path] = node
    return point


@dataclass
class SweepResult:
    """Where a sweep's outputs are and what it found."""

    out_dir: Path
    table: Any  # pandas.DataFrame, one row per trial
    best_params: dict[str, Any] | None
    best_value: float | None
    best_config: Path | None
    test: dict[str, float]


def run_sweep(cfg_path: str | None, overrides: list[str], space: SearchSpace, *, data_dir: Path | None = None,
              resume: bool = False, fresh: bool = False, evaluate: bool = True,
              num_samples: int | None = None) -> SweepResult:
    """Run (or resume) the sweep of ``space`` over the config at ``cfg_path``; see the module doc.

    Args:
        cfg_path: the experiment YAML; ``overrides`` are applied to it for every trial.
        space: the validated search space.
        data_dir: benchmark data (for a prepare stage).
        resume: continue an interrupted sweep of the same space in the same run directory.
        fresh: delete an earlier sweep of this space first.
        evaluate: re-run the best config once and report its test split.
        num_samples: override the space's ``num_samples``.

    Raises:
        ConfigError: when an earlier sweep exists and neither ``resume`` nor ``fresh`` is given.
    """
    from ray import tune

    from sidforge.platform.config import load_config

    # Trials run in Ray worker processes whose working directory is their trial folder: absolute paths only.
    cfg_path = str(Path(cfg_path).resolve()) if cfg_path else None
    base = load_config(cfg_path, overrides)
    out = Path(base.run_dir).resolve() / f"tune-{space.name}"
    overrides = [*overrides, f"run_dir={out.parent}"]
    exp = out / EXPERIMENT
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    ctx = SweepContext(space=space, config_path=cfg_path, overrides=tuple(overrides), sweep_dir=str(out),
                       base_run=str(Path(base.run_dir).resolve()), data_dir=str(data_dir) if data_dir else None,
                       stages={name: STAGES[name] for name in space.stages})
    trainable = _trainable(ctx, base)
    if exp.exists() and tune.Tuner.can_restore(str(exp)):
        if not resume:
            raise ConfigError(f"{exp} holds an earlier sweep of space {space.name!r}; pass --resume to continue "
                              "it or --fresh to start over")
        log.info("tune %s: resuming %s", space.name, exp)
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        out.mkdir(parents=True, exist_ok=True)
        tuner = tune.Tuner(trainable, param_space=space.tune_space(),
                           tune_config=_tune_config(space, base, num_samples),
                           run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=0,
                                                     failure_config=tune.FailureConfig(max_failures=0),
                                                     callbacks=_callbacks(space)))
    grid = tuner.fit()
    table = results_table(grid, space)
    table.to_csv(out / "results.csv", index=False)
    plot_params(table, space, out / "metric_vs_params.png")
    if space.pareto:
        plot_pareto(table, space, out / "pareto.png")
    ok = table[table["status"] == "TERMINATED"].dropna(subset=[space.metric])
    if ok.empty:
        log.warning("tune %s: no trial finished; see %s", space.name, out / "results.csv")
        return SweepResult(out, table, None, None, None, {})
    best_row = ok.loc[ok[space.metric].idxmax() if space.mode == "max" else ok[space.metric].idxmin()]
    best_params = {p.path: _plain(best_row[p.path]) for p in space.params}
    best_cfg = apply_params(cfg_path, overrides, best_params)
    best_cfg = dataclasses.replace(best_cfg, run_dir=str(out / "best-run"))
    best_yaml = out / "best.yaml"
    best_yaml.write_text(f"# sidforge tune --space {space.name}: best of {len(table)} trials on {space.metric} "
                         f"({space.mode}) = {best_row[space.metric]:.6g}, trial {best_row['trial_id']}\n"
                         f"# sidforge train {space.stage} --config {best_yaml}\n" + dump_config(best_cfg))
    test = _evaluate_best(best_cfg, space, ctx) if evaluate else {}
    (out / "best.json").write_text(json.dumps({"space": space.name, "metric": space.metric, "mode": space.mode,
                                               "trial_id": best_row["trial_id"], "valid": float(best_row[space.metric]),
                                               "params": best_params, "test": test, "trials": len(table),
                                               "failed": int((table["status"] == "ERROR").sum())}, indent=2))
    return SweepResult(out, table, best_params, float(best_row[space.metric]), best_yaml, test)


def _trainable(ctx: SweepContext, base: Config) -> Any:
    from ray import tune

    resources = {"train_driver": 1} if stage_workers(base, ctx.space.stage) > 0 else {"cpu": ctx.space.trial_cpus}
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)


def _tune_config(space: SearchSpace, base: Config, num_samples: int | None) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if space.scheduler.type == "asha":
        max_t = space.scheduler.max_t or int(getattr(getattr(base, space.stage, None), "epochs", 0) or 100)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t + 1,  # +1: the final report
                                  grace_period=space.scheduler.grace_period,
                                  reduction_factor=space.scheduler.reduction_factor)
    search_alg = None
    if space.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # The config's own values are the first trial, so "does the sweep beat the default" is in the table.
        default = default_point(space, base)
        search_alg = ConcurrencyLimiter(OptunaSearch(seed=base.seed, points_to_evaluate=[default] if default else None),
                                        max_concurrent=space.max_concurrent)
    samples = 1 if space.search == "grid" else (num_samples or space.num_samples)
    return tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=samples, scheduler=scheduler,
                           search_alg=search_alg, max_concurrent_trials=space.max_concurrent)


def _callbacks(space: SearchSpace) -> list[Any]:
    # The JSON and CSV loggers are what ResultGrid reads metrics back from; the quiet environment
    # (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS, which also drops TensorBoard) turns the automatic ones off.
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback(), _progress_callback(space)]


def _progress_callback(space: SearchSpace) -> Any:
    """One log line per finished or failed trial (Tune's own status table is off)."""
    from ray.tune import Callback

    class _Progress(Callback):
        def __init__(self) -> None:
            self.done = 0

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            value = (trial.last_result or {}).get(space.metric)
            log.info("tune %s: trial %s done (%d finished): %s=%s %s", space.name, trial.trial_id, self.done,
                     space.metric, value, {p.path: trial.config.get(p.path) for p in space.params})

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            log.warning("tune %s: trial %s failed (recorded, the sweep goes on): %s", space.name,
                        trial.trial_id, trial.error_file)

    return _Progress()


def _error_line(error: BaseException | None) -> str:
    """The exception's own last line (``RuntimeError: ...``), not Ray's task wrapper header."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def results_table(grid: Any, space: SearchSpace) -> Any:
    """One row per trial: id, status, sampled params, best validation value over its reports, extras."""
    import pandas as pd

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        df = result.metrics_dataframe
        value = np.nan
        if df is not None and space.metric in df:
            series = df[space.metric].dropna()
            if len(series):
                value = float(series.max() if space.mode == "max" else series.min())
        row = {"trial_id": metrics.get("trial_id") or Path(result.path).name,
               "status": "ERROR" if result.error else "TERMINATED", space.metric: value,
               "iterations": metrics.get("training_iteration", 0),
               "error": _error_line(result.error)}
        for p in space.params:
            row[p.path] = result.config.get(p.path)
        for key in space.extra_metrics:
            value = metrics.get(key, np.nan)
            if (value is None or value != value) and df is not None and key in df:  # NaN: look back
                seen = df[key].dropna()
                value = float(seen.iloc[-1]) if len(seen) else np.nan
            row[key] = value
        rows.append(row)
    return pd.DataFrame(rows)


def _evaluate_best(cfg: Config, space: SearchSpace, ctx: SweepContext) -> dict[str, float]:
    """Run the best config once in ``best-run/`` and read its test split (the only time it is read)."""
    seed_run_dir(Path(ctx.base_run), Path(cfg.run_dir))
    run = RunDir(cfg.run_dir)
    data_dir = Path(ctx.data_dir) if ctx.data_dir else None
    result = None
    for stage in space.stages:
        result = ctx.stages[stage](cfg, run, data_dir)
    assert result is not None
    flat = flatten(result.metrics)
    return {k: v for k, v in flat.items() if k.startswith(("test", "i2i_after", "i2i_before"))}


# ----------------------------------------------------------------------------------------------
# plots


def plot_params(table: Any, space: SearchSpace, path: Path) -> None:
    """The selection metric against each swept parameter (one panel each; failed trials left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ok = table[table["status"] == "TERMINATED"].dropna(subset=[space.metric])
    full = ok["iterations"] >= ok["iterations"].max() if len(ok) else ok["iterations"].astype(bool)
    params = [p for p in space.params if not (p.kind in ("choice", "grid") and len(p.args) == 1)]  # constants
    n = max(len(params), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, param in zip(axes.flat, params):
        values = ok[param.path].tolist()
        y = ok[space.metric].to_numpy(dtype=float)
        if param.kind in ("choice", "grid") and not all(isinstance(v, (int, float)) for v in param.args):
            labels = [str(a) for a in param.args]
            x = np.array([labels.index(str(v)) for v in values], dtype=float)
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        else:
            x = np.asarray(values, dtype=float)
            if param.log_scale:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        mask = full.to_numpy()
        ax.scatter(x[mask], y[mask], s=22, color="tab:blue", alpha=0.85, label="ran its full budget")
        ax.scatter(x[~mask], y[~mask], s=22, facecolors="none", edgecolors="tab:gray", label="stopped by ASHA")
        if len(y):
            i = int(np.argmax(y) if space.mode == "max" else np.argmin(y))
            ax.scatter([x[i]], [y[i]], s=70, facecolors="none", edgecolors="tab:red", label="best")
        ax.tick_params(labelsize=7)
        ax.set_xlabel(param.path, fontsize=8)
        ax.set_ylabel(space.metric, fontsize=8)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    fig.suptitle(f"{space.name}: {space.metric} per trial ({len(ok)} finished of {len(table)}; a stopped "
                 "trial shows its best value before the stop)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(x: np.ndarray, y: np.ndarray, maximize_y: bool = True) -> np.ndarray:
    """Indices of the points no other point beats on both lower ``x`` and better ``y``, by increasing x."""
    order = np.lexsort((-y if maximize_y else y, x))
    front, best = [], -np.inf
    for i in order:
        score = y[i] if maximize_y else -y[i]
        if score > best:
            front.append(i)
            best = score
    return np.asarray(front, dtype=int)


def plot_pareto(table: Any, space: SearchSpace, path: Path) -> None:
    """Quality (the selection metric) against ``pareto.x`` (e.g. the average ID length), front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert space.pareto is not None
    xkey = space.pareto["x"]
    ok = table[table["status"] == "TERMINATED"].dropna(subset=[space.metric, xkey]) if xkey in table else table[:0]
    x, y = ok[xkey].to_numpy(dtype=float) if len(ok) else np.zeros(0), ok[space.metric].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter(x, y, s=24, color="tab:blue", alpha=0.8, label="trials")
    if len(x):
        front = pareto_front(x, y, maximize_y=space.mode == "max")
        ax.plot(x[front], y[front], "-o", color="tab:red", ms=4, label="Pareto front")
    ax.set_xlabel(space.pareto.get("x_label", xkey), fontsize=9)
    ax.set_ylabel(space.metric, fontsize=9)
    ax.legend(fontsize=8)
    ax.set_title(f"{space.name}: {space.metric} vs {xkey}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
