"""The ranker's optional SID features: s(i) = sum_l w_l(i) E_l[c_l(i)] appended to the behavior face; the
weights decide what a code contributes (0 = nothing), variable-length IDs, and the default ranker untouched.
Also the stage's reader of ``sids.parquet`` (weights column optional)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sidforge.models.ranker import RankerConfig, SaviorRanker
from sidforge.platform.schemas import DataError
from sidforge.stages.ranker import load_sid_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, SIZES = 10, (4, 6, 12)


def _model(codes: torch.Tensor, weights: torch.Tensor | None) -> SaviorRanker:
    torch.manual_seed(0)
    model = SaviorRanker(RankerConfig(num_items=N, id_dim=8, bidirectional=False, sid_sizes=SIZES, sid_dim=4,
                                      attn_hidden=8, mlp=(8,)))
    model.set_item_tables(torch.rand(N, 1), sid_codes=codes, sid_weights=weights)
    return model.eval()


def _codes() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    codes = torch.stack([torch.randint(0, k, (N,), generator=g) for k in SIZES], dim=1)
    codes[:3, 2] = -1  # three shorter IDs
    return codes


def test_the_feature_is_the_weighted_sum_of_the_codes_rows():
    codes = _codes()
    weights = torch.rand(N, 3) + 0.1
    model = _model(codes, weights)
    items = torch.arange(N)
    expect = sum(weights[:, level, None] * model.sid_tables[level].weight[codes[:, level].clamp(min=0)]
                 * (codes[:, level, None] >= 0) for level in range(3))
    assert torch.allclose(model.sid_feature(items), expect)
    assert (model.sid_weights[:3, 2] == 0).all()  # a missing level weighs nothing
    assert model.behavior_proj.in_features == 8 + 1 + 4


def test_a_zero_weight_code_changes_nothing_and_a_weighted_one_does():
    codes = _codes()
    weights = torch.ones(N, 3)
    weights[:, 1] = 0.0  # the router dropped level 2 of every item
    hist, target = torch.randint(0, N, (6, 4)), torch.arange(6)
    base = _model(codes, weights)(hist, target).logits
    other = codes.clone()
    other[:, 1] = (other[:, 1] + 1) % SIZES[1]
    assert torch.allclose(_model(other, weights)(hist, target).logits, base)
    other = codes.clone()
    other[:, 0] = (other[:, 0] + 1) % SIZES[0]
    assert not torch.allclose(_model(other, weights)(hist, target).logits, base)
    half = weights.clone()
    half[:, 0] = 0.5
    assert not torch.allclose(_model(codes, half)(hist, target).logits, base)
    assert torch.allclose(_model(codes, None).sid_weights[3:N], torch.ones(N - 3, 3))  # default weight 1 (row N: padding)


def test_sid_tables_learn_and_the_default_ranker_is_unchanged():
    model = _model(_codes(), None)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.sid_tables[0].weight.detach().clone()
    hist, target = torch.randint(0, N, (16, 4)), torch.randint(0, N, (16,))
    for _ in range(3):
        loss = model.loss(hist, target, (target % 2).float()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, model.sid_tables[0].weight)
    plain = SaviorRanker(RankerConfig(num_items=N, id_dim=8, bidirectional=False, attn_hidden=8, mlp=(8,)))
    assert not any(k.startswith(("sid_", "sid_tables")) for k in plain.state_dict())  # old checkpoints load
    with pytest.raises(ValueError, match="sid_codes must be"):
        _model(_codes()[:, :2], None)
    bad = _codes()
    bad[0, 0] = SIZES[0]
    with pytest.raises(ValueError, match=r"\[0, K_l\)"):
        _model(bad, None)


def test_load_sid_features_pads_variable_lengths_and_defaults_the_weights(tmp_path: Path):
    codes = [[1, 2], [3, 4, 5], [0]]
    pq.write_table(pa.table({"item_id": [2, 0, 1], "codes": codes}), tmp_path / "sids.parquet")
    got, w, sizes = load_sid_features(tmp_path, 3)
    assert got.tolist() == [[3, 4, 5], [0, -1, -1], [1, 2, -1]] and sizes == (4, 5, 6)
    assert w.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]  # no weights column: 1.0 per code
    pq.write_table(pa.table({"item_id": [2, 0, 1], "codes": codes,
                             "weights": pa.array([[0.5, 0.25], [1, 1, 1], [2.0]], pa.list_(pa.float32()))}),
                   tmp_path / "sids.parquet")
    _, w, _ = load_sid_features(tmp_path, 3)
    assert w[2].tolist() == [0.5, 0.25, 0.0] and w[1, 0] == 2.0
    with pytest.raises(DataError, match="exactly one ID"):
        load_sid_features(tmp_path, 4)
