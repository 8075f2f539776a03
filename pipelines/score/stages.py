"""The scoring job's source stage: read a unit's rows, then tokenize them (:mod:`pipelines.tokenize`).

The block it returns carries the pass-through columns, ``__unit`` and ``__row``
(:mod:`pipelines.blocks`), ``__ids``, ``error`` and ``truncated``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.blocks import ROW, UNIT
from pipelines.sink.units import read_unit
from pipelines.tokenize import shipped_tokenizer, tokenize_block


def read_and_tokenize(batch: dict[str, np.ndarray], units: list[dict[str, Any]], in_fs: Any, columns: list[str],
                      text_columns: list[str], separator: str, max_length: int, tokenizer_ref: list) -> pa.Table:
    """Ray Data ``map_batches`` function: unit indices in, one tokenized block per unit out.

    Reads the unit's rows, drops rows already in the output (a resumed unit), joins and
    validates the text columns and tokenizes with the ``tokenizers`` batch API.

    Args:
        batch: ``{"unit": indices}``.
        units: Every unit of the run.
        in_fs: The input filesystem.
        columns: Columns to read; the first is the id, and text columns other than it are not passed on.
        text_columns: See :func:`pipelines.tokenize.tokenize_block`.
        separator: See :func:`pipelines.tokenize.tokenize_block`.
        max_length: See :func:`pipelines.tokenize.tokenize_block`.
        tokenizer_ref: ``[ray.put(ship_tokenizer(model_dir))]``.
    """
    tokenizer = shipped_tokenizer(tokenizer_ref)
    keep = list(dict.fromkeys(c for c in columns if c not in text_columns or c == columns[0]))
    tables = []
    for i in batch["unit"]:
        table, rows = read_unit(units[int(i)], in_fs, columns)
        block = tokenize_block(table, keep, text_columns, separator, max_length, tokenizer)
        tables.append(block.append_column(UNIT, pa.array(np.full(table.num_rows, int(i), dtype=np.int32)))
                      .append_column(ROW, pa.array(rows)))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
