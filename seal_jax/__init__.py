"""seal-jax: self-adapting language models in JAX/Flax.

The public API (see DESIGN.md): ``sj.load`` -> ``sj.LM`` (``logits``, ``generate``, ``generate_ids``,
``completion_logprobs``, ``train_adapters``, ``ready_adapters``, ``merge_adapter``, ``export``),
``sj.SamplingParams``, ``sj.LoraSpec``, ``sj.TrainSpec``, ``sj.Adapters``, ``sj.ReadyAdapters``,
``sj.ModelConfig``, and the modules ``sj.assets``, ``sj.grading`` and ``sj.templates``.

The value types, errors and the loop's modules import without jax (``seal_jax.lm.types``); ``LM``,
``load``, ``Adapters`` and ``ReadyAdapters`` bring in the engine, and with it jax, on first use (PEP 562
``__getattr__``), so ``import seal_jax`` is cheap and reading a config or grading answers never starts jax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from seal_jax import assets
from seal_jax.lm.config import ConfigError, ModelConfig
from seal_jax.lm.types import LoraError, LoraSpec, SamplingParams, TrainError, TrainSpec, WeightsError
from seal_jax.selfedit import grading, templates

if TYPE_CHECKING:
    from seal_jax.lm.api import LM, load
    from seal_jax.lm.lora import Adapters, ReadyAdapters

__version__ = "0.1.0"

_ENGINE = {"LM": "seal_jax.lm.api", "load": "seal_jax.lm.api", "Adapters": "seal_jax.lm.lora",
           "ReadyAdapters": "seal_jax.lm.lora"}

__all__ = [
    "LM", "Adapters", "ReadyAdapters", "ConfigError", "LoraError", "LoraSpec", "ModelConfig", "SamplingParams", "TrainError",
    "TrainSpec", "WeightsError", "assets", "grading", "load", "templates", "__version__",
]


def __getattr__(name: str) -> Any:
    """``LM``, ``load``, ``Adapters`` and ``ReadyAdapters``: the engine (and jax) is imported on first use."""
    if name in _ENGINE:
        value = getattr(importlib.import_module(_ENGINE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'seal_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ENGINE))
