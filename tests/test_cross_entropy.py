"""The chunked cross-entropy (seal_jax.lm.cross_entropy) against the plain log-softmax formulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax.lm import cross_entropy as ce


def reference(hidden, kernel, targets):
    logp = jax.nn.log_softmax(hidden.astype(jnp.float32) @ kernel.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@pytest.fixture
def small_chunks(monkeypatch):
    """3 tokens per chunk for 2 rows of a 50-word vocabulary: 10 tokens run as 4 chunks, the last padded."""
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 3 * 2 * 50)
    monkeypatch.setattr(ce, "MIN_CHUNK_TOKENS", 1)
    assert ce.chunk_length(2, 10, 50) == 3


def data(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (2, 10, 8), dtype)
    kernel = jax.random.normal(k[1], (8, 50), dtype)
    targets = jax.random.randint(k[2], (2, 10), 0, 50)
    weights = jax.random.uniform(k[3], (2, 10))
    return hidden, kernel, targets, weights


@pytest.mark.parametrize("vocab_major", [False, True], ids=["head", "table"])
@pytest.mark.parametrize("chunked", [False, True])
def test_loss_and_hidden_gradient_equal_the_plain_formulation(chunked, vocab_major, request):
    """The head given as ``[D, V]``, or as a ``[V, D]`` table (a tied embedding, ``vocab_major``): the same
    loss and gradient."""
    if chunked:
        request.getfixturevalue("small_chunks")
    hidden, kernel, targets, weights = data()
    given = kernel.T if vocab_major else kernel
    np.testing.assert_allclose(ce.token_nll(hidden, given, targets, vocab_major), reference(hidden, kernel, targets),
                               atol=1e-5)
    got = jax.jit(jax.grad(lambda h: jnp.sum(ce.token_nll(h, given, targets, vocab_major) * weights)))(hidden)
    want = jax.grad(lambda h: jnp.sum(reference(h, kernel, targets) * weights))(hidden)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_under_vmap_each_lane_gets_its_own_gradient(small_chunks):
    hidden, kernel, targets, weights = data()
    lanes = jnp.stack([hidden, 2 * hidden, -hidden])

    def loss(h):
        return jnp.sum(ce.token_nll(h, kernel, targets) * weights)

    got = jax.vmap(jax.grad(loss))(lanes)
    for i in range(3):
        want = jax.grad(lambda h: jnp.sum(reference(h, kernel, targets) * weights))(lanes[i])
        np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_bfloat16_hidden_states_give_a_bfloat16_gradient_close_to_float32():
    hidden, kernel, targets, weights = data(jnp.bfloat16)
    g = jax.grad(lambda h: jnp.sum(ce.token_nll(h, kernel, targets) * weights))(hidden)
    assert g.dtype == jnp.bfloat16
    want = jax.grad(lambda h: jnp.sum(reference(h, kernel, targets) * weights))(hidden.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(g, np.float32), want, atol=0.05, rtol=0.05)
    assert ce.token_nll(hidden, kernel, targets).dtype == jnp.float32


def test_differentiating_the_head_is_refused_with_a_way_out():
    hidden, kernel, targets, _ = data()
    with pytest.raises(ce.HeadGradientError, match="stop_gradient"):
        jax.grad(lambda w: jnp.sum(ce.token_nll(hidden, w, targets)))(kernel)
    frozen = jax.grad(lambda h: jnp.sum(ce.token_nll(h, jax.lax.stop_gradient(kernel), targets)))(hidden)
    assert frozen.shape == hidden.shape


def test_chunk_length_bounds():
    assert ce.chunk_length(1, 255, 49152) == 255  # the demo's sequences: one chunk
    assert ce.chunk_length(1, 4096, 49152) == ce.CHUNK_ELEMENTS // 49152  # 341 tokens of 64 MB
    assert ce.chunk_length(1, 4096, 151936) == ce.MIN_CHUNK_TOKENS  # Qwen3: never below 256 tokens
    assert ce.chunk_length(4, 100, 151936) == 100  # never longer than the sequence


def test_no_full_logits_are_kept_for_the_backward_pass():
    """The compiled gradient's temporaries stay at one chunk of logits: less than the [T, V] float32 logits
    that the plain formulation keeps (and its log-softmax beside them)."""
    t, d, v = 2048, 64, 49152
    args = (jax.ShapeDtypeStruct((1, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((1, t), jnp.int32))

    def temporaries(nll):
        fn = jax.jit(lambda h, w, y: jax.grad(lambda h: jnp.sum(nll(h, w, y)))(h))
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    chunked, plain = temporaries(ce.token_nll), temporaries(reference)
    assert plain >= 2 * t * v * 4
    assert chunked < t * v * 4 / 2
