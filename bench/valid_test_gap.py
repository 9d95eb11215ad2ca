"""Do valid and test disagree about two models by more than the sample of users explains?

    python bench/valid_test_gap.py --base runs/sci/amazon-scientific-mm-seed{0,1,2}/sasrec \
        --other runs/sci/amazon-scientific-mm-seed{0,1,2}/sasrec-rw-bbq-sidcl-sidemb [--metric ndcg@10]

Reads the ``ranks.parquet`` of SASRec stage folders paired by position (one seed each, the same users).
Per user it takes the other-minus-base difference on the valid case and on the test case (mean over the
seeds), and resamples users (the same draw for valid and test) to bound three things: the valid
difference, the test difference, and the gap between them (test minus valid). A gap interval that holds
0 means valid and test disagree no more than another sample of users could make them; its width is what
a model choice on valid can resolve. Also prints the correlation of the per-user valid and test
differences (near 0: one user's valid case says little about their test case).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.compute as pc

from sidforge.cli import format_table
from sidforge.platform.metrics import case_gains
from sidforge.stages.sasrec import read_case_ranks


def per_user(folder: str, split: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    t = read_case_ranks(folder)
    t = t.filter(pc.equal(t["split"], split))
    users = t["user_id"].to_numpy()
    order = np.argsort(users, kind="stable")
    return users[order], case_gains(t["rank"].to_numpy(), metric)[order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", nargs="+", required=True)
    ap.add_argument("--other", nargs="+", required=True)
    ap.add_argument("--metric", default="ndcg@10")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if len(args.base) != len(args.other):
        raise SystemExit("--base and --other pair by position: give as many folders to each")
    diffs: dict[str, list[np.ndarray]] = {"valid": [], "test": []}
    users: np.ndarray | None = None
    for b, o in zip(args.base, args.other):
        for split in diffs:
            (ub, gb), (uo, go) = per_user(b, split, args.metric), per_user(o, split, args.metric)
            users = ub if users is None else users
            if not (np.array_equal(ub, users) and np.array_equal(uo, users)):
                raise SystemExit(f"{b} / {o}: every folder must hold the same users on valid and on test")
            diffs[split].append(go - gb)
    assert users is not None
    dv, dt = np.mean(diffs["valid"], axis=0), np.mean(diffs["test"], axis=0)
    rng = np.random.default_rng(args.seed)
    idx = rng.integers(0, len(users), size=(args.boot, len(users)))
    boot = {"valid": dv[idx].mean(axis=1), "test": dt[idx].mean(axis=1)}
    boot["test - valid"] = boot["test"] - boot["valid"]
    point = {"valid": dv.mean(), "test": dt.mean(), "test - valid": dt.mean() - dv.mean()}
    rows, out = [], {}
    for name, b in boot.items():
        low, high = np.quantile(b, [0.025, 0.975])
        out[name] = {"diff": float(point[name]), "low": float(low), "high": float(high), "se": float(b.std(ddof=1))}
        rows.append((name, f"{point[name]:+.4f}", f"[{low:+.4f}, {high:+.4f}]", f"{b.std(ddof=1):.4f}"))
    corr = float(np.corrcoef(dv, dt)[0, 1])
    print(format_table(rows, (f"other - base, {args.metric}", "mean over seeds", "95% interval over users", "se")))
    print(f"users: {len(users)}, seeds: {len(args.base)}, per-user correlation of the valid and test differences: "
          f"{corr:+.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": args.base, "other": args.other, "metric": args.metric, "users": int(len(users)),
                       "correlation": corr, **out}, f, indent=2)


if __name__ == "__main__":
    main()
