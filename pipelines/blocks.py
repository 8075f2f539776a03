"""The columns a block carries between the stages of a pipeline (dropped before anything is written).

    __unit        int32                          work unit of the rows (:mod:`pipelines.sink.units`)
    __row         int64                          row number in the input file
    __ids         list<int32>                    token ids (null when the row has no text)
    __embedding   fixed_size_list<float32, H>    heads-only input: the row's vector
    __precision   struct<name, reason, torch, ray_gpu_ids>   set by the inference actor: its precision and device
    error         string                         why the row has no prediction (null otherwise)
    truncated     bool                           the text was cut at ``max_length``

``error`` and ``truncated`` are also output columns (:mod:`pipelines.sink.schema`).
"""

from __future__ import annotations

import pyarrow as pa

UNIT = "__unit"
ROW = "__row"
IDS = "__ids"
EMBEDDING_IN = "__embedding"
PRECISION = "__precision"

#: The ``__precision`` column: what the actor ran at and why (:class:`mtcls.precision.Precision`),
#: on which torch device type, and the GPUs Ray gave it.
PRECISION_TYPE = pa.struct([("name", pa.string()), ("reason", pa.string()), ("torch", pa.string()),
                            ("ray_gpu_ids", pa.list_(pa.string()))])


def precision_column(value: dict, rows: int) -> pa.Array:
    """``rows`` copies of one ``__precision`` value (a dict with the fields of :data:`PRECISION_TYPE`)."""
    return pa.repeat(pa.scalar(value, PRECISION_TYPE), rows)


def distinct_precisions(column: pa.Array | pa.ChunkedArray) -> list[dict]:
    """The distinct values of a ``__precision`` column (one Python object per distinct value, not per row)."""
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not len(arr):
        return []
    key = pc.binary_join_element_wise(arr.field("name").fill_null(""), arr.field("torch").fill_null(""),
                                      pc.cast(pc.list_value_length(arr.field("ray_gpu_ids")).fill_null(0), pa.string()), "\t")
    first = pc.index_in(pc.unique(key), value_set=key)
    return sorted(arr.take(first).to_pylist(), key=lambda p: (p["name"], p["torch"], p["ray_gpu_ids"]))
