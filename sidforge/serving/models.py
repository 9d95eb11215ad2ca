"""The retrievers and the ranker as the server holds them: the run's models plus the added items.

Each keeps its own copy of the catalogue (``size`` items) and grows with :meth:`extend` as deltas
arrive (:class:`~sidforge.serving.catalogue.Follower`); ``reset`` goes back to the run's items.

- :class:`FaissRetriever`: exact inner-product search (``faiss.IndexFlatIP``) over unit vectors of
  the retrieval space; the query is the unit mean of the history's most recent ``window`` vectors.
- :class:`GenerativeRetriever`: TIGER's constrained beam search over a prefix trie of every item's
  ID (rebuilt at the first retrieval after items were added). An added item whose ID does not fit the model's vocabulary (a
  collision digit beyond the ones seen in training) is left out of the trie and of histories.
- :class:`RankerScorer`: the SaviorRec ranker. Added items have no trained ID embedding: they get the
  zero row (what the padding item holds), zero statistics (train count 0, like a cold item), their
  content z and their codes (so MBA's code corrections apply). Rows are added in chunks of
  :data:`GROW` to keep re-allocations rare.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from sidforge.serving.catalogue import Delta
from sidforge.serving.plan import ServingPlan, load_codes, load_ranker_file, load_vectors

log = logging.getLogger(__name__)

GROW = 1024  # ranker rows added at a time for new items


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class FaissRetriever:
    """Nearest neighbours of a history in the retrieval space (see the module doc)."""

    name = "faiss"

    def __init__(self, plan: ServingPlan) -> None:
        self.space = plan.retrieval_space
        self.window = plan.serve.history_window
        self.base = _unit(load_vectors(plan, self.space))
        self.reset()

    @property
    def size(self) -> int:
        return self.index.ntotal

    def reset(self) -> None:
        import faiss

        self._rows = self.base.copy()  # (capacity, D); rows past ``size`` are free
        self.index = faiss.IndexFlatIP(self.base.shape[1])
        self.index.add(self.base)

    def extend(self, delta: Delta) -> None:
        x = _unit(np.concatenate([delta.vectors[k] for k in self.space], axis=1))
        n = self.size
        if n + len(x) > len(self._rows):  # grow geometrically: adding one item must not copy the catalogue
            grown = np.zeros((max(2 * len(self._rows), n + len(x)), self._rows.shape[1]), dtype=np.float32)
            grown[:n] = self._rows[:n]
            self._rows = grown
        self._rows[n : n + len(x)] = x
        self.index.add(x)

    def retrieve(self, history: list[int], n: int, exclude_history: bool = True) -> tuple[list[int], list[float]]:
        """Up to ``n`` items (ids, cosine scores), best first."""
        recent = np.asarray(history[-self.window:], dtype=np.int64)
        query = _unit(self._rows[recent].mean(axis=0, keepdims=True))
        seen = set(history) if exclude_history else set()
        k = min(self.size, n + len(seen))
        scores, ids = self.index.search(query, k)
        keep = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in seen][:n]
        return [i for i, _ in keep], [s for _, s in keep]


class GenerativeRetriever:
    """TIGER's constrained beam search over every item's ID (see the module doc)."""

    name = "generative"

    def __init__(self, plan: ServingPlan) -> None:
        from sidforge.stages.generative import load_model

        assert plan.generative_dir is not None
        self.model, meta = load_model(plan.generative_dir)
        self.level_sizes = tuple(self.model.config.level_sizes)
        self.beam_size = int(meta.get("beam_size", 20))
        self.window = min(plan.serve.history_window, self.model.config.max_history)
        _, sids = load_codes(plan)
        self.base = [list(s) for s in sids]
        self.reset()

    @property
    def size(self) -> int:
        return len(self.sids)

    def reset(self) -> None:
        self.sids = list(self.base)
        self._build()

    def extend(self, delta: Delta) -> None:
        self.sids += [list(s) for s in delta.sids]
        self._stale = True  # the trie is rebuilt at the next retrieval, once for any number of deltas

    def _fits(self, sid: list[int]) -> bool:
        return len(sid) <= len(self.level_sizes) and all(0 <= c < k for c, k in zip(sid, self.level_sizes))

    def _build(self) -> None:
        import torch

        from sidforge.models.generative import ItemTrie, code_tokens

        width = len(self.level_sizes)
        codes = np.full((len(self.sids), width), -1, dtype=np.int64)
        fits = np.zeros(len(self.sids), dtype=bool)
        for i, sid in enumerate(self.sids):
            if self._fits(sid):
                codes[i, : len(sid)], fits[i] = sid, True
        rows = np.flatnonzero(fits)
        self.fits = fits
        self.trie = ItemTrie(torch.from_numpy(codes[rows]), self.level_sizes, item_ids=torch.from_numpy(rows))
        tokens = torch.zeros(len(self.sids) + 1, width, dtype=torch.long)  # last row: padding
        tokens[torch.from_numpy(rows)] = code_tokens(torch.from_numpy(codes[rows]), self.level_sizes)
        self.tokens = tokens
        self._stale = False
        if (~fits).any():
            log.warning("generative retriever: %d added items have IDs outside the model's vocabulary and "
                        "cannot be generated", int((~fits).sum()))

    def retrieve(self, history: list[int], n: int, exclude_history: bool = True) -> tuple[list[int], list[float]]:
        import torch

        from sidforge.models.generative import beam_search

        if self._stale:
            self._build()
        recent = [i for i in history if self.fits[i]][-self.window:] or [len(self.sids)]
        hist = self.tokens[torch.tensor(recent)][None]  # (1, H, L)
        seen = set(history) if exclude_history else set()
        k = min(self.size, n + len(seen))
        items, scores = beam_search(self.model, hist, self.trie, beam_size=max(self.beam_size, 1), top_k=k)
        keep = [(int(i), float(s)) for i, s in zip(items[0].tolist(), scores[0].tolist())
                if i >= 0 and int(i) not in seen][:n]
        return [i for i, _ in keep], [s for _, s in keep]


def make_retriever(plan: ServingPlan) -> FaissRetriever | GenerativeRetriever:
    return GenerativeRetriever(plan) if plan.serve.retriever == "generative" else FaissRetriever(plan)


class RankerScorer:
    """The trained CTR ranker over the run's items and the added ones (see the module doc)."""

    def __init__(self, plan: ServingPlan) -> None:
        from sidforge.models.ranker import RankerConfig, SaviorRanker

        meta = load_ranker_file(plan.ranker_dir)
        fields: dict[str, Any] = dict(meta["config"])
        fields["codebook_sizes"], fields["mlp"] = tuple(fields["codebook_sizes"]), tuple(fields["mlp"])
        self.base = SaviorRanker(RankerConfig(**fields))
        self.base.load_state_dict(meta["state_dict"])
        self.base.eval()
        if self.base.config.num_items != plan.num_items:
            raise ValueError(f"{plan.ranker_dir}: the ranker has {self.base.config.num_items} items, the run "
                             f"{plan.num_items}; it was trained on another run")
        self.space = plan.ranker_space
        self.window = plan.serve.history_window
        self.reset()

    def reset(self) -> None:
        self.model = self.base
        self.size = self.base.config.num_items

    def extend(self, delta: Delta) -> None:
        import torch

        from sidforge.models.ranker import set_item_rows, with_capacity

        if delta.end > self.model.config.num_items:
            self.model = with_capacity(self.model, delta.end + GROW).eval()
        c = self.model.config
        content = None
        if c.content_dim:
            assert self.space is not None
            content = torch.from_numpy(np.concatenate([delta.vectors[k] for k in self.space], axis=1))
        codes = torch.from_numpy(np.array(delta.codes, dtype=np.int64)) if c.codebook_sizes else None
        set_item_rows(self.model, torch.arange(delta.start, delta.end), torch.zeros(len(delta.codes), c.num_stats),
                      content, codes)
        self.size = delta.end

    def score(self, history: list[int], candidates: list[int]) -> list[float]:
        """pCTR of each candidate after ``history`` (its most recent ``window`` items)."""
        import torch

        hist = torch.tensor(history[-self.window:], dtype=torch.long)[None]  # (1, T)
        target = torch.tensor(candidates, dtype=torch.long)  # (C,)
        with torch.inference_mode():
            logits = self.model(hist.expand(len(target), -1), target).logits  # (C,)
        return torch.sigmoid(logits).tolist()
