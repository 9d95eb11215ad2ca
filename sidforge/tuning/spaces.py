"""Search spaces declared in YAML (``spaces/*.yaml``), validated once, turned into Ray Tune spaces.

A space names the stages a trial runs, the validation metric to select on, the search algorithm, the
scheduler and the parameters, each a dotted config path with one distribution::

    name: savior-enc
    stages: [prepare, embed, align]     # run in order; the last one's epochs are reported to Tune
    metric: valid/hit@30                # a key the last stage reports each epoch (validation only)
    mode: max
    search: optuna                      # optuna | random | grid
    num_samples: 16
    max_concurrent: 2
    trial_cpus: 0.5                     # CPUs a trial holds (stages may start Ray Data tasks besides)
    scheduler: {type: asha, grace_period: 3, reduction_factor: 2}
    params:
      align.temperature: {loguniform: [0.02, 0.3]}
      align.hidden: {choice: [256, 512, 1024]}
      prepare.coclick.window: {randint: [2, 6]}      # upper bound exclusive
    extra_metrics: []                   # other (validation-side) keys kept in the results table
    pareto: null                        # {x: <key>, x_label: ...}: a quality-vs-x Pareto plot

Every parameter path must exist in :class:`~sidforge.platform.config.Config`, and every value a
distribution can draw must be accepted by it: both are checked when the space is loaded (errors name
the parameter), not when the first trial starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sidforge.platform.config import Config, ConfigError, load_config

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
# stages a space may name; sidforge.tuning.sweep.register_stage adds more
STAGE_NAMES = {"prepare", "embed", "sasrec", "align", "tokenize", "ranker", "generative"}


@dataclass(frozen=True)
class Param:
    """One swept config field: ``kind`` in :data:`DISTRIBUTIONS` and its arguments."""

    path: str
    kind: str
    args: tuple[Any, ...]

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    def candidates(self) -> list[Any]:
        """Values worth checking against the config: bounds, or every choice."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def to_tune(self, grid: bool) -> Any:
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        if self.kind == "grid" or (grid and self.kind == "choice"):
            return tune.grid_search(list(self.args))
        return tune.choice(list(self.args))


@dataclass(frozen=True)
class Scheduler:
    type: Literal["asha", "none"] = "asha"
    grace_period: int = 2
    reduction_factor: int = 2
    max_t: int = 0  # 0: the last stage's epoch budget


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (see the module doc)."""

    name: str
    stages: tuple[str, ...]
    metric: str
    mode: Literal["max", "min"]
    params: tuple[Param, ...]
    search: Literal["optuna", "random", "grid"] = "optuna"
    num_samples: int = 16
    max_concurrent: int = 2
    trial_cpus: float = 1.0
    scheduler: Scheduler = field(default_factory=Scheduler)
    extra_metrics: tuple[str, ...] = ()
    pareto: dict[str, str] | None = None

    @property
    def stage(self) -> str:
        """The stage whose epochs are reported (the last one)."""
        return self.stages[-1]

    def tune_space(self) -> dict[str, Any]:
        """``{param path: Tune distribution}``."""
        return {p.path: p.to_tune(grid=self.search == "grid") for p in self.params}


def _parse_param(path: str, spec: Any) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"space param {path!r}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"space param {path!r}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"space param {path!r}: {kind} needs a list, e.g. {{{kind}: [low, high]}}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"space param {path!r}: {kind} needs [low, high] numbers, got {args}")
        low, high = args
        if not low < high:
            raise ConfigError(f"space param {path!r}: {kind} needs low < high, got {args}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"space param {path!r}: loguniform needs low > 0, got {low}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"space param {path!r}: randint needs integers [low, high) , got {args}")
    return Param(path=path, kind=kind, args=tuple(args))


def load_space(path: str | Path, config_path: str | Path | None = None) -> SearchSpace:
    """Read and validate ``spaces/NAME.yaml``; with ``config_path``, check every value against the config.

    Raises:
        ConfigError: naming the field or parameter that is wrong and how to fix it.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    known = {f.name for f in dataclasses.fields(SearchSpace)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{p}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
    for key in ("name", "stages", "metric", "params"):
        if key not in raw:
            raise ConfigError(f"{p}: {key!r} is required")
    stages = tuple(raw["stages"])
    bad = [s for s in stages if s not in STAGE_NAMES]
    if not stages or bad:
        raise ConfigError(f"{p}: stages must be a non-empty list of {', '.join(sorted(STAGE_NAMES))}; "
                          f"got {bad or stages}")
    if not isinstance(raw["params"], dict) or not raw["params"]:
        raise ConfigError(f"{p}: params must map dotted config paths to distributions")
    params = tuple(_parse_param(k, v) for k, v in raw["params"].items())
    sched = raw.get("scheduler") or {}
    try:
        scheduler = Scheduler(**sched)
    except TypeError as e:
        raise ConfigError(f"{p}: scheduler: {e}") from None
    if scheduler.type not in ("asha", "none") or scheduler.grace_period < 1 or scheduler.reduction_factor < 2:
        raise ConfigError(f"{p}: scheduler needs type asha|none, grace_period >= 1, reduction_factor >= 2")
    space = SearchSpace(
        name=str(raw["name"]), stages=stages, metric=str(raw["metric"]), mode=raw.get("mode", "max"),
        params=params, search=raw.get("search", "optuna"), num_samples=int(raw.get("num_samples", 16)),
        max_concurrent=int(raw.get("max_concurrent", 2)), trial_cpus=float(raw.get("trial_cpus", 1.0)),
        scheduler=scheduler, extra_metrics=tuple(raw.get("extra_metrics") or ()), pareto=raw.get("pareto"))
    if space.mode not in ("max", "min") or space.search not in ("optuna", "random", "grid"):
        raise ConfigError(f"{p}: mode must be max|min and search optuna|random|grid")
    if space.num_samples < 1 or space.max_concurrent < 1 or space.trial_cpus <= 0:
        raise ConfigError(f"{p}: num_samples and max_concurrent must be >= 1 and trial_cpus > 0")
    if space.search == "grid" and any(q.kind not in ("choice", "grid") for q in params):
        raise ConfigError(f"{p}: search: grid needs every param to be a choice or grid list")
    if space.pareto is not None and "x" not in space.pareto:
        raise ConfigError(f"{p}: pareto needs an x metric, e.g. {{x: avg_sid_length}}")
    if config_path is not None:
        check_against_config(space, config_path)
    return space


def check_against_config(space: SearchSpace, config_path: str | Path | None) -> None:
    """Every parameter exists in the config and every candidate value (bounds, choices) is accepted."""
    base = load_config(config_path)
    for param in space.params:
        node: Any = base
        for part in param.path.split("."):
            if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                raise ConfigError(f"space param {param.path!r}: no such config field ({part!r} unknown)")
            node = getattr(node, part)
        if isinstance(node, int) and not isinstance(node, bool) and param.kind in ("uniform", "loguniform"):
            raise ConfigError(f"space param {param.path!r}: the config field is an integer; use randint or "
                              f"integer choices, not {param.kind} (it draws floats)")
        for value in param.candidates():
            try:
                load_config(config_path, values={param.path: value})
            except ConfigError as e:
                raise ConfigError(f"space param {param.path!r}: value {value!r} is rejected by the config: {e}") \
                    from None


def apply_params(cfg_path: str | Path | None, overrides: list[str], params: dict[str, Any]) -> Config:
    """The trial's config: the YAML, the command-line overrides, then the sampled values, unchanged."""
    return load_config(cfg_path, overrides, values=params)
