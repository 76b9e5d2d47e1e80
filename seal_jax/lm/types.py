"""The engine's value types: what a caller builds and catches, importable without jax.

Sampling, LoRA and training specifications (:class:`SamplingParams`, :class:`LoraSpec`,
:class:`TrainSpec`), the errors the engine raises for bad input, the dtype names a model loads in and the
projection names an adapter may target. The research loop (``seal_jax.selfedit``) builds its requests
from these and types its models with :class:`seal_jax.selfedit.engine.LanguageModel`, so reading a
config, parsing model output or grading never loads jax; the engine modules (``sampling``, ``lora``,
``training``, ``weights``) import them from here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from seal_jax.lm.config import ConfigError
from seal_jax.lm.tokenizer import TokenizerError

# Per-layer projection names (Hugging Face's); LoRA targets name them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Parameter dtypes a model may be loaded in (``seal_jax.load(..., dtype=NAME)``).
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# What LoRA training keeps of each layer for the backward pass (``seal_jax.load(..., remat=NAME)``):
#   "none"     everything (the most memory);
#   "minimal"  the projections' outputs (matmuls without batch axes); attention, norms, RoPE and the MLP's
#              elementwise work are recomputed: about as fast as "none" and roughly half its activations;
#   "full"     only each layer's input; the whole layer is recomputed (about 1/3 more training compute).
REMAT_POLICIES = ("none", "minimal", "full")

# How the base weights lie on a train mesh (``seal_jax.load(..., train_weights=NAME)``): a whole copy on every
# device, or each layer's split over its data axis and gathered as the layer runs (FSDP).
TRAIN_WEIGHTS = ("replicated", "fsdp")

# How T tokens attend to their own keys (``seal_jax.load(..., attention=NAME)``; seal_jax.lm.attention): the
# float32 einsum (the reference), causal blocks of queries (CPUs' default), blocks of queries with their scores
# recomputed in the backward pass, the TPU (splash) and GPU (Triton) fused kernels.
ATTENTION_IMPLEMENTATIONS = ("einsum", "causal_blocks", "chunked", "splash", "triton")


def remat_name(value: Any) -> str:
    """A remat policy's name from ``value``: one of :data:`REMAT_POLICIES`, or a bool (``True`` = "full",
    ``False`` = "none", the meaning of the older on/off setting)."""
    if isinstance(value, (bool, np.bool_)):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {list(REMAT_POLICIES)} (or true/false for full/none), got {value!r}")
    return str(value)


__all__ = ["DTYPE_NAMES", "LOSS_MODES", "PROJECTIONS", "REMAT_POLICIES", "SCHEDULES", "ConfigError", "LoraError", "LoraSpec",
           "SamplingError", "SamplingParams", "TokenizerError", "TrainError", "TrainSpec", "WeightsError", "remat_name"]


class WeightsError(ValueError):
    """A checkpoint whose tensors do not match the model configuration."""


# ----------------------------------------------------------------------------------------------------
# Sampling


class SamplingError(ValueError):
    """Bad sampling parameters, prompts or adapters (raised before anything is computed)."""


def is_int(x: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample: length, randomness, filters and stop ids.

    Attributes:
      max_new_tokens: the most tokens generated per prompt (> 0); the stop token counts toward it.
      temperature: 0 means greedy (argmax); otherwise logits are divided by it (> 0).
      top_k: keep the k most likely tokens (0 = off).
      top_p: nucleus sampling, keep the smallest set of most likely tokens whose mass reaches ``top_p``
        (always at least the top token); in (0, 1], 1 = off.
      min_p: keep tokens whose probability is at least ``min_p`` × the top token's probability;
        in [0, 1), 0 = off.
      seed: seed of the sampling PRNG, in [0, 2**32).
      stop_token_ids: extra ids that end a row (in addition to EOS); the stop token is not returned.
      ignore_eos: do not stop at the EOS ids (the explicit ``stop_token_ids`` still stop).

    The filters are applied in Hugging Face's order: temperature → top-k → top-p → min-p.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def fail(name: str, what: str) -> None:
            raise SamplingError(f"SamplingParams.{name} {what}, got {getattr(self, name)!r}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            fail("max_new_tokens", "must be a positive int")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            fail("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be an int >= 0 (0 = off)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must lie in (0, 1] (1 = off)")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p < 1.0:
            fail("min_p", "must lie in [0, 1) (0 = off)")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            fail("seed", "must be an int in [0, 2**32)")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
            fail("stop_token_ids", "must be a sequence of token ids")
        stops = tuple(self.stop_token_ids)
        if not all(is_int(s) and s >= 0 for s in stops):
            fail("stop_token_ids", "must hold non-negative int token ids")
        object.__setattr__(self, "stop_token_ids", tuple(int(s) for s in stops))
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            fail("ignore_eos", "must be a bool")

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_number(owner: str, name: str, value: Any, error: type[ValueError]) -> None:
    """Raise ``error`` naming ``owner.name`` unless ``value`` is a real number (not a string or a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{owner}.{name} must be a number, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# LoRA


class LoraError(ValueError):
    """An invalid LoRA specification or adapter operation."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """One adapter's shape: ``rank``, ``alpha`` (scale = alpha / rank), input ``dropout``, ``targets``.

    ``targets`` name Hugging Face projections (``q_proj`` … ``down_proj``) or ``"all"``.
    ``LoraSpec.seal()`` gives SEAL's inner-loop adapter (r=32, alpha=64, q_proj and v_proj).
    """

    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) and self.targets != "all":
            raise LoraError(f"LoraSpec.targets must be a list of projection names or 'all', got the string "
                            f"{self.targets!r} (one projection is a list of one: [{self.targets!r}])")
        targets = tuple(PROJECTIONS) if self.targets in ("all", ("all",)) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if not is_int(self.rank) or self.rank < 1:
            raise LoraError(f"LoraSpec.rank must be a positive integer, got {self.rank!r}")
        _check_number("LoraSpec", "alpha", self.alpha, LoraError)
        _check_number("LoraSpec", "dropout", self.dropout, LoraError)
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise LoraError(f"LoraSpec.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoraSpec.dropout must lie in [0, 1), got {self.dropout!r}")
        if not targets:
            raise LoraError("LoraSpec.targets is empty; name at least one projection, e.g. ('q_proj', 'v_proj')")
        unknown = [t for t in targets if t not in PROJECTIONS]
        if unknown:
            raise LoraError(f"unknown LoRA targets {unknown}; choose from {list(PROJECTIONS)} or 'all'")
        if len(set(targets)) != len(targets):
            raise LoraError(f"LoraSpec.targets has duplicates: {targets}")

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank

    @classmethod
    def seal(cls) -> LoraSpec:
        """SEAL's inner-loop adapter: r=32, alpha=64, dropout 0, on q_proj and v_proj."""
        return cls(rank=32, alpha=64.0, dropout=0.0, targets=("q_proj", "v_proj"))

    @classmethod
    def seal_sft(cls) -> LoraSpec:
        """SEAL's ReST-EM generator adapter: r=64, alpha=128 on all projections."""
        return cls(rank=64, alpha=128.0, dropout=0.0, targets=tuple(PROJECTIONS))


# ----------------------------------------------------------------------------------------------------
# Training


LOSS_MODES = ("masked", "seal_padded")
SCHEDULES = ("linear", "constant")


class TrainError(ValueError):
    """Invalid training input or specification."""


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """How one candidate is trained.

    Attributes:
      learning_rate: peak AdamW learning rate.
      epochs: passes over the candidate's sequences.
      batch_size: sequences per micro-batch (equal for all candidates of one call).
      grad_accum: micro-batches per optimiser step.
      max_len: sequences are truncated to this many tokens.
      schedule: ``"linear"`` (warm-up then linear decay to 0) or ``"constant"``.
      warmup: warm-up optimiser steps.
      weight_decay: decoupled weight decay (0 as in SEAL / transformers' Trainer).
      loss: ``"masked"`` (mean over real target tokens; the default) or ``"seal_padded"`` (SEAL's quirk:
        every sequence padded to ``max_len`` with EOS and the padding left in the loss).
      seed: this candidate's seed (LoRA init, dropout, data order).
      append_eos: in ``"masked"`` mode, end every sequence with EOS so the model learns to stop.
      shuffle: reshuffle the sequences every epoch.
    """

    learning_rate: float = 1e-3
    epochs: int = 10
    batch_size: int = 1
    grad_accum: int = 1
    max_len: int = 2048
    schedule: str = "linear"
    warmup: int = 0
    weight_decay: float = 0.0
    loss: str = "masked"
    seed: int = 0
    append_eos: bool = True
    shuffle: bool = True

    def __post_init__(self) -> None:
        for name in ("learning_rate", "weight_decay"):
            _check_number("TrainSpec", name, getattr(self, name), TrainError)
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise TrainError(f"TrainSpec.learning_rate must be positive, got {self.learning_rate!r}")
        for name in ("epochs", "batch_size", "grad_accum", "max_len"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise TrainError(f"TrainSpec.{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "seed"):
            value = getattr(self, name)
            if not is_int(value):
                raise TrainError(f"TrainSpec.{name} must be an integer, got {value!r}")
        if not 0 <= self.seed < 2**32:
            raise TrainError(f"TrainSpec.seed must be in [0, 2**32) (it seeds the LoRA init, dropout and data "
                             f"order), got {self.seed}")
        for name in ("append_eos", "shuffle"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TrainError(f"TrainSpec.{name} must be true or false, got {getattr(self, name)!r}")
        if self.max_len < 2:
            raise TrainError(f"TrainSpec.max_len must be at least 2, got {self.max_len}")
        if self.warmup < 0:
            raise TrainError(f"TrainSpec.warmup must be >= 0, got {self.warmup}")
        if self.weight_decay < 0:
            raise TrainError(f"TrainSpec.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"TrainSpec.schedule {self.schedule!r} is unknown; choose from {SCHEDULES}")
        if self.loss not in LOSS_MODES:
            raise TrainError(f"TrainSpec.loss {self.loss!r} is unknown; choose from {LOSS_MODES}")

    @classmethod
    def seal(cls, **changes: Any) -> TrainSpec:
        """SEAL's inner loop: lr 1e-3, 10 epochs, batch 1, linear decay, AdamW (plus ``changes``)."""
        return dataclasses.replace(cls(learning_rate=1e-3, epochs=10, batch_size=1, grad_accum=1), **changes)


# ----------------------------------------------------------------------------------------------------
# Mesh specifications ("data=2,fsdp=1,tensor=4"): parsed here, without jax, so that a run config's meshes
# are checked when it is read; ``lm.sharding`` builds the meshes.

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """A mesh specification that cannot be built on the available devices."""


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """Parse ``"data=2,fsdp=4,tensor=1"`` into ``{"data": 2, "fsdp": 4, "tensor": 1}``.

    Missing axes get size 1; at most one axis may be ``-1`` ("whatever is left").
    """
    if isinstance(spec, Mapping):
        items = dict(spec)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            m = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", part)
            if not m:
                raise MeshError(f"bad mesh spec part {part!r} in {spec!r}; expected e.g. 'data=2,fsdp=4,tensor=1'")
            if m.group(1) in items:
                raise MeshError(f"mesh axis {m.group(1)!r} is given twice in {spec!r}; give each axis once")
            items[m.group(1)] = int(m.group(2))
    unknown = set(items) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)} in {spec!r}; axes are {list(MESH_AXES)}")
    sizes = {a: int(items.get(a, 1)) for a in MESH_AXES}
    if sum(v == -1 for v in sizes.values()) > 1:
        raise MeshError(f"at most one mesh axis may be -1 in {spec!r}")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise MeshError(f"mesh axis sizes must be positive (or -1) in {spec!r}")
    return sizes


def mesh_lays_out(sizes: Mapping[str, int], devices: int) -> bool:
    """Whether a parsed mesh (:func:`parse_mesh_spec`) lays out exactly ``devices`` devices (an axis of -1
    taking whatever the others leave)."""
    known = math.prod(v for v in sizes.values() if v != -1)
    return known == devices or (-1 in sizes.values() and devices % known == 0)
