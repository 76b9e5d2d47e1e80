"""The next token from a step's logits: greedy, or Hugging Face's filters and a draw.

Sampling (:func:`sample_step`) follows the order Hugging Face applies its warpers in: temperature → top-k
→ top-p → min-p, then a draw by inverse CDF (:func:`inverse_cdf`). temperature 0 is greedy (argmax). The
filters find their cut-offs by bisection instead of a sort (see :func:`filter_logits`).

Everything here is element-wise work and reductions over the vocabulary, so where the output head is split
over the vocabulary (``sharding``: ``head_vocab`` over ``fsdp × tensor``) each device works on the logits
it computed, and the devices exchange per-row scalars and one row's block of probabilities. So no
program gathers a ``[B, V]`` row of logits (``tests/test_next_token.py`` compiles a step for 8 H100s),
where each device holds whole blocks of :func:`inverse_cdf`: the vocabulary split over a power of two of
devices, at most :data:`DRAW_BLOCKS`, that divides it. A cumulative sum over the whole vocabulary did: XLA
all-gathered the float32 probabilities on every sampled decode step (Qwen3-8B on h100-8 ``tensor=8``:
9.7 MB a step, BENCHMARKS.md, twenty-fifth session).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# The draw's blocks of the vocabulary (at most this many; as many as divide it): a power of two, so that a
# vocabulary split over the mesh splits along whole blocks
DRAW_BLOCKS = 128


_INF_BITS = 0x7F800000  # the int32 bit pattern of +inf; non-negative floats order like their bit patterns


def _smallest_passing(ok: Any, batch: int) -> jax.Array:
    """Per row, the smallest int32 ``s`` in ``[0, _INF_BITS]`` with ``ok(s)`` true (``ok`` monotone, true at
    ``_INF_BITS``), by 31 rounds of bisection. ``ok`` maps ``[B, 1]`` candidates to bool ``[B]``."""

    def step(_: Any, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds  # ok(lo) is false (or lo = -1), ok(hi) is true
        mid = lo + (hi - lo) // 2
        good = ok(mid[:, None])
        return jnp.where(good, lo, mid), jnp.where(good, mid, hi)

    lo = jnp.full((batch,), -1, jnp.int32)
    hi = jnp.full((batch,), _INF_BITS, jnp.int32)
    return jax.lax.fori_loop(0, 31, step, (lo, hi))[1]


def filter_logits(logits: jax.Array, temperature: Any, top_k: Any = 0, top_p: Any = 1.0,
                  min_p: Any = 0.0) -> jax.Array:
    """Temperature-scaled logits with the tokens that top-k, top-p and min-p remove set to ``-inf``.

    Args:
      logits: float ``[B, V]``.
      temperature: > 0 (a scalar, traced or not); top_k, top_p, min_p: see :class:`SamplingParams`.
    Returns:
      float32 ``[B, V]``: ``(logits - max) / temperature`` on kept tokens, ``-inf`` elsewhere.

    The filters run in Hugging Face's order: temperature → top-k → top-p → min-p (top-p's mass is measured
    after top-k, min-p relative to the top token). The result is what sorting the logits would give: top-k
    keeps tokens at least as likely as the k-th most likely one (ties at the boundary all stay, as in
    Hugging Face); top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``; the top
    token always stays. Instead of a sort (slow on CPU: ~70 ms for 8 rows of a 49k vocabulary), the cut-offs
    are found by bisection on the bit patterns of the non-negative distances ``(max - logits) / temperature``,
    which order like the floats themselves, so the thresholds are exact.
    """
    logits = logits.astype(jnp.float32)
    b, v = logits.shape
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    min_p = jnp.asarray(min_p, jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    # distance from the top token in temperature-scaled logit units: 0 for the top, >= 0 elsewhere
    dist = (top - logits) / jnp.where(temperature > 0, temperature, 1.0)
    bits = jax.lax.bitcast_convert_type(dist, jnp.int32)
    weight = jnp.exp(-dist)  # unnormalised probabilities, 1 for the top token

    def kth_cutoff() -> jax.Array:
        return _smallest_passing(lambda s: jnp.sum(bits <= s, axis=-1) >= top_k, b)

    no_cut = jnp.full((b,), _INF_BITS, jnp.int32)
    cut_k = jax.lax.cond((top_k > 0) & (top_k < v), kth_cutoff, lambda: no_cut)
    keep = bits <= cut_k[:, None]
    after_k = jnp.where(keep, weight, 0.0)
    needed = top_p * jnp.sum(after_k, axis=-1)

    def nucleus_cutoff() -> jax.Array:
        return _smallest_passing(lambda s: jnp.sum(jnp.where(bits <= s, after_k, 0.0), axis=-1) >= needed, b)

    cut_p = jax.lax.cond(top_p < 1.0, nucleus_cutoff, lambda: no_cut)
    keep &= bits <= cut_p[:, None]
    keep &= weight >= min_p  # p >= min_p * p_top, since the top token's weight is 1
    keep |= dist == 0  # the top token (and any exact tie with it) always survives
    return jnp.where(keep, -dist, -jnp.inf)


def _first_true(mask: jax.Array) -> jax.Array:
    """Index of the first true entry of each row of bool ``[B, V]`` (``V`` if none), int32 ``[B]``.

    A min-reduction over indices: on CPU several times faster than ``argmax``'s variadic reduction.
    """
    v = mask.shape[-1]
    return jnp.min(jnp.where(mask, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def greedy_step(logits: jax.Array) -> jax.Array:
    """The greedy token of each row of ``logits`` ``[B, V]``: the first index of the row's maximum."""
    return _first_true(logits == jnp.max(logits, axis=-1, keepdims=True))


def sample_step(logits: jax.Array, key: jax.Array, temperature: Any, top_k: Any = 0, top_p: Any = 1.0,
                min_p: Any = 0.0) -> jax.Array:
    """Draw one token per row.

    Args:
      logits: float ``[B, V]``.
      key: a PRNG key; row ``i`` draws with ``fold_in(key, i)``, so a row's draw does not depend on the
        batch size. Or ``[B]`` typed keys (``jax.random.key``), one per row, used as they are.
      temperature, top_k, top_p, min_p: scalars (traced or not), see :class:`SamplingParams`;
        ``temperature == 0`` is greedy (argmax, the filters are skipped).
    Returns:
      int32 ``[B]`` token ids.

    The draw is by inverse CDF over :func:`filter_logits`' distribution (:func:`inverse_cdf`): one
    uniform number per row.
    """
    logits = logits.astype(jnp.float32)
    b = logits.shape[0]
    greedy = greedy_step(logits)

    def sampled() -> jax.Array:
        probs = jnp.exp(filter_logits(logits, temperature, top_k, top_p, min_p))
        per_row = jnp.ndim(key) == 1 and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        row_keys = key if per_row else jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(b))
        first = inverse_cdf(probs, jax.vmap(jax.random.uniform)(row_keys))
        return jnp.where(first < logits.shape[1], first, greedy)

    return jax.lax.cond(jnp.asarray(temperature) > 0, sampled, lambda: greedy)


def inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """Per row of ``probs`` ``[B, V]`` (non-negative, not normalised) the first index whose cumulative
    mass exceeds ``u × the row's total``, for ``u`` ``[B]`` in ``[0, 1)``; ``V`` where rounding leaves none.

    In two levels, so that a vocabulary split over devices is never gathered: the row's mass per block of
    ``V / G`` tokens (``G`` = the largest divisor of ``V`` up to :data:`DRAW_BLOCKS` that is a power of two)
    and their running sum (``[B, G]``) find the block; the block's probabilities (a masked sum over the
    blocks, ``[B, V / G]``) and their running sum find the token in it. An index whose probability is 0 (a
    token the filters removed) is never returned.
    """
    b, v = probs.shape
    g = math.gcd(v, DRAW_BLOCKS)
    blocks = probs.reshape(b, g, v // g)
    cdf = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [B, G]
    target = u * cdf[:, -1]
    block = jnp.minimum(_first_true(cdf > target[:, None]), g - 1)
    before = jnp.where(block > 0, jnp.take_along_axis(cdf, jnp.maximum(block - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    inside = jnp.sum(jnp.where((jnp.arange(g) == block[:, None])[:, :, None], blocks, 0.0), axis=1)  # [B, V / G]
    # the block's own running sum may fall short of the target by rounding: then its last kept token
    kept = inside > 0
    width = v // g
    last_kept = jnp.max(jnp.where(kept, jnp.arange(width, dtype=jnp.int32), -1), axis=-1)
    first = _first_true(kept & (before[:, None] + jnp.cumsum(inside, axis=-1) > target[:, None]))
    inner = jnp.where(first < width, first, last_kept)
    return jnp.where(inner >= 0, block * width + inner, v)
