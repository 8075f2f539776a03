"""``MultiTaskConfig``: a shared encoder's config plus a list of head specs."""

from __future__ import annotations

from typing import Any, Optional

from transformers import AutoConfig, PretrainedConfig

from mtcls.heads import HeadSpec, HeadSpecError, validate_heads

POOLING_MODES = ("cls", "mean")


#: Encoders whose position ids start after the padding index.
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod"})


class MultiTaskConfig(PretrainedConfig):
    """Configuration of a :class:`~mtcls.modeling.MultiTaskModel`.

    The encoder's own config is stored inline (as a dict with its ``model_type``), so a saved model
    directory is self-contained: loading rebuilds the encoder architecture from this config and the
    weights from ``model.safetensors``, never running code from the directory.

    Args:
        encoder: The encoder's config as a dict (``PretrainedConfig.to_dict()``), or a config object.
        heads: Head specs, as :class:`~mtcls.heads.HeadSpec` or dicts, in evaluation order.
        pooling: ``"cls"`` (first token) or ``"mean"`` (attention-masked mean of the last layer).
        max_seq_length: Default maximum number of tokens per input at inference time.
        text_separator: Joins several text fields into one input; ``None`` uses the tokenizer's
            separator token.
        encoder_name: Where the encoder came from (a path or hub id), recorded for provenance.
    """

    model_type = "mtcls"
    has_no_defaults_at_init = False

    def __init__(
        self,
        encoder: Optional[Any] = None,
        heads: Optional[list[Any]] = None,
        pooling: str = "mean",
        max_seq_length: int = 128,
        text_separator: Optional[str] = None,
        encoder_name: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(encoder, PretrainedConfig):
            encoder = encoder.to_dict()
        self.encoder = dict(encoder) if encoder else {}
        self.heads = [h.to_dict() if isinstance(h, HeadSpec) else dict(h) for h in (heads or [])]
        if pooling not in POOLING_MODES:
            raise ValueError(f"MultiTaskConfig: field 'pooling': expected one of {list(POOLING_MODES)}, got {pooling!r}")
        self.pooling = pooling
        if not isinstance(max_seq_length, int) or max_seq_length < 2:
            raise ValueError(f"MultiTaskConfig: field 'max_seq_length': must be an integer >= 2, got {max_seq_length!r}")
        self.max_seq_length = max_seq_length
        self.text_separator = text_separator
        self.encoder_name = encoder_name
        super().__init__(**kwargs)
        if self.heads:
            validate_heads(self.head_specs())

    def head_specs(self) -> list[HeadSpec]:
        """The heads as validated :class:`HeadSpec` objects, in evaluation order."""
        return [HeadSpec.from_dict(h) for h in self.heads]

    def head(self, name: str) -> HeadSpec:
        """The spec of one head, by name."""
        for h in self.heads:
            if h["name"] == name:
                return HeadSpec.from_dict(h)
        raise HeadSpecError(f"no head named {name!r}; heads: {[h['name'] for h in self.heads]}")

    def encoder_config(self) -> PretrainedConfig:
        """The encoder's config object, rebuilt from the stored dict."""
        if not self.encoder or "model_type" not in self.encoder:
            raise ValueError("MultiTaskConfig: field 'encoder': an encoder config dict with 'model_type' is required")
        data = dict(self.encoder)
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)

    @property
    def max_positions(self) -> Optional[int]:
        """The most tokens per row the encoder's position embeddings allow (:func:`position_limit`)."""
        return position_limit(self.encoder)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.get("hidden_size") or self.encoder.get("dim") or self.encoder["d_model"])


def position_limit(encoder: dict[str, Any]) -> Optional[int]:
    """The most tokens per row an encoder config (a ``to_dict()``) allows; None when it has no such limit.

    RoBERTa-style encoders (XLM-R, CamemBERT, PhoBERT ...) number positions from
    ``pad_token_id + 1``, so they allow ``max_position_embeddings - pad_token_id - 1``.
    """
    limit = encoder.get("max_position_embeddings") or encoder.get("n_positions")
    if not isinstance(limit, int) or limit <= 0:
        return None
    if encoder.get("model_type") in _OFFSET_POSITIONS:
        limit -= int(encoder.get("pad_token_id") or 0) + 1
    return limit
