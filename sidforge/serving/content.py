"""New items' content → vectors → codes, in plain Python (the encoder and assigner deployments wrap these).

An item arrives in one of three forms (see :mod:`sidforge.serving.api` for the HTTP side):

- ``content``: title / text / categories / brand, rendered with the run's ``embed.text_template`` and
  encoded by the run's encoder (sentence-transformers or open_clip text tower): :class:`ContentModel`;
- ``features``: embed-space vectors per modality (what the embed stage stored: precomputed features,
  or vectors from the same encoder), L2-normalised like the embed stage does;
- ``embedding``: the co-click aligned z itself (runs with an aligner).

:class:`CodeAssigner` maps embed-space vectors through the run's aligner (``RUN/align/model.pt``) to z
and z (or whatever the tokenizer was fitted on) to codes, so precomputed inputs never need the
encoder. Vectors are dicts keyed as in :mod:`sidforge.serving.plan`; every key some consumer needs
must be derivable, otherwise :func:`check_items` refuses the item naming what to send instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from sidforge.platform.artifacts import load_torch_file
from sidforge.platform.schemas import DataError
from sidforge.serving.errors import BadInput
from sidforge.serving.plan import ALIGNED, ServingPlan

log = logging.getLogger(__name__)

Item = dict[str, Any]  # {"content": {...}} | {"features": {mod: [...]}} | {"embedding": [...]}
Vectors = dict[str, np.ndarray]


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def _finite(field: str, values: Any, dim: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)  # checked before the float32 cast, which would overflow to inf
    if x.ndim != 1 or len(x) != dim:
        raise BadInput(field, f"expected {dim} numbers, got {len(x) if x.ndim == 1 else x.shape}")
    if not np.isfinite(x).all():
        raise BadInput(field, f"contains NaN or infinity at position {int(np.flatnonzero(~np.isfinite(x))[0])}")
    if (big := np.abs(x) > np.finfo(np.float32).max).any():
        raise BadInput(field, f"value at position {int(np.flatnonzero(big)[0])} is beyond the float32 range "
                              f"(±{np.finfo(np.float32).max:.3g})")
    return x.astype(np.float32)


def check_items(plan: ServingPlan, items: list[Item], where: str = "items") -> None:
    """Refuse items this run cannot turn into every needed vector (no model is loaded); errors name the field."""
    from sidforge.platform.text import ItemTextTemplate

    p = plan
    template = ItemTextTemplate.parse(p.embed.text_template)
    for i, item in enumerate(items):
        f = f"{where}[{i}]"
        keys: set[str] = set()
        if item.get("content") is not None:
            if p.embed.encoder == "precomputed" and p.align_mode != "open_clip":
                raise BadInput(f"{f}.content", "this run's items were embedded from precomputed features, "
                               f"so there is no encoder for raw content; send features ({', '.join(p.embed_dims)})")
            if not template.render(item["content"]):
                raise BadInput(f"{f}.content", f"no text: fill at least one of {', '.join(template.fields)} "
                               f"(the run's text template is {p.embed.text_template!r})")
            keys |= {ALIGNED} if p.align_mode == "open_clip" else {"text"}
        if item.get("features") is not None:
            if p.align_mode == "open_clip":
                raise BadInput(f"{f}.features", "this run's aligner fine-tunes open_clip on raw text; send "
                               "content or embedding")
            for mod, values in item["features"].items():
                if mod not in p.embed_dims:
                    raise BadInput(f"{f}.features.{mod}", f"unknown modality; this run has {', '.join(p.embed_dims)}")
                _finite(f"{f}.features.{mod}", values, p.embed_dims[mod])
            keys |= set(item["features"])
        if item.get("embedding") is not None:
            if not p.aligned_dim:
                raise BadInput(f"{f}.embedding", "this run has no aligner (RUN/align), so there is no aligned "
                               f"embedding to give; send features ({', '.join(p.embed_dims)})")
            _finite(f"{f}.embedding", item["embedding"], p.aligned_dim)
            keys.add(ALIGNED)
        if p.align_dir is not None and p.align_mode == "features" and set(p.align_modalities) <= keys:
            keys.add(ALIGNED)
        missing = [k for k in p.needed if k not in keys]
        if missing:
            what = "embedding (the aligned z)" if missing == [ALIGNED] else \
                f"features.{'/'.join(m for m in missing if m != ALIGNED)}"
            raise BadInput(f, f"this run needs {', '.join(missing)} vectors for every item (tokenizer, "
                           f"ranker, retriever); send {what}")


def given_vectors(plan: ServingPlan, item: Item) -> Vectors:
    """The vectors an item brings itself (``features``, normalised like the embed stage; ``embedding``)."""
    out: Vectors = {}
    for mod, values in (item.get("features") or {}).items():
        x = np.asarray(values, dtype=np.float32)
        out[mod] = _unit(x) if plan.embed.normalize else x
    if item.get("embedding") is not None:
        out[ALIGNED] = np.asarray(item["embedding"], dtype=np.float32)
    return out


async def item_vectors(plan: ServingPlan, items: list[Item],
                       encode: Callable[[list[Item]], Awaitable[list[Vectors]]]) -> list[Vectors]:
    """Every item's own vectors; the ``content`` items' from ``encode`` (one call for all of them)."""
    out = [given_vectors(plan, item) for item in items]
    rows = [i for i, item in enumerate(items) if item.get("content") is not None]
    if rows:
        for i, v in zip(rows, await encode([items[i] for i in rows])):
            out[i] = v
    return out


class ContentModel:
    """The run's content encoder: raw item content → embed-space vectors (``text``), or z directly when
    the aligner fine-tuned open_clip itself (``align.mode=open_clip``).

    Args:
        plan: the resolved run.
        load_encoder: load the encoder now (else on the first item); runs whose items were embedded
            from precomputed features have none.
    """

    def __init__(self, plan: ServingPlan, load_encoder: bool = True) -> None:
        from sidforge.platform.text import ItemTextTemplate

        self.plan = plan
        self.template = ItemTextTemplate.parse(plan.embed.text_template)
        self.encoder: Any = None
        self.clip: Any = None  # (tokenizer, OpenClipAligner) in align.mode=open_clip
        if load_encoder:
            self._load()

    def _load(self) -> None:
        p = self.plan
        if p.align_mode == "open_clip" and self.clip is None:
            self.clip = load_clip_aligner(p)
        elif p.embed.encoder != "precomputed" and p.align_mode != "open_clip" and self.encoder is None:
            from sidforge.models.encoders import build_encoder
            from sidforge.stages.embed import encoder_spec

            self.encoder = build_encoder(encoder_spec(p.embed))

    def check(self, items: list[Item], where: str = "items") -> None:
        """Refuse what this run cannot turn into every needed vector; errors name the field."""
        check_items(self.plan, items, where)

    def vectors(self, items: list[Item]) -> list[Vectors]:
        """Vectors of ``content`` items that passed :meth:`check` (one encoder batch), in order."""
        import torch

        self._load()
        texts = [self.template.render(item["content"]) for item in items]
        if self.clip is not None:
            from sidforge.models.align import ClipInputs

            tokenizer, aligner = self.clip
            with torch.inference_mode():
                z = aligner(ClipInputs(tokenizer(texts))).float().numpy()
            return [{ALIGNED: row} for row in z]
        emb = self.encoder.encode_text(texts).numpy().astype(np.float32)
        return [{"text": _unit(row) if self.plan.embed.normalize else row} for row in emb]


def load_align_file(plan: ServingPlan) -> dict[str, Any]:
    """``RUN/align/model.pt``: ``{"mode", "config", "state_dict"}`` (tensors and plain values only: loaded
    with ``weights_only=True``)."""
    assert plan.align_dir is not None
    path = plan.align_dir / "model.pt"
    fix = "re-run `sidforge train align`"
    saved = load_torch_file(path, fix)
    if not isinstance(saved, dict) or not {"config", "state_dict"} <= set(saved):
        raise DataError(f"{path}: expected a dict with config and state_dict; {fix}")
    return saved


def load_clip_aligner(plan: ServingPlan) -> tuple[Any, Any]:
    """``(tokenizer, OpenClipAligner)`` of an ``align.mode=open_clip`` run: the base model, then the tuned blocks."""
    from sidforge.models.align import OpenClipAligner
    from sidforge.models.encoders import EncoderSpec, build_encoder

    assert plan.align_dir is not None
    saved = load_align_file(plan)
    config = saved["config"]
    enc = build_encoder(EncoderSpec(**config["spec"]))
    aligner = OpenClipAligner(enc.model, config["train_blocks"], config["temperature"],  # type: ignore[attr-defined]
                              use_images=config["use_images"])
    _, unexpected = aligner.load_state_dict(saved["state_dict"], strict=False)
    if unexpected:
        raise RuntimeError(f"{plan.align_dir}/model.pt does not fit its open_clip model: {unexpected[:3]}")
    return enc.tokenizer, aligner.eval()  # type: ignore[attr-defined]


class CodeAssigner:
    """Vectors → z (the run's co-click aligner, ``align.mode=features``) → codes (the run's tokenizer).

    ``assign`` also returns, for ``reassign`` IDs, each item's last-level codes nearest first.
    """

    def __init__(self, plan: ServingPlan) -> None:
        from sidforge.models.align import FeatureAligner, FeatureAlignerConfig
        from sidforge.stages.tokenize import load_tokenizer

        self.plan = plan
        self.space = plan.tokenizer_space
        self.tokenizer = load_tokenizer(plan.sids_dir) if self.space is not None else None
        self.aligner: FeatureAligner | None = None
        if plan.align_dir is not None and plan.align_mode == "features":
            saved = load_align_file(plan)
            self.aligner = FeatureAligner(FeatureAlignerConfig(**saved["config"]))
            self.aligner.load_state_dict(saved["state_dict"])
            self.aligner.eval()

    def check(self, where: str = "items") -> None:
        if self.tokenizer is None:
            raise BadInput(where, f"new items cannot get semantic IDs from this run: {self.plan.tokenizer_note}")

    def align(self, vectors: list[Vectors]) -> list[Vectors]:
        """Add z to the items that have the aligner's modalities but no z; keep the needed keys only."""
        import torch

        p = self.plan
        rows = [i for i, v in enumerate(vectors) if ALIGNED not in v and all(m in v for m in p.align_modalities)]
        out = [dict(v) for v in vectors]
        if rows and self.aligner is not None:
            x = np.stack([np.concatenate([vectors[i][m] for m in p.align_modalities]) for i in rows])
            with torch.inference_mode():
                z = self.aligner(torch.from_numpy(x.astype(np.float32))).float().numpy()
            for i, row in zip(rows, z):
                out[i][ALIGNED] = row
        return [{k: v[k] for k in p.needed} for v in out]

    def assign(self, vectors: list[Vectors]) -> tuple[list[Vectors], np.ndarray, np.ndarray | None]:
        """``(the needed vectors, codes (M, L) int64, last-level codes nearest first (M, K) or None)``."""
        self.check()
        assert self.tokenizer is not None and self.space is not None
        vectors = self.align(vectors)
        x = np.stack([np.concatenate([v[k] for k in self.space]) for v in vectors]).astype(np.float32)
        codes = self.tokenizer.assign(x)
        order = None
        if self.plan.collision == "reassign":
            order = np.argsort(self.tokenizer.last_distances(x, codes), axis=1, kind="stable")
        return vectors, codes, order
