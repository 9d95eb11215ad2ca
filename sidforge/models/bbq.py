"""BBQRec's behavior-bind quantizer (Li et al., 2025, arXiv 2504.06636), in plain PyTorch.

An item's modalities (text, and image where present) are each encoded into a **behavior-shared** part and
a **modality-specific** part. The shared parts are fused and quantized by **one residual codebook**
(L levels × K codes, straight-through, commitment); the codes are the item's semantic ID. Four terms
train it:

* **reconstruction** of every modality from (quantized shared + item slot, that modality's specific part);
* **contrastive codebook learning**: InfoNCE between the quantized representation and a projection of the
  item's behavior embedding e_b (SASRec), with the other items of the batch as negatives, so items that
  users treat alike share codes ("behavior-dominant" codebook);
* **mutual-information minimisation**: the CLUB upper bound on I(shared; specific)
  (:class:`sidforge.models.objectives.CLUB`), so modality-specific noise stays out of the shared part;
* the residual quantizer's codebook + commitment loss.

Our choices where the paper (only its abstract and summary are available to us) is silent:

* **Fusion**: the shared part is the mean of the present modalities' shared parts, L2-normalised; a
  modality is absent for an item when its input row is all zeros (how ``embed`` stores a missing image).
  On the unit sphere the codebook and the (cosine) contrastive loss see the same geometry, and the
  latents cannot outgrow the codebooks (without it the contrastive gradient inflated them several-fold
  and most of each latent stayed unquantized).
* **Where the contrastive gradient goes**: the InfoNCE sees the sum of the chosen codewords, with a
  straight-through path to the encoders too (value = codewords, gradient = codebooks + encoders), so both
  the codebooks and the assignment become behavior-aware. With ``contrastive_prefixes`` (default) it is
  averaged over every prefix of the ID (level 1's codeword, levels 1–2, ...), so the coarse levels too —
  the ones two items most often share, e.g. in the attention reweighting — group behavior; on Amazon
  Beauty the full-vector loss alone left level 1 less behavior-coherent than RQ-VAE's.
* **The extra learnable ID slot**: a per-item learnable vector (zero-initialised, L2-penalised by
  ``slot_weight``) added to the quantized shared vector after the last level, for reconstruction only.
  It takes up item-level detail no codeword can express, so the codebooks need not; it is not part of
  the ID, never sees the contrastive loss, and is zero for a new item.
* **CLUB** is between the fused (pre-quantization) shared vector and the concatenated specific parts;
  q(specific | shared) is fitted by log-likelihood on detached samples in the same backward pass in which
  the encoders minimise the estimate (disjoint parameters; one step each per batch). The encoders see
  max(estimate, 0) (``mi_clamp``): a negative estimate means q lags behind, and pushing it further down
  let the specific parts run away from q until both diverged.
* **Assignment of a new item** uses its content only: behavior is unknown for a new item, and the codes
  never depend on e_b at inference (only the training did).

Nothing here knows about files, configs or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidforge.models.objectives import CLUB, info_nce
from sidforge.models.quantizers import ResidualQuantizer, _mlp

__all__ = ["BBQ", "BBQConfig", "BBQOutput"]


@dataclass(frozen=True)
class BBQConfig:
    """Hyper-parameters of :class:`BBQ`.

    Attributes:
        modality_dims: widths of the modalities, in the order they are concatenated in the input.
        behavior_dim: width of the behavior embedding e_b.
        num_items: rows of the item-level slot (item index = row); 0 disables the slot.
        hidden: hidden widths of each modality's encoder (its decoder mirrors them).
        shared_dim: width of the shared part (what is quantized).
        specific_dim: width of each modality's specific part.
        num_levels: L codebook levels.
        codebook_size: K codes per level.
        beta: commitment weight.
        contrastive_weight: weight of the contrastive codebook loss (0 = ablation without it).
        temperature: InfoNCE temperature.
        mi_weight: weight of the CLUB estimate minimised by the encoders (0 = ablation without it).
        mi_clamp: the encoders minimise max(estimate, 0) instead of the raw estimate. A negative estimate
            only says q lags behind the encoders (the mutual information itself is >= 0); minimising it
            further rewards the encoders for moving the specific parts away from q's prediction, which
            diverged on Amazon Beauty without the contrastive loss (estimate -1e9, q's NLL 1e13).
        club_hidden: hidden width of CLUB's q network.
        contrastive_prefixes: apply the contrastive loss to every prefix of the ID (the first level's
            codeword, the first two, ...; averaged) instead of to the full quantized vector only.
        slot_weight: L2 penalty on the item slot.
        dropout: MLP dropout.
    """

    modality_dims: tuple[int, ...]
    behavior_dim: int
    num_items: int = 0
    hidden: tuple[int, ...] = (512, 256)
    shared_dim: int = 32
    specific_dim: int = 32
    num_levels: int = 3
    codebook_size: int = 256
    beta: float = 0.25
    contrastive_weight: float = 1.0
    temperature: float = 0.1
    mi_weight: float = 0.1
    mi_clamp: bool = True
    club_hidden: int = 128
    contrastive_prefixes: bool = True
    slot_weight: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.modality_dims or any(d < 1 for d in self.modality_dims):
            raise ValueError(f"modality_dims={self.modality_dims} must list at least one positive width")
        for name in ("behavior_dim", "shared_dim", "specific_dim", "num_levels", "codebook_size", "club_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.num_items < 0 or any(h < 1 for h in self.hidden):
            raise ValueError("num_items must be >= 0 (0 = no item slot) and every hidden width >= 1")
        for name in ("beta", "contrastive_weight", "mi_weight", "slot_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (e.g. 0.1)")

    @property
    def input_dim(self) -> int:
        """Width of the concatenated modalities."""
        return sum(self.modality_dims)


@dataclass
class BBQOutput:
    """Result of :meth:`BBQ.loss`: the training loss, the codes (B, L) and detached parts of the loss."""

    loss: Tensor
    codes: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class BBQ(nn.Module):
    """Per-modality encoders → fused shared part → one residual codebook; decoders per modality."""

    def __init__(self, config: BBQConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        width = c.shared_dim + c.specific_dim
        self.encoders = nn.ModuleList(_mlp([d, *c.hidden, width], c.dropout) for d in c.modality_dims)
        self.decoders = nn.ModuleList(_mlp([width, *c.hidden[::-1], d], c.dropout) for d in c.modality_dims)
        self.quantizer = ResidualQuantizer(c.num_levels, c.codebook_size, c.shared_dim, c.beta)
        self.behavior_proj = nn.Linear(c.behavior_dim, c.shared_dim)
        self.club = CLUB(c.shared_dim, c.specific_dim * len(c.modality_dims), c.club_hidden)
        self.slot = nn.Embedding(c.num_items, c.shared_dim) if c.num_items else None
        if self.slot is not None:
            nn.init.zeros_(self.slot.weight)  # training starts as if there were no slot
        # catalogue mean of each modality's specific part: what decoding from codes alone uses
        self.register_buffer("specific_mean", torch.zeros(len(c.modality_dims), c.specific_dim))

    # -- encoding ------------------------------------------------------------------------------

    def encode_parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Shared and specific parts of concatenated modalities.

        Args:
            x: (B, input_dim) modalities concatenated in ``config.modality_dims`` order; an all-zero
                modality block means the item lacks that modality.

        Returns:
            ``(shared (B, S), specific (B, M, P), present (B, M) bool)``; ``shared`` is the unit-length
            mean over the present modalities (zero when none is).
        """
        S = self.config.shared_dim
        parts = x.split(list(self.config.modality_dims), dim=1)
        present = torch.stack([p.abs().sum(dim=1) > 0 for p in parts], dim=1)  # (B, M)
        out = torch.stack([enc(p) for enc, p in zip(self.encoders, parts)], dim=1)  # (B, M, S + P)
        w = present.to(x.dtype).unsqueeze(-1)  # (B, M, 1)
        shared = F.normalize((out[..., :S] * w).sum(dim=1), dim=-1)  # (B, S), the mean's direction
        return shared, out[..., S:], present

    def latent(self, x: Tensor) -> Tensor:
        """The shared vector the codebook quantizes: (B, input_dim) → (B, S)."""
        return self.encode_parts(x)[0]

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Semantic IDs from content alone: (B, input_dim) → (B, L) int64."""
        return self.quantizer.encode(self.latent(x))[0]

    # -- decoding ------------------------------------------------------------------------------

    def _decode(self, z: Tensor, specific: Tensor) -> list[Tensor]:
        """Each modality from (B, S) quantized shared and (B, M, P) specific parts."""
        return [dec(torch.cat([z, specific[:, m]], dim=1)) for m, dec in enumerate(self.decoders)]

    @torch.no_grad()
    def reconstruct(self, codes: Tensor) -> Tensor:
        """Decode from codes alone (specific parts at their catalogue mean): (B, L) → (B, input_dim)."""
        z = self.quantizer.decode(codes)
        specific = self.specific_mean.expand(len(codes), -1, -1)
        return torch.cat(self._decode(z, specific), dim=1)

    @torch.no_grad()
    def reconstruct_items(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """What the auto-encoder gives back for known items: codes + own specific parts (+ slot)."""
        shared, specific, _ = self.encode_parts(x)
        z = self.quantizer.decode(self.quantizer.encode(shared)[0])
        if self.slot is not None and index is not None:
            z = z + self.slot(index)
        return torch.cat(self._decode(z, specific), dim=1)

    @torch.no_grad()
    def set_specific_mean(self, x: Tensor) -> None:
        """Store each modality's mean specific part over the items that have it (for :meth:`reconstruct`)."""
        _, specific, present = self.encode_parts(x)
        w = present.to(specific.dtype).unsqueeze(-1)  # (N, M, 1)
        self.specific_mean.copy_((specific * w).sum(dim=0) / w.sum(dim=0).clamp(min=1.0))

    # -- training ------------------------------------------------------------------------------

    def loss(self, x: Tensor, behavior: Tensor, index: Tensor | None = None) -> BBQOutput:
        """All training terms on a batch of items.

        Args:
            x: (B, input_dim) concatenated modalities.
            behavior: (B, behavior_dim) behavior embeddings e_b of the same items.
            index: (B,) int64 item rows of the slot table (required when the model has a slot).

        Returns:
            :class:`BBQOutput`; metrics hold ``recon``, ``rq``, ``contrastive``, ``mi`` (the CLUB
            estimate), ``club_nll`` and ``slot`` — every term is computed even at weight 0, so the
            ablations report what they did not optimise and every parameter takes part in each step
            (data-parallel training needs that).
        """
        c = self.config
        shared, specific, present = self.encode_parts(x)
        z_q, codes, rq_loss = self.quantizer(shared)  # straight-through to the encoders
        slot = x.new_zeros(())
        z = z_q
        if self.slot is not None:
            if index is None:
                raise ValueError("this model has an item slot: pass the items' row indices as index")
            s = self.slot(index)  # (B, S)
            z = z_q + s
            slot = (s**2).sum(dim=1).mean()
        recon = self._recon_loss(x, z, specific, present)
        contrastive = self._contrastive_loss(shared, codes, self.behavior_proj(behavior))
        y = specific.flatten(1)  # (B, M * P)
        mi = self.club(shared, y, grad_to_q=False)
        mi_term = mi.clamp(min=0.0) if c.mi_clamp else mi
        club_nll = self.club.learning_loss(shared, y)
        loss = (recon + rq_loss + c.contrastive_weight * contrastive + c.mi_weight * mi_term + club_nll
                + c.slot_weight * slot)
        metrics = {"recon": recon, "rq": rq_loss, "contrastive": contrastive, "mi": mi, "club_nll": club_nll,
                   "slot": slot}
        return BBQOutput(loss=loss, codes=codes, metrics={k: v.detach() for k, v in metrics.items()})

    def _contrastive_loss(self, shared: Tensor, codes: Tensor, target: Tensor) -> Tensor:
        """InfoNCE between the quantized representation (or each of its prefixes) and the projected e_b.

        The representation's value is the sum of the chosen codewords; its gradient reaches the codebooks
        (through the lookup) and, straight-through, the encoders.
        """
        levels = torch.arange(self.config.num_levels, device=codes.device)
        words = self.quantizer.codebooks[levels, codes]  # (B, L, S)
        prefixes = words.cumsum(dim=1) if self.config.contrastive_prefixes else words.sum(dim=1, keepdim=True)
        through = (shared - shared.detach()).unsqueeze(1)  # (B, 1, S): zero value, identity gradient
        reps = prefixes + through  # (B, L or 1, S)
        losses = [info_nce(reps[:, i], target, self.config.temperature) for i in range(reps.shape[1])]
        return torch.stack(losses).mean()

    def _recon_loss(self, x: Tensor, z: Tensor, specific: Tensor, present: Tensor) -> Tensor:
        """Squared error summed over each present modality's dims, averaged over the batch."""
        parts = x.split(list(self.config.modality_dims), dim=1)
        total = x.new_zeros(())
        for m, (x_hat, target) in enumerate(zip(self._decode(z, specific), parts)):
            err = F.mse_loss(x_hat, target, reduction="none").sum(dim=1)  # (B,)
            total = total + (err * present[:, m].to(err.dtype)).mean()
        return total
