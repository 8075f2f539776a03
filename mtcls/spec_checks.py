"""Field checks of head specs, shared by :mod:`mtcls.heads` and the head kinds.

A module of its own, importing nothing from the project, so that the kinds (which validate their
own fields) never import :mod:`mtcls.heads`, which looks kinds up by name.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn


class HeadSpecError(ValueError):
    """A head specification is invalid; the message names the head, the field and the value.

    Attributes:
        head: The head's name, where one field of one head is wrong (else None).
        field: That field (``name`` for an invalid name; else None).
        detail: What is wrong with it, without the head and field (else the whole message).
    """

    def __init__(self, message: str, head: str | None = None, field: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.head, self.field, self.detail = head, field, detail if detail is not None else message


def fail(head: str, field_name: str, message: str) -> NoReturn:
    """Raises a :class:`HeadSpecError` naming the head and the field."""
    raise HeadSpecError(f"head {head!r}: field {field_name!r}: {message}", head, field_name, message)


def check_names(head: str, field_name: str, names: Any, what: str) -> list[str]:
    """A non-empty list of distinct non-empty strings, or a :class:`HeadSpecError` naming the head and field."""
    if not isinstance(names, (list, tuple)) or not names:
        fail(head, field_name, f"must be a non-empty list of {what} names, got {names!r}")
    out = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            fail(head, field_name, f"{what} names must be non-empty strings, got {name!r}")
        out.append(name)
    seen = set()
    for name in out:
        if name in seen:
            fail(head, field_name, f"duplicate {what} name {name!r}")
        seen.add(name)
    return out


def check_probability(head: str, field_name: str, value: Any) -> float:
    """A number strictly inside (0, 1), or a :class:`HeadSpecError` naming the head and field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        fail(head, field_name, f"must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def check_positive_list(head: str, field_name: str, values: Any, n: int) -> list[float]:
    """``n`` positive finite numbers, or a :class:`HeadSpecError` naming the head and field."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        fail(head, field_name, f"must be a list of {n} positive numbers (one per label), got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            fail(head, field_name, f"must hold positive finite numbers, got {v!r}")
        out.append(float(v))
    return out
