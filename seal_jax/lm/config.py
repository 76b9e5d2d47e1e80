"""Model configuration: a frozen dataclass, presets, and reading a Hugging Face `config.json`.

Two decoder families are supported, and they share one implementation:

* ``qwen3`` (`Qwen3ForCausalLM`): grouped-query attention with an explicit ``head_dim`` and RMSNorm on
  the per-head queries and keys;
* ``llama`` (`LlamaForCausalLM`, e.g. SmolLM2): the same block without the q/k norms.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
SUPPORTED_ROPE_TYPES = ("default",)


class ConfigError(ValueError):
    """A model configuration that seal-jax cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    Attributes:
      family: ``"qwen3"`` or ``"llama"``.
      vocab_size, hidden_size, intermediate_size, num_layers: the usual sizes.
      num_heads, num_kv_heads, head_dim: attention heads (``num_heads % num_kv_heads == 0``); ``head_dim``
        may differ from ``hidden_size // num_heads`` (Qwen3 does this).
      qk_norm: RMSNorm over each query/key head before RoPE (Qwen3).
      tie_word_embeddings: the output head reuses the token embedding.
      rope_theta, rms_norm_eps, max_position_embeddings: as in Hugging Face.
      bos_token_id, eos_token_ids, pad_token_id: special ids (``eos_token_ids`` is a tuple).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_ARCHITECTURES.values():
            raise ConfigError(
                f"unknown model family {self.family!r}; supported: {sorted(set(SUPPORTED_ARCHITECTURES.values()))}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def q_dim(self) -> int:
        """Width of the concatenated query heads (``num_heads * head_dim``)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the concatenated key (or value) heads (``num_kv_heads * head_dim``)."""
        return self.num_kv_heads * self.head_dim

    @property
    def architecture(self) -> str:
        """The Hugging Face architecture name of this family."""
        return {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.family]

    def num_parameters(self) -> int:
        """Number of parameters of the base model (tied embeddings counted once)."""
        d, f = self.hidden_size, self.intermediate_size
        per_layer = d * self.q_dim * 2 + d * self.kv_dim * 2 + 3 * d * f + 2 * d
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + self.num_layers * per_layer + d

    def replace(self, **changes: Any) -> ModelConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` contents for this configuration."""
        eos: int | list[int] | None
        eos = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else (
            self.eos_token_ids[0] if self.eos_token_ids else None)
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }
        if self.family == "llama":
            out["mlp_bias"] = False
        return out


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """Read rope theta from transformers 4 (top level) or 5 (``rope_parameters``); reject scaled RoPE."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope type {rope_type!r} is not supported; supported rope types: "
            f"{list(SUPPORTED_ROPE_TYPES)}"
        )
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(theta) if theta is not None else 10000.0


def from_hf_dict(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Build a :class:`ModelConfig` from the contents of a Hugging Face ``config.json``.

    Args:
      hf: the parsed JSON.
      where: a name for error messages (usually the file path).
    Raises:
      ConfigError: unknown architecture, unsupported rope type or option, or a missing field.
    """
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        by_type = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
        arch = by_type.get(hf.get("model_type", "")) if not archs else None
    if arch is None:
        raise ConfigError(
            f"{where}: architecture {archs or hf.get('model_type')!r} is not supported; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{where}: attention_bias/mlp_bias=True is not supported (Qwen3 and Llama use none)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{where}: sliding-window attention is not supported")
    try:
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return ModelConfig(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            qk_norm=family == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=_rope_theta(hf, where),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: required field {e.args[0]!r} is missing") from None


def from_hf(path: str | Path) -> ModelConfig:
    """Read a Hugging Face ``config.json`` (the file, or the model folder that holds it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}: pass a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return from_hf_dict(hf, where=str(path))


def _qwen3(vocab: int, d: int, f: int, layers: int, heads: int, tie: bool) -> ModelConfig:
    return ModelConfig(
        family="qwen3", vocab_size=vocab, hidden_size=d, intermediate_size=f, num_layers=layers,
        num_heads=heads, num_kv_heads=8, head_dim=128, qk_norm=True, tie_word_embeddings=tie,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
        bos_token_id=None, eos_token_ids=(151645,), pad_token_id=151643,
    )


PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": _qwen3(151936, 1024, 3072, 28, 16, tie=True),
    "qwen3-1.7b": _qwen3(151936, 2048, 6144, 28, 16, tie=True),
    "qwen3-4b": _qwen3(151936, 2560, 9728, 36, 32, tie=True),
    "qwen3-8b": _qwen3(151936, 4096, 12288, 36, 32, tie=False),
    "qwen3-14b": _qwen3(151936, 5120, 17408, 40, 40, tie=False),
    "smollm2-135m": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, qk_norm=False, tie_word_embeddings=True,
        rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=2,
    ),
    "tiny": ModelConfig(
        family="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True, tie_word_embeddings=False,
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512,
        bos_token_id=None, eos_token_ids=(1,), pad_token_id=0,
    ),
}


def preset(name: str) -> ModelConfig:
    """Return the preset called ``name`` (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}") from None
