"""SaviorRec's ranker ladder on one run: item-ID only → + raw content → + aligned → + MBA → + bi-directional.

    OMP_NUM_THREADS=1 python bench/ranker.py --config configs/amazon-beauty-savior.yaml \
        --sids runs/amazon-beauty-savior/tokenize-aligned --seeds 0 1 2 [--variants idonly full] [--report-only]

Each (variant, seed) trains ``RUN/ranker-<variant>-s<seed>`` through the ranker stage (a finished one is
skipped, so several processes with different ``--seeds`` can share the work and the last one reports).
Prints test AUC / GAUC / LogLoss, mean ± std over the seeds found, overall and per candidate bucket,
and writes bench/results/ranker.json. Needs prepare, embed, align (and tokenize over align) done.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from sidforge.cli import format_table
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import load_config
from sidforge.stages import ranker

# The ladder of the issue, each step adding one mechanism; then the paper's no-skip ablation.
VARIANTS: dict[str, list[str]] = {
    "idonly": ["ranker.content=none", "ranker.mba=false", "ranker.attention=one_way"],
    "raw": ["ranker.content=embed", "ranker.mba=false", "ranker.attention=one_way"],
    "aligned": ["ranker.content=align", "ranker.mba=false", "ranker.attention=one_way"],
    "mba": ["ranker.content=align", "ranker.mba=true", "ranker.attention=one_way"],
    "full": ["ranker.content=align", "ranker.mba=true", "ranker.attention=bidirectional"],
    "full-noskip": ["ranker.content=align", "ranker.mba=true", "ranker.mba_skip=false",
                    "ranker.attention=bidirectional"],
}
GROUPS = ("", "/head", "/torso", "/tail", "/cold")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--sids", required=True, help="RUN/tokenize-<name> the MBA variants index")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS)[:5], choices=list(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--report-only", action="store_true", help="aggregate what is there, train nothing")
    ap.add_argument("--out", default="bench/results/ranker.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sidforge").setLevel(logging.INFO)

    runs: dict[str, dict[int, dict]] = {v: {} for v in args.variants}
    for variant in args.variants:
        for seed in args.seeds:
            cfg = load_config(args.config, [*args.overrides, *VARIANTS[variant], f"ranker.name={variant}-s{seed}",
                                            f"seed={seed}"])
            run_dir = RunDir(cfg.run_dir)
            metrics_file = run_dir.stage_dir(cfg.ranker.output_name) / "metrics.json"
            if not args.report_only:
                t0 = time.perf_counter()
                res = ranker.run(cfg, run_dir, args.sids if cfg.ranker.mba else None)
                print(f"{variant} seed {seed}: {'cached' if res.skipped else f'{time.perf_counter() - t0:.0f} s'}, "
                      f"test auc {res.metrics['test']['auc']:.4f}", flush=True)
            if metrics_file.is_file():
                m = json.loads(metrics_file.read_text())
                entry = run_dir.read_manifest().stages.get(cfg.ranker.output_name)
                runs[variant][seed] = {"test": m["test"], "valid": m["valid"], "best_epoch": m["best_epoch"],
                                       "epochs_run": m["epochs_run"],
                                       "wall_time_s": entry.wall_time_s if entry else None}
    table, summary = [], {}
    for variant, by_seed in runs.items():
        if not by_seed:
            continue
        summary[variant] = {}
        row = [variant, str(len(by_seed))]
        for group in GROUPS:
            for key in ("auc", "gauc", "logloss"):
                vals = np.array([r["test"].get(key + group, np.nan) for r in by_seed.values()], dtype=float)
                summary[variant][key + group] = {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals)),
                                                 "values": vals.tolist()}
            row += [f"{summary[variant]['auc' + group]['mean']:.4f}±{summary[variant]['auc' + group]['std']:.4f}"]
        row += [f"{summary[variant]['gauc']['mean']:.4f}±{summary[variant]['gauc']['std']:.4f}",
                f"{summary[variant]['logloss']['mean']:.4f}±{summary[variant]['logloss']['std']:.4f}"]
        walls = [r["wall_time_s"] for r in by_seed.values() if r["wall_time_s"]]
        row += [f"{np.median(walls):.0f}" if walls else "-"]
        table.append(row)
    header = ("variant", "seeds", *(f"auc{g or ' all'}" for g in GROUPS), "gauc", "logloss", "wall s (median)")
    print(format_table(table, header))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "sids": args.sids, "overrides": args.overrides,
                                          "summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
