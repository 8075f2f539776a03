"""Training's precision rule: which autocast dtype a training forward pass uses, and loss scaling.

One home for the rule, read by the training loop and by the feature cache (training features are
computed under the same autocast as an uncached epoch would run the encoder).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from mtcls.precision import cpu_native_bf16

log = logging.getLogger(__name__)


def training_autocast(precision: str, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """Training's precision rule: ``(autocast dtype or None, use a loss scaler)``.

    On a GPU, ``auto`` is bf16 where supported, else fp16 with loss scaling. On a CPU, ``auto`` is
    bf16 where the CPU has native bf16 (measured on OLID: same test macro-F1 as fp32, 1.4x faster;
    benchmarks/RESULTS.md), else fp32; ``bf16`` autocasts; fp16 has no fast CPU path and trains fp32.

    Args:
        precision: The training job's ``precision`` key (``auto``, ``fp32``, ``bf16`` or ``fp16``).
        device: Where the training forward pass runs.

    Returns:
        The autocast dtype (None: full precision) and whether gradients need a loss scaler.
    """
    if precision == "fp32":
        return None, False
    if device.type != "cuda":
        if precision == "fp16":
            log.warning("precision fp16 has no CPU training path: training in fp32")
        if precision == "bf16" or (precision == "auto" and cpu_native_bf16()):
            return torch.bfloat16, False
        return None, False
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True
