"""Dataset adapters on tiny files written per test, plus (``-m data``) the real benchmark folders.

Format errors must name the file, the line and the field; the real-data tests pin the counts that
the shared benchmark copies are known to have (see the data README).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from sidforge.platform.adapters import (
    RawSource,
    _split_attributes,
    load_recbole,
    load_s3rec,
    load_source,
    load_table,
    read_feature_matrix,
    read_sequence_file,
)
from sidforge.platform.config import load_config
from sidforge.platform.schemas import ITEM_CONTENT, DataError

# ----------------------------------------------------------------------------------------------
# S3-Rec sequence file


def test_sequence_file_parses_users_items_and_positions(tmp_path: Path):
    path = tmp_path / "Toys.txt"
    path.write_text("1 1 2 3\n2 2 3 4 5\n3 5 1 3\n")
    t = read_sequence_file(path)
    assert t.schema == pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("position", pa.int64())])
    assert t.num_rows == 10
    assert t.column("user_id").to_pylist() == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert t.column("item_id").to_pylist() == [1, 2, 3, 2, 3, 4, 5, 5, 1, 3]
    assert t.column("position").to_pylist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]


def test_sequence_file_accepts_extra_whitespace(tmp_path: Path):
    path = tmp_path / "Toys.txt"
    path.write_text("1  7\t8 \r\n2 9 10")  # no final newline, CRLF, tabs
    t = read_sequence_file(path)
    assert t.column("item_id").to_pylist() == [7, 8, 9, 10]


@pytest.mark.parametrize(
    "text, lineno, needles",
    [
        ("1 1 2\n2 3 x4 5\n", 2, ["'item #2'", "'x4'", "integer"]),
        ("1 1 2\n2 3 -4\n", 2, ["'item #2'", "'-4'"]),
        ("u1 1 2\n", 1, ["'user'", "'u1'"]),
        ("1 1 2\n2 3\n7\n", 3, ["'items'", "'7'", "no items"]),
        ("1 1 2\n\n2 3 4\n", 2, ["empty line"]),
        ("1 1 2\n   \n2 3 4\n", 2, ["empty line"]),
    ],
)
def test_sequence_file_errors_name_file_line_and_field(tmp_path: Path, text: str, lineno: int, needles: list[str]):
    path = tmp_path / "Toys.txt"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        read_sequence_file(path)
    msg = str(e.value)
    assert f"Toys.txt:{lineno}:" in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_empty_or_missing_sequence_file_is_an_error(tmp_path: Path):
    path = tmp_path / "Toys.txt"
    path.write_text("")
    with pytest.raises(DataError, match=r"Toys\.txt.*empty"):
        read_sequence_file(path)
    with pytest.raises(DataError, match=r"Nope\.txt.*missing"):
        read_sequence_file(tmp_path / "Nope.txt")


# ----------------------------------------------------------------------------------------------
# S3-Rec folder

# P5 attribute ids → names and item counts; S3-Rec keeps those used by >= 5 items, renumbered 1..K
_P5_ATTRS = {1: ("Acme", 6), 2: ("Makeup", 10), 3: ("Face", 7), 4: ("RareBrand", 1), 5: ("Unknown", 5),
             6: ("Skin Care", 8)}
# S3-Rec ids: 1 Acme, 2 Makeup, 3 Face, 4 Unknown, 5 Skin Care
_ITEM_ATTRS = {"1": [1, 2, 3], "2": [2, 3], "3": [4, 5], "4": [5, 3]}  # item 5 has none
_ASINS = {1: "B01", 2: "B02", 3: "B03", 4: "B04", 5: "B05"}


def _s3rec_folder(root: Path, titles: bool = True) -> Path:
    folder = root / "toys"
    folder.mkdir()
    (folder / "Toys.txt").write_text("1 1 2 3\n2 2 3 4 5\n3 5 1 3\n")
    datamaps = {
        "item2id": {a: str(i) for i, a in _ASINS.items()},
        "id2item": {str(i): a for i, a in _ASINS.items()},
        "id2attribute": {str(k): name for k, (name, _) in _P5_ATTRS.items()},
        "attributeid2num": {str(k): n for k, (_, n) in _P5_ATTRS.items()},
    }
    (folder / "datamaps.json").write_text(json.dumps(datamaps))
    (folder / "Toys_item2attributes.json").write_text(json.dumps(_ITEM_ATTRS))
    if titles:
        with (folder / "products_lookup.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", "global_product_id", "name"])
            w.writerows([[0, 10, "Red Ball "], [1, 11, "Blue Car"], [2, 12, "  "], [3, 13, "Kite"]])
        # B04 has no global id, B03's name is blank
        (folder / "item_id_to_int.json").write_text(json.dumps({"B01": 10, "B02": 11, "B03": 12, "B05": 13}))
    return folder


def test_s3rec_folder_gives_titles_categories_and_brand(tmp_path: Path):
    src = load_s3rec(_s3rec_folder(tmp_path))
    assert isinstance(src, RawSource) and not src.has_official_split and src.order == "position"
    assert src.interactions.num_rows == 10
    items = src.items
    for f in ITEM_CONTENT:
        assert items.schema.field(f.name).type == f.type
    rows = {r["item_id"]: r for r in items.to_pylist()}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert [rows[i]["asin"] for i in range(1, 6)] == ["B01", "B02", "B03", "B04", "B05"]
    assert [rows[i]["title"] for i in range(1, 6)] == ["Red Ball", "Blue Car", None, None, "Kite"]
    # Acme only ever comes first → brand; Makeup and Skin Care also occur later → categories
    assert rows[1]["brand"] == "Acme" and rows[1]["categories"] == ["Makeup", "Face"]
    assert rows[2]["brand"] is None and rows[2]["categories"] == ["Makeup", "Face"]
    assert rows[3]["brand"] is None and rows[3]["categories"] == ["Skin Care"]  # "Unknown" = no brand
    assert rows[4]["brand"] is None and rows[4]["categories"] == ["Skin Care", "Face"]
    assert rows[5]["brand"] is None and rows[5]["categories"] == []
    assert {p.name for p in src.files} == {"Toys.txt", "datamaps.json", "Toys_item2attributes.json",
                                          "products_lookup.csv", "item_id_to_int.json"}


def test_s3rec_folder_without_title_files_has_null_titles(tmp_path: Path):
    src = load_s3rec(_s3rec_folder(tmp_path, titles=False))
    assert src.items.column("title").null_count == 5
    assert {p.name for p in src.files} == {"Toys.txt", "datamaps.json", "Toys_item2attributes.json"}


def test_s3rec_attribute_out_of_range_names_file_and_item(tmp_path: Path):
    folder = _s3rec_folder(tmp_path)
    (folder / "Toys_item2attributes.json").write_text(json.dumps({"1": [1, 9]}))
    with pytest.raises(DataError, match=r"Toys_item2attributes\.json.*item 1"):
        load_s3rec(folder)


def test_s3rec_datamaps_missing_field_is_named(tmp_path: Path):
    folder = _s3rec_folder(tmp_path)
    (folder / "datamaps.json").write_text(json.dumps({"id2item": {"1": "B01"}}))
    with pytest.raises(DataError, match=r"datamaps\.json.*'id2attribute'"):
        load_s3rec(folder)


def test_split_attributes_brand_rule():
    cats, brands = _split_attributes([["Acme", "Makeup"], ["Makeup", "Face"], ["unknown", "Face"], [],
                                      ["Zed"]])
    assert brands == ["Acme", None, None, None, "Zed"]
    assert cats == [["Makeup"], ["Makeup", "Face"], ["Face"], [], []]


# ----------------------------------------------------------------------------------------------
# RecBole atomic files

_SEQS = {  # user index → item indices; user 1 repeats an item and is longer than the history cap
    0: [0, 1, 2, 3, 4],
    1: [2, 3, 0, 5, 1, 4, 2],
    2: [4, 0, 1],  # shortest possible: no train row at all
}
_INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def _recbole_rows(seq: list[int], max_len: int) -> tuple[list[tuple[list[int], int]], tuple, tuple]:
    """RecBole's augmentation: every (history → next) row, histories cut to their last ``max_len``."""
    rows = [(seq[max(0, k - max_len):k], seq[k]) for k in range(1, len(seq))]
    return rows[:-2][::-1], rows[-2], rows[-1]  # train rows newest first, as in the real files


def _inter_line(user: int, hist: list[int], target: int) -> str:
    return f"{user}\t{' '.join(map(str, hist))}\t{target}\n"


def _recbole_folder(root: Path, max_len: int = 3, features: int | None = None) -> Path:
    folder = root / "sci"
    folder.mkdir()
    parts = {"train": _INTER_HEADER, "valid": _INTER_HEADER, "test": _INTER_HEADER}
    for u, seq in _SEQS.items():
        train, valid, test = _recbole_rows(seq, max_len)
        parts["train"] += "".join(_inter_line(u, h, t) for h, t in train)
        parts["valid"] += _inter_line(u, *valid)
        parts["test"] += _inter_line(u, *test)
    for part, text in parts.items():
        (folder / f"Sci.{part}.inter").write_text(text)
    (folder / "Sci.item2index").write_text("".join(f"A{i}\t{i}\n" for i in range(6)))
    (folder / "Sci.user2index").write_text("".join(f"U{u}\t{u}\n" for u in _SEQS))
    (folder / "Sci.text").write_text("item_id:token\ttext:token_seq\n"
                                     + "".join(f"A{i}\tthing {i} \n" for i in range(5)))  # A5 has none
    if features is not None:
        rng = np.random.default_rng(0)
        for suffix in ("feat1CLS", "feat3CLS"):
            rng.normal(size=(6, features)).astype(np.float32).tofile(folder / f"Sci.{suffix}")
    return folder


def _sequences(src: RawSource) -> dict[str, list[tuple[str, str]]]:
    """user → [(item, split)] in position order."""
    t = src.interactions.sort_by([("user_id", "ascending"), ("position", "ascending")])
    out: dict[str, list[tuple[str, str]]] = {}
    for u, it, s in zip(*(t.column(c).to_pylist() for c in ("user_id", "item_id", "split"))):
        out.setdefault(u, []).append((it, s))
    return out


@pytest.mark.parametrize("max_len", [50, 3, 2])
def test_recbole_rebuilds_sequences_and_official_split(tmp_path: Path, max_len: int):
    src = load_recbole(_recbole_folder(tmp_path, max_len=max_len))
    assert src.has_official_split and src.order == "position"
    assert src.interactions.num_rows == sum(len(s) for s in _SEQS.values())
    got = _sequences(src)
    assert set(got) == {f"U{u}" for u in _SEQS}
    for u, seq in _SEQS.items():
        assert [it for it, _ in got[f"U{u}"]] == [f"A{i}" for i in seq], (u, max_len)
        assert [s for _, s in got[f"U{u}"]] == ["train"] * (len(seq) - 2) + ["valid", "test"]


def test_recbole_rows_that_do_not_chain_are_an_error(tmp_path: Path):
    folder = _recbole_folder(tmp_path)
    path = folder / "Sci.train.inter"
    path.write_text(path.read_text().replace("0\t0 1\t2\n", "0\t0 1\t5\n", 1))  # user 0: 0 1 → 5?
    with pytest.raises(DataError, match=r"Sci\.train\.inter.*user index 0.*do not chain"):
        load_recbole(folder)


def test_recbole_items_table(tmp_path: Path):
    src = load_recbole(_recbole_folder(tmp_path))
    items = src.items
    assert items.column("item_id").to_pylist() == [f"A{i}" for i in range(6)]
    assert items.column("text").to_pylist() == [f"thing {i}" for i in range(5)] + [None]
    assert items.column("title").null_count == 6
    assert items.schema.field("categories").type == pa.list_(pa.string())
    assert not [c for c in items.column_names if c.startswith("feat_")]
    assert {p.name for p in src.files} == {"Sci.train.inter", "Sci.valid.inter", "Sci.test.inter",
                                          "Sci.item2index", "Sci.user2index", "Sci.text"}


def test_recbole_bad_header_names_file_and_line(tmp_path: Path):
    folder = _recbole_folder(tmp_path)
    path = folder / "Sci.valid.inter"
    path.write_text(path.read_text().replace("user_id:token", "uid:token", 1))
    with pytest.raises(DataError, match=r"Sci\.valid\.inter:1: header"):
        load_recbole(folder)


def test_recbole_non_integer_token_names_file_line_and_field(tmp_path: Path):
    folder = _recbole_folder(tmp_path)
    path = folder / "Sci.train.inter"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("\t", "\t9x ", 1)
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=r"Sci\.train\.inter:3: field 'item_id_list': '9x'"):
        load_recbole(folder)


def test_recbole_short_row_names_file_and_line(tmp_path: Path):
    folder = _recbole_folder(tmp_path)
    path = folder / "Sci.test.inter"
    path.write_text(path.read_text() + "7\t1 2\n")
    with pytest.raises(DataError, match=r"Sci\.test\.inter:5: expected 3"):
        load_recbole(folder)


def test_recbole_non_integer_index_names_file_and_line(tmp_path: Path):
    folder = _recbole_folder(tmp_path)
    path = folder / "Sci.item2index"
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = "A3\tthree\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=r"Sci\.item2index:4: expected 'token<TAB>index'"):
        load_recbole(folder)


def test_recbole_unknown_item_index_is_an_error(tmp_path: Path):
    folder = _recbole_folder(tmp_path)
    (folder / "Sci.item2index").write_text("".join(f"A{i}\t{i}\n" for i in range(5)))  # 5 missing
    with pytest.raises(DataError, match=r"item index 5 .*Sci\.item2index"):
        load_recbole(folder)


def test_recbole_test_row_without_valid_row_is_an_error(tmp_path: Path):
    folder = _recbole_folder(tmp_path)
    path = folder / "Sci.valid.inter"
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if not line.startswith("2\t")))
    with pytest.raises(DataError, match="user index 2 .*no valid row"):
        load_recbole(folder)


def test_recbole_mm_reads_feature_matrices(tmp_path: Path):
    folder = _recbole_folder(tmp_path, features=8)
    src = load_recbole(folder, with_features=True)
    for suffix, name in (("feat1CLS", "feat_text"), ("feat3CLS", "feat_image")):
        col = src.items.column(name)
        assert col.type == pa.list_(pa.float32(), 8)
        expected = np.fromfile(folder / f"Sci.{suffix}", dtype=np.float32).reshape(6, 8)
        np.testing.assert_array_equal(np.array(col.to_pylist(), dtype=np.float32), expected)


def test_recbole_mm_wrong_feature_size_is_an_error(tmp_path: Path):
    folder = _recbole_folder(tmp_path, features=8)
    np.zeros(6 * 8 + 3, dtype=np.float32).tofile(folder / "Sci.feat3CLS")
    with pytest.raises(DataError, match=r"Sci\.feat3CLS: 51 float32 values cannot form 6 rows"):
        load_recbole(folder, with_features=True)


def test_recbole_mm_missing_feature_file_is_an_error(tmp_path: Path):
    folder = _recbole_folder(tmp_path, features=8)
    (folder / "Sci.feat1CLS").unlink()
    with pytest.raises(DataError, match=r"Sci\.feat1CLS: missing feat_text"):
        load_recbole(folder, with_features=True)


def test_feature_matrix_with_nan_names_the_row(tmp_path: Path):
    m = np.ones((4, 3), dtype=np.float32)
    m[2, 1] = np.nan
    m.tofile(tmp_path / "f.bin")
    with pytest.raises(DataError, match="row 2 has NaN"):
        read_feature_matrix(tmp_path / "f.bin", 4)


# ----------------------------------------------------------------------------------------------
# a user's own tables


def _interactions(order: str = "timestamp", **overrides) -> pa.Table:
    cols = {"user_id": ["u1", "u1", "u2"], "item_id": [10, 11, 10],
            order: [3, 5, 1] if order == "position" else [1.5, 2.5, 0.5], "label": [1, 1, 0]}
    cols.update(overrides)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def test_table_parquet_with_timestamp(tmp_path: Path):
    path = tmp_path / "logs.parquet"
    pq.write_table(_interactions(), path)
    src = load_table(path, None)
    assert src.interactions == [str(path)]
    assert src.order == "timestamp" and src.file_format == "parquet" and src.items is None
    assert src.files == [path] and not src.has_official_split


def test_table_csv_folder_with_position(tmp_path: Path):
    folder = tmp_path / "logs"
    (folder / "day2").mkdir(parents=True)
    pacsv.write_csv(_interactions("position"), folder / "a.csv")
    pacsv.write_csv(_interactions("position"), folder / "day2" / "b.csv")
    (folder / "notes.txt").write_text("ignored")
    src = load_table(folder, None)
    assert src.order == "position" and src.file_format == "csv"
    assert src.interactions == [str(folder / "a.csv"), str(folder / "day2" / "b.csv")]


def test_table_mixed_formats_are_an_error(tmp_path: Path):
    folder = tmp_path / "logs"
    folder.mkdir()
    pacsv.write_csv(_interactions(), folder / "a.csv")
    pq.write_table(_interactions(), folder / "b.parquet")
    with pytest.raises(DataError, match="only .parquet or only .csv"):
        load_table(folder, None)


def test_table_mixed_order_columns_are_an_error(tmp_path: Path):
    folder = tmp_path / "logs"
    folder.mkdir()
    pq.write_table(_interactions("timestamp"), folder / "a.parquet")
    pq.write_table(_interactions("position"), folder / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: uses 'position' but other files use 'timestamp'"):
        load_table(folder, None)


def test_table_missing_user_id_names_file_and_column(tmp_path: Path):
    path = tmp_path / "logs.parquet"
    pq.write_table(_interactions(user_id=None), path)
    with pytest.raises(DataError) as e:
        load_table(path, None)
    assert "logs.parquet" in str(e.value) and "missing column 'user_id'" in str(e.value)


def test_table_float_user_id_names_the_type(tmp_path: Path):
    path = tmp_path / "logs.parquet"
    pq.write_table(_interactions(user_id=[1.0, 1.0, 2.0]), path)
    with pytest.raises(DataError, match=r"logs\.parquet: column 'user_id' has type double"):
        load_table(path, None)


def test_table_float_position_is_an_error(tmp_path: Path):
    path = tmp_path / "logs.csv"
    pacsv.write_csv(_interactions("position", position=[0.5, 1.5, 0.0]), path)
    with pytest.raises(DataError, match=r"logs\.csv: column 'position' has type double"):
        load_table(path, None)


def test_table_without_order_column_is_an_error(tmp_path: Path):
    path = tmp_path / "logs.parquet"
    pq.write_table(_interactions(timestamp=None), path)
    with pytest.raises(DataError, match=r"logs\.parquet: missing order column: need 'timestamp' or 'position'"):
        load_table(path, None)


def test_table_empty_or_missing_file_is_an_error(tmp_path: Path):
    path = tmp_path / "logs.csv"
    path.write_text("")
    with pytest.raises(DataError, match=r"logs\.csv.*empty"):
        load_table(path, None)
    with pytest.raises(DataError, match=r"missing\.parquet: missing"):
        load_table(tmp_path / "missing.parquet", None)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no .parquet or .csv"):
        load_table(tmp_path / "empty_dir", None)


def test_table_items_csv_categories_string_becomes_a_list(tmp_path: Path):
    logs, items_path = tmp_path / "logs.parquet", tmp_path / "items.csv"
    pq.write_table(_interactions(), logs)
    items_path.write_text("item_id,title,categories,price\n10,Ball,Toys| Outdoor |,3.5\n11,Car,Toys,2\n")
    src = load_table(logs, items_path)
    items = src.items
    assert items.schema.field("categories").type == pa.list_(pa.string())
    assert items.column("categories").to_pylist() == [["Toys", "Outdoor"], ["Toys"]]
    assert items.column("item_id").to_pylist() == [10, 11]
    assert items.column("title").to_pylist() == ["Ball", "Car"]
    assert items.column("brand").null_count == 2  # canonical columns exist even when absent
    assert "price" not in items.column_names
    assert src.files == [logs, items_path]


def test_table_items_parquet_keeps_features_and_null_categories(tmp_path: Path):
    logs, items_path = tmp_path / "logs.parquet", tmp_path / "items.parquet"
    pq.write_table(_interactions(), logs)
    feat = pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 4], pa.float32()), 2)
    pq.write_table(pa.table({"item_id": [10, 11], "categories": ["a|b", None], "feat_text": feat}), items_path)
    items = load_table(logs, items_path).items
    assert items.column("categories").to_pylist() == [["a", "b"], None]
    assert items.column("feat_text").to_pylist() == [[1.0, 2.0], [3.0, 4.0]]


def test_table_items_bad_feature_column_is_an_error(tmp_path: Path):
    logs, items_path = tmp_path / "logs.parquet", tmp_path / "items.parquet"
    pq.write_table(_interactions(), logs)
    pq.write_table(pa.table({"item_id": [10], "feat_text": ["oops"]}), items_path)
    with pytest.raises(DataError, match=r"items\.parquet: feature column 'feat_text'"):
        load_table(logs, items_path)


def test_table_items_without_item_id_is_an_error(tmp_path: Path):
    logs, items_path = tmp_path / "logs.parquet", tmp_path / "items.parquet"
    pq.write_table(_interactions(), logs)
    pq.write_table(pa.table({"id": [10]}), items_path)
    with pytest.raises(DataError, match=r"items\.parquet: missing column 'item_id'"):
        load_table(logs, items_path)


# ----------------------------------------------------------------------------------------------
# dispatch


def test_load_source_table_resolves_relative_to_data_path(tmp_path: Path):
    pq.write_table(_interactions(), tmp_path / "logs.parquet")
    cfg = load_config(None, ["data.source=table", f"data.path={tmp_path}", "data.interactions=logs.parquet"])
    src = load_source(cfg, tmp_path / "unused", tmp_path / "staging")
    assert src.interactions == [str(tmp_path / "logs.parquet")]


def test_load_source_missing_benchmark_folder_says_how_to_fix(tmp_path: Path):
    cfg = load_config(None, ["data.source=s3rec", "data.name=no-such-bench"])
    with pytest.raises(DataError, match=r"no-such-bench.*sidforge data pull no-such-bench"):
        load_source(cfg, tmp_path, tmp_path / "staging")


def test_load_source_finds_a_benchmark_by_name(tmp_path: Path):
    _s3rec_folder(tmp_path)
    cfg = load_config(None, ["data.source=s3rec", "data.name=toys"])
    assert load_source(cfg, tmp_path, tmp_path / "staging").interactions.num_rows == 10


# ----------------------------------------------------------------------------------------------
# the real benchmarks (SIDFORGE_DATA_DIR)


def _benchmark(name: str) -> Path:
    root = os.environ.get("SIDFORGE_DATA_DIR")
    if not root or not (Path(root) / name).is_dir():
        pytest.skip(f"SIDFORGE_DATA_DIR does not hold {name}")
    return Path(root) / name


@pytest.mark.data
def test_real_amazon_beauty():
    src = load_s3rec(_benchmark("amazon-beauty-2014"))
    inter, items = src.interactions, src.items
    assert inter.num_rows == 198_502
    assert len(set(inter.column("user_id").to_pylist())) == 22_363
    assert items.num_rows == 12_101
    assert set(inter.column("item_id").to_pylist()) <= set(items.column("item_id").to_pylist())
    assert items.num_rows - items.column("title").null_count == 12_094
    cats = items.column("categories").to_pylist()
    assert all(c for c in cats), "every item has a non-empty category path"
    brands = items.column("brand").to_pylist()
    assert sum(b is not None for b in brands) > 1000
    # a brand is never also used as a category
    assert not {b for b in brands if b} & {c for cs in cats for c in cs}


def _index(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.rstrip("\n").split("\t") for line in path.open())}


@pytest.mark.data
def test_real_amazon_scientific_matches_every_recbole_row():
    folder = _benchmark("amazon-scientific-2018")
    src = load_recbole(folder)
    inter = src.interactions
    assert inter.num_rows == 59_427
    assert len(set(inter.column("user_id").to_pylist())) == 8_442
    assert Counter(inter.column("split").to_pylist()) == {"train": 42_543, "valid": 8_442, "test": 8_442}
    assert src.items.num_rows == 4_385 and src.items.column("text").null_count == 0

    # regenerating RecBole's rows (histories cut to 50) from the rebuilt sequences gives the files back
    user_ix, item_ix = _index(folder / "Scientific.user2index"), _index(folder / "Scientific.item2index")
    seqs = {user_ix[u]: [item_ix[i] for i, _ in rows] for u, rows in _sequences(src).items()}
    regenerated = Counter((u, tuple(seq[max(0, k - 50):k]), seq[k]) for u, seq in seqs.items()
                          for k in range(1, len(seq)))
    in_files = Counter()
    for part in ("train", "valid", "test"):
        with (folder / f"Scientific.{part}.inter").open() as fh:
            next(fh)
            for line in fh:
                u, hist, target = line.rstrip("\n").split("\t")
                in_files[int(u), tuple(map(int, hist.split())), int(target)] += 1
    assert regenerated == in_files


@pytest.mark.data
def test_real_amazon_scientific_mm_features():
    src = load_recbole(_benchmark("amazon-scientific-2018-mm"), with_features=True)
    items = src.items
    assert items.num_rows == 1_585
    assert len(set(src.interactions.column("user_id").to_pylist())) == 2_928
    for name in ("feat_text", "feat_image"):
        assert items.schema.field(name).type == pa.list_(pa.float32(), 512)
        m = np.asarray(items.column(name).combine_chunks().flatten()).reshape(-1, 512)
        assert m.shape == (1_585, 512) and np.isfinite(m).all()
        assert (np.abs(m).sum(axis=1) > 0).all()
