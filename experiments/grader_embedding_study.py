"""Can sentence embeddings (all-MiniLM-L6-v2) fix the offline grader's misses? A study on the TUNE half only.

The offline grader (``seal_jax.selfedit.grading.rule_verdict``) leaves some answers undecided: the gold's
words are not in the answer, so only a paraphrase could still convey it ("more difficult" for "harder").
This script asks whether an embedding similarity can pick, among those undecided rows, the ones GPT-4.1
accepted, and whether it can veto the rows the rules accept but GPT-4.1 rejected. It reads only the
tune half of ``grader_calibration.jsonl`` (``split_calibration(seed=0)``); the held-out half is never
looked at.

For each feature it prints the ROC AUC and the best *in-sample* net gain of any threshold (rows turned
right minus rows turned wrong when every undecided row at or above the threshold becomes a yes; for the
veto, every accepted row at or below it becomes a no). It also
fits a logistic regression on all features with 5-fold cross-validation grouped by question.

    python experiments/grader_embedding_study.py [--calibration ../shared/data/grader_calibration.jsonl]

Needs the encoder weights (`seal-jax fetch all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import numpy as np

from seal_jax.selfedit import calibration, grading
from seal_jax.selfedit.embeddings import load_encoder

DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "grader_calibration.jsonl"


def sentences(text: str) -> list[str]:
    """Up to four sentences/lines of ``text`` (the whole text when it has none)."""
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]
    return parts[:4] or [text.strip()]


def clauses(text: str) -> list[str]:
    """Up to twelve clauses: sentences split at commas, semicolons, brackets, "and", "which", "that"."""
    out = []
    for s in sentences(text):
        out += [c.strip() for c in re.split(r"[,;:()]|\band\b|\bwhich\b|\bthat\b", s) if c.strip()]
    return out[:12] or [text.strip()]


def features(encoder, rows: list[tuple[dict, str]]) -> dict[str, np.ndarray]:
    """Embedding features of (row, prediction-as-read-by-the-rules) pairs -> name -> ``[N]``."""
    texts: set[str] = set()
    for r, p in rows:
        texts.update([r["gold"], r["question"], r["question"] + " " + r["gold"], p.strip()])
        texts.update(sentences(p) + clauses(p))
    order = sorted(texts)
    vecs = dict(zip(order, encoder.embed(order), strict=True))
    out: dict[str, list[float]] = {k: [] for k in (
        "gold.answer", "gold.first_sentence", "max gold.clause", "delta (q+gold).answer",
        "max delta (q+gold).sentence", "squad_f1", "log_words")}
    for r, p in rows:
        g, q, qg, a = (vecs[t] for t in (r["gold"], r["question"], r["question"] + " " + r["gold"], p.strip()))
        sent = np.stack([vecs[s] for s in sentences(p)])
        cl = np.stack([vecs[c] for c in clauses(p)])
        out["gold.answer"].append(float(g @ a))
        out["gold.first_sentence"].append(float(g @ sent[0]))
        out["max gold.clause"].append(float((cl @ g).max()))
        out["delta (q+gold).answer"].append(float(qg @ a - q @ a))
        out["max delta (q+gold).sentence"].append(float((sent @ qg - sent @ q).max()))
        out["squad_f1"].append(grading.f1_score(r["gold"], p))
        out["log_words"].append(float(np.log1p(len(p.split()))))
    return {k: np.asarray(v) for k, v in out.items()}


def auc(x: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC of score ``x`` for labels ``y`` (ties count half)."""
    pos, neg = x[y], x[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def best_net_gain(x: np.ndarray, good: np.ndarray) -> tuple[int, float, int, int]:
    """Best (net gain, threshold, turned right, turned wrong) of flipping every row with ``x >= t``;
    ``good[i]`` says flipping row i is right. Net gain 0 means: do not flip anything."""
    best = (0, float("inf"), 0, 0)
    for t in np.unique(x):
        m = x >= t
        right, wrong = int((m & good).sum()), int((m & ~good).sum())
        if right - wrong > best[0]:
            best = (right - wrong, float(t), right, wrong)
    return best


def cv_logistic(x: np.ndarray, y: np.ndarray, groups: np.ndarray, lam: float = 1.0) -> np.ndarray:
    """Out-of-fold probabilities of an L2-regularised logistic regression (Newton steps), 5 folds by group."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    x1 = np.c_[np.ones(len(x)), x]
    reg = lam * np.diag(np.r_[0.0, np.ones(x.shape[1])])
    out = np.zeros(len(y))
    for k in range(5):
        tr = groups != k
        w = np.zeros(x1.shape[1])
        for _ in range(50):
            p = 1 / (1 + np.exp(-x1[tr] @ w))
            grad = x1[tr].T @ (p - y[tr]) + reg @ w
            hess = x1[tr].T @ (x1[tr] * (p * (1 - p))[:, None]) + reg
            w -= np.linalg.solve(hess, grad)
        out[~tr] = 1 / (1 + np.exp(-x1[~tr] @ w))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    args = ap.parse_args()
    tune, _ = calibration.split_calibration(calibration.load_calibration(args.calibration), seed=0)
    encoder = load_encoder()
    read = [(r, *grading._rule_verdict(r["question"], r["gold"], r["prediction"])) for r in tune]
    print(f"tune half: {len(tune)} rows; rules say yes {sum(v is True for _, v, _ in read)}, "
          f"no {sum(v is False for _, v, _ in read)}, undecided {sum(v is None for _, v, _ in read)}")
    for name, wanted, flip_good in (("undecided -> yes", None, True), ("rules' yes -> no (veto)", True, False)):
        rows = [(r, p) for r, v, p in read if v is wanted]
        y = np.array([r["verdict"] for r, _ in rows])
        good = y if flip_good else ~y
        feats = features(encoder, rows)
        print(f"\n### {name}: {len(rows)} rows, GPT-4.1 yes on {int(y.sum())}\n")
        print("| feature | AUC (GPT yes) | best in-sample net gain | at threshold | right | wrong |")
        print("|---|---|---|---|---|---|")
        for k, x in feats.items():
            score = x if flip_good else -x
            gain, t, right, wrong = best_net_gain(score, good)
            at = "none (flip nothing)" if gain == 0 else f"{t if flip_good else -t:.3f}"
            print(f"| {k} | {auc(x, y):.3f} | {gain:+d} | {at} | {right} | {wrong} |")
        groups = np.array([int(hashlib.sha256(r["question"].encode()).hexdigest(), 16) % 5 for r, _ in rows])
        prob = cv_logistic(np.stack(list(feats.values()), 1), y.astype(float), groups)
        score = prob if flip_good else 1 - prob
        cells = []
        for t in (0.3, 0.4, 0.5, 0.6, 0.7):
            m = score >= t
            cells.append(f"p>={t}: {int((m & good).sum())} right / {int((m & ~good).sum())} wrong")
        print(f"\nlogistic regression on all features, 5-fold CV by question: {'; '.join(cells)}")


if __name__ == "__main__":
    main()
