"""One door for every kind of run: a config's kind from its tables, dispatch of `run` and `markdown`,
and the kind of a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seal_jax.selfedit import runs
from seal_jax.selfedit.knowledge import RunConfig, RunConfigError
from seal_jax.selfedit.restem import RestemConfig
from seal_jax.selfedit.template_search import TemplateSearchConfig

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("file, kind, cls", [
    ("demo.toml", "knowledge", RunConfig),
    ("restem-demo.toml", "restem", RestemConfig),
    ("templates-archive-demo.toml", "templates", TemplateSearchConfig),
])
def test_kind_and_config_class_follow_the_tables(file, kind, cls):
    config = runs.load_config(EXPERIMENTS / file)
    assert type(config) is cls
    assert runs.kind_of(config.to_json()) == kind  # a saved run_config.json reads back as the same kind


def test_a_config_with_both_tables_is_refused():
    with pytest.raises(RunConfigError, match=r"either a \[restem\] or a \[templates\] table"):
        runs.config_from_dict({"name": "x", "model": "m", "restem": {}, "templates": {}})


def test_run_dispatches_on_the_config_class(monkeypatch, tmp_path):
    calls = []
    for name in ("run_knowledge", "run_restem", "run_template_search"):
        monkeypatch.setattr(runs, name, lambda config, out, resume, _n=name, **kw: calls.append((_n, resume, kw)))
    for file in ("demo.toml", "restem-demo.toml", "templates-archive-demo.toml"):
        runs.run(runs.load_config(EXPERIMENTS / file), tmp_path, resume=True, progress=False)
    assert calls == [(n, True, {"progress": False}) for n in ("run_knowledge", "run_restem", "run_template_search")]


def test_markdown_dispatches_on_the_summary_shape(monkeypatch):
    for name, tag in (("restem_markdown", "R"), ("template_markdown", "T"), ("summary_markdown", "K")):
        monkeypatch.setattr(runs, name, lambda summary, _t=tag: _t)
    assert [runs.markdown(s) for s in ({"rounds": []}, {"iterations": []}, {"conditions": {}})] == ["R", "T", "K"]


def test_run_kind_of_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no run_config.json"):
        runs.run_kind(tmp_path)
    (tmp_path / "run_config.json").write_text(json.dumps({"name": "r", "restem": {"rounds": 1}}))
    assert runs.run_kind(tmp_path) == "restem"
