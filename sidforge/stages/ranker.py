"""The ranker stage: SaviorRec's CTR ranker (MBA + bi-directional target attention) on Ray Train.

Reads ``RUN/prepare/`` (interactions, item_stats), the frozen content embedding named by
``ranker.content`` (``RUN/embed`` or ``RUN/align`` ``item_embeddings.parquet``) and, with MBA, a
tokenizer's ``sids.parquet`` (its ``codes``: the semantic levels, without the collision digit).
Writes ``RUN/ranker[-<name>]/``:

- ``model.pt``: ``{"config": RankerConfig fields, "state_dict": ...}`` of the best epoch (by valid AUC);
  the frozen item tables (stats, content, codes) are buffers inside the state dict;
- ``metrics.json``: best epoch, per-epoch history, and valid / test AUC, GAUC and LogLoss, overall and
  per popularity bucket of the candidate item (head / torso / tail / cold).

With ``ranker.sid_features`` the tokenizer's ``codes`` (any length, variable-length IDs included) and
their ``weights`` (1.0 when the table has none) also become an item feature (see
:mod:`sidforge.models.ranker`); the metrics then carry ``sid_avg_length``, the mean number of codes with a
non-zero weight per item (a sweep's ID-length axis).

Samples (our choices where the paper, an industrial log, has real impressions): every observed next
item of a user's ``train`` sequence is a positive, with the most recent ``max_len`` items before it as
history; ``neg_ratio`` negatives per positive are drawn from the items seen in training (uniform, or
p ∝ (train count + 1)^pop_power), re-drawn every epoch, never equal to the positive. Valid (history:
train) and test (history: train + valid) follow leave-one-out; their negatives are drawn once from the
**whole** catalogue, cold items included, with a fixed seed (:data:`EVAL_SEED`), so every model and
every training seed is scored on the same impressions. The ``heldout`` interactions of cold items
never reach training: a cold item is met only as a valid/test candidate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from sidforge.models.ranker import RankerConfig, SaviorRanker
from sidforge.platform.artifacts import (
    RunDir,
    StageResult,
    fingerprint_files,
    prepare_fingerprints,
    sids_fingerprints,
)
from sidforge.platform.config import Config, RankerTrainConfig
from sidforge.platform.metrics import ranking_metrics
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
from sidforge.stages.sasrec import length_buckets

log = logging.getLogger(__name__)

MONITOR = "valid/auc"
EVAL_SEED = 20_240_601  # the evaluation negatives: identical for every model, config and training seed
MODEL_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# entry point


def run(cfg: Config, run_dir: RunDir, sids: str | Path | None = None, force: bool = False) -> StageResult:
    """Train the ranker (or skip when config and inputs are unchanged); see the module doc.

    Args:
        cfg: the experiment config; this stage reads ``cfg.ranker``.
        run_dir: the run directory (``prepare`` done; ``embed``/``align`` as ``ranker.content`` needs).
        sids: a tokenizer's folder ``RUN/tokenize-<name>``; required when ``ranker.mba``.
        force: re-train even when nothing changed.
    """
    t0 = time.perf_counter()
    r = cfg.ranker
    stage = r.output_name
    sids = Path(sids).expanduser().resolve() if sids is not None else None
    if r.mba and sids is None:
        raise DataError("ranker.mba needs semantic IDs: pass --sids RUN/tokenize-<name> (or set ranker.mba=false)")
    if r.sid_features and sids is None:
        raise DataError("ranker.sid_features needs semantic IDs: pass --sids RUN/tokenize-<name> (or set "
                        "ranker.sid_features=false)")
    config_hash = stage_config_hash(cfg)
    inputs = _input_fingerprints(r, run_dir, sids)
    if not force and (cached := run_dir.cached(stage, config_hash, inputs)) is not None:
        return cached
    data = load_data(run_dir, r, sids if r.mba else None, feature_sids=sids if r.sid_features else None)
    train_run = _run_settings(cfg, run_dir, stage, config_hash, inputs)
    config = loop_config(cfg, data)
    result = fit(train_ranker, config, ScalingSettings(r.num_workers, cpus_per_worker=r.cpus_per_worker),
                 train_run, fresh=force)
    extra = {} if data.sid_weights is None else {"sid_avg_length": float((data.sid_weights > 0).sum(1).mean())}
    with run_dir.writing(stage) as out:
        metrics = _write_outputs(out, result, config["model"], sids, run_dir, extra)
    remove_run(train_run)
    rows = {"items": data.num_items, "train_positives": len(data.train_target),
            "valid_impressions": len(data.valid.labels), "test_impressions": len(data.test.labels)}
    result = run_dir.finish(stage, config_hash, inputs, rows, metrics, t0)
    log.info("%s: wrote %s in %.1f s (test auc %.4f, cold %.4f)", stage, result.out_dir, result.wall_time_s,
             metrics["test"]["auc"], metrics["test"].get("auc/cold", float("nan")))
    return result


_OPERATIONAL = ("cpus_per_worker", "max_failures", "name")  # how a run executes, not what it computes


def stage_config_hash(cfg: Config) -> str:
    """Hash of what the outputs depend on: the ``ranker`` section (minus operational keys) and the seed."""
    section = {k: v for k, v in dataclasses.asdict(cfg.ranker).items() if k not in _OPERATIONAL}
    if not cfg.ranker.sid_features:  # runs from before the option keep their hash
        section.pop("sid_features")
        section.pop("sid_dim")
    payload = json.dumps({"ranker": section, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _content_path(r: RankerTrainConfig, run_dir: RunDir) -> Path:
    return run_dir.stage_dir(r.content) / "item_embeddings.parquet"


def _input_fingerprints(r: RankerTrainConfig, run_dir: RunDir, sids: Path | None) -> dict[str, str]:
    out = prepare_fingerprints(run_dir)
    if r.content != "none":
        path = _content_path(r, run_dir)
        if not path.is_file():
            hint = "sidforge embed" if r.content == "embed" else "sidforge train align"
            raise DataError(f"{path} not found; run `{hint}` first (ranker.content={r.content})")
        out.update(fingerprint_files([path], root=run_dir.path))
    if r.mba or r.sid_features:
        assert sids is not None
        out.update(sids_fingerprints(run_dir, sids))
    return out


def _run_settings(cfg: Config, run_dir: RunDir, stage: str, config_hash: str,
                  inputs: dict[str, str]) -> RunSettings:
    return stage_run_settings(stage, run_dir.path, config_hash, inputs, max_failures=cfg.ranker.max_failures,
                              patience=cfg.ranker.patience, monitor=MONITOR)


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class Impressions:
    """Fixed evaluation impressions: each case's positive followed by its sampled negatives.

    Attributes:
        user: (M,) user of each impression (for GAUC).
        case: (M,) row into ``hist`` of each impression.
        hist: (C, max_len) left-padded histories, one per case.
        item: (M,) candidate item.
        labels: (M,) 1 for the observed item, 0 for a sampled one.
    """

    user: np.ndarray
    case: np.ndarray
    hist: np.ndarray
    item: np.ndarray
    labels: np.ndarray


@dataclass
class RankerData:
    """Training positives, fixed evaluation impressions and the frozen per-item tables.

    Attributes:
        train_hist: (N, max_len) left-padded histories (pad id = ``num_items``); train_target: (N,).
        pool: items negatives are drawn from in training (seen in training); pool_p: their probabilities.
        stats: (num_items, 1) log-scaled train frequency; content: (num_items, C) or None;
        codes: (num_items, L) SID codes or None; codebook_sizes: K per level.
        bucket: (num_items,) popularity bucket.
        sid_codes, sid_weights, sid_sizes: the SID features (``ranker.sid_features``): (num_items, L')
            codes, -1 where an ID is shorter, their weights, and the table size per level.
    """

    num_items: int
    train_hist: np.ndarray
    train_target: np.ndarray
    pool: np.ndarray
    pool_p: np.ndarray | None
    valid: Impressions
    test: Impressions
    stats: np.ndarray
    content: np.ndarray | None
    codes: np.ndarray | None
    codebook_sizes: tuple[int, ...]
    bucket: np.ndarray
    sid_codes: np.ndarray | None = None
    sid_weights: np.ndarray | None = None
    sid_sizes: tuple[int, ...] = ()


def previous_items(user: np.ndarray, item: np.ndarray, length: int, pad: int) -> np.ndarray:
    """(N, length) the ``length`` items before each row within its user, left-padded with ``pad``.

    ``user``/``item`` must be sorted by user, then by order within the user.
    """
    n = len(user)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if n else np.zeros(0, dtype=np.int64)
    first = np.repeat(starts, np.diff(np.r_[starts, n]))  # index of each row's user's first row
    idx = np.arange(n)[:, None] - length + np.arange(length)[None, :]  # (N, length)
    ok = idx >= first[:, None]
    return np.where(ok, item[np.clip(idx, 0, None)], pad) if n else np.zeros((0, length), dtype=np.int64)


def sampling_probs(counts: np.ndarray, sampler: str, power: float) -> np.ndarray | None:
    """Negative-sampling probabilities over ``counts``' items; None means uniform."""
    if sampler == "uniform":
        return None
    w = (counts.astype(np.float64) + 1.0) ** power
    return w / w.sum()


def sample_negatives(rng: np.random.Generator, positives: np.ndarray, ratio: int, pool: np.ndarray,
                     p: np.ndarray | None) -> np.ndarray:
    """(len(positives), ratio) items from ``pool`` (with probabilities ``p``), none equal to its positive."""
    neg = pool[rng.choice(len(pool), size=(len(positives), ratio), p=p)]
    clash = neg == positives[:, None]
    while clash.any():  # rare (1 / |pool| per draw): redraw just those
        neg[clash] = pool[rng.choice(len(pool), size=int(clash.sum()), p=p)]
        clash = neg == positives[:, None]
    return neg


def _impressions(user: np.ndarray, hist: np.ndarray, target: np.ndarray, ratio: int, counts: np.ndarray,
                 r: RankerTrainConfig, seed: int) -> Impressions:
    rng = np.random.default_rng(seed)
    catalogue = np.arange(len(counts))
    neg = sample_negatives(rng, target, ratio, catalogue, sampling_probs(counts, r.sampler, r.pop_power))
    items = np.concatenate([target[:, None], neg], axis=1)  # (C, 1 + ratio), positive first
    labels = np.zeros_like(items, dtype=np.float32)
    labels[:, 0] = 1.0
    cases = np.repeat(np.arange(len(target)), 1 + ratio)
    return Impressions(user=user[cases], case=cases, hist=hist, item=items.reshape(-1), labels=labels.reshape(-1))


def load_data(run_dir: RunDir, r: RankerTrainConfig, sids: Path | None,
              feature_sids: Path | None = None) -> RankerData:
    """Samples and item tables from the run directory (see the module doc); ``sids`` feed MBA,
    ``feature_sids`` the SID features."""
    prep = run_dir.stage_dir("prepare")
    stats = pq.read_table(prep / "item_stats.parquet", columns=["item_id", "train_count", "bucket"]).to_pandas()
    stats = stats.sort_values("item_id")
    num_items = len(stats)
    if not (stats["item_id"].to_numpy() == np.arange(num_items)).all():
        raise DataError(f"{prep}/item_stats.parquet must list item ids 0..n-1 once each")
    counts = stats["train_count"].to_numpy()
    inter = pq.read_table(prep / "interactions", columns=["user_id", "item_id", "position", "split"]).to_pandas()
    inter = inter[inter["split"] != "heldout"].sort_values(["user_id", "position"], kind="stable")
    split = inter["split"].to_numpy()
    pad, length = num_items, r.max_len

    def part(splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = inter[np.isin(split, splits)]
        u, it = rows["user_id"].to_numpy(), rows["item_id"].to_numpy()
        return u, it, previous_items(u, it, length, pad), rows["split"].to_numpy()

    _, t_item, t_hist, _ = part(("train",))
    has_hist = t_hist[:, -1] != pad  # the first item of a sequence has nothing before it
    cases = {}
    for name, hist_splits in (("valid", ("train", "valid")), ("test", ("train", "valid", "test"))):
        u, it, h, s = part(hist_splits)
        keep = s == name
        cases[name] = (u[keep], h[keep], it[keep])
    if not has_hist.any() or not len(cases["valid"][2]):
        raise DataError(f"{prep}: no training positives or no valid cases; check the prepare outputs")
    pool = np.flatnonzero(counts > 0)
    seeds = {"valid": EVAL_SEED, "test": EVAL_SEED + 1}
    valid, test = (_impressions(*cases[n], r.neg_ratio, counts, r, seeds[n]) for n in ("valid", "test"))
    content = _load_content(run_dir, r, num_items) if r.content != "none" else None
    codes, sizes = _load_codes(sids, num_items) if sids is not None else (None, ())
    sid_codes, sid_weights, sid_sizes = (load_sid_features(feature_sids, num_items) if feature_sids is not None
                                         else (None, None, ()))
    log_counts = np.log1p(counts.astype(np.float32))
    return RankerData(num_items=num_items, train_hist=t_hist[has_hist], train_target=t_item[has_hist], pool=pool,
                      pool_p=sampling_probs(counts[pool], r.sampler, r.pop_power), valid=valid, test=test,
                      stats=(log_counts / max(float(log_counts.max()), 1.0))[:, None], content=content, codes=codes,
                      codebook_sizes=sizes, bucket=stats["bucket"].to_numpy().astype(str), sid_codes=sid_codes,
                      sid_weights=sid_weights, sid_sizes=sid_sizes)


def _load_content(run_dir: RunDir, r: RankerTrainConfig, num_items: int) -> np.ndarray:
    from sidforge.stages.embed import ItemEmbeddings

    path = _content_path(r, run_dir)
    emb = ItemEmbeddings.from_table(pq.read_table(path))
    x, _ = emb.stacked(r.modalities, "ranker.modalities", path, rerun="re-run its stage")
    if not (emb.item_id == np.arange(num_items)).all():
        raise DataError(f"{path} must hold every item of prepare in id order; re-run its stage")
    return x


def _load_codes(sids: Path, num_items: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The semantic ``codes`` of every item (no collision digit) and the codebook size per level."""
    table = pq.read_table(sids / "sids.parquet", columns=["item_id", "codes"])
    item_id = table.column("item_id").to_numpy()
    lists = table.column("codes").to_pylist()
    if len(item_id) != num_items or not np.array_equal(np.sort(item_id), np.arange(num_items)):
        raise DataError(f"{sids}/sids.parquet must give exactly one ID to each of the {num_items} items of "
                        "prepare; re-run `sidforge tokenize` on this run")
    widths = {len(c) for c in lists}
    if len(widths) != 1:
        raise DataError(f"{sids}/sids.parquet: MBA needs fixed-length codes, got lengths {sorted(widths)}")
    codes = np.empty((num_items, widths.pop()), dtype=np.int64)
    codes[item_id] = np.asarray(lists, dtype=np.int64)
    if (codes < 0).any():
        raise DataError(f"{sids}/sids.parquet: codes must be >= 0")
    sizes = [int(codes[:, level].max()) + 1 for level in range(codes.shape[1])]
    meta = sids / "tokenizer.json"
    if meta.is_file():  # new items may use codes no current item has
        k = int(json.loads(meta.read_text()).get("codebook_size", 0))
        sizes = [max(s, k) for s in sizes]
    return codes, tuple(sizes)


def load_sid_features(sids: Path, num_items: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(codes (N, L') -1-padded, weights (N, L'), table size per level)`` from ``sids.parquet``.

    The codes are the tokenizer's ``codes`` (no collision digit), of any length; weights come from its
    ``weights`` column, 1.0 when there is none (tokenizers without a router, older tables).
    """
    path = sids / "sids.parquet"
    names = pq.read_schema(path).names
    table = pq.read_table(path, columns=["item_id", "codes", *(["weights"] if "weights" in names else [])])
    item_id = table.column("item_id").to_numpy()
    if len(item_id) != num_items or not np.array_equal(np.sort(item_id), np.arange(num_items)):
        raise DataError(f"{path} must give exactly one ID to each of the {num_items} items of prepare; re-run "
                        "`sidforge tokenize` on this run")
    lists = table.column("codes").to_pylist()
    weights = table.column("weights").to_pylist() if "weights" in names else [[1.0] * len(c) for c in lists]
    width = max(len(c) for c in lists)
    if width == 0:
        raise DataError(f"{path}: every ID is empty; SID features need codes")
    codes = np.full((num_items, width), -1, dtype=np.int64)
    w = np.zeros((num_items, width), dtype=np.float32)
    for i, c, cw in zip(item_id, lists, weights):
        if len(cw) != len(c):
            raise DataError(f"{path}: item {i} has {len(c)} codes but {len(cw)} weights")
        codes[i, : len(c)], w[i, : len(c)] = c, cw
    if (codes[codes != -1] < 0).any() or not np.isfinite(w).all() or (w < 0).any():
        raise DataError(f"{path}: codes must be >= 0 and weights finite and >= 0")
    sizes = [int(codes[:, level].max()) + 1 for level in range(width)]
    meta = sids / "tokenizer.json"
    if meta.is_file():  # new items may use codes no current item has
        info = json.loads(meta.read_text())
        for level in range(min(int(info.get("levels", 0)), width)):
            sizes[level] = max(sizes[level], int(info.get("codebook_size", 0)))
    return codes, w, tuple(sizes)


# ----------------------------------------------------------------------------------------------
# the per-worker training loop


def loop_config(cfg: Config, data: RankerData) -> dict[str, Any]:
    """What :func:`train_ranker` receives: model fields, optimiser settings and the data."""
    r = cfg.ranker
    model = RankerConfig(num_items=data.num_items, id_dim=r.id_dim, num_stats=data.stats.shape[1],
                         content_dim=0 if data.content is None else data.content.shape[1],
                         codebook_sizes=data.codebook_sizes, mba_dim=r.mba_dim, mba_hidden=r.mba_hidden,
                         mba_skip=r.mba_skip, bidirectional=r.attention == "bidirectional",
                         attn_hidden=r.attn_hidden, mlp=tuple(r.mlp), dropout=r.dropout, sid_sizes=data.sid_sizes,
                         sid_dim=r.sid_dim)
    return {"model": dataclasses.asdict(model), "lr": r.lr, "weight_decay": r.weight_decay,
            "batch_size": r.batch_size, "neg_ratio": r.neg_ratio, "epochs": r.epochs,
            "seed": cfg.seed if r.seed is None else r.seed, "data": data}


def build_model(model_config: dict[str, Any], data: RankerData) -> SaviorRanker:
    """The ranker with its frozen item tables filled from ``data``."""
    fields = dict(model_config)
    fields["codebook_sizes"], fields["mlp"] = tuple(fields["codebook_sizes"]), tuple(fields["mlp"])
    fields["sid_sizes"] = tuple(fields.get("sid_sizes", ()))
    model = SaviorRanker(RankerConfig(**fields))
    model.set_item_tables(torch.as_tensor(data.stats),
                          None if data.content is None else torch.as_tensor(data.content),
                          None if data.codes is None else torch.as_tensor(data.codes),
                          None if data.sid_codes is None else torch.as_tensor(data.sid_codes),
                          None if data.sid_weights is None else torch.as_tensor(data.sid_weights))
    return model


def train_ranker(ctx: WorkerContext, config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker loop: train, score valid, checkpoint each epoch; then score the best epoch."""
    data: RankerData = config["data"]
    torch.manual_seed(config["seed"])  # identical init on every rank
    model = build_model(config["model"], data)
    if (state := ctx.load_checkpoint()) is not None:
        model.load_state_dict(state["model"])
    step = ctx.prepare_model(model, method="loss")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"],
                            weight_decay=config["weight_decay"])
    if state is not None:
        opt.load_state_dict(state["opt"])
    for epoch in ctx.epochs(config["epochs"]):
        torch.manual_seed(config["seed"] + 7919 * epoch + ctx.rank)
        loss = _train_epoch(ctx, step, opt, data, config, epoch)
        valid = evaluate(ctx, model, data.valid, data.bucket)
        metrics = {"loss": loss, **{f"valid/{k}": valid[k] for k in ("auc", "gauc", "logloss")}}
        ctx.report(epoch, metrics, lambda: {"model": model.state_dict(), "opt": opt.state_dict()})
    in_sync = ctx.replicas_agree(model)
    best = ctx.load_best()
    if best is None:
        raise RuntimeError("ranker: no checkpoint to evaluate; ranker.epochs must be >= 1")
    model.load_state_dict(best["model"])
    return {"valid": evaluate(ctx, model, data.valid, data.bucket),
            "test": evaluate(ctx, model, data.test, data.bucket), "replicas_agree": in_sync}


def _trim(hist: np.ndarray, pad: int) -> np.ndarray:
    """Drop the leading columns that are padding in every row (histories are left-padded)."""
    real = (hist != pad).any(axis=0)
    return hist[:, int(real.argmax()):] if real.any() else hist[:, -1:]


def _train_epoch(ctx: WorkerContext, step: torch.nn.Module, opt: torch.optim.Optimizer, data: RankerData,
                 config: dict[str, Any], epoch: int) -> float:
    """One pass over this rank's positives, fresh negatives each; returns the mean loss (this rank's)."""
    step.train()
    ratio = config["neg_ratio"]
    per_batch = max(1, config["batch_size"] // (1 + ratio))  # positives per step
    order = ctx.shard(len(data.train_target), seed=config["seed"] + epoch)
    rng = np.random.default_rng([config["seed"], epoch, ctx.rank])
    total, n = 0.0, 0
    # batches of similar history length: most Beauty histories are far shorter than max_len
    for rows in length_buckets(order, data.train_hist, data.num_items, per_batch, seed=config["seed"] + epoch):
        pos = data.train_target[rows]
        items = np.concatenate([pos[:, None], sample_negatives(rng, pos, ratio, data.pool, data.pool_p)], axis=1)
        labels = np.zeros(items.shape, dtype=np.float32)
        labels[:, 0] = 1.0
        hist = _trim(np.repeat(data.train_hist[rows], 1 + ratio, axis=0), data.num_items)
        out = step(torch.as_tensor(hist, device=ctx.device), torch.as_tensor(items.reshape(-1), device=ctx.device),
                   torch.as_tensor(labels.reshape(-1), device=ctx.device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        total, n = total + float(out.loss.detach()), n + 1
    return total / max(n, 1)


def predict(model: SaviorRanker, imp: Impressions, rows: np.ndarray, device: torch.device,
            chunk_size: int = 8192) -> np.ndarray:
    """pCTR of the impressions ``rows`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    out = np.empty(len(rows), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(rows), chunk_size):
            part = rows[start : start + chunk_size]
            hist = _trim(imp.hist[imp.case[part]], model.config.pad_id)
            logits = model(torch.as_tensor(hist, device=device), torch.as_tensor(imp.item[part], device=device)).logits
            out[start : start + len(part)] = torch.sigmoid(logits).float().cpu().numpy()
    model.train(was_training)
    return out


def evaluate(ctx: WorkerContext, model: SaviorRanker, imp: Impressions, bucket: np.ndarray) -> dict[str, float]:
    """AUC / GAUC / LogLoss overall and per candidate bucket; impressions split across ranks and gathered."""
    mine = ctx.shard(len(imp.labels), even=False)
    gathered = ctx.all_gather((mine, predict(model, imp, mine, ctx.device)))
    probs = np.empty(len(imp.labels), dtype=np.float32)
    for idx, p in gathered:
        probs[idx] = p
    return ranking_metrics(imp.user, imp.labels, probs, groups=bucket[imp.item])


# ----------------------------------------------------------------------------------------------
# outputs


def _write_outputs(out: Path, result: FitResult, model_config: dict[str, Any], sids: Path | None,
                   run_dir: RunDir, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model of the best epoch and the metrics; returns the manifest metrics."""
    if result.best_checkpoint is None:
        raise RuntimeError(f"ranker: the best checkpoint (epoch {result.best_epoch}) is missing under {result.path}")
    if not result.value["replicas_agree"]:
        raise RuntimeError("ranker: the workers' model replicas diverged; gradients were not synchronised")
    state = load_state(result.best_checkpoint)["model"]
    sids_ref = None if sids is None else (str(sids.relative_to(run_dir.path)) if sids.is_relative_to(run_dir.path)
                                          else str(sids))
    torch.save({"format": MODEL_FORMAT, "config": model_config, "sids": sids_ref, "state_dict": state},
               out / "model.pt")
    mba = {k: float(v.abs().mean()) for k, v in state.items() if k.startswith("mba.codebooks.")}
    metrics = {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
               "stopped_early": result.stopped_early, "valid": result.value["valid"], "test": result.value["test"],
               "mba_codebook_mean_abs": mba, **(extra or {})}
    (out / "metrics.json").write_text(json.dumps({**metrics, "history": result.history}, indent=2))
    return metrics
