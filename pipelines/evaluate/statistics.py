"""Evaluation on Ray Data: per-block statistics -> one dataset-wide sum -> report formulas on the driver.

Two sources of predictions:

- ``data`` + ``model``: labelled Parquet is scored by inference actors that emit statistics, not rows;
- ``predictions`` + ``labels``: a scoring job's output joined to a labels table on the id column
  (a full outer join, so unmatched rows on either side are counted and reported).

Every block yields integer counts (and float sums for distribution heads) per head and per slice;
they add up to exactly the statistics of the whole set, whatever the number of blocks, files or nodes.
Calibration is measured the same way: per calibratable head, per reliability pair and confidence
bin, the entries and the sums of confidence and outcome (:func:`mtcls.calibration.reliability_statistics`),
of the scores as output and, where the actor also has them, of the scores without the temperature.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from mtcls import HeadSpec, encode_labels, head_report, head_statistics, merge_statistics
from mtcls.calibration import DEFAULT_ECE_BINS, ece_from_reliability, reliability_curve, reliability_statistics
from mtcls.metrics import empty_statistics, statistics_from_lists, statistics_to_lists
from mtcls.thresholds import best_thresholds, threshold_histograms
from pipelines.config import ConfigError
from pipelines.storage import InputError

log = logging.getLogger(__name__)

ALL = "__all__"
_HAS_PRED, _HAS_LABELS = "__mtcls_has_prediction", "__mtcls_has_labels"



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
    uncalibrated: Optional[dict[str, np.ndarray]] = None,
) -> dict[str, Any]:
    """Statistics of one block: per slice, per head, counts and threshold histograms; on the whole
    block also per calibratable head the reliability statistics (``reliability``, and
    ``reliability_uncalibrated`` for the heads in ``uncalibrated``).

    Args:
        batch: The block (label and slice columns).
        specs: Evaluated heads.
        label_columns: ``{head: column}``.
        probs: ``{head: probabilities}`` for the scored rows only, in block order.
        scored: (N,) bool, rows that have predictions.
        slice_by: Slice columns.
        bins: Threshold histogram bins.
        uncalibrated: ``{head: probabilities without its temperature}`` (scored rows, like
            ``probs``) for heads that have a temperature; None when not known.

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
            if spec.impl.tunable and key == ALL:
                entry[head]["hist"] = {k: v.tolist() for k, v in threshold_histograms(spec, labels[head][m], probs[head][m], bins).items()}
            if spec.impl.calibratable and key == ALL:
                entry[head]["reliability"] = reliability_statistics(spec, probs[head][m], labels[head][m], DEFAULT_ECE_BINS).tolist()
                if uncalibrated and head in uncalibrated:
                    entry[head]["reliability_uncalibrated"] = reliability_statistics(
                        spec, uncalibrated[head][m], labels[head][m], DEFAULT_ECE_BINS).tolist()
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
                for rel in ("reliability", "reliability_uncalibrated"):
                    if rel in parts:
                        value = np.asarray(parts[rel], dtype=np.float64)
                        cur[rel] = value if rel not in cur else cur[rel] + value
    return total


def probabilities_from_predictions(batch: pa.Table, specs: list[HeadSpec], heads: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Reads ``<head>_probs`` columns of a scoring output into model-shaped probability arrays.

    Rows with an ``error`` or without a prediction (unmatched in a join) are not scored.
    """
    n = batch.num_rows
    scored = np.ones(n, dtype=bool)
    if _HAS_PRED in batch.column_names:
        scored &= batch.column(_HAS_PRED).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    if "error" in batch.column_names:
        scored &= batch.column("error").is_null().to_numpy(zero_copy_only=False).astype(bool)
    by_spec = {s.name: s for s in specs}
    rows = batch.filter(pa.array(scored))
    probs = {head: by_spec[head].impl.probabilities_from_columns(by_spec[head], rows) for head in heads}
    return probs, scored


#: Why a head with a temperature has no ECE without it (the join path reads calibrated scores only).
NO_UNCALIBRATED = ("without temperature: not available, a scored table holds only the calibrated scores "
                   "(evaluate data= with model= for both)")
NO_TEMPERATURE = "no temperature"


def calibration_summary(spec: HeadSpec, parts: dict[str, Any]) -> dict[str, Any]:
    """One calibratable head's ECE and reliability diagram points, from its merged ``parts``.

    ``ece`` is of the scores as the model outputs them (with its ``temperature``, if any);
    ``ece_without_temperature`` of the same rows' probabilities without it (None, with a ``note``,
    for a head without a temperature or when the uncalibrated scores were not available).
    """
    out: dict[str, Any] = {"temperature": spec.temperature, "logit_offset": spec.logit_offset, "bins": DEFAULT_ECE_BINS,
                           "ece": ece_from_reliability(parts["reliability"]), "ece_without_temperature": None}
    if spec.temperature is None:
        out["note"] = NO_TEMPERATURE
    elif "reliability_uncalibrated" in parts:
        out["ece_without_temperature"] = ece_from_reliability(parts["reliability_uncalibrated"])
    else:
        out["note"] = NO_UNCALIBRATED
    out["reliability"] = reliability_curve(parts["reliability"])
    if "reliability_uncalibrated" in parts:
        out["reliability_without_temperature"] = reliability_curve(parts["reliability_uncalibrated"])
    return out


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
    report["calibration"] = {h: calibration_summary(by_spec[h], parts) for h, parts in overall.items() if "reliability" in parts}
    slices: dict[str, dict[str, Any]] = {}
    for key, entry in totals["slices"].items():
        if key == ALL:
            continue
        col, value = key.split("=", 1)
        slices.setdefault(col, {})[value] = {h: head_report(by_spec[h], parts["stats"]) for h, parts in entry.items()}
    report["slices"] = slices
    return report



def _predictions_stats(batch: pa.Table, specs: list[dict], label_columns: dict[str, str], slice_by: list[str], bins: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function on a joined block: its statistics, as one Python object."""
    spec_objs = [HeadSpec.from_dict(s) for s in specs]
    has_labels = batch.column(_HAS_LABELS).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    has_pred = batch.column(_HAS_PRED).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    batch = batch.filter(pa.array(has_labels & has_pred))
    probs, scored = probabilities_from_predictions(batch, spec_objs, list(label_columns))
    stats = block_statistics(batch, spec_objs, label_columns, probs, scored, slice_by, bins)
    stats["predictions_without_labels"] = int((has_pred & ~has_labels).sum())
    stats["labels_without_predictions"] = int((has_labels & ~has_pred).sum())
    return {"stats": _one_object(stats)}


def scored_block_statistics(batch: pa.Table, specs: list[dict], label_columns: dict[str, str], slice_by: list[str],
                            bins: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function on a block the inference actor scored: its statistics, as one Python object.

    Probabilities come from the block's ``<head>_probs`` columns, the uncalibrated ones from its
    ``__uncalibrated_<head>`` tensor columns; rows with an ``error`` are not scored. ``devices``
    lists the distinct ``__precision`` values (precision, torch device, Ray GPUs) of the block.
    """
    from pipelines.actor import UNCALIBRATED_PREFIX
    from pipelines.blocks import PRECISION, distinct_precisions

    spec_objs = [HeadSpec.from_dict(s) for s in specs]
    probs, scored = probabilities_from_predictions(batch, spec_objs, list(label_columns))
    uncalibrated = {}
    for s in spec_objs:
        column = UNCALIBRATED_PREFIX + s.name
        if s.name in label_columns and column in batch.column_names:
            uncalibrated[s.name] = np.asarray(batch.column(column).combine_chunks().to_numpy_ndarray())[scored]
    stats = block_statistics(batch, spec_objs, label_columns, probs, scored, slice_by, bins, uncalibrated)
    stats["devices"] = [{"ray_gpu_ids": p["ray_gpu_ids"], "torch": p["torch"], "precision": p["name"], "precision_reason": p["reason"]}
                        for p in distinct_precisions(batch.column(PRECISION))]
    return {"stats": _one_object(stats)}


def _one_object(value: Any) -> np.ndarray:
    out = np.empty(1, dtype=object)
    out[0] = value
    return out


