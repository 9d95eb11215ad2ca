"""BBQRec on a benchmark over several seeds: SASRec-CE against SASRec-CE reweighted by RQ-VAE or BBQ IDs, the
ablations, and the tokenizer-quality table of BBQ next to RQ-VAE and RQ-KMeans.

    python bench/bbqrec.py --config configs/amazon-beauty.yaml --seeds 0,1,2 --set sasrec.patience=5 \\
        --reuse 'runs/bench-sasrec/ce-seed{seed}' --reuse runs/amazon-beauty
    python bench/bbqrec.py --config configs/amazon-scientific-mm.yaml --seeds 0,1,2 --reuse runs/amazon-scientific-mm
    python bench/bbqrec.py --config configs/amazon-beauty.yaml --seeds 0 --tokenizers-only   # the quality table

Every seed has its own run directory ``ROOT/<config name>-seed<k>`` (the seed drives SASRec, the tokenizers
and the variants alike) holding ``prepare``, ``embed``, ``sasrec`` (SASRec-CE: the baseline and the
behavior embeddings e_b of BBQ), the tokenizers ``tokenize-{rqkmeans,rqvae,bbq,bbq-nocl,bbq-nomi}`` and one
``sasrec-<variant>`` per variant:

    sasrec-ce       plain SASRec-CE (RUN/sasrec)
    rw-rqvae        + reweighting by RQ-VAE IDs (+ the sequence-to-item contrastive loss, --seq-cl)
    rw-bbq          + reweighting by BBQ IDs (+ --seq-cl): BBQRec
    rw-bbq-nocl     BBQ IDs trained without the contrastive codebook loss
    rw-bbq-nomi     BBQ IDs trained without the MI (CLUB) term
    ...-sidcl       with --seq-cl-target sid: the sequence-to-item loss of the four reweighted variants above
                    contrasts with the target's semantic-ID embedding (sasrec.contrastive_target=sid)
    ...-sidemb      with --item-repr id+sid: the reweighted variants represent every item by its ID embedding
                    plus its semantic-ID embedding (sasrec.item_repr=id+sid), after any -sidcl suffix
    ...-mm          with --item-features text,image: the reweighted variants add the items' content features
                    (sasrec.item_features), after any other suffix; sasrec-ce-mm is SASRec-CE with them and
                    no semantic IDs (the reweighting's ablation on the same items)
    rw-bbq-noseqcl  BBQ reweighting without the sequence-to-item loss   (only when --seq-cl > 0)
    norw-seqcl      no reweighting, sequence-to-item loss only          (only when --seq-cl > 0;
                                                                         with --seq-cl 0 it is sasrec-ce)
    norw-bbq-sidcl  BBQRec with the SID-target loss and its reweighting fixed at 0 (with --seq-cl-target sid;
                    suffixed like the reweighted variants): everything of BBQRec but the reweighting

``--refit`` adds the train-then-refit protocol: after each chosen variant's run (which selects its epoch
on valid) a ``<variant>-refit`` stage (``RUN/sasrec-refit``, ``RUN/sasrec-<variant>-refit``) trains
the same config on train + valid for that run's ``best_epoch + 1`` epochs (``sasrec.refit_epochs``) and
scores test with it; the refit variants are paired against ``sasrec-ce-refit``.

Every stage skips itself when its config and inputs are unchanged, so a stopped bench continues where it
stopped. ``--reuse DIR`` (repeatable; ``{seed}`` is replaced) copies finished stage folders and their
manifest entries from other run directories into a fresh one (the first DIR holding a stage wins), e.g.
the SASRec-CE runs of bench/sasrec.py; the stages then check them like their own (a stale copy is simply
recomputed). Later seeds take ``embed`` (and, failing ``--reuse``, ``prepare``) from the first seed's
directory the same way. Results (per run, mean ± std over seeds, and each variant's paired difference
from SASRec-CE over the same users with a bootstrap interval, when the runs wrote ``ranks.parquet``) go
to bench/results/bbqrec.json under the config's name.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from sidforge.cli import format_table
from sidforge.models.semantic_ids import behavior_coherence
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import Config, load_config
from sidforge.platform.datasets import resolve_data_dir
from sidforge.platform.runtime import init_ray, machine_description
from sidforge.stages import embed, prepare, sasrec, tokenize

KEYS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20")
TOKENIZERS = {  # folder suffix -> overrides (rqkmeans/rqvae keep the config's default name: reusable runs)
    "rqkmeans": ["tokenize.method=rqkmeans"],
    "rqvae": ["tokenize.method=rqvae"],
    "bbq": ["tokenize.method=bbq", "tokenize.name=bbq"],
    "bbq-nocl": ["tokenize.method=bbq", "tokenize.name=bbq-nocl", "tokenize.bbq.contrastive_weight=0"],
    "bbq-nomi": ["tokenize.method=bbq", "tokenize.name=bbq-nomi", "tokenize.bbq.mi_weight=0"],
}
REUSABLE = ("prepare", "embed", "sasrec", "tokenize-rqkmeans", "tokenize-rqvae")
SIDCL = "-sidcl"  # suffix of the variants (and the results key) whose sequence loss targets the semantic IDs
SIDEMB = "-sidemb"  # suffix of the variants (and the results key) whose items are ID + semantic-ID embeddings
MM = "-mm"  # suffix of the variants (and the results key) whose items add their content features


def variants(seq_cl: float, target: str = "item", item_repr: str = "id",
             features: tuple[str, ...] = ()) -> dict[str, tuple[str | None, list[str]]]:
    """variant -> (tokenizer folder suffix or None, sasrec overrides).

    With ``target="sid"`` the reweighted variants contrast the sequence with the target's semantic-ID
    embedding instead of its item embedding, and carry the suffix ``-sidcl`` (their own run folders); with
    ``item_repr="id+sid"`` they represent items by ID plus semantic-ID embeddings, suffix ``-sidemb``; with
    ``features`` they add the items' projected content features, suffix ``-mm``, beside ``sasrec-ce-mm``.
    """
    rw = ["sasrec.reweight=sid", f"sasrec.contrastive_weight={seq_cl}"]
    suffix = ""
    if target == "sid" and seq_cl > 0:
        rw, suffix = [*rw, "sasrec.contrastive_target=sid"], SIDCL
    if item_repr == "id+sid":
        rw, suffix = [*rw, "sasrec.item_repr=id+sid"], suffix + SIDEMB
    mm = [f"sasrec.item_features=[{','.join(features)}]"] if features else []
    rw, suffix = [*rw, *mm], suffix + (MM if features else "")
    out: dict[str, tuple[str | None, list[str]]] = {
        "sasrec-ce": (None, []),
        **({f"sasrec-ce{MM}": (None, mm)} if features else {}),
        f"rw-rqvae{suffix}": ("rqvae", rw),
        f"rw-bbq{suffix}": ("bbq", rw),
        f"rw-bbq-nocl{suffix}": ("bbq-nocl", rw),
        f"rw-bbq-nomi{suffix}": ("bbq-nomi", rw),
    }
    if target == "sid" and seq_cl > 0:  # BBQRec with its reweighting fixed at 0: the rest (SID loss, items) kept
        out[f"norw-bbq{suffix}"] = ("bbq", [*rw, "sasrec.reweight_init=0", "sasrec.reweight_learned=false"])
    if seq_cl > 0:
        mm_suffix = MM if features else ""
        out[f"rw-bbq-noseqcl{mm_suffix}"] = ("bbq", ["sasrec.reweight=sid", "sasrec.contrastive_weight=0", *mm])
        out[f"norw-seqcl{mm_suffix}"] = (None, [f"sasrec.contrastive_weight={seq_cl}", *mm])
    return {name: (tok, [*o, f"sasrec.name={name}"] if name != "sasrec-ce" else o) for name, (tok, o) in out.items()}


def reuse(run: RunDir, sources: list[str], seed: int, stages: tuple[str, ...] = REUSABLE) -> list[str]:
    """Copy finished stages (folder + manifest entry) that ``run`` lacks from the first source holding them."""
    copied = []
    for stage in stages:
        if run.stage_dir(stage).exists():
            continue
        for pattern in sources:
            src = RunDir(pattern.format(seed=seed))
            entry = src.read_manifest().stages.get(stage)
            if entry is not None and src.stage_dir(stage).is_dir():
                shutil.copytree(src.stage_dir(stage), run.stage_dir(stage))
                run.record(stage, entry)
                copied.append(f"{stage} <- {src.path}")
                break
    return copied


def seed_config(args: argparse.Namespace, seed: int, *extra: str) -> Config:
    base = load_config(args.config)
    root = Path(args.root) / f"{base.name}-seed{seed}"
    return load_config(args.config, [f"run_dir={root}", f"seed={seed}", *args.overrides, *extra])


def run_seed(args: argparse.Namespace, seed: int, chosen: list[str]) -> tuple[list[dict], dict[str, dict]]:
    """Every stage of one seed; returns the variant rows and the tokenizer quality of this seed."""
    cfg = seed_config(args, seed)
    run = RunDir(cfg.run_dir)
    first = seed_config(args, int(args.seeds.split(",")[0])).run_dir  # prepare and embed do not depend on the seed
    # embed (seed-free, expensive) from the first seed first; prepare from --reuse first, beside its sasrec
    lines = reuse(run, [first], seed, ("embed",)) if first != cfg.run_dir else []
    lines += reuse(run, args.reuse, seed) + reuse(run, [first], seed, ("prepare",))
    for line in lines:
        logging.info("reused %s", line)
    data_dir = resolve_data_dir(None)
    prepare.run(cfg, run, data_dir)
    embed.run(cfg, run)
    t0 = time.perf_counter()
    base = sasrec.run(cfg, run)
    rows = [_row("sasrec-ce", seed, base, time.perf_counter() - t0)] if "sasrec-ce" in chosen else []
    if args.refit and "sasrec-ce" in chosen:
        rows.append(_refit(args, "sasrec-ce", seed, base, cfg, [], run))
    behavior = np.asarray(pq.read_table(run.stage_dir("sasrec") / "item_embeddings.parquet")
                          .column("embedding").to_pylist(), dtype=np.float32)
    quality: dict[str, dict] = {}
    table = variants(args.seq_cl, args.seq_cl_target, args.item_repr, args.item_features)
    needed = {tok for name, (tok, _) in table.items() if name in chosen and tok}
    for name, extra in TOKENIZERS.items():
        if not args.tokenizers_only and name not in needed and name != "rqkmeans":
            continue
        t0 = time.perf_counter()
        res = tokenize.run(seed_config(args, seed, *extra), run, data_dir)
        codes = np.asarray(pq.read_table(res.out_dir / "sids.parquet").column("codes").to_pylist())
        quality[name] = {**res.metrics, "behavior_coherence": behavior_coherence(codes, behavior),
                         "wall_s": round(time.perf_counter() - t0, 1), "skipped": res.skipped}
    if args.tokenizers_only:
        return rows, quality
    for name, (tok, extra) in table.items():
        if name == "sasrec-ce" or name not in chosen:
            continue
        t0 = time.perf_counter()
        sids = run.stage_dir(f"tokenize-{tok}") if tok else None
        variant_cfg = seed_config(args, seed, *extra)
        res = sasrec.run(variant_cfg, run, sids)
        rows.append(_row(name, seed, res, time.perf_counter() - t0))
        if args.refit:
            rows.append(_refit(args, name, seed, res, variant_cfg, extra, run, sids))
    return rows, quality


def _refit(args: argparse.Namespace, name: str, seed: int, selected: Any, cfg: Config, extra: list[str],
           run: RunDir, sids: Path | None = None) -> dict:
    """``<name>-refit``: the variant (``cfg``) trained on train + valid for the epochs its run ``selected`` chose."""
    t0 = time.perf_counter()
    res = sasrec.run(seed_config(args, seed, *extra, *sasrec.refit_overrides(cfg, selected)), run, sids)
    return _row(f"{name}-refit", seed, res, time.perf_counter() - t0)


def _row(name: str, seed: int, res: Any, wall: float) -> dict:
    m = res.metrics
    return {"variant": name, "seed": seed, "dir": str(res.out_dir), "wall_s": round(wall, 1), "skipped": res.skipped,
            "best_epoch": m.get("best_epoch"), "epochs_run": m.get("epochs_run"),
            "reweight_weights": m.get("reweight_weights"), "test": m["test"], "valid": m.get("valid")}  # refit: none


def _mean_std(vals: list[float]) -> dict[str, float]:
    a = np.asarray(vals, dtype=float)
    return {"mean": float(np.nanmean(a)), "std": float(np.nanstd(a, ddof=1)) if len(a) > 1 else 0.0}


def summarise(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        out[name] = {"seeds": [r["seed"] for r in rs], **{k: _mean_std([r["test"].get(k, np.nan) for r in rs])
                                                            for k in KEYS}}
    return out


def paired(rows: list[dict], metrics: tuple[str, ...] = ("ndcg@10", "recall@20"),
           base_name: str = "sasrec-ce") -> dict[str, list[dict]]:
    """Every variant against ``base_name`` of the same seeds (a refit against the base's refit), case by case
    (``sidforge compare``). With ``base_name="sasrec-ce-mm"`` only the other ``-mm`` variants are paired: the
    semantic-ID parts against the same multimodal items without them."""
    names = (base_name, f"{base_name}-refit")
    bases = {b: {r["seed"]: r["dir"] for r in rows if r["variant"] == b} for b in names}
    out = {}
    for name in dict.fromkeys(r["variant"] for r in rows if r["variant"] not in bases):
        if base_name.endswith(MM) and MM not in name:
            continue
        base = bases[names[1] if name.endswith("-refit") else names[0]]
        pairs = [(base[r["seed"]], r["dir"]) for r in rows if r["variant"] == name and r["seed"] in base]
        if pairs and all((Path(d) / "ranks.parquet").is_file() for pair in pairs for d in pair):
            out[name] = sasrec.compare_case_ranks([b for b, _ in pairs], [o for _, o in pairs], metrics)
    return out


QUALITY = (("recon_rel", "relative reconstruction (codes)"), ("recon_rel_full", "reconstruction incl. specific"),
           ("collision_rate", "collision rate (before)"), ("duplicate_rate", "items needing a digit"))


def quality_table(per_seed: dict[int, dict[str, dict]]) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
    names = list(dict.fromkeys(n for q in per_seed.values() for n in q))

    def cell(name: str, fn: Any) -> str:
        vals = [fn(q[name]) for q in per_seed.values() if name in q]
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        s = _mean_std(vals)
        return f"{s['mean']:.3f}±{s['std']:.3f}" if len(vals) > 1 else f"{s['mean']:.3f}"

    rows = [(label, *(cell(n, lambda q, k=key: q.get(k)) for n in names)) for key, label in QUALITY]
    levels = max(len(q[n]["entropy"]) for q in per_seed.values() for n in q)
    for level in range(levels):
        for key, label in (("entropy_norm", "entropy / log2 K"), ("utilization", "utilization"),
                           ("unique_prefix", "unique prefix"), ("behavior_coherence", "behavior coherence")):
            rows.append((f"{label} L{level + 1}",
                         *(cell(n, lambda q, k=key, lv=level: q[k][lv] if lv < len(q[k]) else None) for n in names)))
    rows.append(("wall time (s)", *(cell(n, lambda q: q["wall_s"]) for n in names)))
    return rows, ("figure", *names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/amazon-beauty.yaml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--root", default="runs/bench-bbqrec")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every stage")
    ap.add_argument("--reuse", action="append", default=[], help="run directory to copy finished stages from")
    ap.add_argument("--seq-cl", type=float, default=0.1,
                    help="sasrec.contrastive_weight of the reweighted variants (0 = no sequence-to-item loss)")
    ap.add_argument("--seq-cl-target", choices=["item", "sid"], default="item",
                    help="what the reweighted variants' sequence-to-item loss contrasts with (sid: -sidcl variants)")
    ap.add_argument("--item-repr", choices=["id", "id+sid"], default="id",
                    help="item representation of the reweighted variants (id+sid: -sidemb variants)")
    ap.add_argument("--item-features", type=lambda v: tuple(m for m in v.split(",") if m), default=(),
                    help="embed modalities the reweighted variants add to their items, e.g. text,image (-mm variants)")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    ap.add_argument("--tokenizers-only", action="store_true", help="fit the tokenizers and print their table only")
    ap.add_argument("--refit", action="store_true",
                    help="also refit every chosen variant on train + valid for its selected epochs (<variant>-refit)")
    ap.add_argument("--out", default="bench/results/bbqrec.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    init_ray(num_cpus=2)
    all_variants = list(variants(args.seq_cl, args.seq_cl_target, args.item_repr, args.item_features))
    chosen = [v for v in args.variants.split(",") if v] or all_variants
    unknown = set(chosen) - set(all_variants)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose among {', '.join(all_variants)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = (load_config(args.config).name + (SIDCL if args.seq_cl_target == "sid" else "")
            + (SIDEMB if args.item_repr == "id+sid" else "") + (MM if args.item_features else ""))
    rows: list[dict] = []
    quality: dict[int, dict[str, dict]] = {}
    pairs: dict[str, list[dict]] = {}
    for seed in map(int, args.seeds.split(",")):
        seed_rows, quality[seed] = run_seed(args, seed, chosen)
        rows += seed_rows
        pairs = paired(rows)
        pairs_mm = paired(rows, base_name=f"sasrec-ce{MM}")
        results = json.loads(out.read_text()) if out.is_file() else {}
        results[name] = {"config": args.config, "overrides": args.overrides, "seq_cl": args.seq_cl,
                         "seq_cl_target": args.seq_cl_target, "item_repr": args.item_repr, "item_features": args.item_features,
                         "refit": args.refit,
                         "machine": machine_description(), "runs": rows,
                         "summary": summarise(rows), "paired": pairs,
                         "paired_vs_sasrec_ce_mm": pairs_mm,
                         "tokenizers": {str(s): q for s, q in quality.items()}}
        out.write_text(json.dumps(results, indent=2, default=str))
    print(format_table(*quality_table(quality)))
    if rows:
        print()
        table = [(v, *(f"{e[k]['mean']:.4f}±{e[k]['std']:.4f}" for k in KEYS), str(len(e["seeds"])))
                 for v, e in summarise(rows).items()]
        print(format_table(table, ("variant", *KEYS, "seeds")))
        for base_name, comparisons in (("sasrec-ce", pairs), (f"sasrec-ce{MM}", pairs_mm)):
            lines = [(v, r["split"], r["metric"], f"{r['diff']:+.4f}", f"[{r['low']:+.4f}, {r['high']:+.4f}]",
                      f"{r['share_not_above']:.3f}", " ".join(f"{d:+.4f}" for d in r["run_diffs"]))
                     for v, rs in comparisons.items() for r in rs]
            if lines:
                print()
                print(format_table(lines, (f"variant - {base_name}(-refit)", "split", "metric", "paired diff",
                                           "95% interval over users", "P(diff <= 0)", "per seed")))


if __name__ == "__main__":
    main()
