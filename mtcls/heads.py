"""Head specifications: what each classification head predicts and how it is trained.

A head is described by a :class:`HeadSpec`. Specs are plain data (they round-trip through
``to_dict``/``from_dict`` and live inside the model config), and they are validated when built,
so a bad spec fails before a model is constructed, with a message naming the head and field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

HEAD_KINDS = ("binary", "multiclass", "multilabel", "grouped", "distribution")
ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
# Head and group names become Parquet column names, so they must be plain identifiers.
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class HeadSpecError(ValueError):
    """A head specification is invalid; the message names the head, the field and the value."""


def _fail(head: str, field_name: str, message: str) -> None:
    raise HeadSpecError(f"head {head!r}: field {field_name!r}: {message}")


def _check_names(head: str, field_name: str, names: Any, what: str) -> list[str]:
    if not isinstance(names, (list, tuple)) or not names:
        _fail(head, field_name, f"must be a non-empty list of {what} names, got {names!r}")
    out = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            _fail(head, field_name, f"{what} names must be non-empty strings, got {name!r}")
        out.append(name)
    seen = set()
    for name in out:
        if name in seen:
            _fail(head, field_name, f"duplicate {what} name {name!r}")
        seen.add(name)
    return out


def _check_probability(head: str, field_name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        _fail(head, field_name, f"must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _check_positive_list(head: str, field_name: str, values: Any, n: int) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        _fail(head, field_name, f"must be a list of {n} positive numbers (one per label), got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            _fail(head, field_name, f"must hold positive finite numbers, got {v!r}")
        out.append(float(v))
    return out


BALANCED = ("balanced", "sqrt_balanced")


@dataclass
class HeadSpec:
    """One classification head on the shared encoder.

    Args:
        name: Head name; an identifier (letters, digits, ``_``), used as the column prefix in outputs.
        kind: One of ``binary``, ``multiclass``, ``multilabel``, ``grouped``, ``distribution``.
        labels: Label names. ``binary``: exactly two, negative first (``["NOT", "OFF"]``).
            ``grouped``: the K classes every group chooses from.
        groups: ``grouped`` only: the G group names (e.g. 12 topics, each a 4-way sentiment choice).
        hidden_sizes: Sizes of an optional MLP between the pooled features and the output layer
            (card 004 uses ``[256]``). Empty means a single linear layer.
        activation: MLP activation, one of ``relu``, ``gelu``, ``tanh``, ``silu``.
        dropout: Dropout applied to the head input and after each hidden layer.
        loss_weight: Weight of this head's loss in the total loss.
        class_weights: ``multiclass``/``grouped``: one weight per label, or ``"balanced"`` /
            ``"sqrt_balanced"`` to be resolved from label counts with :meth:`resolve_balanced`
            before training.
        pos_weight: ``binary``: one number; ``multilabel``: one per label; or ``"balanced"``
            (negatives / positives per label) or ``"sqrt_balanced"`` (its square root: milder for
            very rare labels, e.g. about 22 instead of 500 for a label on 0.2% of rows).
        thresholds: ``binary``: the positive-class decision threshold; ``multilabel``: one per
            label or a single number for all. Values strictly in (0, 1). Default 0.5.
        cumulative_threshold: ``distribution`` only: predict the smallest set of labels whose
            cumulative probability reaches this value (card 004). Default 0.9.
        inputs_from: Names of earlier heads whose probabilities are concatenated to this head's
            input (card 000's "residual type fusion").
    """

    name: str
    kind: str
    labels: list[str]
    groups: Optional[list[str]] = None
    hidden_sizes: list[int] = field(default_factory=list)
    activation: str = "relu"
    dropout: float = 0.1
    loss_weight: float = 1.0
    class_weights: Union[None, str, list[float]] = None
    pos_weight: Union[None, str, float, list[float]] = None
    thresholds: Union[None, float, list[float]] = None
    cumulative_threshold: Optional[float] = None
    inputs_from: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise HeadSpecError(
                f"head name {name!r} is invalid: use letters, digits and '_', starting with a letter"
            )
        if self.kind not in HEAD_KINDS:
            _fail(name, "kind", f"unknown head kind {self.kind!r}; expected one of {list(HEAD_KINDS)}")
        self.labels = _check_names(name, "labels", self.labels, "label")
        if self.kind == "binary" and len(self.labels) != 2:
            _fail(name, "labels", f"a binary head has exactly 2 labels (negative, positive), got {self.labels}")
        if self.kind in ("multiclass", "grouped", "distribution") and len(self.labels) < 2:
            _fail(name, "labels", f"a {self.kind} head needs at least 2 labels, got {self.labels}")
        if self.kind == "grouped":
            self.groups = _check_names(name, "groups", self.groups, "group")
            for g in self.groups:
                if not _NAME_RE.match(g):
                    _fail(name, "groups", f"group name {g!r} must be an identifier (it names output columns)")
        elif self.groups is not None:
            _fail(name, "groups", f"only grouped heads have groups (this head is {self.kind})")
        self._validate_mlp()
        self._validate_weights()
        self._validate_thresholds()
        if not isinstance(self.inputs_from, (list, tuple)) or not all(isinstance(s, str) for s in self.inputs_from):
            _fail(name, "inputs_from", f"must be a list of head names, got {self.inputs_from!r}")
        if name in self.inputs_from:
            _fail(name, "inputs_from", "a head cannot take its own output as input")
        self.inputs_from = list(self.inputs_from)

    def _validate_mlp(self) -> None:
        if not isinstance(self.hidden_sizes, (list, tuple)) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in self.hidden_sizes
        ):
            _fail(self.name, "hidden_sizes", f"must be a list of positive integers, got {self.hidden_sizes!r}")
        self.hidden_sizes = list(self.hidden_sizes)
        if self.activation not in ACTIVATIONS:
            _fail(self.name, "activation", f"unknown activation {self.activation!r}; expected one of {list(ACTIVATIONS)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            _fail(self.name, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.loss_weight, bool) or not isinstance(self.loss_weight, (int, float)) or not (
            self.loss_weight >= 0 and math.isfinite(self.loss_weight)
        ):
            _fail(self.name, "loss_weight", f"must be a non-negative number, got {self.loss_weight!r}")

    def _validate_weights(self) -> None:
        name, kind = self.name, self.kind
        if self.class_weights is not None:
            if kind not in ("multiclass", "grouped"):
                _fail(name, "class_weights", f"applies to multiclass and grouped heads; use pos_weight for {kind}")
            if self.class_weights not in BALANCED:
                self.class_weights = _check_positive_list(name, "class_weights", self.class_weights, len(self.labels))
        if self.pos_weight is not None:
            if kind not in ("binary", "multilabel"):
                _fail(name, "pos_weight", f"applies to binary and multilabel heads; use class_weights for {kind}")
            if self.pos_weight in BALANCED:
                pass
            elif kind == "binary":
                self.pos_weight = _check_positive_list(name, "pos_weight", [self.pos_weight], 1)[0]
            else:
                self.pos_weight = _check_positive_list(name, "pos_weight", self.pos_weight, len(self.labels))

    def _validate_thresholds(self) -> None:
        name, kind = self.name, self.kind
        if self.thresholds is not None:
            if kind == "binary":
                self.thresholds = _check_probability(name, "thresholds", self.thresholds)
            elif kind == "multilabel":
                if isinstance(self.thresholds, (list, tuple)):
                    if len(self.thresholds) != len(self.labels):
                        _fail(name, "thresholds", f"needs one threshold per label ({len(self.labels)}), got {len(self.thresholds)}")
                    self.thresholds = [_check_probability(name, "thresholds", t) for t in self.thresholds]
                else:
                    self.thresholds = _check_probability(name, "thresholds", self.thresholds)
            else:
                _fail(name, "thresholds", f"applies to binary and multilabel heads, not {kind}")
        if self.cumulative_threshold is not None:
            if kind != "distribution":
                _fail(name, "cumulative_threshold", f"applies to distribution heads, not {kind}")
            self.cumulative_threshold = _check_probability(name, "cumulative_threshold", self.cumulative_threshold)
            # 1.0 itself would always select every label, so (0, 1) is the useful range.

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def num_groups(self) -> int:
        return len(self.groups) if self.groups else 0

    @property
    def num_logits(self) -> int:
        """Width of the head's output layer."""
        if self.kind == "binary":
            return 1
        if self.kind == "grouped":
            return self.num_groups * self.num_labels
        return self.num_labels

    @property
    def num_probs(self) -> int:
        """Width of the probability vector other heads receive through ``inputs_from``."""
        return self.num_logits

    def label_thresholds(self) -> list[float]:
        """Per-label decision thresholds (binary: one value; multilabel: one per label)."""
        t = 0.5 if self.thresholds is None else self.thresholds
        if self.kind == "multilabel":
            return list(t) if isinstance(t, list) else [float(t)] * self.num_labels
        return [float(t)]

    def resolve_balanced(self, counts: list[int], total: int) -> "HeadSpec":
        """Turns ``"balanced"`` class or positive weights into numbers from label counts.

        Args:
            counts: Per-label counts of positive (multilabel/binary) or true (multiclass/grouped)
                labels in the training data, in label order. Binary heads pass ``[n_neg, n_pos]``.
            total: Number of labelled rows (multilabel/binary) or labelled decisions (grouped).

        Returns:
            A copy of this spec with explicit weights. Weights of labels never seen are 1.0.
        """
        spec = dataclasses.replace(self)
        if self.class_weights in BALANCED:
            k = self.num_labels
            weights = [float(total) / (k * c) if c > 0 else 1.0 for c in counts]
            spec.class_weights = [w ** 0.5 for w in weights] if self.class_weights == "sqrt_balanced" else weights
        if self.pos_weight in BALANCED:
            if self.kind == "binary":
                neg, pos = counts
                weights = [float(neg) / pos if pos > 0 and neg > 0 else 1.0]
            else:
                weights = [float(total - c) / c if 0 < c < total else 1.0 for c in counts]
            if self.pos_weight == "sqrt_balanced":
                weights = [w ** 0.5 for w in weights]
            spec.pos_weight = weights[0] if self.kind == "binary" else weights
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadSpec":
        """Builds a spec from a plain mapping, rejecting unknown keys by name."""
        if not isinstance(data, dict):
            raise HeadSpecError(f"a head spec must be a mapping, got {type(data).__name__}: {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        head = data.get("name", "<unnamed>")
        unknown = sorted(set(data) - known)
        if unknown:
            raise HeadSpecError(f"head {head!r}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        missing = [k for k in ("name", "kind", "labels") if k not in data]
        if missing:
            raise HeadSpecError(f"head {head!r}: missing required field(s) {missing}")
        return cls(**data)


def validate_heads(heads: list[HeadSpec]) -> list[HeadSpec]:
    """Checks a list of heads as a whole: unique names, ``inputs_from`` pointing to earlier heads.

    Args:
        heads: Head specs in the order the model evaluates them.

    Returns:
        The same list.

    Raises:
        HeadSpecError: On a duplicate head name or an ``inputs_from`` that names an unknown or later head.
    """
    if not heads:
        raise HeadSpecError("a model needs at least one head")
    seen: list[str] = []
    for spec in heads:
        if spec.name in seen:
            raise HeadSpecError(f"duplicate head name {spec.name!r}")
        for src in spec.inputs_from:
            if src not in seen:
                where = "a later head" if any(h.name == src for h in heads) else "not a head of this model"
                raise HeadSpecError(
                    f"head {spec.name!r}: field 'inputs_from': {src!r} is {where}; "
                    "a head can only read heads listed before it"
                )
        seen.append(spec.name)
    return heads
