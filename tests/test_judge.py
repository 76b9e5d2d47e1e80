"""The LLM judge: its prompt, reading its replies, JudgeGrader with a scripted stand-in for the LM facade."""

from __future__ import annotations

import pytest

from seal_jax.selfedit.grading import JUDGE_GRADERS, get_grader, grade, rule_verdict
from seal_jax.selfedit.judge import JudgeGrader, judge_prompt, parse_judge_reply

# ----------------------------------------------------------------------------------------------------
# LLM judge, with a scripted stand-in for the LM facade


class FakeLM:
    """Answers each judge prompt from a script keyed by the answer being checked; records the calls."""

    def __init__(self, script: dict[str, str], default: str = "no"):
        self.script = script
        self.default = default
        self.calls: list[tuple[list[str], object, bool]] = []

    def generate(self, prompts, params, chat=False):
        self.calls.append((list(prompts), params, chat))
        out = []
        for p in prompts:
            answer = p.split("Answer to check: ", 1)[1].split("\n", 1)[0]
            out.append(self.script.get(answer, self.default))
        return out


@pytest.mark.parametrize("reply, verdict", [
    ("yes", True), ("Yes.", True), ("YES, it does", True), ("  no", False), ("No, it contradicts.", False),
    ("Answer: yes", True), ("<think>the reference says no</think>Yes", True),
    ("I think no, not really", False),
    # a negated yes/no gives no verdict (a malformed reply, counted as a no), not the word it negates
    ("Not yes", None), ("not no", None), ("It is NOT  yes.", None), ("It isn't yes", None), ("never yes", None),
    ("not a yes", None), ("I would not say yes", None), ("It is not quite a yes", None), ("I cannot say yes", None),
    ("It does not. No.", False), ("Not really. Yes", True), ("Yes, not no", True), ("Not sure, but yes", True),
    ("It doesn't matter: yes", True),
    ("Nope", None), ("", None), ("The answer is correct.", None), ("yesterday", None), ("know", None),
    ("<think>still thinking about whether yes", None), (None, None), (3, None),
])
def test_parse_judge_reply(reply, verdict):
    assert parse_judge_reply(reply) is verdict


def test_judge_prompt_carries_the_triple():
    p = judge_prompt("Where?", "Paris", "It is  in\nParis.")
    assert "Question: Where?" in p and "Reference answer: Paris" in p
    assert "Answer to check: It is in Paris." in p  # whitespace squeezed, one line
    assert "yes or no" in p


def test_judge_grader_with_fake_lm():
    lm = FakeLM({"It was Paris.": "Yes", "Lyon.": "no.", "Paris or Lyon.": "Hmm, hard to say",
                 "Capital: Paris": "<think>same city</think>\nyes"})
    judge = JudgeGrader(lm, batch_size=2, params_factory=lambda n: {"max_new_tokens": n, "temperature": 0.0})
    items = [("Where?", "Paris", "It was Paris."), ("Where?", "Paris", "Lyon."),
             {"question": "Where?", "gold": "Paris", "prediction": "Paris or Lyon."},
             ("Where?", "Paris", ""), ("Where?", "Paris", "Capital: Paris")]
    assert judge.grade_batch(items) == [True, False, False, False, True]
    # the empty answer was not sent; 4 prompts in batches of 2, greedy params, chat on by default
    assert [len(c[0]) for c in lm.calls] == [2, 2]
    assert all(c[1] == {"max_new_tokens": 8, "temperature": 0.0} and c[2] is True for c in lm.calls)
    assert len(judge.records) == 5
    bad = judge.malformed
    assert len(bad) == 1 and bad[0].reply == "Hmm, hard to say" and bad[0].verdict is False
    assert judge.records[3].reply is None and judge.records[3].verdict is False
    assert judge("Where?", "Paris", "It was Paris.") is True
    assert judge.grade_batch([]) == []


def test_rules_first_judge_asks_only_about_undecided_answers():
    """With rules_first the offline rules' definite verdicts stand and only undecided answers reach the model."""
    undecided = ("How are incomes distributed in Sweden?", "more equally", "Incomes are distributed relatively evenly.")
    contained = ("Where?", "Paris", "It was Paris.")
    refusal = ("Where?", "Paris", "I don't know.")
    assert rule_verdict(*undecided) is None and rule_verdict(*contained) is True and rule_verdict(*refusal) is False
    # the script contradicts the rules on the decided answers: they must not be asked
    lm = FakeLM({"It was Paris.": "no", "I don't know.": "yes", undecided[2]: "yes"})
    judge = JudgeGrader(lm, rules_first=True, params_factory=lambda n: {"max_new_tokens": n})
    assert judge.grade_batch([contained, refusal, undecided, ("Where?", "Paris", " ")]) == [True, False, True, False]
    assert [len(c[0]) for c in lm.calls] == [1] and undecided[2] in lm.calls[0][0][0]
    assert [r.source for r in judge.records] == ["rules", "rules", "model", "empty"]
    assert [r.reply for r in judge.records] == [None, None, "yes", None]
    # text the rules cannot read is undecided, not a no: the model is asked
    assert rule_verdict("Capital?", "東京", "東京") is None and grade("Capital?", "東京", "東京") is False
    assert judge.grade_batch([("Capital?", "東京", "東京")]) == [False]  # FakeLM's default reply is "no"
    assert len(lm.calls) == 2 and judge.records[-1].source == "model"
    # without rules_first the same model is asked about every non-empty answer
    plain = JudgeGrader(FakeLM(lm.script), params_factory=lambda n: {"max_new_tokens": n})
    assert plain.grade_batch([contained, refusal, undecided]) == [False, True, True]
    assert JUDGE_GRADERS == {"judge": False, "rules+judge": True}
    with pytest.raises(ValueError, match="rules\\+judge"):
        get_grader("rules+judge")  # a model is needed: built by the run with JudgeGrader


def test_judge_grader_default_params():
    from seal_jax import SamplingParams

    lm = FakeLM({}, default="no")
    judge = JudgeGrader(lm, max_new_tokens=4, chat=False)
    assert judge.grade_batch([("q", "g", "p")]) == [False]
    params = lm.calls[0][1]
    assert isinstance(params, SamplingParams)
    assert params.max_new_tokens == 4 and params.temperature == 0.0
    assert lm.calls[0][2] is False


def test_judge_grader_errors():
    class WrongCount(FakeLM):
        def generate(self, prompts, params, chat=False):
            return ["yes"]

    judge = JudgeGrader(WrongCount({}), params_factory=lambda n: None)
    with pytest.raises(ValueError, match="1 replies for 2 prompts"):
        judge.grade_batch([("q", "g", "a"), ("q", "g", "b")])
    with pytest.raises(TypeError, match="generate"):
        JudgeGrader(object())
    with pytest.raises(ValueError):
        JudgeGrader(FakeLM({}), max_new_tokens=0)
