"""The precision policy: which dtype a forward pass runs in, and why.

One rule for scoring, evaluation and notebooks (training has its own, with loss scaling):

- ``fp32``: no autocast.
- ``bf16`` / ``fp16``: autocast to that dtype on the model's device.
- ``auto``: on a GPU, bf16 where the GPU supports it, else fp16; on a CPU, fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the name used, the autocast dtype (None = fp32) and the reason."""

    name: str
    autocast_dtype: Optional[torch.dtype]
    reason: str


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Applies the policy in the module docstring.

    Args:
        precision: One of :data:`PRECISIONS`.
        device: Where the model runs.

    Raises:
        ValueError: On an unknown precision, naming the choices.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return Precision(precision, _DTYPES.get(precision), "set in the config")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, "auto: the GPU supports bf16")
        return Precision("fp16", torch.float16, "auto: the GPU lacks bf16")
    return Precision("fp32", None, f"auto: fp32 on {device.type}")
