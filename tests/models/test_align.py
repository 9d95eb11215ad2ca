"""SaviorEnc aligners: the InfoNCE loss by hand, the residual start, learning planted pairs, and which
open_clip parameters a step may move (a tiny CLIP built here, no download)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sidforge.models.align import (
    ClipInputs,
    FeatureAligner,
    FeatureAlignerConfig,
    OpenClipAligner,
    info_nce,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


# ----------------------------------------------------------------------------------------------
# info_nce


def test_info_nce_matches_a_hand_computed_case():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [3.0, 0.0]])  # both partners point the same way (normalised first)
    # logits (T = 1): a0·b = [1, 1], a1·b = [0, 0]; b0·a = [1, 0], b1·a = [1, 0]
    pair0 = (math.log(2) + math.log(1 + math.exp(-1))) / 2
    pair1 = (math.log(2) + math.log(1 + math.exp(1))) / 2
    assert float(info_nce(a, b, 1.0)) == pytest.approx((pair0 + pair1) / 2, rel=1e-6)
    w = torch.tensor([1.0, 3.0])
    assert float(info_nce(a, b, 1.0, w)) == pytest.approx((pair0 + 3 * pair1) / 4, rel=1e-6)
    assert float(info_nce(a, b, 1.0, 10 * w)) == pytest.approx(float(info_nce(a, b, 1.0, w)), rel=1e-6)
    # symmetric: swapping the sides changes nothing
    assert float(info_nce(b, a, 1.0, w)) == pytest.approx(float(info_nce(a, b, 1.0, w)), rel=1e-6)
    # temperature divides the logits: identity pairs at T = 0.5 give log(1 + e^-2) per direction
    eye = torch.eye(2)
    assert float(info_nce(eye, eye, 0.5)) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_aligned_pairs_have_lower_loss_than_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 16, generator=g)
    b = a + 0.1 * torch.randn(32, 16, generator=g)
    shuffled = b[torch.randperm(32, generator=g)]
    assert float(info_nce(a, b, 0.1)) < 0.1 < float(info_nce(a, shuffled, 0.1))


def test_info_nce_rejects_bad_shapes_and_temperatures():
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        info_nce(torch.zeros(3, 4), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.ones(3, 4), torch.ones(3, 4), 0.0)


# ----------------------------------------------------------------------------------------------
# FeatureAligner


def test_residual_aligner_starts_exactly_at_the_normalised_input():
    torch.manual_seed(0)
    model = FeatureAligner(FeatureAlignerConfig(input_dim=12, hidden=24))
    x = torch.randn(7, 12) * 3
    x[2] = 0.0
    z = model(x)
    assert torch.equal(z, F.normalize(x, dim=-1))
    assert torch.equal(z[2], torch.zeros(12))  # an item without content stays zero, not NaN


def test_projection_aligner_maps_to_unit_rows_of_out_dim():
    model = FeatureAligner(FeatureAlignerConfig(input_dim=12, hidden=24, out_dim=5, residual=False))
    z = model(torch.randn(4, 12))
    assert z.shape == (4, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="residual=True needs out_dim"):
        FeatureAlignerConfig(input_dim=12, out_dim=5, residual=True)


def test_a_few_steps_on_planted_pairs_raise_their_cosine():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    pairs = torch.stack([torch.arange(32), torch.arange(32, 64)], dim=1)  # unrelated contents, planted as co-clicks
    model = FeatureAligner(FeatureAlignerConfig(input_dim=16, hidden=64, temperature=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def pair_cos() -> float:
        with torch.no_grad():
            z = model(x)
        return float((z[pairs[:, 0]] * z[pairs[:, 1]]).sum(1).mean())

    before = pair_cos()
    losses = []
    for _ in range(60):
        out = model.loss(x[pairs[:, 0]], x[pairs[:, 1]])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert abs(before) < 0.15  # random directions
    assert pair_cos() > before + 0.5
    assert losses[-1] < 0.5 * losses[0]
    assert float(out.metrics["top1_acc"]) > 0.9


# ----------------------------------------------------------------------------------------------
# OpenClipAligner


@pytest.fixture
def tiny_clip() -> torch.nn.Module:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CLIP)


def _items(n: int, seed: int, has_image: list[bool] | None = None) -> ClipInputs:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 49406, (n, 16), generator=g)
    tokens[:, -1] = 49407  # the end-of-text token: the text tower pools at the highest id
    has = None if has_image is None else torch.tensor(has_image)
    return ClipInputs(tokens, torch.randn(n, 3, 32, 32, generator=g), has)


def _trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_open_clip_aligner_unfreezes_only_the_last_blocks(tiny_clip):
    model = OpenClipAligner(tiny_clip, train_blocks=1, temperature=0.1)
    trainable = _trainable(model)
    prefixes = ("clip.transformer.resblocks.1.", "clip.ln_final.", "clip.visual.transformer.resblocks.1.",
                "clip.visual.ln_post.")
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(prefixes) or n in ("clip.text_projection", "clip.visual.proj")}
    assert any(n.startswith("clip.visual.") for n in trainable)
    assert "clip.logit_scale" not in trainable and "clip.token_embedding.weight" not in trainable
    text_only = OpenClipAligner(tiny_clip, train_blocks=2, temperature=0.1, use_images=False)
    assert not any(n.startswith("clip.visual.") for n in _trainable(text_only))
    assert {n for n in _trainable(text_only) if ".resblocks.0." in n}  # 2 blocks: the first one too
    with pytest.raises(ValueError, match="exceeds the towers' depth"):
        OpenClipAligner(tiny_clip, train_blocks=3)


def test_a_step_moves_the_unfrozen_blocks_and_nothing_else(tiny_clip):
    model = OpenClipAligner(tiny_clip, train_blocks=1, temperature=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = model.loss(_items(6, 0, [True, False] * 3), _items(6, 1))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    trainable = _trainable(model)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    assert {n for n in moved if n.startswith("clip.visual.")}  # the image tower learned too
    assert {n for n in moved if n.startswith("clip.transformer.")}


def test_items_without_an_image_are_embedded_from_text_alone(tiny_clip):
    model = OpenClipAligner(tiny_clip, train_blocks=1).eval()
    items = _items(4, 0, [True, False, True, False])
    with torch.no_grad():
        z = model(items)
        text = F.normalize(tiny_clip.encode_text(items.tokens), dim=-1)
        image = F.normalize(tiny_clip.encode_image(items.pixels), dim=-1)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(z[1], text[1])
    torch.testing.assert_close(z[0], F.normalize(text[0] + image[0], dim=-1))
    np.testing.assert_allclose(model(ClipInputs(items.tokens)).detach().numpy(), text.numpy(), atol=1e-6)
