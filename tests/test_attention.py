"""Attention implementations against the reference einsum, the dispatch by platform, and the compiled
training program's temporaries growing linearly with the sequence on a GPU target."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import seal_jax as sj
from seal_jax import targets
from seal_jax.hlo import analyze
from seal_jax.lm import attention as attn
from seal_jax.lm import sharding as shd
from seal_jax.lm.attention import (
    AttentionError,
    Placement,
    attention,
    cached_attention,
    causal_block_attention,
    chunked_attention,
    einsum_attention,
    implementation_for,
)
from seal_jax.lm.config import preset
from seal_jax.lm.model import Decoder


def inputs(b=3, t=16, s=16, h=6, kvh=2, dh=8, seed=0):
    """Random q, k, v and a causal mask with left padding (rows 1 and 2 padded; their first rows see no key)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kvh, dh)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kvh, dh)), jnp.float32)
    real = np.ones((b, s), bool)
    real[1, :3], real[2, :9] = False, False
    allowed = np.tril(np.ones((t, s), bool), s - t)[None] & real[:, None, :]
    return q, k, v, jnp.asarray(allowed)


@pytest.mark.parametrize("chunk", [4, 8, 5])
def test_chunked_equals_einsum_with_padding_and_gqa(chunk):
    q, k, v, allowed = inputs()
    want = einsum_attention(q, k, v, allowed)
    got = chunked_attention(q, k, v, allowed, chunk=chunk)
    assert bool(jnp.isfinite(got).all())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, allowed)))

    grads_want = jax.grad(loss(einsum_attention), argnums=(0, 1, 2))(q, k, v)
    grads_got = jax.grad(loss(lambda *a: chunked_attention(*a, chunk=chunk)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grads_got, grads_want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_sequences_of_one_block_use_the_einsum_and_the_cache_path_agrees():
    q, k, v, allowed = inputs(t=6, s=6)
    np.testing.assert_array_equal(np.asarray(chunked_attention(q, k, v, allowed, chunk=8)),
                                  np.asarray(einsum_attention(q, k, v, allowed)))
    # 6 queries in blocks of 4: the last block padded with queries that see nothing, then dropped
    np.testing.assert_allclose(np.asarray(chunked_attention(q, k, v, allowed, chunk=4)),
                               np.asarray(einsum_attention(q, k, v, allowed)), atol=1e-6, rtol=0)
    for keys, transposed in [(k.transpose(0, 2, 3, 1), True), (k.transpose(0, 2, 1, 3), False)]:
        got = cached_attention(q, keys, v.transpose(0, 2, 1, 3), allowed, keys_transposed=transposed)
        np.testing.assert_allclose(np.asarray(got), np.asarray(einsum_attention(q, k, v, allowed)), atol=1e-5, rtol=0)


def test_causal_blocks_equal_the_einsum_with_padding_and_gqa():
    """CPU's "causal_blocks": each query block over the keys up to its end; equal to the einsum on every row
    that has a key (a padding row without one averages its block's values instead of all), and so are the
    gradients."""
    q, k, v, allowed = inputs(t=128, s=128)
    rows = np.asarray(allowed).any(-1)[:, :, None, None]  # [B, T, 1, 1]: rows with at least one key
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32) * rows

    def run(fn):
        out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, allowed), q, k, v)
        return (out * rows, *pull(cot))

    want = run(einsum_attention)
    for blocks in (4, 2, 3):  # 3 does not divide 128: one block
        got = run(lambda *a, blocks=blocks: causal_block_attention(*a, blocks=blocks))
        for name, x, y in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=0, err_msg=f"{blocks}: {name}")
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, allowed, "causal_blocks")),  # the dispatch
                                  np.asarray(causal_block_attention(q, k, v, allowed)))
    short = inputs()  # below BLOCKS_FROM: one block, no padding row differs
    np.testing.assert_allclose(np.asarray(causal_block_attention(*short)), np.asarray(einsum_attention(*short)),
                               atol=1e-5, rtol=0)
    with pytest.raises(AttentionError, match="T queries over their own T keys, got 16 and 20"):
        causal_block_attention(*inputs(t=16, s=20))


def test_dispatch_by_platform_and_errors():
    assert implementation_for("cpu") == "causal_blocks"
    assert implementation_for("tpu") == "splash" and implementation_for("gpu") == "triton"
    assert implementation_for("an unknown platform") == "chunked"
    q, k, v, allowed = inputs()
    # "chunked" keeps the einsum below CHUNKED_FROM tokens: there the blocks cost more time than they save
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, allowed, "chunked")),
                                  np.asarray(einsum_attention(q, k, v, allowed)))
    with pytest.raises(AttentionError, match="unknown attention implementation 'flash'"):
        attention(q, k, v, allowed, "flash")
    with pytest.raises(AttentionError, match="5 query heads do not divide into 2"):
        einsum_attention(q[..., :5, :], k, v, allowed)
    with pytest.raises(AttentionError, match="unknown attention implementation"):
        Decoder(preset("tiny"), rngs=nnx.Rngs(0), attention_impl="flash")
    # the LM picks the implementation from its mesh's devices, not from the host
    assert sj.LM.abstract("tiny").model.attention_impl == "causal_blocks"
    gpu = shd.make_mesh("data=8", devices=targets.devices("h100-8"))
    assert sj.LM.abstract("tiny", mesh=gpu).model.attention_impl == "triton"
    assert sj.LM.abstract("tiny", mesh=gpu).model.attention_placement == Placement(gpu)
    # a model built with an implementation keeps it
    assert sj.LM(Decoder(preset("tiny"), rngs=nnx.Rngs(0), attention_impl="chunked"), None).model.attention_impl == (
        "chunked")
    # one given to the LM overrides the platform's (a machine whose JAX rejects the kernel runs "chunked")
    assert sj.LM.abstract("tiny", mesh=gpu, attention="chunked").model.attention_impl == "chunked"
    assert sj.LM.random("tiny", dtype="float32", attention="chunked").model.attention_impl == "chunked"
    with pytest.raises(AttentionError, match="attention 'flash' is not an implementation; choose one of"):
        sj.LM.random("tiny", attention="flash")
    # a kernel only on its own platform (or a CPU, where Pallas interprets it: the tests)
    with pytest.raises(AttentionError, match="attention 'splash' is the TPU kernel and this mesh's devices are GPUs"):
        sj.LM.abstract("tiny", mesh=gpu, attention="splash")
    tpu = shd.make_mesh("data=4", devices=targets.devices("tpu-v5p-8"))
    with pytest.raises(AttentionError, match="'triton' is the GPU kernel .* are TPUs; leave attention out"):
        sj.LM.abstract("tiny", mesh=tpu, attention="triton")
    assert sj.LM.abstract("tiny", attention="splash").model.attention_impl == "splash"  # interpreted on a CPU


def test_a_kernel_is_checked_against_the_einsum_on_the_machine(monkeypatch):
    """``check_kernel``: None where the kernel runs and agrees (here Pallas' interpreter), else the reason in one
    line: a kernel that gives wrong numbers, or one that a new JAX rejects."""
    shape = dict(heads=4, kv_heads=2, head_dim=64, dtype=jnp.float32)
    assert attn.check_kernel("triton", **shape) is None
    assert attn.check_kernel("splash", **shape) is None
    # the backward pass is checked too: a kernel whose gradients are wrong is found
    real_local = attn._triton_local

    @jax.custom_vjp
    def wrong_grads(q, k, v, seg):
        return real_local(q, k, v, seg, interpret=True)

    wrong_grads.defvjp(lambda q, k, v, seg: (wrong_grads(q, k, v, seg), (q, k, v, seg)),
                       lambda res, g: (jnp.zeros_like(res[0]), jnp.zeros_like(res[1]), jnp.zeros_like(res[2]), None))
    monkeypatch.setattr(attn, "_triton_local", lambda q, k, v, seg, interpret: wrong_grads(q, k, v, seg))
    assert attn.check_kernel("triton", **shape).startswith("its dq differs from the einsum's by 1 of the largest")

    def rejected(q, k, v, seg, interpret):
        raise TypeError("mha() got an unexpected keyword argument 'sm_scale'")

    monkeypatch.setattr(attn, "_triton_local", rejected)
    assert attn.check_kernel("triton", **shape) == "TypeError: mha() got an unexpected keyword argument 'sm_scale'"
    with pytest.raises(AttentionError, match="check_kernel takes a fused kernel"):
        attn.check_kernel("einsum", **shape)


# no mesh; heads over tensor; heads over fsdp (no tensor); rows over data kept whole and split
KERNEL_PLACEMENTS = [(None, True), ("data=2,fsdp=2,tensor=2", True), ("data=2,fsdp=4", True), ("data=8", False),
                     ("data=8", True)]


@pytest.mark.parametrize("impl", ["splash", "triton"])
def test_fused_kernels_equal_the_einsum_with_padding_gqa_and_a_mesh(impl):
    """TPU's splash and GPU's Triton flash attention (Pallas, interpret mode on this CPU), alone and in their
    shard_map over meshes of 8 CPU devices: the einsum's outputs and gradients on every real query row, for
    a length that is not a whole tile, grouped-query heads and left, right and no padding (on data=8 with
    the rows kept whole, as inside a vmap over training lanes, and split)."""
    rng = np.random.default_rng(5)
    b, t, h, kvh, dh = 8, 200, 8, 4, 16
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, kvh, dh)), jnp.float32) for _ in range(2))
    real = np.ones((b, t), bool)
    real[1, :3], real[2, :150], real[3, 170:], real[6, :40] = False, False, False, False
    allowed = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & real[:, None, :])
    rows = jnp.asarray(real[:, :, None, None])

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(rows, jnp.sin(fn(q, k, v)), 0.0))

    want = einsum_attention(q, k, v, allowed)
    grads_want = jax.grad(loss(lambda *a: einsum_attention(*a, allowed)), argnums=(0, 1, 2))(q, k, v)
    for spec, rows_split in KERNEL_PLACEMENTS:
        placement = Placement(None if spec is None else shd.make_mesh(spec), rows_split=rows_split)
        assert (tuple(placement.specs(b, kvh)[1])[:1] == ("data",)) == (spec is not None and rows_split)
        if spec is not None:  # the key/value heads over tensor, else over fsdp, else whole
            heads = {"data=2,fsdp=2,tensor=2": "tensor", "data=2,fsdp=4": "fsdp"}.get(spec)
            assert placement.specs(b, kvh)[0][2] == heads

        def fused(q, k, v, placement=placement):
            return attention(q, k, v, allowed, impl, segments=jnp.asarray(real), placement=placement)

        got = jax.jit(fused)(q, k, v)
        np.testing.assert_allclose(np.asarray(jnp.where(rows, got, 0)), np.asarray(jnp.where(rows, want, 0)),
                                   atol=2e-6, rtol=0)
        grads = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
        for a, w in zip(grads, grads_want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=2e-5, rtol=0)
    with pytest.raises(AttentionError, match=f"{impl} attention needs the segment ids"):
        attention(q, k, v, allowed, impl)
    # less than one tile (the kernel would pad it to a whole one): the einsum
    short = (q[:, :40], k[:, :40], v[:, :40], allowed[:, :40, :40])
    np.testing.assert_array_equal(np.asarray(attention(*short, impl, segments=jnp.asarray(real[:, :40]))),
                                  np.asarray(einsum_attention(*short)))
    if impl == "splash":  # a head size Mosaic cannot compile the kernel for, on a TPU: the query blocks
        tpu = Placement(shd.make_mesh("data=8", devices=targets.devices("tpu-v5e-8")))
        with jax.default_matmul_precision("default"):
            assert attn.splash_attention_applies(16, Placement()) and not attn.splash_attention_applies(16, tpu)
            assert attn.splash_attention_applies(64, tpu)


def test_a_causal_blocks_model_gives_the_einsum_models_hidden_states_on_real_tokens():
    """A whole decoder over 256 tokens (four blocks of 64) with left padding: the CPU's causal blocks = the
    einsum on every real token (a padding token's row averages fewer values; nothing reads it)."""
    config = preset("tiny")
    einsum = Decoder(config, rngs=nnx.Rngs(3), attention_impl="einsum")
    blocks = Decoder(config, rngs=nnx.Rngs(3), attention_impl="causal_blocks")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 256)))
    mask = jnp.ones((2, 256), jnp.int32).at[1, :100].set(0)
    a, _ = einsum.hidden_states(ids, mask)
    b, _ = blocks.hidden_states(ids, mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], atol=2e-5, rtol=0)
    assert not np.allclose(np.asarray(b)[~real], np.asarray(a)[~real])  # the padding rows do differ


def test_a_chunked_model_gives_the_einsum_models_hidden_states():
    """A whole decoder over 2,048 tokens (four blocks of 512) with left padding: chunked = einsum."""
    config = preset("tiny").replace(max_position_embeddings=4096)
    einsum = Decoder(config, rngs=nnx.Rngs(3))
    chunked = Decoder(config, rngs=nnx.Rngs(3), attention_impl="chunked")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 2048)))
    mask = jnp.ones((2, 2048), jnp.int32).at[1, :700].set(0)
    a, _ = einsum.hidden_states(ids, mask)
    b, _ = chunked.hidden_states(ids, mask)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=0)


@pytest.mark.parametrize("target, mesh_spec, kernel, call", [
    ("h100-1", "data=1", "triton", "__gpu$xla.gpu.triton"),
    ("tpu-v5p-16", "data=2,tensor=4", "splash", "tpu_custom_call"),
])
def test_training_temporaries_grow_linearly_with_the_sequence(target, mesh_spec, kernel, call):
    """The training program compiled for an H100 and a TPU v5p slice (deviceless; on v5p two candidates on
    lanes over `data`, heads over `tensor`): from 2,048 to 4,096 tokens the temporaries at most about double
    with the platform's fused kernel (which the compiled program calls), and on the GPU with chunked
    attention (no [T, S] float32 scores kept), where the einsum's grow about 4x."""
    config = preset("tiny").replace(num_heads=16, num_kv_heads=4, head_dim=64, max_position_embeddings=8192)
    mesh = shd.make_mesh(mesh_spec, devices=targets.devices(target))
    assert sj.LM.abstract(config, mesh=mesh, dtype="bfloat16").model.attention_impl == kernel
    lanes = mesh.shape["data"]

    def growth(impl, layers="scan"):
        # the scanned layers: there the einsum does its 6 attention matmuls, to which the count below holds the
        # kernel (with GPU training's unrolled layers XLA saves one of them: 384 against 419 GFLOP a step); a
        # scan needs the weights stacked (GPUs store them split)
        model_lm = sj.LM.abstract(config, mesh=mesh, dtype="bfloat16", remat="none",
                                  layer_storage="stacked" if layers == "scan" else None)
        model_lm.model.attention_impl, model_lm.model.train_layers = impl, layers
        model_lm.graphdef, model_lm.state = nnx.split(model_lm.model)
        spec = sj.TrainSpec(epochs=1, max_len=4096)
        compiled = [model_lm.lower_train(lanes, lanes, t, sj.LoraSpec(rank=8, alpha=16), spec).compile()
                    for t in (2048, 4096)]
        stats = analyze(compiled[1].as_text())
        if impl == kernel:
            assert stats.custom_calls.get(call, 0) > 0
        if layers == "scan":
            flops[impl] = stats.flops / max(loop.trips for loop in stats.loops if loop.trips)  # per micro-step
        temps = [c.memory_analysis().temp_size_in_bytes for c in compiled]
        return temps[1] / temps[0]

    flops: dict[str, float] = {}
    # (the tests run at "highest" precision, which the splash kernel cannot compile at: such a process gets
    # "chunked" instead; the default precision gets the kernel)
    if kernel == "splash":
        assert not attn.splash_attention_applies(64, attn.Placement(mesh))
    with jax.default_matmul_precision("default"):
        ratios = {impl: growth(impl) for impl in (kernel, "einsum") + (("chunked",) if kernel == "triton" else ())}
        if kernel == "triton":  # and as GPUs train, with the layers unrolled
            ratios["triton, unrolled"] = growth(kernel, "unrolled")
    assert ratios[kernel] <= 2.2 < ratios["einsum"] and ratios.get("chunked", 0) <= 2.2, ratios
    assert ratios.get("triton, unrolled", 0) <= 2.2, ratios
    # hlo.py counts the kernels' matmuls: the einsum's 6 over the whole square (forward 2, backward 4) give
    # way to the kernel's forward 2 and backward 7 over the causal tiles (per micro-step: one lane of one
    # sequence a device, its heads split over tensor)
    heads = config.num_heads // mesh.shape["tensor"]
    unit = 2 * 4096**2 * heads * config.head_dim * config.num_layers
    backward_tile = attn.TRITON_BACKWARD_BLOCK if kernel == "triton" else attn.KERNEL_BLOCK
    fused = unit * (2 * attn.causal_share(4096) + 7 * attn.causal_share(4096, backward_tile))
    assert flops[kernel] == pytest.approx(flops["einsum"] - 6 * unit + fused, rel=0.01), flops


def test_attention_rows_without_keys_average_the_values():
    """A row that may see no key (left padding) averages all values instead of giving NaN, in both
    implementations."""
    q = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 2, 4)), jnp.float32)
    k = jnp.ones((1, 4, 1, 4))
    v = jnp.arange(16.0).reshape(1, 4, 1, 4)
    allowed = jnp.zeros((1, 4, 4), bool)
    mean = np.broadcast_to(np.asarray(v).mean(axis=1, keepdims=True), (1, 4, 2, 4))
    np.testing.assert_allclose(np.asarray(attention(q, k, v, allowed)), mean, atol=1e-6)
    np.testing.assert_allclose(np.asarray(chunked_attention(q, k, v, allowed, chunk=3)), mean, atol=1e-6)


def test_cached_attention_equals_attention_on_the_cache_layout():
    """The decode path's attention (keys cached transposed) equals :func:`attention` for several new tokens,
    grouped-query heads, padding and a row with no allowed key."""
    rng = np.random.default_rng(0)
    b, t, s, h, kvh, dh = 3, 4, 11, 6, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kvh, dh)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kvh, dh)), jnp.float32)
    allowed = jnp.asarray(rng.random((b, t, s)) < 0.6).at[2, 1].set(False)
    want = attention(q, k, v, allowed)
    for keys, transposed in [(k.transpose(0, 2, 3, 1), True), (k.transpose(0, 2, 1, 3), False)]:
        got = cached_attention(q, keys, v.transpose(0, 2, 1, 3), allowed, keys_transposed=transposed)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
