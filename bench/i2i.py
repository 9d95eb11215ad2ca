"""i2i Hit@K of item embeddings on a run's held-out co-click pairs (the encoder check of SaviorRec).

    python bench/i2i.py RUN_DIR [--k 30]

Reads ``RUN/prepare/cocliks.parquet`` (split == heldout) and every embedding column of
``RUN/embed/item_embeddings.parquet`` (and ``RUN/sasrec/item_embeddings.parquet`` when present), and
prints Hit@K per embedding. Results go to bench/results/i2i.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sidforge.cli import format_table
from sidforge.platform.artifacts import RunDir
from sidforge.platform.metrics import i2i_hit_at_k
from sidforge.stages.embed import load_embeddings


def _embedding_sets(run: RunDir) -> dict[str, np.ndarray]:
    sets = {}
    emb = load_embeddings(run)
    for name, matrix in emb.vectors.items():
        sets[f"embed/{name}"] = np.asarray(matrix, dtype=np.float32)
    sasrec = run.stage_dir("sasrec") / "item_embeddings.parquet"
    if sasrec.is_file():
        t = pq.read_table(sasrec)
        sets["sasrec/behavior"] = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--out", default="bench/results/i2i.json")
    args = ap.parse_args()
    run = RunDir(args.run_dir)
    pairs = pq.read_table(run.stage_dir("prepare") / "cocliks.parquet").to_pandas()
    held = pairs[pairs["split"] == "heldout"][["item_a", "item_b"]].to_numpy()
    results = {name: i2i_hit_at_k(m, held, k=args.k) for name, m in _embedding_sets(run).items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run_dir": str(run.path), "k": args.k, "heldout_pairs": len(held),
                                          "results": results}, indent=2))
    print(format_table([(n, f"{r[f'hit@{args.k}']:.4f}", f"{r[f'recall@{args.k}']:.4f}", int(r["anchors"]))
                        for n, r in results.items()], ("embedding", f"hit@{args.k}", f"recall@{args.k}", "anchors")))


if __name__ == "__main__":
    main()
