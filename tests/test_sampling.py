"""Sampling: HF greedy parity, stop ids, adapters under vmap, a sharded mesh, compile counts and input errors
(the per-step sampler's support and frequencies: tests/test_next_token.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import seal_jax as sj
from seal_jax.lm import attention as attn
from seal_jax.lm.api import LM, build_model
from seal_jax.lm.model import LoraInputs
from seal_jax.lm.sampling import SamplingError, SamplingParams, check_prompt_ids
from seal_jax.lm.tokenizer import TokenizerError, format_chat, pad_left

RNG_PROMPTS = [(7, 0), (3, 1), (12, 2)]  # (length, seed) of the tiny models' prompts


def tiny_prompts(lengths_seeds=RNG_PROMPTS, vocab: int = 160) -> list[list[int]]:
    """Random prompts avoiding the special ids 0-2 of the tiny models."""
    return [np.random.default_rng(s).integers(3, vocab, n).tolist() for n, s in lengths_seeds]


def cut_at(row: list[int], stops) -> list[int]:
    """``row`` up to (not including) its first id in ``stops``."""
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


def hf_greedy(model, rows: list[list[int]], max_new: int, pad_id: int, eos_ids) -> list[list[int]]:
    """transformers' greedy `generate` on the left-padded rows; new ids up to the first EOS."""
    import torch

    ids, mask = pad_left(rows, pad_id)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=pad_id, eos_token_id=list(eos_ids))
    return [cut_at(r, set(eos_ids)) for r in out[:, ids.shape[1]:].tolist()]


@pytest.fixture(scope="module")
def qwen(tiny_hf):
    """The tiny untied Qwen3 (torch model, LM), shared by the tests of this module."""
    model, folder = tiny_hf("qwen3-untied")
    return model, sj.load(folder, progress=False)


@pytest.fixture(scope="module")
def sharded_qwen(tiny_hf):
    """The same model on a data=2, fsdp=2, tensor=2 mesh of 8 fake CPU devices."""
    _, folder = tiny_hf("qwen3-untied")
    return sj.load(folder, progress=False, mesh="data=2,fsdp=2,tensor=2")


# ----------------------------------------------------------------------------------------------------
# SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(min_p=1.0), "min_p"),
    (dict(min_p=-0.1), "min_p"), (dict(seed=-1), "seed"), (dict(seed=2**32), "seed"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(stop_token_ids=[1, -2]), "stop_token_ids"),
    (dict(stop_token_ids="abc"), "stop_token_ids"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(SamplingError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams(stop_token_ids=[5, 7])
    assert p.stop_token_ids == (5, 7) and hash(p) == hash(SamplingParams(stop_token_ids=(5, 7)))
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.min_p, p.seed, p.ignore_eos) == (
        64, 0.0, 0, 1.0, 0.0, 0, False)
    assert sj.SamplingParams is SamplingParams and sj.lm.SamplingParams is SamplingParams
    with pytest.raises(SamplingError, match="top_p"):
        p.replace(top_p=2.0)


# ----------------------------------------------------------------------------------------------------
# Greedy parity with transformers


@pytest.mark.parametrize("name", ["qwen3-untied", "llama"])
def test_greedy_matches_transformers_and_rows_alone(tiny_hf, name):
    model, folder = tiny_hf(name)
    lm = sj.load(folder, progress=False)
    rows = tiny_prompts()
    params = SamplingParams(max_new_tokens=20)
    ours = lm.generate_ids(rows, params)
    ref = hf_greedy(model, rows, 20, pad_id=0, eos_ids=[1])
    assert ours == ref
    assert max(len(r) for r in ours) == 20
    for row, out in zip(rows, ours, strict=True):
        assert lm.generate_ids([row], params) == [out]


def test_bundled_chat_greedy_matches_transformers(bundled_lm, bundled_hf):
    lm = bundled_lm
    prompts = ["What is the capital of France?",
               "Write two sentences about the sea at night, with the moon and a small boat in them.", "Hi!"]
    rows = [lm.tokenizer(format_chat(lm.tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    assert len({len(r) for r in rows}) == 3
    params = SamplingParams(max_new_tokens=24)
    ref = hf_greedy(bundled_hf, rows, 24, pad_id=lm.tokenizer.pad_token_id, eos_ids=lm._eos_ids())
    assert lm.generate_ids(rows, params) == ref
    texts = lm.generate(prompts, params, chat=True)
    assert texts == [lm.tokenizer.decode(r, skip_special_tokens=True) for r in ref]
    assert all(t.strip() for t in texts)


def test_chat_formatting_and_thinking_switch(tiny_hf, monkeypatch):
    from seal_jax.assets import qwen3_tokenizer_dir

    _, folder = tiny_hf("qwen3-tied")
    lm = sj.load(folder, tokenizer=qwen3_tokenizer_dir(), progress=False)
    seen = []
    answer = lm.tokenizer("<|im_start|>Paris<|im_end|>", add_special_tokens=False)["input_ids"]

    def spy(ids, params=None, adapters=None, seeds=None):
        seen.append(ids)
        return [answer for _ in ids]

    monkeypatch.setattr(lm, "generate_ids", spy)
    assert lm.generate(["Capital of France?"], chat=True) == ["Paris"]  # special tokens skipped
    lm.generate(["Capital of France?"], chat=True, enable_thinking=True)
    lm.generate(["Capital of France?"])
    off, on, plain = (lm.tokenizer.decode(s[0]) for s in seen)
    assert off == format_chat(lm.tokenizer, "Capital of France?") and "<think>\n\n</think>" in off
    assert on == format_chat(lm.tokenizer, "Capital of France?", enable_thinking=True) and "<think>" not in on
    assert plain == "Capital of France?"


# ----------------------------------------------------------------------------------------------------
# Stop ids, EOS, max_new_tokens


def with_eos(lm: LM, eos: tuple[int, ...]) -> LM:
    """The same weights with other EOS ids in the config (and no tokenizer)."""
    return LM(build_model(lm.config.replace(eos_token_ids=eos), lm.params()), None)


def test_stop_ids_eos_and_max_new_tokens(qwen):
    _, lm = qwen
    rows = tiny_prompts()
    full = lm.generate_ids(rows, SamplingParams(max_new_tokens=16, ignore_eos=True))
    g = full[0]
    j = next(i for i in range(3, len(g)) if g[i] not in g[:i])  # a token that first appears at position j
    stop = g[j]

    # an explicit stop id truncates before its first occurrence; other rows are cut at theirs (or not at all)
    got = lm.generate_ids(rows, SamplingParams(max_new_tokens=16, stop_token_ids=(stop,), ignore_eos=True))
    assert got == [cut_at(r, {stop}) for r in full] and got[0] == g[:j]
    # max_new_tokens counts generated tokens
    assert lm.generate_ids(rows, SamplingParams(max_new_tokens=5, ignore_eos=True)) == [r[:5] for r in full]
    assert lm.generate_ids(rows, SamplingParams(max_new_tokens=1, ignore_eos=True)) == [r[:1] for r in full]
    # a stop id on the very first token gives an empty answer
    assert lm.generate_ids(rows[:1], SamplingParams(max_new_tokens=16, stop_token_ids=(g[0],)))[0] == []

    # EOS from the config stops too, unless ignore_eos; an explicit stop id still stops under ignore_eos
    eos_lm = with_eos(lm, (stop,))
    assert eos_lm.generate_ids(rows, SamplingParams(max_new_tokens=16))[0] == g[:j]
    assert eos_lm.generate_ids(rows, SamplingParams(max_new_tokens=16, ignore_eos=True)) == full
    assert eos_lm.generate_ids(rows, SamplingParams(max_new_tokens=16, ignore_eos=True,
                                                    stop_token_ids=(stop,)))[0] == g[:j]


def test_sampled_generation_is_reproducible(qwen):
    _, lm = qwen
    rows = tiny_prompts()
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    a, b = lm.generate_ids(rows, p), lm.generate_ids(rows, p)
    c = lm.generate_ids(rows, p.replace(seed=8))
    assert a == b and a != c
    assert a != lm.generate_ids(rows, SamplingParams(max_new_tokens=12, ignore_eos=True))


def test_requests_with_their_own_seeds_share_a_batch_as_if_alone(qwen):
    """``seeds=``: the rows of each seed draw what a call of their own with that seed draws, wherever they sit
    in the batch, so several requests (one per passage) can share one decode program."""
    _, lm = qwen
    rows = tiny_prompts()
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    first, second = rows[:2], rows[1:]
    alone = lm.generate_ids(first, p), lm.generate_ids(second, p.replace(seed=11))
    mixed = [second[0], first[0], second[1], first[1]]  # interleaved: each seed's rows keep their own order
    together = lm.generate_ids(mixed, p, seeds=[11, 7, 11, 7])
    assert [together[1], together[3]] == alone[0] and [together[0], together[2]] == alone[1]
    assert lm.generate_ids(rows, p, seeds=[7] * len(rows)) == lm.generate_ids(rows, p)  # = params.seed
    with pytest.raises(SamplingError, match=r"seeds: one integer in \[0, 2\*\*32\) per prompt \(3\), got 2"):
        lm.generate_ids(rows, p, seeds=[1, 2])


# ----------------------------------------------------------------------------------------------------
# Compilation


def test_many_calls_compile_once(tiny_hf, monkeypatch):
    from seal_jax.lm import api

    monkeypatch.setattr(api, "_PROGRAMS", {})  # start from no compiled program
    _, folder = tiny_hf("qwen3-untied")
    lm = sj.load(folder, progress=False)
    rng = np.random.default_rng(0)
    knobs = [dict(), dict(temperature=0.7, top_k=5), dict(temperature=1.2, top_p=0.8, min_p=0.05, seed=3),
             dict(temperature=1.0, stop_token_ids=(5, 9, 11), ignore_eos=True), dict(max_new_tokens=9)]
    for i, k in enumerate(knobs):
        rows = [rng.integers(3, 160, n).tolist() for n in rng.integers(1, 17, 3 + i % 2)]  # 3 or 4 rows
        lm.generate_ids(rows, SamplingParams(**{"max_new_tokens": 16, **k}))
    sampler = lm._sampler
    # the per-layer weight copies (CPU) are made once, at the first generation; greedy rows (temperature 0)
    # have a decode program of their own, without the sampling, and every sampled call shares the other
    assert dict(sampler.traces) == {"prefill": 1, "decode": 2, "split": 1}
    assert sampler.prefill._cache_size() == 1 and sampler.decode._cache_size() == 2
    # a longer prompt bucket compiles one more prefill and (greedy) decode
    lm.generate_ids([list(range(3, 40))], SamplingParams(max_new_tokens=16))
    assert dict(sampler.traces) == {"prefill": 2, "decode": 3, "split": 1}

    # the decode program takes the prefill's cache over (donated: the input buffers are gone afterwards)
    ids, mask = pad_left(tiny_prompts() + [[3]], 0, 16)
    logits, cache = sampler.prefill(lm.state, jnp.asarray(ids), jnp.asarray(mask), None, None, cache_len=32)
    knobs = dict(temperature=np.float32(0), top_k=np.int32(0), top_p=np.float32(1), min_p=np.float32(0),
                 seed=np.zeros((4,), np.uint32), row=np.arange(4, dtype=np.int32), max_new_tokens=np.int32(16),
                 pad_id=np.int32(0))
    tokens, lengths, _ = sampler.decode(lm.state, cache, logits, None, None, knobs, jnp.full((8,), -1, jnp.int32),
                                        jnp.asarray([False, False, False, True]), lm._decode_copies(), out_len=16,
                                        greedy=True)
    assert len(cache.k) == lm.config.num_layers and all(x.is_deleted() for x in (*cache.k, *cache.v))
    assert dict(sampler.traces) == {"prefill": 2, "decode": 3, "split": 1}  # the first calls' greedy program
    assert np.asarray(lengths).tolist() == [16, 16, 16, 0]


# ----------------------------------------------------------------------------------------------------
# Adapters (hand-made; K stacked candidates under vmap)

TARGETS = ("q_proj", "v_proj", "down_proj")


def make_adapters(lm: LM, rank: int = 4, seed: int = 0) -> LoraInputs:
    """K=2 stacked adapters: candidate 0 has b = 0 (a no-op), candidate 1 is random."""
    from seal_jax.lm.params import projection_shape

    rng = np.random.default_rng(seed)
    L = lm.config.num_layers
    weights = {}
    for name in TARGETS:
        din, dout = projection_shape(lm.config, name)
        a = rng.normal(0, 0.3, (2, L, din, rank)).astype(np.float32)
        b = rng.normal(0, 0.3, (2, L, rank, dout)).astype(np.float32)
        b[0] = 0
        weights[name] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    return LoraInputs(weights=weights, scale=jnp.asarray([2.0, 2.0], jnp.float32))


def pick(adapters: LoraInputs, k: int, stacked: bool) -> LoraInputs:
    sl = slice(k, k + 1) if stacked else k
    return LoraInputs(weights=jax.tree.map(lambda x: x[sl], adapters.weights), scale=adapters.scale[sl])


def merged_lm(lm: LM, adapter: LoraInputs) -> LM:
    """A model whose kernels are ``W + scale * a @ b`` (one unstacked adapter)."""
    params = dict(lm.params())
    for name, piece in adapter.weights.items():
        params[f"layers.{name}"] = params[f"layers.{name}"] + adapter.scale * jnp.einsum(
            "lir,lro->lio", piece["a"], piece["b"])
    return LM(build_model(lm.config, params), None)


def test_stacked_adapters_equal_single_and_merged(qwen):
    _, lm = qwen
    rows = tiny_prompts()
    adapters = make_adapters(lm)
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    base = lm.generate_ids(rows, greedy)
    both = lm.generate_ids(rows, greedy, adapters=adapters)
    assert len(both) == 2 and both[0] == base and both[1] != base
    for k in range(2):
        assert lm.generate_ids(rows, greedy, adapters=pick(adapters, k, stacked=True)) == [both[k]]
        assert lm.generate_ids(rows, greedy, adapters=pick(adapters, k, stacked=False)) == both[k]

    one = pick(adapters, 1, stacked=False)
    merged = merged_lm(lm, one)
    assert merged.generate_ids(rows, greedy) == both[1]
    # the adapter's prefill logits equal the merged model's last-position logits
    ids, mask = pad_left(rows, 0, 16)
    logits, _ = lm._sampler.prefill(lm.state, jnp.asarray(ids), jnp.asarray(mask), one.weights,
                                    jnp.float32(one.scale), cache_len=32)
    np.testing.assert_allclose(np.asarray(logits), merged.logits(ids, mask)[:, -1], atol=1e-4, rtol=0)

    # sampling: every candidate sees the same random numbers, so the no-op adapter reproduces the base
    hot = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    sampled = lm.generate_ids(rows, hot, adapters=adapters)
    assert sampled[0] == lm.generate_ids(rows, hot) and sampled[1] != sampled[0]


def test_lora_adapters_class_stack_and_single(qwen):
    _, lm = qwen
    rows = tiny_prompts()
    hand = make_adapters(lm)
    adapters = sj.Adapters(hand.weights, (sj.LoraSpec(rank=4, alpha=8.0, targets=TARGETS),) * 2)
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    both = lm.generate_ids(rows, greedy, adapters=adapters)
    assert both == lm.generate_ids(rows, greedy, adapters=hand)
    assert lm.generate_ids(rows, greedy, adapters=adapters[1]) == both[1]  # adapters[k] is one adapter
    assert lm.generate_ids(rows, greedy, adapters=sj.Adapters.stack([adapters[1]])) == [both[1]]  # a stack of one
    # the facade's adapter logits agree with the sampler's prefill under the same adapter
    ids, mask = pad_left(rows, 0, 16)
    one = pick(hand, 1, stacked=False)
    logits, _ = lm._sampler.prefill(lm.state, jnp.asarray(ids), jnp.asarray(mask), one.weights,
                                    jnp.float32(one.scale), cache_len=32)
    np.testing.assert_allclose(np.asarray(logits), lm.logits(ids, mask, adapter=adapters[1])[:, -1], atol=1e-4)


def test_generate_text_with_stacked_adapters_returns_k_lists(bundled_lm):
    lm = bundled_lm
    from seal_jax.lm.params import projection_shape

    din, dout = projection_shape(lm.config, "v_proj")
    L = lm.config.num_layers
    adapters = LoraInputs(weights={"v_proj": {"a": jnp.zeros((3, L, din, 2)), "b": jnp.zeros((3, L, 2, dout))}},
                          scale=jnp.ones((3,)))
    params = SamplingParams(max_new_tokens=4)
    out = lm.generate(["Hello", "Name a colour."], params, adapters=adapters, chat=True)
    assert len(out) == 3 and all(o == out[0] for o in out) and len(out[0]) == 2
    assert out[0] == lm.generate(["Hello", "Name a colour."], params, chat=True)


# ----------------------------------------------------------------------------------------------------
# Mesh


def test_sharded_sampling_equals_unsharded(tiny_hf, qwen):
    _, lm = qwen
    _, folder = tiny_hf("qwen3-untied")
    sharded = sj.load(folder, mesh="data=2,fsdp=2,tensor=2", progress=False)
    rows = tiny_prompts()
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True)
    assert sharded.generate_ids(rows, greedy) == lm.generate_ids(rows, greedy)
    adapters = make_adapters(lm)
    assert sharded.generate_ids(rows, greedy, adapters=adapters) == lm.generate_ids(rows, greedy, adapters=adapters)
    # sampled, the vocabulary split over fsdp x tensor: the draw (next_token.inverse_cdf) per block of it
    sampled = SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=1.0, top_p=0.9, seed=5)
    assert sharded.generate_ids(rows, sampled) == lm.generate_ids(rows, sampled)

    # the prefill places the batch and the cache's batch axis over `data`, KV heads over `tensor`
    s = sharded._sampler
    ids, mask = pad_left(rows + [[3]], 0, 16)
    _, cache = s.prefill(sharded.state, s.put_batch(ids), s.put_batch(mask), None, None, cache_len=32)
    for layer in (*cache.k, *cache.v):  # keys [B, KVH, Dh, S], values [B, KVH, S, Dh] per layer
        spec = tuple(layer.sharding.spec)
        assert spec + (None,) * (4 - len(spec)) == ("data", "tensor", None, None)
    assert cache.k[0].shape == (len(rows) + 1, lm.config.num_kv_heads, lm.config.head_dim, 32)
    assert cache.v[0].shape == (len(rows) + 1, lm.config.num_kv_heads, 32, lm.config.head_dim)


class MeshSizes:
    """A mesh of sizes only, as the planner passes it to ``batch_bucket``."""

    def __init__(self, **sizes: int):
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}


def test_batch_buckets_give_accelerators_two_rows_per_device():
    """``batch_bucket`` for a mesh of sizes: a power of two, a multiple of ``data``; a decode of one row per
    device runs two per device on a GPU, and on a TPU where a device holds at least half of each weight
    (``pads_one_row``; measured in BENCHMARKS.md, twenty-fifth session); CPUs never pad, nor do rows
    scored whole, nor one row per device under K >= 2 stacked adapters."""
    from seal_jax.lm.sampling import batch_bucket

    def bucket(n, platform, decode=True, stacked=1, **sizes):
        return batch_bucket(n, MeshSizes(**sizes), decode=decode, platform=platform, stacked=stacked)

    assert [bucket(n, "cpu", data=8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    assert [bucket(n, "gpu", data=8) for n in (1, 8, 9, 16)] == [16, 16, 16, 16]
    assert [bucket(n, "gpu", tensor=8) for n in (1, 2, 3)] == [2, 2, 4]
    assert [bucket(n, "gpu", data=2, tensor=4) for n in (1, 2, 3, 5)] == [4, 4, 4, 8]
    assert bucket(8, "gpu", decode=False, data=8) == 8
    assert bucket(8, "gpu", stacked=5, data=8) == 8 and bucket(1, "gpu", stacked=2) == 1
    tpu = {spec: bucket(n, "tpu", **spec_sizes) for spec, n, spec_sizes in (
        ("data=4", 4, {"data": 4}), ("data=2,tensor=2", 2, {"data": 2, "tensor": 2}),
        ("data=2,fsdp=2", 2, {"data": 2, "fsdp": 2}), ("tensor=4", 1, {"tensor": 4}),
        ("fsdp=2,tensor=2", 1, {"fsdp": 2, "tensor": 2}), ("tensor=8", 1, {"tensor": 8}))}
    assert tpu == {"data=4": 8, "data=2,tensor=2": 4, "data=2,fsdp=2": 4, "tensor=4": 1, "fsdp=2,tensor=2": 1,
                   "tensor=8": 1}
    assert batch_bucket(3, None) == 4  # no mesh: a power of two on the platform of the default devices (CPU)


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_fail_before_compute(qwen, tiny_hf):
    _, lm = qwen
    before = dict(lm._sampler.traces)
    p = SamplingParams(max_new_tokens=8)
    context = lm.config.max_position_embeddings
    cases = [
        ([], "non-empty"),
        ([[5, 6], []], "prompt 1 is empty"),
        ([[5, 6], [3, 160]], "outside"),
        ([[5, 6], [3, -1]], "outside"),
        ([[5] * (context - 7)], "context"),
        ([[5, 6], "abc"], "list of ints"),
    ]
    for ids, message in cases:
        with pytest.raises(SamplingError, match=message):
            lm.generate_ids(ids, p)
    assert check_prompt_ids([[5] * (context - 8)], p, lm.config)  # exactly fills the context: allowed
    with pytest.raises(SamplingError, match="stop_token_ids"):
        lm.generate_ids([[5]], SamplingParams(stop_token_ids=(999,)))
    with pytest.raises(TypeError, match="SamplingParams"):
        lm.generate_ids([[5]], {"max_new_tokens": 3})
    with pytest.raises(SamplingError, match="max_new_tokens"):
        lm.generate_ids([[5]], SamplingParams(max_new_tokens=0))
    bad = make_adapters(lm)
    with pytest.raises(SamplingError, match="q_proj"):
        lm.generate_ids([[5]], p, adapters=LoraInputs(weights={"q_proj": {"a": bad.weights["q_proj"]["a"][:, :, :5],
                                                                          "b": bad.weights["q_proj"]["b"]}}))
    with pytest.raises(SamplingError, match="unknown projections"):
        lm.generate_ids([[5]], p, adapters=LoraInputs(weights={"w_proj": bad.weights["q_proj"]}))
    with pytest.raises(SamplingError, match="scale"):
        lm.generate_ids([[5]], p, adapters=LoraInputs(weights=bad.weights, scale=jnp.ones(3)))
    # without a tokenizer, text generation explains what to do
    assert lm.tokenizer is None
    with pytest.raises(TokenizerError, match="generate_ids"):
        lm.generate(["hello"], p)
    assert dict(lm._sampler.traces) == before, "a bad input started a compile"


def test_bad_text_inputs(bundled_lm):
    lm = bundled_lm
    for prompts, message in [([], "non-empty"), (["ok", ""], "prompt 1 is empty"), ("hello", "single string"),
                             (["ok", 3], "must be a str")]:
        with pytest.raises(SamplingError, match=message):
            lm.generate(prompts, SamplingParams(max_new_tokens=4))
    with pytest.raises(SamplingError, match="context of 8192"):
        lm.generate(["word " * 8190], SamplingParams(max_new_tokens=8))


def test_scanned_decode_gives_the_tokens_of_the_unrolled_one(qwen, sharded_qwen):
    """The TPU decode (layers scanned over the stacked weights, one stacked cache with keys laid out as the
    values) run here on the CPU: the same tokens as the unrolled decode that matches transformers, greedy
    and sampled, with and without stacked adapters, on one device and sharded."""
    from seal_jax.lm import sampling

    _, lm = qwen
    sharded = sharded_qwen
    rows, adapters = tiny_prompts(), make_adapters(lm)
    stack = sj.Adapters(adapters.weights, (sj.LoraSpec(rank=4, alpha=8.0, targets=TARGETS),) * 2)
    for model in (lm, sharded):
        scanned = sampling.Sampler(model.graphdef, model.mesh)
        assert not scanned.scan_layers  # CPU: unrolled unless asked
        scanned.scan_layers = True
        greedy, sampled = (SamplingParams(max_new_tokens=12, ignore_eos=True),
                           SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True))
        for params, ad in [(greedy, None), (greedy, adapters), (sampled, adapters), (greedy, stack)]:
            run = dict(eos_ids=model._eos_ids(), pad_id=model._pad_id(), adapters=ad)
            expected = model._sampler.generate(model.state, model.config, rows, params, copies=None, **run)
            assert scanned.generate(model.state, model.config, rows, params, **run) == expected
            if ad is stack:  # readied adapters (cast, joined), each layer's indexed inside the scan
                ready = dict(run, adapters=model.ready_adapters(stack))
                assert scanned.generate(model.state, model.config, rows, params, **ready) == expected
    # the stacked cache holds what the per-layer one holds, keys in the values' layout
    ids, mask = pad_left(rows, 0, 16)
    _, per_layer = lm._sampler.prefill(lm.state, jnp.asarray(ids), jnp.asarray(mask), None, None, cache_len=32)
    _, stacked = scanned.prefill(lm.state, jnp.asarray(ids), jnp.asarray(mask), None, None, cache_len=32)
    assert stacked.stacked and not per_layer.stacked
    # (two programs compiled apart: float32 rounding may differ in the last bits)
    np.testing.assert_allclose(np.asarray(stacked.k[1]), np.asarray(per_layer.k[1]).transpose(0, 1, 3, 2), atol=1e-5)
    np.testing.assert_allclose(np.asarray(stacked.v[1]), np.asarray(per_layer.v[1]), atol=1e-5)
    with pytest.raises(ValueError, match="stacked cache scans the stacked weights; pass layers=None"):
        lm.model.extend(jnp.asarray(ids[:, :1]), None, stacked, layers=lm.model.layer_params())


def test_the_gpu_decode_gives_the_tokens_of_the_cpu_one(qwen, sharded_qwen):
    """The GPU's decode (unrolled over a per-layer cache whose keys are laid out as the values, none of
    lm/cpu_decode.py's tricks) run here on the CPU: the tokens of the CPU decode (transposed keys, kept weight
    copies in column blocks), greedy and sampled, with and without stacked adapters, on one device and
    sharded."""
    from seal_jax.lm import sampling

    _, lm = qwen
    sharded = sharded_qwen
    rows, adapters = tiny_prompts(), make_adapters(lm)
    for model in (lm, sharded):
        gpu = sampling.Sampler(model.graphdef, model.mesh)
        assert gpu.cpu_tricks and not gpu.scan_layers  # CPU: the tricks apply unless switched off
        gpu.cpu_tricks = False
        for params, ad in [(SamplingParams(max_new_tokens=12, ignore_eos=True), None),
                           (SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True), adapters)]:
            run = dict(eos_ids=model._eos_ids(), pad_id=model._pad_id(), adapters=ad)
            expected = model._sampler.generate(model.state, model.config, rows, params,
                                               copies=model._decode_copies(), **run)
            assert gpu.generate(model.state, model.config, rows, params, **run) == expected
    ids, mask = pad_left(rows, 0, 16)
    gpu = sampling.Sampler(lm.graphdef)
    gpu.cpu_tricks = False
    _, cpu_cache = lm._sampler.prefill(lm.state, jnp.asarray(ids), jnp.asarray(mask), None, None, cache_len=32)
    _, gpu_cache = gpu.prefill(lm.state, jnp.asarray(ids), jnp.asarray(mask), None, None, cache_len=32)
    assert cpu_cache.keys_transposed and not gpu_cache.keys_transposed and not gpu_cache.stacked
    np.testing.assert_allclose(np.asarray(gpu_cache.k[1]), np.asarray(cpu_cache.k[1]).transpose(0, 1, 3, 2), atol=1e-5)


def test_stacked_decode_donates_its_whole_cache(qwen):
    """The cache goes back out of a stacked-adapter decode in the shape it came in, so every buffer of it is
    donated (no "donated buffers were not usable" warning for the users of the demo to read)."""
    import warnings

    from seal_jax.lm import sampling

    _, lm = qwen
    fresh = sampling.Sampler(lm.graphdef, lm.mesh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.generate(lm.state, lm.config, tiny_prompts(), SamplingParams(max_new_tokens=6, ignore_eos=True),
                       eos_ids=lm._eos_ids(), pad_id=lm._pad_id(), adapters=make_adapters(lm))
    assert not [w for w in caught if "donated buffers" in str(w.message)]


def test_the_tpu_generation_with_splash_attention_gives_the_cpu_tokens(qwen, sharded_qwen, monkeypatch):
    """The TPU's whole generation path run here on the CPU: prompts of more than one 128-token tile through
    splash attention (Pallas, in interpret mode, in its shard_map), layers scanned, keys in the values'
    layout, the weights and the cache in a TPU's memory layouts (lm/layouts.py): the CPU's tokens, greedy
    and sampled, with and without stacked adapters (the prefill's vmap over candidates around the
    shard_map), on one device and sharded; the cache comes out of the prefill and the decode in its layout."""
    from seal_jax.lm import layouts, sampling

    calls = []
    kernel = attn.splash_attention
    monkeypatch.setattr(attn, "splash_attention", lambda *a: calls.append(a[0].shape) or kernel(*a))
    _, lm = qwen
    rows, adapters = tiny_prompts([(150, 1), (131, 2), (140, 3)]), make_adapters(lm)
    for model in (lm, sharded_qwen):
        module = nnx.merge(model.graphdef, jax.tree.map(lambda x: x, model.state))  # (its own variables)
        module.attention_impl = "splash"
        module.lay_out("tpu")
        assert module.layers.k_proj.get_value().format.layout.major_to_minor == (0, 2, 1)
        graphdef, state = nnx.split(module)
        tpu = sampling.Sampler(graphdef, model.mesh)
        tpu.scan_layers, tpu.cpu_tricks, tpu.platform = True, False, "tpu"
        laid_out = (tpu, state)  # (the sharded model's, for the cache below: layouts need a mesh)
        for params, ad in [(SamplingParams(max_new_tokens=12, ignore_eos=True), None),
                           (SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True), adapters)]:
            run = dict(eos_ids=model._eos_ids(), pad_id=model._pad_id(), adapters=ad)
            expected = model._sampler.generate(model.state, model.config, rows, params,
                                               copies=model._decode_copies(), **run)
            assert tpu.generate(state, model.config, rows, params, **run) == expected
    assert calls  # the prompts went through the kernel, not the einsum
    # the cache in the layout the decode reads, from the prefill, and back from the decode (donated through)
    tpu, state = laid_out
    ids, mask = pad_left(rows[:2], 0, 256)
    for ad, order in [(None, (0, 3, 2, 1, 4)), (adapters, (1, 4, 0, 3, 2, 5))]:
        lw, ls = (None, None) if ad is None else (ad.weights, ad.scale)
        ids_, mask_ = jnp.asarray(ids), jnp.asarray(mask)
        logits, cache = tpu.prefill_program(state, ids_, lw, ls, 272)(state, ids_, mask_, lw, ls, cache_len=272)
        assert cache.k.format.layout.major_to_minor == cache.v.format.layout.major_to_minor == order
        assert layouts.cache_layout("tpu", ("candidates",) * (ad is not None) + ("layers",)).major_to_minor == order
        knobs = tpu.put_replicated(sampling.knob_arrays(SamplingParams(max_new_tokens=4), 0, 2))
        _, _, cache = tpu.decode_program(cache)(state, cache, logits, lw, ls, knobs, jnp.full((8,), -1, jnp.int32),
                                 jnp.zeros((2,), bool), out_len=4)
        assert cache.k.format.layout.major_to_minor == order
