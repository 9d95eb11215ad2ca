"""``sidforge pipeline``: one command from raw logs to a model ready to serve, with a report.

A **preset** names the stages a method needs and the few config values that make it that method;
everything else comes from the experiment YAML and ``--set`` overrides:

=========  ==========================================================================================
preset     steps (each a stage of ``sidforge/stages``, wired here; stages never call each other)
=========  ==========================================================================================
savior     prepare → embed → align (SaviorEnc) → tokenize over z → ranker (MBA, bi-directional)
bbq        prepare → embed → sasrec (e_b) → tokenize bbq → sasrec reweighted by the BBQ IDs, its items
           carrying the content features of the modalities the tokenizer binds
ada-sid    prepare → embed → sasrec (e_b) → tokenize ada-sid → ranker (SID features) → generative
tiger      prepare → embed → tokenize rqvae → generative (baseline)
sasrec     prepare → sasrec (baseline)
=========  ==========================================================================================

Values are applied in this order: the YAML, the preset's values, the command line's ``--set``, and
last the step's own values (the behavior SASRec of ``bbq`` is always the plain model, whatever the
overrides say, because the tokenizer reads it from ``RUN/sasrec``).

Every stage skips itself when its config and inputs are unchanged and its outputs still match their
recorded fingerprints (a truncated or edited artifact is rebuilt, never loaded); stages write into a
temporary folder that replaces the old one only when complete, and trainers resume from their last
epoch checkpoint. So a pipeline killed at any point and run again finishes with the outputs an
uninterrupted run would have written. Each trainer evaluates its best checkpoint on the test split
as its last step; the report (``sidforge.platform.report``) gathers those figures at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidforge.platform.artifacts import RunDir, StageResult
from sidforge.platform.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

StageFn = Callable[[Config, RunDir, "Path | None"], StageResult]


# ----------------------------------------------------------------------------------------------
# the stages, each as a function of (config, run directory, data directory)


def _stage_prepare(cfg: Config, run: RunDir, data_dir: Path | None) -> StageResult:
    from sidforge.stages import prepare

    return prepare.run(cfg, run, data_dir)


def _stage_embed(cfg: Config, run: RunDir, data_dir: Path | None) -> StageResult:
    from sidforge.stages import embed

    return embed.run(cfg, run)


def _stage_sasrec(cfg: Config, run: RunDir, data_dir: Path | None) -> StageResult:
    from sidforge.stages import sasrec

    sids = run.stage_dir(cfg.tokenize.output_name) if cfg.sasrec.reweight == "sid" else None
    return sasrec.run(cfg, run, sids)


def _stage_align(cfg: Config, run: RunDir, data_dir: Path | None) -> StageResult:
    from sidforge.stages import align

    return align.run(cfg, run)


def _stage_tokenize(cfg: Config, run: RunDir, data_dir: Path | None) -> StageResult:
    from sidforge.stages import tokenize

    return tokenize.run(cfg, run, data_dir)


def _stage_ranker(cfg: Config, run: RunDir, data_dir: Path | None) -> StageResult:
    from sidforge.stages import ranker

    uses_sids = cfg.ranker.mba or cfg.ranker.sid_features
    return ranker.run(cfg, run, run.stage_dir(cfg.tokenize.output_name) if uses_sids else None)


def _stage_generative(cfg: Config, run: RunDir, data_dir: Path | None) -> StageResult:
    from sidforge.stages import generative

    return generative.run(cfg, run, run.stage_dir(cfg.tokenize.output_name))


STAGES: dict[str, StageFn] = {
    "prepare": _stage_prepare, "embed": _stage_embed, "sasrec": _stage_sasrec, "align": _stage_align,
    "tokenize": _stage_tokenize, "ranker": _stage_ranker, "generative": _stage_generative,
}


def stage_workers(cfg: Config, stage: str) -> int:
    """Ray Train workers the stage trains on (0: in-process)."""
    section = getattr(cfg, stage, None)
    if stage == "tokenize":  # the trained tokenizers' sections (rqvae, bbq, ada_sid) have num_workers
        section = getattr(cfg.tokenize, cfg.tokenize.method.replace("-", "_"), None)
    return int(getattr(section, "num_workers", 0) or 0)


# ----------------------------------------------------------------------------------------------
# presets


@dataclass(frozen=True)
class Step:
    """One pipeline step: a stage, what it is for, and values only this step sets.

    ``derived`` computes more such values from the config the step would run with otherwise (e.g. the
    modalities a tokenizer reads), applied last like ``values``.
    """

    stage: str
    role: str
    values: dict[str, Any] = field(default_factory=dict)
    derived: Callable[[Config], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Preset:
    """A method: the config values that make it that method, and its steps in order."""

    name: str
    description: str
    values: dict[str, Any]
    steps: tuple[Step, ...]


# the behavior model e_b the tokenizers read is always plain SASRec, whatever the preset sets for the downstream one
_BEHAVIOR = Step("sasrec", "behavior", {"sasrec.reweight": "none", "sasrec.name": "", "sasrec.contrastive_weight": 0.0,
                                        "sasrec.contrastive_target": "item", "sasrec.item_repr": "id",
                                        "sasrec.item_features": []})


def _bbq_items(cfg: Config) -> dict[str, Any]:
    """BBQRec's sequence model keeps the items' multimodal content beside the IDs: the tokenizer's modalities
    (``tokenize.modalities``; none named leaves the items as configured in ``sasrec.item_features``)."""
    if cfg.sasrec.item_features or not cfg.tokenize.modalities:
        return {}
    return {"sasrec.item_features": list(cfg.tokenize.modalities)}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("savior", "SaviorRec: co-click aligned z, RQ-VAE IDs over z, ranker with MBA and bi-directional attention",
           {"tokenize.source": "align", "ranker.content": "align", "ranker.mba": True,
            "ranker.attention": "bidirectional"},
           (Step("prepare", "data"), Step("embed", "content"), Step("align", "align"),
            Step("tokenize", "semantic IDs"), Step("ranker", "downstream"))),
    Preset("bbq", "BBQRec: behavior-bind IDs, SASRec over multimodal items with attention reweighted by SID "
           "similarity and the sequence-to-item loss",
           {"tokenize.method": "bbq", "tokenize.source": "embed", "sasrec.contrastive_weight": 0.1},
           (Step("prepare", "data"), Step("embed", "content"), _BEHAVIOR, Step("tokenize", "semantic IDs"),
            Step("sasrec", "downstream", {"sasrec.reweight": "sid", "sasrec.contrastive_target": "sid"},
                 derived=_bbq_items))),
    Preset("ada-sid", "ADA-SID: mixture of quantization with the sparse behavioral router; ranking and retrieval",
           {"tokenize.method": "ada-sid", "tokenize.source": "embed", "tokenize.collision": "digit",
            "ranker.sid_features": True},
           (Step("prepare", "data"), Step("embed", "content"), _BEHAVIOR, Step("tokenize", "semantic IDs"),
            Step("ranker", "downstream"), Step("generative", "downstream"))),
    Preset("tiger", "TIGER baseline: RQ-VAE IDs over the content embeddings, generative retrieval",
           {"tokenize.method": "rqvae", "tokenize.source": "embed"},
           (Step("prepare", "data"), Step("embed", "content"), Step("tokenize", "semantic IDs"),
            Step("generative", "downstream"))),
    Preset("sasrec", "SASRec baseline (the loss of sasrec.loss)",
           {}, (Step("prepare", "data"), Step("sasrec", "downstream"))),
)}


def resolve_preset(cfg: Config, preset: str | None) -> Preset:
    """The preset named on the command line, else the config's ``pipeline.preset``."""
    name = preset or cfg.pipeline.preset
    if not name:
        raise ConfigError(f"no preset: pass --preset {{{','.join(PRESETS)}}} or set pipeline.preset in the config")
    if name not in PRESETS:
        raise ConfigError(f"pipeline.preset={name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]


def step_config(config_path: str | Path | None, overrides: list[str], preset: Preset, step: Step,
                run_dir: str | None = None) -> Config:
    """The config one step runs with: YAML, then the preset's values, ``--set``, the step's values."""
    values = {**step.values, **({"run_dir": run_dir} if run_dir else {})}
    cfg = load_config(config_path, overrides, values=values, defaults=preset.values)
    if step.derived is not None and (derived := step.derived(cfg)):
        cfg = load_config(config_path, overrides, values={**values, **derived}, defaults=preset.values)
    return cfg


def stage_folder(cfg: Config, step: Step, run: RunDir) -> str:
    """The folder (and manifest entry) a step writes."""
    from sidforge.stages import generative

    if step.stage == "sasrec":
        return cfg.sasrec.output_name
    if step.stage == "tokenize":
        return cfg.tokenize.output_name
    if step.stage == "ranker":
        return cfg.ranker.output_name
    if step.stage == "generative":
        return generative.stage_name(run.stage_dir(cfg.tokenize.output_name))
    return step.stage


# ----------------------------------------------------------------------------------------------
# running


@dataclass
class StepOutcome:
    """What one step did: its folder, whether it was skipped, its wall time and headline figures."""

    stage: str
    folder: str
    role: str
    skipped: bool
    wall_time_s: float
    headline: str


def headline(stage: str, metrics: dict[str, Any], rows: dict[str, int]) -> str:
    """The one figure a user wants after each stage (the kinds are the report's)."""
    from sidforge.platform.report import stage_kind

    kind, test = stage_kind(stage, metrics), metrics.get("test") or {}
    if kind == "ranking":
        return f"test AUC {test['auc']:.4f}, GAUC {test.get('gauc', float('nan')):.4f}"
    if kind == "retrieval":
        return f"test Recall@10 {test.get('recall@10', float('nan')):.4f}, NDCG@10 {test['ndcg@10']:.4f}"
    if kind == "align":
        return f"i2i Hit@30 {metrics['i2i_before']['hit@30']:.4f} → {metrics['i2i_after']['hit@30']:.4f}"
    if kind == "tokenizer":
        return (f"collisions {metrics['collision_rate']:.2%}, min utilisation "
                f"{min(metrics.get('utilization') or [float('nan')]):.0%}")
    return ", ".join(f"{k} {v:,}" for k, v in list(rows.items())[:3])


@contextmanager
def _epoch_bar(label: str) -> Iterator[None]:
    """A progress bar over a trainer's epochs (in-process trainers; Ray Train prints its own)."""
    from tqdm.auto import tqdm

    from sidforge.platform.training import epoch_reporting

    bar = tqdm(desc=label, unit="epoch", leave=False, disable=not sys.stderr.isatty())

    def hook(row: dict[str, Any]) -> None:
        shown = {k.split("/")[-1]: f"{v:.4f}" for k, v in row.items() if k.startswith("valid/")
                 and isinstance(v, float)}
        bar.set_postfix(dict(list(shown.items())[:2]), refresh=False)
        bar.update(1)

    try:
        with epoch_reporting(hook):
            yield
    finally:
        bar.close()


def _record(run: RunDir, preset: Preset, cfg: Config, command: str, outcomes: list[StepOutcome]) -> None:
    """``RUN/pipeline.json`` (preset, dataset, command, steps done) and ``RUN/config.yaml`` (the resolved
    config), written atomically: the report's header."""
    import dataclasses
    import json
    import os

    from sidforge.platform.config import dump_config
    from sidforge.platform.report import PIPELINE_FILE

    run.path.mkdir(parents=True, exist_ok=True)
    record = {"preset": preset.name, "description": preset.description,
              "dataset": cfg.data.name or cfg.data.source, "command": command,
              "steps": [dataclasses.asdict(o) for o in outcomes]}
    for name, text in ((PIPELINE_FILE, json.dumps(record, indent=2)), ("config.yaml", dump_config(cfg))):
        tmp = run.path / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run.path / name)


def run_pipeline(config_path: str | Path | None, overrides: list[str], *, preset: str | None = None,
                 run_dir: str | None = None, data_dir: Path | None = None, address: str | None = None,
                 report: bool | None = None, command: str = "",
                 echo: Callable[[str], None] = print) -> list[StepOutcome]:
    """Run a preset's steps in order, then render the report.

    Args:
        config_path: the experiment YAML.
        overrides: ``--set`` values (applied after the preset's).
        preset: the method (default: the config's ``pipeline.preset``).
        run_dir: run directory (default: the config's ``run_dir``).
        data_dir: benchmark data directory (for prepare).
        address: Ray cluster to join (default: ``RAY_ADDRESS``, else an embedded one).
        report: render the report (default: ``pipeline.report``).
        command: the command line, recorded in ``RUN/pipeline.json`` for the report.
        echo: where the one line per stage goes.

    Returns:
        One :class:`StepOutcome` per step.
    """
    from sidforge.platform.runtime import init_ray

    chosen = resolve_preset(load_config(config_path, overrides), preset)
    base = step_config(config_path, overrides, chosen, Step("", ""), run_dir)
    configs = [step_config(config_path, overrides, chosen, step, run_dir) for step in chosen.steps]
    run = RunDir(base.run_dir)
    _record(run, chosen, base, command, [])
    echo(f"pipeline {chosen.name}: {len(chosen.steps)} stages -> {run.path}  ({chosen.description})")
    init_ray(address)
    outcomes = []
    started = time.perf_counter()
    for i, (step, cfg) in enumerate(zip(chosen.steps, configs), 1):
        folder = stage_folder(cfg, step, run)
        label = f"[{i}/{len(chosen.steps)}] {folder}"
        t0 = time.perf_counter()
        with _epoch_bar(label):
            result = STAGES[step.stage](cfg, run, data_dir)
        wall = time.perf_counter() - t0
        outcome = StepOutcome(step.stage, folder, step.role, result.skipped, wall,
                              headline(step.stage, result.metrics, result.rows))
        outcomes.append(outcome)
        status = "unchanged, skipped" if result.skipped else f"{wall:7.1f} s"
        echo(f"{label:<34} {status:>18}  {outcome.headline}")
    _record(run, chosen, base, command, outcomes)
    if base.pipeline.report if report is None else report:
        from sidforge.platform.report import render

        path = render(run.path, preset=chosen.name)
        echo(f"report: {path}")
    echo(f"pipeline {chosen.name}: done in {time.perf_counter() - started:.1f} s")
    return outcomes
