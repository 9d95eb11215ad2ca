"""The generative retrieval stage: train TIGER over a tokenizer's semantic IDs, evaluate by beam search.

Reads ``RUN/prepare/`` (interactions, item_stats) and a tokenizer's ``sids.parquet`` (``--sids
RUN/tokenize-<name>``; any tokenizer, fixed- or variable-length IDs), and writes
``RUN/generative-<name>/``:

- ``model.safetensors`` + ``model.json``: the weights of the best epoch (by valid NDCG@10 on the
  subsample), the :class:`~sidforge.models.generative.TIGERConfig`, the IDs' folder and version, and
  the beam settings (what ``sidforge evaluate --model`` needs; no pickle);
- ``metrics.json``: best epoch, per-epoch history, and valid and test Recall/NDCG@K (K in 5, 10, 20, 50
  up to ``generative.top_k``), overall and per popularity bucket (head/torso/tail/cold) of the target.

Protocol (leave-one-out, the shared harness :func:`sidforge.platform.metrics.metrics_from_ranks`):

- **Training examples**: every item of a user's ``train`` part after the first is a target, with the
  up to ``max_history`` train items before it as history (all prefixes, sliding window; TIGER's
  form). ``heldout`` interactions of cold items never enter a history or a target.
- **Valid / test**: the leave-one-out arrays of :func:`sidforge.stages.sasrec.build_sequences`
  (valid: the train prefix; test: train + valid), cut to the most recent ``max_history`` items.
- **Ranking**: constrained beam search (``beam_size`` live prefixes) returns each user's ``top_k``
  items; the target's rank is its position in that list, and a target not in the list gets rank
  ``top_k``, beyond every reported cut-off (so it counts as a miss at every K). Cut-offs above
  ``top_k`` are not reported.
- **Cold items**: the tokenizer covers the whole catalogue (``tokenize`` embeds every item of
  ``prepare/items.parquet``, cold ones included), so items held out of training have IDs, sit in the
  trie and can be generated; the ``cold`` bucket (items absent from training) measures how often
  they are. The stage requires an ID for every item and says so when one is missing.
- **Early stopping** uses valid NDCG@10 on a fixed random subsample of ``eval_users`` valid users
  (beam search is the costly part); the best epoch is then scored on every valid and test user.

Checkpoints live in ``RUN/_train/generative-<name>-<config hash>-<inputs hash>/`` while training, so
an interrupted stage resumes; they are deleted once the outputs are written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sidforge.models.generative import TIGER, ItemTrie, TIGERConfig, beam_search, code_tokens, sid_tokens
from sidforge.platform.artifacts import (
    RunDir,
    StageResult,
    prepare_fingerprints,
    sids_fingerprints,
)
from sidforge.platform.config import Config
from sidforge.platform.metrics import DEFAULT_KS, metrics_from_ranks
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
from sidforge.stages.sasrec import build_sequences

log = logging.getLogger(__name__)

MONITOR = "valid/ndcg@10"
MODEL_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# entry point


def stage_name(sids: str | Path) -> str:
    """``generative-<name>`` for the IDs in ``RUN/tokenize-<name>`` (any other folder: its own name)."""
    name = Path(sids).resolve().name
    return f"generative-{name.removeprefix('tokenize-')}"


def run(cfg: Config, run_dir: RunDir, sids: str | Path, force: bool = False) -> StageResult:
    """Train TIGER on ``RUN/prepare`` over the IDs in ``sids`` (or skip when nothing changed)."""
    t0 = time.perf_counter()
    sids = Path(sids).expanduser().resolve()
    stage = stage_name(sids)
    config_hash = stage_config_hash(cfg)
    inputs = _input_fingerprints(run_dir, sids)
    if not force and (cached := run_dir.cached(stage, config_hash, inputs)) is not None:
        return cached
    g = cfg.generative
    data = load_data(run_dir.stage_dir("prepare"), sids, g.max_history)
    train_run = _run_settings(cfg, run_dir, stage, config_hash, inputs)
    config = loop_config(cfg, data)
    result = fit(train_generative, config, ScalingSettings(g.num_workers, cpus_per_worker=g.cpus_per_worker),
                 train_run, fresh=force)
    meta = {"format": MODEL_FORMAT, "config": config["model"], "sids": _relative(sids, run_dir.path),
            "sids_version": data.version, "beam_size": g.beam_size, "top_k": g.top_k,
            "eval_batch_size": g.eval_batch_size}
    with run_dir.writing(stage) as out:
        metrics = _write_outputs(out, result, meta)
    remove_run(train_run)
    rows = {"items": data.num_items, "train_examples": len(data.train_target),
            "valid_cases": len(data.valid_target), "test_cases": len(data.test_target)}
    result = run_dir.finish(stage, config_hash, inputs, rows, metrics, t0)
    log.info("%s: wrote %s in %.1f s (test recall@10 %.4f)", stage, result.out_dir, result.wall_time_s,
             metrics["test"].get("recall@10", 0.0))
    return result


_OPERATIONAL = ("cpus_per_worker", "max_failures", "eval_batch_size")  # how a run executes, not what it computes


def stage_config_hash(cfg: Config) -> str:
    """Hash of what the outputs depend on: the ``generative`` section (minus operational keys) and the seed."""
    section = {k: v for k, v in dataclasses.asdict(cfg.generative).items() if k not in _OPERATIONAL}
    if section["lr_schedule"] == "constant":  # the schedule's keys only count when it is not constant:
        del section["lr_schedule"], section["warmup_steps"]  # runs from before it existed keep their hash
    payload = json.dumps({"generative": section, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _input_fingerprints(run_dir: RunDir, sids: Path) -> dict[str, str]:
    return {**prepare_fingerprints(run_dir), **sids_fingerprints(run_dir, sids)}


def _run_settings(cfg: Config, run_dir: RunDir, stage: str, config_hash: str,
                  inputs: dict[str, str]) -> RunSettings:
    return stage_run_settings(stage, run_dir.path, config_hash, inputs, max_failures=cfg.generative.max_failures,
                              patience=cfg.generative.patience, monitor=MONITOR)


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class GenerativeData:
    """Item IDs and the training / leave-one-out arrays, as item ids (pad id = ``num_items``).

    Attributes:
        codes: (num_items, L) int64 ID of each item (row = item id), -1-padded for shorter IDs.
        level_sizes: codes per level, the model's vocabulary.
        version: the IDs' ``version`` (tokenizer name and config hash).
        train_hist, valid_hist, test_hist: (M, max_history) histories, left-padded.
        train_target, valid_target, test_target: (M,) next items.
        train_user, valid_user, test_user: (M,) user ids (for the user-hash token).
        bucket: (num_items,) popularity bucket of each item.
    """

    num_items: int
    codes: np.ndarray
    level_sizes: tuple[int, ...]
    version: str
    train_hist: np.ndarray
    train_target: np.ndarray
    train_user: np.ndarray
    valid_hist: np.ndarray
    valid_target: np.ndarray
    valid_user: np.ndarray
    test_hist: np.ndarray
    test_target: np.ndarray
    test_user: np.ndarray
    bucket: np.ndarray


def load_sid_codes(sids: Path, num_items: int) -> tuple[np.ndarray, tuple[int, ...], str]:
    """The ``sid`` of every item as a -1-padded (num_items, L) array, the level sizes and the version.

    Level sizes are the largest code + 1 per level, widened to the tokenizer's ``codebook_size`` on its
    code levels when ``tokenizer.json`` says so (new items may use codes no current item has).
    """
    table = pq.read_table(sids / "sids.parquet", columns=["item_id", "sid", "version"])
    item_id = table.column("item_id").to_numpy()
    ids = table.column("sid").to_pylist()
    missing = np.setdiff1d(np.arange(num_items), item_id)
    if len(missing) or len(item_id) != num_items or item_id.max(initial=-1) >= num_items:
        raise DataError(f"{sids}/sids.parquet must give exactly one ID to each of the {num_items} items of "
                        f"prepare (missing e.g. {missing[:5].tolist()}); re-run `sidforge tokenize` on this run")
    width = max(len(s) for s in ids)
    codes = np.full((num_items, width), -1, dtype=np.int64)
    for i, s in zip(item_id, ids):
        codes[i, : len(s)] = s
    if (codes[:, 0] < 0).any() or (codes < -1).any():
        raise DataError(f"{sids}/sids.parquet: every ID needs at least one code and codes must be >= 0")
    sizes = [int(codes[:, level].max()) + 1 for level in range(width)]
    meta_path = sids / "tokenizer.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        for level in range(min(int(meta.get("levels", 0)), width)):
            sizes[level] = max(sizes[level], int(meta.get("codebook_size", 0)))
    version = str(table.column("version")[0].as_py()) if len(table) else ""
    return codes, tuple(sizes), version


def train_examples(user: np.ndarray, item: np.ndarray, max_history: int, pad: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every next-item example of the training sequences, with a sliding window of history.

    Args:
        user, item: (n,) train interactions sorted by user, then by order within the user.
        max_history: history length H (the most recent items before the target).
        pad: the padding item id.

    Returns:
        ``(history (M, H) left-padded, target (M,), user (M,))`` for every interaction that has at
        least one earlier train item of the same user.
    """
    n = len(item)
    items = np.concatenate([np.full(max_history, pad, dtype=np.int64), item])
    users = np.concatenate([np.full(max_history, -1, dtype=np.int64), user])
    windows = np.lib.stride_tricks.sliding_window_view(items, max_history)[:n]  # row i: items i-H .. i-1
    same = np.lib.stride_tricks.sliding_window_view(users, max_history)[:n] == user[:, None]
    hist = np.where(same, windows, pad)
    has = hist[:, -1] != pad
    return hist[has], item[has], user[has]


def build_data(interactions: pa.Table, bucket: np.ndarray, codes: np.ndarray, level_sizes: tuple[int, ...],
               version: str, max_history: int) -> GenerativeData:
    """Training examples and the leave-one-out arrays (see the module doc for the protocol)."""
    num_items = len(bucket)
    seq = build_sequences(interactions, bucket, max_history)
    df = interactions.select(["user_id", "item_id", "position", "split"]).to_pandas()
    df = df.sort_values(["user_id", "position"], kind="stable")  # the order build_sequences uses
    split = df["split"].to_numpy()
    train = df[split == "train"]
    hist, target, user = train_examples(train["user_id"].to_numpy(), train["item_id"].to_numpy(), max_history,
                                        num_items)

    def users_of(name: str, expected: np.ndarray) -> np.ndarray:
        rows = df[split == name]
        if not np.array_equal(rows["item_id"].to_numpy(), expected):
            raise DataError(f"{name} cases are not one per user in user order; re-run `sidforge prepare`")
        return rows["user_id"].to_numpy()

    return GenerativeData(num_items, codes, level_sizes, version, hist, target, user, seq.valid_hist,
                          seq.valid_target, users_of("valid", seq.valid_target), seq.test_hist, seq.test_target,
                          users_of("test", seq.test_target), seq.bucket)


def load_data(prepare_dir: Path, sids: Path, max_history: int) -> GenerativeData:
    """:func:`build_data` over ``RUN/prepare`` and a ``sids.parquet`` folder."""
    inter = pq.read_table(prepare_dir / "interactions", columns=["user_id", "item_id", "position", "split"])
    stats = pq.read_table(prepare_dir / "item_stats.parquet", columns=["item_id", "bucket"]).to_pandas()
    if not (stats["item_id"].sort_values().to_numpy() == np.arange(len(stats))).all():
        raise DataError(f"{prepare_dir}/item_stats.parquet must list item ids 0..n-1 once each")
    bucket = stats.sort_values("item_id")["bucket"].to_numpy()
    codes, level_sizes, version = load_sid_codes(sids, len(bucket))
    data = build_data(inter, bucket, codes, level_sizes, version, max_history)
    if len(data.train_target) == 0 or len(data.valid_target) == 0:
        raise DataError(f"{prepare_dir}: no training examples or no valid cases; check the prepare outputs")
    return data


def user_buckets(user: np.ndarray, buckets: int) -> np.ndarray:
    """Hash user ids into ``buckets`` user tokens (Knuth's multiplicative hash: neighbours spread out)."""
    return (user.astype(np.int64) * 2654435761 % 2**32) % buckets


# ----------------------------------------------------------------------------------------------
# batches and beam-search ranking (shared by training, the stage's evaluation and `sidforge evaluate`)


@dataclass(frozen=True)
class Tables:
    """Item id → tokens lookups on one device.

    Attributes:
        history: (num_items + 1, L) code tokens per item id; the pad id's row is all padding.
        target: (num_items, L + 1) decoder targets (ID + EOS).
        user_tokens: user-hash buckets of the model (0 = none).
    """

    history: torch.Tensor
    target: torch.Tensor
    user_tokens: int

    @classmethod
    def build(cls, codes: np.ndarray, config: TIGERConfig, device: torch.device) -> Tables:
        c = torch.from_numpy(codes)
        hist = code_tokens(c, config.level_sizes)
        hist = torch.cat([hist, torch.zeros_like(hist[:1])])  # the pad id's row
        return cls(hist.to(device), sid_tokens(c, config.level_sizes).to(device), config.user_tokens)

    def inputs(self, hist: np.ndarray, user: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token histories (leading all-pad items dropped) and user buckets for a batch."""
        pad = len(self.history) - 1
        real = (hist != pad).any(axis=0)
        first = int(real.argmax()) if real.any() else hist.shape[1] - 1
        h = self.history[torch.from_numpy(np.ascontiguousarray(hist[:, first:])).to(self.history.device)]
        u = None
        if self.user_tokens:
            u = torch.from_numpy(user_buckets(user, self.user_tokens)).to(self.history.device)
        return h, u  # (B, H', L), (B,)


@dataclass(frozen=True)
class BeamSettings:
    """How rankings are produced: beam width, list length, users per batch."""

    beam_size: int
    top_k: int
    batch_size: int

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(k for k in DEFAULT_KS if k <= self.top_k)


def beam_ranks(model: TIGER, trie: ItemTrie, tables: Tables, hist: np.ndarray, target: np.ndarray,
               user: np.ndarray, beam: BeamSettings) -> np.ndarray:
    """0-based rank of each target in its user's beam-search list; ``top_k`` when it is not in the list."""
    ranks = np.empty(len(target), dtype=np.int64)
    pad = len(tables.history) - 1
    order = np.argsort((hist != pad).sum(axis=1), kind="stable")  # similar lengths batch together
    device = tables.history.device
    for lo in range(0, len(order), beam.batch_size):
        rows = order[lo : lo + beam.batch_size]
        h, u = tables.inputs(hist[rows], user[rows])
        items, _ = beam_search(model, h, trie, beam.beam_size, beam.top_k, u)  # (b, top_k)
        hit = items == torch.from_numpy(target[rows]).to(device)[:, None]
        ranks[rows] = torch.where(hit.any(1), hit.float().argmax(1), beam.top_k).cpu().numpy()
    return ranks


def evaluate(ctx: WorkerContext, model: TIGER, trie: ItemTrie, tables: Tables, hist: np.ndarray,
             target: np.ndarray, user: np.ndarray, beam: BeamSettings, groups: np.ndarray | None = None
             ) -> dict[str, float]:
    """Recall/NDCG@K by beam search; cases are split across ranks and their ranks gathered."""
    mine = ctx.shard(len(target), even=False)
    ranks = beam_ranks(model, trie, tables, hist[mine], target[mine], user[mine], beam)
    all_ranks = np.empty(len(target), dtype=np.int64)
    for idx, r in ctx.all_gather((mine, ranks)):
        all_ranks[idx] = r
    return metrics_from_ranks(all_ranks, beam.ks, groups=groups)


def _length_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int,
                    window: int = 32) -> list[np.ndarray]:
    """Batches of similar-length histories (sorted within windows of ``window`` batches), shuffled."""
    batches = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    np.random.default_rng(seed).shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------------
# the per-worker training loop


def loop_config(cfg: Config, data: GenerativeData) -> dict[str, Any]:
    """What :func:`train_generative` receives: model fields, optimiser and beam settings, and the data."""
    g = cfg.generative
    model = TIGERConfig(level_sizes=data.level_sizes, max_history=g.max_history, user_tokens=g.user_tokens,
                        d_model=g.d_model, num_layers=g.layers, num_heads=g.heads, head_dim=g.head_dim,
                        ffn_hidden=g.ffn, dropout=g.dropout)
    seed = cfg.seed if g.seed is None else g.seed
    n_valid = len(data.valid_target)
    sample = np.arange(n_valid)
    if 0 < g.eval_users < n_valid:
        sample = np.sort(np.random.default_rng(seed).choice(n_valid, g.eval_users, replace=False))
    return {"model": dataclasses.asdict(model), "lr": g.lr, "weight_decay": g.weight_decay,
            "lr_schedule": g.lr_schedule, "warmup_steps": g.warmup_steps, "batch_size": g.batch_size, "epochs": g.epochs, "seed": seed, "valid_sample": sample,
            "beam": BeamSettings(g.beam_size, g.top_k, g.eval_batch_size), "data": data}


def train_generative(ctx: WorkerContext, config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker loop: train, beam-search the valid subsample, checkpoint each epoch; score the best."""
    data: GenerativeData = config["data"]
    beam: BeamSettings = config["beam"]
    torch.manual_seed(config["seed"])  # identical init on every rank
    model = TIGER(TIGERConfig(**config["model"]))
    if (state := ctx.load_checkpoint()) is not None:
        model.load_state_dict(state["model"])
    step = ctx.prepare_model(model, method="loss")
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    if state is not None:
        opt.load_state_dict(state["opt"])
    tables = Tables.build(data.codes, model.config, ctx.device)
    trie = ItemTrie(torch.from_numpy(data.codes), model.config.level_sizes).to(ctx.device)
    vs = config["valid_sample"]
    for epoch in ctx.epochs(config["epochs"]):
        torch.manual_seed(config["seed"] + 7919 * epoch + ctx.rank)  # dropout: resumable, per rank
        loss = train_epoch(ctx, step, opt, tables, data, config, epoch)
        valid = evaluate(ctx, model, trie, tables, data.valid_hist[vs], data.valid_target[vs],
                         data.valid_user[vs], beam)
        metrics = {"loss": loss, **{f"valid/{k}": v for k, v in valid.items() if k in ("recall@10", "ndcg@10")}}
        ctx.report(epoch, metrics, lambda: {"model": model.state_dict(), "opt": opt.state_dict()})
    in_sync = ctx.replicas_agree(model)  # before loading the best epoch, which every rank would share
    best = ctx.load_best()
    if best is None:
        raise RuntimeError("generative: no checkpoint to evaluate; generative.epochs must be >= 1")
    model.load_state_dict(best["model"])
    b = data.bucket
    return {
        "valid": evaluate(ctx, model, trie, tables, data.valid_hist, data.valid_target, data.valid_user, beam,
                          b[data.valid_target]),
        "test": evaluate(ctx, model, trie, tables, data.test_hist, data.test_target, data.test_user, beam,
                         b[data.test_target]),
        "replicas_agree": in_sync,
    }


def learning_rate(base: float, schedule: str, warmup_steps: int, step: int) -> float:
    """The learning rate at optimiser step ``step`` (1-based): ``constant``, or TIGER's ``inverse_sqrt``
    (``base`` for ``warmup_steps`` steps, then ``base * sqrt(warmup_steps / step)``)."""
    if schedule not in ("constant", "inverse_sqrt"):
        raise ValueError(f"unknown lr schedule {schedule!r}; use constant or inverse_sqrt")
    if schedule == "constant" or step <= warmup_steps:
        return base
    return base * math.sqrt(warmup_steps / step)


def train_epoch(ctx: WorkerContext, step: torch.nn.Module, opt: torch.optim.Optimizer, tables: Tables,
                 data: GenerativeData, config: dict[str, Any], epoch: int) -> float:
    """One pass over this rank's shard of the examples; returns the mean training loss (this rank's)."""
    step.train()
    order = ctx.shard(len(data.train_target), seed=config["seed"] + epoch)
    lengths = (data.train_hist != data.num_items).sum(axis=1)
    total, n = 0.0, 0
    batches = _length_batches(order, lengths, config["batch_size"], seed=config["seed"] + epoch)
    for i, rows in enumerate(batches):
        # the optimiser step from the epoch and batch index: a resumed run picks the schedule up exactly
        for group in opt.param_groups:
            group["lr"] = learning_rate(config["lr"], config["lr_schedule"], config["warmup_steps"],
                                        epoch * len(batches) + i + 1)
        hist, user = tables.inputs(data.train_hist[rows], data.train_user[rows])
        target = tables.target[torch.from_numpy(data.train_target[rows]).to(tables.target.device)]
        out = step(hist, target, user)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(step.parameters(), 1.0)
        opt.step()
        total, n = total + float(out.loss.detach()), n + 1
    return total / max(n, 1)


# ----------------------------------------------------------------------------------------------
# outputs and re-evaluation


def _write_outputs(out: Path, result: FitResult, meta: dict[str, Any]) -> dict[str, Any]:
    """Model of the best epoch and the metrics; returns the manifest metrics."""
    from safetensors.torch import save_file

    if result.best_checkpoint is None:
        raise RuntimeError(f"generative: the best checkpoint (epoch {result.best_epoch}) is missing under "
                           f"{result.path}")
    if not result.value["replicas_agree"]:
        raise RuntimeError("generative: the workers' model replicas diverged; gradients were not synchronised")
    state = load_state(result.best_checkpoint)["model"]
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    metrics = {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
               "stopped_early": result.stopped_early, "beam_size": meta["beam_size"], "top_k": meta["top_k"],
               "valid": result.value["valid"], "test": result.value["test"]}
    (out / "metrics.json").write_text(json.dumps({**metrics, "history": result.history}, indent=2))
    return metrics


def load_model(model_dir: str | Path) -> tuple[TIGER, dict[str, Any]]:
    """The trained model (eval mode, CPU) and its ``model.json`` from ``RUN/generative-<name>``."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta_path = model_dir / "model.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found; train one with `sidforge train generative --sids ...`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise DataError(f"{meta_path}: model format {meta.get('format')} is not {MODEL_FORMAT}; re-train")
    model = TIGER(TIGERConfig(**meta["config"]))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.eval(), meta


def evaluate_saved(model_dir: str | Path, beam_size: int | None = None, top_k: int | None = None,
                   batch_size: int | None = None) -> dict[str, float]:
    """Re-score a trained model on the test split of its run (``RUN/generative-<name>``), in this process.

    Args:
        model_dir: the stage folder; its parent is the run directory (``prepare`` and the IDs).
        beam_size, top_k, batch_size: override the beam settings it was evaluated with.

    Returns:
        Test Recall/NDCG@K overall and per popularity bucket, as in ``metrics.json``.
    """
    model_dir = Path(model_dir).expanduser().resolve()
    model, meta = load_model(model_dir)
    run_path = model_dir.parent
    sids = Path(meta["sids"]) if Path(meta["sids"]).is_absolute() else run_path / meta["sids"]
    data = load_data(run_path / "prepare", sids, model.config.max_history)
    if data.level_sizes != model.config.level_sizes or data.version != meta["sids_version"]:
        raise DataError(f"{sids}: the IDs changed since {model_dir} was trained (version {data.version!r}, "
                        f"trained on {meta['sids_version']!r}); re-train")
    beam = BeamSettings(beam_size or meta["beam_size"], top_k or meta["top_k"],
                        batch_size or meta["eval_batch_size"])
    device = torch.device("cpu")
    tables = Tables.build(data.codes, model.config, device)
    trie = ItemTrie(torch.from_numpy(data.codes), model.config.level_sizes)
    ranks = beam_ranks(model, trie, tables, data.test_hist, data.test_target, data.test_user, beam)
    return metrics_from_ranks(ranks, beam.ks, groups=data.bucket[data.test_target])
