"""Self-edit strategies: how a passage becomes a prompt, and a completion becomes training sequences.

A strategy is data (:class:`Strategy`): a name, an instruction (or none), and how its training set is
built. ``base`` trains nothing; ``passage`` trains on the passage alone; ``implications``,
``implications_long``, ``implications_very_long``, ``rewrite`` and ``self_qa`` ask the model for a
self-edit; ``replay`` trains on SEAL's released self-edits for the same passage; ``template`` uses a
template the model wrote itself (:mod:`seal_jax.selfedit.templates`): its instruction is filled per passage
as a JSON list of training texts (:func:`fill_pieces`) and trained with the template's own hyperparameters.

The prompts follow the intent of SEAL's (Zweiger et al., 2025) in our own words. Completions are split the
way SEAL splits them: on ``---`` and on newlines, empty lines dropped, a leading header line dropped when
the next line starts a numbered list ("1."); every sequence is prefixed with the passage title, and the
passage itself is appended last (``include_passage=False`` leaves it out, as the template-search paper does).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from seal_jax.selfedit.data import Passage
from seal_jax.selfedit.templates import TemplateError, parse_fill

NUMBERED = re.compile(r"^\s*(?:1[.)]|\(1\)|#+\s*1\b|\*\*1[.)])")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A self-edit strategy.

    Attributes:
      name: the condition name used in results.
      instruction: what the model is asked to write about the passage (``None``: no generation).
      answer_cue: the line that opens the completion in base-model (raw text) prompts.
      trains: whether an adapter is trained at all (``base`` does not).
      source: ``"generate"`` (the model writes the self-edit), ``"passage"``, ``"replay"`` or ``"template"``
        (the model fills a template it proposed; see :mod:`seal_jax.selfedit.knowledge`).
    """

    name: str
    instruction: str | None = None
    answer_cue: str = ""
    trains: bool = True
    source: str = "generate"


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("base", trains=False, source="none"),
        Strategy("passage", source="passage"),
        Strategy(
            "implications",
            "Read the passage above and write a list of implications: facts and consequences that follow "
            "from it, directly or indirectly. Put each implication on its own line.",
            "Implications:",
        ),
        Strategy(
            "implications_long",
            "Read the passage above and write a long list of implications: facts and consequences that follow "
            "from it, directly or indirectly. Cover every detail. Put each implication on its own line.",
            "Implications:",
        ),
        Strategy(
            "implications_very_long",
            "Read the passage above and write a very long, exhaustive list of implications: every fact, "
            "number, name, date and consequence that follows from it, directly or indirectly, restated in "
            "many ways. Put each implication on its own line.",
            "Implications:",
        ),
        Strategy(
            "rewrite",
            "Rewrite the passage above in several different ways, keeping every fact. Separate the "
            "versions with a line containing only ---.",
            "Rewrites:",
        ),
        Strategy(
            "self_qa",
            "Turn the passage above into questions and answers that together cover every fact in it. "
            "Write each pair on its own line as 'Question: ... Answer: ...'.",
            "Questions and answers:",
        ),
        Strategy("replay", source="replay"),
        Strategy("template", source="template"),
    )
}


class StrategyError(ValueError):
    """An unknown strategy or one used without what it needs."""


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (see :data:`STRATEGIES`)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise StrategyError(f"unknown strategy {name!r}; strategies: {sorted(STRATEGIES)}") from None


def self_edit_prompt(strategy: Strategy, passage: Passage, *, chat: bool) -> str:
    """The user message (``chat=True``) or raw-text prompt asking for ``strategy``'s self-edit of ``passage``.

    Instruct models get the passage and the instruction as one user message (the chat template is applied
    by the caller); base models get the passage, the instruction and an answer cue to continue.
    """
    if strategy.instruction is None:
        raise StrategyError(f"strategy {strategy.name!r} does not generate a self-edit")
    body = f"{passage.text}\n\n{strategy.instruction}"
    return body if chat else f"{body}\n\n{strategy.answer_cue}\n"


def split_completion(completion: str) -> list[str]:
    """Split a self-edit into pieces by SEAL's rules.

    Splits on ``---`` and on newlines, strips and drops empty pieces, and drops a leading header line
    (e.g. "Here are the implications:") when the next piece starts a numbered list.
    """
    pieces = [p.strip() for block in completion.split("---") for p in block.splitlines()]
    pieces = [p for p in pieces if p]
    if len(pieces) >= 2 and NUMBERED.match(pieces[1]) and not NUMBERED.match(pieces[0]):
        pieces = pieces[1:]
    return pieces


def training_sequences(passage: Passage, completion: str | None, *, include_passage: bool = True) -> list[str]:
    """Training strings for one self-edit: ``"{title}\\n{piece}"`` per piece, then the passage itself.

    ``completion=None`` gives the passage alone (the ``passage`` condition).
    """
    sequences = [] if completion is None else [f"{passage.title}\n{p}" for p in split_completion(completion)]
    if include_passage:
        sequences.append(passage.text)
    return sequences


FILL_FALLBACKS = ("none", "lines")
# The example answer of seal_jax.selfedit.meta_prompts.fill_prompt; small models copy it verbatim.
FILL_PLACEHOLDERS = ("first training text", "second training text")


def _not_placeholder(piece: str) -> bool:
    lowered = piece.lower()
    return not any(p in lowered for p in FILL_PLACEHOLDERS)


def fill_pieces(text: str, fallback: str = "none") -> tuple[list[str], bool]:
    """The training texts of a template fill and whether the fallback produced them.

    ``text`` should hold ``{"training_sequences": [...]}`` (parsed by
    :func:`seal_jax.selfedit.templates.parse_fill`). When it does not and ``fallback == "lines"``, the raw
    text is split by SEAL's rules (:func:`split_completion`) instead — for small models that rarely write
    valid JSON. Pieces that copy the fill prompt's example answer ("first training text", "second
    training text") are dropped either way. Returns ``(pieces, used_fallback)``; raises
    :class:`~seal_jax.selfedit.templates.TemplateError` when no usable piece is left.
    """
    if fallback not in FILL_FALLBACKS:
        raise StrategyError(f"unknown fill_fallback {fallback!r}; choose from {FILL_FALLBACKS}")
    try:
        parsed = parse_fill(text)
        pieces = [p for p in parsed if _not_placeholder(p)]
        if not pieces:
            raise TemplateError("the fill copies the example answer of the fill prompt "
                                f"({list(FILL_PLACEHOLDERS)}) instead of writing training texts")
        return pieces, False
    except TemplateError as error:
        if fallback != "lines":
            raise
        pieces = [p for p in split_completion(text) if _not_placeholder(p)]
        if not pieces:
            raise TemplateError(f"{error}; the 'lines' fallback found no usable line either") from None
        return pieces, True


def pieces_to_sequences(passage: Passage, pieces: Sequence[str], *, include_passage: bool) -> list[str]:
    """Training strings of a template fill: ``"{title}\n{piece}"`` per piece (as for every self-edit),
    then the passage itself when ``include_passage``."""
    sequences = [f"{passage.title}\n{p}" for p in pieces]
    if include_passage:
        sequences.append(passage.text)
    return sequences


def question_prompt(passage_title: str, question: str) -> str:
    """The evaluation prompt for one question, without the passage (SEAL's "answer directly and
    concisely" format with the topic line)."""
    return (f"Topic: {passage_title}\nAnswer the following question directly and concisely, "
            f"in a few words.\nQuestion: {question}\nAnswer:")


def completions_for(strategy: Strategy, passage: Passage, generated: Sequence[str] | None,
                    replay: dict[str, list[str]] | None, k: int) -> list[str | None]:
    """The K self-edits of one passage for ``strategy``: generated text, SEAL's replayed text, or ``None``
    (the passage-only condition)."""
    if strategy.source == "generate":
        if generated is None:
            raise StrategyError(f"strategy {strategy.name!r} needs generated completions")
        return list(generated)
    if strategy.source == "replay":
        if replay is None or passage.id not in replay:
            raise StrategyError(
                f"no replayed self-edits for passage {passage.id}; 'replay' needs the SEAL self-edits file "
                "(data.selfedits = '../shared/data/seal_base_selfedits_val.json') and its passages")
        edits = replay[passage.id]
        return [edits[i % len(edits)] for i in range(k)]
    if strategy.source == "passage":
        return [None] * k
    raise StrategyError(f"strategy {strategy.name!r} trains nothing")


def describe(strategies: Sequence[str]) -> list[dict[str, Any]]:
    """A JSON-able description of the named strategies (for run configs)."""
    return [dataclasses.asdict(get_strategy(s)) for s in strategies]
