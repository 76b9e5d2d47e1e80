"""Continual self-edits on a random tiny model: the matrix layout, merged steps, resume inside a sequence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import seal_jax as sj
from seal_jax.report import report
from seal_jax.selfedit import runs
from seal_jax.selfedit.continual import (
    ContinualConfig,
    continual_markdown,
    run_continual,
    score_passages,
    sequence_passages,
    update,
)
from seal_jax.selfedit.episode import make_grader
from seal_jax.selfedit.results import read_rows
from seal_jax.selfedit.run_config import RunConfigError, derived_seed, pool_passages
from seal_jax.selfedit.strategies import training_sequences

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def continual_raw(model_dir, **table):
    return dict(name="tiny-continual", model=str(model_dir), chat=True, data={"source": "demo"},
                selfedit_sampling={"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95},
                lora={"rank": 4, "alpha": 8.0}, train={"epochs": 1, "learning_rate": 1e-2, "max_len": 128},
                eval_max_new_tokens=8, continual={"passages": 3, "sequences": 2, **table})


@pytest.fixture(scope="module")
def tiny_lm(tiny_chat_dir):
    return sj.load(tiny_chat_dir, progress=False)


def steps(folder):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(folder / "steps.jsonl")]


def test_matrix_layout_row_zero_and_resume(tiny_chat_dir, tiny_lm, tmp_path):
    config = ContinualConfig.from_dict(continual_raw(tiny_chat_dir))
    full = tmp_path / "full"
    summary = run_continual(config, full, lm=tiny_lm, progress=False)
    mean, std = summary["mean_over_sequences"], summary["std_over_sequences"]
    assert summary["sequences"] == 2 and len(mean) == 4 and all(len(line) == 3 for line in mean)
    for i, line in enumerate(mean):  # row 0 on all passages, row i on the first i (lower triangular)
        assert [x is not None for x in line] == ([True] * 3 if i == 0 else [j < i for j in range(3)])
        assert [x is not None for x in std[i]] == [x is not None for x in line]
    assert [len(line) for line in summary["gold_loglik_mean_over_sequences"]] == [3, 3, 3, 3]
    assert json.loads((full / "matrix.json").read_text()) == summary
    pool = pool_passages({"source": "demo"})
    grader = make_grader(config.knowledge, tiny_lm)
    per_sequence = []
    for s in range(2):
        rows = read_rows(full / f"sequence-{s}" / "steps.jsonl")
        passages = sequence_passages(pool, config, s)
        assert [r["step"] for r in rows] == [-1, 0, 1, 2] and rows[0]["passages"] == [p.id for p in passages]
        assert [r["passage_id"] for r in rows[1:]] == [p.id for p in passages]
        accuracy, loglik = score_passages(tiny_lm, passages, config.knowledge, grader)
        assert rows[0]["accuracy"] == accuracy and rows[0]["gold_loglik"] == pytest.approx(loglik, abs=1e-6)
        assert rows[1]["gold_loglik"][0] != pytest.approx(loglik[0], abs=1e-4)  # the merged step changed the model
        per_sequence.append([r["gold_loglik"] for r in rows])
    expected = np.mean([seq[2] for seq in per_sequence], axis=0)  # after step 1: passages 0 and 1
    assert summary["gold_loglik_mean_over_sequences"][2][:2] == pytest.approx(expected.tolist())
    assert sequence_passages(pool, config, 0) != sequence_passages(pool, config, 1)

    part = tmp_path / "part"
    run_continual(config, part, lm=tiny_lm, progress=False, stop_after=3)  # untouched, step 0, step 1
    assert len(read_rows(part / "sequence-0" / "steps.jsonl")) == 3
    with pytest.raises(FileExistsError, match="--resume"):
        run_continual(config, part, lm=tiny_lm, progress=False)
    resumed = run_continual(config, part, lm=tiny_lm, progress=False, resume=True)  # replays steps 0-1, goes on
    for s in range(2):
        assert steps(part / f"sequence-{s}") == steps(full / f"sequence-{s}")
    assert resumed == summary
    markdown, png = report(full)
    assert "| step 2 |" in markdown and png.name == "forgetting.png" and png.is_file()
    gold = summary["gold_loglik_mean_over_sequences"]
    assert (f"| step 0 | {gold[1][0]:.3f} ({gold[1][0] - gold[0][0]:+.3f}) |  |  |") in markdown.splitlines()


def test_a_merged_step_equals_the_base_with_its_adapter(tiny_chat_dir, tiny_lm):
    config = ContinualConfig.from_dict(continual_raw(tiny_chat_dir))
    passage = pool_passages({"source": "demo"})[0]
    edit = "The harbour has ferries.\nIt opened long ago."
    merged, loss, failure = update(tiny_lm, passage, edit, config, 0)
    k = config.knowledge
    adapters = tiny_lm.train_adapters([training_sequences(passage, edit, include_passage=True)], k.lora_spec(),
                                      k.train_spec(seed=derived_seed(k.seed, "continual", 0, passage.id)), seed=k.seed)
    assert failure is None and loss == [adapters.losses[0][0], adapters.losses[0][-1]]
    ids = np.array([tiny_lm.tokenizer(passage.text)["input_ids"][:48]])
    np.testing.assert_allclose(merged.logits(ids), tiny_lm.logits(ids, adapter=adapters[0]), atol=1e-4)
    assert np.abs(merged.logits(ids) - tiny_lm.logits(ids)).max() > 1e-3


def test_continual_configs_and_errors(tiny_chat_dir):
    demo, big = (runs.load_config(EXPERIMENTS / f) for f in ("continual-demo.toml", "continual-qwen3-8b.toml"))
    assert type(demo) is type(big) is ContinualConfig and runs.kind_of(big.to_json()) == "continual"
    assert (big.passages, big.sequences, big.strategy) == (8, 5, "implications")
    assert ContinualConfig.from_dict(big.to_json()) == big
    with pytest.raises(RunConfigError, match="does not write self-edits"):
        ContinualConfig.from_dict(continual_raw(tiny_chat_dir, strategy="passage"))
    with pytest.raises(RunConfigError, match="continual.passages must be a positive integer"):
        ContinualConfig.from_dict(continual_raw(tiny_chat_dir, passages=0))
    with pytest.raises(RunConfigError, match="set continual.passages instead of data.n"):
        ContinualConfig.from_dict({**continual_raw(tiny_chat_dir), "data": {"source": "demo", "n": 4}})
    with pytest.raises(RunConfigError, match="the passage pool has"):
        sequence_passages(pool_passages({"source": "demo"})[:2], ContinualConfig.from_dict(continual_raw(tiny_chat_dir)), 0)


def test_the_table_shows_the_gold_loglik_and_its_change_over_the_untouched_model():
    summary = {"model": "m", "strategy": "implications", "passages": 2, "sequences": 1,
               "mean_over_sequences": [[0.5, 0.0], [1.0, None], [0.5, 1.0]],
               "std_over_sequences": [[0.0, 0.0], [0.0, None], [0.0, 0.0]],
               "gold_loglik_mean_over_sequences": [[-2.0, -3.0], [-1.25, None], [-1.5, -2.5]],
               "gold_loglik_std_over_sequences": [[0.0, 0.0], [0.0, None], [0.0, 0.0]]}
    lines = continual_markdown(summary).splitlines()
    accuracy = lines.index("| untouched | 50.0% (0.0) | 0.0% (0.0) |")
    gold = lines.index("| untouched | -2.000 | -3.000 |")
    assert accuracy < gold and lines[accuracy + 1] == "| step 0 | 100.0% (0.0) |  |"
    assert lines[gold - 2:gold] == ["| after | d0 | d1 |", "|---|---:|---:|"]
    assert lines[gold - 4].startswith("Mean log-likelihood of the gold answers (nats/token")
    assert lines[gold + 1:] == ["| step 0 | -1.250 (+0.750) |  |", "| step 1 | -1.500 (+0.500) | -2.500 (+0.500) |"]
    older = {k: v for k, v in summary.items() if not k.startswith("gold_loglik_")}  # a matrix.json without them
    assert "log-likelihood" not in continual_markdown(older) and "| step 1 | 50.0% (0.0) | 100.0% (0.0) |" in \
        continual_markdown(older)


def test_a_pool_too_small_fails_before_the_model_loads(tiny_chat_dir, tmp_path, monkeypatch):
    """The pool is checked against continual.passages first: a run that cannot draw its sequences stops at once,
    without loading the model or writing its folder."""
    import seal_jax.selfedit.continual as continual

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the pool was checked")

    monkeypatch.setattr(continual, "load_model", load_model)
    size = len(pool_passages({"source": "demo"}))
    config = ContinualConfig.from_dict({**continual_raw(tiny_chat_dir), "data": {"source": "demo", "start": size - 2}})
    with pytest.raises(RunConfigError, match=r"the passage pool has 2 passages \(data.source 'demo' from data.start = "
                                             rf"{size - 2}\), fewer than continual.passages = 3: lower continual.passages"):
        run_continual(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
