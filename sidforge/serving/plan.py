"""What the server serves: a run directory resolved once into a :class:`ServingPlan`.

The plan is small and picklable: paths, the embedding *spaces* each consumer reads, sizes, and the
model version. Every deployment receives it and loads only what it needs (the ranker its
``model.pt``, the retriever its vectors, ...), so the run directory must be readable where the
replicas run (the same machine, or a shared filesystem on a cluster).

**Spaces.** An item vector is a dict keyed by embed modality (``text``, ``image``, ``content``) or
``aligned`` (the co-click aligned z of ``RUN/align``). A consumer reads a *space*: the keys it
concatenates, e.g. ``("aligned",)`` for a tokenizer fitted on z, ``("text",)`` for a ranker over raw
MiniLM vectors. The tokenizer's space comes from ``tokenizer.json``; the ranker's is found by matching
its frozen ``content`` table against the run's embeddings (``model.pt`` does not record it); the
faiss retriever's comes from ``serve.retrieve_space``.

**Version.** ``<ranker stage>@<digest>``, the digest hashing the manifest entries (config hash and
output fingerprints) of every stage the server reads; a retrained stage gives a new version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from sidforge.platform.artifacts import RunDir, fingerprint_tree, inside, load_torch_file
from sidforge.platform.config import Config, EmbedConfig, ServeConfig
from sidforge.platform.schemas import DataError

log = logging.getLogger(__name__)

ALIGNED = "aligned"
EMBEDDINGS = "item_embeddings.parquet"


@dataclass(frozen=True)
class ServingPlan:
    """A run directory resolved for serving (see the module doc).

    Attributes:
        run_dir: the run directory.
        serve: the ``serve`` config section.
        embed: the ``embed`` config section (encoder, text template, normalisation).
        num_items: items of the run (ids ``0 .. num_items - 1``); added items follow.
        ranker_dir, sids_dir: the ranker's and the IDs' folders.
        align_dir: ``RUN/align`` when the run has an aligner, else None.
        generative_dir: the TIGER model folder when ``serve.retriever=generative``.
        embed_dims: embed modality → width.
        aligned_dim: width of z (0 without an aligner).
        align_modalities: the embed modalities the aligner reads (concatenated).
        align_mode: ``features`` or ``open_clip`` (``""`` without an aligner).
        tokenizer_space: what the tokenizer reads; None when it cannot assign IDs to new items.
        tokenizer_note: why not, when ``tokenizer_space`` is None.
        ranker_space: what the ranker's content table holds; None for an item-ID-only ranker.
        retrieval_space: what the faiss retriever searches.
        collision: the IDs' collision method (``digit`` or ``reassign``).
        version: the model version reported in every response.
        stages: per stage read: config hash and finish time (``GET /version``).
    """

    run_dir: Path
    serve: ServeConfig
    embed: EmbedConfig
    num_items: int
    ranker_dir: Path
    sids_dir: Path
    align_dir: Path | None
    generative_dir: Path | None
    embed_dims: dict[str, int]
    aligned_dim: int
    align_modalities: tuple[str, ...]
    align_mode: str
    tokenizer_space: tuple[str, ...] | None
    tokenizer_note: str
    ranker_space: tuple[str, ...] | None
    retrieval_space: tuple[str, ...]
    collision: str
    version: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def dims(self) -> dict[str, int]:
        """Every vector key this run knows → width."""
        return {**self.embed_dims, **({ALIGNED: self.aligned_dim} if self.aligned_dim else {})}

    @property
    def needed(self) -> tuple[str, ...]:
        """The vector keys a new item needs so that every consumer can use it."""
        keys: list[str] = []
        for space in (self.tokenizer_space, self.ranker_space, self.retrieval_space):
            keys += [k for k in space or () if k not in keys]
        return tuple(keys)

    def space_dim(self, space: tuple[str, ...]) -> int:
        return sum(self.dims[k] for k in space)


# ----------------------------------------------------------------------------------------------
# resolving


def resolve(cfg: Config, run_dir: str | Path | None = None) -> ServingPlan:
    """Resolve ``run_dir`` (default ``cfg.run_dir``) for serving with ``cfg.serve``.

    Every stage folder the server reads must lie in the run directory (and the run directory and
    ``serve.catalogue_log`` in ``serve.artifact_root`` when it is set), and a stage with a manifest entry
    must still hold the files the entry fingerprinted; both are checked before a file of it is read.

    Raises:
        DataError: a stage the server needs is missing, inconsistent, modified since it finished, or a
            path leaves the run directory or the artifact root; the message names the stage or the field
            and the command that makes it.
    """
    s = cfg.serve
    run = RunDir(inside(s.artifact_root, run_dir or cfg.run_dir, "run_dir") if s.artifact_root
                 else run_dir or cfg.run_dir)
    if not run.path.is_dir():
        raise DataError(f"run directory {run.path} not found; run the pipeline first (sidforge prepare ...)")
    if s.artifact_root and s.catalogue_log:  # the path checked is the path the catalogue opens
        s = dataclasses.replace(s, catalogue_log=str(inside(s.artifact_root, s.catalogue_log, "serve.catalogue_log")))
    ranker_dir = _stage_folder(run, s.ranker, "serve.ranker")
    if not (ranker_dir / "model.pt").is_file():
        found = sorted(p.name for p in run.path.glob("ranker*") if (p / "model.pt").is_file())
        raise DataError(f"serve.ranker: {ranker_dir}/model.pt not found (rankers in this run: "
                        f"{', '.join(found) or 'none'}); train one with `sidforge train ranker`")
    align_dir = _stage_folder(run, "align", "RUN/align")
    align_dir = align_dir if (align_dir / "model.pt").is_file() else None
    embed_dir = _stage_folder(run, "embed", "RUN/embed")
    used = [_stage_folder(run, "prepare", "RUN/prepare"), embed_dir, *([align_dir] if align_dir else []), ranker_dir]
    _check_outputs(run, used)  # before a file of theirs is read, the ranker's model.pt first
    num_items = _num_items(run)
    ranker_meta = load_ranker_file(ranker_dir)
    sids_dir = _sids_dir(run, s, ranker_meta, cfg)
    generative_dir = _generative_dir(run, s, sids_dir)
    _check_outputs(run, [sids_dir, *([generative_dir] if generative_dir else [])])
    used += [sids_dir, *([generative_dir] if generative_dir else [])]
    _check_catalogue_log(s, used)
    tok_meta = json.loads((sids_dir / "tokenizer.json").read_text())
    embed_dims = _dims(embed_dir / EMBEDDINGS)
    aligned_dim, align_modalities, align_mode = 0, (), ""
    if align_dir is not None:
        aligned_dim = _dims(align_dir / EMBEDDINGS).get(ALIGNED, 0)
        align_meta = run.read_manifest().stages.get("align")
        metrics = align_meta.metrics if align_meta else {}
        align_mode = str(metrics.get("mode", "features"))
        align_modalities = tuple(metrics.get("modalities") or embed_dims)
    tok_space, tok_note = _tokenizer_space(tok_meta, embed_dims, aligned_dim)
    ranker_space = _ranker_space(run, ranker_meta, embed_dims, aligned_dim, num_items)
    retrieval_space = _retrieval_space(s, embed_dims, aligned_dim)
    version, stages = _version(run, [_stage_name(run, d) for d in used], s.ranker)
    _check_embed_config(run, cfg.embed)
    return ServingPlan(run_dir=run.path, serve=s, embed=cfg.embed, num_items=num_items, ranker_dir=ranker_dir,
                       sids_dir=sids_dir, align_dir=align_dir, generative_dir=generative_dir, embed_dims=embed_dims,
                       aligned_dim=aligned_dim, align_modalities=align_modalities, align_mode=align_mode,
                       tokenizer_space=tok_space, tokenizer_note=tok_note, ranker_space=ranker_space,
                       retrieval_space=retrieval_space, collision=str(tok_meta.get("collision", "digit")),
                       version=version, stages=stages)


def load_ranker_file(ranker_dir: Path) -> dict[str, Any]:
    """``model.pt`` of a ranker stage: ``{"format", "config", "sids", "state_dict"}`` (tensors and plain
    values only: loaded with ``weights_only=True``)."""
    path = ranker_dir / "model.pt"
    fix = "re-run `sidforge train ranker`"
    meta = load_torch_file(path, fix)
    if not isinstance(meta, dict) or not {"config", "state_dict"} <= set(meta):
        raise DataError(f"{path}: expected a dict with config and state_dict; {fix}")
    return meta


def load_vectors(plan: ServingPlan, space: tuple[str, ...]) -> np.ndarray:
    """(num_items, dim) float32: the run's items in ``space`` (keys concatenated)."""
    from sidforge.stages.embed import ItemEmbeddings

    parts = []
    for key in space:
        folder = plan.align_dir if key == ALIGNED else plan.run_dir / "embed"
        assert folder is not None
        emb = ItemEmbeddings.from_table(pq.read_table(folder / EMBEDDINGS, columns=["item_id", f"emb_{key}"]))
        if not np.array_equal(emb.item_id, np.arange(plan.num_items)):
            raise DataError(f"{folder / EMBEDDINGS} must hold the run's {plan.num_items} items in id order")
        parts.append(emb.vectors[key])
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def load_codes(plan: ServingPlan) -> tuple[np.ndarray, list[list[int]]]:
    """The run's IDs: (num_items, L) codes and each item's ``sid`` (codes, with the digit when it has one)."""
    table = pq.read_table(plan.sids_dir / "sids.parquet", columns=["item_id", "codes", "sid"])
    item_id = table.column("item_id").to_numpy()
    if not np.array_equal(np.sort(item_id), np.arange(plan.num_items)):
        raise DataError(f"{plan.sids_dir}/sids.parquet must give one ID to each of the {plan.num_items} items")
    order = np.argsort(item_id)
    codes = np.asarray(table.column("codes").to_pylist(), dtype=np.int64)[order]
    sids = [table.column("sid")[int(i)].as_py() for i in order]
    return codes, sids


def _num_items(run: RunDir) -> int:
    path = run.stage_dir("prepare") / "item_stats.parquet"
    if not path.is_file():
        raise DataError(f"{path} not found; run `sidforge prepare` first")
    return pq.read_metadata(path).num_rows


def _stage_folder(run: RunDir, name: str, field: str) -> Path:
    """The stage folder ``name`` (relative to the run), resolved; refused when it leaves the run directory."""
    return inside(run.path, run.path / name, field)


def _stage_name(run: RunDir, folder: Path) -> str:
    """A resolved stage folder's name in the manifest (its path relative to the run)."""
    return folder.relative_to(run.path).as_posix()


def _check_outputs(run: RunDir, folders: list[Path]) -> None:
    """Refuse stage folders whose files differ from their manifest fingerprints (see :meth:`RunDir.check_outputs`)."""
    for folder in folders:
        name = _stage_name(run, folder)
        command = _STAGE_COMMANDS.get(name.split("-", 1)[0], "")
        how = f"`{command}`" if command else "the stage that writes it"
        run.check_outputs(name, f"re-run {how} to rebuild RUN/{name} (`sidforge pipeline` rebuilds every "
                                "stage whose files changed)")


_STAGE_COMMANDS = {"prepare": "sidforge prepare", "embed": "sidforge embed", "align": "sidforge train align",
                   "tokenize": "sidforge tokenize", "ranker": "sidforge train ranker",
                   "generative": "sidforge train generative"}


def _check_catalogue_log(s: ServeConfig, folders: list[Path]) -> None:
    """A catalogue log inside a fingerprinted stage folder would make the stage fail its check on restart."""
    if not s.catalogue_log:
        return
    log_path = Path(s.catalogue_log).expanduser().resolve()
    for folder in folders:
        if log_path.is_relative_to(folder):
            raise DataError(f"serve.catalogue_log: {log_path} lies in the stage folder {folder}, whose files are "
                            "checked against the manifest; put the log outside the stage folders")


def _sids_dir(run: RunDir, s: ServeConfig, ranker_meta: dict[str, Any], cfg: Config) -> Path:
    field = ("serve.sids" if s.sids else "the sids folder recorded in the ranker's model.pt (serve.sids overrides it)"
             if ranker_meta.get("sids") else "serve.sids (empty: the tokenize stage's folder)")
    path = _stage_folder(run, s.sids or ranker_meta.get("sids") or cfg.tokenize.output_name, field)
    if not (path / "tokenizer.json").is_file() or not (path / "sids.parquet").is_file():
        raise DataError(f"serve.sids: {path} has no tokenizer.json and sids.parquet; run `sidforge tokenize` "
                        "or point serve.sids at a tokenize-<name> folder")
    return path


def _generative_dir(run: RunDir, s: ServeConfig, sids_dir: Path) -> Path | None:
    if s.retriever != "generative":
        return None
    name = s.generative or f"generative-{sids_dir.name.removeprefix('tokenize-')}"
    path = _stage_folder(run, name, "serve.generative")
    if not (path / "model.json").is_file():
        raise DataError(f"serve.retriever=generative: {path}/model.json not found; train it with "
                        f"`sidforge train generative --sids {sids_dir}` or set serve.generative")
    return path


def _dims(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataError(f"{path} not found; run the stage that writes it (sidforge embed / train align)")
    schema = pq.read_schema(path)
    return {f.name[4:]: f.type.list_size for f in schema if f.name.startswith("emb_")}


def _tokenizer_space(meta: dict[str, Any], embed_dims: dict[str, int], aligned_dim: int
                     ) -> tuple[tuple[str, ...] | None, str]:
    method, source = meta.get("method"), meta.get("source", "embed")
    if method not in ("rqkmeans", "rqvae"):
        return None, f"the IDs come from tokenize.method={method}, which cannot give new items IDs"
    if source == "align":
        return ((ALIGNED,), "") if aligned_dim else (None, "the IDs were fitted on RUN/align, which is missing")
    if source == "embed":
        mods = tuple(meta.get("modalities") or embed_dims)
        return mods, ""
    return None, f"the IDs were fitted on {source} (behavior) embeddings, which new items do not have"


def _ranker_space(run: RunDir, meta: dict[str, Any], embed_dims: dict[str, int], aligned_dim: int,
                  num_items: int) -> tuple[str, ...] | None:
    """The keys whose concatenation equals the ranker's frozen content table."""
    table = meta["state_dict"].get("content")
    if table is None:
        return None
    content = table[:num_items].numpy()
    options: list[tuple[str, ...]] = []
    if aligned_dim == content.shape[1]:
        options.append((ALIGNED,))
    if sum(embed_dims.values()) == content.shape[1]:
        options.append(tuple(embed_dims))
    options += [(m,) for m, d in embed_dims.items() if d == content.shape[1] and (m,) not in options]
    probe = np.linspace(0, num_items - 1, min(num_items, 64)).astype(np.int64)
    for space in options:
        folder = run.stage_dir("align") if space == (ALIGNED,) else run.stage_dir("embed")
        table_ = pq.read_table(folder / EMBEDDINGS, columns=["item_id", *(f"emb_{k}" for k in space)])
        from sidforge.stages.embed import ItemEmbeddings

        emb = ItemEmbeddings.from_table(table_)
        x = np.concatenate([emb.vectors[k] for k in space], axis=1)[probe]
        if np.allclose(x, content[probe], atol=1e-5):
            return space
    raise DataError(f"{run.path}: the ranker's content table matches neither RUN/align nor RUN/embed; was it "
                    "trained on this run?")


def _retrieval_space(s: ServeConfig, embed_dims: dict[str, int], aligned_dim: int) -> tuple[str, ...]:
    if s.retrieve_space == "align" or (s.retrieve_space == "auto" and aligned_dim):
        if not aligned_dim:
            raise DataError("serve.retrieve_space=align but the run has no RUN/align; run `sidforge train align` "
                            "or set serve.retrieve_space=embed")
        return (ALIGNED,)
    return tuple(embed_dims)


def _version(run: RunDir, stages: list[str], ranker: str) -> tuple[str, dict[str, dict[str, Any]]]:
    manifest = run.read_manifest().stages
    payload, info = {}, {}
    for stage in stages:
        entry = manifest.get(stage)
        if entry is not None:
            payload[stage] = [entry.config_hash, entry.outputs]
            info[stage] = {"config_hash": entry.config_hash, "finished_at": entry.finished_at}
        else:  # written by hand (tests) or by an older version: its files stand for it
            payload[stage] = ["", fingerprint_tree(run.stage_dir(stage))]
            info[stage] = {"config_hash": "", "finished_at": ""}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"{ranker}@{digest}", info


def _check_embed_config(run: RunDir, embed: EmbedConfig) -> None:
    """Warn when the config's encoder is not the one the run's items were embedded with (the manifest
    records the encoder, model and normalisation, not the text template)."""
    entry = run.read_manifest().stages.get("embed")
    if entry is None:
        return
    m = entry.metrics
    ours = {"encoder": embed.encoder, "model": embed.model or "(default)", "normalized": embed.normalize}
    theirs = {k: m.get(k, ours[k]) for k in ours}
    if embed.encoder == "precomputed":
        ours.pop("model"), theirs.pop("model")
    if ours != theirs:
        log.warning("serve: the run was embedded with %s but the config says %s; content the server encodes "
                    "will not match the catalogue (pass the run's --config)", theirs, ours)
