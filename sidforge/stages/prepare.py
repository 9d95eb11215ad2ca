"""The prepare stage on Ray Data: raw logs and item content → the canonical tables.

Flow (every step streams; only vocabularies, item counts and summed co-click pairs reach the driver):

1. read the source through its adapter; collect the user and item vocabularies;
2. validate each row (null ids or order → rejects) and re-index ids to contiguous int64;
3. hash-shuffle by user; per partition sort, de-duplicate, set short users aside, assign
   leave-one-out (or official) splits and the cold-item hold-out;
4. from the per-user result: the interactions table, train item counts → item stats and popularity
   buckets, and co-click pair counts (shuffled by pair, summed, then weighted and capped).

Outputs go to ``RUN/prepare/`` through a temporary folder, with a manifest entry. Nothing built
from valid/test interactions reaches the item stats or the co-click pairs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sidforge.platform.adapters import RawSource, load_source
from sidforge.platform.artifacts import (
    RunDir,
    StageResult,
    fingerprint_files,
)
from sidforge.platform.config import Config
from sidforge.platform.logs import (
    OFFICIAL_CODES,
    SPLIT_NAMES,
    TRAIN,
    choose_cold_items,
    coclick_counts,
    finalize_coclicks,
    order_and_split,
    sum_pairs,
)
from sidforge.platform.schemas import COCLICKS, ITEM_STATS, REJECTS, DataError

log = logging.getLogger(__name__)

STAGE = "prepare"




# ----------------------------------------------------------------------------------------------
# entry point


def run(cfg: Config, run_dir: RunDir, data_dir: Path, force: bool = False) -> StageResult:
    """Run (or skip) the prepare stage; returns what it wrote."""
    t0 = time.perf_counter()
    config_hash = stage_config_hash(cfg)
    inputs = _input_fingerprints(cfg, data_dir)
    if not force and (cached := run_dir.cached(STAGE, config_hash, inputs)) is not None:
        return cached
    with run_dir.writing(STAGE) as out:
        source = load_source(cfg, data_dir, out / "_staging")
        rows, metrics = _prepare(cfg, source, out)
        _remove_tree(out / "_staging")
    result = run_dir.finish(STAGE, config_hash, inputs, rows, metrics, t0)
    log.info("prepare: wrote %s in %.1f s", result.out_dir, result.wall_time_s)
    return result


def stage_config_hash(cfg: Config) -> str:
    sections = ["data", "prepare", "seed"] + (["synthetic"] if cfg.data.source == "synthetic" else [])
    return cfg.section_hash(*sections)


def _input_fingerprints(cfg: Config, data_dir: Path) -> dict[str, str]:
    """Fingerprint the raw inputs without parsing them (synthetic data is fixed by its config)."""
    d = cfg.data
    if d.source == "synthetic":
        return {"synthetic": cfg.section_hash("synthetic")}
    if d.source == "table":
        paths = [Path(p) for p in (d.interactions, d.items) if p]
        base = Path(d.path) if d.path else Path(".")
        paths = [p if p.is_absolute() else base / p for p in paths]
    else:
        folder = Path(d.path) if d.path else data_dir / d.name
        if not folder.is_dir():
            raise DataError(f"data folder {folder} not found; set SIDFORGE_DATA_DIR or --data-dir, "
                            f"or download it with `sidforge data pull {d.name or '<name>'}`")
        paths = [folder]
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file()]
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"input {p} does not exist (data.interactions / data.items)")
    return fingerprint_files(files)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# the pipeline


def _prepare(cfg: Config, source: RawSource, out: Path) -> tuple[dict[str, int], dict[str, Any]]:
    import ray

    # imported here, not at module top: Ray workers import this module and must not pay for torch
    from sidforge.platform.metrics import popularity_buckets

    pcfg = cfg.prepare
    official = cfg.data.split == "official"
    if official and not source.has_official_split:
        raise DataError("data.split=official but this source ships no split; use data.split=loo")
    ds = _dataset(source)
    if not isinstance(source.interactions, pa.Table):
        ds = ds.materialize()  # read the files once: the vocabulary pass and the main pass share it
    users, items = _vocabularies(ds, source)
    num_items = len(items)
    cold = choose_cold_items(num_items, pcfg.cold_item_fraction, cfg.seed)
    refs = {"users": ray.put(users), "items": ray.put(items), "cold": ray.put(cold)}

    # one pass: validate + re-index, shuffle by user, per-partition split/stats/pairs; rows that fail
    # validation travel with user_id -1 and come out of the per-user step as rejects
    per_user = (
        ds.map_batches(_MapIds(refs, source.order, official), batch_format="pyarrow")
        .repartition(pcfg.num_partitions, keys=["user_id"])
        .map_batches(_PerUser(refs, pcfg.min_seq_len, official, pcfg.coclick.window), batch_size=None,
                     batch_format="pyarrow")
        .materialize()
    )
    _of_kind(per_user, ["interaction"], ["user_id", "item_id", "position", "split"]).write_parquet(
        str(out / "interactions"))
    side = _side_outputs(per_user, num_items, pcfg.driver_merge_rows)

    buckets = popularity_buckets(side.counts)
    pq.write_table(pa.table({"item_id": np.arange(num_items, dtype=np.int64), "train_count": side.counts,
                             "bucket": buckets, "cold_holdout": cold}, schema=ITEM_STATS),
                   out / "item_stats.parquet")
    pairs = _coclicks(side.pairs, per_user, side.counts, cfg)
    pq.write_table(pa.table(pairs, schema=COCLICKS), out / "cocliks.parquet")

    item_table, item_rejects = _items_output(items, source.items)
    pq.write_table(item_table, out / "items.parquet")
    pq.write_table(pa.table({"user_id": np.arange(len(users), dtype=np.int64), "source_id": users}),
                   out / "users.parquet")
    rejects = pa.concat_tables([_to_rejects(side.rejects, users, items), item_rejects])
    pq.write_table(rejects, out / "rejects.parquet")
    return _summary(side, len(users), num_items, buckets, cold, pairs, rejects, item_table)


@dataclass
class _Side:
    counts: np.ndarray  # (num_items,) train counts
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # partial co-click counts, None when too many
    pair_rows: int
    rejects: pa.Table
    splits: dict[str, int]


def _side_outputs(per_user: Any, num_items: int, max_pair_rows: int) -> _Side:
    """Everything but the interactions, gathered in one pass: counts, partial pairs, rejects, split sizes.

    Partial pair counts are kept only while they fit in ``max_pair_rows`` rows; past that they are
    dropped here (``pairs`` is None) and summed on the cluster instead.
    """
    counts = np.zeros(num_items, dtype=np.int64)
    pa_, pb, pcnt, rejects = [], [], [], []
    splits: dict[str, int] = {}
    pair_rows = 0
    cols = ["kind", "user_id", "item_id", "item_b", "count", "split", "raw", "src_order", "reason"]
    for batch in _of_kind(per_user, ["count", "pair", "reject", "split_count"], cols).iter_batches(
            batch_size=None, batch_format="pyarrow"):
        kind = batch.column("kind").to_numpy(zero_copy_only=False)
        for name, sel in (("count", kind == "count"), ("pair", kind == "pair"), ("reject", kind == "reject"),
                          ("split_count", kind == "split_count")):
            if not sel.any():
                continue
            part = batch.filter(pa.array(sel))
            if name == "count":
                np.add.at(counts, part.column("item_id").to_numpy(), part.column("count").to_numpy())
            elif name == "pair":
                pair_rows += part.num_rows
                if pair_rows > max_pair_rows:
                    pa_, pb, pcnt = [], [], []
                    continue
                pa_.append(part.column("item_id").to_numpy())
                pb.append(part.column("item_b").to_numpy())
                pcnt.append(part.column("count").to_numpy())
            elif name == "reject":
                rejects.append(part.select(_REJECT_COLS))
            else:
                for sp, c in zip(part.column("split").to_pylist(), part.column("count").to_pylist()):
                    splits[sp] = splits.get(sp, 0) + int(c)
    empty = np.zeros(0, dtype=np.int64)
    pairs = tuple(np.concatenate(x) if x else empty for x in (pa_, pb, pcnt)) if pair_rows <= max_pair_rows else None
    reject_table = pa.concat_tables(rejects) if rejects else pa.table(
        {c: pa.array([], pa.int64() if c.endswith("_id") else pa.string()) for c in _REJECT_COLS})
    return _Side(counts, pairs, pair_rows, reject_table, splits)


def _summary(side: _Side, num_users: int, num_items: int, buckets: np.ndarray, cold: np.ndarray,
             pairs: dict[str, np.ndarray], rejects: pa.Table, items: pa.Table
             ) -> tuple[dict[str, int], dict[str, Any]]:
    rows = {
        "users": side.splits.get("test", 0),  # every kept user has exactly one test interaction
        "users_seen": num_users,
        "items": num_items,
        "interactions": sum(side.splits.values()),
        **{f"split_{k}": v for k, v in sorted(side.splits.items())},
        "cocliks": len(pairs["item_a"]),
        "rejects": rejects.num_rows,
    }

    def tally(values: np.ndarray) -> dict[str, int]:
        return {str(k): int(v) for k, v in zip(*np.unique(values, return_counts=True))}

    metrics = {
        "rejects_by_reason": tally(rejects.column("reason").to_numpy(zero_copy_only=False)),
        "buckets": tally(buckets),
        "cold_holdout_items": int(cold.sum()),
        "train_items": int((side.counts > 0).sum()),
        "cocliks_heldout": int((pairs["split"] == "heldout").sum()),
        "items_with_title": int(items.num_rows - items.column("title").null_count),
        "items_with_categories": int(items.num_rows - items.column("categories").null_count),
        "items_with_brand": int(items.num_rows - items.column("brand").null_count),
    }
    return rows, metrics


# ----------------------------------------------------------------------------------------------
# reading and vocabularies


def _dataset(source: RawSource) -> Any:
    import ray

    if isinstance(source.interactions, pa.Table):
        table = source.interactions
        n_blocks = max(1, min(16, table.num_rows // 50_000))
        return ray.data.from_arrow([table.slice(i * (table.num_rows // n_blocks + 1), table.num_rows // n_blocks + 1)
                                    for i in range(n_blocks)])
    if source.file_format == "csv":
        from pyarrow import csv as pacsv

        return ray.data.read_csv(source.interactions,
                                 convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    return ray.data.read_parquet(source.interactions)


def _sorted_unique(arrays: list[pa.Array]) -> pa.Array:
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        return pa.array([], pa.int64())
    types = {a.type for a in arrays}
    if len(types) > 1 and not all(pa.types.is_integer(t) for t in types):
        raise DataError(f"item/user ids mix types {sorted(map(str, types))}: ids in the interactions and the "
                        "items table must be all integers or all strings")
    if all(pa.types.is_integer(t) for t in types):
        arrays = [a.cast(pa.int64()) for a in arrays]
    merged = pc.unique(pa.chunked_array(arrays).combine_chunks()).drop_null()
    return merged.take(pc.sort_indices(merged))


def _vocabularies(ds: Any, source: RawSource) -> tuple[pa.Array, pa.Array]:
    """Sorted distinct user and item source ids (items: interactions ∪ items table)."""
    user_parts, item_parts = [], []
    if isinstance(source.interactions, pa.Table):
        batches = [source.interactions]
    else:
        batches = ds.select_columns(["user_id", "item_id"]).iter_batches(batch_size=1_000_000,
                                                                        batch_format="pyarrow")
    for batch in batches:
        user_parts.append(pc.unique(batch.column("user_id").combine_chunks()))
        item_parts.append(pc.unique(batch.column("item_id").combine_chunks()))
    if source.items is not None:
        item_parts.append(pc.unique(source.items.column("item_id").combine_chunks()))
    return _sorted_unique(user_parts), _sorted_unique(item_parts)


# ----------------------------------------------------------------------------------------------
# per-row and per-partition UDFs

_CACHE: dict[str, Any] = {}
# rejected rows: re-indexed ids where known (-1 otherwise), the raw ids of invalid rows in ``raw``
_REJECT_COLS = ["user_id", "item_id", "raw", "src_order", "reason"]
_SPLIT_CODE = {name: code for name, code in OFFICIAL_CODES.items()}


def _get(ref: Any) -> Any:
    """ray.get with a per-process cache: each worker fetches the vocabularies once."""
    import ray

    key = ref.hex()
    if key not in _CACHE:
        if len(_CACHE) >= 8:  # a long-lived worker serves several runs: keep the most recent few
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def _index_of(values: pa.Array, vocab: pa.Array) -> np.ndarray:
    if pa.types.is_integer(vocab.type) or len(vocab) == 0:
        v = values.cast(pa.int64()).to_numpy(zero_copy_only=False)
        voc = vocab.to_numpy(zero_copy_only=False)
        return np.searchsorted(voc, v).astype(np.int64)
    return pc.index_in(values.cast(vocab.type), value_set=vocab).to_numpy(zero_copy_only=False).astype(np.int64)


def _order_values(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_timestamp(col.type):
        return col.cast(pa.int64())
    return col


class _MapIds:
    """Row validation and re-indexing; invalid rows keep user_id -1 and a ``reason``."""

    def __init__(self, refs: dict[str, Any], order: str, official: bool) -> None:
        self.refs, self.order, self.official = refs, order, official

    def __call__(self, batch: pa.Table) -> pa.Table:
        for name in ("user_id", "item_id", self.order):
            if name not in batch.column_names:
                raise DataError(f"interactions: missing column {name!r}; columns present: {batch.column_names}")
        user = batch.column("user_id").combine_chunks()
        item = batch.column("item_id").combine_chunks()
        order = _order_values(batch.column(self.order))
        reason = np.full(batch.num_rows, None, dtype=object)
        for name, col in ((self.order, order), ("item_id", item), ("user_id", user)):
            reason[pc.is_null(col).to_numpy(zero_copy_only=False)] = f"null_{name}"
        if pa.types.is_floating(order.type):
            reason[~np.isfinite(order.fill_null(0).to_numpy(zero_copy_only=False))] = f"bad_{self.order}"
        bad = reason != None  # noqa: E711 - elementwise over an object array
        good = np.flatnonzero(~bad)
        user_id = np.full(batch.num_rows, -1, dtype=np.int64)
        item_id = np.full(batch.num_rows, -1, dtype=np.int64)
        user_id[good] = _index_of(user.take(good), _get(self.refs["users"]))
        item_id[good] = _index_of(item.take(good), _get(self.refs["items"]))
        # nulls stay null (their rows are rejects and never reach the per-user step's sort)
        order_num = order.cast(pa.float64()) if pa.types.is_floating(order.type) else order.cast(pa.int64())
        raw = np.full(batch.num_rows, None, dtype=object)
        if bad.any():  # only invalid rows carry their raw ids (as text) through the shuffle
            idx = np.flatnonzero(bad)
            raw[idx] = [f"{u}\t{i}" for u, i in zip(user.take(idx).to_pylist(), item.take(idx).to_pylist())]
        cols = {
            "user_id": user_id, "item_id": item_id, "order": order_num,
            "raw": pa.array(raw, pa.string()), "reason": pa.array(reason, pa.string()),
        }
        if self.official:
            split = batch.column("split").combine_chunks().to_numpy(zero_copy_only=False)
            codes = np.array([_SPLIT_CODE.get(s, -1) for s in split], dtype=np.int8)
            unknown = (codes < 0) & ~bad
            reason[unknown] = "unknown_split"
            cols["reason"] = pa.array(reason, pa.string())
            cols["split_code"] = codes
        return pa.table(cols)


class _PerUser:
    """One hash partition of whole users → interactions, rejects, train counts and co-click pairs."""

    def __init__(self, refs: dict[str, Any], min_seq_len: int, official: bool, window: int) -> None:
        self.refs, self.min_seq_len, self.official, self.window = refs, min_seq_len, official, window

    def __call__(self, batch: pa.Table) -> pa.Table:
        invalid = pc.is_valid(batch.column("reason")).to_numpy(zero_copy_only=False)
        parts = []
        if invalid.any():
            bad = batch.filter(pa.array(invalid))
            parts.append(_kind_table("reject", {
                "user_id": bad.column("user_id"), "item_id": bad.column("item_id"), "raw": bad.column("raw"),
                "src_order": bad.column("order").cast(pa.string()), "reason": bad.column("reason"),
            }))
            batch = batch.filter(pa.array(~invalid))
        user = batch.column("user_id").to_numpy()
        item = batch.column("item_id").to_numpy()
        order = batch.column("order").to_numpy()
        official = batch.column("split_code").to_numpy() if self.official else None
        res = order_and_split(user, item, order, self.min_seq_len, cold_items=_get(self.refs["cold"]),
                              official_split=official)
        split_names = SPLIT_NAMES[res.split]
        parts.append(_kind_table("interaction", {
            "user_id": res.user, "item_id": res.item, "position": res.position, "split": split_names,
        }))
        names, sizes = np.unique(split_names, return_counts=True)
        parts.append(_kind_table("split_count", {"split": names, "count": sizes}))
        for index, why in ((res.dup_index, "duplicate_interaction"), (res.short_index, "short_sequence")):
            if len(index):
                parts.append(_kind_table("reject", {
                    "user_id": user[index], "item_id": item[index],
                    "src_order": pa.array(order[index]).cast(pa.string()), "reason": np.full(len(index), why),
                }))
        train = res.split == TRAIN
        ids, n = np.unique(res.item[train], return_counts=True)
        parts.append(_kind_table("count", {"item_id": ids, "count": n}))
        a, b, c = coclick_counts(res.user[train], res.item[train], self.window)
        parts.append(_kind_table("pair", {"item_id": a, "item_b": b, "count": c}))
        return pa.concat_tables(parts)


_KIND_SCHEMA = pa.schema([
    ("kind", pa.string()), ("user_id", pa.int64()), ("item_id", pa.int64()), ("position", pa.int64()),
    ("split", pa.string()), ("item_b", pa.int64()), ("count", pa.int64()),
    ("raw", pa.string()), ("src_order", pa.string()), ("reason", pa.string()),
])


def _kind_table(kind: str, cols: dict[str, Any]) -> pa.Table:
    n = len(next(iter(cols.values())))
    arrays = []
    for f in _KIND_SCHEMA:
        if f.name == "kind":
            arrays.append(pa.array(np.full(n, kind), pa.string()))
        elif f.name in cols:
            arrays.append(pa.array(cols[f.name]).cast(f.type))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=_KIND_SCHEMA)


def _of_kind(ds: Any, kinds: list[str], columns: list[str]) -> Any:
    def select(batch: pa.Table) -> pa.Table:
        mask = pc.is_in(batch.column("kind"), value_set=pa.array(kinds))
        return batch.filter(mask).select(columns)

    return ds.map_batches(select, batch_format="pyarrow", batch_size=None)


def _to_rejects(t: pa.Table, users: pa.Array, items: pa.Array) -> pa.Table:
    """Rejected interaction rows with their source ids (mapped back through the vocabularies)."""
    n = t.num_rows
    if n == 0:
        return REJECTS.empty_table()
    uid = t.column("user_id").to_numpy(zero_copy_only=False)
    iid = t.column("item_id").to_numpy(zero_copy_only=False)
    raw = t.column("raw").to_pylist()
    def source_ids(vocab: pa.Array, ids: np.ndarray) -> list:  # only the rejected rows' own ids
        return vocab.take(np.maximum(ids, 0)).cast(pa.string()).to_pylist() if len(vocab) else [None] * n

    src_u, src_i = source_ids(users, uid), source_ids(items, iid)
    user_col, item_col = [], []
    for k in range(n):
        ru, ri = raw[k].split("\t") if raw[k] is not None else (None, None)
        user_col.append(src_u[k] if uid[k] >= 0 else (None if ru == "None" else ru))
        item_col.append(src_i[k] if iid[k] >= 0 else (None if ri == "None" else ri))
    return pa.table({
        "source": pa.array(np.full(n, "interactions"), pa.string()),
        "user_id": pa.array(user_col, pa.string()), "item_id": pa.array(item_col, pa.string()),
        "order": t.column("src_order").cast(pa.string()), "reason": t.column("reason").cast(pa.string()),
    }, schema=REJECTS)


# ----------------------------------------------------------------------------------------------
# co-click pairs and items


class _SumPairs:
    """After a shuffle by item_a, each partition holds every partial count of its pairs: sum and filter."""

    def __init__(self, min_count: int) -> None:
        self.min_count = min_count

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a, b, c = sum_pairs(batch["item_id"], batch["item_b"], batch["count"])
        keep = c >= self.min_count
        return {"item_id": a[keep], "item_b": b[keep], "count": c[keep]}


def _coclicks(partial: tuple[np.ndarray, np.ndarray, np.ndarray] | None, per_user: Any, counts: np.ndarray,
              cfg: Config) -> dict[str, np.ndarray]:
    """Sum the per-partition pair counts, then filter, weight, cap and split them.

    Partial counts up to ``prepare.driver_merge_rows`` rows are merged on the driver (one vectorised
    sort); above that they are shuffled by item and summed on the cluster, so the driver only ever
    holds pairs that pass ``min_count``.
    """
    cc = cfg.prepare.coclick
    if partial is not None:
        a, b, c = sum_pairs(*partial)
    else:
        summed = (_of_kind(per_user, ["pair"], ["item_id", "item_b", "count"])
                  .repartition(cfg.prepare.num_partitions, keys=["item_id"])
                  .map_batches(_SumPairs(cc.min_count), batch_size=None, batch_format="numpy"))
        parts = [b for b in summed.iter_batches(batch_size=None, batch_format="numpy") if len(b["item_id"])]
        empty = np.zeros(0, dtype=np.int64)
        # each reduce partition holds every partial count of its pairs, so these sums are complete
        a, b, c = (np.concatenate([p[k] for p in parts]) if parts else empty for k in ("item_id", "item_b", "count"))
    return finalize_coclicks(a, b, c, counts, min_count=cc.min_count, pop_alpha=cc.pop_alpha,
                             max_per_item=cc.max_per_item, holdout_fraction=cc.holdout_fraction, seed=cfg.seed)


def _items_output(items: pa.Array, raw_items: pa.Table | None) -> tuple[pa.Table, pa.Table]:
    """Items in id order with their content; duplicate or null item ids in the items table → rejects."""
    n = len(items)
    base = pa.table({"item_id": pa.array(np.arange(n, dtype=np.int64)), "source_id": items})
    empty_rejects = REJECTS.empty_table()
    if raw_items is None:
        from sidforge.platform.schemas import ITEM_CONTENT

        for f in ITEM_CONTENT:
            base = base.append_column(f.name, pa.nulls(n, f.type))
        return base, empty_rejects
    raw_ids = raw_items.column("item_id").combine_chunks()
    null = pc.is_null(raw_ids).to_numpy(zero_copy_only=False)
    idx = np.full(len(raw_ids), -1, dtype=np.int64)
    valid = np.flatnonzero(~null)
    idx[valid] = _index_of(raw_ids.take(valid), items)
    first = np.zeros(len(idx), dtype=bool)
    _, first_pos = np.unique(idx, return_index=True)
    first[first_pos] = True
    keep = first & ~null
    bad = np.flatnonzero(~keep)
    rejects = pa.table({
        "source": pa.array(np.full(len(bad), "items"), pa.string()),
        "user_id": pa.nulls(len(bad), pa.string()),
        "item_id": raw_ids.take(bad).cast(pa.string()),
        "order": pa.nulls(len(bad), pa.string()),
        "reason": pa.array(np.where(null[bad], "null_item_id", "duplicate_item_id"), pa.string()),
    }, schema=REJECTS)
    # scatter the kept rows into item-id order
    target = np.full(n, -1, dtype=np.int64)
    target[idx[keep]] = np.flatnonzero(keep)
    content = raw_items.drop_columns(["item_id"])
    taken = content.take(pa.array(target, mask=target < 0))
    for name in taken.column_names:
        base = base.append_column(name, taken.column(name))
    return base, rejects
