"""Grader calibration: the calibration file, its fixed split, the agreement report, `seal-jax calibrate`."""

from __future__ import annotations

import json
import random

import pytest

from seal_jax.selfedit.calibration import (
    CalibrationError,
    calibration_report,
    load_calibration,
    split_calibration,
)
from seal_jax.selfedit.grading import contains_gold, grade
from seal_jax.selfedit.judge import JudgeGrader

# ----------------------------------------------------------------------------------------------------
# Calibration file, split and report


@pytest.fixture(scope="module")
def calibration(shared_data):
    return load_calibration(shared_data / "grader_calibration.jsonl")


def test_load_calibration(calibration):
    assert len(calibration) == 3114
    assert all(isinstance(r["verdict"], bool) for r in calibration)
    assert {"title", "question", "gold", "prediction", "verdict", "source"} <= set(calibration[0])


def test_load_calibration_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_calibration(missing)
    good = {"question": "q", "gold": "g", "prediction": "p", "verdict": True}
    bad_lines = {
        "not valid JSON": "{oops",
        "expected a JSON object": "[1, 2]",
        "missing field.*verdict": json.dumps({k: v for k, v in good.items() if k != "verdict"}),
        "field 'gold' must be a string": json.dumps({**good, "gold": 3}),
        "field 'verdict' must be true/false": json.dumps({**good, "verdict": "maybe"}),
    }
    for message, line in bad_lines.items():
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps(good) + "\n\n" + line + "\n")
        with pytest.raises(CalibrationError, match=rf"bad\.jsonl, line 3: {message}"):
            load_calibration(f)
    f = tmp_path / "ok.jsonl"
    f.write_text(json.dumps({**good, "verdict": "no"}) + "\n")
    assert load_calibration(f)[0]["verdict"] is False


def test_split_is_deterministic_disjoint_and_complete(calibration):
    tune, held = split_calibration(calibration, seed=0)
    tune2, held2 = split_calibration(calibration, seed=0)
    assert tune == tune2 and held == held2
    assert (len(tune), len(held)) == (1556, 1558)
    ids_t, ids_h = {id(r) for r in tune}, {id(r) for r in held}
    assert not ids_t & ids_h
    assert ids_t | ids_h == {id(r) for r in calibration}
    # whole questions go to one side
    qt = {(r["title"], r["question"]) for r in tune}
    qh = {(r["title"], r["question"]) for r in held}
    assert not qt & qh
    # the split depends on content, not on file order
    shuffled = list(calibration)
    random.Random(1).shuffle(shuffled)
    _, held_shuffled = split_calibration(shuffled, seed=0)
    assert {id(r) for r in held_shuffled} == ids_h
    # another seed gives another split of about the same size
    _, held_other = split_calibration(calibration, seed=1)
    assert {id(r) for r in held_other} != ids_h
    assert abs(len(held_other) - len(calibration) / 2) < 10
    with pytest.raises(ValueError):
        split_calibration(calibration, held_out_fraction=1.5)
    assert split_calibration([], seed=0) == ([], [])


def test_cohen_kappa_by_hand():
    rows = [{"question": "q", "gold": "yes", "prediction": p, "verdict": v} for p, v in
            [("yes", True), ("yes", True), ("yes", False), ("no", True), ("no", False), ("no", False)]]
    rep = calibration_report(rows, grader=contains_gold)
    # po = 4/6, both raters say yes half of the time: pe = 1/2, kappa = (2/3 - 1/2) / (1/2) = 1/3
    assert rep["agreement"] == pytest.approx(4 / 6)
    assert rep["precision"] == pytest.approx(2 / 3) and rep["recall"] == pytest.approx(2 / 3)
    assert rep["cohen_kappa"] == pytest.approx(1 / 3)
    assert (rep["tp"], rep["fp"], rep["fn"], rep["tn"]) == (2, 1, 1, 2)
    perfect = calibration_report(rows[:1], grader=contains_gold)
    assert perfect["cohen_kappa"] == 1.0


# ----------------------------------------------------------------------------------------------------
# `seal-jax calibrate`


def test_calibration_report_from_ready_verdicts(calibration):
    rows = calibration[:40]
    mine = [grade(r["question"], r["gold"], r["prediction"]) for r in rows]
    assert calibration_report(rows, verdicts=mine) == calibration_report(rows)
    flipped = calibration_report(rows, verdicts=[not v for v in mine])
    assert flipped["agreement"] == pytest.approx(1 - calibration_report(rows)["agreement"])
    with pytest.raises(ValueError, match="got 2 verdicts for 40 rows"):
        calibration_report(rows, verdicts=[True, False])


def test_calibrate_command(shared_data, calibration, tmp_path, capsys):
    from seal_jax.cli import main as cli_main

    out = tmp_path / "report.json"
    assert cli_main(["calibrate", str(shared_data / "grader_calibration.jsonl"), "--split", "tune", "--limit", "60",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    tune, _ = split_calibration(calibration, seed=0)
    want = calibration_report(tune[:60])
    assert report["n"] == 60 and report["split"] == "tune" and report["grader"] == "offline"
    assert report["agreement"] == pytest.approx(want["agreement"]) and report["baseline"] == want["baseline"]
    assert f"| offline | {want['agreement']:.3f} |" in capsys.readouterr().out
    assert cli_main(["calibrate", str(tmp_path / "missing.jsonl")]) == 1
    assert "calibration file not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--split", "all", "--seed", "3"], "--seed 3 chooses the tune/held-out split, but --split all grades every row"),
    (["--out", "."], "--out . is a folder; give a file name"),
])
def test_calibrate_bad_arguments_exit_2(argv, message, tmp_path, capsys):
    """Bad arguments are refused before anything is read (exit 2, as `smoke` does); a seed that would not
    change anything (--split all) is refused rather than silently ignored."""
    from seal_jax.cli import main as cli_main

    assert cli_main(["calibrate", str(tmp_path / "not-read.jsonl"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "not found" not in err


def test_undefined_ratios_are_none_and_json_null(tmp_path, capsys):
    """A grader that never says yes has no precision: None in the report, `–` in the table, null in the JSON
    file (NaN is not JSON: strict parsers refuse it)."""
    from seal_jax.cli import main as cli_main

    rows = [{"question": "Where?", "gold": "Paris", "prediction": p, "verdict": v}
            for p, v in [("It was Paris, I think.", True), ("Lyon.", False), ("Paris is the one.", True)]]
    report = calibration_report(rows, grader=lambda q, g, p: False)
    assert report["precision"] is None and report["recall"] == 0.0 and report["agreement"] == pytest.approx(1 / 3)
    empty = calibration_report([])
    assert empty["n"] == 0 and {empty[k] for k in ("agreement", "precision", "recall", "cohen_kappa")} == {None}
    path = tmp_path / "cal.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    assert cli_main(["calibrate", str(path), "--split", "all", "--grader", "exact_match", "--out", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    saved = json.loads(out.read_text(), parse_constant=refuse)  # strict: NaN/Infinity would raise
    assert saved["precision"] is None and saved["recall"] == 0.0 and saved["seed"] is None
    printed = capsys.readouterr().out
    assert f"exact_match on all of {path} (3 rows):" in printed  # no seed: --split all does not use one
    assert "| exact_match | 0.333 | – | 0.000 | 0.000 |" in printed and "nan" not in printed


def test_calibrate_command_with_a_judge_model(tiny_chat_dir, tmp_path, capsys):
    """rules+judge through the CLI: the rules decide two rows, the (random tiny) model the other two."""
    from seal_jax.cli import main as cli_main

    rows = [{"question": "Where?", "gold": "Paris", "prediction": "It was Paris.", "verdict": True},
            {"question": "Where?", "gold": "Paris", "prediction": "I don't know.", "verdict": False},
            {"question": "How?", "gold": "more equally", "prediction": "Relatively evenly.", "verdict": True},
            {"question": "Who?", "gold": "the Lama", "prediction": "A monk.", "verdict": False}]
    path = tmp_path / "cal.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "judge.json"
    args = ["calibrate", str(path), "--split", "all", "--grader", "rules+judge", "--batch-size", "2", "--out", str(out)]
    assert cli_main([*args, "--model", str(tiny_chat_dir)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 4 and report["graded_by"] == {"model": 2, "rules": 2}
    assert report["model"] == str(tiny_chat_dir)
    import seal_jax as sj  # the same model asked directly about the two undecided rows

    records = JudgeGrader(sj.load(tiny_chat_dir, progress=False), batch_size=2).judge(
        [(r["question"], r["gold"], r["prediction"]) for r in rows[2:]])
    assert report["malformed_replies"] == sum(not r.parsed for r in records)
    assert cli_main([*args, "--model", str(tmp_path / "nowhere")]) == 1
    assert "no judge model at" in capsys.readouterr().err
