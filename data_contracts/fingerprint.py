"""A table's identity by its rows, not its file bytes: the same rows hash the same whatever wrote them.

Parquet bytes embed the writer (pyarrow version, compression, row groups), so hashing the file would make an
upgrade look like a new dataset. ``rows_sha256`` hashes a canonical form: the chosen columns of every row
as JSON values, rows sorted by their canonical text (order-free), each length-prefixed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import pyarrow as pa


def rows_sha256(table: pa.Table, columns: Sequence[str]) -> str:
    """SHA-256 of the rows of ``table`` restricted to ``columns`` (in that order), independent of row order,
    Arrow/Parquet layout and string width (string vs large_string)."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"rows_sha256: column(s) {missing} are not in the table (columns {table.column_names})")
    data = table.select(list(columns)).to_pylist()
    lines = sorted(json.dumps([row[c] for c in columns], ensure_ascii=False, separators=(",", ":"))
                   for row in data)
    digest = hashlib.sha256(json.dumps(list(columns)).encode())
    for line in lines:
        encoded = line.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.hexdigest()
