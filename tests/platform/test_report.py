"""The run report and the run comparison, from hand-written manifests (no models, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sidforge.platform.artifacts import RunDir, StageEntry, fingerprint_tree
from sidforge.platform.report import compare, group_name, mean_std, render


def _stage(run: RunDir, name: str, metrics: dict, history: list | None = None, when: str = "2026-01-01T00:00") -> None:
    folder = run.stage_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    if history is not None:
        (folder / "metrics.json").write_text(json.dumps({**metrics, "history": history}))
    run.record(name, StageEntry(config_hash="h", outputs=fingerprint_tree(folder), metrics=metrics,
                                rows={"items": 300}, wall_time_s=12.0, finished_at=when))


def _ranker(auc: float, cold: float) -> dict:
    return {"best_epoch": 3, "test": {"auc": auc, "gauc": auc - 0.02, "logloss": 0.4, "count": 1000,
                                      "auc/head": auc + 0.03, "count/head": 300, "auc/cold": cold, "count/cold": 50}}


def _retrieval(ndcg: float) -> dict:
    return {"best_epoch": 7, "test": {"recall@10": 2 * ndcg, "ndcg@10": ndcg, "recall@50": 4 * ndcg,
                                      "ndcg@50": 1.5 * ndcg, "count/tail": 80, "ndcg@10/tail": ndcg / 2}}


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    _stage(run, "prepare", {"buckets": {"head": 75, "tail": 75}, "rejects_by_reason": {"null user_id": 2}})
    _stage(run, "tokenize-rqvae", {"method": "rqvae", "items": 300.0, "utilization": [1.0, 0.95],
                                   "entropy": [4.1, 3.9], "collision_rate": 0.04, "recon_rel": 0.3,
                                   "unique_after": 1.0, "sid_length": 3})
    history = [{"epoch": e, "loss": 1.0 / (e + 1), "valid/auc": 0.6 + 0.01 * e} for e in range(5)]
    for seed, (auc, cold) in enumerate([(0.80, 0.70), (0.82, 0.66), (0.81, 0.68)]):
        _stage(run, f"ranker-full-s{seed}", _ranker(auc, cold), history, when=f"2026-01-02T00:0{seed}")
    _stage(run, "sasrec", _retrieval(0.05), [{"epoch": 0, "loss": 2.0, "valid/ndcg@10": 0.04}])
    (run.path / "pipeline.json").write_text(json.dumps({"preset": "savior", "dataset": "amazon-beauty-2014",
                                                         "command": "sidforge pipeline --preset savior"}))
    return run


def test_seed_stages_group_and_average():
    assert group_name("ranker-full-s2") == group_name("ranker-full-seed2") == "ranker-full"
    assert group_name("tokenize-rqvae") == "tokenize-rqvae"
    assert mean_std([0.80, 0.82, 0.81]) == f"0.8100 ± {np.std([0.80, 0.82, 0.81], ddof=1):.4f}"
    assert mean_std([1000, 1000]) == "1,000" and mean_std([None]) == "–"


def test_the_report_tables_seeds_published_figures_and_plots(run: RunDir):
    text = render(run.path).read_text()
    assert text.startswith("# run — savior")
    assert "| ranker-full (3 seeds) | 0.8100 ± 0.0100 |" in text  # mean ± std over the seed stages
    assert "ranker-full (3 seeds) / cold | 0.6800 ± 0.0200" in text
    assert "TIGER paper, Table 1" in text and "MMQ-v2 / ADA-SID" in text  # Beauty: published rows
    assert "null user_id 2" in text and "![code usage" not in text  # no code_usage.png was written
    for plot in ("training_curves.png", "buckets.png"):
        assert (run.path / "report" / plot).stat().st_size > 5000
    (run.path / "pipeline.json").write_text(json.dumps({"preset": "tiger", "dataset": "synthetic"}))
    text = render(run.path).read_text()
    assert "TIGER paper" not in text and "No published figures on this dataset" in text


def test_a_folder_without_a_manifest_is_not_a_run(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        render(tmp_path)


def test_compare_puts_runs_side_by_side_with_the_mean(run: RunDir, tmp_path: Path):
    other = RunDir(tmp_path / "other")
    _stage(other, "sasrec", _retrieval(0.07))
    text = compare([run.path, other.path], tmp_path / "cmp").read_text()
    assert "| sasrec: ndcg@10 | 0.0500 | 0.0700 | 0.0600 ± 0.0141 (n=2) |" in text
    assert "| ranker-full-s0: auc | 0.8000 | – | – |" in text
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 5000
