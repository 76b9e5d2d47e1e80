"""Template search, the pure core: templates, their ranges, and parsing model-written templates and fills.

A *template* (Cheong et al., arXiv 2601.14532) is a self-edit strategy written by the model itself: a
data-creation instruction plus the hyperparameters of the next-token-prediction (NTP) update that follows.
The search loop (elsewhere) asks the model for templates with
:func:`~seal_jax.selfedit.meta_prompts.meta_prompt`, parses them with :func:`parse_template`, fills each
one per passage with :func:`~seal_jax.selfedit.meta_prompts.fill_prompt` / :func:`parse_fill`, trains and
scores, and keeps an :class:`~seal_jax.selfedit.archive.Archive`. Nothing here calls a language model or
needs JAX; model-written text is parsed as JSON and validated, never executed.

The JSON form is the seed paper's: the instruction and a nested ``"hyperparameters"`` object,

    {"data_creation_instruction": "...", "hyperparameters": {"lora_rank": 16, "lora_alpha": 32,
     "lora_dropout": 0.05, "learning_rate": 1e-4, "num_epochs": 3, "gradient_accumulation_steps": 2}}

which :meth:`Template.to_dict` writes (and with it proposals, archives, SFT completions and the
meta-prompt's example). :meth:`Template.from_dict` and :func:`parse_template` also read the flat form
seal-jax wrote before (the six hyperparameters at the top level), so old run folders still load; a
hyperparameter given in both places with different values is an error naming it.

Allowed ranges (batch size is always 1). Out-of-range numbers are clamped and each change is recorded in
``Template.notes``; wrong types, missing fields, NaN/inf and empty or absurdly short instructions are
rejected with :class:`TemplateError`:

==============================  ==========================================================================
``lora_rank``                   powers of two 4 … 64; other values snap to the nearest power of two in log
                                space (24 → 32, 20 → 16), then clamp
``lora_alpha``                  1 … 256 (the span of its scale in ``diversity``; scale = alpha / rank)
``lora_dropout``                0 … 0.99 (the paper's 0–1, closed below 1 because LoRA dropout must be < 1)
``learning_rate``               1e-5 … 5e-3
``num_epochs``                  whole numbers 1 … 20 (non-integers round half up)
``gradient_accumulation_steps`` whole numbers 1 … 8
``data_creation_instruction``   at least 20 characters and 4 words, at most 4,000 characters
==============================  ==========================================================================

The rest of template search's pure part lives beside this module: the prompts and proposal sampling in
:mod:`~seal_jax.selfedit.meta_prompts`, the archives and SFT selection in :mod:`~seal_jax.selfedit.archive`,
the similarity and diversity metrics in :mod:`~seal_jax.selfedit.diversity` (whose
:func:`hyperparameter_similarity` and :func:`instruction_similarity` are re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

# public here as sj.templates.hyperparameter_similarity / sj.templates.instruction_similarity (DESIGN.md)
from seal_jax.lm.types import LoraSpec, TrainSpec
from seal_jax.selfedit.diversity import hyperparameter_similarity, instruction_similarity
from seal_jax.selfedit.template_errors import (
    CUT_OFF_HINT,
    HYPERPARAMETER_NAMES,
    HYPERPARAMETERS_KEY,
    TemplateError,
    _flat_template,
    _number,
)

__all__ = [
    "FIELDS", "HYPERPARAMETERS", "HYPERPARAMETERS_KEY", "PLACEHOLDER_INSTRUCTION", "SEAL_HYPERPARAMETERS",
    "Template", "TemplateError", "hyperparameter_similarity", "instruction_similarity", "parse_fill", "parse_template",
]


# ----------------------------------------------------------------------------------------------------
# Fields and ranges

FIELDS = ("data_creation_instruction", *HYPERPARAMETER_NAMES)
HYPERPARAMETERS = FIELDS[1:]   # nested under HYPERPARAMETERS_KEY ("hyperparameters") in the JSON form

RANK_CHOICES = (4, 8, 16, 32, 64)
ALPHA_RANGE = (1.0, 256.0)
DROPOUT_RANGE = (0.0, 0.99)
LR_RANGE = (1e-5, 5e-3)
EPOCHS_RANGE = (1, 20)
GRAD_ACCUM_RANGE = (1, 8)
MIN_INSTRUCTION_CHARS = 20
MIN_INSTRUCTION_WORDS = 4
MAX_INSTRUCTION_CHARS = 4000

SEAL_HYPERPARAMETERS: dict[str, Any] = {
    "lora_rank": 32, "lora_alpha": 64.0, "lora_dropout": 0.0, "learning_rate": 1e-3, "num_epochs": 10,
    "gradient_accumulation_steps": 1,
}

PLACEHOLDER_INSTRUCTION = "<one paragraph telling the model what training texts to write from the passage>"

# What a template looks like, for error messages.
_SHAPE = (f'a template is {{"data_creation_instruction": ..., "{HYPERPARAMETERS_KEY}": {{'
          + ", ".join(f'"{name}": ...' for name in HYPERPARAMETER_NAMES) + "}}"
          + " (the six hyperparameters may also stand at the top level)")

MAX_TEXT_CHARS = 1_000_000   # longer model outputs are rejected outright
MAX_CANDIDATES = 64          # at most this many '{' positions are tried as JSON objects
MAX_REPAIRS = 8              # at most this many failed candidates get the trailing-comma repair
MAX_REPAIR_CHARS = 50_000    # the repair scans at most this far

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_DECODER = json.JSONDecoder()


def _clean_text(text: str) -> str:
    """``text`` stripped, without control characters (tabs and newlines kept), lone surrogates → U+FFFD."""
    return _SURROGATE.sub("\ufffd", _CONTROL.sub("", text)).strip()



def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _clamp(name: str, value: float, low: float, high: float, notes: list[str]) -> float:
    clamped = min(max(value, low), high)
    if clamped != value:
        notes.append(f"{name} {value:g} clamped to {clamped:g} (allowed {low:g} to {high:g})")
    return clamped


def _normalize_rank(value: float, notes: list[str]) -> int:
    if value <= 0:
        notes.append(f"lora_rank {value:g} clamped to {RANK_CHOICES[0]} (powers of two from 4 to 64)")
        return RANK_CHOICES[0]
    exponent = min(max(_round_half_up(math.log2(value)), 2), 6)
    rank = 2 ** exponent
    if rank != value:
        notes.append(f"lora_rank {value:g} snapped to {rank} (powers of two from 4 to 64)")
    return rank


def _normalize_int(name: str, value: float, low: int, high: int, notes: list[str]) -> int:
    rounded = _round_half_up(value)
    if rounded != value:
        notes.append(f"{name} {value:g} rounded to {rounded}")
    return int(_clamp(name, rounded, low, high, notes))


def _positive_log_field(name: str, value: float, low: float, high: float, notes: list[str]) -> float:
    if value <= 0:
        notes.append(f"{name} {value:g} clamped to {low:g} (allowed {low:g} to {high:g})")
        return low
    return _clamp(name, value, low, high, notes)


def _check_instruction(text: Any) -> str:
    if not isinstance(text, str):
        raise TemplateError(f"data_creation_instruction must be a string, got {type(text).__name__}")
    cleaned = _clean_text(text)
    if cleaned.strip("<>").strip().lower() == PLACEHOLDER_INSTRUCTION.strip("<>").lower():
        raise TemplateError("data_creation_instruction is the example placeholder; write a real instruction")
    if len(cleaned) < MIN_INSTRUCTION_CHARS or len(cleaned.split()) < MIN_INSTRUCTION_WORDS:
        raise TemplateError(
            f"data_creation_instruction is too short ({len(cleaned)} characters, {len(cleaned.split())} words);"
            f" write at least {MIN_INSTRUCTION_CHARS} characters and {MIN_INSTRUCTION_WORDS} words")
    if len(cleaned) > MAX_INSTRUCTION_CHARS:
        raise TemplateError(f"data_creation_instruction has {len(cleaned)} characters; keep it under "
                            f"{MAX_INSTRUCTION_CHARS}")
    return cleaned


@dataclasses.dataclass(frozen=True)
class Template:
    """A self-edit template: what training data to write, and how to train on it.

    The constructor requires in-range values (see the module docstring); :meth:`from_dict` is the lenient
    entry point for model-written data, clamping numbers and recording each change in ``notes``.

    Attributes:
      data_creation_instruction: what the model is told to write about a passage.
      lora_rank: LoRA rank, one of 4, 8, 16, 32, 64.
      lora_alpha: LoRA alpha in [1, 256].
      lora_dropout: LoRA input dropout in [0, 0.99].
      learning_rate: peak AdamW learning rate in [1e-5, 5e-3].
      num_epochs: passes over the training sequences, 1 … 20.
      gradient_accumulation_steps: micro-batches (of one sequence) per optimiser step, 1 … 8.
      notes: what :meth:`from_dict` changed (not part of equality, not serialised).
    """

    data_creation_instruction: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    learning_rate: float
    num_epochs: int
    gradient_accumulation_steps: int
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if _check_instruction(self.data_creation_instruction) != self.data_creation_instruction:
            raise TemplateError("data_creation_instruction has surrounding whitespace or control characters; "
                                "build templates from model output with Template.from_dict")
        for name in ("lora_rank", "num_epochs", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TemplateError(f"Template.{name} must be an int, got {value!r}")
        for name in ("lora_alpha", "lora_dropout", "learning_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value):
                raise TemplateError(f"Template.{name} must be a finite number, got {value!r}")
        checks = [
            ("lora_rank", self.lora_rank in RANK_CHOICES, "one of 4, 8, 16, 32, 64"),
            ("lora_alpha", ALPHA_RANGE[0] <= self.lora_alpha <= ALPHA_RANGE[1], "in [1, 256]"),
            ("lora_dropout", DROPOUT_RANGE[0] <= self.lora_dropout <= DROPOUT_RANGE[1], "in [0, 0.99]"),
            ("learning_rate", LR_RANGE[0] <= self.learning_rate <= LR_RANGE[1], "in [1e-5, 5e-3]"),
            ("num_epochs", EPOCHS_RANGE[0] <= self.num_epochs <= EPOCHS_RANGE[1], "in [1, 20]"),
            ("gradient_accumulation_steps", GRAD_ACCUM_RANGE[0] <= self.gradient_accumulation_steps
             <= GRAD_ACCUM_RANGE[1], "in [1, 8]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise TemplateError(f"Template.{name} must be {allowed}, got {getattr(self, name)!r}; "
                                    "Template.from_dict clamps out-of-range values")

    def to_dict(self) -> dict[str, Any]:
        """The template as a JSON-able dict in the seed paper's nested form (no notes):
        ``{"data_creation_instruction": ..., "hyperparameters": {the six HYPERPARAMETERS}}``."""
        return {"data_creation_instruction": self.data_creation_instruction,
                HYPERPARAMETERS_KEY: {name: getattr(self, name) for name in HYPERPARAMETERS}}

    def to_json(self) -> str:
        """The template as one line of JSON in the nested form (the text the model should learn to write)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Template:
        """Validate and normalise a dict (e.g. parsed model output) into a :class:`Template`.

        ``d`` is in the nested form (the six hyperparameters under ``"hyperparameters"``) or the flat one
        (at the top level); a hyperparameter in both places must have the same value. Numbers may be
        strings (``"1e-4"``); out-of-range numbers are clamped (rank snapped to a power of two) and every
        change, and any ignored extra field (at the top level or under ``"hyperparameters"``), is listed in
        ``notes``. Raises
        :class:`TemplateError` for a non-dict, a missing field, a wrong type, NaN/inf, a hyperparameter given
        twice with different values or an unusable instruction.
        """
        if not isinstance(d, Mapping):
            raise TemplateError(f"a template must be a JSON object, got {type(d).__name__}")
        d, nested_extra = _flat_template(d)
        missing = [name for name in FIELDS if name not in d]
        if missing:
            raise TemplateError(f"template is missing field(s) {missing}; {_SHAPE}")
        notes: list[str] = []
        instruction = _check_instruction(d["data_creation_instruction"])
        rank = _normalize_rank(_number("lora_rank", d["lora_rank"]), notes)
        alpha = _positive_log_field("lora_alpha", _number("lora_alpha", d["lora_alpha"]), *ALPHA_RANGE, notes)
        dropout = _clamp("lora_dropout", _number("lora_dropout", d["lora_dropout"]), *DROPOUT_RANGE, notes)
        lr = _positive_log_field("learning_rate", _number("learning_rate", d["learning_rate"]), *LR_RANGE, notes)
        epochs = _normalize_int("num_epochs", _number("num_epochs", d["num_epochs"]), *EPOCHS_RANGE, notes)
        accum = _normalize_int("gradient_accumulation_steps",
                               _number("gradient_accumulation_steps", d["gradient_accumulation_steps"]),
                               *GRAD_ACCUM_RANGE, notes)
        extra = sorted(str(k) for k in d if k not in FIELDS)
        if extra:
            notes.append(f"ignored unknown field(s) {extra[:10]}")
        if nested_extra:
            notes.append(f'ignored unknown field(s) in "{HYPERPARAMETERS_KEY}" {nested_extra[:10]}')
        return cls(instruction, rank, float(alpha), float(dropout), float(lr), epochs, accum, tuple(notes))

    def lora_spec(self, targets: Sequence[str] = ("q_proj", "v_proj")) -> LoraSpec:
        """This template's adapter as a ``seal_jax.LoraSpec(rank, alpha, dropout, targets)``."""
        return LoraSpec(rank=int(self.lora_rank), alpha=float(self.lora_alpha),
                        dropout=float(self.lora_dropout), targets=tuple(targets))

    def train_spec(self, **overrides: Any) -> TrainSpec:
        """This template's training as a ``seal_jax.TrainSpec``: its learning rate, epochs and grad-accum,
        batch size 1; ``overrides`` set any other ``TrainSpec`` field (``seed``, ``max_len``, …)."""
        known = {f.name for f in dataclasses.fields(TrainSpec)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TemplateError(f"unknown TrainSpec field(s) {unknown}; TrainSpec has {sorted(known)}")
        kwargs: dict[str, Any] = dict(learning_rate=float(self.learning_rate), epochs=int(self.num_epochs),
                                      batch_size=1, grad_accum=int(self.gradient_accumulation_steps))
        kwargs.update(overrides)
        return TrainSpec(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Parsing model output

def _strip_thinking(text: str) -> str:
    """The text after the last ``</think>``; an unfinished ``<think>`` block is an error."""
    end = text.rfind("</think>")
    if end != -1:
        return text[end + len("</think>"):]
    if "<think>" in text:
        raise TemplateError("the output is an unfinished <think> block with no answer after it; "
                            "give the model more max_new_tokens or disable thinking")
    return text


def _repaired_object(text: str, start: int) -> str | None:
    """The brace-balanced object starting at ``text[start] == '{'`` with trailing commas removed, or None.

    Strings are respected (braces and commas inside them are kept); scans at most MAX_REPAIR_CHARS.
    """
    out: list[str] = []
    depth = 0
    in_string = escaped = False
    end = min(len(text), start + MAX_REPAIR_CHARS)
    i = start
    while i < end:
        ch = text[i]
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif ch == ",":
            j = i + 1
            while j < end and text[j] in " \t\r\n":
                j += 1
            if j < end and text[j] in "}]":
                i = j
                continue
            out.append(ch)
        else:
            out.append(ch)
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return "".join(out)
        i += 1
    return None


def _decode_at(text: str, start: int, allow_repair: bool) -> Any:
    """The JSON value starting at ``start``, a repaired one, or None."""
    try:
        return _DECODER.raw_decode(text, start)[0]
    except (ValueError, RecursionError):
        pass
    if not allow_repair:
        return None
    repaired = _repaired_object(text, start)
    if repaired is None:
        return None
    try:
        return json.loads(repaired)
    except (ValueError, RecursionError):
        return None


def _json_objects(text: str) -> Iterator[dict]:
    """JSON objects in ``text`` in order of their opening brace (nested ones too), at most MAX_CANDIDATES."""
    repairs = 0
    start = text.find("{")
    tried = 0
    while start != -1 and tried < MAX_CANDIDATES:
        tried += 1
        value = _decode_at(text, start, allow_repair=repairs < MAX_REPAIRS)
        if value is None:
            repairs += 1
        elif isinstance(value, dict):
            yield value
        start = text.find("{", start + 1)


def _answer_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise TemplateError(f"{what} output must be a str, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise TemplateError(f"{what} output has {len(text)} characters, more than the {MAX_TEXT_CHARS} "
                            "accepted; lower max_new_tokens")
    return _strip_thinking(text)


def parse_template(text: str) -> Template:
    """The first JSON object in a model's answer that validates as a :class:`Template`.

    Accepts plain JSON, fenced ```json blocks, JSON after a ``<think>…</think>`` block, prose around it,
    trailing commas, numbers written as strings. Only the first 64 ``{`` positions are tried and outputs
    over 1,000,000 characters are refused. Never evaluates anything. The template may be in the nested
    form or the flat one (see :meth:`Template.from_dict`). Raises :class:`TemplateError` (and nothing else)
    with the reason when no object validates: the reason given is that of the first object that looked
    like a template (had one of the template's fields, or ``"hyperparameters"``).
    """
    body = _answer_text(text, "template")
    first_reason: str | None = None
    seen = 0
    for obj in _json_objects(body):
        seen += 1
        try:
            return Template.from_dict(obj)
        except TemplateError as error:
            if first_reason is None and any(name in obj for name in (*FIELDS, HYPERPARAMETERS_KEY)):
                first_reason = str(error)
    if first_reason is not None:
        raise TemplateError(first_reason)
    if seen:
        raise TemplateError(f"found {seen} JSON object(s) but none has the template fields; {_SHAPE}")
    if "{" in body and any(f'"{name}"' in body for name in FIELDS):
        raise TemplateError("the output starts a template but holds no complete JSON object: it was cut off "
                            f"{CUT_OFF_HINT} or is malformed")
    raise TemplateError(f"no JSON object found in the output; the answer must be one JSON object: {_SHAPE}")


_SEQUENCES_KEY = re.compile(r'"training_sequences"\s*:\s*\[')


def _clean_sequences(items: Iterable[Any]) -> list[str]:
    cleaned = (_clean_text(item) for item in items if isinstance(item, str))
    return [item for item in cleaned if item]


def _salvage_truncated(body: str) -> list[str]:
    """The complete strings of a ``"training_sequences": [`` list cut off by the token limit."""
    match = _SEQUENCES_KEY.search(body)
    if match is None:
        return []
    items: list[Any] = []
    i = match.end()
    while i < len(body) and len(items) < 100_000:
        while i < len(body) and body[i] in " \t\r\n,":
            i += 1
        if i >= len(body) or body[i] != '"':
            break
        try:
            item, i = _DECODER.raw_decode(body, i)
        except (ValueError, RecursionError):
            break
        items.append(item)
    return _clean_sequences(items)


def parse_fill(text: str, *, allow_truncated: bool = True) -> list[str]:
    """The training sequences of a fill answer ``{"training_sequences": [...]}`` as a list of strings.

    Parsed like :func:`parse_template` (fences, thinking, prose, trailing commas); items are stripped,
    empty and non-string items dropped. ``<think>`` / ``</think>`` are reasoning markers wherever they
    appear (everything up to the last ``</think>`` is dropped), so items cannot contain them. With ``allow_truncated`` an answer cut off inside the list keeps
    its complete strings. Raises :class:`TemplateError` (and nothing else) when no non-empty list is found.
    """
    body = _answer_text(text, "fill")
    reason = None
    for obj in _json_objects(body):
        if "training_sequences" not in obj:
            continue
        value = obj["training_sequences"]
        if not isinstance(value, list):
            reason = reason or f"training_sequences must be a list of strings, got {type(value).__name__}"
            continue
        sequences = _clean_sequences(value)
        if sequences:
            return sequences
        reason = reason or "training_sequences has no non-empty string"
    if allow_truncated:
        sequences = _salvage_truncated(body)
        if sequences:
            return sequences
    if reason is None and _SEQUENCES_KEY.search(body):
        reason = ("the output starts a training_sequences list but holds no complete string in it: it was cut "
                  f"off {CUT_OFF_HINT} or is malformed")
    raise TemplateError(reason or 'no {"training_sequences": [...]} object found in the fill output')
