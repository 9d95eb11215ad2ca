"""What the server refuses to load: a run whose files no longer match their manifest fingerprints, a
pickle payload planted as weights (never executed), and paths that leave the run directory or
``serve.artifact_root``. Each refusal is a DataError naming the stage or the field."""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sidforge.platform.artifacts import RunDir, StageEntry, fingerprint_tree
from sidforge.platform.config import Config
from sidforge.platform.schemas import DataError
from sidforge.serving import plan as plan_module
from sidforge.serving.content import CodeAssigner, load_align_file, load_clip_aligner
from sidforge.serving.plan import load_ranker_file, resolve

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol")]  # the pickle.dump payloads

SIDS = "tokenize-rqkmeans"


class Payload:
    """Unpickling it creates ``marker``: what a malicious weights file would do (harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return pathlib.Path.touch, (self.marker,)


def _with(cfg: Config, run: Path | None = None, **serve: object) -> Config:
    return dataclasses.replace(cfg, run_dir=str(run or cfg.run_dir), serve=dataclasses.replace(cfg.serve, **serve))


def _record(run: Path, stage: str) -> None:
    """The manifest entry a stage writes when it finishes, for the files now in its folder."""
    RunDir(run).record(stage, StageEntry(config_hash="x", outputs=fingerprint_tree(run / stage)))


def _plant(path: Path, marker: Path, how: str) -> None:
    payload = {"format": 1, "config": Payload(marker), "sids": SIDS, "state_dict": {}}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as fh:
            pickle.dump(payload, fh)


@pytest.fixture
def run_copy(tiny_run: Config, tmp_path: Path) -> Config:
    """A copy of the tiny run in which every stage (the hand-written prepare and embed too) has its entry."""
    run = tmp_path / "root" / "run"
    shutil.copytree(tiny_run.run_dir, run)
    for stage in ("prepare", "embed"):
        _record(run, stage)
    assert set(RunDir(run).read_manifest().stages) >= {"prepare", "embed", "align", SIDS, "ranker"}
    return _with(tiny_run, run)


def test_the_payload_is_live_when_unpickled_without_restriction(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()  # so the tests below, where it does not appear, mean something


# ----------------------------------------------------------------------------------------------
# manifest fingerprints


def test_an_untampered_run_resolves_to_the_same_version(tiny_run, run_copy):
    plan = resolve(run_copy)
    assert plan.version == resolve(run_copy).version and plan.version.startswith("ranker@")
    assert set(plan.stages) == {"prepare", "embed", "align", SIDS, "ranker"}


def test_stages_without_a_manifest_entry_are_accepted(tiny_run):
    assert not {"prepare", "embed"} & set(RunDir(tiny_run.run_dir).read_manifest().stages)
    assert resolve(tiny_run).num_items > 0


def test_a_tampered_ranker_is_refused_before_its_weights_are_loaded(run_copy, monkeypatch):
    weights = Path(run_copy.run_dir) / "ranker" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    opened = []
    monkeypatch.setattr(plan_module, "load_torch_file", lambda *a, **k: opened.append(a))
    with pytest.raises(DataError, match=r"ranker: model\.pt was modified") as err:
        resolve(run_copy)
    assert "sidforge train ranker" in str(err.value) and "sidforge pipeline" in str(err.value)
    assert not opened


@pytest.mark.parametrize(("stage", "file", "change", "said"), [
    ("embed", "item_embeddings.parquet", "modify", "was modified"),
    ("prepare", "item_stats.parquet", "modify", "was modified"),
    (SIDS, "tokenizer.safetensors", "remove", "is missing"),
    ("align", "extra.bin", "add", "was added"),
])
def test_every_stage_served_is_checked(run_copy, stage, file, change, said):
    path = Path(run_copy.run_dir) / stage / file
    if change == "modify":
        path.write_bytes(path.read_bytes() + b"\0")
    elif change == "remove":
        path.unlink()
    else:
        path.write_bytes(b"x")
    with pytest.raises(DataError, match=rf"{stage}: {file} {said} .*re-run `sidforge "):
        resolve(run_copy)


def test_a_tampered_generative_model_is_refused(run_copy):
    run = Path(run_copy.run_dir)
    out = run / "generative-rqkmeans"
    out.mkdir()
    (out / "model.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    _record(run, out.name)
    cfg = _with(run_copy, retriever="generative")
    assert resolve(cfg).generative_dir == out
    (out / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(DataError, match=r"generative-rqkmeans: model\.safetensors was modified.*sidforge train gen"):
        resolve(cfg)


# ----------------------------------------------------------------------------------------------
# pickle payloads planted as weights (with the manifest updated, so they reach the loader)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_planted_ranker_payload_is_never_executed(run_copy, tmp_path, how):
    run = Path(run_copy.run_dir)
    marker = tmp_path / "ranker-payload-ran"
    _plant(run / "ranker" / "model.pt", marker, how)
    _record(run, "ranker")
    with pytest.raises(DataError, match=r"ranker/model\.pt: cannot be loaded.*sidforge train ranker") as err:
        resolve(run_copy)
    assert "weights_only=False" not in str(err.value)  # torch's advice to load it unsafely is not passed on
    with pytest.raises(DataError, match=r"model\.pt: cannot be loaded"):
        load_ranker_file(run / "ranker")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_planted_align_payload_is_never_executed(run_copy, tmp_path, how):
    plan = resolve(run_copy)
    assert plan.align_dir is not None and plan.align_mode == "features"
    marker = tmp_path / "align-payload-ran"
    _plant(plan.align_dir / "model.pt", marker, how)
    for load in (load_align_file, CodeAssigner, load_clip_aligner):
        with pytest.raises(DataError, match=r"align/model\.pt: cannot be loaded.*sidforge train align"):
            load(plan)
    assert not marker.exists()


def test_a_truncated_ranker_file_is_a_clear_error(run_copy):
    weights = Path(run_copy.run_dir) / "ranker" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataError, match=r"ranker/model\.pt: cannot be loaded.*re-run `sidforge train ranker`"):
        load_ranker_file(weights.parent)


# ----------------------------------------------------------------------------------------------
# paths that leave the run directory or the artifact root


def test_serve_sids_cannot_leave_the_run(run_copy, tmp_path):
    run = Path(run_copy.run_dir)
    shutil.copytree(run / SIDS, run.parent / "elsewhere")  # a valid IDs folder, but outside the run
    with pytest.raises(DataError, match=r"serve\.sids: .*/\.\./elsewhere resolves to .*outside"):
        resolve(_with(run_copy, sids="../elsewhere"))
    with pytest.raises(DataError, match=r"serve\.sids: /"):
        resolve(_with(run_copy, sids=str(run.parent / "elsewhere")))


def test_an_absolute_ranker_outside_the_run_is_refused(run_copy, tmp_path):
    outside = tmp_path / "x"
    shutil.copytree(Path(run_copy.run_dir) / "ranker", outside)
    with pytest.raises(DataError, match=r"serve\.ranker: .*outside"):
        resolve(_with(run_copy, ranker=str(outside)))


def test_a_symlinked_stage_folder_pointing_outside_is_refused(run_copy, tmp_path):
    run = Path(run_copy.run_dir)
    outside = tmp_path / "outside-ranker"
    shutil.copytree(run / "ranker", outside)
    (run / "ranker-link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match=r"serve\.ranker: .*/ranker-link resolves to .*outside-ranker"):
        resolve(_with(run_copy, ranker="ranker-link"))
    (run / "inner-link").symlink_to(run / "ranker", target_is_directory=True)  # a link inside the run is fine
    assert resolve(_with(run_copy, ranker="inner-link")).ranker_dir == run / "ranker"


def test_the_sids_recorded_in_the_ranker_file_cannot_leave_the_run(run_copy):
    run = Path(run_copy.run_dir)
    shutil.copytree(run / SIDS, run.parent / "elsewhere")
    meta = torch.load(run / "ranker" / "model.pt", weights_only=True)
    torch.save({**meta, "sids": str(run.parent / "elsewhere")}, run / "ranker" / "model.pt")
    _record(run, "ranker")
    with pytest.raises(DataError, match=r"the sids folder recorded in the ranker's model\.pt"):
        resolve(run_copy)
    assert resolve(_with(run_copy, sids=SIDS)).sids_dir == run / SIDS  # serve.sids overrides it


def test_serve_generative_cannot_leave_the_run(run_copy):
    with pytest.raises(DataError, match=r"serve\.generative: .*/\.\./gen resolves"):
        resolve(_with(run_copy, retriever="generative", generative="../gen"))


def test_with_an_artifact_root_the_run_and_the_log_must_lie_inside_it(run_copy, tmp_path):
    run = Path(run_copy.run_dir)
    root = run.parent
    plan = resolve(_with(run_copy, artifact_root=str(root), catalogue_log=str(root / "added.jsonl")))
    assert plan.serve.catalogue_log == str((root / "added.jsonl").resolve())
    with pytest.raises(DataError, match=r"run_dir: .*outside"):
        resolve(_with(run_copy, artifact_root=str(tmp_path / "other-root")))
    with pytest.raises(DataError, match=r"serve\.catalogue_log: .*/\.\./added\.jsonl resolves"):
        resolve(_with(run_copy, artifact_root=str(root), catalogue_log=str(root / ".." / "added.jsonl")))
    (root / "log-link").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(DataError, match=r"serve\.catalogue_log: .*log-link"):
        resolve(_with(run_copy, artifact_root=str(root), catalogue_log=str(root / "log-link")))


def test_a_catalogue_log_inside_a_checked_stage_folder_is_refused(run_copy):
    log_path = Path(run_copy.run_dir) / "ranker" / "added.jsonl"
    with pytest.raises(DataError, match=r"serve\.catalogue_log: .* lies in the stage folder"):
        resolve(_with(run_copy, catalogue_log=str(log_path)))
