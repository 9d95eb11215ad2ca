"""Item text templates: fields filled in, missing parts skipped cleanly, bad templates rejected."""

from __future__ import annotations

import pyarrow as pa
import pytest

from sidforge.platform.text import TEMPLATE_FIELDS, ItemTextTemplate, format_value

DEFAULT = ItemTextTemplate.parse("{title}. {categories}. {brand}")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"title": "Lipstick", "categories": ["Beauty", "Lips"], "brand": "Acme"}, "Lipstick. Beauty, Lips. Acme"),
        ({"title": "Lipstick", "categories": [], "brand": "Acme"}, "Lipstick. Acme"),
        ({"title": "Lipstick", "categories": None, "brand": None}, "Lipstick"),
        ({"title": None, "categories": ["Lips"], "brand": "Acme"}, "Lips. Acme"),
        ({"title": "  ", "categories": ["", " "], "brand": " Acme "}, "Acme"),
        ({}, ""),
    ],
)
def test_missing_parts_are_skipped_with_their_separator(values, expected):
    assert DEFAULT.render(values) == expected


def test_prefix_suffix_and_escaped_braces():
    t = ItemTextTemplate.parse("Item: {title} by {brand}. {{new}}")
    assert t.prefix == "Item: " and t.suffix == ". {new}"
    assert t.fields == ("title", "brand")
    assert t.render({"title": "Soap", "brand": "Acme"}) == "Item: Soap by Acme. {new}"
    assert t.render({"title": "Soap"}) == "Item: Soap. {new}"
    assert t.render({}) == ""


def test_text_field_for_recbole_items():
    t = ItemTextTemplate.parse("{text}")
    assert t.render({"text": "Digital caliper 150 mm", "title": "ignored"}) == "Digital caliper 150 mm"


def test_render_table_uses_arrow_lists_and_absent_columns():
    table = pa.table({
        "title": pa.array(["A", None, "C"]),
        "categories": pa.array([["x", "y"], ["z"], None], pa.list_(pa.string())),
    })  # no brand column at all
    assert DEFAULT.render_table(table) == ["A. x, y", "z", "C"]


@pytest.mark.parametrize(
    ("template", "message"),
    [("{title}. {colour}", "unknown field {colour}"), ("{title!r}", "format spec"), ("{title:>9}", "format spec"),
     ("no fields", "has no field"), ("{title", "malformed")],
)
def test_bad_templates_are_rejected(template, message):
    with pytest.raises(ValueError, match=message):
        ItemTextTemplate.parse(template)


def test_format_value():
    assert format_value(None) == ""
    assert format_value(" a ") == "a"
    assert format_value(["a", None, " ", "b"]) == "a, b"
    assert format_value(3) == "3"
    assert set(TEMPLATE_FIELDS) == {"title", "text", "categories", "brand"}
