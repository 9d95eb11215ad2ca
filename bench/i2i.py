"""i2i Hit@K of item embeddings on a run's held-out co-click pairs (the encoder check of SaviorRec).

    python bench/i2i.py RUN_DIR [--k 30] [--out bench/results/i2i.json]

Reads ``RUN/prepare/cocliks.parquet`` (split == heldout) and every embedding column of
``RUN/embed/item_embeddings.parquet``, plus ``RUN/sasrec/item_embeddings.parquet`` and
``RUN/align/item_embeddings.parquet`` (the SaviorEnc z of ``sidforge train align``) when present, and
prints Hit@K per embedding. With an align output it also scores the raw input align started from (the
embed modalities it concatenated) and prints before → after. Results go to bench/results/i2i.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sidforge.cli import format_table
from sidforge.platform.artifacts import RunDir
from sidforge.platform.metrics import i2i_hit_at_k
from sidforge.stages.embed import ItemEmbeddings, load_embeddings


def _embedding_sets(run: RunDir) -> tuple[dict[str, np.ndarray], tuple[str, str] | None]:
    """Named (N, D) matrices, and the (before, after) names when an align output is present."""
    sets = {}
    emb = load_embeddings(run)
    for name, matrix in emb.vectors.items():
        sets[f"embed/{name}"] = np.asarray(matrix, dtype=np.float32)
    sasrec = run.stage_dir("sasrec") / "item_embeddings.parquet"
    if sasrec.is_file():
        t = pq.read_table(sasrec)
        sets["sasrec/behavior"] = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    aligned = run.stage_dir("align") / "item_embeddings.parquet"
    if not aligned.is_file():
        return sets, None
    sets["align/aligned"] = ItemEmbeddings.from_table(pq.read_table(aligned)).vectors["aligned"]
    info = json.loads((run.stage_dir("align") / "metrics.json").read_text())
    if info.get("mode") != "features":  # open_clip: its own un-tuned model, scored by the stage itself
        return sets, None
    modalities = info["modalities"]
    before = "embed/" + "+".join(modalities)
    if before not in sets:
        sets[before] = np.concatenate([emb.vectors[m] for m in modalities], axis=1)
    return sets, (before, "align/aligned")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--out", default="bench/results/i2i.json")
    args = ap.parse_args()
    run = RunDir(args.run_dir)
    pairs = pq.read_table(run.stage_dir("prepare") / "cocliks.parquet").to_pandas()
    held = pairs[pairs["split"] == "heldout"][["item_a", "item_b"]].to_numpy()
    t0 = time.perf_counter()
    sets, align_pair = _embedding_sets(run)
    results = {name: i2i_hit_at_k(m, held, k=args.k) for name, m in sets.items()}
    hit = f"hit@{args.k}"
    report = {"run_dir": str(run.path), "k": args.k, "heldout_pairs": len(held), "results": results,
              "machine": platform.platform(), "command": " ".join(sys.argv),
              "wall_s": round(time.perf_counter() - t0, 2)}
    if align_pair:
        before, after = align_pair
        report["align"] = {"before": before, "after": after, f"{hit}_before": results[before][hit],
                           f"{hit}_after": results[after][hit],
                           "ratio": results[after][hit] / max(results[before][hit], 1e-12)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(format_table([(n, f"{r[hit]:.4f}", f"{r[f'recall@{args.k}']:.4f}", int(r["anchors"]))
                        for n, r in results.items()], ("embedding", hit, f"recall@{args.k}", "anchors")))
    if align_pair:
        a = report["align"]
        print(f"align: {hit} {a[f'{hit}_before']:.4f} ({before}) -> {a[f'{hit}_after']:.4f} ({after}), "
              f"x{a['ratio']:.2f}")


if __name__ == "__main__":
    main()
