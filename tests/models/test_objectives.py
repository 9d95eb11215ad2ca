"""Unit tests for sidforge.models.objectives: InfoNCE and the CLUB mutual-information upper bound (CPU, ~2 s)."""

from __future__ import annotations

import math

import pytest
import torch

from sidforge.models.objectives import CLUB, info_nce

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fit_q(club: CLUB, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> None:
    opt = torch.optim.Adam(club.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        club.learning_loss(x, y).backward()
        opt.step()


def test_club_is_large_on_a_planted_dependent_pair_and_near_zero_on_an_independent_one():
    torch.manual_seed(0)
    n, d = 1024, 4
    a = torch.randn(d, d)

    def dependent(x: torch.Tensor) -> torch.Tensor:
        return x @ a + 0.3 * torch.randn(len(x), d)

    x = torch.randn(n, d)
    dep, ind = CLUB(d, d, 32), CLUB(d, d, 32)
    _fit_q(dep, x, dependent(x))
    _fit_q(ind, x, torch.randn(n, d))
    x_new = torch.randn(n, d)  # fresh samples of the same two joint distributions
    with torch.no_grad():
        est_dep = float(dep(x_new, dependent(x_new)))
        est_ind = float(ind(x_new, torch.randn(n, d)))
    assert est_dep > 3.0, est_dep  # strongly dependent: several nats
    assert abs(est_ind) < 0.2, est_ind


def test_club_estimate_falls_when_an_encoder_minimises_it_while_q_keeps_fitting():
    """y = W x + noise with a learnable W: minimising the estimate must drive W (and the true MI) down."""
    torch.manual_seed(0)
    n, d, sigma = 512, 4, 0.3
    x = torch.randn(n, d)
    noise = sigma * torch.randn(n, d)
    w = torch.nn.Parameter(torch.eye(d))
    club = CLUB(d, d, 32)
    _fit_q(club, x, (x @ w + noise).detach())  # q starts well fitted: the estimate is meaningful

    def true_mi() -> float:  # I(x; Wx + n) for Gaussians, in nats
        m = torch.eye(d) + w.detach().T @ w.detach() / sigma**2
        return 0.5 * float(torch.logdet(m))

    with torch.no_grad():
        before = float(club(x, x @ w + noise))
    mi_before = true_mi()
    opt = torch.optim.Adam([w, *club.parameters()], lr=1e-2)
    for _ in range(400):
        y = x @ w + noise
        loss = club(x, y, grad_to_q=False) + club.learning_loss(x, y)  # disjoint parameters, one backward
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(club(x, x @ w + noise))
    assert before > 2.0 and after < 0.25 * before, (before, after)
    assert true_mi() < 0.25 * mi_before, (mi_before, true_mi())


def test_club_minimisation_never_moves_q_and_q_learning_never_moves_the_inputs():
    torch.manual_seed(0)
    club = CLUB(3, 2, 8)
    x = torch.randn(16, 3, requires_grad=True)
    y = torch.randn(16, 2, requires_grad=True)
    club(x, y, grad_to_q=False).backward()
    assert all(p.grad is None for p in club.parameters())
    assert x.grad is not None and y.grad is not None
    x.grad = y.grad = None
    club.learning_loss(x, y).backward()
    assert x.grad is None and y.grad is None
    assert all(p.grad is not None for p in club.parameters())


def test_info_nce_rewards_aligned_pairs_and_never_uses_repeats_as_negatives():
    torch.manual_seed(0)
    a = torch.randn(8, 5)
    aligned = float(info_nce(a, a + 0.01 * torch.randn(8, 5), 0.1))
    shuffled = float(info_nce(a, a[torch.randperm(8)], 0.1))
    assert aligned < 0.05 < math.log(8) < shuffled
    # rows 0 and 1 are the same item: with keys, row 1 is no negative of row 0 (and vice versa)
    b = a.clone()
    b[1] = b[0]
    keys = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    with_keys = info_nce(a, b, 0.1, keys=keys, symmetric=False)
    logits = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T / 0.1
    logits[0, 1] = logits[1, 0] = float("-inf")
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(8))
    torch.testing.assert_close(with_keys, expected)
