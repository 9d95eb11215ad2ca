"""Tokenizers side by side: quality and wall time on a benchmark, and RQ-KMeans at 1 M items.

    python bench/sid_quality.py --config configs/amazon-beauty.yaml          # after prepare + embed
    python bench/sid_quality.py --skip-benchmark --synthetic-items 1000000   # the scale check only

On the benchmark run directory it fits RQ-KMeans (the config's settings, and on the raw vectors) and
RQ-VAE (3 × 256 by default, the config's ``tokenize`` section otherwise) through the tokenize stage,
imports LETTER's published IDs when ``--letter`` names them, and prints the quality table of each
(one seed; bench/ada_sid.py ``--tokenizers rqkmeans-3x256,...`` gives the same over seeds with the
ranker downstream). At scale it times residual k-means
(faiss) on synthetic clustered 384-d vectors: fit (3 levels) and assignment of every item. Results go
to bench/results/sid_quality.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from sidforge.cli import format_table, quality_rows
from sidforge.models.quantizers import pca_projection, residual_kmeans
from sidforge.platform.artifacts import RunDir
from sidforge.platform.config import load_config
from sidforge.platform.datasets import resolve_data_dir
from sidforge.platform.runtime import machine_description
from sidforge.stages import tokenize


def bench_benchmark(config: str, letter: str, overrides: list[str]) -> dict:
    results = {}
    variants = [("rqkmeans", ["tokenize.method=rqkmeans"]),
                ("rqkmeans-raw", ["tokenize.method=rqkmeans", "tokenize.rqkmeans.pca_dim=0",
                                  "tokenize.name=rqkmeans-raw"]),
                ("rqvae", ["tokenize.method=rqvae"])]
    if letter:
        variants.append(("letter", ["tokenize.method=precomputed", f"tokenize.path={letter}", "tokenize.name=letter"]))
    for name, extra in variants:
        cfg = load_config(config, [*overrides, *extra])
        t0 = time.perf_counter()
        res = tokenize.run(cfg, RunDir(cfg.run_dir), resolve_data_dir(None), force=True)
        results[name] = {"wall_s": round(time.perf_counter() - t0, 2), "quality": res.metrics,
                         "out_dir": str(res.out_dir)}
        logging.info("%s: %.1f s", name, results[name]["wall_s"])
    names = list(results)
    table = {name: dict(quality_rows(results[name]["quality"])) for name in names}
    figures = list(dict.fromkeys(k for t in table.values() for k in t))
    rows = [(fig, *(table[n].get(fig, "–") for n in names)) for fig in figures]
    rows.append(("wall time (s)", *(f"{results[n]['wall_s']:.1f}" for n in names)))
    print(format_table(rows, ("figure", *names)))
    return results


def synthetic(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Clustered unit vectors (what sentence embeddings look like), generated in chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        assign = rng.integers(0, clusters, stop - start)
        x[start:stop] = centres[assign] + rng.normal(scale=0.7, size=(stop - start, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_scale(n: int, dim: int, levels: int, k: int, seed: int, pca_dim: int = 0) -> dict:
    """Fit and assign at scale through the tokenizer (with ``pca_dim``: projection fitted and applied too)."""
    x = synthetic(n, dim, clusters=2000, seed=seed)
    t0 = time.perf_counter()
    projection = pca_projection(x, pca_dim, whiten=True) if pca_dim else None
    tok = tokenize.Tokenizer("rqkmeans", dim, levels, k, projection=projection)
    tok.codebooks, codes = residual_kmeans(tok.project(x), levels, k, niter=20, seed=seed)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = tok.assign(x)
    assign_s = time.perf_counter() - t0
    distinct = len(np.unique(codes, axis=0))
    out = {"items": n, "dim": dim, "pca_dim": pca_dim, "levels": levels, "codebook_size": k,
           "fit_s": round(fit_s, 1), "assign_s": round(assign_s, 1), "distinct_ids": distinct,
           "codes_reproduced": bool((again == codes).all())}
    print(format_table([(f"{n:,} × {dim}", pca_dim or "–", f"{levels} × {k}", f"{fit_s:.1f}", f"{assign_s:.1f}",
                         f"{1 - distinct / n:.2%}")],
                       ("items", "PCA", "levels × K", "fit (s)", "assign all (s)", "items needing a digit")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/amazon-beauty.yaml")
    ap.add_argument("--letter", default="amazon-beauty-2014/LETTER_Beauty.index.json",
                    help="LETTER ID file (relative to the data directory); '' skips it")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--skip-benchmark", action="store_true")
    ap.add_argument("--synthetic-items", type=int, default=1_000_000, help="0 skips the scale check")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--pca-dim", type=int, default=0, help="scale check: quantize the whitened top components")
    ap.add_argument("--out", default="bench/results/sid_quality.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import faiss
    import torch

    result = {"machine": f"{machine_description()}, {faiss.omp_get_max_threads()} faiss threads, "
                         f"{torch.get_num_threads()} torch threads",
              "command": " ".join(sys.argv), "config": args.config, "overrides": args.overrides}
    if not args.skip_benchmark:
        result["benchmark"] = bench_benchmark(args.config, args.letter, args.overrides)
    if args.synthetic_items:
        result["scale"] = bench_scale(args.synthetic_items, args.dim, 3, 256, seed=0, pca_dim=args.pca_dim)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
