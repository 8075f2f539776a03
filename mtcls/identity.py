"""What identifies an encoder's output: its weights and config (heads excluded), its pooling and token limit.

Two encoders have the same identity when they compute the same function of the token ids: the same
parameters and buffers (names, dtypes, bytes) and the same config fields that take part in the
computation (activation, ``layer_norm_eps``, layer and head counts, ``pad_token_id`` ...). Fields
that only record provenance or serve other model classes are left out
(:data:`NON_COMPUTING_CONFIG_FIELDS`), so a model saved and reloaded, or built with
``MultiTaskModel.from_encoder``, keeps its identity.

Library versions (torch, transformers, onnxruntime) are not part of the identity: it says what the
vectors mean, and a new torch changes them by float rounding at most, while a check that failed on
every upgrade would be switched off. Build artifacts whose bytes depend on those versions (the int8
export, :mod:`mtcls.quantize`) add them to their own cache key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from mtcls.modeling import MultiTaskModel

#: Encoder config fields that do not change what the encoder computes from token ids at inference:
#: provenance (where it came from, which transformers wrote it, which class to load it as), the
#: dtype (the weights hash covers every tensor's dtype), fields only Hugging Face's task heads and
#: pipelines read (mtcls never builds those), weight initialisation (the weights are hashed), and
#: flags that choose what the forward pass returns, not its values. Every field starting with
#: ``_`` (internal state such as ``_name_or_path`` or ``_attn_implementation``, a kernel choice for
#: the same function) is left out as well. Dropout rates stay in: they act in training mode.
NON_COMPUTING_CONFIG_FIELDS = frozenset({
    "name_or_path", "transformers_version", "architectures",
    "dtype", "torch_dtype",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params",
    "classifier_dropout", "tokenizer_class", "prefix",
    "initializer_range",
    "return_dict", "output_hidden_states", "output_attentions", "use_cache",
})


def encoder_weights_sha256(model: MultiTaskModel) -> str:
    """sha256 over the encoder's parameters and buffers (names and bytes), heads excluded.

    Two models with the same encoder weights (for example one with a head added) hash the same.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_config_fields(model: MultiTaskModel) -> dict[str, Any]:
    """The encoder's config (``config.to_dict()``) without :data:`NON_COMPUTING_CONFIG_FIELDS` and ``_`` fields."""
    return {k: v for k, v in sorted(model.encoder.config.to_dict().items())
            if k not in NON_COMPUTING_CONFIG_FIELDS and not k.startswith("_")}


def encoder_config_sha256(model: MultiTaskModel) -> str:
    """sha256 of :func:`encoder_config_fields` as canonical JSON (sorted keys)."""
    text = json.dumps(encoder_config_fields(model), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def encoder_identity(model: MultiTaskModel) -> dict[str, Any]:
    """What makes pooled features comparable: the encoder's weights and config, the pooling, the max length.

    Returns:
        ``encoder_sha256`` (sha256 over the weights hash and the config hash: what checks compare),
        the two parts ``weights_sha256`` and ``config_sha256`` (to tell which one differs),
        ``pooling`` and ``max_length``. A new head changes none of them.
    """
    weights, config = encoder_weights_sha256(model), encoder_config_sha256(model)
    combined = hashlib.sha256(json.dumps({"weights": weights, "config": config}, sort_keys=True).encode()).hexdigest()
    return {"encoder_sha256": combined, "weights_sha256": weights, "config_sha256": config,
            "pooling": model.config.pooling, "max_length": model.config.max_seq_length}
