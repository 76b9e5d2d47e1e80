"""Results rows: their schema, the append-only JSONL file a killed run resumes from, and summaries.

A run appends each passage's rows in one write (:func:`append_passage`); :func:`read_rows` gives back the
whole passages in a file and, on the resume path, cuts off a passage a kill tore. :func:`summarize` and
:func:`summary_markdown` turn rows into the per-condition table of a knowledge run: its means are over the
rows that produced a result (:func:`scored`), its conditions in the run config's order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seal_jax.selfedit.data import Passage
from seal_jax.selfedit.multihost import is_writer

ROW_FIELDS = ("passage_id", "title", "condition", "candidate", "self_edit", "n_sequences", "accuracy_before",
              "accuracy_after", "reward", "answers", "failure")


@dataclasses.dataclass(frozen=True)
class Measure:
    """What one set of answers to a passage's questions scored.

    Attributes:
      accuracy: the share of answers the grader accepts (the papers' measure).
      gold_loglik: the mean log-likelihood of the gold answers after the question prompts, in nats per
        token (teacher forcing, no passage in context): dense where accuracy is blind (small models), or
        None when not measured.
    """

    accuracy: float
    gold_loglik: float | None = None


def result_row(passage: Passage, condition: str, candidate: int, edit: str | None, n_sequences: int, before: Measure,
               after: Measure, answers: list[dict[str, Any]], failure: str | None, *, reward: str = "accuracy",
               **extra: Any) -> dict[str, Any]:
    """One results row: :data:`ROW_FIELDS` (``reward`` = ``accuracy_after``, or ``gold_loglik_after`` with
    ``reward = "gold_loglik"``), ``normalized_gain`` =
    ``(after − before) / (1 − before)`` of the accuracy (0 when ``before`` is 1), ``gold_loglik_before`` and
    ``gold_loglik_after`` when measured, and ``extra``."""
    gain = (after.accuracy - before.accuracy) / (1 - before.accuracy) if before.accuracy < 1 else 0.0
    dense = {} if before.gold_loglik is None else {"gold_loglik_before": before.gold_loglik,
                                                   "gold_loglik_after": after.gold_loglik}
    return {"passage_id": passage.id, "title": passage.title, "condition": condition, "candidate": candidate,
            "self_edit": edit, "n_sequences": n_sequences, "accuracy_before": before.accuracy,
            "accuracy_after": after.accuracy, "reward": after.accuracy if reward == "accuracy" else after.gold_loglik,
            "normalized_gain": gain, **dense,
            "answers": answers, "failure": failure, **extra}


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


def record_passage(path: Path, rows: list[dict[str, Any]], started: float) -> None:
    """Stamp one passage's rows with ``seconds`` since ``started`` (``time.perf_counter()``) and append
    them (:func:`append_passage`; process 0 writes in a multi-host run)."""
    for r in rows:
        r["seconds"] = round(time.perf_counter() - started, 2)
    if is_writer():
        append_passage(path, rows)


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


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Replace ``path`` with ``rows`` as JSONL, atomically (written beside it, then renamed)."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    append_rows(tmp, rows)
    tmp.replace(path)


# What to do about a damaged run_config.json (see :func:`read_state`).
RUN_CONFIG_REMEDY = ("it holds the config the run started with: delete it and resume with exactly that config (it is "
                     "saved again, but cannot be checked against the rows then), or run the config into a new --out")


class StateFileError(ValueError):
    """A run's JSON state file (``run_config.json``, ``template.json``, ``iteration.json``, ``round.json`` …)
    that cannot be read back; the message names the file and says what to do."""


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically: written to ``NAME.tmp`` beside it, fsynced, then
    renamed over it, so a run killed mid-write leaves the old file or the new one, never a cut-off one."""
    tmp = path.with_name(path.name + ".tmp")
    data = text.encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_json(path: Path, value: Any, *, ensure_ascii: bool = False) -> None:
    """Replace ``path`` with ``value`` as indented JSON (UTF-8; with ``ensure_ascii`` non-ASCII characters
    escaped), atomically (:func:`write_text`)."""
    write_text(path, json.dumps(value, indent=2, ensure_ascii=ensure_ascii))


def read_state(path: Path, remedy: str, *, keys: Sequence[str] = ()) -> dict[str, Any] | None:
    """The JSON object a run wrote to ``path`` to resume from, or ``None`` when there is no such file.

    Args:
      remedy: what to do when the file is damaged (e.g. "delete it and resume to redo the round's SFT"),
        for the error.
      keys: keys the object must hold.

    Raises:
      StateFileError: the file is not valid UTF-8 JSON, not a JSON object, or lacks one of ``keys``; the
        message names the file, what is wrong and ``remedy``.
    """
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise StateFileError(f"{path} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}; cut off by a "
                             f"kill while it was written, or edited): {remedy}") from None
    except UnicodeDecodeError as e:
        raise StateFileError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): {remedy}") from None
    if not isinstance(value, dict):
        raise StateFileError(f"{path} holds a JSON {type(value).__name__}, not an object: {remedy}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise StateFileError(f"{path} lacks {missing}: {remedy}")
    return value


def passages_done(path: Path) -> list[str]:
    """The ids of the passages whose rows are whole in a results file (see :func:`read_rows`), in order."""
    return list(dict.fromkeys(r["passage_id"] for r in read_rows(path)))


def scored(row: dict[str, Any]) -> bool:
    """Whether a results row produced a result: its adapter (or the base model) answered the passage's
    questions. A row that trained nothing (no usable self-edit, no valid template, a fill that does not
    parse) has no answers, and its ``accuracy_after``/``gold_loglik_after`` merely repeat the values before;
    a row whose training stopped early (a non-finite loss) was answered with its last finite adapter and
    counts."""
    return bool(row.get("answers"))


def condition_order(names: Sequence[str], conditions: Sequence[str] | None = None) -> list[str]:
    """``names`` (conditions found in rows) in the run config's order: first those of ``conditions`` (the
    config's, in its order), then any other in the order given."""
    present = list(dict.fromkeys(names))
    first = [c for c in dict.fromkeys(conditions or ()) if c in present]
    return first + [c for c in present if c not in first]


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def summarize(rows: Sequence[dict[str, Any]], model: str, *, conditions: Sequence[str] | None = None
              ) -> dict[str, Any]:
    """``{"model", "conditions": {name: {accuracy, accuracy_std, n_questions, n_passages, mean_gain,
    failures}}}``, the conditions in the order of ``conditions`` (the run config's; without it, or for
    conditions it does not name, the order the rows first show them).

    Every mean is over the rows that produced a result (:func:`scored`): ``accuracy`` is correct answers
    over all answered questions of the condition (every candidate and repeat counts); ``accuracy_std`` is
    the standard deviation over passages of the per-passage mean accuracy; ``mean_gain`` is the mean of
    ``accuracy_after - accuracy_before``. ``failures`` counts all rows with a ``failure`` (no adapter
    trained: no usable self-edit, an invalid template, …; or a training that stopped at a non-finite loss);
    ``n_questions`` counts the answered questions and ``n_passages`` the passages with a row of the
    condition, scored or not. Where the rows carry the gold answers' log-likelihood (:class:`Measure`),
    ``gold_loglik`` is its mean after the update and ``gold_loglik_change`` the mean change, in nats per
    token. A mean with no scored row to take it over is ``None`` (a condition whose every row failed).
    """
    out: dict[str, Any] = {}
    for name in condition_order([r["condition"] for r in rows], conditions):
        sel = [r for r in rows if r["condition"] == name]
        good = [r for r in sel if scored(r)]
        n_q = sum(len(r["answers"]) for r in good)
        correct = sum(sum(a["correct"] for a in r["answers"]) for r in good)
        per_passage: dict[str, list[float]] = {}
        for r in good:
            per_passage.setdefault(r["passage_id"], []).append(r["accuracy_after"])
        means = [float(np.mean(v)) for v in per_passage.values()]
        out[name] = {
            "accuracy": correct / n_q if n_q else None,
            "accuracy_std": float(np.std(means)) if means else None,
            "n_questions": n_q,
            "n_passages": len({r["passage_id"] for r in sel}),
            "mean_gain": _mean([r["accuracy_after"] - r["accuracy_before"] for r in good]),
            "failures": sum(1 for r in sel if r.get("failure")),
        }
        if any(r.get("gold_loglik_after") is not None for r in sel):
            dense = [r for r in good if r.get("gold_loglik_after") is not None]
            out[name]["gold_loglik"] = _mean([r["gold_loglik_after"] for r in dense])
            out[name]["gold_loglik_change"] = _mean([r["gold_loglik_after"] - r["gold_loglik_before"] for r in dense])
    return {"model": model, "conditions": out}


def number_cell(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """A table cell: ``value`` times ``scale`` in the format ``spec`` followed by ``suffix``, or "–" where
    there is no value (``None``, or the NaN of a summary written by an older seal-jax)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{scale * value:{spec}}{suffix}"


def knowledge_units(summary: dict[str, Any]) -> str:
    """The line under a knowledge (or CPT) run's table that says each column's unit."""
    dense = any("gold_loglik" in c for c in summary["conditions"].values())
    gold = ("; gold nats/token: the gold answers' mean log-likelihood after the question (no passage in context), "
            "Δ its change over the update" if dense else "")
    return ("Units: accuracy in %; std over passages and mean gain (accuracy after the update minus before, "
            f"mean over the rows) in percentage points{gold}.")


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (with the gold answers' log-likelihood when the run measured it);
    "–" where a condition has no row that produced a result; the line under it says each column's unit
    (:func:`knowledge_units`)."""
    dense = any("gold_loglik" in c for c in summary["conditions"].values())
    extra_head, extra_rule = (" gold nats/token | Δ gold nats/token |", "---:|---:|") if dense else ("", "")
    lines = [f"Model: `{summary['model']}`", "",
             f"| condition | accuracy | std over passages | questions | passages | mean gain | failures |{extra_head}",
             f"|---|---:|---:|---:|---:|---:|---:|{extra_rule}"]
    for name, c in summary["conditions"].items():
        extra = ""
        if dense:
            extra = (f" {number_cell(c.get('gold_loglik'), '.3f')} | "
                     f"{number_cell(c.get('gold_loglik_change'), '+.3f')} |")
        lines.append(f"| {name} | {number_cell(c['accuracy'], '.1f', 100, '%')} | "
                     f"{number_cell(c['accuracy_std'], '.1f', 100)} | {c['n_questions']} | {c['n_passages']} | "
                     f"{number_cell(c['mean_gain'], '+.1f', 100)} | {c.get('failures', 0)} |{extra}")
    return "\n".join([*lines, "", knowledge_units(summary)]) + "\n"
