"""Dataset adapters: read a source format into raw interactions and an items table.

Each adapter returns a :class:`RawSource`. Small benchmark files are parsed in-process (a few
hundred thousand rows); a user's own logs and large synthetic logs stay as Parquet/CSV files that
``prepare`` streams with Ray Data. Format problems are errors that name the file, the line or row,
and the field; row-level problems (null ids, duplicates) are left to ``prepare``, which sets the
rows aside in a rejects table.

Supported formats:
  * ``s3rec``: S3-Rec / P5 ``<Name>.txt`` sequence file ("user item item …", 1-based ints,
    chronological) + P5 ``datamaps.json`` + ``<Name>_item2attributes.json`` (+ optional
    ``products_lookup.csv``/``item_id_to_int.json`` titles). Any category in this format works given
    its folder.
  * ``recbole``: RecBole atomic files ``X.train.inter``/``X.valid.inter``/``X.test.inter`` (user,
    history, target), ``X.item2index``, ``X.user2index``, ``X.text``.
  * ``recbole-mm``: ``recbole`` plus raw float32 feature files ``X.feat1CLS`` (text) and
    ``X.feat3CLS`` (image), rows in item2index order.
  * ``table``: a user's own logs (see :data:`TABLE_SCHEMA_DOC`).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sidforge.platform.config import Config
from sidforge.platform.schemas import ITEM_CONTENT, DataError

log = logging.getLogger(__name__)

TABLE_SCHEMA_DOC = """\
interactions (Parquet or CSV, one file or a folder of files):
  user_id    int or string, required, not null
  item_id    int or string, required, not null
  timestamp  int/float/timestamp  } one of the two is required: the order of a user's
  position   int                  } interactions (ties keep file order)
  label      int, optional (1 = positive); other columns are ignored
items (optional, Parquet or CSV), one row per item:
  item_id    same type as in interactions, unique, not null
  title, text, brand, image_uri   string, optional
  categories list<string>, or a string with categories separated by '|'
  feat_*     fixed-size list<float32>, optional precomputed features (e.g. feat_text, feat_image)
"""


@dataclass
class RawSource:
    """What an adapter hands to ``prepare``.

    Attributes:
        interactions: an Arrow table, or a list of Parquet/CSV files to stream, with columns
            ``user_id``, ``item_id``, ``order`` column and optionally ``split``/``label``.
        items: items table keyed by ``item_id`` (source ids) with the content columns; may be None.
        files: every input file (their fingerprints decide whether prepare can be skipped).
        order: name of the order column (``position`` or ``timestamp``).
        file_format: ``parquet`` or ``csv`` when ``interactions`` is a list of files.
        has_official_split: the interactions carry a ``split`` column shipped with the data.
    """

    interactions: pa.Table | list[str]
    items: pa.Table | None
    files: list[Path]
    order: str = "position"
    file_format: str = "parquet"
    has_official_split: bool = False
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# helpers


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: missing {what}; check data.path/data.name or run `sidforge data pull`")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty ({what})")
    return path


def _find_one(folder: Path, pattern: str, what: str) -> Path:
    hits = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not hits:
        raise DataError(f"{folder}: no file matching {pattern!r} ({what})")
    if len(hits) > 1:
        raise DataError(f"{folder}: several files match {pattern!r} ({what}): {[h.name for h in hits]}")
    return _require(hits[0], what)


_INT64_MAX = 2**63 - 1


def _text_lines(path: Path, newline: str | None = None) -> Iterator[tuple[int, str]]:
    """Numbered lines of a UTF-8 text file; a line that is not UTF-8 is an error naming it."""
    with path.open(encoding="utf-8", errors="surrogateescape", newline=newline) as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                line.encode("utf-8")  # undecodable bytes were kept as lone surrogates
            except UnicodeEncodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 text; save the file as UTF-8") from e
            yield lineno, line


def _index(tok: str) -> int | None:
    """The value of a non-negative int64 token written in ASCII digits; None for anything else."""
    # '²'.isdigit() is True but int('²') fails, and Arrow's int64 stops at 2**63 - 1
    return int(tok) if tok.isascii() and tok.isdigit() and int(tok) <= _INT64_MAX else None


def _check_unique(path: Path, names: list[str]) -> None:
    dups = [name for name, k in Counter(names).items() if k > 1]
    if dups:
        raise DataError(f"{path}: column {dups[0]!r} appears {names.count(dups[0])} times; "
                        "give each column a unique name")


def _load_json(path: Path) -> object:
    try:
        return json.loads(_require(path, "JSON file").read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def _items_table(ids: pa.Array, columns: dict[str, list | pa.Array]) -> pa.Table:
    """Items table with every canonical content column present (nulls where unknown)."""
    n = len(ids)
    arrays = {"item_id": ids}
    for f in ITEM_CONTENT:
        arrays[f.name] = pa.array(columns.pop(f.name), type=f.type) if f.name in columns else pa.nulls(n, f.type)
    for name, values in columns.items():  # feature and truth columns
        arrays[name] = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    return pa.table(arrays)


def fixed_size_feature(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float matrix → Arrow fixed-size list<float32> column."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


# ----------------------------------------------------------------------------------------------
# S3-Rec / P5


def read_sequence_file(path: Path) -> pa.Table:
    """Parse an S3-Rec sequence file: each line ``user item item …`` (ints, chronological)."""
    _require(path, "sequence file")
    users, items, positions = [], [], []
    for lineno, line in _text_lines(path):
        tokens = line.split()
        if not tokens:
            raise DataError(f"{path}:{lineno}: empty line (expected 'user item item ...')")
        if len(tokens) < 2:
            raise DataError(f"{path}:{lineno}: field 'items': user {tokens[0]!r} has no items")
        values = [_index(tok) for tok in tokens]
        for col, (tok, value) in enumerate(zip(tokens, values)):
            if value is None:
                field_name = "user" if col == 0 else f"item #{col}"
                raise DataError(f"{path}:{lineno}: field {field_name!r}: {tok!r} is not a non-negative integer "
                                "(int64)")
        user, seq = values[0], values[1:]
        users.extend([user] * len(seq))
        items.extend(seq)
        positions.extend(range(len(seq)))
    if not users:
        raise DataError(f"{path}: file is empty (sequence file)")
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            "position": pa.array(positions, pa.int64()),
        }
    )


def _split_attributes(names: list[list[str]]) -> tuple[list[list[str]], list[str | None]]:
    """Separate brand from category names in P5 attribute lists.

    P5 builds an item's attributes as [brand, category path…]; S3-Rec then drops attributes used by
    fewer than 5 items, so the brand may be missing. A name that ever appears after the first
    position is a category; a first name that never does is the brand. Our choice: "Unknown" is
    treated as no brand.
    """
    category_names = {n for lst in names for n in lst[1:]}
    cats, brands = [], []
    for lst in names:
        if lst and lst[0] not in category_names:
            brand = lst[0]
            brands.append(None if brand.lower() == "unknown" else brand)
            cats.append(lst[1:])
        else:
            brands.append(None)
            cats.append(list(lst))
    return cats, brands


def load_s3rec(folder: Path) -> RawSource:
    """Adapter for the S3-Rec/P5 format (e.g. amazon-beauty-2014)."""
    candidates = sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.upper().startswith("LICENSE"))
    if len(candidates) != 1:
        raise DataError(f"{folder}: expected exactly one S3-Rec sequence file (*.txt other than LICENSE*), "
                        f"found {[p.name for p in candidates]}")
    seq_path = _require(candidates[0], "S3-Rec sequence file")
    inter = read_sequence_file(seq_path)
    datamaps_path = _require(folder / "datamaps.json", "P5 datamaps.json")
    datamaps = _load_json(datamaps_path)
    for key in ("id2item", "id2attribute", "attributeid2num"):
        if not isinstance(datamaps, dict) or key not in datamaps:
            raise DataError(f"{datamaps_path}: field {key!r} missing")
    id2item: dict[str, str] = datamaps["id2item"]
    item_ids = sorted(int(k) for k in id2item)
    asins = [id2item[str(i)] for i in item_ids]
    files = [seq_path, datamaps_path]

    # attribute names: S3-Rec attr k is the k-th P5 attribute (ascending id) used by >= 5 items
    attrs_path = _find_one(folder, "*_item2attributes.json", "S3-Rec item attributes")
    files.append(attrs_path)
    item2attr = _load_json(attrs_path)
    kept = sorted(int(k) for k, v in datamaps["attributeid2num"].items() if int(v) >= 5)
    names = []
    for i in item_ids:
        attr = item2attr.get(str(i), [])
        try:
            names.append([datamaps["id2attribute"][str(kept[a - 1])] for a in attr])
        except (IndexError, KeyError) as e:
            raise DataError(f"{attrs_path}: item {i}: attribute id out of range ({e})") from e
    categories, brands = _split_attributes(names)

    titles: list[str | None] = [None] * len(item_ids)
    lookup, to_int = folder / "products_lookup.csv", folder / "item_id_to_int.json"
    if lookup.exists() and to_int.exists():
        files += [lookup, to_int]
        asin_to_gid = _load_json(to_int)
        with lookup.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"global_product_id", "name"} <= set(reader.fieldnames):
                raise DataError(f"{lookup}: header must contain 'global_product_id' and 'name'")
            by_gid = {row["global_product_id"]: row["name"] for row in reader}
        for k, asin in enumerate(asins):
            gid = asin_to_gid.get(asin)
            name = by_gid.get(str(gid)) if gid is not None else None
            titles[k] = name.strip() if name and name.strip() else None
    items = _items_table(
        pa.array(item_ids, pa.int64()),
        {"title": titles, "categories": categories, "brand": brands, "asin": asins},
    )
    return RawSource(interactions=inter, items=items, files=files, info={"format": "s3rec"})


# ----------------------------------------------------------------------------------------------
# RecBole atomic files


def _read_tsv(path: Path, expected: list[str]) -> list[list[str]]:
    _require(path, "RecBole atomic file")
    rows = []
    for lineno, line in _text_lines(path, newline=""):
        parts = line.rstrip("\n").split("\t")
        if lineno == 1:
            if [h.split(":")[0] for h in parts][: len(expected)] != expected:
                raise DataError(f"{path}:1: header {parts} does not start with fields {expected}")
        elif len(parts) < len(expected):
            raise DataError(f"{path}:{lineno}: expected {len(expected)} tab-separated fields {expected}, got {len(parts)}")
        else:
            rows.append(parts)
    if not rows:
        raise DataError(f"{path}: file has a header but no rows")
    return rows


def _read_index(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    first_line: dict[tuple[str, object], int] = {}  # a repeated token or index would lose an item or a user
    for lineno, line in _text_lines(_require(path, "RecBole index file")):
        parts = line.rstrip("\n").split("\t")
        index = _index(parts[1]) if len(parts) == 2 else None
        if index is None:
            raise DataError(f"{path}:{lineno}: expected 'token<TAB>index', got {line.strip()!r}")
        for key, what in ((("token", parts[0]), f"token {parts[0]!r}"), (("index", index), f"index {index}")):
            if key in first_line:
                raise DataError(f"{path}:{lineno}: {what} is already on line {first_line[key]}; "
                                "each token and each index must appear once")
            first_line[key] = lineno
        out[parts[0]] = index
    return out


def _recbole_sequences(folder: Path, stem: str) -> tuple[dict[int, list[int]], list[Path]]:
    """Rebuild each user's full chronological sequence from RecBole's train/valid/test rows.

    Train rows hold every prefix (history → next item), valid and test rows the last two; the
    shortest history plus every row's target, chained by :func:`_chain_rows`, give the sequence.
    """
    def to_int(path: Path, lineno: int, field_name: str, tok: str) -> int:
        value = _index(tok)
        if value is None:
            raise DataError(f"{path}:{lineno}: field {field_name!r}: {tok!r} is not an integer index")
        return value

    paths = [folder / f"{stem}.{part}.inter" for part in ("train", "valid", "test")]
    train: dict[int, list[tuple[list[int], int]]] = {}
    last: dict[str, dict[int, tuple[list[int], int]]] = {"valid": {}, "test": {}}
    for path, part in zip(paths, ("train", "valid", "test")):
        for lineno, row in enumerate(_read_tsv(path, ["user_id", "item_id_list", "item_id"]), start=2):
            user = to_int(path, lineno, "user_id", row[0])
            hist = [to_int(path, lineno, "item_id_list", t) for t in row[1].split()]
            target = to_int(path, lineno, "item_id", row[2])
            if part == "train":
                train.setdefault(user, []).append((hist, target))
            elif user in last[part]:
                raise DataError(f"{path}:{lineno}: user index {user} has a second row; the {part} file holds "
                                "one row per user")
            else:
                last[part][user] = (hist, target)
    for user in [*train, *last["valid"]]:  # a user left out of the test file would be dropped
        if user not in last["test"]:
            raise DataError(f"{paths[2]}: user index {user} has rows in {paths[0].name} or {paths[1].name} "
                            "but no test row")
    seqs = {}
    for user, test in last["test"].items():
        if user not in last["valid"]:
            raise DataError(f"{paths[2]}: user index {user} has a test row but no valid row in {paths[1].name}")
        seqs[user] = _chain_rows(train.get(user, []), last["valid"][user], test,
                                 f"{paths[0].name}/valid/test: user index {user}")
    return seqs, paths


def _chain_rows(train: list[tuple[list[int], int]], valid: tuple[list[int], int], test: tuple[list[int], int],
                where: str) -> list[int]:
    """Order one user's (history, target) rows into their sequence.

    Histories are cut to their last items (RecBole's MAX_ITEM_LIST_LENGTH, 50 for UniSRec's files), so
    rows of a long user share one history length and length alone cannot order them: each step
    appends the target of the train row whose history is the end of the sequence built so far. The
    valid and test rows come last whatever their history: when it repeats an earlier window, their
    targets must not be taken for a train row's.
    """
    rows = [*train[::-1], valid, test]  # oldest first: train rows are newest first
    longest = max(len(h) for h, _ in rows)
    targets: dict[tuple[int, ...], list[int]] = {}
    for hist, target in train:
        targets.setdefault(tuple(hist), []).append(target)
    seq = list(min(rows, key=lambda r: len(r[0]))[0])  # the oldest of the shortest (all are 1 long when the cap is 1)
    for _ in train:
        nxt = targets.get(tuple(seq[-longest:]))
        if not nxt:
            raise DataError(f"{where}: no row continues the history {seq[-longest:]}; "
                            f"the rows do not chain into one sequence")
        seq.append(nxt.pop())  # rows are newest first, so a repeated history's oldest target is last
    for part, (hist, target) in (("valid", valid), ("test", test)):
        if tuple(hist) != tuple(seq[-longest:]):
            raise DataError(f"{where}: the {part} row's history {hist} does not end the sequence "
                            f"{seq[-longest:]}; the rows do not chain into one sequence")
        seq.append(target)
    return seq


def load_recbole(folder: Path, with_features: bool = False) -> RawSource:
    """Adapter for RecBole atomic files (amazon-scientific-2018[-mm])."""
    inter_path = _find_one(folder, "*.train.inter", "RecBole train interactions")
    stem = inter_path.name[: -len(".train.inter")]
    seqs, files = _recbole_sequences(folder, stem)
    item2index = _read_index(folder / f"{stem}.item2index")
    user2index = _read_index(folder / f"{stem}.user2index")
    index2item = {v: k for k, v in item2index.items()}
    index2user = {v: k for k, v in user2index.items()}
    files += [folder / f"{stem}.item2index", folder / f"{stem}.user2index"]

    users, items, positions, splits = [], [], [], []
    for u, seq in seqs.items():
        if u not in index2user:
            raise DataError(f"{files[0]}: user index {u} is not in {stem}.user2index")
        for pos, it in enumerate(seq):
            if it not in index2item:
                raise DataError(f"{files[0]}: item index {it} (user {u}) is not in {stem}.item2index")
            users.append(index2user[u])
            items.append(index2item[it])
            positions.append(pos)
            splits.append("test" if pos == len(seq) - 1 else "valid" if pos == len(seq) - 2 else "train")
    inter = pa.table({"user_id": users, "item_id": items, "position": pa.array(positions, pa.int64()),
                      "split": splits})

    asins = [index2item[i] for i in sorted(index2item)]
    text_path = folder / f"{stem}.text"
    texts: dict[str, str] = {}
    if text_path.exists():
        files.append(text_path)
        texts = {row[0]: row[1].strip() for row in _read_tsv(text_path, ["item_id", "text"])}
    columns: dict[str, object] = {"text": [texts.get(a) or None for a in asins]}
    if with_features:
        for suffix, name in (("feat1CLS", "feat_text"), ("feat3CLS", "feat_image")):
            path = _require(folder / f"{stem}.{suffix}", f"{name} features")
            files.append(path)
            columns[name] = fixed_size_feature(read_feature_matrix(path, len(asins)))
    items = _items_table(pa.array(asins, pa.string()), columns)
    return RawSource(interactions=inter, items=items, files=files, has_official_split=True,
                     info={"format": "recbole", "stem": stem})


def read_feature_matrix(path: Path, rows: int) -> np.ndarray:
    """Raw float32 matrix file with ``rows`` rows; the width is inferred and checked."""
    size = path.stat().st_size
    if size % 4:  # np.fromfile would drop the trailing bytes
        raise DataError(f"{path}: {size} bytes is not a whole number of float32 values (4 bytes each)")
    data = np.fromfile(path, dtype=np.float32)
    if rows == 0 or data.size == 0 or data.size % rows:
        raise DataError(f"{path}: {data.size} float32 values cannot form {rows} rows (one per item in item2index)")
    matrix = data.reshape(rows, -1)
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise DataError(f"{path}: row {int(np.argmax(bad))} has NaN or infinite values")
    return matrix


# ----------------------------------------------------------------------------------------------
# A user's own tables


def _files_of(path: Path) -> tuple[list[Path], str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".csv") and p.is_file())
        if not files:
            raise DataError(f"{path}: folder has no .parquet or .csv files")
    else:
        files = [_require(path, "table")]
    formats = {p.suffix for p in files}
    if len(formats) != 1 or formats - {".parquet", ".csv"}:
        raise DataError(f"{path}: expected only .parquet or only .csv files, found {sorted(formats)}")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: file is empty")
    return files, formats.pop().lstrip(".")


def _schema_of(path: Path, fmt: str) -> pa.Schema:
    try:
        if fmt == "parquet":
            schema = pq.read_schema(path)
        else:
            with pacsv.open_csv(path) as reader:
                schema = reader.schema
        names = schema.names  # decoded here: a CSV header that is not UTF-8 fails only now
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as {fmt}: {e}") from e
    _check_unique(path, names)
    return schema


def _check_columns(path: Path, schema: pa.Schema, checks: dict[str, Callable[[pa.DataType], bool]],
                   expected: dict[str, str]) -> None:
    for name, ok in checks.items():
        if name not in schema.names:
            raise DataError(f"{path}: missing column {name!r} ({expected[name]}); columns present: {schema.names}"
                            f"\nExpected schema:\n{TABLE_SCHEMA_DOC}")
        if not ok(schema.field(name).type):
            raise DataError(f"{path}: column {name!r} has type {schema.field(name).type}, expected {expected[name]}")


def _is_id(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def load_table(interactions: Path, items: Path | None) -> RawSource:
    """Adapter for a user's own Parquet/CSV logs and item table (schema: :data:`TABLE_SCHEMA_DOC`)."""
    files, fmt = _files_of(interactions)
    order = None
    for f in files:
        schema = _schema_of(f, fmt)
        this_order = "timestamp" if "timestamp" in schema.names else "position" if "position" in schema.names else None
        if this_order is None:
            raise DataError(f"{f}: missing order column: need 'timestamp' or 'position'\n{TABLE_SCHEMA_DOC}")
        if order is not None and this_order != order:
            raise DataError(f"{f}: uses {this_order!r} but other files use {order!r}; use one order column")
        order = this_order
        order_ok = (lambda t: pa.types.is_integer(t) or pa.types.is_null(t)) if order == "position" else (
            lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_timestamp(t)
            or pa.types.is_null(t))
        _check_columns(f, schema, {"user_id": _is_id, "item_id": _is_id, order: order_ok},
                       {"user_id": "int or string", "item_id": "int or string",
                        order: "int" if order == "position" else "int, float or timestamp"})
    item_table = None
    all_files = list(files)
    if items is not None:
        item_files, item_fmt = _files_of(items)
        all_files += item_files
        tables = []
        for f in item_files:
            _check_columns(f, _schema_of(f, item_fmt), {"item_id": _is_id}, {"item_id": "int or string"})
            tables.append(pq.read_table(f) if item_fmt == "parquet" else pacsv.read_csv(
                f, convert_options=pacsv.ConvertOptions(strings_can_be_null=True)))
        try:
            combined = pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"{items}: the item files have different types for a column ({e}); "
                            "give each column one type in every file") from e
        item_table = normalise_items(combined, item_files[0])
    return RawSource(interactions=[str(f) for f in files], items=item_table, files=all_files,
                     order=order or "position", file_format=fmt, info={"format": "table"})


def normalise_items(table: pa.Table, path: Path) -> pa.Table:
    """Bring a user's items table to the canonical content columns (categories as list<string>)."""
    _check_unique(path, table.column_names)
    if "item_id" not in table.column_names:
        raise DataError(f"{path}: missing column 'item_id'; columns present: {table.column_names}")
    columns: dict[str, object] = {}
    for f in ITEM_CONTENT:
        if f.name not in table.column_names:
            continue
        col = table.column(f.name)
        if f.name == "categories" and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = pa.array([None if v is None else [c.strip() for c in v.split("|") if c.strip()]
                            for v in col.to_pylist()], pa.list_(pa.string()))
        try:
            columns[f.name] = col.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{path}: column {f.name!r} has type {col.type}, expected {f.type}") from e
    for name in table.column_names:
        if name.startswith("feat_"):
            col = table.column(name)
            listed = pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type)
            if not (listed and (pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type))):
                raise DataError(f"{path}: feature column {name!r} must be a list of floats, got {col.type}")
            columns[name] = col
    content = {k: v for k, v in columns.items() if k in ITEM_CONTENT.names}
    extra = {k: v for k, v in columns.items() if k not in ITEM_CONTENT.names}
    return _items_table(table.column("item_id").combine_chunks(), {**{k: v.to_pylist() for k, v in content.items()},
                                                                     **extra})


# ----------------------------------------------------------------------------------------------


def load_source(cfg: Config, data_dir: Path, staging: Path) -> RawSource:
    """Dispatch on ``cfg.data.source``.

    Args:
        cfg: the experiment config.
        data_dir: the resolved data directory (benchmark folders live under it).
        staging: a scratch folder for generated files (synthetic logs).
    """
    d = cfg.data
    if d.source == "synthetic":
        from sidforge.platform.synthetic import write_synthetic

        return write_synthetic(cfg.synthetic, staging)
    if d.source == "table":
        base = Path(d.path) if d.path else Path(".")
        inter = Path(d.interactions) if Path(d.interactions).is_absolute() else base / d.interactions
        items = None
        if d.items:
            items = Path(d.items) if Path(d.items).is_absolute() else base / d.items
        return load_table(inter, items)
    folder = Path(d.path) if d.path else data_dir / d.name
    if not folder.is_absolute() and d.path:
        folder = data_dir / d.path if (data_dir / d.path).exists() else folder
    if not folder.is_dir():
        raise DataError(
            f"data folder {folder} not found; set SIDFORGE_DATA_DIR or --data-dir, "
            f"or download it with `sidforge data pull {d.name or '<name>'}`"
        )
    if d.source == "s3rec":
        return load_s3rec(folder)
    return load_recbole(folder, with_features=d.source == "recbole-mm")
