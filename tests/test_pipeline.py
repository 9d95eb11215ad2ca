"""The pipeline: presets and the order values apply in (unit), then real runs on the tiny config —
skipping, a pipeline killed mid-stage and re-run, a truncated artifact rebuilt — and the job path
through ``ray job submit`` against a ``ray start`` cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from sidforge.pipeline import PRESETS, STAGES, resolve_preset, run_pipeline, step_config
from sidforge.platform.artifacts import RunDir, file_sha256
from sidforge.platform.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
# SASRec on the tiny data, long enough (about a second an epoch) that a kill lands mid-training
SASREC = ["sasrec.epochs=12", "sasrec.patience=12", "sasrec.hidden=64", "sasrec.ffn_hidden=128", "sasrec.layers=2"]


# ----------------------------------------------------------------------------------------------
# presets (no Ray)


def test_every_preset_step_is_a_known_stage_and_every_preset_config_loads():
    for preset in PRESETS.values():
        assert preset.steps[0].stage == "prepare"
        for step in preset.steps:
            assert step.stage in STAGES
            step_config(TINY, [], preset, step)  # the preset's values pass the config's checks


def test_values_apply_yaml_then_preset_then_overrides_then_step():
    savior = PRESETS["savior"]
    cfg = step_config(TINY, [], savior, savior.steps[-1])
    assert cfg.tokenize.source == "align" and cfg.ranker.mba  # the preset over the YAML (tiny: source embed)
    cfg = step_config(TINY, ["tokenize.source=embed"], savior, savior.steps[-1])
    assert cfg.tokenize.source == "embed"  # --set over the preset
    bbq = PRESETS["bbq"]
    behavior, downstream = bbq.steps[2], bbq.steps[-1]
    overrides = ["sasrec.reweight=sid", "sasrec.name=mine"]
    cfg = step_config(TINY, overrides, bbq, behavior)
    assert (cfg.sasrec.reweight, cfg.sasrec.output_name) == ("none", "sasrec")  # the step over --set: e_b is plain
    assert step_config(TINY, [], bbq, downstream).sasrec.output_name == "sasrec-sid"
    # BBQRec: the sequence-to-item loss on the IDs and the tokenizer's modalities on the items; e_b stays plain
    cfg = step_config(TINY, ["tokenize.modalities=[content]"], bbq, downstream)
    assert (cfg.sasrec.contrastive_weight, cfg.sasrec.contrastive_target) == (0.1, "sid")
    assert cfg.sasrec.item_features == ["content"]
    cfg = step_config(TINY, ["tokenize.modalities=[content]"], bbq, behavior)
    assert (cfg.sasrec.contrastive_weight, cfg.sasrec.item_features, cfg.sasrec.output_name) == (0.0, [], "sasrec")
    assert step_config(TINY, [], bbq, downstream).sasrec.item_features == []  # no modality named: IDs alone
    assert step_config(TINY, [], bbq, downstream, run_dir="/tmp/x").run_dir == "/tmp/x"


def test_the_preset_comes_from_the_flag_or_the_config_else_a_clear_error():
    cfg = load_config(TINY)
    with pytest.raises(ConfigError, match="--preset"):
        resolve_preset(cfg, None)
    assert resolve_preset(cfg, "tiger").name == "tiger"
    assert resolve_preset(load_config(TINY, ["pipeline.preset=bbq"]), None).name == "bbq"
    with pytest.raises(ConfigError, match="pipeline.preset"):
        load_config(TINY, ["pipeline.preset=savoir"])


# ----------------------------------------------------------------------------------------------
# real runs on the tiny config


def _run(run_dir: Path, *extra: str) -> list:
    return run_pipeline(TINY, [*SASREC, *extra], preset="sasrec", run_dir=str(run_dir), echo=lambda line: None)


def _tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a saved model file, by its path in the nested dicts."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _tensors(value, f"{prefix}/{key}").items()}
    return {}


def _state(path: Path) -> dict[str, torch.Tensor]:
    return _tensors(torch.load(path, map_location="cpu", weights_only=True))


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted sasrec-preset run: the reference the interrupted and tampered runs must equal
    (one torch thread, like the killed run's subprocess, so the float sums agree bit for bit)."""
    run = tmp_path_factory.mktemp("pipeline") / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcomes = _run(run)
    finally:
        torch.set_num_threads(threads)
    assert [(o.folder, o.skipped) for o in outcomes] == [("prepare", False), ("sasrec", False)]
    return run


def test_a_rerun_skips_every_stage_and_the_report_is_written(finished: Path):
    outcomes = _run(finished)
    assert all(o.skipped for o in outcomes)
    report = (finished / "report.md").read_text()
    assert "## Retrieval" in report and "sasrec" in report
    assert (finished / "report" / "training_curves.png").stat().st_size > 1000
    record = json.loads((finished / "pipeline.json").read_text())
    assert record["preset"] == "sasrec" and [s["folder"] for s in record["steps"]] == ["prepare", "sasrec"]


def test_a_truncated_artifact_is_detected_and_rebuilt_not_loaded(finished: Path, tmp_path: Path, one_torch_thread):
    import shutil

    run = tmp_path / "tampered"
    shutil.copytree(finished, run)
    emb = run / "sasrec" / "item_embeddings.parquet"
    original = file_sha256(emb)
    emb.write_bytes(emb.read_bytes()[:100])  # a truncated write
    items = run / "prepare" / "item_stats.parquet"
    items.write_bytes(items.read_bytes()[:-10])
    outcomes = _run(run)
    assert [o.skipped for o in outcomes] == [False, False]  # both rebuilt
    assert file_sha256(emb) == original
    pq.read_table(items)  # whole again
    assert RunDir(run).is_current("sasrec", RunDir(run).read_manifest().stages["sasrec"].config_hash,
                                  RunDir(run).read_manifest().stages["sasrec"].inputs)


def test_a_pipeline_killed_mid_training_and_rerun_ends_as_an_uninterrupted_run(ray_cluster, finished: Path, one_torch_thread,
                                                                                tmp_path: Path):
    run = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sidforge.cli", "pipeline", "--config", TINY, "--preset", "sasrec",
           "--run-dir", str(run), *[a for kv in SASREC for a in ("--set", kv)]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while not list((run / "_train").glob("sasrec-*/epoch_0003")):
            assert proc.poll() is None, f"the pipeline ended before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no epoch-3 checkpoint within 180 s"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert "sasrec" not in RunDir(run).read_manifest().stages  # killed mid-stage: nothing recorded as done
    assert not (run / "sasrec").exists()

    outcomes = _run(run)
    assert [o.skipped for o in outcomes] == [True, False]  # prepare was complete; sasrec resumed
    ours, ref = json.loads((run / "sasrec" / "metrics.json").read_text()), \
        json.loads((finished / "sasrec" / "metrics.json").read_text())
    assert ours["test"] == ref["test"] and ours["best_epoch"] == ref["best_epoch"]
    a, b = _state(run / "sasrec" / "model.pt"), _state(finished / "sasrec" / "model.pt")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# the job path: ray job submit to a `ray start` cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    """Until ``url`` answers at all (an HTTP error status counts: token auth refuses this probe)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_ray_job_submit_runs_the_pipeline_on_a_started_cluster_with_token_auth(tmp_path: Path):
    """Cluster mode as documented: Ray's token authentication on; the job runs, an unauthenticated call
    to the cluster's API is refused."""
    import secrets
    import urllib.error
    import urllib.request

    ray_bin = Path(sys.executable).parent / "ray"
    gcs, dash = _free_port(), _free_port()
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # an activated venv: `python` is ours
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             # every port its own: another Ray on this machine (the session's) holds the defaults
                             *(f"--{name}={_free_port()}" for name in (
                                 "ray-client-server-port", "object-manager-port", "node-manager-port",
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                 "runtime-env-agent-port", "metrics-export-port"))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run = tmp_path / "job-run"  # the shared filesystem: the same path for the submitter and the cluster
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", timeout=90)
        runtime_env = json.dumps({"env_vars": {"OMP_NUM_THREADS": "1"}, "excludes": ["runs/", ".venv/", "bench/"]})
        submit = [str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                  "--runtime-env-json", runtime_env, "--",
                  "python", "-m", "sidforge.cli", "pipeline", "--config", "configs/tiny.yaml", "--preset", "sasrec",
                  "--run-dir", str(run), "--set", "sasrec.epochs=3"]
        for _ in range(20):  # the dashboard answers a few seconds before the node's job agent does
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stderr:
                break
            time.sleep(1)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        jobs = f"http://127.0.0.1:{dash}/api/jobs/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(jobs, timeout=10)
        assert refused.value.code in (401, 403)
        request = urllib.request.Request(jobs, headers={"Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(request, timeout=10).status == 200
    finally:  # the cluster's processes share the session `ray start` leads: stop them all, not `ray stop`
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
    manifest = RunDir(run).read_manifest()
    assert set(manifest.stages) == {"prepare", "sasrec"}
    assert (run / "report.md").is_file()
    assert json.loads((run / "pipeline.json").read_text())["command"].startswith("sidforge pipeline")
