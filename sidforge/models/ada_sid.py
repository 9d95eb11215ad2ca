"""ADA-SID's mixture-of-quantization tokenizer (MMQ-v2, arXiv 2510.25622), in plain PyTorch.

An item has content modalities (text, and image where present) and a behavior embedding e_b (SASRec's
item embedding). Each is projected (h_t, h_v, h_b); **experts** turn projections into codes, one code
per expert from its own codebook of K vectors (straight-through, commitment):

* ``N_s`` **shared experts** quantize the fused content + behavior projection;
* ``N_m`` **specific experts** per content modality quantize that modality's projection; their
  codewords are mixed by a softmax gate over the modality's experts;
* ``N_b`` **behavioral experts** quantize h_b; the **dynamic behavioral router**
  ``R(e_b) = sigmoid(N_norm) * ReLU(MLP(e_b) + b)`` weights their codewords, and an exact zero drops the
  code from the item's ID, so IDs have variable length.

Decoders reconstruct every modality and e_b from the weighted codewords of each group (shared, each
modality, behavioral; the groups are concatenated). Training terms:

* reconstruction (squared error summed over dims, present modalities only; e_b for items with behavior);
* each expert's codebook + commitment loss;
* **adaptive alignment**: ``w * InfoNCE(h_content, h_b)`` with, per item,
  ``w = sigmoid(alpha N_norm - beta) / sigmoid(alpha - beta)`` (:func:`alignment_strength`), plus the
  symmetric text<->image InfoNCE (items with both);
* **sparsity**: ``lambda_g (1 - N_norm) * mean_j R_j`` (L1) with lambda adapted after every batch,
  ``lambda <- lambda * rate^sign(target - current)``, toward the item-specific target share of dropped
  behavioral IDs ``theta (1 - N_norm)``;
* **load balancing** over the behavioral experts: ``N_b * sum_j f_j p_j`` (f_j: share of items whose
  expert j is active, held constant; p_j: expert j's share of the router mass), the Switch-Transformer
  form, minimal when the experts are used evenly, so routing cannot collapse onto one expert.

N_norm in [0, 1] is an input (the stage min-max normalises the e_b norm, or the log train count, over the
items that have behavior; :func:`min_max`).

Our choices where the paper (we have its summary, not its text) is silent:

* **Fusion for the shared experts**: the mean of the present content projections and h_b, h_b counted
  with weight w (the alignment strength): a long-tail item's shared codes come (almost) from content
  alone, as do those of a new item without behavior (w = 0), so assignment sees what training saw for
  such items. With ``adaptive_alignment=False`` every item with behavior counts h_b fully.
* **Expert latents are unit length** (the codewords stay near the sphere): otherwise the L1 sparsity
  term could be dodged by shrinking the router output and growing the codewords.
* **Code weights**: every code carries the weight its codeword has in the reconstruction: 1 / N_s for
  shared codes, the softmax gate for specific ones (1 with one expert per modality), the router output
  for behavioral ones (1 for every item with behavior when the router is off). A missing modality's
  specific codes and an item without behavior's behavioral codes get weight 0 and are dropped too.
* **Item-specific L1**: one adaptive coefficient cannot meet a different target per item, so each item's
  L1 is scaled by its target / theta = 1 - N_norm (the densest items, target 0, are not pushed at all)
  and lambda is kept in ``sparsity_bins`` bins of N_norm, each adapted on its own items' gap (1 bin =
  ReMoE's global lambda). On synthetic data this tracks the per-bin targets far better than either
  part alone. The adaptation is a separate step (:meth:`ADASID.adapt_lambdas`) the training loop calls
  after the optimiser step; under DDP the buffers follow rank 0 (broadcast before every forward).
* **Router initialisation**: the bias b starts at ``router_bias_init`` > 0, so every behavioral expert
  starts active and the sparsity term, not the initialisation, decides which ones are dropped.
* **A leaky backward for the ReLU** (``router_leak``): the forward is the exact ReLU (exact zeros, IDs
  dropped), the backward passes ``router_leak`` times the gradient where the pre-activation is negative.
  With a plain ReLU a dropped ID gets no gradient, so once lambda overshoots (it grows geometrically
  while the items are denser than their target) the router falls into the all-zero state and never
  leaves it; with the leak the reconstruction can bring an ID back once lambda has shrunk, so lambda
  controls the sparsity from both sides.
* **An item without behavior** (new, or never in training; ``behavior=None`` in :meth:`ADASID.encode`):
  the router would give ``sigmoid(0) * ReLU(MLP(e_b) + b)`` of a meaningless e_b (and the same constant
  weights and codes for every new item with e_b = 0), so its behavioral codes are dropped instead: its
  ID is the shared and specific codes, which depend on content only (w = 0).

Nothing here knows about files, configs or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidforge.models.objectives import info_nce
from sidforge.models.quantizers import ResidualQuantizer, _mlp

__all__ = ["ADASID", "ADASIDConfig", "ADASIDOutput", "BehaviorRouter", "alignment_strength", "min_max"]

SHARED, SPECIFIC, BEHAVIOR = "shared", "specific", "behavior"


def alignment_strength(richness: Tensor, alpha: float, beta: float) -> Tensor:
    """w = sigmoid(alpha N_norm - beta) / sigmoid(alpha - beta): ~0 for sparse items, 1 at N_norm = 1.

    Args:
        richness: (B,) N_norm in [0, 1].
        alpha, beta: steepness and offset (the paper: 10 and 9, so w(0) = 1.7e-4 and w(0.9) = 0.68).

    Returns:
        (B,) weights in (0, 1] for N_norm in [0, 1].
    """
    return torch.sigmoid(alpha * richness - beta) / torch.sigmoid(torch.tensor(alpha - beta, dtype=richness.dtype))


def min_max(raw: Tensor, low: float, high: float) -> Tensor:
    """(raw - low) / (high - low), clipped to [0, 1]: N_norm from a raw richness proxy."""
    return ((raw - low) / max(high - low, 1e-12)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class ADASIDConfig:
    """Hyper-parameters of :class:`ADASID` (see :class:`sidforge.platform.config.AdaSIDTrainConfig`).

    Attributes:
        modality_dims: widths of the content modalities, in the order they are concatenated.
        behavior_dim: width of e_b.
        codebook_size: K codes per expert.
        shared_experts, specific_experts, behavior_experts: N_s, N_m per modality (one per entry of
            ``modality_dims``), N_b.
        hidden: hidden widths of the projections (decoders mirror them).
        proj_dim: width of h_t, h_v, h_b; latent_dim: width of each expert's latent and codewords.
        beta: commitment weight.
        adaptive_alignment: w from :func:`alignment_strength`; False: w = 1 for items with behavior.
        align_alpha, align_beta, temperature: the curve and the InfoNCE temperature.
        align_weight, content_weight: weights of the behavior<->content and text<->image InfoNCE terms.
        router: the dynamic router; False: weight 1 for every behavioral code of an item with behavior.
        router_hidden, router_bias_init, router_leak: router MLP width, the initial bias b and the
            backward leak of its ReLU.
        sparsity: the adaptive L1 term; sparsity_target: theta; lambda_init / lambda_rate /
            lambda_range: lambda_0, its multiplicative step and bounds; sparsity_bins: N_norm bins.
        balance_weight: weight of the load-balancing term.
        behavior_recon_weight: weight of reconstructing e_b.
        dropout: MLP dropout.
        richness_source, richness_range: how the stage computed N_norm (``norm`` or ``log_count``) and
            the raw (low, high) it normalised by, kept for assigning items later (:func:`min_max`).
        behavior_scale: e_b is multiplied by it on the way in (the stage sets 1 / RMS norm of e_b, so
            reconstructing e_b weighs like reconstructing a unit-length text embedding).
    """

    modality_dims: tuple[int, ...]
    behavior_dim: int
    codebook_size: int = 100
    shared_experts: int = 1
    specific_experts: tuple[int, ...] = (1,)
    behavior_experts: int = 5
    hidden: tuple[int, ...] = (256,)
    proj_dim: int = 64
    latent_dim: int = 32
    beta: float = 0.25
    adaptive_alignment: bool = True
    align_alpha: float = 10.0
    align_beta: float = 9.0
    temperature: float = 0.07
    align_weight: float = 1.0
    content_weight: float = 1.0
    router: bool = True
    router_hidden: int = 64
    router_bias_init: float = 0.5
    router_leak: float = 0.01
    sparsity: bool = True
    sparsity_target: float = 0.6
    lambda_init: float = 0.01
    lambda_rate: float = 1.2
    lambda_range: tuple[float, float] = (1e-6, 100.0)
    sparsity_bins: int = 10
    balance_weight: float = 0.01
    behavior_recon_weight: float = 1.0
    dropout: float = 0.0
    richness_source: str = "norm"
    richness_range: tuple[float, float] = (0.0, 1.0)
    behavior_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.modality_dims or any(d < 1 for d in self.modality_dims):
            raise ValueError(f"modality_dims={self.modality_dims} must list at least one positive width")
        if len(self.specific_experts) != len(self.modality_dims) or any(n < 0 for n in self.specific_experts):
            raise ValueError(f"specific_experts={self.specific_experts} needs one count >= 0 per modality "
                             f"({len(self.modality_dims)})")
        for name in ("behavior_dim", "codebook_size", "proj_dim", "latent_dim", "router_hidden", "sparsity_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.shared_experts < 0 or self.behavior_experts < 0 or self.num_experts < 1:
            raise ValueError("expert counts must be >= 0 and at least one expert must exist")
        if self.temperature <= 0 or self.lambda_rate < 1 or not 0 <= self.sparsity_target <= 1:
            raise ValueError("temperature must be > 0, lambda_rate >= 1 and sparsity_target in [0, 1]")

    @property
    def experts(self) -> tuple[tuple[str, int], ...]:
        """(group, modality index or -1) of every expert, in ID order: shared, specific, behavioral."""
        out = [(SHARED, -1)] * self.shared_experts
        for m, n in enumerate(self.specific_experts):
            out += [(SPECIFIC, m)] * n
        return tuple(out + [(BEHAVIOR, -1)] * self.behavior_experts)

    @property
    def num_experts(self) -> int:
        return self.shared_experts + sum(self.specific_experts) + self.behavior_experts

    @property
    def input_dim(self) -> int:
        return sum(self.modality_dims)


@dataclass
class ADASIDOutput:
    """Result of :meth:`ADASID.loss`.

    Attributes:
        loss: the training loss.
        codes: (B, E) codes, -1 where the code is dropped (weight 0).
        weights: (B, E) code weights (see the module doc).
        sparsity_gap: (G,) per N_norm bin, the mean of target - current share of dropped behavioral
            IDs over the batch's items with behavior (0 for an empty bin): what :meth:`ADASID.adapt_lambdas`
            steps on.
        metrics: detached terms of the loss and router statistics.
    """

    loss: Tensor
    codes: Tensor
    weights: Tensor
    sparsity_gap: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class BehaviorRouter(nn.Module):
    """R(e_b) = sigmoid(N_norm) * ReLU(MLP([e_b, N_norm]) + b): one non-negative weight per behavioral expert.

    The MLP also sees N_norm (our choice; the paper writes MLP(e_b)): the sparsity target depends on
    N_norm, which the MLP would otherwise have to re-derive from e_b (a norm is hard for an MLP), or could
    not derive at all when N_norm comes from train counts.

    Args:
        behavior_dim: width of e_b.
        hidden: hidden width of the MLP.
        experts: N_b.
        bias_init: initial b (> 0: every expert starts active).
        leak: gradient factor of the ReLU below zero in the backward pass (the forward is exact).
    """

    def __init__(self, behavior_dim: int, hidden: int, experts: int, bias_init: float = 0.5,
                 leak: float = 0.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(behavior_dim + 1, hidden), nn.SiLU(),
                                 nn.Linear(hidden, experts, bias=False))
        self.bias = nn.Parameter(torch.full((experts,), float(bias_init)))
        self.leak = leak

    def forward(self, behavior: Tensor, richness: Tensor) -> Tensor:
        """(B, H) e_b and (B,) N_norm → (B, N_b) weights, exact zeros included."""
        a = self.mlp(torch.cat([behavior, richness.unsqueeze(-1)], dim=-1)) + self.bias  # (B, N_b)
        act = F.relu(a)
        if self.leak and self.training:
            act = act + self.leak * (a - a.detach()) * (a < 0).to(a.dtype)  # value 0, gradient leak * 1
        return torch.sigmoid(richness).unsqueeze(-1) * act


class ADASID(nn.Module):
    """Projections → shared / specific / behavioral experts (one code each) → weighted decoders."""

    def __init__(self, config: ADASIDConfig) -> None:
        super().__init__()
        self.config = c = config
        self.content_proj = nn.ModuleList(_mlp([d, *c.hidden, c.proj_dim], c.dropout) for d in c.modality_dims)
        self.behavior_proj = _mlp([c.behavior_dim, *c.hidden, c.proj_dim], c.dropout)
        self.expert_enc = nn.ModuleList(nn.Linear(c.proj_dim, c.latent_dim) for _ in c.experts)
        self.codebooks = nn.ModuleList(ResidualQuantizer(1, c.codebook_size, c.latent_dim, c.beta) for _ in c.experts)
        # a softmax gate per modality with two or more experts (one expert: weight 1, nothing to learn)
        self.gates = nn.ModuleList(nn.Linear(c.proj_dim, n) if n > 1 else nn.Identity() for n in c.specific_experts)
        self.router = (BehaviorRouter(c.behavior_dim, c.router_hidden, c.behavior_experts, c.router_bias_init,
                                      c.router_leak) if c.router and c.behavior_experts else None)
        self.groups = self._group_indices()  # expert indices of each decoder input block
        width = c.latent_dim * len(self.groups)
        self.decoders = nn.ModuleList(_mlp([width, *c.hidden[::-1], d], c.dropout) for d in c.modality_dims)
        self.behavior_decoder = _mlp([width, *c.hidden[::-1], c.behavior_dim], c.dropout)
        self.register_buffer("lambdas", torch.full((c.sparsity_bins,), float(c.lambda_init)))

    def _group_indices(self) -> list[list[int]]:
        experts = self.config.experts
        keys = [(SHARED, -1), *((SPECIFIC, m) for m in range(len(self.config.modality_dims))), (BEHAVIOR, -1)]
        groups = [[e for e, ex in enumerate(experts) if ex == key] for key in keys]
        return [g for g in groups if g]

    def _slice(self, group: str) -> slice:
        idx = [e for e, (g, _) in enumerate(self.config.experts) if g == group]
        return slice(idx[0], idx[-1] + 1) if idx else slice(0, 0)

    # -- the forward pieces ------------------------------------------------------------------

    def _project(self, x: Tensor, behavior: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(h (B, M, P), present (B, M) bool, h_b (B, P))``; an all-zero modality block is absent."""
        parts = x.split(list(self.config.modality_dims), dim=1)
        present = torch.stack([p.abs().sum(dim=1) > 0 for p in parts], dim=1)
        h = torch.stack([proj(p) for proj, p in zip(self.content_proj, parts)], dim=1)
        return h, present, self.behavior_proj(behavior)

    def strength(self, richness: Tensor, has_behavior: Tensor) -> Tensor:
        """(B,) alignment strength w; 0 for items without behavior."""
        c = self.config
        w = alignment_strength(richness, c.align_alpha, c.align_beta) if c.adaptive_alignment else torch.ones_like(richness)
        return w * has_behavior

    def _latents(self, h: Tensor, present: Tensor, h_b: Tensor, w: Tensor) -> Tensor:
        """(B, E, D) unit-length latent of every expert."""
        pm = present.to(h.dtype).unsqueeze(-1)  # (B, M, 1)
        fused = ((h * pm).sum(dim=1) + w.unsqueeze(-1) * h_b) / (pm.sum(dim=1) + w.unsqueeze(-1)).clamp(min=1e-6)
        inputs = [fused if g == SHARED else h[:, m] if g == SPECIFIC else h_b for g, m in self.config.experts]
        return torch.stack([F.normalize(enc(i), dim=-1) for enc, i in zip(self.expert_enc, inputs)], dim=1)

    def _usable(self, present: Tensor, has_behavior: Tensor) -> Tensor:
        """(B, E) bool: the expert has an input for this item (what its codebook loss counts)."""
        cols = [torch.ones_like(has_behavior, dtype=torch.bool) if g == SHARED else present[:, m] if g == SPECIFIC
                else has_behavior > 0 for g, m in self.config.experts]
        return torch.stack(cols, dim=1)

    def _weights(self, h: Tensor, present: Tensor, behavior: Tensor, richness: Tensor, has_behavior: Tensor) -> Tensor:
        """(B, E) weight of each expert's codeword (the module doc's "code weights")."""
        c = self.config
        b = len(h)
        cols = [h.new_full((b, c.shared_experts), 1.0 / max(c.shared_experts, 1))]
        for m, (n, gate) in enumerate(zip(c.specific_experts, self.gates)):
            if n:
                g = torch.softmax(gate(h[:, m]), dim=-1) if n > 1 else h.new_ones(b, 1)
                cols.append(g * present[:, m : m + 1].to(h.dtype))
        if c.behavior_experts:
            r = self.router(behavior, richness) if self.router is not None else h.new_ones(b, c.behavior_experts)
            cols.append(r * has_behavior.unsqueeze(-1))
        return torch.cat(cols, dim=1)

    def _quantize(self, z: Tensor, usable: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Nearest codeword per expert: ``(straight-through z_q (B, E, D), codes (B, E), codebook loss)``."""
        q, codes, loss = [], [], z.new_zeros(())
        for e, rq in enumerate(self.codebooks):
            book, ze = rq.codebooks[0], z[:, e]  # (K, D), (B, D)
            code = torch.cdist(ze.detach(), book.detach()).argmin(dim=1)
            words = book[code]
            row = ((words - ze.detach()) ** 2).mean(dim=1) + self.config.beta * ((ze - words.detach()) ** 2).mean(dim=1)
            m = usable[:, e].to(z.dtype)
            loss = loss + (row * m).sum() / m.sum().clamp(min=1.0)
            q.append(ze + (words - ze).detach())
            codes.append(code)
        return torch.stack(q, dim=1), torch.stack(codes, dim=1), loss

    def _decode(self, q: Tensor, weights: Tensor) -> tuple[list[Tensor], Tensor]:
        """Each content modality and e_b from (B, E, D) codewords weighted by (B, E)."""
        blocks = [(q[:, g] * weights[:, g].unsqueeze(-1)).sum(dim=1) for g in self.groups]  # each (B, D)
        inp = torch.cat(blocks, dim=1)
        return [dec(inp) for dec in self.decoders], self.behavior_decoder(inp)

    # -- training ------------------------------------------------------------------------------

    def loss(self, x: Tensor, behavior: Tensor, richness: Tensor, has_behavior: Tensor) -> ADASIDOutput:
        """All training terms on a batch of items.

        Args:
            x: (B, input_dim) content modalities concatenated; an all-zero block is a missing modality.
            behavior: (B, H) e_b.
            richness: (B,) N_norm in [0, 1] (0 for items without behavior).
            has_behavior: (B,) 1 for items with behavior (seen in training), 0 otherwise.
        """
        c = self.config
        hb = has_behavior.to(x.dtype)
        behavior = behavior * c.behavior_scale
        h, present, h_b = self._project(x, behavior)
        w = self.strength(richness, hb)
        q, codes, vq = self._quantize(self._latents(h, present, h_b, w), self._usable(present, hb))
        weights = self._weights(h, present, behavior, richness, hb)
        content_hat, behavior_hat = self._decode(q, weights)
        recon = x.new_zeros(())
        for m, (x_hat, target) in enumerate(zip(content_hat, x.split(list(c.modality_dims), dim=1))):
            recon = recon + (((x_hat - target) ** 2).sum(dim=1) * present[:, m].to(x.dtype)).mean()
        recon_b = (((behavior_hat - behavior) ** 2).sum(dim=1) * hb).mean()
        pm = present.to(x.dtype).unsqueeze(-1)
        h_c = (h * pm).sum(dim=1) / pm.sum(dim=1).clamp(min=1.0)  # (B, P) the item's content
        align = (w * info_nce(h_c, h_b, c.temperature, reduction="none")).mean()
        content = self._content_loss(h, present)
        r = weights[:, self._slice(BEHAVIOR)]
        sparse, balance, gap, stats = self._router_terms(r, richness, hb)
        loss = (recon + c.behavior_recon_weight * recon_b + vq + c.align_weight * align
                + c.content_weight * content + sparse + c.balance_weight * balance)
        metrics = {"recon": recon, "recon_behavior": recon_b, "vq": vq, "align": align, "content": content,
                   "sparsity_loss": sparse, "balance": balance, "w_mean": (w * hb).sum() / hb.sum().clamp(min=1.0),
                   **stats}
        return ADASIDOutput(loss=loss, codes=codes.masked_fill(weights <= 0, -1), weights=weights.detach(),
                            sparsity_gap=gap, metrics={k: v.detach() for k, v in metrics.items()})

    def _content_loss(self, h: Tensor, present: Tensor) -> Tensor:
        """Symmetric InfoNCE between every pair of content modalities, over the items that have both."""
        total, pairs = h.new_zeros(()), 0
        for a in range(h.shape[1]):
            for b in range(a + 1, h.shape[1]):
                rows = present[:, a] & present[:, b]
                if int(rows.sum()) >= 2:
                    total, pairs = total + info_nce(h[rows, a], h[rows, b], self.config.temperature), pairs + 1
        return total / max(pairs, 1)

    def _router_terms(self, r: Tensor, richness: Tensor, hb: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Sparsity loss, load-balancing loss, per-bin sparsity gap (G,) and router statistics."""
        c = self.config
        zero, gap = r.new_zeros(()), r.new_zeros(c.sparsity_bins)
        if r.shape[1] == 0:
            return zero, zero, gap, {}
        n = hb.sum().clamp(min=1.0)
        active = (r > 0).to(r.dtype)  # (B, N_b)
        dropped = 1.0 - active.mean(dim=1)  # (B,) current share of dropped behavioral IDs
        stats = {"dropped_share": (dropped * hb).sum() / n, "lambda_mean": self.lambdas.mean()}
        if self.router is None:
            return zero, zero, gap, stats
        target = c.sparsity_target * (1.0 - richness)
        bins = (richness * c.sparsity_bins).long().clamp(0, c.sparsity_bins - 1)
        sums = torch.zeros_like(gap).index_add_(0, bins, (target - dropped) * hb)
        counts = torch.zeros_like(gap).index_add_(0, bins, hb)
        gap = (sums / counts.clamp(min=1.0)).detach()
        sparse = zero
        if c.sparsity:
            # each item's L1 scaled by its target / theta = 1 - N_norm: the densest items are not pushed
            sparse = (self.lambdas[bins] * (1.0 - richness) * r.mean(dim=1) * hb).sum() / n
        f = (active * hb.unsqueeze(-1)).sum(dim=0) / n  # (N_b,) share of items using each expert
        mass = (r * hb.unsqueeze(-1)).sum(dim=0) / n
        p = mass / mass.sum().clamp(min=1e-9)
        balance = c.behavior_experts * (f.detach() * p).sum()
        stats["target_share"] = (target * hb).sum() / n
        return sparse, balance, gap, stats

    @torch.no_grad()
    def adapt_lambdas(self, gap: Tensor) -> None:
        """lambda_g <- lambda_g * rate^sign(gap_g) within ``lambda_range`` (no-op without the sparsity term)."""
        c = self.config
        if c.sparsity and self.router is not None:
            self.lambdas.mul_(c.lambda_rate ** torch.sign(gap.to(self.lambdas))).clamp_(*c.lambda_range)

    # -- inference -----------------------------------------------------------------------------

    def _inputs(self, x: Tensor, behavior: Tensor | None, richness: Tensor | None,
                has_behavior: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        b = len(x)
        if behavior is None:  # a new item: no behavior at all (see the module doc)
            return x.new_zeros(b, self.config.behavior_dim), x.new_zeros(b), x.new_zeros(b)
        if richness is None:
            raise ValueError("with behavior, pass its N_norm (richness) too")
        hb = x.new_ones(b) if has_behavior is None else has_behavior.to(x.dtype)
        return behavior * self.config.behavior_scale, richness * hb, hb

    @torch.no_grad()
    def expert_latents(self, x: Tensor, behavior: Tensor | None = None, richness: Tensor | None = None,
                       has_behavior: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(latents (B, E, D), usable (B, E))``: what each expert quantizes (k-means init, dead codes)."""
        behavior, richness, hb = self._inputs(x, behavior, richness, has_behavior)
        h, present, h_b = self._project(x, behavior)
        return self._latents(h, present, h_b, self.strength(richness, hb)), self._usable(present, hb)

    @torch.no_grad()
    def encode(self, x: Tensor, behavior: Tensor | None = None, richness: Tensor | None = None,
               has_behavior: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Codes and their weights.

        Args:
            x: (B, input_dim) content modalities.
            behavior: (B, H) e_b, or None for items without behavior (behavioral codes dropped).
            richness: (B,) N_norm (required with ``behavior``).
            has_behavior: optional (B,) 0/1 mask of the rows whose e_b is real (default: all).

        Returns:
            ``(codes (B, E) int64, -1 where dropped; weights (B, E) float, 0 where dropped)``.
        """
        behavior, richness, hb = self._inputs(x, behavior, richness, has_behavior)
        h, present, h_b = self._project(x, behavior)
        z = self._latents(h, present, h_b, self.strength(richness, hb))
        codes = torch.stack([rq.encode(z[:, e])[0][:, 0] for e, rq in enumerate(self.codebooks)], dim=1)
        weights = self._weights(h, present, behavior, richness, hb)
        return codes.masked_fill(weights <= 0, -1), weights.masked_fill(weights <= 0, 0.0)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """``(content (B, input_dim), e_b (B, H))`` decoded from (B, E) codes (-1 = dropped) and weights."""
        kept = codes >= 0
        words = torch.stack([rq.codebooks[0][codes[:, e].clamp(min=0)] for e, rq in enumerate(self.codebooks)], dim=1)
        content, behavior = self._decode(words, weights * kept.to(weights.dtype))
        return torch.cat(content, dim=1), behavior / self.config.behavior_scale
