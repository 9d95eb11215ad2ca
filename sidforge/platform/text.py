"""Item text from a template over the items table's content columns.

A template such as ``"{title}. {categories}. {brand}"`` names content columns between braces. An
item's text is the template with each field filled in; a field whose value is missing (null, empty,
or an empty category list) is skipped together with the literal text in front of it, so an item
without categories reads ``"Lipstick. Acme"`` and one without a title ``"Lips. Acme"``. The text in
front of the first field and after the last one is kept when any field is present. Categories are
joined with ``", "``. For RecBole data, whose ``text`` column already holds the item's text, use
``"{text}"``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

TEMPLATE_FIELDS = ("title", "text", "categories", "brand")
CATEGORY_SEPARATOR = ", "


@dataclass(frozen=True)
class ItemTextTemplate:
    """A parsed text template.

    Attributes:
        prefix: literal text before the first field.
        parts: ``(separator, field)`` pairs; the separator is the literal text in front of the field.
        suffix: literal text after the last field.
    """

    prefix: str
    parts: tuple[tuple[str, str], ...]
    suffix: str

    @classmethod
    def parse(cls, template: str) -> ItemTextTemplate:
        """Parse ``template``.

        Raises:
            ValueError: on a malformed template, a field outside :data:`TEMPLATE_FIELDS`, a format
                spec or conversion (``{title!r}``, ``{title:>10}``), or a template without fields.
        """
        try:
            pieces = list(string.Formatter().parse(template))
        except ValueError as e:
            raise ValueError(f"text template {template!r} is malformed ({e}); write fields as {{title}}, "
                             "and literal braces as {{ and }}") from None
        literal, prefix = "", ""
        parts: list[tuple[str, str]] = []
        for text, name, spec, conversion in pieces:
            literal += text
            if name is None:
                continue
            if name not in TEMPLATE_FIELDS:
                raise ValueError(f"text template {template!r}: unknown field {{{name}}}; "
                                 f"fields: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
            if spec or conversion:
                raise ValueError(f"text template {template!r}: field {{{name}}} may not have a format spec "
                                 "or conversion")
            if parts:
                parts.append((literal, name))
            else:
                prefix = literal
                parts.append(("", name))
            literal = ""
        if not parts:
            raise ValueError(f"text template {template!r} has no field; use e.g. '{{title}}. {{categories}}'")
        return cls(prefix=prefix, parts=tuple(parts), suffix=literal)

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields the template uses, in order."""
        return tuple(name for _, name in self.parts)

    def render(self, values: Mapping[str, Any]) -> str:
        """The text of one item.

        Args:
            values: field name → value (str, list of str, or None); absent fields count as missing.

        Returns:
            The filled-in template, or ``""`` when every field is missing.
        """
        out: list[str] = []
        for separator, name in self.parts:
            value = format_value(values.get(name))
            if not value:
                continue
            out.append(separator if out else "")
            out.append(value)
        if not out:
            return ""
        return self.prefix + "".join(out) + self.suffix

    def render_table(self, table: pa.Table) -> list[str]:
        """The text of every row of an items table (columns the table lacks count as missing)."""
        n = table.num_rows
        columns = {name: table.column(name).to_pylist() if name in table.column_names else [None] * n
                   for name in set(self.fields)}
        return [self.render({name: col[i] for name, col in columns.items()}) for i in range(n)]


def format_value(value: Any) -> str:
    """A content value as text: strings stripped, lists joined with ``", "``, missing → ``""``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, Sequence) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else value
        return CATEGORY_SEPARATOR.join(s for s in (format_value(v) for v in items) if s)
    return str(value).strip()
