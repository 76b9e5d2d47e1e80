"""seal_jax.lm: a JAX language-model engine (Qwen3 / Llama) that knows nothing about self-editing.

The value types (:mod:`seal_jax.lm.types`) and configs import without jax; ``LM``, ``load`` and
``Adapters`` import the engine on first use (PEP 562 ``__getattr__``), so ``import seal_jax.lm.types``
does not start jax.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from seal_jax.lm.config import ConfigError, ModelConfig, from_hf, preset
from seal_jax.lm.types import LoraSpec, SamplingParams, TrainSpec

if TYPE_CHECKING:
    from seal_jax.lm.api import LM, load
    from seal_jax.lm.lora import Adapters, ReadyAdapters

_ENGINE = {"LM": "seal_jax.lm.api", "load": "seal_jax.lm.api", "Adapters": "seal_jax.lm.lora",
           "ReadyAdapters": "seal_jax.lm.lora"}

__all__ = ["LM", "Adapters", "ReadyAdapters", "ConfigError", "LoraSpec", "ModelConfig", "SamplingParams", "TrainSpec", "from_hf",
           "load", "preset"]


def __getattr__(name: str) -> Any:
    """``LM``, ``load``, ``Adapters`` and ``ReadyAdapters``, and the engine's modules (``seal_jax.lm.sharding``
    …): the engine (and jax) is imported on first use."""
    if name in _ENGINE:
        value = getattr(importlib.import_module(_ENGINE[name]), name)
    elif name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'seal_jax.lm' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ENGINE))
