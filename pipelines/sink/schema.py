"""The output table's Arrow schema: pass-through columns, every head's columns, the optional
``embedding`` column, then status columns.

Label names, head layout and the model identity (with embeddings, also the encoder's) travel in the
schema metadata (key ``mtcls``), so a reader can decode ``_probs`` columns without the model.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pyarrow as pa

from mtcls import HeadSpec, output_columns

TRUNCATED_COLUMN = "truncated"
ERROR_COLUMN = "error"
EMBEDDING_COLUMN = "embedding"
METADATA_KEY = b"mtcls"


def head_fields(spec: HeadSpec) -> list[pa.Field]:
    """Arrow fields for one head's output columns, in :func:`mtcls.output_columns` order."""
    return [pa.field(name, arrow_type) for name, arrow_type in output_columns(spec)]


def selected_heads(specs: list[HeadSpec], names: list[str]) -> list[HeadSpec]:
    """The heads a job outputs (the ``heads`` key; empty: all), in the model's order.

    Raises:
        ConfigError: Naming the key, the unknown heads and the model's heads.
    """
    from pipelines.config import ConfigError

    known = [s.name for s in specs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"key 'heads': unknown head(s) {unknown}; the model's heads: {known}")
    return [s for s in specs if not names or s.name in names]


def embedding_type(hidden_size: int, dtype: str) -> pa.DataType:
    """The ``embedding`` column's type: ``fixed_size_list<float32 or float16, hidden_size>``."""
    return pa.list_(pa.float16() if dtype == "float16" else pa.float32(), hidden_size)


def output_schema(
    specs: list[HeadSpec], passthrough: pa.Schema, model_identity: dict[str, Any], text_columns: list[str],
    embedding: Optional[pa.DataType] = None, encoder_identity: Optional[dict[str, Any]] = None,
) -> pa.Schema:
    """The full output schema, with self-describing metadata.

    Args:
        specs: The model's heads.
        passthrough: Schema of the columns copied from the input (id first).
        model_identity: Where the model came from and its weights' hash.
        text_columns: The input columns that were classified.
        embedding: Type of the ``embedding`` column (:func:`embedding_type`); None: no such column.
        encoder_identity: With ``embedding``: what identifies the features (recorded as ``encoder``).
    """
    fields = list(passthrough)
    taken = set(passthrough.names)
    for spec in specs:
        for f in head_fields(spec):
            if f.name in taken:
                raise ValueError(
                    f"output column {f.name!r} of head {spec.name!r} clashes with a pass-through column; "
                    "drop it from passthrough_columns"
                )
            fields.append(f)
    for name in (TRUNCATED_COLUMN, ERROR_COLUMN, *([EMBEDDING_COLUMN] if embedding is not None else [])):
        if name in taken:
            raise ValueError(f"pass-through column {name!r} clashes with the output column of that name")
    if embedding is not None:
        fields.append(pa.field(EMBEDDING_COLUMN, embedding))
    fields += [pa.field(TRUNCATED_COLUMN, pa.bool_()), pa.field(ERROR_COLUMN, pa.string())]
    meta = {
        "model": model_identity,
        "text_columns": text_columns,
        "heads": [
            {
                "name": s.name,
                "kind": s.kind,
                "labels": s.labels,
                "groups": s.groups,
                "columns": [c for c, _ in output_columns(s)],
                "spec": s.to_dict(),
            }
            for s in specs
        ],
    }
    if embedding is not None:
        meta["encoder"] = encoder_identity
        meta["embedding"] = {"column": EMBEDDING_COLUMN, "dtype": "float16" if pa.types.is_float16(embedding.value_type) else "float32",
                             "size": embedding.list_size}
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta).encode()})


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The ``mtcls`` metadata of a scoring output's schema.

    Raises:
        ValueError: If the schema was not written by the scoring job.
    """
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("the table has no 'mtcls' schema metadata: is it the output of jobs.score?")
    return json.loads(raw)
