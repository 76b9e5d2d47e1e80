"""Every parameter of the decoder, declared once.

One row of :data:`PARAMS` per parameter: its dotted path in :class:`~seal_jax.lm.model.Decoder`, its shape (a
function of the :class:`ModelConfig`), its logical axes (mapped to mesh axes by the rules in
:mod:`seal_jax.lm.sharding`), how it starts in a freshly built model, its Hugging Face tensor name and whether
Hugging Face stores it transposed, and whether it exists for a given config. Everything else reads this
table: :func:`param_shapes`, the sharding of each parameter, the checkpoint name map of
:mod:`seal_jax.lm.weights`, the PEFT tensor names of :mod:`seal_jax.lm.lora` and the planner's byte counts.

Per-layer parameters are stacked on a leading ``layers`` axis; their Hugging Face name has a ``{layer}``
field. Projection kernels are ``[in, out]``; Hugging Face keeps ``[out, in]`` (``transposed``).
:func:`nest` and :func:`flatten` turn ``{dotted path: array}`` into the model's nested dicts and back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from seal_jax.lm.config import ModelConfig
from seal_jax.lm.types import PROJECTIONS

# Where each projection sits in a Hugging Face layer (``model.layers.N.<parent>.<projection>``).
PROJECTION_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
# Logical axes of each projection's ``[in, out]`` kernel.
PROJECTION_AXES = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


# the projections a TPU keeps with their input dimension minor-most (measured: see seal_jax.lm.layouts)
TPU_INPUT_MINOR = ("k_proj", "v_proj")


def projection_shape(config: ModelConfig, name: str) -> tuple[int, int]:
    """``(in, out)`` widths of the projection ``name`` (one of :data:`PROJECTIONS`)."""
    d, f = config.hidden_size, config.intermediate_size
    shapes = {
        "q_proj": (d, config.q_dim), "k_proj": (d, config.kv_dim), "v_proj": (d, config.kv_dim),
        "o_proj": (config.q_dim, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }
    if name not in shapes:
        raise KeyError(f"unknown projection {name!r}; projections: {list(PROJECTIONS)}")
    return shapes[name]


def _always(config: ModelConfig) -> bool:
    del config
    return True


@dataclass(frozen=True)
class ParamDecl:
    """One parameter: ``path`` (dotted, e.g. ``layers.q_proj``), ``shape`` (of a config; per-layer ones
    include the leading layer axis), logical ``axes`` (one per dimension), ``init`` (``"normal"``: N(0, 0.02);
    ``"ones"``), Hugging Face ``hf_name`` (``{layer}`` for per-layer ones), ``transposed`` (Hugging Face
    stores the reverse of our shape), ``present`` (whether a config has it), ``tpu_input_minor`` (on a
    TPU it lies in memory with its input dimension minor-most, as libtpu's decode reads it: see
    :mod:`seal_jax.lm.layouts`) and ``tied_axes`` (its logical axes instead of ``axes`` in a config whose
    output head is the embedding: :meth:`axes_for`)."""

    path: str
    shape: Callable[[ModelConfig], tuple[int, ...]]
    axes: tuple[str | None, ...]
    init: str
    hf_name: str
    transposed: bool = False
    present: Callable[[ModelConfig], bool] = _always
    tpu_input_minor: bool = False
    tied_axes: tuple[str | None, ...] | None = None

    def axes_for(self, config: ModelConfig) -> tuple[str | None, ...]:
        """Its logical axes in a model of ``config``."""
        if self.tied_axes is not None and config.tie_word_embeddings:
            return self.tied_axes
        return self.axes

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_name

    def hf_pattern(self) -> re.Pattern[str]:
        """The regular expression of its Hugging Face names (group 1: the layer index)."""
        head, _, tail = self.hf_name.partition("{layer}")
        return re.compile(re.escape(head) + (r"(\d+)" + re.escape(tail) if self.per_layer else ""))

    def hf_names(self, config: ModelConfig) -> list[str]:
        """Its Hugging Face tensor names in a checkpoint of ``config`` (one per layer for per-layer ones)."""
        if self.per_layer:
            return [self.hf_name.format(layer=i) for i in range(config.num_layers)]
        return [self.hf_name]

    def hf_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """The shape of one of its Hugging Face tensors."""
        shape = self.shape(config)[1:] if self.per_layer else self.shape(config)
        return tuple(reversed(shape)) if self.transposed else tuple(shape)


def _projection(name: str) -> ParamDecl:
    return ParamDecl(
        f"layers.{name}", lambda c: (c.num_layers, *projection_shape(c, name)), ("layers", *PROJECTION_AXES[name]),
        "normal", f"model.layers.{{layer}}.{PROJECTION_PARENT[name]}.{name}.weight", transposed=True,
        tpu_input_minor=name in TPU_INPUT_MINOR)


def _has_qk_norm(config: ModelConfig) -> bool:
    return config.qk_norm


def _untied(config: ModelConfig) -> bool:
    return not config.tie_word_embeddings


PARAMS: tuple[ParamDecl, ...] = (
    # tied to the output head, the embedding is split as the head is, over the vocabulary on fsdp x tensor
    # (sharding.RULES["head_vocab"]): split over its width on fsdp, the head's matmul would contract over
    # that split and all-reduce full-vocabulary float32 logits on every training micro-step. A lookup from
    # it all-reduces the [B, T, D] rows it gathers instead. Where fsdp x tensor does not divide the
    # vocabulary, its width is split over fsdp as before (the vocabulary took fsdp otherwise: spec_for).
    ParamDecl("embedding", lambda c: (c.vocab_size, c.hidden_size), ("vocab", "embed"), "normal",
              "model.embed_tokens.weight", tied_axes=("head_vocab", "embed")),
    *(_projection(name) for name in PROJECTIONS),
    ParamDecl("layers.input_norm", lambda c: (c.num_layers, c.hidden_size), ("layers", None), "ones",
              "model.layers.{layer}.input_layernorm.weight"),
    ParamDecl("layers.post_attention_norm", lambda c: (c.num_layers, c.hidden_size), ("layers", None), "ones",
              "model.layers.{layer}.post_attention_layernorm.weight"),
    ParamDecl("layers.q_norm", lambda c: (c.num_layers, c.head_dim), ("layers", None), "ones",
              "model.layers.{layer}.self_attn.q_norm.weight", present=_has_qk_norm),
    ParamDecl("layers.k_norm", lambda c: (c.num_layers, c.head_dim), ("layers", None), "ones",
              "model.layers.{layer}.self_attn.k_norm.weight", present=_has_qk_norm),
    ParamDecl("final_norm", lambda c: (c.hidden_size,), (None,), "ones", "model.norm.weight"),
    # the output head is split over the vocabulary, not its input width (see sharding.RULES["head_vocab"])
    ParamDecl("lm_head", lambda c: (c.hidden_size, c.vocab_size), (None, "head_vocab"), "normal", "lm_head.weight",
              transposed=True, present=_untied, tpu_input_minor=True),
)
BY_PATH: dict[str, ParamDecl] = {d.path: d for d in PARAMS}


def declared(config: ModelConfig) -> list[ParamDecl]:
    """The parameters a model of ``config`` has, in declaration order."""
    return [d for d in PARAMS if d.present(config)]


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of :class:`~seal_jax.lm.model.Decoder`, keyed by its dotted path."""
    return {d.path: d.shape(config) for d in declared(config)}


def param_axes(path: str, config: ModelConfig) -> tuple[str | None, ...]:
    """The logical axes of the parameter at ``path`` in a model of ``config``."""
    if path not in BY_PATH:
        raise KeyError(f"no parameter {path!r}; parameters: {sorted(BY_PATH)}")
    return BY_PATH[path].axes_for(config)


def peft_module(projection: str, layer: int) -> str:
    """PEFT's module name of LoRA on ``projection`` in ``layer`` (``base_model.model.`` + the Hugging Face
    module's name): its tensors are ``<module>.lora_A.weight`` and ``<module>.lora_B.weight``."""
    hf = BY_PATH[f"layers.{projection}"].hf_name.format(layer=layer)
    return "base_model.model." + hf.removesuffix(".weight")


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"layers.q_proj": x}`` -> ``{"layers": {"q_proj": x}}``."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of :func:`nest`."""
    out: dict[str, Any] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
