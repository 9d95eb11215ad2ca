"""The sidforge command: config resolution, data listing, error exits (no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sidforge import cli
from sidforge.platform import runtime

REPO = Path(__file__).resolve().parents[2]


def test_config_applies_overrides(capsys):
    assert cli.main(["config", "-c", str(REPO / "configs/tiny.yaml"), "--set", "prepare.coclick.window=7",
                     "--set", "seed=3"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["prepare"]["coclick"]["window"] == 7 and out["seed"] == 3
    assert out["data"]["source"] == "synthetic"


def test_bad_config_key_exits_2_naming_the_key(capsys):
    code = cli.main(["config", "-c", str(REPO / "configs/tiny.yaml"), "--set", "prepare.coclick.windw=7"])
    assert code == 2
    assert "prepare.coclick.windw" in capsys.readouterr().err


def test_wrong_type_exits_2(capsys):
    code = cli.main(["config", "-c", str(REPO / "configs/tiny.yaml"), "--set", "prepare.num_partitions=many"])
    assert code == 2
    assert "prepare.num_partitions" in capsys.readouterr().err


def test_data_list_reports_presence(tmp_path, capsys):
    (tmp_path / "amazon-beauty-2014").mkdir()
    (tmp_path / "amazon-beauty-2014" / "datamaps.json").write_text("{}")
    assert cli.main(["data", "list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[2] for line in out.splitlines()[3:] if line.strip()}
    assert rows["amazon-beauty-2014"] == "partial"
    assert rows["amazon-scientific-2018"] == "no"


def test_pull_of_unknown_benchmark_exits_2(tmp_path, capsys):
    assert cli.main(["data", "pull", "no-such-set", "--data-dir", str(tmp_path)]) == 2
    assert "amazon-beauty-2014" in capsys.readouterr().err


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr("sidforge.platform.runtime.init_ray", lambda *a, **k: None)
    code = cli.main(["prepare", "-c", str(REPO / "configs/amazon-beauty.yaml"), "--data-dir", str(tmp_path),
                     "--run-dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "amazon-beauty-2014" in err and "sidforge data pull" in err


@pytest.mark.parametrize("address, env, expect_local", [(None, None, True), ("10.0.0.1:6379", None, False),
                                                        (None, "ray://head:10001", False)])
def test_init_ray_starts_local_or_joins(monkeypatch, address, env, expect_local):
    import ray

    calls = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.update(kw))
    monkeypatch.setattr(runtime, "configure_data_context", lambda *a, **k: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runtime.init_ray(address, num_cpus=2)
    if expect_local:
        assert calls["address"] == "local" and calls["num_cpus"] == 2
    else:
        assert calls["address"] == (address or env) and "num_cpus" not in calls


def test_override_keeps_text_templates_as_text(capsys):
    assert cli.main(["config", "-c", str(REPO / "configs/amazon-beauty.yaml"), "--set",
                     "embed.text_template={title}. {brand}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["embed"]["text_template"] == "{title}. {brand}"
    assert cli.main(["config", "-c", str(REPO / "configs/amazon-beauty.yaml"), "--set",
                     "embed.text_template={title}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["embed"]["text_template"] == "{title}"


def _ranks_folder(path: Path, users: list[int], ranks: list[int]) -> Path:
    """A stage folder with a hand-written ranks.parquet: the same cases on valid and on test."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sidforge.stages.sasrec import CASE_RANKS

    path.mkdir(parents=True)
    n = len(users)
    pq.write_table(pa.table({"split": ["valid"] * n + ["test"] * n, "user_id": users * 2,
                             "item_id": [u + 100 for u in users] * 2, "rank": ranks * 2}, schema=CASE_RANKS),
                   path / "ranks.parquet")
    return path


def test_compare_prints_the_paired_difference_and_refuses_runs_on_other_cases(tmp_path, capsys):
    users = list(range(200))
    base = _ranks_folder(tmp_path / "base", users, [50] * 200)  # never in the top 10
    other = _ranks_folder(tmp_path / "other", users, [0] * 50 + [50] * 150)  # a quarter of the users first
    out_json = tmp_path / "cmp.json"
    assert cli.main(["compare", "--base", str(base), "--other", str(other), "--metric", "recall@10",
                     "--boot", "200", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "+0.2500" in out and "0.000" in out  # the difference, and P(other <= base)
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["split"], r["metric"], r["diff"]) for r in rows] == [("valid", "recall@10", 0.25),
                                                                     ("test", "recall@10", 0.25)]

    elsewhere = _ranks_folder(tmp_path / "elsewhere", [u + 1 for u in users], [0] * 200)
    assert cli.main(["compare", "--base", str(base), "--other", str(elsewhere)]) == 2
    assert "do not rank the same cases" in capsys.readouterr().err
    assert cli.main(["compare", "--base", str(base), "--other", str(tmp_path)]) == 2
    assert "ranks.parquet is missing" in capsys.readouterr().err
    assert cli.main(["compare", "--base", str(base), "--other", str(other), "--metric", "mrr"]) == 2
    assert "recall@K or ndcg@K" in capsys.readouterr().err
