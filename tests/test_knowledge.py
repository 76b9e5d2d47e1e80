"""End-to-end knowledge-incorporation runs on a random tiny model: row and summary schema, resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import tiny_config

import seal_jax as sj
from seal_jax.lm.types import remat_name
from seal_jax.selfedit import knowledge
from seal_jax.selfedit.data import DataError
from seal_jax.selfedit.grading import grade
from seal_jax.selfedit.knowledge import condition_jobs, propose_run_template, run_knowledge
from seal_jax.selfedit.results import (
    ROW_FIELDS,
    Measure,
    StateFileError,
    read_rows,
)
from seal_jax.selfedit.run_config import (
    RunConfig,
    RunConfigError,
    select_data,
)
from seal_jax.selfedit.templates import Template

SUMMARY_FIELDS = {"accuracy", "accuracy_std", "n_questions", "n_passages", "mean_gain"}


def no_model(*args, **kwargs):
    raise AssertionError("no model may load here")


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
    base_accuracy = {r["passage_id"]: r["accuracy_after"] for r in rows if r["condition"] == "base"}
    for r in rows:  # every verdict is the configured grader's, and the row's numbers follow from them
        assert all(a["correct"] == grade(a["question"], a["gold"], a["prediction"]) for a in r["answers"])
        assert r["accuracy_after"] == pytest.approx(sum(a["correct"] for a in r["answers"]) / len(r["answers"]))
        assert r["accuracy_before"] == base_accuracy[r["passage_id"]]
    for name, c in summary["conditions"].items():
        answers = [a for r in rows if r["condition"] == name for a in r["answers"]]
        assert c["accuracy"] == pytest.approx(sum(a["correct"] for a in answers) / len(answers))
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "| implications |" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "run_config.json").read_text())["model"] == str(tiny_chat_dir)


def test_killed_run_resumes_to_the_same_rows(tiny_chat_dir, tiny_lm, tmp_path, monkeypatch):
    config = tiny_config(tiny_chat_dir)
    full = tmp_path / "full"
    run_knowledge(config, full, lm=tiny_lm, progress=False)
    part = tmp_path / "part"
    run_knowledge(config, part, lm=tiny_lm, progress=False, stop_after=1)
    assert len(read_rows(part / "results.jsonl")) == 4
    second = [json.dumps(r) for r in read_rows(full / "results.jsonl") if r["passage_id"] != "demo-0"]
    with (part / "results.jsonl").open("a") as f:  # killed in the middle of the second passage's write:
        f.write("\n".join(second[:2]) + "\n" + second[2][:40])  # two whole rows of it, then a torn one
    with pytest.raises(FileExistsError, match="--resume"):
        run_knowledge(config, part, lm=tiny_lm, progress=False)
    run_knowledge(config, part, lm=tiny_lm, progress=False, resume=True)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(read_rows(part / "results.jsonl")) == strip(read_rows(full / "results.jsonl"))
    with pytest.raises(RunConfigError, match=r"config differs in \['k'\] \(saved -> now: k 2 -> 3\)"):
        run_knowledge(tiny_config(tiny_chat_dir, k=3), part, lm=tiny_lm, progress=False, resume=True)
    # resumed once more with no passage left: no model loads and no grader is made; the summary is written again
    monkeypatch.setattr(knowledge, "load_model", no_model)
    monkeypatch.setattr(knowledge, "make_grader", no_model)
    (part / "summary.json").unlink()
    summary = run_knowledge(config, part, progress=False, resume=True)
    assert summary == json.loads((full / "summary.json").read_text()) == json.loads((part / "summary.json").read_text())
    assert strip(read_rows(part / "results.jsonl")) == strip(read_rows(full / "results.jsonl"))


@pytest.mark.parametrize(("data", "error", "match"), [
    ({"source": "demo", "n": 3, "start": 100}, DataError, "start=100 is past the end"),
    ({"source": "no-such-passages.json"}, DataError, "no such file"),
    ({"source": "demo", "ids": ["nope"]}, RunConfigError, "no passage 'nope'"),
])
def test_a_refused_data_selection_writes_no_run_folder(tiny_chat_dir, tmp_path, monkeypatch, data, error, match):
    """The data is checked before the folder is made: a report on it would call it a run to resume."""
    monkeypatch.setattr(knowledge, "load_model", no_model)
    with pytest.raises(error, match=match):
        run_knowledge(tiny_config(tiny_chat_dir, data=data), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_passages_training_together_give_the_rows_they_give_alone(tiny_chat_dir, tiny_lm, tmp_path, monkeypatch):
    """``passages_per_program = 3``: the 3 passages' base answers, self-edits and candidates' training each
    take one call, and every passage's rows are those of the run that does each passage alone (answers,
    sampled self-edits and verdicts equal, losses and log-likelihoods up to float rounding); a run killed
    after its first group resumes with another group size."""
    config = tiny_config(tiny_chat_dir, data={"source": "demo", "n": 3})
    run_knowledge(config, tmp_path / "alone", lm=tiny_lm, progress=False)
    def count(method):  # the batch size of every call of tiny_lm.<method>
        sizes, real = [], getattr(tiny_lm, method)

        def counted(first, *args, **kwargs):
            sizes.append(len(first))
            return real(first, *args, **kwargs)

        monkeypatch.setattr(tiny_lm, method, counted)
        return sizes

    calls, generations = count("train_adapters"), count("generate")
    grouped = dataclasses.replace(config, passages_per_program=3)
    run_knowledge(grouped, tmp_path / "together", lm=tiny_lm, progress=False)
    assert calls == [3 * 3]  # one program: 3 passages x (passage + 2 implications)
    questions = [len(p.questions) for p in select_data(config.data)[0]]
    # the base model's answers to all 3 passages, their 2 self-edits each, then each passage's own answers
    assert generations == [sum(questions), 3 * 2, *questions]

    def same(a, b):  # texts, verdicts and counts equal; numbers up to float rounding (other batch shapes)
        assert len(a) == len(b) == 3 * 4
        for x, y in zip(a, b, strict=True):
            assert x.keys() == y.keys()
            for key in x.keys() - {"seconds"}:
                if isinstance(x[key], float) or key == "train_loss":
                    assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), key
                else:
                    assert x[key] == y[key], key

    alone = read_rows(tmp_path / "alone" / "results.jsonl")
    same(read_rows(tmp_path / "together" / "results.jsonl"), alone)
    calls.clear()
    generations.clear()
    part = tmp_path / "part"
    run_knowledge(dataclasses.replace(config, passages_per_program=2), part, lm=tiny_lm, progress=False,
                  stop_after=2)
    assert calls == [2 * 3] and len(read_rows(part / "results.jsonl")) == 2 * 4
    run_knowledge(grouped, part, lm=tiny_lm, progress=False, resume=True)  # the group size may change
    assert calls == [2 * 3, 3]
    same(read_rows(part / "results.jsonl"), alone)
    with pytest.raises(RunConfigError, match="passages_per_program must be a positive integer"):
        tiny_config(tiny_chat_dir, passages_per_program=0)


def test_a_config_built_in_python_resumes(tiny_chat_dir, tiny_lm, tmp_path):
    """Tuples in a Python-built config compare equal to the lists ``run_config.json`` reads back as."""
    config = RunConfig(name="t", model=str(tiny_chat_dir), conditions=("base",), data={"source": "demo", "n": 1},
                       lora={"rank": 4, "targets": ("q_proj", "v_proj")}, eval_max_new_tokens=4)
    assert config.to_json() == json.loads(json.dumps(config.to_json()))
    run_knowledge(config, tmp_path, lm=tiny_lm, progress=False)
    config2 = dataclasses.replace(config, data={"source": "demo", "n": 2})
    with pytest.raises(RunConfigError, match=r"differs in \['data'\] \(saved -> now: data.n 1 -> 2\)"):
        run_knowledge(config2, tmp_path, lm=tiny_lm, progress=False, resume=True)
    run_knowledge(config, tmp_path, lm=tiny_lm, progress=False, resume=True)  # nothing left to do, no error
    assert len(read_rows(tmp_path / "results.jsonl")) == 1


def test_seal_subset_replays_seal_selfedits_in_seal_order(tiny_chat_dir, tiny_lm, tmp_path, shared_data):
    selfedits = str(shared_data / "seal_base_selfedits_val.json")
    config = tiny_config(tiny_chat_dir, conditions=["base", "replay"],
                         data={"source": "demo", "subset": "selfedits", "selfedits": selfedits})
    with pytest.raises(RunConfigError, match=r"data.source \('demo'\) must hold the passages of data.selfedits"):
        run_knowledge(config, tmp_path, lm=object(), progress=False)
    seal = {"source": str(shared_data / "squad_val.json"), "subset": "selfedits", "selfedits": selfedits, "n": 1}
    config = tiny_config(tiny_chat_dir, conditions=["base", "replay"], k=2, data=seal)
    run_knowledge(config, tmp_path / "seal", lm=tiny_lm, progress=False)
    rows = read_rows(tmp_path / "seal" / "results.jsonl")
    first = json.loads((shared_data / "seal_base_selfedits_val.json").read_text())[0]  # SEAL's order
    assert {r["title"] for r in rows} == {first["title"]} and rows[0]["passage_id"] == "squad-val-1168"
    assert [r["self_edit"] for r in rows if r["condition"] == "replay"] == first["completions"][:2]
    assert len(rows[0]["answers"]) == len(first["questions"])
    with pytest.raises(RunConfigError, match=r"data.ids names passages more than once: \['demo-1'\]"):
        select_data({"source": "demo", "ids": ["demo-1", "demo-0", "demo-1"]})
    assert [p.id for p in select_data({"source": "demo", "ids": ["demo-3", "demo-0"]})[0]] == ["demo-3", "demo-0"]
    with pytest.raises(RunConfigError, match=r"'demo' has no passage 'demo-99'"):
        select_data({"source": "demo", "ids": ["demo-99"]})
    with pytest.raises(RunConfigError, match="need data.selfedits"):
        run_knowledge(tiny_config(tiny_chat_dir, conditions=["base", "replay"]), tmp_path / "b", lm=object(),
                      progress=False)


def test_remat_reaches_the_loaded_model(monkeypatch, tmp_path):
    """``remat`` and ``train_mesh`` in a run config reach the loaded model (``true`` kept as given, meaning
    "full"); the default is "minimal", which the 8B configs keep too (chosen by ``seal-jax compile`` on
    h100-8, BENCHMARKS.md); a train mesh without a mesh is an error."""
    from pathlib import Path

    from seal_jax.selfedit.runs import load_config

    seen = {}

    class Loaded(Exception):
        pass

    def fake_load(path, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr("seal_jax.selfedit.knowledge.load_model", fake_load)
    config = RunConfig.from_dict({"name": "r", "model": "m", "remat": True, "data": {"source": "demo", "n": 1},
                                  "mesh": "data=2,tensor=4", "train_mesh": "data=8"})
    with pytest.raises(Loaded):
        run_knowledge(config, tmp_path / "out", progress=False)
    assert seen["remat"] is True and seen["mesh"] == "data=2,tensor=4" and seen["train_mesh"] == "data=8"
    with pytest.raises(RunConfigError, match="set mesh too"):
        RunConfig.from_dict({"name": "r", "model": "m", "train_mesh": "data=8"})
    assert RunConfig.from_dict({"name": "r", "model": "m"}).remat == "minimal"
    experiments = Path(__file__).parents[1] / "experiments"
    for path in sorted(experiments.glob("*qwen3-8b.toml")):
        config = load_config(path)
        assert remat_name(getattr(config, "knowledge", config).remat) == "minimal", path.name


class CannedTemplateLM:
    """The real tiny LM, except that the meta-prompt gets a fixed template and its fills a fixed JSON list."""

    TEMPLATE = {"data_creation_instruction": "State each fact of the passage as its own short sentence.",
                "lora_rank": 8, "lora_alpha": 4, "lora_dropout": 0.1, "learning_rate": 0.003, "num_epochs": 5,
                "gradient_accumulation_steps": 2}

    def __init__(self, lm, valid: bool = True):
        self.lm, self.valid, self.calls, self.meta = lm, valid, [], 0

    def generate(self, prompts, params, adapters=None, chat=False, **kwargs):
        if adapters is None and prompts[0].startswith("You are designing a learning plan"):
            self.meta += 1
            return [json.dumps(self.TEMPLATE) if self.valid else "no plan"] * len(prompts)
        if adapters is None and prompts[0].startswith("Passage:\n"):
            return ['{"training_sequences": ["A first fact.", "A second fact."]}'] * len(prompts)
        return self.lm.generate(prompts, params, adapters=adapters, chat=chat, **kwargs)

    def train_adapters(self, sequences, lora=None, train=None, seed=0):
        self.calls.append((list(lora), list(train), [list(s) for s in sequences]))
        return self.lm.train_adapters(sequences, lora, train, seed=seed)

    def __getattr__(self, name):
        return getattr(self.lm, name)


def test_template_condition_trains_next_to_the_human_strategies(tiny_chat_dir, tiny_lm, tmp_path, capsys):
    config = tiny_config(tiny_chat_dir, conditions=["base", "passage", "template"],
                         template_condition={"max_epochs": 3, "max_retries": 0})
    lm = CannedTemplateLM(tiny_lm)
    summary = run_knowledge(config, tmp_path / "run", lm=lm, progress=False)
    saved = json.loads((tmp_path / "run" / "template.json").read_text())
    # template.json holds the template in the nested form (its hyperparameters were at the top level before)
    assert saved["template"]["hyperparameters"]["lora_rank"] == 8 and saved["failure"] is None and lm.meta == 1
    assert "Plans tried so far" in saved["meta_prompt"]  # the seeded archive is shown by default
    rows = read_rows(tmp_path / "run" / "results.jsonl")
    template_rows = [r for r in rows if r["condition"] == "template"]
    assert len(template_rows) == 2 * 2 and all(r["template"] == saved["template"] for r in template_rows)
    assert all(r["n_sequences"] == 3 and not r["fill_fallback"] for r in template_rows)  # 2 texts + the passage
    # one call per passage: the passage candidate with the run's specs, the 2 fills with the template's
    lora, train, sequences = lm.calls[0]
    assert [s.rank for s in lora] == [4, 8, 8] and [s.alpha for s in lora] == [8.0, 4.0, 4.0]
    assert [t.learning_rate for t in train] == [1e-2, 0.003, 0.003]
    assert [t.epochs for t in train] == [2, 3, 3] and [t.grad_accum for t in train] == [1, 2, 2]
    assert sequences[1][0].endswith("\nA first fact.")
    assert summary["conditions"]["template"]["n_passages"] == 2
    # resume reads the stored template instead of asking again, also a template.json written before the
    # nested form (the hyperparameters at the top level)
    again = CannedTemplateLM(tiny_lm, valid=False)
    (tmp_path / "run" / "results.jsonl").write_text("")
    old_form = {"data_creation_instruction": saved["template"]["data_creation_instruction"],
                **saved["template"]["hyperparameters"]}
    (tmp_path / "run" / "template.json").write_text(json.dumps({**saved, "template": old_form}))
    run_knowledge(config, tmp_path / "run", lm=again, progress=False, resume=True)
    assert again.meta == 0
    resumed = [r for r in read_rows(tmp_path / "run" / "results.jsonl") if r["condition"] == "template"]
    assert len(resumed) == 2 * 2 and all(r["template"] == saved["template"] for r in resumed)
    # no valid template: failure rows with the reason, the other conditions unaffected
    bad = CannedTemplateLM(tiny_lm, valid=False)
    bad_config = tiny_config(tiny_chat_dir, conditions=["base", "passage", "template"],
                             template_condition={"max_retries": 1, "candidates": 2})
    run_knowledge(bad_config, tmp_path / "bad", lm=bad, progress=False)
    proposals = json.loads((tmp_path / "bad" / "template.json").read_text())["proposals"]
    assert [(p["attempt"], p["valid"]) for p in proposals] == [(0, False), (0, False), (1, False), (1, False)]
    assert bad.meta == 2  # one batched generate per attempt
    rows = read_rows(tmp_path / "bad" / "results.jsonl")
    failed = [r for r in rows if r["condition"] == "template"]
    assert len(failed) == 4 and all(r["failure"].startswith("no valid template: no JSON object") for r in failed)
    assert all(r["accuracy_after"] == r["accuracy_before"] for r in failed)
    # a new run into that folder (not resumed) proposes again: the failed template was an earlier run's
    (tmp_path / "bad" / "results.jsonl").write_text("")
    good = CannedTemplateLM(tiny_lm)
    capsys.readouterr()
    run_knowledge(bad_config, tmp_path / "bad", lm=good, progress=True, stop_after=0)
    assert good.meta == 1 and json.loads((tmp_path / "bad" / "template.json").read_text())["failure"] is None
    err = capsys.readouterr().err
    assert "up to 2 attempt(s) of 2 proposals" in err and "template ready" in err
    with pytest.raises(RunConfigError, match="template_condition"):
        tiny_config(tiny_chat_dir, template_condition={"fallback": "lines"})


def test_damaged_state_files_are_named_before_the_model_loads(tiny_chat_dir, tiny_lm, tmp_path, monkeypatch):
    config = tiny_config(tiny_chat_dir, conditions=["base", "template"], template_condition={"max_retries": 0})
    run = tmp_path / "run"
    run_knowledge(config, run, lm=CannedTemplateLM(tiny_lm), progress=False, stop_after=0)  # the template, no row
    saved = (run / "template.json").read_text()
    assert json.loads(saved)["template"] and not list(run.glob("*.tmp"))
    monkeypatch.setattr(knowledge, "load_model", no_model)
    (run / "template.json").write_text(saved[:40])  # cut off by a kill (an older seal-jax wrote it in place)
    with pytest.raises(StateFileError, match=r"template\.json is not valid JSON \(.*\): delete it and resume to "
                                             r"propose the template condition's template again"):
        run_knowledge(config, run, progress=False, resume=True)
    (run / "template.json").write_text(json.dumps({**json.loads(saved), "template": {"lora_rank": 8}}))
    with pytest.raises(StateFileError, match=r"template\.json: its template is not valid \(.*\): delete it"):
        run_knowledge(config, run, progress=False, resume=True)
    (run / "template.json").write_text(saved)
    (run / "run_config.json").write_text('{"name": "ti')
    with pytest.raises(StateFileError, match=r"run_config\.json is not valid JSON .*the config the run started with"):
        run_knowledge(config, run, progress=False, resume=True)


class CutOffLM:
    """Every answer stops in the middle, as at the token limit."""

    def generate(self, prompts, params, chat=False, **kwargs):
        return ['{"data_creation_instruction": "State each fact'] * len(prompts)


def test_cut_off_answers_name_the_key_that_sets_their_length(tiny_chat_dir, tmp_path):
    config = tiny_config(tiny_chat_dir, conditions=["base", "template"], template_condition={"max_retries": 0})
    template, failure = propose_run_template(CutOffLM(), config, tmp_path)
    assert template is None and "cut off (raise template_condition.proposal_max_new_tokens)" in failure
    proposals = json.loads((tmp_path / "template.json").read_text())["proposals"]
    assert proposals and all("(raise template_condition.proposal_max_new_tokens)" in p["reason"] for p in proposals)
    passage = select_data(config.data)[0][0]
    cut = {"template": ['{"training_sequences": ["A first fa'] * config.k}
    jobs, failed = condition_jobs(passage, config, cut, None, Template.from_dict(CannedTemplateLM.TEMPLATE), None,
                                  Measure(0.5))
    assert not jobs and len(failed) == config.k
    assert all("cut off (raise template_condition.fill_max_new_tokens, which is selfedit_sampling.max_new_tokens "
               "when unset)" in r["failure"] for r in failed)
    set_length = tiny_config(tiny_chat_dir, conditions=["base", "template"], template_condition={"fill_max_new_tokens": 64})
    _, failed = condition_jobs(passage, set_length, cut, None, Template.from_dict(CannedTemplateLM.TEMPLATE), None,
                               Measure(0.5))
    assert all(r["failure"].endswith("(raise template_condition.fill_max_new_tokens) or is malformed") for r in failed)
