"""ReST-EM: best-row selection, SFT rows and loss masking, the merged generator, a resumed run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import seal_jax as sj
from seal_jax.selfedit import generator, knowledge, restem
from seal_jax.selfedit.data import load_passages
from seal_jax.selfedit.generator import Models, SftResult
from seal_jax.selfedit.restem import (
    RestemConfig,
    eval_passages,
    restem_markdown,
    round_passages,
    run_restem,
    select_best,
    sft_rows,
    summarize_restem,
)
from seal_jax.selfedit.results import (
    Measure,
    StateFileError,
    append_passage,
    read_rows,
    result_row,
    summarize,
)
from seal_jax.selfedit.run_config import RunConfigError


def no_model(*args, **kwargs):
    raise AssertionError("no model may load here")


def row(pid, cand, reward, before=0.25, edit="an edit", failure=None, condition="implications", repeat=0):
    return {"passage_id": pid, "condition": condition, "candidate": cand, "reward": reward, "accuracy_after": reward,
            "accuracy_before": before, "self_edit": edit, "failure": failure, "repeat": repeat}


def test_select_best_takes_the_highest_mean_over_repeats():
    rows = [row("p", 0, 0.5, repeat=0), row("p", 0, 0.5, repeat=1),
            row("p", 1, 1.0, repeat=0), row("p", 1, 0.0, repeat=1),  # mean 0.5: a tie with candidate 0
            row("p", 2, 0.75, repeat=0), row("p", 2, 0.5, repeat=1),  # mean 0.625: the best
            row("p", 0, 0.25, condition="base", edit=None)]
    (best,) = select_best(rows, "implications")
    assert best["candidate"] == 2 and best["reward"] == pytest.approx(0.625)


def test_select_best_ties_failures_and_gains():
    rows = [row("a", 0, 0.5, edit="first"), row("a", 1, 0.5, edit="second"),  # tie -> lower index
            row("b", 0, 1.0, failure="non-finite loss"), row("b", 1, 0.0),  # the failed one is skipped
            row("c", 0, 0.0, before=0.5), row("c", 1, 0.25, before=0.5),  # all below the base
            row("d", 0, 1.0, edit=None)]  # no self-edit text: nothing to learn
    best = {b["passage_id"]: b for b in select_best(rows, "implications")}
    assert best["a"]["self_edit"] == "first"
    assert best["b"]["candidate"] == 1 and best["b"]["reward"] == 0.0
    assert best["c"]["candidate"] == 1
    assert "d" not in best
    kept = select_best(rows, "implications", positive_gain_only=True)
    assert [b["passage_id"] for b in kept] == ["a"]  # 0.5 > 0.25; b: 0.0 = 0.25? no; c: 0.25 < 0.5
    assert select_best(rows, "rewrite") == []


def test_select_best_by_the_gold_loglik_reward():
    """With ``reward = "gold_loglik"`` rows carry the log-likelihood as their reward; the gain test compares it
    with the log-likelihood before, not the accuracy."""
    rows = [{**row("a", 0, -1.2), "gold_loglik_before": -1.5}, {**row("a", 1, -0.4), "gold_loglik_before": -1.5},
            {**row("b", 0, -2.0), "gold_loglik_before": -1.8}]
    best = select_best(rows, "implications", reward="gold_loglik")
    assert [(b["passage_id"], b["candidate"], b["reward"]) for b in best] == [("a", 1, -0.4), ("b", 0, -2.0)]
    kept = select_best(rows, "implications", positive_gain_only=True, reward="gold_loglik")
    assert [b["passage_id"] for b in kept] == ["a"]  # -0.4 > -1.5; b fell from -1.8 to -2.0
    assert select_best(rows, "implications", positive_gain_only=True) == []  # as accuracies: below 0.25


def test_sft_rows_carry_the_prompt_the_generator_saw(tiny_chat_dir):
    from seal_jax.lm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_chat_dir)
    passages = {p.id: p for p in load_passages("demo", n=2)}
    best = [{"passage_id": "demo-1", "candidate": 0, "self_edit": "1. A fact.", "reward": 0.5, "accuracy_before": 0}]
    (chat,) = sft_rows(best, passages, "implications", chat=True, tokenizer=tok)
    assert set(chat) == {"passage_id", "prompt", "completion", "reward"}
    assert chat["completion"] == "1. A fact." and passages["demo-1"].context in chat["prompt"]
    assert chat["prompt"] == tok.apply_chat_template(
        [{"role": "user", "content": chat["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]}],
        tokenize=False, add_generation_prompt=True)
    (raw,) = sft_rows(best, passages, "implications", chat=False)
    assert raw["prompt"].startswith(passages["demo-1"].text) and "<|im_start|>" not in raw["prompt"]


def restem_raw(model_dir, **restem):
    table = {"strategy": "implications", "rounds": 2, "passages_per_round": 2,
             "eval_data": {"source": "demo", "start": 8, "n": 1},
             "sft_lora": {"rank": 4, "alpha": 8.0}, "sft_train": {"learning_rate": 1e-3, "epochs": 1, "max_len": 1024}}
    table.update(restem)
    return dict(name="tiny-restem", model=str(model_dir), chat=True, k=2, data={"source": "demo", "start": 0},
                selfedit_sampling={"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95},
                lora={"rank": 4, "alpha": 8.0}, train={"epochs": 1, "learning_rate": 1e-2, "max_len": 128},
                eval_max_new_tokens=8, restem=table)


def test_restem_run_layout_and_resume(tiny_chat_dir, tmp_path, monkeypatch):
    from transformers import AutoConfig

    config = RestemConfig.from_dict(restem_raw(tiny_chat_dir))
    lm = sj.load(tiny_chat_dir, progress=False)
    full = tmp_path / "full"
    summary = run_restem(config, full, lm=lm, progress=False)
    assert json.loads((full / "run_config.json").read_text())["model"] == str(tiny_chat_dir)
    for r in (1, 2):
        rows = read_rows(full / f"round-{r}" / "results.jsonl")
        assert len(rows) == 2 * (1 + 2)  # 2 passages x (base + 2 candidates)
        sft = read_rows(full / f"round-{r}" / "sft_rows.jsonl")
        assert all(set(s) == {"passage_id", "prompt", "completion", "reward"} for s in sft)
        assert 1 <= len(sft) <= 2
        assert (full / f"round-{r}" / "eval" / "summary.json").is_file()
        AutoConfig.from_pretrained(full / f"round-{r}" / "generator")  # an HF folder
    # round 2 uses round 1's generator on fresh passages
    ids1 = {r["passage_id"] for r in read_rows(full / "round-1" / "results.jsonl")}
    ids2 = {r["passage_id"] for r in read_rows(full / "round-2" / "results.jsonl")}
    assert ids1 == {"demo-0", "demo-1"} and ids2 == {"demo-2", "demo-3"}
    info = json.loads((full / "round-2" / "round.json").read_text())
    assert info["trained_from"] == "round-1/generator" and info["generator"] == "round-2/generator"  # run-relative
    assert [e["round"] for e in summary["rounds"]] == [0, 1, 2]
    assert all(e["eval"] is not None and 0 <= e["eval"]["implications"] <= 1 for e in summary["rounds"])
    assert "| 2 |" in restem_markdown(summary)
    # killed in the middle of round 1 (after the round-0 eval and one training passage), then resumed
    part = tmp_path / "part"
    run_restem(config, part, lm=lm, progress=False, stop_after=2)
    assert len({r["passage_id"] for r in read_rows(part / "round-1" / "results.jsonl")}) == 1
    assert not (part / "round-1" / "generator").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run_restem(config, part, lm=lm, progress=False)
    run_restem(config, part, lm=lm, progress=False, resume=True)
    for r in (1, 2):
        strip = lambda rows: [{k: v for k, v in x.items() if k != "seconds"} for x in rows]  # noqa: E731
        assert strip(read_rows(part / f"round-{r}" / "results.jsonl")) == strip(
            read_rows(full / f"round-{r}" / "results.jsonl"))
        assert read_rows(part / f"round-{r}" / "sft_rows.jsonl") == read_rows(full / f"round-{r}" / "sft_rows.jsonl")
        a = (part / f"round-{r}" / "generator" / "model.safetensors").read_bytes()
        b = (full / f"round-{r}" / "generator" / "model.safetensors").read_bytes()
        assert a == b
        assert (part / f"round-{r}" / "round.json").read_text() == (full / f"round-{r}" / "round.json").read_text()
    # the run folder moved (the old place gone) and resumed from another working directory: the round-2
    # evaluation, part-done (its run_config.json names the generator where it was), is taken up again and
    # loads round 2's generator from where the folder is now
    evaluated = read_rows(full / "round-2" / "eval" / "results.jsonl")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(full, moved)
    assert json.loads((moved / "round-2" / "eval" / "run_config.json").read_text())["model"] == str(
        full / "round-2" / "generator")
    (moved / "round-2" / "eval" / "results.jsonl").write_text("")
    monkeypatch.chdir(moved.parent)
    again = run_restem(config, "moved", lm=lm, progress=False, resume=True)
    strip = lambda rows: [{k: v for k, v in x.items() if k != "seconds"} for x in rows]  # noqa: E731
    assert strip(read_rows(moved / "round-2" / "eval" / "results.jsonl")) == strip(evaluated)
    assert again["rounds"][2]["eval"] == summary["rounds"][2]["eval"]
    # resumed once more, finished: no model loads, and an evaluation's lost summary.json is written again
    monkeypatch.setattr(generator, "load_model", no_model)
    monkeypatch.setattr(knowledge, "load_model", no_model)
    (moved / "round-1" / "eval" / "summary.json").unlink()
    assert run_restem(config, "moved", progress=False, resume=True) == again
    assert (moved / "round-1" / "eval" / "summary.json").is_file()


def test_training_rounds_skip_the_evaluation_passages(tiny_chat_dir, shared_data):
    raw = restem_raw(tiny_chat_dir, eval_data={"source": "demo", "start": 1, "n": 2})
    config = RestemConfig.from_dict(raw)
    held_out = eval_passages(config)
    assert [p.id for p in held_out] == ["demo-1", "demo-2"]
    blocks = round_passages(config, held_out)
    assert [[p.id for p in b] for b in blocks] == [["demo-0", "demo-3"], ["demo-4", "demo-5"]]
    # an E-step runs exactly its block: the round's knowledge config names the passages
    assert config.round_config("m", blocks[1]).data == {"source": "demo", "ids": ["demo-4", "demo-5"]}
    # SEAL's 200 evaluation passages, spread over squad_val.json, are skipped by a pool from passage 1000
    squad, selfedits = str(shared_data / "squad_val.json"), str(shared_data / "seal_base_selfedits_val.json")
    seal = RestemConfig.from_dict({**raw, "data": {"source": squad, "start": 1000}, "restem": {
        **raw["restem"], "passages_per_round": 50,
        "eval_data": {"source": squad, "subset": "selfedits", "selfedits": selfedits}}})
    held_out = eval_passages(seal)
    assert len(held_out) == 200 and held_out[0].id == "squad-val-1168"
    blocks = round_passages(seal, held_out)
    train_ids = [p.id for b in blocks for p in b]
    pool = [p.id for p in load_passages(squad, start=1000, n=120)]
    assert train_ids == [i for i in pool if i not in {p.id for p in held_out}][:100]
    assert set(pool[:100]) & {p.id for p in held_out}  # a plain block from 1000 would have overlapped


def test_restem_config_errors(tiny_chat_dir, tmp_path):
    raw = restem_raw(tiny_chat_dir)
    with pytest.raises(RunConfigError, match="restem"):
        RestemConfig.from_dict({k: v for k, v in raw.items() if k != "restem"})
    with pytest.raises(RunConfigError, match="unknown keys in \\[restem\\]"):
        RestemConfig.from_dict({**raw, "restem": {**raw["restem"], "round": 3}})
    with pytest.raises(RunConfigError, match="does not generate"):
        RestemConfig.from_dict({**raw, "restem": {**raw["restem"], "strategy": "passage"}})
    with pytest.raises(RunConfigError, match="passages_per_round"):
        RestemConfig.from_dict({**raw, "data": {"source": "demo", "n": 4}})
    with pytest.raises(RunConfigError, match=r"unknown keys in \[restem.eval_data\]: \['count'\]"):
        RestemConfig.from_dict({**raw, "restem": {**raw["restem"], "eval_data": {"source": "demo", "count": 2}}})
    with pytest.raises(RunConfigError, match="passages_per_round"):
        RestemConfig.from_dict({**raw, "data": {"source": "demo", "ids": ["demo-0"]}})
    too_many = RestemConfig.from_dict({**raw, "restem": {**raw["restem"], "passages_per_round": 20}})
    with pytest.raises(RunConfigError, match="need 40"):
        run_restem(too_many, tmp_path / "y", progress=False)
    assert not (tmp_path / "y").exists()  # the data is checked before the folder is written
    unknown = RestemConfig.from_dict({**raw, "restem": {**raw["restem"], "eval_data": {"source": "demo", "ids": ["x"]}}})
    with pytest.raises(RunConfigError, match="no passage 'x'"):
        run_restem(unknown, tmp_path / "z", progress=False)
    assert not (tmp_path / "z").exists()
    # the generator's SFT tables: a table of the spec's fields, each error naming the table
    config = RestemConfig.from_dict(raw)
    for key, value, match in [
            ("sft_lora", "x", r"restem\.sft_lora must be a table"),
            ("sft_lora", {"rank": -1}, r"^restem\.sft_lora: LoraSpec\.rank must be a positive integer"),
            ("sft_lora", {"ranks": 4}, r"unknown keys in \[restem\.sft_lora\]: \['ranks'\]"),
            ("sft_train", 3, r"restem\.sft_train must be a table"),
            ("sft_train", {"learning_rate": -1.0}, r"^restem\.sft_train: TrainSpec\.learning_rate must be positive"),
            ("sft_train", {"lr": 1e-3}, r"unknown keys in \[restem\.sft_train\]: \['lr'\]")]:
        with pytest.raises(RunConfigError, match=match):  # built in Python
            dataclasses.replace(config, **{key: value})
        with pytest.raises(RunConfigError, match=match.removeprefix("^")):  # read from a config file
            RestemConfig.from_dict({**raw, "restem": {**raw["restem"], key: value}})


def test_damaged_state_files_are_named_before_a_model_loads(tiny_chat_dir, tmp_path, monkeypatch):
    config = RestemConfig.from_dict(restem_raw(tiny_chat_dir))
    monkeypatch.setattr(generator, "load_model", no_model)
    monkeypatch.setattr(knowledge, "load_model", no_model)
    out = tmp_path / "run"
    (out / "round-1" / "eval").mkdir(parents=True)
    (out / "run_config.json").write_text(json.dumps(config.to_json()))
    (out / "round-1" / "round.json").write_text('{"round": 1, "trained_fr')  # cut off by a kill
    with pytest.raises(StateFileError, match=r"round-1/round\.json is not valid JSON .*: delete it and resume: the "
                                             r"round's E-step rows are kept"):
        run_restem(config, out, progress=False, resume=True)
    (out / "round-1" / "round.json").write_text('{"round": 1}')
    with pytest.raises(StateFileError, match=r"round\.json lacks \['generator'\]"):
        run_restem(config, out, progress=False, resume=True)
    (out / "round-1" / "round.json").unlink()
    (out / "round-1" / "eval" / "summary.json").write_text('{"model": "m", "cond')
    for read in (lambda: run_restem(config, out, progress=False, resume=True),
                 lambda: summarize_restem(out, config.knowledge.model, config.strategy, config.rounds)):
        with pytest.raises(StateFileError, match=r"eval/summary\.json is not valid JSON .*: delete it and resume: "
                                                 r"the run writes it again"):
            read()
    (out / "round-1" / "eval" / "summary.json").unlink()
    (out / "round-1" / "eval" / "run_config.json").write_text("{")
    with pytest.raises(StateFileError, match=r"eval/run_config\.json is not valid JSON"):
        run_restem(config, out, progress=False, resume=True)
    (out / "round-1" / "eval" / "run_config.json").unlink()
    (out / "run_config.json").write_text('{"name": "tiny')
    with pytest.raises(StateFileError, match=r"run/run_config\.json is not valid JSON .*the config the run started"):
        run_restem(config, out, progress=False, resume=True)


def test_sft_settings_may_change_on_resume_until_an_sft_has_run(tiny_chat_dir, tmp_path):
    from seal_jax.selfedit.restem import changes_only_sft_settings

    raw = restem_raw(tiny_chat_dir)
    saved = RestemConfig.from_dict(raw).to_json()
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    (tmp_path / "round-1").mkdir()
    bigger = RestemConfig.from_dict({**raw, "restem": {**raw["restem"], "sft_train": {"max_len": 4096}}}).to_json()
    other = RestemConfig.from_dict({**raw, "k": 3, "restem": {**raw["restem"], "sft_train": {"max_len": 4096}}})
    assert changes_only_sft_settings(tmp_path, bigger)
    assert not changes_only_sft_settings(tmp_path, other.to_json())  # k changes the rows: no
    assert not changes_only_sft_settings(tmp_path / "fresh", bigger)  # nothing saved yet
    (tmp_path / "round-1" / "round.json").write_text("{}")  # round 1's generator was trained with the old ones
    assert not changes_only_sft_settings(tmp_path, bigger)


def test_a_round_folder_of_the_older_layout_resumes(tiny_chat_dir, tmp_path):
    """Round folders once saved their passages as {source, start, n}; the same passages as ids resume."""
    from seal_jax.selfedit.restem import _adopt_id_selection

    config = RestemConfig.from_dict(restem_raw(tiny_chat_dir))
    blocks = round_passages(config, eval_passages(config))
    cfg = config.round_config(config.knowledge.model, blocks[1])
    old = {**cfg.to_json(), "data": {"source": "demo", "start": 2, "n": 2}}
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    _adopt_id_selection(tmp_path, cfg)
    assert json.loads((tmp_path / "run_config.json").read_text()) == cfg.to_json()
    other = {**old, "data": {"source": "demo", "start": 3, "n": 2}}  # other passages: left for the check to refuse
    (tmp_path / "run_config.json").write_text(json.dumps(other))
    _adopt_id_selection(tmp_path, cfg)
    assert json.loads((tmp_path / "run_config.json").read_text()) == other


def test_train_round_says_what_it_does_and_stores_run_relative_paths(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    """The E-step's rows are there (its knowledge run is skipped) and the SFT is a stand-in: round.json names
    the generators relative to the run folder, and stderr says what the long SFT/merge/export step does."""
    config = RestemConfig.from_dict({**restem_raw(tiny_chat_dir), "chat": False})
    blocks = round_passages(config, eval_passages(config))
    calls = []

    def fake_sft(lm, rows, config, target, *, progress, label):
        calls.append((len(rows), target, progress, label))
        target.mkdir(parents=True)
        return SftResult(str(target), [2.0, 1.0])

    monkeypatch.setattr(restem, "train_generator", fake_sft)
    monkeypatch.chdir(tmp_path)
    out = Path("runs/r")
    for r, block in ((1, blocks[0]), (2, blocks[1])):
        (out / f"round-{r}").mkdir(parents=True)
        for p in block:
            before = Measure(0.0)
            append_passage(out / f"round-{r}" / "results.jsonl", [
                result_row(p, "base", 0, None, 0, before, before, [], None),
                result_row(p, "implications", 0, "1. A fact.", 2, before, Measure(0.5), [], None)])
    start = SimpleNamespace(tokenizer=None)
    models = Models(config.knowledge, start, what="the ReST-EM generator", progress=False, loader=lambda path: start)
    rounds = restem._Rounds(config, out, models, [], blocks, None, True)
    assert rounds.train_round(1, config.knowledge.model)
    assert rounds.train_round(2, str(out / "round-1" / "generator"))
    one, two = (json.loads((out / f"round-{r}" / "round.json").read_text()) for r in (1, 2))
    assert (one["trained_from"], one["generator"]) == (str(tiny_chat_dir), "round-1/generator")
    assert (two["trained_from"], two["generator"]) == ("round-1/generator", "round-2/generator")
    assert calls[0] == (2, out / "round-1" / "generator", True, "tiny-restem ReST-EM round 1")
    err = capsys.readouterr().err
    assert ("tiny-restem ReST-EM round 1: 2 of 2 passages kept their best self-edit; the generator learns them "
            "(SFT, merge, export to runs/r/round-1/generator) ...") in err
    assert "tiny-restem ReST-EM round 2: new generator in runs/r/round-2/generator (SFT, merge and export took " in err
    rounds.progress = False
    shutil.rmtree(out / "round-2" / "generator")
    (out / "round-2" / "round.json").unlink()
    assert rounds.train_round(2, str(out / "round-1" / "generator")) and capsys.readouterr().err == ""
    assert calls[-1][2] is False


def test_restem_summary_and_table_show_the_gold_loglik(tmp_path):
    """Rows measuring the gold answers' log-likelihood put it (and its change over the base) in every round's
    summary and in the table, held-out and training passages alike."""
    p = load_passages("demo", n=1)[0]

    def rows(after_gold):
        before = Measure(0.5, -2.0)
        return [result_row(p, "base", 0, None, 0, before, before, [{"correct": True}, {"correct": False}], None),
                result_row(p, "rewrite", 0, "e", 1, before, Measure(1.0, after_gold),
                           [{"correct": True}, {"correct": True}], None),
                result_row(p, "rewrite", 1, None, 0, before, before, [], "self-edit produced no training sequence")]

    run = tmp_path / "run"
    for r, gold in ((0, -1.5), (1, -1.0)):
        (run / f"round-{r}" / "eval").mkdir(parents=True)
        (run / f"round-{r}" / "eval" / "summary.json").write_text(json.dumps(summarize(rows(gold), "m")))
    append_passage(run / "round-1" / "results.jsonl", rows(-0.75))
    summary = summarize_restem(run, "m", "rewrite", 2)
    zero, one, two = summary["rounds"]
    assert zero["eval_gold"] == {"base": {"gold_loglik": -2.0, "gold_loglik_change": 0.0},
                                 "rewrite": {"gold_loglik": -1.5, "gold_loglik_change": 0.5}}
    assert zero["train_gold"] is None and two["eval_gold"] is None and two["train_gold"] is None
    assert one["train_gold"]["rewrite"] == {"gold_loglik": -0.75, "gold_loglik_change": 1.25}  # the failed row: out
    lines = restem_markdown(summary).splitlines()
    assert lines[2].endswith("| mean SFT reward | held-out gold rewrite (Δ vs base) | train gold rewrite (Δ vs base) |")
    assert "| 0 | 50.0% | 100.0% | – | – | – | – | -1.500 (+0.500) | – |" in lines
    assert "| 1 | 50.0% | 100.0% | 50.0% | 100.0% | – | – | -1.000 (+1.000) | -0.750 (+1.250) |" in lines
    assert "| 2 | – | – | – | – | – | – | – | – |" in lines
    unmeasured = {**summary, "rounds": [{**e, "eval_gold": None, "train_gold": None} for e in summary["rounds"]]}
    assert "gold" not in restem_markdown(unmeasured)


def test_an_evaluation_killed_before_its_summary_shows_its_rows_so_far(tmp_path):
    """A held-out evaluation killed before writing summary.json (SIGKILL, out of memory) left its rows: the
    summary takes them as they are, with how many passages they cover, rather than showing nothing."""
    p, q = load_passages("demo", n=2)
    before = Measure(0.5, None)

    def rows(passage, correct):
        return [result_row(passage, "base", 0, None, 0, before, before, [{"correct": False}], None),
                result_row(passage, "rewrite", 0, "e", 1, before, before, [{"correct": correct}], None)]

    run = tmp_path / "run"
    (run / "round-0" / "eval").mkdir(parents=True)
    append_passage(run / "round-0" / "eval" / "results.jsonl", rows(p, True))
    append_passage(run / "round-0" / "eval" / "results.jsonl", rows(q, False))
    with open(run / "round-0" / "eval" / "results.jsonl", "a") as f:
        f.write('{"passage_id": "torn')  # the passage being written when it was killed
    zero, one = summarize_restem(run, "m", "rewrite", 1)["rounds"]
    assert zero["eval"] == {"base": 0.0, "rewrite": 0.5, "passages": 2} and one["eval"] is None
    assert "| 0 | 0.0% | 50.0% |" in restem_markdown({"strategy": "rewrite", "rounds": [zero, one], "model": "m",
                                                      "reward": "accuracy"})
