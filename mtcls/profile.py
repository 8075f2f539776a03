"""Prediction profiles and drift: what a head predicted over a set of rows, and how far that moved.

A profile is small and mergeable: per head, the count of each decision (the prediction mix, from
:meth:`mtcls.kinds.HeadKind.prediction_mix`), a histogram of the decisions' scores over [0, 1]
in ``SCORE_BINS`` equal bins, and their sum. Profiles of disjoint row sets add up to exactly the
profile of their union, so the scoring job can profile each output file where it is written and
merge the files' profiles, whatever the blocks, actors or reruns were.

Training stores the validation set's profile (plus its true-label counts) next to the weights as
``reference_profile.json``; a scoring partition's profile is compared with it by the population
stability index (PSI) of the prediction mix:

    PSI(p, q) = sum_i (p_i - q_i) * ln(p_i / q_i)

over the head's labels (p: partition shares, q: reference shares; both floored at
``PSI_FLOOR`` so an empty label stays finite). Multilabel heads get one PSI per label (positive
vs negative share), grouped heads one per group; the head's PSI is the largest part. The usual
reading: below 0.1 no real change, 0.1-0.2 a moderate one, above 0.2 a significant shift
(``DEFAULT_DRIFT_THRESHOLD``).

A PSI over few rows is mostly sampling noise (a 30-row validation split routinely gives 0.3 against
a test split of the same distribution), so a head is only judged when both sides have at least
``min_rows`` rows (``DEFAULT_DRIFT_MIN_ROWS``); below that its PSI is reported, never flagged.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mtcls.heads import HeadSpec

SCORE_BINS = 20
PSI_FLOOR = 1e-4
DEFAULT_DRIFT_THRESHOLD = 0.2
#: Fewest rows, in the partition and in the reference, for a head's PSI to be judged against the threshold.
DEFAULT_DRIFT_MIN_ROWS = 100
#: File of a saved model that holds its reference profile.
REFERENCE_FILE = "reference_profile.json"

Profile = dict[str, dict[str, Any]]


def head_profile(spec: HeadSpec, probs: np.ndarray) -> dict[str, Any]:
    """The profile of one head's probabilities (rows without predictions already left out).

    Returns:
        ``{"rows", "mix", "score_hist", "score_sum"}`` as JSON-ready lists and numbers.
    """
    probs = np.asarray(probs)
    if not len(probs):
        return empty_head_profile(spec)
    scores = spec.impl.decision_scores(spec, probs)
    hist = np.bincount(np.clip((scores * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1), minlength=SCORE_BINS)
    return {"rows": int(len(probs)), "mix": spec.impl.prediction_mix(spec, probs).tolist(),
            "score_hist": hist.tolist(), "score_sum": float(scores.sum())}


def empty_head_profile(spec: HeadSpec) -> dict[str, Any]:
    """The profile of no rows: the identity of :func:`merge_profiles`."""
    zero = spec.impl.prediction_mix(spec, np.zeros((0, *spec.impl.logit_shape(spec)), dtype=np.float32))
    return {"rows": 0, "mix": zero.tolist(), "score_hist": [0] * SCORE_BINS, "score_sum": 0.0}


def profile(specs: list[HeadSpec], probs: dict[str, np.ndarray]) -> Profile:
    """:func:`head_profile` of every head in ``specs`` (keyed by head name)."""
    return {s.name: head_profile(s, probs[s.name]) for s in specs}


def merge_profiles(profiles: list[Profile]) -> Profile:
    """The sum of several profiles (heads missing from some are summed over the others)."""
    out: Profile = {}
    for prof in profiles:
        for name, head in prof.items():
            if name not in out:
                out[name] = copy.deepcopy(head)  # the inputs are never modified
                continue
            acc = out[name]
            acc["rows"] += head["rows"]
            acc["mix"] = (np.asarray(acc["mix"]) + np.asarray(head["mix"])).tolist()
            acc["score_hist"] = (np.asarray(acc["score_hist"]) + np.asarray(head["score_hist"])).tolist()
            acc["score_sum"] += head["score_sum"]
    return out


def summarize(spec: HeadSpec, head: dict[str, Any]) -> dict[str, Any]:
    """A head's profile for people: prediction mix as shares, mean decision score, score histogram."""
    rows = head["rows"]
    hist = np.asarray(head["score_hist"], dtype=np.float64)
    return {
        "rows": rows,
        "prediction_mix": spec.impl.mix_summary(spec, np.asarray(head["mix"]), rows),
        "mean_score": round(head["score_sum"] / hist.sum(), 6) if hist.sum() else None,
        "score_histogram": {"bins": SCORE_BINS, "shares": [round(float(v), 6) for v in hist / max(hist.sum(), 1)]},
    }


def population_stability_index(actual: np.ndarray, expected: np.ndarray, floor: float = PSI_FLOOR) -> float:
    """PSI of two distributions over the same categories (shares; each floored at ``floor``)."""
    p = np.maximum(np.asarray(actual, dtype=np.float64), floor)
    q = np.maximum(np.asarray(expected, dtype=np.float64), floor)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))


def head_drift(spec: HeadSpec, head: dict[str, Any], reference: dict[str, Any], threshold: float,
               min_rows: int = DEFAULT_DRIFT_MIN_ROWS) -> dict[str, Any]:
    """PSI of a head's prediction mix against its reference, per part and overall (the largest part).

    Args:
        spec: The head.
        head: The partition's profile of the head.
        reference: The reference profile of the head.
        threshold: PSI above which the head is flagged.
        min_rows: The head is flagged only when both sides have at least this many rows; below,
            its PSI is reported with a ``note`` and ``flagged`` is False.

    Returns:
        ``{"psi", "worst_part", "parts": {part: psi}, "flagged"}`` (plus ``note`` when too few rows
        were judged); ``psi`` None when either side has no rows.
    """
    if not head["rows"] or not reference["rows"]:
        return {"psi": None, "worst_part": None, "parts": {}, "flagged": False}
    actual = spec.impl.mix_distributions(spec, np.asarray(head["mix"]), head["rows"])
    expected = spec.impl.mix_distributions(spec, np.asarray(reference["mix"]), reference["rows"])
    parts = {name: round(population_stability_index(actual[name], expected[name]), 6) for name in actual}
    worst = max(parts, key=parts.get)
    judged = min(head["rows"], reference["rows"]) >= min_rows
    result = {"psi": parts[worst], "worst_part": worst or None, "parts": parts if len(parts) > 1 else {},
              "flagged": bool(judged and parts[worst] > threshold)}
    if not judged:
        result["note"] = (f"not judged: {head['rows']} rows scored and {reference['rows']} in the reference; "
                          f"drift_min_rows is {min_rows}")
    return result


def drift_report(specs: list[HeadSpec], partition: Profile, reference: Optional[Profile], threshold: float,
                 min_rows: int = DEFAULT_DRIFT_MIN_ROWS) -> dict[str, Any]:
    """Per-head drift of a partition against a reference profile (see :func:`head_drift` for ``min_rows``).

    Returns:
        ``{"threshold", "reference": bool, "heads": {name: head_drift}, "flagged": [names]}``;
        without a reference, ``heads`` is empty and ``reference`` False.
    """
    heads: dict[str, Any] = {}
    for spec in specs:
        if reference is None or spec.name not in reference or spec.name not in partition:
            continue
        ref = reference[spec.name]
        if len(np.asarray(ref["mix"]).reshape(-1)) != len(np.asarray(partition[spec.name]["mix"]).reshape(-1)):
            heads[spec.name] = {"psi": None, "worst_part": None, "parts": {}, "flagged": False,
                                "note": "the reference profile has a different label set"}
            continue
        heads[spec.name] = head_drift(spec, partition[spec.name], ref, threshold, min_rows)
    return {"threshold": threshold, "min_rows": min_rows, "reference": reference is not None, "heads": heads,
            "flagged": [name for name, d in heads.items() if d["flagged"]]}


def reference_document(heads: dict[str, dict[str, Any]], source: str) -> dict[str, Any]:
    """The content of ``reference_profile.json``.

    Args:
        heads: Per head, its :func:`head_profile` on the validation rows as the exported model
            scores them, plus ``label_counts`` (true labels).
        source: Where the rows came from, e.g. ``"validation set, epoch 3"``.
    """
    return {"source": source, "score_bins": SCORE_BINS, "heads": heads}


def load_reference(directory: str | Path) -> Optional[dict[str, Any]]:
    """The model's reference profile (``{"source", "score_bins", "heads"}``), or None if it has none."""
    path = Path(directory) / REFERENCE_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())

