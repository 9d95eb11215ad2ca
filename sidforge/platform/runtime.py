"""Ray runtime glue: start an embedded local cluster or join an existing one, quietly.

The CLI calls :func:`init_ray` once. With no address (and no ``RAY_ADDRESS``) it starts an
embedded single-machine cluster; with one it joins that cluster. Environment defaults that keep
Ray's log noise away from the user are set before ``ray`` is imported, so workers inherit them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# Defaults only: anything the user exported wins.
_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_env() -> None:
    """Set the environment defaults that keep Ray quiet (call before importing ray)."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int | None = None,
    include_dashboard: bool = False,
    extra_resources: dict[str, float] | None = None,
) -> Any:
    """Start or join a Ray cluster and tune Ray Data for this machine.

    Args:
        address: cluster address (``ray://…``, ``host:port`` or ``auto``); defaults to
            ``RAY_ADDRESS``; when neither is set an embedded local cluster is started.
        num_cpus: CPUs of the embedded cluster (ignored when joining).
        object_store_mb: object store size of the embedded cluster (ignored when joining).
        include_dashboard: the dashboard is needed only for ``ray job submit`` and ``serve deploy``.
        extra_resources: custom resources of the embedded cluster (e.g. ``train_driver`` for Tune).

    Returns:
        The ``ray`` context object.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    if local:
        # A fresh embedded cluster is private to this process; token auth is for shared clusters.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    quiet_env()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if local:
        kwargs.update(address="local", include_dashboard=include_dashboard)
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if object_store_mb is not None:
            kwargs["object_store_memory"] = int(object_store_mb) * 1024 * 1024
        if extra_resources:
            kwargs["resources"] = dict(extra_resources)
    else:
        kwargs["address"] = address
    ctx = ray.init(**kwargs)
    configure_data_context()
    log.info("Ray %s: %s", "started locally" if local else f"joined {address}", ray.cluster_resources())
    return ctx


def configure_data_context(shuffle_partitions: int | None = None) -> None:
    """Ray Data defaults sized for the cluster: shuffle partitions track the CPU count."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "1") != "1"
    if not ctx.enable_progress_bars:  # off on purpose: no "Progress bars disabled" warning on every run
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx.print_on_execution_start = False
    if hasattr(ctx, "use_datasource_v2"):  # 2.60's new Parquet reader lists files in an actor: ~2 s per read
        ctx.use_datasource_v2 = False
    ctx.enable_auto_log_stats = False
    for name in ("ray.data", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cpus = int(ray.cluster_resources().get("CPU", 2)) if ray.is_initialized() else 2
    ctx.default_hash_shuffle_parallelism = shuffle_partitions or max(4, 2 * cpus)
    ctx.read_op_min_num_blocks = max(4, 2 * cpus)


def use_gpu(num_workers: int = 1) -> bool:
    """True when the cluster (not the driver) has a GPU for each of ``num_workers`` workers."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= max(1, num_workers)


def machine_description() -> str:
    """One line naming where a measurement ran: host, architecture, CPU model and cores, and the versions of
    the numeric libraries whose kernels can move a figure (torch, numpy, faiss), for benchmark results."""
    import platform
    from importlib import metadata

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = []
    for dist in ("torch", "numpy", "faiss-cpu"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return f"{platform.node()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, {', '.join(versions)}"
