"""The engine as the research loop sees it: the boundary between the two wings, written down.

The loop (``seal_jax.selfedit``) never reaches into the engine (``seal_jax.lm``). It builds requests from
the engine's jax-free value types (:mod:`seal_jax.lm.types`: ``SamplingParams``, ``LoraSpec``,
``TrainSpec``, the errors) and asks a model for what :class:`LanguageModel` lists: generate text, train K
adapters, score completions by teacher forcing, merge an adapter into the weights, export the weights. ``seal_jax.LM`` is such a model; so is any
stand-in a test or another engine provides (vLLM for generation, say) that has these methods.

Loading is the one place the loop starts the engine (:func:`load_model`); importing this module does not
import jax.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from seal_jax.lm.types import LoraSpec, SamplingParams, TrainSpec

# One training item: a string, a (prompt, completion) pair (loss on the completion), or token ids.
TrainingItem = str | tuple[str, str] | Sequence[int]


@runtime_checkable
class TrainedAdapters(Protocol):
    """K adapters trained together (``seal_jax.Adapters``): what the loop reads back."""

    losses: list[list[float]]  # per candidate, the loss of every optimiser step
    failed: list[str | None]  # per candidate, why it failed (a non-finite loss …) or None

    def __len__(self) -> int: ...

    def save(self, path: str | Path) -> Path:
        """Write the adapters under ``path`` (:func:`load_adapters` reads them back)."""
        ...

    def take(self, indices: Sequence[int]) -> TrainedAdapters:
        """Candidates ``indices`` as a stack of their own (one passage's, after several trained together)."""
        ...


@runtime_checkable
class LanguageModel(Protocol):
    """What the research loop needs of a language model (``seal_jax.LM`` provides it)."""

    tokenizer: Any  # a Hugging Face tokenizer (chat template, token counts of prompts)

    def generate(self, prompts: list[str], params: SamplingParams | None = None, adapters: Any = None,
                 chat: bool = False, enable_thinking: bool = False,
                 seeds: Sequence[int] | None = None) -> list[str] | list[list[str]]:
        """B completions; with K stacked ``adapters``, K lists of B. ``seeds``: one per prompt instead of
        ``params.seed``, the rows of each seed sampled as a call of their own with it (the loop passes it
        only when several passages share a batch)."""
        ...

    def train_adapters(self, sequences: Sequence[Sequence[TrainingItem]],
                       lora: LoraSpec | Sequence[LoraSpec] | None = None,
                       train: TrainSpec | Sequence[TrainSpec] | None = None, seed: int = 0) -> TrainedAdapters:
        """K adapters, one per list of training items, trained together."""
        ...

    def ready_adapters(self, adapters: Any) -> Any:
        """``adapters`` as the model's inference reads them (``seal_jax.ReadyAdapters``: the same
        ``losses``, ``failed``, ``len`` and ``take``); the loop answers with these and drops the float32 ones."""
        ...

    def completion_logprobs(self, prompts: list[str], completions: list[str], adapters: Any = None,
                            chat: bool = False, enable_thinking: bool = False) -> tuple[Any, Any]:
        """Teacher-forced log-likelihood sums of each completion after its prompt (``[B]``, or ``[K, B]``
        with K stacked adapters) and the completions' token counts ``[B]`` (numpy arrays)."""
        ...

    def merge_adapter(self, adapters: Any, k: int = 0) -> LanguageModel:
        """A new model with adapter ``k`` merged into the weights."""
        ...

    def export(self, out_dir: str | Path, *, dtype: Any = None, progress: bool = False) -> Path:
        """The weights (and tokenizer) as a Hugging Face-format folder (a bar over its tensors with
        ``progress``)."""
        ...


def load_model(path: str, *, dtype: str = "float32", mesh: Any = None, tokenizer: str | None = None,
               remat: str | bool = "minimal", progress: bool = True, train_mesh: Any = None,
               train_weights: str = "replicated", attention: str | None = None) -> LanguageModel:
    """Load a Hugging Face-format folder (or hub id, online) with the engine: ``seal_jax.load``."""
    from seal_jax.lm.api import load  # deferred: jax and the engine load only when a run loads a model

    return load(path, dtype=dtype, mesh=mesh, tokenizer=tokenizer, remat=remat, progress=progress,
                train_mesh=train_mesh, train_weights=train_weights, attention=attention)


def load_adapters(path: str | Path) -> Any:
    """Adapters saved with ``adapters.save(path)`` (``seal_jax.Adapters.load``)."""
    from seal_jax.lm.lora import Adapters  # deferred: jax and the engine load only when a run needs them

    return Adapters.load(path)
