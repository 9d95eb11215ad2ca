"""SASRec with content features in its item representation (``feature_dim``, BBQRec's multimodal items): the
rest of the model starts as the plain one, bad features are refused, the features reach the scores, and an
item never trained on is ranked by what it looks like (CPU, < 5 s)."""

from __future__ import annotations

import pytest
import torch

from sidforge.models.sasrec import SASRec, SASRecConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ITEMS, DIM = 12, 6


def config(**overrides: object) -> SASRecConfig:
    fields = dict(num_items=N_ITEMS, max_len=8, hidden=16, num_layers=1, num_heads=2, ffn_hidden=32, dropout=0.0)
    fields.update(overrides)
    return SASRecConfig(**fields)  # type: ignore[arg-type]


def build(seed: int = 0, features: torch.Tensor | None = None, **overrides: object) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(config(**overrides), item_features=features)


def test_the_rest_of_the_model_starts_as_plain_sasrec_and_the_features_reach_the_scores():
    feats = torch.randn(N_ITEMS, DIM, generator=torch.Generator().manual_seed(1))
    plain, mm = build(), build(features=feats, feature_dim=DIM)
    shared = plain.state_dict()
    assert set(mm.state_dict()) - set(shared) == {"item_features", "feature_proj.weight"}
    assert all(torch.equal(mm.state_dict()[k], v) for k, v in shared.items())
    assert torch.equal(mm.item_features[:N_ITEMS], feats) and not mm.item_features[N_ITEMS].any()  # pad row: 0
    ids = torch.tensor([[N_ITEMS, 0, 1, 2], [3, 4, 5, 6]])
    with torch.no_grad():
        expected = plain.item_embeddings() + feats @ mm.feature_proj.weight.T
        assert torch.allclose(mm.item_embeddings(), expected, atol=1e-6)
        assert not torch.allclose(mm.score_all(ids), plain.score_all(ids))
        mm.feature_proj.weight.zero_()  # a zero projection is the plain model again
        assert torch.allclose(mm.score_all(ids), plain.score_all(ids), atol=1e-6)
    # the saved state holds the features: a model rebuilt from the config alone scores the same
    again = SASRec(mm.config)
    again.load_state_dict(mm.state_dict())
    assert torch.equal(again.item_features, mm.item_features)


def test_bad_features_are_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(num_items, feature_dim\) = \(12, 6\)"):
        build(features=torch.zeros(N_ITEMS, DIM + 1), feature_dim=DIM)
    with pytest.raises(ValueError, match="NaN or inf"):
        build(features=torch.full((N_ITEMS, DIM), float("nan")), feature_dim=DIM)
    with pytest.raises(ValueError, match="feature_dim=0"):
        build(features=torch.zeros(N_ITEMS, DIM))
    with pytest.raises(ValueError, match="feature_dim=-1"):
        config(feature_dim=-1)


def _cold_twin_rank(feature_dim: int, steps: int = 150) -> float:
    """Items 0-9 follow a cycle (i -> i+1 mod 10) in training; items 10-19 never occur and item 10 + i has
    item i's features. Returns the mean rank, among the 10 untrained items, of the twin of the true next item."""
    n, hot = 20, 10
    feats = torch.randn(hot, 8, generator=torch.Generator().manual_seed(3))
    feats = torch.cat([feats, feats])  # item 10 + i looks exactly like item i
    model = build(features=feats if feature_dim else None, num_items=n, feature_dim=feature_dim, max_len=6)
    starts = torch.arange(hot)
    seq = (starts[:, None] + torch.arange(7)[None, :]) % hot  # (10, 7): every rotation of the cycle
    inputs, targets = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model.loss(inputs, targets).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        scores = model.score_all(inputs)[:, hot:]  # (10, 10): the untrained items after each sequence
    twin = targets[:, -1]  # the true next item i; its twin is column i of the untrained block
    rank = (scores > scores.gather(1, twin[:, None])).sum(dim=1).float()
    return float(rank.mean())


def test_an_item_never_trained_on_is_ranked_by_its_content():
    with_features, without = _cold_twin_rank(feature_dim=8), _cold_twin_rank(feature_dim=0)
    # among 10 untrained items the twin of the right answer comes first (mean rank near 0) with features;
    # without them the untrained items' scores say nothing (random: about 4.5)
    assert with_features < 1.0, with_features
    assert without > 2.0, without
