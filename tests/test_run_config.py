"""Run configs: their errors, the experiment files, resume checks and extension tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import tiny_config

from seal_jax.selfedit.resume import config_differences, describe_differences
from seal_jax.selfedit.run_config import RunConfig, RunConfigError, extension_json, split_extension_table
from seal_jax.selfedit.runs import config_from_dict as load_config_from
from seal_jax.selfedit.runs import load_config


def test_config_errors(tmp_path, tiny_chat_dir):
    with pytest.raises(RunConfigError, match="unknown keys \\['epochs'\\]"):
        RunConfig.from_dict({"name": "x", "model": "m", "epochs": 3})
    with pytest.raises(Exception, match="unknown strategy 'summarize'"):
        tiny_config(tiny_chat_dir, conditions=["base", "summarize"])
    with pytest.raises(Exception, match="learning_rate must be positive"):
        tiny_config(tiny_chat_dir, train={"learning_rate": -1.0})
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nmodel = ")
    with pytest.raises(RunConfigError, match="bad.toml"):
        RunConfig.from_toml(bad)
    with pytest.raises(FileNotFoundError, match="no run config"):
        RunConfig.from_toml(tmp_path / "missing.toml")
    with pytest.raises(RunConfigError, match="unknown grader 'gpt4'"):
        tiny_config(tiny_chat_dir, grader="gpt4")
    with pytest.raises(RunConfigError, match=r"unknown keys in \[data\]: \['shufle'\]"):
        tiny_config(tiny_chat_dir, data={"source": "demo", "shufle": True})
    with pytest.raises(RunConfigError, match=r"\[selfedit_sampling\].*'temprature'"):
        tiny_config(tiny_chat_dir, selfedit_sampling={"temprature": 0.5})
    with pytest.raises(RunConfigError, match=r"\[selfedit_sampling\].*top_p"):
        tiny_config(tiny_chat_dir, selfedit_sampling={"top_p": 1.5})
    with pytest.raises(RunConfigError, match=r"\[train\]: .*'eopchs'; known keys: \[.*'epochs'"):
        tiny_config(tiny_chat_dir, train={"eopchs": 3})
    with pytest.raises(RunConfigError, match=r"\[train\]: TrainSpec.learning_rate must be a number, got '3e-3'"):
        tiny_config(tiny_chat_dir, train={"learning_rate": "3e-3"})
    with pytest.raises(RunConfigError, match=r"\[lora\]: LoraSpec.alpha must be a number, got '16'"):
        tiny_config(tiny_chat_dir, lora={"alpha": "16"})
    # keys whose every use is a truth test or a path: a quoted "false" would be true, "../x" a folder elsewhere
    for key, value, message in (("chat", "false", "chat must be true or false"),
                                ("include_passage", "no", "include_passage must be true or false"),
                                ("seed", "0", "seed must be an integer, got '0'"), ("seed", 1.5, "seed must be an integer"),
                                ("seed", -1, r"seed must be in \[0, 2\*\*32\), got -1"),
                                ("name", "../../etc", "use a plain name without '/'"), ("name", "", "name must be a non-empty"),
                                ("model", 3, "model must be a string, got 3"),
                                ("conditions", [], "conditions is empty"),
                                ("conditions", "implications", "conditions must be a list of strategy names"),
                                ("conditions", ["base", "rewrite", "rewrite"], r"names \['rewrite'\] more than once"),
                                ("data", {"source": "demo", "n": 0}, "data.n must be at least 1"),
                                ("data", {"source": "demo", "start": -1}, "data.start must be >= 0")):
        with pytest.raises(RunConfigError, match=message):
            tiny_config(tiny_chat_dir, **{key: value})
    with pytest.raises(RunConfigError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'fp32'"):
        tiny_config(tiny_chat_dir, dtype="fp32")
    with pytest.raises(RunConfigError, match=r"data.n must be an integer, got '5'"):
        tiny_config(tiny_chat_dir, data={"source": "demo", "n": "5"})
    with pytest.raises(RunConfigError, match=r"unknown grader 'llm'; choose one of .*'rules\+judge'"):
        tiny_config(tiny_chat_dir, grader="llm")
    for key, value in (("k", 2.0), ("repeats", 0), ("k", True), ("eval_max_new_tokens", "64")):
        with pytest.raises(RunConfigError, match=f"{key} must be a positive integer"):
            tiny_config(tiny_chat_dir, **{key: value})
    # [template_condition]: a quoted "false" would show the archive; -1 retries would never propose
    for key, value, message in (("archive", "false", "archive must be true or false, got 'false'"),
                                ("max_retries", -1, "max_retries must be an integer >= 0, got -1"),
                                ("max_epochs", 2.5, "max_epochs must be an integer >= 1 or absent, got 2.5"),
                                ("max_epochs", "3", "max_epochs must be an integer >= 1 or absent, got '3'"),
                                ("proposal_max_new_tokens", 0, "proposal_max_new_tokens must be an integer >= 1"),
                                ("fill_max_new_tokens", "256", "fill_max_new_tokens must be an integer >= 1 or absent"),
                                ("candidates", True, "candidates must be an integer >= 1, got True")):
        with pytest.raises(RunConfigError, match=f"template_condition.{message}"):
            tiny_config(tiny_chat_dir, template_condition={key: value})
    assert tiny_config(tiny_chat_dir, template_condition={"max_epochs": None, "max_retries": 0}).template_options()[
        "max_retries"] == 0


def test_experiment_configs_parse():

    configs = sorted((Path(__file__).parents[1] / "experiments").glob("*.toml"))
    assert configs, "experiments/ should hold run configs"

    kinds = {path.name: type(load_config(path)).__name__ for path in configs}
    assert kinds["demo.toml"] == "RunConfig" and kinds["restem-demo.toml"] == "RestemConfig"
    for variant in ("noarchive", "archive", "novelty"):
        for scale in ("demo", "qwen3-8b"):
            assert kinds[f"templates-{variant}-{scale}.toml"] == "TemplateSearchConfig"
            assert load_config(configs[0].parent / f"templates-{variant}-{scale}.toml").variant == variant


def test_resume_ignores_engine_settings_only():
    """A run may be resumed with ``remat`` changed (it does not change results), not with anything else."""

    base = tiny_config("m").to_json()
    assert config_differences(base, {**base, "remat": True}) == []
    assert config_differences({k: v for k, v in base.items() if k != "remat"}, base) == []  # an older folder
    assert config_differences(base, {**base, "k": 3, "remat": True}) == ["k"]
    cpt = {"conditions": ["passage"], "eval_batch": 8}
    assert config_differences({**base, "cpt": {"conditions": ["passage"]}}, {**base, "cpt": cpt}) == []  # older
    assert config_differences({**base, "cpt": cpt}, {**base, "cpt": {**cpt, "eval_batch": 1}}) == []
    assert config_differences({**base, "cpt": cpt}, {**base, "cpt": {**cpt, "conditions": []}}) == ["cpt"]
    # a template search saved before templates.seed_scores existed resumes; another value does not
    older = {**base, "templates": {"variant": "archive"}}
    assert config_differences(older, {**base, "templates": {"variant": "archive", "seed_scores": None}}) == []
    assert config_differences(older, {**base, "templates": {"variant": "archive", "seed_scores": "rescore"}}) == [
        "templates"]
    assert config_differences(base, {**base, "passages_per_program": 4}) == []  # results do not depend on it
    # the message names each differing entry of a table, saved value first
    changed = {**base, "k": 3, "data": {**base["data"], "n": base["data"]["n"] + 1}}
    assert describe_differences(base, changed) == f"data.n {base['data']['n']} -> {base['data']['n'] + 1}, k {base['k']} -> 3"
    assert describe_differences(older, {**base, "templates": {"variant": "archive", "seed_scores": "rescore"}}) == (
        "templates.seed_scores None -> 'rescore'")
    assert describe_differences(base, {**base, "train": {**base["train"], "warmup": 3}}) == "train.warmup (unset) -> 3"
    many = {**base, "train": {k: 7 for k in base["train"]}}
    assert describe_differences(base, many, limit=2).endswith(f" and {len(base['train']) - 2} more")
    assert config_differences(base, {**base, "train_mesh": "data=8"}) == []
    with pytest.raises(RunConfigError, match="train_mesh must be a string"):
        tiny_config("m", mesh="data=8", train_mesh={"data": 8})
    assert config_differences(base, {**base, "train_weights": "fsdp"}) == []  # nor on how the weights lie
    assert tiny_config("m", mesh="data=2,tensor=4", train_mesh="data=8", train_weights="fsdp").train_weights == "fsdp"
    with pytest.raises(RunConfigError, match=r"train_weights must be one of \['replicated', 'fsdp'\]"):
        tiny_config("m", mesh="data=8", train_mesh="data=8", train_weights="zero3")
    with pytest.raises(RunConfigError, match="needs remat"):
        tiny_config("m", mesh="data=8", train_mesh="data=8", train_weights="fsdp", remat="none")
    with pytest.raises(RunConfigError, match="set train_mesh too"):
        tiny_config("m", mesh="data=8", train_weights="fsdp")
    # the mesh grown to two hosts' 16 devices, the train mesh left at one host's 8: refused when read
    with pytest.raises(RunConfigError, match=r"train_mesh = 'data=8' lays out 8 devices but mesh = "
                                             r"'data=2,tensor=8' lays out 16: .* give both the same number"):
        tiny_config("m", mesh="data=2,tensor=8", train_mesh="data=8")
    assert tiny_config("m", mesh="data=2,tensor=8", train_mesh="data=16").train_mesh == "data=16"
    assert tiny_config("m", mesh="data=-1,tensor=8", train_mesh="data=8").train_mesh == "data=8"  # -1: any
    with pytest.raises(RunConfigError, match=r"remat must be one of \['none', 'minimal', 'full'\]"):
        tiny_config("m", remat="false")
    for value in ("none", "minimal", "full", True, False):
        assert tiny_config("m", remat=value).remat == value
    # attention: the platform's unless named; how it is computed does not change results
    assert tiny_config("m").attention is None and tiny_config("m", attention="chunked").attention == "chunked"
    assert config_differences(base, {**base, "attention": "chunked"}) == []
    with pytest.raises(RunConfigError, match=r"attention must be one of \['einsum', 'causal_blocks', 'chunked', 'splash', 'triton'\]"):
        tiny_config("m", attention="flash")


def test_passages_per_program_is_for_knowledge_and_restem_runs(tmp_path):
    """Knowledge runs (and ReST-EM, whose steps are knowledge runs) group passages; the other run kinds train
    their own way, and the key in their config is an error rather than a setting silently ignored."""
    experiments = Path(__file__).parents[1] / "experiments"
    for name, groups in (("seal-qwen3-8b", True), ("restem-demo", True), ("templates-archive-demo", False),
                         ("cpt-demo", False), ("continual-demo", False)):
        text = "\n".join(line for line in (experiments / f"{name}.toml").read_text().splitlines()
                         if not line.startswith("passages_per_program"))
        config = tmp_path / f"{name}.toml"
        config.write_text("passages_per_program = 2\n" + text.replace('"../shared/', f'"{experiments.parent.parent}/shared/'))
        if groups:
            assert getattr(load_config(config), "knowledge", load_config(config)).passages_per_program == 2
        else:
            with pytest.raises(RunConfigError, match="passages_per_program is for knowledge and ReST-EM runs"):
                load_config(config)


def test_extension_table_split_and_json():

    raw = {"model": "m", "data": {"source": "demo"}, "extra": {"rounds": 2}}
    knowledge_keys, table = split_extension_table(raw, "extra", {"rounds", "size"}, where="x.toml", kind="Extra",
                                                  conditions_note="has fixed conditions")
    assert knowledge_keys == {"model": "m", "data": {"source": "demo"}} and table == {"rounds": 2}
    assert "extra" in raw  # the caller's dict is not changed
    with pytest.raises(RunConfigError, match=r"x.toml: a Extra config needs a \[extra\] table"):
        split_extension_table({"model": "m"}, "extra", set(), where="x.toml", kind="Extra", conditions_note="")
    with pytest.raises(RunConfigError, match="x.toml: a Extra config has fixed conditions"):
        split_extension_table({**raw, "conditions": ["base"]}, "extra", {"rounds"}, where="x.toml", kind="Extra",
                              conditions_note="has fixed conditions")
    with pytest.raises(RunConfigError, match=r"unknown keys in \[extra\]: \['rounds'\]; known keys: \['size'\]"):
        split_extension_table(raw, "extra", {"size"}, where="x.toml", kind="Extra", conditions_note="")

    @dataclasses.dataclass(frozen=True)
    class Extended:
        knowledge: RunConfig
        rounds: int = 2

    knowledge = RunConfig.from_dict({"name": "x", "model": "m", "conditions": ["base"]})
    out = extension_json(knowledge, Extended(knowledge, rounds=3), "extra")
    assert out["extra"] == {"rounds": 3} and "conditions" not in out and out["model"] == "m"


def test_a_strategy_of_base_is_refused_by_its_own_table():
    import tomllib

    for file, table in (("restem-demo", "restem"), ("continual-demo", "continual")):
        raw = tomllib.loads((Path(__file__).parents[1] / "experiments" / f"{file}.toml").read_text())
        raw[table]["strategy"] = "base"
        with pytest.raises(RunConfigError, match=f"{table}.strategy 'base' does not (generate|write) self-edits"):
            load_config_from(raw, f"{file}.toml")


@pytest.mark.parametrize("file, table, key, value, message", [
    ("restem-demo", "restem", "positive_gain_only", "no", "restem.positive_gain_only must be true or false, got 'no'"),
    ("restem-demo", "restem", "rounds", "2", "restem.rounds must be an integer, got '2'"),
    ("templates-archive-demo", "templates", "sft", "false", "templates.sft must be true or false, got 'false'"),
    ("templates-archive-demo", "templates", "max_epochs", 2.5, "templates.max_epochs must be an integer or absent"),
    ("cpt-demo", "cpt", "eval_batch", True, "cpt.eval_batch must be an integer, got True"),
    ("continual-demo", "continual", "strategy", 3, "continual.strategy must be a string, got 3"),
])
def test_extension_tables_check_the_types_their_fields_declare(file, table, key, value, message):
    """A quoted "false" in TOML is a string that every truth test takes as true: refused, naming the key."""
    import tomllib

    raw = tomllib.loads((Path(__file__).parents[1] / "experiments" / f"{file}.toml").read_text())
    load_config_from(raw, f"{file}.toml")  # as written, it loads
    raw[table][key] = value
    with pytest.raises(RunConfigError, match=f"{file}.toml: {message}"):
        load_config_from(raw, f"{file}.toml")


def test_reward_option_and_resuming_folders_written_before_it():
    assert tiny_config("m").reward == "accuracy" and tiny_config("m", reward="gold_loglik").reward == "gold_loglik"
    with pytest.raises(RunConfigError, match=r"reward must be one of \('accuracy', 'gold_loglik'\), got 'loss'"):
        tiny_config("m", reward="loss")
    current = tiny_config("m").to_json()
    older = {k: v for k, v in current.items() if k != "reward"}  # a run folder from before the option
    assert config_differences(older, current) == []
    assert config_differences(older, {**current, "reward": "gold_loglik"}) == ["reward"]
    raw = {"name": "t", "model": "m", "reward": "gold_loglik", "templates": {"variant": "archive"}}
    assert load_config_from(raw).rescore_seeds  # the template search scores its seeds itself in nats/token
    with pytest.raises(RunConfigError, match="seed_scores = 'paper' gives the seeds accuracies"):
        load_config_from({**raw, "templates": {"variant": "archive", "seed_scores": "paper"}})


def test_hardware_tables_set_the_engine_settings_of_one_target(tmp_path):
    """``[hardware.<target>]`` gives a target its own mesh, train mesh, remat and passages per program over
    the top-level keys; a target without a table, or none, keeps the top-level ones."""
    hardware = {"tpu-v5p-8": {"mesh": "data=1,tensor=4", "train_mesh": "data=2,tensor=2", "passages_per_program": 1},
                "tpu-v5e-8": {"train_mesh": "", "remat": "full", "attention": "chunked"}}
    config = tiny_config("m", mesh="data=1,tensor=8", train_mesh="data=8", passages_per_program=2, hardware=hardware)
    v5p = config.on_target("tpu-v5p-8")
    assert (v5p.mesh, v5p.train_mesh, v5p.remat, v5p.passages_per_program) == ("data=1,tensor=4", "data=2,tensor=2",
                                                                             "minimal", 1)
    v5e = config.on_target("tpu-v5e-8")
    assert (v5e.mesh, v5e.train_mesh, v5e.remat, v5e.passages_per_program) == ("data=1,tensor=8", "", "full", 2)
    assert (v5e.attention, v5p.attention) == ("chunked", None)
    for other in (config.on_target("h100-8"), config.on_target(None)):  # the top-level settings, no tables
        assert other == dataclasses.replace(config, hardware={})
    assert v5p.hardware == {}  # the config of a run on that target (its run_config.json)
    # the settings a target gets are compared at the top level when a run resumes, not the tables
    assert config_differences(config.to_json(), {**config.to_json(), "hardware": {}}) == []
    assert config_differences(config.to_json(), v5p.to_json()) == ["mesh"]
    with pytest.raises(RunConfigError, match=r"--target: unknown target 'h100-4'; targets: .*h100-8 \(8 devices\)"):
        config.on_target("h100-4")
    # a resumed run whose mesh differs (another target's table) is told where meshes come from
    from seal_jax.selfedit.resume import save_run_config

    save_run_config(tmp_path, v5p.to_json(), resume=False)
    with pytest.raises(RunConfigError, match=r"differs in \['mesh'\] \(saved -> now: mesh 'data=1,tensor=4' -> 'data=1,tensor=8'\) \(the mesh may come from a \[hardware"):
        save_run_config(tmp_path, config.on_target("tpu-v5e-8").to_json(), resume=True)


@pytest.mark.parametrize("hardware, message", [
    ({"h100-4": {"mesh": "data=4"}}, r"\[hardware.h100-4\]: unknown target 'h100-4'; targets: .*h100-8 \(8 devices\)"),
    ({"h100-8": {"mesh": "data=8", "dtype": "float32"}}, r"unknown keys \['dtype'\]; .*keep the \[hardware\] tables after"),
    ({"tpu-v5p-8": {"mesh": "data=8", "train_mesh": "data=4"}}, r"its mesh 'data=8' does not lay out tpu-v5p-8's 4 devices"),
    ({"tpu-v5p-8": {"remat": "full"}}, r"the top-level mesh 'data=2,tensor=4' does not lay out tpu-v5p-8's 4 devices"),
    ({"tpu-v5p-8": {"mesh": "data=1,tensor=4"}}, r"the top-level train_mesh 'data=8' does not lay out .*\(\"\" to train on"),
    ({"tpu-v5p-8": {"mesh": "data=-1,tensor=4", "train_mesh": "data=3,tensor=2"}}, r"its train_mesh 'data=3,tensor=2'"),
    ({"h100-8": {"mesh": "data=2,tensr=4"}}, r"\[hardware.h100-8\]: mesh: unknown mesh axes \['tensr'\]"),
    ({"h100-8": {"mesh": 8}}, r"\[hardware.h100-8\]: mesh must be a string like"),
    ({"h100-8": {"train_weights": "zero3"}}, r"\[hardware.h100-8\]: train_weights must be one of"),
    ({"h100-8": {"attention": "flash"}}, r"\[hardware.h100-8\]: attention must be one of"),
    ({"h100-1": {"mesh": "", "train_mesh": ""}}, r"\[hardware.h100-1\]: train_mesh = \"\" trains on the mesh, .*"
                                                r"set train_weights = \"replicated\" in \[hardware.h100-1\] too"),
    ({"h100-8": "data=8"}, r"hardware must hold one table per target, like \[hardware.tpu-v5p-16\]"),
])
def test_hardware_table_mistakes_name_the_table(hardware, message):
    with pytest.raises(RunConfigError, match=message):
        tiny_config("m", mesh="data=2,tensor=4", train_mesh="data=8", train_weights="fsdp", hardware=hardware)


def test_hardware_tables_in_extension_configs(tmp_path):
    """A ReST-EM config's tables resolve through its knowledge config; a run kind that does not group passages
    refuses ``passages_per_program`` in a hardware table as at the top level."""
    experiments = Path(__file__).parents[1] / "experiments"
    shared = f'"{experiments.parent.parent}/shared/'
    for name, groups in (("restem-demo", True), ("cpt-demo", False)):
        text = (experiments / f"{name}.toml").read_text().replace('"../shared/', shared)
        path = tmp_path / f"{name}.toml"
        path.write_text(text + "\n[hardware.h100-1]\npassages_per_program = 2\nremat = \"full\"\n")
        if groups:
            resolved = load_config(path).on_target("h100-1")
            assert (resolved.knowledge.passages_per_program, resolved.knowledge.remat) == (2, "full")
            assert resolved.rounds == load_config(path).rounds
        else:
            with pytest.raises(RunConfigError, match="passages_per_program is for knowledge and ReST-EM runs"):
                load_config(path)


def test_the_mesh_is_checked_when_the_config_is_read(tmp_path):
    """A mesh that is no string, or no mesh spec, is refused with the file and the key when the config is read,
    not as a raw traceback (``mesh = 3``) or at run time (``mesh = "bogus"``)."""
    for line, message in (("mesh = 3", 'mesh must be a string like "data=2,tensor=4", got 3'),
                          ('mesh = "bogus"', "mesh: bad mesh spec part 'bogus'"),
                          ('mesh = "data=2,tensr=4"', r"mesh: unknown mesh axes \['tensr'\]"),
                          ('mesh = "data=8"\ntrain_mesh = "data=0"', "train_mesh: mesh axis sizes must be positive")):
        path = tmp_path / "mesh.toml"
        path.write_text(f'{line}\nname = "x"\nmodel = "m"\n')
        with pytest.raises(RunConfigError, match=f"{path}: {message}"):
            RunConfig.from_toml(path)
    assert tiny_config("m", mesh="data=2,tensor=4").mesh == "data=2,tensor=4" and tiny_config("m", mesh="").mesh == ""


def _experiment(file):
    import tomllib

    return tomllib.loads((Path(__file__).parents[1] / "experiments" / f"{file}.toml").read_text())


@pytest.mark.parametrize("file, table, key, value, message", [
    ("restem-demo", "restem", "sft_lora", {"rank": -1}, "restem.sft_lora: LoraSpec.rank must be a positive integer, got -1"),
    ("restem-demo", "restem", "sft_lora", "x", r"restem.sft_lora must be a table \(\[restem.sft_lora\] in TOML"),
    ("restem-demo", "restem", "sft_train", {"epochs": 0}, "restem.sft_train: TrainSpec.epochs must be"),
    ("restem-demo", "restem", "rounds", 0, "restem.rounds and restem.passages_per_round must be >= 1"),
    ("templates-archive-demo", "templates", "sft_lora", "x", r"templates.sft_lora must be a table"),
    ("templates-archive-demo", "templates", "sft_train", ["x"], r"templates.sft_train must be a table"),
    ("templates-archive-demo", "templates", "sft_lora", {"rnk": 3}, r".*templates.sft_lora.*'rnk'"),
    ("templates-archive-demo", "templates", "novelty", "x", "templates.novelty must be a table"),
    ("templates-archive-demo", "templates", "iterations", 0, "templates.iterations must be a positive integer, got 0"),
    ("cpt-demo", "cpt", "eval_batch", 0, "cpt.eval_batch must be a positive integer"),
    ("continual-demo", "continual", "passages", 0, "continual.passages must be a positive integer, got 0"),
])
def test_extension_table_errors_name_the_file_and_the_table(file, table, key, value, message):
    """Errors of an extension table, its sub-tables included, name the file as the top-level keys' do, and
    are RunConfigErrors (not a LoraError without a table, or a ValueError from dict())."""
    raw = _experiment(file)
    raw[table][key] = value
    with pytest.raises(RunConfigError, match=f"^{file}.toml: {message}"):
        load_config_from(raw, f"{file}.toml")


@pytest.mark.parametrize("file, section, key, value, message", [
    ("templates-archive-demo", None, "k", 3, "k = 3 is ignored by a template-search run: templates.fills sets"),
    ("templates-archive-demo", None, "repeats", 2, "repeats = 2 is ignored by a template-search run"),
    ("templates-archive-demo", "lora", "rank", 8, r"lora.rank = 8 is ignored .*each template sets its own LoRA rank"),
    ("templates-archive-demo", "lora", "alpha", 16.0, "lora.alpha = 16.0 is ignored"),
    ("templates-archive-demo", "lora", "dropout", 0.1, "lora.dropout = 0.1 is ignored"),
    ("templates-archive-demo", "train", "learning_rate", 1e-3, "train.learning_rate = 0.001 is ignored .*own learning rate"),
    ("templates-archive-demo", "train", "epochs", 3, "train.epochs = 3 is ignored .*templates.max_epochs caps"),
    ("templates-archive-demo", "train", "grad_accum", 2, "train.grad_accum = 2 is ignored"),
    ("templates-archive-demo", "selfedit_sampling", "max_new_tokens", 64,
     "selfedit_sampling.max_new_tokens = 64 is ignored .*templates.fill_max_new_tokens"),
    ("templates-archive-demo", None, "template_condition", {"max_retries": 1}, r"\[template_condition\] is ignored"),
    ("continual-demo", None, "k", 3, "k = 3 is ignored by a continual run: each step writes one self-edit"),
    ("continual-demo", None, "repeats", 3, "repeats = 3 is ignored by a continual run"),
    ("cpt-demo", None, "repeats", 3, "repeats = 3 is ignored by a CPT run: each condition trains one adapter"),
    ("cpt-demo", None, "include_passage", False, "include_passage = False is ignored by a CPT run"),
    ("restem-demo", None, "template_condition", {"archive": False}, r"\[template_condition\] is ignored by a ReST-EM"),
])
def test_keys_a_run_kind_ignores_are_refused(file, section, key, value, message):
    """A knowledge key that a run kind's loop never reads (the run sets that value itself) is an error saying
    what sets it, as ``passages_per_program`` is, rather than a setting silently ignored; its default (which
    every saved ``run_config.json`` holds) passes."""
    raw = _experiment(file)
    (raw.setdefault(section, {}) if section else raw)[key] = value
    with pytest.raises(RunConfigError, match=f"{file}.toml: {message}"):
        load_config_from(raw, f"{file}.toml")
    config = load_config_from(_experiment(file), f"{file}.toml")
    assert load_config_from(config.to_json(), "run_config.json") == config  # k = 1, repeats = 1 … as saved


def test_seeds_in_the_train_and_sampling_tables_are_refused(tiny_chat_dir):
    """Every adapter's and every self-edit's seed derives from the run's seed: a seed in [train] or
    [selfedit_sampling] would be overwritten, so it is refused, and the known keys no longer offer it."""
    with pytest.raises(RunConfigError, match="train.seed is ignored: each adapter's training seed derives from the "
                                             "run's top-level seed; remove train.seed"):
        tiny_config(tiny_chat_dir, train={"seed": 3})
    with pytest.raises(RunConfigError, match="selfedit_sampling.seed is ignored"):
        tiny_config(tiny_chat_dir, selfedit_sampling={"temperature": 1.0, "seed": 3})
    with pytest.raises(RunConfigError, match="selfedit_sampling.seed is ignored"):
        load_config_from({**_experiment("continual-demo"), "selfedit_sampling": {"seed": 1}}, "continual-demo.toml")
    with pytest.raises(RunConfigError, match=r"known keys: \[[^\]]*\]$") as known:
        tiny_config(tiny_chat_dir, selfedit_sampling={"temprature": 0.5})
    assert "'seed'" not in str(known.value)


def test_empty_ids_and_the_selfedits_message(tiny_chat_dir):
    from seal_jax.selfedit.run_config import select_data

    with pytest.raises(RunConfigError, match="data.ids is empty, which selects no passage"):
        tiny_config(tiny_chat_dir, data={"source": "demo", "ids": []})
    with pytest.raises(RunConfigError, match=r"data.ids must be a list of passage ids \(strings\), got \[1\]"):
        tiny_config(tiny_chat_dir, data={"source": "demo", "ids": [1]})
    # the message names only what needs the self-edits file
    with pytest.raises(RunConfigError, match="^data.subset = 'selfedits' needs data.selfedits") as subset:
        select_data({"source": "demo", "subset": "selfedits"})
    assert "replay" not in str(subset.value)
    with pytest.raises(RunConfigError, match="^the self-edits of condition 'replay' need data.selfedits") as replay:
        select_data({"source": "demo"}, replay=True)
    assert "subset" not in str(replay.value)
    with pytest.raises(RunConfigError, match="condition 'replay' and data.subset = 'selfedits' need data.selfedits"):
        select_data({"source": "demo", "subset": "selfedits"}, replay=True)
