"""The SASRec stage: train the behavior model on Ray Train and export the item embeddings e_b.

Reads ``RUN/prepare/`` (interactions, item_stats) and writes ``RUN/sasrec/``:

- ``item_embeddings.parquet``: item_id, embedding (list<float32>, the behavior embedding e_b) and its
  L2 norm, from the best epoch (by valid NDCG@10);
- ``model.pt``: ``{"config": SASRecConfig fields, "state_dict": ...}`` of that epoch;
- ``metrics.json``: best epoch, per-epoch history, and full-catalogue valid and test Recall/NDCG@K,
  overall and per popularity bucket (head/torso/tail/cold) of the target item;
- ``ranks.parquet``: split, user_id, item_id (the target) and the 0-based rank of the target for every
  valid and test case, so two runs on the same prepare can be compared case by case
  (``sidforge compare``, :func:`sidforge.platform.metrics.paired_difference`).

Protocol (leave-one-out, one harness: :func:`sidforge.platform.metrics.retrieval_metrics`): training
uses each user's ``train`` part with a next-item target at every position (the most recent
``max_len + 1`` items); valid predicts the valid item from the train prefix; test predicts the test
item from train + valid. Histories hold ``train`` (and ``valid``) interactions only: the ``heldout``
interactions of cold items never reach the model. Candidates are the full catalogue; history items are
kept unless ``sasrec.exclude_history`` (the stricter default; S3-Rec's and RecBole's full ranking leave
them out, as far as we know, and so do the Beauty figures they publish). The test split is also
scored under the other protocol (``test_history_excluded`` or ``test_history_kept`` in the metrics), for
comparison with figures published under it; selection never looks at either.

Train, then refit (``sasrec.refit_epochs=N``): a second stage trains on train *and* valid for the ``N``
epochs a selection run chose (its ``best_epoch + 1``) and scores test with the last epoch; it writes no valid
metrics and only test rows to ``ranks.parquet`` (:func:`refit_overrides`; ``sidforge train sasrec --refit``
and ``bench/bbqrec.py --refit`` run the pair).

Training checkpoints live in ``RUN/_train/sasrec-<config hash>-<inputs hash>/`` while the stage runs; a
stage killed mid-training resumes from its last epoch when run again with the same config and inputs
(``force`` starts over). They are deleted once the outputs are written.

BBQRec variants (``sasrec.reweight=sid``, ``sasrec.contrastive_weight``, ``sasrec.contrastive_target``,
``sasrec.item_repr``) run through the same stage: the attention is reweighted by the SID similarity of the
items (:class:`sidforge.models.sasrec.SIDSimilarityBias`), reading the ``codes`` column of a tokenizer's
``sids.parquet`` (the semantic levels; the collision digit is an arbitrary rank, so equal digits say nothing
about two items). A variant with ``sasrec.name`` writes ``RUN/sasrec-<name>/`` (a reweighted one without a
name ``RUN/sasrec-sid/``), so ``RUN/sasrec``, the behavior embeddings the tokenizers read, stays the plain
model; its metrics add the learned level weights. With ``sasrec.item_features`` (e.g. ``[text, image]``) the
model also reads the embed stage's vectors of those modalities (``RUN/embed/item_embeddings.parquet``) and adds
their learned projection to every item representation (BBQRec's multimodal items; see
:class:`sidforge.models.sasrec.SASRecConfig`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from sidforge.models.sasrec import SASRec, SASRecConfig, sample_unseen_negatives
from sidforge.platform.artifacts import (
    RunDir,
    StageResult,
    fingerprint_files,
    prepare_fingerprints,
    sids_fingerprints,
)
from sidforge.platform.config import Config, SASRecTrainConfig
from sidforge.platform.metrics import metrics_from_ranks, paired_difference, target_ranks
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

log = logging.getLogger(__name__)

STAGE = "sasrec"
MONITOR = "valid/ndcg@10"
ITEM_EMBEDDINGS = pa.schema([("item_id", pa.int64()), ("embedding", pa.list_(pa.float32())), ("norm", pa.float32())])
CASE_RANKS = pa.schema([("split", pa.string()), ("user_id", pa.int64()), ("item_id", pa.int64()), ("rank", pa.int64())])


# ----------------------------------------------------------------------------------------------
# entry point


def run(cfg: Config, run_dir: RunDir, sids: str | Path | None = None, force: bool = False) -> StageResult:
    """Train SASRec on ``RUN/prepare`` (or skip when config and inputs are unchanged); see the module doc.

    Args:
        cfg: the experiment; its ``sasrec`` section picks the variant and the output folder.
        run_dir: the run directory.
        sids: a tokenizer's folder ``RUN/tokenize-<name>``; required with ``sasrec.reweight=sid``,
            ignored otherwise.
        force: train again even when the recorded outputs are current.
    """
    t0 = time.perf_counter()
    stage = cfg.sasrec.output_name
    sids = _sids_folder(cfg, sids)
    config_hash = stage_config_hash(cfg)
    inputs = _input_fingerprints(run_dir, sids, bool(cfg.sasrec.item_features))
    if not force and (cached := run_dir.cached(stage, config_hash, inputs)) is not None:
        return cached
    refit = cfg.sasrec.refit_epochs > 0
    data = load_sequences(run_dir.stage_dir("prepare"), cfg.sasrec.max_len, cfg.sasrec.hold_out_last_train,
                          include_valid=refit)
    codes = load_codes(sids, data.num_items) if sids is not None else None
    features = load_item_features(run_dir, cfg.sasrec.item_features, data.num_items)
    train_run = _run_settings(cfg, run_dir, stage, config_hash, inputs)
    config = loop_config(cfg, data, codes, features)
    result = fit(train_sasrec, config,
                 ScalingSettings(cfg.sasrec.num_workers, cpus_per_worker=cfg.sasrec.cpus_per_worker),
                 train_run, fresh=force)
    with run_dir.writing(stage) as out:
        metrics = _write_outputs(out, result, data, config["model"], config["exclude_history"], sids)
    remove_run(train_run)
    rows = {"items": data.num_items, "train_sequences": len(data.train_inputs),
            "valid_cases": 0 if refit else len(data.valid_target), "test_cases": len(data.test_target)}
    result = run_dir.finish(stage, config_hash, inputs, rows, metrics, t0)
    log.info("%s: wrote %s in %.1f s (test recall@10 %.4f)", stage, result.out_dir, result.wall_time_s,
             metrics["test"].get("recall@10", 0.0))
    return result


def refit_overrides(cfg: Config, selected: StageResult) -> list[str]:
    """``--set`` overrides that turn ``cfg`` into the refit of its selection run ``selected``: train + valid for
    the ``best_epoch + 1`` epochs it chose, written to ``RUN/<its stage>-refit`` (``RUN/sasrec-refit``)."""
    name = cfg.sasrec.output_name.removeprefix(STAGE).lstrip("-")
    return [f"sasrec.refit_epochs={int(selected.metrics['best_epoch']) + 1}",
            f"sasrec.name={name + '-' if name else ''}refit"]


_OPERATIONAL = ("cpus_per_worker", "max_failures", "name")  # how a run is executed (and where it goes)
_REWEIGHT_KEYS = ("reweight", "reweight_match", "reweight_init", "reweight_learned", "reweight_per_head",
                  "reweight_self")
_CONTRASTIVE_KEYS = ("contrastive_weight", "contrastive_temperature", "contrastive_target")


def stage_config_hash(cfg: Config) -> str:
    """Hash of what the outputs depend on: the ``sasrec`` section (minus operational keys) and the seed.

    The BBQRec settings count only when they are switched on (``reweight=sid``, ``contrastive_weight > 0``,
    ``contrastive_target=sid``), the negative sampler only when BCE uses ``unseen``, the block layout
    only when it is ``post``, the loss averaging only when it is ``epoch``, the held-out last train item only
    when it is on, the refit budget only when it is set (and then in place of the selection settings
    ``epochs``, ``patience`` and ``eval_every``), the item representation only when it is ``id+sid`` and the
    content features only when some are named, so a plain SASRec keeps the hash it had before they existed
    (its recorded runs stay current).
    """
    s = cfg.sasrec
    unused = list(_OPERATIONAL)
    if s.reweight == "none":
        unused += _REWEIGHT_KEYS
    elif s.reweight_self:
        unused.append("reweight_self")
    if s.contrastive_weight == 0:
        unused += _CONTRASTIVE_KEYS
    elif s.contrastive_target == "item":
        unused.append("contrastive_target")
    if not s.unseen_negatives:
        unused.append("negatives")
    if s.norm == "pre":
        unused.append("norm")
    if s.loss_average == "batch":
        unused.append("loss_average")
    if s.item_repr == "id":
        unused.append("item_repr")
    if s.sid_weight_decay is None or not _has_code_table(s):
        unused.append("sid_weight_decay")
    if not s.hold_out_last_train:
        unused.append("hold_out_last_train")
    if not s.item_features:
        unused.append("item_features")
    if not s.refit_epochs:
        unused.append("refit_epochs")
    else:  # the refit trains a fixed budget: the selection settings do not reach its outputs
        unused += ["epochs", "patience", "eval_every"]
    section = {k: v for k, v in dataclasses.asdict(s).items() if k not in unused}
    payload = json.dumps({"sasrec": section, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _has_code_table(s: SASRecTrainConfig) -> bool:
    """The model learns per-level code embeddings (items as ID + SID, or the SID-target sequence loss)."""
    return s.item_repr == "id+sid" or (s.contrastive_target == "sid" and s.contrastive_weight > 0)


def _sids_folder(cfg: Config, sids: str | Path | None) -> Path | None:
    if cfg.sasrec.reweight == "none":
        return None
    if sids is None:
        raise DataError("sasrec.reweight=sid needs semantic IDs: pass --sids RUN/tokenize-<name> (or set "
                        "sasrec.reweight=none)")
    return Path(sids).expanduser().resolve()


def _input_fingerprints(run_dir: RunDir, sids: Path | None = None, features: bool = False) -> dict[str, str]:
    out = prepare_fingerprints(run_dir)
    if sids is not None:
        out.update(sids_fingerprints(run_dir, sids))
    if features:
        path = run_dir.stage_dir("embed") / "item_embeddings.parquet"
        if not path.is_file():
            raise DataError(f"sasrec.item_features reads {path}: run `sidforge embed` first (or set "
                            "sasrec.item_features=[])")
        out.update(fingerprint_files([path], root=run_dir.path))
    return out


def _run_settings(cfg: Config, run_dir: RunDir, stage: str, config_hash: str,
                  inputs: dict[str, str]) -> RunSettings:
    run = stage_run_settings(stage, run_dir.path, config_hash, inputs, max_failures=cfg.sasrec.max_failures,
                             patience=cfg.sasrec.patience, monitor=MONITOR)
    if cfg.sasrec.refit_epochs:  # a fixed budget, no selection: the last epoch is the model
        run = dataclasses.replace(run, monitor=None, patience=None)
    return run


# ----------------------------------------------------------------------------------------------
# sequences


@dataclass
class Sequences:
    """Left-padded (pad id = ``num_items``) training and evaluation arrays.

    Attributes:
        train_inputs, train_targets: (N, max_len) int64; the target of a position is the next item.
        valid_hist, test_hist: (V, max_len) / (T, max_len) int64 histories.
        valid_target, test_target: (V,) / (T,) int64 target items.
        bucket: (num_items,) popularity bucket of each item (for per-bucket metrics).
        valid_user, test_user: (V,) / (T,) int64 user of each case (``ranks.parquet`` pairs runs by user).
    """

    num_items: int
    train_inputs: np.ndarray
    train_targets: np.ndarray
    valid_hist: np.ndarray
    valid_target: np.ndarray
    test_hist: np.ndarray
    test_target: np.ndarray
    bucket: np.ndarray
    valid_user: np.ndarray
    test_user: np.ndarray


def _last_items(user: np.ndarray, item: np.ndarray, num_users: int, length: int, pad: int) -> np.ndarray:
    """(num_users, length) matrix of each user's last ``length`` items, left-padded with ``pad``.

    ``user``/``item`` must be sorted by user, then by order within the user.
    """
    counts = np.bincount(user, minlength=num_users)
    end = np.cumsum(counts)  # exclusive end of each user's run
    from_end = end[user] - np.arange(len(user)) - 1  # 0 = the user's most recent item
    keep = from_end < length
    out = np.full((num_users, length), pad, dtype=np.int64)
    out[user[keep], length - 1 - from_end[keep]] = item[keep]
    return out


def build_sequences(interactions: pa.Table, bucket: np.ndarray, max_len: int,
                    hold_out_last_train: bool = False, include_valid: bool = False) -> Sequences:
    """Training and leave-one-out evaluation arrays from the prepared interactions.

    Args:
        interactions: user_id, item_id, position, split (train/valid/test/heldout).
        bucket: (num_items,) popularity bucket per item.
        max_len: history length (the most recent items are kept).
        hold_out_last_train: leave each user's most recent train item out of the training sequences
            (it stays in the valid and test histories); see ``SASRecTrainConfig.hold_out_last_train``.
        include_valid: train on the valid item too (each user's sequence up to the test item), for the refit
            of ``SASRecTrainConfig.refit_epochs``; the valid cases are built as always.
    """
    num_items = len(bucket)
    pad = num_items
    df = interactions.select(["user_id", "item_id", "position", "split"]).to_pandas()
    df = df.sort_values(["user_id", "position"], kind="stable")
    num_users = int(df["user_id"].max()) + 1 if len(df) else 0

    def last(mask: np.ndarray, length: int) -> np.ndarray:
        part = df[mask]
        return _last_items(part["user_id"].to_numpy(), part["item_id"].to_numpy(), num_users, length, pad)

    split = df["split"].to_numpy()
    trained = np.isin(split, ("train", "valid")) if include_valid else split == "train"
    if hold_out_last_train:
        users = df["user_id"].to_numpy()
        rows = np.flatnonzero(trained)
        last_of_user = np.append(users[rows][1:] != users[rows][:-1], True)  # rows are sorted by user
        trained[rows[last_of_user]] = False
    seq = last(trained, max_len + 1)
    inputs, targets = seq[:, :-1].copy(), seq[:, 1:].copy()
    targets[inputs == pad] = pad  # the first item of a sequence has nothing before it
    has_target = (targets != pad).any(axis=1)

    def cases(name: str, hist_splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = df[split == name]
        users, target = rows["user_id"].to_numpy(), rows["item_id"].to_numpy()
        return last(np.isin(split, hist_splits), max_len)[users], target, users

    valid_hist, valid_target, valid_user = cases("valid", ("train",))
    test_hist, test_target, test_user = cases("test", ("train", "valid"))
    return Sequences(num_items, inputs[has_target], targets[has_target], valid_hist, valid_target, test_hist,
                     test_target, np.asarray(bucket).astype(str), valid_user, test_user)


def load_codes(sids: Path, num_items: int) -> np.ndarray:
    """The semantic ``codes`` of every item (no collision digit) as a -1-padded (num_items, L) int64 array."""
    table = pq.read_table(sids / "sids.parquet", columns=["item_id", "codes"])
    item_id = table.column("item_id").to_numpy()
    lists = table.column("codes").to_pylist()
    if len(item_id) != num_items or not np.array_equal(np.sort(item_id), np.arange(num_items)):
        raise DataError(f"{sids}/sids.parquet must give exactly one ID to each of the {num_items} items of "
                        "prepare; re-run `sidforge tokenize` on this run")
    width = max(len(c) for c in lists)
    codes = np.full((num_items, width), -1, dtype=np.int64)
    for i, c in zip(item_id, lists):
        codes[i, : len(c)] = c
    if (codes[:, 0] < 0).any() or (codes < -1).any():
        raise DataError(f"{sids}/sids.parquet: every ID needs at least one code and codes must be >= 0")
    return codes


def load_item_features(run_dir: RunDir, modalities: Sequence[str], num_items: int) -> np.ndarray | None:
    """The named embed modalities of every item, concatenated: ``(num_items, D)`` float32, or ``None`` for none.

    An item without a vector of a modality (no image) has zeros there, as the embed stage writes it.
    """
    if not modalities:
        return None
    from sidforge.stages.embed import OUTPUT, load_embeddings

    emb = load_embeddings(run_dir)
    x, _ = emb.stacked(modalities, "sasrec.item_features", run_dir.stage_dir("embed") / OUTPUT)
    if not np.array_equal(emb.item_id, np.arange(num_items)):
        raise DataError(f"{run_dir.stage_dir('embed')}: the embeddings must list item ids 0..{num_items - 1} in "
                        "order, as prepare does; re-run `sidforge embed` on this run")
    return x


def load_sequences(prepare_dir: Path, max_len: int, hold_out_last_train: bool = False,
                   include_valid: bool = False) -> Sequences:
    """:func:`build_sequences` over ``RUN/prepare``."""
    inter = pq.read_table(prepare_dir / "interactions", columns=["user_id", "item_id", "position", "split"])
    stats = pq.read_table(prepare_dir / "item_stats.parquet", columns=["item_id", "bucket"]).to_pandas()
    bucket = stats.sort_values("item_id")["bucket"].to_numpy()
    if not (stats["item_id"].sort_values().to_numpy() == np.arange(len(stats))).all():
        raise DataError(f"{prepare_dir}/item_stats.parquet must list item ids 0..n-1 once each")
    data = build_sequences(inter, bucket, max_len, hold_out_last_train, include_valid)
    if len(data.train_inputs) == 0 or len(data.valid_target) == 0:
        raise DataError(f"{prepare_dir}: no training sequences or no valid cases; check the prepare outputs")
    return data


# ----------------------------------------------------------------------------------------------
# the per-worker training loop


def loop_config(cfg: Config, data: Sequences, codes: np.ndarray | None = None,
                features: np.ndarray | None = None) -> dict[str, Any]:
    """What :func:`train_sasrec` receives: model fields, optimiser settings, the data, the SID codes and the
    content features."""
    s = cfg.sasrec
    model = SASRecConfig(num_items=data.num_items, max_len=s.max_len, hidden=s.hidden, num_layers=s.layers,
                         num_heads=s.heads, ffn_hidden=s.ffn_hidden, dropout=s.dropout, loss=s.loss, norm=s.norm,
                         sid_levels=0 if codes is None else codes.shape[1], reweight_match=s.reweight_match,
                         reweight_init=s.reweight_init, reweight_learned=s.reweight_learned,
                         reweight_per_head=s.reweight_per_head, reweight_self=s.reweight_self,
                         contrastive_weight=s.contrastive_weight,
                         contrastive_temperature=s.contrastive_temperature,
                         contrastive_target=s.contrastive_target,
                         item_repr=s.item_repr,
                         sid_codebook_size=int(codes.max()) + 1 if codes is not None and (
                             s.contrastive_target == "sid" or s.item_repr == "id+sid") else 0,
                         feature_dim=0 if features is None else features.shape[1])
    return {"model": dataclasses.asdict(model), "lr": s.lr, "weight_decay": s.weight_decay,
            "sid_weight_decay": s.sid_weight_decay, "batch_size": s.batch_size, "loss_average": s.loss_average,
            "epochs": s.refit_epochs or s.epochs, "eval_every": s.eval_every, "refit": s.refit_epochs > 0,
            "unseen_negatives": s.unseen_negatives,
            "exclude_history": s.exclude_history, "seed": cfg.seed if s.seed is None else s.seed, "data": data,
            "sid_codes": codes, "item_features": features}


def _param_groups(model: SASRec, config: dict[str, Any]) -> Any:
    """The model's parameters for AdamW; with ``sid_weight_decay`` set, the code table in its own group."""
    decay = config["sid_weight_decay"]
    if decay is None or model.sid_code_emb is None:
        return model.parameters()
    table = model.sid_code_emb.weight
    return [{"params": [p for p in model.parameters() if p is not table]},
            {"params": [table], "weight_decay": decay}]


def train_sasrec(ctx: WorkerContext, config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker loop: train, evaluate on valid, checkpoint each epoch; then score the best epoch."""
    data: Sequences = config["data"]
    torch.manual_seed(config["seed"])  # identical init on every rank
    codes, features = config.get("sid_codes"), config.get("item_features")
    model = SASRec(SASRecConfig(**config["model"]), None if codes is None else torch.from_numpy(codes),
                   None if features is None else torch.from_numpy(features))
    if (state := ctx.load_checkpoint()) is not None:
        model.load_state_dict(state["model"])
    step = ctx.prepare_model(model, method="loss")
    # After prepare_model: loading optimizer state casts it to the parameters' (final) device.
    opt = torch.optim.AdamW(_param_groups(model, config), lr=config["lr"], weight_decay=config["weight_decay"])
    if state is not None:
        opt.load_state_dict(state["opt"])
    for epoch in ctx.epochs(config["epochs"]):
        torch.manual_seed(config["seed"] + 7919 * epoch + ctx.rank)  # dropout/negatives: resumable, per rank
        loss = _train_epoch(ctx, step, opt, data, config, epoch)
        metrics: dict[str, Any] = {"loss": loss}
        if not config["refit"] and ((epoch + 1) % config["eval_every"] == 0 or epoch + 1 == config["epochs"]):
            valid = evaluate(ctx, model, data.valid_hist, data.valid_target, config["exclude_history"])
            metrics.update({f"valid/{k}": v for k, v in valid.items() if k != "count"})
        ctx.report(epoch, metrics, lambda: {"model": model.state_dict(), "opt": opt.state_dict()})
    in_sync = ctx.replicas_agree(model)  # before loading the best epoch, which every rank would share
    best = ctx.load_best()
    if best is None:
        raise RuntimeError("sasrec: no checkpoint to evaluate; sasrec.epochs must be >= 1")
    model.load_state_dict(best["model"])
    ex = config["exclude_history"]
    # a refit trained on the valid targets: its valid figures would mean nothing, so it has none
    valid_ranks = None if config["refit"] else case_ranks(ctx, model, data.valid_hist, data.valid_target, ex)
    test_ranks = case_ranks(ctx, model, data.test_hist, data.test_target, ex)
    return {
        "valid": None if valid_ranks is None else metrics_from_ranks(valid_ranks,
                                                                     groups=data.bucket[data.valid_target]),
        "test": metrics_from_ranks(test_ranks, groups=data.bucket[data.test_target]),
        "valid_ranks": valid_ranks, "test_ranks": test_ranks,  # per case, for paired comparisons of runs
        # the other candidate protocol, reported beside (never used for selection)
        "test_other_protocol": evaluate(ctx, model, data.test_hist, data.test_target, not ex,
                                        data.bucket[data.test_target]),
        "replicas_agree": in_sync,
    }


def _trimmed(arrays: list[np.ndarray], pad: int, device: torch.device) -> list[torch.Tensor]:
    """Drop the leading columns that are padding in every row of the first array (left padding)."""
    real = (arrays[0] != pad).any(axis=0)
    first = int(real.argmax()) if real.any() else arrays[0].shape[1] - 1
    return [torch.as_tensor(a[:, first:], device=device) for a in arrays]


def length_buckets(order: np.ndarray, inputs: np.ndarray, pad: int, batch_size: int, seed: int,
                   window: int = 32) -> list[np.ndarray]:
    """Batches of similar-length sequences, so little compute goes to padding.

    Within windows of ``window`` batches of the (already shuffled) order, rows are sorted by length and
    cut into batches; the batch order is then shuffled. Every rank gets the same number of batches.
    """
    lengths = (inputs[order] != pad).sum(axis=1)
    batches = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[start : start + span], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    np.random.default_rng(seed).shuffle(batches)
    return batches


def _train_epoch(ctx: WorkerContext, step: torch.nn.Module, opt: torch.optim.Optimizer, data: Sequences,
                 config: dict[str, Any], epoch: int) -> float:
    """One pass over this rank's shard; returns the mean training loss (this rank's).

    With ``loss_average=epoch`` each batch's mean loss is rescaled by its target positions over the epoch's
    mean per batch (see ``SASRecTrainConfig.loss_average``); the returned figure is the unscaled mean.
    """
    step.train()
    order = ctx.shard(len(data.train_inputs), seed=config["seed"] + epoch)
    bs, total, n = config["batch_size"], 0.0, 0
    batches = length_buckets(order, data.train_inputs, data.num_items, bs, seed=config["seed"] + epoch)
    scales = [1.0] * len(batches)
    if config["loss_average"] == "epoch" and batches:
        counts = np.array([(data.train_targets[rows] != data.num_items).sum() for rows in batches], dtype=float)
        scales = (counts / counts.mean()).tolist()  # target positions of each batch over the epoch's mean
    for rows, scale in zip(batches, scales):
        inputs, targets = _trimmed([data.train_inputs[rows], data.train_targets[rows]], data.num_items, ctx.device)
        if config["unseen_negatives"]:
            seen = torch.cat([inputs, targets[:, -1:]], dim=1)  # the user's whole training sequence
            out = step(inputs, targets, sample_unseen_negatives(targets, seen, data.num_items))
        else:
            out = step(inputs, targets)
        opt.zero_grad(set_to_none=True)
        (out.loss * scale).backward()  # scale is exactly 1.0 for loss_average=batch
        opt.step()
        total, n = total + float(out.loss.detach()), n + 1
    return total / max(n, 1)


def evaluate(ctx: WorkerContext | None, model: SASRec, hist: np.ndarray, target: np.ndarray, exclude_history: bool,
             groups: np.ndarray | None = None, chunk_size: int = 512) -> dict[str, float]:
    """Full-catalogue Recall/NDCG@K of :func:`case_ranks`."""
    return metrics_from_ranks(case_ranks(ctx, model, hist, target, exclude_history, chunk_size), groups=groups)


def case_ranks(ctx: WorkerContext | None, model: SASRec, hist: np.ndarray, target: np.ndarray,
               exclude_history: bool, chunk_size: int = 512) -> np.ndarray:
    """(cases,) 0-based full-catalogue rank of each target; cases are split across workers and gathered.

    ``ctx=None`` scores every case in this process, on the model's device (a saved model, outside training).
    """
    mine = np.arange(len(target)) if ctx is None else ctx.shard(len(target), even=False)
    pad = model.config.pad_id
    device = next(model.parameters()).device if ctx is None else ctx.device

    def score(idx: np.ndarray) -> torch.Tensor:
        (h,) = _trimmed([hist[idx]], pad, device)
        return model.score_all(h)

    exclude = np.where(hist[mine] == pad, -1, hist[mine]) if exclude_history else None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ranks = target_ranks(score, mine, target[mine], exclude=exclude, chunk_size=chunk_size)
    model.train(was_training)
    if ctx is None:
        return ranks
    gathered = ctx.all_gather((mine, ranks))
    all_ranks = np.empty(len(target), dtype=np.int64)
    for idx, r in gathered:
        all_ranks[idx] = r
    return all_ranks


# ----------------------------------------------------------------------------------------------
# outputs


def case_ranks_table(data: Sequences, valid_ranks: np.ndarray | None, test_ranks: np.ndarray) -> pa.Table:
    """``ranks.parquet``: one row per valid and test case, the rank of its target under the stage's protocol
    (test cases only when ``valid_ranks`` is ``None``: a refit)."""
    n_valid = 0 if valid_ranks is None else len(data.valid_target)
    valid_ranks = np.empty(0, dtype=np.int64) if valid_ranks is None else valid_ranks
    return pa.table({"split": pa.array(["valid"] * n_valid + ["test"] * len(data.test_target), type=pa.string()),
                     "user_id": np.concatenate([data.valid_user[:n_valid], data.test_user]).astype(np.int64),
                     "item_id": np.concatenate([data.valid_target[:n_valid], data.test_target]).astype(np.int64),
                     "rank": np.concatenate([valid_ranks, test_ranks]).astype(np.int64)},
                    schema=CASE_RANKS)


def read_case_ranks(folder: str | Path) -> pa.Table:
    """``ranks.parquet`` of a SASRec stage folder (``RUN/sasrec``, ``RUN/sasrec-<name>``), checked."""
    path = Path(folder) / "ranks.parquet"
    if not path.is_file():
        raise DataError(f"{path} is missing: compare needs the per-case ranks a SASRec stage writes; re-run "
                        f"the stage that made {folder} (`sidforge train sasrec ... --force`)")
    table = pq.read_table(path)
    if not table.schema.equals(CASE_RANKS):
        raise DataError(f"{path}: expected columns {CASE_RANKS.names} ({CASE_RANKS}), got {table.schema}")
    return table


def compare_case_ranks(base: Sequence[str | Path], other: Sequence[str | Path],
                       metrics: Sequence[str] = ("ndcg@10", "recall@10"), n_boot: int = 2000,
                       seed: int = 0) -> list[dict[str, Any]]:
    """``other`` against ``base`` per split and metric, case by case (:func:`paired_difference`).

    Folder ``i`` of ``base`` is paired with folder ``i`` of ``other`` (one seed each); a pair must hold the
    same cases (split, user and target, in order): two models trained on one prepare. When every pair
    holds the same cases the users are resampled jointly across the pairs. Only the splits both folders of
    a pair hold are compared (a refit holds test alone).
    """
    if not base or len(base) != len(other):
        raise DataError(f"compare pairs base and other folders by position: got {len(base)} base and "
                        f"{len(other)} other folders")
    keys = ["split", "user_id", "item_id"]
    pairs = []
    for b, o in zip(base, other):
        tb, to = read_case_ranks(b), read_case_ranks(o)
        shared = set(pc.unique(tb["split"]).to_pylist()) & set(pc.unique(to["split"]).to_pylist())
        if not shared:
            raise DataError(f"{b} and {o} share no split (a refit ranks test alone); nothing to compare")
        # a refit (test only) against its selection run: compare on the split both hold
        tb, to = (t.filter(pc.is_in(t["split"], pa.array(sorted(shared)))) for t in (tb, to))
        if not tb.select(keys).equals(to.select(keys)):
            raise DataError(f"{b} and {o} do not rank the same cases (split, user_id, item_id); compare two "
                            "models trained on the same prepare")
        pairs.append((tb, to))
    first = pairs[0][0].select(keys)
    joint = all(tb.select(keys).equals(first) for tb, _ in pairs)
    def ranks(t: pa.Table, split: str) -> np.ndarray:
        return t.filter(pc.equal(t["split"], split))["rank"].to_numpy()

    out = []
    for split in ("valid", "test"):
        base_ranks, other_ranks = [ranks(tb, split) for tb, _ in pairs], [ranks(to, split) for _, to in pairs]
        if not any(len(r) for r in base_ranks):
            continue
        for metric in metrics:
            d = paired_difference(base_ranks, other_ranks, metric, joint=joint, n_boot=n_boot, seed=seed)
            out.append({"split": split, "joint": joint, **d._asdict()})
    return out


def _write_outputs(out: Path, result: FitResult, data: Sequences, model_config: dict[str, Any],
                   exclude_history: bool, sids: Path | None = None) -> dict[str, Any]:
    """Embeddings and model of the best epoch, and the metrics; returns the manifest metrics."""
    if result.best_checkpoint is None:
        raise RuntimeError(f"sasrec: the best checkpoint (epoch {result.best_epoch}) is missing under {result.path}")
    state = load_state(result.best_checkpoint)["model"]
    if model_config["item_repr"] == "id" and not model_config.get("feature_dim"):
        emb = state["item_emb.weight"][: data.num_items].float().numpy()  # (num_items, H), pad row dropped
    else:  # the ID plus semantic-ID (and content) embeddings the model scores with
        model = SASRec(SASRecConfig(**model_config))
        model.load_state_dict(state)
        with torch.no_grad():
            emb = model.item_embeddings().float().numpy()
    norm = np.linalg.norm(emb, axis=1).astype(np.float32)
    table = pa.table({"item_id": np.arange(data.num_items, dtype=np.int64),
                      "embedding": pa.array(list(emb), type=pa.list_(pa.float32())), "norm": norm},
                     schema=ITEM_EMBEDDINGS)
    pq.write_table(table, out / "item_embeddings.parquet")
    pq.write_table(case_ranks_table(data, result.value["valid_ranks"], result.value["test_ranks"]),
                   out / "ranks.parquet")
    saved: dict[str, Any] = {"config": model_config, "state_dict": state}
    if sids is not None:
        saved["sids"] = str(sids)  # provenance only: the codes themselves are in the state (sid_codes)
    torch.save(saved, out / "model.pt")
    if not result.value["replicas_agree"]:
        raise RuntimeError("sasrec: the workers' model replicas diverged; gradients were not synchronised")
    other = "test_history_kept" if exclude_history else "test_history_excluded"
    metrics = {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
               "stopped_early": result.stopped_early, "test": result.value["test"],
               other: result.value["test_other_protocol"]}
    if result.value["valid"] is not None:  # a refit has none
        metrics["valid"] = result.value["valid"]
    if "sid_bias.weight" in state:  # (H', L) level weights of the reweighting, as trained
        metrics["reweight_weights"] = state["sid_bias.weight"].float().tolist()
    (out / "metrics.json").write_text(json.dumps({**metrics, "history": result.history}, indent=2))
    return metrics

