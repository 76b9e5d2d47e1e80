"""End-to-end knowledge-incorporation runs on a random tiny model: row and summary schema, resume."""

from __future__ import annotations

import json

import pytest

import seal_jax as sj
from seal_jax.selfedit.knowledge import ROW_FIELDS, RunConfig, RunConfigError, read_rows, run_knowledge

SUMMARY_FIELDS = {"accuracy", "accuracy_std", "n_questions", "n_passages", "mean_gain"}


def tiny_config(model_dir, **changes):
    raw = dict(
        name="tiny", model=str(model_dir), chat=True, conditions=["base", "passage", "implications"], k=2,
        data={"source": "demo", "n": 2}, selfedit_sampling={"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95},
        lora={"rank": 4, "alpha": 8.0}, train={"epochs": 2, "learning_rate": 1e-2, "max_len": 128},
        eval_max_new_tokens=8,
    )
    raw.update(changes)
    return RunConfig.from_dict(raw)


@pytest.fixture(scope="module")
def tiny_lm(tiny_chat_dir):
    return sj.load(tiny_chat_dir, progress=False)


def test_run_rows_and_summary_schema(tiny_chat_dir, tiny_lm, tmp_path):
    config = tiny_config(tiny_chat_dir)
    summary = run_knowledge(config, tmp_path, lm=tiny_lm, progress=False)
    rows = read_rows(tmp_path / "results.jsonl")
    # 2 passages x (base + passage x 1 + implications x 2)
    assert len(rows) == 2 * 4
    for r in rows:
        assert set(ROW_FIELDS) <= set(r)
        assert 0.0 <= r["accuracy_after"] <= 1.0 and r["reward"] == r["accuracy_after"]
        assert all({"question", "gold", "prediction", "correct"} <= set(a) for a in r["answers"])
    impl = [r for r in rows if r["condition"] == "implications"]
    assert {r["candidate"] for r in impl} == {0, 1} and all(isinstance(r["self_edit"], str) for r in impl)
    assert all(r["n_sequences"] >= 1 for r in rows if r["condition"] != "base")
    assert set(summary) == {"model", "conditions"} and set(summary["conditions"]) == {"base", "passage", "implications"}
    for c in summary["conditions"].values():
        assert SUMMARY_FIELDS <= set(c) and c["n_passages"] == 2
    assert summary["conditions"]["implications"]["n_questions"] == 2 * sum(
        len(r["answers"]) for r in rows if r["condition"] == "base")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "| implications |" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "run_config.json").read_text())["model"] == str(tiny_chat_dir)


def test_killed_run_resumes_to_the_same_rows(tiny_chat_dir, tiny_lm, tmp_path):
    config = tiny_config(tiny_chat_dir)
    full = tmp_path / "full"
    run_knowledge(config, full, lm=tiny_lm, progress=False)
    part = tmp_path / "part"
    run_knowledge(config, part, lm=tiny_lm, progress=False, stop_after=1)
    assert len(read_rows(part / "results.jsonl")) == 4
    with (part / "results.jsonl").open("a") as f:
        f.write('{"passage_id": "demo-1", "torn')  # killed in the middle of a write
    with pytest.raises(FileExistsError, match="--resume"):
        run_knowledge(config, part, lm=tiny_lm, progress=False)
    run_knowledge(config, part, lm=tiny_lm, progress=False, resume=True)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(read_rows(part / "results.jsonl")) == strip(read_rows(full / "results.jsonl"))
    with pytest.raises(RunConfigError, match=r"config differs in \['k'\]"):
        run_knowledge(tiny_config(tiny_chat_dir, k=3), part, lm=tiny_lm, progress=False, resume=True)


def test_config_errors(tmp_path, tiny_chat_dir):
    with pytest.raises(RunConfigError, match="unknown keys \\['epochs'\\]"):
        RunConfig.from_dict({"name": "x", "model": "m", "epochs": 3})
    with pytest.raises(Exception, match="unknown strategy 'summarize'"):
        tiny_config(tiny_chat_dir, conditions=["base", "summarize"])
    with pytest.raises(Exception, match="learning_rate must be positive"):
        tiny_config(tiny_chat_dir, train={"learning_rate": -1.0})
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nmodel = ")
    with pytest.raises(RunConfigError, match="bad.toml"):
        RunConfig.from_toml(bad)
    with pytest.raises(FileNotFoundError, match="no run config"):
        RunConfig.from_toml(tmp_path / "missing.toml")


def test_experiment_configs_parse():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "experiments").glob("*.toml"))
    assert configs, "experiments/ should hold run configs"
    from seal_jax.selfedit.runs import load_config

    kinds = {path.name: type(load_config(path)).__name__ for path in configs}
    assert kinds["demo.toml"] == "RunConfig" and kinds["restem-demo.toml"] == "RestemConfig"
