"""The head-kind interface and its registry.

A head kind (binary, multiclass, ...) owns everything that depends on what a head predicts: the
shape of its logits, probabilities, loss, label encoding and collation, decoding to output columns
and back, evaluation statistics and report, threshold tuning where it applies, and the likelihood and
reliability pairs that temperature calibration fits and measures (:mod:`mtcls.calibration`). Everything
else in the project asks the kind (``spec.impl``) and never compares kind names.

Label layouts use ``IGNORE_INDEX`` (-100) for "no label" and ``INVALID_LABEL`` (-1) for a label
outside the head's set (evaluation counts such rows instead of raising).

Adding a kind: subclass :class:`HeadKind` in a module of its own, decorate it with
:func:`register_kind`, and import that module (the built-in kinds are imported by
``mtcls.kinds``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch

from mtcls.kinds.formulas import confusion_report, divide

IGNORE_INDEX = -100
INVALID_LABEL = -1
Stats = dict[str, np.ndarray]



class SpecFields(Protocol):
    """What a kind reads of a head's spec: :class:`mtcls.heads.HeadSpec` has these fields (a
    protocol, since :mod:`mtcls.heads` imports this registry)."""

    name: str
    labels: list[str]
    groups: Optional[list[str]]
    pos_weight: Any
    thresholds: Any
    cumulative_threshold: Optional[float]

    @property
    def num_labels(self) -> int: ...

    @property
    def num_groups(self) -> int: ...


_REGISTRY: dict[str, "HeadKind"] = {}


class LabelError(ValueError):
    """A label value cannot be encoded; the message names the head, the row and the value."""


def register_kind(cls: type["HeadKind"]) -> type["HeadKind"]:
    """Class decorator: registers a kind under its ``name`` (one instance, stateless)."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} has no 'name'")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"a head kind named {cls.name!r} is already registered ({type(_REGISTRY[cls.name]).__name__})")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister_kind(name: str) -> None:
    """Removes a kind from the registry (for tests that register their own)."""
    _REGISTRY.pop(name, None)


def get_kind(name: str) -> "HeadKind":
    """The registered kind of that name.

    Raises:
        KeyError: Naming the known kinds.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown head kind {name!r}; expected one of {kind_names()}") from None


def kind_names() -> list[str]:
    """Names of every registered kind, in registration order."""
    return list(_REGISTRY)


def is_missing(value: Any) -> bool:
    """True for ``None`` and NaN: "no label"."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def as_label_key(value: Any) -> Optional[str]:
    """A label value as the string it is looked up by (ints are accepted as their text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return None


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """(K, K) [true, predicted] counts."""
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k).astype(np.int64)


def zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.int64)


def string_column(labels: Sequence[str], index: np.ndarray) -> pa.Array:
    """Label names picked by index, built as Arrow strings without a Python loop."""
    dictionary = pa.array(list(labels), pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(index.astype(np.int32)), dictionary).cast(pa.string())


def list_column(values: np.ndarray, width: int) -> pa.Array:
    """A (N, width) float array as Arrow ``list<float32>`` (one list of ``width`` per row)."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, len(flat) + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def ragged_string_column(labels: Sequence[str], mask: np.ndarray, order: Optional[np.ndarray] = None) -> pa.Array:
    """Per row, the label names where ``mask`` is true (in ``order`` when given), as ``list<string>``."""
    n, k = mask.shape
    cols = np.broadcast_to(np.arange(k), (n, k)) if order is None else order
    picked = cols[mask]  # row-major: row 0's picks first
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(mask.sum(axis=1), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), string_column(labels, picked))


def float_rows(column: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A ``list<float>`` column without nulls as a (N, width) float64 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError("probability column has null rows; filter unscored rows first")
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    if len(flat) != len(column) * width:
        raise ValueError(f"expected {width} probabilities per row, got {len(flat)} values for {len(column)} rows")
    return flat.reshape(len(column), width)


class HeadKind:
    """One head kind. Stateless: every method takes the head's spec.

    Subclasses set the class attributes and implement the methods that raise
    ``NotImplementedError``; the defaults suit single-choice kinds with one softmax.
    """

    name: str = ""
    min_labels: int = 2
    exact_labels: Optional[int] = None
    has_groups: bool = False
    #: ``"class_weights"`` (per-label loss weights), ``"pos_weight"`` (BCE positives) or None.
    weight_field: Optional[str] = None
    #: Decision thresholds can be tuned on labelled data (``best_thresholds``).
    tunable: bool = False
    #: Training tunes the thresholds after every validation pass (and exports them).
    tuned_in_training: bool = False
    #: Labels can be inferred from the training data's label column.
    labels_inferable: bool = True
    #: Optional spec fields that only this kind accepts (besides its weight field).
    own_fields: tuple[str, ...] = ()
    #: Scores can be calibrated by a temperature fitted on labelled data (:mod:`mtcls.calibration`).
    calibratable: bool = True

    # ---------------------------------------------------------------- spec
    def validate(self, spec: "SpecFields", fail: Callable[[str, str], None]) -> None:
        """Kind-specific checks of a spec; calls ``fail(field, message)`` on the first problem."""
        n = len(spec.labels)
        if self.exact_labels is not None and n != self.exact_labels:
            fail("labels", f"a {self.name} head has exactly {self.exact_labels} labels, got {spec.labels}")
        if n < self.min_labels:
            fail("labels", f"a {self.name} head needs at least {self.min_labels} labels, got {spec.labels}")

    def num_logits(self, spec: "SpecFields") -> int:
        """Width of the head's output layer."""
        return spec.num_labels

    def logit_shape(self, spec: "SpecFields") -> tuple[int, ...]:
        """Shape of one row's logits (and probabilities)."""
        return (self.num_logits(spec),)

    def thresholds(self, spec: "SpecFields") -> list[float]:
        """Per-label decision thresholds, for tunable kinds."""
        raise NotImplementedError(f"{self.name} heads have no decision thresholds")

    def threshold_labels(self, spec: "SpecFields") -> list[str]:
        """The labels that ``thresholds`` refer to, in order."""
        return list(spec.labels)

    def with_thresholds(self, spec: "SpecFields", thresholds: list[float]) -> "SpecFields":
        """A copy of the spec using these thresholds."""
        raise NotImplementedError(f"{self.name} heads have no decision thresholds")

    def resolve_weights(self, spec: "SpecFields", counts: list[int], total: int, sqrt: bool) -> Any:
        """The numbers that ``"balanced"`` weights stand for, given label counts."""
        k = spec.num_labels
        weights = [float(total) / (k * c) if c > 0 else 1.0 for c in counts]
        return [w ** 0.5 for w in weights] if sqrt else weights

    # ---------------------------------------------------------------- model
    def probabilities(self, spec: "SpecFields", logits: torch.Tensor) -> torch.Tensor:
        """Logits -> probabilities, same shape."""
        return torch.softmax(logits, dim=-1)

    def loss_parts(
        self, spec: "SpecFields", logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss as ``(sums, denominators)``, each a (P,) tensor of P parts.

        The head's loss is the mean over parts with a non-zero denominator of ``sums / denominators``.
        Sums and denominators add up across micro-batches and workers, so the loss of a large
        batch can be rebuilt exactly from its pieces (gradient accumulation, DDP).
        """
        raise NotImplementedError

    def collate(self, spec: "SpecFields", rows: np.ndarray) -> torch.Tensor:
        """Stacked encoded labels (N, width) -> the tensor layout :meth:`loss_parts` takes."""
        return torch.as_tensor(rows.astype(np.float32)).reshape(len(rows), -1).long().reshape(-1)

    # ---------------------------------------------------------------- labels
    def encode(self, spec: "SpecFields", values: Sequence[Any], on_unknown: str, first_row: int) -> np.ndarray:
        """Raw label values -> the encoded layout (single-choice kinds: (N,) label index)."""
        index = {name: i for i, name in enumerate(spec.labels)}
        out = np.full(len(values), IGNORE_INDEX, dtype=np.int64)
        for i, v in enumerate(values):
            if not is_missing(v):
                out[i] = self.index_label(spec, index, v, i + first_row, on_unknown)
        return out

    def decode_labels(self, spec: "SpecFields", encoded: np.ndarray) -> list[Any]:
        """Inverse of :meth:`encode`."""
        return [spec.labels[j] if j >= 0 else None for j in np.asarray(encoded).reshape(-1).tolist()]

    def infer_labels(self, values: Sequence[Any]) -> tuple[set[str], list[str]]:
        """Label names (and group names, in order of appearance) seen in a label column."""
        return {str(v) for v in values if not is_missing(v)}, []

    def label_counts(self, spec: "SpecFields", encoded: np.ndarray) -> tuple[list[int], int]:
        """Per-label counts and labelled rows (or decisions), for ``"balanced"`` weights."""
        y = encoded[encoded >= 0]
        return [int((y == k).sum()) for k in range(spec.num_labels)], int(len(y))

    def index_label(self, spec: "SpecFields", index: dict[str, int], value: Any, row: int, on_unknown: str) -> int:
        """One label name -> its index, or ``INVALID_LABEL`` / :class:`LabelError` when unknown."""
        key = as_label_key(value)
        if key is not None and key in index:
            return index[key]
        if on_unknown == "mark":
            return INVALID_LABEL
        raise LabelError(f"head {spec.name!r}: row {row}: label {value!r} is not one of {spec.labels}")

    # ---------------------------------------------------------------- decisions and columns
    def predict(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        """Decisions as label indices: (N,) by default."""
        return probs.argmax(axis=-1).astype(np.int64)

    def output_columns(self, spec: "SpecFields") -> list[tuple[str, pa.DataType]]:
        """The (column, Arrow type) pairs this head adds to an output table, in order."""
        h = spec.name
        return [(f"{h}_label", pa.string()), (f"{h}_score", pa.float32()), (f"{h}_probs", pa.list_(pa.float32()))]

    def full_probabilities(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        """Probabilities as written to ``<head>_probs`` (binary adds the negative class)."""
        return probs

    def decode(self, spec: "SpecFields", probs: np.ndarray) -> dict[str, pa.Array]:
        """Probabilities -> this head's output columns as Arrow arrays, vectorised."""
        h = spec.name
        full = self.full_probabilities(spec, np.asarray(probs, dtype=np.float32))
        idx = self.predict(spec, probs)
        return {
            f"{h}_label": string_column(spec.labels, idx),
            f"{h}_score": pa.array(np.take_along_axis(full, idx[:, None], axis=1)[:, 0]),
            f"{h}_probs": list_column(full, full.shape[1]),
        }

    def probabilities_from_columns(self, spec: "SpecFields", table: pa.Table) -> np.ndarray:
        """Reads ``<head>_probs`` of a scoring output back into model-shaped probabilities."""
        return float_rows(table.column(f"{spec.name}_probs"), spec.num_labels)

    # ---------------------------------------------------------------- evaluation
    def empty_statistics(self, spec: "SpecFields") -> Stats:
        """Zero statistics: the identity of merging."""
        k = spec.num_labels
        return {"confusion": zeros(k, k), "unlabelled": zeros(), "invalid": zeros()}

    def statistics(self, spec: "SpecFields", labels: np.ndarray, probs: np.ndarray) -> Stats:
        """Counts for one shard (single-choice kinds: a confusion matrix)."""
        stats = self.empty_statistics(spec)
        y = np.asarray(labels).astype(np.int64).reshape(-1)
        pred = self.predict(spec, probs)
        ok = y >= 0
        stats["confusion"] += confusion(y[ok], pred[ok], spec.num_labels)
        stats["unlabelled"] += int((y == IGNORE_INDEX).sum())
        stats["invalid"] += int(((y < 0) & (y != IGNORE_INDEX)).sum())
        return stats

    def report(self, spec: "SpecFields", stats: Stats) -> dict[str, Any]:
        """Every metric of the kind from merged statistics; ``macro`` holds the headline averages."""
        rep = confusion_report(stats["confusion"], list(spec.labels))
        rep.update(rows_labelled=int(stats["confusion"].sum()), rows_unlabelled=int(stats["unlabelled"]),
                   rows_invalid=int(stats["invalid"]))
        return rep

    def markdown(self, name: str, rep: dict[str, Any]) -> list[str]:
        """The head's section of ``report.md``."""
        from mtcls.report_text import class_table, confusion_table, pct

        return [f"- Accuracy: {pct(rep['accuracy'])}", f"- Macro F1: {pct(rep['macro']['f1'])}", rows_line(rep),
                "", "Classification report:", "", *class_table(rep), "", "Confusion matrix:", "",
                *confusion_table(rep["labels"], rep["confusion_matrix"])]

    def plot_matrix(self, rep: dict[str, Any]) -> tuple[np.ndarray, list[str], list[str], str, str]:
        """(matrix, row names, column names, row axis label, title suffix) for the report PNG."""
        return np.array(rep["confusion_matrix"]), rep["labels"], rep["labels"], "true", ""

    # ---------------------------------------------------------------- calibration
    def calibration_nll(self, spec: "SpecFields", logits: torch.Tensor, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood of the labelled entries and their count, for temperature fitting.

        The kind's own likelihood (softmax cross-entropy here, per group for grouped heads),
        unweighted: no class or positive weights. Missing and invalid labels are left out.
        """
        y = self.collate(spec, np.asarray(labels)).to(logits.device)
        y = torch.where(y < 0, torch.full_like(y, IGNORE_INDEX), y)
        sums, denominators = self.loss_parts(spec, logits, y, None)
        return sums.sum(), denominators.sum()

    @property
    def offsettable(self) -> bool:
        """Whether a calibration may carry a ``logit_offset``: kinds weighted by ``pos_weight``
        (independent sigmoids decided by thresholds, which :func:`mtcls.calibration.calibrate_spec`
        maps, so an offset never changes a decision)."""
        return self.weight_field == "pos_weight"

    def prior_offset(self, spec: "SpecFields") -> Optional[list[float]]:
        """Per logit, ``log(pos_weight)``: the shift a weighted BCE trains into the logits, which
        calibration subtracts. None without positive weights (or all 1), or for other kinds."""
        w = spec.pos_weight if self.offsettable else None
        if w is None or isinstance(w, str):
            return None
        w = np.broadcast_to(np.asarray(w, np.float64), (self.num_logits(spec),))
        return None if np.all(w == 1.0) else [float(v) for v in np.log(w)]

    def reliability(self, spec: "SpecFields", probs: np.ndarray, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(confidence, outcome)]`` pairs whose calibration error is measured (and averaged).

        Single-choice kinds: one pair, the top-label probability of every labelled decision (every
        labelled group of every row for grouped heads) and whether that label is the true one.
        """
        p = np.asarray(probs, dtype=np.float64).reshape(-1, spec.num_labels)
        y = np.asarray(labels).astype(np.int64).reshape(-1)
        ok = y >= 0
        return [(p.max(axis=1)[ok], (p.argmax(axis=1) == y)[ok].astype(np.float64))]


    # ---------------------------------------------------------------- prediction profile (drift)
    def prediction_mix(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        """Counts of the decisions taken on ``probs``: rows per predicted label, (K,) here."""
        return np.bincount(self.predict(spec, probs), minlength=spec.num_labels).astype(np.int64)

    def decision_scores(self, spec: "SpecFields", probs: np.ndarray) -> np.ndarray:
        """The score of every decision (flat): the probability of the predicted label (``<head>_score``)."""
        full = self.full_probabilities(spec, np.asarray(probs, dtype=np.float64))
        return np.take_along_axis(full, self.predict(spec, probs)[:, None], axis=1)[:, 0]

    def mix_distributions(self, spec: "SpecFields", mix: np.ndarray, rows: int) -> dict[str, np.ndarray]:
        """Merged ``prediction_mix`` counts -> the distributions drift compares, by part name.

        Single-choice kinds: one part (``""``), the share of rows per predicted label.
        """
        return {"": divide(mix, rows)}

    def mix_summary(self, spec: "SpecFields", mix: np.ndarray, rows: int) -> dict[str, Any]:
        """The prediction mix for people: ``{label: share of rows}`` here."""
        return {label: round(float(v), 6) for label, v in zip(spec.labels, divide(mix, rows))}


def per_label_reliability(probs: np.ndarray, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sigmoid kinds' :meth:`HeadKind.reliability`: per label, the positive-class probability of
    every labelled entry and whether the label is present (negative label values are left out)."""
    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    p = np.asarray(probs, dtype=np.float64).reshape(len(labels), -1)
    return [(p[y[:, j] >= 0, j], (y[y[:, j] >= 0, j] > 0.5).astype(np.float64)) for j in range(p.shape[1])]


def rows_line(rep: dict[str, Any]) -> str:
    return (f"- Rows labelled: {rep['rows_labelled']}, without label: {rep['rows_unlabelled']}, "
            f"label outside the head's set: {rep['rows_invalid']}")


def mean_of_parts(sums: torch.Tensor, denominators: torch.Tensor) -> torch.Tensor:
    """The loss from :meth:`HeadKind.loss_parts`: mean of ``sums / denominators`` over non-empty parts.

    A head without any labelled part gives a zero that stays connected to the graph, so DDP sees a
    gradient for every parameter.
    """
    present = denominators > 0
    if not bool(present.any()):
        return sums.sum() * 0.0
    return (sums[present] / denominators[present]).mean()
