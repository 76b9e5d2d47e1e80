"""One passage's episode of the inner loop: answer, train every candidate together, answer again, grade.

Every run kind scores self-edits the same way (knowledge runs, ReST-EM's E-step, template search):

1. :func:`score_base` — the model answers the passage's questions without the passage (greedy) and the
   grader scores them: the accuracy before; and the gold answers' log-likelihood after the same prompts
   (:func:`gold_loglik`), a dense measure beside it.
2. The run kind turns its self-edits into :class:`Job` records: one candidate adapter each, with its
   training sequences, its :class:`~seal_jax.LoraSpec` and :class:`~seal_jax.TrainSpec`, and the row
   fields it adds.
3. :func:`train_and_score` — every job with training data trains in ONE ``train_adapters`` call, all
   adapters, readied for inference (``ready_adapters``), answer at once (K stacked), the grader scores each candidate and the gold answers are scored
   under every adapter (one teacher-forced pass for all K): one results row per job
   (:func:`~seal_jax.selfedit.results.result_row`); a job without training data is a row that says so.
   :func:`train_and_score_many` does the same for several passages' :class:`Episode` records, all their
   candidates in one ``train_adapters`` call, each passage's adapters then answering its own questions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from seal_jax.lm.types import LoraSpec, SamplingParams, TrainSpec
from seal_jax.selfedit import grading
from seal_jax.selfedit.data import Passage
from seal_jax.selfedit.engine import LanguageModel
from seal_jax.selfedit.judge import JudgeGrader
from seal_jax.selfedit.results import Measure, result_row
from seal_jax.selfedit.run_config import RunConfig
from seal_jax.selfedit.strategies import question_prompt

# ``[(question, gold, prediction)] -> [{"correct": bool, ...}]``: a grader applied to a batch of answers.
BatchGrader = Callable[[Sequence[tuple[str, str, str]]], list[dict[str, Any]]]

NO_SEQUENCES = "self-edit produced no training sequence"


def make_grader(config: RunConfig, lm: LanguageModel) -> BatchGrader:
    """A batch grader ``[(question, gold, prediction)] -> [{"correct": bool, ...}]`` for the run's ``grader``
    setting. The LLM judges (``judge``, ``rules+judge``, asking ``lm``) add ``graded_by`` (``"rules"``,
    ``"model"`` or ``"empty"``) and ``judge_reply`` (the model's raw reply, or None) to every verdict."""
    if config.grader in grading.JUDGE_GRADERS:
        judge = JudgeGrader(lm, rules_first=grading.JUDGE_GRADERS[config.grader], chat=config.chat)
        return lambda items: [{"correct": r.verdict, "graded_by": r.source, "judge_reply": r.reply}
                              for r in judge.judge(items)]
    fn = grading.get_grader(config.grader)
    return lambda items: [{"correct": bool(fn(q, g, p))} for q, g, p in items]


def _prompts(passages: Sequence[Passage]) -> list[str]:
    return [question_prompt(p.title, q.question) for p in passages for q in p.questions]


def _spans(passages: Sequence[Passage]) -> list[slice]:
    """Each passage's slice of the questions of ``passages`` taken together."""
    ends = np.cumsum([len(p.questions) for p in passages])
    return [slice(int(e) - len(p.questions), int(e)) for p, e in zip(passages, ends, strict=True)]


def answer_questions(lm: LanguageModel, passage: Passage | Sequence[Passage], config: RunConfig, adapters: Any = None
                     ) -> list[str] | list[list[str]]:
    """Greedy answers to every question of ``passage`` (no passage in context): a list of B strings, or
    K lists with K stacked adapters. Several passages are answered in one ``generate`` call, their
    questions in order."""
    passages = [passage] if isinstance(passage, Passage) else list(passage)
    params = SamplingParams(max_new_tokens=config.eval_max_new_tokens, temperature=0.0)
    return lm.generate(_prompts(passages), params, adapters=adapters, chat=config.chat)


def scored_answers(passage: Passage, answers: Sequence[str], grader: BatchGrader) -> list[dict[str, Any]]:
    """``[{question, gold, prediction, correct, ...}]`` for one candidate's answers (``grader`` from
    :func:`make_grader`; its extra fields are kept)."""
    return _scored_many([passage], [answers], grader)[0]


def _scored_many(passages: Sequence[Passage], answers: Sequence[Sequence[str]], grader: BatchGrader
                 ) -> list[list[dict[str, Any]]]:
    """:func:`scored_answers` of several (passage, answers) pairs, graded in one ``grader`` call."""
    pairs = [(q, a) for p, texts in zip(passages, answers, strict=True)
             for q, a in zip(p.questions, texts, strict=True)]
    verdicts = iter(grader([(q.question, q.answer, a) for q, a in pairs]))
    items = iter(pairs)
    return [[{"question": q.question, "gold": q.answer, "prediction": a.strip(), **next(verdicts)}
             for q, a in (next(items) for _ in p.questions)] for p in passages]


def accuracy(scored: Sequence[dict[str, Any]]) -> float:
    """The share of correct answers."""
    return sum(a["correct"] for a in scored) / len(scored)


def gold_loglik(lm: LanguageModel, passage: Passage | Sequence[Passage], config: RunConfig, adapters: Any = None
                ) -> Any:
    """The mean log-likelihood per token (nats) of the passage's gold answers after their question prompts
    (the prompts :func:`answer_questions` uses, no passage in context): a float, or K floats with K stacked
    adapters. The answer follows the prompt's ``Answer:`` after a space, or opens the assistant's turn in
    chat form. Several passages: one teacher-forced pass for all, a list with each passage's value."""
    passages = [passage] if isinstance(passage, Passage) else list(passage)
    golds = [q.answer if config.chat else " " + q.answer for p in passages for q in p.questions]
    sums, tokens = lm.completion_logprobs(_prompts(passages), golds, adapters=adapters, chat=config.chat)
    per_set = [sums[..., span].sum(axis=-1) / tokens[span].sum() for span in _spans(passages)]
    values = [v.tolist() if v.ndim else float(v) for v in per_set]
    return values[0] if isinstance(passage, Passage) else values


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The model before any update: its ``answers`` scored, and what they measure."""

    answers: list[dict[str, Any]]
    measure: Measure

    @property
    def accuracy(self) -> float:
        return self.measure.accuracy


def score_base(lm: LanguageModel, passage: Passage, config: RunConfig, grader: BatchGrader) -> Baseline:
    """The base model's graded answers to the passage's questions and its gold log-likelihood."""
    return score_base_many(lm, [passage], config, grader)[0]


def score_base_many(lm: LanguageModel, passages: Sequence[Passage], config: RunConfig, grader: BatchGrader
                    ) -> list[Baseline]:
    """:func:`score_base` of several passages: their questions answered in one ``generate`` call, graded in
    one grader call and teacher-forced in one pass; a passage's results are those it gets alone up to
    numerics (the batch is padded to another shape: float rounding, and in bfloat16 a near-tied greedy token
    may flip)."""
    answers = answer_questions(lm, passages, config)
    texts = [answers[span] for span in _spans(passages)]
    dense = gold_loglik(lm, passages, config)
    return [Baseline(scored, Measure(accuracy(scored), d))
            for scored, d in zip(_scored_many(passages, texts, grader), dense, strict=True)]


@dataclasses.dataclass(frozen=True)
class Job:
    """One candidate adapter to train and score.

    Attributes:
      condition: the row's ``condition`` (a strategy name, or a template id).
      candidate: the row's ``candidate`` (self-edit or fill index).
      self_edit: the text the sequences came from (the row's ``self_edit``), or None.
      sequences: the training sequences (none: the row is a failure, nothing is trained).
      lora, train: the candidate's adapter and training specs.
      fields: the row fields this run kind adds (``repeat``, ``template_id`` …), in row order.
    """

    condition: str
    candidate: int
    self_edit: str | None
    sequences: list[str]
    lora: LoraSpec
    train: TrainSpec
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)


def train_and_score(lm: LanguageModel, passage: Passage, jobs: Sequence[Job], *, config: RunConfig,
                    grader: BatchGrader, before: Measure) -> list[dict[str, Any]]:
    """The rows of ``jobs``: first a failure row for every job without training sequences, then one row per
    trained candidate (all trained in one ``train_adapters`` call with ``seed = config.seed``, then all
    answering at once), with ``train_loss`` = the first and last optimiser step's loss.

    ``before`` is what the base model measured (:func:`score_base`), kept in every row; a job that trains
    nothing measures the same after.
    """
    return train_and_score_many(lm, [Episode(passage, tuple(jobs), before)], config=config, grader=grader)[0]


@dataclasses.dataclass(frozen=True)
class Episode:
    """One passage's candidates, waiting to train: its ``jobs`` and what the base model measured (``before``)."""

    passage: Passage
    jobs: tuple[Job, ...]
    before: Measure


def train_and_score_many(lm: LanguageModel, episodes: Sequence[Episode], *, config: RunConfig,
                         grader: BatchGrader) -> list[list[dict[str, Any]]]:
    """:func:`train_and_score` of several passages, their candidates all trained in ONE ``train_adapters``
    call (so that they fill the mesh's candidate lanes), then each passage's adapters answering its own
    questions, as they would alone: per episode, its rows.

    Every candidate's randomness comes from its own ``TrainSpec.seed``, so a passage's rows are the ones it
    gets alone up to numerics (the program's lanes and length buckets change with the company).
    """
    out = [[result_row(e.passage, j.condition, j.candidate, j.self_edit, 0, e.before, e.before, [], NO_SEQUENCES,
                       reward=config.reward, **j.fields) for j in e.jobs if not j.sequences] for e in episodes]
    usable = [[j for j in e.jobs if j.sequences] for e in episodes]
    flat = [j for jobs in usable for j in jobs]
    if not flat:
        return out
    # readied for answering at once: the float32 adapters are freed before any question is answered
    adapters = lm.ready_adapters(lm.train_adapters([j.sequences for j in flat], [j.lora for j in flat],
                                                   [j.train for j in flat], seed=config.seed))
    start = 0
    for e, jobs, rows in zip(episodes, usable, out, strict=True):
        if not jobs:
            continue
        own = list(range(start, start + len(jobs)))
        start += len(jobs)
        mine = adapters if len(own) == len(flat) else adapters.take(own)
        for i, (job, (scored, after)) in zip(own, zip(jobs, score_adapters(lm, e.passage, config, grader, mine),
                                                    strict=True), strict=True):
            losses = adapters.losses[i]
            rows.append(result_row(e.passage, job.condition, job.candidate, job.self_edit, len(job.sequences),
                                   e.before, after, scored, adapters.failed[i], reward=config.reward, **job.fields,
                                   train_loss=[losses[0], losses[-1]] if losses else None))
    return out


def score_adapters(lm: LanguageModel, passage: Passage, config: RunConfig, grader: BatchGrader, adapters: Any
                   ) -> list[tuple[list[dict[str, Any]], Measure]]:
    """Every one of K stacked adapters answering the passage's questions at once, graded, and its gold
    log-likelihood: ``[(scored answers, Measure)]``, one per adapter."""
    return score_adapters_many(lm, [passage], config, grader, adapters)[0]


def score_adapters_many(lm: LanguageModel, passages: Sequence[Passage], config: RunConfig, grader: BatchGrader,
                        adapters: Any) -> list[list[tuple[list[dict[str, Any]], Measure]]]:
    """:func:`score_adapters` of several passages in one ``generate`` call (K stacked adapters × every
    passage's questions), one grader call and one teacher-forced pass: per passage, one
    ``(scored answers, Measure)`` per adapter."""
    answers = answer_questions(lm, passages, config, adapters=adapters)
    spans = _spans(passages)
    dense = gold_loglik(lm, passages, config, adapters=adapters)
    flat = [(p, texts[span]) for texts in answers for p, span in zip(passages, spans, strict=True)]
    scored = _scored_many([p for p, _ in flat], [t for _, t in flat], grader)
    n = len(passages)
    return [[(scored[i * n + j], Measure(accuracy(scored[i * n + j]), dense[j][i])) for i in range(len(answers))]
            for j in range(n)]
