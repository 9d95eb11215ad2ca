"""Generative retrieval over semantic IDs: a TIGER-style encoder–decoder and constrained beam search.

TIGER (Rajput et al., 2023) reads a user's history as semantic-ID tokens and generates the ID of the
next item token by token. Everything here is plain PyTorch: the model, the prefix trie of the
catalogue's IDs, beam search restricted to that trie, and exhaustive teacher-forced scoring.

Conventions (our choices where the paper leaves them open):

* **Vocabulary.** Token 0 is padding, 1 begins a decoded ID (BOS), 2 ends one (EOS). Level ``l``'s
  code ``c`` is token ``offsets[l] + c`` with ``offsets[0] = 3`` and one block of ``level_sizes[l]``
  tokens per level, so the same code at two levels is two tokens. Optional user-hash tokens follow the
  code blocks; they are encoder inputs only, never generated.
* **IDs.** An item's ID is its codes (``-1``-padded on the right for variable-length IDs, e.g. ADA-SID's
  sparse router) followed by EOS, so an ID that is a prefix of another is still unambiguous.
* **History.** ``(B, H, L)`` code tokens: item ``h`` of the history (left-padded, most recent last)
  and its codes, padded with 0. Flattened to ``H * L`` encoder tokens; an item-position embedding
  (0 = most recent) marks which item a token belongs to, so no separator tokens are needed.
* **Blocks.** Pre-LN transformer blocks (nanoGPT style). Attention widths are ``num_heads * head_dim``,
  which need not equal ``d_model`` (TIGER: d_model 128, 6 heads of 64, FFN 1024). Learned absolute
  positions instead of T5's relative bias. Untied output layer over the code and special tokens.
* **Scores.** An item's score is its log-probability under the *trie-constrained* decoder: at every
  step the logits of tokens that do not continue a real ID are ``-inf`` before the softmax. Scores
  over the catalogue are then a proper distribution (``exp`` sums to 1), forced steps (one allowed
  token) add exactly 0, and :func:`beam_search` with ``beam_size >= num_items`` returns exactly the
  order of :func:`score_items`. Training uses the ordinary (unconstrained) cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "TIGER",
    "TIGERConfig",
    "TIGEROutput",
    "ItemTrie",
    "beam_search",
    "code_tokens",
    "score_items",
    "sid_tokens",
]

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 3


def _offsets(level_sizes: tuple[int, ...]) -> list[int]:
    out, start = [], NUM_SPECIAL
    for size in level_sizes:
        out.append(start)
        start += size
    return out


@dataclass(frozen=True)
class TIGERConfig:
    """Hyper-parameters of :class:`TIGER`; the defaults are TIGER's sizes.

    Attributes:
        level_sizes: codes per level (``K_l``); ``len(level_sizes)`` is the longest ID (collision digit
            included). A digit level's size is the largest digit + 1.
        max_history: most items in a history (TIGER: 20).
        user_tokens: user-hash buckets (one extra encoder token per history); 0 turns them off.
        d_model: embedding / residual width.
        num_layers: blocks in the encoder and, separately, in the decoder.
        num_heads: attention heads.
        head_dim: width of one head (the attention width is ``num_heads * head_dim``).
        ffn_hidden: inner width of the feed-forward network.
        dropout: dropout on embeddings, attention weights and residual branches.
        init_std: standard deviation of the normal init of embeddings and linear weights.
    """

    level_sizes: tuple[int, ...]
    max_history: int = 20
    user_tokens: int = 0
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 6
    head_dim: int = 64
    ffn_hidden: int = 1024
    dropout: float = 0.1
    init_std: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "level_sizes", tuple(int(s) for s in self.level_sizes))  # JSON gives lists
        if not self.level_sizes or min(self.level_sizes) < 1:
            raise ValueError(f"level_sizes={self.level_sizes} must list at least one positive codebook size")
        for name in ("max_history", "d_model", "num_layers", "num_heads", "head_dim", "ffn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.user_tokens < 0:
            raise ValueError(f"user_tokens={self.user_tokens} must be >= 0 (0 = no user token)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1); use 0 to disable dropout")

    @property
    def max_len(self) -> int:
        """Most codes in one ID (EOS excluded)."""
        return len(self.level_sizes)

    @property
    def output_vocab(self) -> int:
        """Tokens the decoder can produce: the specials and every level's codes."""
        return NUM_SPECIAL + sum(self.level_sizes)

    @property
    def user_offset(self) -> int:
        """Token of user-hash bucket 0."""
        return self.output_vocab

    @property
    def vocab_size(self) -> int:
        """All tokens, user-hash tokens included."""
        return self.output_vocab + self.user_tokens


@dataclass
class TIGEROutput:
    """Result of :meth:`TIGER.loss`.

    Attributes:
        loss: mean cross-entropy over the non-pad target tokens (EOS included).
        metrics: detached scalars: ``num_tokens``, ``token_acc`` (arg-max equals the target token) and
            ``id_acc`` (every token of the ID right under teacher forcing).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# IDs as tokens


def code_tokens(codes: Tensor, level_sizes: tuple[int, ...]) -> Tensor:
    """Map codes to level-specific tokens.

    Args:
        codes: ``(N, L)`` integer codes, ``-1``-padded on the right for shorter IDs; ``L <= len(level_sizes)``.
        level_sizes: codes per level.

    Returns:
        ``(N, L)`` long tokens, :data:`PAD` where ``codes`` is -1.

    Raises:
        ValueError: a code outside its level's range, an ID with no code, or a -1 before a code.
    """
    codes = torch.as_tensor(codes).long()
    if codes.dim() != 2 or codes.shape[1] > len(level_sizes) or codes.shape[1] < 1:
        raise ValueError(f"codes must be (N, L) with 1 <= L <= {len(level_sizes)} levels, "
                         f"got {tuple(codes.shape)}")
    real = codes >= 0
    if codes.shape[0] and not real[:, 0].all():
        rows = torch.nonzero(~real[:, 0]).flatten()[:5].tolist()
        raise ValueError(f"item rows {rows} have no code; every ID needs at least one")
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("codes must be -1-padded on the right only (no code after a -1)")
    sizes = torch.tensor(level_sizes[: codes.shape[1]], device=codes.device)
    bad = real & (codes >= sizes)
    if bad.any():
        row, level = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"item row {row}: code {int(codes[row, level])} at level {level} is outside "
                         f"[0, {level_sizes[level]}); build the model with larger level_sizes")
    offsets = torch.tensor(_offsets(level_sizes)[: codes.shape[1]], device=codes.device)
    return torch.where(real, codes + offsets, torch.full_like(codes, PAD))


def sid_tokens(codes: Tensor, level_sizes: tuple[int, ...]) -> Tensor:
    """The decoder targets: code tokens followed by :data:`EOS`.

    Args:
        codes: ``(N, L)`` codes, ``-1``-padded on the right.
        level_sizes: codes per level.

    Returns:
        ``(N, L + 1)`` long tokens: the ID, then EOS, then :data:`PAD`.
    """
    tok = code_tokens(codes, level_sizes)
    tok = torch.cat([tok, torch.full_like(tok[:, :1], PAD)], dim=1)  # (N, L + 1)
    length = (tok != PAD).sum(dim=1)  # (N,)
    tok[torch.arange(len(tok), device=tok.device), length] = EOS
    return tok


# ----------------------------------------------------------------------------------------------
# the prefix trie


class ItemTrie:
    """Prefix tree of the catalogue's token sequences (IDs + EOS), stored as sorted edge arrays.

    Node 0 is the root (the empty prefix); every other node is a distinct prefix. Edges are sorted by
    ``parent * vocab + token``, so the children of a node are one contiguous range (``start``) and a
    child is found by binary search. Everything is a tensor, so masks for a batch of prefixes come
    from a few gathers on any device.

    Args:
        codes: ``(N, L)`` integer codes of the items, ``-1``-padded on the right.
        level_sizes: codes per level (the model's ``TIGERConfig.level_sizes``).
        item_ids: ``(N,)`` id of each row (default ``0 .. N-1``).

    Attributes:
        vocab_size: decoder vocabulary (specials + codes).
        depth: most tokens of one ID, EOS included.
        final_item: ``(num_nodes,)`` the item a prefix leads to when exactly one item lies below it
            (its remaining tokens are forced), else -1.
    """

    def __init__(self, codes: Tensor, level_sizes: tuple[int, ...], item_ids: Tensor | None = None) -> None:
        tokens = sid_tokens(codes, tuple(level_sizes)).cpu()  # (N, T)
        n, depth = tokens.shape
        self.vocab_size = NUM_SPECIAL + sum(level_sizes)
        self.depth = depth
        ids = torch.arange(n) if item_ids is None else torch.as_tensor(item_ids).long().cpu()
        if ids.shape != (n,):
            raise ValueError(f"item_ids must have shape ({n},), got {tuple(ids.shape)}")
        keys, path = self._edges(tokens)
        num_nodes = 1 + len(keys)
        parents = keys // self.vocab_size
        self.keys = keys  # (E,) sorted: parent * vocab + token
        self.child = torch.arange(1, num_nodes)  # (E,) edges are numbered in node order
        self.start = torch.searchsorted(parents, torch.arange(num_nodes + 1))  # (num_nodes + 1,)
        self.final_item = self._final_items(path, ids, num_nodes)
        leaves = path.gather(1, (tokens != PAD).sum(1, keepdim=True) - 1).squeeze(1)  # (N,) node after EOS
        if len(leaves.unique()) != n:
            dup = torch.nonzero(torch.bincount(leaves, minlength=num_nodes)[leaves] > 1).flatten()[:5]
            raise ValueError(f"IDs are not unique (item rows {dup.tolist()} share one); resolve collisions first")

    def _edges(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Sorted edge keys and each row's node after every token (``(N, T)``, -1 past EOS)."""
        n, depth = tokens.shape
        node = torch.zeros(n, dtype=torch.long)
        path = torch.full((n, depth), -1, dtype=torch.long)
        keys, num_nodes = [], 1
        for t in range(depth):
            rows = tokens[:, t] != PAD
            key = node[rows] * self.vocab_size + tokens[rows, t]
            uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
            # Parents at depth t all precede depth t's new nodes, so the keys stay globally sorted.
            node[rows] = num_nodes + inv
            path[rows, t] = node[rows]
            keys.append(uniq)
            num_nodes += len(uniq)
        return torch.cat(keys), path

    @staticmethod
    def _final_items(path: Tensor, ids: Tensor, num_nodes: int) -> Tensor:
        real = path >= 0
        nodes = torch.cat([torch.zeros(len(path), dtype=torch.long), path[real]])  # root once per item
        owners = torch.cat([ids, ids[:, None].expand_as(path)[real]])
        count = torch.bincount(nodes, minlength=num_nodes)
        final = torch.full((num_nodes,), -1, dtype=torch.long)
        single = count[nodes] == 1
        final[nodes[single]] = owners[single]
        return final

    @property
    def num_nodes(self) -> int:
        return len(self.final_item)

    def to(self, device: torch.device | str) -> ItemTrie:
        """Move the arrays to ``device`` (in place); returns ``self``."""
        for name in ("keys", "child", "start", "final_item"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def allowed(self, nodes: Tensor) -> Tensor:
        """Tokens that continue each prefix.

        Args:
            nodes: ``(M,)`` long node ids.

        Returns:
            ``(M, vocab_size)`` bool mask, True where the token leads to at least one item.
        """
        first, count = self.start[nodes], self.start[nodes + 1] - self.start[nodes]  # (M,), (M,)
        row = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), count)  # (E_M,)
        before = torch.cumsum(count, 0) - count  # edges of the earlier rows
        edge = first[row] + torch.arange(len(row), device=nodes.device) - before[row]  # (E_M,)
        mask = torch.zeros(len(nodes), self.vocab_size, dtype=torch.bool, device=nodes.device)
        mask[row, self.keys[edge] % self.vocab_size] = True
        return mask

    def step(self, nodes: Tensor, tokens: Tensor) -> Tensor:
        """The child of each node along ``tokens`` (same shapes); -1 where that prefix is no item's."""
        key = nodes * self.vocab_size + tokens
        pos = torch.searchsorted(self.keys, key.reshape(-1)).reshape(key.shape).clamp(max=len(self.keys) - 1)
        return torch.where(self.keys[pos] == key, self.child[pos], torch.full_like(key, -1))


# ----------------------------------------------------------------------------------------------
# the model


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, T, C)``; causal (decoder) or with a key mask (encoder)."""

    def __init__(self, config: TIGERConfig) -> None:
        super().__init__()
        inner = config.num_heads * config.head_dim
        self.n_head, self.head_dim = config.num_heads, config.head_dim
        self.c_attn = nn.Linear(config.d_model, 3 * inner)
        self.c_proj = nn.Linear(inner, config.d_model)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """Attend.

        Args:
            x: ``(B, T, C)`` input.
            key_mask: optional ``(B, 1, 1, T)`` bool, True on keys that may be attended to.
            causal: attend to earlier positions only.

        Returns:
            ``(B, T, C)`` output.
        """
        B, T, _ = x.shape
        inner = self.n_head * self.head_dim
        q, k, v = self.c_attn(x).split(inner, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=causal,
                                           dropout_p=self.attn_dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, inner)  # (B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y))

    def step(self, x: Tensor, past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Causal attention for one new position, reusing the earlier positions' keys and values.

        Args:
            x: ``(N, 1, C)`` the newest position of ``N`` sequences.
            past: keys and values of the earlier positions, each ``(N, nh, t, hs)``; None at the first.

        Returns:
            ``((N, 1, C) output, (keys, values) now (N, nh, t + 1, hs))``.
        """
        N = x.shape[0]
        inner = self.n_head * self.head_dim
        q, k, v = (t.view(N, 1, self.n_head, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(inner, 2))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (N, nh, t + 1, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # the newest position sees every earlier one
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(N, 1, inner))), (k, v)


class CrossAttention(nn.Module):
    """Decoder queries attend to the encoder memory; keys/values are projected once per batch."""

    def __init__(self, config: TIGERConfig) -> None:
        super().__init__()
        inner = config.num_heads * config.head_dim
        self.n_head, self.head_dim = config.num_heads, config.head_dim
        self.c_q = nn.Linear(config.d_model, inner)
        self.c_kv = nn.Linear(config.d_model, 2 * inner)
        self.c_proj = nn.Linear(inner, config.d_model)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def project(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, S, C)`` memory → keys and values, each ``(B, nh, S, hs)``."""
        B, S, _ = memory.shape
        k, v = self.c_kv(memory).split(self.n_head * self.head_dim, dim=2)
        k = k.view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, S, hs)
        v = v.view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, S, hs)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], key_mask: Tensor) -> Tensor:
        """Attend from ``(B, Q, C)`` queries (every beam and position of a user) to that user's memory.

        Args:
            x: ``(B, Q, C)`` queries.
            kv: keys and values from :meth:`project`, each ``(B, nh, S, hs)``.
            key_mask: ``(B, 1, 1, S)`` bool, True on real memory tokens.

        Returns:
            ``(B, Q, C)`` output.
        """
        B, Q, _ = x.shape
        q = self.c_q(x).view(B, Q, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, Q, hs)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=key_mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)  # (B, nh, Q, hs)
        y = y.transpose(1, 2).reshape(B, Q, self.n_head * self.head_dim)  # (B, Q, nh * hs)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network."""

    def __init__(self, config: TIGERConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.ffn_hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(config.ffn_hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class EncoderBlock(nn.Module):
    """Pre-LN block: bidirectional self-attention over the history, then the MLP."""

    def __init__(self, config: TIGERConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), key_mask=key_mask)
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    """Pre-LN block: causal self-attention within each beam, cross-attention to the user's memory, MLP."""

    def __init__(self, config: TIGERConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.cross = CrossAttention(config)
        self.ln_3 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], key_mask: Tensor) -> Tensor:
        """Map ``(B, W, T, C)`` (W beams of T tokens per user) to the same shape."""
        B, W, T, C = x.shape
        x = x + self.attn(self.ln_1(x).view(B * W, T, C), causal=True).view(B, W, T, C)
        x = x + self.cross(self.ln_2(x).view(B, W * T, C), kv, key_mask).view(B, W, T, C)
        return x + self.mlp(self.ln_3(x))

    def step(self, x: Tensor, kv: tuple[Tensor, Tensor], key_mask: Tensor,
             past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """:meth:`forward` for the newest position only: ``(B, W, 1, C)`` and the self-attention cache
        (see :meth:`SelfAttention.step`, sequences ordered user-major as ``B * W``)."""
        B, W, _, C = x.shape
        h, present = self.attn.step(self.ln_1(x).view(B * W, 1, C), past)
        x = x + h.view(B, W, 1, C)
        x = x + self.cross(self.ln_2(x).view(B, W, C), kv, key_mask).view(B, W, 1, C)
        return x + self.mlp(self.ln_3(x)), present


class TIGER(nn.Module):
    """Encoder–decoder Transformer that generates the semantic ID of the next item.

    Args:
        config: model hyper-parameters; see the module doc for the token layout.
    """

    def __init__(self, config: TIGERConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model, padding_idx=PAD)
        self.item_pos = nn.Embedding(c.max_history + 1, c.d_model)  # 0 = most recent item; the last = user
        self.dec_pos = nn.Embedding(c.max_len + 1, c.d_model)  # BOS + up to max_len codes
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList([EncoderBlock(c) for _ in range(c.num_layers)])
        self.ln_enc = nn.LayerNorm(c.d_model)
        self.decoder = nn.ModuleList([DecoderBlock(c) for _ in range(c.num_layers)])
        self.ln_dec = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.output_vocab, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def encode(self, history: Tensor, user: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode histories.

        Args:
            history: ``(B, H, L)`` long code tokens (see :func:`code_tokens`), items left-padded with
                all-:data:`PAD` rows; ``H <= max_history``, ``L <= max_len``.
            user: ``(B,)`` long user-hash bucket in ``[0, user_tokens)``; required iff ``user_tokens > 0``.

        Returns:
            ``(memory (B, S, C), key_mask (B, 1, 1, S) bool)`` with ``S = H * L`` (+1 with a user token).
        """
        c = self.config
        if history.dim() != 3 or history.shape[1] > c.max_history or history.shape[2] > c.max_len:
            raise ValueError(f"history must be (B, H, L) with H <= {c.max_history} and L <= {c.max_len}, "
                             f"got {tuple(history.shape)}; keep the most recent max_history items")
        if (user is None) != (c.user_tokens == 0):
            raise ValueError("pass user buckets exactly when the model has user_tokens > 0 "
                             f"(user_tokens={c.user_tokens}, user {'missing' if user is None else 'given'})")
        B, H, L = history.shape
        tokens = history.reshape(B, H * L)  # (B, S)
        pos = torch.arange(H - 1, -1, -1, device=history.device).repeat_interleave(L)  # (S,) 0 = most recent
        x = self.tok_emb(tokens) + self.item_pos(pos)  # (B, S, C)
        keep = tokens != PAD  # (B, S)
        if user is not None:
            u = self.tok_emb(user + c.user_offset) + self.item_pos.weight[c.max_history]  # (B, C)
            x = torch.cat([u[:, None], x], dim=1)  # (B, S + 1, C)
            keep = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)
        # An empty history (no user token) would leave a row with no key: let it see everything.
        keep = keep | ~keep.any(dim=1, keepdim=True)
        key_mask = keep[:, None, None, :]  # (B, 1, 1, S)
        x = self.drop(x)
        for block in self.encoder:
            x = block(x, key_mask)
        return self.ln_enc(x), key_mask

    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys and values of every decoder block (computed once per batch of users)."""
        return [block.cross.project(memory) for block in self.decoder]

    def decode(self, tokens: Tensor, kv: list[tuple[Tensor, Tensor]], key_mask: Tensor) -> Tensor:
        """Decode ``W`` token prefixes per user.

        Args:
            tokens: ``(B, W, T)`` decoder inputs, each starting with :data:`BOS`; ``T <= max_len + 1``.
            kv: from :meth:`memory_kv`.
            key_mask: from :meth:`encode`.

        Returns:
            ``(B, W, T, output_vocab)`` next-token logits.
        """
        T = tokens.shape[2]
        x = self.drop(self.tok_emb(tokens) + self.dec_pos(torch.arange(T, device=tokens.device)))  # (B, W, T, C)
        for block, block_kv in zip(self.decoder, kv):
            x = block(x, block_kv, key_mask)
        return self.lm_head(self.ln_dec(x))  # (B, W, T, V)

    def decode_step(self, tokens: Tensor, position: int, kv: list[tuple[Tensor, Tensor]], key_mask: Tensor,
                    past: list[tuple[Tensor, Tensor]] | None) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Next-token logits for the newest token of ``W`` prefixes per user, with a key/value cache.

        Equal to ``decode(prefixes, ...)[:, :, -1]`` but costs one position instead of ``position + 1``.

        Args:
            tokens: ``(B, W)`` the token at ``position`` of each prefix (:data:`BOS` at 0).
            position: its index in the decoder input.
            kv, key_mask: from :meth:`memory_kv` and :meth:`encode`.
            past: the cache this method returned for ``position - 1`` (rows reordered to the
                surviving prefixes, see :func:`beam_search`); None at position 0.

        Returns:
            ``((B, W, output_vocab) logits, the cache including position)``.
        """
        pos = self.dec_pos(torch.tensor(position, device=tokens.device))
        x = self.drop(self.tok_emb(tokens) + pos)[:, :, None]  # (B, W, 1, C)
        present = []
        for i, (block, block_kv) in enumerate(zip(self.decoder, kv)):
            x, cache = block.step(x, block_kv, key_mask, None if past is None else past[i])
            present.append(cache)
        return self.lm_head(self.ln_dec(x[:, :, 0])), present

    def loss(self, history: Tensor, target: Tensor, user: Tensor | None = None) -> TIGEROutput:
        """Teacher-forced cross-entropy of the next item's ID.

        Args:
            history: ``(B, H, L)`` code tokens, see :meth:`encode`.
            target: ``(B, T)`` the next item's :func:`sid_tokens` (ID, EOS, padding).
            user: ``(B,)`` user-hash buckets, see :meth:`encode`.

        Returns:
            :class:`TIGEROutput`.
        """
        memory, key_mask = self.encode(history, user)
        inputs = torch.cat([torch.full_like(target[:, :1], BOS), target[:, :-1]], dim=1)  # (B, T)
        logits = self.decode(inputs[:, None], self.memory_kv(memory), key_mask)[:, 0]  # (B, T, V)
        real = target != PAD  # (B, T)
        loss = F.cross_entropy(logits[real], target[real])
        with torch.no_grad():
            right = (logits.argmax(-1) == target) | ~real  # (B, T)
            n = real.sum()
            metrics = {"num_tokens": n, "token_acc": (right & real).sum() / n.clamp(min=1),
                       "id_acc": right.all(dim=1).float().mean()}
        return TIGEROutput(loss=loss, metrics=metrics)


# ----------------------------------------------------------------------------------------------
# inference


def _constrained_log_probs(logits: Tensor, allowed: Tensor) -> Tensor:
    """Log-softmax over the allowed tokens only; ``-inf`` elsewhere (and on rows with none allowed)."""
    logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)
    return torch.where(allowed, logp, torch.full_like(logp, float("-inf")))  # all-masked rows gave NaN


@torch.no_grad()
def beam_search(model: TIGER, history: Tensor, trie: ItemTrie, beam_size: int = 20, top_k: int | None = None,
                user: Tensor | None = None, cache: bool = True) -> tuple[Tensor, Tensor]:
    """Generate the ``top_k`` most likely next items, expanding only prefixes of real IDs.

    Each step keeps the ``beam_size`` best unfinished prefixes per user. A prefix finishes as soon as
    one item remains below it in the trie (its remaining tokens are forced and add 0 to the
    constrained log-probability), and finished items compete for ``top_k`` slots of their own; so
    ``top_k`` may exceed ``beam_size`` (TIGER-style IDs finish at the last code, and the best
    ``top_k`` of its ``beam_size * K`` expansions are kept). Unfinished prefixes scoring below the
    ``top_k``-th finished item are dropped: extensions only lower a score. With ``beam_size`` at least
    the catalogue size the result is exact (the order of :func:`score_items`).

    Args:
        model: a :class:`TIGER` (run in eval mode here; its mode is restored).
        history: ``(B, H, L)`` code tokens, see :meth:`TIGER.encode`.
        trie: the catalogue, built with the model's ``level_sizes``.
        beam_size: unfinished prefixes kept per user and step.
        top_k: items returned per user (default ``beam_size``).
        user: ``(B,)`` user-hash buckets when the model has user tokens.
        cache: keep the decoder's self-attention keys and values between steps (each step then decodes
            one position per prefix); False re-decodes every prefix from :data:`BOS` (same result).

    Returns:
        ``(items (B, top_k) long, scores (B, top_k))`` sorted by descending score (constrained
        log-probability); ``-1`` / ``-inf`` where fewer than ``top_k`` items were found.
    """
    top_k = beam_size if top_k is None else top_k
    if beam_size < 1 or top_k < 1:
        raise ValueError(f"beam_size={beam_size} and top_k={top_k} must be >= 1")
    if trie.vocab_size != model.config.output_vocab:
        raise ValueError(f"the trie's vocabulary ({trie.vocab_size}) is not the model's "
                         f"({model.config.output_vocab}); build the trie with the model's level_sizes")
    was_training = model.training
    model.eval()
    B, device = history.shape[0], history.device
    memory, key_mask = model.encode(history, user)
    kv = model.memory_kv(memory)
    dtype = memory.dtype
    done_items = torch.full((B, top_k), -1, dtype=torch.long, device=device)
    done_scores = torch.full((B, top_k), float("-inf"), dtype=dtype, device=device)
    root_item = int(trie.final_item[0])
    if root_item >= 0:  # a one-item catalogue: nothing to decide
        done_items[:, 0], done_scores[:, 0] = root_item, 0.0
        model.train(was_training)
        return done_items, done_scores
    nodes = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, W) trie node of each live prefix
    scores = torch.zeros(B, 1, dtype=dtype, device=device)  # (B, W) -inf = no prefix in that slot
    prefix = torch.zeros(B, 1, 0, dtype=torch.long, device=device)  # (B, W, t) tokens so far
    past: list[tuple[Tensor, Tensor]] | None = None
    for t in range(trie.depth):
        W, V = nodes.shape[1], trie.vocab_size
        if cache:
            newest = prefix[:, :, -1] if t else torch.full((B, W), BOS, dtype=torch.long, device=device)
            logits, past = model.decode_step(newest, t, kv, key_mask, past)  # (B, W, V)
        else:
            bos = torch.full((B, W, 1), BOS, dtype=torch.long, device=device)
            inputs = torch.cat([bos, prefix], dim=2)  # (B, W, t + 1)
            logits = model.decode(inputs, kv, key_mask)[:, :, -1]  # (B, W, V)
        allowed = trie.allowed(nodes.reshape(-1)).view(B, W, V) & torch.isfinite(scores)[..., None]
        cand = (scores[..., None] + _constrained_log_probs(logits, allowed)).view(B, W * V)  # (B, W * V)
        # The best beam_size live ones are among the best beam_size + top_k; the rest cannot finish in the top_k.
        cand_s, cand_i = cand.topk(min(beam_size + top_k, W * V), dim=1)  # (B, n)
        beam, token = cand_i // V, cand_i % V
        ok = torch.isfinite(cand_s)
        child = torch.where(ok, trie.step(nodes.gather(1, beam), token), 0)  # (B, n)
        item = torch.where(ok, trie.final_item[child], -1)  # (B, n)
        finished = item >= 0
        pool_s = torch.cat([done_scores, cand_s.masked_fill(~finished, float("-inf"))], dim=1)
        done_scores, pick = pool_s.topk(top_k, dim=1)
        done_items = torch.cat([done_items, item.masked_fill(~finished, -1)], dim=1).gather(1, pick)
        done_items = done_items.masked_fill(~torch.isfinite(done_scores), -1)
        live_s = cand_s.masked_fill(~ok | finished | (cand_s <= done_scores[:, -1:]), float("-inf"))
        width = int(torch.isfinite(live_s).sum(dim=1).max()) if t + 1 < trie.depth else 0
        if width == 0:
            break
        scores, keep = live_s.topk(min(beam_size, width), dim=1)  # (B, W')
        nodes = child.gather(1, keep)
        parent = beam.gather(1, keep)  # (B, W')
        prefix = torch.cat([prefix.gather(1, parent[..., None].expand(-1, -1, t)),
                            token.gather(1, keep)[..., None]], dim=2)  # (B, W', t + 1)
        if past is not None:  # the surviving prefixes' cache rows: (B * W, nh, t + 1, hs) -> (B * W', ...)
            rows = (parent + torch.arange(B, device=device)[:, None] * W).reshape(-1)
            past = [(k[rows], v[rows]) for k, v in past]
    model.train(was_training)
    return done_items, done_scores


@torch.no_grad()
def score_items(model: TIGER, history: Tensor, codes: Tensor, user: Tensor | None = None,
                item_chunk: int = 256) -> Tensor:
    """Exact constrained log-probability of every item as the next one (teacher forcing).

    Memory grows with ``B * item_chunk * (max_len + 1) * output_vocab``: meant for small catalogues
    (tests) and for checking :func:`beam_search`.

    Args:
        model: a :class:`TIGER` (run in eval mode here; its mode is restored).
        history: ``(B, H, L)`` code tokens.
        codes: ``(N, L)`` codes of the catalogue, ``-1``-padded; row ``n`` is item ``n``.
        user: ``(B,)`` user-hash buckets when the model has user tokens.
        item_chunk: items decoded per pass.

    Returns:
        ``(B, N)`` log-probabilities, the same quantity :func:`beam_search` ranks by.
    """
    c = model.config
    was_training = model.training
    model.eval()
    trie = ItemTrie(codes, c.level_sizes).to(history.device)
    target = sid_tokens(codes, c.level_sizes).to(history.device)  # (N, T)
    N, T = target.shape
    before = torch.zeros(N, T, dtype=torch.long, device=history.device)  # (N, T) node before each token
    for t in range(1, T):
        real = target[:, t - 1] != PAD
        before[:, t] = torch.where(real, trie.step(before[:, t - 1], target[:, t - 1]), 0)
    memory, key_mask = model.encode(history, user)
    kv = model.memory_kv(memory)
    B = history.shape[0]
    out = []
    for lo in range(0, N, item_chunk):
        tgt = target[lo : lo + item_chunk]  # (n, T)
        n = len(tgt)
        inputs = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)  # (n, T)
        logits = model.decode(inputs.expand(B, n, T), kv, key_mask)  # (B, n, T, V)
        allowed = trie.allowed(before[lo : lo + item_chunk].reshape(-1)).view(1, n, T, -1)
        logp = _constrained_log_probs(logits, allowed)  # (B, n, T, V)
        picked = logp.gather(3, tgt.expand(B, n, T)[..., None]).squeeze(3)  # (B, n, T)
        out.append(picked.masked_fill(tgt == PAD, 0.0).sum(dim=2))  # (B, n)
    model.train(was_training)
    return torch.cat(out, dim=1)
