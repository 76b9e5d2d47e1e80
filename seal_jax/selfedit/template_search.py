"""Search over self-edit templates (Cheong et al., arXiv 2601.14532): the model writes its own strategies.

An **iteration** (folder ``iteration-N/``):

1. **Propose.** The current generator is asked for ``templates_per_iteration`` templates with one
   meta-prompt (:func:`~seal_jax.selfedit.meta_prompts.meta_prompt`): without an archive (``noarchive``), or
   showing the archive's best, second best, second worst and worst entries (``archive``; ``novelty`` ranks
   them by score + λ·novelty, :class:`~seal_jax.selfedit.archive.NoveltyArchive`). Slots follow the
   paper's schedule, 3 exploit + 2 explore (:data:`~seal_jax.selfedit.meta_prompts.PROPOSAL_SCHEDULE`);
   invalid answers are retried up to ``max_retries`` times; every attempt, with its rejection reason, is in
   ``proposals.jsonl``. Valid templates get ids ``itN-tS`` (S = slot).
2. **Score.** For every training passage: the inner-loop model answers the questions (accuracy before);
   every valid template is filled ``fills`` times (one batched ``generate`` for all templates × fills);
   each fill is parsed as ``{"training_sequences": [...]}`` (``fill_fallback = "lines"`` splits the raw
   text by SEAL's rules when that fails; failures are rows with the reason, never crashes); every usable
   (template, fill) trains as one candidate of ONE ``train_adapters`` call with the template's own rank,
   alpha, dropout, learning rate, epochs (capped by ``max_epochs`` if set) and grad-accum; all adapters
   answer at once (K stacked); rows are appended per passage to ``results.jsonl``. Row schema: the
   knowledge rows' (:data:`~seal_jax.selfedit.knowledge.ROW_FIELDS`, ``condition`` = template id,
   ``candidate`` = fill index) plus ``template_id``, ``fill_index``, ``normalized_gain``, ``template``,
   ``fill_sequences`` and ``fill_fallback``. A template's **score** is its mean ``accuracy_after`` over
   its fills and passages (a fill that gave no training data counts as the accuracy before: nothing was
   learned); its **gain** the mean normalized gain ``(after − before) / (1 − before)``. With
   ``reward = "gold_loglik"`` the score is the mean log-likelihood per token of the gold answers after the
   update and the gain its change from before (a dense signal where accuracy is flat at small scale); the
   archive's human seeds are then scored by the run itself first (``seeds/``, see ``seed_scores``), as the
   papers have no such figures, and the meta-prompt says what a score measures (``novelty`` adds
   λ·novelty to a score in nats then: its default λ was chosen for accuracies). Scored templates
   join the archive (``archive.jsonl`` at the top of the run: the seeds plus every finished iteration's
   entries; the ``noarchive`` variant keeps it too, for the record, but never shows it).
3. **Evaluate** (optional ``eval_data``): the iteration's best template is scored the same way on
   held-out passages (``iteration-N/eval/results.jsonl``), which the training passages never include.
4. **SFT** (``sft = true``, every iteration but the last): ReST-EM on the iteration's results —
   :func:`~seal_jax.selfedit.archive.select_top` keeps the top ``sft_top_k`` templates of each passage
   with their best fill, giving (meta-prompt → template JSON) and (fill prompt → fill JSON) pairs
   (``sft_rows.jsonl``, prompts with the chat template applied, completions canonical JSON — templates in
   the seed paper's nested form — so the model learns the format); the generator is fine-tuned on them
   (loss on the completion only; SEAL's r=64, alpha=128, all projections, lr 3e-4, 2 epochs by default),
   merged and exported to ``iteration-N/generator/``, which proposes and fills in iteration N+1
   (``sft_positive_gain_only`` keeps only fills that beat the accuracy before; with no pair left the
   generator carries over unchanged).

**Which model adapts.** With ``inner_model = "generator"`` (the default) the LoRA updates of the inner
loop are applied to the current generator, as in SEAL's self-adaptation (and our ReST-EM): the model that
writes the templates is the one they teach; accuracy before is recomputed per iteration, and the
normalized gain is relative to that model. ``inner_model = "base"`` keeps the starting model for training
and answering (only proposing and filling evolve), which makes scores of different iterations measure the
templates alone.

**Passages.** Every iteration scores its templates on the **same** ``passages`` training passages (the
paper's 50), so scores are comparable across iterations and with the archive's entries; ``data`` is the
pool they are taken from (from ``data.start``).

**Resume.** ``iteration.json`` is written last; a finished iteration is never redone. Inside an iteration
the proposals and the meta-prompt they answered are read back from ``proposals.jsonl`` and
``meta_prompt.txt`` (never rebuilt, so the SFT pairs the templates with the prompt the generator saw),
scoring resumes after the last finished passage (a torn last line is dropped), and the SFT is redone from
the rows. Seeds never depend on the order of work: proposals draw from (seed, iteration), each slot kind
and attempt with its own seed (:func:`~seal_jax.selfedit.proposals.propose`); a passage's fills are one
batched ``generate`` with one seed from (seed, ``train``/``eval``, iteration, passage), each fill drawing
by its row in that batch (templates in slot order × fill index, fixed by the proposals); each candidate's
training seed derives from (seed, ``train``/``eval``, iteration, passage, template, fill). So a resumed
run gives the same rows as an uninterrupted one. The archive is rebuilt from the seeds and the finished
iterations' ``iteration.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from seal_jax.lm.tokenizer import format_chat
from seal_jax.lm.types import LoraSpec, SamplingParams, TrainSpec
from seal_jax.selfedit.archive import Archive, ArchiveEntry, NoveltyArchive, seed_templates, select_top
from seal_jax.selfedit.data import Passage
from seal_jax.selfedit.engine import LanguageModel
from seal_jax.selfedit.episode import BatchGrader, Job, make_grader, score_base, train_and_score
from seal_jax.selfedit.generator import (
    GeneratorError,
    Models,
    SftResult,
    resolved_generator_path,
    sft_spec,
    stored_generator_path,
    train_and_export,
)
from seal_jax.selfedit.meta_prompts import PROPOSAL_SCHEDULE, fill_prompt, meta_prompt
from seal_jax.selfedit.multihost import agree, is_writer, say
from seal_jax.selfedit.proposals import Proposal, chosen, propose, schedule
from seal_jax.selfedit.results import (
    number_cell,
    passages_done,
    read_rows,
    read_state,
    record_passage,
    result_row,
    write_json,
    write_jsonl,
    write_text,
)
from seal_jax.selfedit.resume import check_run_config
from seal_jax.selfedit.run_config import (
    SELFEDIT_SAMPLING,
    ExtendedConfig,
    RunConfig,
    RunConfigError,
    check_data_table,
    derived_seed,
    pool_passages,
    select_data,
)
from seal_jax.selfedit.strategies import FILL_FALLBACKS, fill_pieces, pieces_to_sequences
from seal_jax.selfedit.template_errors import name_length_key
from seal_jax.selfedit.template_stats import (
    check_similarity_backend,
    diversity,
    template_scores,
    template_units,
)
from seal_jax.selfedit.templates import Template, TemplateError

VARIANTS = ("noarchive", "archive", "novelty")
INNER_MODELS = ("generator", "base")
ITERATION_FILE = "iteration.json"
META_PROMPT_FILE = "meta_prompt.txt"
TEMPLATE_ROW_FIELDS = ("template_id", "fill_index", "normalized_gain", "template", "fill_sequences", "fill_fallback")
NOVELTY_DEFAULTS: dict[str, Any] = {"k": 3, "weight": 0.5, "lam": 0.25}
SEED_SCORE_CHOICES = ("paper", "rescore")
SEEDS_FILE = "seeds.json"
# What to do about a damaged state file of a template-search folder (see results.read_state).
ITERATION_REMEDY = ("delete it and resume: the iteration's proposals and rows are kept, and its end (scores, archive "
                    "entries, SFT) is done again from them")
SEEDS_REMEDY = "delete it and resume: the seeds' scores are computed again from seeds/results.jsonl beside it"


def check_novelty(novelty: Any, variant: str) -> None:
    """Check a ``[templates.novelty]`` table: only for the ``novelty`` variant, its keys those of
    :data:`NOVELTY_DEFAULTS`, ``k`` (nearest neighbours a novelty averages over) a positive integer,
    ``weight`` (the instruction's share of a distance) in [0, 1], ``lam`` (novelty's weight in a rank) a
    finite number >= 0.

    Raises:
      RunConfigError: naming the key and what it must be.
    """
    if not isinstance(novelty, dict):
        raise RunConfigError(f"templates.novelty must be a table with keys from {sorted(NOVELTY_DEFAULTS)}, "
                             f"got {novelty!r}")
    if novelty and variant != "novelty":
        raise RunConfigError(f"[templates.novelty] sets the novelty archive, but templates.variant is {variant!r}, "
                             "which does not use it: remove the table, or set variant = 'novelty'")
    unknown = sorted(set(novelty) - set(NOVELTY_DEFAULTS))
    if unknown:
        raise RunConfigError(f"unknown keys in [templates.novelty]: {unknown}; known keys: {sorted(NOVELTY_DEFAULTS)}")

    def number(key: str) -> float | None:
        value = novelty.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RunConfigError(f"templates.novelty.{key} must be a finite number, got {value!r}")
        return float(value)

    k = novelty.get("k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise RunConfigError(f"templates.novelty.k (the nearest entries a novelty averages over) must be a positive "
                             f"integer, got {k!r}")
    weight, lam = number("weight"), number("lam")
    if weight is not None and not 0.0 <= weight <= 1.0:
        raise RunConfigError(f"templates.novelty.weight (the instruction's share of a distance) must lie in [0, 1], "
                             f"got {weight!r}")
    if lam is not None and lam < 0:
        raise RunConfigError(f"templates.novelty.lam (novelty's weight in score + lam * novelty) must be >= 0, got "
                             f"{lam!r}")


class TemplateSearchError(GeneratorError):
    """A template search that cannot go on (e.g. the generator's SFT diverged)."""


@dataclasses.dataclass(frozen=True)
class TemplateSearchConfig(ExtendedConfig):
    """A template-search run: knowledge-run keys at the top level plus a ``[templates]`` table.

    Attributes:
      knowledge: the inner loop's :class:`~seal_jax.selfedit.knowledge.RunConfig` (model, mesh, ``data`` =
        the passage pool, ``selfedit_sampling`` = fill sampling, ``lora.targets``, ``train`` fields other
        than the template's, ``include_passage``, grader, seed); its conditions are ``("base",)``.
      variant: ``noarchive``, ``archive`` or ``novelty``.
      iterations: search iterations; templates_per_iteration: T (5 = 3 exploit + 2 explore).
      fills: F fills per template and passage; passages: N training passages (the same every iteration).
      proposal_max_new_tokens, fill_max_new_tokens: generation lengths; max_retries: extra attempts per
        invalid proposal.
      fill_fallback: ``"none"`` or ``"lines"`` (split a fill that is not valid JSON by SEAL's rules; for
        small models; recorded per row).
      max_epochs: cap on a template's epochs (CPU budgets), or ``None`` for the template's own.
      novelty: ``{k, weight, lam}`` of the :class:`~seal_jax.selfedit.archive.NoveltyArchive`.
      similarity_backend: instruction embeddings for the diversity metrics and novelty: ``auto`` (MiniLM
        when fetched, else TF-IDF), ``embeddings`` (a run refuses to start unless MiniLM is fetched) or
        ``tfidf``.
      inner_model: ``generator`` (the evolving model takes the LoRA updates) or ``base``.
      sft: ReST-EM SFT of the generator between iterations; sft_top_k: templates kept per passage;
        sft_positive_gain_only: keep only fills whose reward (accuracy or gold log-likelihood) beat the one
          before;
        sft_lora, sft_train: :class:`~seal_jax.LoraSpec`/:class:`~seal_jax.TrainSpec` fields over SEAL's
        r=64, alpha=128, all projections, lr 3e-4, 2 epochs, batch 1.
      seed_scores: the human seeds' archive scores: ``"paper"`` (SEAL's accuracies, the default with
        ``reward = "accuracy"``) or ``"rescore"`` (the starting model scores the four seeds on the training
        passages before iteration 1, into ``seeds/``; the default with ``reward = "gold_loglik"``, except for
        ``noarchive``, whose archive then holds no seeds; ``"paper"`` is refused there).
      eval_data: held-out passages for each iteration's best template (a data table, see
        :func:`~seal_jax.selfedit.knowledge.select_data`: ``{source, n, start, shuffle, seed}``, or
        ``subset = "selfedits"`` with ``selfedits`` for SEAL's 200 evaluation passages), or ``None``; the
        training passages skip them.
    """

    knowledge: RunConfig
    variant: str = "archive"
    iterations: int = 3
    templates_per_iteration: int = 5
    fills: int = 3
    passages: int = 50
    proposal_max_new_tokens: int = 512
    fill_max_new_tokens: int = 1024
    max_retries: int = 2
    fill_fallback: str = "none"
    max_epochs: int | None = None
    novelty: dict[str, Any] = dataclasses.field(default_factory=dict)
    similarity_backend: str = "auto"
    inner_model: str = "generator"
    sft: bool = True
    sft_top_k: int = 2
    sft_positive_gain_only: bool = False
    sft_lora: dict[str, Any] = dataclasses.field(default_factory=dict)
    sft_train: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_data: dict[str, Any] | None = None
    seed_scores: str | None = None

    TABLE = "templates"
    KIND = "template-search"
    CONDITIONS_NOTE = "has no conditions (the templates are the conditions; base is always evaluated)"
    POOL_HINT = "set templates.passages instead of data.n"

    def __post_init__(self) -> None:
        check_data_table(self.eval_data, "templates.eval_data")
        if self.variant not in VARIANTS:
            raise RunConfigError(f"templates.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.inner_model not in INNER_MODELS:
            raise RunConfigError(f"templates.inner_model must be one of {INNER_MODELS}, got {self.inner_model!r}")
        if self.fill_fallback not in FILL_FALLBACKS:
            raise RunConfigError(f"templates.fill_fallback must be one of {FILL_FALLBACKS}, got {self.fill_fallback!r}")
        check_similarity_backend(self.similarity_backend)
        for name in ("iterations", "templates_per_iteration", "fills", "passages", "proposal_max_new_tokens",
                     "fill_max_new_tokens", "sft_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RunConfigError(f"templates.{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise RunConfigError(f"templates.max_retries must be an integer >= 0, got {self.max_retries!r}")
        if self.max_epochs is not None and (not isinstance(self.max_epochs, int) or self.max_epochs < 1):
            raise RunConfigError(f"templates.max_epochs must be a positive integer or absent, got {self.max_epochs!r}")
        check_novelty(self.novelty, self.variant)
        if self.seed_scores not in (None, *SEED_SCORE_CHOICES):
            raise RunConfigError(f"templates.seed_scores must be one of {SEED_SCORE_CHOICES}, got {self.seed_scores!r}")
        if self.knowledge.reward != "accuracy" and self.seed_scores == "paper":
            raise RunConfigError(f"templates.seed_scores = 'paper' gives the seeds accuracies, but reward = "
                                 f"{self.knowledge.reward!r} scores templates in nats/token; use 'rescore' (or "
                                 "leave it out) so the run scores the seeds itself")
        if self.knowledge.train.get("batch_size", 1) != 1:
            raise RunConfigError("templates train with batch size 1 (the paper's); remove train.batch_size")
        self.make_archive()  # checks the novelty knobs and the backend
        self.sft_lora_spec()
        self.sft_train_spec()

    @property
    def rescore_seeds(self) -> bool:
        """Whether the run scores the human seeds itself: ``seed_scores``, or by default with a dense reward
        unless the variant never shows the archive (``noarchive``: its archive, kept for the record, then
        holds no seeds)."""
        if self.seed_scores is not None:
            return self.seed_scores == "rescore"
        return self.knowledge.reward != "accuracy" and self.variant != "noarchive"

    def make_archive(self, entries: Sequence[ArchiveEntry] | None = None,
                     seeds: Sequence[ArchiveEntry] | None = None) -> Archive:
        """The variant's archive: the seeds (the paper's scores, or ``seeds`` as the run scored them) plus
        ``entries``; a :class:`NoveltyArchive` for ``novelty``."""
        try:
            if self.variant == "novelty":
                knobs = {**NOVELTY_DEFAULTS, **self.novelty, "backend": self.similarity_backend}
                archive: Archive = NoveltyArchive(seeds, **knobs) if seeds is not None else NoveltyArchive.seeded(**knobs)
            else:
                archive = Archive(seeds) if seeds is not None else Archive.seeded()
            for entry in entries or ():
                archive.add(entry)
        except TemplateError as e:
            raise RunConfigError(f"templates.novelty or templates.similarity_backend: {e}") from None
        return archive

    def sft_lora_spec(self) -> LoraSpec:
        """The generator's SFT :class:`~seal_jax.LoraSpec` (SEAL: r=64, alpha=128, all projections; an
        invalid table is a :class:`RunConfigError` naming ``templates.sft_lora``)."""
        spec = sft_spec("templates", "sft_lora", self.sft_lora)
        assert isinstance(spec, LoraSpec)
        return spec

    def sft_train_spec(self) -> TrainSpec:
        """The generator's SFT :class:`~seal_jax.TrainSpec` (SEAL: lr 3e-4, 2 epochs, batch 1; an invalid
        table is a :class:`RunConfigError` naming ``templates.sft_train``)."""
        spec = sft_spec("templates", "sft_train", self.sft_train)
        assert isinstance(spec, TrainSpec)
        return spec

    @classmethod
    def conditions_of(cls, table: dict[str, Any]) -> list[str]:
        return ["base"]


# ----------------------------------------------------------------------------------------------------
# Passages


def eval_passages(config: TemplateSearchConfig) -> list[Passage]:
    """The held-out evaluation passages (``templates.eval_data``, see :func:`select_data`; none without it)."""
    if config.eval_data is None:
        return []
    return select_data(config.eval_data, where="templates.eval_data")[0]


def training_passages(config: TemplateSearchConfig, held_out: Sequence[Passage] = ()) -> list[Passage]:
    """The N training passages every iteration scores its templates on: the first ``templates.passages``
    of the pool (``data``: its source from ``data.start``, shuffled if asked), skipping the ``held_out``
    evaluation passages."""
    d = config.knowledge.data
    pool = pool_passages(d, held_out)[: config.passages]
    if len(pool) < config.passages:
        raise RunConfigError(f"the passage pool has {len(pool)} passages from data.start={d.get('start', 0)}"
                             f"{' besides the evaluation passages' if held_out else ''}; templates.passages = "
                             f"{config.passages}")
    return pool


# ----------------------------------------------------------------------------------------------------
# One passage


def template_passage_rows(inner: LanguageModel, generator: LanguageModel, passage: Passage,
                          templates: Sequence[tuple[str, Template]], config: TemplateSearchConfig, grader: BatchGrader,
                          *, iteration: int, tag: str = "train") -> list[dict[str, Any]]:
    """All rows of one passage: the base row, then one row per (template, fill).

    Args:
      inner: the model that answers before, takes the LoRA updates and answers after.
      generator: the model that fills the templates (``inner`` itself unless ``inner_model = "base"``).
      templates: ``[(template_id, Template)]``.
      tag: ``"train"`` or ``"eval"`` (part of the seeds).
    Returns:
      rows with the knowledge schema plus :data:`TEMPLATE_ROW_FIELDS` (the base row has ``template_id`` None).
    """
    k = config.knowledge
    base = score_base(inner, passage, k, grader)
    before = base.measure
    common = {"iteration": iteration}
    rows = [result_row(passage, "base", 0, None, 0, before, before, base.answers, None, reward=k.reward,
                       template_id=None, fill_index=None, template=None, fill_sequences=None, fill_fallback=None,
                       **common)]
    if not templates:
        return rows
    prompts = [fill_prompt(t, passage.title, passage.context) for _, t in templates for _ in range(config.fills)]
    params = SamplingParams(**{**SELFEDIT_SAMPLING, **k.selfedit_sampling,
                               "max_new_tokens": config.fill_max_new_tokens,
                               "seed": derived_seed(k.seed, tag, iteration, passage.id, "fill")})
    jobs = []
    for i, text in enumerate(generator.generate(prompts, params, chat=k.chat)):
        tid, template = templates[i // config.fills]
        f = i % config.fills
        try:
            pieces, fallback = fill_pieces(text, config.fill_fallback)
        except ValueError as error:
            reason = name_length_key(f"fill: {error}", "templates.fill_max_new_tokens")
            rows.append(result_row(passage, tid, f, text, 0, before, before, [], reason, reward=k.reward,
                                   fill_sequences=None, fill_fallback=False, template_id=tid, fill_index=f,
                                   template=template.to_dict(), **common))
            continue
        lora, train = k.template_specs(template, derived_seed(k.seed, tag, iteration, passage.id, tid, f),
                                       config.max_epochs)
        jobs.append(Job(tid, f, text, pieces_to_sequences(passage, pieces, include_passage=k.include_passage), lora,
                        train, {"template_id": tid, "fill_index": f, "template": template.to_dict(),
                                "fill_sequences": pieces, "fill_fallback": fallback, "epochs": train.epochs, **common}))
    return rows + train_and_score(inner, passage, jobs, config=k, grader=grader, before=before)


# ----------------------------------------------------------------------------------------------------
# SFT rows (the scores and diversity it reports: template_stats)


def sft_pairs(rows: Sequence[dict[str, Any]], passages: dict[str, Passage], templates: dict[str, Template],
              meta: str, *, k: int, chat: bool, tokenizer: Any = None, positive_gain_only: bool = False,
              reward: str = "accuracy") -> list[dict[str, Any]]:
    """The SFT rows of one iteration: :func:`~seal_jax.selfedit.archive.select_top` over its template
    rows (top ``k`` templates per passage, each with its best fill, ranked by ``reward``: the accuracy or
    the gold log-likelihood after the update); with ``positive_gain_only`` only fills whose reward beat
    the one before compete.

    Prompts are the exact texts the generator saw (chat template applied when ``chat``); completions are
    the template's canonical JSON (the seed paper's nested form, :meth:`Template.to_json`) and the fill's
    training texts as ``{"training_sequences": [...]}``.
    Returns ``{kind, prompt, completion, template_id, passage_id, fill_index, score, unit, rank}`` rows
    (``score``: the fill's reward after the update, in ``unit``: ``accuracy`` or ``gold_loglik``).
    """
    def wrap(text: str) -> str:
        return format_chat(tokenizer, text) if chat else text

    candidates = []
    for r in rows:
        if not r.get("template_id") or not r.get("fill_sequences"):
            continue
        measure = "accuracy" if reward == "accuracy" else "gold_loglik"
        if positive_gain_only and not r[f"{measure}_after"] > r[f"{measure}_before"]:
            continue
        template, passage = templates[r["template_id"]], passages[r["passage_id"]]
        candidates.append({
            "template_id": r["template_id"], "passage_id": r["passage_id"], "fill_index": r["fill_index"],
            "score": r[f"{measure}_after"], "unit": measure, "error": r.get("failure"), "meta_prompt": wrap(meta),
            "template_text": template.to_json(),
            "fill_prompt": wrap(fill_prompt(template, passage.title, passage.context)),
            "fill_text": json.dumps({"training_sequences": r["fill_sequences"]}, ensure_ascii=False)})
    return select_top(candidates, k=k)


def train_generator(lm: LanguageModel, rows: Sequence[dict[str, Any]], config: TemplateSearchConfig, target: Path,
                    *, label: str | None = None, progress: bool = True) -> SftResult:
    """SFT of ``lm`` on ``(prompt, completion)`` rows (loss on the completion only), merged and exported to
    ``target`` (see :func:`~seal_jax.selfedit.generator.train_and_export`, which announces each step on
    stderr with ``progress``, its lines starting with ``label``); raises :class:`TemplateSearchError` if
    the SFT cannot start or diverged."""
    return train_and_export(lm, rows, config.sft_lora_spec(), config.sft_train_spec(), seed=config.knowledge.seed,
                            target=target, table="templates", error=TemplateSearchError, label=label,
                            progress=progress)


# ----------------------------------------------------------------------------------------------------
# The run


def _entries_of(info: dict[str, Any]) -> list[ArchiveEntry]:
    return [ArchiveEntry.from_dict(e) for e in info.get("entries", [])]


def _iteration_info(out: Path, it: int) -> dict[str, Any] | None:
    """Iteration ``it``'s ``iteration.json`` (None until the iteration has finished)."""
    return read_state(out / f"iteration-{it}" / ITERATION_FILE, ITERATION_REMEDY, keys=("next_generator",))




@dataclasses.dataclass
class _Search:
    """A template search under way: its folder, models, passages and what is left of ``stop_after``."""

    config: TemplateSearchConfig
    out: Path
    models: Models
    training: list[Passage]
    held_out: list[Passage]
    budget: int | None
    progress: bool
    graders: dict[str, BatchGrader] = dataclasses.field(default_factory=dict)

    def grader(self, path: str) -> BatchGrader:
        """The run's grader for the model at ``path`` (one kept: a judge asks the inner model)."""
        if path not in self.graders:
            self.graders.clear()
            self.graders[path] = make_grader(self.config.knowledge, self.models(path))
        return self.graders[path]

    def score(self, passages: Sequence[Passage], results: Path, templates: Sequence[tuple[str, Template]],
              iteration: int, tag: str, inner: str, generator: str) -> bool:
        """Score ``templates`` on the passages not yet in ``results`` (rows appended per passage), ``inner``
        training and answering, ``generator`` filling. False when ``stop_after`` ran out first."""
        done = set(agree(lambda: passages_done(results)))
        todo = [p for p in passages if p.id not in done]
        bar = tqdm(todo, desc=f"{self.config.name} iteration {iteration} {tag}", unit="passage",
                   disable=not self.progress, initial=len(passages) - len(todo), total=len(passages))
        for passage in bar:
            if self.budget is not None and self.budget <= 0:
                return False
            t0 = time.perf_counter()
            rows = template_passage_rows(self.models(inner), self.models(generator), passage, templates, self.config,
                                         self.grader(inner), iteration=iteration, tag=tag)
            record_passage(results, rows, t0)
            if self.budget is not None:
                self.budget -= 1
        return True

    def propose(self, it: int, folder: Path, archive: Archive, generator: str) -> tuple[str, list[Proposal]]:
        """The iteration's meta-prompt and proposals: read back on resume (never rebuilt, so the SFT pairs
        the templates with the prompt the generator saw), else asked of ``generator`` and saved."""
        config, k = self.config, self.config.knowledge
        proposals_file, meta_file = folder / "proposals.jsonl", folder / META_PROMPT_FILE
        saved = agree(lambda: read_rows(proposals_file) if proposals_file.is_file() else None)
        # On resume, the prompt the saved proposals answered: rebuilt, it could differ (``novelty`` with backend
        # ``auto`` ranks otherwise if the MiniLM weights appeared or vanished since).
        meta = None
        if saved is not None:
            meta = agree(lambda: meta_file.read_text(encoding="utf-8") if meta_file.is_file() else None)
        if meta is None:  # process 0's prompt for all: the similarity backend depends on files a host may lack
            meta = agree(lambda: meta_prompt(archive.shown() if config.variant != "noarchive" else None, k.reward))
        if saved is not None:
            return meta, [Proposal.from_dict(r) for r in saved]
        kinds = schedule(config.templates_per_iteration, PROPOSAL_SCHEDULE)
        lm, t0 = self.models(generator), time.perf_counter()
        if self.progress:
            say(f"{config.name} iteration {it}: proposing {len(kinds)} templates ...")
        records = propose(lm, meta, kinds, max_new_tokens=config.proposal_max_new_tokens,
                          max_retries=config.max_retries, seed=derived_seed(k.seed, "iteration", it), chat=k.chat)
        records = [dataclasses.replace(r, reason=name_length_key(r.reason, "templates.proposal_max_new_tokens"))
                   for r in records]
        if self.progress:
            say(f"{config.name} iteration {it}: {len(chosen(records))} valid templates of {len(records)} attempts in "
                f"{time.perf_counter() - t0:.1f} s")
        if is_writer():  # the prompt first: proposals.jsonl marks the step done
            write_text(meta_file, meta)
            write_jsonl(proposals_file, [{"iteration": it, **r.to_dict()} for r in records])
        return meta, records

    def seed_entries(self) -> list[ArchiveEntry] | None | bool:
        """The human seeds as the run scores them (``seed_scores = "rescore"``): the starting model fills
        and trains on each seed template over the training passages (``seeds/results.jsonl``, rows per
        passage, ``iteration`` 0), and ``seeds/seeds.json`` is written last. None when the seeds keep the
        paper's scores, an empty list for a dense reward without rescoring; False when ``stop_after`` ran out
        first."""
        config, k = self.config, self.config.knowledge
        if not config.rescore_seeds:
            return None if k.reward == "accuracy" else []  # the paper's seeds are accuracies: none here
        folder = self.out / "seeds"
        marker = folder / SEEDS_FILE
        saved = agree(lambda: read_state(marker, SEEDS_REMEDY, keys=("entries",)))
        if saved is None:
            if is_writer():
                folder.mkdir(parents=True, exist_ok=True)
            templates = list(seed_templates().items())
            if not self.score(self.training, folder / "results.jsonl", templates, 0, "seeds", k.model, k.model):
                return False
            scores = template_scores(agree(lambda: read_rows(folder / "results.jsonl")), k.reward)
            entries = [ArchiveEntry(t, scores[name]["score"], scores[name]["gain"], 0, "human", name, unit=k.reward)
                       for name, t in templates]
            saved = {"reward": k.reward, "entries": [e.to_dict() for e in entries], "scores": scores}
            if is_writer():
                write_json(marker, saved)
        return _entries_of(saved)

    def iteration(self, it: int, generator: str, entries: Sequence[ArchiveEntry],
                  seeds: Sequence[ArchiveEntry] | None = None) -> dict[str, Any] | None:
        """Propose, score, evaluate and SFT for iteration ``it`` (``seeds``: the rescored seeds, or None for
        the paper's); its ``iteration.json`` record, or None when ``stop_after`` ran out first."""
        config, k = self.config, self.config.knowledge
        folder = self.out / f"iteration-{it}"
        if is_writer():
            folder.mkdir(parents=True, exist_ok=True)
        archive = config.make_archive(entries, seeds)
        inner = generator if config.inner_model == "generator" else k.model
        self.models.keep(generator, inner)  # an earlier generator goes
        meta, records = self.propose(it, folder, archive, generator)
        templates = [(f"it{it}-t{slot}", t) for slot, t in chosen(records).items()]
        if not self.score(self.training, folder / "results.jsonl", templates, it, "train", inner, generator):
            return None
        rows = agree(lambda: read_rows(folder / "results.jsonl"))
        scores = template_scores(rows, k.reward)
        new_entries = [ArchiveEntry(t, scores[tid]["score"], scores[tid]["gain"], it, "generated", tid, unit=k.reward)
                       for tid, t in templates if tid in scores]
        best = max(new_entries, key=lambda e: (e.score, -int(e.name.rsplit("t", 1)[1])), default=None)
        if self.held_out and best is not None:
            if is_writer():
                (folder / "eval").mkdir(exist_ok=True)
            if not self.score(self.held_out, folder / "eval" / "results.jsonl", [(best.name, best.template)], it,
                              "eval", inner, generator):
                return None
        def stored(path: str) -> str:  # the run's own generators relative to its folder (iteration.json)
            return stored_generator_path(self.out, path, "iteration")

        info: dict[str, Any] = {"iteration": it, "generator": stored(generator), "inner_model": stored(inner),
                                "meta_prompt": meta,
                                "shown": [e.name for e in archive.shown()] if config.variant != "noarchive" else [],
                                "entries": [e.to_dict() for e in new_entries], "scores": scores,
                                "best": best.name if best else None,
                                "next_generator": stored(generator),
                                "sft_rows": None, "sft_loss": None}
        if config.sft and it < config.iterations:
            by_id = {p.id: p for p in [*self.training, *self.held_out]}
            pairs = sft_pairs(rows, by_id, dict(templates), meta, k=config.sft_top_k, chat=k.chat,
                              tokenizer=self.models(generator).tokenizer,
                              positive_gain_only=config.sft_positive_gain_only, reward=k.reward)
            if is_writer():
                write_jsonl(folder / "sft_rows.jsonl", pairs)
            info["sft_rows"] = len(pairs)
            if pairs:
                sft = train_generator(self.models(generator), pairs, config, folder / "generator",
                                      label=f"{config.name} iteration {it}", progress=self.progress)
                info.update(next_generator=stored(sft.generator), sft_loss=sft.sft_loss)
            else:
                info["note"] = "no fill was selected for SFT; the generator is unchanged"
        if is_writer():
            write_json(folder / ITERATION_FILE, info)
            config.make_archive([*entries, *new_entries], seeds).to_jsonl(self.out / "archive.jsonl")
        return info


def run_template_search(config: TemplateSearchConfig, out_dir: str | Path, *, resume: bool = False,
                        lm: LanguageModel | None = None, progress: bool = True, stop_after: int | None = None,
                        loader: Callable[[str], LanguageModel] | None = None) -> dict[str, Any]:
    """Run (or resume) a template search into ``out_dir``; returns the summary (see the module docstring).

    ``lm`` is the loaded starting model (later iterations load their generator from
    ``iteration-N/generator/``). ``stop_after`` stops after that many newly finished passages (training
    and evaluation), to test resumption. ``loader(path)`` loads a model folder (default: ``seal_jax.load``
    with the config's dtype, mesh (else ``lm``'s) and tokenizer). Writes ``run_config.json``,
    ``archive.jsonl``, ``iteration-N/…``, ``summary.json`` and ``summary.md``. In a multi-host run only
    process 0 writes and every process follows process 0's folder (:mod:`seal_jax.selfedit.multihost`); the
    folder must be shared, since every process loads the next generator from it.
    """
    # process 0 (which writes the summary) looks for the encoder; its verdict reaches every process
    agree(lambda: check_similarity_backend(config.similarity_backend, here=True))
    out = Path(out_dir)
    held_out = eval_passages(config)  # the data first: a refused selection writes no folder
    training = training_passages(config, held_out)
    config_file = out / "run_config.json"

    def check_folder() -> None:
        if not resume and config_file.is_file() and any(out.glob("iteration-*")):
            raise FileExistsError(f"{out} already holds a template search; pass --resume to continue it or "
                                  "choose another --out")
        check_run_config(out, config.to_json(), resume=resume)  # (a damaged run_config.json: an error naming it)
        if resume:  # every state file the run reads back, before a model loads
            read_state(out / "seeds" / SEEDS_FILE, SEEDS_REMEDY, keys=("entries",))
            for it in range(1, config.iterations + 1):
                _iteration_info(out, it)

    agree(check_folder)
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
        write_json(config_file, config.to_json(), ensure_ascii=True)
    models = Models(config.knowledge, lm, what="the template-search generator", progress=progress, loader=loader)
    search = _Search(config, out, models, training, held_out, stop_after, progress)
    generator = config.knowledge.model
    entries: list[ArchiveEntry] = []
    seeds = search.seed_entries()
    if seeds is False:
        return _write_summary(config, out)
    for it in range(1, config.iterations + 1):
        info = agree(lambda i=it: _iteration_info(out, i))
        if info is None:
            info = search.iteration(it, generator, entries, seeds)
            if info is None:
                return _write_summary(config, out)
            agree(lambda: None)  # the other processes wait for process 0's generator before loading it
        entries.extend(_entries_of(info))
        generator = agree(lambda i=info: resolved_generator_path(out, i["next_generator"], "iteration"))
    if is_writer():
        config.make_archive(entries, seeds).to_jsonl(out / "archive.jsonl")
    return _write_summary(config, out)


# ----------------------------------------------------------------------------------------------------
# Summary


def summarize_template_search(out: str | Path, config: TemplateSearchConfig | dict[str, Any]) -> dict[str, Any]:
    """Per-iteration figures of a run folder, finished or running; never changes the folder.

    An iteration is reported once its proposals exist; a running one (``finished`` False) reports the rows
    written so far (a torn last passage left out) and no ``sft_rows``.

    Returns ``{"model", "variant", "reward", "iterations": [{iteration, finished, proposals,
    valid_templates, fills, valid_fills, fallback_fills, passages, base_accuracy, base_score, best_score,
    mean_score, best_gain, mean_gain, best_template, hyperparameter_similarity, instruction_similarity,
    similarity_backend, mean_sequence_chars, eval, sft_rows}], "notes": [str]}``; scores, gains,
    ``base_score`` and the eval's ``base`` and ``score`` are in the run's ``reward`` unit (accuracy, or gold
    nats/token). A ``similarity_backend`` this machine cannot use (a folder written before the config
    refused it, or ``embeddings`` without the encoder here) gives TF-IDF instruction similarities and a
    note instead of an error, so such a folder still reports.
    """
    raw = config.to_json() if isinstance(config, TemplateSearchConfig) else config
    table, reward = raw["templates"], raw.get("reward", "accuracy")
    measure = "accuracy" if reward == "accuracy" else "gold_loglik"
    out = Path(out)
    backend = table.get("similarity_backend", "auto")
    notes: list[str] = []
    iterations = []
    for it in range(1, table["iterations"] + 1):
        folder = out / f"iteration-{it}"
        proposals = read_rows(folder / "proposals.jsonl", repair=False)  # the run may still be writing
        if not proposals:
            continue
        rows = read_rows(folder / "results.jsonl", repair=False)
        scores = template_scores(rows, reward)
        valid = [r for r in proposals if r["valid"]]
        templates = {f"it{it}-t{r['slot']}": Template.from_dict(r["template"]) for r in valid}
        fills = [r["fill_sequences"] for r in rows if r.get("template_id") and r.get("fill_sequences")]
        entry: dict[str, Any] = {
            "iteration": it, "finished": (folder / ITERATION_FILE).is_file(), "proposals": len(proposals),
            "valid_templates": len(templates), "fills": sum(s["fills"] for s in scores.values()),
            "valid_fills": sum(s["valid_fills"] for s in scores.values()),
            "fallback_fills": sum(s["fallback_fills"] for s in scores.values()),
            "passages": len({r["passage_id"] for r in rows}),
            "base_accuracy": float(np.mean([r["accuracy_after"] for r in rows if r["condition"] == "base"]))
            if rows else None,
            "base_score": float(np.mean([r[f"{measure}_after"] for r in rows if r["condition"] == "base"]))
            if rows else None,
            "best_score": None, "mean_score": None, "best_gain": None, "mean_gain": None, "best_template": None,
            "eval": None, "sft_rows": None}
        if scores:
            best = max(scores, key=lambda tid: (scores[tid]["score"], -int(tid.rsplit("t", 1)[1])))
            entry.update(best_score=scores[best]["score"], best_gain=scores[best]["gain"], best_template=best,
                         mean_score=float(np.mean([s["score"] for s in scores.values()])),
                         mean_gain=float(np.mean([s["gain"] for s in scores.values()])))
        try:
            entry.update(diversity(list(templates.values()), fills, backend))
        except TemplateError as e:  # a backend this machine cannot use: TF-IDF, with a note
            if backend == "tfidf":  # not the backend's fault
                raise
            notes.append(f"templates.similarity_backend {backend!r} cannot be used here ({e}); TF-IDF instead")
            backend = "tfidf"
            entry.update(diversity(list(templates.values()), fills, backend))
        eval_rows = read_rows(folder / "eval" / "results.jsonl", repair=False)
        if eval_rows:
            eval_scores = template_scores(eval_rows, reward)
            entry["eval"] = {"template": next(iter(eval_scores), None),
                             "base": float(np.mean([r[f"{measure}_after"] for r in eval_rows
                                                    if r["condition"] == "base"])),
                             "score": next(iter(eval_scores.values()))["score"] if eval_scores else None,
                             "passages": len({r["passage_id"] for r in eval_rows})}
        info = _iteration_info(out, it)
        if info is not None:
            entry["sft_rows"] = info.get("sft_rows")
        iterations.append(entry)
    return {"model": raw["model"], "variant": table["variant"], "reward": reward, "iterations": iterations,
            "notes": notes}


def template_markdown(summary: dict[str, Any]) -> str:
    """The template-search summary as a Markdown table (one line per iteration; ``–`` where undefined), with
    the line that says its units (:func:`~seal_jax.selfedit.template_stats.template_units`)."""
    dense = summary.get("reward", "accuracy") != "accuracy"

    def pct(x: Any) -> str:  # a score in the run's unit
        return number_cell(x, ".3f") if dense else number_cell(x, ".1f", 100, "%")

    def num(x: Any) -> str:
        return number_cell(x, ".3f")

    unit = " · scores: gold answers' log-likelihood, nats/token (gain: its change)" if dense else ""
    lines = [f"Model: `{summary['model']}` · variant `{summary['variant']}`{unit}", "",
             "| iteration | valid templates / attempts | valid fills | base | best score | mean score | best gain | "
             "hyperparam sim | instruction sim | mean chars/fill | held-out best (base) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in summary["iterations"]:
        backend = f" ({e['similarity_backend']})" if e.get("similarity_backend") else ""
        fallback = f", {e['fallback_fills']} by lines" if e.get("fallback_fills") else ""
        held = "–" if not e.get("eval") else f"{pct(e['eval']['score'])} ({pct(e['eval']['base'])})"
        chars = f"{e['mean_sequence_chars']:.0f}" if e.get("valid_fills") else "–"  # no fill yet: nothing to measure
        lines.append(
            f"| {e['iteration']}{'' if e['finished'] else ' (running)'} | {e['valid_templates']}/{e['proposals']} | "
            f"{e['valid_fills']}/{e['fills']}{fallback} | {pct(e.get('base_score', e['base_accuracy']))} | {pct(e['best_score'])} | "
            f"{pct(e['mean_score'])} | {num(e['best_gain'])} | {num(e['hyperparameter_similarity'])} | "
            f"{num(e['instruction_similarity'])}{backend} | {chars} | {held} |")
    best = [e for e in summary["iterations"] if e.get("best_template")]
    if best:
        top = max(best, key=lambda e: e["best_score"])
        lines += ["", f"Best template: `{top['best_template']}` ({pct(top['best_score'])}). Valid templates are "
                  "counted over all proposal attempts (retries included)."]
    lines += ["", template_units(summary)]
    if summary.get("notes"):
        lines += ["", *(f"Note: {note}" for note in summary["notes"])]
    return "\n".join(lines) + "\n"


def _write_summary(config: TemplateSearchConfig, out: Path) -> dict[str, Any]:
    summary = agree(lambda: summarize_template_search(out, config))
    if is_writer():
        write_json(out / "summary.json", summary, ensure_ascii=True)
        write_text(out / "summary.md", template_markdown(summary))
    return summary
