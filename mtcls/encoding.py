"""Text and label encoding: raw column values -> model inputs and label arrays.

Text: one or several text fields per row are joined with a separator (card 004: title and/or
abstract). A row whose fields are all null, empty or whitespace, or hold a non-string value, gets an
error message instead of a text; callers keep the row and write the message out.

Labels: names -> indices in the layouts of :mod:`mtcls.losses`; ``None``/NaN -> ``-100`` (missing).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from mtcls.heads import HeadSpec
from mtcls.losses import IGNORE_INDEX

INVALID_LABEL = -1  # a label outside the head's set, when the caller asked to mark rather than raise


class LabelError(ValueError):
    """A label value cannot be encoded; the message names the head, the row and the value."""


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def join_texts(
    columns: dict[str, Sequence[Any]], separator: str
) -> tuple[list[Optional[str]], list[Optional[str]]]:
    """Joins one or several text columns row by row.

    Args:
        columns: ``{column name: values}``, all the same length, in joining order.
        separator: Placed between non-empty fields (for example ``" [SEP] "``).

    Returns:
        ``(texts, errors)``: per row either a text and ``None``, or ``None`` and an error message
        naming the column(s).
    """
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    texts: list[Optional[str]] = [None] * n
    errors: list[Optional[str]] = [None] * n
    for i in range(n):
        parts = []
        for name in names:
            value = columns[name][i]
            if _is_missing(value):
                continue
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    errors[i] = f"column {name!r}: invalid UTF-8 at byte {exc.start}"
                    break
            if not isinstance(value, str):
                errors[i] = f"column {name!r}: expected a string, got {type(value).__name__}"
                break
            value = value.replace("\x00", " ")
            if value.strip():
                parts.append(value.strip())
        if errors[i] is None:
            if parts:
                texts[i] = separator.join(parts)
            else:
                what = f"column {names[0]!r} is" if len(names) == 1 else f"columns {names} are all"
                errors[i] = f"empty text: {what} null, empty or whitespace"
    return texts, errors


def _label_index(spec: HeadSpec, index: dict[str, int], value: Any, row: int, on_unknown: str) -> int:
    key = value if isinstance(value, str) else str(value) if isinstance(value, (int, np.integer)) else None
    if key is not None and key in index:
        return index[key]
    if on_unknown == "mark":
        return INVALID_LABEL
    raise LabelError(f"head {spec.name!r}: row {row}: label {value!r} is not one of {spec.labels}")


def encode_labels(spec: HeadSpec, values: Sequence[Any], on_unknown: str = "error", first_row: int = 0) -> np.ndarray:
    """Encodes one head's raw label values.

    Args:
        spec: The head.
        values: One value per row. binary/multiclass: a label name; multilabel: a list of names
            (empty list = no positive label); grouped: ``{group: label}`` (a dict, or a list of
            ``(key, value)`` pairs as Arrow maps give); distribution: K probabilities in label order,
            or ``{label: probability}``. ``None``/NaN means no label.
        on_unknown: ``"error"`` raises :class:`LabelError` on a label outside the head's set;
            ``"mark"`` encodes it as ``-1`` (evaluation counts such rows as invalid).
        first_row: Row number of ``values[0]`` in its file, for error messages on chunked reads.

    Returns:
        (N,) int64 binary/multiclass (binary as 0/1), (N, K) float32 multilabel/distribution,
        (N, G) int64 grouped; ``-100`` where missing.
    """
    if on_unknown not in ("error", "mark"):
        raise ValueError(f"on_unknown must be 'error' or 'mark', got {on_unknown!r}")
    index = {name: i for i, name in enumerate(spec.labels)}
    n, k = len(values), spec.num_labels
    if spec.kind in ("binary", "multiclass"):
        out = np.full(n, IGNORE_INDEX, dtype=np.int64)
        for i, v in enumerate(values):
            if not _is_missing(v):
                out[i] = _label_index(spec, index, v, i + first_row, on_unknown)
        return out
    if spec.kind == "multilabel":
        out = np.full((n, k), IGNORE_INDEX, dtype=np.float32)
        for i, v in enumerate(values):
            if _is_missing(v):
                continue
            if isinstance(v, str) or not hasattr(v, "__iter__"):
                raise LabelError(f"head {spec.name!r}: row {i + first_row}: expected a list of label names, got {v!r}")
            out[i] = 0.0
            for name in v:
                j = _label_index(spec, index, name, i + first_row, on_unknown)
                if j == INVALID_LABEL:
                    out[i] = INVALID_LABEL
                    break
                out[i, j] = 1.0
        return out
    if spec.kind == "grouped":
        groups = {g: j for j, g in enumerate(spec.groups or [])}
        out = np.full((n, len(groups)), IGNORE_INDEX, dtype=np.int64)
        for i, v in enumerate(values):
            if _is_missing(v):
                continue
            items = v.items() if isinstance(v, dict) else v
            for g, label in items:
                if g not in groups:
                    raise LabelError(f"head {spec.name!r}: row {i + first_row}: unknown group {g!r}; groups: {spec.groups}")
                if not _is_missing(label):
                    out[i, groups[g]] = _label_index(spec, index, label, i + first_row, on_unknown)
        return out
    out = np.full((n, k), IGNORE_INDEX, dtype=np.float32)
    for i, v in enumerate(values):
        if _is_missing(v):
            continue
        if isinstance(v, dict):
            row = np.zeros(k, dtype=np.float64)
            for name, p in v.items():
                j = _label_index(spec, index, name, i + first_row, on_unknown)
                if j == INVALID_LABEL:
                    row[:] = INVALID_LABEL
                    break
                row[j] = p
        else:
            row = np.asarray(list(v), dtype=np.float64)
            if row.shape != (k,):
                raise LabelError(f"head {spec.name!r}: row {i + first_row}: expected {k} probabilities, got {len(row)}")
        if (row == INVALID_LABEL).all():
            out[i] = INVALID_LABEL
            continue
        total = row.sum()
        if not np.isfinite(row).all() or (row < 0).any() or abs(total - 1.0) > 1e-3:
            raise LabelError(
                f"head {spec.name!r}: row {i + first_row}: soft labels must be non-negative and sum to 1, got {v!r}"
            )
        out[i] = row / total
    return out


def decode_labels(spec: HeadSpec, encoded: np.ndarray) -> list[Any]:
    """Inverse of :func:`encode_labels` (distribution heads give back their probability lists)."""
    labels = spec.labels
    if spec.kind in ("binary", "multiclass"):
        return [labels[j] if j >= 0 else None for j in encoded.tolist()]
    if spec.kind == "multilabel":
        return [None if (row < 0).any() else [labels[j] for j in np.flatnonzero(row > 0.5)] for row in encoded]
    if spec.kind == "grouped":
        return [{g: (labels[j] if j >= 0 else None) for g, j in zip(spec.groups or [], row.tolist())} for row in encoded]
    return [None if (row < 0).any() else row.tolist() for row in encoded]
