"""Synthetic logs: shards, sequence lengths, and the planted truth (popularity, clusters, content)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sidforge.platform.config import SyntheticConfig
from sidforge.platform.schemas import ITEM_CONTENT
from sidforge.platform.synthetic import write_synthetic

CFG = SyntheticConfig(num_users=400, num_items=200, num_clusters=8, mean_seq_len=10.0, min_seq_len=5,
                      zipf_a=1.1, stickiness=0.8, feature_dim=16, noise=0.3, seed=3, shard_rows=1000)


def _read(src) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in src.interactions]).sort_by(
        [("user_id", "ascending"), ("position", "ascending")])


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory):
    src = write_synthetic(CFG, tmp_path_factory.mktemp("synthetic"))
    return src, _read(src)


def _same_cluster_rate(inter: pa.Table, cluster: np.ndarray) -> float:
    user = inter.column("user_id").to_numpy()
    c = cluster[inter.column("item_id").to_numpy()]
    same_user = user[1:] == user[:-1]
    return float(np.mean(c[1:][same_user] == c[:-1][same_user]))


def test_writes_parquet_shards(synth):
    src, _ = synth
    users_per_shard = int(CFG.shard_rows / CFG.mean_seq_len)  # 100
    assert len(src.files) == CFG.num_users // users_per_shard == 4
    assert src.interactions == [str(f) for f in src.files]
    assert all(Path(f).suffix == ".parquet" and Path(f).is_file() for f in src.files)
    assert src.order == "position" and src.file_format == "parquet" and not src.has_official_split
    # each user lives in exactly one shard
    per_shard = [set(pq.read_table(f, columns=["user_id"]).column(0).to_pylist()) for f in src.files]
    assert sum(len(s) for s in per_shard) == len(set().union(*per_shard)) == CFG.num_users


def test_sequences_are_long_enough_and_positions_contiguous(synth):
    _, inter = synth
    user = inter.column("user_id").to_numpy()
    pos = inter.column("position").to_numpy()
    ids, lengths = np.unique(user, return_counts=True)
    np.testing.assert_array_equal(ids, np.arange(CFG.num_users))
    assert lengths.min() >= CFG.min_seq_len
    assert abs(lengths.mean() - CFG.mean_seq_len) < 1.5
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    np.testing.assert_array_equal(pos, np.arange(len(pos)) - np.repeat(starts, lengths))


def test_item_ids_in_range_and_items_table(synth):
    src, inter = synth
    item = inter.column("item_id").to_numpy()
    assert item.min() >= 0 and item.max() < CFG.num_items
    items = src.items
    assert items.num_rows == CFG.num_items
    np.testing.assert_array_equal(items.column("item_id").to_numpy(), np.arange(CFG.num_items))
    for f in ITEM_CONTENT:
        assert items.schema.field(f.name).type == f.type
    assert items.schema.field("feat_content").type == pa.list_(pa.float32(), CFG.feature_dim)
    cluster = items.column("cluster").to_numpy()
    assert set(cluster.tolist()) == set(range(CFG.num_clusters))  # every cluster has an item
    # the category names the cluster: one category per cluster and vice versa
    cats = [c[0] for c in items.column("categories").to_pylist()]
    assert len(set(zip(cats, cluster.tolist()))) == len(set(cats)) == CFG.num_clusters
    assert all(t.startswith(c + " ") for t, c in zip(items.column("title").to_pylist(), cats))


def test_popularity_is_skewed(synth):
    _, inter = synth
    counts = np.bincount(inter.column("item_id").to_numpy(), minlength=CFG.num_items)
    top = np.sort(counts)[::-1][: CFG.num_items // 10]
    assert top.sum() / counts.sum() > 0.3


def test_consecutive_items_share_a_cluster(synth):
    src, inter = synth
    cluster = src.items.column("cluster").to_numpy()
    rate = _same_cluster_rate(inter, cluster)
    share = np.bincount(cluster[inter.column("item_id").to_numpy()], minlength=CFG.num_clusters)
    share = share / share.sum()
    chance = float(np.sum(share ** 2))
    assert rate >= CFG.stickiness - 0.1
    assert rate > chance + 0.3, (rate, chance)


def test_stickiness_zero_is_near_chance(tmp_path: Path):
    cfg = SyntheticConfig(**{**CFG.__dict__, "stickiness": 0.0, "num_users": 200})
    src = write_synthetic(cfg, tmp_path)
    inter = _read(src)
    cluster = src.items.column("cluster").to_numpy()
    assert _same_cluster_rate(inter, cluster) < CFG.stickiness - 0.3


def test_content_features_cluster(synth):
    src, _ = synth
    items = src.items
    feats = np.asarray(items.column("feat_content").combine_chunks().flatten()).reshape(-1, CFG.feature_dim)
    cluster = items.column("cluster").to_numpy()
    dist = np.linalg.norm(feats[:, None, :] - feats[None, :, :], axis=-1)
    same = cluster[:, None] == cluster[None, :]
    off_diag = ~np.eye(len(cluster), dtype=bool)
    # unit-norm centres plus noise 0.3 per dimension: ~1.7 apart within a cluster, ~2.2 between
    within, between = dist[same & off_diag].mean(), dist[~same].mean()
    assert within < between - 0.3, (within, between)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert cos[same & off_diag].mean() > 0.3 and abs(cos[~same].mean()) < 0.1
    # the nearest cluster mean recovers the cluster for most items
    centres = np.stack([feats[cluster == k].mean(axis=0) for k in range(CFG.num_clusters)])
    nearest = np.linalg.norm(feats[:, None, :] - centres[None, :, :], axis=-1).argmin(axis=1)
    assert np.mean(nearest == cluster) > 0.85


def test_same_seed_same_logs_other_seed_other_logs(synth, tmp_path: Path):
    _, inter = synth
    again = _read(write_synthetic(CFG, tmp_path / "again"))
    assert again.equals(inter)
    other = _read(write_synthetic(SyntheticConfig(**{**CFG.__dict__, "seed": 4}), tmp_path / "other"))
    assert not other.equals(inter)
