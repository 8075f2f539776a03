"""Batched inference without Ray: texts -> tokens -> one encoder pass -> every head's columns.

The Ray predictor actor in ``pipelines`` calls the same functions, so a notebook and the
distributed job produce identical predictions.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import numpy as np
import torch

from mtcls.decoding import decode
from mtcls.modeling import MultiTaskModel, head_probabilities


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Tokenizes texts without padding.

    Args:
        tokenizer: A Hugging Face tokenizer (a fast one reports truncation for free).
        texts: Non-empty strings.
        max_length: Token limit per text, special tokens included.

    Returns:
        ``(input_ids, truncated)``: token id lists, and a bool array, True where a text was cut.
    """
    if not texts:
        return [], np.zeros(0, dtype=bool)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    if getattr(enc, "encodings", None):
        truncated = np.array([len(e.overflowing) > 0 for e in enc.encodings], dtype=bool)
    else:  # slow tokenizer: compare with an untruncated pass
        full = tokenizer(list(texts), truncation=False, padding=False)["input_ids"]
        truncated = np.array([len(f) > max_length for f in full], dtype=bool)
    return enc["input_ids"], truncated


def pad_batch(rows: Any, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> right-padded (B, T) ids and attention mask, T = the longest row."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.inference_mode()
def predict_probabilities(
    model: MultiTaskModel,
    input_ids: list[list[int]],
    batch_size: int = 64,
    pad_token_id: int = 0,
    autocast_dtype: Optional[torch.dtype] = None,
) -> dict[str, np.ndarray]:
    """Runs the model on pre-tokenized rows in length-sorted mini-batches.

    Sorting by length keeps padding (wasted compute) small; results come back in input order.

    Args:
        model: The model, already on its device and in eval mode.
        input_ids: Token id lists, one per row.
        batch_size: Rows per forward pass.
        pad_token_id: The tokenizer's padding id.
        autocast_dtype: ``torch.bfloat16``/``torch.float16`` to run under autocast (GPU), or None.

    Returns:
        ``{head: probabilities}`` in input order, float32 numpy arrays.
    """
    device = next(model.parameters()).device
    n = len(input_ids)
    out: dict[str, np.ndarray] = {}
    if n == 0:
        return {name: np.zeros((0, *_prob_shape(spec)), np.float32) for name, spec in model.specs.items()}
    order = np.argsort([len(r) for r in input_ids], kind="stable")
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    )
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([input_ids[i] for i in idx], pad_token_id)
        with autocast:
            result = model(input_ids=ids.to(device), attention_mask=mask.to(device))
        for name, logits in result.logits.items():
            probs = head_probabilities(model.specs[name], logits.float()).cpu().numpy()
            if name not in out:
                out[name] = np.empty((n, *probs.shape[1:]), dtype=np.float32)
            out[name][idx] = probs
    return out


def _prob_shape(spec: Any) -> tuple[int, ...]:
    return (spec.num_groups, spec.num_labels) if spec.kind == "grouped" else (spec.num_logits,)


def predict_texts(
    model: MultiTaskModel,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: Optional[int] = None,
) -> dict[str, Any]:
    """Predicts every head for a list of texts: the notebook entry point.

    Args:
        model: A :class:`MultiTaskModel` (put in eval mode here).
        tokenizer: Its tokenizer.
        texts: Non-empty strings.
        batch_size: Rows per forward pass.
        max_length: Token limit; defaults to the model config's ``max_length``.

    Returns:
        ``{column: values}`` following :mod:`mtcls.decoding`'s conventions, plus ``truncated``.
    """
    model.eval()
    ids, truncated = tokenize(tokenizer, texts, max_length or model.config.max_seq_length)
    probs = predict_probabilities(model, ids, batch_size, tokenizer.pad_token_id or 0)
    columns: dict[str, Any] = {}
    for name, spec in model.specs.items():
        columns.update(decode(spec, probs[name]))
    columns["truncated"] = truncated
    return columns
