"""Diversity of a file of templates by iteration, as the seed paper reports it (``seal-jax templates stats``).

For each iteration: how many templates, their hyperparameter similarity and instruction similarity
(:mod:`~seal_jax.selfedit.diversity`, with the embedding backend used) and the min–max of each of the six
hyperparameters. The file is JSON or JSONL of templates (nested or flat form) grouped by iteration, in any
of these shapes:

- a JSON object from iteration to templates: ``{"1": [...], "2": [...]}`` or ``{"iteration-1": [...]}``;
- a JSON list, or JSONL rows, of ``{"iteration": N, "template": {...}}``, or of templates each carrying an
  ``"iteration"`` key; seal-jax's ``archive.jsonl`` (iteration 0 = the human seeds) and an iteration's
  ``proposals.jsonl`` are such rows. Rows whose ``template`` is null (rejected proposals, base rows) are
  skipped and counted; rows with a ``template_id`` count once per (iteration, template id), so a
  ``results.jsonl`` (one row per passage × template × fill) gives each template once. A cut-off last
  JSONL line (a search still writing the file) is left out; a file without any template is an error.

Values are read as written, not clamped to seal-jax's ranges (a file of another system's templates keeps
its own numbers); each template needs a ``data_creation_instruction`` string and the six hyperparameters
as finite numbers. Nothing in the file is executed.

Here too, what a template search reports of each iteration from its rows: each template's score and gain
(:func:`template_scores`), the iteration's diversity (:func:`diversity`), and the check of its
``similarity_backend`` (:func:`check_similarity_backend`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seal_jax.selfedit.diversity import (
    BACKENDS,
    hyperparameter_similarity,
    instruction_similarity_with_backend,
    mean_sequence_chars,
)
from seal_jax.selfedit.run_config import RunConfigError
from seal_jax.selfedit.template_errors import _flat_template, _number
from seal_jax.selfedit.templates import HYPERPARAMETERS, HYPERPARAMETERS_KEY, Template, TemplateError

__all__ = ["check_similarity_backend", "diversity", "read_templates_by_iteration", "read_templates_file",
           "template_scores", "template_stats", "template_stats_markdown", "templates_by_iteration"]

_ITERATION_KEY = re.compile(r"(?:(?:iteration|iter|it)[-_ ]?)?(\d+)", re.IGNORECASE)


def _iteration(value: Any, where: str) -> int:
    """An iteration number: an int >= 0, or a string like ``"2"``, ``"iteration-2"`` or ``"it2"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _ITERATION_KEY.fullmatch(value.strip())
        if match:
            return int(match.group(1))
    raise TemplateError(f"{where}: the iteration must be a whole number >= 0 (or a key like 'iteration-2'), "
                        f"got {value!r}")


def _checked(template: Any, where: str) -> dict[str, Any]:
    """``template`` (either form) in the nested form with its values as numbers, or a TemplateError."""
    if not isinstance(template, Mapping):
        raise TemplateError(f"{where}: a template must be a JSON object, got {type(template).__name__}")
    try:
        flat, _ = _flat_template(template)
        missing = [name for name in ("data_creation_instruction", *HYPERPARAMETERS) if name not in flat]
        if missing:
            raise TemplateError(f"template is missing field(s) {missing}")
        if not isinstance(flat["data_creation_instruction"], str):
            raise TemplateError("data_creation_instruction must be a string")
        return {"data_creation_instruction": flat["data_creation_instruction"],
                HYPERPARAMETERS_KEY: {name: _number(name, flat[name]) for name in HYPERPARAMETERS}}
    except TemplateError as error:
        raise TemplateError(f"{where}: {error}") from None


def _no_template(where: str, skipped: int) -> str:
    """The error of a file (or value) that holds no template."""
    rows = f" (only {skipped} row(s) without a template, e.g. rejected proposals)" if skipped else ""
    return (f"{where}: no template found{rows}; give a file of templates by iteration, e.g. a template "
            "search's archive.jsonl")


def templates_by_iteration(data: Any, where: str = "templates") -> tuple[dict[int, list[dict[str, Any]]], int]:
    """``({iteration: [template, …]}, skipped rows)`` from parsed JSON in one of the module's shapes.

    Templates come back in the nested form with numbers as floats; iterations in increasing order.
    Raises :class:`TemplateError` naming the row (or key) at fault.
    """
    groups: dict[int, list[dict[str, Any]]] = {}
    skipped = 0
    if isinstance(data, Mapping) and "iteration" not in data:
        if not data:
            raise TemplateError(f"{where}: the JSON object holds no iteration")
        for key, items in data.items():
            it = _iteration(key, f"{where}: key {key!r}")
            if not isinstance(items, list):
                raise TemplateError(f"{where}: iteration {key!r} must hold a list of templates, got "
                                    f"{type(items).__name__}")
            for j, item in enumerate(items):
                here = f"{where}: iteration {key!r}, template {j}"
                template = item.get("template") if isinstance(item, Mapping) and "template" in item else item
                if template is None:
                    skipped += 1
                    continue
                groups.setdefault(it, []).append(_checked(template, here))
        if not groups:
            raise TemplateError(_no_template(where, skipped))
        return dict(sorted(groups.items())), skipped
    rows = [data] if isinstance(data, Mapping) else data
    if not isinstance(rows, list):
        raise TemplateError(f"{where}: expected a JSON object or list of templates by iteration, got "
                            f"{type(data).__name__}")
    seen: set[tuple[int, str]] = set()
    for i, row in enumerate(rows):
        here = f"{where}: row {i + 1}"
        if not isinstance(row, Mapping):
            raise TemplateError(f"{here}: expected a JSON object, got {type(row).__name__}")
        if "iteration" not in row:
            raise TemplateError(f'{here} has no "iteration"; rows are {{"iteration": N, "template": {{...}}}} or '
                                'templates with an "iteration" key')
        it = _iteration(row["iteration"], here)
        if "template" in row:
            template = row["template"]
        else:
            template = {k: v for k, v in row.items() if k != "iteration"}
        if template is None:
            skipped += 1
            continue
        if row.get("template_id") is not None:
            key = (it, str(row["template_id"]))
            if key in seen:
                continue
            seen.add(key)
        groups.setdefault(it, []).append(_checked(template, f"{here} (iteration {it})"))
    if not groups:
        raise TemplateError(_no_template(where, skipped))
    return dict(sorted(groups.items())), skipped


def read_templates_file(path: str | Path) -> tuple[dict[int, list[dict[str, Any]]], int, int | None]:
    """:func:`templates_by_iteration` of a JSON or JSONL file (a file that is not one JSON value is read
    as JSONL, one value a line): ``(groups, skipped rows, number of the cut-off last line or None)``.

    As :func:`~seal_jax.selfedit.results.read_rows` does, a JSONL file's last line that does not parse is
    left out: a search still writing its ``proposals.jsonl`` (or one killed mid-write) leaves such a line.
    A line before the last one that does not parse is an error, and so is a file without any template
    (empty, ``{"1": []}``, only rejected proposals).
    """
    text = Path(path).read_text(encoding="utf-8")
    cut_off = None
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = []
        numbered = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        for i, (number, line) in enumerate(numbered):
            try:
                data.append(json.loads(line))
            except ValueError as error:
                if 0 < i == len(numbered) - 1:  # JSONL rows, then a torn last write
                    cut_off = number
                    break
                raise TemplateError(f"{path}:{number} is not JSON: {error}; it is not the cut-off last line of "
                                    "JSONL rows, so the file is damaged (or not JSON/JSONL)") from None
    groups, skipped = templates_by_iteration(data, where=str(path))
    return groups, skipped, cut_off


def read_templates_by_iteration(path: str | Path) -> tuple[dict[int, list[dict[str, Any]]], int]:
    """``({iteration: [template, …]}, skipped rows)`` of a JSON or JSONL file (:func:`read_templates_file`;
    a cut-off last line counts as a skipped row)."""
    groups, skipped, cut_off = read_templates_file(path)
    return groups, skipped + (cut_off is not None)


def template_stats(groups: Mapping[int, Sequence[Any]], backend: str = "auto") -> list[dict[str, Any]]:
    """Per iteration: ``{iteration, templates, hyperparameter_similarity, instruction_similarity,
    similarity_backend, ranges: {name: (min, max)}, clamped, rejected}``.

    ``groups``: ``{iteration: templates}`` (template dicts in either form). Similarities are ``None`` for
    an iteration with one template; ``backend`` is that of
    :func:`~seal_jax.selfedit.diversity.instruction_embeddings_with_backend`. ``clamped`` / ``rejected``
    count the templates :meth:`Template.from_dict` would clamp into seal-jax's ranges / refuse.
    """
    out = []
    for it, templates in groups.items():
        nested = [_checked(t, f"iteration {it}, template {j}") for j, t in enumerate(templates)]
        entry: dict[str, Any] = {"iteration": it, "templates": len(nested), "hyperparameter_similarity": None,
                                 "instruction_similarity": None, "similarity_backend": None, "clamped": 0,
                                 "rejected": 0}
        if len(nested) >= 2:
            try:
                entry["hyperparameter_similarity"] = hyperparameter_similarity(nested)
                entry["instruction_similarity"], entry["similarity_backend"] = instruction_similarity_with_backend(
                    nested, backend)
            except TemplateError as error:
                raise TemplateError(f"iteration {it}: {error}") from None
        entry["ranges"] = {name: (min(t[HYPERPARAMETERS_KEY][name] for t in nested),
                                  max(t[HYPERPARAMETERS_KEY][name] for t in nested)) for name in HYPERPARAMETERS}
        for t in nested:
            try:
                entry["clamped"] += bool(Template.from_dict(t).notes)
            except TemplateError:
                entry["rejected"] += 1
        out.append(entry)
    return out


def _span(low: float, high: float) -> str:
    return f"{low:g}" if low == high else f"{low:g}–{high:g}"


def template_stats_markdown(stats: Sequence[Mapping[str, Any]]) -> str:
    """The stats as a Markdown table, one line per iteration (``–`` where a similarity is undefined)."""
    def num(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    lines = ["| iteration | templates | hyperparameter similarity | instruction similarity | "
             + " | ".join(HYPERPARAMETERS) + " |", "|---:|---:|---:|---:|" + "---:|" * len(HYPERPARAMETERS)]
    for e in stats:
        backend = f" ({e['similarity_backend']})" if e["similarity_backend"] else ""
        lines.append(f"| {e['iteration']} | {e['templates']} | {num(e['hyperparameter_similarity'])} | "
                     f"{num(e['instruction_similarity'])}{backend} | "
                     + " | ".join(_span(*e["ranges"][name]) for name in HYPERPARAMETERS) + " |")
    clamped, rejected = sum(e["clamped"] for e in stats), sum(e["rejected"] for e in stats)
    if clamped or rejected:
        lines += ["", f"Values as written; seal-jax would clamp {clamped} of these templates into its ranges and "
                  f"refuse {rejected} (see seal_jax.selfedit.templates)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# A template search's scores and diversity, per iteration (template_search reports them)


def template_scores(rows: Sequence[dict[str, Any]], reward: str = "accuracy") -> dict[str, dict[str, Any]]:
    """Per template id: ``{score, gain, fills, valid_fills, fallback_fills, passages}`` from its rows.

    ``score``: mean ``accuracy_after`` over the template's fills and passages (fills without training
    data count with the accuracy before), or with ``reward = "gold_loglik"`` the mean
    ``gold_loglik_after``; ``gain``: mean normalized gain, or the mean change of the gold log-likelihood;
    ``valid_fills``: fills that gave training data; ``fallback_fills``: of those, how many needed the
    ``lines`` fallback.
    """
    out: dict[str, dict[str, Any]] = {}
    for tid in dict.fromkeys(r["template_id"] for r in rows if r.get("template_id")):
        sel = [r for r in rows if r.get("template_id") == tid]
        if reward == "accuracy":
            score, gain = [r["accuracy_after"] for r in sel], [r["normalized_gain"] for r in sel]
        else:
            score = [r["gold_loglik_after"] for r in sel]
            gain = [r["gold_loglik_after"] - r["gold_loglik_before"] for r in sel]
        out[tid] = {"score": float(np.mean(score)), "gain": float(np.mean(gain)),
                    "fills": len(sel), "valid_fills": sum(1 for r in sel if r["n_sequences"] > 0),
                    "fallback_fills": sum(1 for r in sel if r.get("fill_fallback")),
                    "passages": len({r["passage_id"] for r in sel})}
    return out


def diversity(templates: Sequence[Template], fills: Sequence[Sequence[str]], backend: str = "auto"
              ) -> dict[str, Any]:
    """Diversity of one iteration's templates: ``{hyperparameter_similarity, instruction_similarity,
    similarity_backend, mean_sequence_chars}`` (similarities ``None`` for fewer than two templates)."""
    hyper = instr = used = None
    if len(templates) >= 2:
        hyper = hyperparameter_similarity(templates)
        instr, used = instruction_similarity_with_backend(templates, backend)
    return {"hyperparameter_similarity": hyper, "instruction_similarity": instr, "similarity_backend": used,
            "mean_sequence_chars": mean_sequence_chars(fills)}


def check_similarity_backend(backend: Any, *, here: bool = False) -> None:
    """Raise :class:`RunConfigError` for a backend not in ``BACKENDS``; with ``here`` (a run about to start on
    this machine) also for ``"embeddings"`` while the MiniLM encoder's files are not on this machine (a look
    for the files, no model load). A config loaded to be compiled or planned elsewhere needs no encoder."""
    if backend not in BACKENDS:
        raise RunConfigError(f"templates.similarity_backend must be one of {BACKENDS}, got {backend!r}")
    if here and backend == "embeddings":
        # deferred: the encoder's module imports jax; only this backend needs it
        from seal_jax.selfedit import embeddings

        if not embeddings.available():
            raise RunConfigError(
                f"templates.similarity_backend = 'embeddings' needs the {embeddings.ENCODER_NAME} sentence encoder, "
                f"which is not on this machine: fetch it with `seal-jax fetch {embeddings.ENCODER_NAME}` (or point "
                f"{embeddings.ENV_VAR} at its folder), or set 'auto' (the encoder when fetched, else TF-IDF) or "
                "'tfidf'")


def template_units(summary: dict[str, Any]) -> str:
    """The line under a template search's table that says the unit of its gain and similarities."""
    if summary.get("reward", "accuracy") != "accuracy":  # the table's title line gives the scores' unit
        return "Units: hyperparameter and instruction similarity from 0 to 1."
    return ("Units: base, best, mean and held-out scores are accuracy in %; best gain is not in %: it is the best "
            "template's mean normalized gain, (accuracy after − before) / (1 − before), the fraction of the base "
            "model's missing accuracy its update recovers (at most 1; 0.125: an eighth); hyperparameter and "
            "instruction similarity from 0 to 1.")
