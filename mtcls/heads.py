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

from mtcls.kinds import HeadKind, get_kind, kind_names
from mtcls.spec_checks import HeadSpecError, check_names, fail

ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
# Head and group names become Parquet column names, so they must be plain identifiers.
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


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
            (e.g. ``[256]``). Empty means a single linear layer.
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
            cumulative probability reaches this value. Default 0.9.
        inputs_from: Names of earlier heads whose probabilities are concatenated to this head's
            input (one head's output feeding another: "residual type fusion").
        temperature: Calibration temperature, a number > 0: the scores a model outputs are the
            kind's probabilities of ``logits / temperature`` (see :mod:`mtcls.calibration`).
            None (default): uncalibrated. Training fits it on the validation set
            (``calibrate``); it never changes what ``inputs_from`` fusion receives.
        logit_offset: Binary and multilabel heads with a ``temperature``: per logit, a number
            subtracted from the logit before the temperature (training sets ``log(pos_weight)``,
            undoing the shift a positive weight trains into the logits). None: no offset.
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
    temperature: Optional[float] = None
    logit_offset: Optional[list[float]] = None

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise HeadSpecError(
                f"head name {name!r} is invalid: use letters, digits and '_', starting with a letter",
                None, "name")
        if self.kind not in kind_names():
            fail(name, "kind", f"unknown head kind {self.kind!r}; expected one of {kind_names()}")
        kind = self.impl
        self.labels = check_names(name, "labels", self.labels, "label")
        if kind.has_groups:
            self.groups = check_names(name, "groups", self.groups, "group")
            for g in self.groups:
                if not _NAME_RE.match(g):
                    fail(name, "groups", f"group name {g!r} must be an identifier (it names output columns)")
        elif self.groups is not None:
            fail(name, "groups", f"only grouped heads have groups (this head is {self.kind})")
        self._validate_mlp()
        self._validate_kind_fields(kind)
        kind.validate(self, lambda field_name, message: fail(name, field_name, message))
        if not isinstance(self.inputs_from, (list, tuple)) or not all(isinstance(s, str) for s in self.inputs_from):
            fail(name, "inputs_from", f"must be a list of head names, got {self.inputs_from!r}")
        if name in self.inputs_from:
            fail(name, "inputs_from", "a head cannot take its own output as input")
        self.inputs_from = list(self.inputs_from)
        if self.temperature is not None:
            t = self.temperature
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
                fail(name, "temperature", f"must be a positive finite number (or null for uncalibrated), got {t!r}")
            if not self.impl.calibratable:
                users = [k for k in kind_names() if get_kind(k).calibratable]
                fail(name, "temperature", f"applies to {', '.join(users)} heads, not {self.kind}")
            self.temperature = float(t)
        if self.logit_offset is not None:
            self._validate_offset()

    def _validate_offset(self) -> None:
        offset = self.logit_offset
        if not self.impl.offsettable:
            users = [k for k in kind_names() if get_kind(k).offsettable]
            fail(self.name, "logit_offset", f"applies to {' and '.join(users)} heads, not {self.kind}")
        if self.temperature is None:
            fail(self.name, "logit_offset", "is part of a calibration: it needs a temperature")
        if not isinstance(offset, (list, tuple)) or len(offset) != self.num_logits or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in offset
        ):
            fail(self.name, "logit_offset", f"must be a list of {self.num_logits} finite numbers (one per logit), got {offset!r}")
        self.logit_offset = [float(v) for v in offset]

    @property
    def impl(self) -> HeadKind:
        """The head's kind (its logits, loss, labels, decoding, statistics): see :mod:`mtcls.kinds`."""
        return get_kind(self.kind)

    def _validate_mlp(self) -> None:
        if not isinstance(self.hidden_sizes, (list, tuple)) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in self.hidden_sizes
        ):
            fail(self.name, "hidden_sizes", f"must be a list of positive integers, got {self.hidden_sizes!r}")
        self.hidden_sizes = list(self.hidden_sizes)
        if self.activation not in ACTIVATIONS:
            fail(self.name, "activation", f"unknown activation {self.activation!r}; expected one of {list(ACTIVATIONS)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            fail(self.name, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.loss_weight, bool) or not isinstance(self.loss_weight, (int, float)) or not (
            self.loss_weight >= 0 and math.isfinite(self.loss_weight)
        ):
            fail(self.name, "loss_weight", f"must be a non-negative number, got {self.loss_weight!r}")

    def _validate_kind_fields(self, kind: HeadKind) -> None:
        # Weight and threshold fields exist on every spec; each kind accepts only its own.
        for field_name in ("class_weights", "pos_weight"):
            value = getattr(self, field_name)
            if value is None:
                continue
            if kind.weight_field != field_name:
                users = [k for k in kind_names() if get_kind(k).weight_field == field_name]
                instead = f"; use {kind.weight_field} for {self.kind}" if kind.weight_field else ""
                fail(self.name, field_name, f"applies to {' and '.join(users)} heads{instead}")
            if value not in BALANCED:
                setattr(self, field_name, kind.check_weights(self, value))
        for field_name in ("thresholds", "cumulative_threshold"):
            if getattr(self, field_name) is not None and field_name not in kind.own_fields:
                users = [k for k in kind_names() if field_name in get_kind(k).own_fields]
                fail(self.name, field_name, f"applies to {' and '.join(users)} heads, not {self.kind}")

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
        return self.impl.num_logits(self)

    @property
    def num_probs(self) -> int:
        """Width of the probability vector other heads receive through ``inputs_from``."""
        return self.num_logits

    def label_thresholds(self) -> list[float]:
        """Per-label decision thresholds of a tunable kind (binary: one value; multilabel: one per label)."""
        return self.impl.thresholds(self)

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
        for field_name in ("class_weights", "pos_weight"):
            value = getattr(self, field_name)
            if value in BALANCED:
                setattr(spec, field_name, self.impl.resolve_weights(self, counts, total, sqrt=value == "sqrt_balanced"))
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
