"""The self-edit generator between rounds: SFT on its best outputs → merge → export → load the next one.

ReST-EM (:mod:`~seal_jax.selfedit.restem`) and template search (:mod:`~seal_jax.selfedit.template_search`)
both end a round by fine-tuning the generator on ``{prompt, completion}`` rows with LoRA (loss on the
completion only; SEAL's r=64, alpha=128 on all projections, lr 3e-4, 2 epochs by default), merging the
adapter into the weights and exporting them in Hugging Face format into the run folder, from which the next
round loads the new generator (:class:`Models`).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from seal_jax.lm.types import LoraSpec, TrainError, TrainSpec
from seal_jax.selfedit.engine import LanguageModel, TrainedAdapters, load_model
from seal_jax.selfedit.multihost import is_writer, require_visible
from seal_jax.selfedit.run_config import RunConfig


class GeneratorError(RuntimeError):
    """The generator's SFT cannot start or diverged."""


def sft_lora_spec(fields: dict[str, Any]) -> LoraSpec:
    """The generator's SFT :class:`~seal_jax.LoraSpec`: SEAL's r=64, alpha=128 on all projections,
    overridden by ``fields`` (a config table; a ``targets`` list is accepted)."""
    fields = dict(fields)
    if isinstance(fields.get("targets"), list):
        fields["targets"] = tuple(fields["targets"])
    return LoraSpec(**{**dataclasses.asdict(LoraSpec.seal_sft()), **fields})


def sft_train_spec(fields: dict[str, Any]) -> TrainSpec:
    """The generator's SFT :class:`~seal_jax.TrainSpec`: SEAL's lr 3e-4, 2 epochs, batch 1, overridden by
    ``fields``."""
    defaults = dataclasses.asdict(TrainSpec(learning_rate=3e-4, epochs=2, batch_size=1, grad_accum=1))
    return TrainSpec(**{**defaults, **fields})


def _prompt_length_hint(lm: LanguageModel, rows: Sequence[dict[str, Any]], train: TrainSpec, table: str) -> str:
    """A hint about ``max_len`` when some SFT prompts leave no room for their completion, else ``""``.

    A prompt of ``max_len`` tokens or more keeps no completion token after truncation, so its row is
    dropped; when every row is dropped the SFT cannot start. Any other cause gets no hint.
    """
    tokenizer = getattr(lm, "tokenizer", None)
    prompts = [r.get("prompt") for r in rows]
    if tokenizer is None or not prompts or not all(isinstance(p, str) for p in prompts):
        return ""
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    too_long = sum(n >= train.max_len for n in lengths)
    if not too_long:
        return ""
    return (f". {too_long} of {len(lengths)} prompts have at least {table}.sft_train.max_len = {train.max_len} "
            f"tokens (the longest {max(lengths)}), which leaves no room for the completion; raise max_len "
            "above the prompt length")


def sft_generator(lm: LanguageModel, rows: Sequence[dict[str, Any]], lora: LoraSpec, train: TrainSpec, seed: int, *,
                  table: str, error: type[Exception] = GeneratorError) -> tuple[LanguageModel, TrainedAdapters]:
    """SFT of ``lm`` on ``{prompt, completion}`` rows (loss on the completion only), merged into the base.

    ``table`` names the config table in error messages (e.g. ``"restem"``); ``error`` is the exception
    raised when the SFT cannot start (the :class:`~seal_jax.TrainError`'s message, plus a ``max_len`` hint
    when prompts fill ``train.max_len``) or its loss turned non-finite.
    Returns ``(merged LM, adapters)``.
    """
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    try:
        adapters = lm.train_adapters([pairs], lora, train, seed=seed)
    except TrainError as e:
        raise error(f"the generator's SFT cannot start: {e}{_prompt_length_hint(lm, rows, train, table)}") from e
    if adapters.failed[0]:
        raise error(f"the generator's SFT failed: {adapters.failed[0]}; lower {table}.sft_train.learning_rate "
                    f"(now {train.learning_rate})")
    return lm.merge_adapter(adapters, 0), adapters


def export_generator(model: LanguageModel, target: Path) -> Path:
    """Export ``model`` to ``target`` (Hugging Face format): written beside it, then renamed, so a kill
    never leaves half a generator under the final name. Every process takes part in gathering the
    weights; process 0 writes."""
    tmp = target.with_name(target.name + ".tmp")
    if is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
    model.export(tmp)
    if is_writer():
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


@dataclasses.dataclass(frozen=True)
class SftResult:
    """A finished generator SFT: where the new generator is, and the first and last step's loss."""

    generator: str
    sft_loss: list[float] | None


def train_and_export(lm: LanguageModel, rows: Sequence[dict[str, Any]], lora: LoraSpec, train: TrainSpec, *,
                     seed: int, target: Path, table: str, error: type[Exception] = GeneratorError) -> SftResult:
    """:func:`sft_generator` then :func:`export_generator` into ``target``; the merged model is dropped."""
    merged, adapters = sft_generator(lm, rows, lora, train, seed, table=table, error=error)
    export_generator(merged, target)
    del merged
    losses = adapters.losses[0]
    return SftResult(str(target), [losses[0], losses[-1]] if losses else None)


class Models:
    """The models a multi-round run has loaded, by path: the starting model and the generators it exported.

    ``models(path)`` loads a path once (with the run's dtype, tokenizer and remat; onto the config's mesh,
    else the starting model's); a generator exported into the run folder must be visible to every process.
    :meth:`keep` drops every other model, so at most the models still in use hold memory.
    """

    def __init__(self, config: RunConfig, lm: LanguageModel | None = None, *, what: str, progress: bool = True,
                 loader: Callable[[str], LanguageModel] | None = None):
        self.config, self.what, self.progress, self.loader = config, what, progress, loader
        self.mesh = config.mesh or getattr(lm, "mesh", None)  # later generators go where the given model is
        self.loaded: dict[str, LanguageModel] = {} if lm is None else {config.model: lm}

    def __call__(self, path: str) -> LanguageModel:
        if path not in self.loaded:
            if path != self.config.model:  # a generator exported into the run folder
                require_visible(path, self.what)
            c = self.config
            self.loaded[path] = (self.loader(path) if self.loader is not None else
                                 load_model(path, dtype=c.dtype, mesh=self.mesh, tokenizer=c.tokenizer, remat=c.remat,
                                            progress=self.progress, train_mesh=c.train_mesh or None,
                                            train_weights=c.train_weights, attention=c.attention))
        return self.loaded[path]

    def keep(self, *paths: str) -> None:
        """Drop every loaded model but ``paths``."""
        for path in [p for p in self.loaded if p not in paths]:
            del self.loaded[path]
