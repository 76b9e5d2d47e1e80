"""seal_jax.lm: a JAX language-model engine (Qwen3 / Llama) that knows nothing about self-editing."""

from seal_jax.lm.api import LM, load
from seal_jax.lm.config import ConfigError, ModelConfig, from_hf, preset

__all__ = ["LM", "ConfigError", "ModelConfig", "from_hf", "load", "preset"]
