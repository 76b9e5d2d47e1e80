"""The decoder: Qwen3 / Llama in ``flax.nnx``, its layers stacked and scanned, or, on GPUs, split and unrolled.

Every per-layer weight is declared once for all layers with a leading layer axis ``[L, ...]``
(:mod:`seal_jax.lm.params`). On TPUs and CPUs the forward (:meth:`Decoder.hidden_states`, used for
training, logits and the prompt of a generation) runs ``lax.scan`` over the stacked arrays, each step
reading its layer's slice where it lies, so compile time does not grow with depth (a decode loop is another
matter, below). Projection kernels are kept as ``[in, out]`` (Hugging Face stores ``[out, in]``;
``weights.py`` transposes).

The CUDA compiler copies a slice of a stacked array before a matmul reads it: inside a loop on every step,
outside it once per call, but then a second copy of the weights lives for the call. On GPUs the weights are
therefore stored *split* (:class:`LayerStack`, :func:`layer_storage_for`; :class:`~seal_jax.LM` chooses by its
mesh's platform): each parameter a tuple of L per-layer arrays, and every program runs the layers as an
unrolled Python loop over them (compiles take longer).

Decoding is bound by memory bandwidth: a step reads every weight once for a handful of tokens, and how it
reads the layers depends on the platform (:mod:`seal_jax.lm.sampling` chooses by the mesh's). On a TPU
:meth:`Decoder.extend` scans the stacked weights over a stacked cache and libtpu reads each layer's slice
where it lies. On a GPU (split weights) and a CPU (per-layer copies kept between calls,
:mod:`seal_jax.lm.cpu_decode`) :meth:`Decoder.extend` runs the layers unrolled over per-layer arrays, and the
:class:`KVCache` holds one buffer per layer that each step updates in place.

The arithmetic lives in small pure functions (``rms_norm``, ``apply_rope``; attention in
:mod:`seal_jax.lm.attention`, its implementation an attribute of the model chosen from the platform); the
:class:`Decoder` module only owns the parameters and wires the functions together. LoRA adapters are a
separate pytree passed to the forward (see :class:`LoraInputs`), so the base weights can be frozen and
broadcast while adapters carry a leading candidate axis under ``vmap``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from seal_jax.lm import layouts
from seal_jax.lm.attention import IMPLEMENTATIONS, AttentionError, Placement, attention, cached_attention
from seal_jax.lm.config import ModelConfig
from seal_jax.lm.params import BY_PATH, PARAMS, ParamDecl, declared
from seal_jax.lm.sharding import layer_slice_sharding, spec_for
from seal_jax.lm.types import PROJECTIONS, remat_name

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


def embed_tokens(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` (int ``[...]``) of the embedding ``table`` ``[V, D]``: ``[..., D]``.

    One token (a batch of one row, decoding) is looked up as two: XLA rewrites a gather of one index as a
    dynamic slice, and a table split over the vocabulary (``tensor``; a tied one over ``fsdp`` × ``tensor``)
    must then be all-gathered whole on every step to take it (1.2 GB a step for Qwen3-8B on ``tensor=8``); a
    gather of several rows is split by the compiler as it should be, each device taking the rows it holds.
    """
    if ids.size == 1:
        flat = ids.reshape(1)
        return table[jnp.concatenate([flat, flat])][:1].reshape(*ids.shape, table.shape[-1])
    return table[ids]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[B, T, H, Dh]`` by the tables ``[B, T, Dh]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@dataclasses.dataclass(frozen=True)
class LoraInputs:
    """LoRA adapters as the forward sees them (one adapter; ``vmap`` adds a candidate axis outside).

    Attributes:
      weights: ``{projection: {"a": [L, in, r], "b": [L, r, out]}}`` for the adapted projections; readied
        for inference (:func:`group_adapters`), ``{"q_proj+v_proj": {"a": [L, in, r_q + r_v]}}`` and the like
        in place of the joined projections' own ``a``, and for layers stored split a list of L such dicts.
      scale: scalar, ``alpha / rank``.
      dropout: scalar rate of dropout on the adapter's input (0 at inference).
      key: PRNG key for that dropout, or ``None`` (no dropout).
    """

    weights: dict[str, dict[str, jax.Array]]
    scale: jax.Array | float = 1.0
    dropout: jax.Array | float = 0.0
    key: jax.Array | None = None


def project(x: jax.Array, kernel: Any, lora: dict[str, jax.Array] | None, scale: Any, dropout: Any,
            key: jax.Array | None) -> jax.Array:
    """``x @ kernel`` plus the LoRA term ``scale * dropout(x) @ a @ b`` when ``lora`` is given.

    x: ``[..., in]``; kernel: ``[in, out]`` (or anything that multiplies like it); lora:
    ``{"a": [in, r], "b": [r, out]}``. Returns ``[..., out]``.
    """
    y = x @ kernel
    if lora is None:
        return y
    xin = x
    if key is not None:
        keep = 1.0 - dropout
        mask = jax.random.bernoulli(key, keep, x.shape)
        xin = jnp.where(mask, x / jnp.maximum(keep, 1e-6), 0).astype(x.dtype)
    return lora_up(y, xin @ lora["a"].astype(x.dtype), lora["b"], scale)


def lora_up(y: jax.Array, down: jax.Array, b: jax.Array, scale: Any) -> jax.Array:
    """``y`` plus the LoRA term ``scale * down @ b``, where ``down`` ``[..., r]`` is the input already
    projected by the adapter's ``a``."""
    return y + (scale * (down @ b.astype(down.dtype))).astype(y.dtype)


# projections that read the same input: a decode step takes their adapters' ``a`` in one matmul
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group_adapters(weights: dict[str, Any], dtype: Any = None) -> dict[str, Any]:
    """``weights`` (one layer's adapters or stacked ones, any leading axes) as inference reads them: cast to
    ``dtype`` (when given) and, for each input that two or more adapted projections read, their ``a``
    matrices concatenated under ``"q_proj+v_proj"`` (say) in place of their own: what :func:`project_group`
    reads. A decode makes it once per call, outside its loop over steps, unless the adapters come readied
    (``LM.ready_adapters``). Idempotent."""
    if dtype is not None:
        weights = jax.tree.map(lambda x: x.astype(dtype), weights)
    out = {n: dict(p) for n, p in weights.items()}
    for names in INPUT_GROUPS:
        have = [n for n in names if n in weights and "a" in weights[n]]
        if len(have) > 1:
            out["+".join(have)] = {"a": jnp.concatenate([weights[n]["a"] for n in have], axis=-1)}
            for n in have:
                del out[n]["a"]
    return out


def is_grouped(weights: Any) -> bool:
    """Whether adapter ``weights`` (one layer's, stacked, or a list of per-layer ones) hold joined ``a``
    matrices (:func:`group_adapters`)."""
    first = weights[0] if isinstance(weights, list | tuple) else weights
    return any("+" in name for name in first)


def _rank(piece: dict[str, Any]) -> int:
    """An adapter's rank, from its ``b`` (its ``a`` may be joined with others: :func:`group_adapters`)."""
    return piece["b"].shape[-2]


def project_group(x: jax.Array, w: dict[str, Any], names: Sequence[str], lora: dict[str, Any],
                  scale: Any) -> list[jax.Array]:
    """The projections ``names`` of one input ``x`` with their adapters (no dropout), the adapters' ``a``
    applied in one matmul over their concatenation (from :func:`group_adapters`, or made here). Equal to
    :func:`project` per name.

    Decode uses it, with the concatenation made before its loop (written apart, XLA's GPU compiler merges
    the ``x @ a`` products itself and concatenates the ``a`` matrices inside the loop, on every step), and
    every inference over readied adapters (``LM.ready_adapters``), whose joined ``a`` replace their own."""
    pieces = [lora.get(n) for n in names]
    have = [n for n, p in zip(names, pieces, strict=True) if p is not None]
    if len(have) < 2:
        return [project(x, w[n], p, scale, 0.0, None) for n, p in zip(names, pieces, strict=True)]
    joined = lora.get("+".join(have))
    a = joined["a"] if joined is not None else jnp.concatenate([lora[n]["a"] for n in have], axis=-1)
    if a.shape[-1] != sum(_rank(lora[n]) for n in have):
        raise ValueError(f"the joined adapter {'+'.join(have)} has {a.shape[-1]} columns, not the sum of its "
                         "ranks: join the adapters again (group_adapters) after changing them")
    down = x @ a.astype(x.dtype)
    out, start = [], 0
    for n, p in zip(names, pieces, strict=True):
        y = x @ w[n]
        if p is not None:
            r = _rank(p)
            y = lora_up(y, down[..., start:start + r], p["b"], scale)
            start += r
        out.append(y)
    return out


@dataclasses.dataclass(frozen=True)
class CacheWrite:
    """How one layer of a decode step reaches its KV cache: ``store`` puts the T new tokens' keys and values
    (both ``[B, KVH, T, Dh]``) in the cache and returns the layer's whole keys and values to attend over
    (values ``[B, KVH, S, Dh]``; keys the same, or ``[B, KVH, Dh, S]`` when ``keys_transposed``)."""

    store: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    keys_transposed: bool = False


def decoder_layer(
    x: jax.Array,
    w: dict[str, Any],
    lora: dict[str, dict[str, jax.Array]] | None,
    lora_scale: Any,
    lora_dropout: Any,
    lora_key: jax.Array | None,
    config: ModelConfig,
    cos: jax.Array,
    sin: jax.Array,
    allowed: jax.Array,
    cache: CacheWrite | None = None,
    attend: Callable[..., jax.Array] = attention,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One pre-norm transformer block.

    x: ``[B, T, D]``; w: this layer's weights (no layer axis); lora: this layer's adapter slices or ``None``;
    cos/sin: ``[B, T, Dh]``; allowed: bool ``[B, T, S]``; cache: where the layer's keys and values go in a
    decode (:class:`CacheWrite`), or ``None`` (the keys are the T tokens themselves); attend: how the T
    tokens attend to their own keys without a cache, ``attend(q, k, v, allowed)`` (by default the einsum of
    :func:`seal_jax.lm.attention.attention`). Returns the block output
    ``[B, T, D]`` and, with a cache, what its ``store`` returned, or without one the T tokens' own keys and
    values ``[B, T, KVH, Dh]``.
    """
    b, t, _ = x.shape
    c = config
    keys = (None,) * len(PROJECTIONS) if lora_key is None else tuple(jax.random.split(lora_key, len(PROJECTIONS)))
    key_of = dict(zip(PROJECTIONS, keys, strict=True))

    def proj(name: str, inp: jax.Array) -> jax.Array:
        piece = None if lora is None else lora.get(name)
        return project(inp, w[name], piece, lora_scale, lora_dropout, key_of[name] if piece is not None else None)

    # a decode step (a cache, no dropout) and readied adapters take each input's adapters in one matmul
    # (see project_group)
    grouped = lora is not None and lora_key is None and (cache is not None or is_grouped(lora))

    def projs(names: tuple[str, ...], inp: jax.Array) -> list[jax.Array]:
        if grouped:
            return project_group(inp, w, names, lora, lora_scale)
        return [proj(n, inp) for n in names]

    h = rms_norm(x, w["input_norm"], c.rms_norm_eps)
    q, k, v = projs(INPUT_GROUPS[0], h)
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
        q = rms_norm(q, w["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], c.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
        all_k, all_v = k, v
        attn = attend(q, k, v, allowed)
    else:
        all_k, all_v = cache.store(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        attn = cached_attention(q, all_k.astype(q.dtype), all_v.astype(q.dtype), allowed, cache.keys_transposed)
    x = x + proj("o_proj", attn.reshape(b, t, c.q_dim))
    h = rms_norm(x, w["post_attention_norm"], c.rms_norm_eps)
    gate, up = projs(INPUT_GROUPS[1], h)
    gated = jax.nn.silu(gate) * up
    x = x + proj("down_proj", gated)
    return x, (all_k, all_v)


# ----------------------------------------------------------------------------------------------------
# The module


def new_param(decl: ParamDecl, config: ModelConfig, dtype: Any, rngs: nnx.Rngs) -> nnx.Param:
    """A freshly initialised parameter as its row of :data:`~seal_jax.lm.params.PARAMS` says."""
    shape = decl.shape(config)
    if decl.init == "ones":
        return nnx.Param(jnp.ones(shape, dtype))
    return nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape, dtype))


LAYER_PARAMS = tuple(d.path.removeprefix("layers.") for d in PARAMS if d.per_layer)


def gather_layer(w: dict[str, jax.Array], mesh: Mesh) -> dict[str, jax.Array]:
    """One layer's weights ``{name: array}`` (no layer axis) constrained to their sharding on ``mesh`` by
    :data:`~seal_jax.lm.sharding.RULES`: under FSDP (split over ``data`` along the width) an all-gather of
    that split only; a split over ``tensor`` stays."""
    return {n: jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, spec_for(mesh, BY_PATH[f"layers.{n}"].axes[1:], x.shape))) for n, x in w.items()}


# how the per-layer weights are stored (see LayerStack)
LAYER_STORAGE = ("stacked", "split")


def layer_storage_for(platform: str) -> str:
    """How the per-layer weights are stored on ``platform`` (``"cpu"``, ``"tpu"``, ``"gpu"``): ``"split"``
    on GPUs, ``"stacked"`` elsewhere (see :class:`LayerStack`)."""
    return "split" if platform == "gpu" else "stacked"


def split_leaf(x: Any) -> tuple[Any, ...]:
    """A stacked ``[L, ...]`` array (or ``jax.ShapeDtypeStruct``) as L per-layer ones, each on the stacked
    one's devices with its split dimensions split alike (the layer axis is never split)."""
    one = layer_slice_sharding(getattr(x, "sharding", None))
    n = x.shape[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        return tuple(jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=one) for _ in range(n))
    return _splitter(n, one)(x)


@functools.lru_cache(maxsize=64)
def _splitter(n: int, sharding: NamedSharding | None) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """The jitted program that splits a stacked array into its ``n`` layers (one per count and sharding, so
    loading and merging reuse it)."""
    return jax.jit(lambda a: tuple(a[i] for i in range(n)), out_shardings=None if sharding is None else (sharding,) * n)


def stack_leaf(xs: Sequence[Any]) -> Any:
    """The inverse of :func:`split_leaf`: L per-layer arrays (or shapes) as one ``[L, ...]`` (a copy)."""
    if isinstance(xs[0], jax.ShapeDtypeStruct):
        sharding = xs[0].sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *tuple(sharding.spec)))
        return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype, sharding=sharding)
    return jnp.stack(xs)


class LayerStack(nnx.Module):
    """All decoder layers' weights, in one of two storages (:data:`LAYER_STORAGE`).

    ``"stacked"`` (as built): each parameter one array with a leading layer axis ``[L, ...]``, which a
    ``lax.scan`` reads a layer's slice of in place (TPUs; CPUs). ``"split"`` (:meth:`store_split`, chosen
    for GPUs): each parameter a tuple of L per-layer arrays. The CUDA compiler copies a slice of a stacked
    array before a matmul reads it, so stacked weights on a GPU cost a copy of every layer per step (scanned)
    or of all layers per call (sliced once, held for the call: a second copy of the weights in memory);
    per-layer arrays are read where they lie, by layers run unrolled.
    """

    def __init__(self, config: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        for decl in declared(config):
            if decl.per_layer:
                setattr(self, decl.path.removeprefix("layers."), new_param(decl, config, dtype, rngs))

    def _params(self) -> dict[str, nnx.Param]:
        return {n: getattr(self, n) for n in LAYER_PARAMS if hasattr(self, n)}

    @property
    def split(self) -> bool:
        """Whether the weights are stored split (per-layer arrays), see :meth:`store_split`."""
        return any(isinstance(p.get_value(), tuple) for p in self._params().values())

    def store_split(self) -> None:
        """Store every weight as its L per-layer arrays instead of one stacked array (in place; each stacked
        array is released once split, so the peak is one parameter's worth above the weights)."""
        for p in self._params().values():
            if not isinstance(p.get_value(), tuple):
                p.set_value(split_leaf(p.get_value()))

    def arrays(self) -> dict[str, jax.Array]:
        """The weights as ``{name: [L, ...]}`` (split ones stacked: a copy)."""
        return {n: stack_leaf(v) if isinstance(v, tuple) else v
                for n, v in ((n, p.get_value()) for n, p in self._params().items())}

    def per_layer(self) -> list[dict[str, jax.Array]]:
        """The weights as L per-layer dicts ``{name: array}`` (stacked ones sliced: copies)."""
        values = {n: p.get_value() for n, p in self._params().items()}
        layers = len(next(iter(values.values())))  # a tuple's length or a stacked array's first dimension
        return [{k: v[i] for k, v in values.items()} for i in range(layers)]


# how LoRA training runs the layers (see Decoder's train_layers)
TRAIN_LAYERS = ("scan", "unrolled")


def train_layers_for(platform: str) -> str:
    """How training runs the layers on ``platform`` (``"cpu"``, ``"tpu"``, ``"gpu"``): unrolled over
    per-layer weights on GPUs, scanned elsewhere (see :class:`Decoder`)."""
    return "unrolled" if platform == "gpu" else "scan"


def unstack_layers(tree: Any, num_layers: int) -> list[Any]:
    """The ``num_layers`` per-layer pieces of a pytree whose leaves are stacked ``[L, ...]`` (copies), or
    ``tree`` itself when it is already a list of them (adapters readied for split layers)."""
    if isinstance(tree, list | tuple):
        if len(tree) != num_layers:
            raise ValueError(f"{len(tree)} per-layer pieces for a model of {num_layers} layers")
        return list(tree)
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(num_layers)]


@dataclasses.dataclass
class KVCache:
    """A preallocated key/value cache, written in place by each decode step.

    Two forms: one buffer per layer (a tuple of L arrays; the unrolled decode of CPUs and GPUs) or one
    *stacked* buffer with a leading layer axis (the decode that scans the layers, see :meth:`Decoder.extend`).

    Attributes:
      k: keys: a tuple of L arrays ``[B, KVH, S, Dh]`` (``[B, KVH, Dh, S]`` when ``keys_transposed``, the
        faster form on XLA:CPU, see :mod:`seal_jax.lm.cpu_decode`), or one ``[L, B, KVH, S, Dh]``.
      v: values: a tuple of L arrays ``[B, KVH, S, Dh]``, or one ``[L, B, KVH, S, Dh]``.
      valid: bool ``[B, S]``, which slots hold a real (non-padding) token.
      positions: int ``[B]``, the rotary position the next token of each row takes.
      index: int scalar, the next slot to write (shared by all rows: batches are left-padded).
      keys_transposed: static; whether per-layer keys are stored transposed (never for a stacked cache).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    positions: jax.Array
    index: jax.Array
    keys_transposed: bool = False

    @property
    def stacked(self) -> bool:
        """Whether the layers' buffers are stacked into one array (the scanned decode's form)."""
        return not isinstance(self.k, tuple)

    @staticmethod
    def create(config: ModelConfig, batch: int, length: int, dtype: Any, keys_transposed: bool = False) -> KVCache:
        """An empty per-layer cache for ``batch`` rows of at most ``length`` tokens."""
        v_shape = (batch, config.num_kv_heads, length, config.head_dim)
        k_shape = (batch, config.num_kv_heads, config.head_dim, length) if keys_transposed else v_shape
        layers = range(config.num_layers)
        return KVCache(
            k=tuple(jnp.zeros(k_shape, dtype) for _ in layers), v=tuple(jnp.zeros(v_shape, dtype) for _ in layers),
            valid=jnp.zeros((batch, length), bool),
            positions=jnp.zeros((batch,), jnp.int32), index=jnp.zeros((), jnp.int32), keys_transposed=keys_transposed,
        )

    @staticmethod
    def from_prompt(keys: jax.Array, values: jax.Array, attention_mask: jax.Array, length: int,
                    stacked: bool = False, keys_transposed: bool = False) -> KVCache:
        """A cache of ``length`` slots holding a prompt's keys and values in its first T slots.

        keys, values: ``[L, B, T, KVH, Dh]`` (from :meth:`Decoder.hidden_states` with ``return_kv``);
        attention_mask: ``[B, T]``, 1 on real tokens (left-padded rows); stacked: one ``[L, ...]`` buffer
        each for keys and values instead of L buffers; keys_transposed: per-layer keys stored
        ``[B, KVH, Dh, S]``.
        """
        n_layers, b, t, kvh, dh = keys.shape
        if length < t:
            raise ValueError(f"a cache of {length} slots cannot hold a prompt of {t} tokens")
        if stacked and keys_transposed:
            raise ValueError("a stacked cache keeps its keys laid out as the values (keys_transposed=False)")

        def layer_k(x: jax.Array) -> jax.Array:
            if not keys_transposed:
                return layer_v(x)
            return jnp.zeros((b, kvh, dh, length), x.dtype).at[..., :t].set(x.transpose(0, 2, 3, 1))

        def layer_v(x: jax.Array) -> jax.Array:
            return jnp.zeros((b, kvh, length, dh), x.dtype).at[:, :, :t].set(x.transpose(0, 2, 1, 3))

        mask = attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)[:, -1] + 1
        if stacked:
            k: Any = jnp.zeros((n_layers, b, kvh, length, dh), keys.dtype).at[:, :, :, :t].set(
                keys.transpose(0, 1, 3, 2, 4))
            v: Any = jnp.zeros((n_layers, b, kvh, length, dh), values.dtype).at[:, :, :, :t].set(
                values.transpose(0, 1, 3, 2, 4))
        else:
            k = tuple(layer_k(keys[i]) for i in range(n_layers))
            v = tuple(layer_v(values[i]) for i in range(n_layers))
        return KVCache(
            k=k, v=v,
            valid=jnp.zeros((b, length), bool).at[:, :t].set(mask), positions=positions.astype(jnp.int32),
            index=jnp.asarray(t, jnp.int32), keys_transposed=keys_transposed,
        )

    def layer_writes(self) -> list[CacheWrite]:
        """Per layer, a :class:`CacheWrite` that writes T new tokens at :attr:`index` into that layer's
        buffers (per-layer form only) and returns the updated buffers."""
        def one(k_buf: jax.Array, v_buf: jax.Array) -> CacheWrite:
            def store(k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
                if self.keys_transposed:
                    k = jax.lax.dynamic_update_slice(k_buf, k_new.transpose(0, 1, 3, 2).astype(k_buf.dtype),
                                                     (0, 0, 0, self.index))
                else:
                    k = jax.lax.dynamic_update_slice(k_buf, k_new.astype(k_buf.dtype), (0, 0, self.index, 0))
                return k, jax.lax.dynamic_update_slice(v_buf, v_new.astype(v_buf.dtype), (0, 0, self.index, 0))

            return CacheWrite(store, self.keys_transposed)

        return [one(k, v) for k, v in zip(self.k, self.v, strict=True)]


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "valid", "positions", "index"],
                                 meta_fields=["keys_transposed"])


class Decoder(nnx.Module):
    """A Qwen3 / Llama decoder-only language model.

    Args:
      config: the model's :class:`ModelConfig`.
      dtype: parameter and activation dtype (``jnp.float32`` on CPU, ``jnp.bfloat16`` on accelerators).
      rngs: randomness for the (random) initial weights; loading replaces them.
      remat: what training keeps of each layer for the backward pass, one of :data:`REMAT_POLICIES`
        ("none", "minimal": the projections' outputs, the rest recomputed; "full": the layer input only);
        a bool means "full" / "none".
      attention_impl: how T tokens attend to their own keys (:data:`seal_jax.lm.attention.IMPLEMENTATIONS`),
        or None (the default): :class:`~seal_jax.LM` then chooses by its mesh's platform
        (``attention.implementation_for``), and the module alone uses ``"einsum"``.
      train_layers: how LoRA training runs the layers, one of :data:`TRAIN_LAYERS`, or None (the default):
        :class:`~seal_jax.LM` then chooses by its mesh's platform (:func:`train_layers_for`), and the module
        alone scans. ``"scan"``: one compiled layer over the stacked weights, each step reading its layer's
        slice where it lies (TPUs, CPUs). ``"unrolled"``: the layers are unrolled over per-layer arrays
        (GPUs): the weights themselves where stored split (:class:`LayerStack`), otherwise copies that each
        training call makes first and keeps for the call. Split weights always run unrolled.

    ``attention_placement`` (an :class:`~seal_jax.lm.attention.Placement`, set by :class:`~seal_jax.LM` from
    its mesh) is where a kernel that runs in a ``shard_map`` (``"splash"``, ``"triton"``) runs.
    ``layer_gather`` (set by :class:`~seal_jax.LM` for training with ``train_weights="fsdp"``): the mesh on
    which :meth:`hidden_states` gathers each layer's weights to their usual sharding (:func:`gather_layer`)
    before the layer runs, or None (the weights are used where they lie).
    """

    def __init__(self, config: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs, remat: str | bool = "minimal",
                 attention_impl: str | None = None, train_layers: str | None = None):
        if attention_impl is not None and attention_impl not in IMPLEMENTATIONS:
            raise AttentionError(f"unknown attention implementation {attention_impl!r}; choose one of {IMPLEMENTATIONS}")
        if train_layers is not None and train_layers not in TRAIN_LAYERS:
            raise ValueError(f"unknown train_layers {train_layers!r}; choose one of {TRAIN_LAYERS}")
        self.train_layers = train_layers
        self.config = config
        self.dtype = dtype
        self.remat = remat_name(remat)
        self.attention_impl = attention_impl
        self.attention_placement = Placement()
        self.layer_gather: Mesh | None = None
        self.embedding = new_param(BY_PATH["embedding"], config, dtype, rngs)
        self.layers = LayerStack(config, dtype=dtype, rngs=rngs)
        for decl in declared(config):
            if not decl.per_layer and decl.path != "embedding":
                setattr(self, decl.path, new_param(decl, config, dtype, rngs))

    def lay_out(self, platform: str, device_kind: str = "") -> None:
        """Give each weight the memory layout it has on ``platform``'s chips of ``device_kind``
        (:func:`layouts.weight_layout`: a TPU's for some, the default elsewhere), in place, one at a time."""
        params = {f"layers.{n}": p for n, p in self.layers._params().items()}
        params.update({d.path: getattr(self, d.path) for d in declared(self.config) if not d.per_layer})

        def laid_out(path: str, x: Any) -> Any:
            sharding = getattr(x, "sharding", None)
            shape = x.shape if sharding is None else sharding.shard_shape(x.shape)  # (one device's)
            return layouts.place(x, layouts.weight_layout(platform, path, shape, x.dtype.itemsize, device_kind))

        for path, p in params.items():
            value = p.get_value()
            p.set_value(tuple(laid_out(path, x) for x in value) if isinstance(value, tuple) else laid_out(path, value))

    def hidden_states(
        self,
        ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        lora: LoraInputs | None = None,
        positions: jax.Array | None = None,
        return_kv: bool = False,
        layers: Sequence[dict[str, jax.Array]] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Final-norm hidden states ``[B, T, D]`` for token ids ``[B, T]`` (a scan over the stacked layers, or a
        loop over per-layer ``layers``).

        ``layers``: the base weights as per-layer arrays (:meth:`unstacked_layers`); the layers then run as
        an unrolled loop over them, each under the same remat policy and with the same dropout keys as the
        scan (see :attr:`train_layers`). Weights stored split (:class:`LayerStack`) always run so.

        ``attention_mask`` (``[B, T]``, 1 = real token, batches left-padded) sets both the keys that may be
        attended to and the rotary positions (``cumsum(mask) - 1``); ``positions`` (int ``[B, T]``)
        overrides the latter. With ``return_kv`` the second result is every layer's keys and values of the
        T tokens, ``([L, B, T, KVH, Dh], same)`` (see :meth:`KVCache.from_prompt`); otherwise ``None``.
        """
        c = self.config
        b, t = ids.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
        allowed = causal[None] & mask[:, None, :]
        x = embed_tokens(self.embedding[...], ids)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, self.dtype)
        use_dropout = lora is not None and lora.key is not None
        attend = functools.partial(attention, impl=self.attention_impl or "einsum", segments=mask,
                                   placement=self.attention_placement)

        def body(h, xs):
            w, lw, idx = xs
            if self.layer_gather is not None:  # FSDP: the layer's weights gathered where it runs (again under remat)
                w = gather_layer(w, self.layer_gather)
            lkey = jax.random.fold_in(lora.key, idx) if use_dropout else None
            h, kv = decoder_layer(
                h, w, lw, None if lora is None else lora.scale, None if lora is None else lora.dropout,
                lkey, c, cos, sin, allowed, attend=attend)
            return h, (kv if return_kv else None)

        if layers is None and self.layers.split:  # split weights run unrolled (a scan would stack them: a copy)
            layers = self.layers.per_layer()
        if self.remat != "none":
            policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "minimal" else None
            # prevent_cse may be off safely only under a scan. Unrolled (GPU training), "full" needs it, or XLA
            # merges the recomputation with the forward pass and keeps what remat means to drop (more memory
            # than "minimal"); "minimal" does without: the 8B SEAL training at 2,048 tokens peaks at 67.9 GB
            # without it and 76.6 GB with it (h100-8, data=8, two passages)
            # (FSDP needs it too: without it the backward pass reuses the forward's gathered weights, all of
            # them kept alive, instead of gathering each layer's again)
            cse = layers is not None and (self.remat == "full" or self.layer_gather is not None)
            body = jax.checkpoint(body, prevent_cse=cse, policy=policy)
        if layers is not None:
            adapters = [None] * c.num_layers if lora is None else unstack_layers(lora.weights, c.num_layers)
            kvs = []
            for i, (w, lw) in enumerate(zip(layers, adapters, strict=True)):
                x, layer_kv = body(x, (w, lw, jnp.asarray(i)))
                kvs.append(layer_kv)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs) if return_kv else None
        else:
            xs = (self.layers.arrays(), None if lora is None else lora.weights, jnp.arange(c.num_layers))
            x, kv = jax.lax.scan(body, x, xs)
        return rms_norm(x, self.final_norm[...], c.rms_norm_eps), kv

    def unstacked_layers(self) -> list[dict[str, jax.Array]]:
        """The base weights as L per-layer dicts (the form :meth:`hidden_states` takes as ``layers``): the
        arrays themselves when stored split, copies of stacked ones' slices otherwise."""
        return self.layers.per_layer()

    def layer_params(self, lora: LoraInputs | None = None) -> list[tuple[dict[str, Any], Any]]:
        """Per layer, ``(weights, adapter slices or None)`` without the layer axis, for :meth:`extend`.

        Slicing stacked weights copies them: inside a jitted decode loop, take the per-layer weights once
        before the loop (the sampler does; on a CPU it keeps copies between calls, and on a GPU the weights are
        stored split, see :class:`LayerStack`).
        """
        n = self.config.num_layers
        adapters = [None] * n if lora is None else unstack_layers(lora.weights, n)
        return list(zip(self.unstacked_layers(), adapters, strict=True))

    def extend(
        self,
        ids: jax.Array,
        attention_mask: jax.Array | None,
        cache: KVCache,
        *,
        lora: LoraInputs | None = None,
        layers: list[tuple[dict[str, Any], Any]] | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Append T tokens ``[B, T]`` to ``cache``: final-norm hidden states ``[B, T, D]`` and the new cache.

        The tokens go in at ``cache.index`` and attend to every valid earlier slot; ``attention_mask``
        (``[B, T]``, default all ones) marks padding. With per-layer cache buffers the layers run unrolled
        over per-layer arrays: ``layers`` is :meth:`layer_params` (``lora``'s slices included), computed here
        when not given. With a stacked cache (:attr:`KVCache.stacked`) a ``lax.scan`` runs the layers over
        the stacked weights, each reading its cache slice and writing it back in place, and ``layers`` must
        be ``None``. ``lora`` supplies the adapter scale; dropout is not supported.
        """
        c = self.config
        b, t = ids.shape
        if lora is not None and lora.key is not None:
            raise ValueError("Decoder.extend runs inference only: LoRA dropout (lora.key) is not supported")
        if cache.stacked and layers is not None:
            raise ValueError("Decoder.extend with a stacked cache scans the stacked weights; pass layers=None")
        if layers is None and not cache.stacked:
            layers = self.layer_params(lora)
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        positions = cache.positions[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
        causal = jnp.arange(cache.valid.shape[1])[None, :] <= (cache.index + jnp.arange(t))[:, None]
        allowed = causal[None] & key_valid[:, None, :]
        x = embed_tokens(self.embedding[...], ids)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, self.dtype)
        scale = None if lora is None else lora.scale
        if cache.stacked:
            def body(carry: Any, xs: Any) -> tuple[Any, None]:
                x, ck, cv = carry
                w, i = xs
                # the layer's adapters indexed here, not scanned over: under vmap over K candidates, scanned
                # adapters [K, L, ...] are first transposed to [L, K, ...], a copy of them all on every call
                lw = None if lora is None else jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                                                            lora.weights)
                stacks = {}

                def write(k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
                    # the new slots go into the stacked buffers in place; the layer's slice is then only read
                    stacks["k"] = jax.lax.dynamic_update_slice(ck, k_new[None].astype(ck.dtype), (i, 0, 0, cache.index, 0))
                    stacks["v"] = jax.lax.dynamic_update_slice(cv, v_new[None].astype(cv.dtype), (i, 0, 0, cache.index, 0))
                    return (jax.lax.dynamic_index_in_dim(stacks["k"], i, keepdims=False),
                            jax.lax.dynamic_index_in_dim(stacks["v"], i, keepdims=False))

                x, _ = decoder_layer(x, w, lw, scale, None, None, c, cos, sin, allowed, CacheWrite(write))
                return (x, stacks["k"], stacks["v"]), None

            xs = (self.layers.arrays(), jnp.arange(c.num_layers))
            (x, new_k, new_v), _ = jax.lax.scan(body, (x, cache.k, cache.v), xs)
        else:
            ks, vs = [], []
            for (w, lw), write in zip(layers, cache.layer_writes(), strict=True):
                x, (k, v) = decoder_layer(x, w, lw, scale, None, None, c, cos, sin, allowed, write)
                ks.append(k)
                vs.append(v)
            new_k, new_v = tuple(ks), tuple(vs)
        x = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        cache = KVCache(k=new_k, v=new_v, valid=key_valid, positions=positions[:, -1] + 1, index=cache.index + t,
                        keys_transposed=cache.keys_transposed)
        return x, cache

    def prefill(self, ids: jax.Array, attention_mask: jax.Array | None, length: int, *,
                lora: LoraInputs | None = None, stacked: bool = False,
                keys_transposed: bool = False) -> tuple[jax.Array, KVCache]:
        """Run a left-padded prompt ``[B, T]`` through the scanned layers into a fresh cache of ``length``
        slots (``stacked``: in the stacked form; ``keys_transposed``: per-layer keys ``[B, KVH, Dh, S]``; see
        :class:`KVCache`). Returns the final-norm hidden states ``[B, T, D]`` and the cache."""
        b, t = ids.shape
        mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
        x, (keys, values) = self.hidden_states(ids, mask, lora=lora, return_kv=True)
        return x, KVCache.from_prompt(keys.astype(self.dtype), values.astype(self.dtype), mask, length,
                                      stacked=stacked, keys_transposed=keys_transposed)

    def head_kernel(self) -> jax.Array:
        """The output projection ``[D, V]`` (the embedding transposed when the two are tied)."""
        return self.embedding[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def head_as_stored(self) -> tuple[jax.Array, bool]:
        """The output projection as stored, and whether it is vocabulary-major: ``([V, D] embedding, True)``
        when the two are tied, else ``([D, V] head, False)``. What ``cross_entropy.token_nll`` takes as
        ``kernel`` and ``vocab_major``: a loss's chunks then read a tied table where it lies; its transpose,
        taken before their loop, was a copy of the table for each call (GPU compile of Qwen3-0.6B on
        ``fsdp=2``: 155 MB of 448 MB of training temporaries)."""
        if self.config.tie_word_embeddings:
            return self.embedding[...], True
        return self.lm_head[...], False

    def head(self, x: jax.Array, kernel: Any = None) -> jax.Array:
        """Output logits ``[..., V]`` (float32) for hidden states ``[..., D]``; ``kernel`` overrides
        :meth:`head_kernel` (a decode passes the one it laid out once per call)."""
        kernel = self.head_kernel() if kernel is None else kernel
        return (x @ kernel).astype(jnp.float32)

    def __call__(
        self,
        ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        lora: LoraInputs | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits float32 ``[B, T, V]`` for ids ``[B, T]`` and the cache: without a cache
        :meth:`hidden_states` (and ``None``), with one :meth:`extend` (and the updated cache)."""
        if cache is None:
            return self.head(self.hidden_states(ids, attention_mask, lora=lora)[0]), None
        x, cache = self.extend(ids, attention_mask, cache, lora=lora)
        return self.head(x), cache
