"""How the app is deployed, without starting it: the Serve config YAML in deploy/, the deployment options
from the ``serve`` config section, the ``serve`` config checks, and ``sidforge serve``'s arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidforge.cli import main
from sidforge.platform.config import ConfigError, ServeConfig, load_config
from sidforge.serving.app import DEFAULT_OPTIONS, deployment_options

REPO = Path(__file__).resolve().parents[2]


def test_deploy_yaml_is_a_serve_config_of_this_app():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "sidforge.serving.app:build_app"
    cfg = load_config(REPO / app.args["config"], app.args["overrides"])  # the builder's own loading
    assert cfg.serve.ranker.startswith("ranker")
    assert {d.name for d in app.deployments} == set(ServeConfig.DEPLOYMENTS) == set(DEFAULT_OPTIONS)
    catalogue = next(d for d in app.deployments if d.name == "catalogue")
    assert catalogue.num_replicas == 1


def test_deployment_options_switch_between_fixed_replicas_and_autoscaling():
    s = ServeConfig()
    ranker = deployment_options(s, "ranker")
    assert ranker["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4.0}
    assert "num_replicas" not in ranker and ranker["name"] == "ranker"
    fixed = deployment_options(ServeConfig(deployments={"ranker": {"num_replicas": 3, "num_cpus": 0.5}}), "ranker")
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5}
    scaled = deployment_options(ServeConfig(deployments={"encoder": {"max_replicas": 4}}), "encoder")
    assert scaled["autoscaling_config"]["max_replicas"] == 4
    assert deployment_options(s, "catalogue")["num_replicas"] == 1


@pytest.mark.parametrize("override,words", [
    ("serve.deployments={rankr: {num_replicas: 1}}", "serve.deployments.rankr: unknown deployment"),
    ("serve.deployments={ranker: {replicas: 2}}", "serve.deployments.ranker.replicas: unknown option"),
    ("serve.deployments={ranker: {num_replicas: two}}", "serve.deployments.ranker.num_replicas: expected"),
    ("serve.deployments={catalogue: {max_replicas: 3}}", "exactly one replica"),
    ("serve.top_k=500", "serve.top_k=500 cannot exceed serve.candidates"),
    ("serve.max_history=0", "serve.max_history must be >= 1"),
    ("serve.retriever=beam", "serve.retriever"),
])
def test_bad_serve_settings_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("{", r"\{")):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_sidforge_serve_without_a_run_is_exit_2(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "run directory" in capsys.readouterr().err


def test_sidforge_serve_passes_host_port_and_run(tiny_run, monkeypatch, capsys):
    seen = {}

    def fake(plan, address):
        seen.update(plan=plan, address=address)

    monkeypatch.setattr("sidforge.serving.app.serve_run", fake)
    assert main(["serve", str(tiny_run.run_dir), "--config", str(REPO / "configs" / "tiny.yaml"), "--port", "8123",
                 "--host", "0.0.0.0", "--set", "serve.expose=true", "--set", "serve.candidates=30"]) == 0
    plan = seen["plan"]
    assert plan.serve.port == 8123 and plan.serve.host == "0.0.0.0" and plan.serve.candidates == 30
    assert str(plan.run_dir) == str(Path(tiny_run.run_dir).resolve())
    assert "http://0.0.0.0:8123" in capsys.readouterr().out
