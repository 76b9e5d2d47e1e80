"""The one table of parameters against transformers' own models and against the Decoder it describes."""

from __future__ import annotations

import pytest
from flax import nnx

from seal_jax.lm.config import PRESETS, from_hf
from seal_jax.lm.model import Decoder
from seal_jax.lm.params import BY_PATH, PARAMS, declared, flatten, nest, param_axes, param_shapes, peft_module
from seal_jax.lm.sharding import RULES
from seal_jax.lm.weights import IGNORED, hf_target


@pytest.mark.parametrize("name", ["qwen3-untied", "qwen3-tied", "qwen3-headdim", "llama"])
def test_hugging_face_names_and_shapes_are_exactly_transformers(tiny_hf, name):
    model, folder = tiny_hf(name)
    config = from_hf(folder)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not any(p.fullmatch(k) for p in IGNORED)}
    if config.tie_word_embeddings:
        want.pop("lm_head.weight", None)  # transformers lists the tied head; checkpoints do not store it
    got = {n: d.hf_shape(config) for d in declared(config) for n in d.hf_names(config)}
    assert got == want
    for decl in declared(config):
        for layer, hf_name in enumerate(decl.hf_names(config)):
            target = hf_target(hf_name)
            assert (target.path, target.transposed) == (decl.path, decl.transposed)
            assert target.layer == (layer if decl.per_layer else None)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_decoder_has_exactly_the_declared_parameters(preset):
    config = PRESETS[preset]
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    built = {".".join(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert built == param_shapes(config)
    for path, shape in built.items():
        axes = param_axes(path, config)
        assert len(axes) == len(shape), path
        assert all(a is None or a in RULES for a in axes), (path, axes)


def test_dotted_paths_nest_as_the_decoders_state_and_back():
    config = PRESETS["qwen3-8b"]
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = flatten(state)
    assert set(flat) == set(param_shapes(config))  # the table's paths are the model's
    assert nest(flat) == state and flatten(nest(flat)) == flat
    assert nest({"a.b.c": 1, "a.d": 2, "e": 3}) == {"a": {"b": {"c": 1}, "d": 2}, "e": 3}


def test_optional_parameters_follow_the_config():
    assert {"layers.q_norm", "layers.k_norm", "lm_head"} <= set(param_shapes(PRESETS["qwen3-8b"]))
    smollm = param_shapes(PRESETS["smollm2-135m"])  # Llama: no q/k norms, tied head
    assert not {"layers.q_norm", "layers.k_norm", "lm_head"} & set(smollm)
    assert [d.path for d in PARAMS] == list(BY_PATH)


def test_peft_module_names_and_unknown_paths():
    assert peft_module("v_proj", 3) == "base_model.model.model.layers.3.self_attn.v_proj"
    assert peft_module("down_proj", 0) == "base_model.model.model.layers.0.mlp.down_proj"
    with pytest.raises(KeyError, match="no parameter 'layers.qkv'"):
        param_axes("layers.qkv", PRESETS["tiny"])
