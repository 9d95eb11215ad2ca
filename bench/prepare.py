"""Benchmark of the ``prepare`` stage (Ray Data) against a single-process numpy/pandas baseline.

Cases:
  * ``beauty``: Amazon Beauty 2014 (``configs/amazon-beauty.yaml``, data from ``$SIDFORGE_DATA_DIR``);
  * ``2m`` / ``20m``: synthetic logs over 1 M items, generated once into ``--scratch`` (outside the
    timed region) and read back through ``data.source=table``;
  * ``pandas-2m``: the same re-indexing, split, train counts and co-click logic (the very same pure
    functions of :mod:`sidforge.platform.logs`) on the whole 2 M log in one process, same outputs.

Ray timings exclude cluster start-up: the cluster is started first, then ``prepare.run(..., force=True)``
is timed. Memory is sampled every 0.2 s in a background thread: system-wide used memory
(total - available, minus the value just before the timed region), the summed RSS of this process and
its descendants (the embedded Ray cluster: gcs, raylet, workers, agents; shared object-store pages
are counted once per process that maps them, so this sum over-counts), and ``/dev/shm`` usage (where
the object store lives).

    .venv/bin/python bench/prepare.py                      # everything
    .venv/bin/python bench/prepare.py --sizes 2m --skip-beauty --repeats 1
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
GB = 1024**3
SIZES = {"2m": 2_000_000, "20m": 20_000_000}
NUM_ITEMS = 1_000_000
MEAN_SEQ_LEN = 10.0
MEMORY_TARGET_GB = 12.0
RATIO_TARGET = 2.0

log = logging.getLogger("bench.prepare")


# ----------------------------------------------------------------------------------------------
# memory sampling


def _tree() -> list[psutil.Process]:
    """This process and all its descendants (the embedded Ray cluster)."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _system_used() -> int:
    vm = psutil.virtual_memory()
    return vm.total - vm.available


def _system_busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def _shm_used() -> int:
    try:
        return shutil.disk_usage("/dev/shm").used
    except OSError:
        return 0


def settle(timeout_s: float = 15.0, tolerance: int = 64 * 1024**2) -> None:
    """Wait (up to ``timeout_s``) until used memory and /dev/shm stop shrinking, so that a run's
    baseline is not inflated by the previous run's objects still being freed."""
    gc.collect()
    deadline = time.monotonic() + timeout_s
    last = _system_used() + _shm_used()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _system_used() + _shm_used()
        if now > last - tolerance:
            return
        last = now


@dataclass
class Peaks:
    system_base_gb: float = 0.0
    system_peak_delta_gb: float = 0.0
    tree_rss_base_gb: float = 0.0
    tree_rss_peak_gb: float = 0.0
    shm_peak_delta_gb: float = 0.0
    own_cpu_cores: float = 0.0  # mean cores used by this process tree
    other_cpu_cores: float = 0.0  # mean cores used by everything else on the host (contention)
    samples: int = 0


class Sampler:
    """Background thread sampling memory (and CPU use) every ``interval`` seconds; see :attr:`peaks`."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._sys_base = self._shm_base = 0
        self._sys_peak = self._rss_peak = self._shm_peak = 0
        self._cpu0: dict[int, float] = {}
        self._cpu: dict[int, float] = {}  # last CPU seconds seen per pid (kept after a process exits)
        self._busy0 = self._t0 = 0.0

    def __enter__(self) -> Sampler:
        self._sys_base, self._shm_base = _system_used(), _shm_used()
        self._sample()
        self._cpu0 = dict(self._cpu)
        self.peaks.tree_rss_base_gb = self._rss_peak / GB
        self._busy0, self._t0 = _system_busy_s(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = max(time.perf_counter() - self._t0, 1e-9)
        own = sum(self._cpu.values()) - sum(self._cpu0.values())
        p = self.peaks
        p.system_base_gb = self._sys_base / GB
        p.system_peak_delta_gb = (self._sys_peak - self._sys_base) / GB
        p.tree_rss_peak_gb = self._rss_peak / GB
        p.shm_peak_delta_gb = (self._shm_peak - self._shm_base) / GB
        p.own_cpu_cores = round(own / wall, 2)
        p.other_cpu_cores = round(max(0.0, (_system_busy_s() - self._busy0 - own) / wall), 2)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        rss = 0
        for proc in _tree():
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    t = proc.cpu_times()
                    self._cpu[proc.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self._rss_peak = max(self._rss_peak, rss)
        self._sys_peak = max(self._sys_peak, _system_used())
        self._shm_peak = max(self._shm_peak, _shm_used())
        self.peaks.samples += 1


# ----------------------------------------------------------------------------------------------
# Ray Data execution log capture (per-dataset and per-operator times)

_START_RE = re.compile(r"Starting execution of Dataset (\S+?)\.")
_PLAN_RE = re.compile(r"Execution plan of Dataset (\S+): (.*)")
_OP_DONE_RE = re.compile(r"Operator (.+?) completed\. Operator Metrics:")
_DONE_RE = re.compile(r"Dataset (\S+) execution finished in ([\d.]+) seconds")
_METRICS = {
    "task_s": re.compile(r"'task_completion_time_s': ([\d.e+-]+)"),
    "tasks": re.compile(r"'num_tasks_finished': (\d+)"),
    "max_task_uss_gb": re.compile(r"'max_uss_bytes': \{[^}]*'max': (\d+)"),
    "out_gb": re.compile(r"'bytes_task_outputs_generated': (\d+)"),
}


class DataLogCapture(logging.Handler):
    """Collects the streaming executor's log lines into a timeline.

    For each executed dataset: its plan and wall time, and for each operator the second (from the
    dataset's start) at which it completed, its summed task time, the largest task USS and its output.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.datasets: list[dict[str, Any]] = []
        self._start: dict[str, float] = {}
        self._plans: dict[str, str] = {}
        self._ops: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.endswith("streaming_executor"):
            return
        msg = record.getMessage()
        if m := _START_RE.search(msg):
            self._start[m.group(1)] = record.created
            self._ops = []
        elif m := _PLAN_RE.search(msg):
            self._plans[m.group(1)] = m.group(2)
        elif (m := _OP_DONE_RE.search(msg)) and "InputDataBuffer" not in m.group(1):
            self._ops.append({"op": m.group(1), "done_at_s": record.created, **_metrics_of(msg)})
        elif m := _DONE_RE.search(msg):
            start = self._start.get(m.group(1), record.created - float(m.group(2)))
            for op in self._ops:
                op["done_at_s"] = round(op["done_at_s"] - start, 2)
            plan = self._plans.get(m.group(1)) or " -> ".join(op["op"] for op in self._ops)
            plan = plan.replace("InputDataBuffer[Input] -> ", "").replace("TaskPoolMapOperator", "")
            self.datasets.append({"dataset": m.group(1), "wall_s": float(m.group(2)), "plan": plan,
                                  "operators": self._ops})
            self._ops = []

    @contextmanager
    def attached(self) -> Iterator[DataLogCapture]:
        """Listen to ``ray.data`` at DEBUG (operator metrics) while keeping its console output at WARNING."""
        logger = logging.getLogger("ray.data")
        level = logger.level
        consoles = {h: h.level for h in logger.handlers if isinstance(h, logging.StreamHandler)
                    and getattr(h, "stream", None) in (sys.stderr, sys.stdout)}
        for h in consoles:
            h.setLevel(logging.WARNING)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
            for h, lvl in consoles.items():
                h.setLevel(lvl)


def _metrics_of(msg: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, rx in _METRICS.items():
        if m := rx.search(msg):
            value = float(m.group(1))
            out[key] = round(value / GB, 3) if key.endswith("_gb") else round(value, 2)
    return out


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class Run:
    wall_s: float
    resources: Peaks
    rows: dict[str, int]
    steps: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Case:
    name: str
    kind: str  # "ray" or "pandas"
    interactions: int
    params: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        walls = [r.wall_s for r in self.runs]
        return {
            "wall_s_median": round(statistics.median(walls), 2) if walls else None,
            "wall_s_all": [round(w, 2) for w in walls],
            "system_peak_delta_gb": _max_of(self.runs, "system_peak_delta_gb"),
            "tree_rss_peak_gb": _max_of(self.runs, "tree_rss_peak_gb"),
            "shm_peak_delta_gb": _max_of(self.runs, "shm_peak_delta_gb"),
            "other_cpu_cores_max": _max_of(self.runs, "other_cpu_cores"),
        }

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "interactions": self.interactions, "params": self.params,
                "summary": self.summary(), "error": self.error, "runs": [asdict(r) for r in self.runs]}


def _max_of(runs: list[Run], attr: str) -> float | None:
    return round(max(getattr(r.resources, attr) for r in runs), 2) if runs else None


# ----------------------------------------------------------------------------------------------
# inputs


def synthetic_config(size: int) -> Any:
    from sidforge.platform.config import SyntheticConfig

    return SyntheticConfig(num_users=int(size / MEAN_SEQ_LEN), num_items=NUM_ITEMS, num_clusters=1000,
                           mean_seq_len=MEAN_SEQ_LEN, min_seq_len=5, feature_dim=8, seed=0)


def ensure_synthetic(size_name: str, scratch: Path) -> tuple[Path, Path, float]:
    """Generate (once) the shards and the items table; returns (interactions folder, items file, gen s)."""
    from sidforge.platform.synthetic import write_synthetic

    cfg = synthetic_config(SIZES[size_name])
    folder = scratch / f"synthetic-{size_name}"
    inter, items, marker = folder / "interactions", folder / "items.parquet", folder / "config.json"
    wanted = json.dumps(asdict(cfg), sort_keys=True)
    if marker.is_file() and marker.read_text() == wanted and items.is_file():
        return inter, items, 0.0
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    source = write_synthetic(cfg, inter)
    assert source.items is not None
    pq.write_table(source.items, items)
    marker.write_text(wanted)
    return inter, items, time.perf_counter() - t0


def table_config(scratch: Path, tag: str, inter: Path, items: Path, partitions: int,
                 overrides: list[str] | None = None) -> Any:
    from sidforge.platform.config import load_config

    return load_config(None, [f"run_dir={scratch / 'runs' / tag}", "data.source=table",
                              f"data.interactions={inter}", f"data.items={items}",
                              f"prepare.num_partitions={partitions}", *(overrides or [])])


def count_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(folder.glob("*.parquet")))


# ----------------------------------------------------------------------------------------------
# the Ray path


def _spilled_mib() -> float | None:
    """Object-store bytes spilled to disk so far in this cluster (None if unavailable)."""
    try:
        import ray
        from ray._private.internal_api import memory_summary

        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception:  # noqa: BLE001 - diagnostics only
        return None
    m = re.search(r"Spilled (\d+) MiB", text)
    return float(m.group(1)) if m else 0.0


# driver-side functions of the stage whose wall time is recorded (wrapped in the driver only; Ray
# workers import the module afresh, so the UDFs run unwrapped)
PROFILED = ("load_source", "_input_fingerprints", "_vocabularies", "_side_outputs", "_collect", "_coclicks",
            "sum_pairs", "finalize_coclicks", "popularity_buckets", "_items_output", "_summary", "fingerprint_tree")


@contextmanager
def profile_stage(names: tuple[str, ...] = PROFILED) -> Iterator[dict[str, float]]:
    """Temporarily wrap functions of ``sidforge.stages.prepare`` to sum their wall time."""
    import functools

    from sidforge.stages import prepare

    times: dict[str, float] = {}
    originals = {n: getattr(prepare, n) for n in names if callable(getattr(prepare, n, None))}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] = round(times.get(name, 0.0) + time.perf_counter() - t0, 3)

        return timed

    for name, fn in originals.items():
        setattr(prepare, name, wrap(name, fn))
    try:
        yield times
    finally:
        for name, fn in originals.items():
            setattr(prepare, name, fn)


def run_ray_case(case: Case, cfg: Any, data_dir: Path, repeats: int, capture: DataLogCapture) -> None:
    from sidforge.platform.artifacts import RunDir
    from sidforge.stages import prepare

    for i in range(repeats):
        settle()
        capture.datasets = []
        spilled0 = _spilled_mib()
        load0 = os.getloadavg()[0]
        with profile_stage() as driver_times, Sampler() as mem:
            t0 = time.perf_counter()
            res = prepare.run(cfg, RunDir(cfg.run_dir), data_dir, force=True)
            wall = time.perf_counter() - t0
        spilled1 = _spilled_mib()
        steps = list(capture.datasets)
        extra = {"loadavg_before": round(load0, 2), "loadavg_after": round(os.getloadavg()[0], 2),
                 "spilled_mib": None if spilled0 is None or spilled1 is None else spilled1 - spilled0,
                 "ray_data_s": round(sum(s["wall_s"] for s in steps), 2), "stage_functions_s": driver_times}
        case.runs.append(Run(wall, mem.peaks, dict(res.rows), steps, extra))
        log.info("%s run %d/%d: %.1f s, +%.2f GB system, %.2f GB tree RSS", case.name, i + 1, repeats, wall,
                 mem.peaks.system_peak_delta_gb, mem.peaks.tree_rss_peak_gb)


# ----------------------------------------------------------------------------------------------
# the single-process baseline


class Phases:
    """Wall time of named phases."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._t, 3)
        self._t = now


def _read_interactions(files: list[str], order: str) -> pa.Table:
    table = pa.concat_tables([pq.read_table(f, columns=["user_id", "item_id", order]) for f in files])
    valid = pc.and_(pc.and_(pc.is_valid(table["user_id"]), pc.is_valid(table["item_id"])),
                    pc.is_valid(table[order]))
    return table if pc.all(valid).as_py() else table.filter(valid)


def _rejects_table(src_user: np.ndarray, src_item: np.ndarray, order: np.ndarray, index: np.ndarray,
                   reason: str) -> pa.Table:
    from sidforge.platform.schemas import REJECTS

    n = len(index)
    return pa.table({
        "source": pa.array(np.full(n, "interactions"), pa.string()),
        "user_id": pa.array(src_user[index]).cast(pa.string()),
        "item_id": pa.array(src_item[index]).cast(pa.string()),
        "order": pa.array(order[index]).cast(pa.string()),
        "reason": pa.array(np.full(n, reason), pa.string()),
    }, schema=REJECTS)


def pandas_prepare(cfg: Any, out: Path) -> tuple[dict[str, int], dict[str, float]]:
    """The prepare logic in one process: same adapter, same pure functions, same output files."""
    from sidforge.platform.adapters import load_table
    from sidforge.platform.logs import (
        SPLIT_NAMES,
        TRAIN,
        choose_cold_items,
        coclick_counts,
        finalize_coclicks,
        order_and_split,
    )
    from sidforge.platform.metrics import popularity_buckets
    from sidforge.platform.schemas import COCLICKS, ITEM_STATS
    from sidforge.stages.prepare import _items_output  # the stage's own (pure, Ray-free) item re-ordering

    p, cc = cfg.prepare, cfg.prepare.coclick
    ph = Phases()
    source = load_table(Path(cfg.data.interactions), Path(cfg.data.items) if cfg.data.items else None)
    ph.mark("load_adapter")
    table = _read_interactions(list(source.interactions), source.order)
    src_user = table["user_id"].to_numpy()
    src_item = table["item_id"].to_numpy()
    order = table[source.order].to_numpy()
    ph.mark("read")
    users, user = np.unique(src_user, return_inverse=True)
    item_ids = [src_item] + ([source.items["item_id"].to_numpy()] if source.items is not None else [])
    items = np.unique(np.concatenate(item_ids))
    item = np.searchsorted(items, src_item)
    ph.mark("reindex")
    cold = choose_cold_items(len(items), p.cold_item_fraction, cfg.seed)
    res = order_and_split(user, item, order, p.min_seq_len, cold_items=cold)
    ph.mark("order_and_split")
    out.mkdir(parents=True, exist_ok=True)
    (out / "interactions").mkdir(exist_ok=True)
    pq.write_table(pa.table({"user_id": res.user, "item_id": res.item, "position": res.position,
                             "split": SPLIT_NAMES[res.split]}), out / "interactions" / "part-0.parquet")
    ph.mark("write_interactions")
    train = res.split == TRAIN
    counts = np.bincount(res.item[train], minlength=len(items)).astype(np.int64)
    buckets = popularity_buckets(counts)
    pq.write_table(pa.table({"item_id": np.arange(len(items), dtype=np.int64), "train_count": counts,
                             "bucket": buckets, "cold_holdout": cold}, schema=ITEM_STATS),
                   out / "item_stats.parquet")
    ph.mark("item_stats")
    a, b, c = coclick_counts(res.user[train], res.item[train], cc.window)
    ph.mark("coclick_counts")
    pairs = finalize_coclicks(a, b, c, counts, min_count=cc.min_count, pop_alpha=cc.pop_alpha,
                              max_per_item=cc.max_per_item, holdout_fraction=cc.holdout_fraction, seed=cfg.seed)
    pq.write_table(pa.table(pairs, schema=COCLICKS), out / "cocliks.parquet")
    ph.mark("finalize_coclicks")
    item_table, item_rejects = _items_output(pa.array(items), source.items)
    pq.write_table(item_table, out / "items.parquet")
    pq.write_table(pa.table({"user_id": np.arange(len(users), dtype=np.int64), "source_id": users}),
                   out / "users.parquet")
    rejects = pa.concat_tables([_rejects_table(src_user, src_item, order, res.dup_index, "duplicate_interaction"),
                                _rejects_table(src_user, src_item, order, res.short_index, "short_sequence"),
                                item_rejects])
    pq.write_table(rejects, out / "rejects.parquet")
    ph.mark("items_users_rejects")
    split_counts = np.bincount(res.split, minlength=len(SPLIT_NAMES))
    rows = {"users": len(np.unique(res.user)), "users_seen": len(users), "items": len(items),
            "interactions": len(res.user),
            **{f"split_{SPLIT_NAMES[k]}": int(v) for k, v in enumerate(split_counts) if v},
            "cocliks": len(pairs["item_a"]), "rejects": rejects.num_rows}
    return rows, ph.times


def run_pandas_case(case: Case, cfg: Any, scratch: Path, repeats: int) -> None:
    out = scratch / "runs" / "pandas-2m"
    for i in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        settle()
        with Sampler() as mem:
            t0 = time.perf_counter()
            rows, phases = pandas_prepare(cfg, out)
            wall = time.perf_counter() - t0
        case.runs.append(Run(wall, mem.peaks, rows, [{"phase": k, "wall_s": v} for k, v in phases.items()]))
        log.info("%s run %d/%d: %.1f s, +%.2f GB system", case.name, i + 1, repeats, wall,
                 mem.peaks.system_peak_delta_gb)


# ----------------------------------------------------------------------------------------------
# driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2m,20m", help="comma-separated synthetic sizes: 2m, 20m (or 'none')")
    ap.add_argument("--skip-beauty", action="store_true", help="skip the Amazon Beauty case")
    ap.add_argument("--skip-baseline", action="store_true", help="skip the single-process baseline at 2m")
    ap.add_argument("--repeats", type=int, default=3, help="runs per small case (Beauty, 2m); the median is reported")
    ap.add_argument("--repeats-20m", type=int, default=1, help="runs of the 20m case")
    ap.add_argument("--partitions-2m", default="4,8,16", help="prepare.num_partitions values tried at 2m")
    ap.add_argument("--partitions-20m", default="16,32", help="prepare.num_partitions values tried at 20m")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for the synthetic cases, e.g. prepare.driver_merge_rows=0")
    ap.add_argument("--ctx", action="append", default=[], metavar="KEY=VALUE",
                    help="set a ray.data DataContext attribute after start-up, e.g. use_datasource_v2=False")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/sidforge-bench"), help="synthetic data and runs")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("SIDFORGE_DATA_DIR", "/work/shared/data")))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prepare.json")
    args = ap.parse_args(argv)
    args.sizes = [] if args.sizes == "none" else [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    unknown = set(args.sizes) - set(SIZES)
    if unknown:
        ap.error(f"unknown size(s) {sorted(unknown)}; choose from {sorted(SIZES)}")
    args.partitions_2m = [int(x) for x in args.partitions_2m.split(",")]
    args.partitions_20m = [int(x) for x in args.partitions_20m.split(",")]
    return args


WATCHED = ("sidforge/stages/prepare.py", "sidforge/platform/logs.py", "sidforge/platform/adapters.py",
           "sidforge/platform/config.py", "sidforge/platform/runtime.py", "sidforge/platform/metrics.py")


def code_fingerprint() -> dict[str, str]:
    """sha256 (12 hex) of the stage's source files: Ray workers import them afresh, so an edit made
    during a run mixes two versions; cases measured while the code changed are flagged."""
    import hashlib

    return {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:12] for f in WATCHED if (REPO / f).is_file()}


def apply_data_context(settings: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` DataContext settings (values parsed as Python literals, else strings)."""
    import ast

    from ray.data import DataContext

    ctx = DataContext.get_current()
    applied: dict[str, Any] = {}
    for item in settings:
        key, _, raw = item.partition("=")
        if not hasattr(ctx, key.strip()):
            raise SystemExit(f"--ctx {item!r}: DataContext has no attribute {key.strip()!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        setattr(ctx, key.strip(), value)
        applied[key.strip()] = value
    return applied


def environment() -> dict[str, Any]:
    import ray

    vm = psutil.virtual_memory()
    return {"python": platform.python_version(), "ray": ray.__version__, "cpus": os.cpu_count(),
            "memory_gb": round(vm.total / GB, 1), "shm_gb": round(shutil.disk_usage("/dev/shm").total / GB, 1),
            "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code_fingerprint()}


class Report:
    """Accumulates cases and rewrites the JSON after each one (partial results survive a crash)."""

    def __init__(self, path: Path, env: dict[str, Any]) -> None:
        self.path, self.env = path, env
        self.cases: list[Case] = []
        self.inputs: dict[str, Any] = {}

    def add(self, case: Case) -> None:
        self.cases.append(case)
        self.save()

    def comparison(self) -> dict[str, Any]:
        base = next((c for c in self.cases if c.kind == "pandas" and c.runs), None)
        ray_2m = [c for c in self.cases if c.kind == "ray" and c.name.startswith("2m") and c.runs]
        if base is None or not ray_2m:
            return {}
        base_wall = base.summary()["wall_s_median"]
        ratios = {c.name: round(c.summary()["wall_s_median"] / base_wall, 2) for c in ray_2m}
        best = min(ratios, key=ratios.__getitem__)
        same = all(_same_rows(c.runs[0].rows, base.runs[0].rows) for c in ray_2m)
        return {"pandas_2m_wall_s": base_wall, "ray_over_pandas": ratios, "best": best,
                "best_ratio": ratios[best], "within_target": ratios[best] <= RATIO_TARGET,
                "outputs_agree": same}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": self.env, "inputs": self.inputs,
                   "targets": {"memory_gb_20m": MEMORY_TARGET_GB, "ray_over_pandas_2m": RATIO_TARGET},
                   "comparison": self.comparison(), "cases": [c.to_json() for c in self.cases]}
        self.path.write_text(json.dumps(payload, indent=2, default=str))


_ROW_KEYS = ("users", "items", "interactions", "split_train", "split_valid", "split_test", "cocliks")


def _same_rows(a: dict[str, int], b: dict[str, int]) -> bool:
    return all(a.get(k) == b.get(k) for k in _ROW_KEYS)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(cases: list[Case]) -> str:
    header = ("case", "kind", "interactions", "partitions", "runs", "wall s (median)", "sys +GB", "tree RSS GB",
              "shm +GB", "other CPU", "status")
    rows = []
    for c in cases:
        s = c.summary()
        status = "ERROR: " + (c.error or "")[:60] if c.error else "ok"
        if c.name.startswith("20m") and not c.error and s["system_peak_delta_gb"] is not None:
            status = "ok (<12 GB)" if s["system_peak_delta_gb"] < MEMORY_TARGET_GB else "OVER 12 GB"
        if c.params.get("code_changed_during_run"):
            status += " (code changed mid-run)"
        rows.append((c.name, c.kind, f"{c.interactions:,}", str(c.params.get("num_partitions", "-")),
                     str(len(c.runs)), _fmt(s["wall_s_median"]), _fmt(s["system_peak_delta_gb"]),
                     _fmt(s["tree_rss_peak_gb"]), _fmt(s["shm_peak_delta_gb"]),
                     _fmt(s["other_cpu_cores_max"]), status))
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_steps(case: Case) -> str:
    """The first run's steps: baseline phases, or Ray Data executions with their operators."""
    if not case.runs or not case.runs[0].steps:
        return ""
    run = case.runs[0]
    total = f", Ray Data total {run.extra['ray_data_s']} s" if "ray_data_s" in run.extra else ""
    lines = [f"{case.name} (run 1: {run.wall_s:.1f} s wall{total})"]
    if funcs := run.extra.get("stage_functions_s"):
        lines.append("  stage functions (driver, cumulative, nested): "
                     + ", ".join(f"{k} {v:.1f}s" for k, v in funcs.items()))
    for s in run.steps:
        if "phase" in s:
            lines.append(f"  {s['wall_s']:7.2f} s  {s['phase']}")
            continue
        lines.append(f"  {s['wall_s']:7.2f} s  dataset: {s['plan'][:120]}")
        for o in s["operators"]:
            uss = o.get("max_task_uss_gb")
            lines.append(f"             done at {o['done_at_s']:6.2f} s  tasks={o.get('tasks', '-'):>3}  "
                         f"task-s={o.get('task_s', 0):6.1f}  out={o.get('out_gb', 0):.2f} GB  "
                         f"max-task-USS={'-' if uss is None else f'{uss:.2f} GB'}  {o['op'][:70]}")
    return "\n".join(lines)


def guarded(case: Case, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a failed case is reported, the others still run
        log.exception("%s failed", case.name)
        case.error = f"{type(e).__name__}: {e}"


def ray_plan(args: argparse.Namespace, inputs: dict[str, tuple[Path, Path]], gen: dict[str, Any],
             data_context: dict[str, Any]) -> list[tuple[Case, Any, int]]:
    """The Ray cases to run, in order: (case, config, repeats)."""
    plan: list[tuple[Case, Any, int]] = []
    if not args.skip_beauty:
        from sidforge.platform.config import load_config

        cfg = load_config(REPO / "configs" / "amazon-beauty.yaml", [f"run_dir={args.scratch / 'runs' / 'beauty'}"])
        plan.append((Case("beauty", "ray", 198_502, {"num_partitions": cfg.prepare.num_partitions}),
                     cfg, args.repeats))
    for size in args.sizes:
        for n in args.partitions_2m if size == "2m" else args.partitions_20m:
            cfg = table_config(args.scratch, f"{size}-p{n}", *inputs[size], partitions=n, overrides=args.overrides)
            params = {"num_partitions": n, **({"overrides": args.overrides} if args.overrides else {}),
                      **({"data_context": data_context} if data_context else {})}
            plan.append((Case(f"{size}-p{n}", "ray", gen[size]["interactions"], params), cfg,
                         args.repeats if size == "2m" else args.repeats_20m))
    return plan


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    from sidforge.platform.runtime import init_ray

    inputs: dict[str, tuple[Path, Path]] = {}
    gen: dict[str, Any] = {}
    for size in args.sizes:
        inter, items, secs = ensure_synthetic(size, args.scratch)
        inputs[size] = (inter, items)
        gen[size] = {"interactions": count_rows(inter), "folder": str(inter.parent),
                     "generated_s": round(secs, 1), "config": asdict(synthetic_config(SIZES[size]))}
        log.info("synthetic %s: %s interactions in %s (generated in %.1f s)", size,
                 f"{gen[size]['interactions']:,}", inter, secs)

    cases: list[Case] = []
    if "2m" in args.sizes and not args.skip_baseline:
        # before the cluster starts: the baseline's memory is this process alone
        cfg = table_config(args.scratch, "pandas-2m", *inputs["2m"], partitions=1)
        case = Case("pandas-2m", "pandas", gen["2m"]["interactions"], {"num_partitions": 1})
        guarded(case, lambda: run_pandas_case(case, cfg, args.scratch, args.repeats))
        cases.append(case)

    init_ray()
    from ray.data import DataContext

    DataContext.get_current().print_on_execution_start = True  # plan lines for the timeline (logging only)
    data_context = apply_data_context(args.ctx)
    report = Report(args.out, {**environment(), "data_context": data_context})
    report.inputs = gen
    for c in cases:
        report.add(c)
    capture = DataLogCapture()
    with capture.attached():
        plan = ray_plan(args, inputs, gen, data_context)
        for case, cfg, repeats in plan:
            before = code_fingerprint()
            guarded(case, lambda case=case, cfg=cfg, repeats=repeats:
                    run_ray_case(case, cfg, args.data_dir, repeats, capture))
            if code_fingerprint() != before:
                case.params["code_changed_during_run"] = True
                log.warning("%s: the stage's source changed during the run; its numbers mix versions", case.name)
            report.add(case)

    print()
    print(format_table(report.cases))
    comp = report.comparison()
    if comp:
        print(f"\nRay / pandas at 2m: {comp['ray_over_pandas']} (best {comp['best']} = {comp['best_ratio']}x; "
              f"target <= {RATIO_TARGET}x); outputs agree: {comp['outputs_agree']}")
    for c in report.cases:
        if text := format_steps(c):
            print("\n" + text)
    print(f"\nwrote {args.out}")
    return 0 if all(c.error is None for c in report.cases) else 1


if __name__ == "__main__":
    sys.exit(main())
