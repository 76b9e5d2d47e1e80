"""The self-edit generator between rounds: SFT on its best outputs → merge → export → load the next one.

ReST-EM (:mod:`~seal_jax.selfedit.restem`) and template search (:mod:`~seal_jax.selfedit.template_search`)
both end a round by fine-tuning the generator on ``{prompt, completion}`` rows with LoRA (loss on the
completion only; SEAL's r=64, alpha=128 on all projections, lr 3e-4, 2 epochs by default), merging the
adapter into the weights and exporting them in Hugging Face format into the run folder, from which the next
round loads the new generator (:class:`Models`).

These steps are long at scale (an 8B generator's export writes ~16 GB) and show no bar of their own, so
:func:`train_and_export` says on stderr what it starts and how long each step took (:func:`~seal_jax.selfedit.multihost.say`).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from seal_jax.lm.types import LoraSpec, TrainError, TrainSpec
from seal_jax.selfedit.engine import LanguageModel, TrainedAdapters, load_model
from seal_jax.selfedit.multihost import is_writer, require_visible, say
from seal_jax.selfedit.run_config import RunConfig, RunConfigError


class GeneratorError(RuntimeError):
    """The generator's SFT cannot start or diverged."""


def folder_size(folder: Path) -> str:
    """The bytes of the files under ``folder``, for people: ``"16.07 GB"``, ``"3.2 MB"``."""
    n = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _run_generator(step: str) -> re.Pattern[str]:
    """A generator a run exported, as its ``round.json``/``iteration.json`` stores it: ``<step>-N/generator``."""
    return re.compile(rf"{re.escape(step)}-\d+/generator")


def stored_generator_path(out: Path, path: str | Path, step: str) -> str:
    """How a run folder's ``round.json`` (``step="round"``) or ``iteration.json`` (``"iteration"``) stores
    a model path: a generator the run exported (``<step>-N/generator``) relative to the run folder ``out``,
    so that the folder can be moved, copied or resumed from another working directory; any other model (the
    config's, a hub id) as given."""
    try:
        inside = Path(path).resolve().relative_to(Path(out).resolve()).as_posix()
    except (OSError, ValueError):
        return str(path)
    return inside if _run_generator(step).fullmatch(inside) else str(path)


def resolved_generator_path(out: Path, stored: str, step: str) -> str:
    """The model a path stored by :func:`stored_generator_path` names, for the run folder ``out`` where it
    is now: ``<step>-N/generator`` under ``out``. A path an older run stored as typed (absolute, or relative
    to its working directory) that ends in ``<step>-N/generator`` is taken under ``out`` too where ``out``
    holds that folder (the run folder moved, was copied, or is resumed from elsewhere); any other model is
    returned as stored."""
    pattern, out = _run_generator(step), Path(out)
    if pattern.fullmatch(stored):
        return str(out / stored)
    tail = "/".join(Path(stored).parts[-2:])
    return str(out / tail) if pattern.fullmatch(tail) and (out / tail).is_dir() else stored


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


def sft_spec(table: str, key: str, fields: Any) -> LoraSpec | TrainSpec:
    """The generator's SFT spec of a config's ``[TABLE.sft_lora]`` (a :class:`~seal_jax.LoraSpec`) or
    ``[TABLE.sft_train]`` (a :class:`~seal_jax.TrainSpec`) table, over SEAL's defaults
    (:func:`~seal_jax.selfedit.generator.sft_lora_spec`, :func:`~seal_jax.selfedit.generator.sft_train_spec`).

    Raises:
      RunConfigError: ``fields`` is not a table, names a key the spec lacks, or gives a value the spec
        refuses; the message starts with ``TABLE.KEY``.
    """
    spec, make = (LoraSpec, sft_lora_spec) if key == "sft_lora" else (TrainSpec, sft_train_spec)
    where = f"{table}.{key}"
    known = sorted(f.name for f in dataclasses.fields(spec))
    if not isinstance(fields, dict):
        raise RunConfigError(f"{where} must be a table of {spec.__name__} fields (a [{where}] section with keys "
                             f"from {known}), got {fields!r}")
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise RunConfigError(f"unknown keys in [{where}]: {unknown}; known keys: {known}")
    try:
        return make(fields)
    except (TypeError, ValueError) as e:
        raise RunConfigError(f"{where}: {e}") from None


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
                  table: str, error: type[Exception] = GeneratorError, label: str | None = None
                  ) -> tuple[LanguageModel, TrainedAdapters]:
    """SFT of ``lm`` on ``{prompt, completion}`` rows (loss on the completion only), merged into the base.

    ``table`` names the config table in error messages (e.g. ``"restem"``); ``error`` is the exception
    raised when the SFT cannot start (the :class:`~seal_jax.TrainError`'s message, plus a ``max_len`` hint
    when prompts fill ``train.max_len``) or its loss turned non-finite. With ``label`` (e.g.
    ``"templates iteration 1"``) the training and the merge are announced on stderr with their seconds.
    Returns ``(merged LM, adapters)``.
    """
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    if label:
        say(f"{label}: generator SFT on {len(pairs)} rows (LoRA r={lora.rank}, alpha={lora.alpha:g}, "
            f"{len(lora.targets)} projections; lr {train.learning_rate:g}, {train.epochs} epochs) ...")
    t0 = time.perf_counter()
    try:
        adapters = lm.train_adapters([pairs], lora, train, seed=seed)
    except TrainError as e:
        raise error(f"the generator's SFT cannot start: {e}{_prompt_length_hint(lm, rows, train, table)}") from e
    if adapters.failed[0]:
        raise error(f"the generator's SFT failed: {adapters.failed[0]}; lower {table}.sft_train.learning_rate "
                    f"(now {train.learning_rate})")
    if label:
        losses = adapters.losses[0]
        loss = f" (loss {losses[0]:.4f} -> {losses[-1]:.4f})" if losses else ""
        say(f"{label}: generator SFT trained in {time.perf_counter() - t0:.1f} s{loss}; merging the adapter into "
            "the weights ...")
    t0 = time.perf_counter()
    merged = lm.merge_adapter(adapters, 0)
    if label:
        say(f"{label}: adapter merged in {time.perf_counter() - t0:.1f} s")
    return merged, adapters


def export_generator(model: LanguageModel, target: Path, *, progress: bool = False) -> Path:
    """Export ``model`` to ``target`` (Hugging Face format): written beside it, then renamed, so a kill
    never leaves half a generator under the final name. Every process takes part in gathering the
    weights; process 0 writes (with a bar over the tensors when ``progress``)."""
    tmp = target.with_name(target.name + ".tmp")
    if is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
    model.export(tmp, progress=progress)
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
                     seed: int, target: Path, table: str, error: type[Exception] = GeneratorError,
                     label: str | None = None, progress: bool = True) -> SftResult:
    """:func:`sft_generator` then :func:`export_generator` into ``target``; the merged model is dropped.

    With ``progress`` each long step (SFT, merge, export) is announced on stderr before it starts and
    again with its seconds when it ends (the export with the bytes it wrote and its folder); ``label``
    starts those lines (default: ``table``).
    """
    label = (label or table) if progress else None
    merged, adapters = sft_generator(lm, rows, lora, train, seed, table=table, error=error, label=label)
    if label:
        say(f"{label}: exporting the merged generator to {target} ...")
    t0 = time.perf_counter()
    export_generator(merged, target, progress=label is not None)
    if label:
        say(f"{label}: generator exported in {time.perf_counter() - t0:.1f} s "
            f"({folder_size(target) if is_writer() else '?'}) to {target}")
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
