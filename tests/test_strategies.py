"""Self-edit strategies: prompts and SEAL's completion → training-sequence rules."""

from __future__ import annotations

import pytest

from seal_jax.selfedit.data import Passage, Question
from seal_jax.selfedit.strategies import (
    STRATEGIES,
    StrategyError,
    completions_for,
    get_strategy,
    question_prompt,
    self_edit_prompt,
    split_completion,
    training_sequences,
)

P = Passage("p-1", "Quarnholt", "Quarnholt is a town on the Ilsary river. It was founded in 1204.",
            (Question("When was Quarnholt founded?", "1204"),))


def test_numbered_list_drops_its_header():
    text = "Here are some implications of the passage:\n1. Quarnholt is old.\n2. It lies on a river.\n\n3. It has a bridge."
    assert split_completion(text) == ["1. Quarnholt is old.", "2. It lies on a river.", "3. It has a bridge."]


def test_header_kept_when_no_numbered_list_follows():
    assert split_completion("Implications\nThe town is old.\nIt is on a river.") == [
        "Implications", "The town is old.", "It is on a river."]


def test_dashes_separate_rewrites():
    text = "Quarnholt, founded 1204, sits on the Ilsary.\n---\nThe town of Quarnholt dates from 1204.\n---\n\n"
    assert split_completion(text) == ["Quarnholt, founded 1204, sits on the Ilsary.",
                                      "The town of Quarnholt dates from 1204."]
    assert split_completion("A---B") == ["A", "B"]


def test_self_qa_lines():
    text = "Question: When was it founded? Answer: 1204\nQuestion: Which river? Answer: the Ilsary\n"
    assert split_completion(text) == ["Question: When was it founded? Answer: 1204",
                                      "Question: Which river? Answer: the Ilsary"]
    assert training_sequences(P, text) == ["Quarnholt\nQuestion: When was it founded? Answer: 1204",
                                           "Quarnholt\nQuestion: Which river? Answer: the Ilsary", P.text]


def test_training_sequences_prefix_title_and_append_passage():
    seqs = training_sequences(P, "1. It is old.\n2. It is small.")
    assert seqs == ["Quarnholt\n1. It is old.", "Quarnholt\n2. It is small.", P.text]
    assert training_sequences(P, "1. a", include_passage=False) == ["Quarnholt\n1. a"]
    assert training_sequences(P, None) == [P.text]
    assert training_sequences(P, "   \n---\n", include_passage=False) == []


def test_prompts():
    s = get_strategy("implications")
    chat = self_edit_prompt(s, P, chat=True)
    raw = self_edit_prompt(s, P, chat=False)
    assert chat.startswith(P.text) and "implications" in chat
    assert raw.startswith(chat) and raw.endswith("Implications:\n")
    q = question_prompt("Quarnholt", "When was Quarnholt founded?")
    assert "Topic: Quarnholt" in q and "directly and concisely" in q and P.context not in q
    with pytest.raises(StrategyError, match="does not generate"):
        self_edit_prompt(get_strategy("passage"), P, chat=True)


def test_strategy_registry_and_sources():
    assert {"base", "passage", "implications", "implications_long", "implications_very_long", "rewrite",
            "self_qa", "replay", "template"} == set(STRATEGIES)
    with pytest.raises(StrategyError, match="unknown strategy 'summary'.*implications"):
        get_strategy("summary")
    assert completions_for(get_strategy("passage"), P, None, None, 2) == [None, None]
    assert completions_for(get_strategy("replay"), P, None, {"p-1": ["x", "y"]}, 3) == ["x", "y", "x"]
    with pytest.raises(StrategyError, match="no replayed self-edits for passage p-1"):
        completions_for(get_strategy("replay"), P, None, {}, 1)
    assert completions_for(get_strategy("rewrite"), P, ["a", "b"], None, 2) == ["a", "b"]


def test_fill_pieces_json_and_the_lines_fallback():
    from seal_jax.selfedit.strategies import fill_pieces, pieces_to_sequences
    from seal_jax.selfedit.templates import TemplateError

    good = 'Sure! {"training_sequences": ["One fact.", "  Another fact. ", ""]}'
    assert fill_pieces(good) == (["One fact.", "Another fact."], False)
    assert fill_pieces(good, "lines") == (["One fact.", "Another fact."], False)  # JSON wins when valid
    raw = "Here are the facts:\n1. Velmora has a harbour.\n---\n2. Ferries leave at dawn.\n"
    with pytest.raises(TemplateError, match="training_sequences"):
        fill_pieces(raw)
    assert fill_pieces(raw, "lines") == (["1. Velmora has a harbour.", "2. Ferries leave at dawn."], True)
    with pytest.raises(TemplateError, match="no usable line"):
        fill_pieces(" \n---\n ", "lines")
    copied = '{"training_sequences": ["first training text", "second training text"]}'
    with pytest.raises(TemplateError, match="copies the example answer"):
        fill_pieces(copied)
    with pytest.raises(TemplateError, match="copies the example answer.*no usable line"):
        fill_pieces(copied + "\n", "lines")
    assert fill_pieces('{"training_sequences": ["first training text", "Velmora exports salt."]}') == (
        ["Velmora exports salt."], False)
    with pytest.raises(StrategyError, match=r"unknown fill_fallback 'words'; choose from \('none', 'lines'\)"):
        fill_pieces(good, "words")
    passage = P
    assert pieces_to_sequences(passage, ["A."], include_passage=True) == [f"{passage.title}\nA.", passage.text]
    assert pieces_to_sequences(passage, ["A."], include_passage=False) == [f"{passage.title}\nA."]
