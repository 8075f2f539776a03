"""mtcls: multi-head text classifiers on one shared Hugging Face encoder.

The model library: config, model, heads, losses, decoding, metrics and encoding. It depends on
torch, transformers and numpy only (never Ray), and works on its own in a notebook.
"""

from mtcls.configuration import MultiTaskConfig
from mtcls.decoding import decode, output_columns, predict_indices
from mtcls.default import default_encoder_path
from mtcls.encoding import LabelError, decode_labels, encode_labels, join_texts
from mtcls.heads import BALANCED, HEAD_KINDS, HeadSpec, HeadSpecError, validate_heads
from mtcls.inference import predict_probabilities, predict_texts, tokenize
from mtcls.losses import IGNORE_INDEX, head_loss
from mtcls.metrics import head_report, head_statistics, merge_statistics
from mtcls.modeling import MultiTaskModel, MultiTaskOutput, register_auto_classes

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "BALANCED",
    "HEAD_KINDS",
    "IGNORE_INDEX",
    "HeadSpec",
    "HeadSpecError",
    "LabelError",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
    "decode",
    "decode_labels",
    "default_encoder_path",
    "encode_labels",
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
