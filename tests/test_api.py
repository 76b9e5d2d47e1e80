"""The LM facade: loading, logits on the real bundled model against transformers, input checks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import torch_logits
from scipy.special import log_softmax

import seal_jax as sj

TEXT = (
    "The lighthouse keeper of Vallemor kept a logbook of every ship that passed the northern cape. "
    "In the winter of 1887 he recorded a storm so violent that the lamp went dark for two nights, and "
    "the village still tells the story of the schooner that found the harbour by the light of a bonfire."
)


def test_bundled_model_matches_transformers(bundled_lm, bundled_hf):
    lm = bundled_lm
    assert (lm.config.family, lm.config.num_layers, lm.config.hidden_size) == ("llama", 30, 576)
    ids = lm.tokenizer(TEXT)["input_ids"][:64]
    assert len(ids) == 64
    ours = lm.logits(np.array([ids]))
    ref = torch_logits(bundled_hf, [ids])
    assert np.abs(ours - ref).max() <= 1e-3
    # The model is real: it predicts this text far better than chance.
    logp = log_softmax(ours[0, :-1], axis=-1)
    nll = -np.mean(logp[np.arange(63), ids[1:]])
    assert nll < 5.0, f"mean NLL {nll:.2f} nats is not what a trained model gives"


def test_bundled_left_padded_batch(bundled_lm):
    lm = bundled_lm
    rows = [lm.tokenizer(t)["input_ids"] for t in ("Paris is the capital of", "One, two, three, four, five, six")]
    ids, mask = sj.lm.tokenizer.pad_left(rows, pad_id=lm.tokenizer.pad_token_id)
    batch = lm.logits(ids, mask)
    for i, row in enumerate(rows):
        alone = lm.logits(np.array([row]))[0]
        np.testing.assert_allclose(batch[i, ids.shape[1] - len(row):], alone, atol=1e-4, rtol=0)


def test_logits_input_errors(tiny_hf):
    lm = sj.load(tiny_hf("qwen3-untied")[1], progress=False)
    assert lm.tokenizer is None
    with pytest.raises(ValueError, match=r"non-empty int array \[B, T\]"):
        lm.logits(np.zeros((0, 4), int))
    with pytest.raises(ValueError, match=r"non-empty int array \[B, T\]"):
        lm.logits(np.zeros((4,), int))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 160\)"):
        lm.logits(np.array([[1, 160]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        lm.logits(np.ones((1, 3), int), np.ones((1, 4), int))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        lm.logits(np.ones((1, 300), int))


def test_unknown_dtype(tiny_hf):
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*bfloat16"):
        sj.load(tiny_hf("llama")[1], dtype="float8")


def test_forward_returns_device_array_without_padding(tiny_hf):
    lm = sj.load(tiny_hf("llama")[1], progress=False)
    out = lm.forward(np.ones((2, 5), int))
    assert out.shape == (2, 5, 160)
    np.testing.assert_array_equal(np.asarray(out), lm.logits(np.ones((2, 5), int)))


def test_merge_adapter_and_shared_programs(tiny_hf):
    """A merged model gives the adapter's forward and reuses the compiled programs of its source model."""
    import jax
    import jax.numpy as jnp

    from seal_jax.lm.lora import init_adapters

    _, folder = tiny_hf("qwen3-untied")
    lm = sj.load(folder, progress=False)
    ids = np.array([[5, 9, 14, 3, 77, 21]])
    lora = sj.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    weights = init_adapters(lm.params(), [lora, lora], list(jax.random.split(jax.random.key(1), 2)))
    weights = {p: {"a": ab["a"], "b": jnp.full(ab["b"].shape, 0.05, jnp.float32)} for p, ab in weights.items()}
    adapters = sj.Adapters(weights=weights, specs=(lora, lora))
    merged = lm.merge_adapter(adapters, 1)
    want = lm.logits(ids, adapter=adapters[1])
    got = merged.logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(got - lm.logits(ids)).max() > 1e-2  # the adapter does something
    assert merged._logits_fn is lm._logits_fn and merged._sampler is lm._sampler
    with pytest.raises(IndexError, match="out of range"):
        lm.merge_adapter(adapters, 2)
    adapters.failed = [None, "non-finite loss at step 3"]
    with pytest.raises(ValueError, match="failed in training"):
        lm.merge_adapter(adapters, 1)


def test_free_host_memory_is_released_after_compiles(monkeypatch):
    """``LM`` hands malloc's free pages back after every XLA compile and before training (``malloc_trim``;
    see "Host memory" in seal_jax/lm/api.py); without glibc that is a no-op."""
    import jax

    from seal_jax.lm import api

    monkeypatch.setattr(api, "_malloc_trim", None)
    api.release_free_host_memory()  # looks libc up: glibc's malloc_trim, or False elsewhere
    assert api._malloc_trim is not None
    calls: list[int] = []
    monkeypatch.setattr(api, "_malloc_trim", calls.append)
    api._install_trim_listener()
    api._install_trim_listener()  # installed once, however many models are made
    jax.jit(lambda x: x * 3.0 + 0.25)(np.arange(11.0))  # a new program: one backend compile
    assert calls == [0]
    monkeypatch.setattr(api, "_malloc_trim", False)
    api.release_free_host_memory()
    assert calls == [0]
