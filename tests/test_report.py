"""`seal-jax report`: the table and the bar chart of a run folder."""

from __future__ import annotations

import json

import pytest

from seal_jax.cli import main
from seal_jax.report import report


def write_run(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_config.json").write_text(json.dumps({"model": "m"}))
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(pid, condition, before, after, n=2):
    answers = [{"question": "q", "gold": "g", "prediction": "p", "correct": i < round(after * n)} for i in range(n)]
    return {"passage_id": pid, "title": "t", "condition": condition, "candidate": 0, "self_edit": None,
            "n_sequences": 1, "accuracy_before": before, "accuracy_after": after, "reward": after,
            "answers": answers, "failure": None}


def test_report_table_and_chart(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, [row("a", "base", 0.0, 0.0), row("a", "rewrite", 0.0, 1.0), row("b", "base", 0.5, 0.5),
                    row("b", "rewrite", 0.5, 0.5)])
    markdown, png = report(run)
    assert "| base | 25.0% |" in markdown and "| rewrite | 75.0% |" in markdown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["report", str(run)]) == 0
    assert "rewrite" in capsys.readouterr().out


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere; pass a run folder"):
        report(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no results.jsonl"):
        report(tmp_path)
    write_run(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="is empty"):
        report(tmp_path / "empty")


def test_report_restem_rounds(tmp_path, capsys):
    run = tmp_path / "restem"
    restem = {"strategy": "rewrite", "rounds": 2}
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"model": "m", "restem": restem}))
    write_run(run / "round-0" / "eval", [row("e", "base", 0.5, 0.5), row("e", "rewrite", 0.5, 0.5)])
    write_run(run / "round-1", [row("a", "base", 0.0, 0.0), row("a", "rewrite", 0.0, 1.0)])
    (run / "round-1" / "round.json").write_text(json.dumps(
        {"generator": "g1", "sft_rows": 1, "mean_sft_reward": 1.0, "sft_loss": [2.0, 1.0]}))
    write_run(run / "round-1" / "eval", [row("e", "base", 0.5, 0.5), row("e", "rewrite", 0.5, 1.0)])
    for folder in (run / "round-0" / "eval", run / "round-1" / "eval"):  # eval folders carry their summary
        from seal_jax.selfedit.results import read_rows, summarize

        (folder / "summary.json").write_text(json.dumps(summarize(read_rows(folder / "results.jsonl"), "m")))
    markdown, png = report(run)
    lines = markdown.splitlines()
    assert "| 0 | 50.0% | 50.0% | – | – | – | – |" in lines
    assert "| 1 | 50.0% | 100.0% | 0.0% | 100.0% | 1 | 100.0% |" in lines
    assert "| 2 | – | – | – | – | – | – |" in lines  # not run yet
    assert png.name == "rounds.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(run)]) == 0 and "held-out rewrite" in capsys.readouterr().out


def test_report_says_when_a_run_has_not_finished(tmp_path):
    run = tmp_path / "killed"
    write_run(run, [row("demo-0", "base", 0.0, 0.0), row("demo-0", "passage", 0.0, 0.5)])
    config = {"name": "killed", "model": "m", "conditions": ["base", "passage"], "data": {"source": "demo", "n": 3}}
    (run / "run_config.json").write_text(json.dumps(config))
    markdown, _ = report(run)
    assert markdown.endswith(f"1 of 3 passages done: the run has not finished (`seal-jax run CONFIG --out {run} "
                             "--resume` continues it).")
    config["data"]["n"] = 1
    (run / "run_config.json").write_text(json.dumps(config))
    assert "passages done" not in report(run)[0]
