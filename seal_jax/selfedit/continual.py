"""Continual self-edits (SEAL, arXiv 2506.10943 §5): edit after edit on one model, and what it forgets.

A **sequence** is ``n`` passages ``d_0 … d_{n-1}`` drawn from the pool with a seed of its own. Step ``t``:
the current model writes one self-edit on ``d_t`` (the run's ``strategy``), trains one adapter on it plus the
passage (the run's inner loop), and the adapter is **merged into the weights**, which become the base of
step ``t + 1``; the merged model then answers the questions of ``d_0 … d_t``. The sequence's accuracy
matrix is ``(n + 1) × n``: row 0 is the untouched model on all ``n`` passages, row ``t + 1`` the model after
step ``t`` on the passages seen so far (lower triangular; ``None`` above the diagonal). ``matrix.json``
holds the mean and the standard deviation over the finished sequences in SEAL's layout
(``mean_over_sequences``, ``std_over_sequences``) and the same for the gold answers' log-likelihood.

**Merging.** ``W + alpha/rank · A B`` is computed in float32 and rounded once to the weights' dtype (bf16 or
float32, as loaded) at every step; the rounding of step ``t`` is part of the base of step ``t + 1``, as it
would be for a model that keeps learning in that dtype. An adapter whose loss diverged is not merged (its
row records why; the model goes on unchanged).

**Resume.** ``sequence-S/steps.jsonl`` gets one row per step (row 0 the untouched model), written when the
step is scored. A resumed sequence replays its finished steps from their saved self-edits (training and
merging again with the same seeds gives the same weights, without generating or scoring), then goes on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from seal_jax.lm.types import SamplingParams
from seal_jax.selfedit.data import Passage
from seal_jax.selfedit.engine import LanguageModel, load_model
from seal_jax.selfedit.episode import BatchGrader, accuracy, make_grader, scored_answers
from seal_jax.selfedit.multihost import agree, is_writer
from seal_jax.selfedit.results import append_passage, read_rows, write_json, write_text
from seal_jax.selfedit.resume import save_run_config
from seal_jax.selfedit.run_config import (
    SELFEDIT_SAMPLING,
    ExtendedConfig,
    RunConfig,
    RunConfigError,
    derived_seed,
    pool_passages,
)
from seal_jax.selfedit.strategies import get_strategy, question_prompt, self_edit_prompt, training_sequences

STEPS_FILE = "steps.jsonl"
MATRIX_FILE = "matrix.json"


@dataclasses.dataclass(frozen=True)
class ContinualConfig(ExtendedConfig):
    """A continual-self-edit run: knowledge-run keys at the top level (model, ``data`` = the passage pool,
    ``selfedit_sampling``, ``lora``, ``train``, ``include_passage``, grader …) plus a ``[continual]`` table.

    Attributes:
      knowledge: the run's :class:`~seal_jax.selfedit.run_config.RunConfig` (conditions ``base`` and ``strategy``).
      strategy: the self-edit prompt of every step (SEAL: ``implications``).
      passages: ``n``, passages per sequence (SEAL: 8).
      sequences: ``S``, sequences averaged over (SEAL: 5); sequence ``s`` draws its passages from the pool with
        a seed derived from the run's seed and ``s``.
    """

    knowledge: RunConfig
    strategy: str = "implications"
    passages: int = 8
    sequences: int = 5

    TABLE = "continual"
    KIND = "continual"
    CONDITIONS_NOTE = "sets continual.strategy, not conditions"
    POOL_HINT = "set continual.passages instead of data.n, ids or subset"

    def __post_init__(self) -> None:
        if get_strategy(self.strategy).source != "generate":
            raise RunConfigError(f"continual.strategy {self.strategy!r} does not write self-edits")
        for name in ("passages", "sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RunConfigError(f"continual.{name} must be a positive integer, got {value!r}")

    @classmethod
    def conditions_of(cls, table: dict[str, Any]) -> list[str]:
        return list(dict.fromkeys(["base", table.get("strategy", cls.strategy)]))  # ("base": refused by the table's check)


def sequence_passages(pool: Sequence[Passage], config: ContinualConfig, s: int) -> list[Passage]:
    """Sequence ``s``'s ``n`` passages: drawn from the pool without replacement, in a random order."""
    if len(pool) < config.passages:
        data = config.knowledge.data
        raise RunConfigError(f"the passage pool has {len(pool)} passages (data.source {data.get('source', 'demo')!r} "
                             f"from data.start = {data.get('start', 0)}), fewer than continual.passages = "
                             f"{config.passages}: lower continual.passages or give [data] a larger pool")
    rng = np.random.default_rng(derived_seed(config.knowledge.seed, "continual", s))
    return [pool[i] for i in rng.choice(len(pool), size=config.passages, replace=False)]


# ----------------------------------------------------------------------------------------------------
# One step


def score_passages(lm: LanguageModel, passages: Sequence[Passage], config: RunConfig, grader: BatchGrader
                   ) -> tuple[list[float], list[float]]:
    """The accuracy and the gold answers' log-likelihood (nats/token) of ``lm`` on each passage's questions,
    all questions in one ``generate`` and one teacher-forced pass."""
    questions = [(p, q) for p in passages for q in p.questions]
    prompts = [question_prompt(p.title, q.question) for p, q in questions]
    answers = lm.generate(prompts, SamplingParams(max_new_tokens=config.eval_max_new_tokens, temperature=0.0),
                          chat=config.chat)
    golds = [q.answer if config.chat else " " + q.answer for _, q in questions]
    sums, tokens = lm.completion_logprobs(prompts, golds, chat=config.chat)
    accuracies, logliks, start = [], [], 0
    for p in passages:
        end = start + len(p.questions)
        accuracies.append(accuracy(scored_answers(p, answers[start:end], grader)))
        logliks.append(float(np.sum(sums[start:end]) / np.sum(tokens[start:end])))
        start = end
    return accuracies, logliks


def write_self_edit(lm: LanguageModel, passage: Passage, config: ContinualConfig, s: int) -> str:
    """The current model's self-edit of ``passage`` at sequence ``s``."""
    k = config.knowledge
    params = SamplingParams(**{**SELFEDIT_SAMPLING, **k.selfedit_sampling,
                               "seed": derived_seed(k.seed, "continual", s, passage.id)})
    prompt = self_edit_prompt(get_strategy(config.strategy), passage, chat=k.chat)
    return lm.generate([prompt], params, chat=k.chat)[0]


def update(lm: LanguageModel, passage: Passage, edit: str, config: ContinualConfig, s: int
           ) -> tuple[LanguageModel, list[float] | None, str | None]:
    """Train one adapter on ``edit`` (plus the passage) and merge it: ``(next model, [first, last loss],
    failure)``; a failed adapter is not merged."""
    k = config.knowledge
    sequences = training_sequences(passage, edit, include_passage=k.include_passage)
    if not sequences:
        return lm, None, "self-edit produced no training sequence"
    adapters = lm.train_adapters([sequences], k.lora_spec(), k.train_spec(seed=derived_seed(k.seed, "continual", s,
                                                                                             passage.id)), seed=k.seed)
    losses = adapters.losses[0]
    loss = [losses[0], losses[-1]] if losses else None
    if adapters.failed[0]:
        return lm, loss, adapters.failed[0]
    return lm.merge_adapter(adapters, 0), loss, None


# ----------------------------------------------------------------------------------------------------
# The run


def run_sequence(start: LanguageModel, config: ContinualConfig, passages: list[Passage], folder: Path, s: int,
                 grader_of: Any, budget: list[int | None], progress: bool) -> bool:
    """Run (or resume) sequence ``s`` into ``folder/steps.jsonl``; False when ``budget[0]`` steps ran out."""
    k, path = config.knowledge, folder / STEPS_FILE
    rows = agree(lambda: read_rows(path))
    if len(rows) == len(passages) + 1:
        return True
    if is_writer():
        folder.mkdir(parents=True, exist_ok=True)
    lm = start
    for row in rows[1:]:  # replay the finished steps: same self-edit, same seeds, same merged weights
        lm, _, _ = update(lm, passages[row["step"]], row["self_edit"], config, s)
    bar = tqdm(range(len(rows), len(passages) + 1), desc=f"{config.name} sequence {s}", unit="step",
               disable=not progress)
    for t in bar:
        if budget[0] is not None and budget[0] <= 0:
            return False
        t0 = time.perf_counter()
        if t == 0:
            acc, ll = score_passages(lm, passages, k, grader_of(lm))
            row: dict[str, Any] = {"step": -1, "passage_id": None, "self_edit": None, "train_loss": None,
                                   "failure": None}
        else:
            passage = passages[t - 1]
            edit = write_self_edit(lm, passage, config, s)
            lm, loss, failure = update(lm, passage, edit, config, s)
            acc, ll = score_passages(lm, passages[:t], k, grader_of(lm))
            row = {"step": t - 1, "passage_id": passage.id, "self_edit": edit, "train_loss": loss, "failure": failure}
        row.update(sequence=s, passages=[p.id for p in passages], accuracy=acc, gold_loglik=ll,
                   seconds=round(time.perf_counter() - t0, 2))
        if is_writer():
            append_passage(path, [{**row, "passage_id": row["passage_id"] or "untouched"}])
        if budget[0] is not None:
            budget[0] -= 1
    return True


def matrices(out: str | Path, config: ContinualConfig | dict[str, Any]) -> dict[str, Any]:
    """Mean and standard deviation over the finished sequences of the ``(n + 1) × n`` accuracy and
    gold-log-likelihood matrices (``None`` above the diagonal), from a run folder; never changes it."""
    raw = config.to_json() if isinstance(config, ContinualConfig) else config
    n, total = raw["continual"]["passages"], raw["continual"]["sequences"]
    stacks: dict[str, list[np.ndarray]] = {"accuracy": [], "gold_loglik": []}
    for s in range(total):
        rows = read_rows(Path(out) / f"sequence-{s}" / STEPS_FILE, repair=False)
        if len(rows) != n + 1:
            continue
        for key, stack in stacks.items():
            m = np.full((n + 1, n), np.nan)
            for i, r in enumerate(rows):
                m[i, :len(r[key])] = r[key]
            stack.append(m)

    def table(values: np.ndarray) -> list[list[float | None]]:
        return [[None if np.isnan(x) else float(x) for x in line] for line in values]

    out_dict: dict[str, Any] = {"model": raw["model"], "strategy": raw["continual"]["strategy"], "passages": n,
                                "sequences": len(stacks["accuracy"])}
    for key, stack in stacks.items():
        prefix = "" if key == "accuracy" else "gold_loglik_"
        if stack:
            out_dict[f"{prefix}mean_over_sequences"] = table(np.mean(stack, axis=0))
            out_dict[f"{prefix}std_over_sequences"] = table(np.std(stack, axis=0))
        else:
            out_dict[f"{prefix}mean_over_sequences"] = out_dict[f"{prefix}std_over_sequences"] = None
    return out_dict


def continual_markdown(summary: dict[str, Any]) -> str:
    """The mean accuracy matrix as a Markdown table (rows: after step; columns: passage of the sequence),
    then, where ``matrix.json`` has it, the mean gold log-likelihood matrix with each cell's change over the
    untouched model on the same passage."""
    n = summary["passages"]
    head = ["| after | " + " | ".join(f"d{j}" for j in range(n)) + " |", "|---|" + "---:|" * n]
    lines = [f"Model: `{summary['model']}` · strategy `{summary['strategy']}` · {summary['sequences']} finished "
             f"sequence(s) of {n} passages; mean accuracy (std) after each step on the passages seen so far", "",
             *head]
    mean, std = summary.get("mean_over_sequences"), summary.get("std_over_sequences")
    if mean is None:
        return "\n".join(lines[:1]) + "\n\nNo sequence has finished yet.\n"

    def step(i: int) -> str:
        return "untouched" if i == 0 else f"step {i - 1}"

    for i, (line, spread) in enumerate(zip(mean, std, strict=True)):
        cells = ["" if x is None else f"{100 * x:.1f}% ({100 * d:.1f})" for x, d in zip(line, spread, strict=True)]
        lines.append(f"| {step(i)} | " + " | ".join(cells) + " |")
    gold = summary.get("gold_loglik_mean_over_sequences")
    if gold is not None:
        lines += ["", "Mean log-likelihood of the gold answers (nats/token, no passage in context) after each step; "
                  "in parentheses its change over the untouched model on the same passage", "", *head]
        untouched = gold[0]

        def gold_cell(i: int, j: int, x: float | None) -> str:
            if x is None:
                return ""
            return f"{x:.3f}" if i == 0 or untouched[j] is None else f"{x:.3f} ({x - untouched[j]:+.3f})"

        for i, line in enumerate(gold):
            lines.append(f"| {step(i)} | " + " | ".join(gold_cell(i, j, x) for j, x in enumerate(line)) + " |")
    return "\n".join(lines) + "\n"


def run_continual(config: ContinualConfig, out_dir: str | Path, *, resume: bool = False,
                  lm: LanguageModel | None = None, progress: bool = True, stop_after: int | None = None
                  ) -> dict[str, Any]:
    """Run (or resume) continual self-edits into ``out_dir``; returns the matrices (see the module docstring).

    ``lm`` is the loaded starting model (every sequence starts from it); ``stop_after`` stops after that many
    newly finished steps (row 0 counts), to test resumption.
    """
    out = Path(out_dir)
    if not resume and agree(lambda: any(out.glob("sequence-*"))):
        raise FileExistsError(f"{out} already holds a continual run; pass --resume to continue it or choose "
                              "another --out")
    k = config.knowledge
    pool = pool_passages(k.data)
    plan = [sequence_passages(pool, config, s) for s in range(config.sequences)]  # a small pool fails here, at once
    save_run_config(out, config.to_json(), resume=resume)
    if lm is None:
        lm = load_model(k.model, dtype=k.dtype, mesh=k.mesh or None, tokenizer=k.tokenizer, remat=k.remat,
                        progress=progress, train_mesh=k.train_mesh or None, train_weights=k.train_weights,
                        attention=k.attention)
    graders: dict[int, BatchGrader] = {}

    def grader_of(model: LanguageModel) -> BatchGrader:  # a judge asks the current model
        if id(model) not in graders:
            graders.clear()
            graders[id(model)] = make_grader(k, model)
        return graders[id(model)]

    budget = [stop_after]
    for s, passages in enumerate(plan):
        if not run_sequence(lm, config, passages, out / f"sequence-{s}", s, grader_of, budget, progress):
            break
    summary = agree(lambda: matrices(out, config))
    if is_writer():
        write_json(out / MATRIX_FILE, summary, ensure_ascii=True)
        write_json(out / "summary.json", summary, ensure_ascii=True)
        write_text(out / "summary.md", continual_markdown(summary))
    return summary
