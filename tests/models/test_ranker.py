"""SaviorRec's ranker: MBA starts at the frozen embedding and learns, attention masking, batch-order
invariance, the ablation switches."""

from __future__ import annotations

import pytest
import torch

from sidforge.models.ranker import ModalBehaviorAlignment, RankerConfig, SaviorRanker, TargetAttention

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, C, L, K = 40, 12, 3, 8


def _model(**overrides) -> SaviorRanker:
    torch.manual_seed(0)
    fields = dict(num_items=N, id_dim=16, content_dim=C, codebook_sizes=(K,) * L, mba_dim=8, mba_hidden=16,
                  attn_hidden=16, mlp=(32, 16))
    fields.update(overrides)
    model = SaviorRanker(RankerConfig(**fields))
    g = torch.Generator().manual_seed(1)
    content = torch.randn(N, C, generator=g) if model.config.content_dim else None
    codes = torch.randint(0, K, (N, L), generator=g) if model.config.codebook_sizes else None
    model.set_item_tables(torch.rand(N, 1, generator=g), content, codes)
    return model


def _batch(b: int = 32, t: int = 6, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(0, N, (b, t), generator=g)
    hist[: b // 4, : t // 2] = N  # left padding on some rows
    hist[0] = N  # one empty history
    target = torch.randint(0, N, (b,), generator=g)
    labels = (target % 2 == 0).float()  # a learnable rule: even items are clicked
    return hist, target, labels


def test_mba_starts_exactly_at_the_frozen_embedding():
    model = _model()
    items = torch.arange(N)
    assert torch.equal(model.aligned_content(items), model.content[items])  # bit-for-bit, not approximately
    assert all(torch.count_nonzero(book.weight) == 0 for book in model.mba.codebooks)


def test_mba_codebooks_move_during_training_and_change_the_embedding():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hist, target, labels = _batch()
    for _ in range(5):
        out = model.loss(hist, target, labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(torch.count_nonzero(book.weight) > 0 for book in model.mba.codebooks)
    moved = model.aligned_content(torch.arange(N)) - model.content[:N]
    assert moved.abs().max() > 1e-4
    # the frozen embedding itself is a buffer: untouched by training
    assert not any(p is model.content for p in model.parameters())


def test_items_sharing_codes_share_their_mba_correction():
    mba = ModalBehaviorAlignment((K, K), dim=4, hidden=8, out_dim=C)
    with torch.no_grad():
        for book in mba.codebooks:
            book.weight.normal_()
    codes = torch.tensor([[1, 2], [1, 2], [1, 3]])
    v = mba(codes)
    assert torch.equal(v[0], v[1]) and not torch.allclose(v[0], v[2])


def test_without_skip_the_aligned_content_is_the_mba_output_alone():
    model = _model(mba_skip=False)
    assert torch.count_nonzero(model.aligned_content(torch.arange(N))) == 0  # zero codebooks, no z


def test_forward_is_unchanged_by_batch_order():
    model = _model().eval()
    hist, target, _ = _batch(b=48)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    full = model(hist, target).logits
    assert torch.allclose(model(hist[perm], target[perm]).logits, full[perm], atol=1e-6)
    # and every row is scored independently of the others in its batch
    assert torch.allclose(model(hist[5:9], target[5:9]).logits, full[5:9], atol=1e-6)


def test_attention_ignores_padding_and_handles_empty_histories():
    att = TargetAttention(dim=4, hidden=8)
    q = torch.randn(2, 4)
    keys = torch.randn(2, 3, 4)
    mask = torch.tensor([[False, True, True], [False, False, False]])
    out = att(q, keys, mask)
    changed = keys.clone()
    changed[0, 0] = 100.0  # a padded position: must not matter
    assert torch.allclose(att(q, changed, mask)[0], out[0])
    assert torch.equal(out[1], torch.zeros(4))  # empty history -> zeros, not NaN


def test_ablation_switches_shape_the_model():
    full = _model()
    assert len(full.attention) == 4 and hasattr(full, "mba")
    one_way = _model(bidirectional=False)
    assert len(one_way.attention) == 2
    no_mba = _model(codebook_sizes=())
    assert not hasattr(no_mba, "mba") and torch.equal(no_mba.aligned_content(torch.arange(N)), no_mba.content[:N])
    id_only = _model(content_dim=0, codebook_sizes=(), bidirectional=False)
    assert len(id_only.attention) == 1 and not hasattr(id_only, "content")
    hist, target, labels = _batch()
    for model in (full, one_way, no_mba, id_only):
        out = model.loss(hist, target, labels)
        assert out.logits.shape == (32,) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="needs a content embedding"):
        RankerConfig(num_items=N, content_dim=0, codebook_sizes=(K,))


def test_the_ranker_learns_a_planted_rule():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    hist, target, labels = _batch(b=256)
    first = float(model.loss(hist, target, labels).loss.detach())
    for _ in range(60):
        out = model.loss(hist, target, labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(out.loss.detach()) < 0.5 * first


def test_item_tables_are_checked():
    model = SaviorRanker(RankerConfig(num_items=N, content_dim=C, codebook_sizes=(K,)))
    with pytest.raises(ValueError, match="content must be"):
        model.set_item_tables(torch.zeros(N, 1), torch.zeros(N, C + 1), torch.zeros(N, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must lie"):
        model.set_item_tables(torch.zeros(N, 1), torch.zeros(N, C), torch.full((N, 1), K))


def test_attention_scores_equal_the_concatenated_din_input():
    att = TargetAttention(dim=4, hidden=8)
    q, keys = torch.randn(3, 4), torch.randn(3, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    qe = q.unsqueeze(1).expand_as(keys)
    logits = att.score(torch.cat([qe, keys, qe - keys, qe * keys], dim=-1)).squeeze(-1)
    expect = torch.einsum("bt,btd->bd", torch.softmax(logits, dim=-1), keys)
    assert torch.allclose(att(q, keys, mask), expect, atol=1e-6)
