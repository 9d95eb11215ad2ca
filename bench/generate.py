"""Generative retrieval throughput: users/s of constrained beam search, and training time per epoch.

    .venv/bin/python bench/generate.py                                   # synthetic Beauty-sized catalogue
    .venv/bin/python bench/generate.py --sids runs/amazon-beauty/tokenize-rqvae --train-steps 0
    .venv/bin/python bench/generate.py --epochs 1                        # one whole training epoch
    .venv/bin/python bench/generate.py --users 64 --train-steps 30       # quick

The model is TIGER at the ``generative`` sizes of ``--config`` (Beauty: d_model 128, 4+4 layers, 6 heads
of 64, FFN 1024), randomly initialised: beam-search cost depends on the catalogue, the beam and the
batch, not on what the weights learned (pruning by the top-K can only make a trained model faster).

* **Catalogue.** ``--sids`` reads a real ``sids.parquet`` folder; otherwise 12,101 items (Amazon
  Beauty) get 3 × 256 RQ-KMeans codes of clustered random vectors plus TIGER's collision digit.
* **Beam search.** ``--users`` histories of ``--history`` random items each (20 = the cap, the
  costliest case), beam ``--beam`` and top-K ``--top-k``, at each ``--batch-sizes``; users/s after one
  warm-up batch.
* **Training.** Beauty-sized examples (22,363 users, mean sequence 8.9: about 131k next-item
  examples with a 20-item sliding window), batch size and optimiser of the config, through the
  stage's own ``train_epoch``. ``--epochs N`` times N whole epochs (median reported); otherwise
  ``--train-steps`` steps are timed and scaled to the epoch's number of batches (0 skips training).
  One process, ``--threads`` torch threads (default 1: on a busy 2-core machine two OpenMP threads
  spin-wait and run tiny beam-search batches ~50x slower).

Results go to bench/results/generate.json with the machine, the command and the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sidforge.cli import format_table
from sidforge.models.generative import TIGER, ItemTrie, TIGERConfig, beam_search, code_tokens
from sidforge.models.quantizers import residual_kmeans
from sidforge.models.semantic_ids import collision_digits
from sidforge.platform.config import load_config
from sidforge.platform.runtime import machine_description
from sidforge.stages import generative

BEAUTY_ITEMS, BEAUTY_USERS, BEAUTY_MEAN_LEN = 12_101, 22_363, 8.88


def synthetic_codes(n: int, levels: int, codebook_size: int, seed: int) -> np.ndarray:
    """RQ-KMeans codes of clustered random vectors, plus the collision digit: (n, levels + 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, 32)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + 0.5 * rng.normal(size=(n, 32)).astype(np.float32)
    _, codes = residual_kmeans(x, levels, codebook_size, niter=10, seed=seed)
    return np.concatenate([codes, collision_digits(codes)[:, None]], axis=1)


def catalogue(args: argparse.Namespace) -> tuple[np.ndarray, tuple[int, ...], str]:
    if args.sids:
        import pyarrow.parquet as pq

        n = pq.read_metadata(Path(args.sids) / "sids.parquet").num_rows
        codes, sizes, _ = generative.load_sid_codes(Path(args.sids), n)
        return codes, sizes, str(Path(args.sids) / "sids.parquet")
    codes = synthetic_codes(BEAUTY_ITEMS, 3, 256, args.seed)
    sizes = tuple([256, 256, 256, int(codes[:, -1].max()) + 1])
    return codes, sizes, f"synthetic: {BEAUTY_ITEMS} items, RQ-KMeans 3 x 256 + digit"


def model_for(cfg_path: str, sizes: tuple[int, ...], seed: int) -> TIGER:
    g = load_config(cfg_path).generative
    torch.manual_seed(seed)
    return TIGER(TIGERConfig(level_sizes=sizes, max_history=g.max_history, user_tokens=g.user_tokens,
                             d_model=g.d_model, num_layers=g.layers, num_heads=g.heads, head_dim=g.head_dim,
                             ffn_hidden=g.ffn, dropout=g.dropout))


def bench_beam(model: TIGER, codes: np.ndarray, args: argparse.Namespace) -> list[dict]:
    c = torch.from_numpy(codes)
    trie = ItemTrie(c, model.config.level_sizes)
    table = code_tokens(c, model.config.level_sizes)
    g = torch.Generator().manual_seed(args.seed)
    model.eval()
    rows = []
    for bs in args.batch_sizes:
        users = max(bs, args.users if bs > 1 else min(args.users, 32))  # one user at a time: 32 are enough
        hist = table[torch.randint(0, len(codes), (users + bs, args.history), generator=g)]  # (U, H, L)
        user = torch.randint(0, max(model.config.user_tokens, 1), (users + bs,), generator=g)
        batches = [(hist[lo : lo + bs], user[lo : lo + bs] if model.config.user_tokens else None)
                   for lo in range(0, users + bs, bs)]
        h0, u0 = batches[0]
        beam_search(model, h0, trie, args.beam, args.top_k, u0, cache=args.cache)  # warm-up
        found = 0
        t0 = time.perf_counter()
        for h, u in batches[1:]:
            items, _ = beam_search(model, h, trie, args.beam, args.top_k, u, cache=args.cache)
            found += int((items >= 0).sum())
        wall = time.perf_counter() - t0
        rows.append({"batch_size": bs, "users": users, "seconds": round(wall, 3),
                     "users_per_s": round(users / wall, 2), "items_per_user": round(found / users, 1)})
        print(f"beam {args.beam} top-{args.top_k} batch {bs}: {users / wall:.1f} users/s", flush=True)
    return rows


class _Loss(torch.nn.Module):
    """What ``ctx.prepare_model(model, method="loss")`` gives the stage, without Ray."""

    def __init__(self, model: TIGER) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: object) -> object:
        return self.model.loss(*args)


class _OneProcess:
    """The slice of WorkerContext that ``generative.train_epoch`` uses, for one process."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def shard(self, n: int, seed: int | None = None, even: bool = True) -> np.ndarray:
        return np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)


def beauty_sized_examples(seed: int, max_history: int, codes: np.ndarray) -> generative.GenerativeData:
    """Next-item examples from Beauty-sized synthetic sequences (train part: all but the last two items)."""
    rng = np.random.default_rng(seed)
    n_items = len(codes)
    lengths = 5 + rng.geometric(1.0 / (BEAUTY_MEAN_LEN - 4), BEAUTY_USERS) - 1
    user = np.repeat(np.arange(BEAUTY_USERS), lengths - 2)
    item = rng.integers(0, n_items, len(user))
    hist, target, users = generative.train_examples(user, item, max_history, n_items)
    empty = np.zeros((0, max_history), dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    sizes = tuple(int(codes[:, i].max()) + 1 for i in range(codes.shape[1]))
    return generative.GenerativeData(n_items, codes, sizes, "bench", hist, target, users, empty, none, none, empty,
                                     none, none, np.full(n_items, "torso"))


def bench_train(model: TIGER, codes: np.ndarray, args: argparse.Namespace) -> dict:
    """Time ``args.epochs`` whole epochs, or else ``args.train_steps`` steps scaled up to one epoch."""
    g = load_config(args.config).generative
    data = beauty_sized_examples(args.seed, g.max_history, codes)
    ctx = _OneProcess()
    tables = generative.Tables.build(codes, model.config, ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    batches = -(-len(data.train_target) // g.batch_size)
    config = {"batch_size": g.batch_size, "seed": args.seed}
    part, steps = data, batches
    if args.epochs == 0:  # time `steps` batches of the real epoch loop: the examples are cut to that many
        steps = min(args.train_steps, batches)
        keep = np.random.default_rng(args.seed).permutation(len(data.train_target))[: steps * g.batch_size]
        part = dataclasses.replace(data, train_hist=data.train_hist[keep], train_target=data.train_target[keep],
                                   train_user=data.train_user[keep])
    walls, losses = [], []
    for epoch in range(max(args.epochs, 1)):
        t0 = time.perf_counter()
        losses.append(generative.train_epoch(ctx, _Loss(model), opt, tables, part, config, epoch=epoch))
        walls.append(time.perf_counter() - t0)
        print(f"train: {steps} steps in {walls[-1]:.1f} s", flush=True)
    per_step = statistics.median(walls) / max(steps, 1)
    return {"examples": len(data.train_target), "batch_size": g.batch_size, "batches_per_epoch": batches,
            "epochs_timed": args.epochs, "steps_timed": steps * max(args.epochs, 1),
            "seconds": [round(w, 2) for w in walls],
            "s_per_step": round(per_step, 4), "epoch_s": round(per_step * batches, 1),
            "epoch_s_measured": args.epochs > 0, "loss": [round(v, 4) for v in losses],
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/amazon-beauty.yaml", help="model sizes: its generative section")
    ap.add_argument("--sids", help="a RUN/tokenize-<name> folder (default: a synthetic Beauty-sized catalogue)")
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 256])
    ap.add_argument("--users", type=int, default=512, help="users timed per batch size (32 at batch size 1)")
    ap.add_argument("--history", type=int, default=20, help="items per history")
    ap.add_argument("--epochs", type=int, default=0, help="whole training epochs timed (0: time --train-steps)")
    ap.add_argument("--train-steps", type=int, default=50, help="steps timed, scaled to an epoch (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see the module doc)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cache", dest="cache", action="store_false",
                    help="re-decode every prefix at each step instead of keeping the decoder's keys and values")
    ap.add_argument("--out", default="bench/results/generate.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    codes, sizes, source = catalogue(args)
    model = model_for(args.config, sizes, args.seed)
    beam_rows = bench_beam(model, codes, args)
    train = bench_train(model, codes, args) if args.epochs or args.train_steps else None
    result = {
        "machine": machine_description(), "cpus": os.cpu_count(), "threads": args.threads,
        "python": platform.python_version(), "torch": torch.__version__,
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": args.config, "catalogue": source,
        "items": len(codes), "level_sizes": list(sizes), "beam": args.beam, "top_k": args.top_k,
        "history": args.history, "kv_cache": args.cache, "beam_search": beam_rows, "train": train,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(format_table([(r["batch_size"], r["users"], f"{r['seconds']:.2f}", f"{r['users_per_s']:.1f}",
                         r["items_per_user"]) for r in beam_rows],
                       ("batch", "users", "seconds", "users/s", "items/user")))
    if train:
        epoch = f"{train['epoch_s']:.0f}" + ("" if train["epoch_s_measured"] else " (scaled)")
        row = (train["examples"], train["batch_size"], train["steps_timed"], f"{train['s_per_step']:.3f}", epoch)
        print(format_table([row], ("examples", "batch", "steps timed", "s/step", "epoch s")))
    print(f"catalogue: {source}; load average {result['load_average_before']} -> {result['load_average_after']}")


if __name__ == "__main__":
    main()
