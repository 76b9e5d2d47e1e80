"""seal_jax.lm: a JAX language-model engine (Qwen3 / Llama) that knows nothing about self-editing."""

from seal_jax.lm.api import LM, load
from seal_jax.lm.config import ConfigError, ModelConfig, from_hf, preset
from seal_jax.lm.lora import Adapters, LoraSpec
from seal_jax.lm.sampling import SamplingParams
from seal_jax.lm.training import TrainSpec

__all__ = ["LM", "Adapters", "ConfigError", "LoraSpec", "ModelConfig", "SamplingParams", "TrainSpec", "from_hf",
           "load", "preset"]
