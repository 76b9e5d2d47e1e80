"""The decoder against Hugging Face transformers on PyTorch (float32, random tiny models)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODELS, make_hf_model, torch_logits
from flax import nnx

import seal_jax as sj
from seal_jax.lm.config import preset
from seal_jax.lm.model import (
    Decoder,
    apply_rope,
    embed_tokens,
    group_adapters,
    is_grouped,
    project,
    project_group,
    rms_norm,
    rope_tables,
)


def test_embed_tokens_takes_the_rows_of_the_ids_in_any_shape():
    """One token (looked up as two, so that a vocabulary-split table is not gathered whole: test_aot) or
    many, the rows of the table in the shape of the ids."""
    table = jnp.asarray(np.random.default_rng(0).normal(size=(11, 4)), jnp.float32)
    for ids in ([[7]], [3], [[1, 2, 3], [4, 5, 10]], 5):
        ids = jnp.asarray(ids, jnp.int32)
        got = jax.jit(embed_tokens)(table, ids)
        assert got.shape == (*ids.shape, 4)
        np.testing.assert_array_equal(got, np.asarray(table)[np.asarray(ids)])


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_logits_match_transformers(tiny_hf, name):
    model, folder = tiny_hf(name)
    lm = sj.load(folder, progress=False)
    ids = np.random.default_rng(0).integers(0, lm.config.vocab_size, (3, 21))
    ours = lm.logits(ids)
    ref = torch_logits(model, ids)
    assert ours.shape == ref.shape == (3, 21, lm.config.vocab_size)
    assert np.abs(ref).max() > 0.1, "reference logits are too small for the comparison to mean anything"
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["qwen3-untied", "llama"])
def test_left_padded_batch_equals_rows_alone(tiny_hf, name):
    model, folder = tiny_hf(name)
    lm = sj.load(folder, progress=False)
    rng = np.random.default_rng(1)
    rows = [rng.integers(3, lm.config.vocab_size, n).tolist() for n in (17, 5, 11)]
    ids, mask = sj.lm.tokenizer.pad_left(rows, pad_id=0)
    batch = lm.logits(ids, mask)
    ref = torch_logits(model, ids, mask)
    for i, row in enumerate(rows):
        alone = lm.logits(np.array([row]))[0]
        got = batch[i, ids.shape[1] - len(row):]
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got, ref[i, ids.shape[1] - len(row):], atol=1e-4, rtol=0)


def test_bfloat16_is_close_to_float32(tiny_hf):
    model, folder = tiny_hf("qwen3-untied")
    ids = np.random.default_rng(2).integers(0, 160, (2, 16))
    f32 = sj.load(folder, progress=False).logits(ids)
    lm16 = sj.load(folder, dtype="bfloat16", progress=False)
    assert lm16.state["layers"]["q_proj"][...].dtype == jnp.bfloat16
    b16 = lm16.logits(ids)
    assert b16.dtype == np.float32
    # measured here: max |b16 - f32| = 0.0322 with max |f32| = 2.41 (0.0134 of it, run to run the same);
    # the bound allows 3x that
    assert np.abs(b16 - f32).max() < 0.04 * np.abs(f32).max()
    assert np.abs(b16 - f32).max() > 0, "bfloat16 weights should change the logits a little"


def test_compiled_program_does_not_grow_with_depth():
    def program_size(layers: int) -> int:
        cfg = preset("tiny").replace(num_layers=layers)
        model = Decoder(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        ids = jnp.zeros((1, 8), jnp.int32)
        text = jax.jit(lambda s: nnx.merge(graphdef, s)(ids)[0]).lower(state).as_text()
        return len(text.splitlines())

    assert program_size(2) == program_size(12)


def test_layer_weights_stored_split_run_unrolled_with_the_same_logits():
    """LayerStack.store_split (GPUs' storage): each weight becomes its L per-layer arrays, stacking them back
    gives the stacked arrays, and the forward, now unrolled over them, gives the scanned forward's logits
    and gradients of the adapters."""
    cfg = preset("tiny").replace(num_layers=3)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    stacked = model.layers.arrays()
    lora = sj.lm.model.LoraInputs(weights={"v_proj": {"a": jax.random.normal(jax.random.key(2), (3, cfg.hidden_size, 4)),
                                                      "b": jax.random.normal(jax.random.key(3), (3, 4, cfg.kv_dim))}},
                                  scale=jnp.float32(0.5))

    def loss(weights, m):
        return jnp.sum(m(ids, lora=sj.lm.model.LoraInputs(weights=weights, scale=lora.scale))[0] ** 2)

    want, want_grad = model(ids, lora=lora)[0], jax.grad(loss)(lora.weights, model)
    assert not model.layers.split
    model.layers.store_split()
    assert model.layers.split and isinstance(model.layers.q_proj.get_value(), tuple)
    assert len(model.layers.q_proj.get_value()) == 3 and model.layers.per_layer()[2]["q_proj"].shape == stacked["q_proj"].shape[1:]
    for name, x in model.layers.arrays().items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(stacked[name]))
    np.testing.assert_allclose(model(ids, lora=lora)[0], want, atol=1e-5, rtol=0)
    for g, w in zip(jax.tree.leaves(jax.grad(loss)(lora.weights, model)), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    graphdef, state = nnx.split(model)
    text = jax.jit(lambda s: nnx.merge(graphdef, s)(ids)[0]).lower(state).as_text()
    assert "while" not in text  # unrolled: no scan over the layers


def test_remat_gives_the_same_gradients():
    cfg = preset("tiny")
    ids = jnp.arange(12, dtype=jnp.int32)[None] % cfg.vocab_size

    def grads(remat: str | bool):
        model = Decoder(cfg, rngs=nnx.Rngs(3), remat=remat)

        def loss(m):
            logits, _ = m(ids)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

        return nnx.grad(loss)(model)

    g0 = grads(False)
    for remat in (True, "minimal", "full"):
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(grads(remat)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g0))


def test_building_blocks_against_torch():
    import torch
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    w = rng.normal(size=(16,)).astype(np.float32)
    norm = Qwen3RMSNorm(16, eps=1e-6)
    norm.weight.data = torch.tensor(w)
    np.testing.assert_allclose(np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6)),
                               norm(torch.tensor(x)).detach().numpy(), atol=1e-6)

    positions = jnp.asarray(rng.integers(0, 50, (2, 5)))
    cos, sin = rope_tables(positions, 16, 10000.0, jnp.float32)
    q_ref, _ = apply_rotary_pos_emb(torch.tensor(x).transpose(1, 2), torch.tensor(x).transpose(1, 2),
                                    torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), cos, sin)),
                               q_ref.transpose(1, 2).numpy(), atol=1e-5)


@pytest.mark.parametrize("adapted", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "gate_proj"),
                                     ("k_proj",), ("gate_proj", "up_proj")])
def test_grouped_adapters_project_as_each_alone(adapted):
    """A decode step's projections of one input with their adapters' ``a`` in one matmul (joined before the
    loop by group_adapters, or here) equal each projection with its own adapter, for any adapted subset
    and ranks that differ."""
    rng = np.random.default_rng(7)
    d = 16
    x = jnp.asarray(rng.normal(size=(3, 2, d)), jnp.float32)
    outs = {"q_proj": 24, "k_proj": 8, "v_proj": 8, "gate_proj": 20, "up_proj": 20}
    w = {n: jnp.asarray(rng.normal(size=(d, o)), jnp.float32) for n, o in outs.items()}
    lora = {n: {"a": jnp.asarray(rng.normal(size=(d, r)), jnp.float32),
                "b": jnp.asarray(rng.normal(size=(r, outs[n])), jnp.float32)}
            for n, r in zip(adapted, (4, 2, 4, 3), strict=False)}
    for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        alone = [project(x, w[n], lora.get(n), 0.5, 0.0, None) for n in names]
        for weights in (lora, group_adapters(lora)):
            together = project_group(x, w, names, weights, 0.5)
            for a, b in zip(alone, together, strict=True):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    joined = group_adapters(lora)
    assert ("q_proj+v_proj" in joined) == (adapted == ("q_proj", "v_proj"))
    # a joined projection keeps its `b` only (inference reads its `a` in the join), the dtype is the one asked
    # for, and joining again changes nothing (the adapted projections that share their input with no other
    # keep their own `a`)
    alone = {("q_proj", "v_proj"): set(), ("q_proj", "k_proj", "v_proj", "gate_proj"): {"gate_proj"},
             ("k_proj",): {"k_proj"}, ("gate_proj", "up_proj"): set()}[adapted]
    assert {n for n in adapted if "a" in joined[n]} == alone
    assert is_grouped(joined) == (alone != set(adapted)) and not is_grouped(lora)
    halves = group_adapters(lora, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(halves)} == {jnp.dtype(jnp.bfloat16)} and halves.keys() == joined.keys()
    again = group_adapters(halves, jnp.bfloat16)
    assert jax.tree.structure(again) == jax.tree.structure(halves)
    if adapted == ("q_proj", "v_proj"):  # a join made before an adapter's rank changed is refused
        stale = {**joined, "q_proj": {"a": lora["q_proj"]["a"][:, :2], "b": lora["q_proj"]["b"][:2]}}
        with pytest.raises(ValueError, match="q_proj\\+v_proj has 6 columns, not the sum of its ranks"):
            project_group(x, w, ("q_proj", "k_proj", "v_proj"), stale, 0.5)


def test_llama_with_more_layers_matches(tmp_path):
    model = make_hf_model("llama", seed=5, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                          hidden_size=64, head_dim=8, rope_theta=500.0)
    model.save_pretrained(tmp_path)
    lm = sj.load(tmp_path, progress=False)
    assert lm.config.num_layers == 4 and lm.config.rope_theta == 500.0
    ids = np.random.default_rng(6).integers(0, 160, (2, 33))
    np.testing.assert_allclose(lm.logits(ids), torch_logits(model, ids), atol=1e-4, rtol=0)


