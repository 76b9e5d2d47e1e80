"""The CPU-only decode tricks: column blocks, kept weight copies, and the one switch that decides them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import seal_jax as sj
from seal_jax.lm import cpu_decode
from seal_jax.lm.api import LM
from seal_jax.lm.cpu_decode import ColumnBlocks, split_columns
from seal_jax.lm.model import LoraInputs, project
from seal_jax.lm.params import projection_shape
from seal_jax.lm.sampling import SamplingParams


def test_the_switch_is_the_platform():
    assert cpu_decode.applies("cpu")
    assert not cpu_decode.applies("gpu") and not cpu_decode.applies("tpu")


def test_column_blocks_give_the_same_product():
    """A kernel cut into column blocks multiplies (with and without a LoRA term) exactly like the whole kernel."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((6, 7)), jnp.float32)
    blocks = split_columns(kernel, 2)
    assert isinstance(blocks, ColumnBlocks) and [b.shape for b in blocks.blocks] == [(6, 3), (6, 4)]
    np.testing.assert_array_equal(np.concatenate(blocks.blocks, axis=1), kernel)
    assert len(split_columns(kernel, 7)) == 7 and split_columns(kernel, 1).blocks[0].shape == (6, 7)
    np.testing.assert_array_equal(x @ blocks, x @ kernel)
    lora = {"a": jnp.asarray(rng.standard_normal((6, 2)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((2, 7)), jnp.float32)}
    np.testing.assert_allclose(project(x, blocks, lora, 0.5, 0.0, None), project(x, kernel, lora, 0.5, 0.0, None),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least one block"):
        split_columns(kernel, 0)


def test_kept_weight_copies_give_the_same_tokens(tiny_hf, monkeypatch):
    _, folder = tiny_hf("qwen3-untied")
    lm = sj.load(folder, progress=False)
    assert cpu_decode.keeps_weight_copies(lm.state, "cpu")  # CPU and small: LM keeps the per-layer copies
    assert not cpu_decode.keeps_weight_copies(lm.state, "tpu")  # never on an accelerator target
    assert not cpu_decode.keeps_weight_copies(lm.state, "gpu")
    layers, head = lm._decode_copies()
    assert lm._decode_copies()[1] is head  # made once per LM
    stacked = lm.params()
    assert len(layers) == lm.config.num_layers
    np.testing.assert_array_equal(layers[1]["q_proj"], stacked["layers.q_proj"][1])
    # the projections that run alone and the head are kept as column blocks
    assert len(layers[1]["o_proj"]) == cpu_decode.COLUMN_BLOCKS == len(head)
    np.testing.assert_array_equal(np.concatenate(layers[1]["o_proj"].blocks, axis=1), stacked["layers.o_proj"][1])
    np.testing.assert_array_equal(np.concatenate(head.blocks, axis=1), lm.model.head_kernel())
    rows = [np.random.default_rng(s).integers(3, 160, n).tolist() for n, s in [(5, 1), (9, 2), (3, 3)]]
    rng = np.random.default_rng(0)
    weights = {}
    for name in ("q_proj", "o_proj", "down_proj"):
        din, dout = projection_shape(lm.config, name)
        weights[name] = {"a": jnp.asarray(rng.normal(0, 0.3, (2, lm.config.num_layers, din, 4)), jnp.float32),
                         "b": jnp.asarray(rng.normal(0, 0.3, (2, lm.config.num_layers, 4, dout)), jnp.float32)}
    adapters = LoraInputs(weights=weights, scale=jnp.asarray([2.0, 2.0], jnp.float32))
    for params, ad in [(SamplingParams(max_new_tokens=12, ignore_eos=True), None),
                       (SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True), adapters)]:
        run = dict(eos_ids=lm._eos_ids(), pad_id=lm._pad_id(), adapters=ad)
        kept = lm._sampler.generate(lm.state, lm.config, rows, params, copies=lm._decode_copies(), **run)
        sliced = lm._sampler.generate(lm.state, lm.config, rows, params, copies=None, **run)
        assert kept == sliced
    monkeypatch.setattr(cpu_decode, "KEEP_WEIGHT_COPIES_MAX_BYTES", 0)
    assert not cpu_decode.keeps_weight_copies(lm.state, "cpu")
    fresh = LM(lm.model, lm.tokenizer)
    assert fresh._decode_copies() is None
