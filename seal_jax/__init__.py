"""seal-jax: self-adapting language models in JAX/Flax.

The public API (see DESIGN.md): ``sj.load`` -> ``sj.LM`` (``logits``, ``generate``, ``generate_ids``,
``train_adapters``), ``sj.SamplingParams``, ``sj.LoraSpec``, ``sj.TrainSpec``, ``sj.Adapters``,
``sj.ModelConfig``, and the modules ``sj.assets``, ``sj.grading`` and ``sj.templates``.
"""

from seal_jax import assets
from seal_jax.lm.api import LM, load
from seal_jax.lm.config import ConfigError, ModelConfig
from seal_jax.lm.lora import Adapters, LoraError, LoraSpec
from seal_jax.lm.sampling import SamplingParams
from seal_jax.lm.training import TrainError, TrainSpec
from seal_jax.lm.weights import WeightsError
from seal_jax.selfedit import grading, templates

__version__ = "0.1.0"

__all__ = [
    "LM", "Adapters", "ConfigError", "LoraError", "LoraSpec", "ModelConfig", "SamplingParams", "TrainError",
    "TrainSpec", "WeightsError", "assets", "grading", "load", "templates", "__version__",
]
