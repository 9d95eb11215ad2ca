"""The one Ray Train runner every sidforge trainer uses (Ray Train V2, ``TorchTrainer``).

A trainer is a per-worker function ``train_fn(ctx, config)`` written against :class:`WorkerContext`
and pure PyTorch; :func:`fit` runs it on ``num_workers`` Ray Train workers (DDP over gloo or NCCL), or
in the calling process when ``num_workers=0`` (plain PyTorch, for unit tests and Tune trials)::

    def train_fn(ctx: WorkerContext, config: dict) -> dict:
        model = build_model(config)
        if (state := ctx.load_checkpoint()) is not None:        # a retry or a restart resumes here
            model.load_state_dict(state["model"])
        step = ctx.prepare_model(model, method="loss")          # to device; DDP wrapper calling model.loss
        opt = torch.optim.Adam(model.parameters())               # after prepare_model: state lands on device
        if state is not None:
            opt.load_state_dict(state["opt"])
        for epoch in ctx.epochs(config["epochs"]):               # stops early when patience runs out
            for i in ctx.shard(n_train, seed=epoch): ...         # equal-sized shard per rank
            ctx.report(epoch, {"loss": ..., "valid/ndcg@10": ...},
                       lambda: {"model": model.state_dict(), "opt": opt.state_dict()})
        return {...}                                             # rank 0's value -> FitResult.value

What the runner guarantees, in both modes:

- **A checkpoint every epoch.** ``ctx.report`` saves ``state.pt`` (what ``state_fn`` returns, on rank 0)
  and ``progress.json`` (epoch, metric history, early-stopping state) to
  ``{storage_path}/{name}/epoch_NNNN/``. Ray Train V2 keeps only metrics that come with a checkpoint,
  so every report carries one; ``checkpoints_to_keep`` bounds the disk (the best and the latest
  checkpoints are always kept). ``state.pt`` holds tensors and plain values only and is read back with
  ``weights_only=True`` (no pickled code runs on resume); ``progress.json`` is JSON.
- **Resume.** A worker failure is retried ``max_failures`` times from the latest checkpoint
  (``FailureConfig``). A new :func:`fit` with the **same** ``name`` and ``storage_path`` resumes the
  earlier run from its latest checkpoint too: this is deliberate, so a stage killed mid-training
  continues where it stopped. Stages derive the name from the stage and the hash of its config and
  inputs (:func:`run_name`), so a changed config starts afresh; ``fit(..., fresh=True)`` discards an
  earlier run of the same name.
- **Early stopping.** With ``RunSettings.monitor`` set, each report that carries the monitored metric
  updates the best value; after ``patience`` such reports without improvement ``ctx.should_stop``
  turns true and ``ctx.epochs`` ends. Every rank applies rank 0's value (broadcast), so all ranks stop
  at the same epoch.
- **In-process mode** (``num_workers=0``). The function runs in this process as plain PyTorch (rank 0
  of 1) with the same checkpoint layout and retry semantics, so unit tests exercise resume and failure
  handling in seconds. It needs no Ray cluster and opens no Ray Train session, so it also runs inside
  a Ray Tune trial (Ray refuses ``ray.train.*`` calls there); :func:`epoch_reporting` forwards its
  epochs to the trial.

GPU use is decided from the cluster's resources (:func:`sidforge.platform.runtime.use_gpu`), never from
the driver. Storage is a local path here; on a multi-node cluster it must be shared (NFS) or a URI.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from sidforge.platform.artifacts import load_torch_file
from sidforge.platform.schemas import DataError

log = logging.getLogger(__name__)

__all__ = [
    "FitResult",
    "RunSettings",
    "ScalingSettings",
    "TrainFn",
    "WorkerContext",
    "checkpoint_dir_name",
    "epoch_reporting",
    "fit",
    "load_state",
    "remove_run",
    "run_name",
    "shard_indices",
    "stage_run_settings",
]

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"
# Retention score: the monitored value (sign-normalised, higher is better) on epochs that set a new
# best, -inf elsewhere. Keeping the top k by it keeps the best epoch (plus Ray/us keep the latest),
# and a tie with the best is no new best, so the retained checkpoint is always the one best_epoch names.
SCORE_KEY = "_score"
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


# Set by epoch_reporting() (a Ray Tune trial): where each finished epoch is also reported.
_EPOCH_HOOKS: list[Callable[[dict[str, Any]], None]] = []
_EXTRA_CALLBACKS: list[Any] = []


@contextmanager
def epoch_reporting(hook: Callable[[dict[str, Any]], None], callbacks: Sequence[Any] = ()) -> Iterator[None]:
    """While active, every :func:`fit` in this process also reports each finished epoch elsewhere.

    In-process runs call ``hook(row)`` on rank 0 once the epoch's checkpoint is persisted (``row`` is
    the history row: ``epoch`` plus the reported metrics); distributed runs, whose workers live in other
    processes, get ``callbacks`` added to their ``RunConfig`` instead (e.g. Tune's
    ``TuneReportCallback``). This is how a Tune trial sees the epochs of the stage it runs, so ASHA
    can stop it, without the stages knowing about Tune.
    """
    _EPOCH_HOOKS.append(hook)
    _EXTRA_CALLBACKS.extend(callbacks)
    try:
        yield
    finally:
        _EPOCH_HOOKS.remove(hook)
        for cb in callbacks:
            _EXTRA_CALLBACKS.remove(cb)


# ----------------------------------------------------------------------------------------------
# Settings and result


@dataclass(frozen=True)
class ScalingSettings:
    """How many workers and which resources.

    Attributes:
        num_workers: Ray Train workers; 0 runs the train function in this process (local mode).
        use_gpu: one GPU per worker; ``None`` decides from the cluster's resources.
        cpus_per_worker: CPUs reserved per worker (also the worker's torch thread count).
    """

    num_workers: int = 0
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0 (0 = in-process)")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker} must be > 0")


@dataclass(frozen=True)
class RunSettings:
    """Where a run lives and how it is checkpointed, retried and stopped.

    Attributes:
        name: run name; the same ``name`` and ``storage_path`` resume the earlier run (see module doc).
        storage_path: folder (absolute after resolution) that holds ``{name}/epoch_NNNN`` checkpoints.
        max_failures: worker-failure retries from the latest checkpoint (-1 = unlimited).
        checkpoints_to_keep: checkpoints kept on disk; the best and the latest always survive.
        monitor: metric key for early stopping and for picking the best checkpoint; ``None`` = latest.
        mode: ``max`` if a higher ``monitor`` value is better, else ``min``.
        patience: reports carrying ``monitor`` without improvement before stopping; ``None`` = never.
        callbacks: Ray Train ``RunConfig`` callbacks (e.g. Tune's ``TuneReportCallback``).
    """

    name: str
    storage_path: str | Path
    max_failures: int = 0
    checkpoints_to_keep: int | None = 2
    monitor: str | None = None
    mode: Literal["max", "min"] = "max"
    patience: int | None = None
    callbacks: Sequence[Any] = ()

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"run name {self.name!r} must be non-empty and contain no '/'")
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode={self.mode!r} must be 'max' or 'min'")
        if self.checkpoints_to_keep is not None and self.checkpoints_to_keep < 1:
            raise ValueError(f"checkpoints_to_keep={self.checkpoints_to_keep} must be >= 1 or None (keep all)")
        if self.patience is not None and (self.patience < 1 or self.monitor is None):
            raise ValueError("patience must be >= 1 and needs a monitor metric (RunSettings.monitor)")
        if self.max_failures < -1:
            raise ValueError(f"max_failures={self.max_failures} must be >= -1 (-1 = unlimited)")

    @property
    def path(self) -> Path:
        """The run folder ``{storage_path}/{name}``."""
        return Path(self.storage_path).expanduser().resolve() / self.name


@dataclass
class FitResult:
    """What a finished :func:`fit` returns.

    Attributes:
        history: one dict per reported epoch (rank 0's metrics plus ``epoch``), resumed runs included.
        best: the history row of the best epoch by ``monitor`` (the latest row without a monitor).
        best_epoch: that row's epoch, or ``None`` if nothing was reported.
        best_checkpoint: folder of the best epoch's checkpoint (holds ``state.pt``), if kept.
        latest_checkpoint: folder of the latest checkpoint.
        stopped_early: True when patience ran out before the epoch budget.
        value: the train function's return value on rank 0.
        path: the run folder ``{storage_path}/{name}``.
    """

    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_epoch: int | None
    best_checkpoint: Path | None
    latest_checkpoint: Path | None
    stopped_early: bool
    value: Any
    path: Path


def run_name(stage: str, *hashes: str) -> str:
    """A stable run name for a stage: the same stage, config and inputs resume the same run."""
    return "-".join([stage, *(h[:12] for h in hashes if h)])


def stage_run_settings(stage: str, run_path: Path, config_hash: str, inputs: dict[str, str], *, max_failures: int,
                       patience: int | None, monitor: str, mode: Literal["max", "min"] = "max") -> RunSettings:
    """A stage's training run in ``RUN/_train``, named by its config and inputs: an interrupted stage
    resumes, a changed one starts afresh."""
    import hashlib

    inputs_hash = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return RunSettings(name=run_name(stage, config_hash, inputs_hash), storage_path=run_path / "_train",
                       max_failures=max_failures, checkpoints_to_keep=2, monitor=monitor, mode=mode,
                       patience=patience)


def checkpoint_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def load_state(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved by ``ctx.report``'s ``state_fn`` in a checkpoint folder.

    Loaded with ``weights_only=True``: a checkpoint holds tensors and plain values only (see
    :meth:`WorkerContext.report`), so a planted pickle payload is refused, never run.

    Raises:
        DataError: ``state.pt`` is missing, damaged or holds anything else; the message names it and says
            to delete the run's checkpoints, so that the stage starts afresh.
    """
    path = Path(checkpoint) / STATE_FILE
    fix = (f"delete the training run {path.parent.parent} (or pass fresh=True) and re-run the stage, which then "
           "trains from scratch")
    state = load_torch_file(path, fix, map_location=map_location)
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a dict of states, got {type(state).__name__}; {fix}")
    return state


def remove_run(run: RunSettings) -> None:
    """Delete a run's checkpoints (after its outputs are safely written elsewhere), and the storage
    folder too once no other run keeps checkpoints there."""
    shutil.rmtree(run.path, ignore_errors=True)
    try:
        run.path.parent.rmdir()
    except OSError:
        pass  # other runs still hold checkpoints there


# ----------------------------------------------------------------------------------------------
# Per-worker side

TrainFn = Callable[["WorkerContext", dict[str, Any]], Any]


@dataclass
class _Progress:
    """Early-stopping state and history; saved in every checkpoint's ``progress.json``."""

    epoch: int = -1
    score: float | None = None  # retention score of this epoch (see SCORE_KEY)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float | None = None
    bad_reports: int = 0
    stopped: bool = False


class WorkerContext:
    """Everything a per-worker train function needs from Ray Train, and nothing more.

    Attributes:
        rank: global rank of this worker (0 in-process).
        world_size: number of workers (1 in-process).
        device: the torch device assigned to this worker.
        start_epoch: first epoch to run (0, or the epoch after the checkpoint resumed from).
    """

    def __init__(self, run: RunSettings, local: bool) -> None:
        if local:  # plain PyTorch in this process: no Ray Train session (so it also runs inside a Tune trial)
            self.rank, self.world_size = 0, 1
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            import ray.train
            import ray.train.torch

            tctx = ray.train.get_context()
            self.rank = tctx.get_world_rank()
            self.world_size = tctx.get_world_size()
            self.device = ray.train.torch.get_device()
        self._run = run
        self._local = local
        self._resume: Any = None  # the ray.train.Checkpoint resumed from
        self._progress = _Progress()
        self._find_resume_point()
        self.start_epoch: int = self._progress.epoch + 1
        if self.start_epoch > 0 and self.rank == 0:
            log.info("%s: resuming after epoch %d", run.name, self._progress.epoch)

    # -- resume ------------------------------------------------------------------------------

    @contextmanager
    def _checkpoint_dir(self) -> Iterator[Path]:
        if self._local:
            yield Path(self._resume)
        else:
            with self._resume.as_directory() as d:
                yield Path(d)

    def _find_resume_point(self) -> None:
        if self._local:
            self._resume = _latest_local_checkpoint(self._run.path)  # a folder, or None
        else:
            import ray.train

            self._resume = ray.train.get_checkpoint()
        if self._resume is not None:
            with self._checkpoint_dir() as d:  # a download only for remote storage
                p = _Progress(**json.loads((Path(d) / PROGRESS_FILE).read_text()))
            # Decide again under the current patience: a restart may grant a larger one.
            p.stopped = self._run.patience is not None and p.bad_reports >= self._run.patience
            self._progress = p

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state of the checkpoint resumed from (on this worker's device), or ``None``."""
        if self._resume is None:
            return None
        with self._checkpoint_dir() as d:
            return load_state(d, map_location=self.device)

    def load_best(self) -> dict[str, Any] | None:
        """The state of the best checkpoint so far (the latest one without a monitor), or ``None``."""
        epoch = self._progress.best_epoch if self._run.monitor else None
        epoch = self._progress.epoch if epoch is None else epoch
        if epoch < 0:
            return None
        if not self._local:
            import ray.train

            # Ask Ray: on a shared or remote storage the worker may not see the driver's path.
            for reported in ray.train.get_all_reported_checkpoints():
                if reported.metrics.get("epoch") == epoch:
                    with reported.checkpoint.as_directory() as d:
                        return load_state(d, map_location=self.device)
        return load_state(self._run.path / checkpoint_dir_name(epoch), map_location=self.device)

    # -- the loop ----------------------------------------------------------------------------

    @property
    def should_stop(self) -> bool:
        """True once early stopping triggered (the same on every rank)."""
        return self._progress.stopped

    @property
    def history(self) -> list[dict[str, Any]]:
        """Rank 0's reported metrics so far, one dict per epoch (empty on other ranks)."""
        return self._progress.history

    def epochs(self, num_epochs: int) -> Iterator[int]:
        """Epochs ``start_epoch .. num_epochs - 1``, ending early when :attr:`should_stop` turns true."""
        epoch = self.start_epoch
        while epoch < num_epochs and not self.should_stop:
            yield epoch
            epoch += 1

    def report(self, epoch: int, metrics: dict[str, Any], state_fn: Callable[[], dict[str, Any]]) -> None:
        """Report an epoch's metrics with a checkpoint; every rank must call it once per epoch.

        Args:
            epoch: the epoch just finished.
            metrics: scalar metrics (rank 0's are kept); include ``RunSettings.monitor`` on the epochs
                that were evaluated.
            state_fn: returns the state to save (model, optimiser, ...); called on rank 0 only. A dict of
                tensors and plain values (numbers, strings, ``None``, lists, tuples and dicts of them, as
                ``state_dict()`` gives): checkpoints are loaded with ``weights_only=True``, so numpy arrays
                and custom objects are refused here, when saved, rather than on resume.
        """
        row = {"epoch": int(epoch), **{k: _scalar(v) for k, v in metrics.items()}}
        was_stopped = self.should_stop
        self._update_progress(epoch, row)
        with tempfile.TemporaryDirectory(prefix="sidforge-ckpt-") as tmp:
            if self.rank == 0:
                state = state_fn()
                _check_plain(state, "state")
                torch.save(state, Path(tmp) / STATE_FILE)
                (Path(tmp) / PROGRESS_FILE).write_text(json.dumps(self._progress.__dict__))
                log.info("%s epoch %d: %s", self._run.name, epoch, _fmt(row))
            if self._local:
                _persist_local(Path(tmp), self._run, epoch)
                if self.rank == 0:
                    for hook in list(_EPOCH_HOOKS):
                        hook(row)
            else:
                import ray.train

                score = self._progress.score
                ckpt = ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None
                ray.train.report({**row, SCORE_KEY: -math.inf if score is None else score}, checkpoint=ckpt,
                                 checkpoint_dir_name=checkpoint_dir_name(epoch))
        if self.should_stop and not was_stopped and self.rank == 0:
            log.info("%s: early stop after epoch %d (best %s at epoch %s)", self._run.name, epoch,
                     self._run.monitor, self._progress.best_epoch)

    def _update_progress(self, epoch: int, row: dict[str, Any]) -> None:
        """Apply rank 0's monitored value, so every rank takes the same early-stopping decision."""
        from ray.train.collective import broadcast_from_rank_zero

        p, run = self._progress, self._run
        value = row.get(run.monitor) if run.monitor else None
        score = None if value is None else (float(value) if run.mode == "max" else -float(value))
        if self.world_size > 1:
            score = broadcast_from_rank_zero(score if self.rank == 0 else None)
        p.epoch, p.score = int(epoch), None
        if self.rank == 0:
            p.history.append(row)
        if score is None or math.isnan(score):
            return
        if p.best_score is None or score > p.best_score:
            p.best_epoch, p.best_score, p.bad_reports, p.score = int(epoch), score, 0, score
        else:
            p.bad_reports += 1
        if run.patience is not None and p.bad_reports >= run.patience:
            p.stopped = True

    # -- helpers for the loop ----------------------------------------------------------------

    def prepare_model(self, model: nn.Module, method: str = "forward") -> nn.Module:
        """Move ``model`` to the device and wrap it for DDP when ``world_size > 1``.

        DDP synchronises gradients only through the wrapper's ``forward``; ``method`` names the model
        method that call runs (e.g. ``"loss"``), so ``prepare_model(m, "loss")(x, y)`` is
        ``m.loss(x, y)`` with gradient sync. ``model`` itself is moved in place: keep using it for
        evaluation and ``state_dict``.
        """
        target: nn.Module = model if method == "forward" else _MethodModule(model, method)
        if self._local:
            return target.to(self.device)
        import ray.train.torch

        return ray.train.torch.prepare_model(target, move_to_device=self.device)

    def shard(self, n: int, seed: int | None = None, even: bool = True) -> np.ndarray:
        """This rank's share of ``range(n)``; see :func:`shard_indices`."""
        return shard_indices(n, self.rank, self.world_size, seed=seed, even=even)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` with one worker)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def replicas_agree(self, model: nn.Module, atol: float = 1e-5) -> bool:
        """True when every rank holds the same parameters (DDP kept the replicas in sync)."""
        with torch.no_grad():
            mine = [float(p.double().sum()) for p in model.parameters()]
        sums = np.asarray(self.all_gather(mine))  # (world_size, n_params)
        return bool(np.allclose(sums, sums[0], atol=atol, rtol=1e-6))


def shard_indices(n: int, rank: int, world_size: int, seed: int | None = None, even: bool = True) -> np.ndarray:
    """Rank ``rank``'s share of ``range(n)`` (every ``world_size``-th index of one shared order).

    Args:
        n: number of examples.
        rank, world_size: this worker and the number of workers.
        seed: shuffle with this seed (the same permutation on every rank); ``None`` keeps the order.
        even: pad by wrapping around so every rank gets ``ceil(n / world_size)`` indices, as DDP needs
            (ranks must take the same number of steps); ``False`` for evaluation, where each index
            must be counted once.
    """
    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    if even and world_size > 1 and n % world_size:
        order = np.concatenate([order, order[: world_size - n % world_size]])
    return order[rank::world_size]


class _MethodModule(nn.Module):
    """Routes ``forward`` to another method of the wrapped model (so DDP hooks run for it)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.method)(*args, **kwargs)


# What torch.load(weights_only=True) reads back. Exact types: a numpy float64 is a float, a defaultdict a
# dict, yet neither loads.
_PLAIN = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple, set)


def _check_plain(obj: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` could not read back (``where`` names the key path)."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) in _MAPPINGS:
        for k, v in obj.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in _SEQUENCES:
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"checkpoint {where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be saved; a "
                        "checkpoint holds tensors and plain values only (torch.from_numpy(a) for an array, float(x) "
                        "for a numpy number, a plain dict for an object)")


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _fmt(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch")


# ----------------------------------------------------------------------------------------------
# In-process persistence


def _epoch_dirs(path: Path) -> dict[int, Path]:
    if not path.is_dir():
        return {}
    found = {}
    for d in path.iterdir():
        m = _EPOCH_DIR.match(d.name)
        if m and (d / PROGRESS_FILE).is_file():
            found[int(m.group(1))] = d
    return found


def _latest_local_checkpoint(path: Path) -> Path | None:
    dirs = _epoch_dirs(path)
    return dirs[max(dirs)] if dirs else None


def _persist_local(src: Path, run: RunSettings, epoch: int) -> None:
    """Move a checkpoint into place atomically, then apply the retention policy."""
    run.path.mkdir(parents=True, exist_ok=True)
    final = run.path / checkpoint_dir_name(epoch)
    tmp = run.path / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    keep = run.checkpoints_to_keep
    dirs = _epoch_dirs(run.path)
    if keep is None or len(dirs) <= keep:
        return
    scores = {}
    for e, d in dirs.items():
        s = json.loads((d / PROGRESS_FILE).read_text()).get("score")
        scores[e] = -math.inf if s is None or not run.monitor else s
    # Like Ray's CheckpointManager: keep the top k by score (newer first among equals) and the latest.
    ranked = sorted(dirs, key=lambda e: (scores[e], e), reverse=True)
    survivors = set(ranked[:keep]) | {max(dirs)}
    for e in set(dirs) - survivors:
        shutil.rmtree(dirs[e], ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Driver side


def fit(
    train_fn: TrainFn,
    loop_config: dict[str, Any],
    scaling: ScalingSettings,
    run: RunSettings,
    *,
    fresh: bool = False,
) -> FitResult:
    """Run ``train_fn(ctx, loop_config)`` on Ray Train workers (or in-process) and collect the result.

    Args:
        train_fn: per-worker function taking a :class:`WorkerContext` and ``loop_config``; it must be
            importable or picklable by the workers (module-level functions of an installed package are).
        loop_config: picklable configuration (and small in-memory data) handed to every worker.
        scaling: workers and resources.
        run: name, storage, retries, retention and early stopping.
        fresh: discard an earlier run of the same name instead of resuming it.

    Returns:
        A :class:`FitResult`.

    Raises:
        ray.train.TrainingFailedError: (distributed) when a worker keeps failing past ``max_failures``;
            in-process, the train function's last exception.
    """
    if fresh:
        remove_run(run)
    entry = _make_entry(train_fn, run, scaling)
    if scaling.num_workers == 0:
        value = _fit_in_process(entry, loop_config, run)
    else:
        value = _fit_distributed(entry, loop_config, scaling, run)
    return _fit_result(value, run)


def _make_entry(train_fn: TrainFn, run: RunSettings, scaling: ScalingSettings) -> Callable[[dict[str, Any]], Any]:
    local = scaling.num_workers == 0
    threads = max(1, int(scaling.cpus_per_worker))

    def _entry(config: dict[str, Any]) -> dict[str, Any]:
        if not local:
            torch.set_num_threads(threads)  # a worker's share of the node, not every core
        ctx = WorkerContext(run, local=local)
        value = train_fn(ctx, config)
        p = ctx._progress
        return {"value": value, "history": p.history, "best_epoch": p.best_epoch, "stopped": p.stopped}

    return _entry


def _trainer(entry: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any], scaling: ScalingSettings,
             run: RunSettings) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    from sidforge.platform.runtime import use_gpu

    n = scaling.num_workers
    gpu = bool(scaling.use_gpu if scaling.use_gpu is not None else (n > 0 and use_gpu(n)))
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    checkpoint_config = ray.train.CheckpointConfig(
        num_to_keep=run.checkpoints_to_keep,
        checkpoint_score_attribute=SCORE_KEY if run.monitor else None,
        checkpoint_score_order="max",
    )
    run_config = ray.train.RunConfig(
        name=run.name,
        storage_path=str(run.path.parent),
        checkpoint_config=checkpoint_config,
        failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
        callbacks=[*run.callbacks, *(_EXTRA_CALLBACKS if scaling.num_workers > 0 else ())] or None,
    )
    scaling_config = ray.train.ScalingConfig(num_workers=n, use_gpu=gpu,
                                             resources_per_worker=resources if n > 0 else None)
    return TorchTrainer(entry, train_loop_config=loop_config, scaling_config=scaling_config, run_config=run_config)


def _fit_distributed(entry: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any],
                     scaling: ScalingSettings, run: RunSettings) -> dict[str, Any]:
    log.info("%s: training on %d workers (storage %s)", run.name, scaling.num_workers, run.path)
    result = _trainer(entry, loop_config, scaling, run).fit()
    return result.return_value


def _fit_in_process(entry: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any],
                    run: RunSettings) -> dict[str, Any]:
    """The train function in this process (plain PyTorch, no Ray Train session), with the checkpoints
    and the retries Ray's FailureConfig gives distributed runs."""
    failures = 0
    while True:
        try:
            return entry(loop_config)
        except Exception as e:
            failures += 1
            if run.max_failures != -1 and failures > run.max_failures:
                raise
            log.warning("%s: attempt %d failed (%s: %s); retrying from the latest checkpoint", run.name,
                        failures, type(e).__name__, e)


def _fit_result(value: dict[str, Any], run: RunSettings) -> FitResult:
    history = value["history"]
    best_epoch = value["best_epoch"] if run.monitor else None
    if best_epoch is None and history:
        best_epoch = history[-1]["epoch"]
    best = next((row for row in history if row["epoch"] == best_epoch), None)

    def folder(epoch: int | None) -> Path | None:
        if epoch is None:
            return None
        d = run.path / checkpoint_dir_name(epoch)
        return d if (d / STATE_FILE).is_file() else None

    return FitResult(history=history, best=best, best_epoch=best_epoch, best_checkpoint=folder(best_epoch),
                     latest_checkpoint=folder(history[-1]["epoch"] if history else None),
                     stopped_early=bool(value["stopped"]), value=value["value"], path=run.path)
