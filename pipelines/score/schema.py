"""The output table's Arrow schema: pass-through columns, every head's columns, then status columns.

Label names, head layout and the model identity travel in the schema metadata (key ``mtcls``), so a
reader can decode ``_probs`` columns without the model.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from mtcls import HeadSpec, output_columns

TRUNCATED_COLUMN = "truncated"
ERROR_COLUMN = "error"
METADATA_KEY = b"mtcls"


def head_fields(spec: HeadSpec) -> list[pa.Field]:
    """Arrow fields for one head's output columns, in :func:`mtcls.output_columns` order."""
    return [pa.field(name, arrow_type) for name, arrow_type in output_columns(spec)]


def output_schema(
    specs: list[HeadSpec], passthrough: pa.Schema, model_identity: dict[str, Any], text_columns: list[str]
) -> pa.Schema:
    """The full output schema, with self-describing metadata.

    Args:
        specs: The model's heads.
        passthrough: Schema of the columns copied from the input (id first).
        model_identity: Where the model came from and its weights' hash.
        text_columns: The input columns that were classified.
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
    for name in (TRUNCATED_COLUMN, ERROR_COLUMN):
        if name in taken:
            raise ValueError(f"pass-through column {name!r} clashes with the status column of that name")
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
