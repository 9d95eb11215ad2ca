"""Canonical table schemas and the errors raised for bad input.

Raw interactions (what an adapter hands to ``prepare``) carry the source's own ids:
``user_id``, ``item_id`` (int or string), an order column (``position`` or ``timestamp``) and,
optionally, ``split`` (an official split) and ``label``. After ``prepare`` every table uses
contiguous int64 ids (``user_id`` 0..U-1, ``item_id`` 0..I-1); the source ids are kept in
``users.parquet`` / ``items.parquet`` as ``source_id``.
"""

from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "valid", "test", "heldout")
BUCKETS = ("head", "torso", "tail", "cold")

# Item content columns every items table has (all nullable); feature columns are extra
# fixed-size float32 lists whose names start with ``feat_``.
ITEM_CONTENT = pa.schema(
    [
        ("title", pa.string()),
        ("text", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("brand", pa.string()),
        ("image_uri", pa.string()),
    ]
)

INTERACTIONS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("position", pa.int64()),
        ("split", pa.string()),
    ]
)

SEQUENCES = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_ids", pa.list_(pa.int64())),
        ("num_train", pa.int64()),
    ]
)

ITEM_STATS = pa.schema(
    [
        ("item_id", pa.int64()),
        ("train_count", pa.int64()),
        ("bucket", pa.string()),
        ("cold_holdout", pa.bool_()),
    ]
)

COCLICKS = pa.schema(
    [
        ("item_a", pa.int64()),
        ("item_b", pa.int64()),
        ("count", pa.int64()),
        ("weight", pa.float64()),
        ("split", pa.string()),
    ]
)

REJECTS = pa.schema(
    [
        ("source", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("order", pa.string()),
        ("reason", pa.string()),
    ]
)


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the row/line and the field."""


def feature_columns(schema: pa.Schema) -> list[str]:
    """Names of the fixed-size float feature columns of an items table."""
    return [f.name for f in schema if f.name.startswith("feat_")]
