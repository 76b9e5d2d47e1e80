"""Results rows: summaries by hand, torn-file repair, whole passages."""

from __future__ import annotations

import json
import os

import pytest

from seal_jax.selfedit.data import Passage
from seal_jax.selfedit.results import (
    Measure,
    ResultsFileError,
    StateFileError,
    append_passage,
    append_rows,
    knowledge_units,
    read_rows,
    read_state,
    result_row,
    scored,
    summarize,
    summary_markdown,
    write_json,
    write_text,
)

ANSWER = {"question": "q", "gold": "g", "prediction": "p", "correct": True}


def test_summary_numbers_by_hand():
    def row(pid, condition, before, correct, failure=None):
        answers = [{"question": "q", "gold": "g", "prediction": "p", "correct": bool(c)} for c in correct]
        after = sum(correct) / len(correct) if correct else before
        return {"passage_id": pid, "condition": condition, "accuracy_before": before, "accuracy_after": after,
                "answers": answers, "failure": failure}

    rows = [row("a", "base", 0.5, [1, 0]), row("a", "passage", 0.5, [1, 1]), row("a", "passage", 0.5, [0, 1]),
            row("b", "base", 0.0, [0, 0, 0, 0]), row("b", "passage", 0.0, [1, 0, 0, 0]),
            row("b", "passage", 0.0, [], failure="self-edit produced no training sequence")]
    s = summarize(rows, "m")
    assert s["model"] == "m" and list(s["conditions"]) == ["base", "passage"]
    # passage: 4 of 8 answers right; the failed row trained nothing and is left out of every mean: per passage
    # a = (1 + 0.5) / 2, b = 0.25 (not (0.25 + 0) / 2); gains 0.5, 0, 0.25 (not also the failed row's 0)
    assert s["conditions"]["passage"] == pytest.approx({
        "accuracy": 0.5, "accuracy_std": 0.25, "n_questions": 8, "n_passages": 2, "mean_gain": 0.25,
        "failures": 1})
    assert s["conditions"]["base"] == pytest.approx({
        "accuracy": 1 / 6, "accuracy_std": 0.25, "n_questions": 6, "n_passages": 2, "mean_gain": 0.0, "failures": 0})


def _rows(pid, n):
    return [{"passage_id": pid, "candidate": c, "text": "é ✓"} for c in range(n)]


def test_read_rows_drops_a_torn_unit_and_repairs_only_when_asked(tmp_path):
    path = tmp_path / "results.jsonl"
    append_rows(path, _rows("a", 2))
    append_rows(path, _rows("b", 3))
    whole = path.read_bytes()
    assert read_rows(path) == _rows("a", 2) + _rows("b", 3) and path.read_bytes() == whole
    line = len(whole.split(b"\n", 1)[0]) + 1  # every row here has the same length
    first_unit = 2 * line
    for cut in (len(whole) - 1, len(whole) - 5, first_unit + 30, first_unit + line + 10):
        # a kill anywhere inside b's write (even just before its last newline) drops all of b
        path.write_bytes(whole[:cut])
        assert read_rows(path, repair=False) == _rows("a", 2)
        assert path.read_bytes() == whole[:cut]  # reports never change the file
        assert read_rows(path) == _rows("a", 2)
        assert path.read_bytes() == whole[:first_unit]  # the resume path cuts back to a's rows
    path.write_bytes(whole[:first_unit] + b'{"pass')  # torn before its id: the torn row may be a's, redo a
    assert read_rows(path, repair=False) == []
    path.write_bytes(whole[:first_unit] + b'{"passage_id": "b", "cand')  # b's id readable: a is whole
    assert read_rows(path) == _rows("a", 2) and path.read_bytes() == whole[:first_unit]
    path.write_bytes(whole.replace(b'"candidate": 1', b'"candidate": 1,,', 1))  # damage before the end
    with pytest.raises(ResultsFileError, match=r"results.jsonl: line 2 is not valid JSON"):
        read_rows(path)
    assert read_rows(tmp_path / "missing.jsonl") == []


def test_read_rows_counts_each_passages_rows(tmp_path):
    """Rows written by ``append_passage`` carry their passage's row count: a passage cut anywhere, even at a
    line end, is dropped whole, and a whole passage is kept whatever the tear after it hides."""
    path = tmp_path / "results.jsonl"
    append_passage(path, _rows("a", 2))
    append_passage(path, _rows("b", 3))
    whole = path.read_bytes()
    a_rows = [{**r, "passage_rows": 2} for r in _rows("a", 2)]
    assert read_rows(path) == a_rows + [{**r, "passage_rows": 3} for r in _rows("b", 3)]
    line_ends = [i + 1 for i, byte in enumerate(whole) if byte == ord("\n")]
    a_end = line_ends[1]
    for cut in range(a_end, len(whole)):  # every cut inside b's write, line ends included
        path.write_bytes(whole[:cut])
        assert read_rows(path, repair=False) == a_rows, cut
    path.write_bytes(whole[:a_end + 3])  # b's id hidden by the tear: a is whole all the same
    assert read_rows(path) == a_rows and path.read_bytes() == whole[:a_end]


def test_gold_loglik_is_summarised_where_rows_measure_it():
    passage = Passage("p", "T", "ctx", ())
    rows = [result_row(passage, "base", 0, None, 0, Measure(0.5, -2.0), Measure(0.5, -2.0), [ANSWER], None),
            result_row(passage, "passage", 0, "e", 1, Measure(0.5, -2.0), Measure(1.0, -0.5), [ANSWER], None),
            result_row(passage, "passage", 1, "e", 1, Measure(0.5, -2.0), Measure(0.0, -1.5), [ANSWER], None)]
    assert rows[1]["gold_loglik_before"] == -2.0 and rows[1]["gold_loglik_after"] == -0.5
    assert rows[1]["reward"] == 1.0 and rows[1]["normalized_gain"] == 1.0
    s = summarize(rows, "m")["conditions"]
    assert s["passage"]["gold_loglik"] == pytest.approx(-1.0) and s["passage"]["gold_loglik_change"] == pytest.approx(1.0)
    assert s["base"]["gold_loglik_change"] == 0.0
    table = summary_markdown({"model": "m", "conditions": s})
    assert "Δ gold nats/token" in table and "| -1.000 | +1.000 |" in table
    unmeasured = result_row(passage, "base", 0, None, 0, Measure(0.5), Measure(0.5), [ANSWER], None)
    assert "gold_loglik_before" not in unmeasured and "gold" not in summary_markdown(summarize([unmeasured], "m"))


def test_a_condition_whose_rows_all_failed_shows_no_result():
    """A ``template`` condition without a valid template: its rows trained nothing and carry the values before
    (gold_loglik_after = before). No mean may look measured: accuracy, std, gain and Δ gold are "–" (None in
    the JSON summary), the failures are counted, and the conditions follow the config's order."""
    a, b = Passage("a", "T", "ctx", ()), Passage("b", "T", "ctx", ())
    before = Measure(0.5, -2.0)
    rows = []
    for p in (a, b):  # the order a knowledge run writes: base, the failed rows, then the trained candidates
        rows.append(result_row(p, "base", 0, None, 0, before, before, [ANSWER, {**ANSWER, "correct": False}], None))
        rows += [result_row(p, "template", c, None, 0, before, before, [], "no valid template: not JSON")
                 for c in range(2)]
        rows.append(result_row(p, "passage", 0, None, 1, before, Measure(1.0, -1.0), [ANSWER, ANSWER], None))
    s = summarize(rows, "m", conditions=["base", "passage", "template"])
    assert list(s["conditions"]) == ["base", "passage", "template"]
    assert list(summarize(rows, "m")["conditions"]) == ["base", "template", "passage"]  # rows' order without it
    assert s["conditions"]["template"] == {"accuracy": None, "accuracy_std": None, "n_questions": 0, "n_passages": 2,
                                           "mean_gain": None, "failures": 4, "gold_loglik": None,
                                           "gold_loglik_change": None}
    assert s["conditions"]["passage"]["gold_loglik_change"] == pytest.approx(1.0)
    assert json.loads(json.dumps(s, allow_nan=False)) == s  # strict JSON: no NaN in summary.json
    lines = summary_markdown(s).splitlines()
    assert lines[-2:] == ["", knowledge_units(s)] and knowledge_units(s).startswith("Units: accuracy in %")
    assert lines[-5:-2] == ["| base | 50.0% | 0.0 | 4 | 2 | +0.0 | 0 | -2.000 | +0.000 |",
                          "| passage | 100.0% | 0.0 | 4 | 2 | +50.0 | 0 | -1.000 | +1.000 |",
                          "| template | – | – | 0 | 2 | – | 4 | – | – |"]
    assert [scored(r) for r in rows[:4]] == [True, False, False, True]


def test_failed_rows_leave_the_means_of_a_condition_with_results():
    """A failed row beside scored ones of the same condition: the means are over the scored rows only, a
    diverged candidate that was answered (a failure with answers) counts, and the failure count has both."""
    p = Passage("p", "T", "ctx", ())
    before = Measure(0.0, -3.0)
    rows = [result_row(p, "implications", 0, "e", 2, before, Measure(1.0, -1.0), [ANSWER], None),
            result_row(p, "implications", 1, None, 0, before, before, [], "self-edit produced no training sequence"),
            result_row(p, "implications", 2, "e", 2, before, Measure(0.0, -2.0), [{**ANSWER, "correct": False}],
                       "loss or gradients became non-finite at optimiser step 3 of 10")]
    c = summarize(rows, "m")["conditions"]["implications"]
    assert c["accuracy"] == 0.5 and c["mean_gain"] == 0.5 and c["accuracy_std"] == 0.0
    assert c["gold_loglik"] == pytest.approx(-1.5) and c["gold_loglik_change"] == pytest.approx(1.5)
    assert c["failures"] == 2 and c["n_questions"] == 2 and c["n_passages"] == 1


def test_state_files_are_replaced_whole_and_a_damaged_one_is_named(tmp_path, monkeypatch):
    path = tmp_path / "round.json"
    write_json(path, {"generator": "round-1/generator", "note": "é"})
    assert read_state(path, "redo it", keys=("generator",)) == {"generator": "round-1/generator", "note": "é"}
    write_json(path, {"note": "é"}, ensure_ascii=True)
    assert "\\u00e9" in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["round.json"]  # no temporary file left
    # a write killed half-way leaves the old file whole (the new text went to a temporary file)
    real_write = os.write

    def killed(fd, data):
        real_write(fd, bytes(data[:5]))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text(path, json.dumps({"generator": "x" * 100}))
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"note": "é"}
    assert read_state(tmp_path / "absent.json", "redo it") is None
    # a cut-off, non-object, incomplete or non-UTF-8 file: an error naming the file, the fault and the remedy
    path.write_text('{"meta_prompt": "You are desig')
    with pytest.raises(StateFileError, match=r"round\.json is not valid JSON \(Unterminated string.*: delete it"):
        read_state(path, "delete it to redo the step")
    path.write_text("[1, 2]")
    with pytest.raises(StateFileError, match=r"round\.json holds a JSON list, not an object: redo"):
        read_state(path, "redo")
    path.write_text('{"note": 1}')
    with pytest.raises(StateFileError, match=r"round\.json lacks \['generator'\]: redo"):
        read_state(path, "redo", keys=("generator", "note"))
    path.write_bytes(b'{"note": "\xff"}')
    with pytest.raises(StateFileError, match=r"round\.json is not UTF-8 text"):
        read_state(path, "redo")
