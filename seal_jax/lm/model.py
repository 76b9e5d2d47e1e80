"""The decoder: Qwen3 / Llama in ``flax.nnx``, with the layers stacked and scanned.

Every per-layer weight is stored once for all layers with a leading layer axis ``[L, ...]`` and the
forward runs ``lax.scan`` over it, so compile time does not grow with depth. Projection kernels are kept
as ``[in, out]`` (Hugging Face stores ``[out, in]``; ``weights.py`` transposes).

The arithmetic lives in small pure functions (``rms_norm``, ``apply_rope``, ``attention`` …); the
:class:`Decoder` module only owns the parameters and wires the functions together. LoRA adapters are a
separate pytree passed to the forward (see :class:`LoraInputs`), so the base weights can be frozen and
broadcast while adapters carry a leading candidate axis under ``vmap``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seal_jax.lm.config import ModelConfig

# Per-layer projection names (Hugging Face's), their input and output widths.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shape(config: ModelConfig, name: str) -> tuple[int, int]:
    """``(in, out)`` widths of the projection ``name`` (one of :data:`PROJECTIONS`)."""
    d, f = config.hidden_size, config.intermediate_size
    shapes = {
        "q_proj": (d, config.q_dim), "k_proj": (d, config.kv_dim), "v_proj": (d, config.kv_dim),
        "o_proj": (config.q_dim, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }
    if name not in shapes:
        raise KeyError(f"unknown projection {name!r}; projections: {list(PROJECTIONS)}")
    return shapes[name]


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of :class:`Decoder`, keyed by its dotted path (e.g. ``layers.q_proj``)."""
    L, d = config.num_layers, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embedding": (config.vocab_size, d)}
    for name in PROJECTIONS:
        shapes[f"layers.{name}"] = (L, *projection_shape(config, name))
    shapes["layers.input_norm"] = (L, d)
    shapes["layers.post_attention_norm"] = (L, d)
    if config.qk_norm:
        shapes["layers.q_norm"] = (L, config.head_dim)
        shapes["layers.k_norm"] = (L, config.head_dim)
    shapes["final_norm"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (d, config.vocab_size)
    return shapes


# ----------------------------------------------------------------------------------------------------
# Pure functions


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 and cast back (as Hugging Face does).

    x: ``[..., D]``; weight: ``[D]``. Returns ``[..., D]`` in ``x.dtype``.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Cosine and sine tables for rotary embeddings.

    positions: int ``[B, T]``. Returns ``(cos, sin)``, each ``[B, T, head_dim]`` in ``dtype`` (the
    half-width frequencies repeated twice, Hugging Face's non-interleaved layout).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[B, T, H, Dh]`` by the tables ``[B, T, Dh]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query scaled dot-product attention.

    q: ``[B, T, H, Dh]``; k, v: ``[B, S, KVH, Dh]`` with ``H % KVH == 0``; allowed: bool ``[B, T, S]``.
    Rows with no allowed key (left padding) get a uniform average instead of NaN. Returns
    ``[B, T, H, Dh]`` in ``q.dtype``; the softmax is computed in float32.
    """
    b, t, h, dh = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (dh ** -0.5)
    scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


@dataclasses.dataclass(frozen=True)
class LoraInputs:
    """LoRA adapters as the forward sees them (one adapter; ``vmap`` adds a candidate axis outside).

    Attributes:
      weights: ``{projection: {"a": [L, in, r], "b": [L, r, out]}}`` for the adapted projections.
      scale: scalar, ``alpha / rank``.
      dropout: scalar rate of dropout on the adapter's input (0 at inference).
      key: PRNG key for that dropout, or ``None`` (no dropout).
    """

    weights: dict[str, dict[str, jax.Array]]
    scale: jax.Array | float = 1.0
    dropout: jax.Array | float = 0.0
    key: jax.Array | None = None


def project(x: jax.Array, kernel: jax.Array, lora: dict[str, jax.Array] | None, scale: Any,
            dropout: Any, key: jax.Array | None) -> jax.Array:
    """``x @ kernel`` plus the LoRA term ``scale * dropout(x) @ a @ b`` when ``lora`` is given.

    x: ``[..., in]``; kernel: ``[in, out]``; lora: ``{"a": [in, r], "b": [r, out]}``. Returns ``[..., out]``.
    """
    y = x @ kernel
    if lora is None:
        return y
    xin = x
    if key is not None:
        keep = 1.0 - dropout
        mask = jax.random.bernoulli(key, keep, x.shape)
        xin = jnp.where(mask, x / jnp.maximum(keep, 1e-6), 0).astype(x.dtype)
    a, b = lora["a"].astype(x.dtype), lora["b"].astype(x.dtype)
    return y + (scale * ((xin @ a) @ b)).astype(y.dtype)


def decoder_layer(
    x: jax.Array,
    w: dict[str, jax.Array],
    lora: dict[str, dict[str, jax.Array]] | None,
    lora_scale: Any,
    lora_dropout: Any,
    lora_key: jax.Array | None,
    config: ModelConfig,
    cos: jax.Array,
    sin: jax.Array,
    keys_values: tuple[jax.Array, jax.Array] | None,
    allowed: jax.Array,
    write_kv: Any,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One pre-norm transformer block.

    x: ``[B, T, D]``; w: this layer's weights (no layer axis); lora: this layer's adapter slices or
    ``None``; cos/sin: ``[B, T, Dh]``; keys_values: this layer's cache ``([B, S, KVH, Dh], same)`` or
    ``None`` (keys are the T tokens themselves); allowed: bool ``[B, T, S]``; write_kv: cache slot of the
    first token. Returns the block output ``[B, T, D]`` and the layer's updated ``(k, v)`` cache (or the
    fresh keys/values when there is no cache).
    """
    b, t, _ = x.shape
    c = config
    keys = (None,) * len(PROJECTIONS) if lora_key is None else tuple(jax.random.split(lora_key, len(PROJECTIONS)))
    key_of = dict(zip(PROJECTIONS, keys, strict=True))

    def proj(name: str, inp: jax.Array) -> jax.Array:
        piece = None if lora is None else lora.get(name)
        return project(inp, w[name], piece, lora_scale, lora_dropout, key_of[name] if piece is not None else None)

    h = rms_norm(x, w["input_norm"], c.rms_norm_eps)
    q = proj("q_proj", h).reshape(b, t, c.num_heads, c.head_dim)
    k = proj("k_proj", h).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = proj("v_proj", h).reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
        q = rms_norm(q, w["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], c.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if keys_values is None:
        all_k, all_v = k, v
    else:
        cache_k, cache_v = keys_values
        all_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, write_kv, 0, 0))
        all_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, write_kv, 0, 0))
    attn = attention(q, all_k.astype(q.dtype), all_v.astype(q.dtype), allowed)
    x = x + proj("o_proj", attn.reshape(b, t, c.q_dim))
    h = rms_norm(x, w["post_attention_norm"], c.rms_norm_eps)
    gated = jax.nn.silu(proj("gate_proj", h)) * proj("up_proj", h)
    x = x + proj("down_proj", gated)
    return x, (all_k, all_v)


# ----------------------------------------------------------------------------------------------------
# The module


class LayerStack(nnx.Module):
    """All decoder layers' weights, stacked on a leading layer axis ``[L, ...]``."""

    def __init__(self, config: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        L = config.num_layers
        init = nnx.initializers.normal(0.02)
        for name in PROJECTIONS:
            setattr(self, name, nnx.Param(init(rngs.params(), (L, *projection_shape(config, name)), dtype)))
        self.input_norm = nnx.Param(jnp.ones((L, config.hidden_size), dtype))
        self.post_attention_norm = nnx.Param(jnp.ones((L, config.hidden_size), dtype))
        if config.qk_norm:
            self.q_norm = nnx.Param(jnp.ones((L, config.head_dim), dtype))
            self.k_norm = nnx.Param(jnp.ones((L, config.head_dim), dtype))

    def arrays(self) -> dict[str, jax.Array]:
        """The stacked weights as a plain dict of arrays ``{name: [L, ...]}``."""
        names = [*PROJECTIONS, "input_norm", "post_attention_norm", "q_norm", "k_norm"]
        return {n: getattr(self, n)[...] for n in names if hasattr(self, n)}


@dataclasses.dataclass
class KVCache:
    """A preallocated key/value cache for all layers.

    Attributes:
      k, v: ``[L, B, S, KVH, Dh]``.
      valid: bool ``[B, S]``, which slots hold a real (non-padding) token.
      positions: int ``[B]``, the rotary position the next token of each row takes.
      index: int scalar, the next slot to write (shared by all rows: batches are left-padded).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    positions: jax.Array
    index: jax.Array

    @staticmethod
    def create(config: ModelConfig, batch: int, length: int, dtype: Any) -> KVCache:
        """An empty cache for ``batch`` rows of at most ``length`` tokens."""
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        return KVCache(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, length), bool),
            positions=jnp.zeros((batch,), jnp.int32), index=jnp.zeros((), jnp.int32),
        )


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "valid", "positions", "index"], meta_fields=[])


class Decoder(nnx.Module):
    """A Qwen3 / Llama decoder-only language model.

    Args:
      config: the model's :class:`ModelConfig`.
      dtype: parameter and activation dtype (``jnp.float32`` on CPU, ``jnp.bfloat16`` on accelerators).
      rngs: randomness for the (random) initial weights; loading replaces them.
      remat: rematerialise each layer's activations in the backward pass (saves memory when training).
    """

    def __init__(self, config: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs, remat: bool = False):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (config.vocab_size, config.hidden_size), dtype))
        self.layers = LayerStack(config, dtype=dtype, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (config.hidden_size, config.vocab_size), dtype))

    def hidden_states(
        self,
        ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        lora: LoraInputs | None = None,
        cache: KVCache | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states ``[B, T, D]`` for token ids ``[B, T]``.

        Without a cache, ``attention_mask`` (``[B, T]``, 1 = real token, batches left-padded) sets both
        the keys that may be attended to and the rotary positions (``cumsum(mask) - 1``). With a cache,
        the T tokens are appended at ``cache.index`` and attend to every valid earlier slot; the updated
        cache is returned. ``positions`` (int ``[B, T]``, no cache only) overrides the rotary positions.
        """
        c = self.config
        b, t = ids.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            if positions is None:
                positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            key_valid = mask
            causal = jnp.tril(jnp.ones((t, t), bool))
            write_at = 0
        else:
            if positions is not None:
                raise ValueError("positions cannot be given together with a KV cache")
            positions = cache.positions[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            s = cache.k.shape[2]
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
            slots = jnp.arange(s)
            causal = slots[None, :] <= (cache.index + jnp.arange(t))[:, None]
            write_at = cache.index
        allowed = causal[None] & key_valid[:, None, :]
        x = self.embedding[...][ids]
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, self.dtype)
        weights = self.layers.arrays()
        layer_ids = jnp.arange(c.num_layers)
        lora_w = None if lora is None else lora.weights
        use_dropout = lora is not None and lora.key is not None

        def body(carry, xs):
            h, kv = carry
            w, lw, idx = xs
            lkey = jax.random.fold_in(lora.key, idx) if use_dropout else None
            layer_kv = None if kv is None else (kv[0][idx], kv[1][idx])
            h, (k_new, v_new) = decoder_layer(
                h, w, lw, None if lora is None else lora.scale, None if lora is None else lora.dropout,
                lkey, c, cos, sin, layer_kv, allowed, write_at)
            if kv is None:
                return (h, None), None
            kv = (jax.lax.dynamic_update_index_in_dim(kv[0], k_new, idx, 0),
                  jax.lax.dynamic_update_index_in_dim(kv[1], v_new, idx, 0))
            return (h, kv), None

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        kv0 = None if cache is None else (cache.k, cache.v)
        (x, kv), _ = jax.lax.scan(body, (x, kv0), (weights, lora_w, layer_ids))
        x = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        if cache is not None:
            last = positions[:, -1] + 1
            cache = KVCache(k=kv[0], v=kv[1], valid=key_valid, positions=last, index=cache.index + t)
        return x, cache

    def head(self, x: jax.Array) -> jax.Array:
        """Output logits ``[..., V]`` (float32) for hidden states ``[..., D]``."""
        kernel = self.embedding[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return (x @ kernel).astype(jnp.float32)

    def __call__(
        self,
        ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        lora: LoraInputs | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits float32 ``[B, T, V]`` for ids ``[B, T]`` (see :meth:`hidden_states`) and the cache."""
        x, cache = self.hidden_states(ids, attention_mask, lora=lora, cache=cache)
        return self.head(x), cache
