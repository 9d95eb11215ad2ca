"""The align stage (SaviorEnc): co-click contrastive fine-tuning of item content → aligned embeddings z.

Reads ``RUN/prepare/cocliks.parquet`` (item_a, item_b, count, weight, split) and, by ``align.mode``:

- ``features``: ``RUN/embed/item_embeddings.parquet`` (the modalities in ``align.modalities``
  concatenated; empty = all), and trains a :class:`~sidforge.models.align.FeatureAligner` over them;
- ``open_clip``: ``RUN/prepare/items.parquet`` (text from ``embed.text_template``, images from
  ``image_uri`` under ``embed.image_root``; a missing or unreadable image makes that item text-only,
  counted in the metrics), and fine-tunes the last ``align.train_blocks`` blocks of both towers of the
  open_clip model the ``embed`` section names (:class:`~sidforge.models.align.OpenClipAligner`).

It writes ``RUN/align/``:

- ``item_embeddings.parquet``: the embed format with one modality, ``aligned`` (column
  ``emb_aligned``), for **every** item, cold ones included (z depends on content only);
- ``model.pt``: ``{"mode", "config", "state_dict"}`` of the best epoch (open_clip: the tuned
  parameters only; load the base model the embed section names, then these with ``strict=False``);
- ``metrics.json``: best epoch, per-epoch history and i2i Hit@30 / Recall@30 before and after.

Protocol. The ``train`` co-click pairs are split (seeded) into fit pairs and ``align.valid_fraction``
valid pairs. Training is symmetric InfoNCE over batches of fit pairs with in-batch negatives; each
pair's loss is weighted by prepare's popularity down-weighted ``weight`` (our choice: the paper does
not weigh pairs; this keeps bestseller pairs from dominating the loss as they dominate the counts).
After every epoch, i2i Hit@30 of the current z over the valid pairs (full catalogue,
:func:`sidforge.platform.metrics.i2i_hit_at_k`) is the early-stopping monitor. The ``heldout`` pairs
are scored once, at the end: ``i2i_before`` with the raw input embedding (open_clip: the un-tuned
model) and ``i2i_after`` with z of the best epoch.

Training checkpoints live in ``RUN/_train/align-<config hash>-<inputs hash>/`` while the stage runs; a
stage killed mid-training resumes from its last epoch (``force`` starts over).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from sidforge.models.align import ClipInputs, FeatureAligner, FeatureAlignerConfig, OpenClipAligner
from sidforge.platform.artifacts import (
    RunDir,
    StageResult,
    fingerprint_files,
)
from sidforge.platform.config import AlignTrainConfig, Config, ConfigError
from sidforge.platform.metrics import i2i_hit_at_k
from sidforge.platform.schemas import DataError
from sidforge.platform.training import (
    FitResult,
    RunSettings,
    ScalingSettings,
    WorkerContext,
    fit,
    load_state,
    remove_run,
    stage_run_settings,
)
from sidforge.stages.embed import IMAGE_NO_URI, IMAGE_OK, IMAGE_UNREADABLE, ItemEmbeddings, load_embeddings

log = logging.getLogger(__name__)

STAGE = "align"
OUTPUT = "item_embeddings.parquet"
MODALITY = "aligned"
K = 30
MONITOR = f"valid/hit@{K}"
COCLIKS = Path("prepare") / "cocliks.parquet"
ITEMS = Path("prepare") / "items.parquet"
EMBED_KEYS = ("encoder", "model", "pretrained", "checkpoint", "text_template", "image_root")  # open_clip mode


# ----------------------------------------------------------------------------------------------
# entry point


def run(cfg: Config, run_dir: RunDir, force: bool = False) -> StageResult:
    """Align item content with co-clicks (or skip when config and inputs are unchanged); see the module doc."""
    t0 = time.perf_counter()
    _check_config(cfg)
    config_hash = stage_config_hash(cfg)
    inputs = _input_fingerprints(cfg, run_dir)
    if not force and (cached := run_dir.cached(STAGE, config_hash, inputs)) is not None:
        return cached
    seed = _seed(cfg)
    pairs = load_pairs(run_dir.path / COCLIKS, cfg.align.valid_fraction, seed)
    items = SETUPS[cfg.align.mode](cfg, run_dir)
    _check_pairs(pairs, len(items.item_id))
    train_run = _run_settings(cfg, run_dir, config_hash, inputs)
    result = fit(train_align, loop_config(cfg, items, pairs, seed),
                 ScalingSettings(cfg.align.num_workers, cpus_per_worker=cfg.align.cpus_per_worker),
                 train_run, fresh=force)
    with run_dir.writing(STAGE) as out:
        metrics = _write_outputs(out, result, items, pairs, cfg.align.mode)
    remove_run(train_run)
    rows = {"items": len(items.item_id), "fit_pairs": len(pairs.fit), "valid_pairs": len(pairs.valid),
            "heldout_pairs": len(pairs.heldout)}
    result = run_dir.finish(STAGE, config_hash, inputs, rows, metrics, t0)
    log.info("align: wrote %s in %.1f s (held-out hit@%d %.4f -> %.4f)", result.out_dir, result.wall_time_s, K,
             metrics.get("i2i_before", {}).get(f"hit@{K}", float("nan")),
             metrics.get("i2i_after", {}).get(f"hit@{K}", float("nan")))
    return result


_OPERATIONAL = ("cpus_per_worker", "max_failures")  # how a run is executed, not what it computes
_UNUSED = {"features": ("train_blocks",), "open_clip": ("modalities", "hidden", "out_dim", "residual")}


def stage_config_hash(cfg: Config) -> str:
    """Hash of what z depends on: the ``align`` keys the mode uses, the seed and, in ``open_clip`` mode,
    the embed keys naming the model and the item text/images."""
    acfg = cfg.align
    skip = (*_OPERATIONAL, *_UNUSED[acfg.mode], "seed")
    payload: dict[str, Any] = {"align": {k: v for k, v in dataclasses.asdict(acfg).items() if k not in skip},
                               "seed": _seed(cfg)}
    if acfg.mode == "open_clip":
        embed = dataclasses.asdict(cfg.embed)
        payload["embed"] = {k: embed[k] for k in EMBED_KEYS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _seed(cfg: Config) -> int:
    return cfg.seed if cfg.align.seed is None else cfg.align.seed


def _check_config(cfg: Config) -> None:
    if cfg.align.mode == "open_clip" and cfg.embed.encoder != "open_clip":
        raise ConfigError(f"align.mode=open_clip fine-tunes the open_clip model of the embed section, but "
                          f"embed.encoder={cfg.embed.encoder}; set embed.encoder=open_clip and embed.model (plus "
                          "embed.pretrained or embed.checkpoint), or use align.mode=features")


def _input_fingerprints(cfg: Config, run_dir: RunDir) -> dict[str, str]:
    cocliks = run_dir.path / COCLIKS
    if not cocliks.is_file():
        raise DataError(f"{cocliks} not found; run `sidforge prepare` with this config first")
    files = [cocliks]
    if cfg.align.mode == "features":
        emb = run_dir.stage_dir("embed") / OUTPUT
        if not emb.is_file():
            raise DataError(f"{emb} not found; run `sidforge embed` first (align.mode=features aligns the "
                            "embed stage's features)")
        files.append(emb)
        return fingerprint_files(files, root=run_dir.path)
    from sidforge.models.encoders import local_model_files
    from sidforge.stages.embed import encoder_spec

    files.append(run_dir.path / ITEMS)
    if not files[-1].is_file():
        raise DataError(f"{files[-1]} not found; run `sidforge prepare` with this config first")
    return {**fingerprint_files(files, root=run_dir.path),
            **fingerprint_files(local_model_files(encoder_spec(cfg.embed)))}


def _run_settings(cfg: Config, run_dir: RunDir, config_hash: str, inputs: dict[str, str]) -> RunSettings:
    return stage_run_settings(STAGE, run_dir.path, config_hash, inputs, max_failures=cfg.align.max_failures,
                              patience=cfg.align.patience, monitor=MONITOR)


# ----------------------------------------------------------------------------------------------
# inputs: co-click pairs and items


@dataclass
class Pairs:
    """Co-click pairs as (P, 2) int64 item ids.

    Attributes:
        fit, fit_weight: training pairs and their (P,) float32 weights.
        valid: train pairs kept aside for early stopping.
        heldout: prepare's held-out pairs, scored only before and after.
    """

    fit: np.ndarray
    fit_weight: np.ndarray
    valid: np.ndarray
    heldout: np.ndarray


def load_pairs(path: Path, valid_fraction: float, seed: int) -> Pairs:
    """Read the co-click pairs and split the ``train`` ones into fit and valid (a seeded permutation)."""
    df = pq.read_table(path, columns=["item_a", "item_b", "weight", "split"]).to_pandas()
    train = df[df["split"] == "train"]
    held = df[df["split"] == "heldout"]
    ab = train[["item_a", "item_b"]].to_numpy(np.int64)
    order = np.random.default_rng(seed).permutation(len(ab))
    n_valid = int(round(valid_fraction * len(ab)))
    if n_valid < 1 or len(ab) - n_valid < 2:
        raise DataError(f"{path}: {len(ab)} train co-click pairs cannot be split into fit and valid with "
                        f"align.valid_fraction={valid_fraction}; mine more pairs (prepare.coclick.min_count, "
                        "window) or change align.valid_fraction")
    fit_rows, valid_rows = order[n_valid:], order[:n_valid]
    return Pairs(fit=ab[fit_rows], fit_weight=train["weight"].to_numpy(np.float32)[fit_rows], valid=ab[valid_rows],
                 heldout=held[["item_a", "item_b"]].to_numpy(np.int64))


def _check_pairs(pairs: Pairs, num_items: int) -> None:
    if num_items <= K:
        raise DataError(f"align scores i2i Hit@{K}; the catalogue has only {num_items} items")
    top = max(int(p.max()) if len(p) else -1 for p in (pairs.fit, pairs.valid, pairs.heldout))
    if top >= num_items:
        raise DataError(f"co-click pairs name item {top} but the item inputs have {num_items} items; re-run "
                        "`sidforge embed` after `sidforge prepare`")
    if not np.isfinite(pairs.fit_weight).all() or (pairs.fit_weight < 0).any():
        raise DataError("cocliks.parquet: pair weights must be finite and >= 0; re-run `sidforge prepare`")


@dataclass
class ItemInputs:
    """What the aligner reads per item, in item-id order (row i = item i).

    Attributes:
        item_id: (N,) int64, ``0 .. N-1``.
        raw: (N, D) the embedding before alignment (features: the input; open_clip: the un-tuned model).
        features: ``features`` mode: (N, D) float32 input.
        tokens: ``open_clip`` mode: (N, T) int64 text tokens.
        pixels: ``open_clip`` with images: (N, 3, H, W) float32, zero rows where there is no image.
        has_image: (N,) bool, True where the image is real.
        model: the aligner's settings (features: :class:`FeatureAlignerConfig` fields; open_clip: the
            encoder spec fields, ``train_blocks``, ``temperature`` and ``use_images``).
        extra: metrics about the inputs (modalities, image fallbacks) for the manifest.
    """

    item_id: np.ndarray
    raw: np.ndarray
    model: dict[str, Any]
    features: np.ndarray | None = None
    tokens: np.ndarray | None = None
    pixels: np.ndarray | None = None
    has_image: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def batch(self, rows: np.ndarray, device: torch.device) -> torch.Tensor | ClipInputs:
        """The aligner's input for the items ``rows``."""
        if self.features is not None:
            return torch.from_numpy(self.features[rows]).to(device)  # (B, D)
        assert self.tokens is not None
        pixels = None if self.pixels is None else torch.from_numpy(self.pixels[rows])
        has = None if self.has_image is None else torch.from_numpy(self.has_image[rows])
        return ClipInputs(torch.from_numpy(self.tokens[rows]), pixels, has).to(device)


def feature_inputs(cfg: Config, run_dir: RunDir) -> ItemInputs:
    """``features`` mode: the embed stage's modalities, concatenated."""
    emb = load_embeddings(run_dir)
    x, modalities = emb.stacked(cfg.align.modalities, "align.modalities", run_dir.stage_dir("embed") / OUTPUT)
    _check_ids(emb.item_id, run_dir.stage_dir("embed") / OUTPUT)
    acfg = cfg.align
    model = FeatureAlignerConfig(input_dim=x.shape[1], hidden=acfg.hidden, out_dim=acfg.out_dim,
                                 residual=acfg.residual, temperature=acfg.temperature)
    return ItemInputs(item_id=emb.item_id.astype(np.int64), raw=x, features=x, model=dataclasses.asdict(model),
                      extra={"modalities": modalities, "input_dim": int(x.shape[1])})


def clip_inputs(cfg: Config, run_dir: RunDir) -> ItemInputs:
    """``open_clip`` mode: tokens of the item text, preprocessed images, and the un-tuned embeddings.

    The preprocessed images are held in memory (N · 3 · H · W float32; 600 KB per item at 224 px).
    """
    from sidforge.models.encoders import build_encoder
    from sidforge.stages.embed import encoder_inputs, encoder_spec, load_images, read_items

    ecfg, acfg = cfg.embed, cfg.align
    table, _ = encoder_inputs(ecfg, read_items(run_dir.path / ITEMS, ecfg).sort_by("item_id"))
    item_id = table.column("item_id").to_numpy()
    _check_ids(item_id, run_dir.path / ITEMS)
    spec = encoder_spec(ecfg)
    enc = build_encoder(spec)
    tokens = enc.tokenizer(table.column("text").to_pylist()).numpy().astype(np.int64)  # (N, T)
    images, status = load_images(table.column("image_uri").to_numpy(zero_copy_only=False), ecfg.image_root)
    ok = np.flatnonzero(status == IMAGE_OK)
    pixels = None
    if len(ok):
        first = enc.preprocess(images[ok[0]]).numpy()
        pixels = np.zeros((len(item_id), *first.shape), dtype=np.float32)
        for i in ok:
            pixels[i] = enc.preprocess(images[i]).numpy()
    extra = {"model": ecfg.model, "train_blocks": acfg.train_blocks, "text_only": int((status != IMAGE_OK).sum()),
             "image_missing_uri": int((status == IMAGE_NO_URI).sum()),
             "image_unreadable": int((status == IMAGE_UNREADABLE).sum())}
    if extra["image_unreadable"]:
        log.warning("align: %d item images could not be read; those items are aligned from text only",
                    extra["image_unreadable"])
    model = {"spec": dataclasses.asdict(spec), "train_blocks": acfg.train_blocks, "temperature": acfg.temperature,
             "use_images": pixels is not None}
    items = ItemInputs(item_id=item_id.astype(np.int64), raw=np.zeros((0, 0), np.float32), model=model,
                       tokens=tokens, pixels=pixels, has_image=status == IMAGE_OK, extra=extra)
    aligner = OpenClipAligner(enc.model, acfg.train_blocks, acfg.temperature, use_images=pixels is not None)
    items.raw = embed_all(aligner, items, torch.device("cpu"))  # the un-tuned model: "before"
    return items


SETUPS: dict[str, Callable[[Config, RunDir], ItemInputs]] = {"features": feature_inputs, "open_clip": clip_inputs}


def _check_ids(item_id: np.ndarray, path: Path) -> None:
    if not np.array_equal(item_id, np.arange(len(item_id))):
        raise DataError(f"{path} must list item ids 0..n-1 in order; re-run the stage that wrote it")


# ----------------------------------------------------------------------------------------------
# the per-worker training loop


def loop_config(cfg: Config, items: ItemInputs, pairs: Pairs, seed: int) -> dict[str, Any]:
    """What :func:`train_align` receives: the aligner settings, optimiser settings and the data."""
    a: AlignTrainConfig = cfg.align
    return {"mode": a.mode, "lr": a.lr, "weight_decay": a.weight_decay, "batch_size": a.batch_size,
            "epochs": a.epochs, "seed": seed, "items": items, "fit": pairs.fit, "fit_weight": pairs.fit_weight,
            "valid": pairs.valid}


def build_aligner(mode: str, model: dict[str, Any]) -> FeatureAligner | OpenClipAligner:
    """A fresh aligner from :attr:`ItemInputs.model` (open_clip: loads the base weights)."""
    if mode == "features":
        return FeatureAligner(FeatureAlignerConfig(**model))
    from sidforge.models.encoders import EncoderSpec, build_encoder

    clip = build_encoder(EncoderSpec(**model["spec"])).model
    return OpenClipAligner(clip, model["train_blocks"], model["temperature"], use_images=model["use_images"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (all of a FeatureAligner, the unfrozen blocks of an OpenClipAligner)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise RuntimeError(f"align: checkpoint does not match the aligner (missing {sorted(trainable & set(missing))[:3]}, "
                           f"unexpected {unexpected[:3]})")


def train_align(ctx: WorkerContext, config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker loop: InfoNCE epochs over this rank's fit pairs, valid Hit@30 on rank 0, a checkpoint
    each epoch; then z of every item from the best epoch (numpy, on rank 0)."""
    items: ItemInputs = config["items"]
    torch.manual_seed(config["seed"])  # identical init on every rank
    model = build_aligner(config["mode"], items.model)
    if (state := ctx.load_checkpoint()) is not None:
        load_trainable(model, state["model"])
    step = ctx.prepare_model(model, method="loss")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    if state is not None:
        opt.load_state_dict(state["opt"])
    for epoch in ctx.epochs(config["epochs"]):
        torch.manual_seed(config["seed"] + 7919 * epoch + ctx.rank)
        metrics = _train_epoch(ctx, step, opt, items, config, epoch)
        if ctx.rank == 0:  # the monitor is rank 0's value; the other ranks need not compute it
            metrics[MONITOR] = i2i_hit_at_k(embed_all(model, items, ctx.device), config["valid"], k=K)[f"hit@{K}"]
        ctx.report(epoch, metrics, lambda: {"model": trainable_state(model), "opt": opt.state_dict()})
    in_sync = ctx.replicas_agree(model)
    best = ctx.load_best()
    if best is None:
        raise RuntimeError("align: no checkpoint to use; align.epochs must be >= 1")
    load_trainable(model, best["model"])
    # numpy, not tensors: Ray Train cannot return tensors from distributed workers
    return {"z": embed_all(model, items, ctx.device) if ctx.rank == 0 else None, "replicas_agree": in_sync}


def _train_epoch(ctx: WorkerContext, step: torch.nn.Module, opt: torch.optim.Optimizer, items: ItemInputs,
                 config: dict[str, Any], epoch: int) -> dict[str, float]:
    """One pass over this rank's fit pairs; returns the mean loss, positive cosine and top-1 accuracy."""
    step.train()
    pairs, weight, bs = config["fit"], config["fit_weight"], config["batch_size"]
    order = ctx.shard(len(pairs), seed=config["seed"] + epoch)  # equal length on every rank
    totals = {"loss": 0.0, "pos_cos": 0.0, "top1_acc": 0.0}
    n = 0
    for start in range(0, len(order), bs):
        rows = order[start : start + bs]
        if len(rows) < 2:  # a lone pair has no negatives (the same on every rank: equal shards)
            continue
        w = torch.from_numpy(weight[rows]).to(ctx.device)
        out = step(items.batch(pairs[rows, 0], ctx.device), items.batch(pairs[rows, 1], ctx.device), w)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        totals["loss"] += float(out.loss.detach())
        totals["pos_cos"] += float(out.metrics["pos_cos"])
        totals["top1_acc"] += float(out.metrics["top1_acc"])
        n += 1
    return {k: v / max(n, 1) for k, v in totals.items()}


def embed_all(model: torch.nn.Module, items: ItemInputs, device: torch.device, chunk: int = 1024) -> np.ndarray:
    """z of every item: (N, D) float32 in item-id order."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(items.item_id), chunk):
            rows = np.arange(start, min(start + chunk, len(items.item_id)))
            out.append(model(items.batch(rows, device)).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# outputs


def _i2i(z: np.ndarray, pairs: np.ndarray) -> dict[str, float]:
    return i2i_hit_at_k(z, pairs, k=K) if len(pairs) else {}


def _write_outputs(out: Path, result: FitResult, items: ItemInputs, pairs: Pairs, mode: str) -> dict[str, Any]:
    """Embeddings, model and metrics of the best epoch; returns the manifest metrics."""
    if not result.value["replicas_agree"]:
        raise RuntimeError("align: the workers' model replicas diverged; gradients were not synchronised")
    if result.best_checkpoint is None:
        raise RuntimeError(f"align: the best checkpoint (epoch {result.best_epoch}) is missing under {result.path}")
    z = result.value["z"]
    pq.write_table(ItemEmbeddings(items.item_id, {MODALITY: z}).to_table(), out / OUTPUT)
    state = load_state(result.best_checkpoint)["model"]
    torch.save({"mode": mode, "config": items.model, "state_dict": state}, out / "model.pt")
    if not len(pairs.heldout):
        log.warning("align: no held-out co-click pairs (prepare.coclick.holdout_fraction=0); no i2i before/after")
    metrics = {"mode": mode, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
               "stopped_early": result.stopped_early, "dim": int(z.shape[1]), **items.extra,
               "valid_before": _i2i(items.raw, pairs.valid), "valid_after": _i2i(z, pairs.valid),
               "i2i_before": _i2i(items.raw, pairs.heldout), "i2i_after": _i2i(z, pairs.heldout)}
    (out / "metrics.json").write_text(json.dumps({**metrics, "history": result.history}, indent=2))
    return metrics
