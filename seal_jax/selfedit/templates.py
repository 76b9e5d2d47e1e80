"""Template search, the pure part: templates, parsing, prompts, similarity, archives and SFT selection.

A *template* (Cheong et al., arXiv 2601.14532) is a self-edit strategy written by the model itself: a
data-creation instruction plus the hyperparameters of the next-token-prediction (NTP) update that follows.
The search loop (elsewhere) asks the model for templates with :func:`meta_prompt`, parses them with
:func:`parse_template`, fills each one per passage with :func:`fill_prompt` / :func:`parse_fill`, trains and
scores, and keeps an :class:`Archive`. Nothing here calls a language model or needs JAX; model-written text
is parsed as JSON and validated, never executed.

Allowed ranges (batch size is always 1). Out-of-range numbers are clamped and each change is recorded in
``Template.notes``; wrong types, missing fields, NaN/inf and empty or absurdly short instructions are
rejected with :class:`TemplateError`:

==============================  ==========================================================================
``lora_rank``                   powers of two 4 … 64; other values snap to the nearest power of two in log
                                space (24 → 32, 20 → 16), then clamp
``lora_alpha``                  1 … 256 (the same span as the similarity scale below; scale = alpha / rank)
``lora_dropout``                0 … 0.99 (the paper's 0–1, closed below 1 because LoRA dropout must be < 1)
``learning_rate``               1e-5 … 5e-3
``num_epochs``                  whole numbers 1 … 20 (non-integers round half up)
``gradient_accumulation_steps`` whole numbers 1 … 8
``data_creation_instruction``   at least 20 characters and 4 words, at most 4,000 characters
==============================  ==========================================================================

Hyperparameter similarity of a set of templates (the paper's measure): the mean over pairs and fields of
``max(0, 1 − |Δ| / range)`` on fixed scales — rank log2 [4, 64], alpha log2 [1, 256], dropout linear
[0, 1], learning rate log10 [1e-5, 5e-3], epochs linear [1, 20], grad-accum linear [1, 8]. Sets of fewer
than two templates have no pair and raise :class:`TemplateError` (so an iteration with one usable template
cannot masquerade as "fully homogeneous").

Instruction similarity is the mean pairwise cosine of instruction embeddings. The embeddings come from
``seal_jax.selfedit.embeddings.embed`` (a sentence-embedding model, rows L2-normalised) when that module
imports and does not raise ``EmbeddingsUnavailable``; otherwise from the fallback, character 3-gram TF-IDF
vectors computed in numpy over the given texts (lower-cased, whitespace collapsed, smoothed idf
``ln((1 + N) / (1 + df)) + 1``, rows L2-normalised): identical texts have cosine 1, texts without a
shared 3-gram cosine 0. :func:`instruction_embeddings_with_backend` and :func:`similarity_backend` say
which backend was used.

Archives. :class:`Archive` is the paper's archive: seeded with four human strategies and their scores,
every scored template is added, and the meta-prompt shows the best, second best, second worst and worst
entries. :class:`NoveltyArchive` (ours) adds novelty pressure. We chose **novelty search with a combined
objective** over MAP-Elites: an entry's novelty is its mean distance to its k nearest other entries,
distance = w·(1 − instruction cosine) + (1 − w)·(1 − pairwise hyperparameter similarity), and entries are
ranked (for the meta-prompt, and by the loop for selection) by ``score + λ·novelty``. MAP-Elites needs a
behaviour descriptor cut into cells; ours is a text embedding plus six hyperparameters, any binning of it
would be arbitrary, and with five templates per iteration the archive holds a few dozen entries, so nearly
every cell would hold one entry and "the elite of each cell" would mean "every entry". k-nearest-neighbour
novelty needs no binning, is defined from the second entry on, and keeps pushing away from the cluster the
paper saw the plain archive collapse into within three iterations. Defaults: k = 3, w = 0.5, λ = 0.25 (a
completely new instruction at equal hyperparameters, distance 0.5, is worth 0.125 of accuracy).

Seed scores. The brief asks for the seed scores of Cheong et al.; the paper's text with its tables was not
reachable from this machine (only its abstract), so the seeds carry SEAL's numbers (Zweiger et al., arXiv
2506.10943, Qwen2.5-7B, 200 SQuAD passages) as listed in DESIGN.md: rewrite 0.494; long implications ≈
base-model implications 0.397; repeat verbatim ≈ passage only 0.335; empty ≈ base model 0.327. Gains are
normalized against that base: (score − 0.327) / (1 − 0.327).

Proposal sampling follows the paper: 3 *exploit* proposals (temperature 0.6, top-p 0.95, min-p 0.05) and 2
*explore* proposals (temperature 1.3, top-p 0.95, min-p 0.1) per iteration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the engine is imported lazily, where it is used
    from seal_jax.lm.lora import LoraSpec
    from seal_jax.lm.sampling import SamplingParams
    from seal_jax.lm.training import TrainSpec

__all__ = [
    "EXPLOIT", "EXPLORE", "FIELDS", "HYPERPARAMETERS", "PLACEHOLDER_INSTRUCTION", "PROPOSAL_SCHEDULE",
    "SEAL_HYPERPARAMETERS", "SEED_BASE_ACCURACY", "SEED_SCORES", "Archive", "ArchiveEntry",
    "NoveltyArchive", "Template", "TemplateError", "fill_prompt", "hyperparameter_similarity",
    "instruction_embeddings", "instruction_embeddings_with_backend", "instruction_similarity",
    "mean_sequence_chars", "meta_prompt", "normalized_gain", "pairwise_hyperparameter_similarity",
    "pairwise_instruction_similarity", "parse_fill", "parse_template", "proposal_sampling",
    "select_top", "similarity_backend",
]


class TemplateError(ValueError):
    """A template, fill or archive row that cannot be used; the message says why."""


# ----------------------------------------------------------------------------------------------------
# Fields and ranges

FIELDS = ("data_creation_instruction", "lora_rank", "lora_alpha", "lora_dropout", "learning_rate",
          "num_epochs", "gradient_accumulation_steps")
HYPERPARAMETERS = FIELDS[1:]

RANK_CHOICES = (4, 8, 16, 32, 64)
ALPHA_RANGE = (1.0, 256.0)
DROPOUT_RANGE = (0.0, 0.99)
LR_RANGE = (1e-5, 5e-3)
EPOCHS_RANGE = (1, 20)
GRAD_ACCUM_RANGE = (1, 8)
MIN_INSTRUCTION_CHARS = 20
MIN_INSTRUCTION_WORDS = 4
MAX_INSTRUCTION_CHARS = 4000

# (scale, low, high) of each hyperparameter for the similarity measure.
SIMILARITY_SCALES: dict[str, tuple[str, float, float]] = {
    "lora_rank": ("log2", 4.0, 64.0),
    "lora_alpha": ("log2", 1.0, 256.0),
    "lora_dropout": ("linear", 0.0, 1.0),
    "learning_rate": ("log10", 1e-5, 5e-3),
    "num_epochs": ("linear", 1.0, 20.0),
    "gradient_accumulation_steps": ("linear", 1.0, 8.0),
}

SEAL_HYPERPARAMETERS: dict[str, Any] = {
    "lora_rank": 32, "lora_alpha": 64.0, "lora_dropout": 0.0, "learning_rate": 1e-3, "num_epochs": 10,
    "gradient_accumulation_steps": 1,
}

PLACEHOLDER_INSTRUCTION = "<one paragraph telling the model what training texts to write from the passage>"

MAX_TEXT_CHARS = 1_000_000   # longer model outputs are rejected outright
MAX_CANDIDATES = 64          # at most this many '{' positions are tried as JSON objects
MAX_REPAIRS = 8              # at most this many failed candidates get the trailing-comma repair
MAX_REPAIR_CHARS = 50_000    # the repair scans at most this far
MAX_NUMBER_CHARS = 64        # a number written as a string may be at most this long

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_DECODER = json.JSONDecoder()


def _clean_text(text: str) -> str:
    """``text`` stripped, without control characters (tabs and newlines kept), lone surrogates → U+FFFD."""
    return _SURROGATE.sub("\ufffd", _CONTROL.sub("", text)).strip()


def _number(name: str, value: Any) -> float:
    """``value`` as a finite float; strings like ``"1e-4"`` are accepted, bools and NaN/inf are not."""
    if isinstance(value, bool) or value is None:
        raise TemplateError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not text or len(text) > MAX_NUMBER_CHARS:
            raise TemplateError(f"{name} must be a number, got the string {value[:80]!r}")
        try:
            value = float(text)
        except ValueError:
            raise TemplateError(f"{name} must be a number, got the string {value[:80]!r}") from None
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise TemplateError(f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise TemplateError(f"{name} must be a finite number, got {value!r}")
    return number


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
        """The template as a JSON-able dict with exactly the :data:`FIELDS` (no notes)."""
        return {name: getattr(self, name) for name in FIELDS}

    def to_json(self) -> str:
        """The template as one line of JSON (the text the model should learn to write)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Template:
        """Validate and normalise a dict (e.g. parsed model output) into a :class:`Template`.

        Numbers may be strings (``"1e-4"``); out-of-range numbers are clamped (rank snapped to a power of
        two) and every change, and any ignored extra field, is listed in ``notes``. Raises
        :class:`TemplateError` for a non-dict, a missing field, a wrong type, NaN/inf or an unusable
        instruction.
        """
        if not isinstance(d, Mapping):
            raise TemplateError(f"a template must be a JSON object, got {type(d).__name__}")
        missing = [name for name in FIELDS if name not in d]
        if missing:
            raise TemplateError(f"template is missing field(s) {missing}; a template has exactly {list(FIELDS)}")
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
        return cls(instruction, rank, float(alpha), float(dropout), float(lr), epochs, accum, tuple(notes))

    def lora_spec(self, targets: Sequence[str] = ("q_proj", "v_proj")) -> LoraSpec:
        """This template's adapter as a ``seal_jax.LoraSpec(rank, alpha, dropout, targets)``."""
        from seal_jax.lm.lora import LoraSpec

        return LoraSpec(rank=int(self.lora_rank), alpha=float(self.lora_alpha),
                        dropout=float(self.lora_dropout), targets=tuple(targets))

    def train_spec(self, **overrides: Any) -> TrainSpec:
        """This template's training as a ``seal_jax.TrainSpec``: its learning rate, epochs and grad-accum,
        batch size 1; ``overrides`` set any other ``TrainSpec`` field (``seed``, ``max_len``, …)."""
        from seal_jax.lm.training import TrainSpec

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
    over 1,000,000 characters are refused. Never evaluates anything. Raises :class:`TemplateError`
    (and nothing else) with the reason when no object validates: the reason given is that of the first
    object that looked like a template (had one of the template's fields).
    """
    body = _answer_text(text, "template")
    first_reason: str | None = None
    seen = 0
    for obj in _json_objects(body):
        seen += 1
        try:
            return Template.from_dict(obj)
        except TemplateError as error:
            if first_reason is None and any(name in obj for name in FIELDS):
                first_reason = str(error)
    if first_reason is not None:
        raise TemplateError(first_reason)
    if seen:
        raise TemplateError(f"found {seen} JSON object(s) but none has the template fields {list(FIELDS)}")
    if "{" in body and any(f'"{name}"' in body for name in FIELDS):
        raise TemplateError("the output starts a template but holds no complete JSON object: it was cut off "
                            "(raise max_new_tokens) or is malformed")
    raise TemplateError("no JSON object found in the output; the answer must be one JSON object with the "
                        f"fields {list(FIELDS)}")


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
                  "off (raise max_new_tokens) or is malformed")
    raise TemplateError(reason or 'no {"training_sequences": [...]} object found in the fill output')


# ----------------------------------------------------------------------------------------------------
# Similarity and diversity

def _hyperparameters_of(item: Any) -> dict[str, Any]:
    if isinstance(item, ArchiveEntry):
        item = item.template
    if isinstance(item, Template):
        return item.to_dict()
    if isinstance(item, Mapping):
        return dict(item)
    raise TemplateError(f"expected a Template, ArchiveEntry or dict, got {type(item).__name__}")


def _scaled(templates: Sequence[Any]) -> np.ndarray:
    """``[N, 6]`` positions of the templates' hyperparameters on the similarity scales (0 … 1 in range)."""
    rows = []
    for item in templates:
        d = _hyperparameters_of(item)
        row = []
        for name, (scale, low, high) in SIMILARITY_SCALES.items():
            if name not in d:
                raise TemplateError(f"template has no {name}; hyperparameter similarity needs "
                                    f"{list(SIMILARITY_SCALES)}")
            value = _number(name, d[name])
            if scale == "linear":
                row.append((value - low) / (high - low))
                continue
            if value <= 0:
                raise TemplateError(f"{name} must be positive for its log scale, got {value!r}")
            log = math.log2 if scale == "log2" else math.log10
            row.append((log(value) - log(low)) / (log(high) - log(low)))
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(SIMILARITY_SCALES))


def pairwise_hyperparameter_similarity(templates: Sequence[Any]) -> np.ndarray:
    """``[N, N]`` similarity of every pair: mean over the six fields of ``max(0, 1 − |Δ|/range)``.

    ``templates``: Template objects, ArchiveEntry objects or dicts with the six hyperparameter fields.
    """
    x = _scaled(list(templates))
    return np.clip(1.0 - np.abs(x[:, None, :] - x[None, :, :]), 0.0, None).mean(axis=-1)


def _mean_off_diagonal(matrix: np.ndarray, what: str) -> float:
    n = matrix.shape[0]
    if n < 2:
        raise TemplateError(f"{what} needs at least two items, got {n}")
    i, j = np.triu_indices(n, k=1)
    return float(matrix[i, j].mean())


def hyperparameter_similarity(templates: Sequence[Any]) -> float:
    """Mean pairwise hyperparameter similarity of a set of templates (1.0 = identical hyperparameters).

    ``templates``: Template objects, ArchiveEntry objects or dicts with the six hyperparameter fields
    (numbers may be strings). Raises :class:`TemplateError` for fewer than two templates.
    """
    return _mean_off_diagonal(pairwise_hyperparameter_similarity(templates), "hyperparameter_similarity")


def _tfidf_embeddings(texts: Sequence[str]) -> np.ndarray:
    """``[N, V]`` float32 character 3-gram TF-IDF vectors over ``texts``, rows L2-normalised (zero rows
    for texts without a 3-gram)."""
    grams: list[dict[str, int]] = []
    vocabulary: dict[str, int] = {}
    for text in texts:
        s = " " + " ".join(str(text).lower().split()) + " "
        counts: dict[str, int] = {}
        for k in range(len(s) - 2):
            gram = s[k:k + 3]
            if gram.strip():
                counts[gram] = counts.get(gram, 0) + 1
        for gram in counts:
            vocabulary.setdefault(gram, len(vocabulary))
        grams.append(counts)
    tf = np.zeros((len(texts), max(len(vocabulary), 1)), dtype=np.float64)
    for row, counts in enumerate(grams):
        for gram, count in counts.items():
            tf[row, vocabulary[gram]] = count
    df = (tf > 0).sum(axis=0)
    idf = np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0
    vectors = tf * idf
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _model_embeddings(texts: Sequence[str]) -> np.ndarray | None:
    """``seal_jax.selfedit.embeddings.embed(texts)``, or None when that backend is unavailable."""
    try:
        from seal_jax.selfedit.embeddings import EmbeddingsUnavailable, embed
    except ImportError:
        return None
    try:
        vectors = np.asarray(embed(list(texts)), dtype=np.float32).reshape(len(texts), -1)
    except EmbeddingsUnavailable:
        return None
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)   # promised already; cheap to make sure
    return vectors / np.where(norms > 0, norms, 1.0)


BACKENDS = ("auto", "embeddings", "tfidf")


def instruction_embeddings_with_backend(texts: Sequence[str], backend: str = "auto") -> tuple[np.ndarray, str]:
    """``([N, D] float32 rows L2-normalised, backend name)`` for ``texts``.

    ``backend``: ``"auto"`` (the embedding model if available, else TF-IDF), ``"embeddings"`` (raises
    :class:`TemplateError` if unavailable) or ``"tfidf"``. The returned name is ``"embeddings"`` or
    ``"tfidf"``.
    """
    if backend not in BACKENDS:
        raise TemplateError(f"unknown similarity backend {backend!r}; choose from {BACKENDS}")
    texts = [str(t) for t in texts]
    if backend != "tfidf":
        vectors = _model_embeddings(texts)
        if vectors is not None:
            return vectors, "embeddings"
        if backend == "embeddings":
            raise TemplateError("the embeddings backend is unavailable (seal_jax.selfedit.embeddings did not "
                                "import or raised EmbeddingsUnavailable); use backend='tfidf' or 'auto'")
    return _tfidf_embeddings(texts), "tfidf"


def instruction_embeddings(texts: Sequence[str], backend: str = "auto") -> np.ndarray:
    """``[N, D]`` float32 embeddings of ``texts``, rows L2-normalised (see
    :func:`instruction_embeddings_with_backend`)."""
    return instruction_embeddings_with_backend(texts, backend)[0]


def similarity_backend() -> str:
    """The backend ``"auto"`` uses right now: ``"embeddings"`` or ``"tfidf"`` (embeds one probe text)."""
    return "embeddings" if _model_embeddings(["probe"]) is not None else "tfidf"


def pairwise_instruction_similarity(instructions: Sequence[str], backend: str = "auto") -> np.ndarray:
    """``[N, N]`` cosine similarity of the instructions' embeddings."""
    vectors = instruction_embeddings(instructions, backend)
    return np.clip(vectors.astype(np.float64) @ vectors.astype(np.float64).T, -1.0, 1.0)


def instruction_similarity(instructions: Sequence[str], backend: str = "auto") -> float:
    """Mean pairwise cosine similarity of instructions (1.0 = identical). Raises :class:`TemplateError`
    for fewer than two."""
    if len(instructions) < 2:
        raise TemplateError(f"instruction_similarity needs at least two items, got {len(instructions)}")
    return _mean_off_diagonal(pairwise_instruction_similarity(instructions, backend), "instruction_similarity")


def mean_sequence_chars(fills: Sequence[Sequence[str]]) -> float:
    """Mean over fills of the total characters of a fill's training sequences (0.0 for no fills)."""
    if not fills:
        return 0.0
    return float(np.mean([sum(len(s) for s in fill) for fill in fills]))


# ----------------------------------------------------------------------------------------------------
# Prompts and sampling

_FIELD_HELP = (
    ("data_creation_instruction", "text telling the model what training data to write from a passage. "
     "The model will see the passage and your instruction and must answer with a list of training texts."),
    ("lora_rank", "one of 4, 8, 16, 32, 64."),
    ("lora_alpha", "a number from 1 to 256 (the adapter's update is scaled by alpha / rank)."),
    ("lora_dropout", "a number from 0 to 0.99 (0 = no dropout)."),
    ("learning_rate", "a number from 0.00001 to 0.005."),
    ("num_epochs", "a whole number from 1 to 20 (passes over the training texts)."),
    ("gradient_accumulation_steps", "a whole number from 1 to 8 (training texts per optimiser step)."),
)

_EXAMPLE = {"data_creation_instruction": PLACEHOLDER_INSTRUCTION, "lora_rank": 16, "lora_alpha": 32,
            "lora_dropout": 0.05, "learning_rate": 0.0003, "num_epochs": 5, "gradient_accumulation_steps": 2}


def meta_prompt(shown: Sequence[ArchiveEntry] | None = None) -> str:
    """The request for a new template (the user message; the caller applies the chat template).

    ``shown``: archive entries to show with their scores (and novelty, when set), e.g.
    ``archive.shown()``; ``None`` or empty gives the no-archive prompt.
    """
    lines = [
        "You are designing a learning plan for a language model. The model will read a passage it has never "
        "seen, write its own training data from the passage by following your instruction, and then be "
        "fine-tuned on that data with a LoRA adapter (next-token prediction, one text per batch) using your "
        "hyperparameters. Afterwards it must answer questions about the passage without seeing the passage "
        "again. A plan is scored by the fraction of those questions answered correctly (0 to 1).",
        "",
        "Write the plan as one JSON object with exactly these fields:",
    ]
    lines += [f'- "{name}": {help_text}' for name, help_text in _FIELD_HELP]
    lines += ["", "The shape of the answer (replace every value with your own choice):",
              json.dumps(_EXAMPLE, ensure_ascii=False), ""]
    entries = list(shown or [])
    if entries:
        with_novelty = any(e.novelty is not None for e in entries)
        lines.append("Plans tried so far, with their scores" + (" and novelty" if with_novelty else "") + ":")
        for number, entry in enumerate(entries, 1):
            label = f"score {entry.score:.3f}"
            if entry.novelty is not None:
                label += f", novelty {entry.novelty:.3f}"
            lines += [f"Plan {number} ({label}):", entry.template.to_json()]
        lines.append("")
        if with_novelty:
            lines.append("Novelty measures how different a plan is from the plans tried before (0 = a copy). "
                         "Plans are rewarded for a high score and for novelty.")
        lines.append("Write a new plan that you expect to score higher than every plan above. Do not copy a "
                     "plan above: change the instruction, the hyperparameters, or both.")
    else:
        lines.append("Write the plan you expect to score highest.")
    lines.append("Reply with the JSON object only.")
    return "\n".join(lines)


def fill_prompt(template: Template | Mapping[str, Any], title: str, context: str) -> str:
    """The request to fill ``template`` for one passage (``title\\ncontext``): the passage, the template's
    instruction, and the answer format ``{"training_sequences": [...]}``. Model-written text is inserted
    verbatim (never used as a format string)."""
    if not isinstance(template, Template):
        template = Template.from_dict(template)
    return ("Passage:\n" + f"{title}\n{context}" + "\n\nInstruction:\n" + template.data_creation_instruction
            + '\n\nFollow the instruction for the passage above. Reply with one JSON object of the form '
            '{"training_sequences": ["first training text", "second training text"]}: a list of strings, '
            "each a self-contained training text. Reply with the JSON object only.")


EXPLOIT: dict[str, float] = {"temperature": 0.6, "top_p": 0.95, "min_p": 0.05}
EXPLORE: dict[str, float] = {"temperature": 1.3, "top_p": 0.95, "min_p": 0.1}
PROPOSAL_SCHEDULE: tuple[str, ...] = ("exploit", "exploit", "exploit", "explore", "explore")


def proposal_sampling(kind: str, max_new_tokens: int, seed: int = 0) -> SamplingParams:
    """``seal_jax.SamplingParams`` for a template proposal: ``kind`` is ``"exploit"`` (temperature 0.6,
    top-p 0.95, min-p 0.05) or ``"explore"`` (1.3, 0.95, 0.1)."""
    from seal_jax.lm.sampling import SamplingParams

    settings = {"exploit": EXPLOIT, "explore": EXPLORE}.get(kind)
    if settings is None:
        raise TemplateError(f"unknown proposal kind {kind!r}; choose 'exploit' or 'explore'")
    return SamplingParams(max_new_tokens=max_new_tokens, seed=seed, **settings)


# ----------------------------------------------------------------------------------------------------
# Archives

SOURCES = ("human", "generated")


def normalized_gain(score: float, base: float) -> float:
    """``(score − base) / (1 − base)``: the fraction of the base model's missing accuracy recovered."""
    if not 0.0 <= base < 1.0:
        raise TemplateError(f"base accuracy must lie in [0, 1), got {base!r}")
    return (score - base) / (1.0 - base)


@dataclasses.dataclass(frozen=True)
class ArchiveEntry:
    """One scored template.

    Attributes:
      template: the template.
      score: its mean question accuracy in [0, 1].
      gain: its normalized gain ``(score − base) / (1 − base)`` (None if unknown).
      iteration: the search iteration that produced it (0 for the human seeds).
      source: ``"human"`` or ``"generated"``.
      name: a unique id within its archive.
      novelty: its novelty within a :class:`NoveltyArchive` when last ranked (None otherwise).
    """

    template: Template
    score: float
    gain: float | None
    iteration: int
    source: str
    name: str
    novelty: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.template, Template):
            raise TemplateError(f"ArchiveEntry.template must be a Template, got {type(self.template).__name__}")
        if isinstance(self.score, bool) or not isinstance(self.score, (int, float)) \
                or not 0.0 <= self.score <= 1.0:
            raise TemplateError(f"ArchiveEntry.score must be an accuracy in [0, 1], got {self.score!r}")
        if self.gain is not None and not math.isfinite(self.gain):
            raise TemplateError(f"ArchiveEntry.gain must be finite or None, got {self.gain!r}")
        if self.source not in SOURCES:
            raise TemplateError(f"ArchiveEntry.source must be one of {SOURCES}, got {self.source!r}")
        if not isinstance(self.name, str) or not self.name:
            raise TemplateError("ArchiveEntry.name must be a non-empty string")
        if isinstance(self.iteration, bool) or not isinstance(self.iteration, int) or self.iteration < 0:
            raise TemplateError(f"ArchiveEntry.iteration must be an int >= 0, got {self.iteration!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able row: name, source, iteration, score, gain, novelty and the template's fields."""
        return {"name": self.name, "source": self.source, "iteration": self.iteration, "score": self.score,
                "gain": self.gain, "novelty": self.novelty, "template": self.template.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArchiveEntry:
        """The entry of a row written by :meth:`to_dict` (raises :class:`TemplateError` if malformed)."""
        try:
            return cls(template=Template.from_dict(d["template"]), score=float(d["score"]),
                       gain=None if d.get("gain") is None else float(d["gain"]), iteration=int(d["iteration"]),
                       source=d["source"], name=d["name"],
                       novelty=None if d.get("novelty") is None else float(d["novelty"]))
        except KeyError as error:
            raise TemplateError(f"archive row is missing {error}; rows come from ArchiveEntry.to_dict") from None
        except (TypeError, ValueError) as error:
            if isinstance(error, TemplateError):
                raise
            raise TemplateError(f"malformed archive row: {error}") from None


SEED_BASE_ACCURACY = 0.327
SEED_SCORES: dict[str, float] = {"rewrite": 0.494, "long_implications": 0.397, "repeat_verbatim": 0.335,
                                 "empty": 0.327}
SEED_INSTRUCTIONS: dict[str, str] = {
    "rewrite": "Rewrite the passage in several different ways, each version keeping every fact, name, number "
               "and date of the original. Each rewrite is one training text.",
    "long_implications": "Write a long list of implications of the passage: facts and consequences that follow "
                         "from it directly or indirectly, covering every detail. Each implication is one "
                         "training text.",
    "repeat_verbatim": "Copy the passage exactly as it is written, word for word, as a single training text.",
    "empty": "Write no training data at all: answer with an empty list of training texts.",
}


class Archive:
    """Scored templates; :meth:`shown` picks the entries the meta-prompt shows.

    Entries are ranked by score, ties broken by earlier iteration, then name, then insertion order.
    Names must be unique.
    """

    def __init__(self, entries: Iterable[ArchiveEntry] = ()) -> None:
        self._entries: list[ArchiveEntry] = []
        for entry in entries:
            self.add(entry)

    @classmethod
    def seeded(cls, **kwargs: Any) -> Archive:
        """An archive of the four human strategies (rewrite, long implications, repeat verbatim, empty)
        with SEAL's inner-loop hyperparameters and the seed scores of :data:`SEED_SCORES`."""
        entries = [
            ArchiveEntry(Template(SEED_INSTRUCTIONS[name], **SEAL_HYPERPARAMETERS), score,
                         normalized_gain(score, SEED_BASE_ACCURACY), 0, "human", name)
            for name, score in SEED_SCORES.items()
        ]
        return cls(entries, **kwargs)

    def add(self, entry: ArchiveEntry) -> None:
        """Add a scored template (raises :class:`TemplateError` for a duplicate name)."""
        if not isinstance(entry, ArchiveEntry):
            raise TemplateError(f"Archive.add takes an ArchiveEntry, got {type(entry).__name__}")
        if any(e.name == entry.name for e in self._entries):
            raise TemplateError(f"the archive already has an entry named {entry.name!r}; names must be unique")
        self._entries.append(entry)

    @property
    def entries(self) -> tuple[ArchiveEntry, ...]:
        """All entries in insertion order."""
        return tuple(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _annotated(self) -> list[ArchiveEntry]:
        """The entries as they are ranked and shown (NoveltyArchive fills in ``novelty``)."""
        return list(self._entries)

    def value(self, entry: ArchiveEntry) -> float:
        """The selection value of an (annotated) entry: its score."""
        return entry.score

    def ranked(self) -> list[ArchiveEntry]:
        """Entries from best to worst by :meth:`value`; ties: earlier iteration, then name, then insertion."""
        entries = self._annotated()
        values = [self.value(e) for e in entries]
        order = sorted(range(len(entries)),
                       key=lambda i: (-values[i], entries[i].iteration, entries[i].name, i))
        return [entries[i] for i in order]

    def shown(self) -> list[ArchiveEntry]:
        """The best, second best, second worst and worst entries (fewer, without repeats, when the archive
        holds fewer than four)."""
        ranked = self.ranked()
        n = len(ranked)
        picked: list[int] = []
        for i in (0, 1, n - 2, n - 1):
            if 0 <= i < n and i not in picked:
                picked.append(i)
        return [ranked[i] for i in picked]

    def to_rows(self) -> list[dict[str, Any]]:
        """The entries as JSON-able rows (insertion order)."""
        return [e.to_dict() for e in self._entries]

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], **kwargs: Any) -> Archive:
        """An archive from rows written by :meth:`to_rows` (``kwargs`` go to the constructor)."""
        return cls((ArchiveEntry.from_dict(r) for r in rows), **kwargs)

    def to_jsonl(self, path: str | Path) -> None:
        """Write the entries to ``path``, one JSON row a line (the file is replaced)."""
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.to_rows())
        Path(path).write_text(text, encoding="utf-8")

    @classmethod
    def from_jsonl(cls, path: str | Path, **kwargs: Any) -> Archive:
        """The archive stored at ``path`` by :meth:`to_jsonl` (or appended row by row)."""
        rows = []
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as error:
                    raise TemplateError(f"{path}:{number} is not JSON: {error}") from None
        return cls.from_rows(rows, **kwargs)


class NoveltyArchive(Archive):
    """An archive that rewards novelty: entries rank by ``score + lam · novelty``.

    Novelty of an entry: mean distance to its ``k`` nearest other entries (0.0 for a lone entry), with
    distance = ``weight · (1 − instruction cosine) + (1 − weight) · (1 − hyperparameter similarity)``.
    ``backend`` chooses the instruction embeddings (see :func:`instruction_embeddings_with_backend`);
    ``backend_used`` records the one used last. See the module docstring for why novelty search rather
    than MAP-Elites.
    """

    def __init__(self, entries: Iterable[ArchiveEntry] = (), *, k: int = 3, weight: float = 0.5,
                 lam: float = 0.25, backend: str = "auto") -> None:
        if not isinstance(k, int) or k < 1:
            raise TemplateError(f"NoveltyArchive.k must be a positive int, got {k!r}")
        if not 0.0 <= weight <= 1.0:
            raise TemplateError(f"NoveltyArchive.weight must lie in [0, 1], got {weight!r}")
        if not (math.isfinite(lam) and lam >= 0):
            raise TemplateError(f"NoveltyArchive.lam must be >= 0, got {lam!r}")
        if backend not in BACKENDS:
            raise TemplateError(f"unknown similarity backend {backend!r}; choose from {BACKENDS}")
        self.k, self.weight, self.lam, self.backend = k, weight, lam, backend
        self.backend_used: str | None = None
        super().__init__(entries)

    def _distances(self, templates: Sequence[Template]) -> np.ndarray:
        """``[N, N]`` distances between templates."""
        vectors, self.backend_used = instruction_embeddings_with_backend(
            [t.data_creation_instruction for t in templates], self.backend)
        cosine = np.clip(vectors.astype(np.float64) @ vectors.astype(np.float64).T, -1.0, 1.0)
        hyper = pairwise_hyperparameter_similarity(templates)
        return self.weight * (1.0 - cosine) + (1.0 - self.weight) * (1.0 - hyper)

    def distance_matrix(self) -> np.ndarray:
        """``[N, N]`` distances between the entries (insertion order)."""
        if not self._entries:
            return np.zeros((0, 0))
        return self._distances([e.template for e in self._entries])

    def _knn_mean(self, distances: np.ndarray) -> float:
        if distances.size == 0:
            return 0.0
        return float(np.sort(distances)[: self.k].mean())

    def novelties(self) -> np.ndarray:
        """``[N]`` novelty of each entry (insertion order)."""
        d = self.distance_matrix()
        n = d.shape[0]
        return np.array([self._knn_mean(np.delete(d[i], i)) for i in range(n)], dtype=np.float64)

    def novelty_of(self, template: Template) -> float:
        """Novelty of a candidate ``template`` against the current entries (0.0 for an empty archive)."""
        if not self._entries:
            return 0.0
        d = self._distances([template] + [e.template for e in self._entries])
        return self._knn_mean(d[0, 1:])

    def _annotated(self) -> list[ArchiveEntry]:
        return [dataclasses.replace(e, novelty=float(v)) for e, v in zip(self._entries, self.novelties(), strict=True)]

    def value(self, entry: ArchiveEntry) -> float:
        """``score + lam · novelty`` of an entry (novelty as annotated by :meth:`ranked`, else 0)."""
        return entry.score + self.lam * (entry.novelty or 0.0)


# ----------------------------------------------------------------------------------------------------
# SFT rows between iterations

SELECT_KEYS = ("template_id", "passage_id", "fill_index", "accuracy", "fill_prompt", "fill_text", "meta_prompt",
               "template_text")


def _failed(row: Mapping[str, Any]) -> bool:
    accuracy = row.get("accuracy")
    if row.get("error") or accuracy is None or isinstance(accuracy, bool):
        return True
    if not isinstance(accuracy, numbers.Real) or not math.isfinite(accuracy):
        return True
    return not (isinstance(row.get("fill_text"), str) and row["fill_text"].strip())


def select_top(rows: Iterable[Mapping[str, Any]], k: int = 2) -> list[dict[str, Any]]:
    """SFT pairs from the per-fill results of one iteration: the top-``k`` templates of every passage,
    each with its best fill.

    ``rows``: one dict per (template, passage, fill) with :data:`SELECT_KEYS`; rows with an ``error``, a
    missing/non-finite ``accuracy`` or an empty ``fill_text`` are skipped. Per passage, a template's best
    fill is its highest-accuracy fill (ties: lowest ``fill_index``), and templates rank by that accuracy
    (ties: template id order). Each chosen (passage, template) gives two rows, in passage-id then rank
    order: ``{"kind": "template", "prompt": meta_prompt, "completion": template_text, …}`` and
    ``{"kind": "fill", "prompt": fill_prompt, "completion": fill_text, …}`` (a template chosen for several
    passages thus appears several times, weighting it by how many passages it wins).
    """
    if not isinstance(k, int) or k < 1:
        raise TemplateError(f"select_top needs k >= 1, got {k!r}")
    best: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        missing = [key for key in SELECT_KEYS if key not in row]
        if missing:
            raise TemplateError(f"select_top row is missing {missing}; rows need {list(SELECT_KEYS)}")
        if isinstance(row["fill_index"], bool) or not isinstance(row["fill_index"], numbers.Integral):
            raise TemplateError(f"select_top row has fill_index {row['fill_index']!r}; it must be an int")
        if _failed(row):
            continue
        key = (str(row["passage_id"]), str(row["template_id"]))
        current = best.get(key)
        if current is None or (-row["accuracy"], row["fill_index"]) < (-current["accuracy"], current["fill_index"]):
            best[key] = row
    per_passage: dict[str, list[Mapping[str, Any]]] = {}
    for (passage, _), row in best.items():
        per_passage.setdefault(passage, []).append(row)
    out: list[dict[str, Any]] = []
    for passage in sorted(per_passage):
        chosen = sorted(per_passage[passage], key=lambda r: (-r["accuracy"], str(r["template_id"])))[:k]
        for rank, row in enumerate(chosen):
            common = {"template_id": row["template_id"], "passage_id": row["passage_id"],
                      "fill_index": row["fill_index"], "accuracy": row["accuracy"], "rank": rank}
            out.append({"kind": "template", "prompt": row["meta_prompt"], "completion": row["template_text"],
                        **common})
            out.append({"kind": "fill", "prompt": row["fill_prompt"], "completion": row["fill_text"], **common})
    return out
