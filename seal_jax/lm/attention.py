"""Attention: every implementation behind one function, and one dispatch point chosen from the platform.

:func:`attention` is what the decoder layer calls for T tokens attending to their own keys (training,
logits, the prompt of a generation). The implementation comes from :func:`implementation_for`, decided
once per model from the platform of its mesh's devices (``sharding.platform``; for a TPU or GPU topology
compiled on a CPU host it is the target's platform, never the host's), and stored on the ``Decoder``:

- ``"einsum"`` (CPU): one grouped-query einsum with a float32 ``[B, KVH, G, T, S]`` score matrix. On a CPU
  the scores of SEAL's short sequences are small, and one fused program is fastest.
- ``"chunked"`` (TPU, GPU): the same arithmetic over blocks of :data:`QUERY_CHUNK` queries (a ``lax.map``),
  each block's scores recomputed in the backward pass (``jax.checkpoint``). So no ``[T, S]`` float32 matrix
  exists, neither in the forward nor in the saved residuals, and training's temporaries grow linearly with
  T. A row's softmax sees exactly the same numbers as in ``"einsum"``, so the results agree to float
  rounding. Sequences shorter than :data:`CHUNKED_FROM` use ``"einsum"`` (below that length the blocks
  cost more time than their memory is worth); a length the block does not divide is padded to whole blocks.

Not here yet: fused kernels (Pallas flash/splash attention on TPU, cuDNN flash attention on GPU). cuDNN
cannot be reached by a deviceless GPU compile ("cuDNN not found"), so the compile-based checks could not
see it; and a Pallas kernel needs ``shard_map`` around it, because GSPMD cannot partition a Mosaic call.

The decode path's :func:`cached_attention` attends T new tokens over a KV cache, keys laid out as the values
(``[B, KVH, S, Dh]``), or transposed (``[B, KVH, Dh, S]``), the faster form on XLA:CPU only (see
:mod:`seal_jax.lm.cpu_decode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("einsum", "chunked")
# Queries per block of "chunked" (its scores: B x H x 512 x S float32 at a time), used from CHUNKED_FROM
# tokens on. Compiled for SEAL's Qwen3-8B training (BENCHMARKS.md, "Attention by platform"): at T = 1024,
# blocks of 512 saved 1.9 GB of 12 on a v5e chip and cost 17% more roofline time (the blocks' recompute
# nests inside remat's), so the einsum stays; at T = 2048 they let the program fit a v5e chip at all, and
# blocks of 512 beat blocks of 1,024 in both memory and time on H100, v5e and v5p.
QUERY_CHUNK = 512
CHUNKED_FROM = 2048


class AttentionError(ValueError):
    """An unknown attention implementation or malformed attention inputs."""


def implementation_for(platform: str) -> str:
    """The attention implementation for programs that run on ``platform`` (``"cpu"``, ``"tpu"``, ``"gpu"``)."""
    return "einsum" if platform == "cpu" else "chunked"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, impl: str = "einsum") -> jax.Array:
    """Grouped-query scaled dot-product attention by implementation ``impl`` (:data:`IMPLEMENTATIONS`).

    q: ``[B, T, H, Dh]``; k, v: ``[B, S, KVH, Dh]`` with ``H % KVH == 0``; allowed: bool ``[B, T, S]``. Rows
    with no allowed key (left padding) get a uniform average instead of NaN. Returns ``[B, T, H, Dh]`` in
    ``q.dtype``; the softmax is computed in float32.
    """
    if impl == "einsum":
        return einsum_attention(q, k, v, allowed)
    if impl == "chunked":
        if q.shape[1] < CHUNKED_FROM:
            return einsum_attention(q, k, v, allowed)
        return chunked_attention(q, k, v, allowed)
    raise AttentionError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """The reference: one einsum for the scores ``[B, KVH, G, T, S]`` (float32), softmax, one for the output."""
    b, t, h, dh = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise AttentionError(f"{h} query heads do not divide into {kvh} key/value heads")
    qg = q.reshape(b, t, kvh, h // kvh, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    # the mask is added, not selected: the backward pass of an addition needs no copy of the mask, where a
    # select keeps one broadcast over every head (in "chunked", stacked for every block: T x S x H bytes)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :, :]
    scores = scores * (dh ** -0.5) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                      chunk: int = QUERY_CHUNK) -> jax.Array:
    """:func:`einsum_attention` over blocks of ``chunk`` queries, each block's scores recomputed in the
    backward pass: the float32 scores of one block ``[B, KVH, G, chunk, S]`` exist at a time. A length the
    block does not divide is padded with queries that see no key (their rows are dropped)."""
    b, t, h, dh = q.shape
    if t <= chunk:
        return einsum_attention(q, k, v, allowed)
    blocks = -(-t // chunk)
    pad = blocks * chunk - t
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        allowed = jnp.pad(allowed, ((0, 0), (0, pad), (0, 0)))

    @jax.checkpoint  # keep only the block's inputs for the backward pass, not its scores
    def block(i: jax.Array) -> jax.Array:
        # the block's queries and mask are sliced inside the loop: a mask broadcast over the heads then stays
        # one block's, where slices given to the loop as inputs let XLA hoist the broadcast of all of them
        q_i = jax.lax.dynamic_slice_in_dim(q, i * chunk, chunk, axis=1)
        allowed_i = jax.lax.dynamic_slice_in_dim(allowed, i * chunk, chunk, axis=1)
        return einsum_attention(q_i, k, v, allowed_i)

    out = jax.lax.map(block, jnp.arange(blocks))  # [blocks, B, chunk, H, Dh]
    return out.swapaxes(0, 1).reshape(b, blocks * chunk, h, dh)[:, :t]


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array,
                     keys_transposed: bool = False) -> jax.Array:
    """Grouped-query attention of T new tokens over a KV cache (the decode path).

    q: ``[B, T, H, Dh]``; keys: the cache's keys ``[B, KVH, S, Dh]`` like the values (or, with
    ``keys_transposed``, ``[B, KVH, Dh, S]``); values: ``[B, KVH, S, Dh]``; allowed: bool ``[B, T, S]``.
    Returns ``[B, T, H, Dh]`` in ``q.dtype``.

    Two plain batched matmuls per row and KV head (``[G*T, Dh] @ [Dh, S]`` and ``[G*T, S] @ [S, Dh]``,
    batch axes leading): with one new token XLA:CPU runs these about 4x faster than the einsum of
    :func:`einsum_attention`.
    """
    b, t, h, dh = q.shape
    kvh, s = keys.shape[1], keys.shape[3 if keys_transposed else 2]
    g = h // kvh
    qm = q.reshape(b, t, kvh, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * g, dh)
    batch = ((0, 1), (0, 1))
    contract = (3,), (2 if keys_transposed else 3,)
    scores = jax.lax.dot_general(qm, keys, (contract, batch), preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kvh, t, g, s) * (dh ** -0.5)
    scores = jnp.where(allowed[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype).reshape(b, kvh, t * g, s)
    out = jax.lax.dot_general(probs, values, (((3,), (2,)), batch))
    return out.reshape(b, kvh, t, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h, dh).astype(q.dtype)
