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

Every file :func:`export_int8` writes records what it was exported from in the ONNX model's
``metadata_props`` (key :data:`INT8_METADATA_KEY`: the encoder identity, the route version, the
library versions and the cache key). A cached file is used only when its record carries the cache
key it is stored under (otherwise it is exported again), and a file shipped in a model directory
only when its encoder identity equals the model's (:func:`int8_file_problem`).

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
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from mtcls.default import cache_dir as mtcls_cache
from mtcls.identity import encoder_identity
from mtcls.modeling import MultiTaskModel

log = logging.getLogger(__name__)

#: File name of the quantized encoder inside a model directory (or a job's shipped files).
INT8_FILE = "encoder.int8.onnx"
#: Bumped whenever the export or quantization settings change (part of the cache key).
ROUTE_VERSION = "ort-dynamic-int8-v2"
#: Key of the ONNX ``metadata_props`` entry recording what a file was exported from (JSON).
INT8_METADATA_KEY = "mtcls.int8"
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


def runtime_versions() -> dict[str, Optional[str]]:
    """The versions of the libraries that build the int8 file (None: not installed)."""
    versions: dict[str, Optional[str]] = {}
    for module in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            versions[module] = str(__import__(module).__version__)
        except ImportError:
            versions[module] = None
    return versions


def encoder_fingerprint(model: MultiTaskModel) -> str:
    """The export's cache key.

    sha256 over the route version, the encoder identity (weights and config,
    :func:`mtcls.encoder_identity`), the pooling, and the versions of torch, transformers, onnx and
    onnxruntime: the exporter traces transformers' modeling code with torch, and the fusion and
    quantization come from onnxruntime, so a new version of any of them gets a new export.
    """
    return _fingerprint(encoder_identity(model))


def _fingerprint(identity: dict[str, Any]) -> str:
    key = {"route": ROUTE_VERSION, "encoder_sha256": identity["encoder_sha256"], "pooling": identity["pooling"],
           "versions": runtime_versions()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _export_record(model: MultiTaskModel, default_route: bool) -> dict[str, Any]:
    """What a file exported from ``model`` records (:data:`INT8_METADATA_KEY`)."""
    identity = encoder_identity(model)
    return {"route_version": ROUTE_VERSION if default_route else f"{ROUTE_VERSION}+variant",
            # Only the jobs' route is a cache entry; a variant's file never matches a cache key.
            "fingerprint": _fingerprint(identity) if default_route else None,
            "encoder_sha256": identity["encoder_sha256"], "weights_sha256": identity["weights_sha256"],
            "config_sha256": identity["config_sha256"], "pooling": identity["pooling"], "versions": runtime_versions()}


def read_int8_record(source: Union[Path, bytes]) -> Optional[dict[str, Any]]:
    """The record an int8 ONNX file carries (:data:`INT8_METADATA_KEY`), or None when it has none.

    Args:
        source: The file, or its bytes.

    Returns:
        The record; None when the file has no record or is not a readable ONNX model.
    """
    import onnx

    try:
        if isinstance(source, bytes):
            proto = onnx.load_model_from_string(source)
        else:
            proto = onnx.load(str(source), load_external_data=False)
    except Exception:  # noqa: BLE001 - a damaged or foreign file is one that records nothing
        return None
    for prop in proto.metadata_props:
        if prop.key == INT8_METADATA_KEY:
            try:
                record = json.loads(prop.value)
            except ValueError:
                return None
            return record if isinstance(record, dict) else None
    return None


def int8_file_problem(source: Union[Path, bytes], model: MultiTaskModel) -> Optional[str]:
    """Why an int8 ONNX file is not the export of ``model``'s encoder, or None when it is.

    The file must record (:data:`INT8_METADATA_KEY`) the model's encoder identity (weights and
    config) and pooling. Library versions may differ: a file built by an older onnxruntime still
    computes this encoder.

    Args:
        source: The file, or its bytes.
        model: The model whose encoder the file must hold.
    """
    record = read_int8_record(source)
    if record is None:
        return (f"records no encoder identity (ONNX metadata {INT8_METADATA_KEY!r}, written by mtcls.quantize.export_int8), "
                "so nothing shows it was exported from this model's encoder")
    identity = encoder_identity(model)
    if record.get("pooling") != identity["pooling"]:
        return f"was exported with pooling {record.get('pooling')!r}, the model pools by {identity['pooling']!r}"
    if record.get("encoder_sha256") != identity["encoder_sha256"]:
        which = [part for part, key in (("weights", "weights_sha256"), ("config", "config_sha256"))
                 if record.get(key) != identity[key]]
        return (f"was exported from another encoder (encoder sha256 {record.get('encoder_sha256')}, the model's is "
                f"{identity['encoder_sha256']}; differing: {' and '.join(which) or 'identity'})")
    return None


def _write_record(path: Path, record: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for prop in [p for p in proto.metadata_props if p.key == INT8_METADATA_KEY]:
        proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = INT8_METADATA_KEY, json.dumps(record, sort_keys=True)
    onnx.save(proto, str(path))


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
    (``benchmarks/int8_variants.py``). The file records what it was exported from
    (:data:`INT8_METADATA_KEY`; a variant records no cache key).

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
    default_route = tuple(op_types) == QUANTIZED_OPS and keep_fp32 is fp32_nodes and not reduce_range
    record = _export_record(model, default_route)  # before the export switches the attention implementation
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
    _write_record(target, record)
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

    A file found at the cached path is used only when it records that fingerprint
    (:func:`read_int8_record`); any other file there (a damaged one, one of other weights, one
    written before files recorded their identity) is exported again and replaced.

    Args:
        model: The model.
        cache_dir: Where exports are kept (default ``int8/`` under ``$MTCLS_CACHE``, ``~/.cache/mtcls``).
    """
    cache_dir = cache_dir or mtcls_cache() / "int8"
    key = encoder_fingerprint(model)
    target = cache_dir / key / INT8_FILE
    if target.is_file():
        record = read_int8_record(target)
        if record is not None and record.get("fingerprint") == key:
            return target
        log.warning("the cached int8 export %s was not exported from this encoder with this route and these "
                    "libraries (it records %s); exporting it again", target,
                    "no identity" if record is None else f"fingerprint {record.get('fingerprint')}")
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
