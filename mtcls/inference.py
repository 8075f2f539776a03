"""The inference engine: texts or token ids -> one encoder pass -> every head's probabilities.

Notebooks (:func:`predict_texts`), the scoring actor, the evaluation actor and training all go
through the same pieces here, so they use the same separator, tokenization, batching and
precision, and produce identical probabilities for the same rows.

Batches are cut by a token budget: rows are sorted by length and a batch takes rows while
``rows x longest row`` stays within ``max_tokens_per_batch`` (short texts make large batches,
long texts small ones, and padding stays small).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from mtcls.decoding import decode
from mtcls.encoding import text_separator
from mtcls.calibration import calibrated_probabilities
from mtcls.modeling import MultiTaskModel, head_probabilities
from mtcls.precision import Precision, resolve_precision
from mtcls.quantize import INT8_FILE, Int8Encoder, cached_int8, int8_file_problem

#: Token budgets per forward pass. CPU: measured (benchmarks/RESULTS.md, MiniLM on 2 cores): 1024-2048 tokens are
#: fastest for MiniLM on 2 cores, 4096 is 10-15% slower. GPU: not measured yet (no GPU lent; the sweep in
#: benchmarks/gpu_throughput.py is what should set it); large batches.
DEFAULT_MAX_TOKENS = {"cpu": 2048, "cuda": 65536}
MAX_BATCH_ROWS = 1024
#: Rows per call of the heads in :meth:`InferenceEngine.predict_pooled` (the heads are small).
POOLED_BATCH_ROWS = 8192

#: A result part and a head (``("pooled", "")`` for the pooled features): the engine's internal layout.
_Key = tuple[str, str]


@dataclass
class EngineOutput:
    """What :meth:`InferenceEngine.predict_tokens` and :meth:`InferenceEngine.predict_pooled` return, rows in input order.

    Attributes:
        probs: ``{head: probabilities}`` float32, calibrated by each head's ``temperature``
            (:func:`mtcls.calibration.calibrated_probabilities`): (N, 1) binary, (N, G, K)
            grouped, (N, K) otherwise.
        uncalibrated: ``{head: probabilities without its temperature}`` for each head that has
            one, from an engine made ``with_uncalibrated`` (else empty).
        logits: ``{head: raw logits}`` (before any calibration), from an engine made
            ``with_logits`` (else empty).
        pooled: (N, hidden size) float32 pooled encoder features the heads saw, when asked
            (``with_pooled``); else None.
    """

    probs: dict[str, np.ndarray]
    uncalibrated: dict[str, np.ndarray] = field(default_factory=dict)
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    pooled: Optional[np.ndarray] = None

    @classmethod
    def _from_parts(cls, parts: dict[_Key, np.ndarray]) -> "EngineOutput":
        pick = {part: {name: a for (p, name), a in parts.items() if p == part} for part in ("probs", "uncalibrated", "logits")}
        return cls(pick["probs"], pick["uncalibrated"], pick["logits"], parts.get(("pooled", "")))

    def _parts(self) -> dict[_Key, np.ndarray]:
        parts: dict[_Key, np.ndarray] = {("probs", n): a for n, a in self.probs.items()}
        parts.update({("uncalibrated", n): a for n, a in self.uncalibrated.items()})
        parts.update({("logits", n): a for n, a in self.logits.items()})
        if self.pooled is not None:
            parts[("pooled", "")] = self.pooled
        return parts

    @classmethod
    def filled(cls, shapes: dict[_Key, tuple[int, ...]], rows: int, value: float = np.nan) -> "EngineOutput":
        """An output of ``rows`` rows in the layout of :meth:`InferenceEngine.output_shapes`, every value ``value``."""
        return cls._from_parts({k: np.full((rows, *shape), value, np.float32) for k, shape in shapes.items()})

    def set_row(self, i: int, other: "EngineOutput", j: int = 0) -> None:
        """Copies row ``j`` of ``other`` (same layout) into row ``i``."""
        theirs = other._parts()
        for key, array in self._parts().items():
            array[i] = theirs[key][j]

    def take(self, rows: np.ndarray) -> "EngineOutput":
        """The given rows, in that order."""
        return self._from_parts({k: a[rows] for k, a in self._parts().items()})


@dataclass
class Tokens:
    """Token ids of many rows, flat: row ``i`` is ``ids[offsets[i]:offsets[i + 1]]``."""

    ids: np.ndarray  # (total,) int32
    offsets: np.ndarray  # (N + 1,) int64
    truncated: np.ndarray  # (N,) bool

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self) -> list[np.ndarray]:
        """Per-row id arrays (views, no copy)."""
        return [self.ids[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def padded(self, index: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``index`` as right-padded (B, T) ids and attention mask, T = their longest row (no Python loop)."""
        lengths = self.offsets[index + 1] - self.offsets[index]
        width = int(lengths.max())
        mask = np.arange(width)[None, :] < lengths[:, None]
        positions = self.offsets[index][:, None] + np.arange(width)[None, :]
        ids = np.where(mask, self.ids[np.minimum(positions, max(len(self.ids) - 1, 0))], pad_id).astype(np.int64)
        return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]], truncated: Optional[np.ndarray] = None) -> "Tokens":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets, np.zeros(len(rows), bool) if truncated is None else np.asarray(truncated, bool))


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> Tokens:
    """Tokenizes texts with the ``tokenizers`` batch API (no per-row Python objects from transformers).

    Args:
        tokenizer: A Hugging Face tokenizer; a fast one is used through its Rust backend, a slow
            one through its ``__call__``.
        texts: Non-empty strings.
        max_length: Token limit per text, special tokens included.

    Returns:
        :class:`Tokens`; ``truncated`` is True where a text was cut.
    """
    if not len(texts):
        return Tokens(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, bool))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # slow tokenizer: compare with an untruncated pass
        ids = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
        full = tokenizer(list(texts), truncation=False, padding=False)["input_ids"]
        return Tokens.from_rows(ids, np.array([len(f) > max_length for f in full], dtype=bool))
    fast = _truncating_backend(backend, max_length)
    encodings = fast.encode_batch_fast(list(texts), add_special_tokens=True)
    truncated = np.fromiter((len(e.overflowing) > 0 for e in encodings), dtype=bool, count=len(encodings))
    return Tokens.from_rows([e.ids for e in encodings], truncated)


_BACKENDS: dict[tuple[int, int], tuple[Any, Any]] = {}


def _truncating_backend(backend: Any, max_length: int) -> Any:
    # A private copy per (tokenizer, limit): truncation and padding are state of the Rust object.
    # The entry keeps the original alive, so its id cannot be reused by another tokenizer.
    key = (id(backend), max_length)
    if key not in _BACKENDS:
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        copy.enable_truncation(max_length=max_length)
        _BACKENDS[key] = (backend, copy)
    return _BACKENDS[key][1]


def token_budget_batches(lengths: np.ndarray, max_tokens: int, max_rows: int = MAX_BATCH_ROWS) -> list[np.ndarray]:
    """Row indices grouped into batches by a token budget, shortest rows first.

    Args:
        lengths: (N,) tokens per row.
        max_tokens: Budget per batch: rows x the batch's longest row (its padded size).
        max_rows: Cap on rows per batch.

    Returns:
        Index arrays; every row appears in exactly one (a row longer than the budget alone).
    """
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        # Sorted ascending, so the last row of a batch is its longest.
        end = start + 1
        while end < n and end - start < max_rows and (end - start + 1) * lengths[order[end]] <= max_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


class InferenceEngine:
    """A model, its tokenizer and how to run them: the one inference path of the project.

    Args:
        model: The model (moved to ``device`` and put in eval mode here).
        tokenizer: Its tokenizer (None for an engine fed token ids only).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see :mod:`mtcls.precision`).
        device: ``"auto"`` (CUDA when available), or a device.
        max_length: Token limit; None uses the model config's ``max_seq_length``.
        max_tokens_per_batch: Token budget per forward pass; None picks the device's default.
        pad_token_id: Padding id when there is no tokenizer.
        int8_file: For ``precision="int8"``, the quantized encoder (:mod:`mtcls.quantize`); it must
            record this model's encoder identity (:func:`mtcls.quantize.int8_file_problem`), else
            ValueError. None exports it (once per model, cached).
        with_uncalibrated: :meth:`predict_tokens` also returns, for each head with a
            ``temperature``, its probabilities without it (:attr:`EngineOutput.uncalibrated`; the
            evaluation job measures calibration with and without; one forward pass gives both).
        heads: Predict only these heads (the heads they read through ``inputs_from`` run too, but
            are not returned); None: every head.
        with_logits: :meth:`predict_tokens` and :meth:`predict_pooled` also return each head's
            raw logits (before any calibration, float32, in the head's logit shape) as
            :attr:`EngineOutput.logits` (training's validation fits calibrations and thresholds on them).
    """

    def __init__(self, model: MultiTaskModel, tokenizer: Any, precision: str = "auto",
                 device: Union[str, torch.device] = "auto", max_length: Optional[int] = None,
                 max_tokens_per_batch: Optional[int] = None, pad_token_id: int = 0,
                 int8_file: Optional[Path] = None, with_uncalibrated: bool = False,
                 heads: Optional[Sequence[str]] = None, with_logits: bool = False) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and precision != "int8" else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.precision: Precision = resolve_precision(precision, self.device)
        self.max_length = max_length or model.config.max_seq_length
        self.max_tokens = max_tokens_per_batch or DEFAULT_MAX_TOKENS.get(self.device.type, DEFAULT_MAX_TOKENS["cpu"])
        self.separator = text_separator(model.config, tokenizer)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or pad_token_id
        # The heads to return (model order), and those to run for them (None: all of them).
        self.heads: Optional[list[str]] = None if heads is None else [n for n in model.specs if n in set(heads)]
        self._run_heads: Optional[list[str]] = None if heads is None else model.heads_needed(heads)
        self.with_uncalibrated = with_uncalibrated
        self.with_logits = with_logits
        self.int8: Optional[Int8Encoder] = None
        if self.precision.quantized:
            if int8_file is not None and (problem := int8_file_problem(Path(int8_file), self.model)):
                raise ValueError(f"int8 file {str(int8_file)!r} {problem}; remove it (the engine then exports one)")
            self.int8 = Int8Encoder(int8_file or cached_int8(self.model), threads=torch.get_num_threads())

    @classmethod
    def load(cls, model_dir: Union[str, Path], torch_threads: int = 0, with_tokenizer: bool = True,
             **kwargs: Any) -> "InferenceEngine":
        """Loads a saved model directory (model + tokenizer).

        Args:
            model_dir: Local directory written by ``save_pretrained`` (and the tokenizer's).
            torch_threads: CPU intra-op threads (0 leaves torch's default).
            with_tokenizer: False: no tokenizer (an engine for :meth:`predict_pooled` or token ids).
            **kwargs: Further :class:`InferenceEngine` arguments.
        """
        from transformers import AutoTokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if (Path(model_dir) / INT8_FILE).is_file():
            kwargs.setdefault("int8_file", Path(model_dir) / INT8_FILE)
        tokenizer = AutoTokenizer.from_pretrained(model_dir) if with_tokenizer else None
        return cls(MultiTaskModel.from_pretrained(model_dir), tokenizer, **kwargs)

    @property
    def specs(self) -> dict[str, Any]:
        """The heads this engine predicts, in the model's order (all of them unless ``heads`` was given)."""
        if self.heads is None:
            return self.model.specs
        return {name: self.model.specs[name] for name in self.heads}

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """Texts -> :class:`Tokens` under the engine's ``max_length``."""
        return tokenize(self.tokenizer, texts, self.max_length)

    def output_shapes(self, with_pooled: bool = False) -> dict[_Key, tuple[int, ...]]:
        """Per-row shape of each array :meth:`predict_tokens` returns, by ``(part, head)`` (see :class:`EngineOutput`)."""
        heads = {name: tuple(spec.impl.logit_shape(spec)) for name, spec in self.specs.items()}
        shapes: dict[_Key, tuple[int, ...]] = {("probs", n): shape for n, shape in heads.items()}
        if self.with_uncalibrated:
            shapes.update({("uncalibrated", n): heads[n] for n, s in self.specs.items() if s.temperature is not None})
        if self.with_logits:
            shapes.update({("logits", n): heads[n] for n in self.specs})
        if with_pooled:
            shapes[("pooled", "")] = (self.model.config.hidden_size,)
        return shapes

    @torch.inference_mode()
    def predict_tokens(self, tokens: Union[Tokens, Sequence[Sequence[int]]], with_pooled: bool = False,
                       batches: Optional[Sequence[np.ndarray]] = None) -> EngineOutput:
        """Runs every head on pre-tokenized rows; results come back in input order.

        On a GPU, host tensors are pinned and copied without blocking, and a batch's results are
        fetched only after the next batch was launched, so host work overlaps GPU compute.

        Args:
            tokens: The rows' token ids.
            with_pooled: Also return the pooled encoder features the heads saw (the int8 encoder's
                under ``int8``), as :attr:`EngineOutput.pooled`.
            batches: The rows of each forward pass (index arrays covering every row once), in
                place of the engine's token-budget batches of length-sorted rows; padding and row
                order change results in the last float bits, so a caller comparing with earlier
                runs can fix them.

        Returns:
            An :class:`EngineOutput`: calibrated probabilities, and what the engine was made or
            asked for (uncalibrated probabilities, logits, pooled features).
        """
        if not isinstance(tokens, Tokens):
            tokens = Tokens.from_rows(tokens)
        n = len(tokens)
        out = {key: np.empty((n, *shape), np.float32) for key, shape in self.output_shapes(with_pooled).items()}
        if n == 0:
            return EngineOutput._from_parts(out)
        cuda = self.device.type == "cuda"
        dtype = self.precision.autocast_dtype
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        pending: Optional[tuple[np.ndarray, dict[str, torch.Tensor]]] = None
        for idx in token_budget_batches(tokens.lengths, self.max_tokens) if batches is None else batches:
            ids, mask = tokens.padded(idx, self.pad_id)
            if cuda:
                ids, mask = ids.pin_memory(), mask.pin_memory()
            if self.int8 is not None:
                result = self.model.forward_heads(self.int8(ids, mask), heads=self._run_heads)
            else:
                with autocast:
                    result = self.model(input_ids=ids.to(self.device, non_blocking=cuda),
                                        attention_mask=mask.to(self.device, non_blocking=cuda), heads=self._run_heads)
            probs = self._scores(result, with_pooled)
            if pending is not None:
                self._collect(out, *pending)
            pending = (idx, probs)
        self._collect(out, *pending)
        return EngineOutput._from_parts(out)

    @torch.inference_mode()
    def predict_pooled(self, features: Union[np.ndarray, torch.Tensor], batch_rows: int = POOLED_BATCH_ROWS) -> EngineOutput:
        """Runs only the heads, on pooled encoder features: no tokenizer, no encoder.

        ``features`` are what :meth:`predict_tokens` returns as ``pooled`` (for example the
        ``embedding`` column of a scoring output). The heads, their ``inputs_from`` fusion, the
        precision and the calibration are those of :meth:`predict_tokens`, so for the same
        features the probabilities are the same (at fp32, equal up to float rounding).

        Args:
            features: (N, hidden size) float array.
            batch_rows: Rows per call of the heads.

        Returns:
            An :class:`EngineOutput` as :meth:`predict_tokens` gives it (``pooled`` is None).

        Raises:
            ValueError: If ``features`` is not (N, hidden size).
        """
        x = torch.as_tensor(features).float()
        hidden = self.model.config.hidden_size
        if x.ndim != 2 or x.shape[1] != hidden:
            raise ValueError(f"features must be (N, {hidden}) (the encoder's hidden size), got {tuple(x.shape)}")
        out = {key: np.empty((len(x), *shape), np.float32) for key, shape in self.output_shapes().items()}
        dtype = self.precision.autocast_dtype
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype and self.int8 is None else contextlib.nullcontext()
        for start in range(0, len(x), batch_rows):
            with autocast:
                result = self.model.forward_heads(x[start:start + batch_rows].to(self.device), heads=self._run_heads)
            self._collect(out, np.arange(start, min(start + batch_rows, len(x))), self._scores(result))
        return EngineOutput._from_parts(out)

    def _scores(self, result: Any, with_pooled: bool = False) -> dict[_Key, torch.Tensor]:
        """One batch's results: the returned heads' calibrated probabilities (the heads'
        temperatures; forward_heads fused the uncalibrated ones), and what the engine was asked for."""
        probs: dict[_Key, torch.Tensor] = {("probs", name): calibrated_probabilities(spec, result.logits[name].float())
                                           for name, spec in self.specs.items()}
        if self.with_uncalibrated:
            probs.update({("uncalibrated", name): head_probabilities(spec, result.logits[name].float())
                          for name, spec in self.specs.items() if spec.temperature is not None})
        if self.with_logits:
            probs.update({("logits", name): result.logits[name].float() for name in self.specs})
        if with_pooled:
            probs[("pooled", "")] = result.pooled.float()
        return probs

    @staticmethod
    def _collect(out: dict[_Key, np.ndarray], idx: np.ndarray, probs: dict[_Key, torch.Tensor]) -> None:
        for name, p in probs.items():
            out[name][idx] = p.cpu().numpy()

    def predict(self, texts: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Texts -> ``({head: probabilities}, truncated)``."""
        tokens = self.tokenize(texts)
        return self.predict_tokens(tokens).probs, tokens.truncated


def predict_probabilities(model: MultiTaskModel, input_ids: Sequence[Sequence[int]], pad_token_id: int = 0,
                          precision: str = "fp32", max_tokens_per_batch: Optional[int] = None) -> dict[str, np.ndarray]:
    """Probabilities for pre-tokenized rows with a model on its current device (see :class:`InferenceEngine`)."""

    engine = InferenceEngine(model, None, precision, device=next(model.parameters()).device,
                             max_tokens_per_batch=max_tokens_per_batch, pad_token_id=pad_token_id)
    return engine.predict_tokens(input_ids).probs


def predict_texts(model: MultiTaskModel, tokenizer: Any, texts: Sequence[str], max_length: Optional[int] = None,
                  precision: str = "fp32", max_tokens_per_batch: Optional[int] = None) -> dict[str, Any]:
    """Predicts every head for a list of texts: the notebook entry point.

    Args:
        model: A :class:`MultiTaskModel` (put in eval mode here; stays on its device).
        tokenizer: Its tokenizer.
        texts: Non-empty strings.
        max_length: Token limit; defaults to the model config's ``max_seq_length``.
        precision: See :mod:`mtcls.precision`.
        max_tokens_per_batch: Token budget per forward pass.

    Returns:
        ``{column: values}`` following :mod:`mtcls.decoding`'s conventions, plus ``truncated``.
    """
    engine = InferenceEngine(model, tokenizer, precision, device=next(model.parameters()).device,
                             max_length=max_length, max_tokens_per_batch=max_tokens_per_batch)
    probs, truncated = engine.predict(texts)
    columns: dict[str, Any] = {}
    for name, spec in model.specs.items():
        columns.update(decode(spec, probs[name]))
    columns["truncated"] = truncated
    return columns
