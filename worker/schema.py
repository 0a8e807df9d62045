"""A task's output schema: the columns of its part rows, their types, and how each cell is written.

Each task declares its columns (``worker.tasks``); the worker records them in ``run.json``
(``columns``), and the aggregate reads the parts, builds its tables and writes CSV and Parquet
from that record alone, so it never needs to know which task made them.

Parts are CSV, so every cell is text. Scalars are written as themselves; list columns
(a top-k's labels and scores) as JSON arrays; vectors (embeddings) as base64 of their
little-endian bytes in the declared float type, which is exact and four times smaller than
decimal text. The aggregate turns lists into Parquet list columns and vectors into fixed-size
list columns, and leaves vectors out of its CSV table (``in_csv``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

# Scalar kinds, list kinds and vector kinds a column may have.
SCALAR_KINDS = ("string", "int64", "float64")
LIST_KINDS = ("list<string>", "list<int64>", "list<float64>")
VECTOR_KINDS = ("vector<float16>", "vector<float32>")
# A vector's element type as NumPy writes it (little-endian).
VECTOR_NUMPY = {"vector<float16>": "<f2", "vector<float32>": "<f4"}


@dataclass(frozen=True)
class Column:
    """One column of a task's part rows.

    Attributes:
        name: The column's name in the parts, the tables and the manifest.
        kind: One of ``SCALAR_KINDS``, ``LIST_KINDS`` or ``VECTOR_KINDS``.
        summary: The aggregate's report counts this column's values (a label's distribution);
            at most one column of a schema says so.
    """

    name: str
    kind: str
    summary: bool = False

    def __post_init__(self) -> None:
        if self.kind not in (*SCALAR_KINDS, *LIST_KINDS, *VECTOR_KINDS):
            raise ValueError(f"column {self.name!r}: unknown kind {self.kind!r}")

    @property
    def is_vector(self) -> bool:
        return self.kind in VECTOR_KINDS

    @property
    def is_list(self) -> bool:
        return self.kind in LIST_KINDS

    @property
    def in_csv(self) -> bool:
        """Whether the aggregate's CSV table holds this column (vectors are left to the Parquet)."""
        return not self.is_vector

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, **({"summary": True} if self.summary else {})}

    @classmethod
    def from_json(cls, data: dict) -> Column:
        return cls(data["name"], data["kind"], bool(data.get("summary", False)))


def check_schema(columns: Sequence[Column]) -> None:
    """ValueError unless the columns hold a ``uri``, have distinct names and at most one summary."""
    names = [c.name for c in columns]
    if "uri" not in names:
        raise ValueError(f"a task's columns must include 'uri', got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"a task's columns must have distinct names, got {names}")
    if sum(c.summary for c in columns) > 1:
        raise ValueError("at most one column of a task may be its summary column")


def label_columns(top_k: int) -> tuple[Column, ...]:
    """The part columns of a label task (classification, zero-shot) with ``top_k`` labels per image.

    The best label, its index and score, then with ``top_k`` above 1 the k best as lists, best first.
    """
    top = (
        (
            Column("top_labels", "list<string>"),
            Column("top_label_indices", "list<int64>"),
            Column("top_scores", "list<float64>"),
        )
        if top_k > 1
        else ()
    )
    return (
        Column("image_id", "string"),
        Column("classification", "string", summary=True),
        Column("label_index", "int64"),
        Column("score", "float64"),
        *top,
        Column("uri", "string"),
    )


def schema_to_json(columns: Sequence[Column]) -> list[dict]:
    return [c.to_json() for c in columns]


def schema_from_json(data: Sequence[dict]) -> tuple[Column, ...]:
    return tuple(Column.from_json(d) for d in data)


def encode_list(values: Sequence) -> str:
    """A list cell: a JSON array (floats as Python's shortest round-trip text)."""
    return json.dumps(list(values), ensure_ascii=False, separators=(",", ":"))


def encode_vector(values, kind: str) -> str:
    """A vector cell: base64 of the values' little-endian bytes in the column's float type."""
    import numpy as np

    return base64.b64encode(np.asarray(values, dtype=VECTOR_NUMPY[kind]).tobytes()).decode("ascii")


def decode_vector(cell: str, kind: str):
    """The NumPy vector of a vector cell."""
    import numpy as np

    return np.frombuffer(base64.b64decode(cell), dtype=VECTOR_NUMPY[kind])
