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
    assert markdown.rstrip().endswith("Units: accuracy in %; std over passages and mean gain (accuracy after the "
                                      "update minus before, mean over the rows) in percentage points.")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["report", str(run)]) == 0
    assert "rewrite" in capsys.readouterr().out


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere; pass a run folder"):
        report(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no results.jsonl"):
        report(tmp_path)
    write_run(tmp_path / "empty", [])
    with pytest.raises(ValueError, match=r"knowledge run that has not finished a passage yet \(results.jsonl is "
                                         r"empty\); `seal-jax run CONFIG --out .*empty --resume` continues it"):
        report(tmp_path / "empty")
    (tmp_path / "empty" / "run_config.json").write_text('{"model": "checkpoints/smol')  # cut off mid-write
    with pytest.raises(ValueError, match=r"empty/run_config.json is not valid JSON .*run the config into a new --out"):
        report(tmp_path / "empty")


def test_report_of_a_run_before_its_first_passage(tmp_path, capsys):
    """A knowledge or CPT folder with only its run_config.json is a run that has not finished a passage yet
    (not "no run folder"), as the template-search and continual branches say; the command exits 1."""
    knowledge = tmp_path / "knowledge"
    knowledge.mkdir()
    (knowledge / "run_config.json").write_text(json.dumps({"name": "demo", "model": "m", "conditions": ["base"]}))
    expected = (f"{knowledge} is a knowledge run 'demo' that has not finished a passage yet (no results.jsonl yet); "
                f"`seal-jax run CONFIG --out {knowledge} --resume` continues it")
    with pytest.raises(ValueError) as error:
        report(knowledge)
    assert str(error.value) == expected
    assert main(["report", str(knowledge)]) == 1
    assert capsys.readouterr().err == f"seal-jax report: ValueError: {expected}\n"
    cpt = tmp_path / "cpt"
    cpt.mkdir()
    (cpt / "run_config.json").write_text(json.dumps({"model": "m", "cpt": {"conditions": ["passage"]}}))
    with pytest.raises(ValueError, match=r"is a CPT run that has not finished a passage yet \(no results.jsonl yet\): "
                                         r"it has not written a self-edit yet; `seal-jax run CONFIG --out .*cpt --resume`"):
        report(cpt)
    (cpt / "selfedits.jsonl").write_text(json.dumps({"passage_id": "a", "selfedits": {}}) + "\n")
    with pytest.raises(ValueError, match=r"it writes self-edits \(for 1 passage so far\), then trains one adapter per "
                                         "condition before it evaluates any passage"):
        report(cpt)
    (cpt / "training.json").write_text("{}")
    with pytest.raises(ValueError, match="its adapters are trained; the evaluation has not finished a passage"):
        report(cpt)
    assert not (knowledge / "report.md").exists() and not (cpt / "report.md").exists()


def test_report_of_a_condition_without_result(tmp_path, monkeypatch):
    """Every row of ``template`` failed (no valid template): the table shows "–", the chart marks the
    condition "no result" instead of a bar at 0, and the conditions keep the config's order."""
    import seal_jax.report as report_module

    failed = {**row("a", "template", 0.5, 0.5), "answers": [], "failure": "no valid template: not JSON"}
    run = tmp_path / "run"
    write_run(run, [row("a", "base", 0.5, 0.5), failed, {**failed, "candidate": 1}, row("a", "rewrite", 0.5, 1.0)])
    (run / "run_config.json").write_text(json.dumps({"model": "m", "conditions": ["base", "rewrite", "template"]}))
    figures = []
    original = report_module._save
    monkeypatch.setattr(report_module, "_save", lambda fig, path: (figures.append(fig), original(fig, path))[1])
    markdown, png = report(run)
    assert [line for line in markdown.splitlines() if line.startswith("| ")][-3:] == [
                                          "| base | 50.0% | 0.0 | 2 | 1 | +0.0 | 0 |",
                                          "| rewrite | 100.0% | 0.0 | 2 | 1 | +50.0 | 0 |",
                                          "| template | – | – | 0 | 1 | – | 2 |"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "rewrite", "template"]
    assert [t.get_text() for t in ax.texts] == ["50.0", "100.0", "no result\n(every row failed)"]
    assert [bar.get_visible() for bar in ax.patches] == [True, True, False]


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


def test_iterations_chart_of_all_zero_accuracy_starts_at_zero(tmp_path, monkeypatch):
    """A 135M model's template search often scores 0% everywhere: the score axis still reads 0 to a few
    percent, not -0.04 to 0.04."""
    import seal_jax.report as report_module

    figures = []
    original = report_module._save
    monkeypatch.setattr(report_module, "_save", lambda fig, path: (figures.append(fig), original(fig, path))[1])
    rows = [{"iteration": i, "best_score": 0.0, "mean_score": 0.0, "base_accuracy": 0.0, "eval": None,
             "hyperparameter_similarity": 0.5, "instruction_similarity": 0.2, "mean_sequence_chars": 300.0,
             "similarity_backend": "tfidf"} for i in (1, 2)]
    report_module.plot_iterations({"model": "m", "variant": "archive", "iterations": rows}, tmp_path / "it.png")
    low, high = figures[0].axes[0].get_ylim()
    assert low == 0 and high >= 5


def test_units_under_the_template_table():
    """The template table's best gain is a normalized gain, not a percentage like the scores beside it: the
    line under the table says so (and nothing about % for a dense reward, whose title line gives its unit)."""
    from seal_jax.selfedit.template_stats import template_units

    line = template_units({"reward": "accuracy"})
    assert "scores are accuracy in %" in line and "best gain is not in %" in line
    assert "(accuracy after − before) / (1 − before)" in line
    assert "%" not in template_units({"reward": "gold_loglik"})


def restem_folder(tmp_path, eval_data=True):
    run = tmp_path / "restem"
    run.mkdir(parents=True)
    table = {"strategy": "rewrite", "rounds": 1, "passages_per_round": 2,
             "eval_data": {"source": "demo", "start": 10, "n": 2} if eval_data else None}
    (run / "run_config.json").write_text(json.dumps({"name": "r", "model": "m", "restem": table}))
    return run


def test_report_of_a_restem_run_before_any_round(tmp_path, capsys):
    """No round finished and nothing evaluated: an error that says how far the run got and how to continue
    it, no all-"–" table and no empty chart (matplotlib's "No artists with labels" warning). An evaluation
    killed before its summary.json: a table of its rows so far and where the run is."""
    import warnings

    run = restem_folder(tmp_path)
    resume = f"`seal-jax run CONFIG --out {run} --resume` continues it"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as error:
            report(run)
        assert str(error.value) == (f"{run} is a ReST-EM run 'r' where no round has finished yet (the starting model "
                                    f"on the held-out passages: 0 of 2 done); {resume}")
    assert not (run / "rounds.png").exists() and not (run / "report.md").exists()
    # killed during the evaluation, its summary.json not written: its rows so far, and where the run is
    write_run(run / "round-0" / "eval", [row("demo-10", "base", 0.5, 0.5), row("demo-10", "rewrite", 0.5, 1.0)])
    assert main(["report", str(run)]) == 0
    captured = capsys.readouterr()
    assert "| 0 | 50.0% | 100.0% |" in captured.out and "Traceback" not in captured.err
    assert ("The run has not finished: the starting model on the held-out passages: 1 of 2 done "
            f"({resume})") in captured.out

    no_eval = restem_folder(tmp_path / "plain", eval_data=False)
    with pytest.raises(ValueError, match=r"no round has finished yet \(round 1's E-step: 0 of 2 passages done\)"):
        report(no_eval)


def test_report_of_an_unfinished_restem_run_says_where_it_is(tmp_path):
    """Something to show: the table and chart, then where the run is and how to continue it."""
    import warnings

    from seal_jax.selfedit.results import read_rows, summarize

    run = restem_folder(tmp_path)
    resume = f"`seal-jax run CONFIG --out {run} --resume` continues it"
    evaluation = run / "round-0" / "eval"
    write_run(evaluation, [row(p, c, 0.5, 0.5) for p in ("demo-10", "demo-11") for c in ("base", "rewrite")])
    (evaluation / "summary.json").write_text(json.dumps(summarize(read_rows(evaluation / "results.jsonl"), "m")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        markdown, png = report(run)
    assert "| 0 | 50.0% | 50.0% | – | – | – | – |" in markdown.splitlines()
    assert markdown.rstrip().endswith(f"The run has not finished: round 1's E-step: 0 of 2 passages done ({resume}).")
    assert png.read_bytes()[:4] == b"\x89PNG"
    write_run(run / "round-1", [row(p, c, 0.0, 1.0) for p in ("a", "b") for c in ("base", "rewrite")])
    assert "The run has not finished: round 1's E-step is done; its SFT of the generator has not finished" in (
        report(run)[0])
    (run / "round-1" / "round.json").write_text(json.dumps({"generator": "round-1/generator", "sft_rows": 2,
                                                           "mean_sft_reward": 1.0}))
    assert "The run has not finished: round 1's generator on the held-out passages: 0 of 2 done" in report(run)[0]
    write_run(run / "round-1" / "eval", [row(p, c, 0.5, 1.0) for p in ("demo-10", "demo-11") for c in ("base", "rewrite")])
    assert "has not finished" not in report(run)[0]


def test_rounds_chart_without_a_point_has_no_legend(tmp_path):
    import warnings

    from seal_jax.report import plot_rounds

    summary = {"model": "m", "strategy": "rewrite", "rounds": [{"round": 0, "eval": None, "train": None}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib: "No artists with labels found to put in legend"
        assert plot_rounds(summary, tmp_path / "rounds.png").is_file()


def continual_folder(tmp_path, sequences, steps):
    """A continual run of 3 passages; ``steps[s]``: how many rows sequence ``s`` has written (4 = finished)."""
    run = tmp_path / "continual"
    run.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps(
        {"name": "cont", "model": "m", "continual": {"strategy": "implications", "passages": 3,
                                                     "sequences": sequences}}))
    for s, count in enumerate(steps):
        rows = [{"step": i - 1, "passage_id": "untouched" if i == 0 else f"demo-{i}", "sequence": s,
                 "accuracy": [0.5] * (3 if i == 0 else i), "gold_loglik": [-5.0] * (3 if i == 0 else i),
                 "passage_rows": 1} for i in range(count)]
        (run / f"sequence-{s}").mkdir()
        (run / f"sequence-{s}" / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_report_of_a_continual_run_killed_partway(tmp_path, capsys):
    """No finished sequence: how far the run got and how to continue it, as the knowledge report says."""
    run = continual_folder(tmp_path, 1, [3])
    expected = (f"{run} is a continual run 'cont' with no finished sequence yet (sequence 0: 2 of 3 steps done); "
                f"`seal-jax run CONFIG --out {run} --resume` continues it")
    with pytest.raises(ValueError) as error:
        report(run)
    assert str(error.value) == expected
    assert main(["report", str(run)]) == 1
    assert capsys.readouterr().err == f"seal-jax report: ValueError: {expected}\n"
    (run / "sequence-0" / "steps.jsonl").unlink()
    with pytest.raises(ValueError, match=r"no finished sequence yet \(sequence 0: the untouched model not scored "
                                         r"yet\); `seal-jax run CONFIG --out .* --resume` continues it"):
        report(run)
    assert not (run / "report.md").exists()


def test_report_of_a_continual_run_with_sequences_left(tmp_path):
    run = continual_folder(tmp_path, 2, [4, 2])
    markdown, png = report(run)
    assert "| step 2 | 50.0% (0.0) | 50.0% (0.0) | 50.0% (0.0) |" in markdown
    assert markdown.rstrip().endswith(f"1 of 2 sequences done (sequence 1: 1 of 3 steps done): the run has not "
                                      f"finished (`seal-jax run CONFIG --out {run} --resume` continues it).")
    assert png.name == "forgetting.png"
    assert "has not finished" not in report(continual_folder(tmp_path / "done", 1, [4]))[0]
