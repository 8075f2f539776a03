"""The CPU stages of the scoring job: read + tokenize (before the model) and write + commit (after it).

Between the stages a block carries the pass-through columns plus internal columns that the
writer drops:

    __unit      int32        index of the work unit (see :mod:`pipelines.score.units`)
    __row       int64        row number in the input file
    __ids       list<int32>  token ids (null when the row has no text)
    __precision string       set by the actor: "<precision>\t<why>" (recorded with each file)
    error       string       why the row has no text (null otherwise)
    truncated   bool         the text was cut at ``max_length``
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtcls import HeadSpec, tokenize_flat
from mtcls.profile import Profile, profile
from pipelines.inference import texts_from_columns
from pipelines.score.records import COMMIT_KEY, ids_checksum, output_name, row_ranges
from pipelines.score.schema import ERROR_COLUMN, TRUNCATED_COLUMN

UNIT, ROW, IDS, PRECISION = "__unit", "__row", "__ids", "__precision"


class _TokenizerCache:
    """One parsed tokenizer per worker process (parsing the JSON costs tens of ms)."""

    _cache: dict[str, Any] = {}

    @classmethod
    def get(cls, tokenizer_files: dict[str, bytes], digest: str) -> Any:
        if digest not in cls._cache:
            import tempfile

            from transformers import AutoTokenizer

            with tempfile.TemporaryDirectory() as tmp:
                for name, data in tokenizer_files.items():
                    with open(posixpath.join(tmp, name), "wb") as fh:
                        fh.write(data)
                cls._cache[digest] = AutoTokenizer.from_pretrained(tmp)
        return cls._cache[digest]


def read_and_tokenize(batch: dict[str, np.ndarray], units: list[dict[str, Any]], in_fs: Any, columns: list[str],
                      text_columns: list[str], separator: str, max_length: int, tokenizer_ref: list) -> pa.Table:
    """Ray Data ``map_batches`` function: unit indices in, one tokenized block per unit out.

    Reads the unit's row groups, drops rows already in the output (a resumed unit), joins and validates the text columns and tokenizes with the
    ``tokenizers`` batch API.
    """
    import ray

    files, digest = ray.get(tokenizer_ref[0])
    tokenizer = _TokenizerCache.get(files, digest)
    tables = [_tokenize_unit(units[int(i)], int(i), in_fs, columns, text_columns, separator, max_length, tokenizer)
              for i in batch["unit"]]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_unit(unit: dict[str, Any], in_fs: Any, columns: list[str], optional: tuple[str, ...] = ()) -> tuple[pa.Table, np.ndarray]:
    """A unit's rows not yet in the output (a resumed unit drops the rest), and their row numbers in the file.

    Args:
        unit: The unit (:meth:`pipelines.score.units.Unit.to_dict`).
        in_fs: The input filesystem.
        columns: Columns to read.
        optional: Further columns, read only where the file has them.
    """
    with in_fs.open(unit["path"], "rb") as fh:
        pf = pq.ParquetFile(fh)
        extra = [c for c in optional if c in pf.schema_arrow.names and c not in columns]
        table = pf.read_row_groups(unit["row_groups"], columns=[*columns, *extra])
    rows = np.arange(unit["first_row"], unit["first_row"] + table.num_rows, dtype=np.int64)
    keep = np.ones(table.num_rows, dtype=bool)
    for a, b in unit["done"]:
        keep[a - unit["first_row"]:b - unit["first_row"]] = False
    if not keep.all():
        table, rows = table.filter(pa.array(keep)), rows[keep]
    return table, rows


def _tokenize_unit(unit: dict[str, Any], index: int, in_fs: Any, columns: list[str], text_columns: list[str],
                   separator: str, max_length: int, tokenizer: Any) -> pa.Table:
    table, rows = read_unit(unit, in_fs, columns)
    texts, ok, errors = texts_from_columns(table, text_columns, separator)
    tokens = tokenize_flat(tokenizer, texts, max_length)
    lengths = np.zeros(table.num_rows, dtype=np.int32)
    lengths[ok] = tokens.lengths
    offsets = np.zeros(table.num_rows + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    has_text = np.zeros(table.num_rows, dtype=bool)
    has_text[ok] = True
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens.ids), mask=pa.array(~has_text))
    truncated = np.zeros(table.num_rows, dtype=bool)
    truncated[ok] = tokens.truncated
    passthrough = [c for c in columns if c not in text_columns or c == columns[0]]
    out = {c: table.column(c) for c in dict.fromkeys(passthrough)}
    out.update({
        UNIT: pa.array(np.full(table.num_rows, index, dtype=np.int32)),
        ROW: pa.array(rows),
        IDS: ids,
        ERROR_COLUMN: pa.array(errors, pa.string()),
        TRUNCATED_COLUMN: pa.array(truncated),
    })
    return pa.table(out)


def write_units(batch: pa.Table, units: list[dict[str, Any]], schema: pa.Schema, out_fs: Any, out_root: str,
                staging: str, input_uris: list[str], fingerprints: list[str], profile_heads: Optional[list[dict]] = None) -> pa.Table:
    """Ray Data ``map_batches`` function: scored rows in, committed Parquet files out.

    Rows are grouped by unit; each group is written to staging and moved into place under a name
    derived from the unit and the exact rows it holds, so a retried task replaces its file instead
    of adding a second copy. The file's metadata records the input file, its rows, the checksum
    of the ids written and, given ``profile_heads`` (head spec dicts), the prediction profile of
    its scored rows (:mod:`mtcls.profile`).

    Returns:
        One row per file written: name, rows, errors, truncated rows, and the precision(s) used
        (``"<precision>\t<why>"``, several joined by newlines).
    """
    unit_col = batch.column(UNIT).to_numpy()
    specs = [HeadSpec.from_dict(h) for h in profile_heads or []]
    records = []
    for index in np.unique(unit_col):
        part = batch.filter(pa.array(unit_col == index))
        order = np.argsort(part.column(ROW).to_numpy(), kind="stable")
        part = part.take(pa.array(order))
        rows = part.column(ROW).to_numpy()
        if len(np.unique(rows)) != len(rows):
            raise RuntimeError(f"unit {units[index]['key']}: a row reached the writer twice in one block")
        unit = units[int(index)]
        ranges = row_ranges(rows)
        uri, fp = input_uris[unit["file"]], fingerprints[unit["file"]]
        name = output_name(uri, fp, ranges)
        commit = {
            "input": uri, "fingerprint": fp, "ranges": ranges, "rows": int(part.num_rows),
            "checksum": str(ids_checksum(part.column(schema.names[0]))),
            "errors": int(part.num_rows - part.column(ERROR_COLUMN).null_count),
            "truncated": int(pc.sum(part.column(TRUNCATED_COLUMN)).as_py() or 0),
            "precision": "\n".join(sorted(pc.unique(part.column(PRECISION)).to_pylist())),
        }
        table = pa.Table.from_arrays([part.column(f.name).cast(f.type) for f in schema], schema=schema)
        if specs:
            commit["profile"] = file_profile(table, specs)
        table = table.replace_schema_metadata({**(schema.metadata or {}), COMMIT_KEY: json.dumps(commit).encode()})
        tmp = posixpath.join(staging, f"{name}.{uuid.uuid4().hex[:8]}")
        with out_fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        out_fs.mv(tmp, posixpath.join(out_root, name))
        records.append({"file": name, **{k: commit[k] for k in ("rows", "errors", "truncated", "precision")}})
    return pa.Table.from_pylist(records, schema=pa.schema([("file", pa.string()), ("rows", pa.int64()), ("errors", pa.int64()),
                                                           ("truncated", pa.int64()), ("precision", pa.string())]))


def file_profile(table: pa.Table, specs: list[HeadSpec]) -> Profile:
    """The prediction profile of an output table's scored rows (those without an ``error``)."""
    scored = table.filter(table.column(ERROR_COLUMN).is_null())
    return profile(specs, {s.name: s.impl.probabilities_from_columns(s, scored) for s in specs})
