"""Calibration of graders against GPT-4.1's verdicts: the calibration file, its fixed split, the report.

Calibration: ``grader_calibration.jsonl`` holds 3,114 (question, gold, prediction) rows with GPT-4.1's
verdict from SEAL's released evaluation. :func:`split_calibration` splits it once into a tune half, the
only rows looked at while writing the rules, and a held-out half used only to report
(:func:`calibration_report`). The offline grader's agreement on both halves is in
:mod:`~seal_jax.selfedit.grading`; ``seal-jax calibrate`` reports any grader's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from seal_jax.selfedit.grading import Grader, contains_gold, grade

__all__ = ["CalibrationError", "calibration_report", "load_calibration", "ratio_cell", "split_calibration"]



class CalibrationError(ValueError):
    """A calibration file is malformed (the message names the file and line)."""


_CALIBRATION_FIELDS = ("question", "gold", "prediction", "verdict")
_VERDICT_WORDS = {"yes": True, "true": True, "no": False, "false": False}


def load_calibration(path: str | Path) -> list[dict]:
    """Read a calibration JSONL file: one ``{question, gold, prediction, verdict, [title, source]}`` a line.

    ``verdict`` is a bool (or the strings yes/no/true/false); blank lines are skipped.

    Raises:
      FileNotFoundError: the file does not exist (the message names it).
      CalibrationError: a line is not a JSON object, misses a field, or has a field of the wrong type;
        the message names the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: calibration file not found")
    rows: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise CalibrationError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in _CALIBRATION_FIELDS if k not in row]
            if missing:
                raise CalibrationError(f"{where}: missing field(s) {', '.join(missing)}")
            for k in ("question", "gold", "prediction"):
                if not isinstance(row[k], str):
                    raise CalibrationError(f"{where}: field {k!r} must be a string, got {type(row[k]).__name__}")
            verdict = row["verdict"]
            if isinstance(verdict, str) and verdict.strip().lower() in _VERDICT_WORDS:
                verdict = _VERDICT_WORDS[verdict.strip().lower()]
            if not isinstance(verdict, bool):
                raise CalibrationError(f"{where}: field 'verdict' must be true/false, got {verdict!r}")
            row["verdict"] = verdict
            rows.append(row)
    return rows


def split_calibration(rows: Sequence[Mapping], seed: int = 0,
                      held_out_fraction: float = 0.5) -> tuple[list, list]:
    """Split calibration rows once into ``(tune, held_out)``, deterministically.

    All rows of one question (same title and question text; SEAL's file has several predictions per
    question) go to the same side, so no question seen while tuning appears in the held-out part. The
    question groups are ordered by SHA-256 of ``f"{seed}\\x1f{title}\\x1f{question}"`` and moved to the
    held-out part in that order until it holds ``round(held_out_fraction * len(rows))`` rows or more.
    The result depends only on the rows' content and ``seed`` (not on the file order); each part keeps
    the input order. With seed 0 the 3,114-row file splits into 1,556 tune and 1,558 held-out rows.
    """
    if not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        key = (str(row.get("title", "")), str(row.get("question", "")))
        groups.setdefault(key, []).append(i)

    def order(key: tuple[str, str]) -> str:
        return hashlib.sha256(f"{seed}\x1f{key[0]}\x1f{key[1]}".encode()).hexdigest()

    target = round(held_out_fraction * len(rows))
    held: set[int] = set()
    for key in sorted(groups, key=order):
        if len(held) >= target:
            break
        held.update(groups[key])
    tune = [row for i, row in enumerate(rows) if i not in held]
    held_out = [row for i, row in enumerate(rows) if i in held]
    return tune, held_out


def _agreement_stats(pairs: Iterable[tuple[bool, bool]]) -> dict[str, Any]:
    """Agreement, precision, recall and Cohen's kappa of (grader, reference) verdict pairs; a ratio whose
    denominator is zero (precision of a grader that never says yes, recall without a reference yes, anything
    of no pairs) is ``None``, which JSON writes as ``null`` (NaN is not JSON)."""
    tp = fp = fn = tn = 0
    for ours, ref in pairs:
        if ours and ref:
            tp += 1
        elif ours:
            fp += 1
        elif ref:
            fn += 1
        else:
            tn += 1
    n = tp + fp + fn + tn
    if n == 0:
        return {"n": 0, "agreement": None, "precision": None, "recall": None, "cohen_kappa": None,
                "tp": 0, "fp": 0, "fn": 0, "tn": 0}
    observed = (tp + tn) / n
    # chance agreement from the two raters' own yes rates
    ours_yes, ref_yes = (tp + fp) / n, (tp + fn) / n
    chance = ours_yes * ref_yes + (1 - ours_yes) * (1 - ref_yes)
    kappa = (observed - chance) / (1 - chance) if chance < 1 else (1.0 if observed == 1 else 0.0)
    return {
        "n": n,
        "agreement": observed,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "cohen_kappa": kappa,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def calibration_report(rows: Sequence[Mapping], grader: Grader = grade, *,
                       verdicts: Sequence[bool] | None = None) -> dict[str, Any]:
    """How well ``grader`` (or ready-made ``verdicts``, one per row) reproduces the reference verdicts of
    calibration ``rows``.

    Returns ``{n, agreement, precision, recall, cohen_kappa, tp, fp, fn, tn, baseline}``: precision and
    recall treat the reference "yes" as the positive class (``None`` where undefined: a grader that never
    says yes has no precision, rows without a reference yes no recall), kappa is Cohen's (observed agreement
    corrected for the agreement expected from the two yes rates), and ``baseline`` holds the same
    numbers for :func:`contains_gold` (normalised gold contained in the normalised prediction).
    ``verdicts`` (e.g. a :class:`JudgeGrader`'s, computed in batches) replaces calling ``grader``.
    """
    rows = list(rows)
    refs = [bool(r["verdict"]) for r in rows]
    if verdicts is not None and len(verdicts) != len(rows):
        raise ValueError(f"calibration_report got {len(verdicts)} verdicts for {len(rows)} rows")
    ours = ([bool(v) for v in verdicts] if verdicts is not None
            else [bool(grader(r["question"], r["gold"], r["prediction"])) for r in rows])
    base = [contains_gold(r["question"], r["gold"], r["prediction"]) for r in rows]
    report = _agreement_stats(zip(ours, refs, strict=True))
    report["baseline"] = _agreement_stats(zip(base, refs, strict=True))
    return report


def ratio_cell(value: float | None) -> str:
    """A ratio of :func:`calibration_report` as a table cell: three decimals, or ``–`` where undefined."""
    return "–" if value is None else f"{round(value, 3) + 0.0:.3f}"  # (+ 0.0: no "-0.000" for a rounded -1e-17)
