"""Property-based fuzzing of the dataset adapters (hypothesis, a bounded budget per property).

The adapters promise (module docstring, README "prepare") that bad input is a DataError naming the
file and the line or column, and that nothing is dropped on the way (row-level problems are left to
``prepare``, which sets the rows aside and counts them). Each property generates an input, works out
from a small model of the format what the adapter must return or which place its error must name,
and checks exactly that: an exception of another type, a wrong parse or a lost row fails it.

The budget is derandomized so the suite is reproducible (a few seconds on two cores);
``SIDFORGE_FUZZ_SCALE=k`` runs k times as many examples from a random seed.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from sidforge.platform.adapters import (
    _read_tsv,
    load_recbole,
    load_table,
    normalise_items,
    read_feature_matrix,
    read_sequence_file,
)
from sidforge.platform.schemas import ITEM_CONTENT, DataError

_SCALE = int(os.environ.get("SIDFORGE_FUZZ_SCALE", "1"))


def _budget(examples: int) -> settings:
    return settings(max_examples=examples * _SCALE, deadline=None, derandomize=_SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextmanager
def _scratch() -> Iterator[Path]:
    """A fresh folder per example (pytest's tmp_path is shared by all examples of a test)."""
    with tempfile.TemporaryDirectory(prefix="sidforge-fuzz-") as d:
        yield Path(d)


def _raises(call, *needles: str) -> str:
    """Run ``call``; it must raise DataError (nothing else) whose message holds every needle."""
    event("refused")  # --hypothesis-show-statistics: the share of inputs refused vs accepted
    with pytest.raises(DataError) as e:
        call()
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


_INT64_MAX = 2**63 - 1
_SPACES = st.sampled_from([" ", "  ", "\t", " \t", "\x0b", "\x0c", "\x1c", "\x85", "\u3000"])
_BREAKS = st.sampled_from(["\n", "\r\n", "\r"])
# tokens that look almost like an index: signs, decimals, non-ASCII digits ('²'.isdigit() is True), past int64
_WORDS = st.one_of(
    st.integers(0, 2**64).map(str),
    st.integers(-3, -1).map(str),
    st.sampled_from(["+3", "1.5", "1e3", "x", "0x1f", "1_0", "²", "١", "１", "\x00", "é", "\ufeff1"]),
    st.text(min_size=1, max_size=3),
)


def _splice(draw, data: bytes) -> bytes:
    """Insert a few arbitrary bytes (often invalid UTF-8) at an arbitrary offset."""
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.binary(max_size=3)) + data[at:]


def _is_index(tok: str) -> bool:
    """The integer token of the sequence and RecBole formats: ASCII digits within int64."""
    return tok.isascii() and tok.isdigit() and int(tok) <= _INT64_MAX


def _universal_lines(data: bytes) -> list[bytes]:
    """Lines as Python's universal newlines split them (at \\n, \\r\\n or \\r), without the break."""
    lines = re.split(rb"\r\n|\r|\n", data)
    return lines[:-1] if lines[-1] == b"" else lines


def _untranslated_lines(data: bytes) -> list[bytes]:
    """Lines as ``open(newline="")`` returns them, less a final \\n (a \\r of a break stays)."""
    return [line.rstrip(b"\n") for line in re.findall(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z", data)]


# ----------------------------------------------------------------------------------------------
# S3-Rec sequence file


def _sequence_model(data: bytes) -> list[tuple[int, list[int]]] | tuple[int, str]:
    """(user, items) per line, or the first bad line's number and a word its error must hold."""
    out = []
    for lineno, raw in enumerate(_universal_lines(data), start=1):
        try:
            tokens = raw.decode("utf-8").split()
        except UnicodeDecodeError:
            return lineno, "UTF-8"
        if not tokens:
            return lineno, "empty line"
        if len(tokens) < 2:
            return lineno, "'items'"
        bad = [col for col, tok in enumerate(tokens) if not _is_index(tok)]
        if bad:
            return lineno, "'user'" if bad[0] == 0 else f"'item #{bad[0]}'"
        out.append((int(tokens[0]), [int(t) for t in tokens[1:]]))
    return out


@st.composite
def _sequence_text(draw) -> tuple[bytes, list[tuple[int, list[int]]]]:
    """Well-formed lines: any whitespace between tokens, leading zeros, any line break."""
    ids = st.integers(0, _INT64_MAX)
    seqs = draw(st.lists(st.tuples(ids, st.lists(ids, min_size=1, max_size=6)), min_size=1, max_size=6))
    text = ""
    for k, (user, items) in enumerate(seqs):
        tokens = [draw(st.sampled_from(["", "0", "00"])) + str(t) for t in (user, *items)]
        line = draw(st.sampled_from(["", " ", "\t "])) + tokens[0]
        for tok in tokens[1:]:
            line += draw(_SPACES) + tok
        line += draw(st.sampled_from(["", " ", "\t", "\x0c"]))
        text += line + draw(st.sampled_from(["", "\n", "\r\n"]) if k == len(seqs) - 1 else _BREAKS)
    return text.encode(), seqs


@st.composite
def _messy_lines(draw) -> bytes:
    """Lines of index-like words, most of them well formed, sometimes with a few bytes inserted."""
    good = st.lists(st.integers(0, 99).map(str), min_size=2, max_size=4)
    bad = st.lists(_WORDS, max_size=4)
    lines = draw(st.lists(st.sampled_from([good] * 9 + [bad]).flatmap(lambda s: s), max_size=5))
    data = "".join(draw(_SPACES).join(words) + draw(_BREAKS) for words in lines).encode()
    return _splice(draw, data) if draw(st.integers(0, 3)) == 0 else data


@_budget(100)
@given(case=_sequence_text())
def test_sequence_file_round_trips_well_formed_lines(case: tuple[bytes, list[tuple[int, list[int]]]]):
    data, seqs = case
    with _scratch() as d:
        path = d / "Seq.txt"
        path.write_bytes(data)
        t = read_sequence_file(path)
    assert t.column("user_id").to_pylist() == [u for u, items in seqs for _ in items]
    assert t.column("item_id").to_pylist() == [i for _, items in seqs for i in items]
    assert t.column("position").to_pylist() == [p for _, items in seqs for p in range(len(items))]


@_budget(150)
@example(data=b"1 2 \xff\n")  # invalid UTF-8: was a UnicodeDecodeError
@example(data="1 2 \u00b2\n".encode())  # '²'.isdigit() but int('²') fails: was a bare ValueError
@example(data=b"1 2 9223372036854775808\n")  # past int64: was an OverflowError
@example(data=b"7 " + b" ".join(b"%d" % i for i in range(20_000)) + b"\n1 2\r\n")  # a very long line
@given(data=st.sampled_from([_messy_lines()] * 3 + [st.binary(max_size=40)]).flatmap(lambda s: s))
def test_sequence_file_parses_exactly_or_names_the_line(data: bytes):
    expected = _sequence_model(data)
    with _scratch() as d:
        path = d / "Seq.txt"
        path.write_bytes(data)
        if not data:
            _raises(lambda: read_sequence_file(path), str(path), "empty")
        elif isinstance(expected, tuple):
            lineno, word = expected
            _raises(lambda: read_sequence_file(path), f"{path}:{lineno}:", word)
        else:
            event("accepted")
            t = read_sequence_file(path)
            assert t.column("user_id").to_pylist() == [u for u, items in expected for _ in items]
            assert t.column("item_id").to_pylist() == [i for _, items in expected for i in items]
            assert t.column("position").to_pylist() == [p for _, items in expected for p in range(len(items))]


# ----------------------------------------------------------------------------------------------
# RecBole atomic files

_FIELD = st.text(st.characters(exclude_characters="\t\n\r", exclude_categories=("Cs",)), max_size=6)
_TOKEN = st.text(st.characters(exclude_characters="\t\n\r", exclude_categories=("Cs",)), min_size=1, max_size=5)
_INTER_FIELDS = ["user_id", "item_id_list", "item_id"]


def _tsv_model(data: bytes, expected: list[str]) -> list[list[str]] | tuple[int | None, str]:
    """_read_tsv's rows (every field kept), or (line number or None, a word its error must hold)."""
    rows = []
    for lineno, raw in enumerate(_untranslated_lines(data), start=1):
        try:
            parts = raw.decode("utf-8").split("\t")
        except UnicodeDecodeError:
            return lineno, "UTF-8"
        if lineno == 1:
            if [p.split(":")[0] for p in parts][: len(expected)] != expected:
                return 1, "header"
        elif len(parts) < len(expected):
            return lineno, f"expected {len(expected)}"
        else:
            rows.append(parts)
    return rows or (None, "no rows")


@st.composite
def _tsv_file(draw) -> tuple[list[str], bytes]:
    expected = draw(st.sampled_from([_INTER_FIELDS, ["item_id", "text"]]))
    header = [name + draw(st.sampled_from(["", ":token", ":token_seq", ":float"])) for name in expected]
    if draw(st.integers(0, 3)) == 0:  # a header that does not start with the expected fields
        header = draw(st.sampled_from([header[1:], ["uid", *header[1:]], header[::-1]]))
    elif draw(st.booleans()):
        header.append("extra:float")
    k = len(expected)
    row = st.one_of(st.lists(_FIELD, min_size=k, max_size=k), st.lists(_FIELD, min_size=k, max_size=k),
                    st.lists(_FIELD, max_size=k + 1))
    rows = draw(st.lists(row, max_size=5))
    text = "\t".join(header) + "\n" + "".join("\t".join(r) + draw(st.sampled_from(["\n", "\n", "\r\n", "\r"]))
                                               for r in rows)
    data = text.encode()
    return expected, _splice(draw, data) if draw(st.integers(0, 3)) == 0 else data


@_budget(150)
@example(case=(_INTER_FIELDS, b"user_id\titem_id_list\titem_id\n1\t\xff\t2\n"))  # was a UnicodeDecodeError
@given(case=_tsv_file())
def test_recbole_tsv_parses_exactly_or_names_the_line(case: tuple[list[str], bytes]):
    expected, data = case
    model = _tsv_model(data, expected)
    with _scratch() as d:
        path = d / "Sci.train.inter"
        path.write_bytes(data)
        if not data:
            _raises(lambda: _read_tsv(path, expected), str(path), "empty")
        elif isinstance(model, tuple):
            lineno, word = model
            _raises(lambda: _read_tsv(path, expected), f"{path}:{lineno}:" if lineno else str(path), word)
        else:
            event("accepted")
            assert _read_tsv(path, expected) == model


@dataclass(frozen=True)
class _RecBole:
    seqs: dict[int, list[int]]  # user index → item indices, oldest first
    max_len: int  # RecBole's MAX_ITEM_LIST_LENGTH: histories keep their last max_len items
    items: dict[int, str]  # item index → token
    users: dict[int, str]
    texts: dict[str, str]  # item token → text

    def files(self) -> dict[str, bytes]:
        """The atomic files RecBole writes for these sequences (train rows newest first)."""
        parts: dict[str, str] = {p: "user_id:token\titem_id_list:token_seq\titem_id:token\n"
                                 for p in ("train", "valid", "test")}
        for u, seq in self.seqs.items():
            rows = [(seq[max(0, k - self.max_len):k], seq[k]) for k in range(1, len(seq))]
            for part, part_rows in (("train", rows[:-2][::-1]), ("valid", rows[-2:-1]), ("test", rows[-1:])):
                parts[part] += "".join(f"{u}\t{' '.join(map(str, h))}\t{t}\n" for h, t in part_rows)
        out = {f"Sci.{part}.inter": text.encode() for part, text in parts.items()}
        out["Sci.item2index"] = "".join(f"{tok}\t{i}\n" for i, tok in self.items.items()).encode()
        out["Sci.user2index"] = "".join(f"{tok}\t{u}\n" for u, tok in self.users.items()).encode()
        out["Sci.text"] = ("item_id:token\ttext:token_seq\n"
                           + "".join(f"{tok}\t{text}\n" for tok, text in self.texts.items())).encode()
        return out


@st.composite
def _recbole_case(draw) -> _RecBole:
    item_ix = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=5, unique=True))
    user_ix = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=4, unique=True))
    # few items, short histories: windows repeat inside a sequence, which is what makes chaining hard
    # every user has a valid and a test row (3 items); the train file needs a row too (one user with 4)
    seqs = {u: draw(st.lists(st.sampled_from(item_ix), min_size=4 if k == 0 else 3, max_size=8))
            for k, u in enumerate(user_ix)}
    item_tokens = draw(st.lists(_TOKEN, min_size=len(item_ix), max_size=len(item_ix), unique=True))
    user_tokens = draw(st.lists(_TOKEN, min_size=len(user_ix), max_size=len(user_ix), unique=True))
    texts = {tok: draw(_FIELD) for tok in item_tokens[: draw(st.integers(1, len(item_tokens)))]}
    return _RecBole(seqs, draw(st.integers(1, 5)), dict(zip(item_ix, item_tokens)), dict(zip(user_ix, user_tokens)),
                    texts)


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@_budget(100)
@example(case=_RecBole({0: [0, 1, 0, 2]}, 1, {0: "a", 1: "b", 2: "c"}, {0: "u"}, {"a": "x"}))  # was "do not chain"
@example(case=_RecBole({0: [0, 0, 1, 0]}, 1, {0: "a", 1: "b"}, {0: "u"}, {"a": "x"}))  # was read as a b a a
@given(case=_recbole_case())
def test_recbole_round_trips_generated_folders(case: _RecBole):
    with _scratch() as d:
        src = load_recbole(_write(d, case.files()))
    got: dict[str, list[tuple[int, str, str]]] = {}
    t = src.interactions
    for u, it, pos, split in zip(*(t.column(c).to_pylist() for c in ("user_id", "item_id", "position", "split"))):
        got.setdefault(u, []).append((pos, it, split))
    expected = {case.users[u]: [(p, case.items[i], "test" if p == len(seq) - 1 else "valid" if p == len(seq) - 2
                                 else "train") for p, i in enumerate(seq)] for u, seq in case.seqs.items()}
    assert {u: sorted(rows) for u, rows in got.items()} == expected
    tokens = [case.items[i] for i in sorted(case.items)]
    assert src.items.column("item_id").to_pylist() == tokens
    assert src.items.column("text").to_pylist() == [(case.texts.get(tok) or "").strip() or None for tok in tokens]


_RECBOLE_FILES = ("Sci.train.inter", "Sci.valid.inter", "Sci.test.inter", "Sci.item2index", "Sci.user2index",
                  "Sci.text")
_MUTATIONS = ("drop_line", "repeat_line", "swap_lines", "replace_field", "junk", "truncate")


@st.composite
def _damaged_recbole(draw) -> dict[str, bytes]:
    """A generated folder with one file damaged: a line dropped, repeated or swapped, a field replaced,
    a few bytes inserted, or the file cut short."""
    files, name, how = draw(_recbole_case()).files(), draw(st.sampled_from(_RECBOLE_FILES)), draw(
        st.sampled_from(_MUTATIONS))
    data = files[name]
    lines = data.split(b"\n")
    i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
    if how == "drop_line":
        del lines[i]
    elif how == "repeat_line":
        lines.insert(i, lines[i])
    elif how == "swap_lines":
        lines[i], lines[j] = lines[j], lines[i]
    elif how == "replace_field":
        fields = lines[i].split(b"\t")
        fields[draw(st.integers(0, len(fields) - 1))] = draw(_WORDS).encode()
        lines[i] = b"\t".join(fields)
    files[name] = (_splice(draw, data) if how == "junk" else data[: draw(st.integers(0, len(data)))]
                   if how == "truncate" else b"\n".join(lines))
    return files


def _without_last_row(files: dict[str, bytes], name: str) -> dict[str, bytes]:
    return {**files, name: b"\n".join(files[name].split(b"\n")[:-2] + [b""])}


def _inter_rows(data: bytes) -> list[tuple[int, list[int]]]:
    """(user index, history) of each row of a RecBole .inter file that loaded."""
    rows = [raw.decode().split("\t") for raw in _untranslated_lines(data)[1:]]
    return [(int(r[0]), [int(t) for t in r[1].split()]) for r in rows]


def _index_tokens(data: bytes) -> Counter[str]:
    return Counter(raw.decode().split("\t")[0] for raw in _universal_lines(data))


@_budget(150)
# a user with train and valid rows but no test row was dropped silently
@example(files=_without_last_row(_RecBole({0: [0, 1, 2], 1: [2, 1, 0, 1]}, 2, {0: "a", 1: "b", 2: "c"},
                                          {0: "u", 1: "v"}, {"a": "x"}).files(), "Sci.test.inter"))
# two tokens with index 2: item 'c' was dropped silently
@example(files={**_RecBole({0: [0, 1, 2]}, 2, {0: "a", 1: "b", 2: "c"}, {0: "u"}, {"a": "x"}).files(),
                "Sci.item2index": b"a\t0\nb\t1\nc\t2\nd\t2\n"})
@given(files=_damaged_recbole())
def test_recbole_damaged_folder_is_an_error_or_loses_nothing(files: dict[str, bytes]):
    with _scratch() as d:
        try:
            src = load_recbole(_write(d, files))
        except DataError as e:
            event("refused")
            # it names a file of the folder, not always the damaged one (an index of an .inter file
            # missing from item2index is reported against both)
            assert any(name in str(e) for name in _RECBOLE_FILES), str(e)
            return
    # it loaded: every row's target and each user's first history are in the interactions, every token
    # of item2index is in the items table
    event("accepted")
    rows = [r for part in ("train", "valid", "test") for r in _inter_rows(files[f"Sci.{part}.inter"])]
    first: dict[int, int] = {}
    for u, hist in rows:
        first[u] = min(first.get(u, len(hist)), len(hist))
    assert src.interactions.num_rows == len(rows) + sum(first.values())
    users = {int(raw.split(b"\t")[1]): raw.decode().split("\t")[0]
             for raw in _universal_lines(files["Sci.user2index"])}
    assert set(src.interactions.column("user_id").to_pylist()) == {users[u] for u in first}
    assert Counter(src.items.column("item_id").to_pylist()) == _index_tokens(files["Sci.item2index"])


# ----------------------------------------------------------------------------------------------
# raw float32 feature files


def _feature_model(data: bytes, rows: int) -> np.ndarray | str:
    if len(data) % 4:
        return "whole number of float32"
    if not data or rows == 0 or (len(data) // 4) % rows:
        return "cannot form"
    matrix = np.frombuffer(data, np.float32).reshape(rows, -1)
    bad = ~np.isfinite(matrix).all(axis=1)
    return f"row {int(np.argmax(bad))} has NaN" if bad.any() else matrix


@st.composite
def _feature_file(draw) -> tuple[bytes, int]:
    rows = draw(st.integers(0, 5))
    if rows and draw(st.booleans()):
        n = rows * draw(st.integers(1, 4))
        return np.array(draw(st.lists(st.floats(width=32), min_size=n, max_size=n)), np.float32).tobytes(), rows
    return draw(st.binary(max_size=64)), rows


@_budget(150)
@example(case=(np.ones(6, np.float32).tobytes() + b"xy", 6))  # 2 trailing bytes were dropped silently
@example(case=(b"", 3))  # an empty file was a (3, 0) matrix
@given(case=_feature_file())
def test_feature_matrix_is_exact_or_an_error(case: tuple[bytes, int]):
    data, rows = case
    model = _feature_model(data, rows)
    with _scratch() as d:
        path = d / "Sci.feat1CLS"
        path.write_bytes(data)
        if isinstance(model, str):
            _raises(lambda: read_feature_matrix(path, rows), str(path), model)
        else:
            event("accepted")
            m = read_feature_matrix(path, rows)
            assert m.dtype == np.float32 and m.shape == model.shape and m.tobytes() == data


# ----------------------------------------------------------------------------------------------
# a user's own tables

_KINDS: dict[str, tuple[st.SearchStrategy, pa.DataType]] = {  # every kind also holds nulls
    "small": (st.integers(0, 30), pa.int64()),
    "int": (st.integers(-(2**63), _INT64_MAX), pa.int64()),
    "uint": (st.integers(0, 2**64 - 1), pa.uint64()),
    "float": (st.floats(), pa.float64()),
    "text": (st.text(max_size=6), pa.string()),
    "digits": (st.integers(0, 999).map(str), pa.string()),
    "pipes": (st.text(alphabet="ab |\t", max_size=8), pa.string()),
    "bool": (st.booleans(), pa.bool_()),
    "time": (st.integers(0, 2**41), pa.timestamp("ms")),
    "null": (st.none(), pa.null()),
    "list_text": (st.lists(st.none() | st.text(max_size=3), max_size=3), pa.list_(pa.string())),
    "list_int": (st.lists(st.integers(0, 9), max_size=3), pa.list_(pa.int64())),
    "list_float": (st.lists(st.floats(width=32), max_size=3), pa.list_(pa.float32())),
    "vec2": (st.lists(st.floats(width=32), min_size=2, max_size=2), pa.list_(pa.float32(), 2)),
}
_CSV_KINDS = ("small", "int", "uint", "float", "text", "digits", "pipes", "bool", "time")
_ALL_KINDS = tuple(_KINDS)


def _column(draw, kinds: tuple[str, ...], n: int) -> pa.Array:
    values, typ = _KINDS[draw(st.sampled_from(kinds))]
    return pa.array(draw(st.lists(st.none() | values, min_size=n, max_size=n)), typ)


def _kinds_for(fmt: str, good: tuple[str, ...]) -> tuple[str, ...]:
    """Mostly ``good`` kinds, sometimes any the format can hold."""
    if fmt == "csv":  # CSV holds no lists
        return tuple(k for k in good if k in _CSV_KINDS or k == "null") * 12 + _CSV_KINDS
    return good * 12 + _ALL_KINDS


_EXTRA_NAMES = st.one_of(st.text(max_size=6), st.sampled_from(["user_id", "item_id", "position", "label"]))


@st.composite
def _table_file(draw, fmt: str, required: dict[str, tuple[str, ...]], optional: dict[str, tuple[str, ...]],
                one_of: dict[str, tuple[str, ...]]) -> pa.Table | bytes:
    """A table (as Arrow, duplicate names allowed), or the bytes of an empty, garbage or ragged file.
    Columns: each required one (rarely left out), each optional one (half the time), mostly one of
    ``one_of`` (sometimes none or all), a few with other names; of kinds mostly good for the column."""
    how = draw(st.sampled_from(["table"] * 12 + ["empty", "junk", "ragged"]))
    if how == "empty":
        return b""
    if how == "junk":
        return draw(st.binary(min_size=1, max_size=40))
    names = [c for c in required if draw(st.integers(0, 19))] + [c for c in optional if draw(st.booleans())]
    if one_of:
        names += draw(st.sampled_from([[], *([c] for c in one_of for _ in range(3)), list(one_of)]))
    names += draw(st.lists(_EXTRA_NAMES, max_size=1))
    if how == "ragged":  # CSV text whose rows may not match the header
        rows = draw(st.lists(st.lists(st.integers(0, 9).map(str), max_size=len(names) + 1), max_size=3))
        return _splice(draw, (",".join(names) + "\n" + "".join(",".join(r) + "\n" for r in rows)).encode())
    n = draw(st.integers(0, 6))
    kinds = {**required, **optional, **one_of}
    arrays = [_column(draw, _kinds_for(fmt, kinds.get(name, _CSV_KINDS)), n) for name in names]
    return pa.Table.from_arrays(arrays, names=names)


def _write_file(path: Path, content: pa.Table | bytes) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif path.suffix == ".parquet":
        pq.write_table(content, path)
    else:
        pacsv.write_csv(content, path)


def _write_parts(folder: Path, fmt: str, contents: list[pa.Table | bytes]) -> tuple[list[Path], Path]:
    """``folder/part<k>.<fmt>`` per content; returns the files and what to load (the file when alone)."""
    folder.mkdir()
    files = [folder / f"part{k}.{fmt}" for k in range(len(contents))]
    for path, content in zip(files, contents):
        _write_file(path, content)
    return files, files[0] if len(files) == 1 else folder


def _read(path: Path, fmt: str) -> tuple[pa.Schema, list[str]] | None:
    """The schema and column names the format's own reader sees (None: it cannot read the file): the
    whole CSV, read as prepare reads it, or the Parquet schema (the adapter checks schemas; prepare
    streams the rows)."""
    try:
        if fmt == "parquet":
            schema = pq.read_schema(path)
        else:
            schema = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True)).schema
        return schema, schema.names  # names that are not UTF-8 fail only here
    except Exception:  # any failure of the reader: the adapter must refuse the file
        return None


def _file_problem(path: Path, fmt: str) -> list[str] | pa.Schema:
    """What a refusal of this file must name, or its schema when it is readable with unique columns."""
    if path.stat().st_size == 0:
        return ["empty"]
    seen = _read(path, fmt)
    if seen is None:
        return ["cannot read"]
    schema, names = seen
    dups = sorted({repr(n) for n in names if names.count(n) > 1})
    return dups or schema


def _first_empty(files: list[Path]) -> Path | None:
    """The adapters look for an empty file among all of them before reading any."""
    return next((f for f in files if f.stat().st_size == 0), None)


def _id_ok(t: pa.DataType) -> bool:  # TABLE_SCHEMA_DOC: int or string (an all-null column is left to prepare)
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _order_ok(order: str, t: pa.DataType) -> bool:
    if order == "position":
        return pa.types.is_integer(t) or pa.types.is_null(t)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_timestamp(t) or pa.types.is_null(t)


def _interactions_model(files: list[Path], fmt: str) -> tuple[Path, list[str]] | str:
    """The order column, or the first bad file and what its error may name."""
    if _first_empty(files):
        return _first_empty(files), ["empty"]
    order = None
    for f in files:
        schema = _file_problem(f, fmt)
        if isinstance(schema, list):
            return f, schema
        this = "timestamp" if "timestamp" in schema.names else "position" if "position" in schema.names else None
        if this is None:
            return f, ["'timestamp' or 'position'"]
        if order is not None and this != order:
            return f, [f"uses {this!r}"]
        order = this
        checks = (("user_id", _id_ok), ("item_id", _id_ok), (order, lambda t, o=order: _order_ok(o, t)))
        bad = [repr(c) for c, ok in checks if c not in schema.names or not ok(schema.field(c).type)]
        if bad:
            return f, bad
    return order


_ID_KINDS = ("small", "digits", "text")
_INTERACTION_COLUMNS = {"user_id": _ID_KINDS, "item_id": _ID_KINDS}
_ORDER_COLUMNS = {"timestamp": ("float", "small", "time"), "position": ("small",)}


@st.composite
def _table_files(draw, required: dict, optional: dict, one_of: dict) -> tuple[str, list[pa.Table | bytes]]:
    fmt = draw(st.sampled_from(["parquet", "csv"]))
    return fmt, draw(st.lists(_table_file(fmt, required, optional, one_of), min_size=1, max_size=2))


def _rows_as_prepare_reads(path: Path, fmt: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(path)
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))


@_budget(120)
@example(case=("csv", [b"user_id,item_id,user_id,position\n1,2,3,4\n"]))  # duplicate column: was a KeyError
@example(case=("csv", [b"user_id,item_id,posi\xfftion\n1,2,3\n"]))  # non-UTF-8 header: was a UnicodeDecodeError
@given(case=_table_files(_INTERACTION_COLUMNS, {"label": ("small",)}, _ORDER_COLUMNS))
def test_table_logs_are_listed_whole_or_refused_naming_file_and_column(case: tuple[str, list]):
    fmt, contents = case
    with _scratch() as d:
        files, target = _write_parts(d / "logs", fmt, contents)
        model = _interactions_model(files, fmt)
        if isinstance(model, tuple):
            bad_file, needles = model
            msg = _raises(lambda: load_table(target, None), str(bad_file))
            assert any(n in msg for n in needles), (needles, msg)
            return
        event("accepted")
        src = load_table(target, None)
        assert src.interactions == [str(f) for f in files] and src.files == files
        assert src.order == model and src.file_format == fmt and src.items is None
        # nothing dropped: read as prepare reads them, the listed files hold every generated row, typed
        # as the adapter checked them
        for path, content in zip(files, contents):
            table = _rows_as_prepare_reads(path, fmt)
            if isinstance(content, pa.Table):
                assert table.num_rows == content.num_rows
            assert _id_ok(table.schema.field("user_id").type) and _id_ok(table.schema.field("item_id").type)
            assert _order_ok(model, table.schema.field(model).type)


# items tables

_SCALAR = ("small", "float", "text", "digits", "bool", "time", "null")


def _castable(name: str, t: pa.DataType) -> bool:
    """Content columns: strings (or scalars that cast to strings); categories also lists of them."""
    scalar = (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or pa.types.is_integer(t)
              or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_timestamp(t))
    if name != "categories":
        return scalar
    listed = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or (listed and _castable("title", t.value_type)))


def _feature_ok(t: pa.DataType) -> bool:
    listed = pa.types.is_list(t) or pa.types.is_fixed_size_list(t)
    return listed and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))


def _items_model(table: pa.Table) -> list[str] | dict[str, list]:
    """normalise_items' columns, or the column names (quoted) one of which its error must name."""
    names = table.column_names
    dups = sorted({repr(n) for n in names if names.count(n) > 1})
    if dups or "item_id" not in names:
        return dups or ["'item_id'"]
    bad = [repr(n) for n in names if (n in ITEM_CONTENT.names and not _castable(n, table.schema.field(n).type))
           or (n.startswith("feat_") and not _feature_ok(table.schema.field(n).type))]
    if bad:
        return bad
    out: dict[str, list] = {"item_id": table.column("item_id").to_pylist()}
    for f in ITEM_CONTENT:
        col = table.column(f.name) if f.name in names else pa.nulls(table.num_rows, f.type)
        if f.name == "categories" and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            out[f.name] = [None if v is None else [c.strip() for c in v.split("|") if c.strip()]
                           for v in col.to_pylist()]
        else:
            out[f.name] = col.cast(f.type).to_pylist()
    out.update({n: table.column(n).to_pylist() for n in names if n.startswith("feat_")})
    return out


def _assert_items(got: pa.Table, expected: dict[str, list]) -> None:
    assert got.column_names == list(expected)
    for f in ITEM_CONTENT:
        assert got.schema.field(f.name).type == f.type
    for name, values in expected.items():
        assert repr(got.column(name).to_pylist()) == repr(values), name  # repr: NaN equals NaN here


_ITEM_COLUMNS = {"item_id": _ID_KINDS}
_CONTENT_COLUMNS = {"title": _SCALAR, "text": ("text",), "brand": ("text", "null"), "image_uri": ("text",),
                    "categories": ("pipes", "list_text", "list_int", "null"), "feat_text": ("vec2", "list_float")}


@_budget(100)
@example(case=("parquet", [pa.table({"item_id": [1], "feat_x": [["a"]]})]))  # list<string> features were kept
@example(case=("parquet", [pa.table({"item_id": [1]}), pa.table({"item_id": ["x"]})]))  # was an ArrowTypeError
@example(case=("csv", [b"item_id,title,title\n1,a,b\n"]))  # duplicate column: was an ArrowInvalid
@given(case=_table_files(_ITEM_COLUMNS, _CONTENT_COLUMNS, {}))
def test_table_items_keep_every_row_or_are_refused_naming_file_and_column(case: tuple[str, list]):
    fmt, contents = case
    with _scratch() as d:
        logs = d / "logs.parquet"
        pq.write_table(pa.table({"user_id": [1], "item_id": [1], "position": [0]}), logs)
        files, target = _write_parts(d / "items", fmt, contents)
        if _first_empty(files):
            _raises(lambda: load_table(logs, target), str(_first_empty(files)), "empty")
            return
        tables = []
        for f in files:
            schema = _file_problem(f, fmt)
            if isinstance(schema, list) or "item_id" not in schema.names or not _id_ok(schema.field("item_id").type):
                needles = schema if isinstance(schema, list) else ["'item_id'"]
                msg = _raises(lambda f=f: load_table(logs, target), str(f))
                assert any(n in msg for n in needles), (needles, msg)
                return
            tables.append(_rows_as_prepare_reads(f, fmt))
        try:
            table = pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            _raises(lambda: load_table(logs, target), str(d / "items"), "different types")
            return
        model = _items_model(table)
        if isinstance(model, list):
            msg = _raises(lambda: load_table(logs, target), str(files[0]))
            assert any(n in msg for n in model), (model, msg)
        else:
            event("accepted")
            items = load_table(logs, target).items
            _assert_items(items, model)
            # nothing dropped on the way in; except that a one-column CSV writes a null as a blank line,
            # which CSV readers skip (a known gap, and such an item has no id anyway)
            if all(isinstance(c, pa.Table) and (fmt == "parquet" or c.num_columns > 1) for c in contents):
                assert items.num_rows == sum(c.num_rows for c in contents)


@st.composite
def _items_table(draw) -> pa.Table:
    n = draw(st.integers(0, 6))
    names = (["item_id"] if draw(st.integers(0, 9)) else []) + [c for c in _CONTENT_COLUMNS if draw(st.booleans())]
    names += draw(st.lists(st.sampled_from(["price", "feat_image", "title", "item_id"]), max_size=2))
    kinds = {**_ITEM_COLUMNS, **_CONTENT_COLUMNS}
    table = pa.Table.from_arrays([_column(draw, _kinds_for("parquet", kinds.get(name, _SCALAR)), n)
                                  for name in names], names=names)
    cut = draw(st.integers(0, n))  # several chunks, as after concatenating item files
    return pa.concat_tables([table.slice(0, cut), table.slice(cut)]) if names else table


@_budget(150)
@example(table=pa.table({"title": ["a"]}))  # no item_id: was a KeyError
@example(table=pa.Table.from_arrays([pa.array([1]), pa.array(["a"]), pa.array(["b"])],
                                    names=["item_id", "title", "title"]))  # duplicate column: was a KeyError
@given(table=_items_table())
def test_normalise_items_keeps_every_row_or_names_the_column(table: pa.Table):
    model = _items_model(table)
    path = Path("items.parquet")
    if isinstance(model, list):
        msg = _raises(lambda: normalise_items(table, path), "items.parquet")
        assert any(n in msg for n in model), (model, msg)
    else:
        event("accepted")
        _assert_items(normalise_items(table, path), model)
