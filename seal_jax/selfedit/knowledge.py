"""One knowledge-incorporation run: passages × conditions → accuracies, rewards, results rows, resume.

For every passage: the base model answers the passage's questions once (``accuracy_before``); every
training condition gets its K self-edits (generated in one batch, replayed, or the passage alone), all
candidates of the passage train together in one program (``LM.train_adapters``), all adapters answer
the questions at once (K stacked), and a grader scores the answers. Rows are appended to
``results.jsonl`` passage by passage (all rows of a passage in one write), so a killed run resumes after
its last finished passage with nothing lost or duplicated. Randomness is derived from (seed, passage id,
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
import hashlib
import json
import os
import re
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from seal_jax.selfedit import grading
from seal_jax.selfedit.data import DataError, Passage, load_passages, load_seal_selfedits, select_passages
from seal_jax.selfedit.judge import JudgeGrader
from seal_jax.selfedit.multihost import agree, is_writer
from seal_jax.selfedit.strategies import (
    FILL_FALLBACKS,
    completions_for,
    fill_pieces,
    get_strategy,
    pieces_to_sequences,
    question_prompt,
    self_edit_prompt,
    training_sequences,
)

ROW_FIELDS = ("passage_id", "title", "condition", "candidate", "self_edit", "n_sequences", "accuracy_before",
              "accuracy_after", "reward", "answers", "failure")


class RunConfigError(ValueError):
    """A run configuration that cannot be used."""


TEMPLATE_CONDITION_DEFAULTS: dict[str, Any] = {
    "archive": True, "proposal_max_new_tokens": 512, "max_retries": 2, "candidates": 1, "fill_max_new_tokens": None,
    "fill_fallback": "none", "max_epochs": None,
}


DATA_KEYS = frozenset({"source", "n", "start", "shuffle", "seed", "selfedits", "subset", "ids"})


_DATA_TYPES = (("source", str, "a file path, 'demo' or 'hub:NAME'"), ("n", int, "an integer"),
               ("start", int, "an integer"), ("seed", int, "an integer"), ("shuffle", bool, "true or false"),
               ("selfedits", str, "a file path"), ("subset", str, "'selfedits'"), ("ids", list, "a list of passage ids"))


def check_data_table(table: Any, where: str) -> None:
    """Check that a data table (``[data]``, ``restem.eval_data`` …) is a table of known keys (``None`` passes).

    Raises:
      RunConfigError: naming the table and the unknown keys.
    """
    if table is None:
        return
    if not isinstance(table, dict):
        raise RunConfigError(f"[{where}] must be a table, got {table!r}")
    unknown = sorted(set(table) - DATA_KEYS)
    if unknown:
        raise RunConfigError(f"unknown keys in [{where}]: {unknown}; known keys: {sorted(DATA_KEYS)}")
    for key, kinds, what in _DATA_TYPES:
        value = table.get(key)
        if value is not None and (not isinstance(value, kinds) or (kinds is int and isinstance(value, bool))):
            raise RunConfigError(f"{where}.{key} must be {what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A knowledge-incorporation run (one TOML file in ``experiments/``; see its README for every key).

    Attributes:
      name: run name (the default output folder is ``checkpoints/runs/NAME``).
      model: HF-format model folder (or hub id when online); ``tokenizer`` optionally another folder.
      dtype, mesh: engine settings (``mesh`` like ``"data=2,fsdp=4"``; empty for one device).
      remat: recompute each layer's activations in the backward pass of LoRA training (``LM.load(remat=True)``):
        far less activation memory for about a third more training compute; ``seal-jax plan`` says when
        a model and sequence length need it.
      chat: format prompts with the tokenizer's chat template (instruct models).
      data: ``{"source", "n", "start", "shuffle", "seed"}`` for :func:`load_passages`, ``"selfedits"``
        (SEAL's released self-edits, for ``replay``), ``"subset"`` (``"selfedits"``: SEAL's evaluation
        passages in that file's order, then ``start`` and ``n``) or ``"ids"`` (these passages, in this
        order); other keys are an error. See :func:`select_data`.
      conditions: strategy names (``base`` is always evaluated: it gives ``accuracy_before``).
      k: self-edits per passage and condition; repeats: adapters trained per self-edit.
      selfedit_sampling: ``{"max_new_tokens", "temperature", "top_p", "top_k", "min_p"}``.
      include_passage: append the passage to every self-edit's training sequences.
      lora, train: :class:`~seal_jax.LoraSpec` / :class:`~seal_jax.TrainSpec` fields.
      eval_max_new_tokens: answer length; grader: a name from :data:`grading.GRADERS`, ``"judge"``
        (the loaded model judges every answer) or ``"rules+judge"`` (only what the offline rules leave
        undecided).
      seed: the run's seed.
      template_condition: options of the ``template`` condition (see :data:`TEMPLATE_CONDITION_DEFAULTS`):
        ``archive`` (show the seeded archive in the meta-prompt), ``proposal_max_new_tokens``,
        ``max_retries``, ``candidates`` (proposals sampled together per attempt; the first valid one is
        used), ``fill_max_new_tokens`` (default: ``selfedit_sampling.max_new_tokens``),
        ``fill_fallback`` (``"none"`` or ``"lines"``), ``max_epochs`` (cap on the template's epochs, or
        ``None``).
    """

    name: str
    model: str
    tokenizer: str | None = None
    dtype: str = "float32"
    mesh: str | None = None
    remat: bool = False
    chat: bool = True
    data: dict[str, Any] = dataclasses.field(default_factory=lambda: {"source": "demo"})
    conditions: tuple[str, ...] = ("base", "passage", "implications")
    k: int = 1
    repeats: int = 1
    selfedit_sampling: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"max_new_tokens": 256, "temperature": 1.0, "top_p": 0.95})
    include_passage: bool = True
    lora: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_max_new_tokens: int = 64
    grader: str = "offline"
    seed: int = 0
    template_condition: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for c in self.conditions:
            get_strategy(c)
        unknown = sorted(set(self.template_condition) - set(TEMPLATE_CONDITION_DEFAULTS))
        if unknown:
            raise RunConfigError(f"unknown keys in [template_condition]: {unknown}; known keys: "
                                 f"{sorted(TEMPLATE_CONDITION_DEFAULTS)}")
        options = self.template_options()
        if options["fill_fallback"] not in FILL_FALLBACKS:
            raise RunConfigError(f"template_condition.fill_fallback must be one of {FILL_FALLBACKS}, got "
                                 f"{options['fill_fallback']!r}")
        if not isinstance(options["candidates"], int) or options["candidates"] < 1:
            raise RunConfigError(f"template_condition.candidates must be a positive integer, got {options['candidates']}")
        if options["max_epochs"] is not None and options["max_epochs"] < 1:
            raise RunConfigError(f"template_condition.max_epochs must be >= 1 or absent, got {options['max_epochs']}")
        if "template" in self.conditions and self.train.get("batch_size", 1) != 1:
            raise RunConfigError("the template condition trains with batch size 1 (the paper's) in the same call "
                                 "as the other conditions; set train.batch_size = 1")
        if not isinstance(self.remat, bool):
            raise RunConfigError(f"remat must be true or false, got {self.remat!r}")
        for key in ("k", "repeats", "eval_max_new_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RunConfigError(f"{key} must be a positive integer, got {value!r}")
        check_data_table(self.data, "data")
        from seal_jax.lm.api import DTYPES

        if self.dtype not in DTYPES:
            raise RunConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        from seal_jax import SamplingParams

        known = sorted(f.name for f in dataclasses.fields(SamplingParams))
        try:
            SamplingParams(**self.selfedit_sampling)
        except (TypeError, ValueError) as e:
            raise RunConfigError(f"[selfedit_sampling]: {e}; known keys: {known}") from None
        if self.grader not in grading.JUDGE_GRADERS and self.grader not in grading.GRADERS:
            raise RunConfigError(f"unknown grader {self.grader!r}; choose one of "
                                 f"{sorted(grading.GRADERS) + sorted(grading.JUDGE_GRADERS)} (the last two ask the "
                                 "run's model)")
        from seal_jax import LoraSpec, TrainSpec

        for table, build, spec_class in (("lora", self.lora_spec, LoraSpec), ("train", self.train_spec, TrainSpec)):
            try:
                build()
            except TypeError as e:
                known = sorted(f.name for f in dataclasses.fields(spec_class) if f.name != "seed")
                hint = f"known keys: {known}" if "unexpected keyword" in str(e) else "check the types of its values"
                raise RunConfigError(f"[{table}]: {e}; {hint}") from None
            except ValueError as e:
                raise RunConfigError(f"[{table}]: {e}") from None

    def lora_spec(self) -> Any:
        """The run's :class:`~seal_jax.LoraSpec` (SEAL's defaults for missing fields)."""
        from seal_jax.lm.lora import LoraSpec

        fields = dict(self.lora)
        if "targets" in fields and isinstance(fields["targets"], list):
            fields["targets"] = tuple(fields["targets"])
        return LoraSpec(**{**dataclasses.asdict(LoraSpec.seal()), **fields})

    def train_spec(self, seed: int = 0) -> Any:
        """The run's :class:`~seal_jax.TrainSpec` with ``seed`` (SEAL's defaults for missing fields)."""
        from seal_jax.lm.training import TrainSpec

        return TrainSpec(**{**dataclasses.asdict(TrainSpec.seal()), **self.train, "seed": seed})

    def template_options(self) -> dict[str, Any]:
        """``template_condition`` over :data:`TEMPLATE_CONDITION_DEFAULTS`."""
        return {**TEMPLATE_CONDITION_DEFAULTS, **self.template_condition}

    def template_specs(self, template: Any, seed: int, max_epochs: int | None = None) -> tuple[Any, Any]:
        """``(LoraSpec, TrainSpec)`` of one template candidate: the template's rank, alpha, dropout,
        learning rate, epochs (at most ``max_epochs``) and grad-accum, batch size 1; the run's LoRA targets
        and its other training fields (``max_len``, ``schedule``, ``loss``, …); ``seed``."""
        base = self.train_spec(seed)
        extra = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
                 if f.name not in ("learning_rate", "epochs", "batch_size", "grad_accum")}
        train = template.train_spec(**extra)
        if max_epochs is not None and train.epochs > max_epochs:
            train = dataclasses.replace(train, epochs=int(max_epochs))
        return template.lora_spec(self.lora_spec().targets), train

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> RunConfig:
        """Build from a parsed TOML/JSON table; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RunConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
        raw = dict(raw)
        if "conditions" in raw:
            raw["conditions"] = tuple(raw["conditions"])
        try:
            return cls(**raw)
        except TypeError as e:
            raise RunConfigError(f"{where}: {e}") from None
        except ValueError as e:
            raise RunConfigError(f"{where}: {e}") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a run config TOML file."""
        return cls.from_dict(read_toml(path), where=str(path))

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict, as it reads back from ``run_config.json`` (tuples become lists), so a config
        built in Python compares equal to its saved form when a run resumes."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A run config file parsed; a missing file or bad TOML is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run config at {path}; see experiments/README.md")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RunConfigError(f"{path}: {e}") from None


def split_extension_table(raw: dict[str, Any], table_name: str, known: set[str], *, where: str, kind: str,
                          conditions_note: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """For a config that extends :class:`RunConfig` with one TOML table (ReST-EM's ``[restem]``, template
    search's ``[templates]``): the knowledge keys and that table, checked.

    Args:
      raw: the parsed TOML; table_name: the extension's table; known: the keys that table may hold.
      where: the file, for messages; kind: what the config is ("ReST-EM"); conditions_note: why such a
        config has no ``conditions`` key (completes "a {kind} config ...").
    Returns:
      ``(knowledge keys, table)``.
    Raises:
      RunConfigError: no such table, a ``conditions`` key, or unknown keys in the table.
    """
    raw = dict(raw)
    table = raw.pop(table_name, None)
    if not isinstance(table, dict):
        raise RunConfigError(f"{where}: a {kind} config needs a [{table_name}] table (see experiments/README.md)")
    if "conditions" in raw:
        raise RunConfigError(f"{where}: a {kind} config {conditions_note}")
    unknown = sorted(set(table) - known)
    if unknown:
        raise RunConfigError(f"{where}: unknown keys in [{table_name}]: {unknown}; known keys: {sorted(known)}")
    return raw, table


def extension_json(knowledge: RunConfig, extension: Any, table_name: str) -> dict[str, Any]:
    """The JSON form of a config extending ``knowledge`` (a dataclass whose other fields are its table):
    the knowledge keys without ``conditions`` plus ``{table_name: {field: value}}``."""
    out = knowledge.to_json()
    out.pop("conditions")
    table = {f.name: getattr(extension, f.name) for f in dataclasses.fields(extension) if f.name != "knowledge"}
    return json.loads(json.dumps({**out, table_name: table}))  # as run_config.json reads back (lists, not tuples)


# Engine settings that do not change a run's results: a run may be resumed with them changed (for example
# with ``remat`` turned on after running out of memory).
RESUME_FREE_KEYS = frozenset({"remat"})


def config_differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Top-level keys whose values differ between two saved configs, except :data:`RESUME_FREE_KEYS`."""
    keys = (set(previous) | set(current)) - RESUME_FREE_KEYS
    return sorted(k for k in keys if previous.get(k) != current.get(k))


def check_run_config(out: Path, config_json: dict[str, Any], *, resume: bool) -> None:
    """When resuming, check that ``config_json`` equals the config saved in ``out/run_config.json``
    (up to :data:`RESUME_FREE_KEYS`).

    Raises:
      RunConfigError: naming the keys that differ.
    """
    config_file = out / "run_config.json"
    if resume and config_file.is_file():
        changed = config_differences(json.loads(config_file.read_text()), config_json)
        if changed:
            raise RunConfigError(f"cannot resume {out}: the config differs in {changed}")


def save_run_config(out: Path, config_json: dict[str, Any], *, resume: bool) -> None:
    """Write ``out/run_config.json`` (process 0 only); when resuming, first :func:`check_run_config`
    (on process 0, its verdict shared with every process)."""
    agree(lambda: check_run_config(out, config_json, resume=resume))
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(config_json, indent=2))


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------------
# Results I/O


class ResultsFileError(ValueError):
    """A results/proposals JSONL file with a damaged line before its end (not a torn last write)."""


def read_rows(path: Path, *, repair: bool = True) -> list[dict[str, Any]]:
    """Rows of a JSONL results file (``[]`` when it does not exist).

    A run appends each passage's rows in one write (:func:`append_rows`), every row carrying
    ``passage_rows``, the number of rows written with it. A run killed mid-write therefore leaves at
    most one incomplete passage at the end: a torn last line (no newline, or not parseable), or fewer
    whole rows than their ``passage_rows`` says. That passage's rows are left out, so a resumed run redoes
    it instead of keeping part of it. (For files without ``passage_rows``, a torn line also drops the whole
    rows before it that share its ``passage_id``, or the last passage's when the tear hides the id.)
    ``repair=True`` (the resume path) also cuts the file back to the rows returned; ``repair=False``
    (reports, summaries of a run still writing) never changes it.

    Raises:
      ResultsFileError: a line before the last one does not parse (the file was edited or damaged);
        the message names the file and the line.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # ``tail`` is b"" when the file ends with a newline
    rows: list[dict[str, Any]] = []
    ends: list[int] = []  # byte offset after each kept row
    offset = 0
    torn = bool(tail.strip())
    for number, line in enumerate(complete, start=1):
        offset += len(line) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(complete) and not tail.strip():
                torn = True  # the last line, cut inside a multi-byte character or JSON token
                break
            raise ResultsFileError(
                f"{path}: line {number} is not valid JSON ({e.msg}); it is not the last line, so this is not a "
                "run killed mid-write. Restore the file, or move the damaged rows out and resume") from e
        if not isinstance(row, dict):
            raise ResultsFileError(f"{path}: line {number} is {type(row).__name__}, not a JSON object")
        rows.append(row)
        ends.append(offset)
    whole = _last_passage_whole(rows)
    if whole is False or (whole is None and torn):
        if whole is None:  # an older file without passage_rows: guess the torn write's passage
            torn_id = _passage_id_of(tail) if tail.strip() else None
            last_id = torn_id if torn_id is not None else rows[-1].get("passage_id")
        else:
            last_id = rows[-1].get("passage_id")
        while rows and last_id is not None and rows[-1].get("passage_id") == last_id:
            rows.pop()
            ends.pop()
    keep = ends[-1] if ends else 0
    if repair and keep != len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    return rows


def _last_passage_whole(rows: list[dict[str, Any]]) -> bool | None:
    """Whether the last passage's rows are all there (by ``passage_rows``); ``None`` when it cannot tell."""
    if not rows:
        return True
    size, pid = rows[-1].get("passage_rows"), rows[-1].get("passage_id")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return None
    run = 0
    for r in reversed(rows):
        if r.get("passage_id") != pid or r.get("passage_rows") != size:
            break
        run += 1
    return run % size == 0


def _passage_id_of(torn_line: bytes) -> Any:
    """The ``passage_id`` written at the start of a torn JSONL line, if it is readable there."""
    m = re.search(rb'"passage_id":\s*("(?:[^"\\]|\\.)*")', torn_line)
    if not m:
        return None
    try:
        return json.loads(m.group(1))
    except json.JSONDecodeError:
        return None


def append_passage(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append one passage's rows to a results file, each with ``passage_rows`` (how many rows the passage
    wrote), in one write (:func:`append_rows`); :func:`read_rows` drops a passage a kill cut short."""
    append_rows(path, [{**r, "passage_rows": len(rows)} for r in rows])


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows to a JSONL file: all their lines in one ``write`` (retried only for what a short write
    left), then fsync."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it in one call unless interrupted
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def summarize(rows: Sequence[dict[str, Any]], model: str) -> dict[str, Any]:
    """``{"model", "conditions": {name: {accuracy, accuracy_std, n_questions, n_passages, mean_gain,
    failures}}}``.

    ``accuracy`` is correct answers over all answered questions of the condition (every candidate and
    repeat counts); ``accuracy_std`` is the standard deviation over passages of the per-passage accuracy;
    ``mean_gain`` is the mean of ``accuracy_after - accuracy_before`` over rows; ``failures`` counts the
    rows with a ``failure`` (no adapter trained: no usable self-edit, an invalid template, …).
    """
    conditions: dict[str, Any] = {}
    for name in dict.fromkeys(r["condition"] for r in rows):
        sel = [r for r in rows if r["condition"] == name]
        n_q = sum(len(r["answers"]) for r in sel)
        correct = sum(sum(a["correct"] for a in r["answers"]) for r in sel)
        per_passage: dict[str, list[float]] = {}
        for r in sel:
            per_passage.setdefault(r["passage_id"], []).append(r["accuracy_after"])
        means = [float(np.mean(v)) for v in per_passage.values()]
        conditions[name] = {
            "accuracy": correct / n_q if n_q else float("nan"),
            "accuracy_std": float(np.std(means)) if means else float("nan"),
            "n_questions": n_q,
            "n_passages": len(per_passage),
            "mean_gain": float(np.mean([r["accuracy_after"] - r["accuracy_before"] for r in sel])),
            "failures": sum(1 for r in sel if r.get("failure")),
        }
    return {"model": model, "conditions": conditions}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    lines = [f"Model: `{summary['model']}`", "",
             "| condition | accuracy | std over passages | questions | passages | mean gain | failures |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in summary["conditions"].items():
        lines.append(f"| {name} | {100 * c['accuracy']:.1f}% | {100 * c['accuracy_std']:.1f} | {c['n_questions']} | "
                     f"{c['n_passages']} | {100 * c['mean_gain']:+.1f} | {c.get('failures', 0)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# The run


BatchGrader = Callable[[Sequence[tuple[str, str, str]]], list[dict[str, Any]]]


def make_grader(config: RunConfig, lm: Any) -> BatchGrader:
    """A batch grader ``[(question, gold, prediction)] -> [{"correct": bool, ...}]`` for the run's ``grader``
    setting. The LLM judges (``judge``, ``rules+judge``, asking ``lm``) add ``graded_by`` (``"rules"``,
    ``"model"`` or ``"empty"``) and ``judge_reply`` (the model's raw reply, or None) to every verdict."""
    if config.grader in grading.JUDGE_GRADERS:
        judge = JudgeGrader(lm, rules_first=grading.JUDGE_GRADERS[config.grader], chat=config.chat)
        return lambda items: [{"correct": r.verdict, "graded_by": r.source, "judge_reply": r.reply}
                              for r in judge.judge(items)]
    fn = grading.get_grader(config.grader)
    return lambda items: [{"correct": bool(fn(q, g, p))} for q, g, p in items]


def answer_questions(lm: Any, passage: Passage, config: RunConfig, adapters: Any = None) -> Any:
    """Greedy answers to every question of ``passage`` (no passage in context): a list of B strings, or
    K lists with K stacked adapters."""
    from seal_jax.lm.sampling import SamplingParams

    prompts = [question_prompt(passage.title, q.question) for q in passage.questions]
    params = SamplingParams(max_new_tokens=config.eval_max_new_tokens, temperature=0.0)
    return lm.generate(prompts, params, adapters=adapters, chat=config.chat)


def scored_answers(passage: Passage, answers: Sequence[str], grader: BatchGrader) -> list[dict[str, Any]]:
    """``[{question, gold, prediction, correct, ...}]`` for one candidate's answers (``grader`` from
    :func:`make_grader`; its extra fields are kept)."""
    verdicts = grader([(q.question, q.answer, a) for q, a in zip(passage.questions, answers, strict=True)])
    return [{"question": q.question, "gold": q.answer, "prediction": a.strip(), **v}
            for q, a, v in zip(passage.questions, answers, verdicts, strict=True)]


def generate_self_edits(lm: Any, passage: Passage, config: RunConfig, template: Any = None) -> dict[str, list[str]]:
    """K sampled self-edits for every generating condition of the run, in one batch per condition; with
    ``template`` (a :class:`~seal_jax.selfedit.templates.Template`) also K fills of it under ``"template"``."""
    from seal_jax.lm.sampling import SamplingParams
    from seal_jax.selfedit.meta_prompts import fill_prompt

    out: dict[str, list[str]] = {}
    for name in config.conditions:
        strategy = get_strategy(name)
        if strategy.source == "template" and template is not None:
            prompt = fill_prompt(template, passage.title, passage.context)
            length = config.template_options()["fill_max_new_tokens"]
        elif strategy.source == "generate":
            prompt, length = self_edit_prompt(strategy, passage, chat=config.chat), None
        else:
            continue
        params = SamplingParams(**{"max_new_tokens": 256, "temperature": 1.0, "top_p": 0.95,
                                   **config.selfedit_sampling, "seed": derived_seed(config.seed, passage.id, name)})
        if length is not None:
            params = dataclasses.replace(params, max_new_tokens=int(length))
        out[name] = lm.generate([prompt] * config.k, params, chat=config.chat)
    return out


def passage_rows(lm: Any, passage: Passage, config: RunConfig, grader: BatchGrader,
                 replay: dict[str, list[str]] | None, template: Any = None,
                 template_failure: str | None = None) -> list[dict[str, Any]]:
    """All result rows of one passage (base, then every training condition's candidates).

    ``template``: the run's proposed :class:`~seal_jax.selfedit.templates.Template` for the ``template``
    condition (``None`` with ``template_failure`` saying why there is none). Every candidate trains in one
    ``train_adapters`` call, human strategies with the run's LoRA/training specs and template fills with the
    template's own (see :meth:`RunConfig.template_specs`).
    """
    base_scored = scored_answers(passage, answer_questions(lm, passage, config), grader)
    before = sum(a["correct"] for a in base_scored) / len(base_scored)
    rows = []
    if "base" in config.conditions:
        rows.append(result_row(passage, "base", 0, None, 0, before, before, base_scored, None, repeat=0))
    generated = generate_self_edits(lm, passage, config, template)
    options = config.template_options()
    # condition, candidate, repeat, edit, sequences, (LoraSpec, TrainSpec), extra row fields
    jobs: list[tuple[str, int, int, str | None, list[str], tuple[Any, Any], dict[str, Any]]] = []
    for name in config.conditions:
        strategy = get_strategy(name)
        if not strategy.trains:
            continue
        if strategy.source == "template":
            if template is None:
                reason = f"no valid template: {template_failure or 'the proposal failed'}"
                rows.extend(result_row(passage, name, c, None, 0, before, before, [], reason, repeat=0)
                            for c in range(config.k))
                continue
            for c, text in enumerate(generated[name]):
                try:
                    pieces, fallback = fill_pieces(text, options["fill_fallback"])
                except ValueError as error:
                    rows.extend(result_row(passage, name, c, text, 0, before, before, [], f"fill: {error}", repeat=r,
                                           fill_fallback=False) for r in range(config.repeats))
                    continue
                seqs = pieces_to_sequences(passage, pieces, include_passage=config.include_passage)
                for r in range(config.repeats):
                    specs = config.template_specs(template, derived_seed(config.seed, passage.id, name, c, r),
                                                  options["max_epochs"])
                    jobs.append((name, c, r, text, seqs, specs, {"fill_fallback": fallback,
                                                                 "template": template.to_dict()}))
            continue
        k = 1 if strategy.source == "passage" else config.k
        edits = completions_for(strategy, passage, generated.get(name), replay, k)
        for c, edit in enumerate(edits):
            seqs = training_sequences(passage, edit, include_passage=config.include_passage or edit is None)
            for r in range(config.repeats):
                specs = (config.lora_spec(), config.train_spec(seed=derived_seed(config.seed, passage.id, name, c, r)))
                jobs.append((name, c, r, edit, seqs, specs, {}))
    if not jobs:
        return rows
    usable = [j for j in jobs if j[4]]
    for name, c, r, edit, _, _, extra in (j for j in jobs if not j[4]):
        rows.append(result_row(passage, name, c, edit, 0, before, before, [], "self-edit produced no training sequence",
                               repeat=r, **extra))
    if not usable:
        return rows
    adapters = lm.train_adapters([j[4] for j in usable], [j[5][0] for j in usable], [j[5][1] for j in usable],
                                 seed=config.seed)
    answers = answer_questions(lm, passage, config, adapters=adapters)
    for i, (name, c, r, edit, seqs, _, extra) in enumerate(usable):
        scored = scored_answers(passage, answers[i], grader)
        after = sum(a["correct"] for a in scored) / len(scored)
        losses = adapters.losses[i]
        rows.append(result_row(passage, name, c, edit, len(seqs), before, after, scored, adapters.failed[i], repeat=r,
                               train_loss=[losses[0], losses[-1]] if losses else None, **extra))
    return rows


def result_row(passage: Passage, condition: str, candidate: int, edit: str | None, n_sequences: int, before: float,
               after: float, answers: list[dict[str, Any]], failure: str | None, **extra: Any) -> dict[str, Any]:
    """One results row (:data:`ROW_FIELDS` plus ``reward`` = ``accuracy_after``, ``normalized_gain`` =
    ``(after − before) / (1 − before)`` (0 when ``before`` is 1) and ``extra``)."""
    gain = (after - before) / (1 - before) if before < 1 else 0.0
    return {"passage_id": passage.id, "title": passage.title, "condition": condition, "candidate": candidate,
            "self_edit": edit, "n_sequences": n_sequences, "accuracy_before": before, "accuracy_after": after,
            "reward": after, "normalized_gain": gain, "answers": answers, "failure": failure, **extra}


def propose_run_template(lm: Any, config: RunConfig, out: Path) -> tuple[Any, str | None]:
    """The ``template`` condition's template for a run folder: read from ``out/template.json`` when a
    previous (killed) run wrote it, else proposed by ``lm`` and written there.

    Returns ``(Template or None, failure reason or None)``.
    """
    from seal_jax.selfedit.archive import Archive
    from seal_jax.selfedit.meta_prompts import meta_prompt
    from seal_jax.selfedit.proposals import Proposal, chosen, propose
    from seal_jax.selfedit.templates import Template

    path = out / "template.json"
    saved = agree(lambda: json.loads(path.read_text()) if path.is_file() else None)
    if saved is not None:
        template = Template.from_dict(saved["template"]) if saved.get("template") else None
        return template, saved.get("failure")
    options = config.template_options()
    prompt = meta_prompt(Archive.seeded().shown() if options["archive"] else None)
    records: list[Proposal] = []
    for attempt in range(int(options["max_retries"]) + 1):  # ``candidates`` proposals per attempt, in one batch
        batch = propose(lm, prompt, ["exploit"] * int(options["candidates"]),
                        max_new_tokens=int(options["proposal_max_new_tokens"]), max_retries=0,
                        seed=derived_seed(config.seed, "template-condition", attempt), chat=config.chat)
        records += [dataclasses.replace(r, attempt=attempt) for r in batch]
        if chosen(batch):
            break
    template = next((r.template for r in records if r.template is not None), None)
    failure = None if template is not None else (records[-1].reason if records else "no proposal was made")
    saved = {"meta_prompt": prompt, "template": template.to_dict() if template else None, "failure": failure,
             "proposals": [Proposal.to_dict(r) for r in records]}
    if is_writer():
        path.write_text(json.dumps(saved, indent=2, ensure_ascii=False))
    return template, failure


def select_data(d: dict[str, Any], *, where: str = "data", replay: bool = False
                ) -> tuple[list[Passage], dict[str, list[str]] | None]:
    """The passages a data table selects, and SEAL's released self-edits when they are needed.

    ``d`` holds ``source`` (default ``"demo"``) and one selection: ``ids`` (these passages, in this
    order), ``subset = "selfedits"`` (SEAL's evaluation passages, in the order of the ``selfedits`` file,
    then ``start`` and ``n``), or ``n``/``start``/``shuffle``/``seed`` (:func:`load_passages`). The
    self-edits (``{passage_id: [completion, ...]}``, matched on title and context against ``source``) are
    loaded for the subset or when ``replay`` is asked for; otherwise the second value is ``None``.
    ``where`` names the table in errors (``data``, ``restem.eval_data`` …).

    Raises:
      RunConfigError: a missing ``selfedits``, self-edits whose passages ``source`` lacks, an unknown
        subset or id, or ``ids`` together with another selection.
    """
    source = d.get("source", "demo")
    subset = d.get("subset")
    if subset not in (None, "selfedits"):
        raise RunConfigError(f"unknown {where}.subset {subset!r}; the only subset is 'selfedits'")
    if "ids" in d and (subset or any(k in d for k in ("n", "start", "shuffle", "seed"))):
        raise RunConfigError(f"{where}.ids selects the passages itself; drop subset, n, start, shuffle and seed")
    selfedits = None
    everything = load_passages(source) if (replay or subset or "ids" in d) else []
    if replay or subset:
        if not d.get("selfedits"):
            raise RunConfigError(f"condition 'replay' and {where}.subset = 'selfedits' need {where}.selfedits "
                                 "(SEAL's seal_base_selfedits_val.json)")
        try:
            selfedits = load_seal_selfedits(d["selfedits"], passages=everything)
        except DataError as e:
            raise RunConfigError(f"{e}. {where}.source ({source!r}) must hold the passages of {where}.selfedits: "
                                 "SEAL's squad_val.json for seal_base_selfedits_val.json") from None
    if subset or "ids" in d:
        wanted = list(selfedits) if subset else d["ids"]
        if not isinstance(wanted, list) or not all(isinstance(i, str) for i in wanted):
            raise RunConfigError(f"{where}.ids must be a list of passage ids (strings), got {wanted!r}")
        if len(set(wanted)) != len(wanted):
            twice = sorted({i for i in wanted if wanted.count(i) > 1})
            raise RunConfigError(f"{where}.ids names passages more than once: {twice[:5]}")
        by_id = {p.id: p for p in everything}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise RunConfigError(f"{where}: {source!r} has no passage {missing[0]!r} ({len(missing)} ids missing)")
        chosen = [by_id[i] for i in wanted]
        return (chosen[d.get("start", 0):][: d.get("n")] if subset else chosen), selfedits
    selection = {"n": d.get("n"), "start": d.get("start", 0), "shuffle": d.get("shuffle", False), "seed": d.get("seed", 0)}
    if everything:  # already read for the self-edits
        return select_passages(everything, **selection), selfedits
    return load_passages(source, **selection), selfedits


def pool_passages(d: dict[str, Any], held_out: Sequence[Passage] = ()) -> list[Passage]:
    """A training pool: ``d``'s source from ``d["start"]`` (shuffled first if asked), without the
    ``held_out`` evaluation passages, so training never sees one."""
    skip = {p.id for p in held_out}
    return [p for p in load_passages(d.get("source", "demo"), start=d.get("start", 0), shuffle=d.get("shuffle", False),
                                     seed=d.get("seed", 0)) if p.id not in skip]


def run_knowledge(config: RunConfig, out_dir: str | Path, *, resume: bool = False, lm: Any = None,
                  progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) a knowledge-incorporation experiment into ``out_dir``.

    Writes ``run_config.json``, ``results.jsonl`` (appended passage by passage), ``summary.json`` and
    ``summary.md``. ``resume=True`` continues an existing folder after its last finished passage (the
    config must match); without it an existing non-empty ``results.jsonl`` is an error. ``lm`` reuses a
    loaded model; ``stop_after`` ends after that many new passages (for tests of resumption).
    In a multi-host run only process 0 writes, and every process resumes from process 0's folder
    (:mod:`seal_jax.selfedit.multihost`). Returns the summary.
    """
    import seal_jax as sj

    out = Path(out_dir)
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    config_json = config.to_json()

    def finished_rows() -> list[dict[str, Any]]:
        if results.exists() and results.stat().st_size and not resume:
            raise FileExistsError(f"{results} already holds results; pass --resume to continue it or choose "
                                  "another --out")
        check_run_config(out, config_json, resume=resume)
        return read_rows(results)

    rows = agree(finished_rows)
    if is_writer():  # checked above (resume) or new
        (out / "run_config.json").write_text(json.dumps(config_json, indent=2))
    done = {r["passage_id"] for r in rows}
    passages, replay = select_data(config.data, replay="replay" in config.conditions)
    if lm is None:
        lm = sj.load(config.model, dtype=config.dtype, mesh=config.mesh or None, tokenizer=config.tokenizer,
                     remat=config.remat)
    grader = make_grader(config, lm)
    todo = [p for p in passages if p.id not in done]
    bar = tqdm(todo, desc=f"{config.name}", unit="passage", disable=not progress, initial=len(passages) - len(todo),
               total=len(passages))
    template, template_failure = None, None
    if "template" in config.conditions and todo:
        template, template_failure = propose_run_template(lm, config, out)
    for count, passage in enumerate(bar):
        t0 = time.perf_counter()
        new = passage_rows(lm, passage, config, grader, replay, template, template_failure)
        for r in new:
            r["seconds"] = round(time.perf_counter() - t0, 2)
        if is_writer():
            append_passage(results, new)
        rows.extend(new)
        if stop_after is not None and count + 1 >= stop_after:
            break
    summary = summarize(rows, config.model)
    if is_writer():
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "summary.md").write_text(summary_markdown(summary))
    return summary
