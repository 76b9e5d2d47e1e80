"""Passages and questions in SEAL's format: local JSON files, the Hugging Face hub, and a built-in demo set.

SEAL's knowledge-incorporation data is a JSON list of passages::

    [{"title": str, "context": str, "questions": [{"question": str, "answer": str}, ...]}, ...]

`load_passages` reads it from

* a local JSON file (``../shared/data/squad_val.json`` holds SQuAD v1.1 dev in this form: 2,067 passages,
  10,570 questions);
* ``"demo"``: the built-in passages in ``demo_passages.json``, written for this project about invented places,
  people and events, so no model can know the answers beforehand;
* ``"hub:NAME[:SPLIT]"``, e.g. ``"hub:rajpurkar/squad:validation"``: a SQuAD-style dataset (one row per
  question with ``title``, ``context``, ``question``, ``answers``) loaded with `datasets.load_dataset` and
  regrouped by ``(title, context)`` in order of first appearance, the first answer text being the answer.

Every passage gets a stable id before any selection: ``{prefix}-{index}`` with the index in source order.
For a local file the prefix is its name up to the first dot, lowercased, with every run of characters
other than letters and digits replaced by one ``-`` and leading/trailing ``-`` dropped (``passages`` if
nothing is left): ``squad_val.json`` → ``squad-val-0`` …, ``SQuAD_val.v2.json`` → ``squad-val-0`` …;
``demo`` for the demo set, and ``{dataset}-{split}`` for the hub (``rajpurkar/squad`` validation →
``squad-val-0`` …, the same ids as the local file when the order is the same). A record may carry its own
``"id"`` field (`write_passages` writes one), which then takes precedence, so ids survive a round trip.

Selection (`select_passages`) is seeded and documented: optionally shuffle the *whole* list with
``numpy.random.default_rng(seed).permutation``, then take ``[start:start + n]``. Because ids are assigned
first, a passage keeps its id whatever the selection.

`load_seal_selfedits` reads SEAL's released self-edits (``seal_base_selfedits_val.json``) and keys their
completions by the id of the matching SQuAD passage, for the ``replay`` strategy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEMO",
    "DataError",
    "Passage",
    "Question",
    "demo_passages",
    "load_hub_passages",
    "load_passages",
    "load_passages_file",
    "load_seal_selfedits",
    "parse_passages",
    "regroup_squad_rows",
    "select_passages",
    "write_passages",
]

DEMO = "demo"
"""The `load_passages` source name of the built-in demo set."""

HUB_PREFIX = "hub:"
_DEMO_FILE = "demo_passages.json"
_SPLIT_ABBREV = {"validation": "val", "train": "train", "test": "test"}
_LOCAL_HINT = "pass a local JSON file in SEAL's format instead, such as ../shared/data/squad_val.json"


class DataError(ValueError):
    """Malformed or unusable passage data; the message names the file (or source) and the record."""


@dataclass(frozen=True)
class Question:
    """One question about a passage and its short gold answer."""

    question: str
    answer: str


@dataclass(frozen=True)
class Passage:
    """A passage with its questions; ``id`` is stable across selections (see the module docstring)."""

    id: str
    title: str
    context: str
    questions: tuple[Question, ...]

    @property
    def text(self) -> str:
        """The passage as SEAL shows it to the model: ``title\\ncontext``."""
        return f"{self.title}\n{self.context}"

    def to_json(self, *, include_id: bool = True) -> dict[str, Any]:
        """The passage as a SEAL-format record (plus ``"id"`` unless ``include_id`` is false)."""
        record: dict[str, Any] = {"id": self.id} if include_id else {}
        record.update(title=self.title, context=self.context,
                      questions=[{"question": q.question, "answer": q.answer} for q in self.questions])
        return record


# ----------------------------------------------------------------------------------------------------
# Parsing and validation


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _record_label(origin: str, index: int, record: Any) -> str:
    label = f"{origin}: record {index}"
    if isinstance(record, dict) and _nonempty_str(record.get("title")):
        label += f" (title {record['title']!r})"
    return label


def parse_passages(records: Any, *, origin: str, id_prefix: str) -> list[Passage]:
    """Validate SEAL-format records (already decoded from JSON) and turn them into `Passage` objects.

    Args:
        records: the decoded top-level JSON value; must be a list of passage objects.
        origin: where the records came from (a file path or source name), used in error messages.
        id_prefix: ids are ``f"{id_prefix}-{index}"`` unless a record has its own ``"id"``.

    Returns:
        The passages in source order.

    Raises:
        DataError: naming ``origin``, the record index and what is wrong (top level not a list, a record
            that is not an object, missing or empty title/context, questions not a non-empty list, a
            question that is not an object, an empty question or answer, a bad or duplicated id).
    """
    if not isinstance(records, list):
        raise DataError(f"{origin}: the top level is a JSON {type(records).__name__}, expected a list of "
                        "passages [{title, context, questions: [{question, answer}]}]")
    passages: list[Passage] = []
    seen: dict[str, int] = {}
    for i, record in enumerate(records):
        where = _record_label(origin, i, record)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with title, context and questions, "
                            f"got a JSON {type(record).__name__}")
        for key in ("title", "context"):
            if key not in record:
                raise DataError(f"{where}: missing {key!r}")
            if not _nonempty_str(record[key]):
                raise DataError(f"{where}: {key!r} must be a non-empty string, got {record[key]!r:.80}")
        questions = record.get("questions")
        if "questions" not in record:
            raise DataError(f"{where}: missing 'questions'")
        if not isinstance(questions, list):
            raise DataError(f"{where}: 'questions' must be a list, got a JSON {type(questions).__name__}")
        if not questions:
            raise DataError(f"{where}: 'questions' is empty")
        parsed: list[Question] = []
        for j, q in enumerate(questions):
            if not isinstance(q, dict):
                raise DataError(f"{where}: questions[{j}] must be an object with question and answer, "
                                f"got a JSON {type(q).__name__}")
            for key in ("question", "answer"):
                if key not in q:
                    raise DataError(f"{where}: questions[{j}] is missing {key!r}")
                if not _nonempty_str(q[key]):
                    raise DataError(f"{where}: questions[{j}].{key} is empty or not a string: {q[key]!r:.80}")
            parsed.append(Question(question=q["question"], answer=q["answer"]))
        pid = record.get("id", f"{id_prefix}-{i}")
        if not _nonempty_str(pid):
            raise DataError(f"{where}: 'id' must be a non-empty string, got {pid!r:.80}")
        if pid in seen:
            raise DataError(f"{where}: id {pid!r} is already used by record {seen[pid]}")
        seen[pid] = i
        passages.append(Passage(id=pid, title=record["title"], context=record["context"],
                                questions=tuple(parsed)))
    return passages


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (a passage source is a JSON file in SEAL's format, "
                        f"{DEMO!r}, or 'hub:NAME:SPLIT')") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _prefix_from_path(path: Path) -> str:
    stem = path.name.split(".")[0] or "passages"
    return re.sub(r"[^0-9A-Za-z]+", "-", stem).strip("-").lower() or "passages"


# ----------------------------------------------------------------------------------------------------
# Sources


def load_passages_file(path: str | Path, *, id_prefix: str | None = None) -> list[Passage]:
    """All passages of a local SEAL-format JSON file, in file order.

    Args:
        path: the JSON file.
        id_prefix: prefix of the generated ids; by default the file name up to its first dot, lowercased,
            every non-alphanumeric run replaced by ``-`` (``SQuAD_val.v2.json`` → ``squad-val``).

    Raises:
        DataError: the file is missing, not JSON, or malformed (see `parse_passages`).
    """
    path = Path(path)
    return parse_passages(_read_json(path), origin=str(path),
                          id_prefix=id_prefix if id_prefix is not None else _prefix_from_path(path))


def demo_passages() -> list[Passage]:
    """The built-in demo passages (ids ``demo-0`` …), shipped as ``seal_jax/selfedit/demo_passages.json``."""
    resource = resources.files("seal_jax.selfedit").joinpath(_DEMO_FILE)
    try:
        records = json.loads(resource.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:  # a broken install, not user data
        raise DataError(f"{resource}: cannot read the built-in demo passages ({e})") from e
    return parse_passages(records, origin=str(resource), id_prefix=DEMO)


def _hub_offline() -> bool:
    return any(os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def regroup_squad_rows(rows: Iterable[dict[str, Any]], *, origin: str, id_prefix: str) -> list[Passage]:
    """Regroup SQuAD-style rows (one per question) into passages, in order of first appearance.

    Each row needs ``title``, ``context``, ``question`` and ``answers`` (``{"text": [...], ...}``); the first
    answer text is the gold answer. Rows without any answer (SQuAD v2's unanswerable questions) are skipped,
    and so is a passage left without questions.

    Raises:
        DataError: a row lacks one of those fields.
    """
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for i, row in enumerate(rows):
        try:
            key = (row["title"], row["context"])
            question, answers = row["question"], row["answers"]
        except (KeyError, TypeError) as e:
            raise DataError(f"{origin}: row {i} lacks the SQuAD field {e} "
                            "(expected title, context, question, answers)") from None
        texts = answers.get("text", []) if isinstance(answers, dict) else []
        group = groups.setdefault(key, [])
        if texts and _nonempty_str(texts[0]):
            group.append({"question": question, "answer": texts[0]})
    records = [{"title": t, "context": c, "questions": qs} for (t, c), qs in groups.items() if qs]
    return parse_passages(records, origin=origin, id_prefix=id_prefix)


def load_hub_passages(name: str, split: str = "validation") -> list[Passage]:
    """A SQuAD-style dataset from the Hugging Face hub via `datasets.load_dataset`, regrouped by passage.

    Ids are ``{dataset}-{split}-{index}`` with ``validation`` shortened to ``val`` (``rajpurkar/squad`` →
    ``squad-val-0`` …). A copy already in the local `datasets` cache is used when one exists.

    Raises:
        DataError: the hub cannot be reached (offline mode or a connection error) — the message says to pass
            a local JSON file such as ``../shared/data/squad_val.json`` — or the rows are not SQuAD-style.
    """
    origin = f"{HUB_PREFIX}{name}:{split}"
    try:
        import datasets  # deferred: Hugging Face datasets is heavy and only the hub: source needs it
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{origin}: the 'datasets' package is not installed; {_LOCAL_HINT}") from e
    try:
        ds = datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError, TimeoutError) as e:
        state = "offline mode is on (HF_HUB_OFFLINE)" if _hub_offline() else "the hub could not be reached"
        raise DataError(f"{origin}: cannot load the dataset: {state} ({type(e).__name__}: {e}); "
                        f"{_LOCAL_HINT}") from e
    except Exception as e:
        if _hub_offline() or "offline" in str(e).lower() or "connect" in str(e).lower():
            raise DataError(f"{origin}: cannot load the dataset offline ({type(e).__name__}: {e}); "
                            f"{_LOCAL_HINT}") from e
        raise DataError(f"{origin}: cannot load the dataset ({type(e).__name__}: {e})") from e
    dataset = name.rstrip("/").split("/")[-1]
    prefix = f"{dataset}-{_SPLIT_ABBREV.get(split, split)}"
    return regroup_squad_rows(ds, origin=origin, id_prefix=prefix)


def _load_source(source: str | Path) -> list[Passage]:
    if isinstance(source, str) and source == DEMO:
        return demo_passages()
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        spec = source[len(HUB_PREFIX):]
        name, _, split = spec.partition(":")
        if not name:
            raise DataError(f"{source!r}: expected 'hub:NAME' or 'hub:NAME:SPLIT', e.g. "
                            "'hub:rajpurkar/squad:validation'")
        return load_hub_passages(name, split or "validation")
    return load_passages_file(source)


# ----------------------------------------------------------------------------------------------------
# Selection and the public loader


def select_passages(passages: Sequence[Passage], *, n: int | None = None, start: int = 0,
                    shuffle: bool = False, seed: int = 0) -> list[Passage]:
    """The documented, seeded selection: optional shuffle of the whole list, then ``[start:start + n]``.

    Args:
        passages: all passages of a source, in source order.
        n: how many to take (``None``: all from ``start``); fewer are returned if the list runs out.
        start: offset into the (shuffled) list.
        shuffle: permute the whole list with ``numpy.random.default_rng(seed).permutation`` first.
        seed: the shuffle's seed; the same seed always gives the same order.

    Raises:
        DataError: ``start`` is negative or past the end, or ``n`` is negative.
    """
    total = len(passages)
    if start < 0:
        raise DataError(f"start must be >= 0, got {start}")
    if n is not None and n < 0:
        raise DataError(f"n must be >= 0 or None, got {n}")
    if start >= total:
        raise DataError(f"start={start} is past the end: the source has {total} passages "
                        f"(valid starts are 0..{total - 1})")
    order = list(passages)
    if shuffle:
        order = [order[i] for i in np.random.default_rng(seed).permutation(total)]
    stop = total if n is None else start + n
    return order[start:stop]


def load_passages(source: str | Path, *, n: int | None = None, start: int = 0, shuffle: bool = False,
                  seed: int = 0) -> list[Passage]:
    """Load passages from ``source`` and select some of them.

    Args:
        source: a local JSON file in SEAL's format, ``"demo"`` (the built-in set), or ``"hub:NAME[:SPLIT]"``
            (e.g. ``"hub:rajpurkar/squad:validation"``; needs the network or a cached copy).
        n, start, shuffle, seed: the selection, see `select_passages`: shuffle the whole list with
            ``numpy.random.default_rng(seed)`` if asked, then take ``[start:start + n]``. Ids are assigned in
            source order before shuffling, so a passage keeps its id.

    Returns:
        The selected passages.

    Raises:
        DataError: malformed data (the message names the file and record), an unreachable hub, or a bad
            selection.
    """
    return select_passages(_load_source(source), n=n, start=start, shuffle=shuffle, seed=seed)


def write_passages(passages: Iterable[Passage], path: str | Path, *, include_ids: bool = True) -> Path:
    """Write passages as a SEAL-format JSON file (UTF-8, written to a temporary file then renamed).

    Args:
        passages: the passages to write.
        path: the output file; its parent folders are created.
        include_ids: also write each passage's ``"id"`` (extra keys are ignored by SEAL's loaders), so that
            `load_passages` gives back the same ids.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [p.to_json(include_id=include_ids) for p in passages]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------
# SEAL's released self-edits


def load_seal_selfedits(path: str | Path, passages: str | Path | Sequence[Passage] | None = None
                        ) -> dict[str, list[str]]:
    """SEAL's released self-edits, keyed by the id of the matching SQuAD passage.

    The file (``../shared/data/seal_base_selfedits_val.json``) is a JSON list of 200 objects with ``title``,
    ``context``, ``questions`` (the passage's SQuAD questions), ``completions`` (a list of self-edit strings,
    five per passage: Qwen2.5-7B "implications") and ``prompt`` (the prompt they were sampled with). Its order
    is *not* the order of ``squad_val.json`` (its first entry is ``squad-val-1168``), so entries are matched on
    the exact ``(title, context)`` pair, which is unique in ``squad_val.json``.

    Args:
        path: the self-edits file.
        passages: the passages to match against: a list of `Passage`, or a SEAL-format file; by default
            ``squad_val.json`` in the same folder as ``path``.

    Returns:
        ``{passage_id: [completion, ...]}`` in the file's order (so ``list(result)`` is SEAL's passage order).
        Empty or whitespace-only completions are dropped.

    Raises:
        DataError: the file is malformed, an entry matches no passage, two entries match the same passage, or
            an entry has no non-empty completion.
    """
    path = Path(path)
    if passages is None:
        passages = path.parent / "squad_val.json"
    if isinstance(passages, (str, Path)):
        passages = load_passages_file(passages)
    index = {(p.title, p.context): p.id for p in passages}
    records = _read_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: the top level is a JSON {type(records).__name__}, expected a list of "
                        "passages with 'completions'")
    result: dict[str, list[str]] = {}
    for i, record in enumerate(records):
        where = _record_label(str(path), i, record)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object, got a JSON {type(record).__name__}")
        for key in ("title", "context"):
            if not _nonempty_str(record.get(key)):
                raise DataError(f"{where}: missing or empty {key!r}")
        completions = record.get("completions")
        if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
            raise DataError(f"{where}: 'completions' must be a list of strings")
        kept = [c for c in completions if c.strip()]
        if not kept:
            raise DataError(f"{where}: no non-empty completion")
        pid = index.get((record["title"], record["context"]))
        if pid is None:
            raise DataError(f"{where}: matches no passage (title and context) of the SQuAD passages given")
        if pid in result:
            raise DataError(f"{where}: passage {pid} already matched by an earlier entry")
        result[pid] = kept
    return result
