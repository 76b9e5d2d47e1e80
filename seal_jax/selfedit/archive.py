"""Template search's archives (plain and novelty) and the selection of SFT rows between iterations.

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

Units. An entry's score is an accuracy in [0, 1] (the papers') or, in a run with ``reward = "gold_loglik"``,
the gold answers' mean log-likelihood per token after the update (nats, ≤ 0; its gain is the change from
before). An archive holds one unit: the seeds of a gold-loglik run are rescored by the run itself
(:func:`seed_templates`), since the papers have no such figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seal_jax.selfedit.diversity import (
    BACKENDS,
    instruction_embeddings_with_backend,
    pairwise_hyperparameter_similarity,
)
from seal_jax.selfedit.results import write_text
from seal_jax.selfedit.templates import SEAL_HYPERPARAMETERS, Template, TemplateError

__all__ = [
    "SEED_BASE_ACCURACY", "SEED_SCORES", "SELECT_KEYS", "SOURCES", "UNITS", "Archive", "ArchiveEntry",
    "NoveltyArchive", "normalized_gain", "seed_templates", "select_top",
]


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
      score: its mean question accuracy in [0, 1], or (``unit = "gold_loglik"``) the gold answers' mean
        log-likelihood per token after the update (nats, <= 0).
      gain: its normalized gain ``(score − base) / (1 − base)``, or the change in nats/token from before
        (None if unknown).
      iteration: the search iteration that produced it (0 for the human seeds).
      source: ``"human"`` or ``"generated"``.
      name: a unique id within its archive.
      novelty: its novelty within a :class:`NoveltyArchive` when last ranked (None otherwise).
      unit: what ``score`` measures (:data:`UNITS`).
    """

    template: Template
    score: float
    gain: float | None
    iteration: int
    source: str
    name: str
    novelty: float | None = None
    unit: str = "accuracy"

    def __post_init__(self) -> None:
        if not isinstance(self.template, Template):
            raise TemplateError(f"ArchiveEntry.template must be a Template, got {type(self.template).__name__}")
        if self.unit not in UNITS:
            raise TemplateError(f"ArchiveEntry.unit must be one of {UNITS}, got {self.unit!r}")
        if isinstance(self.score, bool) or not isinstance(self.score, (int, float)) or not math.isfinite(self.score):
            raise TemplateError(f"ArchiveEntry.score must be a finite number, got {self.score!r}")
        if self.unit == "accuracy" and not 0.0 <= self.score <= 1.0:
            raise TemplateError(f"ArchiveEntry.score must be an accuracy in [0, 1], got {self.score!r}")
        if self.unit == "gold_loglik" and self.score > 0.0:
            raise TemplateError(f"ArchiveEntry.score must be a log-likelihood per token (<= 0), got {self.score!r}")
        if self.gain is not None and not math.isfinite(self.gain):
            raise TemplateError(f"ArchiveEntry.gain must be finite or None, got {self.gain!r}")
        if self.source not in SOURCES:
            raise TemplateError(f"ArchiveEntry.source must be one of {SOURCES}, got {self.source!r}")
        if not isinstance(self.name, str) or not self.name:
            raise TemplateError("ArchiveEntry.name must be a non-empty string")
        if isinstance(self.iteration, bool) or not isinstance(self.iteration, int) or self.iteration < 0:
            raise TemplateError(f"ArchiveEntry.iteration must be an int >= 0, got {self.iteration!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able row: name, source, iteration, score, gain, novelty and the template (in the seed paper's
        nested form, :meth:`Template.to_dict`; :meth:`from_dict` also reads rows with flat templates)."""
        return {"name": self.name, "source": self.source, "iteration": self.iteration, "score": self.score,
                "unit": self.unit, "gain": self.gain, "novelty": self.novelty, "template": self.template.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArchiveEntry:
        """The entry of a row written by :meth:`to_dict` (raises :class:`TemplateError` if malformed)."""
        try:
            return cls(template=Template.from_dict(d["template"]), score=float(d["score"]),
                       gain=None if d.get("gain") is None else float(d["gain"]), iteration=int(d["iteration"]),
                       source=d["source"], name=d["name"],
                       novelty=None if d.get("novelty") is None else float(d["novelty"]),
                       unit=d.get("unit", "accuracy"))
        except KeyError as error:
            raise TemplateError(f"archive row is missing {error}; rows come from ArchiveEntry.to_dict") from None
        except (TypeError, ValueError) as error:
            if isinstance(error, TemplateError):
                raise
            raise TemplateError(f"malformed archive row: {error}") from None


UNITS = ("accuracy", "gold_loglik")
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


def seed_templates() -> dict[str, Template]:
    """The four human strategies as templates with SEAL's inner-loop hyperparameters, by name (the seeds of
    :meth:`Archive.seeded`, or of a run that scores them itself)."""
    return {name: Template(SEED_INSTRUCTIONS[name], **SEAL_HYPERPARAMETERS) for name in SEED_SCORES}


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
        entries = [ArchiveEntry(template, SEED_SCORES[name], normalized_gain(SEED_SCORES[name], SEED_BASE_ACCURACY),
                                0, "human", name) for name, template in seed_templates().items()]
        return cls(entries, **kwargs)

    def add(self, entry: ArchiveEntry) -> None:
        """Add a scored template (raises :class:`TemplateError` for a duplicate name or another unit)."""
        if not isinstance(entry, ArchiveEntry):
            raise TemplateError(f"Archive.add takes an ArchiveEntry, got {type(entry).__name__}")
        if self._entries and entry.unit != self._entries[0].unit:
            raise TemplateError(f"entry {entry.name!r} is scored in {entry.unit} but the archive in "
                                f"{self._entries[0].unit}; one archive holds one unit")
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
        write_text(Path(path), text)  # whole or not at all: a search resumes from it

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

SELECT_KEYS = ("template_id", "passage_id", "fill_index", "score", "fill_prompt", "fill_text", "meta_prompt",
               "template_text")


def _failed(row: Mapping[str, Any]) -> bool:
    score = row.get("score")
    if row.get("error") or score is None or isinstance(score, bool):
        return True
    if not isinstance(score, numbers.Real) or not math.isfinite(score):
        return True
    return not (isinstance(row.get("fill_text"), str) and row["fill_text"].strip())


def select_top(rows: Iterable[Mapping[str, Any]], k: int = 2) -> list[dict[str, Any]]:
    """SFT pairs from the per-fill results of one iteration: the top-``k`` templates of every passage,
    each with its best fill.

    ``rows``: one dict per (template, passage, fill) with :data:`SELECT_KEYS` (``score``: the fill's reward,
    higher is better; an optional ``unit`` names it, ``"accuracy"`` when absent); rows with an ``error``, a
    missing/non-finite ``score`` or an empty ``fill_text`` are skipped. Per passage, a template's best fill
    is its highest-scoring fill (ties: lowest ``fill_index``), and templates rank by that score (ties:
    template id order). Each chosen (passage, template) gives two rows, in passage-id then rank
    order: ``{"kind": "template", "prompt": meta_prompt, "completion": template_text, …}`` and
    ``{"kind": "fill", "prompt": fill_prompt, "completion": fill_text, …}`` (a template chosen for several
    passages thus appears several times, weighting it by how many passages it wins).
    """
    if not isinstance(k, int) or k < 1:
        raise TemplateError(f"select_top needs k >= 1, got {k!r}")
    rows = list(rows)
    units = {row.get("unit", "accuracy") for row in rows}
    if len(units) > 1:
        raise TemplateError(f"select_top got rows scored in different units {sorted(units)}; rank one unit at a time")
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
        if current is None or (-row["score"], row["fill_index"]) < (-current["score"], current["fill_index"]):
            best[key] = row
    per_passage: dict[str, list[Mapping[str, Any]]] = {}
    for (passage, _), row in best.items():
        per_passage.setdefault(passage, []).append(row)
    out: list[dict[str, Any]] = []
    for passage in sorted(per_passage):
        chosen = sorted(per_passage[passage], key=lambda r: (-r["score"], str(r["template_id"])))[:k]
        for rank, row in enumerate(chosen):
            common = {"template_id": row["template_id"], "passage_id": row["passage_id"],
                      "fill_index": row["fill_index"], "score": row["score"], "unit": row.get("unit", "accuracy"),
                      "rank": rank}
            out.append({"kind": "template", "prompt": row["meta_prompt"], "completion": row["template_text"],
                        **common})
            out.append({"kind": "fill", "prompt": row["fill_prompt"], "completion": row["fill_text"], **common})
    return out
