"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018), in plain PyTorch.

The backbone that the later stages build on: its trained item embeddings are the "behavior
embeddings" e_b of MMQ-v2 / ADA-SID, and its attention takes an additive ``attn_bias`` so that
BBQRec's similarity reweighting (attention logits adjusted by the semantic-ID similarity of the two
items) plugs in without touching the backbone.

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
* **Output layer.** Tied to the item embedding: the score of item j is ``<h_t, E[j]>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SASRec", "SASRecConfig", "SASRecOutput", "sample_negatives"]


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
        init_std: standard deviation of the normal init of embeddings and linear weights.
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
    init_std: float = 0.02

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
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps} must be > 0 (e.g. 1e-12 or 1e-5)")
        if self.init_std <= 0:
            raise ValueError(f"init_std={self.init_std} must be > 0 (e.g. 0.02)")

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
    """Pre-LN transformer block: ``x + attn(LN(x))`` then ``x + FFN(LN(x))``."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.mlp = PointWiseFFN(config)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Map ``(B, T, H)`` to ``(B, T, H)``; see :meth:`CausalSelfAttention.forward` for the mask."""
        x = x + self.attn(self.ln_1(x), attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class SASRec(nn.Module):
    """Causal transformer over item sequences that scores the next item against the whole catalogue.

    Args:
        config: model hyper-parameters; see :class:`SASRecConfig` for the padding convention.
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.num_items + 1, config.hidden, padding_idx=config.pad_id)
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.ln_f = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.apply(self._init_weights)

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
        attn_mask = self._attn_mask(keep, attn_bias)  # (B, 1 or nh, T, T)

        # Positions count from the right so the most recent item always sits at max_len - 1.
        pos = torch.arange(self.config.max_len - T, self.config.max_len, device=input_ids.device)  # (T,)
        x = self.item_emb(input_ids) + self.pos_emb(pos)  # (B, T, H)
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

    def item_embeddings(self) -> Tensor:
        """The item (behavior) embedding table without the pad row.

        Returns:
            ``(num_items, H)`` view of the embedding parameter (row j is item j); call ``.detach()``
            before storing it outside the model.
        """
        return self.item_emb.weight[: self.config.num_items]

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
            :class:`SASRecOutput`; the loss is the mean over target positions (0 when there are none).
        """
        if target_ids.shape != input_ids.shape:
            raise ValueError(
                f"target_ids shape {tuple(target_ids.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        hidden = self(input_ids, attn_bias)  # (B, T, H)
        valid = target_ids != self.config.pad_id  # (B, T)
        num_targets = valid.sum()
        denom = num_targets.clamp(min=1).to(hidden.dtype)
        if self.config.loss == "ce":
            # Only positions with a target need the (M, num_items) logits; padding is often most of T.
            h = hidden[valid]  # (M, H)
            logits = h @ self.item_embeddings().T  # (M, num_items)
            targets = target_ids[valid]  # (M,)
            loss = F.cross_entropy(logits, targets, reduction="sum") / denom
            with torch.no_grad():
                hits = (logits.argmax(dim=-1) == targets).sum()
            metrics = {"num_targets": num_targets, "top1_acc": hits.to(hidden.dtype) / denom}
            return SASRecOutput(loss=loss, metrics=metrics)

        if negatives is None:
            negatives = sample_negatives(target_ids, self.config.num_items, generator)
        elif negatives.shape != target_ids.shape:
            raise ValueError(
                f"negatives shape {tuple(negatives.shape)} must equal target_ids shape {tuple(target_ids.shape)}"
            )
        # Pad positions carry pad/garbage ids; point them at the (zero) pad row before the lookup.
        negatives = negatives.masked_fill(~valid, self.config.pad_id)
        pos_logit = (hidden * self.item_emb(target_ids)).sum(-1)  # (B, T)
        neg_logit = (hidden * self.item_emb(negatives)).sum(-1)  # (B, T)
        per_pos = F.binary_cross_entropy_with_logits(
            pos_logit, torch.ones_like(pos_logit), reduction="none"
        ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit), reduction="none")
        loss = (per_pos * valid).sum() / denom
        with torch.no_grad():
            wins = ((pos_logit > neg_logit) & valid).sum()
        metrics = {"num_targets": num_targets, "pairwise_acc": wins.to(hidden.dtype) / denom}
        return SASRecOutput(loss=loss, metrics=metrics)
