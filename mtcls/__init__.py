"""mtcls: multi-head text classifiers on one shared Hugging Face encoder.

The model library: config, model, head kinds, losses, decoding, metrics, encoding and the
inference engine. It depends on torch, transformers, numpy and pyarrow (never Ray), and works on
its own in a notebook.
"""

from mtcls.configuration import MultiTaskConfig
from mtcls.decoding import decode, decode_arrow, output_columns, predict_indices
from mtcls.default import default_encoder_path
from mtcls.encoding import LabelError, decode_labels, encode_labels, join_texts, text_separator
from mtcls.identity import encoder_identity, encoder_weights_sha256
from mtcls.heads import BALANCED, HeadSpec, HeadSpecError, validate_heads
from mtcls.inference import EngineOutput, InferenceEngine, Tokens, predict_probabilities, predict_texts, tokenize
from mtcls.kinds import HeadKind, get_kind, kind_names, register_kind
from mtcls.losses import IGNORE_INDEX, head_loss
from mtcls.precision import PRECISIONS, resolve_precision
from mtcls.metrics import head_report, head_statistics, merge_statistics
from mtcls.modeling import MultiTaskModel, MultiTaskOutput, register_auto_classes

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "BALANCED",
    "IGNORE_INDEX",
    "PRECISIONS",
    "HeadKind",
    "HeadSpec",
    "EngineOutput",
    "InferenceEngine",
    "Tokens",
    "HeadSpecError",
    "LabelError",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
    "decode",
    "decode_arrow",
    "decode_labels",
    "get_kind",
    "kind_names",
    "register_kind",
    "resolve_precision",
    "text_separator",
    "default_encoder_path",
    "encode_labels",
    "encoder_identity",
    "encoder_weights_sha256",
    "head_loss",
    "head_report",
    "head_statistics",
    "join_texts",
    "merge_statistics",
    "output_columns",
    "predict_indices",
    "predict_probabilities",
    "predict_texts",
    "register_auto_classes",
    "tokenize",
    "validate_heads",
]
