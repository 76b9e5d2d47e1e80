"""The generator's SFT (loss on the completion only), merge, export and its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import seal_jax as sj
from seal_jax.selfedit.generator import (
    GeneratorError,
    resolved_generator_path,
    sft_generator,
    sft_lora_spec,
    sft_train_spec,
    stored_generator_path,
    train_and_export,
)
from seal_jax.selfedit.restem import RestemError
from seal_jax.selfedit.template_search import TemplateSearchError


def test_sft_loss_is_the_completion_cross_entropy_only(tiny_chat_dir):
    """Step 0 (B = 0, so the adapter is the base model) reports the mean cross-entropy of the completion
    tokens alone, computed here from the base model's logits: prompt positions contribute nothing."""
    lm = sj.load(tiny_chat_dir, progress=False)
    prompt, completion = "Tell me about the harbour of Velmora.", " It opened in 1842 and still runs ferries."
    spec = sj.TrainSpec(learning_rate=1e-4, epochs=1, batch_size=1, max_len=256, shuffle=False)
    adapters = lm.train_adapters([[(prompt, completion)]], sj.LoraSpec(rank=4, alpha=8.0), spec)
    p_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = lm.tokenizer(completion, add_special_tokens=False)["input_ids"] + [lm.tokenizer.eos_token_id]
    ids = np.array([p_ids + c_ids])
    logp = lm.logits(ids)[0].astype(np.float64)
    logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logp.max(-1, keepdims=True)
    targets = ids[0, 1:]
    nll = -logp[np.arange(len(targets)), targets]
    completion_only = nll[len(p_ids) - 1:].mean()
    assert adapters.losses[0][0] == pytest.approx(completion_only, rel=1e-4)
    assert abs(nll.mean() - completion_only) > 1e-3  # the check can tell the two apart


def test_merged_generator_equals_adapter_forward_and_loads_in_transformers(tiny_chat_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    lm = sj.load(tiny_chat_dir, progress=False)
    rows = [{"prompt": "Write about Velmora.", "completion": " Velmora is a harbour town with ferries."},
            {"prompt": "Write about Ostrel.", "completion": " Ostrel makes glass."}]
    lora = sft_lora_spec({"rank": 4, "alpha": 8.0})  # over SEAL's r=64, alpha=128 on all projections
    merged, adapters = sft_generator(lm, rows, lora, sft_train_spec({"learning_rate": 5e-3, "epochs": 2, "max_len": 1024}),
                                     0, table="restem")
    ids = np.array([lm.tokenizer("Velmora is a harbour town", add_special_tokens=False)["input_ids"]])
    with_adapter = lm.logits(ids, adapter=adapters[0])
    ours = merged.logits(ids)
    assert np.abs(ours - with_adapter).max() <= 1e-4 * max(1.0, np.abs(with_adapter).max())
    assert np.abs(ours - lm.logits(ids)).max() > 1e-3  # the SFT changed the model
    folder = merged.export(tmp_path / "generator")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-4
    reloaded = sj.load(folder, progress=False)
    assert np.array_equal(reloaded.logits(ids), ours)


def test_sft_that_cannot_start_reports_its_real_cause(tiny_chat_dir):
    lm = sj.load(tiny_chat_dir, progress=False)
    rows = [{"prompt": "Write about Velmora, the harbour town.", "completion": " It has ferries."}]
    lora = sj.LoraSpec(rank=4, alpha=8.0)
    # prompts that fill max_len: the cause plus the max_len hint
    with pytest.raises(RestemError, match=r"cannot start: .*no usable training sequence.*1 of 1 prompts have at "
                                          r"least restem\.sft_train\.max_len = 4 tokens.*raise max_len"):
        sft_generator(lm, rows, lora, sj.TrainSpec(max_len=4), 0, table="restem", error=RestemError)

    class NoTokenizer:  # another TrainError: its own message, no word about prompt lengths
        tokenizer = None

        def train_adapters(self, *args, **kwargs):
            raise sj.TrainError("this model has no tokenizer; load it with tokenizer=... to train on text")

    with pytest.raises(RestemError, match="cannot start: this model has no tokenizer") as info:
        sft_generator(NoTokenizer(), rows, lora, sj.TrainSpec(max_len=1024), 0, table="restem", error=RestemError)
    assert "max_len" not in str(info.value)

    class OtherCause:  # a TrainError whose prompts fit: no max_len hint either
        tokenizer = lm.tokenizer

        def train_adapters(self, *args, **kwargs):
            raise sj.TrainError("all candidates of one call must share TrainSpec.batch_size")

    with pytest.raises(RestemError, match="cannot start: all candidates of one call must share") as info:
        sft_generator(OtherCause(), rows, lora, sj.TrainSpec(max_len=1024), 0, table="restem", error=RestemError)
    assert "max_len" not in str(info.value)


def test_sft_specs_default_to_seal_and_errors_name_the_run_kind(tiny_chat_dir):
    lora, train = sft_lora_spec({}), sft_train_spec({})
    assert (lora.rank, lora.alpha, len(lora.targets)) == (64, 128.0, 7)
    assert (train.learning_rate, train.epochs, train.batch_size) == (3e-4, 2, 1)
    assert sft_lora_spec({"targets": ["q_proj"]}).targets == ("q_proj",)
    assert issubclass(RestemError, GeneratorError) and issubclass(TemplateSearchError, GeneratorError)
    lm = sj.load(tiny_chat_dir, progress=False)
    rows = [{"prompt": "Write about Velmora, the harbour town.", "completion": " It has ferries."}]
    with pytest.raises(GeneratorError, match=r"templates\.sft_train\.max_len = 4") as info:
        sft_generator(lm, rows, sj.LoraSpec(rank=4, alpha=8.0), sj.TrainSpec(max_len=4), 0, table="templates")
    assert type(info.value) is GeneratorError


def test_train_and_export_says_each_long_step_with_its_seconds_and_folder(tiny_chat_dir, tmp_path, capsys):
    """SFT, merge and export are silent calls (an 8B export writes ~16 GB): with progress each is announced
    on stderr before it starts and with its seconds after; the export with its size and folder."""
    import re

    lm = sj.load(tiny_chat_dir, progress=False)
    rows = [{"prompt": "Write about Velmora.", "completion": " Velmora is a harbour town with ferries."},
            {"prompt": "Write about Ostrel.", "completion": " Ostrel makes glass."}]
    lora, train = sft_lora_spec({"rank": 4, "alpha": 8.0}), sft_train_spec({"epochs": 1, "max_len": 256})
    capsys.readouterr()
    result = train_and_export(lm, rows, lora, train, seed=0, target=tmp_path / "generator", table="restem",
                              label="demo round 1")
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout stays for tables
    # the export's bar (over its tensors; \r-separated, cleared when done) aside, one line a step
    assert re.search(r"exporting to \S*generator\.tmp: .*tensor", captured.err)
    lines = [piece for line in captured.err.splitlines() for piece in line.split("\r")[-1:]
             if piece.strip() and "tensor/s" not in piece]
    patterns = [r"demo round 1: generator SFT on 2 rows \(LoRA r=4, alpha=8, 7 projections; lr 0\.0003, 1 epochs\) \.\.\.",
                r"demo round 1: generator SFT trained in \d+\.\d s \(loss [\d.]+ -> [\d.]+\); merging the adapter into "
                r"the weights \.\.\.",
                r"demo round 1: adapter merged in \d+\.\d s",
                rf"demo round 1: exporting the merged generator to {re.escape(str(tmp_path / 'generator'))} \.\.\.",
                rf"demo round 1: generator exported in \d+\.\d s \((\d+\.\d) MB\) to {re.escape(str(tmp_path / 'generator'))}"]
    assert len(lines) == len(patterns), lines
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    written = sum(f.stat().st_size for f in (tmp_path / "generator").iterdir())
    assert float(re.fullmatch(patterns[-1], lines[-1]).group(1)) == pytest.approx(written / 1e6, abs=0.05)
    assert result.generator == str(tmp_path / "generator") and (tmp_path / "generator" / "config.json").is_file()
    # the label defaults to the table; progress=False says nothing
    train_and_export(lm, rows, lora, train, seed=0, target=tmp_path / "again", table="templates")
    assert capsys.readouterr().err.splitlines()[0].startswith("templates: generator SFT on 2 rows")
    train_and_export(lm, rows, lora, train, seed=0, target=tmp_path / "quiet", table="templates", progress=False)
    assert capsys.readouterr().err == "" and (tmp_path / "quiet" / "config.json").is_file()


@pytest.mark.parametrize("step", ["round", "iteration"])
def test_run_generators_are_stored_relative_to_the_run_folder(tmp_path, monkeypatch, step):
    """ReST-EM's round.json and template search's iteration.json name the run's own generators relative to
    the run folder, so that a moved or copied folder, or a resume from another directory, finds them."""
    monkeypatch.chdir(tmp_path)
    out = Path("runs/search")  # as `--out` was typed: relative to the working directory
    mine = out / f"{step}-2" / "generator"
    mine.mkdir(parents=True)
    assert stored_generator_path(out, mine, step) == f"{step}-2/generator"
    assert stored_generator_path(tmp_path / "runs" / ".." / "runs" / "search", str(mine.resolve()), step) == (
        f"{step}-2/generator")
    for other in ("Qwen/Qwen3-8B", "checkpoints/smollm2-135m-instruct", str(tmp_path / "base"),
                  str(out / f"{step}-2"), str(out / "seeds" / "generator")):  # not one the run exported: as given
        assert stored_generator_path(out, other, step) == other
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "runs" / "search", moved)
    assert resolved_generator_path(moved, f"{step}-2/generator", step) == str(moved / f"{step}-2" / "generator")
    assert resolved_generator_path(moved, "Qwen/Qwen3-8B", step) == "Qwen/Qwen3-8B"
    # an older run stored the path as typed: taken under the run folder where that folder holds it
    for old in (str(tmp_path / "runs" / "search" / f"{step}-2" / "generator"), f"runs/search/{step}-2/generator"):
        assert resolved_generator_path(moved, old, step) == str(moved / f"{step}-2" / "generator")
        assert resolved_generator_path(tmp_path / "empty", old, step) == old  # nothing there instead: as stored
