"""The sidforge command: config resolution, data listing, error exits (no Ray needed)."""

from __future__ import annotations

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
