"""Probabilities -> labels and output columns; the per-kind rules live in :mod:`mtcls.kinds`.

Column conventions (N rows, K labels, G groups; the same names in every output table):

    kind          columns
    binary        <h>_label  <h>_score  <h>_probs (K=2: [negative, positive])
    multiclass    <h>_label  <h>_score  <h>_probs (K)
    multilabel    <h>_labels (labels at or above their threshold)  <h>_probs (K)
    grouped       <h>_<g>_label  <h>_<g>_score for every group g,  <h>_probs (G x K)
    distribution  <h>_label (top-1)  <h>_score  <h>_set (smallest set reaching the cumulative
                  threshold, most probable first)  <h>_probs (K)

``_score`` is the probability of the predicted label; ``_probs`` are in label order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from mtcls.heads import HeadSpec
from mtcls.kinds.distribution import DEFAULT_CUMULATIVE_THRESHOLD, cumulative_sets

__all__ = ["DEFAULT_CUMULATIVE_THRESHOLD", "cumulative_sets", "decode", "decode_arrow", "output_columns",
           "predict_indices", "full_probabilities"]


def output_columns(spec: HeadSpec) -> list[tuple[str, pa.DataType]]:
    """The (column name, Arrow type) pairs a head contributes to an output table, in order."""
    return spec.impl.output_columns(spec)


def full_probabilities(spec: HeadSpec, probs: np.ndarray) -> np.ndarray:
    """Probabilities as written to ``<head>_probs`` (binary: (N, 2) [negative, positive])."""
    return spec.impl.full_probabilities(spec, probs)


def predict_indices(spec: HeadSpec, probs: np.ndarray) -> Any:
    """Decisions as label indices, the form the metrics take.

    Args:
        spec: The head.
        probs: Probabilities as returned by the model's sigmoid/softmax: (N, 1) binary,
            (N, K) multiclass/multilabel/distribution, (N, G, K) grouped.

    Returns:
        binary/multiclass/distribution: (N,) int64 label index (distribution: top-1);
        multilabel: (N, K) bool; grouped: (N, G) int64.
    """
    return spec.impl.predict(spec, probs)


def decode_arrow(spec: HeadSpec, probs: np.ndarray) -> dict[str, pa.Array]:
    """One head's probabilities -> its output columns as Arrow arrays (vectorised, no Python rows)."""
    return spec.impl.decode(spec, probs)


def decode(spec: HeadSpec, probs: np.ndarray) -> dict[str, Any]:
    """One head's output columns for notebooks: float columns as float32 arrays, the rest as lists.

    Args:
        spec: The head.
        probs: (N, 1) binary, (N, G, K) grouped, (N, K) otherwise; float.

    Returns:
        ``{column: values}`` (see module docstring).
    """
    out: dict[str, Any] = {}
    for name, array in decode_arrow(spec, probs).items():
        out[name] = array.to_numpy() if pa.types.is_floating(array.type) else array.to_pylist()
    return out
