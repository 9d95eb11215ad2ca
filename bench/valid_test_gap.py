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

``--windows`` also loads each folder's ``model.pt`` (and the run's ``prepare``) and scores two shifted
cases per user, to locate a disagreement: the test target from the valid input (the train prefix, without
the valid item) and the valid target from the train prefix without its last item. History items are
kept among the candidates, as in the stage's default protocol.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from sidforge.cli import format_table
from sidforge.models.sasrec import SASRec, SASRecConfig
from sidforge.platform.metrics import bootstrap_means, case_gains
from sidforge.stages.sasrec import case_ranks, load_sequences, read_case_ranks


def shifted_gains(folder: str, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-user gains of the saved model on the two shifted cases (users sorted), history kept."""
    saved = torch.load(Path(folder) / "model.pt", weights_only=False)
    cfg = SASRecConfig(**saved["config"])
    model = SASRec(cfg)
    model.load_state_dict(saved["state_dict"])  # the semantic IDs, if any, are a buffer of the state
    data = load_sequences(Path(folder).parent / "prepare", cfg.max_len)
    if not np.array_equal(data.valid_user, data.test_user):
        raise SystemExit(f"{folder}: --windows needs every user to have one valid and one test case")
    dropped = np.concatenate([np.full((len(data.valid_hist), 1), cfg.pad_id), data.valid_hist[:, :-1]], axis=1)
    order = np.argsort(data.valid_user, kind="stable")
    cases = {"test target, valid input": (data.valid_hist, data.test_target),
             "valid target, last input item dropped": (dropped, data.valid_target)}
    return {name: (data.valid_user[order], case_gains(case_ranks(None, model, hist, target, False), metric)[order])
            for name, (hist, target) in cases.items()}


def per_user(folder: str, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Users (sorted) and their gains on the valid and on the test case, from one read of ``ranks.parquet``."""
    table = read_case_ranks(folder)
    out = {}
    for split in ("valid", "test"):
        t = table.filter(pc.equal(table["split"], split))
        users = t["user_id"].to_numpy()
        order = np.argsort(users, kind="stable")
        out[split] = users[order], case_gains(t["rank"].to_numpy(), metric)[order]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", nargs="+", required=True)
    ap.add_argument("--other", nargs="+", required=True)
    ap.add_argument("--metric", default="ndcg@10")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", action="store_true", help="also score the two shifted cases (loads the models)")
    ap.add_argument("--json", default="bench/results/valid_test_gap.json", help="where to write the figures")
    args = ap.parse_args()
    if len(args.base) != len(args.other):
        raise SystemExit("--base and --other pair by position: give as many folders to each")
    diffs: dict[str, list[np.ndarray]] = {"valid": [], "test": []}
    users: np.ndarray | None = None
    for b, o in zip(args.base, args.other):
        base, other = per_user(b, args.metric), per_user(o, args.metric)
        for split in diffs:
            (ub, gb), (uo, go) = base[split], other[split]
            users = ub if users is None else users
            if not (np.array_equal(ub, users) and np.array_equal(uo, users)):
                raise SystemExit(f"{b} / {o}: every folder must hold the same users on valid and on test")
            diffs[split].append(go - gb)
    assert users is not None
    if args.windows:
        torch.set_num_threads(1)
        for b, o in zip(args.base, args.other):
            gb, go = shifted_gains(b, args.metric), shifted_gains(o, args.metric)
            for name in gb:
                if not np.array_equal(gb[name][0], users):
                    raise SystemExit(f"{b}: the saved model's prepare holds other users than ranks.parquet")
                diffs.setdefault(name, []).append(go[name][1] - gb[name][1])
    means = {name: np.mean(d, axis=0) for name, d in diffs.items()}  # per user, over the seeds
    dv, dt = means["valid"], means["test"]
    samples = bootstrap_means(np.stack(list(means.values()), axis=1), args.boot, np.random.default_rng(args.seed))
    drawn = {name: samples[:, j] for j, name in enumerate(means)}  # one draw of users for every case
    boot = {"valid": drawn["valid"], "test": drawn["test"], "test - valid": drawn["test"] - drawn["valid"], **drawn}
    point = {name: m.mean() for name, m in means.items()}
    point["test - valid"] = point["test"] - point["valid"]
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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"base": args.base, "other": args.other, "metric": args.metric, "users": int(len(users)),
                       "correlation": corr, **out}, f, indent=2)


if __name__ == "__main__":
    main()
