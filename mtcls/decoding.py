"""Probabilities -> labels, per head kind, and the output column layout.

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

from mtcls.heads import HeadSpec

DEFAULT_CUMULATIVE_THRESHOLD = 0.9

STRING, FLOAT, FLOAT_LIST, STRING_LIST, FLOAT_LIST_LIST = (
    "string",
    "float32",
    "list<float32>",
    "list<string>",
    "list<list<float32>>",
)


def output_columns(spec: HeadSpec) -> list[tuple[str, str]]:
    """The (column name, type) pairs a head contributes to an output table, in order."""
    h = spec.name
    if spec.kind in ("binary", "multiclass"):
        return [(f"{h}_label", STRING), (f"{h}_score", FLOAT), (f"{h}_probs", FLOAT_LIST)]
    if spec.kind == "multilabel":
        return [(f"{h}_labels", STRING_LIST), (f"{h}_probs", FLOAT_LIST)]
    if spec.kind == "grouped":
        cols: list[tuple[str, str]] = []
        for g in spec.groups or []:
            cols += [(f"{h}_{g}_label", STRING), (f"{h}_{g}_score", FLOAT)]
        return cols + [(f"{h}_probs", FLOAT_LIST_LIST)]
    return [(f"{h}_label", STRING), (f"{h}_score", FLOAT), (f"{h}_set", STRING_LIST), (f"{h}_probs", FLOAT_LIST)]


def full_probabilities(spec: HeadSpec, probs: np.ndarray) -> np.ndarray:
    """Expands a binary head's (N, 1) positive probability to (N, 2); other kinds unchanged."""
    if spec.kind == "binary":
        p = probs.reshape(-1, 1)
        return np.concatenate([1.0 - p, p], axis=1)
    return probs


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
    if spec.kind == "binary":
        return (probs.reshape(-1) >= spec.label_thresholds()[0]).astype(np.int64)
    if spec.kind == "multilabel":
        return probs >= np.asarray(spec.label_thresholds(), dtype=probs.dtype)
    return probs.argmax(axis=-1).astype(np.int64)


def cumulative_sets(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of labels whose probabilities add up to ``threshold`` (card 004).

    Args:
        probs: (N, K) probabilities, rows summing to 1.
        threshold: Cumulative probability to reach, in (0, 1).

    Returns:
        ``order`` (N, K): label indices by decreasing probability; ``sizes`` (N,): how many of
        them form the set (at least 1).
    """
    order = np.argsort(-probs, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    # A tiny tolerance so that [0.5, 0.4, 0.1] reaches 0.9 at two labels despite float rounding.
    sizes = (cum < threshold - 1e-6).sum(axis=1) + 1
    return order, np.minimum(sizes, probs.shape[1])


def decode(spec: HeadSpec, probs: np.ndarray) -> dict[str, Any]:
    """Turns one head's probabilities into its output columns (see module docstring).

    Args:
        spec: The head.
        probs: (N, 1) binary, (N, G, K) grouped, (N, K) otherwise; float.

    Returns:
        ``{column: values}``; string columns as lists of str, list columns as lists of lists,
        float columns as float32 arrays.
    """
    h = spec.name
    probs = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(spec.labels, dtype=object)
    idx = predict_indices(spec, probs)
    if spec.kind in ("binary", "multiclass", "distribution"):
        full = full_probabilities(spec, probs)
        out = {
            f"{h}_label": labels[idx].tolist(),
            f"{h}_score": np.take_along_axis(full, idx[:, None], axis=1)[:, 0],
            f"{h}_probs": full.tolist(),
        }
        if spec.kind == "distribution":
            threshold = spec.cumulative_threshold or DEFAULT_CUMULATIVE_THRESHOLD
            order, sizes = cumulative_sets(full, threshold)
            out[f"{h}_set"] = [labels[o[:s]].tolist() for o, s in zip(order, sizes)]
            out[f"{h}_probs"] = out.pop(f"{h}_probs")  # keep the documented column order
        return out
    if spec.kind == "multilabel":
        return {f"{h}_labels": [labels[row].tolist() for row in idx], f"{h}_probs": probs.tolist()}
    out = {}
    for g, group in enumerate(spec.groups or []):
        out[f"{h}_{group}_label"] = labels[idx[:, g]].tolist()
        out[f"{h}_{group}_score"] = np.take_along_axis(probs[:, g, :], idx[:, g : g + 1], axis=1)[:, 0]
    out[f"{h}_probs"] = probs.tolist()
    return out
