"""The LLM judge: SEAL's yes/no question put to a local model, and the reading of its replies.

SEAL grades a model's answer with GPT-4.1 asked whether the answer conveys the gold answer without
contradicting it; :class:`JudgeGrader` puts the same question (:func:`judge_prompt`) to a local model
through the ``LM`` facade (for Qwen3-8B-sized runs) and reads the verdict with :func:`parse_judge_reply`.

:func:`~seal_jax.selfedit.grading.rule_verdict`'s undecided rows are where a costlier check (an LLM judge)
would have to look; the rules' definite answers need no second opinion. ``JudgeGrader(lm, rules_first=True)``
(a run's ``grader = "rules+judge"``) does exactly that. The rules decide about half of the rows: 765 of the
1,556 tune rows, agreeing with GPT-4.1 on 93.9% of them, and 779 of the 1,558 held-out rows (90.2%). A judge
as good as GPT-4.1 on the undecided rest would therefore reach 97.0% (tune) and 95.1% (held-out).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from seal_jax.lm.types import SamplingParams
from seal_jax.selfedit.engine import LanguageModel
from seal_jax.selfedit.grading import rule_verdict

__all__ = ["JudgeGrader", "JudgeRecord", "judge_prompt", "parse_judge_reply"]

_JUDGE_TEMPLATE = """You are checking an answer to a quiz question against the reference answer.

Question: {question}
Reference answer: {gold}
Answer to check: {prediction}

Does the answer to check convey the reference answer without contradicting it? Extra details are fine \
as long as they do not contradict the reference; an answer that hedges between several options, or does \
not actually give the reference answer, does not count. Judge only by the reference answer, not by your \
own knowledge. Reply with one word: yes or no."""

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_YES_NO_WORD = re.compile(r"\b(yes|no)\b", re.I)
# a negation before the yes/no word, at most two plain words between ("Not yes", "isn't yes", "not a yes",
# "I would not say yes", "cannot say yes"; not "Not really. Yes" or "not sure, but yes"): no verdict to read
_NEGATED = re.compile(r"(?:\b(?:not|never|cannot)|n't|n’t)(?:\s+[a-z]+){0,2}\s+$", re.I)
_MAX_JUDGED_CHARS = 2000


def judge_prompt(question: str, gold: str, prediction: str) -> str:
    """The yes/no prompt put to an LLM judge (SEAL's semantics in our own words)."""
    def clean(x: object, limit: int) -> str:
        return " ".join(("" if x is None else str(x))[:limit].split())

    return _JUDGE_TEMPLATE.format(question=clean(question, _MAX_JUDGED_CHARS), gold=clean(gold, _MAX_JUDGED_CHARS),
                                  prediction=clean(prediction, _MAX_JUDGED_CHARS))


def parse_judge_reply(reply: object) -> bool | None:
    """The verdict in a judge's reply: its first "yes" or "no" word (case-insensitive), else None.

    A ``<think>…</think>`` block is skipped; an unfinished one (the reply was cut while thinking) gives None.
    So does a first yes/no word negated with at most two words between ("Not yes", "isn't yes", "not a yes",
    "I would not say yes", "cannot say yes"; a comma or full stop between ends the negation, so "not sure,
    but yes" is a yes and "not sure but yes" none): such a reply gives no verdict, and :class:`JudgeGrader` counts it as a malformed reply, a no.
    """
    if not isinstance(reply, str):
        return None
    text = _THINK.sub(" ", reply)
    if "<think>" in text.lower():
        return None
    m = _YES_NO_WORD.search(text)
    if m is None or _NEGATED.search(text, 0, m.start()):
        return None
    return m.group(1).lower() == "yes"


@dataclasses.dataclass(frozen=True)
class JudgeRecord:
    """One judged answer: the raw reply and the verdict read from it (``parsed`` is False when the reply
    held no yes/no and the verdict defaulted to False; ``reply`` is None when no model was asked).
    ``source`` says who decided: ``"model"``, ``"rules"`` (:func:`rule_verdict`, with ``rules_first``) or
    ``"empty"`` (an empty prediction or gold)."""

    question: str
    gold: str
    prediction: str
    reply: str | None
    verdict: bool
    parsed: bool
    source: str = "model"


# Prompts per ``generate`` call of the judge (a run grades a whole answer set in one grader call).
JUDGE_BATCH = 32


class JudgeGrader:
    """An LLM judge: asks a local model whether each answer conveys the gold answer without contradicting it.

    ``lm`` is any object with ``generate(prompts: list[str], params, chat: bool) -> list[str]`` (the
    seal-jax ``LM`` facade). Replies are read by :func:`parse_judge_reply`; a reply without yes/no counts
    as a no and is kept, with every other reply, in :attr:`records`. Empty predictions are a no without
    asking the model. Greedy decoding makes the judge deterministic for a given model.

    With ``rules_first`` (the ``"rules+judge"`` grader of a run) :func:`rule_verdict` answers first and the
    model is asked only about the answers it leaves undecided (the gold's words are not there, so only a
    paraphrase could convey it): on SEAL's calibration answers that is about half of them, and the rules'
    definite verdicts agree with GPT-4.1's on 90-94% of the rows they decide (module docstring).

    Args:
      lm: the model facade.
      max_new_tokens: reply length budget (one word is needed; a little slack for "Yes." or a prefix).
      chat: wrap prompts in the model's chat template (instruct models).
      batch_size: prompts per ``generate`` call.
      params_factory: ``max_new_tokens -> params`` for ``generate``; default greedy
        ``seal_jax.SamplingParams(max_new_tokens=..., temperature=0.0)``.
      rules_first: let :func:`rule_verdict` decide where it can and ask the model only about the rest.
    """

    def __init__(self, lm: LanguageModel, *, max_new_tokens: int = 8, chat: bool = True, batch_size: int = JUDGE_BATCH,
                 params_factory: Callable[[int], Any] | None = None, rules_first: bool = False):
        if not hasattr(lm, "generate"):
            raise TypeError(f"the judge model needs a generate(prompts, params, chat=...) method; got {type(lm).__name__}")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        self.chat = chat
        self.batch_size = batch_size
        self.params_factory = params_factory
        self.rules_first = rules_first
        self.records: list[JudgeRecord] = []

    def _params(self) -> SamplingParams:
        if self.params_factory is not None:
            return self.params_factory(self.max_new_tokens)
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)

    def grade_batch(self, items: Iterable[tuple[str, str, str] | Mapping]) -> list[bool]:
        """Judge (question, gold, prediction) triples (or mappings with those keys); one bool per item.
        The records are kept in :attr:`records`."""
        records = self.judge(items)
        self.records.extend(records)
        return [r.verdict for r in records]

    def judge(self, items: Iterable[tuple[str, str, str] | Mapping]) -> list[JudgeRecord]:
        """Like :meth:`grade_batch`, but returns one :class:`JudgeRecord` per item and keeps nothing."""
        triples: list[tuple[str, str, str]] = []
        for it in items:
            if isinstance(it, Mapping):
                q, g, p = it.get("question"), it.get("gold"), it.get("prediction")
            else:
                q, g, p = it
            triples.append(tuple("" if x is None else str(x) for x in (q, g, p)))  # type: ignore[arg-type]
        records: list[JudgeRecord | None] = [None] * len(triples)
        todo = []
        for i, (q, g, p) in enumerate(triples):
            if not p.strip() or not g.strip():
                records[i] = JudgeRecord(q, g, p, None, False, True, source="empty")
                continue
            ruled = rule_verdict(q, g, p) if self.rules_first else None
            if ruled is not None:
                records[i] = JudgeRecord(q, g, p, None, ruled, True, source="rules")
            else:
                todo.append(i)
        params = self._params() if todo else None
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            prompts = [judge_prompt(*triples[i]) for i in chunk]
            replies = self.lm.generate(prompts, params, chat=self.chat)
            if not isinstance(replies, (list, tuple)) or len(replies) != len(prompts):
                raise ValueError(
                    f"the judge model returned {len(replies) if isinstance(replies, (list, tuple)) else replies!r} "
                    f"replies for {len(prompts)} prompts")
            for i, reply in zip(chunk, replies, strict=True):
                parsed = parse_judge_reply(reply)
                records[i] = JudgeRecord(*triples[i], reply=reply if isinstance(reply, str) else repr(reply),
                                         verdict=bool(parsed), parsed=parsed is not None)
        return [r for r in records if r is not None]  # every item has its record by now

    def __call__(self, question: str, gold: str, prediction: str) -> bool:
        """Judge one answer (the same signature as :func:`grade`)."""
        return self.grade_batch([(question, gold, prediction)])[0]

    @property
    def malformed(self) -> list[JudgeRecord]:
        """The records whose reply held no yes/no."""
        return [r for r in self.records if not r.parsed]
