"""Residual quantizers for semantic IDs: residual k-means (faiss) and RQ-VAE, in plain PyTorch/numpy.

An item's semantic ID is the list of codes ``[c_1 .. c_L]`` picked level by level: level ``l`` quantizes
the residual left by levels ``1 .. l-1`` with its own codebook of ``K`` vectors. Two ways to learn the
codebooks share this module:

* :func:`residual_kmeans` — k-means (faiss) on the data, then on the residuals, level by level; optionally
  size-balanced so no code takes more than ``ceil(N / K)`` items (fewer collisions, flatter usage), and
  optionally on a PCA projection of the data (:func:`pca_projection`): in a few hundred dimensions the
  deeper levels' residuals are nearly isotropic, 256 centroids barely partition them and near-duplicate
  items end up sharing a whole ID; all levels spending their codes on the same top principal subspace
  separate them (the same role as the RQ-VAE's narrow latent).
* :class:`RQVAE` — an MLP auto-encoder whose latent is residual-quantized (TIGER): commitment loss,
  straight-through gradients, codebooks initialised by residual k-means on the first latents, and dead
  codes re-initialised from live residuals (:meth:`ResidualQuantizer.reset_dead_codes`).

Nothing here knows about files, configs or Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RQVAE",
    "RQVAEConfig",
    "RQVAEOutput",
    "ResidualQuantizer",
    "kmeans",
    "nearest_codes",
    "pca_projection",
    "residual_kmeans",
]


# ----------------------------------------------------------------------------------------------
# k-means (faiss)


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, balanced: bool = False,
           max_points_per_centroid: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """k-means with faiss; returns ``(centroids (k, D), assignment (N,))``.

    Args:
        x: (N, D) data, ``N >= k``.
        k: number of centroids.
        niter: Lloyd iterations.
        seed: faiss seed (the result is deterministic for a seed and thread count).
        balanced: size-balanced assignment: no centroid takes more than ``ceil(N / k)`` points; the
            centroids are then refit to their balanced members (a few rounds). Our choice of heuristic:
            points keep their nearest centroid that still has room, visited from the most to the least
            confident point.
        max_points_per_centroid: faiss subsamples ``k * this`` points for training (speed on large N).
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}; lower the codebook size")
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                      min_points_per_centroid=1, verbose=False)
    km.train(x)
    centroids = km.centroids.copy()
    if not balanced:
        return centroids, nearest_codes(x, centroids)
    for _ in range(3):
        assign = _balanced_assign(x, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)[:, None]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids).astype(np.float32)
    return centroids, _balanced_assign(x, centroids)


def nearest_codes(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook row (L2) for each row of ``x``: (N, D), (K, D) → (N,) int64."""
    import faiss

    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(np.ascontiguousarray(codebook, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)


def _balanced_assign(x: np.ndarray, centroids: np.ndarray, candidates: int = 32) -> np.ndarray:
    """Assignment with at most ``ceil(N / K)`` points per centroid (see :func:`kmeans`)."""
    import faiss

    n, k = len(x), len(centroids)
    cap = math.ceil(n / k)
    m = min(k, candidates)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), m)  # (N, m) ascending
    order = np.argsort(dist[:, 1] - dist[:, 0] if m > 1 else dist[:, 0], kind="stable")[::-1]  # confident first
    room = np.full(k, cap, dtype=np.int64)
    assign = np.full(n, -1, dtype=np.int64)
    for i in order:
        for c in idx[i]:
            if room[c] > 0:
                assign[i], room[c] = c, room[c] - 1
                break
    left = np.flatnonzero(assign < 0)  # every candidate full: nearest centroid with room, exactly
    for i in left:
        free = np.flatnonzero(room > 0)
        c = free[np.argmin(((centroids[free] - x[i]) ** 2).sum(1))]
        assign[i], room[c] = c, room[c] - 1
    return assign


def pca_projection(x: np.ndarray, dim: int, whiten: bool = False,
                   chunk: int = 200_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-``dim`` principal subspace of ``x``: ``(mean (D,), project (D, dim), unproject (dim, D))``.

    ``z = (x - mean) @ project`` and ``x ≈ z @ unproject + mean``. With ``whiten`` every component is scaled
    to unit variance (``unproject`` scales it back). The covariance is accumulated in float64 by chunks, so
    millions of rows cost one pass; each component's sign is fixed (largest entry positive) so the result
    does not depend on the eigen-solver's choice.

    Raises:
        ValueError: ``dim`` is not in ``1 .. D`` or there are fewer than two rows.
    """
    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= dim <= d:
        raise ValueError(f"pca dim={dim} must be between 1 and the embedding width {d}")
    if n < 2:
        raise ValueError(f"a PCA projection needs at least 2 rows, got {n}")
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, chunk):
        block = x[start:start + chunk].astype(np.float64) - mean
        cov += block.T @ block
    cov /= n - 1
    values, vectors = np.linalg.eigh(cov)  # ascending
    values, vectors = values[::-1][:dim], vectors[:, ::-1][:, :dim]
    vectors = vectors * np.where(vectors[np.abs(vectors).argmax(axis=0), np.arange(dim)] < 0, -1.0, 1.0)
    scale = np.sqrt(np.maximum(values, 1e-12)) if whiten else np.ones(dim)
    project = (vectors / scale).astype(np.float32)
    unproject = (vectors * scale).T.astype(np.float32)
    return mean.astype(np.float32), project, unproject


def residual_kmeans(x: np.ndarray, num_levels: int, codebook_size: int, niter: int = 20, seed: int = 0,
                    balanced: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Residual k-means: level ``l`` clusters what levels ``1..l-1`` left unexplained.

    Args:
        x: (N, D) float32 data.
        num_levels: L.
        codebook_size: K codes per level.
        niter, seed, balanced: see :func:`kmeans` (level ``l`` uses ``seed + l``).

    Returns:
        ``(codebooks (L, K, D) float32, codes (N, L) int64)``.
    """
    residual = np.array(x, dtype=np.float32, copy=True)
    books, codes = [], []
    for level in range(num_levels):
        centroids, assign = kmeans(residual, codebook_size, niter=niter, seed=seed + level, balanced=balanced)
        books.append(centroids)
        codes.append(assign)
        residual -= centroids[assign]
    return np.stack(books), np.stack(codes, axis=1)


# ----------------------------------------------------------------------------------------------
# residual quantizer (trainable codebooks)


class ResidualQuantizer(nn.Module):
    """L codebooks of K vectors; quantizes level by level with straight-through gradients.

    Args:
        num_levels: L.
        codebook_size: K.
        dim: vector width D.
        beta: commitment weight (the encoder is pulled toward its codes by ``beta * ||r - sg(e)||²``).
    """

    def __init__(self, num_levels: int, codebook_size: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.num_levels, self.codebook_size, self.dim, self.beta = num_levels, codebook_size, dim, beta
        self.codebooks = nn.Parameter(torch.randn(num_levels, codebook_size, dim) * 0.01)  # (L, K, D)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize ``z``.

        Args:
            z: (B, D) vectors.

        Returns:
            ``(z_q, codes, loss)``: (B, D) quantized vectors whose gradient flows to ``z`` unchanged
            (straight-through), (B, L) int64 codes, and the scalar codebook + commitment loss summed
            over levels.
        """
        residual = z
        quantized = torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        for level in range(self.num_levels):
            book = self.codebooks[level]  # (K, D)
            code = torch.cdist(residual.detach(), book.detach()).argmin(dim=1)  # (B,)
            e = book[code]  # (B, D)
            loss = loss + F.mse_loss(e, residual.detach()) + self.beta * F.mse_loss(residual, e.detach())
            quantized = quantized + e
            residual = residual - e.detach()
            codes.append(code)
        z_q = z + (quantized - z).detach()  # straight-through: forward = codes, backward = identity
        return z_q, torch.stack(codes, dim=1), loss

    @torch.no_grad()
    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Codes and residuals without gradients: (B, D) → ``(codes (B, L), residuals (L, B, D))``.

        ``residuals[l]`` is what level ``l`` quantizes (``residuals[0] = z``).
        """
        residual, codes, residuals = z, [], []
        for level in range(self.num_levels):
            residuals.append(residual)
            code = torch.cdist(residual, self.codebooks[level]).argmin(dim=1)
            codes.append(code)
            residual = residual - self.codebooks[level][code]
        return torch.stack(codes, dim=1), torch.stack(residuals)

    def decode(self, codes: Tensor) -> Tensor:
        """Sum of the codewords: (B, L) int64 → (B, D)."""
        levels = torch.arange(self.num_levels, device=codes.device)
        return self.codebooks[levels, codes].sum(dim=1)  # (B, L, D) → (B, D)

    @torch.no_grad()
    def init_from(self, codebooks: Tensor) -> None:
        """Copy (L, K, D) codebooks in (e.g. from :func:`residual_kmeans`)."""
        if tuple(codebooks.shape) != tuple(self.codebooks.shape):
            raise ValueError(f"codebooks of shape {tuple(codebooks.shape)} do not fit {tuple(self.codebooks.shape)}")
        self.codebooks.copy_(codebooks)

    @torch.no_grad()
    def reset_dead_codes(self, z: Tensor, min_usage: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """Move every code used by fewer than ``min_usage`` of ``z`` onto a live residual.

        Level by level (so a reset at level l changes the residuals level l+1 sees), each dead code is
        replaced by the residual of a randomly drawn row of ``z`` at that level, so it will be used
        by at least that row. The draw is deterministic for a given ``generator`` state, which keeps
        data-parallel replicas identical when every rank calls this with the same data and seed.

        Args:
            z: (N, D) vectors to measure usage on (typically the latents of the whole catalogue).
            min_usage: codes used fewer times are dead.
            generator: RNG for the draw.

        Returns:
            (L,) int64 number of codes reset per level.
        """
        residual = z
        resets = []
        for level in range(self.num_levels):
            book = self.codebooks[level]
            code = torch.cdist(residual, book).argmin(dim=1)
            usage = torch.bincount(code, minlength=self.codebook_size)
            dead = torch.nonzero(usage < min_usage).flatten()
            if len(dead):
                rows = torch.randperm(len(residual), generator=generator)[: len(dead)]
                rows = rows.to(residual.device)
                book[dead[: len(rows)]] = residual[rows]
                code = torch.cdist(residual, book).argmin(dim=1)
            resets.append(len(dead))
            residual = residual - book[code]
        return torch.tensor(resets)


# ----------------------------------------------------------------------------------------------
# RQ-VAE


@dataclass(frozen=True)
class RQVAEConfig:
    """Hyper-parameters of :class:`RQVAE` (defaults: TIGER's Beauty setting).

    Attributes:
        input_dim: width of the input embedding.
        hidden: widths of the encoder's hidden layers (the decoder mirrors them).
        latent_dim: width of the quantized latent.
        num_levels: L codebooks.
        codebook_size: K codes per codebook.
        beta: commitment weight.
        dropout: dropout in the MLPs (0 in TIGER).
        uniformity: weight of a uniformity term on the unit-normalised latent, log E exp(-2‖ẑ_i − ẑ_j‖²)
            over the batch's pairs (Wang & Isola, 2020); it spreads near-duplicate items apart so fewer share
            a whole ID. Our addition, 0 = TIGER.
    """

    input_dim: int
    hidden: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    num_levels: int = 3
    codebook_size: int = 256
    beta: float = 0.25
    dropout: float = 0.0
    uniformity: float = 0.0

    def __post_init__(self) -> None:
        if self.uniformity < 0:
            raise ValueError(f"uniformity={self.uniformity} must be >= 0")
        for name in ("input_dim", "latent_dim", "num_levels", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden={self.hidden}: every layer width must be >= 1")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0 (0.25 is usual)")


@dataclass
class RQVAEOutput:
    """Result of :meth:`RQVAE.loss`: the training loss, its parts and the codes (B, L)."""

    loss: Tensor
    codes: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    """log E_{i≠j} exp(-t ‖ẑ_i − ẑ_j‖²) of the unit-normalised rows of z (B, d): lower = more spread out."""
    zn = F.normalize(z, dim=1)
    d2 = torch.cdist(zn, zn).pow(2)  # (B, B)
    off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * d2[off], dim=0) - math.log(int(off.sum()))


def _mlp(dims: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.SiLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """MLP encoder → residual quantizer → MLP decoder; the codes are the item's semantic ID."""

    def __init__(self, config: RQVAEConfig) -> None:
        super().__init__()
        self.config = config
        dims = [config.input_dim, *config.hidden, config.latent_dim]
        self.encoder = _mlp(dims, config.dropout)
        self.decoder = _mlp(dims[::-1], config.dropout)
        self.quantizer = ResidualQuantizer(config.num_levels, config.codebook_size, config.latent_dim, config.beta)

    def loss(self, x: Tensor) -> RQVAEOutput:
        """Reconstruction MSE plus the quantizer's codebook/commitment loss.

        Args:
            x: (B, input_dim) embeddings.
        """
        z = self.encoder(x)  # (B, latent)
        z_q, codes, rq_loss = self.quantizer(z)
        x_hat = self.decoder(z_q)  # (B, input_dim)
        recon = F.mse_loss(x_hat, x, reduction="none").sum(dim=1).mean()
        loss, metrics = recon + rq_loss, {"recon": recon.detach(), "rq": rq_loss.detach()}
        if self.config.uniformity > 0 and len(z) > 1:
            u = uniformity(z)
            loss = loss + self.config.uniformity * u
            metrics["uniformity"] = u.detach()
        return RQVAEOutput(loss=loss, codes=codes, metrics=metrics)

    def latent(self, x: Tensor) -> Tensor:
        """The vector the codebooks quantize: (B, input_dim) → (B, latent_dim)."""
        return self.encoder(x)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Semantic IDs: (B, input_dim) → (B, L) int64."""
        return self.quantizer.encode(self.encoder(x))[0]

    @torch.no_grad()
    def reconstruct(self, codes: Tensor) -> Tensor:
        """Decode codes back to the input space: (B, L) → (B, input_dim)."""
        return self.decoder(self.quantizer.decode(codes))
