"""The ``sidforge`` command.

    sidforge prepare --config configs/amazon-beauty.yaml [--set prepare.coclick.window=5]
    sidforge tokenize --config configs/amazon-beauty.yaml --method rqkmeans
    sidforge tokenize --config configs/amazon-beauty.yaml --method bbq          (after train sasrec)
    sidforge tokenize --config configs/amazon-beauty.yaml --method ada-sid      (after train sasrec)
    sidforge train sasrec --config configs/amazon-beauty.yaml --reweight sid --sids runs/amazon-beauty/tokenize-bbq
    sidforge train generative --config configs/amazon-beauty.yaml --sids runs/amazon-beauty/tokenize-rqvae
    sidforge train align --config configs/amazon-beauty-savior.yaml
    sidforge train ranker --config configs/amazon-beauty-savior.yaml --sids runs/amazon-beauty-savior/tokenize-aligned
    sidforge evaluate --model runs/amazon-beauty/generative-rqvae
    sidforge compare --base runs/amazon-beauty/sasrec --other runs/amazon-beauty/sasrec-sid
    sidforge serve runs/amazon-beauty-savior --config configs/amazon-beauty-savior.yaml --set serve.ranker=ranker-full-s0
    sidforge data list | sidforge data pull amazon-beauty-2014

Stages run on an embedded local Ray cluster unless ``--address`` or ``RAY_ADDRESS`` names one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sidforge.platform.config import Config, ConfigError, load_config
from sidforge.platform.schemas import DataError

log = logging.getLogger("sidforge")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="experiment YAML (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted path, e.g. prepare.coclick.window=5")
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir)")
    p.add_argument("--data-dir", help="data directory (default: $SIDFORGE_DATA_DIR or the user cache)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded cluster)")
    p.add_argument("--force", action="store_true", help="re-run even if inputs and config are unchanged")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidforge", description="sidforge: behavior-aligned semantic IDs on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="validate, re-index, split; item stats and co-click pairs (Ray Data)")
    _add_common(p)

    p = sub.add_parser("embed", help="content embeddings of every item on Ray Data actor pools (after prepare)")
    _add_common(p)

    p = sub.add_parser("train", help="train a model stage on Ray Train (after prepare)")
    p.add_argument("model", choices=["sasrec", "align", "ranker", "generative"], help="which trainer")
    p.add_argument("--sids", help="generative, ranker, sasrec --reweight sid: the IDs' folder RUN/tokenize-<name> "
                                  "(default: the config's tokenize output in the run directory)")
    p.add_argument("--reweight", choices=["none", "sid"],
                   help="sasrec: BBQRec's attention reweighting by SID similarity (default: sasrec.reweight)")
    p.add_argument("--refit", action="store_true",
                   help="sasrec: then train on train + valid for the selected epochs and score test with that "
                        "model (RUN/<stage>-refit; sasrec.refit_epochs)")
    _add_common(p)

    p = sub.add_parser("evaluate", help="re-score a trained generative model on its run's test split")
    p.add_argument("--model", required=True, help="the model's stage folder, RUN/generative-<name>")
    p.add_argument("--beam-size", type=int, help="beam width (default: the one it was trained with)")
    p.add_argument("--top-k", type=int, help="ranked-list length (default: the one it was trained with)")
    p.add_argument("--batch-size", type=int, help="users per beam-search batch")

    p = sub.add_parser("tokenize", help="semantic IDs from item embeddings, with a quality report (after embed)")
    p.add_argument("--method", choices=["rqvae", "rqkmeans", "bbq", "ada-sid", "precomputed"],
                   help="tokenizer (default: the config's tokenize.method)")
    _add_common(p)

    p = sub.add_parser("serve", help="serve a run over HTTP with Ray Serve: assign IDs to new items, recommend, rank")
    p.add_argument("run", nargs="?", metavar="RUN_DIR", help="the run directory (default: the config's run_dir)")
    p.add_argument("--host", help="listen address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: serve.port, 8000)")
    _add_common(p)

    p = sub.add_parser("tune", help="Ray Tune sweep of a search space (spaces/*.yaml) over the config's stages")
    p.add_argument("--space", required=True, help="search space YAML, e.g. spaces/savior-enc.yaml")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this space")
    p.add_argument("--fresh", action="store_true", help="delete an earlier sweep of this space first")
    p.add_argument("--num-samples", type=int, help="trials (default: the space's num_samples)")
    p.add_argument("--no-evaluate", action="store_true", help="skip the one test-split run of the best config")
    _add_common(p)

    p = sub.add_parser("pipeline", help="every stage of a method preset in order, skipping what is current, then "
                                        "the report")
    p.add_argument("--preset", choices=["savior", "bbq", "ada-sid", "tiger", "sasrec"],
                   help="the method (default: the config's pipeline.preset)")
    p.add_argument("--no-report", action="store_true", help="do not render RUN/report.md at the end")
    _add_common(p)

    p = sub.add_parser("report", help="re-render RUN/report.md and its plots; several runs: a side-by-side comparison")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="several runs: folder for comparison.md (default: runs/comparison)")
    p.add_argument("--dataset", help="published figures to show (default: the one the pipeline recorded)")

    p = sub.add_parser("compare", help="two SASRec models case by case on the same users: paired difference with "
                       "a bootstrap interval (pair seeds by position: --base A0 A1 --other B0 B1)")
    p.add_argument("--base", nargs="+", required=True, metavar="STAGE_DIR", help="e.g. runs/x-seed0/sasrec")
    p.add_argument("--other", nargs="+", required=True, metavar="STAGE_DIR", help="e.g. runs/x-seed0/sasrec-sid")
    p.add_argument("--metric", action="append", default=None, help="recall@K or ndcg@K (repeatable; default "
                   "ndcg@10 and recall@10)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples of the cases")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    p.add_argument("--json", help="also write the rows to this JSON file")

    p = sub.add_parser("config", help="print the resolved config as YAML")
    _add_common(p)

    data = sub.add_parser("data", help="benchmark data: list what is known and present, download")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("list", help="known benchmarks and whether they are present")
    p.add_argument("--data-dir")
    p = dsub.add_parser("pull", help="download a benchmark from its public sources (sha256-checked)")
    p.add_argument("name")
    p.add_argument("--data-dir")
    p.add_argument("--mirror", help="base URL of a mirror ({mirror}/{name}/{file}); or $SIDFORGE_DATA_MIRROR")
    p.add_argument("--force", action="store_true")
    return parser


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        import dataclasses

        cfg = dataclasses.replace(cfg, run_dir=args.run_dir)
    return cfg


def cmd_prepare(args: argparse.Namespace) -> int:
    from sidforge.platform.artifacts import RunDir
    from sidforge.platform.datasets import resolve_data_dir
    from sidforge.platform.runtime import init_ray
    from sidforge.stages import prepare

    cfg = _config(args)
    init_ray(args.address)
    result = prepare.run(cfg, RunDir(cfg.run_dir), resolve_data_dir(args.data_dir), force=args.force)
    status = "unchanged (skipped)" if result.skipped else f"done in {result.wall_time_s:.1f} s"
    print(f"prepare: {status} -> {result.out_dir}")
    print(format_table([(k, f"{v:,}") for k, v in result.rows.items()], ("table", "rows")))
    for key in ("buckets", "rejects_by_reason"):
        if result.metrics.get(key):
            print(f"{key}: " + ", ".join(f"{k}={v:,}" for k, v in result.metrics[key].items()))
    extra = {k: v for k, v in result.metrics.items() if not isinstance(v, dict)}
    print(", ".join(f"{k}={v:,}" for k, v in extra.items()))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from sidforge.platform.artifacts import RunDir
    from sidforge.platform.runtime import init_ray
    from sidforge.stages import embed

    cfg = _config(args)
    init_ray(args.address)
    result = embed.run(cfg, RunDir(cfg.run_dir), force=args.force)
    status = "unchanged (skipped)" if result.skipped else f"done in {result.wall_time_s:.1f} s"
    print(f"embed: {status} -> {result.out_dir}")
    print(format_table([(k, f"{v:,}") for k, v in result.rows.items()], ("what", "count")))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sidforge.platform.artifacts import RunDir
    from sidforge.platform.runtime import init_ray

    if getattr(args, "reweight", None):
        args.overrides = [f"sasrec.reweight={args.reweight}", *args.overrides]
    cfg = _config(args)
    run_dir = RunDir(cfg.run_dir)
    if getattr(args, "refit", False) and (args.model != "sasrec" or cfg.sasrec.refit_epochs):
        raise ConfigError("--refit belongs to `train sasrec` and picks sasrec.refit_epochs itself (from the "
                          "selection run); leave sasrec.refit_epochs at 0")
    if args.model == "generative":
        from sidforge.stages import generative

        if cfg.generative.num_workers > 0 or args.address:
            init_ray(args.address)
        sids = Path(args.sids) if args.sids else run_dir.stage_dir(cfg.tokenize.output_name)
        result = generative.run(cfg, run_dir, sids, force=args.force)
    elif args.model == "align":
        from sidforge.stages import align

        if cfg.align.num_workers > 0 or args.address:
            init_ray(args.address)
        result = align.run(cfg, run_dir, force=args.force)
        return _print_align(result)
    elif args.model == "ranker":
        from sidforge.stages import ranker

        if cfg.ranker.num_workers > 0 or args.address:
            init_ray(args.address)
        sids = Path(args.sids) if args.sids else run_dir.stage_dir(cfg.tokenize.output_name)
        result = ranker.run(cfg, run_dir, sids if cfg.ranker.mba or cfg.ranker.sid_features else None,
                            force=args.force)
        return _print_ranker(result)
    else:
        from sidforge.stages import sasrec

        if cfg.sasrec.num_workers > 0 or args.address:
            init_ray(args.address)
        sids = Path(args.sids) if args.sids else run_dir.stage_dir(cfg.tokenize.output_name)
        sids = sids if cfg.sasrec.reweight == "sid" else None
        result = sasrec.run(cfg, run_dir, sids, force=args.force)
        if getattr(args, "refit", False):
            _print_metrics(args.model, result)
            args.overrides = [*args.overrides, *sasrec.refit_overrides(cfg, result)]
            refit_cfg = _config(args)
            print(f"refit on train + valid for the {refit_cfg.sasrec.refit_epochs} epochs selected on valid")
            result = sasrec.run(refit_cfg, run_dir, sids, force=args.force)
    return _print_metrics(args.model, result)


def _print_metrics(model: str, result: object) -> int:
    print(f"train {model}: {_status(result)} -> {result.out_dir}")  # type: ignore[attr-defined]
    m = result.metrics  # type: ignore[attr-defined]
    splits = {split: m[split] for split in ("valid", "test") if m.get(split)}  # a refit has no valid figures
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20")
    print(format_table(*metric_rows(splits, keys)))
    return 0


def _status(result: object) -> str:
    return "unchanged (skipped)" if result.skipped else f"trained in {result.wall_time_s:.1f} s"  # type: ignore[attr-defined]


def _print_align(result: object) -> int:
    m = result.metrics  # type: ignore[attr-defined]
    print(f"train align: {_status(result)} -> {result.out_dir}")  # type: ignore[attr-defined]
    rows = [(name, f"{m[name].get('hit@30', float('nan')):.4f}", f"{m[name].get('recall@30', float('nan')):.4f}")
            for name in ("i2i_before", "i2i_after") if name in m]
    print(format_table(rows, ("held-out co-click pairs", "hit@30", "recall@30")))
    return 0


def _print_ranker(result: object) -> int:
    m = result.metrics  # type: ignore[attr-defined]
    print(f"train ranker: {_status(result)} -> {result.out_dir}")  # type: ignore[attr-defined]
    rows = []
    for split in ("valid", "test"):
        part = m.get(split, {})
        for group in ("", "/head", "/torso", "/tail", "/cold"):
            if f"auc{group}" in part:
                rows.append((split + group, *(f"{part.get(k + group, float('nan')):.4f}"
                                              for k in ("auc", "gauc", "logloss")), f"{part[f'count{group}']:,}"))
    print(format_table(rows, ("split", "auc", "gauc", "logloss", "impressions")))
    return 0


def metric_rows(splits: dict[str, dict], keys: Sequence[str]) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
    """Retrieval metrics as table rows: one per split, then the last split per popularity bucket."""
    last = splits[list(splits)[-1]]
    keys = [k for k in keys if k in last]
    rows = [(name, *(f"{m.get(k, float('nan')):.4f}" for k in keys)) for name, m in splits.items()]
    for bucket in ("head", "torso", "tail", "cold"):
        if f"count/{bucket}" in last:
            rows.append((f"{list(splits)[-1]}/{bucket}", *(f"{last.get(f'{k}/{bucket}', float('nan')):.4f}"
                                                           for k in keys)))
    return rows, ("split", *keys)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sidforge.stages import generative

    test = generative.evaluate_saved(args.model, args.beam_size, args.top_k, args.batch_size)
    keys = [f"{m}@{k}" for k in (5, 10, 20, 50) for m in ("recall", "ndcg")]
    print(f"evaluate {args.model}: {test['count']:,} test cases")
    print(format_table(*metric_rows({"test": test}, keys)))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from sidforge.platform.artifacts import RunDir
    from sidforge.platform.datasets import resolve_data_dir
    from sidforge.platform.runtime import init_ray
    from sidforge.stages import tokenize

    if args.method:
        args.overrides = [f"tokenize.method={args.method}", *args.overrides]
    cfg = _config(args)
    t = cfg.tokenize
    if t.rqvae.num_workers > 0 or t.bbq.num_workers > 0 or t.ada_sid.num_workers > 0 or args.address:
        init_ray(args.address)
    result = tokenize.run(cfg, RunDir(cfg.run_dir), resolve_data_dir(args.data_dir), force=args.force)
    status = "unchanged (skipped)" if result.skipped else f"done in {result.wall_time_s:.1f} s"
    print(f"tokenize {cfg.tokenize.method}: {status} -> {result.out_dir}")
    print(format_table(quality_rows(result.metrics), ("figure", "value")))
    return 0


def quality_rows(q: dict) -> list[tuple[str, str]]:
    """The tokenizer quality report as (figure, value) rows."""
    def levels(key: str, fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in q.get(key, []))

    rows = [("items", f"{int(q['items']):,}"), ("utilization per level", levels("utilization", ".1%")),
            ("entropy per level (bits)", levels("entropy", ".2f")),
            ("collision rate (before)", f"{q['collision_rate']:.2%}"),
            ("items needing a digit", f"{q['duplicate_rate']:.2%}"),
            ("largest shared ID", f"{int(q['max_group'])}"),
            ("unique prefix per level", levels("unique_prefix", ".1%")),
            ("unique after collision step", f"{q['unique_after']:.1%}"), ("ID length", f"{q['sid_length']}")]
    if "avg_codes" in q:  # variable-length IDs (ada-sid)
        rows.append(("average ID length (with digit)", f"{q['avg_sid_length']:.2f}"))
    if "dropped_share" in q:
        rows.append(("dropped behavioral IDs", f"{q['dropped_share']:.1%}"))
        rows += [(f"  {b}: dropped / alignment w", f"{v['dropped_share']:.1%} / {v['alignment_w']:.3f}")
                 for b, v in q.get("by_bucket", {}).items() if "dropped_share" in v]
    if "recon_rel" in q:
        rows.insert(1, ("relative reconstruction error", f"{q['recon_rel']:.4f}"))
    if "recon_rel_full" in q:  # bbq: codes + each item's modality-specific parts
        rows.insert(2, ("reconstruction error with specific parts", f"{q['recon_rel_full']:.4f}"))
    if q.get("behavior_coherence"):
        rows.append(("behavior coherence per level", levels("behavior_coherence", ".3f")))
    return rows


def cmd_serve(args: argparse.Namespace) -> int:
    from sidforge.serving.app import serve_run
    from sidforge.serving.plan import resolve

    args.overrides = [*(f"serve.{k}={v}" for k in ("host", "port") if (v := getattr(args, k)) is not None),
                      *args.overrides]
    cfg = _config(args)
    plan = resolve(cfg, args.run or cfg.run_dir)
    print(f"serve: {plan.run_dir} (model {plan.version}, retriever {cfg.serve.retriever}) on "
          f"http://{cfg.serve.host}:{cfg.serve.port}  (API docs at /docs; Ctrl-C stops)", flush=True)
    serve_run(plan, args.address)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from sidforge.platform.datasets import resolve_data_dir
    from sidforge.platform.runtime import init_ray
    from sidforge.tuning.spaces import load_space
    from sidforge.tuning.sweep import run_sweep

    if args.run_dir:
        args.overrides = [*args.overrides, f"run_dir={args.run_dir}"]
    space = load_space(args.space, args.config)
    init_ray(args.address, extra_resources={"train_driver": space.max_concurrent})
    res = run_sweep(args.config, args.overrides, space, data_dir=resolve_data_dir(args.data_dir),
                    resume=args.resume, fresh=args.fresh, evaluate=not args.no_evaluate,
                    num_samples=args.num_samples)
    table = res.table
    cols = ["trial_id", "status", space.metric, "iterations", *[p.path for p in space.params],
            *[k for k in space.extra_metrics if k in table]]
    rows = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in table[cols].itertuples(index=False)]
    print(format_table(rows, cols))
    print(f"tune {space.name}: {len(table)} trials, {(table['status'] == 'ERROR').sum()} failed -> {res.out_dir}")
    if res.best_params is not None:
        print(f"best {space.metric} = {res.best_value:.4f} with {res.best_params}; config: {res.best_config}")
        if res.test:
            print("test split of the best config (read once): "
                  + ", ".join(f"{k}={v:.4f}" for k, v in sorted(res.test.items()) if "count" not in k))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from sidforge.pipeline import run_pipeline
    from sidforge.platform.datasets import resolve_data_dir

    if args.force:
        raise ConfigError("sidforge pipeline has no --force: a stage re-runs by itself when its config, inputs or "
                          "outputs changed; use the stage's own command with --force to redo one")
    if not args.verbose:  # one line per stage and the progress bars, not every epoch's log line
        logging.getLogger("sidforge").setLevel(logging.WARNING)
    run_pipeline(args.config, args.overrides, preset=args.preset, run_dir=args.run_dir,
                 data_dir=resolve_data_dir(args.data_dir), address=args.address,
                 report=False if args.no_report else None, command="sidforge " + " ".join(sys.argv[1:]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sidforge.platform import report

    if len(args.runs) == 1:
        print(f"report: {report.render(args.runs[0], dataset=args.dataset)}")
    else:
        print(f"comparison: {report.compare(args.runs, args.out or 'runs/comparison')}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from sidforge.stages.sasrec import compare_case_ranks

    try:
        rows = compare_case_ranks(args.base, args.other, args.metric or ["ndcg@10", "recall@10"], args.boot,
                                  args.seed)
    except ValueError as e:  # a malformed --metric or --boot
        raise ConfigError(f"compare: {e}") from e
    table = [(r["split"], r["metric"], f"{r['base']:.4f}", f"{r['other']:.4f}", f"{r['diff']:+.4f}",
              f"[{r['low']:+.4f}, {r['high']:+.4f}]", f"{r['share_not_above']:.3f}",
              " ".join(f"{d:+.4f}" for d in r["run_diffs"]), str(r["cases"])) for r in rows]
    print(format_table(table, ("split", "metric", "base", "other", "other - base", "95% interval",
                               "P(other <= base)", "per seed", "cases")))
    if not rows[0]["joint"]:
        print("(the pairs rank different case sets: each pair's cases were resampled on their own)")
    if args.json:
        Path(args.json).write_text(json.dumps({"base": args.base, "other": args.other, "rows": rows}, indent=2))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from sidforge.platform.config import dump_config

    print(dump_config(_config(args)), end="")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from sidforge.platform import datasets

    data_dir = datasets.resolve_data_dir(args.data_dir)
    if args.data_command == "list":
        rows = [(b["name"], b["source"], "yes" if b["complete"] else ("partial" if b["present"] else "no"),
                 _clip(b["description"], 72)) for b in datasets.list_benchmarks(data_dir)]
        print(f"data directory: {data_dir}")
        print(format_table(rows, ("name", "format", "present", "what")))
        return 0
    path = datasets.pull(args.name, data_dir, mirror=args.mirror, force=args.force, progress=sys.stderr.isatty())
    print(f"{args.name}: complete at {path}")
    return 0


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


COMMANDS = {"prepare": cmd_prepare, "embed": cmd_embed, "train": cmd_train, "tokenize": cmd_tokenize,
            "evaluate": cmd_evaluate, "tune": cmd_tune, "config": cmd_config, "data": cmd_data, "serve": cmd_serve,
            "pipeline": cmd_pipeline, "report": cmd_report, "compare": cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        logging.getLogger("sidforge").setLevel(logging.INFO)
        for noisy in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"sidforge: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the datasets module's own errors
        if type(e).__name__ in ("DownloadError", "UnknownBenchmark"):
            print(f"sidforge: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

