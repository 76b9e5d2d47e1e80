"""Multi-host: two processes on localhost, four CPU devices each, one global mesh of eight: logits, LoRA training
and greedy decoding equal a single process's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import seal_jax as sj
from seal_jax.lm.model import LoraInputs

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_both(commands: list[list[str]], envs: list[dict[str, str]], timeout: float) -> None:
    """Start the two worker processes, wait for both (killing both on a timeout), and assert both succeeded."""
    procs = [subprocess.Popen([sys.executable, *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for cmd, env in zip(commands, envs, strict=True)]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]


def test_distributed_two_processes_match_single_process(tiny_hf, tiny_chat_dir, tmp_path):
    _, folder = tiny_hf("qwen3-untied")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # process 0 starts from arguments, process 1 from the environment (SEAL_JAX_*)
    env1 = {**env, "SEAL_JAX_COORDINATOR": f"127.0.0.1:{port}", "SEAL_JAX_NUM_PROCESSES": "2",
            "SEAL_JAX_PROCESS_ID": "1", "SEAL_JAX_CPU_COLLECTIVES": "gloo"}
    _run_both([[str(WORKER), str(i), str(port), str(folder), str(tmp_path), str(tiny_chat_dir)]
               + (["env"] if i else []) for i in range(2)], [env, env1], timeout=240)
    ids = np.random.default_rng(0).integers(0, 160, (4, 9))
    single = sj.load(folder, progress=False).logits(ids)
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"logits{i}.npy"), single, atol=1e-5, rtol=0)
    # the training call and the greedy decodes equal the single-process run's
    import importlib.util

    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    lm = sj.load(tiny_chat_dir, progress=False)
    adapters = lm.train_adapters(worker.TRAIN_TEXTS, sj.LoraSpec(rank=4, alpha=8.0),
                                 sj.TrainSpec(learning_rate=1e-2, epochs=2, max_len=32))
    greedy = sj.SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompts = [[3, 14, 15, 9], [2, 6, 5]]
    for i in range(2):
        got = np.load(tmp_path / f"train{i}.npz")
        for k, history in enumerate(adapters.losses):
            np.testing.assert_allclose(got[f"losses{k}"], history, rtol=1e-4)
        for p, ab in adapters.weights.items():
            for n, x in ab.items():  # gloo's cross-process sums round differently, and Adam's normalised steps
                # amplify float noise in near-zero gradients: 2.9e-4 at most after 4 steps at lr 1e-2 on one
                # machine, 6.2e-4 on an AMD EPYC (one element of 1,024; the same size as between remat "none"
                # and "minimal" in one process, 2.6e-4). A tenth of one step bounds every element, and
                # nearly all agree within 1e-4 (97.9% within 1e-5 on the EPYC).
                diff = np.abs(got[f"{p}.{n}"] - np.asarray(x))
                assert diff.max() <= 1e-3, (p, n, diff.max())
                assert np.mean(diff <= 1e-4) >= 0.99, (p, n, np.mean(diff <= 1e-4))
        assert got["base"].tolist() == lm.generate_ids(prompts, greedy)
        # decoding under the two-process run's own adapters gives the same tokens in one process (its weights
        # differ from the single-process ones by gloo's rounding, which can flip a late greedy token)
        theirs = LoraInputs(weights={p: {n: np.asarray(got[f"{p}.{n}"]) for n in ab}
                                     for p, ab in adapters.weights.items()}, scale=adapters.scales)
        assert got["adapted"].tolist() == lm.generate_ids(prompts, greedy, adapters=theirs)
        assert got["adapted"].tolist() != [got["base"].tolist()] * 2  # the adapters changed the answers


def test_distributed_knowledge_run_writes_each_row_once(tiny_chat_dir, tmp_path):
    """Two processes run a knowledge run into one shared folder, and another one stopped after a passage
    and resumed: process 0 alone writes (each row once), both processes resume from its rows (the resumed
    folder equals the uninterrupted one), also when each process is given its own folder; and the rows
    are about what a one-process run's rows are about."""
    from seal_jax.selfedit.knowledge import run_knowledge
    from seal_jax.selfedit.results import read_rows
    from seal_jax.selfedit.run_config import RunConfig

    worker = Path(__file__).with_name("distributed_run_worker.py")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    shared = tmp_path / "shared"
    _run_both([[str(worker), str(i), str(port), str(tiny_chat_dir), str(shared)] for i in range(2)], [env, env],
              timeout=400)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    full, part = read_rows(shared / "full" / "results.jsonl"), read_rows(shared / "part" / "results.jsonl")
    assert len(full) == 2 * 3  # 2 passages x (base, passage, implications): each row written once
    assert strip(part) == strip(full)
    assert (shared / "part" / "summary.json").read_text() == (shared / "full" / "summary.json").read_text()
    # a folder per process: process 1 writes nothing and resumes from process 0's rows
    assert strip(read_rows(shared / "own" / "p0" / "results.jsonl")) == strip(full)
    assert not (shared / "own" / "p1").exists()

    import importlib.util

    spec = importlib.util.spec_from_file_location("distributed_run_worker", worker)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    single = tmp_path / "single"
    config = RunConfig.from_dict({**run.RUN, "model": str(tiny_chat_dir)})
    run_knowledge(config, single, lm=sj.load(tiny_chat_dir, progress=False), progress=False)
    # a random tiny model's greedy answers flip on float noise (gloo sums round differently), so compare
    # what the rows are about, not the answers
    keys = ("passage_id", "condition", "candidate")
    questions = [[(a["question"], a["gold"]) for a in r["answers"]] for r in full]
    assert [tuple(r[k] for k in keys) for r in full] == [tuple(r[k] for k in keys) for r in read_rows(single / "results.jsonl")]
    assert questions == [[(a["question"], a["gold"]) for a in r["answers"]] for r in read_rows(single / "results.jsonl")]


def test_distributed_restem_and_template_search_write_once(tiny_chat_dir, tmp_path):
    """Two processes run a ReST-EM run and a template search into one shared folder, each once uninterrupted
    and once stopped early and resumed: process 0 alone writes (each row once; process 1 writes nothing
    and reads only the exported generators, checked in the worker), both processes follow process 0's
    folder (the resumed folders equal the uninterrupted ones), later ReST-EM rounds load their generator
    onto the starting model's global mesh when the config names none (checked in the worker), and every
    exported generator is one finished Hugging Face folder that loads."""
    import importlib.util
    import json
    from collections import Counter

    from transformers import AutoConfig

    from seal_jax.selfedit.results import read_rows

    worker = Path(__file__).with_name("distributed_run_worker.py")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    shared = tmp_path / "shared"
    _run_both([[str(worker), str(i), str(port), str(tiny_chat_dir), str(shared), "restem,templates"]
               for i in range(2)], [env, env], timeout=600)
    spec = importlib.util.spec_from_file_location("distributed_run_worker", worker)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    def rows_once(path, n):
        rows = read_rows(path)
        keys = Counter((r["passage_id"], r["condition"], r["candidate"], r.get("repeat")) for r in rows)
        assert len(rows) == n and max(keys.values()) == 1, path
        return rows

    def same_json(part, full, name):  # run-folder paths inside the file name their own folder
        text = (part / name).read_text().replace(str(part), str(full))
        assert json.loads(text) == json.loads((full / name).read_text()), name

    def generator_loads(folder):
        assert not folder.with_name("generator.tmp").exists()
        AutoConfig.from_pretrained(folder)
        lm = sj.load(folder, progress=False)
        assert np.isfinite(lm.logits(np.array([[3, 14, 15, 9]]))).all()

    # ReST-EM: 2 rounds x 1 passage x (base + K=2 self-edits), 1 held-out passage x 3 rows per round
    config = run.restem_config(str(tiny_chat_dir))
    k = config.knowledge.k
    full, part = shared / "restem" / "full", shared / "restem" / "part"
    for r in range(config.rounds + 1):
        name, n = f"round-{r}/eval/results.jsonl", config.eval_data["n"] * (1 + k)
        assert strip(rows_once(part / name, n)) == strip(rows_once(full / name, n))
        if r:
            name, n = f"round-{r}/results.jsonl", config.passages_per_round * (1 + k)
            assert strip(rows_once(part / name, n)) == strip(rows_once(full / name, n))
            assert read_rows(part / f"round-{r}" / "sft_rows.jsonl") == read_rows(full / f"round-{r}" / "sft_rows.jsonl")
            assert 1 <= len(read_rows(full / f"round-{r}" / "sft_rows.jsonl")) <= config.passages_per_round
            same_json(part, full, f"round-{r}/round.json")
            for folder in (full, part):
                generator_loads(folder / f"round-{r}" / "generator")
            assert (part / f"round-{r}" / "generator" / "model.safetensors").read_bytes() == (
                full / f"round-{r}" / "generator" / "model.safetensors").read_bytes()
    assert json.loads((full / "round-2" / "round.json").read_text())["trained_from"] == "round-1/generator"
    same_json(part, full, "summary.json")
    assert [e["round"] for e in json.loads((full / "summary.json").read_text())["rounds"]] == [0, 1, 2]

    # template search: 2 iterations x 1 passage x (base + 2 templates x 1 fill); the explore slot retried once
    config = run.templates_config(str(tiny_chat_dir))
    full, part = shared / "templates" / "full", shared / "templates" / "part"
    for it in range(1, config.iterations + 1):
        folder = Path(f"iteration-{it}")
        n = config.passages * (1 + config.templates_per_iteration * config.fills)
        assert strip(rows_once(part / folder / "results.jsonl", n)) == strip(rows_once(full / folder / "results.jsonl", n))
        proposals = read_rows(full / folder / "proposals.jsonl")
        assert [(p["slot"], p["attempt"], p["valid"]) for p in proposals] == [(0, 0, True), (1, 0, False), (1, 1, True)]
        assert read_rows(part / folder / "proposals.jsonl") == proposals
        same_json(part, full, f"iteration-{it}/iteration.json")
    sft = read_rows(full / "iteration-1" / "sft_rows.jsonl")
    assert len(sft) == config.passages * 2 * 2 and read_rows(part / "iteration-1" / "sft_rows.jsonl") == sft
    assert not (full / "iteration-2" / "sft_rows.jsonl").exists()  # no SFT after the last iteration
    for folder in (full, part):
        generator_loads(folder / "iteration-1" / "generator")
        assert not (folder / "iteration-2" / "generator").exists()
    assert (part / "iteration-1" / "generator" / "model.safetensors").read_bytes() == (
        full / "iteration-1" / "generator" / "model.safetensors").read_bytes()
    archive = (full / "archive.jsonl").read_text().splitlines()
    assert len(archive) == 4 + 2 * config.templates_per_iteration and (part / "archive.jsonl").read_text() == (
        full / "archive.jsonl").read_text()
    same_json(part, full, "summary.json")
