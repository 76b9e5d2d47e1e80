"""ModelConfig: reading Hugging Face config.json, presets, errors."""

from __future__ import annotations

import json

import pytest

from seal_jax.lm.config import PRESETS, ConfigError, ModelConfig, from_hf, from_hf_dict, preset


def test_reads_transformers_qwen3_and_llama_configs(tiny_hf):
    _, folder = tiny_hf("qwen3-headdim")
    cfg = from_hf(folder)
    assert (cfg.family, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qk_norm) == ("qwen3", 40, 4, 2, True)
    assert cfg.q_dim == 160 and cfg.hidden_size == 64
    _, folder = tiny_hf("llama")
    cfg = from_hf(folder / "config.json")
    assert (cfg.family, cfg.qk_norm, cfg.tie_word_embeddings) == ("llama", False, True)


def test_rope_theta_from_transformers_4_and_5_layouts():
    base = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    assert from_hf_dict({**base, "rope_theta": 123.0}).rope_theta == 123.0
    assert from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}).rope_theta == 7.0
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported.*default"):
        from_hf_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "vocab_size": 4}))
    with pytest.raises(ConfigError, match=r"MistralForCausalLM.*not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        from_hf(tmp_path)


def test_missing_field_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        from_hf_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 4, "num_attention_heads": 2})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path / "nowhere")


def test_invalid_shapes_are_rejected():
    with pytest.raises(ConfigError, match="not a multiple of num_kv_heads"):
        preset("tiny").replace(num_heads=3)


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-8b", "smollm2-135m"])
def test_preset_parameter_counts_match_transformers(name):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    cfg = PRESETS[name]
    hf_cls = Qwen3Config if cfg.family == "qwen3" else LlamaConfig
    hf_cfg = hf_cls(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def test_qwen3_8b_parameter_count():
    assert PRESETS["qwen3-8b"].num_parameters() == 8_190_735_360


def test_round_trip_through_hf_dict():
    for cfg in PRESETS.values():
        assert from_hf_dict(cfg.to_hf_dict()) == cfg


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset.*qwen3-8b"):
        preset("gpt-5")
    with pytest.raises(ConfigError, match="unknown model family"):
        ModelConfig("mamba", 1, 1, 1, 1, 1, 1, 2, False, False)
