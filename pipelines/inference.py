"""What every inference actor shares: loading the engine from shipped files, texts from columns, retries.

The scoring actor and the evaluation actor both build on these, so they load the model the same
way (GPU and precision included), join texts with the model's separator, and turn a failed forward
pass into per-row errors instead of a lost block.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa

from mtcls import InferenceEngine, MultiTaskModel, Tokens, join_texts
from mtcls.quantize import INT8_FILE, cached_int8
from pipelines.artifacts import read_model_files
from pipelines.config import ConfigError

log = logging.getLogger(__name__)


def shipped_model_files(model_dir: Path, precision: str) -> dict[str, bytes]:
    """The files inference actors load: the model's, plus for ``int8`` its quantized encoder.

    The int8 export runs here, in the driver, once per model (cached by the encoder's weights), so
    a model the route cannot handle fails before any work starts.

    Raises:
        ConfigError: Naming ``precision`` when the model cannot be quantized.
    """
    files = read_model_files(model_dir)
    if precision == "int8" and INT8_FILE not in files:
        try:
            path = cached_int8(MultiTaskModel.from_pretrained(model_dir))
        except RuntimeError as exc:
            raise ConfigError(f"key 'precision': int8 cannot run with the model {model_dir}: {exc}") from exc
        files[INT8_FILE] = path.read_bytes()
    return files


def load_shipped_engine(files_ref: list, **engine_kwargs: Any) -> tuple[InferenceEngine, Any]:
    """An engine for model files shipped through the object store (any node can load them).

    Args:
        files_ref: ``[ray.put(read_model_files(dir))]`` (a list, so Ray passes the ref, not the value).
        **engine_kwargs: :meth:`InferenceEngine.load` arguments.

    Returns:
        The engine and the :class:`~pipelines.artifacts.LocalCopy` holding its files; keep the
        copy alive as long as the engine (it is deleted when collected).
    """
    import ray

    from pipelines.artifacts import LocalCopy

    copy = LocalCopy(ray.get(files_ref[0]))
    return InferenceEngine.load(copy.path, **engine_kwargs), copy


def texts_from_columns(batch: pa.Table, text_columns: Sequence[str], separator: str) -> tuple[list[str], np.ndarray, list[Optional[str]]]:
    """Joins a block's text columns.

    Returns:
        ``(texts, rows, errors)``: the texts of the rows that have one, their row numbers in the
        block, and per block row an error message (None where there is a text).
    """
    joined, errors = join_texts({c: batch.column(c).to_pylist() for c in text_columns}, separator)
    rows = np.flatnonzero([t is not None for t in joined])
    return [joined[i] for i in rows], rows, errors


def predict_with_retry(engine: InferenceEngine, tokens: Tokens,
                       with_pooled: bool = False) -> tuple[dict[str, np.ndarray], list[Optional[str]]]:
    """Probabilities for every row; if the block fails, retries row by row so only bad rows fail.

    Args:
        engine: The engine.
        tokens: The block's rows.
        with_pooled: Also return the pooled features, under :data:`mtcls.inference.POOLED`.

    Returns:
        ``({head: probabilities}, failures)``: probabilities (and pooled features) of failed rows
        are NaN, and ``failures[i]`` is an error message for a failed row, None otherwise.
    """
    try:
        return engine.predict_tokens(tokens, with_pooled=with_pooled), [None] * len(tokens)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a per-row error, never a lost row
        log.warning("block of %d rows failed (%s); retrying row by row", len(tokens), exc)
    out = {name: np.full((len(tokens), *shape), np.nan, np.float32)
           for name, shape in engine.output_shapes(with_pooled).items()}
    failures: list[Optional[str]] = []
    for i, row in enumerate(tokens.rows()):
        try:
            one = engine.predict_tokens([row], with_pooled=with_pooled)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"inference failed: {type(exc).__name__}: {exc}"[:500])
            continue
        for name, probs in one.items():
            out[name][i] = probs[0]
        failures.append(None)
    return out, failures
