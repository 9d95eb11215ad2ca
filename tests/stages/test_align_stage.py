"""The align stage (SaviorEnc): planted co-clicks it must learn, its outputs, skip/resume, errors, the
open_clip mode on a tiny CLIP, the tiny pipeline feeding tokenize, and one 2-worker Ray Train run.

Planted runs write just what align reads (``prepare/cocliks.parquet``, ``embed/item_embeddings.parquet``):
items carry a weak cluster signal in 4 of 32 dimensions and noise elsewhere, and co-clicks join items of
the same cluster. Raw cosine neighbours are mostly noise; an aligner that finds the signal dimensions
lifts held-out Hit@30 from ~0.15 to ~0.6 (the ceiling is 30 of ~47 cluster mates).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sidforge.models.align import FeatureAligner, FeatureAlignerConfig, OpenClipAligner
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config, ConfigError, load_config
from sidforge.platform.metrics import i2i_hit_at_k
from sidforge.platform.schemas import DataError
from sidforge.stages import align, embed, prepare, tokenize
from sidforge.stages.embed import ItemEmbeddings

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLUSTERS, SIGNAL, NOISE, COLD = 8, 4, 28, 20
QUICK = ["align.batch_size=128", "align.hidden=32", "align.lr=0.01", "align.epochs=8"]


def _planted(run: RunDir, n: int = 400, n_pairs: int = 3000, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a planted run; the last ``COLD`` items are in no pair. Returns the content and the pairs."""
    rng = np.random.default_rng(seed)
    cluster = np.arange(n) % CLUSTERS
    x = np.concatenate([rng.normal(size=(CLUSTERS, SIGNAL))[cluster], rng.normal(size=(n, NOISE))], axis=1)
    per_cluster = (n - COLD) // CLUSTERS
    c = rng.integers(0, CLUSTERS, n_pairs)
    a, b = (c + CLUSTERS * rng.integers(0, per_cluster, n_pairs) for _ in range(2))
    ab = np.unique(np.sort(np.stack([a, b], axis=1)[a != b], axis=1), axis=0)
    split = np.where(rng.random(len(ab)) < 0.2, "heldout", "train")
    for stage in ("prepare", "embed"):
        run.stage_dir(stage).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_a": ab[:, 0], "item_b": ab[:, 1], "count": np.full(len(ab), 2),
                             "weight": rng.uniform(0.5, 1.5, len(ab)), "split": split}),
                   run.stage_dir("prepare") / "cocliks.parquet")
    pq.write_table(ItemEmbeddings(np.arange(n), {"content": x.astype(np.float32)}).to_table(),
                   run.stage_dir("embed") / "item_embeddings.parquet")
    return {"x": x.astype(np.float32), "cluster": cluster, "heldout": ab[split == "heldout"]}


def _z(out_dir: Path) -> np.ndarray:
    table = pq.read_table(out_dir / "item_embeddings.parquet")
    assert table.column_names == ["item_id", "emb_aligned"]
    assert table.column("item_id").to_pylist() == list(range(table.num_rows))
    return ItemEmbeddings.from_table(table).vectors["aligned"]


# ----------------------------------------------------------------------------------------------
# features mode, in process


def test_align_learns_planted_co_clicks_and_embeds_every_item(tiny_config):
    cfg = tiny_config(*QUICK)
    run = RunDir(cfg.run_dir)
    planted = _planted(run)
    res = align.run(cfg, run)

    m = res.metrics
    hit = "hit@30"
    assert m["i2i_before"][hit] < 0.25 and m["valid_before"][hit] < 0.25
    assert m["i2i_after"][hit] > 0.45 and m["i2i_after"][hit] > 3 * m["i2i_before"][hit], m
    assert m["valid_after"][hit] > 0.45
    assert m["i2i_before"] == i2i_hit_at_k(planted["x"], planted["heldout"], k=30)  # raw = the input
    assert m["i2i_after"]["pairs"] == len(planted["heldout"]) == res.rows["heldout_pairs"]
    assert m["mode"] == "features" and m["modalities"] == ["content"] and m["dim"] == 32

    z = _z(res.out_dir)
    assert z.shape == (400, 32) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)  # the cold items too
    saved = torch.load(res.out_dir / "model.pt", weights_only=False)
    model = FeatureAligner(FeatureAlignerConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        again = model(torch.from_numpy(planted["x"])).numpy()
    np.testing.assert_allclose(again, z, atol=1e-5)  # z is a function of content: new items get theirs
    # a cold item lands among its cluster's items
    cold = 400 - 1
    mates = planted["cluster"] == planted["cluster"][cold]
    sims = z @ z[cold]
    assert sims[mates].mean() > sims[~mates].mean() + 0.2

    history = json.loads((res.out_dir / "metrics.json").read_text())["history"]
    best = max(history, key=lambda row: row["valid/hit@30"])
    assert m["best_epoch"] == best["epoch"] and m["valid_after"][hit] == pytest.approx(best["valid/hit@30"])
    assert all({"loss", "pos_cos", "top1_acc"} <= set(row) for row in history)
    assert history[-1]["loss"] < history[0]["loss"]
    entry = run.read_manifest().stages["align"]
    assert entry.metrics["i2i_after"] == m["i2i_after"] and entry.rows == res.rows
    assert res.rows["fit_pairs"] + res.rows["valid_pairs"] + res.rows["heldout_pairs"] == len(
        pq.read_table(run.stage_dir("prepare") / "cocliks.parquet"))
    assert not (run.path / "_train").exists()  # checkpoints go once the outputs are written

    again_res = align.run(cfg, run)
    assert again_res.skipped and again_res.metrics == m
    # operational keys and keys the mode does not use leave the hash alone; what z depends on does not
    same = tiny_config(*QUICK, "align.cpus_per_worker=2", "align.max_failures=3", "align.train_blocks=2",
                       "embed.text_template={title}")
    assert align.stage_config_hash(same) == entry.config_hash
    for change in ("align.temperature=0.2", "seed=1", "align.valid_fraction=0.2", "align.modalities=[content]"):
        assert align.stage_config_hash(tiny_config(*QUICK, change)) != entry.config_hash, change


def test_pair_weights_are_used_and_the_split_is_seeded(tmp_path):
    run = RunDir(tmp_path / "run")
    _planted(run)
    path = run.stage_dir("prepare") / "cocliks.parquet"
    p0, p0_again, p1 = (align.load_pairs(path, 0.1, seed) for seed in (0, 0, 1))
    assert np.array_equal(p0.valid, p0_again.valid) and not np.array_equal(p0.valid, p1.valid)
    table = pq.read_table(path).to_pandas()
    train = table[table["split"] == "train"]
    assert len(p0.fit) + len(p0.valid) == len(train) and len(p0.valid) == round(0.1 * len(train))
    assert not {tuple(r) for r in p0.fit} & {tuple(r) for r in p0.valid}
    lookup = {(a, b): w for a, b, w in train[["item_a", "item_b", "weight"]].itertuples(index=False)}
    np.testing.assert_allclose(p0.fit_weight, [lookup[tuple(r)] for r in p0.fit], rtol=1e-6)


def test_pairs_of_weight_zero_teach_nothing(tiny_config):
    cfg = tiny_config(*QUICK, "align.epochs=3")
    run = RunDir(cfg.run_dir)
    _planted(run)
    path = run.stage_dir("prepare") / "cocliks.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index("weight"), "weight",
                                    pa.array(np.zeros(table.num_rows))), path)
    m = align.run(cfg, run).metrics
    assert m["i2i_after"]["hit@30"] == pytest.approx(m["i2i_before"]["hit@30"], abs=0.01)  # z stayed raw


def test_an_interrupted_stage_resumes_its_training_run(tiny_config, monkeypatch, caplog):
    cfg = tiny_config(*QUICK, "align.epochs=3", "align.patience=10")
    run = RunDir(cfg.run_dir)
    _planted(run)

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(align, "_write_outputs", disk_full)
    with pytest.raises(OSError, match="disk full"):
        align.run(cfg, run)
    assert not run.stage_dir("align").exists() and len(list((run.path / "_train").glob("align-*/epoch_0002"))) == 1
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="sidforge.platform.training"):
        res = align.run(cfg, run)
    assert "resuming after epoch 2" in caplog.text
    assert res.metrics["epochs_run"] == 3 and res.metrics["i2i_after"]["hit@30"] > 0.3


def test_missing_inputs_name_the_command_to_run(tiny_config):
    cfg = tiny_config()
    run = RunDir(cfg.run_dir)
    with pytest.raises(DataError, match=r"prepare/cocliks.parquet not found; run `sidforge prepare`"):
        align.run(cfg, run)
    _planted(run)
    (run.stage_dir("embed") / "item_embeddings.parquet").unlink()
    with pytest.raises(DataError, match=r"embed/item_embeddings.parquet not found; run `sidforge embed`"):
        align.run(cfg, run)
    _planted(run)
    with pytest.raises(DataError, match=r"align.modalities: \['image'\] not in .* \(it has \['content'\]\)"):
        align.run(tiny_config("align.modalities=[image]"), run)
    with pytest.raises(ConfigError, match="align.mode=open_clip .* embed.encoder=precomputed"):
        align.run(tiny_config("align.mode=open_clip"), run)
    with pytest.raises(DataError, match="cannot be split into fit and valid"):
        align.load_pairs(run.stage_dir("prepare") / "cocliks.parquet", 0.0001, 0)


# ----------------------------------------------------------------------------------------------
# open_clip mode, a tiny CLIP built here


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
WORDS = ["lipstick", "shampoo", "perfume", "mascara", "soap", "lotion", "brush", "polish"]


def _clip_run(tiny_config: Any, tmp_path: Path, *overrides: str) -> tuple[Config, RunDir]:
    """A planted run of 120 items with text, colour images per cluster, and three image failures."""
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "tiny-align-clip.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**TINY_CLIP).state_dict(), folder / "tiny-align-clip.pt")
    for c in range(CLUSTERS):
        Image.new("RGB", (40, 40), (30 * c, 255 - 30 * c, (90 * c) % 256)).save(folder / f"c{c}.png")
    (folder / "broken.png").write_text("not a png")
    cfg = tiny_config("align.mode=open_clip", "align.train_blocks=1", "align.batch_size=32", "align.epochs=2",
                      "align.lr=0.001", "embed.encoder=open_clip", f"embed.model={folder / 'tiny-align-clip.json'}",
                      f"embed.checkpoint={folder / 'tiny-align-clip.pt'}", f"embed.image_root={folder}", *overrides)
    run = RunDir(cfg.run_dir)
    planted = _planted(run, n=120, n_pairs=500)
    uris: list[str | None] = [f"c{c}.png" for c in planted["cluster"]]
    uris[3], uris[4], uris[5] = "missing.png", None, "broken.png"
    pq.write_table(pa.table({"item_id": np.arange(120), "title": [f"{WORDS[c]} item {i}" for i, c in
                                                                  enumerate(planted["cluster"])],
                             "image_uri": pa.array(uris, pa.string())}),
                   run.stage_dir("prepare") / "items.parquet")
    return cfg, run


def test_open_clip_mode_tunes_the_last_blocks_of_both_towers(tiny_config, tmp_path):
    cfg, run = _clip_run(tiny_config, tmp_path)
    res = align.run(cfg, run)

    z = _z(res.out_dir)
    assert z.shape == (120, 32)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    m = res.metrics
    assert (m["text_only"], m["image_missing_uri"], m["image_unreadable"]) == (3, 1, 2)
    assert m["mode"] == "open_clip" and m["epochs_run"] == 2 and {"i2i_before", "i2i_after"} <= set(m)

    saved = torch.load(res.out_dir / "model.pt", weights_only=False)
    assert saved["config"]["use_images"] and saved["config"]["train_blocks"] == 1
    keys = set(saved["state_dict"])  # only what was tuned
    assert any(k.startswith("clip.visual.transformer.resblocks.1.") for k in keys)
    assert any(k.startswith("clip.transformer.resblocks.1.") for k in keys)
    assert not any(".resblocks.0." in k or "token_embedding" in k for k in keys)

    # base weights + the saved blocks reproduce z; the un-tuned model gives "before"
    items = align.clip_inputs(cfg, run)
    model = align.build_aligner("open_clip", items.model)
    align.load_trainable(model, saved["state_dict"])
    np.testing.assert_allclose(align.embed_all(model, items, torch.device("cpu")), z, atol=1e-5)
    heldout = pq.read_table(run.stage_dir("prepare") / "cocliks.parquet").to_pandas().query("split == 'heldout'")
    assert m["i2i_before"] == i2i_hit_at_k(items.raw, heldout[["item_a", "item_b"]].to_numpy(), k=30)
    assert np.abs(items.raw - z).max() > 1e-3  # fine-tuning moved the embeddings
    assert not items.has_image[[3, 4, 5]].any() and items.has_image[[0, 1, 2]].all()

    assert align.run(cfg, run).skipped
    base = align.stage_config_hash(cfg)
    assert align.stage_config_hash(dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, hidden=7))) == base
    assert align.stage_config_hash(dataclasses.replace(cfg, embed=dataclasses.replace(
        cfg.embed, text_template="{title}!"))) != base


def test_open_clip_aligner_loads_the_checkpoint_named_by_embed(tiny_config, tmp_path):
    cfg, run = _clip_run(tiny_config, tmp_path)
    items = align.clip_inputs(cfg, run)
    model = align.build_aligner("open_clip", items.model)
    assert isinstance(model, OpenClipAligner)
    state = torch.load(cfg.embed.checkpoint, weights_only=True)
    assert torch.equal(model.clip.token_embedding.weight, state["token_embedding.weight"])


# ----------------------------------------------------------------------------------------------
# the tiny pipeline: prepare → embed → align → tokenize (needs Ray for prepare)


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory) -> Path:
    """One prepare + embed run of configs/tiny.yaml; tests copy it into their own run directory."""
    tmp = tmp_path_factory.mktemp("tiny-align")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={tmp / 'run'}"])
    run = RunDir(cfg.run_dir)
    prepare.run(cfg, run, tmp)
    embed.run(cfg, run)
    return run.path


def _copy(prepared: Path, cfg: Config) -> RunDir:
    run = RunDir(cfg.run_dir)
    for stage in ("prepare", "embed"):
        shutil.copytree(prepared / stage, run.stage_dir(stage))
    return run


@pytest.mark.ray
def test_tiny_pipeline_aligns_every_item_and_tokenize_reads_the_output(prepared, tiny_config):
    cfg = tiny_config("align.batch_size=64", "align.hidden=32", "align.epochs=4", "tokenize.source=align",
                      "tokenize.method=rqkmeans", "tokenize.levels=2", "tokenize.codebook_size=16")
    run = _copy(prepared, cfg)
    res = align.run(cfg, run)

    stats = pq.read_table(run.stage_dir("prepare") / "item_stats.parquet").to_pandas().sort_values("item_id")
    z = _z(res.out_dir)
    assert z.shape == (len(stats), cfg.synthetic.feature_dim)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert (stats["bucket"] == "cold").sum() > 0  # cold items never co-clicked, and still embedded
    for key in ("i2i_before", "i2i_after", "valid_before", "valid_after"):
        assert 0.0 <= res.metrics[key]["hit@30"] <= 1.0 and res.metrics[key]["pairs"] > 0
    assert 0 <= res.metrics["best_epoch"] < 4

    tok = tokenize.run(cfg, run)
    sids = pq.read_table(tok.out_dir / "sids.parquet")
    assert sids.num_rows == len(stats)
    meta = json.loads((tok.out_dir / "tokenizer.json").read_text())
    assert meta["source"] == "align" and meta["modalities"] == ["aligned"] and meta["input_dim"] == z.shape[1]


# ----------------------------------------------------------------------------------------------
# real Ray Train workers


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_learn_the_planted_co_clicks(ray_cluster, tiny_config, caplog):
    cfg = tiny_config(*QUICK, "align.num_workers=2")
    run = RunDir(cfg.run_dir)
    planted = _planted(run)
    with caplog.at_level(logging.INFO, logger="sidforge.platform.training"):
        res = align.run(cfg, run)
    assert "training on 2 workers" in caplog.text
    m = res.metrics
    assert m["i2i_before"]["hit@30"] < 0.25
    assert m["i2i_after"]["hit@30"] > 0.45 and m["valid_after"]["hit@30"] > 0.45, m
    z = _z(res.out_dir)  # rank 0's z of the best epoch, returned as numpy
    assert z.shape == planted["x"].shape
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
