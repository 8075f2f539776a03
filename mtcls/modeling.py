"""``MultiTaskModel``: one shared encoder pass feeding every classification head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from mtcls.configuration import MultiTaskConfig
from mtcls.heads import BALANCED, HeadSpec, HeadSpecError, validate_heads
from mtcls.kinds import mean_of_parts

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class MultiTaskOutput(ModelOutput):
    """Output of :meth:`MultiTaskModel.forward`.

    Attributes:
        loss: Weighted sum of per-head losses (only when labels were given).
        head_losses: Per-head loss tensors (only for heads that were given labels).
        logits: Per-head logits; (B, 1) binary, (B, G, K) grouped, (B, K) otherwise.
        pooled: The pooled encoder features, (B, H).
        loss_parts: Per-head ``(sums, denominators)`` behind ``head_losses``; they add up across
            micro-batches and workers (see :meth:`MultiTaskModel.head_loss_parts`).
    """

    loss: Optional[torch.Tensor] = None
    head_losses: Optional[dict[str, torch.Tensor]] = None
    logits: Optional[dict[str, torch.Tensor]] = None
    pooled: Optional[torch.Tensor] = None
    loss_parts: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None


def head_probabilities(spec: HeadSpec, logits: torch.Tensor) -> torch.Tensor:
    """Logits -> probabilities for one head, same shape as the logits (the kind's sigmoid or softmax)."""
    return spec.impl.probabilities(spec, logits)


def _key(name: str) -> str:
    # ModuleDict keys may not shadow its attributes ("type", "float", "keys", ...), so prefix them.
    return f"h_{name}"


class ClassificationHead(nn.Module):
    """Dropout -> optional MLP (Linear, activation, dropout)* -> Linear to the head's logits."""

    def __init__(self, spec: HeadSpec, in_features: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(spec.dropout)]
        width = in_features
        for hidden in spec.hidden_sizes:
            layers += [nn.Linear(width, hidden), _ACTIVATIONS[spec.activation](), nn.Dropout(spec.dropout)]
            width = hidden
        layers.append(nn.Linear(width, spec.num_logits))
        self.net = nn.Sequential(*layers)
        self.out_shape = spec.impl.logit_shape(spec)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features)  # (B, num_logits)
        return out.view(out.shape[0], *self.out_shape)


class MultiTaskModel(PreTrainedModel):
    """A Hugging Face encoder with several classification heads.

    Build one on a pretrained encoder with :meth:`from_encoder`; reload a saved one with
    ``MultiTaskModel.from_pretrained(path)`` or ``AutoModel.from_pretrained(path)``.
    """

    config_class = MultiTaskConfig
    base_model_prefix = "mtcls"
    main_input_name = "input_ids"

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder_config())
        self.heads = nn.ModuleDict()
        self.specs: dict[str, HeadSpec] = {}
        for spec in config.head_specs():
            self._build_head(spec)
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_encoder(
        cls,
        encoder: Union[str, Path, PreTrainedModel],
        heads: Iterable[Union[HeadSpec, dict]],
        pooling: str = "mean",
        max_seq_length: int = 128,
        **config_kwargs: Any,
    ) -> "MultiTaskModel":
        """Builds a model on a pretrained encoder, with freshly initialised heads.

        Args:
            encoder: A local encoder directory (any ``AutoModel`` architecture) or a loaded model.
            heads: Head specs or dicts.
            pooling: ``"mean"`` or ``"cls"``.
            max_seq_length: Default token limit at inference.
            **config_kwargs: Further :class:`MultiTaskConfig` fields.

        Returns:
            The model, with the encoder's pretrained weights.
        """
        name = None
        if not isinstance(encoder, PreTrainedModel):
            name = str(encoder)
            encoder = AutoModel.from_pretrained(name, local_files_only=True)
        specs = [h if isinstance(h, HeadSpec) else HeadSpec.from_dict(h) for h in heads]
        config = MultiTaskConfig(
            encoder=encoder.config.to_dict(),
            heads=specs,
            pooling=pooling,
            max_seq_length=max_seq_length,
            encoder_name=name or getattr(encoder.config, "_name_or_path", None),
            **config_kwargs,
        )
        model = cls(config)
        model.encoder.load_state_dict(encoder.state_dict())
        return model

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "MultiTaskModel":
        """Loads a saved model (safetensors only; no code from the directory is run).

        Same arguments as ``PreTrainedModel.from_pretrained``.
        """
        kwargs.setdefault("use_safetensors", True)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        with torch.no_grad():
            # Tensors memory-mapped from the file can sit at unaligned addresses, which sends BLAS
            # down another kernel and changes the last bits of the logits; own aligned copies.
            for p in model.parameters():
                p.data = p.data.clone()
        # Non-persistent buffers are not in the file; under meta-device loading they come back
        # uninitialised, so rebuild them from the config.
        for spec in model.specs.values():
            model._register_weight_buffers(spec)
        return loaded

    def _build_head(self, spec: HeadSpec) -> None:
        extra = sum(self.specs[src].num_probs for src in spec.inputs_from)
        self.heads[_key(spec.name)] = ClassificationHead(spec, self.config.hidden_size + extra)
        self.specs[spec.name] = spec
        self._register_weight_buffers(spec)

    def _register_weight_buffers(self, spec: HeadSpec) -> None:
        device = next(self.heads[_key(spec.name)].parameters()).device
        for attr in ("class_weights", "pos_weight"):
            value = getattr(spec, attr)
            tensor = None
            if isinstance(value, (list, float)):
                tensor = torch.tensor(value if isinstance(value, list) else [value], dtype=torch.float32, device=device)
            # Not persistent: the values live in the config, the buffer only follows .to(device).
            self.register_buffer(f"_{attr}_{spec.name}", tensor, persistent=False)

    def add_head(self, spec: Union[HeadSpec, dict]) -> None:
        """Adds a freshly initialised head, keeping every existing weight (for example a head for a new dataset on an encoder already trained).

        Args:
            spec: The new head; its ``inputs_from`` may name existing heads.
        """
        spec = spec if isinstance(spec, HeadSpec) else HeadSpec.from_dict(spec)
        validate_heads(list(self.specs.values()) + [spec])
        self._build_head(spec)
        self.heads[_key(spec.name)].apply(self._init_weights)
        self.heads[_key(spec.name)].to(next(self.encoder.parameters()).device)
        self._register_weight_buffers(spec)  # on the head's (now final) device
        self.config.heads = self.config.heads + [spec.to_dict()]

    def set_head_spec(self, spec: HeadSpec) -> None:
        """Replaces a head's non-structural settings (thresholds, weights) keeping its weights.

        Raises:
            HeadSpecError: If the new spec changes the head's shape, kind, labels or inputs.
        """
        old = self.specs.get(spec.name)
        if old is None:
            raise HeadSpecError(f"no head named {spec.name!r}")
        for attr in ("kind", "labels", "groups", "hidden_sizes", "activation", "inputs_from"):
            if getattr(old, attr) != getattr(spec, attr):
                raise HeadSpecError(f"head {spec.name!r}: field {attr!r} cannot change on a trained head")
        module = self.heads[_key(spec.name)]
        self._build_head(spec)
        self.heads[_key(spec.name)] = module
        self.config.heads = [spec.to_dict() if h["name"] == spec.name else h for h in self.config.heads]

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Stops (or restarts) gradient updates to the encoder (to train only the heads)."""
        for p in self.encoder.parameters():
            p.requires_grad = not frozen

    def freeze_heads(self, names: Iterable[str], frozen: bool = True) -> None:
        """Stops (or restarts) gradient updates to the named heads."""
        for name in names:
            if name not in self.specs:
                raise HeadSpecError(f"no head named {name!r}; heads: {list(self.specs)}")
            for p in self.heads[_key(name)].parameters():
                p.requires_grad = not frozen

    # ------------------------------------------------------------------ forward
    def pool(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, T, H) last hidden states -> (B, H) features by the configured pooling."""
        if self.config.pooling == "cls" or attention_mask is None:
            return hidden[:, 0] if self.config.pooling == "cls" else hidden.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[dict[str, torch.Tensor]] = None,
        heads: Optional[Iterable[str]] = None,
        **kwargs: Any,
    ) -> MultiTaskOutput:
        """Runs the encoder once and every head on its pooled output.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens.
            token_type_ids: (B, T), passed on only when given (DistilBERT has none).
            labels: Optional ``{head: labels}`` in the layouts of :mod:`mtcls.losses`; heads not in
                the dict (or with every row missing) add nothing to the loss.
            heads: Only these heads (see :meth:`forward_heads`); None: every head.

        Returns:
            A :class:`MultiTaskOutput`.
        """
        enc_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            enc_kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**enc_kwargs).last_hidden_state  # (B, T, H)
        return self.forward_heads(self.pool(hidden, attention_mask), labels, heads)

    def heads_needed(self, names: Iterable[str]) -> list[str]:
        """The named heads plus every head they read through ``inputs_from``, in the model's order.

        Raises:
            HeadSpecError: Naming unknown heads and the model's heads.
        """
        wanted = list(names)
        unknown = [n for n in wanted if n not in self.specs]
        if unknown:
            raise HeadSpecError(f"unknown head(s) {unknown}; heads: {list(self.specs)}")
        needed: set[str] = set()
        while wanted:
            name = wanted.pop()
            if name not in needed:
                needed.add(name)
                wanted.extend(self.specs[name].inputs_from)
        return [n for n in self.specs if n in needed]

    def forward_heads(
        self, pooled: torch.Tensor, labels: Optional[dict[str, torch.Tensor]] = None,
        heads: Optional[Iterable[str]] = None,
    ) -> MultiTaskOutput:
        """Runs every head on pooled features (B, H), e.g. features cached from a frozen encoder.

        Args:
            pooled: (B, H) pooled encoder output.
            labels: As in :meth:`forward`.
            heads: Only these heads, plus the heads they read (:meth:`heads_needed`; ``logits``
                holds those too) and any head given labels; None: every head.

        Returns:
            A :class:`MultiTaskOutput`.
        """
        logits: dict[str, torch.Tensor] = {}
        probs: dict[str, torch.Tensor] = {}
        run = self.specs if heads is None else self.heads_needed([*heads, *(labels or {})])
        for name in run:
            spec = self.specs[name]
            features = pooled
            if spec.inputs_from:
                # Residual fusion: earlier heads' probabilities next to the pooled features.
                extra = [probs[src].reshape(pooled.shape[0], -1).to(pooled.dtype) for src in spec.inputs_from]
                features = torch.cat([pooled, *extra], dim=-1)
            logits[name] = self.heads[_key(name)](features)
            probs[name] = head_probabilities(spec, logits[name])

        loss = None
        head_losses = None
        loss_parts = None
        if labels:
            unknown = sorted(set(labels) - set(self.specs))
            if unknown:
                raise HeadSpecError(f"labels given for unknown head(s) {unknown}; heads: {list(self.specs)}")
            self._check_resolved(labels)
            loss_parts = {name: self.head_loss_parts(name, logits[name], y) for name, y in labels.items()}
            head_losses = {name: mean_of_parts(*parts) for name, parts in loss_parts.items()}
            loss = sum(self.specs[n].loss_weight * l for n, l in head_losses.items())
        return MultiTaskOutput(loss=loss, head_losses=head_losses, logits=logits, pooled=pooled, loss_parts=loss_parts)

    def loss_weights(self, name: str) -> Optional[torch.Tensor]:
        """The resolved class or positive weights of a head (a buffer on the model's device), or None."""
        field_name = self.specs[name].impl.weight_field
        return getattr(self, f"_{field_name}_{name}") if field_name else None

    def head_loss_parts(self, name: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A head's loss as ``(sums, denominators)`` (see :meth:`mtcls.kinds.HeadKind.loss_parts`)."""
        spec = self.specs[name]
        return spec.impl.loss_parts(spec, logits, labels, self.loss_weights(name))

    def _check_resolved(self, labels: dict[str, torch.Tensor]) -> None:
        for name in labels:
            spec = self.specs[name]
            if spec.class_weights in BALANCED or spec.pos_weight in BALANCED:
                raise HeadSpecError(
                    f"head {name!r}: 'balanced' / 'sqrt_balanced' weights must be resolved from label counts before "
                    "training (HeadSpec.resolve_balanced, or let jobs.train do it)"
                )


def register_auto_classes() -> None:
    """Registers ``mtcls`` with ``AutoConfig``/``AutoModel`` (idempotent)."""
    try:
        AutoConfig.register(MultiTaskConfig.model_type, MultiTaskConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModel.register(MultiTaskConfig, MultiTaskModel)
    except ValueError:
        pass
