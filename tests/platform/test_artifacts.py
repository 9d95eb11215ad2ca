"""Run-directory manifests: concurrent stage records from several processes all survive."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from sidforge.platform.artifacts import RunDir, StageEntry, now_iso


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
