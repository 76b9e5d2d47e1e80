"""Resuming a run folder: the saved config compared with the one a run resumes with, and saved whole."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, tiny_config

from seal_jax.selfedit.results import StateFileError
from seal_jax.selfedit.resume import check_run_config, save_run_config
from seal_jax.selfedit.run_config import RunConfigError


def test_a_resume_checks_the_saved_config_and_saves_it_whole(tmp_path):
    config = tiny_config("m").to_json()
    out = tmp_path / "run"
    save_run_config(out, {**config, "name": "Quarnholt – ü"}, resume=False)
    text = (out / "run_config.json").read_text()
    assert text.isascii() and json.loads(text)["name"] == "Quarnholt – ü"  # escaped, as before
    assert [p.name for p in out.iterdir()] == ["run_config.json"]  # no temporary file left beside it
    saved = json.loads(text)
    check_run_config(out, saved, resume=True)  # the same config resumes
    check_run_config(out, {**saved, "remat": "full"}, resume=True)  # and one that differs in a free key
    with pytest.raises(RunConfigError, match=r"cannot resume .*run: the config differs in \['k'\] \(saved -> now: "
                                             rf"k {saved['k']} -> 7\)"):
        save_run_config(out, {**saved, "k": 7}, resume=True)
    assert json.loads((out / "run_config.json").read_text()) == saved  # a refused resume leaves the file alone
    save_run_config(out, {**saved, "k": 7}, resume=False)  # a new run (not resuming) replaces it
    assert json.loads((out / "run_config.json").read_text())["k"] == 7


def test_a_damaged_saved_config_is_named_with_what_to_do(tmp_path):
    (tmp_path / "run_config.json").write_text('{"name": "t", "model": "check')  # cut off by a kill
    with pytest.raises(StateFileError, match=r"run_config.json is not valid JSON .*delete it and resume with exactly "
                                             r"that config"):
        check_run_config(tmp_path, tiny_config("m").to_json(), resume=True)
    check_run_config(tmp_path, tiny_config("m").to_json(), resume=False)  # a new run does not read it


def test_keys_a_run_kind_ignored_do_not_stop_an_older_folder_resuming():
    """Older versions accepted (and ignored) keys that a config now refuses: a folder that saved one resumes
    with the config that leaves it out, and a key that does count still stops it."""
    from seal_jax.selfedit.resume import config_differences
    from seal_jax.selfedit.run_config import read_toml
    from seal_jax.selfedit.runs import config_from_dict

    raw = read_toml(REPO / "experiments" / "templates-archive-demo.toml")
    now = config_from_dict(raw).to_json()
    older = {**now, "k": 3, "lora": {**now["lora"], "rank": 16}, "train": {**now["train"], "seed": 5},
             "templates": {**now["templates"], "novelty": {"k": 2}}}
    assert config_differences(older, now) == []
    assert config_differences({**older, "data": {**now["data"], "start": 9}}, now) == ["data"]
    knowledge = tiny_config("m").to_json()  # a knowledge run reads k and [lora] rank
    assert config_differences({**knowledge, "k": knowledge["k"] + 1}, knowledge) == ["k"]
    assert config_differences({**knowledge, "train": {**knowledge["train"], "seed": 3}}, knowledge) == []


def test_a_template_searchs_similarity_backend_matters_only_to_the_novelty_variant():
    """Outside the novelty variant the similarity backend changes only a template search's summary, so a
    resume may change it; with novelty (saved or now) it scores the archive and must stay."""
    from seal_jax.selfedit.resume import config_differences

    base = tiny_config("m").to_json()
    saved = {**base, "templates": {"variant": "archive", "similarity_backend": "embeddings"}}
    now = {**base, "templates": {"variant": "archive", "similarity_backend": "tfidf"}}
    assert config_differences(saved, now) == []
    for old, new in (("novelty", "novelty"), ("novelty", "archive"), ("archive", "novelty")):
        a = {**saved, "templates": {**saved["templates"], "variant": old}}
        b = {**now, "templates": {**now["templates"], "variant": new}}
        assert config_differences(a, b) == ["templates"], (old, new)
