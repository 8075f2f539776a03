"""What identifies an encoder's output: a hash of its weights alone, its pooling and its token limit."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from mtcls.modeling import MultiTaskModel


def encoder_weights_sha256(model: MultiTaskModel) -> str:
    """sha256 over the encoder's parameters and buffers (names and bytes), heads excluded.

    Two models with the same encoder weights (for example one with a head added) hash the same, so
    features computed by one are valid for the other.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_identity(model: MultiTaskModel) -> dict[str, Any]:
    """The encoder's weights hash, pooling and max length: what makes pooled features comparable."""
    return {"encoder_sha256": encoder_weights_sha256(model), "pooling": model.config.pooling,
            "max_length": model.config.max_seq_length}
