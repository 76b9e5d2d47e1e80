"""seal-jax: self-adapting language models in JAX/Flax.

The public API (see DESIGN.md): ``sj.load``, ``sj.LM``, ``sj.ModelConfig``.
"""

from seal_jax.lm.api import LM, load
from seal_jax.lm.config import ConfigError, ModelConfig
from seal_jax.lm.weights import WeightsError

__version__ = "0.1.0"

__all__ = ["LM", "ConfigError", "ModelConfig", "WeightsError", "load", "__version__"]
