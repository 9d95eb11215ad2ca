"""Run-directory manifests: concurrent stage records from several processes all survive; stage outputs are
checked against their fingerprints; paths are kept inside a root."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from sidforge.platform.artifacts import RunDir, StageEntry, fingerprint_tree, inside, now_iso
from sidforge.platform.schemas import DataError


def _record_many(path: str, worker: int) -> None:
    run = RunDir(path)
    for i in range(15):
        run.record(f"stage-{worker}-{i}", StageEntry(config_hash="h", inputs={}, outputs={}, rows={}, metrics={},
                                                     wall_time_s=0.0, finished_at=now_iso()))


def test_concurrent_records_keep_every_entry(tmp_path: Path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    stages = RunDir(tmp_path).read_manifest().stages
    assert sorted(stages) == sorted(f"stage-{w}-{i}" for w in range(4) for i in range(15))


def test_inside_follows_dots_and_symlinks(tmp_path: Path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path, target_is_directory=True)
    assert inside(root, root / "a" / ".." / "a", "f") == (root / "a").resolve()
    assert inside(root, root, "f") == root.resolve()
    for path in (root / ".." / "x", tmp_path / "x", root / "out" / "x", "/etc/passwd"):
        with pytest.raises(DataError, match=r"^serve\.sids: .* outside "):
            inside(root, path, "serve.sids")


def test_check_outputs_names_the_first_changed_file(tmp_path: Path):
    run = RunDir(tmp_path)
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "b.bin").write_bytes(b"b")
    (tmp_path / "other").mkdir()
    run.check_outputs("other", "fix it")  # no manifest entry: not checked
    run.record("stage", StageEntry(config_hash="h", outputs=fingerprint_tree(tmp_path / "stage")))
    run.check_outputs("stage", "fix it")
    (tmp_path / "stage" / "a.bin").write_bytes(b"a")
    with pytest.raises(DataError, match=r"^stage: a\.bin was added in .*; fix it$"):
        run.check_outputs("stage", "fix it")
    (tmp_path / "stage" / "a.bin").unlink()
    (tmp_path / "stage" / "b.bin").write_bytes(b"B")
    with pytest.raises(DataError, match=r"^stage: b\.bin was modified"):
        run.check_outputs("stage", "fix it")
    (tmp_path / "stage" / "b.bin").unlink()
    with pytest.raises(DataError, match=r"^stage: b\.bin is missing"):
        run.check_outputs("stage", "fix it")
