"""The embed stage: item content → one embedding per item and modality, on a Ray Data actor pool.

Reads ``RUN/prepare/items.parquet`` and writes ``RUN/embed/item_embeddings.parquet``: ``item_id``
(in id order) and one fixed-size float32 list column per modality, ``emb_text`` and ``emb_image``
for model encoders, ``emb_<modality>`` for precomputed features. A null entry means the item has no
embedding of that modality (an image that is missing or unreadable: the item is still encoded from
its text and counted as a text-only fallback in the manifest, never dropped).

Model encoders (:mod:`sidforge.models.encoders`) run as ``map_batches`` over an actor pool, so each
actor loads the model once: 1 CPU per actor (torch with one thread), or 1 GPU per actor when the
cluster has GPUs. ``embed.num_actors=0`` runs the same batch function in the driver process, without
Ray. Precomputed features are copied (and normalised) in the driver: no model, nothing to spread.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sidforge.platform.artifacts import (
    RunDir,
    StageResult,
    fingerprint_files,
)
from sidforge.platform.config import Config, EmbedConfig
from sidforge.platform.schemas import DataError, feature_columns
from sidforge.platform.text import ItemTextTemplate

if TYPE_CHECKING:  # torch is imported only where a model runs
    from sidforge.models.encoders import EncoderSpec

log = logging.getLogger(__name__)

STAGE = "embed"
OUTPUT = "item_embeddings.parquet"
ITEMS = Path("prepare") / "items.parquet"

# per-item image status returned by the batch function
IMAGE_OK, IMAGE_NO_URI, IMAGE_UNREADABLE = 0, 1, 2




@dataclass
class ItemEmbeddings:
    """Embeddings of every item, in item-id order.

    Attributes:
        item_id: (N,) int64.
        vectors: modality → (N, D) float32; rows without an embedding are zero.
        valid: modality → (N,) bool, False where the item has no embedding of that modality.
    """

    item_id: np.ndarray
    vectors: dict[str, np.ndarray]
    valid: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(v.shape[1]) for m, v in self.vectors.items()}

    def to_table(self) -> pa.Table:
        """The ``item_embeddings`` table: item_id and one fixed-size float32 list per modality."""
        columns: dict[str, pa.Array] = {"item_id": pa.array(self.item_id, pa.int64())}
        for modality, vectors in self.vectors.items():
            n, dim = vectors.shape
            values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
            valid = self.valid.get(modality)
            mask = None if valid is None or valid.all() else pa.array(~valid)
            columns[f"emb_{modality}"] = pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)
        return pa.table(columns)

    def stacked(self, modalities: Sequence[str], setting: str, path: Path,
                rerun: str = "re-run `sidforge embed`") -> tuple[np.ndarray, list[str]]:
        """The named modalities (every one when none is named) side by side, as later stages read them.

        Returns ``(N, total width)`` float32 and the modality names; a modality ``path`` lacks is an error naming
        the config ``setting``, and NaN or inf an error asking to ``rerun`` the stage that wrote ``path``.
        """
        names = list(modalities) or list(self.vectors)
        missing = [m for m in names if m not in self.vectors]
        if missing:
            raise DataError(f"{setting}: {missing} not in {path} (it has {sorted(self.vectors)})")
        x = np.concatenate([self.vectors[m] for m in names], axis=1).astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise DataError(f"{path}: embeddings contain NaN or inf; {rerun}")
        return x, names

    @classmethod
    def from_table(cls, table: pa.Table) -> ItemEmbeddings:
        """Read back what :meth:`to_table` wrote."""
        out = cls(item_id=table.column("item_id").to_numpy(), vectors={}, valid={})
        for name in table.column_names:
            if name.startswith("emb_"):
                out.vectors[name[4:]], out.valid[name[4:]] = fixed_size_to_numpy(table.column(name), name)
        return out


def load_embeddings(run_dir: RunDir) -> ItemEmbeddings:
    """The embed stage's output of ``run_dir`` (what later stages read)."""
    path = run_dir.stage_dir(STAGE) / OUTPUT
    if not path.is_file():
        raise DataError(f"{path} not found; run `sidforge embed` first")
    return ItemEmbeddings.from_table(pq.read_table(path))


# ----------------------------------------------------------------------------------------------
# entry point


def run(cfg: Config, run_dir: RunDir, force: bool = False) -> StageResult:
    """Run (or skip) the embed stage; returns what it wrote.

    Args:
        cfg: the experiment config; this stage reads ``cfg.embed``.
        run_dir: the run directory; ``prepare`` must have written ``prepare/items.parquet``.
        force: re-run even when the config and inputs are unchanged.
    """
    t0 = time.perf_counter()
    items_path = run_dir.path / ITEMS
    if not items_path.is_file():
        raise DataError(f"{items_path} not found; run `sidforge prepare` with this config first")
    config_hash = stage_config_hash(cfg)
    inputs = _input_fingerprints(cfg.embed, run_dir)
    if not force and (cached := run_dir.cached(STAGE, config_hash, inputs)) is not None:
        return cached
    items = read_items(items_path, cfg.embed)
    with run_dir.writing(STAGE) as out:
        emb, metrics = embed_items(cfg.embed, items)
        pq.write_table(emb.to_table(), out / OUTPUT)
    metrics["items_per_s"] = round(items.num_rows / max(time.perf_counter() - t0, 1e-9), 1)
    result = run_dir.finish(STAGE, config_hash, inputs, {"items": items.num_rows}, metrics, t0)
    log.info("embed: wrote %s (%d items, dims %s) in %.1f s", result.out_dir, items.num_rows, metrics["dims"],
             result.wall_time_s)
    return result


def read_items(path: Path, ecfg: EmbedConfig) -> pa.Table:
    """The items-table columns the encoder needs (feature columns only for ``precomputed``)."""
    names = pq.read_schema(path).names
    if ecfg.encoder == "precomputed":
        wanted = ["item_id", *(n for n in names if n.startswith("feat_"))]
    else:
        wanted = ["item_id", "image_uri", *ItemTextTemplate.parse(ecfg.text_template).fields]
    return pq.read_table(path, columns=[n for n in dict.fromkeys(wanted) if n in names])


def stage_config_hash(cfg: Config) -> str:
    return cfg.section_hash("embed")


def _input_fingerprints(ecfg: EmbedConfig, run_dir: RunDir) -> dict[str, str]:
    """The items table (keyed relative to the run directory) and any local model files."""
    from sidforge.models.encoders import local_model_files

    out = fingerprint_files([run_dir.path / ITEMS], root=run_dir.path)
    if ecfg.encoder != "precomputed":
        out.update(fingerprint_files(local_model_files(encoder_spec(ecfg))))
    return out


def encoder_spec(ecfg: EmbedConfig, device: str = "cpu") -> EncoderSpec:
    """The model-encoder spec of an embed config (not for ``precomputed``)."""
    from sidforge.models.encoders import EncoderSpec

    return EncoderSpec(kind=ecfg.encoder, model=ecfg.model, pretrained=ecfg.pretrained,
                       checkpoint=ecfg.checkpoint, device=device)


def embed_items(ecfg: EmbedConfig, items: pa.Table, num_actors: int | None = None
                ) -> tuple[ItemEmbeddings, dict[str, Any]]:
    """Embed an items table.

    Args:
        ecfg: the embed config.
        items: the items table (``item_id`` plus content and ``feat_*`` columns).
        num_actors: overrides ``ecfg.num_actors`` (0 = in the driver process, no Ray).

    Returns:
        The embeddings in item-id order, and the metrics recorded in the manifest.
    """
    items = items.sort_by("item_id")
    if ecfg.encoder == "precomputed":
        return _precomputed(ecfg, items)
    inputs, empty_text = encoder_inputs(ecfg, items)
    n = ecfg.num_actors if num_actors is None else num_actors
    if n == 0:
        batches, device, pool = encode_in_process(inputs, ecfg), _local_device(), 0
    else:
        batches, device, pool = encode_on_ray(inputs, ecfg, n)
    emb, status = _assemble(inputs.column("item_id").to_numpy(), batches)
    metrics: dict[str, Any] = {
        "encoder": ecfg.encoder, "model": ecfg.model or "(default)", "dims": emb.dims,
        "normalized": ecfg.normalize, "num_actors": pool, "device": device, "empty_text": empty_text,
    }
    if status is not None:
        metrics.update(text_only=int((status != IMAGE_OK).sum()),
                       image_missing_uri=int((status == IMAGE_NO_URI).sum()),
                       image_unreadable=int((status == IMAGE_UNREADABLE).sum()))
        if metrics["image_unreadable"]:
            log.warning("embed: %d item images could not be read; those items are encoded from text only",
                        metrics["image_unreadable"])
    return emb, metrics


def encoder_inputs(ecfg: EmbedConfig, items: pa.Table) -> tuple[pa.Table, int]:
    """``item_id``, the rendered ``text`` and ``image_uri`` of every item; and the count of empty texts."""
    texts = ItemTextTemplate.parse(ecfg.text_template).render_table(items)
    empty = sum(1 for t in texts if not t)
    if empty:
        log.warning("embed: %d of %d items have no text under template %r", empty, len(texts), ecfg.text_template)
    uris = items.column("image_uri") if "image_uri" in items.column_names else pa.nulls(items.num_rows, pa.string())
    table = pa.table({"item_id": items.column("item_id").cast(pa.int64()), "text": pa.array(texts, pa.string()),
                      "image_uri": uris.cast(pa.string())})
    return table, empty


# ----------------------------------------------------------------------------------------------
# running the batch function: in process or on a Ray Data actor pool


class EncodeBatch:
    """The batch function: one per actor, loads the encoder once and embeds batches of items.

    Args:
        spec: what encoder to load.
        normalize: L2-normalise the embeddings.
        image_root: folder that relative image paths resolve against.
        num_threads: torch intra-op threads (0 keeps torch's default).
    """

    def __init__(self, spec: EncoderSpec, normalize: bool, image_root: str = "", num_threads: int = 0) -> None:
        import torch

        from sidforge.models.encoders import build_encoder

        if num_threads:
            torch.set_num_threads(num_threads)
        self.encoder = build_encoder(spec)
        self.normalize = normalize
        self.image_root = image_root

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed one batch.

        Args:
            batch: ``item_id`` (B,), ``text`` (B,) and ``image_uri`` (B,) object arrays (None = no image).

        Returns:
            ``item_id``, ``emb_text`` (B, D) and, for image encoders, ``emb_image`` (B, D) (zero rows
            where there is no image) and ``image_status`` (B,) int8.
        """
        out = {"item_id": np.asarray(batch["item_id"], dtype=np.int64)}
        texts = ["" if t is None else str(t) for t in batch["text"]]
        out["emb_text"] = self._finish(self.encoder.encode_text(texts).numpy())
        if "image" in self.encoder.modalities:
            images, status = load_images(batch["image_uri"], self.image_root)
            emb = np.zeros((len(texts), self.encoder.dims["image"]), dtype=np.float32)
            ok = np.flatnonzero(status == IMAGE_OK)
            if len(ok):
                emb[ok] = self._finish(self.encoder.encode_images([images[i] for i in ok]).numpy())
            out["emb_image"], out["image_status"] = emb, status
        return out

    def _finish(self, emb: np.ndarray) -> np.ndarray:
        emb = emb.astype(np.float32, copy=False)
        return l2_normalize(emb) if self.normalize else emb


def encode_in_process(inputs: pa.Table, ecfg: EmbedConfig) -> Iterator[dict[str, np.ndarray]]:
    """The batch function over ``inputs`` in this process (torch uses all its threads)."""
    fn = EncodeBatch(encoder_spec(ecfg, _local_device()), ecfg.normalize, ecfg.image_root)
    for start in range(0, inputs.num_rows, ecfg.batch_size):
        yield fn(numpy_batch(inputs.slice(start, ecfg.batch_size)))


def encode_on_ray(inputs: pa.Table, ecfg: EmbedConfig, num_actors: int
                  ) -> tuple[Iterator[dict[str, np.ndarray]], str, int]:
    """The batch function over ``inputs`` on a Ray Data actor pool.

    Returns:
        An iterator over output batches (in no particular order), the device, and the pool size
        (``num_actors`` capped by the cluster's GPUs or CPUs so the pool can start).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from sidforge.platform.runtime import init_ray, use_gpu

    init_ray()
    gpu = use_gpu()
    capacity = ray.cluster_resources().get("GPU" if gpu else "CPU", 1)
    size = max(1, min(num_actors, int(capacity)))
    if size < num_actors:
        log.warning("embed: %d actors asked for, the cluster has room for %d", num_actors, size)
    resources = {"num_gpus": 1} if gpu else {"num_cpus": 1}
    ds = ray.data.from_arrow(_blocks(inputs, size, ecfg.batch_size))
    out = ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"spec": encoder_spec(ecfg, "cuda" if gpu else "cpu"), "normalize": ecfg.normalize,
                               "image_root": ecfg.image_root, "num_threads": 0 if gpu else 1},
        compute=ActorPoolStrategy(size=size), batch_size=ecfg.batch_size, batch_format="numpy", **resources,
    )
    return out.iter_batches(batch_size=None, batch_format="numpy"), "cuda" if gpu else "cpu", size


def _blocks(table: pa.Table, actors: int, batch_size: int) -> list[pa.Table]:
    """Cut the inputs into blocks: a few per actor so the pool stays busy, a few batches each."""
    n = table.num_rows
    rows = max(batch_size, min(8 * batch_size, math.ceil(n / (4 * actors))))
    return [table.slice(i, rows) for i in range(0, max(n, 1), rows)]


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _assemble(item_ids: np.ndarray, batches: Iterator[dict[str, np.ndarray]]
              ) -> tuple[ItemEmbeddings, np.ndarray | None]:
    """Scatter output batches into item-id order; returns the embeddings and per-item image status."""
    n = len(item_ids)
    vectors: dict[str, np.ndarray] = {}
    status: np.ndarray | None = None
    seen = np.zeros(n, dtype=bool)
    for batch in batches:
        pos = np.searchsorted(item_ids, batch["item_id"])
        for name, values in batch.items():
            if name.startswith("emb_"):
                modality = name[4:]
                if modality not in vectors:
                    vectors[modality] = np.zeros((n, values.shape[1]), dtype=np.float32)
                vectors[modality][pos] = values
        if "image_status" in batch:
            status = np.full(n, IMAGE_NO_URI, dtype=np.int8) if status is None else status
            status[pos] = batch["image_status"]
        seen[pos] = True
    if not seen.all():
        raise RuntimeError(f"embed: {int((~seen).sum())} items came back without embeddings")
    valid = {m: np.ones(n, dtype=bool) for m in vectors}
    if status is not None and "image" in vectors:
        valid["image"] = status == IMAGE_OK
    return ItemEmbeddings(item_id=item_ids, vectors=vectors, valid=valid), status


# ----------------------------------------------------------------------------------------------
# images, precomputed features, normalisation


def load_images(uris: np.ndarray, root: str = "") -> tuple[list[Any], np.ndarray]:
    """Open item images as RGB PIL images.

    Args:
        uris: (B,) local paths or ``file://`` URIs; None or empty = no image. Relative paths resolve
            against ``root``.
        root: base folder for relative paths ("" = the working directory).

    Returns:
        The images (None where there is none) and a (B,) int8 status: :data:`IMAGE_OK`,
        :data:`IMAGE_NO_URI` or :data:`IMAGE_UNREADABLE` (missing file, not an image, other schemes).
    """
    from PIL import Image

    images: list[Any] = []
    status = np.full(len(uris), IMAGE_OK, dtype=np.int8)
    for i, uri in enumerate(uris):
        images.append(None)
        if uri is None or not str(uri).strip():
            status[i] = IMAGE_NO_URI
            continue
        path = _local_path(str(uri).strip(), root)
        try:
            if path is None:
                raise OSError("not a local path or file:// URI")
            with Image.open(path) as im:
                images[i] = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.debug("embed: image %s unreadable (%s); text only", uri, e)
            status[i] = IMAGE_UNREADABLE
    return images, status


def _local_path(uri: str, root: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # http, s3, ...; a one-letter scheme is a Windows drive
        return None
    path = Path(uri)
    return path if path.is_absolute() or not root else Path(root) / path


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero. (N, D) → (N, D)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32, copy=False)


def fixed_size_to_numpy(column: pa.ChunkedArray | pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size float list column as an (N, D) float32 matrix (null rows zero) and an (N,) valid mask."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type):
        raise DataError(f"column {name!r} is {arr.type}, expected a fixed-size list of floats "
                        "(pa.list_(pa.float32(), dim))")
    dim = arr.type.list_size
    values = arr.values.slice(arr.offset * dim, len(arr) * dim).to_numpy(zero_copy_only=False)
    matrix = np.nan_to_num(values.astype(np.float32).reshape(len(arr), dim))
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    matrix[~valid] = 0.0
    return matrix, valid


def _precomputed(ecfg: EmbedConfig, items: pa.Table) -> tuple[ItemEmbeddings, dict[str, Any]]:
    available = feature_columns(items.schema)
    columns = dict(ecfg.columns) or {name[len("feat_"):]: name for name in available}
    if not columns:
        raise DataError("embed.encoder=precomputed but the items table has no feat_* columns; choose a model "
                        "encoder (embed.encoder=sentence_transformers) or add feature columns to the items")
    emb = ItemEmbeddings(item_id=items.column("item_id").to_numpy(), vectors={}, valid={})
    for modality, column in columns.items():
        if column not in items.column_names:
            raise DataError(f"embed.columns: {modality}: column {column!r} is not in the items table; "
                            f"feature columns present: {', '.join(available) or 'none'}")
        matrix, valid = fixed_size_to_numpy(items.column(column), column)
        emb.vectors[modality] = l2_normalize(matrix) if ecfg.normalize else matrix
        emb.valid[modality] = valid
    metrics = {"encoder": "precomputed", "columns": columns, "dims": emb.dims, "normalized": ecfg.normalize,
               "missing": {m: int((~v).sum()) for m, v in emb.valid.items()}}
    return emb, metrics
