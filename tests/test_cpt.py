"""Multi-passage continued pretraining on a random tiny model: the pooled corpus, the rows, resume, a sharded
mesh, the configs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import seal_jax as sj
from seal_jax.report import report
from seal_jax.selfedit import runs
from seal_jax.selfedit.cpt import CptConfig, corpus, passage_sequences, run_cpt
from seal_jax.selfedit.data import load_passages
from seal_jax.selfedit.engine import load_adapters
from seal_jax.selfedit.results import ROW_FIELDS, read_rows
from seal_jax.selfedit.run_config import RunConfigError, derived_seed
from seal_jax.selfedit.strategies import training_sequences

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def cpt_raw(model_dir, **cpt):
    return dict(name="tiny-cpt", model=str(model_dir), chat=True, k=2, data={"source": "demo", "n": 3},
                selfedit_sampling={"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95},
                lora={"rank": 4, "alpha": 8.0}, train={"epochs": 1, "learning_rate": 1e-2, "max_len": 128},
                eval_max_new_tokens=8, cpt={"conditions": ["passage", "implications"], **cpt})


@pytest.fixture(scope="module")
def tiny_lm(tiny_chat_dir):
    return sj.load(tiny_chat_dir, progress=False)


def strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_the_corpus_is_every_passage_and_its_self_edits_shuffled():
    passages = load_passages("demo", n=2)
    edits = {passages[0].id: {"passage": [], "implications": ["A fact.\nAnother fact.", "Third."]},
             passages[1].id: {"passage": [], "implications": ["Fourth fact."]}}
    pooled = corpus(passages, edits, "implications", seed=0)
    expected = [passages[0].text, *training_sequences(passages[0], "A fact.\nAnother fact.", include_passage=False),
                *training_sequences(passages[0], "Third.", include_passage=False), passages[1].text,
                *training_sequences(passages[1], "Fourth fact.", include_passage=False)]
    assert sorted(pooled) == sorted(expected) and len(pooled) == len(expected) == 6
    assert pooled != expected  # shuffled …
    assert pooled == corpus(passages, edits, "implications", seed=0)  # … with a seed
    assert corpus(passages, edits, "passage", seed=0) in ([p.text for p in passages], [p.text for p in passages][::-1])
    assert passage_sequences(passages[1], []) == [passages[1].text]


def test_cpt_run_rows_training_and_resume(tiny_chat_dir, tiny_lm, tmp_path, capsys):
    config = CptConfig.from_dict(cpt_raw(tiny_chat_dir))
    full = tmp_path / "full"
    summary = run_cpt(config, full, lm=tiny_lm, progress=False)
    rows = read_rows(full / "results.jsonl")
    passages = load_passages("demo", n=3)
    assert [(r["passage_id"], r["condition"]) for r in rows] == [
        (p.id, c) for p in passages for c in ("base", "passage", "implications")]
    assert all(set(ROW_FIELDS) <= set(r) and "gold_loglik_after" in r for r in rows)
    selfedits = {r["passage_id"]: r["selfedits"] for r in read_rows(full / "selfedits.jsonl")}
    assert all(len(selfedits[p.id]["implications"]) == 2 and selfedits[p.id]["passage"] == [] for p in passages)
    info = json.loads((full / "training.json").read_text())
    pooled = {c: corpus(passages, selfedits, c, config.knowledge.seed) for c in info["conditions"]}
    assert info["sequences"] == {c: len(v) for c, v in pooled.items()} and info["sequences"]["passage"] == 3
    # the trained adapters are the ones a direct call on the pooled corpora gives
    direct = tiny_lm.train_adapters([pooled["passage"], pooled["implications"]], config.knowledge.lora_spec(),
                                    [config.knowledge.train_spec(seed=s) for s in _seeds(config)],
                                    seed=config.knowledge.seed)
    saved = load_adapters(full / "adapters")
    assert [[round(x, 5) for x in loss] for loss in saved.losses] == [[round(x, 5) for x in loss]
                                                                       for loss in direct.losses]
    for name, ab in direct.weights.items():
        np.testing.assert_allclose(np.asarray(saved.weights[name]["a"]), np.asarray(ab["a"]), atol=1e-6)
    for r in rows:
        if r["condition"] != "base":
            base = next(b for b in rows if b["passage_id"] == r["passage_id"] and b["condition"] == "base")
            assert r["accuracy_before"] == base["accuracy_after"]
            assert r["gold_loglik_before"] == base["gold_loglik_after"]
    assert set(summary["conditions"]) == {"base", "passage", "implications"}
    markdown, png = report(full)  # `seal-jax report` reads a CPT folder like a knowledge run's
    assert "| implications |" in markdown and "Δ gold nats/token" in markdown and png.is_file()

    part = tmp_path / "part"
    run_cpt(config, part, lm=tiny_lm, progress=False, stop_after=2)  # 2 of 3 passages' self-edits
    assert len(read_rows(part / "selfedits.jsonl")) == 2 and not (part / "training.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run_cpt(config, part, lm=tiny_lm, progress=False)
    assert "tiny-cpt: training" not in capsys.readouterr().err  # progress=False: quiet
    run_cpt(config, part, lm=tiny_lm, progress=True, resume=True, stop_after=2)  # self-edits, training, 1 passage
    assert len(read_rows(part / "results.jsonl")) == 3
    # the one pooled training call is silent: what it trains is said before it, its seconds after
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tiny-cpt: ")]
    n = info["sequences"]
    spec = config.knowledge.train_spec()
    assert said[0] == (f"tiny-cpt: training 2 adapters (passage, implications) in one call: {n['passage']}/"
                       f"{n['implications']} sequences, batch {spec.batch_size} x {spec.grad_accum} accumulated, "
                       f"{spec.epochs} epoch(s) ...")
    assert re.fullmatch(rf"tiny-cpt: adapters trained in \d+\.\d s; saving to {re.escape(str(part / 'adapters'))}",
                        said[1]) and len(said) == 2
    run_cpt(config, part, lm=tiny_lm, progress=True, resume=True)  # the adapters are read back
    assert "tiny-cpt: training" not in capsys.readouterr().err
    assert_same_rows(read_rows(part / "results.jsonl"), read_rows(full / "results.jsonl"))
    assert json.loads((part / "training.json").read_text()) == info

    # evaluation one passage per call gives the rows of one call for all three (eval_batch is resume-free)
    single = tmp_path / "single"
    shutil.copytree(full, single)
    (single / "results.jsonl").unlink()
    one_by_one = CptConfig.from_dict(cpt_raw(tiny_chat_dir, eval_batch=1))
    run_cpt(one_by_one, single, lm=tiny_lm, progress=False, resume=True)
    assert_same_rows(read_rows(single / "results.jsonl"), read_rows(full / "results.jsonl"))


def _seeds(config):
    return [derived_seed(config.knowledge.seed, "cpt", c) for c in config.all_conditions]


def assert_same_rows(a, b):
    """Equal rows; the gold log-likelihood to float rounding (passages evaluated in calls of other sizes
    are padded to other shapes)."""
    dense = ("gold_loglik_before", "gold_loglik_after")
    assert [{k: v for k, v in r.items() if k not in dense} for r in strip(a)] == [
        {k: v for k, v in r.items() if k not in dense} for r in strip(b)]
    for x, y in zip(a, b, strict=True):
        assert [x[k] for k in dense] == pytest.approx([y[k] for k in dense], rel=1e-6)


def test_cpt_on_a_sharded_mesh_trains_the_same_adapters(tiny_chat_dir, tmp_path):
    """8 fake devices (``data=2,fsdp=2,tensor=2``) give the adapters and rows of one device."""
    config = CptConfig.from_dict({**cpt_raw(tiny_chat_dir, conditions=["passage"]), "data": {"source": "demo", "n": 2}})
    one = run_cpt(config, tmp_path / "one", lm=sj.load(tiny_chat_dir, progress=False), progress=False)
    sharded = sj.load(tiny_chat_dir, mesh="data=2,fsdp=2,tensor=2", progress=False)
    eight = run_cpt(config, tmp_path / "eight", lm=sharded, progress=False)
    a, b = load_adapters(tmp_path / "one" / "adapters"), load_adapters(tmp_path / "eight" / "adapters")
    np.testing.assert_allclose(a.losses[0], b.losses[0], rtol=1e-4)
    for name in a.weights:
        np.testing.assert_allclose(np.asarray(a.weights[name]["b"]), np.asarray(b.weights[name]["b"]), atol=1e-5)
    assert one["conditions"]["passage"]["n_questions"] == eight["conditions"]["passage"]["n_questions"]


def test_cpt_configs_and_errors(tiny_chat_dir):
    demo = runs.load_config(EXPERIMENTS / "cpt-demo.toml")
    big = runs.load_config(EXPERIMENTS / "cpt-qwen3-8b.toml")
    assert type(demo) is type(big) is CptConfig and runs.kind_of(big.to_json()) == "cpt"
    assert big.conditions == ("passage", "implications", "replay") and big.knowledge.k == 5
    assert (big.knowledge.lora_spec().rank, big.knowledge.train_spec().epochs) == (32, 5)
    assert CptConfig.from_dict(big.to_json()) == big  # a saved run_config.json reads back
    with pytest.raises(RunConfigError, match="cpt.eval_batch must be a positive integer"):
        CptConfig.from_dict(cpt_raw(tiny_chat_dir, eval_batch=0))
    with pytest.raises(RunConfigError, match="'base' cannot be a CPT condition"):
        CptConfig.from_dict(cpt_raw(tiny_chat_dir, conditions=["base"]))
    with pytest.raises(RunConfigError, match=r"clash with conditions"):
        CptConfig.from_dict(cpt_raw(tiny_chat_dir, generators={"passage": "/models/x"}))
    with pytest.raises(RunConfigError, match="sets cpt.conditions"):
        CptConfig.from_dict({**cpt_raw(tiny_chat_dir), "conditions": ["base"]})
    with pytest.raises(RunConfigError, match=r"at most one of .* not both \[restem\] and \[cpt\]"):
        runs.config_from_dict({"name": "x", "model": "m", "restem": {}, "cpt": {}})


@pytest.mark.parametrize("key, value, message", [
    ("generators", "x", r"cpt.generators must be a table .*\[cpt.generators\] in TOML"),
    ("generators", ["/models/x"], "cpt.generators must be a table"),
    ("conditions", "passage", r"cpt.conditions must be a list of condition names, like \[\"passage\", "
                              r"\"implications\"\], got 'passage'"),
    ("conditions", ["passage", 3], "cpt.conditions must be a list of condition names"),
])
def test_the_cpt_table_is_type_checked(tiny_chat_dir, key, value, message):
    """``generators = "x"`` was an AttributeError, ``conditions = "passage"`` the strategies 'p', 'a', … ."""
    with pytest.raises(RunConfigError, match=f"^cpt.toml: {message}"):
        CptConfig.from_dict(cpt_raw(tiny_chat_dir, **{key: value}), "cpt.toml")
    knowledge = CptConfig.from_dict(cpt_raw(tiny_chat_dir)).knowledge
    with pytest.raises(RunConfigError, match=f"^{message}"):  # built in Python, without from_dict's checks
        CptConfig(knowledge=knowledge, **{key: value})


def test_a_refused_data_selection_writes_no_run_folder(tiny_chat_dir, tmp_path):
    from seal_jax.selfedit.data import DataError

    config = CptConfig.from_dict(cpt_raw(tiny_chat_dir) | {"data": {"source": "demo", "start": 100}})
    with pytest.raises(DataError):
        run_cpt(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
