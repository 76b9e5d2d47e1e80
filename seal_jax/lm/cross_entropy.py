"""Next-token cross-entropy over a large vocabulary without holding ``[T, V]`` logits.

Training a LoRA adapter on a frozen base needs, per token, ``-log softmax(h @ W)[target]`` and, for the
backward pass, its gradient with respect to the hidden state ``h`` only (the head ``W`` is frozen). The
plain formulation keeps the float32 logits, their log-softmax and the logits' cotangent alive between the
forward and the backward pass: three ``[B, T, V]`` float32 arrays per micro-batch (and per lane under
``vmap``), 150 MB for one 256-token sequence of a 49k vocabulary, 620 MB for Qwen3's 152k.

:func:`token_nll` walks the tokens in chunks (:func:`chunk_length`: about :data:`CHUNK_ELEMENTS` logits per
call, per lane under ``vmap``, but at least :data:`MIN_CHUNK_TOKENS` tokens) and, in the forward
pass, computes each chunk's loss *and* its gradient direction ``(softmax - onehot) @ W.T`` (``[B, T, D]``,
the size of the hidden states). The backward pass only scales that direction by the incoming cotangent.
No logits outlive their chunk, and the FLOPs are those of the plain forward plus backward: nothing is
recomputed. The same function, undifferentiated, scores completions (:meth:`LM.completion_logprobs`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

# Logits (float32) computed at once per chunk: 2**24 = 64 MB (per lane under vmap) ...
CHUNK_ELEMENTS = 1 << 24
# ... but never fewer than 256 tokens per row: with fewer (110 at Qwen3's 152k vocabulary) the GPU compiler
# splits the chunk's contraction over the vocabulary and pads a copy of the whole head for it (+311 MB at
# Qwen3-0.6B, deviceless H100 compile); at 256 it does not, and TPU fuses the chunk either way.
MIN_CHUNK_TOKENS = 256


class HeadGradientError(ValueError):
    """The head kernel was differentiated through :func:`token_nll`, which treats it as frozen."""


def chunk_length(rows: int, length: int, vocab: int) -> int:
    """Tokens per chunk for ``rows`` sequences of ``length`` tokens: as many as :data:`CHUNK_ELEMENTS`
    logits allow, at least :data:`MIN_CHUNK_TOKENS`, at most ``length``."""
    return max(1, min(length, max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // max(1, rows * vocab))))


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
    """``[B, T, ...]`` padded along T to a multiple of ``chunk`` and cut into ``[n, B, chunk, ...]``."""
    b, t = x.shape[:2]
    n = -(-t // chunk)
    pad = [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad).reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)


def _unchunked(x: jax.Array, length: int) -> jax.Array:
    """Inverse of :func:`_chunked`: ``[n, B, chunk, ...]`` back to ``[B, length, ...]``."""
    n, b, c = x.shape[:3]
    return x.swapaxes(0, 1).reshape(b, n * c, *x.shape[3:])[:, :length]


def _vocab(kernel: jax.Array, vocab_major: bool) -> int:
    return kernel.shape[0] if vocab_major else kernel.shape[-1]


def _logits(h: jax.Array, kernel: jax.Array, vocab_major: bool) -> jax.Array:
    return jnp.einsum("...d,vd->...v" if vocab_major else "...d,dv->...v", h, kernel,
                      preferred_element_type=jnp.float32)


def _nll_chunk(h: jax.Array, kernel: jax.Array, y: jax.Array, vocab_major: bool) -> tuple[jax.Array, jax.Array]:
    """One chunk's ``-log p(y)`` ``[B, c]`` and softmax ``[B, c, V]`` (float32), both from one exponential of
    the logits (where only the loss is used, the compiler drops the softmax)."""
    logits = _logits(h, kernel, vocab_major)
    top = jnp.max(logits, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # as jax.nn.logsumexp: an infinite logit gives inf, not NaN
    e = jnp.exp(logits - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return (top + jnp.log(total))[..., 0] - picked, e / total


def _scan_chunks(fn: Any, hidden: jax.Array, targets: jax.Array, vocab: int) -> Any:
    """``fn(h_chunk, y_chunk)`` over the token chunks of ``hidden`` ``[B, T, D]`` / ``targets`` ``[B, T]``
    (a ``lax.scan``; a single chunk runs without one), results stitched back to ``[B, T, ...]``."""
    b, t, _ = hidden.shape
    chunk = chunk_length(b, t, vocab)
    if chunk >= t:
        return fn(hidden, targets)
    _, out = jax.lax.scan(lambda _, xs: (None, fn(*xs)), None, (_chunked(hidden, chunk), _chunked(targets, chunk)))
    return jax.tree.map(lambda x: _unchunked(x, t), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, vocab_major: bool = False) -> jax.Array:
    """Per-token negative log-likelihood ``-log softmax(hidden @ kernel)[targets]``, float32 ``[B, T]``.

    hidden: ``[B, T, D]`` (the states that *predict* ``targets``); kernel: the head ``[D, V]``, or with
    ``vocab_major`` ``[V, D]`` (a tied embedding as stored: each chunk's matmul reads it so, where a
    transpose taken before the loop over chunks would be a copy of the table); targets: int ``[B, T]``.
    Differentiable in ``hidden`` only: the head is treated as frozen, and differentiating it raises
    :class:`HeadGradientError`. Batch axes beyond the first come from ``vmap``.
    """
    return _scan_chunks(lambda h, y: _nll_chunk(h, kernel, y, vocab_major)[0], hidden, targets,
                        _vocab(kernel, vocab_major))


def _token_nll_fwd(hidden: Any, kernel: Any, targets: Any, vocab_major: bool) -> tuple[jax.Array, jax.Array]:
    """The loss and, per token, the gradient direction ``(softmax - onehot) @ W.T`` (the residual)."""
    if kernel.perturbed:
        raise HeadGradientError(
            "token_nll treats the head kernel as frozen and gives no gradient for it; wrap the kernel in "
            "jax.lax.stop_gradient, or use a plain log_softmax to train the head")
    h, w, y = hidden.value, kernel.value, targets.value

    vocab = _vocab(w, vocab_major)

    def chunk(hc: jax.Array, yc: jax.Array) -> tuple[jax.Array, jax.Array]:
        nll, softmax = _nll_chunk(hc, w, yc, vocab_major)
        probs = softmax - jax.nn.one_hot(yc, vocab, dtype=jnp.float32)
        direction = jnp.einsum("btv,vd->btd" if vocab_major else "btv,dv->btd", probs.astype(w.dtype), w,
                               preferred_element_type=jnp.float32)
        return nll, direction.astype(h.dtype)

    return _scan_chunks(chunk, h, y, vocab)


def _token_nll_bwd(vocab_major: bool, direction: jax.Array, cotangent: Any) -> tuple[jax.Array | None, None, None]:
    """``d hidden = cotangent * direction``; no cotangent for the (frozen) head or the integer targets."""
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):  # the loss was not used
        return None, None, None
    grad = (cotangent[..., None] * direction.astype(jnp.float32)).astype(direction.dtype)
    return grad, None, None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd, symbolic_zeros=True)
