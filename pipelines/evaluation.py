"""Evaluation on Ray Data: per-block statistics -> one dataset-wide sum -> report formulas on the driver.

Two sources of predictions:

- ``data`` + ``model``: labelled Parquet is scored by inference actors that emit statistics, not rows;
- ``predictions`` + ``labels``: a scoring job's output joined to a labels table on the id column
  (a full outer join, so unmatched rows on either side are counted and reported).

Every block yields integer counts (and float sums for distribution heads) per head and per slice;
they add up to exactly the statistics of the whole set, whatever the number of blocks, files or nodes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mtcls import HeadSpec, encode_labels, head_report, head_statistics, merge_statistics
from mtcls.metrics import empty_statistics, statistics_from_lists, statistics_to_lists
from mtcls.thresholds import DEFAULT_BINS, best_thresholds, threshold_histograms
from pipelines.config import ConfigError
from pipelines.storage import InputError, column_names, inspect_parquet, list_parquet_files, locate

log = logging.getLogger(__name__)

ALL = "__all__"
_HAS_PRED, _HAS_LABELS = "__mtcls_has_prediction", "__mtcls_has_labels"


@dataclass
class EvalConfig:
    """Config of ``jobs.evaluate``.

    Attributes:
        data: Labelled Parquet (any fsspec URI) to score with ``model`` and evaluate.
        model: Saved model directory; empty: the embedded default model.
        predictions: A scoring job's output directory, evaluated instead of scoring ``data``.
        labels: Parquet with ``id_column`` and label columns, joined to ``predictions``.
        output: Report directory (report.json, report.md, one confusion-matrix PNG per head).
        label_columns: ``{head: column}``; empty: every head that has a column of its own name.
        text_columns: Text columns of ``data``.
        id_column: Join key of ``predictions`` and ``labels``.
        slice_by: Columns whose every value gets its own report (e.g. a source or date column).
        max_length: Token limit; 0 uses the model's.
        batch_size: Rows per forward pass.
        block_rows: Rows per actor call.
        tune_thresholds: Report the F1-maximising threshold per label of binary/multilabel heads.
        threshold_bins: Resolution of threshold tuning (bins over [0, 1]).
        save_tuned_model: If set, write a copy of the model with the tuned thresholds here.
        plots: Write confusion-matrix PNGs.
        progress: Ray Data progress bars.
    """

    data: str = ""
    model: str = ""
    predictions: str = ""
    labels: str = ""
    output: str = "outputs/eval"
    label_columns: dict[str, str] = field(default_factory=dict)
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    id_column: str = "id"
    slice_by: list[str] = field(default_factory=list)
    max_length: int = 0
    batch_size: int = 64
    block_rows: int = 4096
    tune_thresholds: bool = True
    threshold_bins: int = DEFAULT_BINS
    save_tuned_model: str = ""
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.predictions and self.data:
            raise ConfigError("keys 'data' and 'predictions': give one source of predictions, not both")
        if self.predictions and not self.labels:
            raise ConfigError("key 'labels': required with 'predictions' (Parquet with the id and label columns)")
        if self.labels and not self.predictions:
            raise ConfigError("key 'labels': only used with 'predictions'; to score labelled data use 'data'")
        if not self.output:
            raise ConfigError("key 'output': a report directory is required")
        for key in ("batch_size", "block_rows", "threshold_bins"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key {key!r}: must be >= 1, got {getattr(self, key)}")
        if self.save_tuned_model and not self.tune_thresholds:
            raise ConfigError("key 'save_tuned_model': needs tune_thresholds=true")


def resolve_label_columns(specs: list[HeadSpec], columns: list[str], mapping: dict[str, str]) -> dict[str, str]:
    """The label column of each evaluated head.

    Raises:
        ConfigError: A mapped head that the model lacks, or a mapped column that the data lacks.
        InputError: No head has labels.
    """
    names = [s.name for s in specs]
    if mapping:
        unknown = [h for h in mapping if h not in names]
        if unknown:
            raise ConfigError(f"key 'label_columns': {unknown} are not heads of the model; its heads: {names}")
        missing = {h: c for h, c in mapping.items() if c not in columns}
        if missing:
            raise InputError(f"label column(s) {missing} not in the labelled data; its columns: {columns}")
        return dict(mapping)
    found = {n: n for n in names if n in columns}
    if not found:
        raise InputError(f"no label column for any head {names} in the labelled data (columns: {columns}); set label_columns")
    return found


def _slice_keys(batch: pa.Table, slice_by: list[str]) -> list[tuple[str, np.ndarray]]:
    keys = [(ALL, np.ones(batch.num_rows, dtype=bool))]
    for col in slice_by:
        values = np.array([str(v) for v in batch.column(col).to_pylist()], dtype=object)
        for value in sorted(set(values)):
            keys.append((f"{col}={value}", values == value))
    return keys


def block_statistics(
    batch: pa.Table,
    specs: list[HeadSpec],
    label_columns: dict[str, str],
    probs: dict[str, np.ndarray],
    scored: np.ndarray,
    slice_by: list[str],
    bins: int,
) -> dict[str, Any]:
    """Statistics of one block: per slice, per head, counts and threshold histograms.

    Args:
        batch: The block (label and slice columns).
        specs: Evaluated heads.
        label_columns: ``{head: column}``.
        probs: ``{head: probabilities}`` for the scored rows only, in block order.
        scored: (N,) bool, rows that have predictions.
        slice_by: Slice columns.
        bins: Threshold histogram bins.

    Returns:
        A JSON-able dict; :func:`merge_block_statistics` adds such dicts.
    """
    by_spec = {s.name: s for s in specs}
    labels = {h: encode_labels(by_spec[h], batch.column(c).to_pylist(), on_unknown="mark")[scored] for h, c in label_columns.items()}
    out: dict[str, Any] = {"rows": batch.num_rows, "unscored": int((~scored).sum()), "slices": {}}
    for key, mask in _slice_keys(batch, slice_by):
        m = mask[scored]
        entry = {}
        for head in label_columns:
            spec = by_spec[head]
            entry[head] = {"stats": statistics_to_lists(head_statistics(spec, labels[head][m], probs[head][m]))}
            if spec.kind in ("binary", "multilabel") and key == ALL:
                entry[head]["hist"] = {k: v.tolist() for k, v in threshold_histograms(spec, labels[head][m], probs[head][m], bins).items()}
        out["slices"][key] = entry
    return out


def merge_block_statistics(specs: list[HeadSpec], blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Adds block statistics (see :func:`block_statistics`) into dataset-wide totals (numpy arrays)."""
    by_spec = {s.name: s for s in specs}
    total: dict[str, Any] = {"rows": 0, "unscored": 0, "slices": {}}
    for block in blocks:
        total["rows"] += block["rows"]
        total["unscored"] += block["unscored"]
        for key, entry in block["slices"].items():
            dst = total["slices"].setdefault(key, {})
            for head, parts in entry.items():
                spec = by_spec[head]
                cur = dst.setdefault(head, {"stats": empty_statistics(spec)})
                cur["stats"] = merge_statistics(cur["stats"], statistics_from_lists(spec, parts["stats"]))
                if "hist" in parts:
                    hist = {k: np.asarray(v, dtype=np.int64) for k, v in parts["hist"].items()}
                    cur["hist"] = hist if "hist" not in cur else {k: cur["hist"][k] + hist[k] for k in hist}
    return total


def probabilities_from_predictions(batch: pa.Table, specs: list[HeadSpec], heads: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Reads ``<head>_probs`` columns of a scoring output into model-shaped probability arrays.

    Rows with an ``error`` or without a prediction (unmatched in a join) are not scored.
    """
    n = batch.num_rows
    scored = np.ones(n, dtype=bool)
    if _HAS_PRED in batch.column_names:
        scored &= np.array([bool(v) for v in batch.column(_HAS_PRED).to_pylist()])
    if "error" in batch.column_names:
        scored &= np.array([v is None for v in batch.column("error").to_pylist()])
    by_spec = {s.name: s for s in specs}
    probs = {}
    for head in heads:
        values = batch.column(f"{head}_probs").to_pylist()
        spec = by_spec[head]
        rows = [values[i] for i in range(n) if scored[i]]
        if spec.kind == "binary":
            arr = np.array([r[1:] for r in rows], dtype=np.float64).reshape(-1, 1)
        elif spec.kind == "grouped":
            arr = np.array(rows, dtype=np.float64).reshape(-1, spec.num_groups, spec.num_labels)
        else:
            arr = np.array(rows, dtype=np.float64).reshape(-1, spec.num_labels)
        probs[head] = arr
    return probs, scored


def build_report(specs: list[HeadSpec], totals: dict[str, Any], label_columns: dict[str, str], tune: bool) -> dict[str, Any]:
    """The report dict (report.json) from merged statistics."""
    by_spec = {s.name: s for s in specs}
    overall = totals["slices"].get(ALL, {})
    report: dict[str, Any] = {
        "rows": totals["rows"],
        "rows_unscored": totals["unscored"],
        "label_columns": label_columns,
        "heads": {h: head_report(by_spec[h], overall[h]["stats"] if h in overall else empty_statistics(by_spec[h])) for h in label_columns},
    }
    macro = [r["macro_f1"] for r in report["heads"].values()]
    report["mean_macro_f1"] = float(np.mean(macro)) if macro else 0.0
    if tune:
        report["threshold_tuning"] = {
            h: best_thresholds(by_spec[h], parts["hist"]) for h, parts in overall.items() if "hist" in parts
        }
    slices: dict[str, dict[str, Any]] = {}
    for key, entry in totals["slices"].items():
        if key == ALL:
            continue
        col, value = key.split("=", 1)
        slices.setdefault(col, {})[value] = {h: head_report(by_spec[h], parts["stats"]) for h, parts in entry.items()}
    report["slices"] = slices
    return report


class _EvalActor:
    """Scores labelled blocks and returns their statistics (one row per block)."""

    def __init__(self, files_ref: list, specs: list[dict], label_columns: dict[str, str], text_columns: list[str],
                 slice_by: list[str], max_length: int, batch_size: int, bins: int, torch_threads: int) -> None:
        import ray
        import torch
        from transformers import AutoTokenizer

        from mtcls import MultiTaskModel
        from pipelines.scoring import materialize_model_files

        torch.set_num_threads(max(1, torch_threads))
        path = materialize_model_files(ray.get(files_ref[0]))
        self.model = MultiTaskModel.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.specs = [HeadSpec.from_dict(s) for s in specs]
        self.label_columns, self.text_columns, self.slice_by = label_columns, text_columns, slice_by
        self.max_length, self.batch_size, self.bins = max_length, batch_size, bins
        self.separator = self.model.config.text_separator or f" {self.tokenizer.sep_token or ' '} "

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mtcls import join_texts, predict_probabilities, tokenize

        texts, _ = join_texts({c: batch.column(c).to_pylist() for c in self.text_columns}, self.separator)
        scored = np.array([t is not None for t in texts])
        ids, _ = tokenize(self.tokenizer, [t for t in texts if t is not None], self.max_length)
        probs = predict_probabilities(self.model, ids, self.batch_size, self.tokenizer.pad_token_id or 0)
        stats = block_statistics(batch, self.specs, self.label_columns, probs, scored, self.slice_by, self.bins)
        return pa.table({"stats": [json.dumps(stats)]})


def _predictions_stats(batch: pa.Table, specs: list[dict], label_columns: dict[str, str], slice_by: list[str], bins: int) -> pa.Table:
    spec_objs = [HeadSpec.from_dict(s) for s in specs]
    has_labels = np.array([bool(v) for v in batch.column(_HAS_LABELS).to_pylist()])
    has_pred = np.array([bool(v) for v in batch.column(_HAS_PRED).to_pylist()])
    batch = batch.filter(pa.array(has_labels & has_pred))
    probs, scored = probabilities_from_predictions(batch, spec_objs, list(label_columns))
    stats = block_statistics(batch, spec_objs, label_columns, probs, scored, slice_by, bins)
    stats["predictions_without_labels"] = int((has_pred & ~has_labels).sum())
    stats["labels_without_predictions"] = int((has_labels & ~has_pred).sum())
    return pa.table({"stats": [json.dumps(stats)]})


def evaluate_predictions(cfg: EvalConfig, specs: list[HeadSpec]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Joins a scoring output to a labels table and returns (merged totals, join counts)."""
    import ray.data

    pred_loc, label_loc = locate(cfg.predictions), locate(cfg.labels)
    pred_files = list_parquet_files(pred_loc)
    label_files = list_parquet_files(label_loc)
    label_columns = resolve_label_columns(specs, column_names(label_loc, label_files[0]), cfg.label_columns)
    needed_labels = list(dict.fromkeys([cfg.id_column, *label_columns.values(), *cfg.slice_by]))
    inspect_parquet(label_loc, label_files, needed_labels)
    pred_cols = [cfg.id_column, "error", *[f"{h}_probs" for h in label_columns]]
    inspect_parquet(pred_loc, pred_files, pred_cols)

    preds = ray.data.read_parquet(pred_files, filesystem=pred_loc.arrow_fs()).select_columns(pred_cols)
    preds = preds.add_column(_HAS_PRED, lambda b: pa.array([True] * b.num_rows), batch_format="pyarrow")
    labels = ray.data.read_parquet(label_files, filesystem=label_loc.arrow_fs()).select_columns(needed_labels)
    labels = labels.add_column(_HAS_LABELS, lambda b: pa.array([True] * b.num_rows), batch_format="pyarrow")
    clash = [c for c in needed_labels if c != cfg.id_column and c in pred_cols]
    if clash:
        raise InputError(f"columns {clash} are in both the predictions and the labels; rename them in the labels")
    joined = preds.join(labels, join_type="full_outer", num_partitions=max(1, len(pred_files)), on=(cfg.id_column,),
                        aggregator_ray_remote_args={"num_cpus": 0.25})
    spec_dicts = [s.to_dict() for s in specs]
    per_block = joined.map_batches(
        _predictions_stats, fn_kwargs=dict(specs=spec_dicts, label_columns=label_columns, slice_by=cfg.slice_by, bins=cfg.threshold_bins),
        batch_format="pyarrow", batch_size=None,
    )
    blocks = [json.loads(r["stats"]) for r in per_block.take_all()]
    totals = merge_block_statistics(specs, blocks)
    join = {key: sum(b[key] for b in blocks) for key in ("predictions_without_labels", "labels_without_predictions")}
    join["matched"] = totals["rows"]
    return totals, {"label_columns": label_columns, "join": join}


def evaluate_data(cfg: EvalConfig, specs: list[HeadSpec], model_files_ref: Any, max_length: int, torch_threads: int,
                  num_actors: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scores labelled data with the model in an actor pool; returns (merged totals, details)."""
    import ray.data

    loc = locate(cfg.data)
    files = list_parquet_files(loc)
    label_columns = resolve_label_columns(specs, column_names(loc, files[0]), cfg.label_columns)
    needed = list(dict.fromkeys([*cfg.text_columns, *label_columns.values(), *cfg.slice_by]))
    inspect_parquet(loc, files, needed)
    ds = ray.data.read_parquet(files, filesystem=loc.arrow_fs()).select_columns(needed)
    per_block = ds.map_batches(
        _EvalActor,
        fn_constructor_kwargs=dict(
            files_ref=model_files_ref, specs=[s.to_dict() for s in specs], label_columns=label_columns,
            text_columns=cfg.text_columns, slice_by=cfg.slice_by, max_length=max_length, batch_size=cfg.batch_size,
            bins=cfg.threshold_bins, torch_threads=torch_threads,
        ),
        batch_size=cfg.block_rows, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors), num_cpus=1,
    )
    blocks = [json.loads(r["stats"]) for r in per_block.take_all()]
    return merge_block_statistics(specs, blocks), {"label_columns": label_columns}


def specs_from_predictions(uri: str) -> tuple[list[HeadSpec], dict[str, Any]]:
    """Head specs and model identity from a scoring output's schema metadata."""
    import pyarrow.parquet as pq

    from pipelines.schema import read_metadata

    loc = locate(uri)
    files = list_parquet_files(loc)
    with loc.fs.open(files[0], "rb") as fh:
        meta = read_metadata(pq.ParquetFile(fh).schema_arrow)
    return [HeadSpec.from_dict(h["spec"]) for h in meta["heads"]], meta["model"]

