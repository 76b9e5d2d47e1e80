"""Attention: every implementation behind one function, and one dispatch point chosen from the platform.

:func:`attention` is what the decoder layer calls for T tokens attending to their own keys (training,
logits, the prompt of a generation). The implementation comes from :func:`implementation_for`, decided
once per model from the platform of its mesh's devices (``sharding.platform``; for a TPU or GPU topology
compiled on a CPU host it is the target's platform, never the host's), and stored on the ``Decoder``:

- ``"einsum"``: one grouped-query einsum with a float32 ``[B, KVH, G, T, S]`` score matrix: the reference,
  and what ``"chunked"`` and the kernels run below their lengths.
- ``"causal_blocks"`` (CPU): the causal square cut into :data:`CAUSAL_BLOCKS` blocks of queries, each
  attending to the keys up to its own end only, so the blocks above the diagonal are never computed, each
  block's scores and output two batched matmuls with their batch axes leading (:func:`cached_attention`'s
  form, which XLA:CPU runs faster than the einsum's). SEAL's scores are small on a CPU and stay whole per
  block; LoRA training of the bundled model at 4 x 256 tokens runs faster than with the einsum (BENCHMARKS.md,
  "Causal blocks for CPU attention"). From :data:`BLOCKS_FROM` tokens on; shorter sequences are one block.
- ``"chunked"`` (where neither kernel applies: see their limits below): the same arithmetic over
  blocks of :data:`QUERY_CHUNK` queries (a ``lax.map``), each block's scores recomputed in the backward
  pass (``jax.checkpoint``). So no ``[T, S]`` float32 matrix exists, neither in the forward nor in the
  saved residuals, and training's temporaries grow linearly with T. A row's softmax sees exactly the same
  numbers as in ``"einsum"``, so the results agree to float rounding. Sequences shorter than
  :data:`CHUNKED_FROM` use ``"einsum"`` (below that length the blocks cost more time than their memory is
  worth); a length the block does not divide is padded to whole blocks.
- ``"splash"`` (TPU): JAX's Pallas splash-attention kernel (a fused flash attention: the scores live in
  VMEM one block at a time, never in HBM), causal, the padding given as segment ids
  (:func:`splash_attention`). GSPMD cannot split a Mosaic call, so the kernel runs inside a ``shard_map``
  over the model's mesh (:class:`Placement`): rows over ``data``, key/value heads over ``tensor`` (or,
  without one, over ``fsdp``: :func:`head_axes`). Its padded query rows attend to padding instead of
  averaging the values (nothing reads them). On a CPU it runs in Pallas' interpret mode: the tests hold it against the
  einsum that way. Where Mosaic cannot compile it (:func:`splash_attention_applies`) it runs ``"chunked"``.
- ``"triton"`` (GPU): JAX's Pallas flash-attention kernel for GPUs, which XLA compiles with Triton
  (:func:`triton_attention`), with the same mask, padding and placement as ``"splash"``; head sizes above
  :data:`TRITON_MAX_HEAD_DIM` use ``"chunked"``.

Both kernels run from :data:`KERNEL_BLOCK` tokens on; a shorter sequence uses the einsum (the kernel would
pad it to a whole tile, and its float32 scores are small).

Why Triton and not cuDNN on GPU: cuDNN's flash attention (``jax.nn.dot_product_attention``) cannot be
reached by a deviceless GPU compile ("cuDNN not found"), so neither ``seal-jax compile`` nor the tests
could see it; the Triton kernel compiles for an H100 on this host, where ``seal-jax compile`` measures it
(BENCHMARKS.md, "Fused attention kernels").

The decode path's :func:`cached_attention` attends T new tokens over a KV cache, keys laid out as the values
(``[B, KVH, S, Dh]``), or transposed (``[B, KVH, Dh, S]``), the faster form on XLA:CPU only (see
:mod:`seal_jax.lm.cpu_decode`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from seal_jax.lm import sharding as shd
from seal_jax.lm.types import ATTENTION_IMPLEMENTATIONS

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS
# Queries per block of "chunked" (its scores: B x H x 512 x S float32 at a time), used from CHUNKED_FROM
# tokens on. Compiled for SEAL's Qwen3-8B training (BENCHMARKS.md, "Attention by platform"): at T = 1024,
# blocks of 512 saved 1.9 GB of 12 on a v5e chip and cost 17% more roofline time (the blocks' recompute
# nests inside remat's), so the einsum stays; at T = 2048 they let the program fit a v5e chip at all, and
# blocks of 512 beat blocks of 1,024 in both memory and time on H100, v5e and v5p.
QUERY_CHUNK = 512
CHUNKED_FROM = 2048
# "causal_blocks": query blocks per sequence from BLOCKS_FROM tokens on (measured on the bundled model's
# LoRA training at 256 tokens, 2 cores: 2 blocks +10%, 4 +12%, 8 +8% over the einsum)
CAUSAL_BLOCKS = 4
BLOCKS_FROM = 128
# the fused kernels' tiles (queries and keys per block); a length they do not divide is padded to whole tiles
KERNEL_BLOCK = 128
# the Triton kernel's backward pass works on tiles of this many tokens (its default block sizes)
TRITON_BACKWARD_BLOCK = 32
# splash attention runs for head sizes that are multiples of this (compiled for v5p: 64 and 128 do, 32 does
# not: "Bad lhs type"), and under a default matmul precision among these (lower case); otherwise "chunked"
SPLASH_HEAD_DIM = 64
MXU_PRECISIONS = ("default", "fastest", "bfloat16", "bf16_bf16_f32")
# the Triton kernel's largest head size (its blocks of 128 queries x head size must fit a GPU's shared memory
# next to the keys' block); larger heads use "chunked"
TRITON_MAX_HEAD_DIM = 128


class AttentionError(ValueError):
    """An unknown attention implementation or malformed attention inputs."""


def implementation_for(platform: str) -> str:
    """The attention implementation for programs that run on ``platform`` (``"cpu"``, ``"tpu"``, ``"gpu"``)."""
    return {"cpu": "causal_blocks", "tpu": "splash", "gpu": "triton"}.get(platform, "chunked")


def chosen(attention: str | None, platform: str | None = None) -> str | None:
    """``attention`` as given to a model (``LM.load(attention=...)``), checked: ``None`` (the platform's) or a
    known implementation, and a fused kernel only on its own platform or a CPU (where Pallas interprets it)."""
    if attention is not None and attention not in IMPLEMENTATIONS:
        raise AttentionError(f"attention {attention!r} is not an implementation; choose one of "
                             f"{list(IMPLEMENTATIONS)}, or None for the platform's default")
    home = {"splash": "tpu", "triton": "gpu"}.get(attention or "")
    if home and platform not in (home, "cpu", None):
        raise AttentionError(f"attention {attention!r} is the {home.upper()} kernel and this mesh's devices are "
                             f"{platform.upper()}s; leave attention out for the platform's kernel, or choose 'chunked'")
    return attention


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a kernel that GSPMD cannot split runs (:func:`splash_attention`, :func:`triton_attention`): its
    ``shard_map``'s mesh.

    Attributes:
      mesh: the model's mesh, or None (one device: the kernel is called directly).
      rows_split: whether attention's rows may go over ``data``. False inside a ``vmap`` over training lanes
        that already splits ``data`` (its ``spmd_axis_name``): the rows of one lane are then whole.
      heads_over_fsdp: whether the heads may go over ``fsdp`` when ``tensor`` does not take them
        (:func:`head_axes`). False in a generation's prefill: its keys and values fill the KV cache, whose
        heads are split over ``tensor`` only, and keys split over ``fsdp`` would be all-gathered back (a
        second copy of the cache).
    """

    mesh: Mesh | None = None
    rows_split: bool = True
    heads_over_fsdp: bool = True

    def specs(self, batch: int, kv_heads: int) -> tuple[PartitionSpec, PartitionSpec]:
        """PartitionSpecs of q/k/v ``[B, T, heads, Dh]`` and of the segment ids ``[B, T]``."""
        if self.mesh is None:
            return PartitionSpec(), PartitionSpec()
        sizes = dict(self.mesh.shape)
        rows = "data" if self.rows_split and sizes["data"] > 1 and batch % sizes["data"] == 0 else None
        heads = head_axes(sizes, kv_heads, fsdp=self.heads_over_fsdp)
        return PartitionSpec(rows, None, heads[0] if heads else None, None), PartitionSpec(rows, None)


def head_axes(sizes: Mapping[str, int], kv_heads: int, fsdp: bool = True) -> tuple[str, ...]:
    """The mesh axis a fused kernel's ``shard_map`` splits the key/value heads over, as a tuple of one or
    none: ``tensor`` where it is larger than 1 and ``kv_heads`` divides by it, else (with ``fsdp``) ``fsdp``
    on the same terms, else none. Never both: compiled for Qwen3-8B with ``fsdp=2,tensor=4``, heads over both made
    GSPMD reshard the projections around the kernel (training +33% FLOPs on v5p-16, roofline 9.9 -> 13.1 s),
    where with ``fsdp`` alone (``fsdp=4``, 2,048 tokens on h100-8) splitting them cut the roofline
    17.3 -> 15.1 s. The planner divides the kernels' FLOPs by the same split."""
    for axis in ("tensor", "fsdp") if fsdp else ("tensor",):
        if sizes.get(axis, 1) > 1 and kv_heads % sizes[axis] == 0:
            return (axis,)
    return ()


def causal_share(length: int, tile: int = KERNEL_BLOCK) -> float:
    """The share of a causal ``length x length`` score square that a fused kernel computes: the ``tile``
    tiles on or below the diagonal."""
    tiles = -(-length // tile)
    return (tiles + 1) / (2 * tiles)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, impl: str = "einsum", *,
              segments: jax.Array | None = None, placement: Placement | None = None) -> jax.Array:
    """Grouped-query scaled dot-product attention by implementation ``impl`` (:data:`IMPLEMENTATIONS`).

    q: ``[B, T, H, Dh]``; k, v: ``[B, S, KVH, Dh]`` with ``H % KVH == 0``; allowed: bool ``[B, T, S]``. Rows
    with no allowed key (left padding) get a uniform average instead of NaN. Returns ``[B, T, H, Dh]`` in
    ``q.dtype``; the softmax is computed in float32.

    ``"splash"`` and ``"triton"`` need ``segments`` (``[B, T]``, nonzero = a real token) and read no
    ``allowed``: their mask is causal over real keys, which is what ``allowed`` must then be (as
    ``Decoder.hidden_states`` builds it); the rows of padding tokens attend to padding instead of averaging
    (nothing reads them). ``placement`` says where their ``shard_map`` runs. Fewer than
    :data:`KERNEL_BLOCK` tokens use the einsum (the kernel would pad them to a whole tile).
    """
    if impl == "einsum":
        return einsum_attention(q, k, v, allowed)
    if impl == "causal_blocks":
        return causal_block_attention(q, k, v, allowed)
    if impl == "chunked":
        if q.shape[1] < CHUNKED_FROM:
            return einsum_attention(q, k, v, allowed)
        return chunked_attention(q, k, v, allowed)
    if impl not in ("splash", "triton"):
        raise AttentionError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if segments is None:
        raise AttentionError(f"{impl} attention needs the segment ids (segments=[B, T], nonzero = real token)")
    placement = placement or Placement()
    if q.shape[1] < KERNEL_BLOCK:
        return einsum_attention(q, k, v, allowed)  # less than one tile: the kernel would pad it to a whole one
    if impl == "splash":
        if not splash_attention_applies(q.shape[-1], placement):
            return attention(q, k, v, allowed, "chunked")
        return splash_attention(q, k, v, segments, placement)
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        return attention(q, k, v, allowed, "chunked")
    return triton_attention(q, k, v, segments, placement)


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


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                           blocks: int = CAUSAL_BLOCKS) -> jax.Array:
    """Causal attention by blocks of queries (``"causal_blocks"``): block i of ``blocks`` attends to the keys
    up to its own end, by :func:`cached_attention`'s batched matmuls. ``allowed`` must be causal (no key
    after its query), as ``Decoder.hidden_states`` builds it; a row with no allowed key (left padding)
    averages the values of the keys its block sees (nothing reads it). A sequence shorter than
    :data:`BLOCKS_FROM`, or that ``blocks`` does not divide, is one block."""
    b, t, h, dh = q.shape
    if k.shape[1] != t:
        raise AttentionError(f"causal_blocks attention takes T queries over their own T keys, got {t} and {k.shape[1]}")
    n = blocks if t >= BLOCKS_FROM and t % blocks == 0 else 1
    m = t // n
    keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KVH, S, Dh], as the cache lays them
    outs = [cached_attention(q[:, i * m:(i + 1) * m], keys[:, :, :(i + 1) * m], values[:, :, :(i + 1) * m],
                             allowed[:, i * m:(i + 1) * m, :(i + 1) * m]) for i in range(n)]
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


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


def splash_attention_applies(head_dim: int, placement: Placement) -> bool:
    """Whether Mosaic can compile the splash kernel here, else ``"splash"`` runs as ``"chunked"``: on a TPU, a
    head size that is a multiple of :data:`SPLASH_HEAD_DIM` and matmuls at the MXU's own precision
    (:data:`MXU_PRECISIONS`; its matmuls take bf16 operands into float32 sums, and a process-wide
    ``jax_default_matmul_precision`` such as "highest" asks Mosaic for float32 passes it cannot compile:
    "Bad lhs type"). Pallas' interpreter (off a TPU) takes any."""
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    return shd.platform(placement.mesh) != "tpu" or (head_dim % SPLASH_HEAD_DIM == 0 and precision in MXU_PRECISIONS)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
                     placement: Placement) -> jax.Array:
    """Causal grouped-query attention by JAX's Pallas splash-attention kernel (TPU; interpret mode elsewhere).

    q: ``[B, T, H, Dh]``; k, v: ``[B, T, KVH, Dh]``; segments: ``[B, T]``, nonzero for real tokens. A query
    sees the real keys at or before it (a padding query: the padding keys at or before it). T is padded to
    whole :data:`KERNEL_BLOCK` tiles. Each key/value head runs the kernel's multi-query form over its G
    query heads, the heads and rows split over the mesh by ``placement``.
    """
    return _kernel_attention("splash", q, k, v, segments, placement)


def triton_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
                     placement: Placement) -> jax.Array:
    """:func:`splash_attention`'s contract by JAX's Pallas flash-attention kernel for GPUs (Triton;
    interpret mode elsewhere). The kernel is multi-head: each key/value head is repeated for its G query
    heads (the backward pass sums their gradients)."""
    return _kernel_attention("triton", q, k, v, segments, placement)


def _kernel_attention(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
                      placement: Placement) -> jax.Array:
    """Pad T to whole tiles, then run kernel ``impl`` on each device's share (a ``shard_map`` over
    ``placement.mesh``), in Pallas' interpreter off the kernel's platform."""
    local, platform = {"splash": (_splash_local, "tpu"), "triton": (_triton_local, "gpu")}[impl]
    b, t, h, _ = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise AttentionError(f"{h} query heads do not divide into {kvh} key/value heads")
    spec, seg_spec = placement.specs(b, kvh)
    # Pallas' interpreter: the same kernel run by XLA ops (the tests, on a CPU)
    interpret = shd.platform(placement.mesh) != platform
    seg = (segments != 0).astype(jnp.int32)
    pad = -t % KERNEL_BLOCK
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)))
    run = functools.partial(local, interpret=interpret)
    if placement.mesh is None:
        out = run(q, k, v, seg)
    else:
        # GSPMD cannot split a kernel: each device runs it on its own rows and heads
        out = jax.shard_map(run, mesh=placement.mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec,
                            check_vma=False)(q, k, v, seg)
    return out[:, :t]


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, *, interpret: bool) -> jax.Array:
    """One device's splash attention: q ``[b, t, h, Dh]``, k/v ``[b, t, kvh, Dh]``, seg ``[b, t]`` int32."""
    # deferred: Pallas' TPU kernels are only needed where splash attention runs
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, h, dh = q.shape
    kvh = k.shape[2]
    g = h // kvh
    n = KERNEL_BLOCK
    sizes = splash.BlockSizes(block_q=n, block_kv=n, block_kv_compute=n, block_q_dkv=n, block_kv_dkv=n,
                                  block_kv_dkv_compute=n, block_q_dq=n, block_kv_dq=n)
    mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(g)])
    kernel = splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

    def one(q_g: jax.Array, k_1: jax.Array, v_1: jax.Array, s: jax.Array) -> jax.Array:
        return kernel(q_g, k_1, v_1, segment_ids=splash.SegmentIds(q=s, kv=s))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))  # over key/value heads: [kvh, g, t, Dh], [kvh, t, Dh]
    scaled = (q.astype(jnp.float32) * dh ** -0.5).astype(q.dtype)  # the kernel has no scale of its own
    qg = scaled.reshape(b, t, kvh, g, dh).transpose(0, 2, 3, 1, 4)
    out = jax.vmap(per_head)(qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg)  # [b, kvh, g, t, Dh]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh).astype(q.dtype)


def _triton_local(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, *, interpret: bool) -> jax.Array:
    """One device's Triton flash attention: q ``[b, t, h, Dh]``, k/v ``[b, t, kvh, Dh]``, seg ``[b, t]``."""
    # JAX 0.11 deprecates Pallas' Triton ops in favour of tokamax and warns once on import; the kernel and its
    # signature are unchanged there, and check_kernel still tests it on the machine before a suite uses it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # deferred: Pallas' GPU kernels are only needed where this attention runs
        from jax.experimental.pallas.ops.gpu import attention as kernel_lib

    g = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, g, axis=2) for x in (k, v))  # query head j reads key/value head j // g
    return kernel_lib.mha(q, k, v, seg, sm_scale=q.shape[-1] ** -0.5, causal=True, interpret=interpret)


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


def check_kernel(impl: str, *, heads: int, kv_heads: int, head_dim: int, dtype: jax.typing.DTypeLike = jnp.bfloat16,
                 device: jax.Device | None = None) -> str | None:
    """Run kernel ``impl`` (``"splash"`` or ``"triton"``) once on ``device`` (default: JAX's first) against the
    einsum, forward and backward, and say what went wrong: ``None`` when it compiles, runs and agrees, else the
    reason in one line. A check for a machine nobody has compiled this JAX's kernels on (a new jaxlib or
    driver may reject them); where it fails, build the model with ``attention="chunked"``.

    Two rows of 2 x :data:`KERNEL_BLOCK` tokens (one left-padded), the model's query-per-key head group and
    head size (one key/value head); agreement within 5% of the reference's largest value (bfloat16), 1% (float32
    on an accelerator) or 0.1% (float32 on a CPU), compared on the real tokens' rows. A failure that ends the
    process (a compiler crash) is not caught here: ``python -m seal_jax.kernel_check`` runs this check in a
    process of its own for that."""
    if impl not in ("splash", "triton"):
        raise AttentionError(f"check_kernel takes a fused kernel ('splash' or 'triton'), got {impl!r}")
    if heads % kv_heads:
        raise AttentionError(f"{heads} query heads do not divide into {kv_heads} key/value heads")
    g = heads // kv_heads
    b, t, pad = 2, 2 * KERNEL_BLOCK, 37
    device = device or jax.devices()[0]
    placement = Placement(shd.make_mesh("data=1", devices=[device], keep_order=True))
    keys = jax.random.split(jax.random.key(0), 4)
    q, cot = (jax.random.normal(x, (b, t, g, head_dim), jnp.float32) for x in (keys[0], keys[3]))
    k, v = (jax.random.normal(x, (b, t, 1, head_dim), jnp.float32) for x in keys[1:3])
    real = jnp.arange(t)[None, :] >= jnp.array([0, pad])[:, None]  # row 1: `pad` tokens of left padding
    allowed = real[:, None, :] & (jnp.arange(t)[None, :, None] >= jnp.arange(t)[None, None, :])
    inputs = jax.device_put((q, k, v, cot * real[:, :, None, None], real, allowed), device)

    def outputs(kind: str, q_: jax.Array, k_: jax.Array, v_: jax.Array, cot_: jax.Array, real_: jax.Array,
                allowed_: jax.Array) -> tuple[jax.Array, ...]:
        def f(q_: jax.Array, k_: jax.Array, v_: jax.Array) -> jax.Array:
            out = attention(q_.astype(dtype), k_.astype(dtype), v_.astype(dtype), allowed_, kind,
                            segments=real_.astype(jnp.int32), placement=placement)
            return out.astype(jnp.float32)

        out, pull = jax.vjp(f, q_, k_, v_)
        return (out, *pull(cot_))

    want = jax.device_get(jax.jit(functools.partial(outputs, "einsum"))(*inputs))
    try:
        got = jax.device_get(jax.jit(functools.partial(outputs, impl))(*inputs))
    except Exception as error:  # any failure to trace, lower, compile or run is the answer
        return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    # float32 on an accelerator: its matmuls may round (TF32 on GPUs, bf16 passes on TPUs), each its own way
    tol = 5e-2 if jnp.dtype(dtype) != jnp.float32 else 1e-3 if device.platform == "cpu" else 1e-2
    rows = np.asarray(real)[:, :, None, None]
    for name, x, y in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
        x, y = (np.where(rows, a, 0.0) for a in (np.asarray(x), np.asarray(y)))
        scale = max(float(np.abs(y).max()), 1e-6)
        err = float(np.abs(x - y).max()) / scale
        if not np.isfinite(err) or err > tol:
            return f"its {name} differs from the einsum's by {err:.3g} of the largest value (tolerance {tol:g})"
    return None
