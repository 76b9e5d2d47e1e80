"""One passage's episode: graders from the run's setting, base scoring, K candidates trained and scored."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_config

import seal_jax as sj
from seal_jax.selfedit.data import load_passages
from seal_jax.selfedit.engine import LanguageModel
from seal_jax.selfedit.episode import (
    NO_SEQUENCES,
    Episode,
    Job,
    make_grader,
    score_base,
    train_and_score,
    train_and_score_many,
)
from seal_jax.selfedit.results import Measure
from seal_jax.selfedit.strategies import question_prompt


def test_judge_graders_are_built_from_the_run_model(tiny_chat_dir):
    """``judge`` asks the run's model about every answer, ``rules+judge`` only about undecided ones."""

    class Recorder:
        def __init__(self):
            self.prompts = []

        def generate(self, prompts, params, chat=None):
            self.prompts.extend(prompts)
            self.chat = chat
            return ["yes"] * len(prompts)

    items = [("Where?", "Paris", "It was Paris."), ("Where?", "Paris", "I don't know."),
             ("How are incomes distributed?", "more equally", "Relatively evenly.")]
    for grader, sources in [("judge", ["model"] * 3), ("rules+judge", ["rules", "rules", "model"])]:
        lm = Recorder()
        graded = make_grader(tiny_config(tiny_chat_dir, grader=grader), lm)(items)
        assert [g["graded_by"] for g in graded] == sources
        assert [g["correct"] for g in graded] == [s == "model" or i == 0 for i, s in enumerate(sources)]
        assert [g["judge_reply"] for g in graded] == [None if s == "rules" else "yes" for s in sources]
        assert len(lm.prompts) == sources.count("model")
    for chat in (True, False):  # the judge formats its prompts as the run does (base models: raw text)
        lm = Recorder()
        make_grader(tiny_config(tiny_chat_dir, grader="judge", chat=chat), lm)(items)
        assert lm.chat is chat
    graded = make_grader(tiny_config(tiny_chat_dir, grader="contains"), Recorder())(items)
    assert graded == [{"correct": True}, {"correct": False}, {"correct": False}]


class ScriptedLM:
    """A stand-in model: answers are scripted per call, training records what it was given."""

    tokenizer = None

    def __init__(self, answers):
        self.answers, self.trained, self.scored = list(answers), [], []

    def generate(self, prompts, params=None, adapters=None, chat=False, enable_thinking=False):
        assert params.temperature == 0.0 and params.max_new_tokens == 8  # greedy, eval_max_new_tokens
        return self.answers.pop(0)

    def train_adapters(self, sequences, lora=None, train=None, seed=0):
        self.trained.append((sequences, lora, train, seed))
        return SimpleNamespace(losses=[[2.0, 1.5, 0.5], []], failed=[None, "loss is not finite"])

    def ready_adapters(self, adapters):
        return SimpleNamespace(losses=adapters.losses, failed=adapters.failed, readied=adapters)

    def completion_logprobs(self, prompts, completions, adapters=None, chat=False, enable_thinking=False):
        self.scored.append((prompts, completions, adapters, chat))
        tokens = np.array([len(c.split()) for c in completions])
        sums = -1.0 * tokens  # one nat per word, before
        return (sums if adapters is None else np.stack([sums * 0.5, sums * 2.0])), tokens

    def merge_adapter(self, adapters, k=0):
        return self

    def export(self, out_dir, *, dtype=None, progress=False):
        return out_dir


def test_train_and_score_trains_every_usable_job_in_one_call_and_keeps_row_order(tiny_chat_dir):
    passage = load_passages("demo", n=1)[0]
    config = tiny_config(tiny_chat_dir, grader="contains")
    golds = [q.answer for q in passage.questions]
    lm = ScriptedLM([[f"It is {g}." for g in golds],  # base: every answer right
                     [[f"It is {g}." for g in golds], ["no idea"] * len(golds)]])  # candidate 0 right, 1 wrong
    assert isinstance(lm, LanguageModel)
    grader = make_grader(config, lm)
    base = score_base(lm, passage, config, grader)
    assert base.accuracy == 1.0 and all(a["correct"] for a in base.answers)
    assert base.measure == Measure(1.0, -1.0)  # the gold answers, one nat per word
    prompts, completions, adapters, chat = lm.scored[0]
    assert completions == [q.answer for q in passage.questions] and chat is config.chat and adapters is None
    assert prompts == [question_prompt(passage.title, q.question) for q in passage.questions]
    lora, train = config.lora_spec(), config.train_spec(seed=7)
    jobs = [Job("implications", 0, "edit a", ["seq 1", "seq 2"], lora, train, {"repeat": 0}),
            Job("implications", 1, "edit b", [], lora, train, {"repeat": 0}),
            Job("rewrite", 0, "edit c", ["seq 3"], lora, train, {"repeat": 1})]
    rows = train_and_score(lm, passage, jobs, config=config, grader=grader, before=Measure(0.25, -1.5))
    assert len(lm.trained) == 1  # one call for every usable job, in job order, with the run's seed
    assert lm.trained[0] == ([["seq 1", "seq 2"], ["seq 3"]], [lora, lora], [train, train], config.seed)
    assert [(r["condition"], r["candidate"], r["repeat"]) for r in rows] == [
        ("implications", 1, 0), ("implications", 0, 0), ("rewrite", 0, 1)]  # failures first
    assert rows[0]["failure"] == NO_SEQUENCES and rows[0]["accuracy_after"] == 0.25 and rows[0]["answers"] == []
    assert rows[1]["accuracy_after"] == 1.0 and rows[1]["n_sequences"] == 2 and rows[1]["train_loss"] == [2.0, 0.5]
    assert rows[2]["accuracy_after"] == 0.0 and rows[2]["failure"] == "loss is not finite"
    assert rows[2]["train_loss"] is None and rows[2]["reward"] == 0.0
    assert rows[1]["normalized_gain"] == 1.0 and rows[2]["normalized_gain"] == pytest.approx(-1 / 3)
    assert [(r["gold_loglik_before"], r["gold_loglik_after"]) for r in rows] == [(-1.5, -1.5), (-1.5, -0.5), (-1.5, -2.0)]
    # one teacher-forced pass under all K adapters, readied for inference
    assert len(lm.scored) == 2 and lm.scored[1][2].readied is not None
    assert train_and_score(lm, passage, jobs[1:2], config=config, grader=grader, before=Measure(0.5))[0]["failure"]
    assert len(lm.trained) == 1  # nothing usable: no training call


class TaggedAdapters:
    """Stand-in adapters that know which trained candidates they are (``ids``)."""

    def __init__(self, ids):
        self.ids = list(ids)
        self.losses = [[float(i), float(i) / 2] for i in self.ids]
        self.failed = [None] * len(self.ids)
        self.readied = False

    def __len__(self):
        return len(self.ids)

    def take(self, indices):
        taken = TaggedAdapters([self.ids[i] for i in indices])
        taken.readied = self.readied
        return taken


class GroupLM:
    """Trains tagged adapters; an adapter with an even tag answers every question right, an odd one wrong."""

    tokenizer = None

    def __init__(self, golds):
        self.golds, self.trained = golds, []

    def train_adapters(self, sequences, lora=None, train=None, seed=0):
        self.trained.append([s[0] for s in sequences])
        return TaggedAdapters(range(len(sequences)))

    def ready_adapters(self, adapters):
        adapters.readied = True
        return adapters

    def generate(self, prompts, params=None, adapters=None, chat=False, enable_thinking=False):
        assert adapters.readied  # the loop answers with readied adapters
        return [[f"It is {self.golds[p]}." if i % 2 == 0 else "no idea" for p in prompts] for i in adapters.ids]

    def completion_logprobs(self, prompts, completions, adapters=None, chat=False, enable_thinking=False):
        tokens = np.ones(len(completions))
        return np.stack([-(i + 1.0) * tokens for i in adapters.ids]), tokens


def test_passages_trained_together_keep_their_own_adapters_and_rows():
    """``train_and_score_many``: one training call for every usable job of every passage, in order; each
    passage's rows come from its own adapters, also when a passage between them has nothing to train."""
    passages = load_passages("demo", n=3)
    golds = {question_prompt(p.title, q.question): q.answer for p in passages for q in p.questions}
    lm = GroupLM(golds)
    config = tiny_config("m", grader="contains")
    lora, train = config.lora_spec(), config.train_spec()

    def job(c, text):
        return Job("implications", c, text, [text] if text else [], lora, train, {"repeat": 0})

    episodes = [Episode(passages[0], (job(0, "a0"), job(1, "a1")), Measure(0.5, -1.0)),
                Episode(passages[1], (job(0, None),), Measure(0.25, -1.0)),
                Episode(passages[2], (job(0, None), job(1, "c1"), job(2, "c2")), Measure(0.0, -1.0))]
    rows = train_and_score_many(lm, episodes, config=config, grader=make_grader(config, lm))
    assert lm.trained == [["a0", "a1", "c1", "c2"]]  # one call, every usable job in episode order
    assert [[(r["candidate"], r["failure"]) for r in own] for own in rows] == [
        [(0, None), (1, None)], [(0, NO_SEQUENCES)], [(0, NO_SEQUENCES), (1, None), (2, None)]]
    tags = [[r["train_loss"][0] if r.get("train_loss") else None for r in own] for own in rows]
    assert tags == [[0.0, 1.0], [None], [None, 2.0, 3.0]]  # trained candidates 0, 1 | none | 2, 3
    assert [r["accuracy_after"] for r in rows[0] + rows[2]] == [1.0, 0.0, 0.0, 1.0, 0.0]  # even tags answer
    assert rows[2][2]["gold_loglik_after"] == -4.0 and rows[1][0]["accuracy_after"] == 0.25
    assert all(a["question"] in {q.question for q in passages[2].questions} for a in rows[2][1]["answers"])


def test_the_engine_provides_what_the_loop_needs(tiny_chat_dir):
    assert isinstance(sj.load(tiny_chat_dir, progress=False), LanguageModel)


def test_several_passages_score_in_one_call_as_each_alone(tiny_chat_dir):
    """score_base_many / score_adapters_many (CPT's batched evaluation) on the real tiny model: one generate
    and one teacher-forced pass for all passages, and each passage's answers, verdicts and gold
    log-likelihood are those it gets alone."""
    from seal_jax.selfedit.episode import score_adapters, score_adapters_many, score_base_many

    lm = sj.load(tiny_chat_dir, progress=False)
    config = tiny_config(tiny_chat_dir, grader="contains")
    passages = load_passages("demo", n=3)
    grader = make_grader(config, lm)
    calls = []
    original = lm.generate
    lm.generate = lambda prompts, *a, **kw: calls.append(len(prompts)) or original(prompts, *a, **kw)
    many = score_base_many(lm, passages, config, grader)
    assert calls == [sum(len(p.questions) for p in passages)]
    for passage, got in zip(passages, many, strict=True):
        alone = score_base(lm, passage, config, grader)
        assert got.answers == alone.answers and got.accuracy == alone.accuracy
        assert got.measure.gold_loglik == pytest.approx(alone.measure.gold_loglik, rel=1e-6)
    adapters = lm.train_adapters([[passages[0].text], [passages[1].text]], config.lora_spec(), config.train_spec())
    together = score_adapters_many(lm, passages, config, grader, adapters)
    for passage, got in zip(passages, together, strict=True):
        alone = score_adapters(lm, passage, config, grader, adapters)
        assert [a for a, _ in got] == [a for a, _ in alone] and len(got) == 2
        assert [m.gold_loglik for _, m in got] == pytest.approx([m.gold_loglik for _, m in alone], rel=1e-6)
