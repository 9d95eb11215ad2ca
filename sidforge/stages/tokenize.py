"""The tokenize stage: item embeddings → semantic IDs, with collision handling and a quality report.

Reads the item embeddings (``RUN/embed/item_embeddings.parquet``, the modalities in
``tokenize.modalities`` concatenated; or the SASRec behavior embeddings) and writes
``RUN/tokenize-<name>/``:

- ``sids.parquet``: item_id, ``codes`` (list<int32>, L codes after collision handling), ``digit``
  (the disambiguation digit, 0 when the codes alone are unique), ``sid`` (the unique ID downstream
  models use: ``codes + [digit]`` with ``collision=digit``, ``codes`` with ``reassign``), ``version``
  (tokenizer name and config hash) and ``weights`` (list<float32>, one per code: ADA-SID's code weights,
  1.0 for every other tokenizer; an older table without the column means 1.0);
- ``tokenizer.json`` + ``tokenizer.safetensors``: what :func:`load_tokenizer` needs to assign IDs to
  new items (no pickle);
- ``quality.json`` and ``code_usage.png``: the quality report (see
  :func:`sidforge.models.semantic_ids.quality`), also printed by ``sidforge tokenize``.

Methods (``tokenize.method``), resolved once through :data:`FITTERS`:

- ``rqkmeans``: residual k-means with faiss, optionally size-balanced;
- ``rqvae``: TIGER's RQ-VAE trained with the shared Ray Train runner (in-process with
  ``tokenize.rqvae.num_workers=0``); codebooks initialised by residual k-means, dead codes re-used;
- ``bbq``: BBQRec's behavior-bind quantizer (:mod:`sidforge.models.bbq`) over the embed modalities,
  trained on the same runner against the SASRec behavior embeddings (``RUN/sasrec/item_embeddings.parquet``,
  ``tokenize.bbq.behavior``). Its IDs for new items (``assign``) come from content alone. Its report adds
  ``recon_rel_full`` (reconstruction from the codes plus each item's specific parts and slot; ``recon_rel``
  decodes from the codes alone, specific parts at their catalogue mean, comparable with the other
  tokenizers), ``behavior_coherence`` per level (see :func:`sidforge.models.semantic_ids.behavior_coherence`)
  and the first/last epoch's contrastive loss and CLUB estimate;
- ``ada-sid``: ADA-SID's mixture of quantization (:mod:`sidforge.models.ada_sid`) over the embed modalities
  and the SASRec e_b (``tokenize.ada_sid.behavior``), on the same runner. Its IDs have **variable length**:
  shared codes, modality-specific codes and the behavioral codes the router did not drop, in expert order.
  A code is stored as ``expert * K + code`` (so a token names its expert wherever it stands; the expert
  names are in ``tokenizer.json``), the collision digit follows the last kept code. N_norm comes from the
  e_b norm (or the log train count, ``tokenize.ada_sid.richness``), min-max normalised over the items
  seen in training; items never seen in training (cold) count as having no behavior. The report adds
  ``recon_rel_behavior``, ``avg_code_length``/``avg_sid_length``, the share of dropped behavioral IDs, the
  alignment strength w and the behavioral codes per item by popularity bucket, each behavioral expert's
  load, and ``valid/recon_rel`` on the held-out items. ``assign`` of a new item uses content only
  (behavioral codes dropped; see the model's doc), or content and e_b when given;
- ``precomputed``: an external item → codes table (LETTER's published Beauty IDs); it cannot assign
  IDs to new items.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sidforge.models.ada_sid import ADASID, ADASIDConfig
from sidforge.models.bbq import BBQ, BBQConfig
from sidforge.models.quantizers import RQVAE, ResidualQuantizer, RQVAEConfig, pca_projection, residual_kmeans
from sidforge.models.semantic_ids import (
    Resolved,
    behavior_coherence,
    quality,
    resolve_collisions,
    variable_length,
)
from sidforge.platform.artifacts import (
    RunDir,
    StageResult,
    fingerprint_files,
)
from sidforge.platform.config import Config, TokenizeConfig
from sidforge.platform.schemas import DataError
from sidforge.platform.training import (
    RunSettings,
    ScalingSettings,
    WorkerContext,
    fit,
    remove_run,
    run_name,
)

log = logging.getLogger(__name__)

SIDS = pa.schema([("item_id", pa.int64()), ("codes", pa.list_(pa.int32())), ("digit", pa.int32()),
                  ("sid", pa.list_(pa.int32())), ("version", pa.string()), ("weights", pa.list_(pa.float32()))])
TOKENIZER_FORMAT = 1
PROJECTION_KEYS = ("pca_mean", "pca_project", "pca_unproject")


# ----------------------------------------------------------------------------------------------
# the tokenizer artifact


@dataclass
class Tokenizer:
    """A fitted tokenizer: assigns codes to embeddings and reconstructs embeddings from codes.

    Attributes:
        method: ``rqkmeans``, ``rqvae``, ``bbq``, ``ada-sid`` or ``precomputed``.
        input_dim: width of the embeddings it takes (0 for precomputed; bbq, ada-sid: the modalities
            concatenated).
        levels, codebook_size: L and K (ada-sid: L = the number of experts, the longest ID).
        codebooks: rqkmeans: (L, K, D) float32 (D = the projection's width when there is one).
        projection: rqkmeans with ``tokenize.pca_dim``: ``(mean (input_dim,), project (input_dim, D),
            unproject (D, input_dim))`` — the codebooks live in that principal subspace.
        model: rqvae: the trained :class:`RQVAE`; bbq: the trained :class:`BBQ`; ada-sid: the trained
            :class:`ADASID` (eval mode).
    """

    method: str
    input_dim: int
    levels: int
    codebook_size: int
    codebooks: np.ndarray | None = None
    model: RQVAE | BBQ | ADASID | None = None
    projection: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def assign(self, embeddings: np.ndarray, behavior: np.ndarray | None = None,
               richness: np.ndarray | None = None) -> np.ndarray:
        """Codes of new items, deterministically: (N, input_dim) float → (N, L) int64.

        Args:
            embeddings: (N, input_dim) content embeddings.
            behavior: ada-sid only: (N, H) e_b of items that have one; None drops the behavioral codes.
            richness: ada-sid only: (N,) N_norm in [0, 1]; default: from the e_b norm with the fitted
                range (``richness=norm`` tokenizers only).

        Returns:
            (N, L) codes; ada-sid: -1 where a code is dropped (see :meth:`assign_weighted`).

        Raises:
            ValueError: the tokenizer cannot assign (precomputed), the embeddings have the wrong shape,
                or contain NaN/inf; behavior given to a tokenizer that does not use it.
        """
        return self.assign_weighted(embeddings, behavior, richness)[0]

    def assign_weighted(self, embeddings: np.ndarray, behavior: np.ndarray | None = None,
                        richness: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`assign` plus each code's weight: ``((N, L) int64, (N, L) float32)``; 1.0 without a router."""
        x = self._check(embeddings)
        if self.method != "ada-sid":
            if behavior is not None or richness is not None:
                raise ValueError(f"a {self.method} tokenizer assigns IDs from content only; drop behavior/richness")
            if self.codebooks is not None:
                codes = _residual_codes(self.project(x), self.codebooks)
            else:
                assert self.model is not None
                with torch.no_grad():
                    codes = self.model.encode(torch.from_numpy(x)).numpy().astype(np.int64)
            return codes, np.ones(codes.shape, dtype=np.float32)
        assert isinstance(self.model, ADASID)
        b = r = None
        if behavior is not None:
            b = np.asarray(behavior, dtype=np.float32)
            if b.shape != (len(x), self.model.config.behavior_dim) or not np.isfinite(b).all():
                raise ValueError(f"behavior must be finite with shape ({len(x)}, {self.model.config.behavior_dim})")
            if richness is None:
                if self.model.config.richness_source != "norm":
                    raise ValueError("this tokenizer's N_norm comes from train counts; pass richness (N_norm in [0, 1])")
                low, high = self.model.config.richness_range
                richness = np.clip((np.linalg.norm(b, axis=1) - low) / max(high - low, 1e-12), 0.0, 1.0)
            r = torch.as_tensor(np.asarray(richness, dtype=np.float32))
            b = torch.from_numpy(b)
        with torch.no_grad():
            codes, weights = self.model.encode(torch.from_numpy(x), b, r)
        return codes.numpy().astype(np.int64), weights.numpy().astype(np.float32)

    def reconstruct(self, codes: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Embeddings decoded from codes: (N, L) → (N, input_dim) (ada-sid: with the code weights,
        default 1 for every kept code)."""
        codes = np.asarray(codes, dtype=np.int64)
        if self.codebooks is not None:
            z = self.codebooks[np.arange(self.levels), codes].sum(axis=1)
            if self.projection is None:
                return z
            mean, _, unproject = self.projection
            return z @ unproject + mean
        if self.model is None:
            raise ValueError("a precomputed tokenizer has no codebooks to reconstruct from")
        if isinstance(self.model, ADASID):
            w = (codes >= 0).astype(np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
            return self.model.decode_codes(torch.from_numpy(codes), torch.from_numpy(w))[0].numpy()
        return self.model.reconstruct(torch.from_numpy(codes)).numpy()

    def last_distances(self, embeddings: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """(N, K) squared distance of each item's last-level residual to every last-level code."""
        x = self._check(embeddings)
        if isinstance(self.model, ADASID):
            raise ValueError("ada-sid IDs have no common last level (variable length); use tokenize.collision=digit")
        if self.codebooks is not None:
            books, z = self.codebooks, self.project(x)
        elif self.model is not None:
            with torch.no_grad():
                z = self.model.latent(torch.from_numpy(x)).numpy()
            books = self.model.quantizer.codebooks.detach().numpy()
        else:
            raise ValueError("a precomputed tokenizer has no codebooks")
        residual = z - books[np.arange(self.levels - 1), codes[:, :-1]].sum(axis=1)  # what the last level sees
        last = books[-1]
        return ((residual**2).sum(1, keepdims=True) - 2.0 * residual @ last.T + (last**2).sum(1)[None]).clip(0.0)

    def project(self, x: np.ndarray) -> np.ndarray:
        """The space the codebooks live in: ``x`` itself, or its PCA projection (rqkmeans with ``pca_dim``)."""
        if self.projection is None:
            return x
        mean, project, _ = self.projection
        return np.ascontiguousarray((x - mean) @ project, dtype=np.float32)

    def _check(self, embeddings: np.ndarray) -> np.ndarray:
        if self.method == "precomputed":
            raise ValueError("a precomputed tokenizer imports fixed IDs and cannot assign IDs to new items; "
                             "use tokenize.method=rqvae, rqkmeans or bbq for cold-start items")
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"embeddings must have shape (N, {self.input_dim}), got {x.shape}; use the encoder "
                             "and modalities this tokenizer was fitted on")
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise ValueError(f"embeddings rows {bad[:5].tolist()} contain NaN or inf; fix or drop those items")
        return np.ascontiguousarray(x)

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        """``tokenizer.json`` (settings) + ``tokenizer.safetensors`` (tensors): no pickle anywhere."""
        from safetensors.torch import save_file

        meta: dict[str, Any] = {"format": TOKENIZER_FORMAT, "method": self.method, "input_dim": self.input_dim,
                                "levels": self.levels, "codebook_size": self.codebook_size, **extra}
        tensors: dict[str, torch.Tensor] = {}
        if self.codebooks is not None:
            tensors["codebooks"] = torch.from_numpy(np.ascontiguousarray(self.codebooks))
        if self.projection is not None:
            meta["pca_dim"] = int(self.projection[1].shape[1])
            for key, arr in zip(PROJECTION_KEYS, self.projection, strict=True):
                tensors[key] = torch.from_numpy(np.ascontiguousarray(arr))
        if self.model is not None:
            meta[self.method] = dataclasses.asdict(self.model.config)
            tensors.update({k: v.detach().contiguous() for k, v in self.model.state_dict().items()})
        (folder / "tokenizer.json").write_text(json.dumps(meta, indent=2))
        if tensors:
            save_file(tensors, str(folder / "tokenizer.safetensors"))


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load what :meth:`Tokenizer.save` wrote (``RUN/tokenize-<name>``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / "tokenizer.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found; run `sidforge tokenize` first")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != TOKENIZER_FORMAT:
        raise DataError(f"{meta_path}: tokenizer format {meta.get('format')} is not {TOKENIZER_FORMAT}; re-run tokenize")
    tok = Tokenizer(meta["method"], meta["input_dim"], meta["levels"], meta["codebook_size"])
    if meta["method"] == "precomputed":
        return tok
    tensors = load_file(str(folder / "tokenizer.safetensors"))
    if meta["method"] == "rqkmeans":
        tok.codebooks = tensors["codebooks"].numpy()
        if PROJECTION_KEYS[0] in tensors:
            mean, project, unproject = (tensors[k].numpy() for k in PROJECTION_KEYS)
            tok.projection = (mean, project, unproject)
    else:
        builders = {"rqvae": _rqvae, "bbq": _bbq, "ada-sid": _ada_sid}
        model = builders[meta["method"]](meta[meta["method"]])
        model.load_state_dict(tensors)
        tok.model = model.eval()
    return tok


def _rqvae(fields: dict[str, Any]) -> RQVAE:
    return RQVAE(RQVAEConfig(**{**fields, "hidden": tuple(fields["hidden"])}))


def _bbq(fields: dict[str, Any]) -> BBQ:
    return BBQ(BBQConfig(**{**fields, "hidden": tuple(fields["hidden"]),
                            "modality_dims": tuple(fields["modality_dims"])}))


def _ada_sid(fields: dict[str, Any]) -> ADASID:
    tuples = ("modality_dims", "specific_experts", "hidden", "lambda_range", "richness_range")
    return ADASID(ADASIDConfig(**{**fields, **{k: tuple(fields[k]) for k in tuples}}))


def _residual_codes(x: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    from sidforge.models.quantizers import nearest_codes

    residual = x.copy()
    codes = []
    for book in codebooks:
        c = nearest_codes(residual, book)
        codes.append(c)
        residual -= book[c]
    return np.stack(codes, axis=1)


# ----------------------------------------------------------------------------------------------
# entry point


def run(cfg: Config, run_dir: RunDir, data_dir: Path | None = None, force: bool = False) -> StageResult:
    """Fit the tokenizer in ``cfg.tokenize`` (or skip when config and inputs are unchanged)."""
    t0 = time.perf_counter()
    tcfg = cfg.tokenize
    stage = tcfg.output_name
    config_hash = stage_config_hash(cfg)
    inputs = _input_fingerprints(tcfg, run_dir, data_dir)
    if not force and (cached := run_dir.cached(stage, config_hash, inputs)) is not None:
        return cached
    seed = cfg.seed if tcfg.seed is None else tcfg.seed
    # Checkpoints named by config and inputs: an interrupted RQ-VAE resumes, a changed one starts afresh.
    inputs_hash = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    fitted = FITTERS[tcfg.method](cfg, run_dir, data_dir, seed, run_name(stage, config_hash, inputs_hash), force)
    resolved = resolve_collisions(tcfg.collision, fitted.codes, fitted.last_distances)
    report = quality(fitted.codes, fitted.codebook_size, fitted.x, fitted.x_hat)
    code_len = (fitted.codes >= 0).sum(axis=1)
    report.update({"method": tcfg.method, "collision": tcfg.collision, "reassigned": resolved.reassigned,
                   "unique_after": _unique_share(resolved.sids()), "sid_length": int(resolved.sids().shape[1]),
                   "avg_code_length": float(code_len.mean()),
                   "avg_sid_length": float(code_len.mean()) + float(resolved.with_digit), **fitted.extra})
    version = f"{stage}:{config_hash}"
    with run_dir.writing(stage) as out:
        _write_sids(out / "sids.parquet", fitted.item_id, resolved, version, fitted.weights, fitted.code_offsets)
        fitted.tokenizer.save(out, {"version": version, "collision": tcfg.collision, "source": tcfg.source,
                                    "modalities": fitted.modalities, **fitted.meta})
        (out / "quality.json").write_text(json.dumps(report, indent=2))
        plot_code_usage(fitted.codes, fitted.codebook_size, out / "code_usage.png", title=stage)
    rows = {"items": len(fitted.item_id), "levels": int(fitted.codes.shape[1])}
    result = run_dir.finish(stage, config_hash, inputs, rows, report, t0)
    log.info("%s: wrote %s in %.1f s (collision rate %.4f)", stage, result.out_dir, result.wall_time_s,
             report["collision_rate"])
    return result


def stage_config_hash(cfg: Config) -> str:
    """Hash of what the IDs depend on: the ``tokenize`` section (minus operational keys) and the seed."""
    section = dataclasses.asdict(cfg.tokenize)
    for trainer in ("rqvae", "bbq", "ada_sid"):
        for key in ("num_workers", "cpus_per_worker", "max_failures"):
            section[trainer].pop(key)
        if cfg.tokenize.method.replace("-", "_") != trainer:
            section.pop(trainer)
    if cfg.tokenize.method != "rqkmeans" or not cfg.tokenize.rqkmeans.pca_dim:
        section.pop("rqkmeans")  # absent unless it changes the IDs: earlier runs keep their hash
    payload = json.dumps({"tokenize": section, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _source_path(tcfg: TokenizeConfig, run_dir: RunDir) -> Path:
    return run_dir.stage_dir(tcfg.source) / "item_embeddings.parquet"


def _precomputed_path(tcfg: TokenizeConfig, data_dir: Path | None) -> Path:
    path = Path(tcfg.path).expanduser()
    if not path.is_absolute() and data_dir is not None and not path.exists():
        path = Path(data_dir) / path
    if not path.is_file():
        raise DataError(f"tokenize.path: {tcfg.path!r} not found (relative paths resolve against the data "
                        f"directory {data_dir})")
    return path


def _input_fingerprints(tcfg: TokenizeConfig, run_dir: RunDir, data_dir: Path | None) -> dict[str, str]:
    items = run_dir.stage_dir("prepare") / "items.parquet"
    if tcfg.method == "precomputed":
        if not items.is_file():
            raise DataError(f"{items} not found; run `sidforge prepare` first")
        out = fingerprint_files([items], root=run_dir.path)
        out.update(fingerprint_files([_precomputed_path(tcfg, data_dir)]))
        return out
    src = _source_path(tcfg, run_dir)
    if not src.is_file():
        hint = {"embed": "sidforge embed", "align": "sidforge train align"}.get(tcfg.source, "sidforge train sasrec")
        raise DataError(f"{src} not found; run `{hint}` first (tokenize.source={tcfg.source})")
    files = [src]
    if tcfg.method in ("bbq", "ada-sid"):
        behavior = _behavior_path(tcfg, run_dir)
        key = "bbq" if tcfg.method == "bbq" else "ada_sid"
        if not behavior.is_file():
            raise DataError(f"{behavior} not found: the {tcfg.method} tokenizer uses the behavior embeddings e_b; "
                            f"run `sidforge train sasrec` first (tokenize.{key}.behavior={_behavior_stage(tcfg)})")
        files.append(behavior)
    if tcfg.method == "ada-sid":  # who has behavior (train counts), and the richness proxy log_count
        stats = run_dir.stage_dir("prepare") / "item_stats.parquet"
        if not stats.is_file():
            raise DataError(f"{stats} not found; run `sidforge prepare` first")
        files.append(stats)
    return fingerprint_files(files, root=run_dir.path)


def _behavior_stage(tcfg: TokenizeConfig) -> str:
    return tcfg.ada_sid.behavior if tcfg.method == "ada-sid" else tcfg.bbq.behavior


def _behavior_path(tcfg: TokenizeConfig, run_dir: RunDir) -> Path:
    return run_dir.stage_dir(_behavior_stage(tcfg)) / "item_embeddings.parquet"


# ----------------------------------------------------------------------------------------------
# inputs


def load_matrix(tcfg: TokenizeConfig, run_dir: RunDir) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(item_id (N,), X (N, D) float32, modalities)`` from the configured embeddings."""
    path = _source_path(tcfg, run_dir)
    table = pq.read_table(path)
    item_id = table.column("item_id").to_numpy()
    if tcfg.source == "sasrec":
        x = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        return item_id, x, ["behavior"]
    from sidforge.stages.embed import ItemEmbeddings

    x, modalities = ItemEmbeddings.from_table(table).stacked(tcfg.modalities, "tokenize.modalities", path)
    return item_id, x, modalities


# ----------------------------------------------------------------------------------------------
# fitters


@dataclass
class Fitted:
    """What a fitter hands back: codes of every item and the tokenizer that made them."""

    item_id: np.ndarray
    codes: np.ndarray
    codebook_size: int
    tokenizer: Tokenizer
    modalities: list[str]
    x: np.ndarray | None = None
    x_hat: np.ndarray | None = None
    last_distances: np.ndarray | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: np.ndarray | None = None  # (N, L) code weights (None: 1.0); codes may then hold -1 (dropped)
    code_offsets: np.ndarray | None = None  # (L,) added to each column's codes in the ID table
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra tokenizer.json entries


def _check_catalogue(n: int, tcfg: TokenizeConfig) -> None:
    if n < tcfg.codebook_size:
        raise DataError(f"{n} items cannot fill tokenize.codebook_size={tcfg.codebook_size} codes; lower it")


def fit_rqkmeans(cfg: Config, run_dir: RunDir, data_dir: Path | None, seed: int, train_name: str,
                 force: bool) -> Fitted:
    """Residual k-means (faiss) over the embeddings."""
    tcfg = cfg.tokenize
    item_id, x, modalities = load_matrix(tcfg, run_dir)
    _check_catalogue(len(x), tcfg)
    kcfg = tcfg.rqkmeans
    if kcfg.pca_dim > x.shape[1]:
        raise DataError(f"tokenize.rqkmeans.pca_dim={kcfg.pca_dim} exceeds the embedding width {x.shape[1]}")
    projection = pca_projection(x, kcfg.pca_dim, kcfg.whiten) if kcfg.pca_dim else None
    tok = Tokenizer("rqkmeans", x.shape[1], tcfg.levels, tcfg.codebook_size, projection=projection)
    tok.codebooks, codes = residual_kmeans(tok.project(x), tcfg.levels, tcfg.codebook_size,
                                           niter=tcfg.kmeans_iters, seed=seed, balanced=tcfg.balanced)
    return Fitted(item_id, codes, tcfg.codebook_size, tok, modalities, x, tok.reconstruct(codes),
                  tok.last_distances(x, codes))


def _loop(model_cfg: Any, section: Any, tcfg: TokenizeConfig, seed: int) -> dict[str, Any]:
    """The loop settings every trained tokenizer shares (its own arrays are added by the caller)."""
    return {"model": dataclasses.asdict(model_cfg), "lr": section.lr, "weight_decay": section.weight_decay,
            "batch_size": section.batch_size, "epochs": section.epochs, "kmeans_init": section.kmeans_init,
            "kmeans_iters": tcfg.kmeans_iters, "dead_code_min_usage": section.dead_code_min_usage, "seed": seed}


def _train_tokenizer(method: str, train_fn: Callable[..., Any], loop: dict[str, Any], section: Any,
                     model: torch.nn.Module, run_dir: RunDir, train_name: str, force: bool) -> list[dict[str, Any]]:
    """Train a tokenizer model with the shared runner (``section``: its num_workers, cpus_per_worker and
    max_failures), load the trained state into ``model`` and drop the finished training run.

    Returns:
        The per-epoch history.
    """
    train_run = RunSettings(name=train_name, storage_path=run_dir.path / "_train", max_failures=section.max_failures,
                            checkpoints_to_keep=2)
    result = fit(train_fn, loop, ScalingSettings(section.num_workers, cpus_per_worker=section.cpus_per_worker),
                 train_run, fresh=force)
    if not result.value["replicas_agree"]:
        raise RuntimeError(f"{method}: the workers' model replicas diverged (codebooks must be re-initialised "
                           "identically on every rank)")
    model.load_state_dict({k: torch.tensor(v) for k, v in result.value["state"].items()})  # Ray: read-only arrays
    model.eval()
    remove_run(train_run)
    return result.history


def _history_extra(history: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """Quality-report figures from a trained tokenizer's epochs."""
    return {"epochs": len(history), "final_loss": history[-1].get("loss") if history else None,
            "dead_codes_reset": int(sum(r.get("dead_reset", 0) for r in history)), "workers": workers}


def fit_rqvae(cfg: Config, run_dir: RunDir, data_dir: Path | None, seed: int, train_name: str,
              force: bool) -> Fitted:
    """TIGER's RQ-VAE, trained with the shared Ray Train runner."""
    tcfg, rcfg = cfg.tokenize, cfg.tokenize.rqvae
    item_id, x, modalities = load_matrix(tcfg, run_dir)
    _check_catalogue(len(x), tcfg)
    model_cfg = RQVAEConfig(input_dim=x.shape[1], hidden=tuple(rcfg.hidden), latent_dim=rcfg.latent_dim,
                            num_levels=tcfg.levels, codebook_size=tcfg.codebook_size, beta=rcfg.beta,
                            dropout=rcfg.dropout, uniformity=rcfg.uniformity)
    loop = {**_loop(model_cfg, rcfg, tcfg, seed), "x": x}
    model = RQVAE(model_cfg)
    history = _train_tokenizer("rqvae", train_rqvae, loop, rcfg, model, run_dir, train_name, force)
    tok = Tokenizer("rqvae", x.shape[1], tcfg.levels, tcfg.codebook_size, model=model)
    codes = tok.assign(x)
    return Fitted(item_id, codes, tcfg.codebook_size, tok, modalities, x, tok.reconstruct(codes),
                  tok.last_distances(x, codes), _history_extra(history, rcfg.num_workers))


_TOKEN = re.compile(r"^<?[A-Za-z]*_?(\d+)>?$")


def fit_precomputed(cfg: Config, run_dir: RunDir, data_dir: Path | None, seed: int, train_name: str,
                    force: bool) -> Fitted:
    """Import an external item → codes table; every catalogue item must be in it."""
    tcfg = cfg.tokenize
    path = _precomputed_path(tcfg, data_dir)
    keys, rows = _read_code_table(path)
    items = pq.read_table(run_dir.stage_dir("prepare") / "items.parquet", columns=["item_id", "source_id"])
    item_id = items.column("item_id").to_numpy()
    wanted = [str(v) for v in items.column(tcfg.key).to_pylist()]
    lookup = dict(zip(keys, rows))
    missing = [w for w in wanted if w not in lookup]
    if missing:
        raise DataError(f"{path}: {len(missing)} of {len(wanted)} catalogue items have no codes (first "
                        f"{tcfg.key}s: {missing[:5]}); check tokenize.key (item_id or source_id)")
    lengths = {len(lookup[w]) for w in wanted}
    if len(lengths) != 1:
        raise DataError(f"{path}: code lists have different lengths {sorted(lengths)}; every item needs L codes")
    codes = np.asarray([lookup[w] for w in wanted], dtype=np.int64)
    k = max(int(codes.max()) + 1, tcfg.codebook_size)
    tok = Tokenizer("precomputed", 0, codes.shape[1], k)
    return Fitted(item_id, codes, k, tok, [], extra={"path": str(path)})


def _read_code_table(path: Path) -> tuple[list[str], list[list[int]]]:
    """Keys (as text) and code lists from JSON ``{key: [...]}`` or a Parquet/CSV ``key, codes`` table."""
    def parse(token: Any, where: str) -> int:
        if isinstance(token, (int, np.integer)):
            return int(token)
        m = _TOKEN.match(str(token).strip())
        if not m:
            raise DataError(f"{path}: {where}: code {token!r} is neither an integer nor a token like '<a_12>'")
        return int(m.group(1))

    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object {{item key: [codes]}}")
        keys = [str(k) for k in data]
        return keys, [[parse(t, f"key {k}") for t in v] for k, v in data.items()]
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    elif path.suffix == ".csv":
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(path)
    else:
        raise DataError(f"{path}: unsupported code table; use .json, .parquet or .csv")
    for col in ("key", "codes"):
        if col not in table.column_names:
            raise DataError(f"{path}: missing column {col!r} (need key, codes)")
    codes = table.column("codes").to_pylist()
    if codes and isinstance(codes[0], str):
        codes = [c.split("|") for c in codes]
    keys = [str(k) for k in table.column("key").to_pylist()]
    return keys, [[parse(t, f"key {k}") for t in c] for k, c in zip(keys, codes)]


def fit_bbq(cfg: Config, run_dir: RunDir, data_dir: Path | None, seed: int, train_name: str,
            force: bool) -> Fitted:
    """BBQRec's behavior-bind quantizer over the embed modalities, trained with the shared Ray Train runner."""
    tcfg, bcfg = cfg.tokenize, cfg.tokenize.bbq
    item_id, x, modalities = load_matrix(tcfg, run_dir)
    _check_catalogue(len(x), tcfg)
    behavior = load_behavior(tcfg, run_dir, item_id)
    model_cfg = BBQConfig(modality_dims=_modality_dims(tcfg, run_dir, modalities), behavior_dim=behavior.shape[1],
                          num_items=len(x) if bcfg.item_slot else 0, hidden=tuple(bcfg.hidden),
                          shared_dim=bcfg.shared_dim, specific_dim=bcfg.specific_dim, num_levels=tcfg.levels,
                          codebook_size=tcfg.codebook_size, beta=bcfg.beta,
                          contrastive_weight=bcfg.contrastive_weight, temperature=bcfg.temperature,
                          contrastive_prefixes=bcfg.contrastive_prefixes, mi_weight=bcfg.mi_weight,
                          mi_clamp=bcfg.mi_clamp,
                          club_hidden=bcfg.club_hidden, slot_weight=bcfg.slot_weight, dropout=bcfg.dropout)
    loop = {**_loop(model_cfg, bcfg, tcfg, seed), "x": x, "behavior": behavior}
    model = BBQ(model_cfg)
    hist = _train_tokenizer("bbq", train_bbq, loop, bcfg, model, run_dir, train_name, force)
    tok = Tokenizer("bbq", x.shape[1], tcfg.levels, tcfg.codebook_size, model=model)
    codes = tok.assign(x)
    with torch.no_grad():
        x_full = model.reconstruct_items(torch.from_numpy(x), torch.arange(len(x))).numpy()
    extra = {**_history_extra(hist, bcfg.num_workers),
             "recon_rel_full": float(((x - x_full) ** 2).sum() / max(float((x**2).sum()), 1e-12)),
             "behavior_coherence": behavior_coherence(codes, behavior)}
    for key in ("contrastive", "mi"):
        if hist:
            extra[f"{key}_first"], extra[f"{key}_last"] = hist[0].get(key), hist[-1].get(key)
    return Fitted(item_id, codes, tcfg.codebook_size, tok, modalities, x, tok.reconstruct(codes),
                  tok.last_distances(x, codes), extra)


def fit_ada_sid(cfg: Config, run_dir: RunDir, data_dir: Path | None, seed: int, train_name: str,
                force: bool) -> Fitted:
    """ADA-SID over the embed modalities and e_b, trained with the shared Ray Train runner."""
    tcfg, acfg = cfg.tokenize, cfg.tokenize.ada_sid
    item_id, x, modalities = load_matrix(tcfg, run_dir)
    if len(x) < acfg.codebook_size:
        raise DataError(f"{len(x)} items cannot fill tokenize.ada_sid.codebook_size={acfg.codebook_size} codes; "
                        "lower it")
    behavior = load_behavior(tcfg, run_dir, item_id)
    counts, bucket = _item_stats(run_dir, item_id)
    has_behavior = counts > 0
    richness, low, high = ada_sid_richness(acfg.richness, behavior, counts)
    rms = float(np.sqrt((behavior[has_behavior] ** 2).sum(axis=1).mean()))
    model_cfg = _ada_sid_model_config(tcfg, _modality_dims(tcfg, run_dir, modalities), behavior.shape[1], low, high,
                                      1.0 / max(rms, 1e-12))
    order = np.random.default_rng(seed).permutation(len(x))
    n_valid = int(round(acfg.valid_fraction * len(x)))
    train_rows, valid_rows = np.sort(order[n_valid:]), np.sort(order[:n_valid])
    if len(train_rows) < acfg.codebook_size:
        raise DataError(f"{len(train_rows)} training items cannot fill tokenize.ada_sid.codebook_size="
                        f"{acfg.codebook_size}; lower it or tokenize.ada_sid.valid_fraction")
    loop = {**_loop(model_cfg, acfg, tcfg, seed), "x": x, "behavior": behavior, "richness": richness,
            "has_behavior": has_behavior.astype(np.float32), "train_rows": train_rows, "valid_rows": valid_rows}
    model = ADASID(model_cfg)
    hist = _train_tokenizer("ada-sid", train_ada_sid, loop, acfg, model, run_dir, train_name, force)
    tok = Tokenizer("ada-sid", x.shape[1], model_cfg.num_experts, acfg.codebook_size, model=model)
    with torch.no_grad():
        c, w = model.encode(torch.from_numpy(x), torch.from_numpy(behavior), torch.from_numpy(richness),
                            torch.from_numpy(has_behavior.astype(np.float32)))
        x_hat, b_hat = model.decode_codes(c, w)
    codes, weights = c.numpy().astype(np.int64), w.numpy()
    names = _expert_names(model_cfg, modalities)
    extra = _ada_sid_report(model, codes, weights, behavior, b_hat.numpy(), richness, counts, bucket, names)
    extra.update({**_history_extra(hist, acfg.num_workers),
                  "valid": {"recon_rel": hist[-1]["valid/recon_rel"]} if hist and "valid/recon_rel" in hist[-1] else {},
                  "behavior_coherence": behavior_coherence(codes, behavior)})
    for key in ("align", "dropped_share"):
        if hist:
            extra[f"{key}_first"], extra[f"{key}_last"] = hist[0].get(key), hist[-1].get(key)
    offsets = np.arange(model_cfg.num_experts, dtype=np.int64) * acfg.codebook_size
    meta = {"experts": names, "code_offsets": offsets.tolist()}
    return Fitted(item_id, codes, acfg.codebook_size, tok, modalities, x, x_hat.numpy(), None, extra,
                  weights=weights, code_offsets=offsets, meta=meta)


def ada_sid_richness(source: str, behavior: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, float, float]:
    """N_norm of every item and the raw (low, high) it was normalised by.

    The proxy is the e_b L2 norm (``norm``, the paper) or log(1 + train count) (``log_count``), min-max
    normalised over the items seen in training; items never seen in training get 0.
    """
    raw = np.linalg.norm(behavior, axis=1) if source == "norm" else np.log1p(counts.astype(np.float64))
    seen = counts > 0
    if not seen.any():
        raise DataError("no item has training interactions: ADA-SID needs behavior; check the prepare outputs")
    low, high = float(raw[seen].min()), float(raw[seen].max())
    richness = np.where(seen, np.clip((raw - low) / max(high - low, 1e-12), 0.0, 1.0), 0.0)
    return richness.astype(np.float32), low, high


def _ada_sid_model_config(tcfg: TokenizeConfig, dims: tuple[int, ...], behavior_dim: int, low: float,
                          high: float, behavior_scale: float) -> ADASIDConfig:
    a = tcfg.ada_sid
    specific = tuple(a.specific_experts) * len(dims) if len(a.specific_experts) == 1 else tuple(a.specific_experts)
    if len(specific) != len(dims):
        raise DataError(f"tokenize.ada_sid.specific_experts lists {len(a.specific_experts)} counts for "
                        f"{len(dims)} modalities; give one per modality or a single one")
    return ADASIDConfig(
        modality_dims=dims, behavior_dim=behavior_dim, codebook_size=a.codebook_size,
        shared_experts=a.shared_experts, specific_experts=specific, behavior_experts=a.behavior_experts,
        hidden=tuple(a.hidden), proj_dim=a.proj_dim, latent_dim=a.latent_dim, beta=a.beta,
        adaptive_alignment=a.adaptive_alignment, align_alpha=a.align_alpha, align_beta=a.align_beta,
        temperature=a.temperature, align_weight=a.align_weight, content_weight=a.content_weight, router=a.router,
        router_hidden=a.router_hidden, router_leak=a.router_leak, sparsity=a.sparsity, sparsity_target=a.sparsity_target,
        lambda_init=a.lambda_init, lambda_rate=a.lambda_rate, sparsity_bins=a.sparsity_bins,
        balance_weight=a.balance_weight, behavior_recon_weight=a.behavior_recon_weight, dropout=a.dropout,
        richness_source=a.richness, richness_range=(low, high), behavior_scale=behavior_scale)


def _expert_names(c: ADASIDConfig, modalities: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for group, m in c.experts:
        key = modalities[m] if group == "specific" else group
        names.append(f"{key}{seen.get(key, 0)}")
        seen[key] = seen.get(key, 0) + 1
    return names


def _item_stats(run_dir: RunDir, item_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train count and popularity bucket of every item, in the order of ``item_id``."""
    path = run_dir.stage_dir("prepare") / "item_stats.parquet"
    table = pq.read_table(path, columns=["item_id", "train_count", "bucket"])
    row = {int(i): r for r, i in enumerate(table.column("item_id").to_numpy())}
    missing = [int(i) for i in item_id if int(i) not in row]
    if missing:
        raise DataError(f"{path}: no statistics for {len(missing)} items (e.g. {missing[:5]}); re-run prepare")
    idx = np.asarray([row[int(i)] for i in item_id])
    counts = table.column("train_count").to_numpy()[idx]
    return counts.astype(np.int64), np.asarray(table.column("bucket").to_pylist(), dtype=object)[idx].astype(str)


def _ada_sid_report(model: ADASID, codes: np.ndarray, weights: np.ndarray, behavior: np.ndarray,
                    b_hat: np.ndarray, richness: np.ndarray, counts: np.ndarray, bucket: np.ndarray,
                    names: list[str]) -> dict[str, Any]:
    """ADA-SID's figures beyond the common quality report (see the module doc)."""
    c = model.config
    seen = counts > 0
    beh = slice(c.num_experts - c.behavior_experts, c.num_experts)
    kept = codes[:, beh] >= 0  # (N, N_b)
    w = model.strength(torch.from_numpy(richness), torch.from_numpy(seen.astype(np.float32))).numpy()
    err = ((behavior - b_hat) ** 2).sum(axis=1)
    out: dict[str, Any] = {
        "experts": names,
        "recon_rel_behavior": float(err[seen].sum() / max(float((behavior[seen] ** 2).sum()), 1e-12)),
        "richness_source": c.richness_source,
        "richness_count_spearman": _spearman(richness[seen], counts[seen]),
        "lambdas": [float(v) for v in model.lambdas],
    }
    if c.behavior_experts:
        out["dropped_share"] = float(1.0 - kept[seen].mean())
        out["target_share"] = float((c.sparsity_target * (1.0 - richness[seen])).mean())  # what it aimed at
        out["expert_load"] = [float(v) for v in kept[seen].mean(axis=0)]  # share of items using each expert
        out["behavior_weight_mean"] = [float(v) for v in weights[seen][:, beh].mean(axis=0)]
    by_bucket: dict[str, dict[str, float]] = {}
    for b in ("head", "torso", "tail", "cold"):
        rows = bucket == b
        if rows.any():
            by_bucket[b] = {"items": int(rows.sum()), "alignment_w": float(w[rows].mean()),
                            "richness": float(richness[rows].mean()), "codes": float((codes[rows] >= 0).sum(1).mean())}
            if c.behavior_experts:
                by_bucket[b]["dropped_share"] = float(1.0 - kept[rows].mean())
    out["by_bucket"] = by_bucket
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import pandas as pd

    if len(a) < 2:
        return float("nan")
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def _modality_dims(tcfg: TokenizeConfig, run_dir: RunDir, modalities: list[str]) -> tuple[int, ...]:
    """Width of each modality in the concatenated input, from the embeddings' schema."""
    schema = pq.read_schema(_source_path(tcfg, run_dir))
    return tuple(int(schema.field(f"emb_{m}").type.list_size) for m in modalities)


def load_behavior(tcfg: TokenizeConfig, run_dir: RunDir, item_id: np.ndarray) -> np.ndarray:
    """(N, H) float32 behavior embeddings e_b in the order of ``item_id``."""
    path = _behavior_path(tcfg, run_dir)
    table = pq.read_table(path, columns=["item_id", "embedding"])
    ids = table.column("item_id").to_numpy()
    emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    row = {int(i): r for r, i in enumerate(ids)}
    missing = [int(i) for i in item_id if int(i) not in row]
    if missing:
        raise DataError(f"{path}: no behavior embedding for {len(missing)} items (e.g. {missing[:5]}); train "
                        "`sidforge train sasrec` on this run again")
    out = emb[[row[int(i)] for i in item_id]]
    if not np.isfinite(out).all():
        raise DataError(f"{path}: behavior embeddings contain NaN or inf; re-run `sidforge train sasrec`")
    return out


FITTERS: dict[str, Callable[..., Fitted]] = {
    "rqkmeans": fit_rqkmeans,
    "rqvae": fit_rqvae,
    "bbq": fit_bbq,
    "ada-sid": fit_ada_sid,
    "precomputed": fit_precomputed,
}


# ----------------------------------------------------------------------------------------------
# RQ-VAE per-worker loop


def train_rqvae(ctx: WorkerContext, config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker loop: k-means init, epochs over this rank's shard, dead-code re-use after each epoch."""
    x = torch.from_numpy(config["x"])
    torch.manual_seed(config["seed"])
    mcfg = config["model"]
    model = RQVAE(RQVAEConfig(**{**mcfg, "hidden": tuple(mcfg["hidden"])}))
    state = ctx.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
    elif config["kmeans_init"]:
        _kmeans_init(model.quantizer, model.latent(x), config)  # deterministic: the same on every rank
    step = ctx.prepare_model(model, method="loss")
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    if state is not None:
        opt.load_state_dict(state["opt"])
    for epoch in ctx.epochs(config["epochs"]):
        torch.manual_seed(config["seed"] + 7919 * epoch + ctx.rank)
        step.train()
        order = ctx.shard(len(x), seed=config["seed"] + epoch)
        totals = {"loss": 0.0, "recon": 0.0}
        batches = [order[i : i + config["batch_size"]] for i in range(0, len(order), config["batch_size"])]
        for rows in batches:
            out = step(x[rows].to(ctx.device))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            totals["loss"] += float(out.loss.detach())
            totals["recon"] += float(out.metrics["recon"])
        metrics: dict[str, Any] = {k: v / max(len(batches), 1) for k, v in totals.items()}
        if config["dead_code_min_usage"] > 0:
            model.eval()
            with torch.no_grad():
                z = model.encoder(x.to(ctx.device))
                g = torch.Generator().manual_seed(config["seed"] + epoch)
                metrics["dead_reset"] = int(model.quantizer.reset_dead_codes(z, config["dead_code_min_usage"], g).sum())
        ctx.report(epoch, metrics, lambda: {"model": model.state_dict(), "opt": opt.state_dict()})
    # numpy, not tensors: Ray Train cannot return tensors from distributed workers
    return {"state": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
            "replicas_agree": ctx.replicas_agree(model)}


def _kmeans_init(q: ResidualQuantizer, z: torch.Tensor, config: dict[str, Any]) -> None:
    """Codebooks from residual k-means on the first latents ``z`` (N, D)."""
    z_np = z.detach().cpu().numpy()
    books, _ = residual_kmeans(z_np, q.num_levels, q.codebook_size, niter=config["kmeans_iters"], seed=config["seed"])
    q.init_from(torch.from_numpy(books))


# ----------------------------------------------------------------------------------------------
# BBQ per-worker loop


def train_bbq(ctx: WorkerContext, config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker loop: k-means init, epochs over this rank's shard, dead-code re-use after each epoch.

    One backward pass per batch carries every term (see :meth:`sidforge.models.bbq.BBQ.loss`): CLUB's q
    and the encoders take one step each on their own objectives.
    """
    x, behavior = torch.from_numpy(config["x"]), torch.from_numpy(config["behavior"])
    torch.manual_seed(config["seed"])
    model = _bbq(config["model"])
    state = ctx.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
    elif config["kmeans_init"]:
        with torch.no_grad():
            _kmeans_init(model.quantizer, model.latent(x), config)  # the same on every rank
    step = ctx.prepare_model(model, method="loss")
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    if state is not None:
        opt.load_state_dict(state["opt"])
    for epoch in ctx.epochs(config["epochs"]):
        torch.manual_seed(config["seed"] + 7919 * epoch + ctx.rank)
        metrics = _bbq_epoch(ctx, step, opt, x, behavior, config, epoch)
        if config["dead_code_min_usage"] > 0:
            model.eval()
            with torch.no_grad():
                z = model.latent(x.to(ctx.device))
                g = torch.Generator().manual_seed(config["seed"] + epoch)
                metrics["dead_reset"] = int(model.quantizer.reset_dead_codes(z, config["dead_code_min_usage"], g).sum())
        ctx.report(epoch, metrics, lambda: {"model": model.state_dict(), "opt": opt.state_dict()})
    model.eval()
    model.set_specific_mean(x.to(ctx.device))  # every rank: same model, same data
    # numpy, not tensors: Ray Train cannot return tensors from distributed workers
    return {"state": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
            "replicas_agree": ctx.replicas_agree(model)}


def _bbq_epoch(ctx: WorkerContext, step: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               behavior: torch.Tensor, config: dict[str, Any], epoch: int) -> dict[str, float]:
    """One pass over this rank's shard; returns the mean of the loss and of each of its terms."""
    step.train()
    order = torch.from_numpy(ctx.shard(len(x), seed=config["seed"] + epoch))
    bs = config["batch_size"]
    totals: dict[str, float] = {}
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    for rows in batches:
        out = step(x[rows].to(ctx.device), behavior[rows].to(ctx.device), rows.to(ctx.device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / max(len(batches), 1) for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------
# ADA-SID per-worker loop


def train_ada_sid(ctx: WorkerContext, config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker loop: k-means init of every expert, epochs over this rank's shard of the training items
    (the sparsity coefficients adapt after every step), dead-code re-use and the held-out reconstruction
    (``valid/recon_rel``) after each epoch."""
    t = {k: torch.from_numpy(np.ascontiguousarray(config[k])) for k in ("x", "behavior", "richness", "has_behavior")}
    train_rows = torch.from_numpy(config["train_rows"])
    torch.manual_seed(config["seed"])
    model = _ada_sid(config["model"])
    state = ctx.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
    elif config["kmeans_init"]:
        _ada_sid_codebooks(model, t, train_rows, config, init=True)  # the same on every rank
    step = ctx.prepare_model(model, method="loss")
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    if state is not None:
        opt.load_state_dict(state["opt"])
    for epoch in ctx.epochs(config["epochs"]):
        torch.manual_seed(config["seed"] + 7919 * epoch + ctx.rank)
        metrics = _ada_sid_epoch(ctx, step, model, opt, t, train_rows, config, epoch)
        model.eval()
        if config["dead_code_min_usage"] > 0:
            metrics["dead_reset"] = _ada_sid_codebooks(model, t, train_rows, config, seed=config["seed"] + epoch)
        if len(config["valid_rows"]):
            metrics["valid/recon_rel"] = _ada_sid_recon_rel(model, t, torch.from_numpy(config["valid_rows"]), ctx.device)
        ctx.report(epoch, metrics, lambda: {"model": model.state_dict(), "opt": opt.state_dict()})
    # numpy, not tensors: Ray Train cannot return tensors from distributed workers
    return {"state": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
            "replicas_agree": ctx.replicas_agree(model)}


def _ada_sid_epoch(ctx: WorkerContext, step: torch.nn.Module, model: ADASID, opt: torch.optim.Optimizer,
                   t: dict[str, torch.Tensor], train_rows: torch.Tensor, config: dict[str, Any],
                   epoch: int) -> dict[str, float]:
    """One pass over this rank's shard; returns the mean of the loss and of each of its terms."""
    step.train()
    order = train_rows[torch.from_numpy(ctx.shard(len(train_rows), seed=config["seed"] + epoch))]
    bs = config["batch_size"]
    totals: dict[str, float] = {}
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    for rows in batches:
        out = step(*(t[k][rows].to(ctx.device) for k in ("x", "behavior", "richness", "has_behavior")))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.adapt_lambdas(out.sparsity_gap)
        for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / max(len(batches), 1) for k, v in totals.items()}


def _ada_sid_codebooks(model: ADASID, t: dict[str, torch.Tensor], rows: torch.Tensor, config: dict[str, Any],
                       init: bool = False, seed: int = 0) -> int:
    """k-means initialisation (``init``) or dead-code re-use of every expert on the items it quantizes."""
    device = next(model.parameters()).device
    with torch.no_grad():
        z, usable = model.expert_latents(*(t[k][rows].to(device) for k in ("x", "behavior", "richness", "has_behavior")))
    resets = 0
    for e, rq in enumerate(model.codebooks):
        ze = z[usable[:, e], e]
        if len(ze) < rq.codebook_size:  # too few items with this input (e.g. an image few items have)
            continue
        if init:
            _kmeans_init(rq, ze, config)
        else:
            g = torch.Generator().manual_seed(seed + 104_729 * e)
            resets += int(rq.reset_dead_codes(ze, config["dead_code_min_usage"], g).sum())
    return resets


def _ada_sid_recon_rel(model: ADASID, t: dict[str, torch.Tensor], rows: torch.Tensor, device: torch.device) -> float:
    """Relative content reconstruction error from the codes (and weights) of ``rows``."""
    x = t["x"][rows].to(device)
    codes, weights = model.encode(x, t["behavior"][rows].to(device), t["richness"][rows].to(device),
                                  t["has_behavior"][rows].to(device))
    x_hat, _ = model.decode_codes(codes, weights)
    return float(((x - x_hat) ** 2).sum() / (x**2).sum().clamp(min=1e-12))


# ----------------------------------------------------------------------------------------------
# outputs


def _unique_share(sids: np.ndarray) -> float:
    return float(len(np.unique(sids, axis=0)) / max(len(sids), 1))


def _write_sids(path: Path, item_id: np.ndarray, resolved: Resolved, version: str,
                weights: np.ndarray | None = None, offsets: np.ndarray | None = None) -> None:
    """The ID table; -1 codes (dropped) are left out of ``codes``, ``weights`` and ``sid``."""
    sids = resolved.sids()
    if _unique_share(sids) < 1.0:  # every resolver guarantees this; never write ambiguous IDs
        raise RuntimeError(f"{path}: collision handling left duplicate IDs")
    codes = variable_length(resolved.codes, offsets)
    kept = resolved.codes >= 0
    w = np.ones(resolved.codes.shape, dtype=np.float32) if weights is None else np.asarray(weights, np.float32)
    ids = [np.append(c, d) for c, d in zip(codes, resolved.digit)] if resolved.with_digit else codes
    table = pa.table({
        "item_id": pa.array(item_id, pa.int64()),
        "codes": pa.array([c.astype(np.int32) for c in codes], pa.list_(pa.int32())),
        "digit": pa.array(resolved.digit.astype(np.int32), pa.int32()),
        "sid": pa.array([c.astype(np.int32) for c in ids], pa.list_(pa.int32())),
        "version": pa.array([version] * len(item_id), pa.string()),
        "weights": pa.array([row[k] for row, k in zip(w, kept)], pa.list_(pa.float32())),
    }, schema=SIDS)
    pq.write_table(table, path)


def load_sids(folder: str | Path) -> pa.Table:
    """The ``sids`` table of a tokenizer run (``RUN/tokenize-<name>``)."""
    path = Path(folder) / "sids.parquet"
    if not path.is_file():
        raise DataError(f"{path} not found; run `sidforge tokenize` first")
    return pq.read_table(path)


def plot_code_usage(codes: np.ndarray, codebook_size: int, path: Path, title: str = "") -> None:
    """One panel per level: items per code, codes sorted by usage (a flat curve is a well-used codebook)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = codes.shape[1]
    fig, axes = plt.subplots(1, levels, figsize=(3.2 * levels, 2.8), squeeze=False, sharey=True)
    for level, ax in enumerate(axes[0]):
        col = codes[:, level]
        counts = np.sort(np.bincount(col[col >= 0], minlength=codebook_size))[::-1]
        used = (counts > 0).mean()
        ax.bar(np.arange(codebook_size), counts, width=1.0, color="tab:blue")
        ax.axhline(len(codes) / codebook_size, color="tab:red", lw=1, ls="--", label="uniform")
        ax.set_title(f"level {level + 1}: {used:.0%} used", fontsize=9)
        ax.set_xlabel("code (sorted by usage)", fontsize=8)
        if level == 0:
            ax.set_ylabel("items", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle(f"{title} code usage per level", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
