"""Template search end to end on a random tiny model: the three variants, the archive and its meta-prompt,
heterogeneous candidates, SFT rows, the all-invalid path, resume, summary and report.

A random tiny model never writes valid JSON, so :class:`CannedLM` wraps the real tiny LM: meta-prompt and
fill generations return fixed valid text; training, answering and grading run on the real model.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import seal_jax as sj
from seal_jax.selfedit import template_search
from seal_jax.selfedit.archive import Archive, ArchiveEntry
from seal_jax.selfedit.data import DataError
from seal_jax.selfedit.generator import Models
from seal_jax.selfedit.results import ROW_FIELDS, Measure, StateFileError, read_rows
from seal_jax.selfedit.run_config import RunConfigError
from seal_jax.selfedit.runs import config_from_dict, kind_of
from seal_jax.selfedit.template_search import (
    TEMPLATE_ROW_FIELDS,
    TemplateSearchConfig,
    _Search,
    eval_passages,
    run_template_search,
    summarize_template_search,
    template_markdown,
    template_passage_rows,
    training_passages,
)
from seal_jax.selfedit.template_stats import template_scores
from seal_jax.selfedit.templates import Template

TEMPLATE_A = {"data_creation_instruction": "List every fact of the passage as short separate sentences.",
              "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 0.005, "num_epochs": 2,
              "gradient_accumulation_steps": 1}
TEMPLATE_B = {"data_creation_instruction": "Write questions and answers that cover the passage in full detail.",
              "lora_rank": 8, "lora_alpha": 4, "lora_dropout": 0.1, "learning_rate": 0.003, "num_epochs": 1,
              "gradient_accumulation_steps": 2}
FILL = {"training_sequences": ["Velmora is a harbour town.", "Its ferries run to Ostrel every morning."]}


class CannedLM:
    """The real LM, except that meta-prompt and fill generations (no adapters) return canned text.

    Exploit proposals answer TEMPLATE_A, explore proposals TEMPLATE_B after one invalid answer per
    meta-prompt (so every run has a retry). Records meta-prompts and every ``train_adapters`` call's specs.
    """

    def __init__(self, lm, fills: bool = True):
        self.lm, self.fills = lm, fills
        self.meta_prompts: list[str] = []
        self.train_calls: list[tuple[list, list]] = []
        self._explored: set[str] = set()

    def generate(self, prompts, params, adapters=None, chat=False, **kwargs):
        if adapters is None and prompts[0].startswith("You are designing a learning plan"):
            self.meta_prompts.append(prompts[0])
            if params.temperature > 1.0:  # explore
                if prompts[0] not in self._explored:
                    self._explored.add(prompts[0])
                    return ["I would rather not write JSON today."] * len(prompts)
                return [json.dumps(TEMPLATE_B)] * len(prompts)
            return [json.dumps(TEMPLATE_A)] * len(prompts)
        if adapters is None and self.fills and prompts[0].startswith("Passage:\n"):
            return [json.dumps(FILL)] * len(prompts)
        return self.lm.generate(prompts, params, adapters=adapters, chat=chat, **kwargs)

    def train_adapters(self, sequences, lora=None, train=None, seed=0):
        self.train_calls.append((list(lora) if isinstance(lora, list) else [lora],
                                 list(train) if isinstance(train, list) else [train]))
        return self.lm.train_adapters(sequences, lora, train, seed=seed)

    def merge_adapter(self, adapters, k=0):
        return self.lm.merge_adapter(adapters, k)

    def __getattr__(self, name):
        return getattr(self.lm, name)


def search_raw(model_dir, **templates):
    table = {"variant": "archive", "iterations": 2, "templates_per_iteration": 2, "fills": 2, "passages": 2,
             "proposal_max_new_tokens": 16, "fill_max_new_tokens": 16, "max_retries": 1,
             "similarity_backend": "tfidf", "sft_lora": {"rank": 4, "alpha": 8.0},
             "sft_train": {"learning_rate": 1e-3, "epochs": 1, "max_len": 2048}}
    table.update(templates)
    return dict(name="tiny-search", model=str(model_dir), chat=True, data={"source": "demo", "start": 0},
                selfedit_sampling={"temperature": 1.0, "top_p": 0.95}, lora={"targets": ["q_proj", "v_proj"]},
                train={"max_len": 128}, include_passage=False, eval_max_new_tokens=8, templates=table)


@pytest.fixture(scope="module")
def tiny_lm(tiny_chat_dir):
    return sj.load(tiny_chat_dir, progress=False)


def canned_loader(made: list, paths: list | None = None):
    def load(path):
        lm = CannedLM(sj.load(path, progress=False))
        made.append(lm)
        if paths is not None:
            paths.append(path)
        return lm
    return load


def strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def archive_run(tiny_chat_dir, tiny_lm, tmp_path_factory):
    config = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir))
    out = tmp_path_factory.mktemp("archive-run")
    first = CannedLM(tiny_lm)
    later: list[CannedLM] = []
    summary = run_template_search(config, out, lm=first, progress=False, loader=canned_loader(later))
    return config, out, summary, first, later


def test_proposals_are_retried_and_every_attempt_recorded(archive_run):
    _, out, _, _, _ = archive_run
    proposals = read_rows(out / "iteration-1" / "proposals.jsonl")
    # slot 0 exploit (valid at once), slot 1 explore (invalid, then valid on the retry)
    assert [(p["slot"], p["kind"], p["attempt"], p["valid"]) for p in proposals] == [
        (0, "exploit", 0, True), (1, "explore", 0, False), (1, "explore", 1, True)]
    assert "no JSON object" in proposals[1]["reason"] and proposals[1]["template"] is None
    assert proposals[2]["template"] == Template.from_dict(TEMPLATE_B).to_dict()
    assert (out / "iteration-1" / "meta_prompt.txt").read_text().startswith("You are designing")


def test_rows_scores_and_heterogeneous_candidates(archive_run):
    config, out, _, first, _ = archive_run
    rows = read_rows(out / "iteration-1" / "results.jsonl")
    assert len(rows) == 2 * (1 + 2 * 2)  # 2 passages x (base + 2 templates x 2 fills)
    for r in rows:
        assert set(ROW_FIELDS) | set(TEMPLATE_ROW_FIELDS) <= set(r)
    fills = [r for r in rows if r["template_id"]]
    assert {r["template_id"] for r in fills} == {"it1-t0", "it1-t1"}
    assert {r["fill_index"] for r in fills} == {0, 1}
    assert all(r["fill_sequences"] == FILL["training_sequences"] and not r["fill_fallback"] for r in fills)
    assert all(r["n_sequences"] == 2 for r in fills)  # include_passage = false: the fill's texts only
    for r in fills:
        b = r["accuracy_before"]
        assert r["normalized_gain"] == pytest.approx((r["accuracy_after"] - b) / (1 - b) if b < 1 else 0.0)
    scores = template_scores(rows)
    for tid, s in scores.items():
        mine = [r["accuracy_after"] for r in fills if r["template_id"] == tid]
        assert s["score"] == pytest.approx(sum(mine) / len(mine)) and s["fills"] == 4 and s["valid_fills"] == 4
    # one train_adapters call per passage, each template's own hyperparameters per candidate
    lora, train = first.train_calls[0]
    assert [s.rank for s in lora] == [4, 4, 8, 8] and [s.alpha for s in lora] == [8.0, 8.0, 4.0, 4.0]
    assert [s.dropout for s in lora] == [0.0, 0.0, 0.1, 0.1]
    assert [t.learning_rate for t in train] == [0.005, 0.005, 0.003, 0.003]
    assert [t.epochs for t in train] == [2, 2, 1, 1] and [t.grad_accum for t in train] == [1, 1, 2, 2]
    assert all(t.max_len == 128 and t.batch_size == 1 for t in train)
    assert len({t.seed for t in train}) == 4  # every candidate has its own seed


def test_archive_grows_and_the_shown_entries_enter_the_next_meta_prompt(archive_run):
    config, out, _, first, later = archive_run
    archive = Archive.from_jsonl(out / "archive.jsonl")
    assert len(archive) == 4 + 2 + 2
    assert [e.name for e in archive.entries[4:]] == ["it1-t0", "it1-t1", "it2-t0", "it2-t1"]
    scores = template_scores(read_rows(out / "iteration-1" / "results.jsonl"))
    assert archive.entries[4].score == pytest.approx(scores["it1-t0"]["score"])
    assert archive.entries[4].gain == pytest.approx(scores["it1-t0"]["gain"])
    after_one = Archive([*Archive.seeded().entries, *archive.entries[4:6]])
    shown = after_one.shown()
    assert len(shown) == 4
    (meta2,) = {m for lm in later for m in lm.meta_prompts}  # iteration 2 asks the SFT'd generator
    for number, entry in enumerate(shown, 1):
        assert f"Plan {number} (score {entry.score:.3f}):\n{entry.template.to_json()}" in meta2
    assert meta2 == (out / "iteration-2" / "meta_prompt.txt").read_text()
    info = json.loads((out / "iteration-2" / "iteration.json").read_text())
    assert info["shown"] == [e.name for e in shown]
    # iteration 1 showed the four human seeds
    meta1 = first.meta_prompts[0]
    assert all(e.template.to_json() in meta1 for e in Archive.seeded().entries)


def test_sft_rows_and_the_next_generator(archive_run, tiny_chat_dir):
    from transformers import AutoConfig

    config, out, _, _, later = archive_run
    sft = read_rows(out / "iteration-1" / "sft_rows.jsonl")
    # 2 passages x top-2 templates x (template row + fill row)
    assert len(sft) == 2 * 2 * 2
    assert [r["kind"] for r in sft] == ["template", "fill"] * 4
    for r in sft:
        assert r["prompt"].startswith("<|im_start|>user\n") and r["prompt"].endswith("<|im_start|>assistant\n")
        if r["kind"] == "template":
            assert "You are designing" in r["prompt"]
            assert Template.from_dict(json.loads(r["completion"])).to_dict() in (
                Template.from_dict(TEMPLATE_A).to_dict(), Template.from_dict(TEMPLATE_B).to_dict())
        else:
            assert json.loads(r["completion"]) == FILL
    AutoConfig.from_pretrained(out / "iteration-1" / "generator")
    info1 = json.loads((out / "iteration-1" / "iteration.json").read_text())
    info2 = json.loads((out / "iteration-2" / "iteration.json").read_text())
    # saved relative to the run folder (the folder may move); the starting model as the config names it
    assert info1["next_generator"] == "iteration-1/generator" == info2["generator"] == info2["inner_model"]
    assert info1["generator"] == info1["inner_model"] == config.knowledge.model == str(tiny_chat_dir)
    assert info2["next_generator"] == "iteration-1/generator"  # no SFT after the last iteration: carried over
    assert not (out / "iteration-2" / "sft_rows.jsonl").exists()  # no SFT after the last iteration
    assert len(later) == 1 and later[0].train_calls  # the SFT'd generator trained iteration 2's candidates


def test_summary_and_report(archive_run, capsys):
    from seal_jax.cli import main

    _, out, summary, _, _ = archive_run
    assert [e["iteration"] for e in summary["iterations"]] == [1, 2]
    e = summary["iterations"][0]
    assert e["finished"] and e["valid_templates"] == 2 and e["proposals"] == 3
    assert e["valid_fills"] == e["fills"] == 8 and e["passages"] == 2
    assert e["similarity_backend"] == "tfidf"
    a, b = Template.from_dict(TEMPLATE_A), Template.from_dict(TEMPLATE_B)
    assert e["hyperparameter_similarity"] == pytest.approx(sj.templates.hyperparameter_similarity([a, b]))
    assert e["instruction_similarity"] == pytest.approx(sj.templates.instruction_similarity(
        [a.data_creation_instruction, b.data_creation_instruction], backend="tfidf"))
    assert e["mean_sequence_chars"] == sum(len(s) for s in FILL["training_sequences"])
    assert e["best_score"] >= e["mean_score"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | 2/3 | 8/8 |" in printed and "variant `archive`" in printed
    assert (out / "iterations.png").read_bytes()[:4] == b"\x89PNG"
    # an iteration still running with no fill scored yet: no characters per fill to show
    running = {**e, "finished": False, "valid_fills": 0, "fills": 0, "mean_sequence_chars": 0.0, "best_template": None}
    (row,) = [line for line in template_markdown({**summary, "iterations": [running]}).splitlines()
              if line.startswith("| 1 (running)")]
    assert "(tfidf) | – | " in row


def test_noarchive_and_novelty_variants(tiny_chat_dir, tiny_lm, tmp_path):
    noarchive = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, variant="noarchive", sft=False, fills=1,
                                                          passages=1))
    lm = CannedLM(tiny_lm)
    summary = run_template_search(noarchive, tmp_path / "noarchive", lm=lm, progress=False)
    assert len(summary["iterations"]) == 2 and all(e["valid_templates"] == 2 for e in summary["iterations"])
    assert lm.meta_prompts and all("Plans tried so far" not in m for m in lm.meta_prompts)
    assert len(Archive.from_jsonl(tmp_path / "noarchive" / "archive.jsonl")) == 4 + 4  # kept for the record
    assert not (tmp_path / "noarchive" / "iteration-1" / "generator").exists()  # sft = false

    novelty = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, variant="novelty", sft=False, fills=1,
                                                        passages=1, novelty={"k": 2, "lam": 0.5}))
    lm = CannedLM(tiny_lm)
    run_template_search(novelty, tmp_path / "novelty", lm=lm, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "novelty" / "archive.jsonl").read_text().splitlines()]
    entries = [ArchiveEntry.from_dict(r) for r in rows]
    archive = novelty.make_archive(entries[4:6])
    assert archive.lam == 0.5 and archive.k == 2 and archive.backend == "tfidf"
    meta2 = lm.meta_prompts[-1]
    assert "novelty" in meta2
    for entry in archive.shown():
        assert f"score {entry.score:.3f}, novelty {entry.novelty:.3f}" in meta2


@pytest.fixture(scope="module")
def long_tiny_lm(tiny_chat_dir, tmp_path_factory):
    """The tiny model with a 4,096-token context (RoPE has no position table), so the meta-prompt (2,000+
    tokens with the tiny tokenizer) fits."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-long")
    shutil.copytree(tiny_chat_dir, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return sj.load(folder, progress=False)


def test_all_invalid_proposals_and_fills_are_recorded(tiny_chat_dir, long_tiny_lm, tmp_path):
    """The real random model: every proposal is invalid; no template, only base rows, no crash."""
    tiny_lm = long_tiny_lm
    config = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, iterations=1, passages=1))
    summary = run_template_search(config, tmp_path / "invalid", lm=tiny_lm, progress=False)
    proposals = read_rows(tmp_path / "invalid" / "iteration-1" / "proposals.jsonl")
    assert len(proposals) == 2 * 2 and not any(p["valid"] for p in proposals)  # 2 slots x (1 + 1 retry)
    assert all(p["reason"] for p in proposals)
    rows = read_rows(tmp_path / "invalid" / "iteration-1" / "results.jsonl")
    assert [r["condition"] for r in rows] == ["base"]
    e = summary["iterations"][0]
    assert e["valid_templates"] == 0 and e["best_score"] is None and e["hyperparameter_similarity"] is None
    assert len(Archive.from_jsonl(tmp_path / "invalid" / "archive.jsonl")) == 4
    # canned templates, but the real model's fills: failures with their reason, or the 'lines' fallback
    for fallback in ("none", "lines"):
        config = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, iterations=1, passages=1, fills=1,
                                                           fill_fallback=fallback, fill_max_new_tokens=12))
        run_template_search(config, tmp_path / fallback, lm=CannedLM(tiny_lm, fills=False), progress=False)
        fills = [r for r in read_rows(tmp_path / fallback / "iteration-1" / "results.jsonl") if r["template_id"]]
        assert len(fills) == 2
        for r in fills:
            if fallback == "none":
                assert r["failure"].startswith("fill: ") and r["n_sequences"] == 0
                assert r["accuracy_after"] == r["accuracy_before"]
            elif r["n_sequences"]:
                assert r["fill_fallback"] and r["fill_sequences"]
            else:
                assert "fallback found no usable line" in r["failure"]


def test_killed_search_resumes_to_the_same_results(tiny_chat_dir, tiny_lm, tmp_path, archive_run):
    config, full, _, _, _ = archive_run
    part = tmp_path / "part"
    run_template_search(config, part, lm=CannedLM(tiny_lm), progress=False, stop_after=1, loader=canned_loader([]))
    assert len({r["passage_id"] for r in read_rows(part / "iteration-1" / "results.jsonl")}) == 1
    assert not (part / "iteration-1" / "iteration.json").exists()
    with (part / "iteration-1" / "results.jsonl").open("a") as f:
        f.write('{"passage_id": "demo-1", "torn')
    with pytest.raises(FileExistsError, match="--resume"):
        run_template_search(config, part, lm=CannedLM(tiny_lm), progress=False)
    # killed again inside iteration 2 (after iteration 1's SFT)
    run_template_search(config, part, lm=CannedLM(tiny_lm), progress=False, resume=True, stop_after=2,
                        loader=canned_loader([]))
    assert (part / "iteration-1" / "iteration.json").exists() and not (part / "iteration-2" / "iteration.json").exists()
    run_template_search(config, part, lm=CannedLM(tiny_lm), progress=False, resume=True, loader=canned_loader([]))
    for it in (1, 2):
        for name in ("results.jsonl", "proposals.jsonl"):
            assert strip(read_rows(part / f"iteration-{it}" / name)) == strip(read_rows(full / f"iteration-{it}" / name))
    assert read_rows(part / "iteration-1" / "sft_rows.jsonl") == read_rows(full / "iteration-1" / "sft_rows.jsonl")
    assert (part / "iteration-1" / "generator" / "model.safetensors").read_bytes() == (
        full / "iteration-1" / "generator" / "model.safetensors").read_bytes()
    assert (part / "archive.jsonl").read_text() == (full / "archive.jsonl").read_text()
    changed = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, fills=3))
    with pytest.raises(RunConfigError, match="differs in \\['templates'\\]"):
        run_template_search(changed, part, lm=tiny_lm, progress=False, resume=True)


def test_resume_reads_the_meta_prompt_back(tiny_chat_dir, tiny_lm, tmp_path, monkeypatch, capsys):
    """A resumed iteration keeps the meta-prompt its saved proposals answered, even when rebuilding it now
    would give another text (``novelty`` with backend ``auto`` after the MiniLM weights appeared or vanished):
    the SFT must pair the templates with the prompt the generator saw."""
    from seal_jax.lm.tokenizer import format_chat
    from seal_jax.selfedit import template_search

    config = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, fills=1))
    out = tmp_path / "run"
    run_template_search(config, out, lm=CannedLM(tiny_lm), progress=False, stop_after=1, loader=canned_loader([]))
    meta1 = (out / "iteration-1" / "meta_prompt.txt").read_text()
    assert not (out / "iteration-1" / "iteration.json").exists()
    original = template_search.meta_prompt
    changed = "\n(rebuilt on resume with another similarity backend)"
    monkeypatch.setattr(template_search, "meta_prompt",
                        lambda shown, reward="accuracy": original(shown, reward) + changed)
    assert "tiny-search iteration" not in capsys.readouterr().err  # progress=False: no step lines
    # finishes iteration 1 (its SFT) and stops in iteration 2 before any passage; says each silent step
    run_template_search(config, out, lm=CannedLM(tiny_lm), progress=True, resume=True, stop_after=1,
                        loader=canned_loader([]))
    said = [line for line in capsys.readouterr().err.splitlines() if re.match(r"tiny-search iteration \d+: ", line)]
    generator = out / "iteration-1" / "generator"
    # the generator's SFT, merge and export (test_generator holds their wording) under the iteration's label
    sft = [line for line in said if line.startswith("tiny-search iteration 1: ")]
    assert len(sft) == 5 and "generator SFT on" in sft[0] and sft[-1].endswith(f"to {generator}")
    patterns = [r"tiny-search iteration 2: proposing 2 templates \.\.\.",
                r"tiny-search iteration 2: 2 valid templates of 3 attempts in \d+\.\d s"]
    assert said[5:] == [line for line in said if line.startswith("tiny-search iteration 2: ")] and len(said) == 7
    for line, pattern in zip(said[5:], patterns, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    info = json.loads((out / "iteration-1" / "iteration.json").read_text())
    assert (out / "iteration-1" / "meta_prompt.txt").read_text() == meta1 == info["meta_prompt"]
    prompts = {r["prompt"] for r in read_rows(out / "iteration-1" / "sft_rows.jsonl") if r["kind"] == "template"}
    assert prompts == {format_chat(tiny_lm.tokenizer, meta1)}
    assert (out / "iteration-2" / "meta_prompt.txt").read_text().endswith(changed)  # the patch was in effect


def test_a_moved_run_folder_resumes_from_its_own_generator(archive_run, tiny_lm, tmp_path, monkeypatch, capsys):
    """The next generator is found under the run folder where it is now: the folder copied elsewhere and
    resumed from another working directory with a relative --out, also when iteration.json holds the
    absolute path an older run saved (which still exists: the copy must not load the original)."""
    config, out, _, _, _ = archive_run
    moved = tmp_path / "copies" / "moved"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("iteration-2"))
    marker = moved / "iteration-1" / "iteration.json"
    info = json.loads(marker.read_text())
    assert info["next_generator"] == "iteration-1/generator"
    marker.write_text(json.dumps({**info, "next_generator": str(out / "iteration-1" / "generator")}))  # old style
    monkeypatch.chdir(tmp_path / "copies")
    paths: list[str] = []
    capsys.readouterr()
    run_template_search(config, "moved", lm=CannedLM(tiny_lm), progress=False, resume=True, stop_after=1,
                        loader=canned_loader([], paths))
    assert paths == [str(Path("moved") / "iteration-1" / "generator")]
    assert len(read_rows(moved / "iteration-2" / "results.jsonl")) == 1 + 2 * 2  # one passage scored
    assert "tiny-search iteration" not in capsys.readouterr().err  # progress=False: no step lines


def test_similarity_backend_is_checked_at_config_load(tiny_chat_dir, monkeypatch, tmp_path):
    from seal_jax.selfedit import embeddings

    for variant in ("noarchive", "archive", "novelty"):
        with pytest.raises(RunConfigError, match=r"templates.similarity_backend must be one of \('auto', "
                                                 r"'embeddings', 'tfidf'\), got 'foo'"):
            TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, variant=variant, similarity_backend="foo"))
    # "embeddings" without the encoder loads (to compile or plan elsewhere) but a run here refuses to start
    monkeypatch.setattr(embeddings, "available", lambda: False)
    for variant in ("noarchive", "archive", "novelty"):
        config = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, variant=variant,
                                                           similarity_backend="embeddings"))
        with pytest.raises(RunConfigError, match=r"'embeddings' needs the all-minilm-l6-v2 sentence encoder, which "
                                                 r"is not on this machine: fetch it with `seal-jax fetch "
                                                 r"all-minilm-l6-v2`"):
            run_template_search(config, tmp_path / variant, lm=None, progress=False)
        assert not (tmp_path / variant).exists()  # refused before anything is written
    assert TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, similarity_backend="auto"))  # falls back itself


def test_a_folder_written_with_a_bad_backend_still_reports(archive_run, tmp_path, capsys):
    """A folder whose run_config.json names a backend this machine cannot use (written before the config
    refused it) reports with TF-IDF similarities and a note instead of failing for good."""
    from seal_jax.cli import main

    _, out, summary, _, _ = archive_run
    bad = tmp_path / "bad"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("generator"))
    raw = json.loads((bad / "run_config.json").read_text())
    raw["templates"]["similarity_backend"] = "foo"
    (bad / "run_config.json").write_text(json.dumps(raw))
    got = summarize_template_search(bad, raw)
    assert [e["instruction_similarity"] for e in got["iterations"]] == pytest.approx(
        [e["instruction_similarity"] for e in summary["iterations"]])  # the tfidf run's figures
    assert {e["similarity_backend"] for e in got["iterations"]} == {"tfidf"}
    assert len(got["notes"]) == 1 and "'foo' cannot be used here" in got["notes"][0] and summary["notes"] == []
    capsys.readouterr()
    assert main(["report", str(bad)]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | 2/3 | 8/8 |" in printed and "Note: templates.similarity_backend 'foo' cannot be used here" in printed
    assert "Note:" in (bad / "report.md").read_text()
    # outside novelty the backend changes no row: the finished run resumes with a backend the config accepts
    fixed = TemplateSearchConfig.from_dict({**raw, "templates": {**raw["templates"], "similarity_backend": "tfidf"}})
    resumed = run_template_search(fixed, bad, resume=True, progress=False)
    assert resumed["notes"] == [] and json.loads((bad / "run_config.json").read_text()) == fixed.to_json()
    with pytest.raises(RunConfigError, match="differs in"):  # any other change still refuses
        run_template_search(TemplateSearchConfig.from_dict({**fixed.to_json(), "templates": {
            **fixed.to_json()["templates"], "fills": 3}}), bad, resume=True, progress=False)


def test_config_parsing_and_errors(tiny_chat_dir):
    raw = search_raw(tiny_chat_dir)
    assert kind_of(raw) == "templates"
    config = config_from_dict(raw)
    assert isinstance(config, TemplateSearchConfig) and config.knowledge.conditions == ("base",)
    assert TemplateSearchConfig.from_dict(config.to_json()) == config
    assert config.sft_lora_spec().rank == 4 and config.sft_train_spec().learning_rate == 1e-3
    with pytest.raises(RunConfigError, match="unknown keys in \\[templates\\]"):
        TemplateSearchConfig.from_dict({**raw, "templates": {**raw["templates"], "fill": 2}})
    with pytest.raises(RunConfigError, match="variant"):
        TemplateSearchConfig.from_dict({**raw, "templates": {**raw["templates"], "variant": "elites"}})
    with pytest.raises(RunConfigError, match="fill_fallback"):
        TemplateSearchConfig.from_dict({**raw, "templates": {**raw["templates"], "fill_fallback": "words"}})
    with pytest.raises(RunConfigError, match="novelty"):
        TemplateSearchConfig.from_dict({**raw, "templates": {**raw["templates"], "variant": "novelty",
                                                             "novelty": {"lam": -1.0}}})
    with pytest.raises(RunConfigError, match="templates.passages"):
        TemplateSearchConfig.from_dict({**raw, "data": {"source": "demo", "n": 3}})
    with pytest.raises(RunConfigError, match="no conditions"):
        TemplateSearchConfig.from_dict({**raw, "conditions": ["base"]})
    with pytest.raises(RunConfigError, match="seed_scores = 'paper' gives the seeds accuracies"):
        TemplateSearchConfig.from_dict({**search_raw(tiny_chat_dir, seed_scores="paper"), "reward": "gold_loglik"})
    with pytest.raises(RunConfigError, match="templates.seed_scores must be one of"):
        TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, seed_scores="mine"))
    assert not config.rescore_seeds and TemplateSearchConfig.from_dict(
        search_raw(tiny_chat_dir, seed_scores="rescore")).rescore_seeds
    dense_noarchive = TemplateSearchConfig.from_dict({**search_raw(tiny_chat_dir, variant="noarchive"),
                                                      "reward": "gold_loglik"})
    assert not dense_noarchive.rescore_seeds and len(dense_noarchive.make_archive(seeds=[])) == 0
    with pytest.raises(RunConfigError, match="not both"):
        kind_of({**raw, "restem": {}})
    overlap = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, eval_data={"source": "demo", "n": 1}))
    held_out = eval_passages(overlap)  # the training passages skip the evaluation passage
    assert [p.id for p in held_out] == ["demo-0"]
    assert [p.id for p in training_passages(overlap, held_out)] == ["demo-1", "demo-2"]
    with pytest.raises(RunConfigError, match=r"unknown keys in \[templates.eval_data\]"):
        TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, eval_data={"source": "demo", "first": 1}))
    too_many = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, passages=500))
    with pytest.raises(RunConfigError, match="templates.passages = 500"):
        training_passages(too_many)
    # the generator's SFT tables: a table of the spec's fields, each error naming the table
    for key, value, match in [
            ("sft_lora", "x", r"templates\.sft_lora must be a table"),
            ("sft_lora", {"rank": -1}, r"^templates\.sft_lora: LoraSpec\.rank must be a positive integer"),
            ("sft_lora", {"ranks": 4}, r"unknown keys in \[templates\.sft_lora\]: \['ranks'\]"),
            ("sft_train", [1], r"templates\.sft_train must be a table"),
            ("sft_train", {"epochs": 0}, r"^templates\.sft_train: TrainSpec\.epochs must be a positive integer"),
            ("sft_train", {"lr": 1e-3}, r"unknown keys in \[templates\.sft_train\]: \['lr'\]")]:
        with pytest.raises(RunConfigError, match=match):  # built in Python
            dataclasses.replace(config, **{key: value})
        with pytest.raises(RunConfigError, match=match.removeprefix("^")):  # read from a config file
            TemplateSearchConfig.from_dict({**raw, "templates": {**raw["templates"], key: value}})
    # [templates.novelty]: only for the novelty variant, every knob in its range
    with pytest.raises(RunConfigError, match=r"variant is 'archive', which does not use it"):
        TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, novelty={"k": 2}))
    for knobs, match in [({"k": 0}, r"novelty\.k .* positive integer, got 0"), ({"k": True}, r"novelty\.k"),
                         ({"lam": -1}, r"novelty\.lam .* must be >= 0, got -1"),
                         ({"lam": "0.5"}, r"novelty\.lam must be a finite number"),
                         ({"weight": 1.5}, r"novelty\.weight .* \[0, 1\], got 1\.5"), ("x", r"novelty must be a table")]:
        with pytest.raises(RunConfigError, match=match):
            TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, variant="novelty", novelty=knobs))
    assert TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, variant="novelty", novelty={
        "k": 1, "lam": 0, "weight": 1.0})).make_archive().k == 1


def test_held_out_evaluation_of_the_best_template(tiny_chat_dir, tiny_lm, tmp_path):
    config = TemplateSearchConfig.from_dict(search_raw(
        tiny_chat_dir, iterations=1, passages=1, fills=1, max_epochs=1, eval_data={"source": "demo", "start": 5, "n": 1}))
    lm = CannedLM(tiny_lm)
    summary = run_template_search(config, tmp_path, lm=lm, progress=False)
    info = json.loads((tmp_path / "iteration-1" / "iteration.json").read_text())
    rows = read_rows(tmp_path / "iteration-1" / "eval" / "results.jsonl")
    assert {r["passage_id"] for r in rows} == {"demo-5"}
    assert [r["template_id"] for r in rows if r["template_id"]] == [info["best"]]
    assert summary["iterations"][0]["eval"]["template"] == info["best"]
    assert all(t.epochs == 1 for _, train in lm.train_calls for t in train)  # max_epochs caps TEMPLATE_A's 2


def test_sft_pairs_selection_without_a_model():
    from seal_jax.selfedit.data import load_passages
    from seal_jax.selfedit.meta_prompts import fill_prompt
    from seal_jax.selfedit.template_search import sft_pairs

    passages = {p.id: p for p in load_passages("demo", n=2)}
    templates = {"it1-t0": Template.from_dict(TEMPLATE_A), "it1-t1": Template.from_dict(TEMPLATE_B)}

    def row(pid, tid, f, before, after, seqs=("a fact",)):
        return {"passage_id": pid, "template_id": tid, "fill_index": f, "accuracy_before": before,
                "accuracy_after": after, "failure": None, "fill_sequences": list(seqs) if seqs else None}

    rows = [{"passage_id": "demo-0", "template_id": None, "accuracy_before": 0.5, "accuracy_after": 0.5},
            row("demo-0", "it1-t0", 0, 0.5, 0.5), row("demo-0", "it1-t0", 1, 0.5, 0.75, ("best fill",)),
            row("demo-0", "it1-t1", 0, 0.5, 0.25), row("demo-1", "it1-t1", 0, 0.0, 1.0, None),  # no training data
            row("demo-1", "it1-t0", 0, 0.0, 0.0)]
    pairs = sft_pairs(rows, passages, templates, "META", k=1, chat=False)
    assert [(p["passage_id"], p["template_id"], p["kind"]) for p in pairs] == [
        ("demo-0", "it1-t0", "template"), ("demo-0", "it1-t0", "fill"),
        ("demo-1", "it1-t0", "template"), ("demo-1", "it1-t0", "fill")]
    assert pairs[0]["prompt"] == "META" and json.loads(pairs[0]["completion"]) == templates["it1-t0"].to_dict()
    assert pairs[1]["prompt"] == fill_prompt(templates["it1-t0"], passages["demo-0"].title, passages["demo-0"].context)
    assert json.loads(pairs[1]["completion"]) == {"training_sequences": ["best fill"]} and pairs[1]["fill_index"] == 1
    kept = sft_pairs(rows, passages, templates, "META", k=2, chat=False, positive_gain_only=True)
    assert [(p["passage_id"], p["template_id"]) for p in kept] == [("demo-0", "it1-t0")] * 2
    # ranked by the gold log-likelihood instead: fill 0 of it1-t0 now wins demo-0, it1-t1 beats it
    for r, (before, after) in zip(rows[1:], [(-3.0, -2.0), (-3.0, -2.5), (-3.0, -1.0), (-4.0, -1.0), (-4.0, -4.5)],
                                  strict=True):
        r.update(gold_loglik_before=before, gold_loglik_after=after)
    dense = sft_pairs(rows, passages, templates, "META", k=1, chat=False, reward="gold_loglik")
    assert [(p["passage_id"], p["template_id"], p["fill_index"]) for p in dense[::2]] == [
        ("demo-0", "it1-t1", 0), ("demo-1", "it1-t0", 0)]
    # the rows say what their score is: nats per token here, accuracy above
    assert (dense[0]["score"], dense[0]["unit"]) == (-1.0, "gold_loglik") and pairs[0]["unit"] == "accuracy"
    assert [p["passage_id"] for p in sft_pairs(rows, passages, templates, "META", k=1, chat=False,
                                                reward="gold_loglik", positive_gain_only=True)] == ["demo-0"] * 2


def test_gold_loglik_reward_rescored_seeds_and_resume(tiny_chat_dir, tiny_lm, tmp_path):
    """reward = "gold_loglik": the run scores the four human seeds itself first (seeds/), templates score by
    the gold answers' log-likelihood after the update, the archive holds that unit only, the meta-prompt
    says so and shows the rescored seeds; a run killed inside the seed scoring resumes to the same files."""
    from seal_jax.selfedit.archive import SEED_SCORES

    raw = {**search_raw(tiny_chat_dir, iterations=1, passages=2, fills=1, sft=False, max_epochs=1),
           "reward": "gold_loglik"}
    config = TemplateSearchConfig.from_dict(raw)
    assert config.rescore_seeds
    lm = CannedLM(tiny_lm)
    summary = run_template_search(config, tmp_path / "full", lm=lm, progress=False)
    seed_rows = read_rows(tmp_path / "full" / "seeds" / "results.jsonl")
    assert {r["template_id"] for r in seed_rows if r["template_id"]} == set(SEED_SCORES)
    assert all(r["iteration"] == 0 and r["reward"] == r["gold_loglik_after"] for r in seed_rows)
    seeds = json.loads((tmp_path / "full" / "seeds" / "seeds.json").read_text())
    for entry in seeds["entries"]:
        mine = [r for r in seed_rows if r["template_id"] == entry["name"]]
        assert entry["unit"] == "gold_loglik" and entry["score"] == pytest.approx(
            sum(r["gold_loglik_after"] for r in mine) / len(mine))
        assert entry["gain"] == pytest.approx(sum(r["gold_loglik_after"] - r["gold_loglik_before"] for r in mine)
                                              / len(mine))
    archive = Archive.from_jsonl(tmp_path / "full" / "archive.jsonl")
    assert len(archive) == 4 + 2 and {e.unit for e in archive.entries} == {"gold_loglik"}
    assert all(e.score <= 0 for e in archive.entries)
    meta = lm.meta_prompts[0]
    assert "log-probability per token" in meta and "fraction of those questions" not in meta
    shown = config.make_archive(seeds=[ArchiveEntry.from_dict(e) for e in seeds["entries"]]).shown()
    assert all(f"score {e.score:.3f}" in meta for e in shown)
    rows = read_rows(tmp_path / "full" / "iteration-1" / "results.jsonl")
    scores = template_scores(rows, "gold_loglik")
    info = json.loads((tmp_path / "full" / "iteration-1" / "iteration.json").read_text())
    assert info["scores"] == scores and all(e["unit"] == "gold_loglik" for e in info["entries"])
    assert summary["reward"] == "gold_loglik" and summary["iterations"][0]["best_score"] == max(
        s["score"] for s in scores.values())
    assert "nats/token" in (tmp_path / "full" / "summary.md").read_text()
    from seal_jax.report import report

    markdown, png = report(tmp_path / "full")
    assert "nats/token" in markdown and f"{summary['iterations'][0]['best_score']:.3f}" in markdown and png.is_file()

    part = tmp_path / "part"
    run_template_search(config, part, lm=CannedLM(tiny_lm), progress=False, stop_after=1)
    assert not (part / "seeds" / "seeds.json").exists() and not (part / "iteration-1").exists()
    run_template_search(config, part, lm=CannedLM(tiny_lm), progress=False, resume=True)
    assert strip(read_rows(part / "seeds" / "results.jsonl")) == strip(seed_rows)
    assert (part / "archive.jsonl").read_text() == (tmp_path / "full" / "archive.jsonl").read_text()


def test_a_refused_passage_selection_writes_no_run_folder(tiny_chat_dir, tmp_path):
    beyond = TemplateSearchConfig.from_dict({**search_raw(tiny_chat_dir), "data": {"source": "demo", "start": 100}})
    with pytest.raises(DataError, match="start=100 is past the end"):
        run_template_search(beyond, tmp_path / "beyond", progress=False)
    unknown = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, eval_data={"source": "demo", "ids": ["nope"]}))
    with pytest.raises(RunConfigError, match="no passage 'nope'"):
        run_template_search(unknown, tmp_path / "unknown", progress=False)
    assert not (tmp_path / "beyond").exists() and not (tmp_path / "unknown").exists()


def test_a_finished_search_resumes_without_a_model_and_a_damaged_marker_is_named(archive_run, tmp_path):
    config, out, summary, _, _ = archive_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)

    def no_model(path):
        raise AssertionError(f"no model may load here ({path})")

    assert run_template_search(config, copy, resume=True, progress=False, loader=no_model) == summary
    marker = copy / "iteration-2" / "iteration.json"
    marker.write_text(marker.read_text()[:60])  # cut off by a kill (an older seal-jax wrote it in place)
    with pytest.raises(StateFileError, match=r"iteration-2/iteration\.json is not valid JSON .*: delete it and resume"):
        run_template_search(config, copy, resume=True, progress=False, loader=no_model)
    with pytest.raises(StateFileError, match=r"iteration\.json"):  # the report names it too
        summarize_template_search(copy, config)
    marker.write_text("{}")
    with pytest.raises(StateFileError, match=r"iteration\.json lacks \['next_generator'\]"):
        run_template_search(config, copy, resume=True, progress=False, loader=no_model)
    (copy / "run_config.json").write_text("{")
    with pytest.raises(StateFileError, match=r"run_config\.json is not valid JSON"):
        run_template_search(config, copy, resume=True, progress=False, loader=no_model)


class CutOffLM:
    """Every proposal and fill stops in the middle, as at the token limit."""

    def generate(self, prompts, params, chat=False, **kwargs):
        if prompts[0].startswith("Passage:\n"):
            return ['{"training_sequences": ["A first fa'] * len(prompts)
        return ['{"data_creation_instruction": "State each fact'] * len(prompts)


def test_cut_off_answers_name_the_key_that_sets_their_length(tiny_chat_dir, tmp_path, monkeypatch):
    config = TemplateSearchConfig.from_dict(search_raw(tiny_chat_dir, iterations=1, passages=1, fills=1))
    lm = CutOffLM()
    search = _Search(config, tmp_path, Models(config.knowledge, lm, what="a test", progress=False), [], [], None,
                     False)
    _, records = search.propose(1, tmp_path, config.make_archive(), config.knowledge.model)
    assert records and all("cut off (raise templates.proposal_max_new_tokens)" in r.reason for r in records)
    assert all("(raise templates.proposal_max_new_tokens)" in p["reason"] for p in read_rows(tmp_path / "proposals.jsonl"))
    monkeypatch.setattr(template_search, "score_base", lambda *args: SimpleNamespace(measure=Measure(0.5), answers=[]))
    monkeypatch.setattr(template_search, "train_and_score", lambda *args, **kwargs: [])
    passage = training_passages(config)[0]
    rows = template_passage_rows(lm, lm, passage, [("it1-t0", Template.from_dict(TEMPLATE_A))], config, None,
                                 iteration=1)
    assert [r["template_id"] for r in rows] == [None, "it1-t0"]
    assert "cut off (raise templates.fill_max_new_tokens)" in rows[1]["failure"]
