"""The generator's SFT (loss on the completion only), merge, export and its errors."""

from __future__ import annotations

import numpy as np
import pytest

import seal_jax as sj
from seal_jax.selfedit.generator import GeneratorError, sft_generator, sft_lora_spec, sft_train_spec
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
