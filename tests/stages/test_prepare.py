"""The prepare stage on Ray Data: counts, no leakage, rejects, skip/rebuild, atomic output."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sidforge.platform.artifacts import RunDir
from sidforge.platform.logs import coclick_counts
from sidforge.stages import prepare

pytestmark = pytest.mark.ray


def _read(out: Path, name: str) -> pd.DataFrame:
    return pq.read_table(out / name).to_pandas()


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    """One prepare run of configs/tiny.yaml shared by the tests that only read it."""
    from sidforge.platform.config import load_config

    tmp = tmp_path_factory.mktemp("tiny")
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", [f"run_dir={tmp / 'run'}"])
    return cfg, prepare.run(cfg, RunDir(cfg.run_dir), tmp)


def test_tiny_synthetic_tables_are_consistent(tiny_run):
    cfg, res = tiny_run
    inter = _read(res.out_dir, "interactions")
    stats = _read(res.out_dir, "item_stats.parquet")
    items = _read(res.out_dir, "items.parquet")

    assert res.rows["users"] == cfg.synthetic.num_users
    assert res.rows["items"] == len(items) == len(stats)
    assert sorted(items["item_id"]) == list(range(len(items)))
    per_user = inter.groupby("user_id")["split"].value_counts().unstack(fill_value=0)
    assert (per_user["valid"] == 1).all() and (per_user["test"] == 1).all()
    # valid and test are the last two positions of each user
    last = inter.sort_values(["user_id", "position"]).groupby("user_id").tail(2)
    assert set(last["split"]) == {"valid", "test"}
    # train counts are exactly the train interactions
    train = inter[inter["split"] == "train"]
    expected = np.bincount(train["item_id"], minlength=len(stats))
    assert (stats.sort_values("item_id")["train_count"].to_numpy() == expected).all()
    # cold hold-out items never occur in train
    cold = set(stats.loc[stats["cold_holdout"], "item_id"])
    assert len(cold) == round(cfg.prepare.cold_item_fraction * len(items))
    assert not cold & set(train["item_id"])
    assert (stats.loc[stats["cold_holdout"], "bucket"] == "cold").all()
    # manifest
    manifest = json.loads((Path(cfg.run_dir) / "manifest.json").read_text())
    entry = manifest["stages"]["prepare"]
    assert entry["rows"]["interactions"] == len(inter)
    assert entry["inputs"] and entry["outputs"] and entry["wall_time_s"] > 0


def test_valid_and_test_never_reach_cocliks_or_stats(ray_cluster, tiny_config, tmp_path):
    # every user's last two items are items no one has in their training part
    rng = np.random.default_rng(0)
    rows = []
    for u in range(200):
        seq = list(rng.integers(0, 40, size=6)) + [1000 + u, 2000 + u]
        rows += [(u, int(it), pos) for pos, it in enumerate(seq)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "position"])
    path = tmp_path / "logs.parquet"
    df.to_parquet(path)
    cfg = tiny_config("data.source=table", f"data.interactions={path}", "prepare.cold_item_fraction=0.0",
                      "prepare.coclick.min_count=1", "prepare.coclick.max_per_item=1000",
                      "prepare.driver_merge_rows=0")  # the cluster-side pair sums
    res = prepare.run(cfg, RunDir(cfg.run_dir), tmp_path)
    items = _read(res.out_dir, "items.parquet")
    stats = _read(res.out_dir, "item_stats.parquet").merge(items[["item_id", "source_id"]], on="item_id")
    pairs = _read(res.out_dir, "cocliks.parquet")
    held = set(items.loc[items["source_id"] >= 1000, "item_id"])
    assert len(held) == 400
    assert (stats.loc[stats["source_id"] >= 1000, "train_count"] == 0).all()
    assert (stats.loc[stats["source_id"] >= 1000, "bucket"] == "cold").all()
    assert not held & (set(pairs["item_a"]) | set(pairs["item_b"]))
    # and the pairs are exactly those of the training parts
    inter = _read(res.out_dir, "interactions")
    train = inter[inter["split"] == "train"].sort_values(["user_id", "position"])
    a, b, c = coclick_counts(train["user_id"].to_numpy(), train["item_id"].to_numpy(), cfg.prepare.coclick.window)
    got = pairs.sort_values(["item_a", "item_b"])
    assert (got["item_a"].to_numpy() == a).all() and (got["count"].to_numpy() == c).all()


def test_bad_rows_are_set_aside_and_counted(ray_cluster, tiny_config, tmp_path):
    df = pd.DataFrame({
        "user_id": ["u1"] * 5 + ["u2"] * 2 + [None, "u3", "u3", "u3", "u3"],
        "item_id": ["a", "b", "c", "c", "d", "a", "b", "a", None, "a", "b", "c"],
        "timestamp": [1, 2, 3, 3, 4, 1, 2, 5, 1, 1, 2, 3],
    })
    logs = tmp_path / "logs.csv"
    df.to_csv(logs, index=False)
    items = tmp_path / "items.csv"
    pd.DataFrame({"item_id": ["a", "b", "b", "c", "d"], "title": ["A", "B", "B2", "C", "D"],
                  "categories": ["x|y", "x", "x", None, "z"]}).to_csv(items, index=False)
    cfg = tiny_config("data.source=table", f"data.interactions={logs}", f"data.items={items}",
                      "prepare.cold_item_fraction=0.0")
    res = prepare.run(cfg, RunDir(cfg.run_dir), tmp_path)
    rejects = _read(res.out_dir, "rejects.parquet")
    by_reason = rejects["reason"].value_counts().to_dict()
    assert by_reason == {"null_user_id": 1, "null_item_id": 1, "duplicate_interaction": 1,
                         "short_sequence": 2, "duplicate_item_id": 1}
    assert res.metrics["rejects_by_reason"] == by_reason
    assert res.rows["users"] == 2 and res.rows["interactions"] == 4 + 3
    items_out = _read(res.out_dir, "items.parquet").set_index("source_id")
    assert items_out.loc["b", "title"] == "B"  # first of the duplicate rows wins
    assert list(items_out.loc["a", "categories"]) == ["x", "y"]


def test_rerun_skips_and_a_change_is_noticed(tiny_run, tmp_path):
    cfg, first = tiny_run
    assert not first.skipped
    stamp = (first.out_dir / "item_stats.parquet").stat().st_mtime_ns
    again = prepare.run(cfg, RunDir(cfg.run_dir), tmp_path)
    assert again.skipped and again.rows == first.rows
    assert (first.out_dir / "item_stats.parquet").stat().st_mtime_ns == stamp
    run = RunDir(cfg.run_dir)
    # a changed config or a tampered output means the stage is not current any more
    from sidforge.stages.prepare import stage_config_hash

    entry = run.read_manifest().stages["prepare"]
    changed = dataclasses.replace(cfg, prepare=dataclasses.replace(cfg.prepare, min_seq_len=4))
    assert stage_config_hash(changed) != entry.config_hash
    assert run.is_current("prepare", entry.config_hash, entry.inputs)
    original = (first.out_dir / "item_stats.parquet").read_bytes()
    (first.out_dir / "item_stats.parquet").write_bytes(b"garbage")
    try:
        assert not run.is_current("prepare", entry.config_hash, entry.inputs)
    finally:
        (first.out_dir / "item_stats.parquet").write_bytes(original)


def test_failure_leaves_nothing_half_written(tiny_run, tmp_path, monkeypatch):
    cfg, _ = tiny_run
    run = RunDir(cfg.run_dir)
    before = run.manifest_path.read_text()
    outputs = sorted(p.name for p in run.stage_dir("prepare").iterdir())

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare, "_coclicks", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare.run(cfg, run, tmp_path, force=True)
    assert run.manifest_path.read_text() == before
    assert sorted(p.name for p in run.stage_dir("prepare").iterdir()) == outputs
    assert not [p for p in run.path.iterdir() if p.name.startswith(".prepare.tmp")]


@pytest.mark.data
def test_amazon_beauty_counts(ray_cluster, data_dir, tmp_path):
    from sidforge.platform.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "amazon-beauty.yaml",
                      [f"run_dir={tmp_path / 'beauty'}"])
    res = prepare.run(cfg, RunDir(cfg.run_dir), data_dir)
    assert res.rows["users"] == 22_363
    assert res.rows["items"] == 12_101
    assert res.rows["interactions"] == 198_502
    assert res.rows["split_test"] == 22_363 and res.rows["split_valid"] == 22_363
    assert res.metrics["items_with_title"] == 12_094
    assert res.rows["rejects"] == 0
    items = pq.read_table(res.out_dir / "items.parquet").to_pandas()
    assert items["categories"].map(len).gt(0).all()
    assert items["brand"].notna().sum() > 5_000
    # item_id is the S3-Rec id minus one
    assert (items["source_id"].to_numpy() == np.arange(1, 12_102)).all()
    assert pa.types.is_integer(pq.read_schema(res.out_dir / "items.parquet").field("source_id").type)
