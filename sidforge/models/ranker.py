"""SaviorRec's CTR ranker: MBA over semantic IDs and bi-directional target attention (PAPERS.md §1).

Every item has two faces:

- **behavior** h(i) = W_h [e_id(i); stats(i)]: a trained item-ID embedding plus item statistics;
- **multimodal** m(i) = W_m z_align(i), where z is the frozen content embedding (the co-click aligned
  SaviorEnc output, or the raw one) and **MBA** adds a behavior-trained correction indexed by the
  item's semantic ID: per level l a codebook A^l, initialised to zero, looked up at c^l; the looked-up
  rows are fused by an MLP into v_align and z_align = z + v_align (the skip connection). The fusion MLP
  has no biases and a GELU (GELU(0) = 0, GELU'(0) = 1/2), so with zero codebooks v_align is exactly 0
  (training starts at the frozen embedding) and the codebooks still receive gradient. Items that share
  code prefixes share corrections: a cold item inherits what its warm neighbours in ID space learned.

**Target attention** (DIN-style): a target vector q attends over a sequence K with weights
softmax_t(MLP([q, k_t, q - k_t, q * k_t])), masked to the real positions. The bi-directional model
has four blocks: behavior target over the behavior sequence, multimodal target over the multimodal
sequence, and the two cross-space blocks (behavior target over the multimodal sequence, multimodal
target over the behavior sequence). Their outputs and both target vectors are concatenated and a DNN
gives the click logit; the loss is binary cross-entropy.

Ablations are constructor switches: ``content_dim=0`` (item-ID only, one block), ``sid_levels=0``
(no MBA), ``mba_skip=False`` (z_align = v_align), ``bidirectional=False`` (the two in-space blocks).

**SID features** (``sid_sizes``, ADA-SID's use of semantic IDs in ranking; off by default): per-level
embedding tables E_l; an item's feature is s(i) = sum_l w_l(i) E_l[c_l(i)] over its (possibly
variable-length) ID with per-code weights w (ADA-SID's router weights, 1 for other tokenizers; 0 for the
levels an ID lacks), appended to the behavior face: h(i) = W_h [e_id(i); stats(i); s(i)].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class RankerConfig:
    """Sizes and switches of :class:`SaviorRanker`.

    Attributes:
        num_items: catalogue size; item ``num_items`` is the padding id.
        id_dim: item-ID embedding size and the width of both spaces.
        num_stats: item statistics per item (float features).
        content_dim: size of the frozen content embedding z; 0 = item-ID only.
        codebook_sizes: per-level MBA codebook sizes (the SID's K per level); empty = no MBA.
        mba_dim: width of each MBA codebook row.
        mba_hidden: hidden width of the fusion MLP.
        mba_skip: z_align = z + v_align; False uses v_align alone.
        bidirectional: add the two cross-space target-attention blocks.
        attn_hidden: hidden width of each attention scoring MLP.
        mlp: hidden widths of the prediction DNN.
        dropout: dropout in the prediction DNN.
        sid_sizes: per-level table sizes of the SID features; empty = no SID features.
        sid_dim: width of the SID feature tables.
    """

    num_items: int
    id_dim: int = 64
    num_stats: int = 1
    content_dim: int = 0
    codebook_sizes: tuple[int, ...] = ()
    mba_dim: int = 64
    mba_hidden: int = 128
    mba_skip: bool = True
    bidirectional: bool = True
    attn_hidden: int = 64
    mlp: tuple[int, ...] = field(default=(200, 80))
    dropout: float = 0.0
    sid_sizes: tuple[int, ...] = ()
    sid_dim: int = 64

    def __post_init__(self) -> None:
        if self.num_items < 1 or self.id_dim < 1:
            raise ValueError("num_items and id_dim must be >= 1")
        if self.codebook_sizes and not self.content_dim:
            raise ValueError("MBA (codebook_sizes) needs a content embedding (content_dim > 0)")
        if self.bidirectional and not self.content_dim:
            raise ValueError("bidirectional attention needs a content embedding (content_dim > 0)")

    @property
    def pad_id(self) -> int:
        return self.num_items


@dataclass
class RankerOutput:
    """``logits`` (B,) click logits; ``loss`` the mean BCE when labels were given."""

    logits: Tensor
    loss: Tensor | None = None


class TargetAttention(nn.Module):
    """DIN attention unit: a target vector pools a sequence by learned relevance weights."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(4 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """Pool ``keys`` for ``query``.

        Args:
            query: (B, D) target vectors.
            keys: (B, T, D) sequence vectors.
            mask: (B, T) True at real (non-padding) positions.

        Returns:
            (B, D) attention-weighted sum of the keys; zeros for an empty sequence.
        """
        first, rest = self.score[0], self.score[1:]
        w_q, w_k, w_diff, w_prod = first.weight.split(query.shape[-1], dim=1)  # each (H, D)
        # first([q, k, q - k, q * k]) without building the (B, T, 4D) input
        hidden = ((query @ (w_q + w_diff).T + first.bias).unsqueeze(1) + keys @ (w_k - w_diff).T
                  + (query.unsqueeze(1) * keys) @ w_prod.T)  # (B, T, H)
        logits = rest(hidden).squeeze(-1)  # (B, T)
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an all-padding row gives NaN -> 0
        return torch.einsum("bt,btd->bd", weights, keys)


class ModalBehaviorAlignment(nn.Module):
    """MBA: zero-initialised per-level codebooks indexed by an item's SID, fused into v_align."""

    def __init__(self, codebook_sizes: tuple[int, ...], dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.codebooks = nn.ModuleList(nn.Embedding(k, dim) for k in codebook_sizes)
        for book in self.codebooks:
            nn.init.zeros_(book.weight)
        # No biases, GELU: v_align(0) = 0 exactly, yet d v / d A != 0 at A = 0 (GELU'(0) = 1/2).
        self.fusion = nn.Sequential(nn.Linear(len(codebook_sizes) * dim, hidden, bias=False), nn.GELU(),
                                    nn.Linear(hidden, out_dim, bias=False))

    def forward(self, codes: Tensor) -> Tensor:
        """(…, L) codes → (…, out_dim) v_align."""
        rows = [book(codes[..., level]) for level, book in enumerate(self.codebooks)]
        return self.fusion(torch.cat(rows, dim=-1))


class SaviorRanker(nn.Module):
    """The CTR ranker; see the module docstring.

    The frozen item tables are buffers set once with :meth:`set_item_tables` (or loaded with the state
    dict): ``stats`` (N+1, S), ``content`` (N+1, C) and ``codes`` (N+1, L), row N being the padding item;
    with SID features also ``sid_codes`` (N+1, L') and ``sid_weights`` (N+1, L').
    """

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        self.config = c = config
        n = c.num_items + 1
        self.item_emb = nn.Embedding(n, c.id_dim, padding_idx=c.pad_id)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[c.pad_id].zero_()
        self.behavior_proj = nn.Linear(c.id_dim + c.num_stats + (c.sid_dim if c.sid_sizes else 0), c.id_dim)
        self.register_buffer("stats", torch.zeros(n, c.num_stats))
        if c.sid_sizes:
            self.register_buffer("sid_codes", torch.zeros(n, len(c.sid_sizes), dtype=torch.long))
            self.register_buffer("sid_weights", torch.zeros(n, len(c.sid_sizes)))
            self.sid_tables = nn.ModuleList(nn.Embedding(k, c.sid_dim) for k in c.sid_sizes)
            for table in self.sid_tables:
                nn.init.normal_(table.weight, std=0.02)
        blocks = 1
        if c.content_dim:
            self.register_buffer("content", torch.zeros(n, c.content_dim))
            self.content_proj = nn.Linear(c.content_dim, c.id_dim)
            blocks = 4 if c.bidirectional else 2
        if c.codebook_sizes:
            self.register_buffer("codes", torch.zeros(n, len(c.codebook_sizes), dtype=torch.long))
            self.mba = ModalBehaviorAlignment(c.codebook_sizes, c.mba_dim, c.mba_hidden, c.content_dim)
        self.attention = nn.ModuleList(TargetAttention(c.id_dim, c.attn_hidden) for _ in range(blocks))
        width = c.id_dim * (blocks + (2 if c.content_dim else 1))
        layers: list[nn.Module] = []
        for hidden in c.mlp:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(c.dropout)]
            width = hidden
        self.dnn = nn.Sequential(*layers, nn.Linear(width, 1))

    # ------------------------------------------------------------------------------------------

    def set_item_tables(self, stats: Tensor, content: Tensor | None = None, codes: Tensor | None = None,
                        sid_codes: Tensor | None = None, sid_weights: Tensor | None = None) -> None:
        """Fill the frozen per-item tables (item rows 0..N-1; the padding row stays zero).

        Args:
            stats: (N, num_stats) float item statistics.
            content: (N, content_dim) frozen content embeddings z (when ``content_dim`` > 0).
            codes: (N, L) SID codes, level l in [0, codebook_sizes[l]) (when MBA is on).
            sid_codes: (N, L') codes of the SID features, -1 where an ID has no code at that level
                (when ``sid_sizes``).
            sid_weights: (N, L') their weights (default 1 for every code).
        """
        c, n = self.config, self.config.num_items
        if stats.shape != (n, c.num_stats):
            raise ValueError(f"stats must be ({n}, {c.num_stats}), got {tuple(stats.shape)}")
        self.stats[:n] = stats.to(self.stats)
        if c.content_dim:
            if content is None or content.shape != (n, c.content_dim):
                raise ValueError(f"content must be ({n}, {c.content_dim}), got "
                                 f"{None if content is None else tuple(content.shape)}")
            self.content[:n] = content.to(self.content)
        if c.codebook_sizes:
            if codes is None or codes.shape != (n, len(c.codebook_sizes)):
                raise ValueError(f"codes must be ({n}, {len(c.codebook_sizes)}), got "
                                 f"{None if codes is None else tuple(codes.shape)}")
            sizes = torch.tensor(c.codebook_sizes)
            if (codes < 0).any() or (codes >= sizes).any():
                raise ValueError(f"codes must lie in [0, K_l) per level, K = {c.codebook_sizes}")
            self.codes[:n] = codes.to(self.codes)
        if c.sid_sizes:
            self._set_sid_rows(torch.arange(n), sid_codes, sid_weights)

    def _set_sid_rows(self, rows: Tensor, sid_codes: Tensor | None, sid_weights: Tensor | None) -> None:
        sizes = self.config.sid_sizes
        if sid_codes is None or sid_codes.shape != (len(rows), len(sizes)):
            raise ValueError(f"sid_codes must be ({len(rows)}, {len(sizes)}), got "
                             f"{None if sid_codes is None else tuple(sid_codes.shape)}")
        if (sid_codes < -1).any() or (sid_codes >= torch.tensor(sizes)).any():
            raise ValueError(f"sid_codes must lie in [0, K_l) per level (-1 = none), K = {sizes}")
        weights = torch.ones(sid_codes.shape) if sid_weights is None else sid_weights.to(torch.float32)
        if weights.shape != sid_codes.shape:
            raise ValueError(f"sid_weights must match sid_codes {tuple(sid_codes.shape)}, got {tuple(weights.shape)}")
        kept = sid_codes >= 0
        self.sid_codes[rows] = sid_codes.clamp(min=0).to(self.sid_codes)
        self.sid_weights[rows] = (weights * kept).to(self.sid_weights)  # a missing level weighs nothing

    def sid_feature(self, items: Tensor) -> Tensor:
        """s(i) = sum_l w_l(i) E_l[c_l(i)]: (…,) → (…, sid_dim)."""
        codes, weights = self.sid_codes[items], self.sid_weights[items]  # (…, L')
        rows = torch.stack([table(codes[..., level]) for level, table in enumerate(self.sid_tables)], dim=-2)
        return (rows * weights.unsqueeze(-1)).sum(dim=-2)

    def aligned_content(self, items: Tensor) -> Tensor:
        """z_align of ``items`` (any shape (…,)) → (…, content_dim)."""
        z = self.content[items]
        if not self.config.codebook_sizes:
            return z
        v = self.mba(self.codes[items])
        return z + v if self.config.mba_skip else v

    def behavior(self, items: Tensor) -> Tensor:
        """h(i): (…,) → (…, id_dim)."""
        parts = [self.item_emb(items), self.stats[items]]
        if self.config.sid_sizes:
            parts.append(self.sid_feature(items))
        return self.behavior_proj(torch.cat(parts, dim=-1))

    def multimodal(self, items: Tensor) -> Tensor:
        """m(i): (…,) → (…, id_dim)."""
        return self.content_proj(self.aligned_content(items))

    def forward(self, history: Tensor, target: Tensor, labels: Tensor | None = None) -> RankerOutput:
        """Click logits of (history, target) pairs.

        Args:
            history: (B, T) item ids, padded with ``pad_id`` (any side).
            target: (B,) candidate item ids.
            labels: optional (B,) 0/1 clicks; adds the mean BCE loss.
        """
        mask = history != self.config.pad_id  # (B, T)
        b, t = history.shape
        # Each item's vectors once per batch: histories repeat across a positive and its negatives.
        items, inverse = torch.unique(torch.cat([target, history.reshape(-1)]), return_inverse=True)

        def per_position(table: Tensor) -> tuple[Tensor, Tensor]:
            rows = table[inverse]
            return rows[:b], rows[b:].view(b, t, -1)  # (B, D), (B, T, D)

        h_t, h_seq = per_position(self.behavior(items))
        parts = [h_t, self.attention[0](h_t, h_seq, mask)]
        if self.config.content_dim:
            m_t, m_seq = per_position(self.multimodal(items))
            parts += [m_t, self.attention[1](m_t, m_seq, mask)]
            if self.config.bidirectional:
                parts += [self.attention[2](h_t, m_seq, mask), self.attention[3](m_t, h_seq, mask)]
        logits = self.dnn(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return RankerOutput(logits=logits, loss=loss)

    def loss(self, history: Tensor, target: Tensor, labels: Tensor) -> RankerOutput:
        """:meth:`forward` with labels (the training entry point the runner wraps)."""
        return self.forward(history, target, labels)


# ----------------------------------------------------------------------------------------------
# items added after training (serving)


def with_capacity(model: SaviorRanker, num_items: int) -> SaviorRanker:
    """A copy of ``model`` with item rows for ``num_items`` items (at least its own).

    Every weight and the rows of the trained items are kept. The added rows stand for items the model
    never saw: a zero item-ID embedding (what the padding row holds; no ID was trained for them), zero
    statistics (a train count of 0, like a cold item), and zero content and codes until
    :func:`set_item_rows` fills them. The padding id moves to ``num_items``.

    Args:
        model: a trained ranker.
        num_items: the new catalogue size (>= ``model.config.num_items``).
    """
    from dataclasses import replace

    c = model.config
    if num_items < c.num_items:
        raise ValueError(f"num_items={num_items} is below the model's {c.num_items} items")
    grown = SaviorRanker(replace(c, num_items=num_items))
    state = model.state_dict()
    for name, target in grown.state_dict().items():
        if target.shape != state[name].shape:  # an item table: (N + 1, …) -> (num_items + 1, …)
            rows = torch.zeros_like(target)
            rows[: c.num_items] = state[name][: c.num_items]
            state[name] = rows
    grown.load_state_dict(state)
    return grown.train(model.training)


def set_item_rows(model: SaviorRanker, items: Tensor, stats: Tensor, content: Tensor | None = None,
                  codes: Tensor | None = None) -> None:
    """Fill the frozen tables of some items (new ones, after :func:`with_capacity`) in place.

    Args:
        items: (M,) item ids in ``[0, num_items)``.
        stats: (M, num_stats) item statistics.
        content: (M, content_dim) content embeddings z (when ``content_dim`` > 0).
        codes: (M, L) SID codes, level l in [0, codebook_sizes[l]) (when MBA is on).
    """
    c = model.config
    items = torch.as_tensor(items, dtype=torch.long)
    m = len(items)
    if items.dim() != 1 or (m and (int(items.min()) < 0 or int(items.max()) >= c.num_items)):
        raise ValueError(f"items must be a (M,) tensor of ids in [0, {c.num_items})")
    if stats.shape != (m, c.num_stats):
        raise ValueError(f"stats must be ({m}, {c.num_stats}), got {tuple(stats.shape)}")
    if c.content_dim and (content is None or content.shape != (m, c.content_dim)):
        raise ValueError(f"content must be ({m}, {c.content_dim}), got {None if content is None else tuple(content.shape)}")
    if c.codebook_sizes:
        if codes is None or codes.shape != (m, len(c.codebook_sizes)):
            raise ValueError(f"codes must be ({m}, {len(c.codebook_sizes)}), got "
                             f"{None if codes is None else tuple(codes.shape)}")
        if (codes < 0).any() or (codes >= torch.tensor(c.codebook_sizes)).any():
            raise ValueError(f"codes must lie in [0, K_l) per level, K = {c.codebook_sizes}")
    with torch.no_grad():
        model.stats[items] = stats.to(model.stats)
        if c.content_dim:
            model.content[items] = content.to(model.content)  # type: ignore[union-attr]
        if c.codebook_sizes:
            model.codes[items] = codes.to(model.codes)  # type: ignore[union-attr]
