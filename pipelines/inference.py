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

from mtcls import EngineOutput, InferenceEngine, MultiTaskModel, Tokens, join_texts
from mtcls.quantize import INT8_FILE, cached_int8, int8_file_problem
from pipelines.artifacts import read_model_files
from pipelines.config import ConfigError
from pipelines.storage import InputError

log = logging.getLogger(__name__)


def shipped_model_files(model_dir: Path, precision: str) -> dict[str, bytes]:
    """The files inference actors load: the model's, plus for ``int8`` its quantized encoder.

    The int8 export runs here, in the driver, once per model (cached by the encoder's identity and
    the library versions), so a model the route cannot handle fails before any work starts. A
    quantized encoder shipped inside the model directory (:data:`~mtcls.quantize.INT8_FILE`) is
    used only when it records this model's encoder identity (:func:`~mtcls.quantize.int8_file_problem`).

    Raises:
        ConfigError: Naming ``precision`` when the model cannot be quantized.
        InputError: Naming the file when the model directory ships a quantized encoder of another
            encoder, or one that does not say which encoder it holds.
    """
    files = read_model_files(model_dir)
    if precision != "int8":
        return files
    model = MultiTaskModel.from_pretrained(model_dir)
    if INT8_FILE in files:
        problem = int8_file_problem(files[INT8_FILE], model)
        if problem:
            raise InputError(f"{Path(model_dir) / INT8_FILE}: the model directory's quantized encoder {problem}; "
                             f"delete {INT8_FILE} from the model directory (precision=int8 then exports it from the model), "
                             "or export it again from this model with mtcls.quantize.export_int8")
        return files
    try:
        path = cached_int8(model)
    except RuntimeError as exc:
        raise ConfigError(f"key 'precision': int8 cannot run with the model {model_dir}: {exc}") from exc
    files[INT8_FILE] = path.read_bytes()
    return files


def load_shipped_engine(files_ref: list, **engine_kwargs: Any) -> tuple[InferenceEngine, Any]:
    """An engine for model files shipped through the object store (any node can load them).

    Args:
        files_ref: ``[ray.put(read_model_files(dir))]`` (a list, so Ray passes the ref, not the value);
            ``[read_model_files(dir)]`` works too (tests, one process).
        **engine_kwargs: :meth:`InferenceEngine.load` arguments.

    Returns:
        The engine and the :class:`~pipelines.artifacts.LocalCopy` holding its files; keep the
        copy alive as long as the engine (it is deleted when collected).
    """
    import ray

    from pipelines.artifacts import LocalCopy

    files = files_ref[0]
    copy = LocalCopy(ray.get(files) if isinstance(files, ray.ObjectRef) else files)
    return InferenceEngine.load(copy.path, **engine_kwargs), copy


#: Characters kept per token of ``max_length`` before tokenizing: a cell beyond it is trimmed (and
#: the row marked truncated), so one huge cell never makes the tokenizer allocate without bound.
#: WordPiece and BPE tokens average 3-6 characters of natural text.
CHARS_PER_TOKEN = 64


def texts_from_columns(batch: pa.Table, text_columns: Sequence[str], separator: str,
                       max_chars: Optional[int] = None) -> tuple[list[str], np.ndarray, list[Optional[str]], np.ndarray]:
    """Joins a block's text columns.

    A column with invalid UTF-8 is read as bytes: its bad rows get an error (naming the column
    and the byte), the others keep their text. Cells longer than ``max_chars`` are cut in Arrow
    before any Python string is built.

    Returns:
        ``(texts, rows, errors, trimmed)``: the texts of the rows that have one, their row numbers
        in the block, per block row an error message (None where there is a text), and per block
        row whether a cell was cut at ``max_chars``.
    """
    import pyarrow.compute as pc

    values: dict[str, list] = {}
    trimmed = np.zeros(batch.num_rows, dtype=bool)
    for c in text_columns:
        column = batch.column(c)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            try:
                column.validate(full=True)
            except pa.ArrowInvalid:  # invalid UTF-8 somewhere: per-row decoding in join_texts finds the rows
                column = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
        if max_chars is not None and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            long = pc.fill_null(pc.greater(pc.utf8_length(column), max_chars), False)
            if pc.any(long).as_py():
                trimmed |= long.to_numpy(zero_copy_only=False)
                column = pc.utf8_slice_codeunits(column, 0, max_chars)
        elif max_chars is not None and (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            long = pc.fill_null(pc.greater(pc.binary_length(column), 4 * max_chars), False)
            if pc.any(long).as_py():
                trimmed |= long.to_numpy(zero_copy_only=False)
                column = pc.binary_slice(column, 0, 4 * max_chars)
        values[c] = column.to_pylist()
        if max_chars is not None and trimmed.any() and not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            values[c] = [_cut_utf8(v) if isinstance(v, bytes) and t else v for v, t in zip(values[c], trimmed)]
    joined, errors = join_texts(values, separator)
    rows = np.flatnonzero([t is not None for t in joined])
    return [joined[i] for i in rows], rows, errors, trimmed


def _cut_utf8(value: bytes) -> bytes:
    """Drops a multi-byte character that a byte cut split at the end (so only real bad bytes fail)."""
    for back in range(4):
        try:
            (value[:len(value) - back] if back else value).decode("utf-8")
            return value[:len(value) - back] if back else value
        except UnicodeDecodeError as exc:
            if exc.start < len(value) - 4:
                return value
    return value


def predict_with_retry(engine: InferenceEngine, tokens: Tokens,
                       with_pooled: bool = False) -> tuple[EngineOutput, list[Optional[str]]]:
    """Predictions for every row; if the block fails, retries row by row so only bad rows fail.

    Args:
        engine: The engine.
        tokens: The block's rows.
        with_pooled: Also return the pooled features.

    Returns:
        ``(output, failures)``: every array of a failed row is NaN, and ``failures[i]`` is an
        error message for a failed row, None otherwise.
    """
    try:
        return engine.predict_tokens(tokens, with_pooled=with_pooled), [None] * len(tokens)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a per-row error, never a lost row
        log.warning("block of %d rows failed (%s); retrying row by row", len(tokens), exc)
    out = EngineOutput.filled(engine.output_shapes(with_pooled), len(tokens))
    failures: list[Optional[str]] = []
    for i, row in enumerate(tokens.rows()):
        try:
            one = engine.predict_tokens([row], with_pooled=with_pooled)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"inference failed: {type(exc).__name__}: {exc}"[:500])
            continue
        out.set_row(i, one)
        failures.append(None)
    return out, failures
