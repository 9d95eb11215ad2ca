"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018), in plain PyTorch.

The backbone that the later stages build on: its trained item embeddings are the "behavior
embeddings" e_b of MMQ-v2 / ADA-SID, and its attention takes an additive ``attn_bias`` so that
BBQRec's similarity reweighting (attention logits adjusted by the semantic-ID similarity of the two
items, :class:`SIDSimilarityBias`) plugs in without touching the backbone. BBQRec's sequence-to-item
contrastive loss is an optional extra term of :meth:`SASRec.loss`.

Conventions (our choices where the paper leaves them open):

* **Padding.** Item ids are ``0 .. num_items - 1`` unchanged; the index ``num_items`` (``config.pad_id``)
  is padding. Sequences are padded on the **left**, so the last column always holds the most recent
  item. Targets use the same pad index where there is no target.
* **Positions.** Learned position embeddings are counted from the right: the last column of a
  ``(B, T)`` batch always gets position ``max_len - 1``, exactly as when the original left-pads every
  sequence to ``max_len``. The hidden state of a sequence therefore does not depend on how much extra
  left padding the batch has.
* **Blocks.** Pre-LN transformer blocks (``x + attn(LN(x))``, ``x + FFN(LN(x))``) with a final layer
  norm, as in the original implementation (which normalises before attention and FFN); the point-wise
  FFN uses GELU and an inner size ``ffn_hidden`` (RecBole's defaults) instead of the paper's ReLU/H.
  ``norm="post"`` switches to the BERT-style blocks of S3-Rec's and RecBole's SASRec (``LN(x + attn(x))``,
  ``LN(x + FFN(x))``, a layer norm on the input embeddings and none at the end): the implementation behind
  the full-ranking Beauty figures that the literature quotes for SASRec.
* **Output layer.** Tied to the item embedding: the score of item j is ``<h_t, E[j]>`` (``E`` is the item
  representation of :meth:`SASRec.embed_items`: the ID embedding, plus the parts below when they are on).

BBQRec's additions (our choices where the paper's summary is silent):

* **Reweighting.** With ``sid_levels > 0`` the model holds every item's semantic-ID codes (a buffer,
  ``-1`` = no code, the pad row has none) and adds ``bias_ij = sum_l w_l * m_l(i, j)`` to the attention
  logits of every layer, where ``m_l`` is 1 when the items at positions i and j have equal codes at level
  l (``reweight_match="level"``) or share the prefix up to level l (``"prefix"``, so the sum weighs the
  shared prefix length). Adding ``b_ij`` to a logit multiplies key j's attention weight by ``exp(b_ij)``
  before renormalisation: a reweighting, nothing else of the backbone changes. ``w`` is one vector per
  head or shared, learned or fixed, initialised to ``reweight_init``; at 0 the outputs are bit-identical
  to plain SASRec (in training, and in inference under ``no_grad``; in eval mode with autograd a mask
  that needs a gradient sends SDPA to its math kernel, so the two agree to float rounding).
* **Sequence-to-item contrastive loss** (``contrastive_weight > 0``): InfoNCE from the last position's
  hidden state (the sequence) to its target item's embedding, cosine similarity over a temperature, the
  batch's other target items as negatives (repeats of the same item are not negatives). The target side
  is the item's own embedding (``contrastive_target="item"``) or a learned embedding of its semantic ID
  (``"sid"``: the sum of one code embedding per level), which shares the signal among items with common
  codes; then items whose codes are all equal to the target's are not negatives either.
* **Semantic-ID item representation** (``item_repr="id+sid"``, an option beyond the paper's summary): an
  item is represented by its ID embedding plus the embedding of its semantic ID (the same per-level code
  table), wherever the model uses items: the input sequence, the output scores and the loss targets. Items
  that share codes then share parameters, so a rarely seen item starts from what its code neighbours
  learned. The default ``"id"`` is the plain ID embedding.
* **Content features** (``feature_dim > 0``): BBQRec keeps the items' multimodal representations in the
  sequence model and uses the semantic IDs to reweight its attention, rather than replacing the items by
  their IDs. Our reading: every item's frozen content features (text, image: the embed stage's vectors,
  concatenated) pass through one learned linear map to the model width and are added to its item
  representation, again wherever the model uses items. A rarely or never seen item is then represented by
  what it looks like. The projection is drawn after every other weight, so the rest of the model starts
  as the plain one of the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SASRec", "SASRecConfig", "SASRecOutput", "SIDSimilarityBias", "sample_negatives",
           "sample_unseen_negatives"]


@dataclass(frozen=True)
class SASRecConfig:
    """Hyper-parameters of :class:`SASRec`; defaults follow RecBole's SASRec.

    Attributes:
        num_items: catalogue size; item ids are ``0 .. num_items - 1`` and ``num_items`` is padding.
        max_len: longest input sequence; longer histories must be cut to their most recent items.
        hidden: embedding / model width H.
        num_layers: number of transformer blocks.
        num_heads: attention heads; must divide ``hidden`` (1 head is the original paper's setting).
        ffn_hidden: inner width of the point-wise feed-forward network.
        dropout: dropout on the embeddings, the attention weights and each residual branch.
        loss: ``"ce"`` (full softmax over the catalogue) or ``"bce"`` (one sampled negative per
            position, as in the original paper).
        layer_norm_eps: epsilon of every layer norm.
        norm: ``"pre"`` (pre-LN blocks and a final layer norm, as the original) or ``"post"`` (post-LN
            blocks after a layer norm on the input embeddings, as S3-Rec's and RecBole's SASRec).
        init_std: standard deviation of the normal init of embeddings and linear weights.
        sid_levels: L, the number of semantic-ID levels the attention reweighting reads; 0 = none.
        reweight_match: ``"level"`` (per-level code matches) or ``"prefix"`` (cumulative prefix matches).
        reweight_init: initial value of every level weight (0 = exactly plain SASRec at the start).
        reweight_learned: train the level weights (else they stay at ``reweight_init``).
        reweight_per_head: one weight vector per attention head instead of one for all heads.
        reweight_self: let a position's own item count as a match (an item always matches itself at every
            level, so this biases each query toward its own position); ``False`` reweights only the
            attention to the other items of the sequence.
        contrastive_weight: weight of the sequence-to-item InfoNCE term (0 = off).
        contrastive_temperature: its temperature.
        contrastive_target: ``"item"`` (the target's item embedding) or ``"sid"`` (the sum of its per-level
            code embeddings; needs ``sid_levels`` and ``sid_codebook_size``).
        sid_codebook_size: K, codes per level (codes are ``0 .. K-1``); sizes the code embeddings of
            ``contrastive_target="sid"`` and ``item_repr="id+sid"``.
        item_repr: ``"id"`` (an item is its ID embedding) or ``"id+sid"`` (its ID embedding plus the sum of
            its per-level code embeddings, in the input, the output scores and the targets; needs
            ``sid_levels`` and ``sid_codebook_size``).
        feature_dim: width of the frozen per-item content features added (through a learned linear map)
            to every item representation; 0 = none. The features are a buffer (``item_features``), given
            to the constructor or to :meth:`SASRec.set_item_features`, and saved with the state dict.
    """

    num_items: int
    max_len: int = 50
    hidden: int = 64
    num_layers: int = 2
    num_heads: int = 2
    ffn_hidden: int = 256
    dropout: float = 0.2
    loss: Literal["ce", "bce"] = "ce"
    layer_norm_eps: float = 1e-12
    norm: Literal["pre", "post"] = "pre"
    init_std: float = 0.02
    sid_levels: int = 0
    reweight_match: Literal["level", "prefix"] = "level"
    reweight_init: float = 1.0
    reweight_learned: bool = True
    reweight_per_head: bool = False
    reweight_self: bool = True
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    contrastive_target: Literal["item", "sid"] = "item"
    sid_codebook_size: int = 0
    item_repr: Literal["id", "id+sid"] = "id"
    feature_dim: int = 0

    def __post_init__(self) -> None:
        if self.num_items < 2:
            raise ValueError(
                f"num_items={self.num_items} must be at least 2 (negatives are drawn from the other "
                "items); pass the catalogue size, i.e. the largest item id + 1"
            )
        for name in ("max_len", "hidden", "num_layers", "num_heads", "ffn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.hidden % self.num_heads != 0:
            raise ValueError(
                f"hidden={self.hidden} is not divisible by num_heads={self.num_heads}; choose num_heads "
                f"among the divisors of hidden (e.g. 1 or 2) or change hidden"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1); use 0 to disable dropout")
        if self.loss not in ("ce", "bce"):
            raise ValueError(
                f"loss={self.loss!r} is unknown; use 'ce' (full softmax) or 'bce' (one sampled negative)"
            )
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm={self.norm!r} is unknown; use 'pre' (the original) or 'post' (S3-Rec, RecBole)")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps} must be > 0 (e.g. 1e-12 or 1e-5)")
        if self.init_std <= 0:
            raise ValueError(f"init_std={self.init_std} must be > 0 (e.g. 0.02)")
        if self.sid_levels < 0:
            raise ValueError(f"sid_levels={self.sid_levels} must be >= 0 (0 = no SID reweighting)")
        if self.reweight_match not in ("level", "prefix"):
            raise ValueError(f"reweight_match={self.reweight_match!r} is unknown; use 'level' or 'prefix'")
        if self.contrastive_weight < 0 or self.contrastive_temperature <= 0:
            raise ValueError("contrastive_weight must be >= 0 (0 = off) and contrastive_temperature > 0")
        if self.contrastive_target not in ("item", "sid"):
            raise ValueError(f"contrastive_target={self.contrastive_target!r} is unknown; use 'item' or 'sid'")
        if self.contrastive_target == "sid" and (self.sid_levels < 1 or self.sid_codebook_size < 1):
            raise ValueError("contrastive_target='sid' needs semantic IDs: set sid_levels (L) and "
                             "sid_codebook_size (K, the largest code + 1)")
        if self.item_repr not in ("id", "id+sid"):
            raise ValueError(f"item_repr={self.item_repr!r} is unknown; use 'id' or 'id+sid'")
        if self.item_repr == "id+sid" and (self.sid_levels < 1 or self.sid_codebook_size < 1):
            raise ValueError("item_repr='id+sid' needs semantic IDs: set sid_levels (L) and "
                             "sid_codebook_size (K, the largest code + 1)")
        if self.feature_dim < 0:
            raise ValueError(f"feature_dim={self.feature_dim} must be >= 0 (0 = no content features)")

    @property
    def uses_sid_embeddings(self) -> bool:
        """The model holds per-level code embeddings (the SID contrastive target or the SID item part)."""
        return self.contrastive_target == "sid" or self.item_repr == "id+sid"

    @property
    def pad_id(self) -> int:
        """The padding index, ``num_items``, used in both inputs and targets."""
        return self.num_items


@dataclass
class SASRecOutput:
    """Result of :meth:`SASRec.loss`.

    Attributes:
        loss: scalar training loss, averaged over the non-pad target positions.
        metrics: detached scalars for logging: ``num_targets`` and ``top1_acc`` (CE: the target is
            the arg-max over the catalogue) or ``pairwise_acc`` (BCE: the target outscores its negative).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def sample_negatives(targets: Tensor, num_items: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw one negative item per position, uniformly among the items other than the target.

    Args:
        targets: item ids, any shape, e.g. ``(B, T)``; pad entries (``num_items``) get any real item.
        num_items: catalogue size (at least 2).
        generator: optional RNG for reproducible draws; the draw happens on its device and is then
            moved to ``targets.device``.

    Returns:
        Long tensor of the same shape as ``targets`` with values in ``[0, num_items)`` and never equal
        to the target.
    """
    if num_items < 2:
        raise ValueError(
            f"num_items={num_items}: need at least 2 items to draw a negative different from the target"
        )
    device = generator.device if generator is not None else targets.device
    # Draw among num_items - 1 values and skip over the target: uniform over the other items.
    r = torch.randint(0, num_items - 1, targets.shape, generator=generator, device=device)
    r = r.to(targets.device)
    return r + (r >= targets).long()


def sample_unseen_negatives(targets: Tensor, seen: Tensor, num_items: int,
                            generator: torch.Generator | None = None, max_rounds: int = 32) -> Tensor:
    """One negative per position, uniformly among the items its user has not interacted with.

    This is the published SASRec's sampler: a negative is never one of the user's own items, so the
    loss never pushes down an item the user did pick. Draws that hit a seen item are redrawn, for at most
    ``max_rounds`` rounds; a position still clashing after that (a user who has seen nearly the whole
    catalogue) keeps a draw that is only guaranteed to differ from its target.

    Args:
        targets: ``(B, T)`` item ids; pad entries (``num_items``) get any real item.
        seen: ``(B, S)`` each row's interacted items, padded with ``num_items`` (which matches no item).
        num_items: catalogue size (at least 2).
        generator: optional RNG for reproducible draws (see :func:`sample_negatives`).
        max_rounds: redraw rounds before the fallback.

    Returns:
        Long tensor shaped like ``targets`` with values in ``[0, num_items)``, never the target.
    """
    if seen.dim() != 2 or targets.dim() != 2 or seen.shape[0] != targets.shape[0]:
        raise ValueError(f"seen {tuple(seen.shape)} must be (B, S) with the B of targets {tuple(targets.shape)}")
    seen = seen.to(targets.device)
    negatives = sample_negatives(targets, num_items, generator)
    for _ in range(max_rounds):
        clash = (negatives.unsqueeze(-1) == seen.unsqueeze(1)).any(-1)  # (B, T): the draw is one of the row's
        if not bool(clash.any()):
            break
        negatives = torch.where(clash, sample_negatives(targets, num_items, generator), negatives)
    return negatives


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention whose logits receive an additive float mask (causal + padding + bias)."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.n_head = config.num_heads
        self.c_attn = nn.Linear(config.hidden, 3 * config.hidden)
        self.c_proj = nn.Linear(config.hidden, config.hidden)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Attend over the sequence.

        Args:
            x: ``(B, T, H)`` input.
            attn_mask: ``(B, 1, T, T)`` or ``(B, nh, T, T)`` float mask added to the attention logits;
                ``-inf`` where a query may not look at a key.

        Returns:
            ``(B, T, H)`` output.
        """
        B, T, H = x.shape
        q, k, v = self.c_attn(x).split(H, dim=2)
        q = q.view(B, T, self.n_head, H // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, H // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, H // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask.to(q.dtype),  # under autocast q may be bf16; SDPA wants matching dtypes
            dropout_p=self.attn_dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, H)  # (B, T, H)
        return self.resid_dropout(self.c_proj(y))


class SIDSimilarityBias(nn.Module):
    """BBQRec's discretized similarity reweighting as an additive attention bias.

    ``bias[b, h, i, j] = sum_l w[h, l] * m_l(i, j)``, with ``m_l`` the per-level code match or the
    cumulative prefix match of the items at positions i and j (see the module docstring). A code of -1
    (padding, or a level an ID does not have) matches nothing.

    Args:
        levels: L.
        heads: rows of ``w``: the number of attention heads, or 1 to share one vector.
        match: ``"level"`` or ``"prefix"``.
        init: initial value of every weight.
        learned: make ``w`` a parameter (else a fixed buffer).
        self_match: count position i's match with itself (``False``: the diagonal of the bias is 0).
    """

    def __init__(self, levels: int, heads: int = 1, match: str = "level", init: float = 1.0,
                 learned: bool = True, self_match: bool = True) -> None:
        super().__init__()
        self.prefix = match == "prefix"
        self.self_match = self_match
        w = torch.full((heads, levels), float(init))  # (H', L); a constant: the init draws no random numbers
        if learned:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)

    def forward(self, codes: Tensor) -> Tensor:
        """Bias from the codes of a batch of sequences.

        Args:
            codes: ``(B, T, L)`` long codes of the item at each position (-1 = none).

        Returns:
            ``(B, H', T, T)`` float bias (query on dim -2, key on dim -1).
        """
        q, k = codes[:, :, None, :], codes[:, None, :, :]  # (B, T, 1, L), (B, 1, T, L)
        match = ((q == k) & (q >= 0)).to(self.weight.dtype)  # (B, T, T, L)
        if self.prefix:
            match = match.cumprod(dim=-1)  # 1 up to the first level where the codes differ
        if not self.self_match:
            t = codes.shape[1]
            match = match * (~torch.eye(t, dtype=torch.bool, device=codes.device))[None, :, :, None]
        return torch.einsum("btsl,hl->bhts", match, self.weight)  # (B, H', T, T)


class PointWiseFFN(nn.Module):
    """The same two-layer MLP applied at every position."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden, config.ffn_hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(config.ffn_hidden, config.hidden)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, T, H)`` to ``(B, T, H)``."""
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Transformer block: pre-LN ``x + attn(LN(x))`` then ``x + FFN(LN(x))``, or post-LN
    ``LN(x + attn(x))`` then ``LN(x + FFN(x))`` with ``config.norm="post"``."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.post = config.norm == "post"
        self.ln_1 = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.mlp = PointWiseFFN(config)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Map ``(B, T, H)`` to ``(B, T, H)``; see :meth:`CausalSelfAttention.forward` for the mask."""
        if self.post:
            x = self.ln_1(x + self.attn(x, attn_mask))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class SASRec(nn.Module):
    """Causal transformer over item sequences that scores the next item against the whole catalogue.

    Args:
        config: model hyper-parameters; see :class:`SASRecConfig` for the padding convention.
        sid_codes: with ``config.sid_levels > 0``: optional ``(num_items, L)`` long semantic-ID codes
            (-1 = no code at that level); they can also be set later (:meth:`set_sid_codes`) or loaded
            with the state dict (buffer ``sid_codes``).
        item_features: with ``config.feature_dim > 0``: optional ``(num_items, feature_dim)`` float content
            features (set later with :meth:`set_item_features`, or loaded with the state dict).
    """

    def __init__(self, config: SASRecConfig, sid_codes: Tensor | None = None,
                 item_features: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.num_items + 1, config.hidden, padding_idx=config.pad_id)
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        # pre-LN normalises the output of the last block; post-LN normalises the input embeddings instead
        norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.ln_emb, self.ln_f = (norm, nn.Identity()) if config.norm == "post" else (nn.Identity(), norm)
        self.apply(self._init_weights)
        # Built after the random init and drawing nothing: a reweighted model starts with exactly the
        # parameters of the plain one of the same seed.
        self.sid_bias: SIDSimilarityBias | None = None
        if config.sid_levels:
            self.register_buffer("sid_codes", torch.full((config.num_items + 1, config.sid_levels), -1,
                                                         dtype=torch.long))
            self.sid_bias = SIDSimilarityBias(config.sid_levels, config.num_heads if config.reweight_per_head else 1,
                                              config.reweight_match, config.reweight_init, config.reweight_learned,
                                              config.reweight_self)
        self.sid_code_emb: nn.Embedding | None = None
        if config.uses_sid_embeddings:
            # one flat table: level l's code c is row l * K + c; the last row (no code) stays zero. Drawn
            # after every other weight, so the rest of the model starts as the plain one of the same seed.
            pad = config.sid_levels * config.sid_codebook_size
            self.sid_code_emb = nn.Embedding(pad + 1, config.hidden, padding_idx=pad)
            self._init_weights(self.sid_code_emb)
        self.feature_proj: nn.Linear | None = None
        if config.feature_dim:
            # the pad row stays zero; drawn last, so the rest of the model is the plain one of the same seed
            self.register_buffer("item_features", torch.zeros(config.num_items + 1, config.feature_dim))
            self.feature_proj = nn.Linear(config.feature_dim, config.hidden, bias=False)
            self._init_weights(self.feature_proj)
        if sid_codes is not None:
            if not config.sid_levels:
                raise ValueError("sid_codes given but config.sid_levels=0; set sid_levels to the codes' L")
            self.set_sid_codes(sid_codes)
        if item_features is not None:
            if not config.feature_dim:
                raise ValueError("item_features given but config.feature_dim=0; set feature_dim to their width")
            self.set_item_features(item_features)

    @torch.no_grad()
    def set_sid_codes(self, codes: Tensor) -> None:
        """Copy ``(num_items, L)`` codes in (the pad row keeps -1: padding matches nothing)."""
        n, levels = self.config.num_items, self.config.sid_levels
        if tuple(codes.shape) != (n, levels):
            raise ValueError(f"sid_codes must have shape (num_items, sid_levels) = ({n}, {levels}), "
                             f"got {tuple(codes.shape)}")
        k = self.config.sid_codebook_size
        if self.sid_code_emb is not None and int(codes.max()) >= k:
            raise ValueError(f"sid_codes hold code {int(codes.max())} but sid_codebook_size={k}; set it to the "
                             "largest code + 1")
        self.sid_codes[:n] = codes.to(self.sid_codes.device, torch.long)

    @torch.no_grad()
    def set_item_features(self, features: Tensor) -> None:
        """Copy ``(num_items, feature_dim)`` content features in (the pad row stays zero)."""
        n, dim = self.config.num_items, self.config.feature_dim
        if tuple(features.shape) != (n, dim):
            raise ValueError(f"item_features must have shape (num_items, feature_dim) = ({n}, {dim}), "
                             f"got {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("item_features hold NaN or inf; check the embeddings they come from")
        self.item_features[:n] = features.to(self.item_features.device, self.item_features.dtype)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.padding_idx is not None:
                # normal_ overwrote the pad row; keep it zero so padding contributes nothing.
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def forward(self, input_ids: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        """Encode left-padded item sequences.

        Args:
            input_ids: ``(B, T)`` long item ids, left-padded with ``config.pad_id``; ``T <= max_len``.
            attn_bias: optional ``(B, T, T)`` (shared by all heads) or ``(B, nh, T, T)`` float tensor
                added to the attention logits of every layer (query on dim -2, key on dim -1); the hook
                for semantic-ID similarity reweighting. ``None`` and all zeros give identical outputs.
                A model with ``sid_levels > 0`` adds its own SID bias to it.

        Returns:
            ``(B, T, H)`` hidden states; row t summarises items ``0..t`` and predicts item ``t + 1``.
            Pad positions are zero.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_len:
            raise ValueError(
                f"sequence length {T} exceeds max_len={self.config.max_len}; keep the most recent "
                f"max_len items or build the model with a larger max_len"
            )
        keep = input_ids != self.config.pad_id  # (B, T)
        if self.sid_bias is not None:
            sid = self.sid_bias(self.sid_codes[input_ids])  # (B, 1 or nh, T, T)
            if attn_bias is None:
                attn_bias = sid
            else:
                attn_bias = (attn_bias.unsqueeze(1) if attn_bias.dim() == 3 else attn_bias) + sid
        attn_mask = self._attn_mask(keep, attn_bias)  # (B, 1 or nh, T, T)

        # Positions count from the right so the most recent item always sits at max_len - 1.
        pos = torch.arange(self.config.max_len - T, self.config.max_len, device=input_ids.device)  # (T,)
        x = self.ln_emb(self.embed_items(input_ids) + self.pos_emb(pos))  # (B, T, H)
        keep_f = keep.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        x = self.emb_dropout(x) * keep_f
        for block in self.blocks:
            x = block(x, attn_mask) * keep_f
        return self.ln_f(x) * keep_f

    def _attn_mask(self, keep: Tensor, attn_bias: Tensor | None) -> Tensor:
        """Additive float mask: ``-inf`` on future and pad keys, plus ``attn_bias``.

        Args:
            keep: ``(B, T)`` bool, True on real items.
            attn_bias: optional ``(B, T, T)`` or ``(B, nh, T, T)`` float tensor.

        Returns:
            ``(B, 1, T, T)`` or ``(B, nh, T, T)`` float mask.
        """
        B, T = keep.shape
        device = keep.device
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
        allowed = causal & keep[:, None, :]  # (B, T, T): query t sees real keys <= t
        # A pad query has no real key to its left; letting it see itself avoids an all -inf row
        # (NaN softmax). Its output is zeroed afterwards and no real query attends to it.
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)
        dtype = attn_bias.dtype if attn_bias is not None and attn_bias.is_floating_point() else torch.float32
        mask = torch.zeros(B, 1, T, T, dtype=dtype, device=device)
        mask = mask.masked_fill(~allowed[:, None], float("-inf"))  # (B, 1, T, T)
        if attn_bias is None:
            return mask
        nh = self.config.num_heads
        if attn_bias.dim() == 3:
            attn_bias = attn_bias.unsqueeze(1)  # (B, 1, T, T)
        if (
            attn_bias.dim() != 4
            or attn_bias.shape[0] != B
            or attn_bias.shape[1] not in (1, nh)
            or attn_bias.shape[2:] != (T, T)
        ):
            raise ValueError(
                f"attn_bias must have shape (B, T, T) = ({B}, {T}, {T}) or (B, nh, T, T) = "
                f"({B}, {nh}, {T}, {T}), got {tuple(attn_bias.shape)}"
            )
        if not attn_bias.is_floating_point():
            raise ValueError(f"attn_bias must be a float tensor, got dtype {attn_bias.dtype}")
        return mask + attn_bias

    def sid_embeddings(self, item_ids: Tensor) -> Tensor:
        """Semantic-ID embeddings: the sum of the items' code embeddings (zero for the pad item).

        Args:
            item_ids: long item ids of any shape ``S``.

        Returns:
            ``S + (H,)`` float embeddings.
        """
        if self.sid_code_emb is None:
            raise ValueError("sid_embeddings needs a model built with contrastive_target='sid' or "
                             "item_repr='id+sid'")
        codes = self.sid_codes[item_ids]  # S + (L,)
        offsets = torch.arange(codes.shape[-1], device=codes.device) * self.config.sid_codebook_size
        rows = torch.where(codes >= 0, codes + offsets, self.sid_code_emb.padding_idx)
        return self.sid_code_emb(rows).sum(dim=-2)

    def embed_items(self, item_ids: Tensor) -> Tensor:
        """Item representations: the ID embedding, plus the semantic-ID embedding with ``item_repr="id+sid"``
        and the projected content features with ``feature_dim > 0``.

        Args:
            item_ids: long item ids of any shape ``S`` (the pad id gives zeros).

        Returns:
            ``S + (H,)`` float embeddings.
        """
        emb = self.item_emb(item_ids)
        if self.config.item_repr == "id+sid":
            emb = emb + self.sid_embeddings(item_ids)
        if self.feature_proj is not None:
            emb = emb + self.feature_proj(self.item_features[item_ids])
        return emb

    def item_embeddings(self) -> Tensor:
        """The item (behavior) embeddings the model scores with, without the pad row.

        Returns:
            ``(num_items, H)``: with ``item_repr="id"`` and no content features a view of the embedding
            parameter (row j is item j), else the sum :meth:`embed_items` gives; call ``.detach()`` before
            storing it outside the model.
        """
        if self.config.item_repr == "id" and self.feature_proj is None:
            return self.item_emb.weight[: self.config.num_items]
        return self.embed_items(torch.arange(self.config.num_items, device=self.item_emb.weight.device))

    def score_all(self, input_ids: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        """Score every catalogue item as the next item after each sequence.

        Args:
            input_ids: ``(B, T)`` long, left-padded with ``config.pad_id``.
            attn_bias: optional attention bias, see :meth:`forward`.

        Returns:
            ``(B, num_items)`` scores (higher is better) from the last position's hidden state.
        """
        h = self(input_ids, attn_bias)[:, -1, :]  # (B, H)
        return h @ self.item_embeddings().T  # (B, num_items)

    def loss(
        self,
        input_ids: Tensor,
        target_ids: Tensor,
        negatives: Tensor | None = None,
        attn_bias: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SASRecOutput:
        """Next-item loss at every position that has a target.

        Args:
            input_ids: ``(B, T)`` long, left-padded with ``config.pad_id``.
            target_ids: ``(B, T)`` long, the item that follows each position; ``config.pad_id`` where
                there is no target (these positions are ignored).
            negatives: for ``loss="bce"``: optional ``(B, T)`` long negative per position; drawn with
                :func:`sample_negatives` (using ``generator``) when omitted. Ignored for ``"ce"``.
            attn_bias: optional attention bias, see :meth:`forward`.
            generator: RNG for the negatives drawn here.

        Returns:
            :class:`SASRecOutput`; the loss is the mean over target positions (0 when there are none),
            plus ``contrastive_weight`` times the sequence-to-item InfoNCE (metric ``contrastive``).
        """
        if target_ids.shape != input_ids.shape:
            raise ValueError(
                f"target_ids shape {tuple(target_ids.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        hidden = self(input_ids, attn_bias)  # (B, T, H)
        if self.config.loss == "ce":
            out = self._ce_loss(hidden, target_ids)
        else:
            out = self._bce_loss(hidden, target_ids, negatives, generator)
        if self.config.contrastive_weight > 0:
            cl = self._sequence_item_loss(hidden, target_ids)
            out.loss = out.loss + self.config.contrastive_weight * cl
            out.metrics["contrastive"] = cl.detach()
        return out

    def _ce_loss(self, hidden: Tensor, target_ids: Tensor) -> SASRecOutput:
        valid = target_ids != self.config.pad_id  # (B, T)
        num_targets = valid.sum()
        denom = num_targets.clamp(min=1).to(hidden.dtype)
        # Only positions with a target need the (M, num_items) logits; padding is often most of T.
        h = hidden[valid]  # (M, H)
        logits = h @ self.item_embeddings().T  # (M, num_items)
        targets = target_ids[valid]  # (M,)
        loss = F.cross_entropy(logits, targets, reduction="sum") / denom
        with torch.no_grad():
            hits = (logits.argmax(dim=-1) == targets).sum()
        metrics = {"num_targets": num_targets, "top1_acc": hits.to(hidden.dtype) / denom}
        return SASRecOutput(loss=loss, metrics=metrics)

    def _sequence_item_loss(self, hidden: Tensor, target_ids: Tensor) -> Tensor:
        """InfoNCE from each sequence's last hidden state to its target item, in-batch negatives."""
        last = target_ids[:, -1]  # (B,)
        rows = last != self.config.pad_id
        if int(rows.sum()) < 2:
            return hidden.new_zeros(())  # no negatives to contrast with
        keys = last[rows]  # (B',)
        seq = F.normalize(hidden[:, -1][rows], dim=-1)  # (B', H)
        if self.config.contrastive_target == "item":
            items = F.normalize(self.embed_items(keys), dim=-1)  # (B', H)
            same = keys[:, None] == keys[None, :]  # (B', B')
        else:
            items = F.normalize(self.sid_embeddings(keys), dim=-1)  # (B', H)
            codes = self.sid_codes[keys]  # (B', L)
            same = (codes[:, None, :] == codes[None, :, :]).all(dim=-1)  # equal IDs: an equal target vector
        logits = seq @ items.T / self.config.contrastive_temperature  # (B', B')
        same = same.fill_diagonal_(False)  # the same item (or the same ID) again is no negative
        logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(keys), device=keys.device))

    def _bce_loss(self, hidden: Tensor, target_ids: Tensor, negatives: Tensor | None,
                  generator: torch.Generator | None) -> SASRecOutput:
        valid = target_ids != self.config.pad_id  # (B, T)
        num_targets = valid.sum()
        denom = num_targets.clamp(min=1).to(hidden.dtype)
        if negatives is None:
            negatives = sample_negatives(target_ids, self.config.num_items, generator)
        elif negatives.shape != target_ids.shape:
            raise ValueError(
                f"negatives shape {tuple(negatives.shape)} must equal target_ids shape {tuple(target_ids.shape)}"
            )
        # Pad positions carry pad/garbage ids; point them at the (zero) pad row before the lookup.
        negatives = negatives.masked_fill(~valid, self.config.pad_id)
        pos_logit = (hidden * self.embed_items(target_ids)).sum(-1)  # (B, T)
        neg_logit = (hidden * self.embed_items(negatives)).sum(-1)  # (B, T)
        per_pos = F.binary_cross_entropy_with_logits(
            pos_logit, torch.ones_like(pos_logit), reduction="none"
        ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit), reduction="none")
        loss = (per_pos * valid).sum() / denom
        with torch.no_grad():
            wins = ((pos_logit > neg_logit) & valid).sum()
        metrics = {"num_targets": num_targets, "pairwise_acc": wins.to(hidden.dtype) / denom}
        return SASRecOutput(loss=loss, metrics=metrics)
