"""Adapters: forward with LoRA = merged weights = HF PEFT loading our export; stacking and slicing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, torch_logits
from flax import nnx

import seal_jax as sj
from seal_jax.lm.api import LM, build_model
from seal_jax.lm.lora import Adapters, LoraError, LoraSpec, init_adapters, merge


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = make_hf_model("llama", seed=21)
    folder = tmp_path_factory.mktemp("lora-base")
    model.save_pretrained(folder)
    return model, folder, sj.load(folder, progress=False)


def random_adapters(lm, specs, seed=0):
    """Hand-made adapters with non-zero B (as if trained)."""
    keys = [jax.random.PRNGKey(seed + i) for i in range(len(specs))]
    weights = init_adapters(lm.params(), specs, keys)
    for p, ab in weights.items():
        mask = (jnp.abs(ab["a"]).sum(axis=(2,), keepdims=True) > 0).swapaxes(-1, -2)  # rank rows in use
        noise = 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 99), ab["b"].shape)
        has = jnp.asarray([[p in s.targets] for s in specs]).reshape(-1, 1, 1, 1)
        ab["b"] = jnp.where(has & mask, noise, 0.0)
    return Adapters(weights, tuple(specs))


def forward_with(lm, adapter_weights, scale, ids):
    model = nnx.merge(lm.graphdef, lm.state)
    lora = sj.lm.model.LoraInputs(weights=adapter_weights, scale=scale)
    return np.asarray(model(jnp.asarray(ids), lora=lora)[0])


def test_adapter_forward_equals_merged_weights(base):
    _, _, lm = base
    ads = random_adapters(lm, [LoraSpec(rank=4, alpha=8.0, targets="all")])
    ids = np.arange(1, 13)[None]
    single = jax.tree.map(lambda x: x[0], ads.weights)
    with_lora = forward_with(lm, single, 2.0, ids)
    merged = LM(build_model(lm.config, ads.merged_params(lm.params(), 0)), None).logits(ids)
    np.testing.assert_allclose(with_lora, merged, atol=1e-5)
    assert np.abs(with_lora - lm.logits(ids)).max() > 1e-3, "the adapter should change the logits"


def test_peft_export_loads_in_peft_with_same_logits(base, tmp_path):
    from peft import PeftModel

    hf_model, folder, lm = base
    specs = [LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj")),
             LoraSpec(rank=8, alpha=4.0, dropout=0.05, targets=("q_proj", "down_proj", "o_proj"))]
    ads = random_adapters(lm, specs, seed=3)
    ids = np.random.default_rng(0).integers(2, 160, (2, 10))
    for k in range(2):
        out = ads.save_peft(tmp_path / f"peft{k}", k, base_model=str(folder))
        peft_model = PeftModel.from_pretrained(make_hf_model("llama", seed=21), out).eval()
        assert peft_model.peft_config["default"].r == specs[k].rank
        ref = torch_logits(peft_model, ids)
        ours = LM(build_model(lm.config, ads.merged_params(lm.params(), k)), None).logits(ids)
        np.testing.assert_allclose(ours, ref, atol=1e-4)
        assert np.abs(ref - torch_logits(hf_model, ids)).max() > 1e-3


def test_merge_function_matches_manual_sum(base):
    _, _, lm = base
    params = lm.params()
    a = jnp.ones((2, 64, 3)) * 0.1
    b = jnp.ones((2, 3, 64)) * 0.2
    out = merge(params, {"q_proj": {"a": a, "b": b}}, 0.5)
    np.testing.assert_allclose(np.asarray(out["layers.q_proj"]), np.asarray(params["layers.q_proj"]) + 0.5 * 0.1 * 0.2 * 3,
                               atol=1e-6)
    assert out["layers.v_proj"] is params["layers.v_proj"]


def test_slice_and_stack(base):
    _, _, lm = base
    a = random_adapters(lm, [LoraSpec(rank=2, alpha=2.0)], seed=1)
    b = random_adapters(lm, [LoraSpec(rank=6, alpha=2.0, targets=("o_proj",)), LoraSpec(rank=3, alpha=1.0)], seed=2)
    both = Adapters.stack([a, b])
    assert len(both) == 3 and both.weights["q_proj"]["a"].shape == (3, 2, 64, 6)
    assert set(both.weights) == {"q_proj", "v_proj", "o_proj"}
    np.testing.assert_array_equal(both.unpadded(0)["q_proj"]["a"], a.unpadded(0)["q_proj"]["a"])
    np.testing.assert_array_equal(both.unpadded(2)["v_proj"]["b"], b.unpadded(1)["v_proj"]["b"])
    assert float(jnp.abs(both.weights["o_proj"]["b"][0]).max()) == 0.0
    assert both[1].specs == (b.specs[0],) and len(both[-1]) == 1
    with pytest.raises(IndexError, match="out of range for 3"):
        both[3]
    for bad in (lambda: both.save_peft("unused", 7), lambda: both.unpadded(-4)):
        with pytest.raises(IndexError, match="adapter index -?[47] out of range for 3 candidates"):
            bad()
    np.testing.assert_array_equal(both.unpadded(-1)["q_proj"]["a"], both.unpadded(2)["q_proj"]["a"])
    np.testing.assert_allclose(np.asarray(both.scales), [1.0, 1 / 3, 1 / 3])
    one = both[1]  # a single adapter is sliced once, not on every call; new weights are sliced anew
    inputs = one.as_inputs()
    assert one.as_inputs() is inputs and inputs.weights["q_proj"]["a"].shape == (2, 64, 6)
    np.testing.assert_array_equal(inputs.weights["o_proj"]["b"], both.weights["o_proj"]["b"][1])
    one.weights = jax.tree.map(lambda x: x * 2, one.weights)
    np.testing.assert_array_equal(one.as_inputs().weights["o_proj"]["b"], 2 * inputs.weights["o_proj"]["b"])
    one.weights["o_proj"]["b"] = jnp.zeros_like(one.weights["o_proj"]["b"])  # a leaf replaced in place
    assert float(jnp.abs(one.as_inputs().weights["o_proj"]["b"]).max()) == 0.0
    assert both.as_inputs().weights is both.weights  # a stack's arrays as they are


def test_take_makes_a_stack_of_the_chosen_candidates(base):
    _, _, lm = base
    specs = [LoraSpec(rank=2, alpha=2.0), LoraSpec(rank=3, alpha=1.0), LoraSpec(rank=1, alpha=4.0)]
    ads = random_adapters(lm, specs, seed=3)
    ads.losses, ads.failed = [[1.0], [2.0, 1.5], [3.0]], [None, "loss is not finite", None]
    two = ads.take([2, 0])
    assert not two.single and two.specs == (specs[2], specs[0]) and two.losses == [[3.0], [1.0]]
    assert two.failed == [None, None]
    for p, ab in two.weights.items():
        np.testing.assert_array_equal(ab["b"], np.asarray(ads.weights[p]["b"])[[2, 0]])
    ids = np.arange(1, 9).reshape(1, 8)
    np.testing.assert_allclose(lm.logits(ids, adapter=two)[1], lm.logits(ids, adapter=ads)[0], atol=1e-6)
    assert ads.take([0, 1, 2]) is ads  # all of them, in order: the stack itself
    assert ads.take([-1, 0]).specs == (specs[2], specs[0])  # negative indices count from the end, as ads[-1]
    with pytest.raises(IndexError, match=r"\[3\] out of range for 3"):
        ads.take([0, 3])
    with pytest.raises(IndexError, match=r"\[-4\] out of range for 3"):
        ads.take([-4])


def test_stacking_adapters_of_different_models_names_the_mismatch(base):
    _, _, lm = base
    ads = random_adapters(lm, [LoraSpec(rank=2, alpha=2.0)])
    other = Adapters({p: {"a": ab["a"][:, :1], "b": ab["b"][:, :1]} for p, ab in ads.weights.items()}, ads.specs)
    with pytest.raises(LoraError, match=r"cannot stack adapters of different models: q_proj has \(layers, in, out\) "
                                        r"\[\(1, 64, 64\), \(2, 64, 64\)\]"):
        Adapters.stack([ads, other])


def test_adapters_validate_stack_shape(base):
    _, _, lm = base
    ads = random_adapters(lm, [LoraSpec(rank=2, alpha=2.0)])
    with pytest.raises(LoraError, match="leading axis 1 != 2 specs"):
        Adapters(ads.weights, ads.specs * 2)


def test_peft_names_match_peft_itself(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    hf_model, _, lm = base
    spec = LoraSpec(rank=2, alpha=2.0, targets=("q_proj", "up_proj"))
    ours = random_adapters(lm, [spec]).save_peft(tmp_path / "names")
    from safetensors.numpy import load_file

    peft_model = get_peft_model(make_hf_model("llama", seed=21), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"]))
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    got = {k: v.shape for k, v in load_file(ours / "adapter_model.safetensors").items()}
    assert got == want


def test_peft_export_on_the_bundled_model(bundled_lm, bundled_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = bundled_lm
    ads = random_adapters(lm, [LoraSpec(rank=8, alpha=16.0, targets=("q_proj", "v_proj", "down_proj"))], seed=5)
    out = ads.save_peft(tmp_path / "peft", 0, base_model=str(bundled_dir))
    base = AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids = np.array([lm.tokenizer("The lighthouse keeper kept a logbook of every ship.")["input_ids"]])
    ref = torch_logits(peft_model, ids)
    ours = lm.logits(ids, adapter=ads[0])
    assert np.abs(ours - ref).max() <= 1e-3
    assert np.abs(ours - lm.logits(ids)).max() > 0.05


def test_trained_adapters_export_for_auto_peft_without_naming_the_base(base, tmp_path):
    """Adapters remember the folder their model was loaded from: AutoPeftModelForCausalLM then loads
    the base from base_model_name_or_path (it was null, and PEFT tried the hub for 'None')."""
    import torch
    from peft import AutoPeftModelForCausalLM

    _, folder, lm = base
    ads = lm.train_adapters([[[5, 9, 17, 33, 65, 129]]], LoraSpec(rank=2, alpha=4.0),
                            sj.TrainSpec(epochs=1, learning_rate=1e-2))  # token ids: this model has no tokenizer
    assert ads.base_model == str(folder.resolve())
    out = ads.save_peft(tmp_path / "peft", 0)
    model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.arange(2, 12)[None]
    np.testing.assert_allclose(lm.logits(ids, adapter=ads[0]), torch_logits(model, ids), atol=1e-4)
    assert np.abs(lm.logits(ids, adapter=ads[0]) - lm.logits(ids)).max() > 1e-3  # the adapter is not a no-op
    assert ads[0].base_model == ads.base_model and Adapters.stack([ads, ads]).base_model == ads.base_model


def _peft_folder(tmp_path, name, seed=0, **lora_kwargs):
    """A PEFT adapter on the module's base model, with non-zero lora_B (as if trained), saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_hf_model("llama", seed=21), LoraConfig(**lora_kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn_like(p))
    model.eval()
    out = tmp_path / name
    model.save_pretrained(out)
    return model, out


@pytest.mark.parametrize("lora_kwargs", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1),
    dict(r=4, lora_alpha=6, target_modules=["k_proj", "up_proj"], use_rslora=True, layers_to_transform=[1]),
    dict(r=2, lora_alpha=4, target_modules=r".*\.(o_proj|gate_proj)"),
], ids=["list", "rslora-one-layer", "pattern"])
def test_peft_adapter_loads_with_peft_logits(base, tmp_path, lora_kwargs):
    """An adapter trained and saved by HF PEFT answers in seal-jax as it does in PEFT."""
    _, folder, lm = base
    peft_model, out = _peft_folder(tmp_path, "peft", **lora_kwargs)
    ads = Adapters.load_peft(out, config=lm.config)
    assert len(ads) == 1 and ads.single and ads.specs[0].rank == lora_kwargs["r"]
    ids = np.random.default_rng(1).integers(2, 160, (2, 9))
    ref = torch_logits(peft_model, ids)
    np.testing.assert_allclose(lm.logits(ids, adapter=ads), ref, atol=1e-4)
    assert np.abs(ref - lm.logits(ids)).max() > 1e-3  # the adapter is not a no-op
    if "layers_to_transform" not in lora_kwargs:  # the layer count read from the tensors gives the same adapter
        again = Adapters.load_peft(out)
        for p, ab in ads.weights.items():
            np.testing.assert_array_equal(np.asarray(again.weights[p]["a"]), np.asarray(ab["a"]))
    else:
        with pytest.raises(LoraError, match=r"adapts only layers \[1\]: pass config=lm.config"):
            Adapters.load_peft(out)


def test_save_peft_then_load_peft_is_the_same_adapter(base, tmp_path):
    _, folder, lm = base
    spec = LoraSpec(rank=3, alpha=5.0, dropout=0.05, targets=("v_proj", "q_proj", "down_proj"))
    ads = random_adapters(lm, [LoraSpec(rank=6, alpha=2.0), spec], seed=4)  # candidate 1 padded to rank 6
    back = Adapters.load_peft(ads.save_peft(tmp_path / "p", 1, base_model=str(folder)), config=lm.config)
    assert back.specs == (LoraSpec(rank=3, alpha=5.0, dropout=0.05, targets=("q_proj", "v_proj", "down_proj")),)
    assert back.base_model == str(folder)
    want = ads.unpadded(1)
    assert set(back.weights) == set(want)
    for p, ab in want.items():
        np.testing.assert_array_equal(np.asarray(back.weights[p]["a"][0]), ab["a"])
        np.testing.assert_array_equal(np.asarray(back.weights[p]["b"][0]), ab["b"])
    ids = np.arange(3, 14)[None]
    np.testing.assert_allclose(lm.logits(ids, adapter=back), lm.logits(ids, adapter=ads[1]), atol=1e-5)
    assert len(Adapters.stack([back, ads])) == 3  # a loaded adapter stacks with trained ones


def test_load_peft_refuses_what_it_cannot_read(base, tmp_path):
    import json

    from safetensors.numpy import save_file

    _, _, lm = base
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere"):
        Adapters.load_peft(tmp_path / "nowhere")
    good = random_adapters(lm, [LoraSpec(rank=2, alpha=4.0)]).save_peft(tmp_path / "good")
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name, tensors=None, **changes):
        out = tmp_path / name
        out.mkdir()
        (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        if tensors is not None:
            save_file(tensors, str(out / "adapter_model.safetensors"))
        return out

    bin_only = variant("bin")
    (bin_only / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoraError, match="adapter_model.bin .* save it again as safetensors"):
        Adapters.load_peft(bin_only)
    from safetensors.numpy import load_file

    tensors = load_file(good / "adapter_model.safetensors")
    for name, changes, message in [
        ("dora", {"use_dora": True}, "uses DoRA"),
        ("bias", {"bias": "lora_only"}, "trains biases"),
        ("ia3", {"peft_type": "IA3"}, "is a IA3 adapter"),
        ("pattern", {"rank_pattern": {"q_proj": 8}}, "per-module rank_pattern"),
        ("targets", {"target_modules": ["q_proj"]}, r"targets \['q_proj'\] and its tensors adapt \['q_proj', 'v_proj'\]"),
        ("rank", {"r": 3}, r"q_proj of layer 0 has lora_A \(2, 64\)"),
    ]:
        with pytest.raises(LoraError, match=message):
            Adapters.load_peft(variant(name, tensors, **changes), config=lm.config)
    head = {**tensors, "base_model.model.lm_head.lora_A.weight": np.zeros((2, 64), np.float32)}
    with pytest.raises(LoraError, match="'base_model.model.lm_head.lora_A.weight' is not LoRA on one of the projections"):
        Adapters.load_peft(variant("head", head))
    short = {k: v for k, v in tensors.items() if ".layers.1." not in k or "lora_B" not in k or "v_proj" not in k}
    with pytest.raises(LoraError, match="v_proj lacks lora_B of layer 1"):
        Adapters.load_peft(variant("short", short), config=lm.config)
    cut = variant("cut")
    (cut / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes()[:40])
    with pytest.raises(LoraError, match="cut/adapter_model.safetensors is not a readable safetensors file"):
        Adapters.load_peft(cut)
    other = make_hf_model("llama", seed=21, hidden_size=32, head_dim=8).config
    with pytest.raises(LoraError, match="the model's q_proj maps 32 -> 32"):
        Adapters.load_peft(good, config=sj.lm.config.from_hf_dict(other.to_dict()))


def test_a_rank_wider_than_a_target_projection_is_refused():
    """A LoraSpec whose rank exceeds ``min(in, out)`` of a projection it adapts is refused, naming the rank,
    the projection and its widths, by training, its lowering and ``abstract_adapters`` (every adapter made
    for a model starts in ``init_adapters``), before anything compiles; a rank equal to the narrower
    width, or too wide only for a projection the spec leaves out, is accepted."""
    lm = sj.LM.random("tiny", dtype="float32")  # q_proj 64 -> 128, k/v_proj 64 -> 64, down_proj 128 -> 64
    seqs = [[[5, 9, 17, 33, 65]]]
    wide = LoraSpec(rank=65, alpha=8.0, targets=("q_proj",))
    said = r"LoraSpec rank 65 exceeds the width of q_proj, which maps 64 -> 128 in this model.*lower the rank to 64"
    with pytest.raises(LoraError, match=said):
        lm.train_adapters(seqs, wide, sj.TrainSpec(epochs=1))
    with pytest.raises(LoraError, match=said):
        lm.lower_train(1, 1, 8, wide)
    with pytest.raises(LoraError, match=said):
        lm.abstract_adapters(1, wide)
    fits = LoraSpec(rank=2, alpha=4.0)
    with pytest.raises(LoraError, match=r"^candidate 1's LoraSpec rank 65 exceeds the width of v_proj, which maps "
                                        r"64 -> 64 .*or leave v_proj out of targets"):
        lm.abstract_adapters(2, [fits, LoraSpec(rank=65, targets=("v_proj",))])
    shapes = lm.abstract_adapters(1, LoraSpec(rank=64, targets=("k_proj", "down_proj"))).weights
    assert shapes["k_proj"]["a"].shape == (1, 2, 64, 64) and shapes["down_proj"]["b"].shape == (1, 2, 64, 64)
