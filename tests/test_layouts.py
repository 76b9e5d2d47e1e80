"""Memory layouts of the weights and the KV cache (lm/layouts.py): which ones a TPU gets, and that arrays
placed in them keep their values. (The programs that read them: test_sampling's TPU generation run on the
CPU, test_aot's TPU decode compiled by libtpu.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from seal_jax.lm import layouts
from seal_jax.lm import sharding as shd


def test_a_tpu_keeps_the_key_value_and_head_weights_input_minor():
    kv, head = (36, 4096, 256), (4096, 37984)  # Qwen3-8B's on a device of tensor=4
    assert layouts.weight_layout("tpu", "layers.k_proj", kv).major_to_minor == (0, 2, 1)  # stacked [L, in, out]
    assert layouts.weight_layout("tpu", "layers.v_proj", kv[1:]).major_to_minor == (1, 0)  # one layer's, split
    assert layouts.weight_layout("tpu", "lm_head", head).major_to_minor == (1, 0)
    for path in ("layers.q_proj", "layers.o_proj", "layers.gate_proj", "layers.down_proj", "embedding"):
        assert layouts.weight_layout("tpu", path, kv) is None, path
    assert layouts.weight_layout("tpu", "layers.input_norm", (36, 4096)) is None
    assert layouts.weight_layout("tpu", "not.a.param", head) is None
    # not where it would take more memory tiles (16 x 128 in bfloat16) than the default order: [32, 64] in
    # the default order pads 64 -> 128 on 32 rows, input-minor 32 -> 128 on 64 rows
    assert layouts.weight_layout("tpu", "layers.k_proj", (2, 32, 64)) is None
    assert layouts.weight_layout("tpu", "layers.k_proj", (2, 128, 64)).major_to_minor == (0, 2, 1)
    # a lite chip (v5e, v6e) reads the projections faster in the default order; the head as any TPU
    assert layouts.weight_layout("tpu", "layers.k_proj", kv, device_kind="TPU v5 lite") is None
    assert layouts.weight_layout("tpu", "layers.v_proj", kv, device_kind="TPU v6 lite") is None
    assert layouts.weight_layout("tpu", "lm_head", head, device_kind="TPU v5 lite").major_to_minor == (1, 0)
    assert layouts.weight_layout("tpu", "layers.k_proj", kv, device_kind="TPU v5").major_to_minor == (0, 2, 1)
    for platform in ("cpu", "gpu"):
        assert layouts.weight_layout(platform, "layers.k_proj", kv) is None
        assert layouts.weight_layout(platform, "lm_head", head) is None


def test_a_tpu_cache_has_the_slots_major_and_the_batch_beside_the_head_dimension():
    # [B, KVH, S, Dh] -> S, KVH, B, Dh in memory; the layer axis outermost, the candidates' inside the slots
    assert layouts.cache_layout("tpu", ()).major_to_minor == (2, 1, 0, 3)
    assert layouts.cache_layout("tpu", ("layers",)).major_to_minor == (0, 3, 2, 1, 4)
    assert layouts.cache_layout("tpu", ("candidates", "layers")).major_to_minor == (1, 4, 0, 3, 2, 5)
    assert layouts.cache_layout("tpu", ("candidates",)).major_to_minor == (3, 0, 2, 1, 4)
    assert layouts.cache_layout("cpu", ("layers",)) is None and layouts.cache_layout("gpu", ()) is None
    with pytest.raises(ValueError, match="unknown cache axes"):
        layouts.cache_layout("tpu", ("experts",))


def test_a_tpu_keeps_readied_adapters_layer_major_and_narrow_ranks_major():
    # [K, L, rows, cols]: the layers outermost, then the candidates; an `a` [in, r] whose rank is narrower
    # than a tile (a joined q/v `a` of rank 32: 64 columns, padded to 128 minor-most) with its rank major,
    # a `b` [r, out] as it is
    assert layouts.adapter_layout("tpu", (21, 36, 4096, 64)).major_to_minor == (1, 0, 3, 2)
    assert layouts.adapter_layout("tpu", (21, 36, 64, 1024)).major_to_minor == (1, 0, 2, 3)
    assert layouts.adapter_layout("tpu", (15, 36, 4096, 128)).major_to_minor == (1, 0, 2, 3)
    assert layouts.adapter_layout("tpu", (36, 4096, 64)) is None  # (one adapter: no candidate axis)
    assert layouts.adapter_layout("cpu", (21, 36, 4096, 64)) is None
    assert layouts.adapter_layout("gpu", (21, 36, 4096, 64)) is None


def test_placed_arrays_keep_their_values_and_sharding():
    mesh = shd.make_mesh("data=2,tensor=4")
    sharding = NamedSharding(mesh, PartitionSpec(None, None, "tensor"))
    x = jax.device_put(jnp.arange(2 * 6 * 8, dtype=jnp.float32).reshape(2, 6, 8), sharding)
    layout = layouts.weight_layout("tpu", "layers.k_proj", (2, 128, 128))
    y = layouts.place(x, layout)
    assert y.format.layout.major_to_minor == (0, 2, 1) and y.sharding == sharding
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert layouts.place(y, layout) is y  # already so: no copy
    assert layouts.place(x, None) is x
    # a jitted program reads it as laid out, and its results do not depend on the layout
    f = jax.jit(lambda a: jnp.einsum("lio,i->lo", a, jnp.arange(6.0)))
    np.testing.assert_allclose(np.asarray(f(y)), np.asarray(f(x)))
    # shapes: a placed one gets the layout in its format, one placed nowhere stays as it is
    struct = layouts.place(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), layout)
    assert struct.format.layout.major_to_minor == (0, 2, 1) and struct.sharding == sharding
    bare = jax.ShapeDtypeStruct(x.shape, x.dtype)
    assert layouts.place(bare, layout) is bare


def test_the_engine_gives_the_same_results_over_weights_in_a_tpus_layouts(tiny_hf):
    """Every program of the engine (logits, LoRA training, generation with and without adapters, the
    weights read back) run here on the CPU over weights laid out as on a TPU: the results of the default
    layout, and the model it came from untouched."""
    from flax import nnx

    import seal_jax as sj
    from seal_jax.lm.api import LM
    from seal_jax.lm.sampling import SamplingParams

    _, folder = tiny_hf("qwen3-wide")
    lm = sj.load(folder, progress=False)
    module = nnx.merge(lm.graphdef, jax.tree.map(lambda x: x, lm.state))  # new variables, the same arrays
    module.lay_out("tpu")
    tpu = LM(module, lm.tokenizer)
    weights, before = nnx.to_pure_dict(tpu.state), nnx.to_pure_dict(lm.state)
    assert weights["layers"]["k_proj"].format.layout.major_to_minor == (0, 2, 1)
    assert weights["lm_head"].format.layout.major_to_minor == (1, 0)
    assert before["layers"]["k_proj"].format.layout.major_to_minor == (0, 1, 2)
    ids = np.array([[5, 9, 14, 3, 7, 2, 11, 4]], dtype=np.int32)
    np.testing.assert_allclose(tpu.logits(ids), lm.logits(ids), atol=1e-6)
    for name, x in tpu.params().items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(lm.params()[name]), err_msg=name)
    texts = [[[5, 9, 14, 3, 7, 2, 11, 4, 30, 31]], [[8, 6, 12, 40, 41, 42, 9, 9]]]  # two candidates, token ids
    spec, train = sj.LoraSpec(rank=4, alpha=8.0), sj.TrainSpec(learning_rate=1e-3, epochs=2, max_len=64)
    adapters = lm.train_adapters(texts, spec, train)
    trained = tpu.train_adapters(texts, spec, train)
    for a, b in zip(jax.tree.leaves(trained.weights), jax.tree.leaves(adapters.weights), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompts = [[5, 9, 14], [3, 7, 2, 11, 4]]
    assert tpu.generate_ids(prompts, params) == lm.generate_ids(prompts, params)
    assert tpu.generate_ids(prompts, params, adapters=adapters) == lm.generate_ids(prompts, params, adapters=adapters)
