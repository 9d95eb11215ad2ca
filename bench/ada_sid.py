"""ADA-SID on a benchmark over several seeds: tokenizer quality, the ranker with SID features (AUC / GAUC,
overall / head / tail) and, when asked, generative retrieval — ADA-SID against RQ-VAE, RQ-KMeans, the
item-ID ranker and the four ablations.

    OMP_NUM_THREADS=1 python bench/ada_sid.py --config configs/amazon-beauty.yaml --seeds 0,1,2 \\
        --set embed.num_actors=0 --set sasrec.patience=5 \\
        --reuse 'runs/bench-sasrec/ce-seed{seed}' --reuse runs/amazon-beauty [--generative]
    python bench/ada_sid.py --seeds 0 --tokenizers-only --tokenizers ada-sid,rqvae,rqkmeans   # quality only
    python bench/ada_sid.py --seeds 0,1,2 --report-only                                       # aggregate

(The two ``--set`` are how the reused runs were made: runs/amazon-beauty's embed ran in-process and
bench/sasrec.py's SASRec-CE with patience 5; without them the stage hashes differ and embed (~6 min) and
SASRec (~30 min per seed) run again.)

Every seed has its own run directory ``ROOT/<config name>-seed<k>`` holding ``prepare``, ``embed`` and
``sasrec`` (SASRec-CE: e_b; copied with ``--reuse`` like bench/bbqrec.py), the tokenizers
``tokenize-<name>`` and, per tokenizer, ``ranker-sid-<name>`` (item ID + SID features weighted by the
code weights) and ``generative-<name>``; plus ``ranker-itemid`` (item ID only). Tokenizers:

    ada-sid             the paper's Beauty setting (K 100, N_s = N_t = 1, N_b = 5)
    ada-sid-fixedw      w = 1 (no adaptive alignment strength)
    ada-sid-norouter    equal weights, no behavioral ID dropped
    ada-sid-nosparsity  router without the sparsity term
    ada-sid-noshared    no shared experts
    ada-sid-count       N_norm from log(1 + train count) instead of the e_b norm (ours, not the paper's)
    rqvae, rqkmeans     the baselines at the paper's shape: 6 levels x 100 codes (+ a collision digit)
    rqvae-3x256, rqkmeans-3x256
                        the baselines at TIGER's shape, 3 x 256, as published (RQ-VAE latent 32; RQ-KMeans
                        on the raw 384-d vectors)
    rqvae-3x256-l16u05, rqkmeans-3x256-pca16w
                        the same with fewer collisions: RQ-VAE latent 16 + uniformity 0.5; RQ-KMeans on the
                        whitened top 16 principal components (not in the default list; ``--tokenizers`` and
                        ``--out bench/results/sid_shape.json`` keep them apart from the ADA-SID table)
    letter              LETTER's published Beauty IDs (4 levels x 256, imported; Beauty only)

Every stage skips itself when its config and inputs are unchanged, so a stopped bench continues where it
stopped and ``--report-only`` aggregates whatever exists. Results (per seed and mean ± std over seeds)
go to bench/results/ada_sid.json under the config's name; three tables are printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from bbqrec import reuse  # bench/ is sys.path[0] when this runs as a script

from sidforge.cli import format_table
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config, load_config
from sidforge.platform.datasets import resolve_data_dir
from sidforge.platform.runtime import init_ray, machine_description
from sidforge.stages import embed, generative, prepare, ranker, sasrec, tokenize

ADA = ["tokenize.method=ada-sid"]
BASELINE_SHAPE = ["tokenize.levels=6", "tokenize.codebook_size=100"]
TIGER_SHAPE = ["tokenize.levels=3", "tokenize.codebook_size=256"]
TOKENIZERS: dict[str, list[str]] = {
    "ada-sid": [*ADA, "tokenize.name=ada-sid"],
    "ada-sid-fixedw": [*ADA, "tokenize.name=ada-sid-fixedw", "tokenize.ada_sid.adaptive_alignment=false"],
    "ada-sid-norouter": [*ADA, "tokenize.name=ada-sid-norouter", "tokenize.ada_sid.router=false"],
    "ada-sid-nosparsity": [*ADA, "tokenize.name=ada-sid-nosparsity", "tokenize.ada_sid.sparsity=false"],
    "ada-sid-noshared": [*ADA, "tokenize.name=ada-sid-noshared", "tokenize.ada_sid.shared_experts=0"],
    "ada-sid-count": [*ADA, "tokenize.name=ada-sid-count", "tokenize.ada_sid.richness=log_count"],
    "rqvae": ["tokenize.method=rqvae", "tokenize.name=rqvae-k100", *BASELINE_SHAPE],
    "rqkmeans": ["tokenize.method=rqkmeans", "tokenize.name=rqkmeans-k100", *BASELINE_SHAPE,
                 "tokenize.rqkmeans.pca_dim=0"],
    # TIGER's 3 x 256 shape (issue-4 baselines): as published, and with the settings that cut collisions
    "rqvae-3x256": ["tokenize.method=rqvae", "tokenize.name=rqvae-3x256", *TIGER_SHAPE],
    "rqvae-3x256-l16u05": ["tokenize.method=rqvae", "tokenize.name=rqvae-3x256-l16u05", *TIGER_SHAPE,
                           "tokenize.rqvae.latent_dim=16", "tokenize.rqvae.uniformity=0.5"],
    "rqkmeans-3x256": ["tokenize.method=rqkmeans", "tokenize.name=rqkmeans-3x256", *TIGER_SHAPE,
                       "tokenize.rqkmeans.pca_dim=0"],
    "rqkmeans-3x256-pca16w": ["tokenize.method=rqkmeans", "tokenize.name=rqkmeans-3x256-pca16w", *TIGER_SHAPE,
                              "tokenize.rqkmeans.pca_dim=16", "tokenize.rqkmeans.whiten=true"],
    "letter": ["tokenize.method=precomputed", "tokenize.name=letter",
               "tokenize.path=amazon-beauty-2014/LETTER_Beauty.index.json"],
}
SID_SHAPE = [t for t in TOKENIZERS if "3x256" in t or t == "letter"]  # issue 4's table, not ADA-SID's
DEFAULT_TOKENIZERS = [t for t in TOKENIZERS if t != "ada-sid-count" and t not in SID_SHAPE]
REUSABLE = ("prepare", "embed", "sasrec")
GROUPS = ("", "/head", "/tail")
GEN_KEYS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")


def seed_config(args: argparse.Namespace, seed: int, *extra: str) -> Config:
    base = load_config(args.config)
    root = Path(args.root) / f"{base.name}-seed{seed}"
    return load_config(args.config, [f"run_dir={root}", f"seed={seed}", *args.overrides, *extra])


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Every stage of one seed (skipping finished ones); returns this seed's figures."""
    cfg = seed_config(args, seed)
    run = RunDir(cfg.run_dir)
    if not args.report_only:
        for line in reuse(run, args.reuse, seed, REUSABLE):
            logging.info("reused %s", line)
        data_dir = resolve_data_dir(None)
        prepare.run(cfg, run, data_dir)
        embed.run(cfg, run)
        sasrec.run(cfg, run)
    out: dict[str, Any] = {"tokenizers": {}, "ranker": {}, "generative": {}}
    for name in args.tokenizers:
        tcfg = seed_config(args, seed, *TOKENIZERS[name])
        folder = run.stage_dir(tcfg.tokenize.output_name)
        if not args.report_only:
            t0 = time.perf_counter()
            res = tokenize.run(tcfg, run, resolve_data_dir(None))
            logging.info("%s seed %d: %s", name, seed, "cached" if res.skipped else f"{time.perf_counter() - t0:.0f} s")
        if (folder / "quality.json").is_file():
            entry = run.read_manifest().stages.get(tcfg.tokenize.output_name)
            out["tokenizers"][name] = {**json.loads((folder / "quality.json").read_text()),
                                       "wall_s": entry.wall_time_s if entry else None}
    if args.tokenizers_only:
        return out
    variants: list[tuple[str, str | None]] = [("itemid", None)] + [(f"sid-{n}", n) for n in args.tokenizers]
    for variant, tok in variants:
        extra = [f"ranker.name={variant}", f"ranker.sid_features={'true' if tok else 'false'}"]
        rcfg = seed_config(args, seed, *(TOKENIZERS[tok] if tok else []), *extra)
        sids = run.stage_dir(rcfg.tokenize.output_name) if tok else None
        out["ranker"][variant] = _stage(args, run, rcfg.ranker.output_name, lambda c=rcfg, s=sids: ranker.run(c, run, s))
    if args.generative:  # RUN/generative-<tokenizer folder>
        for name in args.tokenizers:
            gcfg = seed_config(args, seed, *TOKENIZERS[name])
            sids = run.stage_dir(gcfg.tokenize.output_name)
            out["generative"][name] = _stage(args, run, generative.stage_name(sids),
                                             lambda c=gcfg, s=sids: generative.run(c, run, s))
    return out


def _stage(args: argparse.Namespace, run: RunDir, stage: str, fn: Any) -> dict[str, Any] | None:
    """Run a downstream stage unless ``--report-only``; its manifest metrics (None when absent)."""
    if not args.report_only:
        t0 = time.perf_counter()
        res = fn()
        logging.info("%s: %s", stage, "cached" if res.skipped else f"{time.perf_counter() - t0:.0f} s")
    entry = run.read_manifest().stages.get(stage)
    return None if entry is None else {**entry.metrics, "wall_s": entry.wall_time_s}


def _mean_std(vals: list[float]) -> str:
    a = np.asarray([v for v in vals if v is not None], dtype=float)
    if not len(a):
        return "–"
    return f"{np.nanmean(a):.4f}±{np.nanstd(a, ddof=1):.4f}" if len(a) > 1 else f"{a[0]:.4f}"


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, list[tuple[str, ...]]]:
    """The three tables: tokenizer quality, ranking, generative retrieval (mean ± std over seeds)."""
    seeds = list(per_seed.values())
    names = list(dict.fromkeys(n for s in seeds for n in s["tokenizers"]))

    def tok(fn: Any) -> list[str]:
        return [_mean_std([fn(s["tokenizers"][n]) for s in seeds if n in s["tokenizers"]]) for n in names]

    def bucket(b: str, key: str) -> Any:
        return lambda q: q.get("by_bucket", {}).get(b, {}).get(key)

    quality = [("relative reconstruction (text)", *tok(lambda q: q.get("recon_rel"))),
               ("held-out reconstruction", *tok(lambda q: q.get("valid", {}).get("recon_rel"))),
               ("entropy / log2 K (mean over levels)", *tok(lambda q: float(np.mean(q["entropy_norm"])))),
               ("entropy, nats (mean over levels)", *tok(lambda q: float(np.mean(q["entropy"])) * np.log(2))),
               ("utilisation (mean over levels)", *tok(lambda q: float(np.mean(q["utilization"])))),
               ("collision rate (before digit)", *tok(lambda q: q["collision_rate"])),
               ("average ID length (with digit)", *tok(lambda q: q.get("avg_sid_length"))),
               ("dropped behavioral IDs", *tok(lambda q: q.get("dropped_share"))),
               ("  its target theta (1 - N_norm), mean", *tok(lambda q: q.get("target_share")))]
    quality += [(f"dropped, {b}", *tok(bucket(b, "dropped_share"))) for b in ("head", "torso", "tail", "cold")]
    quality += [(f"alignment w, {b}", *tok(bucket(b, "alignment_w"))) for b in ("head", "tail")]
    quality += [("N_norm vs train count (Spearman)", *tok(lambda q: q.get("richness_count_spearman"))),
                ("wall time (s)", *tok(lambda q: q.get("wall_s")))]
    variants = list(dict.fromkeys(v for s in seeds for v, m in s["ranker"].items() if m))
    ranking = [(v, str(sum(1 for s in seeds if s["ranker"].get(v))),
                *(_mean_std([s["ranker"][v]["test"].get(k + g) for s in seeds if s["ranker"].get(v)])
                  for k in ("auc", "gauc") for g in GROUPS)) for v in variants]
    gens = list(dict.fromkeys(v for s in seeds for v, m in s["generative"].items() if m))
    retrieval = [(v, str(sum(1 for s in seeds if s["generative"].get(v))),
                  *(_mean_std([s["generative"][v]["test"].get(k + g) for s in seeds if s["generative"].get(v)])
                    for k in GEN_KEYS for g in GROUPS)) for v in gens]
    return {"quality": [("figure", *names), *quality],
            "ranking": [("ranker", "seeds", *(k + (g or " all") for k in ("auc", "gauc") for g in GROUPS)), *ranking],
            "generative": [("tokenizer", "seeds", *(k + (g or " all") for k in GEN_KEYS for g in GROUPS)), *retrieval]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/amazon-beauty.yaml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--root", default="runs/bench-ada-sid")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every stage")
    ap.add_argument("--reuse", action="append", default=[], help="run directory to copy prepare/embed/sasrec from")
    ap.add_argument("--tokenizers", default=",".join(DEFAULT_TOKENIZERS), help="comma-separated subset")
    ap.add_argument("--tokenizers-only", action="store_true", help="fit the tokenizers and report their quality only")
    ap.add_argument("--generative", action="store_true", help="also train and evaluate generative retrieval")
    ap.add_argument("--report-only", action="store_true", help="aggregate what is there, train nothing")
    ap.add_argument("--out", default="bench/results/ada_sid.json")
    args = ap.parse_args()
    args.tokenizers = [t for t in args.tokenizers.split(",") if t]
    unknown = sorted(set(args.tokenizers) - set(TOKENIZERS))
    if unknown:
        raise SystemExit(f"unknown tokenizers {unknown}; choose among {', '.join(TOKENIZERS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.report_only:
        init_ray(num_cpus=2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = load_config(args.config).name
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in map(int, args.seeds.split(",")):
        per_seed[seed] = run_seed(args, seed)
        tables = summarise(per_seed)
        results = json.loads(out.read_text()) if out.is_file() else {}
        results[name] = {"config": args.config, "overrides": args.overrides,
                         "machine": machine_description(),
                         "seeds": {str(s): v for s, v in per_seed.items()}, "tables": tables}
        out.write_text(json.dumps(results, indent=2, default=str))
    for key, table in summarise(per_seed).items():
        if len(table) > 1:
            print(f"\n{key}")
            print(format_table(table[1:], table[0]))


if __name__ == "__main__":
    main()
