"""The next token (seal_jax.lm.next_token): the sampler's support and frequencies against transformers'
warpers, the filters' kept sets, seeds and rows, the inverse-CDF draw against numpy, and a sampled decode
step that gathers no vocabulary split over 8 H100s."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import seal_jax as sj
from seal_jax import targets
from seal_jax.lm import sharding as shd
from seal_jax.lm.config import preset
from seal_jax.lm.next_token import filter_logits, inverse_cdf, sample_step

# The sampler on a tiny vocabulary with fixed logits
PROBS = np.array([0.35, 0.25, 0.15, 0.1, 0.07, 0.05, 0.02, 0.01])
N_DRAWS = 4000


@jax.jit
def _draw(key, temperature, top_k, top_p, min_p):
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)) + 1.5, (N_DRAWS, PROBS.size))
    return sample_step(logits, key, temperature, top_k, top_p, min_p)


def draws(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0) -> np.ndarray:
    return np.asarray(_draw(jax.random.key(seed), temperature, top_k, top_p, min_p))


def reference(temperature, top_k=0, top_p=1.0, min_p=0.0, logits=None) -> np.ndarray:
    """The filtered distribution (float64) computed by transformers' own warpers, chained as `generate`
    chains them: temperature, then top-k (when > 0), top-p (when < 1) and min-p (when > 0)."""
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.log(PROBS) if logits is None else np.asarray(logits, np.float64)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p))
    scores = warpers(torch.zeros((1, 0), dtype=torch.long), torch.tensor(logits[None], dtype=torch.float64))
    return torch.softmax(scores, dim=-1)[0].numpy()


@pytest.mark.parametrize("knobs, support", [
    (dict(temperature=1.0), range(8)),
    (dict(temperature=0.5), None),
    (dict(temperature=2.0), range(8)),
    (dict(temperature=1.0, top_k=3), {0, 1, 2}),
    (dict(temperature=1.0, top_k=1), {0}),
    (dict(temperature=1.0, top_p=0.55), {0, 1}),
    (dict(temperature=1.0, top_p=0.7), {0, 1, 2}),
    (dict(temperature=1.0, top_p=0.01), {0}),
    (dict(temperature=1.0, min_p=0.3), {0, 1, 2}),
    (dict(temperature=1.0, min_p=0.5), {0, 1}),
    (dict(temperature=1.5, top_k=6, top_p=0.9, min_p=0.1), None),
])
def test_sampler_support_and_frequencies(knobs, support):
    expected = reference(**knobs)
    if support is not None:
        assert set(np.flatnonzero(expected)) == set(support), "the reference itself disagrees with the test table"
    got = draws(**knobs)
    counts = np.bincount(got, minlength=PROBS.size)
    allowed = expected > 0
    assert counts[~allowed].sum() == 0, f"drew tokens outside the support: {counts}"
    exp_counts = expected * N_DRAWS
    assert (counts[exp_counts >= 20] > 0).all(), f"a likely token never appeared: {counts} vs {exp_counts}"
    # chi-square over cells with >= 5 expected draws, the rare ones pooled into one cell
    big = exp_counts >= 5
    obs = list(counts[big]) + ([counts[allowed & ~big].sum()] if (allowed & ~big).any() else [])
    exp = list(exp_counts[big]) + ([exp_counts[allowed & ~big].sum()] if (allowed & ~big).any() else [])
    if len(obs) > 1:
        assert stats.chisquare(obs, exp).pvalue > 1e-4, f"frequencies {counts} do not fit {exp_counts}"


@pytest.mark.parametrize("knobs", [
    dict(temperature=1.0, top_k=1), dict(temperature=1.0, top_k=37), dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.3, top_p=0.3), dict(temperature=1.0, min_p=0.05), dict(temperature=2.0, min_p=0.5),
    dict(temperature=0.6, top_k=50, top_p=0.95, min_p=0.1), dict(temperature=1.3, top_k=200, top_p=0.95),
    dict(temperature=1e-3, top_p=0.99), dict(temperature=1.0, top_k=5000),
])
def test_filters_keep_exactly_the_reference_set(knobs):
    logits = np.random.default_rng(0).normal(0, 3, (6, 1000)).astype(np.float32)
    logits[5, 10:20] = -np.inf  # masked vocabulary entries stay out
    kept = np.isfinite(np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), **knobs)))
    for row in range(logits.shape[0]):
        ref = reference(logits=logits[row], **knobs) > 0
        np.testing.assert_array_equal(kept[row], ref, err_msg=f"row {row}")
        assert kept[row, np.argmax(logits[row])]


def test_sampler_greedy_seeds_and_rows():
    # temperature 0 is argmax whatever the other knobs; a tiny temperature behaves like it (no NaN)
    assert (draws(temperature=0.0, top_k=5, top_p=0.3, min_p=0.2) == 0).all()
    assert (draws(temperature=1e-30) == 0).all()
    a, b, c = draws(seed=1), draws(seed=1), draws(seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.3
    # a row's draw depends on its index, not on the batch size (padding rows does not change draws)
    logits = jnp.log(jnp.asarray(np.tile(PROBS, (5, 1)), jnp.float32))
    key = jax.random.key(3)
    np.testing.assert_array_equal(sample_step(logits[:3], key, 1.0), sample_step(logits, key, 1.0)[:3])
    # [B] keys are used as given: the per-row keys of one key are the key folded with each row's index
    rows = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(5))
    np.testing.assert_array_equal(sample_step(logits, rows, 1.0), sample_step(logits, key, 1.0))
    assert sample_step(logits, jax.random.PRNGKey(3), 1.0).shape == (5,)  # a raw uint32[2] key is one key


def numpy_inverse_cdf(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    return np.array([np.argmax(c > x * c[-1]) for c, x in zip(cdf, u, strict=True)])


@pytest.mark.parametrize("vocab", [8, 160, 384, 1001, 151936])
def test_inverse_cdf_is_the_first_index_past_the_mass(vocab):
    """The two-level draw (blocks of the vocabulary, then a token in the block) returns numpy's flat
    inverse CDF, for vocabularies of 8, 32, 128 and 1 block(s) and Qwen3's; with integer weights and targets
    half-way between them every sum is exact, so the tokens are equal, and a removed token (weight 0) is
    never drawn, even by a uniform number next to 1."""
    rng = np.random.default_rng(vocab)
    rows = 6
    probs = rng.integers(0, 4, (rows, vocab)).astype(np.float32) * (rng.random((rows, vocab)) < 0.3)
    probs[:, 0] += 1.0  # every row has mass
    probs[2, :] = 0.0
    probs[2, vocab - 1] = 5.0  # all of a row's mass in its last token
    totals = probs.sum(axis=-1)
    u = (rng.integers(0, totals.astype(np.int64)) + 0.5) / totals
    u[3] = np.nextafter(np.float32(1.0), np.float32(0.0))  # the largest uniform number
    got = np.asarray(jax.jit(inverse_cdf)(jnp.asarray(probs), jnp.asarray(u, jnp.float32)))
    np.testing.assert_array_equal(got[:3], numpy_inverse_cdf(probs[:3], u[:3]))
    np.testing.assert_array_equal(got[4:], numpy_inverse_cdf(probs[4:], u[4:]))
    assert got[3] == np.flatnonzero(probs[3])[-1]  # the last token with mass
    assert (probs[np.arange(rows), got] > 0).all()


def test_inverse_cdf_where_rounding_leaves_no_token_past_the_mass():
    """Where the running sums never pass the target (``u`` at 1, or a row of NaN), the draw takes the last
    token with mass, never a removed one, or answers ``V`` (``sample_step`` then takes the greedy token)."""
    probs = np.zeros((3, 384), np.float32)
    probs[0, [3, 200, 381]] = [1.0, 2.0, 3.0]  # mass in the last of 128 blocks (tokens 381-383)
    probs[1, [3, 200]] = [1.0, 2.0]  # none there
    probs[2, :] = np.nan
    got = np.asarray(jax.jit(inverse_cdf)(jnp.asarray(probs), jnp.ones((3,), jnp.float32)))
    assert got.tolist() == [381, 384, 384]


def test_a_sampled_decode_step_gathers_no_vocabulary_split_over_the_mesh():
    """The head split over the vocabulary (``fsdp`` of 8 H100s): the sampled decode program all-gathers no
    row of ``[B, V]`` logits or probabilities (it did: a cumulative sum over the vocabulary, which XLA ran
    on the gathered row; 9.7 MB a step for Qwen3-8B's self-edits on h100-8), only the ``[B, 128]`` masses
    of the draw's blocks (JAX 0.10) or less (0.11); the greedy program gathers nothing as wide."""
    config = preset("tiny").replace(vocab_size=1024)
    assert 1024 not in (config.hidden_size, config.intermediate_size, config.q_dim)
    lm = sj.LM.abstract(config, mesh=shd.make_mesh("data=4,fsdp=2", devices=targets.devices("h100-8")),
                        dtype="bfloat16")

    def gathered(greedy: bool) -> list[str]:
        text = lm.lower_generate(4, 16, 8, greedy=greedy)["decode"].compile().as_text()
        return re.findall(r"= (\(?[^=]*?) all-gather(?:-start)?\(", text)

    sampled = gathered(False)
    assert not [g for g in sampled if re.search(r"[\[,]1024[\],]", g)], sampled
    assert sampled  # the pattern sees the program's all-gathers (the blocks' masses, or less)
    assert not [g for g in gathered(True) if re.search(r"[\[,](1024|128)[\],]", g)]
