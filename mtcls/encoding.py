"""Text and label encoding: raw column values -> model inputs and label arrays.

Text: one or several text fields per row are joined with a separator (for example title and/or
abstract). A row whose fields are all null, empty or whitespace, or hold a non-string value, gets an
error message instead of a text; callers keep the row and write the message out.

Labels: names -> indices in the layouts of :mod:`mtcls.losses`; ``None``/NaN -> ``-100`` (missing).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from mtcls.heads import HeadSpec
from mtcls.kinds.base import INVALID_LABEL, LabelError, is_missing

__all__ = ["INVALID_LABEL", "LabelError", "decode_labels", "encode_labels", "join_texts", "text_separator"]


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
            if is_missing(value):
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
    return spec.impl.encode(spec, values, on_unknown, first_row)


def decode_labels(spec: HeadSpec, encoded: np.ndarray) -> list[Any]:
    """Inverse of :func:`encode_labels` (distribution heads give back their probability lists)."""
    return spec.impl.decode_labels(spec, encoded)


def text_separator(config: Any, tokenizer: Any) -> str:
    """The one rule for joining several text columns, shared by training, scoring and evaluation.

    Args:
        config: A :class:`~mtcls.configuration.MultiTaskConfig` (its ``text_separator`` wins when
            set), or None for a model still to be built.
        tokenizer: The model's tokenizer.

    Returns:
        The configured separator, else the tokenizer's separator token with a space either side.
    """
    configured = getattr(config, "text_separator", None)
    return configured or f" {getattr(tokenizer, 'sep_token', None) or ' '} "
