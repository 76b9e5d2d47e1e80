"""Can the bundled language model tell which answers convey the gold? A study on the TUNE half only.

The companion of ``grader_embedding_study.py``. A bi-encoder measures topic; this asks a causal LM
instead. For each calibration row it scores how much reading the answer raises the model's probability
of the gold answer (pointwise mutual information):

    PMI = log P(gold | question, answer) - log P(gold | question, "I don't know.")

with both prompts ending in "The reference answer, which the student's answer conveys, is:". An answer
that paraphrases the gold ("pure oxygen" for "100% oxygen") should raise it; a near miss of the right
type should not. It prints, for the rows ``rule_verdict`` leaves undecided, the rows it says yes to and
the rows it says no to, the ROC AUC of PMI (total and per gold token) and of the plain log-probability
per token, and the best in-sample net gain of flipping every row past a threshold. It reads only the
tune half of ``grader_calibration.jsonl`` (``split_calibration(seed=0)``).

    python experiments/grader_lm_study.py [--model checkpoints/smollm2-135m-instruct] [--batch-size 16]

About 5 minutes on 2 cores with the bundled 135M model (``seal-jax fetch``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
from grader_embedding_study import DEFAULT_CALIBRATION, auc, best_net_gain
from tqdm import tqdm

import seal_jax
from seal_jax.selfedit import calibration, grading

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"
MAX_PROMPT_TOKENS = 200  # the prompt's last tokens (long run-on answers are cut from the left)
MAX_GOLD_TOKENS = 40


def prompt(question: str, answer: str) -> str:
    """The text whose continuation is scored: question, the student's answer, then a lead-in to the gold."""
    return (f"Question: {question}\nStudent's answer: {answer}\n"
            "The reference answer, which the student's answer conveys, is:")


def gold_logprobs(lm: seal_jax.LM, prompts: list[str], golds: list[str], batch_size: int) -> np.ndarray:
    """``[N, 2]``: (sum of log P(gold token | prompt, earlier gold tokens), number of gold tokens) per row."""
    tok = lm.tokenizer
    rows = []
    for p, g in zip(prompts, golds, strict=True):
        a = tok(p, add_special_tokens=False)["input_ids"][-MAX_PROMPT_TOKENS:]
        b = tok(" " + g, add_special_tokens=False)["input_ids"][:MAX_GOLD_TOKENS]
        rows.append((a + b, len(a)))
    out = np.zeros((len(rows), 2))
    order = np.argsort([len(ids) for ids, _ in rows])
    for s in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch"):
        idx = order[s:s + batch_size]
        width = max(len(rows[i][0]) for i in idx)
        ids = np.zeros((len(idx), width), np.int32)
        mask = np.zeros_like(ids)
        for j, i in enumerate(idx):  # left-padded, as LM.forward expects
            seq = rows[i][0]
            ids[j, width - len(seq):], mask[j, width - len(seq):] = seq, 1
        logp = np.asarray(jax.nn.log_softmax(lm.forward(ids, mask), axis=-1))
        for j, i in enumerate(idx):
            seq, start = rows[i]
            off = width - len(seq)
            pos = np.arange(start, len(seq))
            out[i] = logp[j, off + pos - 1, np.asarray(seq)[pos]].sum(), len(pos)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    tune, _ = calibration.split_calibration(calibration.load_calibration(args.calibration), seed=0)
    lm = seal_jax.load(args.model)
    read = [(r, *grading._rule_verdict(r["question"], r["gold"], r["prediction"])) for r in tune]
    golds = [r["gold"] for r, _, _ in read]
    with_answer = gold_logprobs(lm, [prompt(r["question"], p.strip()) for r, _, p in read], golds, args.batch_size)
    without = gold_logprobs(lm, [prompt(r["question"], "I don't know.") for r, _, _ in read], golds, args.batch_size)
    feats = {"PMI": with_answer[:, 0] - without[:, 0],
             "PMI per gold token": (with_answer[:, 0] - without[:, 0]) / with_answer[:, 1],
             "log P per gold token": with_answer[:, 0] / with_answer[:, 1]}
    verdicts = np.array([v for _, v, _ in read], dtype=object)
    y_all = np.array([r["verdict"] for r, _, _ in read])
    for name, wanted, flip_good in (("undecided -> yes", None, True), ("rules' yes -> no (veto)", True, False),
                                    ("rules' no -> yes", False, True)):
        m = np.array([v is wanted for v in verdicts])
        y = y_all[m]
        good = y if flip_good else ~y
        print(f"\n### {name}: {int(m.sum())} rows, GPT-4.1 yes on {int(y.sum())}\n")
        print("| feature | AUC (GPT yes) | best in-sample net gain | at threshold | right | wrong |")
        print("|---|---|---|---|---|---|")
        for k, x in feats.items():
            gain, t, right, wrong = best_net_gain(x[m] if flip_good else -x[m], good)
            at = "none (flip nothing)" if gain == 0 else f"{t if flip_good else -t:.3f}"
            print(f"| {k} | {auc(x[m], y):.3f} | {gain:+d} | {at} | {right} | {wrong} |")


if __name__ == "__main__":
    main()
