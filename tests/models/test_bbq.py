"""Unit tests for sidforge.models.bbq: shapes and contract, missing modalities, the item slot, and on a planted
dataset that the contrastive codebook loss binds the codes to behavior and the MI term lowers CLUB (CPU, ~6 s)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sidforge.models.bbq import BBQ, BBQConfig, BBQOutput
from sidforge.models.quantizers import residual_kmeans
from sidforge.models.semantic_ids import behavior_coherence

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(**overrides: object) -> BBQConfig:
    fields = dict(modality_dims=(6, 4), behavior_dim=5, num_items=20, hidden=(16,), shared_dim=4, specific_dim=3,
                  num_levels=2, codebook_size=4, club_hidden=8)
    fields.update(overrides)
    return BBQConfig(**fields)  # type: ignore[arg-type]


def test_loss_codes_and_every_parameter_take_part_even_with_the_ablation_switches_off():
    torch.manual_seed(0)
    model = BBQ(small(contrastive_weight=0.0, mi_weight=0.0))
    x, b, idx = torch.randn(8, 10), torch.randn(8, 5), torch.arange(8)
    out = model.loss(x, b, idx)
    assert isinstance(out, BBQOutput) and out.loss.shape == () and out.codes.shape == (8, 2)
    assert {"recon", "rq", "contrastive", "mi", "club_nll", "slot"} <= set(out.metrics)
    out.loss.backward()
    # data-parallel training needs every parameter in every step's graph, at weight 0 too
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with pytest.raises(ValueError, match="index"):
        model.loss(x, b)
    assert model.encode(x).shape == (8, 2) and torch.equal(model.encode(x), model.encode(x))
    assert model.reconstruct(model.encode(x)).shape == (8, 10)
    assert model.reconstruct_items(x, idx).shape == (8, 10)


def test_config_is_validated():
    with pytest.raises(ValueError, match="modality_dims"):
        small(modality_dims=())
    with pytest.raises(ValueError, match="mi_weight"):
        small(mi_weight=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        small(temperature=0.0)
    assert small().input_dim == 10


def test_a_missing_modality_leaves_the_shared_part_to_the_present_one():
    torch.manual_seed(0)
    model = BBQ(small())
    text = torch.randn(3, 6)
    x = torch.cat([text, torch.zeros(3, 4)], dim=1)  # no image: its block is all zeros
    shared, _, present = model.encode_parts(x)
    assert present.tolist() == [[True, False]] * 3
    text_only = torch.nn.functional.normalize(model.encoders[0](text)[:, :4], dim=-1)
    torch.testing.assert_close(shared, text_only)
    assert torch.allclose(shared.norm(dim=1), torch.ones(3))


def test_the_item_slot_starts_at_zero_and_is_not_part_of_the_id():
    torch.manual_seed(0)
    model = BBQ(small())
    assert model.slot is not None and not model.slot.weight.any()
    x = torch.randn(5, 10)
    codes = model.encode(x)
    with torch.no_grad():
        model.slot.weight.normal_()
    assert torch.equal(model.encode(x), codes)  # IDs (and new-item assignment) come from content alone
    assert BBQ(small(num_items=0)).slot is None


# ----------------------------------------------------------------------------------------------
# planted: content has a large factor B that behavior ignores and a small factor A that behavior follows


def _grads(seed: int, **overrides: object) -> tuple[float, dict[str, torch.Tensor]]:
    """(CLUB estimate, encoder gradients) of one batch for a model built from ``seed``."""
    torch.manual_seed(seed)
    model = BBQ(small(**overrides))
    x, b, idx = torch.randn(16, 10), torch.randn(16, 5), torch.arange(16)
    out = model.loss(x, b, idx)
    out.loss.backward()
    return float(out.metrics["mi"]), {n: p.grad.clone() for n, p in model.encoders.named_parameters()}


def test_a_negative_club_estimate_gives_the_encoders_no_mi_gradient_unless_unclamped():
    estimates = {seed: _grads(seed)[0] for seed in range(40)}
    negative = next(s for s, v in estimates.items() if v < 0)
    positive = next(s for s, v in estimates.items() if v > 0)

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.allclose(a[n], b[n], atol=1e-7) for n in a)

    base = {s: _grads(s, mi_weight=0.0)[1] for s in (negative, positive)}
    # clamped (default): below zero the MI term is flat, above zero the encoders minimise it
    assert same(_grads(negative, mi_weight=5.0)[1], base[negative])
    assert not same(_grads(positive, mi_weight=5.0)[1], base[positive])
    # the raw estimate keeps pushing below zero: what diverged on Amazon Beauty without the contrastive loss
    assert not same(_grads(negative, mi_weight=5.0, mi_clamp=False)[1], base[negative])


def _planted(n: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 4, n), rng.integers(0, 4, n)
    ca, cb, cbeh = rng.normal(size=(4, 8)), rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    x = np.concatenate([3.0 * cb[b], ca[a]], axis=1) + 0.3 * rng.normal(size=(n, 16))
    e = cbeh[a] + 0.3 * rng.normal(size=(n, 8))
    return x.astype(np.float32), e.astype(np.float32), a, b


def _purity(codes: np.ndarray, truth: np.ndarray) -> float:
    return sum(np.bincount(truth[codes == c]).max() for c in np.unique(codes)) / len(codes)


def _train(contrastive_weight: float, mi_weight: float, epochs: int = 40) -> tuple[BBQ, dict[str, float]]:
    x, e, _, _ = _planted()
    X, E = torch.from_numpy(x), torch.from_numpy(e)
    torch.manual_seed(0)
    model = BBQ(BBQConfig(modality_dims=(16,), behavior_dim=8, num_items=len(x), hidden=(32,), shared_dim=8,
                          specific_dim=8, num_levels=1, codebook_size=4, contrastive_weight=contrastive_weight,
                          mi_weight=mi_weight, club_hidden=32))
    with torch.no_grad():
        books, _ = residual_kmeans(model.latent(X).numpy(), 1, 4, seed=0)
    model.quantizer.init_from(torch.from_numpy(books))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            rows = perm[i : i + 128]
            out = model.loss(X[rows], E[rows], rows)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        with torch.no_grad():
            model.quantizer.reset_dead_codes(model.latent(X), 1, g)
    return model.eval(), {k: float(v) for k, v in out.metrics.items()}


@pytest.fixture(scope="module")
def planted_runs() -> dict[str, tuple[BBQ, dict[str, float]]]:
    torch.set_num_threads(1)
    return {"content": _train(0.0, 0.0), "contrastive": _train(1.0, 0.0), "mi": _train(0.0, 0.1)}


def test_contrastive_codebook_loss_binds_the_codes_to_behavior(planted_runs):
    x, e, a, b = _planted()
    codes = {k: m.encode(torch.from_numpy(x)).numpy() for k, (m, _) in planted_runs.items()}
    # without it the codes follow the large content-only factor; with it, the behavior factor
    assert _purity(codes["content"][:, 0], b) > 0.9 and _purity(codes["content"][:, 0], a) < 0.45
    assert _purity(codes["contrastive"][:, 0], a) > 0.6 > 0.4 > _purity(codes["contrastive"][:, 0], b)
    assert behavior_coherence(codes["contrastive"], e)[0] > behavior_coherence(codes["content"], e)[0] + 0.2
    assert planted_runs["contrastive"][1]["contrastive"] < planted_runs["content"][1]["contrastive"] - 1.0


def test_the_mi_term_lowers_the_club_estimate_between_shared_and_specific_parts(planted_runs):
    with_mi, without = planted_runs["mi"][1]["mi"], planted_runs["content"][1]["mi"]
    assert without > 5.0 and with_mi < 0.25 * without, (with_mi, without)


def test_behavior_coherence_measures_how_alike_in_behavior_items_sharing_a_prefix_are():
    e = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # all pairs: 2 of the 6 unordered pairs have cosine 1, the rest 0 -> baseline 1/3
    by_behavior = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    across = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    assert behavior_coherence(by_behavior, e) == pytest.approx([1 - 1 / 3, float("nan")], nan_ok=True)
    assert behavior_coherence(across, e)[0] == pytest.approx(0 - 1 / 3)
