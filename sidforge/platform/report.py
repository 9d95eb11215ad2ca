"""The run report: ``RUN/report.md`` with PNG plots in ``RUN/report/``, built from the manifest alone.

Everything in it is read from what the stages recorded (``manifest.json``, each stage's
``metrics.json`` and ``quality.json``/``code_usage.png``), so ``sidforge report RUN_DIR`` re-renders it
at any time without touching a model. Sections, each present when the run has such a stage:

- the stages (wall time, when, rows) and, for a pipeline run, its preset and command;
- data and content encoder figures;
- co-click alignment (i2i Hit@30 before → after);
- tokenizer quality side by side, with the code usage plot of each;
- retrieval (Recall/NDCG@5/10/20/50) and ranking (AUC/GAUC/LogLoss) tables, next to the published
  figures on the same benchmark (``sidforge.platform.reference``), and their head/torso/tail/cold
  breakdown (table and plot);
- training curves (validation metric per epoch of every trainer).

:func:`compare` puts several runs side by side (``sidforge report RUN_A RUN_B --out DIR``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidforge.platform import reference
from sidforge.platform.artifacts import RunDir

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "report"
BUCKETS = ("head", "torso", "tail", "cold")
RETRIEVAL_KEYS = tuple(f"{m}@{k}" for k in (5, 10, 20, 50) for m in ("recall", "ndcg"))
RANKING_KEYS = ("auc", "gauc", "logloss")


@dataclass
class StageView:
    """One stage as the report sees it: its manifest figures and, for trainers, the epoch history."""

    name: str
    kind: str  # data | content | align | tokenizer | retrieval | ranking | other
    wall_time_s: float
    finished_at: str
    rows: dict[str, int]
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    folder: Path | None = None


def stage_kind(name: str, metrics: dict[str, Any]) -> str:
    test = metrics.get("test") if isinstance(metrics.get("test"), dict) else {}
    if name == "prepare":
        return "data"
    if name == "embed":
        return "content"
    if "i2i_after" in metrics:
        return "align"
    if "collision_rate" in metrics:
        return "tokenizer"
    if "auc" in test:
        return "ranking"
    if "ndcg@10" in test:
        return "retrieval"
    return "other"


def load_stages(run: RunDir) -> list[StageView]:
    """Every stage of the run's manifest, in the order they finished."""
    views = []
    entries = sorted(run.read_manifest().stages.items(), key=lambda kv: kv[1].finished_at)
    for name, entry in entries:
        folder = run.stage_dir(name)
        history: list[dict[str, Any]] = []
        metrics_file = folder / "metrics.json"
        if metrics_file.is_file():
            try:
                history = json.loads(metrics_file.read_text()).get("history", []) or []
            except (ValueError, AttributeError):
                log.warning("%s: unreadable; no training curve for %s", metrics_file, name)
        views.append(StageView(name, stage_kind(name, entry.metrics), entry.wall_time_s, entry.finished_at,
                               entry.rows, entry.metrics, history, folder if folder.is_dir() else None))
    return views


def read_pipeline(run: RunDir) -> dict[str, Any]:
    path = run.path / PIPELINE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("%s: unreadable; the report omits the pipeline header", path)
        return {}


# ----------------------------------------------------------------------------------------------
# markdown helpers


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def group_name(stage: str) -> str:
    """``ranker-full-s2`` / ``sasrec-seed2`` → ``ranker-full`` / ``sasrec``: the seeds of one variant."""
    return re.sub(r"-(s|seed)\d+$", "", stage)


def groups(stages: list[StageView]) -> dict[str, list[StageView]]:
    """Stages by variant (seeds together), in first-finished order."""
    out: dict[str, list[StageView]] = {}
    for s in stages:
        base = group_name(s.name)
        out.setdefault(s.name if base == s.name else f"{base} (seeds)", []).append(s)
    return out


def mean_std(values: Sequence[Any], digits: int = 4) -> str:
    """One value as is; several as ``mean ± std`` (sample std) over the finite ones."""
    import numpy as np

    vals = np.asarray([v for v in values if isinstance(v, (int, float)) and v == v], dtype=float)
    if len(vals) == 0:
        return "–"
    if len(set(vals.tolist())) == 1:  # one value, or the same for every seed (a count)
        ints = all(isinstance(v, int) for v in values if v is not None)
        return fmt(int(vals[0]) if ints else float(vals[0]), digits)
    return f"{vals.mean():.{digits}f} ± {vals.std(ddof=1) if len(vals) > 1 else 0.0:.{digits}f}"


def _variant(name: str, members: list[StageView]) -> str:
    if len(members) == 1 and members[0].name == name:
        return name
    return f"{group_name(members[0].name)} ({len(members)} seed{'s' if len(members) > 1 else ''})"


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------------------------
# sections


def _section_stages(stages: list[StageView], pipeline: dict[str, Any]) -> str:
    out = ["## Stages"]
    if pipeline:
        out.append(f"Preset **{pipeline.get('preset', '?')}** on `{pipeline.get('dataset', '?')}`: "
                   f"`{pipeline.get('command', '')}`")
    rows = [(s.name, _minutes(s.wall_time_s), s.finished_at,
             ", ".join(f"{k} {v:,}" for k, v in list(s.rows.items())[:3])) for s in stages]
    out.append(md_table(("stage", "wall time", "finished", "rows"), rows))
    total = sum(s.wall_time_s for s in stages)
    out.append(f"Total stage time {_minutes(total)} (the wall time of each stage's last real run).")
    return "\n\n".join(out)


def _section_data(stages: list[StageView]) -> str:
    out = []
    for s in stages:
        if s.kind == "data":
            buckets = s.metrics.get("buckets", {})
            rejects = s.metrics.get("rejects_by_reason", {})
            out.append("## Data\n\n" + md_table(("table", "rows"), [(k, f"{v:,}") for k, v in s.rows.items()])
                       + f"\n\nItems per popularity bucket: {', '.join(f'{k} {v:,}' for k, v in buckets.items())}."
                       + (f" Rows set aside: {', '.join(f'{k} {v:,}' for k, v in rejects.items())}." if rejects
                          else " No row was set aside."))
        elif s.kind == "content":
            m = s.metrics
            out.append(f"## Content embeddings\n\n`{m.get('encoder')}` / `{m.get('model')}`, dimensions "
                       f"{m.get('dims')}, {fmt(m.get('items_per_s'), 1)} items/s on `{m.get('device')}`.")
    return "\n\n".join(out)


def _section_align(stages: list[StageView]) -> str:
    rows = [(s.name, fmt(s.metrics["i2i_before"].get("hit@30")), fmt(s.metrics["i2i_after"].get("hit@30")),
             fmt(s.metrics["i2i_after"].get("recall@30")), fmt(s.metrics.get("best_epoch")))
            for s in stages if s.kind == "align"]
    if not rows:
        return ""
    return ("## Co-click alignment (SaviorEnc)\n\nHeld-out co-click pairs, i2i Hit@30 with faiss.\n\n"
            + md_table(("stage", "hit@30 before", "hit@30 after", "recall@30 after", "best epoch"), rows)
            + f"\n\nPublished, for context: {reference.CONTEXT['align']}")


def _section_tokenizers(stages: list[StageView], run: RunDir, dataset: str | None) -> str:
    toks = [s for s in stages if s.kind == "tokenizer"]
    if not toks:
        return ""
    rows = []
    for s in toks:
        m = s.metrics
        rows.append((s.name, m.get("method", "?"), f"{int(m.get('items', 0)):,}", fmt(m.get("sid_length")),
                     fmt(m.get("recon_rel")), " / ".join(f"{u:.0%}" for u in m.get("utilization", [])),
                     " / ".join(f"{e:.2f}" for e in m.get("entropy", [])), f"{m.get('collision_rate', 0):.2%}",
                     f"{m.get('unique_after', 0):.0%}"))
    out = ["## Semantic IDs", md_table(("stage", "method", "items", "ID length", "relative recon", "utilisation",
                                        "entropy (bits)", "collisions", "unique after"), rows)]
    pub = reference.published(reference.TOKENIZERS, dataset)
    if pub:
        out.append("Published (ADA-SID's Beauty table; its reconstruction loss is on its own scale, entropy in "
                   "nats or bits unstated — shown for context):\n\n"
                   + md_table(("model", "recon", "entropy", "source"),
                              [(p.model, fmt(p.metrics["recon"]), fmt(p.metrics["entropy"]), p.source) for p in pub]))
    for s in toks:
        if s.folder is not None and (s.folder / "code_usage.png").is_file():
            out.append(f"![code usage of {s.name}]({os.path.relpath(s.folder / 'code_usage.png', run.path)})")
    return "\n\n".join(out)


def _bucket_rows(members: list[StageView], name: str, keys: Sequence[str]) -> list[tuple[str, ...]]:
    tests = [m.metrics["test"] for m in members]
    return [(f"{name} / {b}", *(mean_std([t.get(f"{k}/{b}") for t in tests]) for k in keys),
             fmt(tests[0].get(f"count/{b}"))) for b in BUCKETS if f"count/{b}" in tests[0]]


def _metric_tables(kind: str, stages: list[StageView], keys: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The variant table (mean ± std over seeds), the per-seed rows folded away, and the bucket table."""
    grouped = groups([s for s in stages if s.kind == kind])
    rows = [(_variant(n, m), *(mean_std([s.metrics["test"].get(k) for s in m]) for k in keys),
             *(mean_std([s.metrics["test"].get(k) if k in s.metrics["test"] else s.metrics.get(k) for s in m], 1)
               for k in extra))
            for n, m in grouped.items()]
    out = [md_table(("model", *keys, *extra), rows)]
    if any(len(m) > 1 for m in grouped.values()):
        seed_rows = [(s.name, *(fmt(s.metrics["test"].get(k)) for k in keys)) for m in grouped.values() for s in m]
        out.append("<details><summary>every seed</summary>\n\n" + md_table(("stage", *keys), seed_rows)
                   + "\n\n</details>")
    bucket_keys = ("recall@10", "ndcg@10") if kind == "retrieval" else RANKING_KEYS
    label = "target item" if kind == "retrieval" else "candidate item"
    out.append(f"By popularity bucket of the {label} (head = top 25 % by train frequency, tail = bottom 25 %, "
               "cold = absent from training):\n\n"
               + md_table(("model / bucket", *bucket_keys, "cases"),
                          [r for n, m in grouped.items() for r in _bucket_rows(m, _variant(n, m), bucket_keys)]))
    return out


def _section_retrieval(stages: list[StageView], dataset: str | None) -> str:
    if not any(s.kind == "retrieval" for s in stages):
        return ""
    tables = _metric_tables("retrieval", stages, RETRIEVAL_KEYS, ("best_epoch",))
    out = ["## Retrieval (test, leave-one-out, full catalogue)", tables[0], *tables[1:-1]]
    pub = reference.published(reference.RETRIEVAL, dataset)
    if pub:
        out.append("Published on the same benchmark and protocol:\n\n" + md_table(
            ("model", *RETRIEVAL_KEYS[:4], "source"),
            [(p.model, *(fmt(p.metrics.get(k)) for k in RETRIEVAL_KEYS[:4]), p.source) for p in pub]))
    else:
        out.append("No published figures on this dataset are known to the report.")
    out.append(tables[-1])
    return "\n\n".join(out)


def _section_ranking(stages: list[StageView], dataset: str | None) -> str:
    if not any(s.kind == "ranking" for s in stages):
        return ""
    tables = _metric_tables("ranking", stages, RANKING_KEYS, ("count", "best_epoch"))
    out = ["## Ranking (test impressions: next item + sampled negatives)", tables[0], *tables[1:-1]]
    pub = reference.published(reference.RANKING, dataset)
    if pub:
        out.append("Published on Amazon Beauty (a different protocol: a 90/10 split; not directly comparable):\n\n"
                   + md_table(("model", "auc", "gauc", "source"),
                              [(p.model, fmt(p.metrics["auc"]), fmt(p.metrics["gauc"]), p.source) for p in pub]))
    out.append(f"Context: {reference.CONTEXT['ranker']}")
    out.append(tables[-1])
    return "\n\n".join(out)


# ----------------------------------------------------------------------------------------------
# plots


def _plot_curves(stages: list[StageView], path: Path) -> bool:
    trained = {n: [s for s in m if s.history] for n, m in groups(stages).items()}
    trained = {n: m for n, m in trained.items() if m}
    if not trained:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(trained))
    rows = (len(trained) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, members) in zip(axes.flat, trained.items()):
        last = members[0].history[-1]
        keys = [k for k in last if k.startswith("valid/") and "logloss" not in k and "count" not in k][:2] or ["loss"]
        twin = ax.twinx() if "loss" in last and keys != ["loss"] else None
        for j, s in enumerate(members):
            epochs = [h.get("epoch", i) for i, h in enumerate(s.history)]
            for c, k in enumerate(keys):
                ax.plot(epochs, [h.get(k, float("nan")) for h in s.history], marker="o", ms=3, color=f"C{c}",
                        alpha=1.0 if j == 0 else 0.45, label=k if j == 0 else None)
            if twin is not None:
                twin.plot(epochs, [h.get("loss", float("nan")) for h in s.history], color="grey", ls="--", lw=1,
                          alpha=1.0 if j == 0 else 0.45)
            if isinstance(s.metrics.get("best_epoch"), int):
                ax.axvline(s.metrics["best_epoch"], color="k", lw=0.8, ls=":", alpha=1.0 if j == 0 else 0.45)
        if twin is not None:
            twin.set_ylabel("train loss", color="grey")
        ax.set_title(_variant(name, members), fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(trained):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_buckets(stages: list[StageView], path: Path) -> bool:
    kinds = [(kind, metric) for kind, metric in (("retrieval", "ndcg@10"), ("ranking", "auc"))
             if any(s.kind == kind for s in stages)]
    if not kinds:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(kinds), figsize=(7.5 * len(kinds), 3.8), squeeze=False)
    parts = ("", *BUCKETS)
    for ax, (kind, metric) in zip(axes[0], kinds):
        grouped = groups([s for s in stages if s.kind == kind])
        width = 0.8 / len(grouped)
        for i, (name, members) in enumerate(grouped.items()):
            vals = np.array([[m.metrics["test"].get(f"{metric}/{b}" if b else metric, np.nan) for b in parts]
                             for m in members], dtype=float)
            err = vals.std(axis=0, ddof=1) if len(members) > 1 else None
            with np.errstate(all="ignore"):  # a bucket without cases is a gap, not a warning
                mean = vals.mean(axis=0)
            ax.bar(np.arange(len(parts)) + i * width, mean, width, yerr=err, capsize=2,
                   label=_variant(name, members))
        ax.set_xticks(np.arange(len(parts)) + 0.4 - width / 2, ["all", *BUCKETS])
        ax.set_ylabel(f"test {metric}")
        if metric == "auc":
            ax.set_ylim(0.45, 1.0)
            ax.axhline(0.5, color="k", lw=0.8, ls=":")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title(f"{kind}: test {metric} by popularity bucket (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# rendering


def render(run_dir: str | Path, preset: str | None = None, dataset: str | None = None) -> Path:
    """Write ``RUN/report.md`` and ``RUN/report/*.png`` from the run's recorded figures.

    Args:
        run_dir: the run directory.
        preset: shown in the header (default: the one ``RUN/pipeline.json`` recorded).
        dataset: selects the published figures (default: ``RUN/pipeline.json``'s, else none).

    Returns:
        The path of ``report.md``.
    """
    run = RunDir(run_dir)
    if not run.manifest_path.is_file():
        raise FileNotFoundError(f"{run.path} has no manifest.json: not a run directory (run `sidforge pipeline` "
                                "or a stage command first)")
    pipeline = read_pipeline(run)
    preset = preset or pipeline.get("preset")
    dataset = dataset or pipeline.get("dataset")
    stages = load_stages(run)
    plots = run.path / f".{PLOTS_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    plots.mkdir(parents=True)
    try:
        curves = _plot_curves(stages, plots / "training_curves.png")
        buckets = _plot_buckets(stages, plots / "buckets.png")
        parts = [f"# {run.path.name}" + (f" — {preset}" if preset else ""),
                 _section_stages(stages, pipeline), _section_data(stages), _section_align(stages),
                 _section_tokenizers(stages, run, dataset), _section_retrieval(stages, dataset),
                 _section_ranking(stages, dataset)]
        if buckets:
            parts.append(f"![test metric per popularity bucket]({PLOTS_DIR}/buckets.png)")
        if curves:
            parts.append(f"## Training curves\n\nValidation metrics per epoch (dotted line: the best epoch, the one "
                         f"evaluated on test); dashed grey: training loss.\n\n"
                         f"![training curves]({PLOTS_DIR}/training_curves.png)")
        text = "\n\n".join(p for p in parts if p) + "\n"
        final = run.path / PLOTS_DIR
        if final.exists():
            shutil.rmtree(final)
        os.replace(plots, final)
    except BaseException:
        shutil.rmtree(plots, ignore_errors=True)
        raise
    tmp = run.path / f".{REPORT_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, run.path / REPORT_FILE)
    return run.path / REPORT_FILE


def headline_metrics(stages: list[StageView]) -> dict[str, dict[str, float]]:
    """``{stage: {metric: value}}``: the figures a comparison puts side by side."""
    out: dict[str, dict[str, float]] = {}
    for s in stages:
        test = s.metrics.get("test") if isinstance(s.metrics.get("test"), dict) else {}
        if s.kind == "retrieval":
            out[s.name] = {k: test.get(k) for k in ("recall@10", "ndcg@10", "recall@50", "ndcg@50")}
        elif s.kind == "ranking":
            out[s.name] = {k: test.get(k) for k in ("auc", "gauc", "auc/tail", "auc/cold")}
        elif s.kind == "align":
            out[s.name] = {"hit@30 before": s.metrics["i2i_before"].get("hit@30"),
                           "hit@30 after": s.metrics["i2i_after"].get("hit@30")}
        elif s.kind == "tokenizer":
            out[s.name] = {"collisions": s.metrics.get("collision_rate"), "recon": s.metrics.get("recon_rel")}
    return out


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Several runs side by side: ``OUT/comparison.md`` (one column per run) and ``comparison.png``.

    Rows are ``stage: metric`` over the union of the runs' stages; a run without that stage shows "–".
    A last column gives mean ± std over the runs that have the figure (the benches write one run
    directory per seed, so this is the seed average of each variant).
    """
    runs = [RunDir(r) for r in run_dirs]
    for r in runs:
        if not r.manifest_path.is_file():
            raise FileNotFoundError(f"{r.path} has no manifest.json: not a run directory")
    names = [r.path.name if [x.path.name for x in runs].count(r.path.name) == 1 else str(r.path) for r in runs]
    per_run = [headline_metrics(load_stages(r)) for r in runs]
    keys = list(dict.fromkeys((stage, metric) for h in per_run for stage, ms in h.items() for metric in ms))
    rows = []
    for stage, metric in keys:
        values = [h.get(stage, {}).get(metric) for h in per_run]
        present = [v for v in values if v is not None]
        rows.append((f"{stage}: {metric}", *(fmt(v) for v in values),
                     f"{mean_std(present)} (n={len(present)})" if len(present) > 1 else "–"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = "# Runs side by side\n\n" + md_table(("stage: metric", *names, "mean ± std"), rows) + "\n"
    if _plot_comparison(keys, per_run, names, out / "comparison.png"):
        text += "\n![headline metrics per run](comparison.png)\n"
    (out / "comparison.md").write_text(text)
    return out / "comparison.md"


def _plot_comparison(keys: list[tuple[str, str]], per_run: list[dict[str, dict[str, float]]], names: list[str],
                     path: Path) -> bool:
    """One panel per headline metric: a row per stage, a dot per run, the mean ± std as a black bar."""
    panels = [m for m in ("ndcg@10", "auc", "hit@30 after") if any(k[1] == m for k in keys)]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    heights = [sum(k[1] == m for k in keys) for m in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.0, 1.2 + 0.32 * sum(heights) + 0.6 * len(panels)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, metric in zip(axes[:, 0], panels):
        stages = [stage for stage, m in keys if m == metric]
        for y, stage in enumerate(stages):
            vals = np.array([h.get(stage, {}).get(metric, np.nan) for h in per_run], dtype=float)
            for j, v in enumerate(vals):
                ax.plot(v, y, "o", color=f"C{j}", ms=5, alpha=0.8, label=names[j] if y == 0 else None)
            finite = vals[np.isfinite(vals)]
            if len(finite) > 1:
                ax.errorbar(finite.mean(), y, xerr=finite.std(ddof=1), color="k", capsize=3, lw=1.2)
        ax.set_yticks(range(len(stages)), stages, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"test {metric}" if metric != "hit@30 after" else "i2i hit@30 after alignment")
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=min(4, len(names)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
