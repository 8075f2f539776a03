"""The precision policy: which dtype a forward pass runs in, and why.

One rule for scoring, evaluation and notebooks (training has its own, with loss scaling):

- ``fp32``: no autocast.
- ``bf16`` / ``fp16``: autocast to that dtype on the model's device. bf16 on a CPU without native
  bf16 instructions runs, but is emulated and slow: a warning says so.
- ``int8``: CPU only. The encoder's linear layers run as dynamically quantized int8 (see
  :mod:`mtcls.quantize`); the heads stay fp32.
- ``auto``: on a GPU, bf16 where the GPU supports it, else fp16; on a CPU, bf16 where the CPU has
  native bf16 instructions (AVX512_BF16 or AMX-BF16), else fp32. ``auto`` never picks int8.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: CPU flags (as /proc/cpuinfo names them) that give native bf16 matrix math.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    """A resolved precision.

    Attributes:
        name: ``fp32``, ``bf16``, ``fp16`` or ``int8``.
        autocast_dtype: The autocast dtype, None for no autocast (fp32 and int8).
        reason: Why this precision was used (recorded in manifests and reports).
    """

    name: str
    autocast_dtype: Optional[torch.dtype]
    reason: str

    @property
    def quantized(self) -> bool:
        """Whether the encoder runs int8."""
        return self.name == "int8"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (empty where they cannot be read)."""
    if platform.system() != "Linux":
        return frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_native_bf16() -> Optional[str]:
    """The first CPU flag that gives native bf16 (see :data:`BF16_CPU_FLAGS`), or None."""
    flags = cpu_flags()
    return next((f for f in BF16_CPU_FLAGS if f in flags), None)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Applies the policy in the module docstring.

    Args:
        precision: One of :data:`PRECISIONS`.
        device: Where the model runs.

    Raises:
        ValueError: On an unknown precision, naming the choices, or int8 on a GPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    cuda = device.type == "cuda"
    if precision == "int8":
        if cuda:
            raise ValueError("precision 'int8' is a CPU path; on a GPU use 'auto' (bf16/fp16)")
        return Precision("int8", None, "set in the config: dynamically quantized int8 encoder")
    if precision != "auto":
        if precision == "bf16" and not cuda and cpu_native_bf16() is None:
            log.warning("precision bf16 on a CPU without native bf16 (none of %s): it runs emulated and slower than fp32",
                        ", ".join(BF16_CPU_FLAGS))
            return Precision("bf16", torch.bfloat16, "set in the config (CPU without native bf16: emulated)")
        return Precision(precision, _DTYPES.get(precision), "set in the config")
    if cuda:
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, "auto: the GPU supports bf16")
        return Precision("fp16", torch.float16, "auto: the GPU lacks bf16")
    flag = cpu_native_bf16()
    if device.type == "cpu" and flag:
        return Precision("bf16", torch.bfloat16, f"auto: the CPU has native bf16 ({flag})")
    return Precision("fp32", None, f"auto: fp32 on {device.type} (no native bf16 instructions)")


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


def training_precision_name(precision: str, device: torch.device) -> str:
    """The inference precision (``fp32``, ``bf16``, ``fp16``) that runs a forward pass as training's rule would."""
    dtype, _ = training_autocast(precision, device)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
