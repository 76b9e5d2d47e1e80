"""Passage data: SEAL-format JSON, the built-in demo set, the hub path offline, selection, SEAL's self-edits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from seal_jax.selfedit import data
from seal_jax.selfedit.data import (
    DataError,
    Passage,
    Question,
    load_passages,
    load_seal_selfedits,
    write_passages,
)


@pytest.fixture(scope="module")
def squad(shared_data: Path) -> list[Passage]:
    return load_passages(shared_data / "squad_val.json")


def _write(path: Path, value) -> Path:
    path.write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")
    return path


GOOD = {"title": "T", "context": "Some context.", "questions": [{"question": "Q?", "answer": "A"}]}


# ----------------------------------------------------------------------------------------------------
# SQuAD in SEAL's format


def test_squad_val_counts_and_ids(squad):
    assert len(squad) == 2067
    assert sum(len(p.questions) for p in squad) == 10570
    assert [p.id for p in squad[:3]] == ["squad-val-0", "squad-val-1", "squad-val-2"]
    assert squad[-1].id == "squad-val-2066"
    first = squad[0]
    assert first.title == "Super Bowl 50"
    assert first.text == f"{first.title}\n{first.context}"
    assert isinstance(first.questions, tuple) and isinstance(first.questions[0], Question)
    assert first.questions[0].answer == "Denver Broncos"


def test_passage_is_frozen_and_hashable(squad):
    with pytest.raises(AttributeError):
        squad[0].title = "x"  # type: ignore[misc]
    assert len({squad[0], squad[0]}) == 1


# ----------------------------------------------------------------------------------------------------
# Selection


def test_selection_start_n(shared_data, squad):
    sel = load_passages(shared_data / "squad_val.json", start=10, n=5)
    assert [p.id for p in sel] == [f"squad-val-{i}" for i in range(10, 15)]
    assert sel == squad[10:15]
    # running off the end returns what is left; n=None takes everything from start
    assert len(data.select_passages(squad, start=2060, n=50)) == 7
    assert len(data.select_passages(squad, start=2000)) == 67
    assert data.select_passages(squad, n=0) == []


def test_selection_shuffle_is_seeded_and_keeps_ids(squad):
    a = data.select_passages(squad, shuffle=True, seed=3, n=20)
    b = data.select_passages(squad, shuffle=True, seed=3, n=20)
    c = data.select_passages(squad, shuffle=True, seed=4, n=20)
    assert a == b
    assert [p.id for p in a] != [p.id for p in c]
    assert [p.id for p in a] != [p.id for p in squad[:20]]
    by_id = {p.id: p for p in squad}
    assert all(by_id[p.id] == p for p in a)  # ids travel with their passages
    # start/n slice the shuffled whole list: consecutive windows tile it
    whole = data.select_passages(squad, shuffle=True, seed=3)
    assert sorted(p.id for p in whole) == sorted(p.id for p in squad)
    assert data.select_passages(squad, shuffle=True, seed=3, start=20, n=20) == whole[20:40]
    assert whole[:20] == a


def test_selection_errors(squad):
    with pytest.raises(DataError, match=r"start=2067 is past the end.*2067 passages"):
        data.select_passages(squad, start=2067)
    with pytest.raises(DataError, match="start must be >= 0"):
        data.select_passages(squad, start=-1)
    with pytest.raises(DataError, match="n must be >= 0"):
        data.select_passages(squad, n=-2)
    with pytest.raises(DataError, match="past the end"):
        load_passages("demo", start=100)


# ----------------------------------------------------------------------------------------------------
# The built-in demo set


def test_demo_set():
    demo = load_passages("demo")
    assert len(demo) >= 10
    assert len({p.id for p in demo}) == len(demo)
    assert [p.id for p in demo] == [f"demo-{i}" for i in range(len(demo))]
    assert len({p.title for p in demo}) == len(demo)
    for p in demo:
        assert 3 <= len(p.questions) <= 5, p.title
        assert 100 <= len(p.context.split()) <= 220, p.title
        for q in p.questions:
            assert q.answer in p.context, (p.title, q.answer)
            assert q.answer in p.text
            assert q.question.endswith("?")
            assert len(q.answer.split()) <= 6, (p.title, q.answer)
        assert len({q.question for q in p.questions}) == len(p.questions)


def test_demo_selection():
    sel = load_passages("demo", shuffle=True, seed=1, n=4)
    assert sel == load_passages("demo", shuffle=True, seed=1, n=4)
    assert all(re.fullmatch(r"demo-\d+", p.id) for p in sel)


# ----------------------------------------------------------------------------------------------------
# Round trip


def test_write_load_round_trip(tmp_path, squad):
    picked = data.select_passages(squad, shuffle=True, seed=0, n=7) + load_passages("demo", n=2)
    out = write_passages(picked, tmp_path / "sub" / "picked.json")
    assert load_passages(out) == picked  # ids kept through the "id" field
    raw = json.loads(out.read_text(encoding="utf-8"))
    assert set(raw[0]) == {"id", "title", "context", "questions"}
    plain = write_passages(picked, tmp_path / "my_passages.json", include_ids=False)
    again = load_passages(plain)
    assert [p.id for p in again] == [f"my-passages-{i}" for i in range(len(picked))]
    assert [(p.title, p.context, p.questions) for p in again] == [(p.title, p.context, p.questions)
                                                                  for p in picked]


@pytest.mark.parametrize("name,prefix", [("squad_val.json", "squad-val"), ("SQuAD_val.v2.json", "squad-val"),
                                         ("My  Passages (2).json", "my-passages-2"), ("__.json", "passages")])
def test_id_prefix_from_the_file_name(tmp_path, name, prefix):
    """The module docstring's rule: the name up to the first dot, lowercased, non-alphanumeric runs -> '-'."""
    path = _write(tmp_path / name, [GOOD, GOOD])
    assert [p.id for p in load_passages(path)] == [f"{prefix}-0", f"{prefix}-1"]


# ----------------------------------------------------------------------------------------------------
# Malformed files


def _bad_question(**fields):
    return [GOOD, {**GOOD, "questions": [{"question": "Q?", "answer": "A"}, fields]}]


MALFORMED = [
    ("not_json", '[{"title": "T",', r"not valid JSON \(.* line 1"),
    ("top_dict", {"data": [GOOD]}, r"top level is a JSON dict, expected a list"),
    ("not_object", [GOOD, "passage"], r"record 1: expected an object"),
    ("no_title", [GOOD, {"context": "c", "questions": GOOD["questions"]}], r"record 1: missing 'title'"),
    ("empty_context", [{**GOOD, "context": "  "}], r"record 0 \(title 'T'\): 'context' must be a non-empty"),
    ("no_context", [GOOD, GOOD, {"title": "X", "questions": []}], r"record 2 \(title 'X'\): missing 'context'"),
    ("questions_dict", [{**GOOD, "questions": {"question": "Q?"}}], r"record 0 .*'questions' must be a list"),
    ("questions_missing", [{"title": "T", "context": "c"}], r"record 0 .*missing 'questions'"),
    ("questions_empty", [{**GOOD, "questions": []}], r"record 0 .*'questions' is empty"),
    ("question_str", [{**GOOD, "questions": ["Q?"]}], r"record 0 .*questions\[0\] must be an object"),
    ("empty_question", _bad_question(question="", answer="A"), r"record 1 .*questions\[1\]\.question is empty"),
    ("empty_answer", _bad_question(question="Q?", answer=" "), r"record 1 .*questions\[1\]\.answer is empty"),
    ("missing_answer", _bad_question(question="Q?"), r"record 1 .*questions\[1\] is missing 'answer'"),
    ("answer_number", _bad_question(question="Q?", answer=1964), r"record 1 .*questions\[1\]\.answer"),
    ("dup_id", [{**GOOD, "id": "x"}, {**GOOD, "id": "x"}], r"record 1 .*id 'x' is already used by record 0"),
]


@pytest.mark.parametrize("name,content,pattern", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_names_file_and_record(tmp_path, name, content, pattern):
    path = _write(tmp_path / f"{name}.json", content)
    with pytest.raises(DataError, match=pattern) as info:
        load_passages(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"no such file.*'demo'.*hub:"):
        load_passages(tmp_path / "nope.json")


# ----------------------------------------------------------------------------------------------------
# The hub path


def test_hub_offline_says_pass_a_local_file(tmp_path, monkeypatch):
    import datasets

    # an empty cache, so a copy downloaded earlier cannot make the offline load succeed
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    with pytest.raises(DataError, match=r"hub:rajpurkar/squad:validation.*pass a local JSON file.*"
                                        r"\.\./shared/data/squad_val\.json"):
        load_passages("hub:rajpurkar/squad:validation")


def test_hub_rows_are_regrouped(monkeypatch):
    import datasets

    rows = [
        {"title": "A", "context": "ctx a", "question": "q1", "answers": {"text": ["x", "y"], "answer_start": [0, 1]}},
        {"title": "B", "context": "ctx b", "question": "q2", "answers": {"text": ["z"], "answer_start": [0]}},
        {"title": "A", "context": "ctx a", "question": "q3", "answers": {"text": ["w"], "answer_start": [0]}},
        {"title": "A", "context": "ctx a2", "question": "q4", "answers": {"text": ["v"], "answer_start": [0]}},
        {"title": "C", "context": "ctx c", "question": "q5", "answers": {"text": [], "answer_start": []}},
    ]
    calls = []

    def fake_load(name, split=None, **kwargs):
        calls.append((name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = load_passages("hub:rajpurkar/squad")
    assert calls == [("rajpurkar/squad", "validation")]
    assert [(p.id, p.title, p.context) for p in got] == [
        ("squad-val-0", "A", "ctx a"), ("squad-val-1", "B", "ctx b"), ("squad-val-2", "A", "ctx a2")]
    assert got[0].questions == (Question("q1", "x"), Question("q3", "w"))
    assert load_passages("hub:rajpurkar/squad:train", n=1)[0].id == "squad-train-0"


# ----------------------------------------------------------------------------------------------------
# SEAL's released self-edits


def test_seal_selfedits_map_onto_squad(shared_data, squad):
    edits = load_seal_selfedits(shared_data / "seal_base_selfedits_val.json")
    assert len(edits) == 200
    by_id = {p.id: p for p in squad}
    assert set(edits) <= set(by_id)
    assert next(iter(edits)) == "squad-val-1168"  # SEAL's order, not squad_val.json's
    for pid, completions in edits.items():
        assert completions and all(c.strip() for c in completions), pid
    assert sum(len(c) for c in edits.values()) == 1000  # five implications per passage
    assert load_seal_selfedits(shared_data / "seal_base_selfedits_val.json", squad) == edits


def test_seal_selfedits_errors(tmp_path, squad):
    p = squad[5]
    ok = {"title": p.title, "context": p.context, "completions": ["1. x"], "prompt": "..."}
    assert load_seal_selfedits(_write(tmp_path / "ok.json", [ok]), squad) == {p.id: ["1. x"]}
    cases = {
        "unmatched": ([ok, {**ok, "context": p.context + " extra"}], r"record 1 .*matches no passage"),
        "dup": ([ok, ok], r"record 1 .*already matched"),
        "no_completion": ([{**ok, "completions": ["  "]}], r"record 0 .*no non-empty completion"),
        "completions_str": ([{**ok, "completions": "1. x"}], r"record 0 .*must be a list of strings"),
        "top": ({"x": ok}, r"top level is a JSON dict"),
    }
    for name, (content, pattern) in cases.items():
        path = _write(tmp_path / f"{name}.json", content)
        with pytest.raises(DataError, match=pattern) as info:
            load_seal_selfedits(path, squad)
        assert str(path) in str(info.value)
