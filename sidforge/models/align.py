"""SaviorEnc: contrastive alignment of item content embeddings with co-click behavior, in plain PyTorch.

Two items that are often clicked together should lie close in the content space. An aligner maps an
item's content to a unit vector z; its loss is the symmetric InfoNCE of :func:`info_nce` over a batch
of co-click pairs, where each pair's partner is the positive and the other pairs' items are the
negatives (in-batch negatives).

- :class:`FeatureAligner` trains a small MLP over frozen content features (MiniLM text, precomputed
  CLIP features): ``z = normalise(x + MLP(x))`` with the MLP's last layer zero-initialised, so training
  starts exactly at the raw embedding; or ``z = normalise(MLP(x))`` to another size.
- :class:`OpenClipAligner` fine-tunes the last transformer blocks of an open_clip model's text and
  image towers; ``z`` is the normalised mean of the item's normalised text and image embeddings.

Both expose ``forward(inputs) -> z`` and ``loss(a, b, weight=None) -> AlignOutput``, so one training
loop drives either.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AlignOutput", "ClipInputs", "FeatureAligner", "FeatureAlignerConfig", "OpenClipAligner", "info_nce"]


def info_nce(a: Tensor, b: Tensor, temperature: float, weight: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE with in-batch negatives.

    Row i of ``a`` and row i of ``b`` are a positive pair; every other row of the other side is a
    negative. Rows are L2-normalised first, so the logits are cosine similarities / ``temperature``.

    Args:
        a: (B, D) embeddings of the first items of the pairs.
        b: (B, D) embeddings of their partners.
        temperature: softmax temperature (> 0).
        weight: optional (B,) non-negative per-pair weights; the loss is their weighted mean
            (scale-free: only the ratios matter). ``None`` weighs every pair equally.

    Returns:
        Scalar: the mean over pairs of ``(CE(a_i → b) + CE(b_i → a)) / 2``.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must both be (B, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature  # (B, B)
    target = torch.arange(len(a), device=a.device)
    per_pair = 0.5 * (F.cross_entropy(logits, target, reduction="none")
                      + F.cross_entropy(logits.T, target, reduction="none"))  # (B,)
    if weight is None:
        return per_pair.mean()
    weight = weight.to(per_pair.dtype)
    return (per_pair * weight).sum() / weight.sum().clamp_min(1e-12)


@dataclass
class AlignOutput:
    """Result of an aligner's ``loss``.

    Attributes:
        loss: scalar InfoNCE loss of the batch.
        metrics: detached scalars for logging: ``pos_cos`` (mean cosine of the positive pairs) and
            ``top1_acc`` (share of anchors whose partner is their most similar item in the batch).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _output(z_a: Tensor, z_b: Tensor, temperature: float, weight: Tensor | None) -> AlignOutput:
    loss = info_nce(z_a, z_b, temperature, weight)
    with torch.no_grad():
        sim = z_a @ z_b.T  # (B, B), rows already unit length
        top1 = (sim.argmax(dim=1) == torch.arange(len(z_a), device=z_a.device)).float().mean()
        metrics = {"pos_cos": sim.diagonal().mean(), "top1_acc": top1}
    return AlignOutput(loss=loss, metrics=metrics)


# ----------------------------------------------------------------------------------------------
# over frozen features


@dataclass(frozen=True)
class FeatureAlignerConfig:
    """Hyper-parameters of :class:`FeatureAligner`.

    Attributes:
        input_dim: width D of the content features.
        hidden: width of the MLP's hidden layer.
        out_dim: size of z when not ``residual``; 0 keeps ``input_dim``.
        residual: z = normalise(x + MLP(x)) with a zero-initialised last layer (z == normalise(x) at
            init); otherwise z = normalise(MLP(x)).
        temperature: InfoNCE temperature.
    """

    input_dim: int
    hidden: int = 512
    out_dim: int = 0
    residual: bool = True
    temperature: float = 0.07

    def __post_init__(self) -> None:
        for name in ("input_dim", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.out_dim < 0:
            raise ValueError(f"out_dim={self.out_dim} must be >= 0 (0 = input_dim)")
        if self.residual and self.out_dim not in (0, self.input_dim):
            raise ValueError(f"residual=True needs out_dim == input_dim ({self.input_dim}) or 0, got "
                             f"{self.out_dim}; set residual=False to project to another size")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")

    @property
    def z_dim(self) -> int:
        return self.out_dim or self.input_dim


class FeatureAligner(nn.Module):
    """A residual (or plain) MLP over frozen content features, trained by co-click InfoNCE."""

    def __init__(self, config: FeatureAlignerConfig) -> None:
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(nn.Linear(config.input_dim, config.hidden), nn.GELU(),
                                 nn.Linear(config.hidden, config.z_dim))
        if config.residual:
            # Starts exactly at the raw embedding; the first layer gets gradients once this one moves.
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """Aligned embeddings.

        Args:
            x: (B, input_dim) content features.

        Returns:
            (B, z_dim) unit-length rows (an all-zero input row stays zero when ``residual``).
        """
        h = self.mlp(x)  # (B, z_dim)
        return F.normalize(x + h if self.config.residual else h, dim=-1)

    def loss(self, x_a: Tensor, x_b: Tensor, weight: Tensor | None = None) -> AlignOutput:
        """InfoNCE of a batch of pairs: (B, input_dim) features of each side, optional (B,) weights."""
        return _output(self(x_a), self(x_b), self.config.temperature, weight)


# ----------------------------------------------------------------------------------------------
# fine-tuning open_clip


@dataclass
class ClipInputs:
    """A batch of items for :class:`OpenClipAligner`.

    Attributes:
        tokens: (B, T) int64 text tokens (the open_clip tokenizer's output).
        pixels: (B, 3, H, W) preprocessed images, or ``None`` for text only; rows without an image
            may hold anything (zeros) and are masked by ``has_image``.
        has_image: (B,) bool, True where the item's image is real; ``None`` = all True.
    """

    tokens: Tensor
    pixels: Tensor | None = None
    has_image: Tensor | None = None

    def to(self, device: torch.device | str) -> ClipInputs:
        return ClipInputs(self.tokens.to(device),
                          None if self.pixels is None else self.pixels.to(device),
                          None if self.has_image is None else self.has_image.to(device))


def _towers(clip: nn.Module) -> tuple[nn.ModuleList, list[nn.Module | nn.Parameter],
                                      nn.ModuleList, list[nn.Module | nn.Parameter]]:
    """(text blocks, text head, image blocks, image head) of an open_clip ViT CLIP."""
    text = clip.text if hasattr(clip, "text") else clip  # CustomTextCLIP keeps its text tower in .text
    visual = getattr(clip, "visual", None)
    try:
        text_blocks = text.transformer.resblocks
        image_blocks = visual.transformer.resblocks
    except AttributeError:
        raise ValueError(f"{type(clip).__name__}: OpenClipAligner needs transformer towers (a ViT CLIP with "
                         "transformer.resblocks in the text and visual towers); ResNet and timm towers are "
                         "not supported") from None
    text_head = [m for m in (getattr(text, "ln_final", None), getattr(text, "text_projection", None)) if m is not None]
    image_head = [m for m in (getattr(visual, "ln_post", None), getattr(visual, "proj", None)) if m is not None]
    return text_blocks, text_head, image_blocks, image_head


def _params(parts: list[nn.Module | nn.Parameter]) -> Iterator[nn.Parameter]:
    for part in parts:
        yield from ([part] if isinstance(part, nn.Parameter) else part.parameters())


class OpenClipAligner(nn.Module):
    """An open_clip CLIP with everything frozen but the last blocks of each tower, trained by InfoNCE.

    Trainable: the last ``train_blocks`` transformer blocks of the text tower and their final layer norm
    and projection; with ``use_images``, the same of the image tower. Everything else (embeddings,
    earlier blocks, ``logit_scale``) is frozen; the temperature is ours, not CLIP's.

    Args:
        clip: an open_clip ``CLIP`` / ``CustomTextCLIP`` with ViT towers (modified in place).
        train_blocks: blocks unfrozen at the end of each tower (>= 1).
        temperature: InfoNCE temperature.
        use_images: fine-tune and use the image tower (items need ``pixels``); False = text only.
    """

    def __init__(self, clip: nn.Module, train_blocks: int = 1, temperature: float = 0.07,
                 use_images: bool = True) -> None:
        super().__init__()
        if train_blocks < 1:
            raise ValueError(f"train_blocks={train_blocks} must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.clip = clip
        self.temperature = temperature
        self.use_images = use_images
        text_blocks, text_head, image_blocks, image_head = _towers(clip)
        if train_blocks > min(len(text_blocks), len(image_blocks)):
            raise ValueError(f"train_blocks={train_blocks} exceeds the towers' depth (text {len(text_blocks)}, "
                             f"image {len(image_blocks)} blocks)")
        for p in clip.parameters():
            p.requires_grad_(False)
        trainable = [*text_blocks[-train_blocks:], *text_head]
        if use_images:
            trainable += [*image_blocks[-train_blocks:], *image_head]
        for p in _params(trainable):
            p.requires_grad_(True)

    def forward(self, items: ClipInputs) -> Tensor:
        """Item embeddings: (B, D) unit rows, the normalised mean of the available modalities."""
        z = F.normalize(self.clip.encode_text(items.tokens), dim=-1)  # (B, D)
        if self.use_images and items.pixels is not None:
            image = F.normalize(self.clip.encode_image(items.pixels), dim=-1)  # (B, D)
            # Every row goes through the image tower (masked after), so its trainable parameters take
            # part in every step: DDP needs each trainable parameter used on every rank.
            has = torch.ones(len(z), device=z.device) if items.has_image is None else items.has_image.float()
            z = (z + has[:, None] * image) / (1.0 + has[:, None])
        return F.normalize(z, dim=-1)

    def loss(self, a: ClipInputs, b: ClipInputs, weight: Tensor | None = None) -> AlignOutput:
        """InfoNCE of a batch of pairs (the items of each side as :class:`ClipInputs`)."""
        return _output(self(a), self(b), self.temperature, weight)
