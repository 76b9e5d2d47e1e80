"""GGUF → Hugging Face conversion (seal_jax.lm.gguf), checked against transformers' own GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_bundled import (
    TINY,
    TINY_CHAT_TEMPLATE,
    Bundled,
    bundled_model,
    gguf_reference_model,
    llama_cpp_permute,
    write_tiny_llama_gguf,
)
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file

from seal_jax.lm.gguf import GGUFError, convert_gguf_to_hf, read_llama_spec, undo_rotary_permutation

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="session")
def bundled() -> Bundled:
    return bundled_model()


@pytest.fixture(scope="session")
def gguf_reference(bundled):
    return gguf_reference_model()


@pytest.fixture(scope="module")
def gguf_reader(bundled) -> GGUFReader:
    return GGUFReader(bundled.gguf_path)


@pytest.fixture(scope="module")
def converted_weights(bundled) -> dict[str, np.ndarray]:
    return load_file(bundled.model_dir / "model.safetensors")


def test_config_json_describes_smollm2_135m(bundled):
    config = json.loads((bundled.model_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    assert {k: config.get(k) for k in expected} == expected
    generation = json.loads((bundled.model_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_weights_equal_transformers_gguf_load(bundled, gguf_reference, converted_weights):
    reference = {k: v.detach().numpy() for k, v in gguf_reference.state_dict().items()}
    # tied embeddings: transformers exposes lm_head.weight as the same tensor, the folder omits it
    np.testing.assert_array_equal(reference.pop("lm_head.weight"), reference["model.embed_tokens.weight"])
    assert set(converted_weights) == set(reference)
    assert len(converted_weights) == 2 + 30 * 9
    for name, ours in converted_weights.items():
        assert ours.dtype == np.float32, name
        assert ours.shape == reference[name].shape, name
        np.testing.assert_allclose(ours, reference[name], rtol=0, atol=1e-7, err_msg=name)


def test_rotary_rows_are_put_back_in_hf_order(gguf_reader, converted_weights):
    reader = gguf_reader
    raw = {
        t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors if t.name.startswith("blk.7.attn_")
    }
    q = converted_weights["model.layers.7.self_attn.q_proj.weight"]
    k = converted_weights["model.layers.7.self_attn.k_proj.weight"]
    assert q.shape == (576, 576) and k.shape == (192, 576)
    assert not np.array_equal(q, raw["blk.7.attn_q.weight"])  # the permutation is not a no-op
    np.testing.assert_array_equal(llama_cpp_permute(q, 9), raw["blk.7.attn_q.weight"])
    np.testing.assert_array_equal(llama_cpp_permute(k, 3), raw["blk.7.attn_k.weight"])
    np.testing.assert_array_equal(
        converted_weights["model.layers.7.self_attn.v_proj.weight"], raw["blk.7.attn_v.weight"]
    )
    np.testing.assert_array_equal(
        converted_weights["model.layers.7.self_attn.o_proj.weight"], raw["blk.7.attn_output.weight"]
    )


def test_undo_rotary_permutation_on_known_rows():
    # one head of size 4: llama.cpp stores HF rows [0, 1, 2, 3] as [0, 2, 1, 3]; two heads, with a bias-like 1-D input
    stored = np.array([0, 2, 1, 3, 4, 6, 5, 7], dtype=np.float32)
    np.testing.assert_array_equal(undo_rotary_permutation(stored, 2), np.arange(8, dtype=np.float32))
    weights = np.random.default_rng(0).standard_normal((24, 5)).astype(np.float32)
    np.testing.assert_array_equal(undo_rotary_permutation(llama_cpp_permute(weights, 3), 3), weights)


def test_converted_folder_loads_in_transformers_with_equal_logits(bundled, gguf_reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(bundled.model_dir), dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(str(bundled.model_dir))
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(ids).logits.numpy()
        reference = gguf_reference(ids).logits.numpy()
    assert ours.shape == (1, ids.shape[1], 49152)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)
    assert tokenizer.decode(int(ours[0, -1].argmax())) == " Paris"


def test_tokenizer_matches_gguf_vocabulary_and_has_chat_template(bundled, gguf_reader):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled.model_dir))
    reader = gguf_reader
    vocab = reader.get_field("tokenizer.ggml.tokens").contents()
    assert tokenizer.convert_ids_to_tokens(list(range(len(vocab)))) == vocab
    merges = json.loads((bundled.model_dir / "tokenizer.json").read_text())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert merges == reader.get_field("tokenizer.ggml.merges").contents()

    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    for text in [
        "Hello world!",
        "  two  spaces\nand a newline\t tab",
        "Ünïcödé ✓ 日本語 🙂",
        "x = f(1, 2) // 3",
    ]:
        ids = tokenizer(text).input_ids
        assert ids[0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS
        assert tokenizer.decode(ids) == text
    assert tokenizer("Hello world").input_ids == [19556, 905]

    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        prompt
        == f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.chat_template == reader.get_field("tokenizer.chat_template").contents()


def test_tiny_untied_llama_converts_exactly(tmp_path):
    """A random GGUF written like llama.cpp does (permuted q/k, Q8_0/Q4_1/F16/F32) converts back exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama_gguf(gguf_path, tied=False)
    out = convert_gguf_to_hf(gguf_path, tmp_path / "tiny-hf", progress=False)
    assert out == (tmp_path / "tiny-hf").resolve()
    weights = load_file(out / "model.safetensors")
    assert set(weights) == set(expected) and "lm_head.weight" in weights
    for name, value in expected.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert (config["rms_norm_eps"], config["max_position_embeddings"], config["vocab_size"]) == (
        1e-06,
        TINY["ctx"],
        261,
    )

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tokenizer("the theme there").input_ids])
    with torch.no_grad():
        np.testing.assert_allclose(
            model(ids).logits.numpy(), reference(ids).logits.numpy(), rtol=0, atol=1e-5
        )
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>"


def test_bfloat16_output(tmp_path):
    import ml_dtypes
    from safetensors import safe_open

    gguf_path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama_gguf(gguf_path, tied=True)
    out = convert_gguf_to_hf(gguf_path, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(expected) and "lm_head.weight" not in f.keys()
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
    assert q.dtype == torch.bfloat16
    want = expected["model.layers.1.self_attn.q_proj.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(q.float().numpy(), want)


def test_reconverting_replaces_a_model_folder_but_not_other_folders(tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_path)
    out = tmp_path / "out"
    convert_gguf_to_hf(gguf_path, out, progress=False)
    (out / "stale.txt").write_text("left over from before")
    convert_gguf_to_hf(gguf_path, out, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="precious"):
        convert_gguf_to_hf(gguf_path, precious, progress=False)
    assert (precious / "notes.txt").read_text() == "mine"


def test_missing_gguf_path_is_reported(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(FileNotFoundError, match=r"nowhere/model\.gguf does not exist"):
        convert_gguf_to_hf(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_file_that_is_not_gguf_is_reported(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(GGUFError, match=r"model\.gguf is not a GGUF file"):
        convert_gguf_to_hf(bogus, tmp_path / "out")


def test_non_llama_gguf_is_rejected(tmp_path):
    path = tmp_path / "gpt2-model.gguf"
    write_tiny_llama_gguf(path, arch="gpt2")
    with pytest.raises(GGUFError, match=r"gpt2-model\.gguf holds a 'gpt2' model; only Llama"):
        convert_gguf_to_hf(path, tmp_path / "out")
    with pytest.raises(GGUFError, match="'gpt2'"):
        read_llama_spec(path)
    assert not (tmp_path / "out").exists()


def test_failed_conversion_leaves_no_folder(tmp_path):
    """The error comes after the tokenizer is written (at the tensors): nothing half-done may remain."""
    path = tmp_path / "odd.gguf"
    write_tiny_llama_gguf(path, extra_tensor="blk.0.attn_sinks.weight")
    with pytest.raises(GGUFError, match="blk.0.attn_sinks.weight"):
        convert_gguf_to_hf(path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf"]


def test_read_llama_spec_of_bundled_model(bundled):
    spec = read_llama_spec(bundled.gguf_path)
    assert spec.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert (spec.num_hidden_layers, spec.hidden_size, spec.vocab_size, spec.tie_word_embeddings) == (
        30,
        576,
        49152,
        True,
    )
    assert spec.chat_template.startswith("{% for message in messages %}")
    assert Path(bundled.gguf_path).stat().st_size == 98362432


def test_tokenizer_json_equals_transformers_own_gguf_conversion(bundled, tmp_path):
    """Our torch-free tokenizer builder gives exactly the tokenizer.json transformers' GGUF reader builds."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(bundled.gguf_path.parent), gguf_file=bundled.gguf_path.name)
    reference.save_pretrained(tmp_path)
    ours = json.loads((bundled.model_dir / "tokenizer.json").read_text())
    assert ours == json.loads((tmp_path / "tokenizer.json").read_text())


def test_conversion_needs_no_torch(bundled, tmp_path):
    """The demo installs no torch: converting the bundled GGUF must work with torch unimportable."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from seal_jax.lm.gguf import convert_gguf_to_hf\n"
        f"convert_gguf_to_hf(Path({str(bundled.gguf_path)!r}), Path({str(tmp_path / 'out')!r}), progress=False)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == json.loads(
        (bundled.model_dir / "tokenizer.json").read_text())


def test_expected_weight_shapes_come_from_the_parameter_table_and_allow_attention_biases(bundled):
    """The converter's expected HF shapes are the parameter table's (seal_jax.lm.params) for the GGUF's config;
    a GGUF whose attention has biases still gets its weights' shapes (the biases are checked on their own)."""
    import dataclasses

    spec = read_llama_spec(bundled.gguf_path)
    shapes = spec.hf_shapes()
    assert shapes["model.layers.29.self_attn.k_proj.weight"] == (192, 576)  # 3 KV heads of 64, [out, in]
    assert shapes["model.embed_tokens.weight"] == (49152, 576) and "lm_head.weight" not in shapes  # tied
    assert dataclasses.replace(spec, attention_bias=True).hf_shapes() == shapes
