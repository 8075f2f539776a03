"""Head kinds: one class per kind behind one interface (:class:`HeadKind`), looked up by name."""

from mtcls.kinds.base import (
    IGNORE_INDEX, INVALID_LABEL, HeadKind, LabelError, get_kind, kind_names, mean_of_parts, register_kind,
    unregister_kind,
)
from mtcls.kinds import binary, multiclass, multilabel, grouped, distribution  # noqa: F401,E402  (registers them)

__all__ = ["IGNORE_INDEX", "INVALID_LABEL", "HeadKind", "LabelError", "get_kind", "kind_names", "mean_of_parts",
           "register_kind", "unregister_kind"]
