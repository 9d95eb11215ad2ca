"""Run directories: stage outputs, the manifest, fingerprints and atomic writes.

A run directory holds one folder per stage plus ``manifest.json``. A stage writes into a temporary
sibling folder and renames it into place only when everything is written, then records its manifest
entry (config hash, input fingerprints, output fingerprints, row counts, metrics, wall time). A stage
whose entry matches its current config and inputs, and whose outputs still match their recorded
fingerprints, is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from sidforge.platform.schemas import DataError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class StageEntry(BaseModel):
    """One stage's record in the manifest."""

    config_hash: str
    inputs: dict[str, str] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    rows: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    wall_time_s: float = 0.0
    finished_at: str = ""


class Manifest(BaseModel):
    version: int = MANIFEST_VERSION
    stages: dict[str, StageEntry] = Field(default_factory=dict)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_files(paths: list[Path], root: Path | None = None) -> dict[str, str]:
    """sha256 of each file, keyed by its path (relative to ``root`` when given)."""
    out = {}
    for p in sorted(set(paths)):
        key = str(p.relative_to(root)) if root is not None else str(p)
        out[key] = file_sha256(p)
    return out


def fingerprint_tree(folder: Path) -> dict[str, str]:
    """Fingerprints of every file under ``folder``, keyed by relative path."""
    return fingerprint_files([p for p in folder.rglob("*") if p.is_file()], root=folder)


def first_difference(recorded: dict[str, str], actual: dict[str, str]) -> str | None:
    """The first file (in path order) whose fingerprint differs between two :func:`fingerprint_tree`
    results, said in words (``model.pt was modified``); ``None`` when they are equal."""
    for name in sorted(set(recorded) | set(actual)):
        if name not in actual:
            return f"{name} is missing"
        if name not in recorded:
            return f"{name} was added"
        if recorded[name] != actual[name]:
            return f"{name} was modified"
    return None


def inside(root: str | Path, path: str | Path, field: str) -> Path:
    """``path`` resolved (symlinks and ``..`` followed), refused unless it lies in ``root`` (resolved too).

    Args:
        root: the folder ``path`` must stay in.
        path: the path to check; a relative one is taken from the working directory, so join a path
            that is relative to ``root`` onto it first (``root / name``; an absolute ``name`` wins).
        field: what named ``path`` (``serve.sids``), for the error.

    Returns:
        The resolved path.

    Raises:
        DataError: ``path`` leaves ``root``; the message names ``field``.
    """
    base = Path(root).expanduser().resolve()
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_relative_to(base):
        raise DataError(f"{field}: {path} resolves to {resolved}, outside {base}; point {field} at a path inside "
                        f"{base} (no absolute path elsewhere, no '..' or symlink leading out)")
    return resolved


def load_torch_file(path: Path, fix: str, map_location: Any = "cpu") -> Any:
    """A ``torch.save`` file loaded with ``weights_only=True``: tensors and plain values only, never code.

    A pickle payload planted in the file (an object whose ``__reduce__`` runs something) is refused by
    torch's restricted unpickler before anything runs.

    Args:
        path: the file.
        fix: what to do when it cannot be loaded (``re-run `sidforge train ranker```).
        map_location: where the tensors land.

    Raises:
        DataError: the file is missing, truncated, foreign or holds more than tensors and plain values;
            the message names the file and ``fix``.
    """
    import torch

    if not path.is_file():
        raise DataError(f"{path} not found; {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for a refused object, RuntimeError/EOFError for a broken file
        raise DataError(f"{path}: cannot be loaded as tensors and plain values ({_load_reason(e)}); the file is "
                        f"damaged or was not written by sidforge; {fix}") from None


@dataclass
class StageResult:
    """What a stage's ``run`` returns: where it wrote, whether it was skipped, and its manifest figures."""

    out_dir: Path
    skipped: bool
    rows: dict[str, int]
    metrics: dict[str, Any]
    wall_time_s: float


class RunDir:
    """A run directory on the local filesystem."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> Manifest:
        if not self.manifest_path.exists():
            return Manifest()
        try:
            return Manifest.model_validate_json(self.manifest_path.read_text())
        except ValueError as e:
            raise ValueError(f"{self.manifest_path}: unreadable manifest ({e}); delete it to rebuild the run") from e

    def record(self, stage: str, entry: StageEntry) -> None:
        """Write ``stage``'s manifest entry atomically.

        The read-modify-write holds an exclusive lock on ``.manifest.lock``, so two processes finishing
        stages of one run directory at the same time (two ranker variants, say) both keep their entry.
        """
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".manifest.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            manifest = self.read_manifest()
            manifest.stages[stage] = entry
            tmp = self.manifest_path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text(manifest.model_dump_json(indent=2))
            os.replace(tmp, self.manifest_path)

    def check_outputs(self, stage: str, fix: str) -> None:
        """Refuse ``stage`` when its files no longer match the fingerprints recorded when it finished.

        A stage without a manifest entry (written by hand, or by an older version) is not checked.

        Args:
            stage: the stage folder, relative to the run directory.
            fix: how to rebuild it, for the error.

        Raises:
            DataError: a file was modified, removed or added; the message names the stage and the file.
        """
        entry = self.read_manifest().stages.get(stage)
        if entry is None:
            return
        folder = self.stage_dir(stage)
        actual = fingerprint_tree(folder) if folder.is_dir() else {}
        diff = first_difference(entry.outputs, actual)
        if diff is not None:
            raise DataError(f"{stage}: {diff} in {folder} since the stage finished (its files no longer match the "
                            f"fingerprints in {self.manifest_path}); {fix}")

    def is_current(self, stage: str, config_hash: str, inputs: dict[str, str]) -> bool:
        """True when ``stage`` ran with this config and these inputs and its outputs are intact."""
        entry = self.read_manifest().stages.get(stage)
        if entry is None or entry.config_hash != config_hash or entry.inputs != inputs:
            return False
        out = self.stage_dir(stage)
        if not out.is_dir():
            return False
        actual = fingerprint_tree(out)
        if actual != entry.outputs:
            log.warning("%s: outputs do not match their recorded fingerprints; rebuilding", out)
            return False
        return True

    def cached(self, stage: str, config_hash: str, inputs: dict[str, str]) -> StageResult | None:
        """The recorded result of ``stage`` when it is current (see :meth:`is_current`), else ``None``."""
        if not self.is_current(stage, config_hash, inputs):
            return None
        entry = self.read_manifest().stages[stage]
        log.info("%s: inputs and config unchanged, skipping (%s)", stage, self.stage_dir(stage))
        return StageResult(self.stage_dir(stage), True, entry.rows, entry.metrics, 0.0)

    def finish(self, stage: str, config_hash: str, inputs: dict[str, str], rows: dict[str, int],
               metrics: dict[str, Any], started: float) -> StageResult:
        """Record the manifest entry of a stage whose outputs are in place; ``started`` is a perf_counter()."""
        wall = time.perf_counter() - started
        final = self.stage_dir(stage)
        self.record(stage, StageEntry(config_hash=config_hash, inputs=inputs, outputs=fingerprint_tree(final),
                                      rows=rows, metrics=metrics, wall_time_s=round(wall, 3), finished_at=now_iso()))
        return StageResult(final, False, rows, metrics, wall)

    @contextlib.contextmanager
    def writing(self, stage: str) -> Iterator[Path]:
        """Yield a temporary folder; on success it replaces the stage folder, on failure it is removed."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.stage_dir(stage)
        if final.exists():
            old = self.path / f".{stage}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)


def _load_reason(e: Exception) -> str:
    """The gist of a ``torch.load`` failure, without torch's advice to retry with ``weights_only=False``."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = text.split(". Please use", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else 'no detail'}"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def prepare_fingerprints(run: RunDir) -> dict[str, str]:
    """Fingerprints of what the trainers read from ``RUN/prepare`` (interactions and item_stats)."""
    prep = run.stage_dir("prepare")
    inter = prep / "interactions"
    if not inter.is_dir() or not (prep / "item_stats.parquet").is_file():
        raise DataError(f"{prep} has no interactions/ or item_stats.parquet; run `sidforge prepare` first")
    files = [p for p in inter.rglob("*") if p.is_file()] + [prep / "item_stats.parquet"]
    return fingerprint_files(files, root=run.path)


def sids_fingerprints(run: RunDir, sids: Path) -> dict[str, str]:
    """Fingerprint of a tokenizer's ``sids.parquet`` (relative to the run when it lies inside it)."""
    if not (sids / "sids.parquet").is_file():
        raise DataError(f"{sids / 'sids.parquet'} not found; run `sidforge tokenize` first or point --sids "
                        "at a RUN/tokenize-<name> folder")
    return fingerprint_files([sids / "sids.parquet"], root=run.path if sids.is_relative_to(run.path) else None)
