"""One knowledge-incorporation run: passages × conditions → accuracies, rewards, results rows, resume.

For every passage: the base model answers the passage's questions once (``accuracy_before``); every
training condition gets its K self-edits (generated in one batch, replayed, or the passage alone), all
candidates of the passage train together in one program (``LM.train_adapters``), all adapters answer
the questions at once (K stacked), and a grader scores the answers. Rows are appended to
``results.jsonl`` passage by passage (all rows of a passage in one write), so a killed run resumes after
its last finished passage with nothing lost or duplicated. With ``passages_per_program = P``, P passages
share each program (:func:`group_rows`): their base answers, their self-edits (each passage with its own
seeds) and all their candidates' training; a passage's rows are the ones it gets alone, up to float
rounding, and are written when its group ends. Randomness is derived from (seed, passage id,
condition), never from the order of work, so a resumed run gives the same rows as an uninterrupted one.

The ``template`` condition (template search, arXiv 2601.14532, inside an ordinary knowledge run): the model
proposes **one template per run** (``candidates`` proposals sampled together per attempt, the first
valid one kept; the meta-prompt of :func:`~seal_jax.selfedit.meta_prompts.meta_prompt`,
showing the seeded archive's human strategies unless ``template_condition.archive = false``; exploit
sampling; seeded by the run's seed; invalid answers retried), stored in ``template.json`` and reused on
resume. For each passage it is filled K times (one batched ``generate``), each fill is parsed as
``{"training_sequences": [...]}`` (with the optional ``"lines"`` fallback), and its adapters train in the
same ``train_adapters`` call as the human strategies' — with the template's own rank, alpha, dropout,
learning rate, epochs (optionally capped by ``template_condition.max_epochs``) and grad-accum, on the run's
LoRA targets. One template per run, not per passage, because a template is a strategy: the paper scores it
over many passages. Without a valid template after the retries, the condition's rows are failures with the
reason (accuracy after = before: nothing was trained).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from seal_jax.lm.types import SamplingParams
from seal_jax.selfedit.archive import Archive
from seal_jax.selfedit.data import Passage
from seal_jax.selfedit.engine import LanguageModel, load_model
from seal_jax.selfedit.episode import (
    BatchGrader,
    Episode,
    Job,
    make_grader,
    score_base_many,
    train_and_score_many,
)
from seal_jax.selfedit.meta_prompts import fill_prompt, meta_prompt
from seal_jax.selfedit.multihost import agree, is_writer, say
from seal_jax.selfedit.proposals import Proposal, chosen, propose
from seal_jax.selfedit.results import (
    Measure,
    StateFileError,
    read_rows,
    read_state,
    record_passage,
    result_row,
    summarize,
    summary_markdown,
    write_json,
    write_text,
)
from seal_jax.selfedit.resume import check_run_config
from seal_jax.selfedit.run_config import SELFEDIT_SAMPLING, RunConfig, derived_seed, select_data
from seal_jax.selfedit.strategies import (
    completions_for,
    fill_pieces,
    get_strategy,
    pieces_to_sequences,
    self_edit_prompt,
    training_sequences,
)
from seal_jax.selfedit.template_errors import name_length_key
from seal_jax.selfedit.templates import Template

TEMPLATE_FILE = "template.json"
# What to do about a damaged template.json in a run folder (see results.read_state).
TEMPLATE_REMEDY = ("delete it and resume to propose the template condition's template again (from the same seeds), "
                   "or run the config into a new --out")


def fill_length_key(config: RunConfig) -> str:
    """The config key that sets the template condition's fill length (for hints about cut-off fills)."""
    if config.template_options()["fill_max_new_tokens"] is None:
        return "template_condition.fill_max_new_tokens, which is selfedit_sampling.max_new_tokens when unset"
    return "template_condition.fill_max_new_tokens"


def generate_self_edits(lm: LanguageModel, passage: Passage, config: RunConfig,
                        template: Template | None = None) -> dict[str, list[str]]:
    """K sampled self-edits for every generating condition of the run, in one batch per condition; with
    ``template`` (a :class:`~seal_jax.selfedit.templates.Template`) also K fills of it under ``"template"``."""
    return generate_self_edits_many(lm, [passage], config, template)[0]


def generate_self_edits_many(lm: LanguageModel, passages: Sequence[Passage], config: RunConfig,
                             template: Template | None = None) -> list[dict[str, list[str]]]:
    """:func:`generate_self_edits` of several passages, one batch per condition for all of them. Each
    passage's K rows carry its own seed (from the run's seed, the passage and the condition), so its
    self-edits are the ones it samples alone (up to float rounding)."""
    out: list[dict[str, list[str]]] = [{} for _ in passages]
    for name in config.conditions:
        strategy = get_strategy(name)
        if strategy.source == "template" and template is not None:
            prompts = [fill_prompt(template, p.title, p.context) for p in passages]
            length = config.template_options()["fill_max_new_tokens"]
        elif strategy.source == "generate":
            prompts, length = [self_edit_prompt(strategy, p, chat=config.chat) for p in passages], None
        else:
            continue
        seeds = [derived_seed(config.seed, p.id, name) for p in passages]
        params = SamplingParams(**{**SELFEDIT_SAMPLING, **config.selfedit_sampling, "seed": seeds[0]})
        if length is not None:
            params = dataclasses.replace(params, max_new_tokens=int(length))
        rows = [prompt for prompt in prompts for _ in range(config.k)]
        if len(passages) == 1:
            texts = lm.generate(rows, params, chat=config.chat)
        else:
            texts = lm.generate(rows, params, chat=config.chat, seeds=[x for x in seeds for _ in range(config.k)])
        for i, edits in enumerate(out):
            edits[name] = list(texts[i * config.k:(i + 1) * config.k])
    return out


def condition_jobs(passage: Passage, config: RunConfig, generated: dict[str, list[str]],
                   replay: dict[str, list[str]] | None, template: Template | None, template_failure: str | None,
                   before: Measure) -> tuple[list[Job], list[dict[str, Any]]]:
    """The candidates of every training condition of one passage, and the rows of those that cannot train.

    Human strategies train with the run's LoRA/training specs (K self-edits, or the passage alone), the
    ``template`` condition's fills with the template's own (:meth:`RunConfig.template_specs`); every
    self-edit trains ``repeats`` times with seeds from (seed, passage, condition, candidate, repeat).
    Without a template, or for a fill that does not parse, the rows are failures saying why.
    """
    options = config.template_options()
    jobs: list[Job] = []
    failed: list[dict[str, Any]] = []
    for name in config.conditions:
        strategy = get_strategy(name)
        if not strategy.trains:
            continue
        if strategy.source == "template":
            if template is None:
                reason = f"no valid template: {template_failure or 'the proposal failed'}"
                failed.extend(result_row(passage, name, c, None, 0, before, before, [], reason, reward=config.reward,
                                         repeat=0)
                              for c in range(config.k))
                continue
            for c, text in enumerate(generated[name]):
                try:
                    pieces, fallback = fill_pieces(text, options["fill_fallback"])
                except ValueError as error:
                    reason = name_length_key(f"fill: {error}", fill_length_key(config))
                    failed.extend(result_row(passage, name, c, text, 0, before, before, [], reason,
                                             reward=config.reward, repeat=r, fill_fallback=False)
                                  for r in range(config.repeats))
                    continue
                seqs = pieces_to_sequences(passage, pieces, include_passage=config.include_passage)
                for r in range(config.repeats):
                    lora, train = config.template_specs(template, derived_seed(config.seed, passage.id, name, c, r),
                                                        options["max_epochs"])
                    jobs.append(Job(name, c, text, seqs, lora, train,
                                    {"repeat": r, "fill_fallback": fallback, "template": template.to_dict()}))
            continue
        k = 1 if strategy.source == "passage" else config.k
        for c, edit in enumerate(completions_for(strategy, passage, generated.get(name), replay, k)):
            seqs = training_sequences(passage, edit, include_passage=config.include_passage or edit is None)
            for r in range(config.repeats):
                train = config.train_spec(seed=derived_seed(config.seed, passage.id, name, c, r))
                jobs.append(Job(name, c, edit, seqs, config.lora_spec(), train, {"repeat": r}))
    return jobs, failed


def group_rows(lm: LanguageModel, passages: list[Passage], config: RunConfig, grader: BatchGrader,
               replay: dict[str, list[str]] | None, template: Template | None = None,
               template_failure: str | None = None) -> list[list[dict[str, Any]]]:
    """All result rows of several passages (``config.passages_per_program``; one passage: P = 1), per passage
    its rows: ``base``, then every training condition's candidates.

    The passages share each program: the base model answers all their questions in one generation (and one
    grader call), each condition samples all their self-edits in one batch (each passage with its own
    seed), every candidate of them trains in ONE ``train_adapters`` call, and each passage's adapters then
    answer its own questions (:func:`~seal_jax.selfedit.episode.train_and_score_many`). A passage's rows are
    the ones it gets alone, up to float rounding. ``template``: the run's proposed template for the
    ``template`` condition (``None`` with ``template_failure`` saying why there is none).
    """
    bases = score_base_many(lm, passages, config, grader)
    generated = generate_self_edits_many(lm, passages, config, template)
    rows: list[list[dict[str, Any]]] = []
    episodes = []
    for passage, base, edits in zip(passages, bases, generated, strict=True):
        own = []
        if "base" in config.conditions:
            own.append(result_row(passage, "base", 0, None, 0, base.measure, base.measure, base.answers, None,
                                  reward=config.reward, repeat=0))
        jobs, failed = condition_jobs(passage, config, edits, replay, template, template_failure, base.measure)
        rows.append(own + failed)
        episodes.append(Episode(passage, tuple(jobs), base.measure))
    trained = train_and_score_many(lm, episodes, config=config, grader=grader)
    return [own + more for own, more in zip(rows, trained, strict=True)]


def read_run_template(out: Path) -> tuple[Template | None, str | None] | None:
    """The ``template`` condition's template a run wrote to ``out/template.json``: ``(Template or None,
    failure reason or None)``, or ``None`` when there is no such file. Process 0 reads it, for every
    process.

    Raises:
      StateFileError: the file is damaged or its template does not validate; the message names the file
        and says what to do.
    """
    path = out / TEMPLATE_FILE
    saved = agree(lambda: read_state(path, TEMPLATE_REMEDY))
    if saved is None:
        return None
    if not saved.get("template"):
        failure = saved.get("failure")
        return None, failure if isinstance(failure, str) else None
    try:
        return Template.from_dict(saved["template"]), None
    except (ValueError, TypeError) as e:
        raise StateFileError(f"{path}: its template is not valid ({e}): {TEMPLATE_REMEDY}") from None


def propose_run_template(lm: LanguageModel, config: RunConfig, out: Path) -> tuple[Template | None, str | None]:
    """The ``template`` condition's template for a run folder: read from ``out/template.json`` when a
    previous (killed) run wrote it (:func:`read_run_template`), else proposed by ``lm`` and written there
    (atomically). A proposal cut off by the length limit is said to be so with the key that sets it,
    ``template_condition.proposal_max_new_tokens``.

    Returns ``(Template or None, failure reason or None)``.
    """
    saved = read_run_template(out)
    if saved is not None:
        return saved
    path = out / TEMPLATE_FILE
    options = config.template_options()
    prompt = meta_prompt(Archive.seeded().shown() if options["archive"] else None)
    records: list[Proposal] = []
    for attempt in range(int(options["max_retries"]) + 1):  # ``candidates`` proposals per attempt, in one batch
        batch = propose(lm, prompt, ["exploit"] * int(options["candidates"]),
                        max_new_tokens=int(options["proposal_max_new_tokens"]), max_retries=0,
                        seed=derived_seed(config.seed, "template-condition", attempt), chat=config.chat)
        records += [dataclasses.replace(r, attempt=attempt, reason=name_length_key(
            r.reason, "template_condition.proposal_max_new_tokens")) for r in batch]
        if chosen(batch):
            break
    template = next((r.template for r in records if r.template is not None), None)
    failure = None if template is not None else (records[-1].reason if records else "no proposal was made")
    saved = {"meta_prompt": prompt, "template": template.to_dict() if template else None, "failure": failure,
             "proposals": [Proposal.to_dict(r) for r in records]}
    if is_writer():
        write_json(path, saved)
    return template, failure


def _run_passages(lm: LanguageModel, config: RunConfig, out: Path, todo: list[Passage],
                  replay: dict[str, list[str]] | None, saved_template: tuple[Template | None, str | None] | None, *,
                  finished: int, progress: bool, stop_after: int | None) -> list[dict[str, Any]]:
    """The rows of the passages ``todo`` (appended to ``out/results.jsonl`` passage by passage), up to
    ``stop_after`` of them; first the ``template`` condition's template (``saved_template`` when the run
    folder has one, else proposed). ``finished``: passages done before (for the bar)."""
    results = out / "results.jsonl"
    grader = make_grader(config, lm)
    bar = tqdm(desc=f"{config.name}", unit="passage", disable=not progress, initial=finished,
               total=finished + len(todo))
    template, template_failure = None, None
    if "template" in config.conditions:
        t0 = time.perf_counter()
        if saved_template is not None:
            template, template_failure = saved_template
        else:
            if progress:
                options = config.template_options()
                say(f"{config.name}: the template condition's template: up to {int(options['max_retries']) + 1} "
                    f"attempt(s) of {int(options['candidates'])} proposals")
            template, template_failure = propose_run_template(lm, config, out)
        if progress:
            say(f"{config.name}: template {'ready' if template else 'failed: ' + str(template_failure)} "
                f"({time.perf_counter() - t0:.0f}s; {out / TEMPLATE_FILE})")
    rows: list[dict[str, Any]] = []
    size = config.passages_per_program
    for count in range(0, len(todo), size):
        if stop_after is not None and count >= stop_after:
            break
        group = todo[count:count + size if stop_after is None else min(count + size, stop_after)]
        t0 = time.perf_counter()
        groups = group_rows(lm, group, config, grader, replay, template, template_failure)
        share = (time.perf_counter() - t0) / len(group)
        for new in groups:  # each passage's rows in one write; seconds: its share of the group
            record_passage(results, new, time.perf_counter() - share)
            rows.extend(new)
        bar.update(len(group))
    bar.close()
    return rows


def run_knowledge(config: RunConfig, out_dir: str | Path, *, resume: bool = False, lm: LanguageModel | None = None,
                  progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) a knowledge-incorporation experiment into ``out_dir``.

    Writes ``run_config.json``, ``results.jsonl`` (appended passage by passage), ``summary.json`` and
    ``summary.md``. ``resume=True`` continues an existing folder after its last finished passage (the
    config must match); without it an existing non-empty ``results.jsonl`` is an error. ``lm`` reuses a
    loaded model; ``stop_after`` ends after that many new passages (for tests of resumption).
    In a multi-host run only process 0 writes, and every process resumes from process 0's folder
    (:mod:`seal_jax.selfedit.multihost`). Returns the summary.

    Everything that can refuse the run is checked before the folder is written and the model loaded: the
    data selection, the folder (``--resume``, the saved config) and the state files it resumes from
    (``run_config.json``, ``template.json``; a damaged one is a :class:`StateFileError` naming it). A
    resumed run with no passage left loads no model: it writes the summary again and returns it.
    """
    out = Path(out_dir)
    passages, replay = select_data(config.data, replay="replay" in config.conditions)  # before the folder exists
    results = out / "results.jsonl"
    config_json = config.to_json()

    def finished_rows() -> list[dict[str, Any]]:
        if results.exists() and results.stat().st_size and not resume:
            raise FileExistsError(f"{results} already holds results; pass --resume to continue it or choose "
                                  "another --out")
        check_run_config(out, config_json, resume=resume)  # (a damaged run_config.json: an error naming it)
        return read_rows(results)

    rows = agree(finished_rows)
    done = {r["passage_id"] for r in rows}
    todo = [p for p in passages if p.id not in done]
    saved_template = None
    if resume and todo and "template" in config.conditions:  # read back (a damaged one refused) before the load
        saved_template = read_run_template(out)
    if is_writer():  # checked above (resume) or new
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # a template an earlier run proposed in this folder is not this config's
            (out / TEMPLATE_FILE).unlink(missing_ok=True)
        write_json(out / "run_config.json", config_json, ensure_ascii=True)
    if todo:  # a finished run resumed loads nothing
        if lm is None:
            lm = load_model(config.model, dtype=config.dtype, mesh=config.mesh or None, tokenizer=config.tokenizer,
                            remat=config.remat, train_mesh=config.train_mesh or None,
                            train_weights=config.train_weights, attention=config.attention)
        rows.extend(_run_passages(lm, config, out, todo, replay, saved_template, finished=len(passages) - len(todo),
                                  progress=progress, stop_after=stop_after))
    summary = summarize(rows, config.model, conditions=config.conditions)
    if is_writer():
        write_json(out / "summary.json", summary, ensure_ascii=True)
        write_text(out / "summary.md", summary_markdown(summary))
    return summary
