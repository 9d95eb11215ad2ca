"""Unit tests for sidforge.models.sasrec: shapes, masking, losses and a tiny overfit run (CPU, < 5 s)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sidforge.models import sasrec
from sidforge.models.sasrec import (
    SASRec,
    SASRecConfig,
    SASRecOutput,
    sample_negatives,
    sample_unseen_negatives,
)

N_ITEMS = 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides: object) -> SASRecConfig:
    fields = dict(num_items=N_ITEMS, max_len=12, hidden=16, num_layers=2, num_heads=2, ffn_hidden=32)
    fields.update(overrides)
    return SASRecConfig(**fields)  # type: ignore[arg-type]


def tiny_model(seed: int = 0, **overrides: object) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(tiny_config(**overrides)).eval()


def left_pad(seqs: list[list[int]], length: int, pad: int) -> torch.Tensor:
    """(B, length) long tensor, each sequence right-aligned after pad entries."""
    return torch.tensor([[pad] * (length - len(s)) + s for s in seqs], dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Config


def test_config_defaults_are_recbole_like() -> None:
    cfg = SASRecConfig(num_items=100)
    assert (cfg.max_len, cfg.hidden, cfg.num_layers, cfg.num_heads) == (50, 64, 2, 2)
    assert cfg.dropout == 0.2 and cfg.loss == "ce" and cfg.init_std == 0.02
    assert cfg.pad_id == 100
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_items": 1}, "num_items"),
        ({"hidden": 10, "num_heads": 3}, "divisible by num_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"loss": "bpr"}, "'ce'"),
        ({"max_len": 0}, "max_len"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"init_std": -1.0}, "init_std"),
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_models_package_is_pure_pytorch() -> None:
    tree = ast.parse(Path(sasrec.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "dataclasses", "typing", "torch"}, roots


# ----------------------------------------------------------------------------------------------
# Shapes and masking


@pytest.mark.parametrize("num_heads", [1, 2])
def test_output_shapes(num_heads: int) -> None:
    model = tiny_model(num_heads=num_heads)
    ids = torch.randint(0, N_ITEMS, (3, 7))
    hidden = model(ids)
    assert hidden.shape == (3, 7, 16)
    assert model.score_all(ids).shape == (3, N_ITEMS)
    out = model.loss(ids, torch.randint(0, N_ITEMS, (3, 7)))
    assert isinstance(out, SASRecOutput) and out.loss.shape == ()
    assert torch.isfinite(out.loss)


def test_too_long_input_is_rejected() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_causality_later_items_do_not_change_earlier_positions(norm: str) -> None:
    model = tiny_model(dropout=0.2, norm=norm)
    ids = torch.randint(0, N_ITEMS, (2, 9))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % N_ITEMS
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_last_hidden_is_invariant_to_extra_left_padding(norm: str) -> None:
    model = tiny_model(dropout=0.2, norm=norm)
    seqs = [[3, 1, 4, 1, 5], [9, 2, 6]]
    pad = model.config.pad_id
    with torch.no_grad():
        lasts = [model(left_pad(seqs, length, pad))[:, -1] for length in (5, 8, 12)]
        scores = [model.score_all(left_pad(seqs, length, pad)) for length in (5, 8, 12)]
    for other in lasts[1:]:
        torch.testing.assert_close(lasts[0], other, rtol=1e-5, atol=1e-6)
    for other in scores[1:]:
        torch.testing.assert_close(scores[0], other, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_pad_positions_are_zero_and_finite(norm: str) -> None:
    model = tiny_model(norm=norm)
    ids = left_pad([[1, 2], [3, 4, 5, 6]], 6, model.config.pad_id)
    with torch.no_grad():
        hidden = model(ids)
    assert torch.isfinite(hidden).all()
    assert (hidden[0, :4] == 0).all() and (hidden[0, 4:].abs().sum(-1) > 0).all()


def test_post_norm_normalises_the_embeddings_and_every_residual_sum() -> None:
    post, pre = tiny_model(norm="post", num_layers=1), tiny_model(norm="pre", num_layers=1)
    assert isinstance(post.ln_f, torch.nn.Identity) and isinstance(pre.ln_emb, torch.nn.Identity)
    ids = torch.randint(0, N_ITEMS, (3, 7))
    block = post.blocks[0]
    with torch.no_grad():
        pos = post.pos_emb(torch.arange(post.config.max_len - 7, post.config.max_len))
        x = post.ln_emb(post.item_emb(ids) + pos)
        mask = post._attn_mask(torch.ones_like(ids, dtype=torch.bool), None)
        h = block.ln_1(x + block.attn(x, mask))
        expected = block.ln_2(h + block.mlp(h))
        torch.testing.assert_close(post(ids), expected, rtol=1e-5, atol=1e-6)
        # the same weights in pre-LN order give something else
        assert not torch.allclose(pre(ids), post(ids), atol=1e-3)


def test_zero_attn_bias_is_identical_to_none() -> None:
    model = tiny_model()
    ids = left_pad([[1, 2, 3], [4, 5, 6, 7, 8]], 6, model.config.pad_id)
    with torch.no_grad():
        ref = model(ids)
        zeros3 = model(ids, attn_bias=torch.zeros(2, 6, 6))
        zeros4 = model(ids, attn_bias=torch.zeros(2, 2, 6, 6))
    assert torch.equal(ref, zeros3) and torch.equal(ref, zeros4)


def test_attn_bias_changes_outputs_and_broadcasts_over_heads() -> None:
    model = tiny_model()
    ids = torch.randint(0, N_ITEMS, (2, 6))
    bias = torch.randn(2, 6, 6)
    with torch.no_grad():
        ref = model(ids)
        biased = model(ids, attn_bias=bias)
        per_head = model(ids, attn_bias=bias[:, None].expand(2, 2, 6, 6))
    assert not torch.allclose(ref[:, 1:], biased[:, 1:])  # position 0 only sees itself
    torch.testing.assert_close(biased, per_head)
    with pytest.raises(ValueError, match="attn_bias"):
        model(ids, attn_bias=torch.zeros(2, 3, 6, 6))


def test_item_embeddings_exclude_padding() -> None:
    model = tiny_model()
    emb = model.item_embeddings()
    assert emb.shape == (N_ITEMS, 16)
    assert torch.equal(emb, model.item_emb.weight[:N_ITEMS])
    assert (model.item_emb.weight[model.config.pad_id] == 0).all()  # the pad row exists and is zero
    assert (emb.abs().sum(-1) > 0).all()  # ... and is not among the item rows


def test_score_all_uses_last_position_against_item_embeddings() -> None:
    model = tiny_model()
    ids = torch.randint(0, N_ITEMS, (3, 5))
    with torch.no_grad():
        expected = model(ids)[:, -1] @ model.item_embeddings().T
        torch.testing.assert_close(model.score_all(ids), expected)


# ----------------------------------------------------------------------------------------------
# Losses


def test_ce_loss_matches_manual_cross_entropy() -> None:
    model = tiny_model(loss="ce")
    pad = model.config.pad_id
    ids = left_pad([[1, 2, 3], [4, 5, 6, 7]], 4, pad)
    targets = left_pad([[2, 3, 9], [5, 6, 7, 11]], 4, pad)
    with torch.no_grad():
        out = model.loss(ids, targets)
        logits = model(ids) @ model.item_emb.weight[:N_ITEMS].T  # (B, T, N)
        manual = F.cross_entropy(logits.reshape(-1, N_ITEMS), targets.reshape(-1), ignore_index=pad)
    torch.testing.assert_close(out.loss, manual)
    assert out.metrics["num_targets"].item() == 7


def test_bce_loss_ignores_pad_positions() -> None:
    model = tiny_model(loss="bce")
    pad = model.config.pad_id
    ids = left_pad([[1, 2, 3], [4, 5, 6, 7]], 4, pad)
    targets = left_pad([[2, 3, 9], [5, 6, 7, 11]], 4, pad)
    negatives = torch.tensor([[0, 8, 8, 8], [1, 2, 3, 4]])
    other_negatives = negatives.clone()
    other_negatives[0, 0] = 13  # only the pad position differs
    with torch.no_grad():
        out = model.loss(ids, targets, negatives=negatives)
        out_other = model.loss(ids, targets, negatives=other_negatives)
        hidden = model(ids)
        emb = model.item_embeddings()
        valid = targets != pad
        pos = (hidden[valid] * emb[targets[valid]]).sum(-1)
        neg = (hidden[valid] * emb[negatives[valid]]).sum(-1)
        manual = (-F.logsigmoid(pos) - F.logsigmoid(-neg)).mean()
    assert torch.equal(out.loss, out_other.loss)
    torch.testing.assert_close(out.loss, manual)
    assert out.metrics["num_targets"].item() == 7


def test_all_pad_targets_give_zero_loss() -> None:
    for loss in ("ce", "bce"):
        model = tiny_model(loss=loss)
        ids = torch.randint(0, N_ITEMS, (2, 4))
        out = model.loss(ids, torch.full_like(ids, model.config.pad_id))
        assert out.loss.item() == 0.0


def test_sample_negatives_avoid_target_and_cover_catalogue() -> None:
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, N_ITEMS, (64, 50), generator=gen)
    negatives = sample_negatives(targets, N_ITEMS, gen)
    assert negatives.shape == targets.shape and negatives.dtype == torch.long
    assert (negatives != targets).all()
    assert negatives.min() >= 0 and negatives.max() < N_ITEMS
    assert set(negatives.unique().tolist()) == set(range(N_ITEMS))
    first = sample_negatives(targets, N_ITEMS, torch.Generator().manual_seed(1))
    assert torch.equal(first, sample_negatives(targets, N_ITEMS, torch.Generator().manual_seed(1)))


def test_unseen_negatives_avoid_the_users_items_and_are_uniform_over_the_rest() -> None:
    gen = torch.Generator().manual_seed(0)
    pad = N_ITEMS
    # row 0 has seen 15 of the 20 items (and padding), row 1 only item 3
    seen = torch.tensor([list(range(15)) + [pad] * 3, [3] + [pad] * 17])
    targets = torch.tensor([[0, 4, 9, 14] * 500, [3] * 2000])
    negatives = sample_unseen_negatives(targets, seen, N_ITEMS, gen)
    assert negatives.shape == targets.shape and (negatives != targets).all()
    assert not torch.isin(negatives[0], seen[0]).any()
    counts = torch.bincount(negatives[0], minlength=N_ITEMS)[15:]  # 2000 draws over the 5 unseen items
    assert counts.min() > 300 and counts.max() < 500, counts
    assert not (negatives[1] == 3).any() and set(negatives[1].unique().tolist()) == set(range(N_ITEMS)) - {3}


def test_unseen_negatives_fall_back_to_any_other_item_when_everything_was_seen() -> None:
    seen = torch.arange(N_ITEMS)[None]
    targets = torch.tensor([[5, 6, N_ITEMS]])
    negatives = sample_unseen_negatives(targets, seen, N_ITEMS, torch.Generator().manual_seed(0), max_rounds=2)
    assert (negatives[0, :2] != targets[0, :2]).all() and negatives.max() < N_ITEMS
    with pytest.raises(ValueError, match="seen"):
        sample_unseen_negatives(targets, seen[0], N_ITEMS)


# ----------------------------------------------------------------------------------------------
# Learning


def _successor_dataset(pad: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every start item and length of the cycle i -> i + 1 (mod N), as left-padded (input, target) pairs."""
    seqs = [
        [(s + k) % N_ITEMS for k in range(length + 1)]
        for s in range(N_ITEMS)
        for length in range(1, max_len + 1)
    ]
    inputs = left_pad([s[:-1] for s in seqs], max_len, pad)
    targets = left_pad([s[1:] for s in seqs], max_len, pad)
    return inputs, targets


@pytest.mark.parametrize("loss,norm", [("ce", "pre"), ("bce", "pre"), ("bce", "post")])
def test_tiny_overfit_learns_successor(loss: str, norm: str) -> None:
    model = tiny_model(loss=loss, max_len=5, hidden=16, num_layers=1, num_heads=1, ffn_hidden=32, dropout=0.0,
                       norm=norm)
    inputs, targets = _successor_dataset(model.config.pad_id, model.config.max_len)
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        out = model.loss(inputs, targets, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model.score_all(inputs).argmax(dim=-1)  # (B,)
    accuracy = (predicted == targets[:, -1]).float().mean().item()
    assert accuracy > 0.9, f"{loss}: top-1 accuracy {accuracy:.2f}"
