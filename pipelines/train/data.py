"""Training config and data preparation: label columns -> validated heads -> tokenized Ray Datasets.

Several training files can be given; each may be labelled for some heads only (a file without a
head's column, or a null value, is "no label" for that head, as in OLID). Label sets come from
the config or are inferred from the training data. Everything is checked on the driver before a
worker starts: a missing label column, a label outside a configured set, an empty training set, a
validation set with no label for some head all fail here, naming the column or head.

Files are read in pieces of ``CHUNK_ROWS`` rows. Each piece is tokenized and encoded, and handed on
at once (to the Ray object store in the training job, which spills to disk when full), so the
driver holds one piece, the label sets and the label counts, never a whole split. The pieces become
the Ray Datasets that every worker reads its shard of.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtcls import BALANCED, HeadSpec, encode_labels, get_kind, join_texts, tokenize
from pipelines.sources import resolve_input
from pipelines.storage import InputError, Location, locate, read_footer

from pipelines.train.config import TrainConfig


CHUNK_ROWS = 50_000


@dataclass
class ParquetSource:
    """One Parquet file of a split, with its column names (from the footer)."""

    loc: Location
    path: str
    columns: list[str]
    rows: int

    @property
    def uri(self) -> str:
        return self.loc.uri(self.path)


def list_sources(uris: list[str]) -> list[ParquetSource]:
    """Every Parquet file under the URIs (a Delta table's: those of its latest version), with its columns and rows; a bad footer fails here, named."""
    out = []
    for uri in uris:
        loc = locate(uri)
        for path in resolve_input(loc).files:  # a Delta table: the files of its latest version
            schema, rows = read_footer(loc, path)
            out.append(ParquetSource(loc, path, schema.names, rows))
    return out


def read_chunks(source: ParquetSource, columns: list[str], what: str) -> Iterator[tuple[int, pa.Table]]:
    """``(first row, table)`` pieces of up to :data:`CHUNK_ROWS` rows of the wanted columns present."""
    present = [c for c in columns if c in source.columns]
    if not present:
        return
    try:
        with source.loc.fs.open(source.path, "rb") as fh:
            offset = 0
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=CHUNK_ROWS, columns=present):
                table = pa.Table.from_batches([batch])
                yield offset, table
                offset += table.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read {what} Parquet file {source.uri!r}: {exc}") from exc


def _values(table: pa.Table, column: str) -> list[Any]:
    return table.column(column).to_pylist() if column in table.column_names else [None] * table.num_rows


@dataclass
class Split:
    """One prepared split: pieces of token ids and encoded labels (Arrow tables, or whatever
    ``put`` made of them: Ray object refs in the training job), never held as one table."""

    parts: list[Any] = field(default_factory=list)
    rows: int = 0
    skipped: int = 0
    label_rows: dict[str, int] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)


@dataclass
class PreparedData:
    """Token ids and encoded labels, ready for Ray Datasets."""

    specs: list[HeadSpec]
    train: Split
    validation: Split

    @property
    def skipped_rows(self) -> dict[str, int]:
        """Rows without text, per split."""
        return {"train": self.train.skipped, "validation": self.validation.skipped}

    @property
    def label_rows(self) -> dict[str, dict[str, int]]:
        """Per head, the rows of each split with a label for it."""
        return {s.name: {"train": self.train.label_rows.get(s.name, 0), "validation": self.validation.label_rows.get(s.name, 0)}
                for s in self.specs}


def _holdout(uri: str, first_row: int, n: int, fraction: float) -> np.ndarray:
    # A stable hash of the row position picks the held-out rows, the same on every run.
    return np.array([int(hashlib.md5(f"{uri}:{i}".encode()).hexdigest()[:8], 16) % 10_000 < fraction * 10_000
                     for i in range(first_row, first_row + n)], dtype=bool)


class _Encoder:
    """Tokenizes and encodes chunks, adding their rows to splits through ``put``."""

    def __init__(self, cfg: TrainConfig, specs: list[HeadSpec], tokenizer: Any, separator: str, put: Callable[[pa.Table], Any]) -> None:
        self.cfg, self.specs, self.tokenizer, self.separator, self.put = cfg, specs, tokenizer, separator, put
        self.columns = {h["name"]: cfg.head_column(h) for h in cfg.heads}

    def add(self, targets: list[tuple[Split, np.ndarray]], source: ParquetSource, first_row: int, table: pa.Table, what: str) -> None:
        """Encodes one chunk (label errors name the file's row) and adds each split its masked rows."""
        n = table.num_rows
        texts, errors = join_texts({c: _values(table, c) for c in self.cfg.text_columns}, self.separator)
        has_text = np.array([e is None for e in errors], dtype=bool)
        encoded = {}
        for spec in self.specs:
            column = self.columns.get(spec.name, spec.name)
            try:
                encoded[spec.name] = encode_labels(spec, _values(table, column), first_row=first_row).reshape(n, -1)
            except ValueError as exc:
                raise InputError(f"{what} file {source.uri!r}, column {column!r}: {exc}") from exc
        with_text = np.flatnonzero(has_text)
        ids_all = tokenize(self.tokenizer, [texts[i] for i in with_text], self.cfg.max_length).rows()
        position = np.full(n, -1)
        position[with_text] = np.arange(len(with_text))
        for split, mask in targets:
            split.skipped += int((mask & ~has_text).sum())
            rows = np.flatnonzero(mask & has_text)
            if not len(rows):
                continue
            arrays = {"input_ids": pa.array([ids_all[position[r]] for r in rows], pa.list_(pa.int32())),
                      "row": pa.array(np.arange(split.rows, split.rows + len(rows)), pa.int64())}
            for spec in self.specs:
                y = encoded[spec.name][rows].astype(np.float32)
                split.label_rows[spec.name] = split.label_rows.get(spec.name, 0) + int((y >= 0).any(axis=1).sum())
                if spec.class_weights in BALANCED or spec.pos_weight in BALANCED:
                    counts, total = spec.impl.label_counts(spec, y)
                    split.counts[spec.name] = split.counts.get(spec.name, 0) + np.asarray(counts, dtype=np.int64)
                    split.totals[spec.name] = split.totals.get(spec.name, 0) + total
                arrays[f"y_{spec.name}"] = pa.array(list(y), pa.list_(pa.float32()))
            split.parts.append(self.put(pa.table(arrays)))
            split.rows += len(rows)


def prepare_data(cfg: TrainConfig, tokenizer: Any, separator: str, base_specs: Optional[list[HeadSpec]] = None,
                 put: Callable[[pa.Table], Any] = lambda t: t) -> PreparedData:
    """Reads, validates and encodes the training and validation data (see module docstring).

    Files are read in pieces of :data:`CHUNK_ROWS` rows; each encoded piece goes to ``put`` at once
    (the training job passes ``ray.put``), so the driver never holds a whole split.

    Args:
        cfg: Validated config.
        tokenizer: The encoder's tokenizer.
        separator: Joins several text columns.
        base_specs: Heads of ``init_model`` (kept as they are; config heads of the same name replace
            nothing and must match).
        put: Called with every encoded piece; what it returns is kept in ``Split.parts``.

    Returns:
        The prepared data with the final head specs (labels resolved, balanced weights computed).
    """
    label_cols = [cfg.head_column(h) for h in cfg.heads]
    wanted = list(dict.fromkeys([*cfg.text_columns, *label_cols]))
    train_sources = list_sources(cfg.train)
    if not any(s.rows for s in train_sources):
        raise InputError(f"the training set {cfg.train} is empty")
    for head, col in zip(cfg.heads, label_cols):
        if not any(col in s.columns for s in train_sources):
            raise InputError(f"head {head['name']!r}: label column {col!r} is in none of the training files {cfg.train}")
    val_sources = list_sources(cfg.validation) if cfg.validation else []
    for source in [*train_sources, *val_sources]:
        if not any(c in source.columns for c in cfg.text_columns):
            raise InputError(f"file {source.uri!r} has none of the text columns {cfg.text_columns}; its columns: {source.columns}")

    # Labels not in the config are inferred in one pass that reads only those label columns.
    inferred = {h["name"]: (set(), []) for h in cfg.heads if "labels" not in h}
    infer_cols = list(dict.fromkeys(col for h, col in zip(cfg.heads, label_cols) if h["name"] in inferred))
    for source in train_sources if inferred else []:
        for _, table in read_chunks(source, infer_cols, "training"):
            for head, col in zip(cfg.heads, label_cols):
                if head["name"] in inferred:
                    labels, groups = get_kind(head["kind"]).infer_labels(_values(table, col))
                    seen, group_order = inferred[head["name"]]
                    seen.update(labels)
                    group_order.extend(g for g in groups or [] if g not in group_order)

    specs = list(base_specs or [])
    for head, col in zip(cfg.heads, label_cols):
        data = {k: v for k, v in head.items() if k != "column"}
        if head["name"] in inferred:
            seen, group_order = inferred[head["name"]]
            data["labels"] = sorted(seen)
            if get_kind(head["kind"]).has_groups and "groups" not in data:
                data["groups"] = group_order
            if not data["labels"]:
                raise InputError(f"head {head['name']!r}: column {col!r} has no labels in the training data")
        specs.append(HeadSpec.from_dict(data))

    encoder = _Encoder(cfg, specs, tokenizer, separator, put)
    train, validation = Split(), Split()
    budget = cfg.max_train_rows or None
    for source in train_sources:
        for first_row, table in read_chunks(source, wanted, "training"):
            if budget is not None:
                if budget <= 0:
                    break
                table = table.slice(0, budget)
                budget -= table.num_rows
            if cfg.validation:
                encoder.add([(train, np.ones(table.num_rows, dtype=bool))], source, first_row, table, "training")
            else:
                pick = _holdout(source.uri, first_row, table.num_rows, cfg.validation_fraction)
                encoder.add([(train, ~pick), (validation, pick)], source, first_row, table, "training")
    if train.rows == 0:
        raise InputError("no training row has text: every row's text columns are null or empty")
    for source in val_sources:
        for first_row, table in read_chunks(source, wanted, "validation"):
            encoder.add([(validation, np.ones(table.num_rows, dtype=bool))], source, first_row, table, "validation")

    for spec in specs:
        if not validation.label_rows.get(spec.name):
            raise InputError(f"head {spec.name!r}: the validation set has no label for this head; add labelled rows or drop the head")
    resolved = [spec.resolve_balanced([int(c) for c in train.counts[spec.name]], train.totals[spec.name])
                if spec.name in train.counts else spec for spec in specs]
    return PreparedData(resolved, train, validation)

