"""Overhead of the Ray Train runner: one SASRec epoch through ``training.fit`` vs the same loop in plain PyTorch.

    .venv/bin/python bench/train_overhead.py                          # Amazon Beauty, 4 epochs, 2 threads
    .venv/bin/python bench/train_overhead.py --config configs/tiny.yaml --epochs 3

Three rows, the same model, optimiser, seeds and batches (``sasrec.length_buckets`` over one
permutation per epoch), no validation:

* ``plain``: a hand-written loop in this process (``model.loss``, backward, AdamW step), torch
  threads = ``--threads``; per-epoch wall time around the loop.
* ``ray-train-1w``: :func:`sidforge.platform.training.fit` on one real Ray Train worker with
  ``cpus_per_worker = --threads``; the worker runs ``sasrec._train_epoch`` and ``ctx.report`` with a
  checkpoint (model + optimiser) each epoch, as the stage does. Epoch time is measured inside the
  worker around the epoch *and* its report, so the per-epoch checkpoint is part of the overhead.
* ``in-process``: the same train function through ``fit`` with ``num_workers=0`` (Train V2 local mode).

Reported: the median epoch time over epochs 2..E (the first is warm-up), its ratio to ``plain``
(target: runner <= 1.15x), and the whole ``fit`` wall time, which includes worker start-up (process
creation, torch import, process group, shipping the data) but not cluster start-up: the cluster is
started once, before anything is timed. Results go to bench/results/train_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from sidforge.cli import format_table
from sidforge.models.sasrec import SASRec, SASRecConfig
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import load_config
from sidforge.platform.datasets import resolve_data_dir
from sidforge.platform.runtime import init_ray, machine_description
from sidforge.platform.training import RunSettings, ScalingSettings, WorkerContext, fit, remove_run
from sidforge.stages import prepare, sasrec

TARGET = 1.15

log = logging.getLogger("bench.train_overhead")


# ----------------------------------------------------------------------------------------------
# the two loops


def plain_epochs(config: dict[str, Any], threads: int) -> dict[str, Any]:
    """The training loop in plain PyTorch, in this process: no runner, no checkpoints."""
    torch.set_num_threads(threads)
    data: sasrec.Sequences = config["data"]
    seed, bs, pad = config["seed"], config["batch_size"], data.num_items
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    model = SASRec(SASRecConfig(**config["model"]))
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    epoch_s, losses = [], []
    for epoch in range(config["epochs"]):
        t0 = time.perf_counter()
        torch.manual_seed(seed + 7919 * epoch)
        model.train()
        order = np.random.default_rng(seed + epoch).permutation(len(data.train_inputs))
        total, n = 0.0, 0
        for rows in sasrec.length_buckets(order, data.train_inputs, pad, bs, seed=seed + epoch):
            inputs, targets = sasrec._trimmed([data.train_inputs[rows], data.train_targets[rows]], pad,
                                              torch.device("cpu"))
            out = model.loss(inputs, targets)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            total, n = total + float(out.loss.detach()), n + 1
        epoch_s.append(time.perf_counter() - t0)
        losses.append(total / max(n, 1))
        log.info("plain epoch %d: %.2f s, loss %.4f", epoch, epoch_s[-1], losses[-1])
    return {"epoch_s": epoch_s, "report_s": [0.0] * len(epoch_s), "loss": losses, "threads": torch.get_num_threads(),
            "pid": os.getpid(), "total_s": time.perf_counter() - t_start}


def overhead_train_fn(ctx: WorkerContext, config: dict[str, Any]) -> dict[str, Any]:
    """Per-worker: the SASRec stage's training loop without validation; epoch times measured here."""
    t_start = time.perf_counter()
    data: sasrec.Sequences = config["data"]
    torch.manual_seed(config["seed"])
    model = SASRec(SASRecConfig(**config["model"]))
    step = ctx.prepare_model(model, method="loss")
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    setup_s = time.perf_counter() - t_start
    epoch_s, report_s, losses = [], [], []
    for epoch in ctx.epochs(config["epochs"]):
        t0 = time.perf_counter()
        torch.manual_seed(config["seed"] + 7919 * epoch + ctx.rank)
        loss = sasrec._train_epoch(ctx, step, opt, data, config, epoch)
        t1 = time.perf_counter()
        ctx.report(epoch, {"loss": loss}, lambda: {"model": model.state_dict(), "opt": opt.state_dict()})
        t2 = time.perf_counter()
        epoch_s.append(t2 - t0)
        report_s.append(t2 - t1)
        losses.append(loss)
    return {"epoch_s": epoch_s, "report_s": report_s, "loss": losses, "threads": torch.get_num_threads(),
            "pid": os.getpid(), "setup_s": setup_s, "total_s": time.perf_counter() - t_start}


def runner_epochs(config: dict[str, Any], scaling: ScalingSettings, storage: Path, name: str) -> dict[str, Any]:
    """``overhead_train_fn`` through ``training.fit``; adds the driver-side ``fit`` wall time."""
    from ray import cloudpickle  # Ray's vendored copy is the one that pickles the train function

    run = RunSettings(name=name, storage_path=storage, checkpoints_to_keep=2)
    # Ray workers cannot import this script by name: ship the train function by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        t0 = time.perf_counter()
        result = fit(overhead_train_fn, config, scaling, run, fresh=True)
        fit_s = time.perf_counter() - t0
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    remove_run(run)
    value = dict(result.value)
    value["fit_s"] = fit_s
    for epoch, (s, r) in enumerate(zip(value["epoch_s"], value["report_s"])):
        log.info("%s epoch %d: %.2f s (report %.2f s)", name, epoch, s, r)
    return value


# ----------------------------------------------------------------------------------------------
# contention: this box is shared, so each row records how busy the rest of it was


def _busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


class CpuWatch:
    """CPU cores used by this process tree (the embedded cluster included) and by everything else
    during a ``with`` block; the tree is sampled every 0.5 s so exited workers still count."""

    def __init__(self) -> None:
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.result: dict[str, float] = {}

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                self._cpu[proc.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self) -> CpuWatch:
        self._sample()
        self._own0, self._busy0, self._t0 = sum(self._cpu.values()), _busy_s(), time.perf_counter()
        self._load0 = os.getloadavg()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = max(time.perf_counter() - self._t0, 1e-9)
        own = sum(self._cpu.values()) - self._own0
        self.result = {"own_cpu_cores": round(own / wall, 2),
                       "other_cpu_cores": round(max(0.0, (_busy_s() - self._busy0 - own) / wall), 2),
                       "load_1m_before": round(self._load0, 2), "load_1m_after": round(os.getloadavg()[0], 2)}


# ----------------------------------------------------------------------------------------------
# driver


def median_after_warmup(times: list[float]) -> float:
    """Median over epochs 2..E (the first epoch is warm-up); the only epoch when there is one."""
    return float(statistics.median(times[1:] if len(times) > 1 else times))


def load_data(config_path: str, root: Path, overrides: list[str]) -> tuple[Any, sasrec.Sequences]:
    cfg = load_config(config_path, [f"run_dir={root}", *overrides])
    run = RunDir(cfg.run_dir)
    prepare.run(cfg, run, resolve_data_dir(None))
    return cfg, sasrec.load_sequences(run.stage_dir("prepare"), cfg.sasrec.max_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/amazon-beauty.yaml",
                    help="dataset and SASRec settings (configs/tiny.yaml: synthetic data)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per row; the first is excluded as warm-up")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (plain) = CPUs of the Ray Train worker")
    ap.add_argument("--root", default="runs/bench-overhead", help="run directory (prepare outputs, checkpoints)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override a.b=c")
    ap.add_argument("--out", default="bench/results/train_overhead.json")
    args = ap.parse_args()
    if args.epochs < 1 or args.threads < 1:
        ap.error("--epochs and --threads must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    init_ray(num_cpus=max(2, args.threads))  # started once, never timed
    cluster_s = time.perf_counter() - t0
    root = Path(args.root)
    cfg, data = load_data(args.config, root, args.overrides)
    config = sasrec.loop_config(cfg, data)
    config["epochs"] = args.epochs
    torch.set_num_threads(args.threads)  # the in-process row runs in this process too
    log.info("%d training sequences, %d items, batch %d, %d threads", len(data.train_inputs), data.num_items,
             config["batch_size"], args.threads)

    rows: dict[str, dict[str, Any]] = {}
    contention: dict[str, dict[str, float]] = {}
    runs = {
        "plain": lambda: plain_epochs(config, args.threads),
        "ray-train-1w": lambda: runner_epochs(config, ScalingSettings(num_workers=1, cpus_per_worker=args.threads),
                                              root / "_train", "overhead-1w"),
        "in-process": lambda: runner_epochs(config, ScalingSettings(num_workers=0), root / "_train", "overhead-local"),
    }
    for mode, go in runs.items():
        with CpuWatch() as watch:
            rows[mode] = go()
        contention[mode] = watch.result
        log.info("%s: %s", mode, watch.result)

    base = median_after_warmup(rows["plain"]["epoch_s"])
    summary: dict[str, dict[str, Any]] = {}
    for mode, r in rows.items():
        med = median_after_warmup(r["epoch_s"])
        summary[mode] = {"median_epoch_s": round(med, 3), "ratio": round(med / base, 3),
                         "median_report_s": round(median_after_warmup(r["report_s"]), 3),
                         "fit_s": round(r.get("fit_s", r["total_s"]), 2), "threads": r["threads"],
                         "epoch_s": [round(s, 3) for s in r["epoch_s"]],
                         "report_s": [round(s, 3) for s in r["report_s"]],
                         "loss": [round(v, 5) for v in r["loss"]], "worker_pid": r["pid"],
                         "in_bench_process": r["pid"] == os.getpid(), **contention[mode]}
        if "setup_s" in r:
            summary[mode]["worker_setup_s"] = round(r["setup_s"], 2)
    runner = summary["ray-train-1w"]["ratio"]
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    payload = {
        "machine": machine_description(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "ray": _ray_version(),
        "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": args.config, "overrides": args.overrides, "epochs": args.epochs, "threads": args.threads,
        "train_sequences": len(data.train_inputs), "items": data.num_items, "batch_size": config["batch_size"],
        "batches_per_epoch": -(-len(data.train_inputs) // config["batch_size"]),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cluster_start_s": round(cluster_s, 2),
        "median_epoch_s": {m: s["median_epoch_s"] for m, s in summary.items()},
        "ratio_vs_plain": {m: s["ratio"] for m, s in summary.items()},
        "fit_s": {m: s["fit_s"] for m, s in summary.items()},
        "other_cpu_cores": {m: s["other_cpu_cores"] for m, s in summary.items()},
        "target_ratio": TARGET, "meets_target": runner <= TARGET,
        "rows": summary,
        "notes": "median over epochs 2..E; runner epochs include ctx.report with a checkpoint; fit_s includes "
                 "worker start-up but not cluster start-up (plain: model build + all epochs)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))

    table = [(mode, f"{s['median_epoch_s']:.2f}", f"{s['ratio']:.3f}", f"{s['median_report_s']:.2f}",
              f"{s['fit_s']:.1f}", " ".join(f"{v:.2f}" for v in s["epoch_s"]), f"{s['loss'][-1]:.4f}",
              f"{s['other_cpu_cores']:.2f}") for mode, s in summary.items()]
    print(format_table(table, ("mode", "median_epoch_s", "ratio", "report_s", "fit_s", "epochs_s", "last_loss",
                               "other_cpu")))
    print(f"runner/plain = {runner:.3f} (target <= {TARGET}: {'met' if runner <= TARGET else 'NOT met'}); "
          f"cluster start-up {cluster_s:.1f} s excluded; results in {out}")


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    main()
