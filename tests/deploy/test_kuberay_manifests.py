"""The KubeRay manifests in deploy/, checked offline: the CRD fields they use (a hand transcription of the
v1 schema, kuberay_v1_schema.py), the RayService's Serve config against Ray Serve's own schema and this
app, the RayJob's entrypoint against the CLI, and the shared volume every Ray pod must mount.

Fast (no Ray started, no cluster needed). The full CRD check is ``kubectl apply --dry-run=server -f deploy/``
on a cluster with KubeRay installed.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kuberay_v1_schema import SCHEMAS

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = {"RayJob": REPO / "deploy" / "rayjob.yaml", "RayService": REPO / "deploy" / "rayservice.yaml"}
ARTIFACTS_CLAIM = "sidforge-artifacts"


def _load(kind: str) -> dict[str, Any]:
    """The one ``kind`` document of its manifest (every document in the file is checked to be that kind)."""
    docs = [d for d in yaml.safe_load_all(MANIFESTS[kind].read_text()) if d is not None]
    assert [d.get("kind") for d in docs] == [kind], f"{MANIFESTS[kind].name}: expected one {kind}, got {docs}"
    return docs[0]


def _cluster(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec["rayClusterConfig"]


def _groups(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, pod spec) of the head and every worker group."""
    cluster = _cluster(doc)
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for g in cluster.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]["spec"]


def _errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMAS[doc["kind"]])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# ----------------------------------------------------------------------------------------------
# the CRD fields


def test_the_transcribed_schemas_are_valid_json_schema():
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_matches_the_kuberay_v1_schema(kind):
    errors = _errors(_load(kind))
    assert not errors, f"{MANIFESTS[kind].name}:\n" + "\n".join(errors)


def _rename(key: str, to: str) -> Callable[[dict[str, Any]], None]:
    def mutate(spec: dict[str, Any]) -> None:
        spec[to] = spec.pop(key)

    return mutate


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def mutate(spec: dict[str, Any]) -> None:
        node: Any = spec
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def mutate(spec: dict[str, Any]) -> None:
        node: Any = spec
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[last]

    return mutate


# Mistakes a hand-edited manifest could make, each one the schema must reject (mutations of spec).
MISTAKES = [
    ("RayJob", "misspelled spec field", _rename("submissionMode", "submisionMode"), "Additional properties"),
    ("RayJob", "wrong submissionMode", _set("submissionMode", "K8sJob"), "is not one of"),
    ("RayJob", "worker group without groupName", _drop("rayClusterSpec.workerGroupSpecs.0.groupName"),
     "'groupName' is a required property"),
    ("RayJob", "misspelled worker group field", _set("rayClusterSpec.workerGroupSpecs.0.maxReplica", 2),
     "Additional properties"),
    ("RayJob", "wrong auth mode", _set("rayClusterSpec.authOptions.mode", "on"), "is not one of"),
    ("RayJob", "ttl as a string", _set("ttlSecondsAfterFinished", "600"), "is not of type 'integer'"),
    ("RayJob", "rayStartParams value not a string", _set("rayClusterSpec.headGroupSpec.rayStartParams.num-cpus", 0),
     "is not of type 'string'"),
    ("RayService", "wrong upgradeStrategy type", _set("upgradeStrategy.type", "BlueGreen"), "is not one of"),
    ("RayService", "the RayJob's name for the cluster", _rename("rayClusterConfig", "rayClusterSpec"),
     "Additional properties"),
    ("RayService", "container without image",
     _drop("rayClusterConfig.workerGroupSpecs.0.template.spec.containers.0.image"), "'image' is a required property"),
]


@pytest.mark.parametrize("kind,what,mutate,message", MISTAKES, ids=[m[1] for m in MISTAKES])
def test_schema_rejects_a_mutated_manifest(kind, what, mutate, message):
    doc = copy.deepcopy(_load(kind))
    mutate(doc["spec"])
    errors = _errors(doc)
    assert any(message in e for e in errors), f"{what}: expected an error with {message!r}, got {errors}"


# ----------------------------------------------------------------------------------------------
# the Ray clusters


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_token_auth_is_on_and_ray_versions_match(kind):
    import ray

    cluster = _cluster(_load(kind))
    assert cluster["authOptions"]["mode"] == "token"
    version = tuple(int(x) for x in cluster["rayVersion"].split("."))
    assert version >= (2, 52, 0), "Ray token authentication needs Ray 2.52 or newer"
    assert version[:2] == tuple(int(x) for x in ray.__version__.split(".")[:2]), (
        f"rayVersion {cluster['rayVersion']} and the Ray sidforge pins ({ray.__version__}) differ")


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_pod_mounts_the_artifacts_claim_at_the_same_path(kind):
    doc = _load(kind)
    paths = {}
    for group, pod in _groups(doc):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{group}/{c['name']}: volumeMount {m['name']!r} names no volume"
        claims = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == ARTIFACTS_CLAIM]
        assert len(claims) == 1, f"{group}: expected one volume of the claim {ARTIFACTS_CLAIM}, got {claims}"
        # containers[0] is the Ray container (KubeRay's convention); sidecars need not mount the claim
        mounts = {m["mountPath"] for m in pod["containers"][0].get("volumeMounts", []) if m["name"] == claims[0]}
        assert len(mounts) == 1, f"{group}: the Ray container must mount {ARTIFACTS_CLAIM} once, got {mounts}"
        paths[group] = mounts.pop()
    assert len(set(paths.values())) == 1, f"{ARTIFACTS_CLAIM} must be at one path on every node, got {paths}"
    assert len(paths) >= 2, "expected a head and at least one worker group"


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_ray_container_runs_one_image_of_this_version(kind):
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    images = {c["image"] for _, pod in _groups(_load(kind)) for c in pod["containers"]}
    assert len(images) == 1, f"head and workers must run the same image (one Ray, one sidforge), got {images}"
    assert images.pop().endswith(f"/sidforge:{version}"), f"the image tag should be sidforge's version {version}"


def _mount_path(doc: dict[str, Any]) -> str:
    pod = _cluster(doc)["headGroupSpec"]["template"]["spec"]
    claim = next(v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName"))
    return next(m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == claim)


# ----------------------------------------------------------------------------------------------
# the RayJob


def test_rayjob_runtime_env_is_a_ray_runtime_env_on_the_shared_volume():
    from ray.runtime_env import RuntimeEnv

    doc = _load("RayJob")
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert set(env) <= set(RuntimeEnv.known_fields), f"unknown runtime_env fields: {set(env) - RuntimeEnv.known_fields}"
    RuntimeEnv(**env)  # env_vars must map strings to strings
    assert env["env_vars"]["SIDFORGE_DATA_DIR"].startswith(_mount_path(doc) + "/")


def test_rayjob_entrypoint_parses_with_the_sidforge_cli():
    from sidforge.cli import build_parser

    parser = build_parser()
    commands = next(a.choices for a in parser._actions if isinstance(a.choices, dict))
    if "pipeline" not in commands:
        pytest.skip("`sidforge pipeline` is not in the CLI yet")
    doc = _load("RayJob")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "sidforge", "the image installs the `sidforge` script"
    args = parser.parse_args(argv[1:])
    assert args.command == "pipeline"
    assert (REPO / args.config).is_file(), f"{args.config} must exist (the image copies configs/)"
    assert args.run_dir.startswith(_mount_path(doc) + "/"), "the run directory must be on the shared volume"


# ----------------------------------------------------------------------------------------------
# the RayService


def _unknown_keys(raw: dict[str, Any], model: Any, where: str) -> list[str]:
    """Keys pydantic would ignore silently (Serve's schemas accept extra fields for forward compatibility)."""
    return [f"{where}.{k}" for k in raw if k not in model.model_fields]


def test_rayservice_serve_config_is_a_serve_config_of_this_app():
    from ray.serve import schema as serve

    doc = _load("RayService")
    raw = yaml.safe_load(doc["spec"]["serveConfigV2"])
    schema = serve.ServeDeploySchema.model_validate(raw)
    unknown = _unknown_keys(raw, serve.ServeDeploySchema, "serveConfigV2")
    unknown += _unknown_keys(raw.get("http_options", {}), serve.HTTPOptionsSchema, "http_options")
    for app in raw["applications"]:
        unknown += _unknown_keys(app, serve.ServeApplicationSchema, app["name"])
        for d in app.get("deployments", []):
            unknown += _unknown_keys(d, serve.DeploymentSchema, f"{app['name']}.{d['name']}")
    assert not unknown, f"fields Ray Serve does not know (ignored, not rejected): {unknown}"

    assert schema.http_options.host == "0.0.0.0", "the proxy must listen on the pod's interfaces, not loopback"
    (app,) = schema.applications
    local = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    (local_app,) = local["applications"]
    assert app.import_path == local_app["import_path"] == "sidforge.serving.app:build_app"
    module, name = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert [d.name for d in app.deployments] == [d["name"] for d in local_app["deployments"]]
    assert app.args["config"] == local_app["args"]["config"] and (REPO / app.args["config"]).is_file()
    assert app.args["overrides"] == local_app["args"]["overrides"]
    assert app.args["run_dir"].startswith(_mount_path(doc) + "/"), "the run directory must be on the shared volume"
