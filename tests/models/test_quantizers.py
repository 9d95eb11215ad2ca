"""Quantizers and semantic-ID bookkeeping: planted clusters, dead codes, straight-through gradients,
collision handling and the quality figures (no Ray)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from sidforge.models.quantizers import (
    RQVAE,
    ResidualQuantizer,
    RQVAEConfig,
    kmeans,
    pca_projection,
    residual_kmeans,
)
from sidforge.models.semantic_ids import collision_digits, quality, reassign_collisions, resolve_collisions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted(n: int = 800, clusters: int = 8, dim: int = 16, spread: float = 0.4, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, clusters, n)
    centres = rng.normal(size=(clusters, dim)) * 3.0
    return (centres[truth] + rng.normal(size=(n, dim)) * spread).astype(np.float32), truth


def purity(codes: np.ndarray, truth: np.ndarray) -> float:
    """Share of items whose code's majority cluster is their own cluster."""
    return sum(Counter(truth[codes == c]).most_common(1)[0][1] for c in np.unique(codes)) / len(codes)


def test_residual_kmeans_first_level_recovers_planted_clusters():
    x, truth = planted()
    books, codes = residual_kmeans(x, num_levels=3, codebook_size=16, seed=0)
    assert books.shape == (3, 16, 16) and codes.shape == (800, 3)
    assert purity(codes[:, 0], truth) > 0.95  # chance is ~1/8
    # each level explains part of what the previous one left: the residual shrinks
    errs = [((x - books[np.arange(level + 1), codes[:, : level + 1]].sum(1)) ** 2).sum() for level in range(3)]
    assert errs[0] > errs[1] > errs[2]


def test_pca_projection_keeps_the_top_subspace_and_inverts_on_it():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(20, 20)))[0]
    scales = np.array([5.0, 3.0, 2.0] + [0.1] * 17)
    x = ((rng.normal(size=(2000, 20)) * scales) @ basis.T + 7.0).astype(np.float32)
    mean, project, unproject = pca_projection(x, 3)
    assert project.shape == (20, 3) and unproject.shape == (3, 20)
    assert np.allclose(mean, 7.0, atol=0.3)
    # the components are the planted top directions (up to the fixed sign), in order of variance
    assert np.allclose(np.abs(project.T @ basis[:, :3]), np.eye(3), atol=0.05)
    z = (x - mean) @ project
    back = z @ unproject + mean
    assert ((x - back) ** 2).sum() / ((x - mean) ** 2).sum() < 0.01  # 3 of 20 dims hold >99 % of the variance
    _, wp, wu = pca_projection(x, 3, whiten=True)
    assert np.allclose(((x - mean) @ wp).std(axis=0), 1.0, atol=0.02)
    assert np.allclose((((x - mean) @ wp) @ wu), z @ unproject, atol=1e-3)  # whitening is undone on the way back
    assert np.array_equal(pca_projection(x[::-1].copy(), 3)[1].round(4), project.round(4))  # no sign flips
    with pytest.raises(ValueError, match="between 1 and the embedding width 20"):
        pca_projection(x, 21)


def test_balanced_kmeans_caps_every_code():
    x, _ = planted(n=500, clusters=3)  # three big clusters, ten codes: plain k-means is lopsided
    _, plain = kmeans(x, 10, seed=0)
    _, balanced = kmeans(x, 10, seed=0, balanced=True)
    assert np.bincount(balanced, minlength=10).max() <= 50
    assert np.bincount(plain, minlength=10).max() > 50


def test_rqvae_codes_recover_planted_clusters():
    x, truth = planted()
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig(input_dim=16, hidden=(32,), latent_dim=8, num_levels=2, codebook_size=16))
    xt = torch.from_numpy(x)
    with torch.no_grad():
        books, _ = residual_kmeans(model.encoder(xt).numpy(), 2, 16, seed=0)
    model.quantizer.init_from(torch.from_numpy(books))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(300):
        out = model.loss(xt[torch.randint(0, len(x), (128,))])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = float(out.metrics["recon"]) if first is None else first
        if step % 25 == 24:  # what the stage does after each epoch
            with torch.no_grad():
                model.quantizer.reset_dead_codes(model.encoder(xt), 1, torch.Generator().manual_seed(step))
    assert float(out.metrics["recon"]) < 0.5 * first
    first_level = model.encode(xt)[:, 0].numpy()
    chance = purity(first_level, np.random.default_rng(1).permutation(truth))
    assert purity(first_level, truth) > 0.9 > 2 * chance


def test_straight_through_gradient_reaches_the_encoder_unchanged():
    rq = ResidualQuantizer(num_levels=2, codebook_size=4, dim=3, beta=0.0)
    z = torch.randn(5, 3, requires_grad=True)
    z_q, codes, _ = rq(z)
    assert torch.allclose(z_q, rq.decode(codes), atol=1e-6)  # forward: the codewords
    z_q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # backward: identity


def test_dead_code_is_reinitialised_and_then_used():
    torch.manual_seed(0)
    rq = ResidualQuantizer(num_levels=2, codebook_size=4, dim=2)
    z = torch.randn(64, 2)
    with torch.no_grad():
        rq.codebooks[0] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1e3, 1e3]])  # code 3: far away
    assert 3 not in rq.encode(z)[0][:, 0].tolist()
    resets = rq.reset_dead_codes(z, min_usage=1, generator=torch.Generator().manual_seed(0))
    assert resets[0] >= 1
    assert 3 in rq.encode(z)[0][:, 0].tolist()
    # deterministic for the same generator seed: data-parallel replicas stay identical
    twin = ResidualQuantizer(2, 4, 2)
    with torch.no_grad():
        twin.codebooks.copy_(rq.codebooks)
        twin.codebooks[0, 3] = 1e3
        rq.codebooks[0, 3] = 1e3
    rq.reset_dead_codes(z, 1, torch.Generator().manual_seed(5))
    twin.reset_dead_codes(z, 1, torch.Generator().manual_seed(5))
    assert torch.equal(rq.codebooks, twin.codebooks)


# ----------------------------------------------------------------------------------------------
# collisions


def test_collision_digit_counts_within_each_group():
    codes = np.array([[1, 2], [1, 2], [3, 4], [1, 2], [3, 4], [5, 6]])
    assert collision_digits(codes).tolist() == [0, 1, 0, 2, 1, 0]
    # an order key decides who keeps digit 0
    assert collision_digits(codes, order=np.array([5.0, 1.0, 0, 3.0, 0, 0])).tolist() == [2, 0, 0, 1, 1, 0]
    res = resolve_collisions("digit", codes)
    assert len(np.unique(res.sids(), axis=0)) == len(codes) and res.sids().shape == (6, 3)


def test_reassign_keeps_the_nearest_item_and_moves_the_other_to_its_nearest_free_code():
    codes = np.array([[0, 1], [0, 1], [0, 2]])
    dist = np.array([
        [9.0, 0.5, 9.0, 9.0],   # item 0 sits on code 1
        [0.2, 0.9, 0.3, 5.0],   # item 1 is farther from code 1; code 0 is its nearest, and free
        [9.0, 9.0, 0.1, 9.0],
    ])
    res = reassign_collisions(codes, dist)
    assert res.codes.tolist() == [[0, 1], [0, 0], [0, 2]]
    assert res.reassigned == 1 and not res.with_digit and res.digit.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="last-level distances"):
        resolve_collisions("reassign", codes)


def test_reassign_falls_back_to_a_digit_when_a_prefix_is_full():
    codes = np.array([[7, 0], [7, 0], [7, 0]])  # three items, K = 2: one cannot get a code of its own
    dist = np.array([[0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    res = reassign_collisions(codes, dist)
    sids = res.sids()
    assert res.with_digit and sids.shape == (3, 3)
    assert len(np.unique(sids, axis=0)) == 3
    assert res.codes[0].tolist() == [7, 0] and res.reassigned == 1


def test_quality_figures_on_a_hand_computed_case():
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 0]])
    q = quality(codes, codebook_size=4, x=np.ones((4, 2)), x_hat=np.zeros((4, 2)))
    assert q["utilization"] == [0.5, 0.5]
    assert q["entropy"][0] == pytest.approx(1.0)  # codes 0 and 1, two items each
    assert q["entropy"][1] == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))
    assert q["collision_rate"] == 0.5  # items 2 and 3 share [1, 0]
    assert q["duplicate_rate"] == 0.25 and q["max_group"] == 2
    assert q["unique_prefix"] == [0.0, 0.5]
    assert q["recon_rel"] == pytest.approx(1.0)


def test_uniformity_is_lower_for_spread_points_and_separates_near_duplicates():
    from sidforge.models.quantizers import uniformity

    g = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 8, generator=g)
    clumped = torch.randn(1, 8, generator=g) + 0.01 * torch.randn(64, 8, generator=g)
    assert uniformity(spread) < uniformity(clumped) - 1.0
    # near-duplicate pairs: training the encoder on the uniformity term alone pulls each pair apart
    base = torch.randn(16, 8, generator=g)
    x = torch.cat([base, base + 0.01 * torch.randn(16, 8, generator=g)])
    enc = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(enc.parameters(), lr=0.05)
    pair = lambda: (torch.nn.functional.normalize(enc(x[:16]), dim=1)  # noqa: E731
                    - torch.nn.functional.normalize(enc(x[16:]), dim=1)).norm(dim=1).mean()
    before = pair().item()
    for _ in range(200):
        opt.zero_grad()
        uniformity(enc(x)).backward()
        opt.step()
    assert pair().item() > 2 * before


def test_rqvae_uniformity_weight_zero_is_tiger_and_positive_adds_the_term():
    cfg = RQVAEConfig(input_dim=8, hidden=(16,), latent_dim=4, num_levels=2, codebook_size=4)
    torch.manual_seed(0)
    plain = RQVAE(cfg)
    torch.manual_seed(0)
    spread = RQVAE(dataclasses.replace(cfg, uniformity=0.5))
    x = torch.randn(32, 8)
    a, b = plain.loss(x), spread.loss(x)
    assert "uniformity" not in a.metrics and "uniformity" in b.metrics
    assert torch.allclose(b.loss, a.loss + 0.5 * b.metrics["uniformity"])
    with pytest.raises(ValueError, match="uniformity"):
        RQVAEConfig(input_dim=8, uniformity=-1.0)
