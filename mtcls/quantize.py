"""The int8 CPU path: the encoder exported to ONNX and dynamically quantized for ONNX Runtime.

Route (the reasons and measurements are in docs/DESIGN.md, "CPU precision"):

1. The encoder plus the model's pooling is exported once with torch's TorchScript ONNX exporter,
   eager attention, dynamic batch and sequence axes. Its output is the pooled (B, H) features.
2. For BERT-family encoders, ONNX Runtime's transformer optimizer fuses attention, GELU and
   LayerNorm so the quantizer sees whole attention blocks.
3. ``onnxruntime.quantization.quantize_dynamic``: int8 weights per output channel for the
   MatMul and Attention nodes, except each layer's feed-forward output projection
   (:func:`fp32_nodes`); activations are quantized per batch at run time.

The heads stay fp32 in torch (:meth:`MultiTaskModel.forward_heads`): they are tiny, and the
thresholds were tuned on fp32 outputs. The export is keyed by :func:`encoder_fingerprint`, so
jobs build it once per model and ship the file to their actors.

Needs the ``int8`` extra (``pip install 'mtcls[int8]'``: onnxruntime and onnx).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from mtcls.default import cache_dir as mtcls_cache
from mtcls.identity import encoder_weights_sha256
from mtcls.modeling import MultiTaskModel

log = logging.getLogger(__name__)

#: File name of the quantized encoder inside a model directory (or a job's shipped files).
INT8_FILE = "encoder.int8.onnx"
#: Bumped whenever the export or quantization settings change (part of the cache key).
ROUTE_VERSION = "ort-dynamic-int8-v2"
_FUSED_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "mpnet": "bert", "distilbert": "bert"}


def int8_unavailable() -> Optional[str]:
    """Why the int8 route cannot run here (a missing package), or None when it can."""
    missing = []
    for module in ("onnxruntime", "onnx"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return f"the int8 route needs {' and '.join(missing)} (pip install 'mtcls[int8]')"
    return None


def encoder_fingerprint(model: MultiTaskModel) -> str:
    """The export's cache key: the encoder's weights hash, its pooling and the route version."""
    return hashlib.sha256(json.dumps([ROUTE_VERSION, model.config.pooling, encoder_weights_sha256(model)]).encode()).hexdigest()


class _PooledEncoder(nn.Module):
    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.model.pool(hidden, attention_mask)


@contextlib.contextmanager
def _eager_attention(encoder: nn.Module):
    """Exports with eager attention: ONNX Runtime's fusion recognises that pattern, not SDPA's."""
    config = encoder.config
    before = getattr(config, "_attn_implementation", None)
    setter = getattr(encoder, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter("eager")
        yield
    finally:
        if setter is not None and before is not None:
            setter(before)


#: The ONNX node types whose weights are stored in int8.
QUANTIZED_OPS = ("MatMul", "Attention")


def fp32_nodes(path: Path) -> list[str]:
    """The MatMul nodes left in fp32: each transformer layer's feed-forward output projection.

    Its input is the GELU output of the wide intermediate layer, where transformer activations
    have their largest outliers; one int8 scale per batch for that tensor is what loses the most
    precision. Keeping these projections (a third of the encoder's MatMul FLOPs) in fp32 raised
    OLID's per-row agreement with fp32 from 98.4-98.8% to 99.1-99.3% (``benchmarks/RESULTS.md``).
    Matched by the exported node names (``.../layer.N/output/dense/MatMul``, not the attention
    output); an encoder whose names differ is quantized whole.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and "/output/dense/" in n.name and "/attention/" not in n.name]


def export_int8(model: MultiTaskModel, target: Path, op_types: Sequence[str] = QUANTIZED_OPS,
                keep_fp32: Callable[[Path], list[str]] = fp32_nodes, reduce_range: bool = False) -> Path:
    """Exports and quantizes the model's encoder to ``target`` (an ONNX file).

    The defaults are the route jobs use; the other settings exist to compare variants
    (``benchmarks/int8_variants.py``).

    Args:
        model: The model (only its encoder and pooling are exported).
        target: The ONNX file to write.
        op_types: ONNX node types whose weights are quantized.
        keep_fp32: Names of the nodes to leave in fp32, from the fused graph's file.
        reduce_range: 7-bit weights (the quantizer's ``reduce_range``).

    Raises:
        RuntimeError: When the int8 route cannot run here or the encoder cannot be exported,
            with the reason.
    """
    reason = int8_unavailable()
    if reason:
        raise RuntimeError(reason)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = model.cpu().eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mtcls-int8-") as tmp:
        raw = Path(tmp) / "encoder.onnx"
        ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 1037, 2936, 2742, 102]], dtype=torch.long)
        ids = ids.clamp(max=model.encoder.config.vocab_size - 1)
        mask = (torch.arange(5)[None, :] < torch.tensor([[4], [5]])).long()
        try:
            with _eager_attention(model.encoder), warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
                torch.onnx.export(_PooledEncoder(model).eval(), (ids, mask), str(raw), dynamo=False, opset_version=17,
                                  input_names=["input_ids", "attention_mask"], output_names=["pooled"],
                                  dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                                "pooled": {0: "batch"}})
        except Exception as exc:  # noqa: BLE001 - any exporter failure is the same problem for the user
            raise RuntimeError(f"the encoder ({model.encoder.config.model_type}) cannot be exported to ONNX for int8: "
                               f"{type(exc).__name__}: {exc}") from exc
        model.eval()  # the exporter restores the wrapper's mode on every submodule
        source = _fuse(raw, model.encoder.config, Path(tmp))
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                         op_types_to_quantize=list(op_types), nodes_to_exclude=keep_fp32(source),
                         extra_options={"DefaultTensorType": 1})
    return target


def _fuse(raw: Path, config: Any, tmp: Path) -> Path:
    """ONNX Runtime's transformer fusion for BERT-family encoders; other encoders go unfused."""
    kind = _FUSED_TYPES.get(getattr(config, "model_type", ""))
    if kind is None:
        return raw
    from onnxruntime.transformers.optimizer import optimize_model

    fused = tmp / "encoder.fused.onnx"
    with contextlib.redirect_stdout(None):
        optimized = optimize_model(str(raw), model_type=kind, num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size)
    optimized.save_model_to_file(str(fused))
    return fused


def cached_int8(model: MultiTaskModel, cache_dir: Optional[Path] = None) -> Path:
    """The quantized encoder for ``model``, exported on first use and cached by its fingerprint.

    Args:
        model: The model.
        cache_dir: Where exports are kept (default ``int8/`` under ``$MTCLS_CACHE``, ``~/.cache/mtcls``).
    """
    cache_dir = cache_dir or mtcls_cache() / "int8"
    target = cache_dir / encoder_fingerprint(model) / INT8_FILE
    if not target.is_file():
        log.info("exporting the encoder to int8 ONNX (once per model): %s", target)
        partial = target.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        export_int8(model, partial)
        partial.replace(target)
    return target


class Int8Encoder:
    """An ONNX Runtime session over a quantized encoder: (ids, mask) -> pooled features.

    Args:
        path: The ONNX file from :func:`export_int8`.
        threads: Intra-op threads (0: ONNX Runtime's default).
    """

    def __init__(self, path: Path, threads: int = 0) -> None:
        reason = int8_unavailable()
        if reason:
            raise RuntimeError(reason)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # No busy-waiting between calls: in a job the same CPUs read, tokenize and write.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.session.run(["pooled"], {"input_ids": input_ids.numpy().astype(np.int64, copy=False),
                                               "attention_mask": attention_mask.numpy().astype(np.int64, copy=False)})[0]
        return torch.from_numpy(pooled)
