"""One door for every kind of run: a config's kind from its tables, dispatch of `run` and `markdown`,
and the kind of a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seal_jax.selfedit import runs
from seal_jax.selfedit.restem import RestemConfig
from seal_jax.selfedit.run_config import RunConfig, RunConfigError
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
    with pytest.raises(RunConfigError, match=r"at most one of the \[restem\], \[templates\], \[cpt\] and \[continual\] tables"):
        runs.config_from_dict({"name": "x", "model": "m", "restem": {}, "templates": {}})


def test_run_dispatches_on_the_config_class(monkeypatch, tmp_path):
    calls = []
    names = ("run_knowledge", "run_restem", "run_template_search", "run_cpt")
    for name in names:
        monkeypatch.setattr(runs, name, lambda config, out, resume, _n=name, **kw: calls.append((_n, resume, kw)))
    for file in ("demo.toml", "restem-demo.toml", "templates-archive-demo.toml", "cpt-demo.toml"):
        runs.run(runs.load_config(EXPERIMENTS / file), tmp_path, resume=True, progress=False)
    assert calls == [(n, True, {"progress": False}) for n in names]


def test_markdown_dispatches_on_the_summary_shape(monkeypatch):
    for name, tag in (("restem_markdown", "R"), ("template_markdown", "T"), ("summary_markdown", "K")):
        monkeypatch.setattr(runs, name, lambda summary, _t=tag: _t)
    assert [runs.markdown(s) for s in ({"rounds": []}, {"iterations": []}, {"conditions": {}})] == ["R", "T", "K"]


def test_run_kind_of_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no run_config.json"):
        runs.run_kind(tmp_path)
    (tmp_path / "run_config.json").write_text(json.dumps({"name": "r", "restem": {"rounds": 1}}))
    assert runs.run_kind(tmp_path) == "restem"


# The protocol facts of ../shared/DESIGN.md, read from the configs and defaults that carry them.
SEAL_INNER_LORA = {"rank": 32, "alpha": 64.0, "dropout": 0.0, "targets": ("q_proj", "v_proj")}
SEAL_INNER_TRAIN = {"learning_rate": 1e-3, "epochs": 10, "batch_size": 1, "schedule": "linear", "weight_decay": 0.0}
SEAL_SFT_LORA = {"rank": 64, "alpha": 128.0,
                 "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
SEAL_SFT_TRAIN = {"learning_rate": 3e-4, "epochs": 2, "batch_size": 1}


def fields_of(spec, wanted):
    return {k: (tuple(sorted(getattr(spec, k))) if k == "targets" else getattr(spec, k)) for k in wanted}


def expected(table):
    return {k: (tuple(sorted(v)) if k == "targets" else v) for k, v in table.items()}


def test_seal_defaults_are_the_papers():
    import seal_jax as sj

    assert fields_of(sj.LoraSpec.seal(), SEAL_INNER_LORA) == expected(SEAL_INNER_LORA)
    assert fields_of(sj.TrainSpec.seal(), SEAL_INNER_TRAIN) == expected(SEAL_INNER_TRAIN)
    assert fields_of(sj.LoraSpec.seal_sft(), SEAL_SFT_LORA) == expected(SEAL_SFT_LORA)


def test_accelerator_configs_carry_the_protocol():
    seal = runs.load_config(EXPERIMENTS / "seal-qwen3-8b.toml")
    assert seal.k == 5 and seal.include_passage and seal.eval_max_new_tokens == 64 and seal.grader == "judge"
    assert {k: seal.selfedit_sampling[k] for k in ("temperature", "top_p")} == {"temperature": 1.0, "top_p": 0.95}
    assert seal.data["subset"] == "selfedits" and "n" not in seal.data  # all 200 of SEAL's passages
    assert {"base", "passage", "implications", "rewrite", "self_qa"} <= set(seal.conditions)
    assert fields_of(seal.lora_spec(), SEAL_INNER_LORA) == expected(SEAL_INNER_LORA)
    assert fields_of(seal.train_spec(), SEAL_INNER_TRAIN) == expected(SEAL_INNER_TRAIN)

    restem = runs.load_config(EXPERIMENTS / "restem-qwen3-8b.toml")
    assert (restem.rounds, restem.passages_per_round, restem.strategy) == (2, 50, "implications")
    assert restem.eval_data["subset"] == "selfedits"
    assert fields_of(restem.sft_lora_spec(), SEAL_SFT_LORA) == expected(SEAL_SFT_LORA)
    assert fields_of(restem.sft_train_spec(), SEAL_SFT_TRAIN) == expected(SEAL_SFT_TRAIN)
    assert fields_of(restem.knowledge.lora_spec(), SEAL_INNER_LORA) == expected(SEAL_INNER_LORA)

    from seal_jax.selfedit.meta_prompts import EXPLOIT, EXPLORE, PROPOSAL_SCHEDULE
    from seal_jax.selfedit.proposals import schedule

    assert schedule(5, PROPOSAL_SCHEDULE) == ["exploit"] * 3 + ["explore"] * 2
    assert EXPLOIT == {"temperature": 0.6, "top_p": 0.95, "min_p": 0.05}
    assert EXPLORE == {"temperature": 1.3, "top_p": 0.95, "min_p": 0.1}
    for variant in ("noarchive", "archive", "novelty"):
        search = runs.load_config(EXPERIMENTS / f"templates-{variant}-qwen3-8b.toml")
        assert search.variant == variant and not search.knowledge.include_passage
        assert (search.templates_per_iteration, search.fills, search.passages) == (5, 3, 50)
        assert search.eval_data["subset"] == "selfedits"
        assert fields_of(search.sft_lora_spec(), SEAL_SFT_LORA) == expected(SEAL_SFT_LORA)
        assert fields_of(search.sft_train_spec(), SEAL_SFT_TRAIN) == expected(SEAL_SFT_TRAIN)


def test_every_qwen3_8b_config_lays_out_each_target_the_readme_runs_it_on():
    """Each Qwen3-8B config runs as it stands on h100-8, tpu-v5p-16, the 4-chip tpu-v5p-8 and tpu-v5e-8:
    its top-level meshes or its ``[hardware.<target>]`` table's lay out that target's devices (``seal-jax
    run`` would stop at once otherwise)."""
    from seal_jax.lm.types import mesh_lays_out, parse_mesh_spec
    from seal_jax.targets import get_target

    paths = sorted(EXPERIMENTS.glob("*-qwen3-8b.toml"))
    assert len(paths) == 7
    for path in paths:
        config = runs.load_config(path)
        for name in ("h100-8", "tpu-v5p-16", "tpu-v5p-8", "tpu-v5e-8"):
            chips = get_target(name).chips
            resolved, _ = runs.on_hardware(config, name, devices=chips)
            knowledge = getattr(resolved, "knowledge", resolved)
            for mesh in (knowledge.mesh, knowledge.train_mesh):
                assert not mesh or mesh_lays_out(parse_mesh_spec(mesh), chips), (path.name, name, mesh)
    # a config whose mesh is for 8 devices and has no table for the 4-chip v5p-8 would stop there
    bare = RunConfig.from_dict({"name": "r", "model": "m", "mesh": "data=2,fsdp=1,tensor=4"})
    with pytest.raises(RunConfigError, match="does not lay out this run's 4 devices"):
        runs.on_hardware(bare, "tpu-v5p-8", devices=get_target("tpu-v5p-8").chips)


def test_on_hardware_applies_the_table_of_the_devices_target(monkeypatch):
    """``seal-jax run`` asks which target its devices are only for a config with ``[hardware]`` tables, applies
    that target's table, says so, and checks that the mesh lays out its devices; ``--target`` names one."""
    import dataclasses

    from conftest import tiny_config

    from seal_jax import targets

    plain = tiny_config("m", mesh="data=8")
    monkeypatch.setattr(runs, "running_target", lambda: pytest.fail("a config without tables asks no device"))
    assert runs.on_hardware(plain, devices=8) == (plain, None)
    with pytest.raises(RunConfigError, match=r"mesh 'data=8' \(from the top level of the config\) does not lay out "
                                             r"this run's 4 devices"):
        runs.on_hardware(plain, devices=4)
    config = tiny_config("m", mesh="data=1,tensor=8", train_mesh="data=8",
                         hardware={"tpu-v5p-16": {"mesh": "data=1,fsdp=2,tensor=4", "train_mesh": ""},
                                   "tpu-v5p-8": {"mesh": "data=1,tensor=4", "train_mesh": ""}})
    top = dataclasses.replace(config, hardware={})  # what a run records: its settings, not the tables
    monkeypatch.setattr(runs, "running_target", lambda: targets.get_target("tpu-v5p-16"))
    resolved, said = runs.on_hardware(config, devices=8)
    assert (resolved.mesh, resolved.train_mesh, resolved.hardware) == ("data=1,fsdp=2,tensor=4", "", {})
    assert said == 'tpu-v5p-16: [hardware.tpu-v5p-16] sets mesh = "data=1,fsdp=2,tensor=4", train_mesh = ""'
    monkeypatch.setattr(runs, "running_target", lambda: targets.get_target("h100-8"))
    assert runs.on_hardware(config) == (top, "h100-8: the config has no [hardware.h100-8] table; the top-level "
                                             "settings apply")
    monkeypatch.setattr(runs, "running_target", lambda: None)  # a CPU, or a slice no target describes
    resolved, said = runs.on_hardware(config, devices=8)
    assert resolved == top and said.startswith("these devices are none of the targets with a [hardware] table "
                                                "(tpu-v5p-16, tpu-v5p-8)")
    with pytest.raises(RunConfigError, match=r"mesh 'data=1,tensor=8' \(from the top level"):
        runs.on_hardware(config, devices=2)
    assert runs.on_hardware(config, "tpu-v5p-16")[0].mesh == "data=1,fsdp=2,tensor=4"  # named, no device asked
    with pytest.raises(RunConfigError, match=r"mesh 'data=1,tensor=4' \(from \[hardware.tpu-v5p-8\] of the config\) "
                                             r"does not lay out this run's 8 devices"):
        runs.on_hardware(config, "tpu-v5p-8", devices=8)  # a table named for other devices
    with pytest.raises(RunConfigError, match="--target: unknown target 'v5p'"):
        runs.on_hardware(config, "v5p")
    # a target named for devices of another count: the run goes on, and says so
    assert runs.on_hardware(plain, "h100-1", devices=8)[1] == (
        "h100-1: the config has no [hardware.h100-1] table; the top-level settings apply (note: h100-1 has 1 "
        "device and this run has 8)")
