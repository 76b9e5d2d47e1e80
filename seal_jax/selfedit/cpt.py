"""Continued pretraining on many passages at once (SEAL's multi-passage CPT, arXiv 2506.10943 §4.2).

Where a knowledge run trains one adapter per passage, CPT pools the training sequences of N passages into
one corpus per condition and trains ONE adapter on it, then asks every passage's questions:

1. **Self-edits.** For every passage, ``k`` self-edits per generating condition: written by the run's
   model with the condition's prompt (``implications`` …), by a generator folder (``[cpt.generators]``,
   e.g. a ReST-EM round's ``generator/``, answering ``cpt.strategy``'s prompt), or SEAL's released ones
   (``replay``). ``passage`` has none (k = 0). Appended to ``selfedits.jsonl`` passage by passage.
2. **Corpus.** Per condition: every passage's text plus, for each of its self-edits, the self-edit's
   training sequences (:func:`~seal_jax.selfedit.strategies.training_sequences` without the passage),
   shuffled with a seed derived from the run's seed and the condition.
3. **Training.** All conditions' adapters train together in one ``train_adapters`` call (one candidate
   per condition; the run's ``[lora]`` and ``[train]``; SEAL: r=32, alpha=64, lr 1e-3, 5 epochs, batch 1),
   saved to ``adapters/``; ``training.json`` (written last) records the corpus sizes and losses.
4. **Evaluation.** The base model and every condition's adapter (K stacked) answer the questions (no
   passage in context), ``eval_batch`` passages per call (their questions in one ``generate`` call with the
   K adapters, one grader call, one teacher-forced pass; a passage's rows are those it gets alone up to
   numerics: other batch shapes pad differently, which moves the gold log-likelihood by float rounding and,
   in bfloat16, can flip a near-tied greedy token); results rows in the knowledge-run schema (``condition``, accuracy
   before = the base model's on that passage, after = under the condition's adapter, and the gold answers'
   log-likelihood), appended per passage to ``results.jsonl`` (``seconds``: the call's time shared evenly).

A killed run resumes after its last finished passage of the current phase; a finished training is read back
from ``adapters/``. Seeds derive from the run's seed, so a resumed run gives the same rows.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from seal_jax.selfedit.data import Passage
from seal_jax.selfedit.engine import LanguageModel, TrainedAdapters, load_adapters
from seal_jax.selfedit.episode import make_grader, score_adapters_many, score_base_many
from seal_jax.selfedit.generator import Models
from seal_jax.selfedit.knowledge import generate_self_edits
from seal_jax.selfedit.multihost import agree, is_writer, say
from seal_jax.selfedit.results import (
    append_passage,
    passages_done,
    read_rows,
    record_passage,
    result_row,
    summarize,
    summary_markdown,
    write_json,
    write_text,
)
from seal_jax.selfedit.resume import save_run_config
from seal_jax.selfedit.run_config import ExtendedConfig, RunConfig, RunConfigError, derived_seed, select_data
from seal_jax.selfedit.strategies import completions_for, get_strategy, training_sequences

TRAINING_FILE = "training.json"
SELFEDITS_FILE = "selfedits.jsonl"


@dataclasses.dataclass(frozen=True)
class CptConfig(ExtendedConfig):
    """A CPT run: knowledge-run keys at the top level (model, ``data`` = the N passages, ``k``,
    ``selfedit_sampling``, ``lora``, ``train``, grader …) plus a ``[cpt]`` table.

    Attributes:
      knowledge: the run's :class:`~seal_jax.selfedit.run_config.RunConfig`; its conditions are ``base`` and
        the strategy conditions of ``conditions``.
      conditions: ``passage``, any generating strategy (the run's model writes ``k`` self-edits per
        passage) and ``replay`` (SEAL's released self-edits, ``data.selfedits``).
      generators: ``{name: model folder}``: conditions whose self-edits another model writes (e.g. a ReST-EM
        round's ``generator/``), answering ``strategy``'s prompt.
      strategy: the prompt the generators answer.
      eval_batch: passages evaluated per call (their questions batched, see the module docstring).
    """

    knowledge: RunConfig
    conditions: tuple[str, ...] = ("passage", "implications")
    generators: dict[str, str] = dataclasses.field(default_factory=dict)
    strategy: str = "implications"
    eval_batch: int = 8

    TABLE = "cpt"
    KIND = "CPT"
    CONDITIONS_NOTE = "sets cpt.conditions (and cpt.generators), not conditions (base is always evaluated)"

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditions", tuple(_condition_names(self.conditions)))  # a TOML/JSON list
        if not isinstance(self.generators, dict):
            raise RunConfigError("cpt.generators must be a table of name = \"model folder\" ([cpt.generators] in "
                                 f"TOML), got {self.generators!r}")
        if not self.conditions and not self.generators:
            raise RunConfigError("cpt.conditions and cpt.generators are both empty: name at least one condition")
        for name in self.conditions:
            if get_strategy(name).source not in ("passage", "generate", "replay"):
                raise RunConfigError(f"cpt.conditions: {name!r} cannot be a CPT condition; use passage, replay or a "
                                     "strategy that writes self-edits (implications, rewrite, self_qa …)")
        if get_strategy(self.strategy).source != "generate":
            raise RunConfigError(f"cpt.strategy {self.strategy!r} does not write self-edits")
        clash = sorted(set(self.generators) & (set(self.conditions) | {"base"}))
        if clash:
            raise RunConfigError(f"cpt.generators names {clash} clash with conditions; name them otherwise")
        if not all(isinstance(v, str) and v for v in self.generators.values()):
            raise RunConfigError(f"cpt.generators maps names to model folders, got {self.generators!r}")
        if isinstance(self.eval_batch, bool) or not isinstance(self.eval_batch, int) or self.eval_batch < 1:
            raise RunConfigError(f"cpt.eval_batch must be a positive integer (passages per evaluation call), got "
                                 f"{self.eval_batch!r}")
        if self.knowledge.train.get("batch_size", 1) < 1:
            raise RunConfigError("train.batch_size must be positive")

    @property
    def all_conditions(self) -> tuple[str, ...]:
        """Every trained condition, in adapter order: ``conditions`` then the generators."""
        return (*self.conditions, *self.generators)

    @classmethod
    def conditions_of(cls, table: dict[str, Any]) -> list[str]:
        return ["base", *(c for c in _condition_names(table.get("conditions", cls.conditions)) if c != "base")]


def _condition_names(value: Any) -> Sequence[str]:
    """``cpt.conditions`` checked: a list of condition names (a string would be read letter by letter).

    Raises:
      RunConfigError: naming ``cpt.conditions``.
    """
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
        raise RunConfigError(f"cpt.conditions must be a list of condition names, like [\"passage\", "
                             f"\"implications\"], got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# Self-edits and the corpus


def passage_selfedits(models: Models, passage: Passage, config: CptConfig,
                      replay: dict[str, list[str]] | None) -> dict[str, list[str | None]]:
    """``{condition: k self-edits}`` of one passage (``passage``: none; see the module docstring)."""
    k = config.knowledge
    out: dict[str, list[str | None]] = {}
    generated = generate_self_edits(models(k.model), passage, k)
    for name in config.conditions:
        strategy = get_strategy(name)
        out[name] = [] if strategy.source == "passage" else list(
            completions_for(strategy, passage, generated.get(name), replay, k.k))
    for name, folder in config.generators.items():
        by_generator = dataclasses.replace(k, conditions=("base", config.strategy))
        out[name] = list(generate_self_edits(models(folder), passage, by_generator)[config.strategy])
    return out


def passage_sequences(passage: Passage, edits: Sequence[str | None]) -> list[str]:
    """What one passage adds to a condition's corpus: its text, then each self-edit's sequences."""
    return [passage.text, *(s for edit in edits for s in training_sequences(passage, edit, include_passage=False))]


def corpus(passages: Sequence[Passage], selfedits: dict[str, dict[str, list[str | None]]], condition: str,
           seed: int) -> list[str]:
    """One condition's training corpus: every passage's :func:`passage_sequences`, shuffled with
    ``derived_seed(seed, "cpt", condition)``."""
    pool = [s for passage in passages for s in passage_sequences(passage, selfedits[passage.id][condition])]
    order = np.random.default_rng(derived_seed(seed, "cpt", condition)).permutation(len(pool))
    return [pool[i] for i in order]


# ----------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class _Cpt:
    """A CPT run under way: its folder, models, passages and what is left of ``stop_after``."""

    config: CptConfig
    out: Path
    models: Models
    passages: list[Passage]
    replay: dict[str, list[str]] | None
    budget: int | None
    progress: bool

    def spent(self) -> bool:
        return self.budget is not None and self.budget <= 0

    def selfedits(self) -> dict[str, dict[str, list[str | None]]] | None:
        """Every passage's self-edits (written to ``selfedits.jsonl`` passage by passage); None when
        ``stop_after`` ran out first."""
        path = self.out / SELFEDITS_FILE
        saved = {r["passage_id"]: r["selfedits"] for r in agree(lambda: read_rows(path))}
        todo = [p for p in self.passages if p.id not in saved]
        for passage in tqdm(todo, desc=f"{self.config.name} self-edits", unit="passage", disable=not self.progress):
            if self.spent():
                return None
            saved[passage.id] = passage_selfedits(self.models, passage, self.config, self.replay)
            if is_writer():
                append_passage(path, [{"passage_id": passage.id, "selfedits": saved[passage.id]}])
            if self.budget is not None:
                self.budget -= 1
        self.models.keep(self.config.knowledge.model)  # the generators are done
        return saved

    def train(self, selfedits: dict[str, dict[str, list[str | None]]]) -> TrainedAdapters:
        """The conditions' adapters: read back from ``adapters/``, or trained together and saved."""
        k, folder, marker = self.config.knowledge, self.out / "adapters", self.out / TRAINING_FILE
        if agree(marker.is_file):
            return load_adapters(folder)
        names = self.config.all_conditions
        corpora = [corpus(self.passages, selfedits, name, k.seed) for name in names]
        trains = [k.train_spec(seed=derived_seed(k.seed, "cpt", name)) for name in names]
        if self.progress:  # one silent call (~700 s at 8B): say what it trains
            t = trains[0]  # the conditions share the run's batching and epochs (their seeds differ)
            say(f"{self.config.name}: training {len(names)} adapters ({', '.join(names)}) in one call: "
                f"{'/'.join(str(len(c)) for c in corpora)} sequences, batch {t.batch_size} x {t.grad_accum} "
                f"accumulated, {t.epochs} epoch(s) ...")
        t0 = time.perf_counter()
        adapters = self.models(k.model).train_adapters(corpora, k.lora_spec(), trains, seed=k.seed)
        if self.progress:
            say(f"{self.config.name}: adapters trained in {time.perf_counter() - t0:.1f} s; saving to {folder}")
        if is_writer():
            adapters.save(folder)
            info = {"conditions": list(names), "sequences": {n: len(c) for n, c in zip(names, corpora, strict=True)},
                    "train_loss": {n: ([loss[0], loss[-1]] if loss else None)
                                   for n, loss in zip(names, adapters.losses, strict=True)},
                    "failed": dict(zip(names, adapters.failed, strict=True))}
            write_json(marker, info)  # whole or not at all: the marker says the adapters are saved
        return adapters

    def _eval_group(self) -> int:
        """Passages in the next evaluation call: ``eval_batch``, no more than ``stop_after`` has left."""
        return max(1, min(self.config.eval_batch, self.budget if self.budget is not None else self.config.eval_batch))

    def evaluate(self, adapters: TrainedAdapters, selfedits: dict[str, dict[str, list[str | None]]]) -> bool:
        """Base and adapters on every passage's questions, rows appended per passage; False when
        ``stop_after`` ran out first."""
        k, results = self.config.knowledge, self.out / "results.jsonl"
        lm = self.models(k.model)
        grader = make_grader(k, lm)
        done = set(agree(lambda: passages_done(results)))
        todo = [p for p in self.passages if p.id not in done]
        if todo:  # answering reads these; the float32 ones (saved) can go
            adapters = lm.ready_adapters(adapters)
        bar = tqdm(total=len(self.passages), initial=len(self.passages) - len(todo), desc=f"{self.config.name} "
                   "evaluation", unit="passage", disable=not self.progress)
        while todo:
            if self.spent():
                bar.close()
                return False
            n = self._eval_group()
            group, todo = todo[:n], todo[n:]
            t0 = time.perf_counter()
            bases = score_base_many(lm, group, k, grader)
            scored = score_adapters_many(lm, group, k, grader, adapters)
            share = (time.perf_counter() - t0) / len(group)
            for j, (passage, base) in enumerate(zip(group, bases, strict=True)):
                rows = [result_row(passage, "base", 0, None, 0, base.measure, base.measure, base.answers, None,
                                   reward=k.reward)]
                for i, (name, (answers, after)) in enumerate(zip(self.config.all_conditions, scored[j], strict=True)):
                    n = len(passage_sequences(passage, selfedits[passage.id][name]))
                    rows.append(result_row(passage, name, 0, None, n, base.measure, after, answers,
                                           adapters.failed[i], reward=k.reward))
                record_passage(results, rows, time.perf_counter() - share)  # seconds: its share of the call
                if self.budget is not None:
                    self.budget -= 1
            bar.update(len(group))
        bar.close()
        return True


def run_cpt(config: CptConfig, out_dir: str | Path, *, resume: bool = False, lm: LanguageModel | None = None,
            progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) CPT into ``out_dir``; returns the summary (see the module docstring).

    ``lm`` reuses the loaded model; ``stop_after`` stops after that many newly finished passages (self-edits
    and evaluation together), to test resumption. Writes ``run_config.json``, ``selfedits.jsonl``,
    ``adapters/``, ``training.json``, ``results.jsonl``, ``summary.json`` and ``summary.md``.
    """
    out = Path(out_dir)
    if not resume and agree(lambda: (out / SELFEDITS_FILE).exists()):
        raise FileExistsError(f"{out} already holds a CPT run; pass --resume to continue it or choose another --out")
    k = config.knowledge
    passages, replay = select_data(k.data, replay="replay" in config.conditions)  # (before the folder is made)
    save_run_config(out, config.to_json(), resume=resume)
    run = _Cpt(config, out, Models(k, lm, what="a CPT generator", progress=progress), passages, replay, stop_after,
               progress)
    selfedits = run.selfedits()
    if selfedits is not None:
        run.evaluate(run.train(selfedits), selfedits)
    return _write_summary(config, out)


def _write_summary(config: CptConfig, out: Path) -> dict[str, Any]:
    summary = summarize(agree(lambda: read_rows(out / "results.jsonl", repair=False)), config.knowledge.model)
    if is_writer():
        write_json(out / "summary.json", summary, ensure_ascii=True)
        write_text(out / "summary.md", summary_markdown(summary))
    return summary
