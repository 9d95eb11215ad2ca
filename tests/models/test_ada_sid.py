"""ADA-SID's model: the alignment-strength curve, the router's exact zeros and its sparsity tracking the
item-specific target, no routing collapse, the four ablation switches, codes and weights from encode."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sidforge.models.ada_sid import ADASID, ADASIDConfig, BehaviorRouter, alignment_strength
from sidforge.stages.tokenize import ada_sid_richness

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, H, K = 16, 12, 8
SMALL = dict(modality_dims=(D,), behavior_dim=H, codebook_size=K, hidden=(32,), proj_dim=16, latent_dim=8,
             router_hidden=16)


def _data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Content, e_b whose norms spread over a 10x range, N_norm = min-max of those norms, all with behavior."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    behavior = torch.randn(n, H, generator=g) * (0.2 + 2 * torch.rand(n, 1, generator=g))
    norm = behavior.norm(dim=1)
    return x, behavior, (norm - norm.min()) / (norm.max() - norm.min()), torch.ones(n)


def _train(model: ADASID, steps: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    x, behavior, richness, hb = _data()
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (64,), generator=g)
        out = model.loss(x[rows], behavior[rows], richness[rows], hb[rows])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.adapt_lambdas(out.sparsity_gap)
    model.eval()
    return x, behavior, richness, hb


@pytest.fixture(scope="module")
def trained() -> tuple[ADASID, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = ADASID(ADASIDConfig(**SMALL))
    with torch.random.fork_rng():
        data = _train(model, 400)
    return model, data


def test_alignment_strength_is_near_zero_for_the_smallest_norms_and_one_for_the_largest():
    norms = np.array([[0.3], [0.31], [0.6], [0.9], [1.4]], dtype=np.float32) * np.ones((1, 4), np.float32) / 2
    counts = np.array([5, 3, 9, 2, 0])  # the last item was never in training: no behavior
    richness, low, high = ada_sid_richness("norm", norms, counts)
    assert richness[0] == 0.0 and richness[3] == 1.0 and richness[4] == 0.0  # min-max over the seen items
    assert (low, high) == pytest.approx((0.3, 0.9))
    w = alignment_strength(torch.from_numpy(richness), 10.0, 9.0)
    assert w[0] < 1e-3 and w[1] < 1e-3 and w[3] == pytest.approx(1.0)
    assert torch.all(w[1:4].diff() > 0)  # monotone in N_norm
    # the paper's curve: half strength only at N_norm = (9 + logit(sigmoid(1) / 2)) / 10 ~ 0.87
    grid = alignment_strength(torch.linspace(0, 1, 101), 10.0, 9.0)
    assert 0.8 < float(torch.linspace(0, 1, 101)[int((grid >= 0.5).nonzero()[0])]) < 0.95
    counts_rich, _, _ = ada_sid_richness("log_count", norms, counts)
    assert counts_rich[3] == 0.0 and counts_rich[2] == 1.0  # the log_count proxy ranks by train count


def test_router_gives_exact_zeros_and_its_sparsity_tracks_the_item_specific_target(trained):
    model, (x, behavior, richness, hb) = trained
    codes, weights = model.encode(x, behavior, richness, hb)
    r = weights[:, -model.config.behavior_experts :]
    dropped = (r == 0).float().mean(dim=1)
    target = model.config.sparsity_target * (1 - richness)
    assert (r == 0).any() and (r > 0).any()  # exact zeros, not small numbers
    assert torch.equal(codes[:, -5:] < 0, r == 0)  # a zero weight drops the code
    assert abs(float(dropped.mean() - target.mean())) < 0.1, (float(dropped.mean()), float(target.mean()))
    low, high = richness < 0.3, richness > 0.7
    assert float(dropped[low].mean()) > float(dropped[high].mean()) + 0.2  # sparse items get shorter IDs
    assert abs(float(dropped[high].mean() - target[high].mean())) < 0.15


def test_routing_does_not_collapse_onto_one_behavioral_id(trained):
    model, (x, behavior, richness, hb) = trained
    codes, weights = model.encode(x, behavior, richness, hb)
    beh = codes[:, -model.config.behavior_experts :]
    load = (beh >= 0).float().mean(dim=0)  # share of items using each behavioral expert
    assert (load > 0.2).all(), load
    share = weights[:, -5:].sum(0) / weights[:, -5:].sum()
    assert share.max() < 0.4, share  # no expert carries most of the router mass
    for e in range(beh.shape[1]):  # and each expert's kept codes spread over its codebook
        kept = beh[:, e][beh[:, e] >= 0]
        assert len(kept.unique()) >= K // 2


def test_the_router_without_its_sparsity_term_drops_far_less():
    torch.manual_seed(0)
    model = ADASID(ADASIDConfig(**SMALL, sparsity=False))
    x, behavior, richness, hb = _train(model, 200)
    assert torch.equal(model.lambdas, torch.full_like(model.lambdas, model.config.lambda_init))  # never adapted
    _, weights = model.encode(x, behavior, richness, hb)
    assert float((weights[:, -5:] == 0).float().mean()) < 0.15


def test_switches_change_what_they_should():
    x, behavior, richness, hb = _data(64)
    hb[:8] = 0  # items without behavior
    torch.manual_seed(0)
    full = ADASID(ADASIDConfig(**SMALL))
    out = full.loss(x, behavior, richness, hb)
    assert out.codes.shape == (64, 7) and (out.codes[:8, 2:] == -1).all()  # no behavior: codes dropped
    w_full = full.strength(richness, hb)
    # fixed w = 1: every item with behavior aligns fully, whatever its N_norm
    fixed = ADASID(ADASIDConfig(**SMALL, adaptive_alignment=False))
    w_fixed = fixed.strength(richness, hb)
    assert torch.equal(w_fixed, hb) and w_full[8:].min() < 1e-3 and w_full.max() <= 1.0
    # no router: weight 1 for every behavioral code of an item with behavior, nothing dropped
    norouter = ADASID(ADASIDConfig(**SMALL, router=False))
    assert norouter.router is None
    codes, weights = norouter.encode(x, behavior, richness, hb)
    assert torch.equal(weights[8:, 2:], torch.ones(56, 5)) and (codes[8:] >= 0).all()
    assert float(norouter.loss(x, behavior, richness, hb).metrics["sparsity_loss"]) == 0.0
    # no sparsity term: the router stays, its L1 term is gone, lambda does not move
    nosparse = ADASID(ADASIDConfig(**SMALL, sparsity=False))
    out = nosparse.loss(x, behavior, richness, hb)
    assert nosparse.router is not None and float(out.metrics["sparsity_loss"]) == 0.0
    nosparse.adapt_lambdas(torch.ones(nosparse.config.sparsity_bins))
    assert torch.equal(nosparse.lambdas, torch.full_like(nosparse.lambdas, nosparse.config.lambda_init))
    full.adapt_lambdas(torch.ones(full.config.sparsity_bins))
    assert torch.allclose(full.lambdas, torch.full_like(full.lambdas, full.config.lambda_init * 1.2))
    # no shared experts: the ID loses its shared code and the decoders their shared block
    noshared = ADASID(ADASIDConfig(**SMALL, shared_experts=0))
    assert noshared.config.num_experts == 6 and len(noshared.groups) == 2
    assert noshared.encode(x, behavior, richness, hb)[0].shape == (64, 6)


def test_encode_without_behavior_keeps_the_content_codes_and_drops_the_behavioral_ones(trained):
    model, (x, behavior, richness, hb) = trained
    codes, weights = model.encode(x, behavior, richness, hb)
    content_only, w0 = model.encode(x)
    assert (content_only[:, 2:] == -1).all() and (w0[:, 2:] == 0).all()
    assert torch.equal(content_only[:, 1], codes[:, 1])  # the text-specific code depends on content only
    assert w0[:, :2].eq(1).all()
    rec, beh = model.decode_codes(content_only, w0)
    assert rec.shape == x.shape and beh.shape == behavior.shape


def test_specific_experts_of_a_missing_modality_are_dropped_and_gated_when_several():
    cfg = ADASIDConfig(**{**SMALL, "modality_dims": (D, 4)}, specific_experts=(1, 2))
    model = ADASID(cfg)
    x, behavior, richness, hb = _data(32)
    x = torch.cat([x, torch.randn(32, 4)], dim=1)
    x[:5, D:] = 0  # five items without an image
    codes, weights = model.encode(x, behavior, richness, hb)
    assert (codes[:5, 2:4] == -1).all() and (codes[5:, 2:4] >= 0).all()
    assert torch.allclose(weights[5:, 2:4].sum(dim=1), torch.ones(27))  # the softmax gate over 2 experts
    out = model.loss(x, behavior, richness, hb)
    assert float(out.metrics["content"]) > 0  # text <-> image InfoNCE over the items that have both
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter takes part (DDP)


def test_router_backward_leaks_below_zero_but_the_forward_is_exact():
    router = BehaviorRouter(H, 8, 3, bias_init=-5.0, leak=0.1)  # every pre-activation negative
    e = torch.randn(4, H)
    out = router(e, torch.zeros(4))
    assert torch.equal(out, torch.zeros(4, 3))
    out.sum().backward()
    assert router.bias.grad is not None and (router.bias.grad > 0).all()  # a way back from zero
    plain = dataclasses.replace(ADASIDConfig(**SMALL), router_leak=0.0)
    assert ADASID(plain).router.leak == 0.0
