"""Objectives shared by several models: InfoNCE with in-batch negatives, and the CLUB upper bound on
mutual information (Cheng et al., "CLUB: A Contrastive Log-ratio Upper Bound of Mutual Information",
ICML 2020). Pure PyTorch; no files, configs or Ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["CLUB", "info_nce"]


def info_nce(a: Tensor, b: Tensor, temperature: float, keys: Tensor | None = None,
             symmetric: bool = True, reduction: str = "mean") -> Tensor:
    """InfoNCE between paired rows of ``a`` and ``b``; the other rows of the batch are the negatives.

    Args:
        a: (B, D) anchors.
        b: (B, D) their positives (row i of ``b`` belongs to row i of ``a``); both are L2-normalised here.
        temperature: softmax temperature over cosine similarities.
        keys: optional (B,) ids; rows sharing a key with the positive (e.g. the same target item twice in
            one batch) are not used as negatives.
        symmetric: average the a→b and b→a directions (CLIP-style); otherwise a→b only.
        reduction: ``mean`` (a scalar) or ``none``: (B,) one loss per pair i (row i's a→b term, averaged
            with column i's b→a term when symmetric), for per-item weights.

    Returns:
        Scalar loss (mean over rows), or (B,) with ``reduction="none"``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = a @ b.T / temperature  # (B, B)
    if keys is not None:
        same = keys[:, None] == keys[None, :]  # (B, B)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(len(a), device=a.device)
    loss = F.cross_entropy(logits, labels, reduction=reduction)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels, reduction=reduction))
    return loss


class CLUB(nn.Module):
    """CLUB estimate of I(x; y) with a Gaussian variational q(y | x) = N(mu(x), diag(exp(logvar(x)))).

    ``I_CLUB = E_p(x,y)[log q(y|x)] - E_p(x)E_p(y)[log q(y|x)]``. It upper-bounds the mutual information
    when q is close to p(y | x), so q is fitted by maximum likelihood (:meth:`learning_loss`) while an
    encoder minimises :meth:`forward`; the two objectives touch disjoint parameters (see ``grad_to_q``),
    so one backward pass can carry both — one step of q and one of the encoder per batch.

    Args:
        x_dim: width of x (the conditioning part).
        y_dim: width of y (the predicted part).
        hidden: hidden width of the mu and logvar networks.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh())

    def _q(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.mu(x), self.logvar(x)  # (B, y_dim) each

    def forward(self, x: Tensor, y: Tensor, grad_to_q: bool = True) -> Tensor:
        """The CLUB estimate (nats) over a batch of paired samples.

        Args:
            x: (B, x_dim).
            y: (B, y_dim); row i is paired with row i of ``x``; the negatives are all other rows.
            grad_to_q: with False, q's parameters are used detached: the gradient of the estimate
                reaches ``x`` and ``y`` (the encoder that minimises it) but never q.

        Returns:
            Scalar estimate.
        """
        if grad_to_q:
            mu, logvar = self._q(x)
        else:
            mu, logvar = (functional_call(net, {k: v.detach() for k, v in net.named_parameters()}, (x,))
                          for net in (self.mu, self.logvar))
        inv_var = torch.exp(-logvar)  # (B, y_dim)
        positive = -0.5 * ((mu - y) ** 2 * inv_var).sum(-1)  # (B,)
        # mean over j of (y_j - mu_i)^2, without the (B, B, y_dim) tensor: E[y^2] - 2 mu_i E[y] + mu_i^2
        y_mean, y_sq = y.mean(0), (y**2).mean(0)  # (y_dim,)
        negative = -0.5 * ((y_sq - 2 * mu * y_mean + mu**2) * inv_var).sum(-1)  # (B,)
        return (positive - negative).mean()

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean log q(y | x) over the batch, up to the constant -y_dim/2 · log 2π."""
        mu, logvar = self._q(x)
        return (-0.5 * ((mu - y) ** 2 * torch.exp(-logvar) + logvar)).sum(-1).mean()

    def learning_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Negative log-likelihood of q on detached samples: what trains q (and only q)."""
        return -self.log_likelihood(x.detach(), y.detach())
