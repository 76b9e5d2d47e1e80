"""Sampling: ``SamplingParams``, a jitted prefill and a jitted ``lax.while_loop`` decode.

How one call runs (see :class:`Sampler`):

1. **Buckets.** Prompts are left-padded to ``T = tokenizer.bucket(longest prompt)``; the batch is padded to
   ``B`` rows (:func:`batch_bucket`: a power of two, a multiple of the mesh's ``data`` axis, and on an
   accelerator two rows per device where one would be) with dummy rows (one token, already "stopped"); the
   number of new tokens is bucketed to ``N = tokenizer.bucket(max_new_tokens)`` and the KV cache holds
   ``S = T + N`` slots. Only
   ``(B, T, N)``, the stop-id table size, "adapters stacked or not" and "greedy or not" (``temperature ==
   0``: a decode program without the sampling) are static, so a long run compiles one prefill and at most
   two decode programs per bucket. Every other sampling knob (the temperature's value, top-k, top-p, min-p,
   seed, stop ids, the exact ``max_new_tokens``) is a traced argument: changing it does not recompile.
2. **Prefill** (one jitted call): the whole padded batch goes through the scanned layers
   (:meth:`~seal_jax.lm.model.Decoder.prefill`), whose keys and values fill a fresh
   :class:`~seal_jax.lm.model.KVCache` (one buffer per layer); the head is applied to the last position
   only, giving logits ``[B, V]`` (never ``[B, T, V]``).
3. **Decode** (one jitted call, the cache donated): sample the first token from the prefill logits, then a
   ``lax.while_loop`` feeds the last token back through :meth:`~seal_jax.lm.model.Decoder.extend`, samples
   the next one and writes it to an output buffer ``[B, N]``. A row stops at its first stop id (the stop
   token is not counted in its length); the loop ends when every row has stopped or ``max_new_tokens``
   tokens have been produced. How the layers run depends on the platform of the mesh's devices
   (``Sampler.scan_layers``, see "Decode layouts").

Decode layouts. On a TPU the layers are *scanned* over the stacked ``[L, ...]`` weights and one stacked
cache (keys laid out as the values, ``[L, B, KVH, S, Dh]``): each layer writes its new slots into the stack
in place and reads its slice, and libtpu reads the weights' slices where they lie. On CPUs and GPUs the
layers are *unrolled* over per-layer weights and one cache buffer per layer (``[B, KVH, S, Dh]`` for keys
and values): on a GPU the weights as stored (split into per-layer arrays, see
:class:`~seal_jax.lm.model.LayerStack`: the CUDA compiler copies a slice of a stacked array before a matmul
reads it), on a CPU per-layer copies kept between calls (:mod:`seal_jax.lm.cpu_decode`). Measured with ``seal-jax compile`` for Qwen3-8B on ``tpu-v5p-16``
(``data=2,fsdp=4``): the scanned decode reads 1.06–1.08× its arguments per step (unrolled: 1.21–1.22×),
its temporaries fall from 3.5 GB to 0.5–0.6 GB per device, and it compiles in 13–16 s instead of 26–55 s.
Under a mesh, a TPU also keeps some weights and the cache in memory layouts of its own
(:mod:`seal_jax.lm.layouts`): the prefill writes the cache in the decode's layout and the decode hands it
back in it (:meth:`Sampler.prefill_program`, :meth:`Sampler.decode_program`), so that the v5p decodes copy
neither per call (answers under many adapters with few rows per device still copy the cache: BENCHMARKS.md).
Under K stacked adapters the decode casts them and joins each input's ``a`` matrices once per call
(:func:`~seal_jax.lm.model.group_adapters`): 21 adapters' greedy answers read 0.92–1.01× the arguments per
step on v5p and 1.24× on h100-8 (BENCHMARKS.md, sixteenth session). That copy is held among the decode's
temporaries, unless the adapters come readied (``LM.ready_adapters``, :meth:`Sampler.ready`: cast, joined
and, for layers stored split, one piece per layer), as the research loop answers with them.

CPU only: on a CPU the decode keeps per-layer weight copies between calls, cuts some of them into column
blocks, lays a tied head out once per call and stores the keys transposed. All of it lives in :mod:`seal_jax.lm.cpu_decode`, behind its
one switch (``Sampler.cpu_tricks``); the TPU and GPU programs have none of it.

Each step's token comes from :mod:`seal_jax.lm.next_token` (greedy, or Hugging Face's filters and a draw
by inverse CDF, none of which gathers a vocabulary split over the mesh).
Randomness: ``key(seed)``, folded with the step number, then with the row index inside the padded batch
(so padding the batch does not change a row's draws); with K stacked adapters every candidate sees the
same random numbers. Rows may carry their own seeds (``seeds=``): a row then draws with its seed and its
index among the rows of that seed, exactly as it would in a call of its own with that seed, so several
requests can share one batch and each gets the tokens it gets alone (up to float rounding).

Stop ids: the model config's ``eos_token_ids`` plus the tokenizer's EOS id, plus
``SamplingParams.stop_token_ids``. ``ignore_eos=True`` drops the EOS ids but keeps the explicit
``stop_token_ids`` (as vLLM does); an EOS id listed in ``stop_token_ids`` therefore still stops.

Adapters: a LoRA adapter is any object with ``weights`` (``{projection: {"a", "b"}}``) and ``scale``
attributes, such as :class:`~seal_jax.lm.model.LoraInputs`. One adapter has leaves ``a: [L, in, r]``,
``b: [L, r, out]`` and a scalar scale; K stacked adapters have a leading ``K`` axis on every leaf and a
scale ``[K]``. :class:`~seal_jax.lm.lora.Adapters` (from ``LM.train_adapters``) is always a stack, even
of one. Stacked adapters run under ``jax.vmap`` over K with the base weights broadcast (``in_axes=None``);
both prefill and decode are vmapped, and the result has a leading K axis.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Format
from jax.sharding import Mesh, NamedSharding

from seal_jax.lm import cpu_decode, layouts
from seal_jax.lm import sharding as shd
from seal_jax.lm import tokenizer as tok
from seal_jax.lm.config import ModelConfig
from seal_jax.lm.lora import ReadyAdapters
from seal_jax.lm.model import KVCache, LoraInputs, group_adapters, unstack_layers
from seal_jax.lm.next_token import greedy_step, sample_step
from seal_jax.lm.params import projection_shape
from seal_jax.lm.types import PROJECTIONS, SamplingError, SamplingParams, is_int

MIN_STOP_SLOTS = 8  # the stop-id table is padded to this size (or the next power of two above it)
# Logical axes of a per-layer KV buffer [B, KVH, S, Dh] (see model.KVCache)
CACHE_AXES = ("batch", "kv_heads", "length", None)


def cache_axes(cache: KVCache) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
    """Logical axes of ``cache``'s key and value buffers: per layer :data:`CACHE_AXES` (keys transposed
    ``[B, KVH, Dh, S]`` on a CPU), or stacked ``[L, B, KVH, S, Dh]`` (see ``model.KVCache``)."""
    if cache.stacked:
        return (None, *CACHE_AXES), (None, *CACHE_AXES)
    keys = ("batch", "kv_heads", None, "length") if cache.keys_transposed else CACHE_AXES
    return keys, CACHE_AXES


def check_texts(texts: Any, name: str, tokenizer: Any, no_tokenizer: str) -> None:
    """Raise unless ``texts`` (the facade's prompts or completions, called ``name``) is a non-empty list of
    non-empty strings and there is a tokenizer (else ``no_tokenizer`` says what to do)."""
    if tokenizer is None:
        raise tok.TokenizerError(no_tokenizer)
    if isinstance(texts, str):
        raise SamplingError(f"{name} must be a list of strings, not a single string (wrap it: [text])")
    if not isinstance(texts, (list, tuple)) or len(texts) == 0:
        raise SamplingError(f"{name} must be a non-empty list of strings")
    for i, p in enumerate(texts):
        if not isinstance(p, str):
            raise SamplingError(f"{name}[{i}] must be a str, got {type(p).__name__}")
        if not p:
            raise SamplingError(f"{name.rstrip('s')} {i} is empty; every one needs some text")


def check_context(prompt: str, length: int, max_new_tokens: int, config: ModelConfig) -> None:
    """Raise a :class:`SamplingError` unless ``prompt`` (what the message calls it, e.g. ``"prompt 3"``) of
    ``length`` tokens and ``max_new_tokens`` new ones fit the model's context (``config.max_position_embeddings``):
    the one check of :func:`check_prompt_ids` (generation) and ``LM.lower_generate`` (its programs' sizes)."""
    context = config.max_position_embeddings
    if length + max_new_tokens > context:
        raise SamplingError(
            f"{prompt} has {length} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
            f"model's context of {context} tokens: shorten the prompt or lower max_new_tokens")


def check_prompt_ids(prompt_ids: Any, params: SamplingParams, config: ModelConfig) -> list[list[int]]:
    """Validate a batch of prompts before anything is compiled or run.

    Args:
      prompt_ids: B non-empty lists (or 1-D arrays) of token ids.
      params: the sampling parameters (its ``max_new_tokens`` and ``stop_token_ids`` are checked too).
      config: the model's config (vocabulary size and context length).
    Returns:
      the prompts as plain lists of ints.
    Raises:
      TypeError: ``params`` is not a :class:`SamplingParams`.
      SamplingError: an empty batch or prompt, ids outside the vocabulary, or a prompt that with
        ``max_new_tokens`` would not fit the model's context (``config.max_position_embeddings``).
    """
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a seal_jax.SamplingParams, got {type(params).__name__}")
    if isinstance(prompt_ids, np.ndarray):
        prompt_ids = list(prompt_ids)
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise SamplingError("prompt_ids must be a non-empty list of token-id lists")
    rows: list[list[int]] = []
    v = config.vocab_size
    for i, row in enumerate(prompt_ids):
        if isinstance(row, np.ndarray) and row.ndim == 1:
            row = row.tolist()
        if not isinstance(row, (list, tuple)) or not all(is_int(t) for t in row):
            raise SamplingError(f"prompt_ids[{i}] must be a list of ints, got {type(row).__name__}")
        if len(row) == 0:
            raise SamplingError(f"prompt {i} is empty; every prompt needs at least one token")
        if min(row) < 0 or max(row) >= v:
            raise SamplingError(f"prompt {i} has token ids outside the vocabulary [0, {v}): [{min(row)}, {max(row)}]")
        check_context(f"prompt {i}", len(row), params.max_new_tokens, config)
        rows.append([int(t) for t in row])
    bad_stops = [s for s in params.stop_token_ids if s >= v]
    if bad_stops:
        raise SamplingError(f"stop_token_ids {bad_stops} lie outside the vocabulary [0, {v})")
    return rows


# ----------------------------------------------------------------------------------------------------
# Adapters


@dataclasses.dataclass(frozen=True)
class _Lora:
    """Validated adapter arrays: ``weights`` leaves with (stacked) or without a leading K axis."""

    weights: dict[str, dict[str, jax.Array]]
    scale: jax.Array
    stacked: bool
    ready: bool = False  # readied by LM.ready_adapters (placed already)

    @property
    def num_candidates(self) -> int:
        return int(self.scale.shape[0]) if self.stacked else 1


def as_lora(adapters: Any, config: ModelConfig) -> _Lora | None:
    """Check and normalise ``adapters`` (``None``, one adapter, or K stacked; see the module docstring).

    :class:`~seal_jax.lm.lora.Adapters` (anything with ``as_inputs()``) is a stack, except one taken out
    of a stack with ``adapters[k]``, which is one adapter. :class:`~seal_jax.lm.lora.ReadyAdapters` are
    taken as they are (the ``LM`` checks that they were readied for its model). A plain ``weights``/``scale`` object is stacked
    when its leaves have the extra leading K axis.

    Raises:
      SamplingError: missing attributes, unknown projections, or shapes that do not fit ``config``.
    """
    if adapters is None:
        return None
    if isinstance(adapters, ReadyAdapters):  # made by the engine for this model (the LM checks its layout)
        inputs = adapters.as_inputs()
        return _Lora(weights=inputs.weights, scale=jnp.asarray(inputs.scale, jnp.float32), stacked=not adapters.single,
                     ready=True)
    if hasattr(adapters, "as_inputs"):  # seal_jax.lm.lora.Adapters
        adapters = adapters.as_inputs()
    if not hasattr(adapters, "weights") or not hasattr(adapters, "scale"):
        raise SamplingError(
            f"adapters must have .weights ({{projection: {{'a', 'b'}}}}) and .scale (like "
            f"seal_jax.lm.model.LoraInputs), got {type(adapters).__name__}")
    weights = adapters.weights
    if not isinstance(weights, dict) or not weights:
        raise SamplingError("adapters.weights must be a non-empty dict {projection: {'a': ..., 'b': ...}}")
    unknown = set(weights) - set(PROJECTIONS)
    if unknown:
        raise SamplingError(f"adapters.weights has unknown projections {sorted(unknown)}; known: {list(PROJECTIONS)}")
    out: dict[str, dict[str, jax.Array]] = {}
    lead: tuple[int, ...] | None = None
    L = config.num_layers
    for name, piece in weights.items():
        if not isinstance(piece, dict) or set(piece) != {"a", "b"}:
            raise SamplingError(f"adapters.weights[{name!r}] must be a dict with exactly the keys 'a' and 'b'")
        a, b = jnp.asarray(piece["a"]), jnp.asarray(piece["b"])
        if a.ndim not in (3, 4) or b.ndim != a.ndim:
            raise SamplingError(
                f"adapters.weights[{name!r}]: 'a' must be [L, in, r] (one adapter) or [K, L, in, r] (stacked) "
                f"and 'b' likewise, got a {a.shape} and b {b.shape}")
        this_lead = a.shape[:-3]
        din, dout = projection_shape(config, name)
        r = a.shape[-1]
        if a.shape[-3:] != (L, din, r) or b.shape != (*this_lead, L, r, dout):
            raise SamplingError(
                f"adapters.weights[{name!r}]: expected a {(*this_lead, L, din, 'r')} and b {(*this_lead, L, 'r', dout)}"
                f" for this model, got a {a.shape} and b {b.shape}")
        if lead is not None and this_lead != lead:
            raise SamplingError(f"adapters.weights: every projection must have the same leading axes, got "
                                f"{lead} and {this_lead} ({name!r})")
        lead = this_lead
        out[name] = {"a": a, "b": b}
    stacked = len(lead or ()) == 1
    scale = jnp.asarray(adapters.scale, jnp.float32)
    if stacked:
        k = lead[0]
        if k == 0:
            raise SamplingError("adapters: the candidate axis K is empty")
        if scale.ndim == 0:
            scale = jnp.full((k,), scale)
        if scale.shape != (k,):
            raise SamplingError(f"adapters.scale must be a scalar or [K]=[{k}] for stacked adapters, got {scale.shape}")
    elif scale.ndim != 0:
        raise SamplingError(f"adapters.scale must be a scalar for one adapter, got shape {scale.shape}")
    return _Lora(weights=out, scale=scale, stacked=stacked)


# ----------------------------------------------------------------------------------------------------
# The jitted programs


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def batch_bucket(n: int, mesh: Mesh | None = None, *, decode: bool = True, platform: str | None = None,
                 stacked: int = 1) -> int:
    """The padded batch size for ``n`` rows: a power of two, and a multiple of the mesh's ``data`` axis; for
    decoding on an accelerator at least two matmul rows on each device (:func:`pads_one_row`).
    ``decode=False``: rows scored whole, whose matmuls have a row per token. ``stacked``: the K adapters the
    rows are decoded under (stacked, each one's rows join the base's matmuls, so one row under K >= 2
    adapters needs no padding). ``platform``: the mesh's (:func:`~seal_jax.lm.sharding.platform`) unless
    given, as the planner does for a mesh of sizes only."""
    b = _pow2(n)
    d = 1 if mesh is None else int(mesh.shape["data"])
    b = -(-b // d) * d
    if decode and (b // d) * max(stacked, 1) < 2:
        if platform is None and (mesh is None or isinstance(mesh, Mesh)):
            platform = shd.platform(mesh)
        if pads_one_row(platform, mesh):
            b = 2 * d
    return b


def pads_one_row(platform: str | None, mesh: Any = None) -> bool:
    """Whether a decode of one row per device runs as two rows per device instead (the padding rows are
    stopped from the start). Compiled for Qwen3-8B (BENCHMARKS.md, twenty-fifth session), a one-row step's matmuls are not
    GEMMs: the GPU compiler makes multiply-and-reduce fusions that write weight-sized products (on h100-8's
    ``tensor=8`` 4.36 GB a step against 2.02 GB for two rows; on ``data=2,tensor=4`` 88.7 against 72.4 ms
    by the roofline), and libtpu multiplies and reduces with the query, key and value projections copied into
    another layout on every step where a device holds at least half of each weight (tpu-v5p-8 ``data=4``
    435.6 against 347.8 ms; ``data=2,tensor=2`` 217.9 against 174.0 ms; ``data=2,fsdp=2`` 215.0 against
    175.0 ms), but not where the weights are split four or eight ways (``tensor=4``: 1,432 against 1,468 ms
    for two rows; ``fsdp=4``: 87.2 against 88.5 ms; ``tensor=8``: 43.4 against 43.7).
    So: on every GPU; on a TPU where ``tensor × fsdp <= 2``; never on a CPU."""
    if platform == "gpu":
        return True
    if platform != "tpu":
        return False
    sizes = {} if mesh is None else mesh.shape
    return int(sizes.get("tensor", 1)) * int(sizes.get("fsdp", 1)) <= 2


def stacked_count(lora_scale: Any) -> int:
    """How many stacked adapters a ``scale`` leaf holds: K for a ``[K]`` one, 1 for one adapter or none."""
    return int(lora_scale.shape[0]) if lora_scale is not None and getattr(lora_scale, "ndim", 0) == 1 else 1


def knob_arrays(params: SamplingParams, pad_id: int, batch: int, seeds: Sequence[int] | None = None
                ) -> dict[str, np.ndarray]:
    """The traced arguments of the decode program (changing them does not recompile, except a temperature
    that becomes or stops being 0, see ``greedy``): scalars, and per row
    of the padded ``batch`` its ``seed`` and ``row`` (its index among the rows of its seed). ``seeds``: one
    per real row (default: ``params.seed`` for all); padding rows take ``params.seed``."""
    given = [] if seeds is None else [int(x) for x in seeds]
    row_seeds = np.asarray(given + [int(params.seed)] * (batch - len(given)), np.uint32)
    counts: dict[int, int] = {}
    rows = np.zeros((batch,), np.int32)
    for i, seed in enumerate(row_seeds.tolist()):
        rows[i] = counts.get(seed, 0)
        counts[seed] = rows[i] + 1
    return {
        "temperature": np.float32(params.temperature), "top_k": np.int32(params.top_k),
        "top_p": np.float32(params.top_p), "min_p": np.float32(params.min_p),
        "seed": row_seeds, "row": rows, "max_new_tokens": np.int32(params.max_new_tokens),
        "pad_id": np.int32(pad_id),
    }


class Sampler:
    """The jitted prefill and decode programs of one model (held by :class:`~seal_jax.lm.api.LM`).

    Args:
      graphdef: the model's ``nnx`` graph definition (the state is passed to every call).
      mesh: the mesh the weights live on, or ``None``; batch-major arrays are placed with the batch over
        ``data`` and the KV cache is constrained to the same layout.
      compiler_options: XLA options every program is compiled with (``jax.jit``'s ``compiler_options``),
        e.g. ``{"xla_gpu_experimental_force_split_k": 1}``; ``None``: the compiler's defaults.

    ``traces`` counts how many times each program was traced (= compiled), for tests and benchmarks.
    """

    def __init__(self, graphdef: Any, mesh: Mesh | None = None, compiler_options: dict[str, Any] | None = None):
        self.graphdef = graphdef
        self.mesh = mesh
        self.compiler_options = dict(compiler_options) if compiler_options else None
        self.platform = shd.platform(mesh)  # platform choices follow the mesh's devices, not the host
        self.cpu_tricks = cpu_decode.applies(self.platform)  # the one switch of lm/cpu_decode.py
        # TPU: scan the layers in decode over the stacked weights and a stacked cache (libtpu reads each
        # layer's slice in place: no per-call weight copies, 4x shorter compiles); CPU and GPU unroll the
        # layers over per-layer weights (see "Decode layouts" in the module docstring)
        self.scan_layers = self.platform == "tpu"
        self.traces: collections.Counter[str] = collections.Counter()
        self.prefill = self._jit(self._prefill, static_argnames=("cache_len",))
        self.decode = self._jit(self._decode, static_argnames=("out_len", "greedy"), donate_argnames=("cache",))
        self._laid_out: dict[Any, Any] = {}  # see prefill_program and decode_program
        self.split = self._jit(self._split)

    def _jit(self, fn: Any, **kwargs: Any) -> Any:
        """``jax.jit(fn, **kwargs)`` with the sampler's compiler options."""
        return jax.jit(fn, compiler_options=self.compiler_options, **kwargs)

    # -- placement -------------------------------------------------------------------------------

    def _constrain_cache(self, cache: KVCache) -> KVCache:
        if self.mesh is None:
            return cache

        def put(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
            return jax.lax.with_sharding_constraint(x, self._sharding(x.shape, logical))

        keys, values = cache_axes(cache)
        return KVCache(k=jax.tree.map(lambda x: put(x, keys), cache.k), v=jax.tree.map(lambda x: put(x, values), cache.v),
                       valid=put(cache.valid, ("batch", "length")),
                       positions=put(cache.positions, ("batch",)), index=cache.index,
                       keys_transposed=cache.keys_transposed)

    def _cache_formats(self, cache: KVCache, candidates: bool) -> KVCache | None:
        """Where the mesh's platform lays the KV cache out (a TPU: ``layouts.cache_layout``), the formats
        (layout and sharding) of the keys and values of a cache shaped as ``cache`` (``candidates``: with a
        leading K axis), in a ``KVCache`` whose other fields are ``None``, for a program's ``out_shardings``;
        ``None`` elsewhere."""
        if cache.keys_transposed:  # (a CPU's form)
            return None
        layout = layouts.cache_layout(self.platform, ("candidates",) * candidates + ("layers",) * cache.stacked)
        if layout is None:
            return None
        lead = (None,) * candidates
        keys, values = cache_axes(cache)

        def formats(tree: Any, axes: tuple[str | None, ...]) -> Any:
            return jax.tree.map(lambda x: Format(layout, self._sharding(x.shape, lead + axes)), tree)

        return dataclasses.replace(cache, k=formats(cache.k, keys), v=formats(cache.v, values), valid=None,
                                   positions=None, index=None)

    def prefill_program(self, state: Any, ids: Any, lora_weights: Any, lora_scale: Any, cache_len: int) -> Any:
        """The jitted prefill for these arguments (arrays or shapes). Where the platform lays the cache out
        (:meth:`_cache_formats`), one that writes it in the layout the decode reads (one per shape: the
        layout goes into the program's result, where the SPMD partitioner keeps the sharding; a layout
        constraint inside the program made it gather the whole cache on a TPU). Elsewhere :attr:`prefill`."""
        if self.mesh is None or layouts.cache_layout(self.platform, ()) is None:
            return self.prefill
        key = ("prefill", jax.tree.structure(state), ids.shape, cache_len, jax.tree.structure(lora_weights),
               tuple(x.shape for x in jax.tree.leaves((lora_weights, lora_scale))))
        if key not in self._laid_out:
            _, cache = self._prefill_shapes(state, ids, lora_weights, lora_scale, cache_len)
            formats = self._cache_formats(cache, lora_scale is not None and lora_scale.ndim == 1)
            self._laid_out[key] = self.prefill if formats is None else self._jit(
                self._prefill, static_argnames=("cache_len",), out_shardings=(None, formats))
        return self._laid_out[key]

    def decode_program(self, cache: KVCache) -> Any:
        """The jitted decode for ``cache`` (arrays or shapes, as the prefill gave them). Where its keys and
        values have a layout of their own (a TPU's, see :meth:`prefill_program`), a program that hands them
        back in it: the donated cache is then updated in place, where the default layout of an unspecified
        output would cost a copy in and out on every call. Elsewhere :attr:`decode`."""
        if self.mesh is None or layouts.cache_layout(self.platform, ()) is None or cache.keys_transposed:
            return self.decode
        formats = dataclasses.replace(cache, k=jax.tree.map(lambda x: x.format, cache.k),
                                      v=jax.tree.map(lambda x: x.format, cache.v), valid=None, positions=None, index=None)
        leaves, tree = jax.tree.flatten(formats, is_leaf=lambda x: x is None)
        key = ("decode", tree, tuple(leaves))
        if key not in self._laid_out:
            self._laid_out[key] = self._jit(self._decode, static_argnames=("out_len", "greedy"),
                                            donate_argnames=("cache",), out_shardings=(None, None, formats))
        return self._laid_out[key]

    def _prefill_shapes(self, state: Any, ids: Any, lora_weights: Any, lora_scale: Any,
                        cache_len: int) -> tuple[Any, KVCache]:
        """The shapes of :meth:`_prefill`'s results for these arguments (a trace not counted in :attr:`traces`)."""
        count = self.traces["prefill"]
        out = jax.eval_shape(functools.partial(self._prefill, cache_len=cache_len), state, ids, ids, lora_weights,
                             lora_scale)
        self.traces["prefill"] = count
        return out

    def _sharding(self, shape: tuple[int, ...], logical: tuple[str | None, ...] | None) -> NamedSharding:
        """Where the driver places an array of ``shape`` on the mesh (``logical`` axes, or replicated when
        ``None``)."""
        spec = shd.spec_for(self.mesh, logical, shape) if logical is not None else jax.sharding.PartitionSpec()
        return NamedSharding(self.mesh, spec)

    def put_batch(self, array: np.ndarray) -> jax.Array:
        """Place a batch-major host array ``[B, ...]`` (batch over ``data`` under a mesh)."""
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, shd.batch_sharding(self.mesh, array.shape))

    def put_replicated(self, tree: Any) -> Any:
        """Place a pytree replicated on the mesh (unchanged without a mesh)."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, shd.replicated(self.mesh))

    # -- traced functions --------------------------------------------------------------------------

    def _prefill(self, state: Any, ids: jax.Array, mask: jax.Array, lora_weights: Any, lora_scale: Any,
                 *, cache_len: int) -> tuple[jax.Array, KVCache]:
        """Run the padded prompts ``ids``/``mask`` ``[B, T]`` into a fresh cache of ``cache_len`` slots.

        Returns the last position's logits ``[B, V]`` (``[K, B, V]`` with stacked adapters) and the cache.
        """
        self.traces["prefill"] += 1

        def one(lw: Any, ls: Any) -> tuple[jax.Array, KVCache]:
            model = nnx.merge(self.graphdef, state)
            # the prompt's keys and values fill the cache, its heads over `tensor` only: an attention kernel
            # that split them over `fsdp` as well would have them all-gathered back
            model.attention_placement = dataclasses.replace(model.attention_placement, heads_over_fsdp=False)
            lora = None if lw is None else LoraInputs(weights=lw, scale=ls)
            # (split weights, whatever the platform, decode unrolled: a scan would stack them on every step)
            x, cache = model.prefill(ids, mask, cache_len, lora=lora, stacked=self.scan_layers and not model.layers.split,
                                     keys_transposed=self.cpu_tricks and not self.scan_layers)
            return model.head(x[:, -1]), self._constrain_cache(cache)

        if lora_scale is not None and lora_scale.ndim == 1:
            return jax.vmap(one)(lora_weights, lora_scale)
        return one(lora_weights, lora_scale)

    def _split(self, state: Any) -> tuple[tuple[dict[str, Any], ...], Any]:
        """The per-layer weight copies a CPU decode keeps between calls (:func:`cpu_decode.weight_copies`)."""
        self.traces["split"] += 1
        model = nnx.merge(self.graphdef, state)
        return cpu_decode.weight_copies(model.layers.per_layer(), model.head_kernel())

    def ready_formats(self, weights: Any) -> Any:
        """Where readied adapters shaped as ``weights`` lie: replicated on the mesh, on a TPU in the layout its
        decode reads (:func:`layouts.adapter_layout`), as a pytree of ``Format`` (or shardings); ``None``
        without a mesh."""
        if self.mesh is None:
            return None
        replicated = shd.replicated(self.mesh)

        def one(x: Any) -> Any:
            layout = layouts.adapter_layout(self.platform, x.shape, x.dtype.itemsize)
            return replicated if layout is None else Format(layout, replicated)

        return jax.tree.map(one, weights)

    def ready(self, state: Any, lora_weights: Any) -> Any:
        """:meth:`_ready`, run (one program per adapter structure), its results placed by
        :meth:`ready_formats`."""
        key = ("ready", jax.tree.structure(state), jax.tree.structure(lora_weights),
               tuple(x.shape for x in jax.tree.leaves(lora_weights)))
        if key not in self._laid_out:
            count = self.traces["ready"]
            shapes = jax.eval_shape(self._ready, state, lora_weights)
            self.traces["ready"] = count
            self._laid_out[key] = self._jit(self._ready, out_shardings=self.ready_formats(shapes))
        return self._laid_out[key](state, lora_weights)

    def _ready(self, state: Any, lora_weights: Any) -> Any:
        """K stacked adapters (leaves ``[K, L, ...]``) as inference reads them (``LM.ready_adapters``): in
        the model's compute dtype with each input's ``a`` matrices joined (:func:`group_adapters`), and where
        the layer weights are stored split (GPUs), whose programs run the layers unrolled, one piece per
        layer: a decode that took them otherwise holds a copy of them among its temporaries (cast and
        joined on a TPU, also sliced per layer on a GPU: BENCHMARKS.md, twenty-second session)."""
        self.traces["ready"] += 1
        model = nnx.merge(self.graphdef, state)
        weights = group_adapters(lora_weights, model.dtype)
        if not model.layers.split:
            return weights
        return jax.vmap(functools.partial(unstack_layers, num_layers=model.config.num_layers))(weights)

    def _decode(self, state: Any, cache: KVCache, logits: jax.Array, lora_weights: Any, lora_scale: Any,
                knobs: dict[str, jax.Array], stop_ids: jax.Array, done: jax.Array, copies: Any = None, *,
                out_len: int, greedy: bool = False) -> tuple[jax.Array, jax.Array, KVCache]:
        """Sample up to ``knobs["max_new_tokens"]`` (≤ ``out_len``) tokens after the prefill.

        Args:
          cache, logits: from :meth:`_prefill` (``logits`` ``[B, V]``).
          knobs: :func:`knob_arrays`: traced scalars ``temperature, top_k, top_p, min_p, max_new_tokens,
            pad_id`` and per row ``seed`` and ``row``.
          stop_ids: int32 ``[M]``, padded with -1.
          done: bool ``[B]``, rows that must not generate (batch padding).
          copies: :meth:`split`'s output for ``state``, or ``None`` to take the per-layer weights here.
          greedy: every row is greedy (``temperature == 0``): the program takes the argmax and holds no
            sampling (whose top-p search reads the vocabulary ~30 times per step) in a branch.
        Returns:
          ``(tokens [B, out_len], lengths [B], cache)``: row ``i``'s answer is ``tokens[i, :lengths[i]]``
          (stop token excluded); with stacked adapters every output has a leading K axis.
        """
        self.traces["decode"] += 1
        max_new = knobs["max_new_tokens"]
        model = nnx.merge(self.graphdef, state)
        stacked = lora_scale is not None and lora_scale.ndim == 1
        # K stacked adapters: the per-candidate work of a step runs under vmap *inside* one loop, so that the
        # loop's condition (every row of every candidate stopped) is one scalar; a vmap around the whole loop
        # would select every carried buffer (all the KV caches) between old and new on every step.
        # Per-layer weights: as stored where split (GPUs), else slices made once per call, unless kept from an
        # earlier one (CPUs); a stacked cache scans the stacked weights instead
        n = model.config.num_layers
        base = None
        if not cache.stacked:
            base = model.layers.per_layer() if copies is None else list(copies[0])
        # the adapters in the compute dtype, each input's `a` matrices joined (group_adapters): once per call,
        # not on every step, where XLA would otherwise cast and concatenate them (a no-op on readied ones);
        # readied for split layers, they come as a list of per-layer pieces
        per_layer = isinstance(lora_weights, list)
        if lora_weights is not None and not per_layer:
            lora_weights = group_adapters(lora_weights, model.dtype)
        adapter = lora_weights
        if lora_weights is not None and not cache.stacked and not per_layer:
            slices = functools.partial(unstack_layers, num_layers=n)
            adapter = jax.vmap(slices)(lora_weights) if stacked else slices(lora_weights)
        # the head taken inside the loop (None: model.head's own), where the compiler folds a tied embedding's
        # transpose into the matmul; taken once per call outside the loop, the transpose is a copy of the table
        head_kernel = None if copies is None else copies[1]
        if copies is None and self.cpu_tricks:
            head_kernel = cpu_decode.head_once_per_call(model.head_kernel())

        def forward(cache: KVCache, token: jax.Array, finished: jax.Array, adapter: Any,
                    scale: Any) -> tuple[jax.Array, KVCache]:
            """One candidate's next-token logits ``[B, V]`` and its updated cache."""
            lora = None if scale is None else LoraInputs(weights=adapter if cache.stacked else {}, scale=scale)
            layers = None if cache.stacked else list(zip(base, adapter if adapter is not None else [None] * n,
                                                         strict=True))
            fed = jnp.where(finished, knobs["pad_id"], token)
            x, cache = model.extend(fed[:, None], None, cache, lora=lora, layers=layers)
            return model.head(x[:, 0], head_kernel), self._constrain_cache(cache)

        def row_key(seed: jax.Array, row: jax.Array, step: jax.Array) -> jax.Array:
            return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), row)

        def sample(lg: jax.Array, step: jax.Array) -> jax.Array:  # every candidate draws the same numbers
            if greedy:
                return greedy_step(lg.astype(jnp.float32))
            keys = jax.vmap(row_key, in_axes=(0, 0, None))(knobs["seed"], knobs["row"], step)
            return sample_step(lg, keys, knobs["temperature"], knobs["top_k"], knobs["top_p"], knobs["min_p"])

        def record(step: jax.Array, token: jax.Array, out: jax.Array, lengths: jax.Array,
                   finished: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            active = ~finished
            stop = jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
            out = jax.lax.dynamic_update_slice(out, jnp.where(active, token, -1)[:, None], (0, step))
            lengths = lengths + (active & ~stop).astype(jnp.int32)
            return out, lengths, finished | stop

        fwd, smp, rec = forward, sample, record
        if stacked:
            # the candidates' caches fill in step (their prompts are the same rows, so their prefill indices
            # are equal): one shared slot index keeps each write an in-place update of a slice (a per-candidate
            # index would turn it into a scatter over the whole buffer)
            cache = dataclasses.replace(cache, index=cache.index[0])
            axes = KVCache(k=0, v=0, valid=0, positions=0, index=None, keys_transposed=cache.keys_transposed)
            fwd = jax.vmap(forward, in_axes=(axes, 0, 0, 0, 0), out_axes=(0, axes))
            smp, rec = jax.vmap(sample, in_axes=(0, None)), jax.vmap(record, in_axes=(None, 0, 0, 0, 0))
        lead, b = logits.shape[:-2], logits.shape[-2]  # lead: (K,) with stacked adapters
        first = smp(logits, jnp.int32(0))
        out0 = jnp.full((*lead, b, out_len), -1, jnp.int32)
        out0, lengths0, done0 = rec(0, first, out0, jnp.zeros((*lead, b), jnp.int32), jnp.broadcast_to(done, (*lead, b)))

        def cond(carry: tuple[Any, ...]) -> jax.Array:
            step, _, _, _, finished, _ = carry
            return (step < max_new) & ~jnp.all(finished)

        def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
            step, token, out, lengths, finished, cache = carry
            lg, cache = fwd(cache, token, finished, adapter, lora_scale)
            nxt = smp(lg, step)
            out, lengths, finished = rec(step, nxt, out, lengths, finished)
            return step + 1, nxt, out, lengths, finished, cache

        carry = (jnp.int32(1), first, out0, lengths0, done0, cache)
        _, _, out, lengths, _, cache = jax.lax.while_loop(cond, body, carry)
        if stacked:  # the cache goes out as it came in (one index per candidate), so its buffers are donated
            cache = dataclasses.replace(cache, index=jnp.broadcast_to(cache.index, lead))
        return out, lengths, cache

    # -- ahead-of-time lowering --------------------------------------------------------------------

    def _abstract(self, shape: tuple[int, ...], dtype: Any, logical: tuple[str | None, ...] | None) -> Any:
        """A ``ShapeDtypeStruct`` placed as the driver places the real array (``logical`` axes, or
        replicated when ``None``)."""
        if self.mesh is None:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._sharding(shape, logical))

    def lower(self, state: Any, *, batch: int, prompt_len: int, max_new_tokens: int,
              adapters: Any = None, greedy: bool = False) -> dict[str, Any]:
        """Lower (without compiling or running) the prefill and decode programs of a generation of ``batch``
        prompts of up to ``prompt_len`` tokens and ``max_new_tokens`` new tokens, at the buckets
        :meth:`generate` uses.

        Args:
          state: the model's ``nnx`` state; real arrays or ``jax.ShapeDtypeStruct`` leaves with shardings
            (an abstract model, see :meth:`~seal_jax.lm.api.LM.abstract`).
          adapters: ``None`` or stacked adapters (``.weights`` leaves ``[K, L, ...]``, ``.scale`` ``[K]``),
            real or abstract.
          greedy: the decode program of greedy sampling (``temperature == 0``), as :meth:`generate` runs it.
        Returns:
          ``{"prefill": jax.stages.Lowered, "decode": jax.stages.Lowered}``.
        """
        b = batch_bucket(batch, self.mesh, stacked=stacked_count(None if adapters is None else adapters.scale))
        t = tok.bucket(prompt_len)
        out_len = tok.bucket(max_new_tokens)
        lw, ls = (None, None) if adapters is None else (adapters.weights, adapters.scale)
        if lw is not None:  # replicated, unless shapes placed already (readied adapters: LM.abstract_adapters)
            lw, ls = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
                                  else self._abstract(x.shape, x.dtype, None), (lw, ls))
        ids = self._abstract((b, t), jnp.int32, ("batch", None))
        prefill = self.prefill_program(state, ids, lw, ls, t + out_len).lower(state, ids, ids, lw, ls,
                                                                                 cache_len=t + out_len)
        logits, cache = self._prefill_shapes(state, ids, lw, ls, t + out_len)
        lead = (None,) if ls is not None and ls.ndim == 1 else ()
        keys, values = cache_axes(cache)
        laid_out = self._cache_formats(cache, bool(lead))  # as the prefill's output lies
        if laid_out is None:
            k = jax.tree.map(lambda x: self._abstract(x.shape, x.dtype, lead + keys), cache.k)
            v = jax.tree.map(lambda x: self._abstract(x.shape, x.dtype, lead + values), cache.v)
        else:
            k, v = (jax.tree.map(lambda x, f: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=f), xs, fs)
                    for xs, fs in ((cache.k, laid_out.k), (cache.v, laid_out.v)))
        cache = KVCache(
            k=k, v=v,
            valid=self._abstract(cache.valid.shape, cache.valid.dtype, lead + ("batch", "length")),
            positions=self._abstract(cache.positions.shape, cache.positions.dtype, lead + ("batch",)),
            index=self._abstract(cache.index.shape, cache.index.dtype, None), keys_transposed=cache.keys_transposed)
        logits = self._abstract(logits.shape, logits.dtype, lead + ("batch", None))
        knobs = {name: self._abstract(x.shape, x.dtype, None) for name, x in knob_arrays(SamplingParams(), 0, b).items()}
        stop_ids = self._abstract((MIN_STOP_SLOTS,), jnp.int32, None)
        done = self._abstract((b,), jnp.bool_, ("batch",))
        decode = self.decode_program(cache).lower(state, cache, logits, lw, ls, knobs, stop_ids, done, None,
                                                  out_len=out_len, greedy=greedy)
        return {"prefill": prefill, "decode": decode}

    # -- the host-side driver ----------------------------------------------------------------------

    def generate(self, state: Any, config: ModelConfig, prompt_ids: Sequence[Sequence[int]],
                 params: SamplingParams, *, eos_ids: Sequence[int] = (), pad_id: int = 0,
                 adapters: Any = None, copies: Any = None, seeds: Sequence[int] | None = None,
                 timings: dict[str, float] | None = None) -> list[list[int]] | list[list[list[int]]]:
        """Generate token ids for ``prompt_ids`` (validated by the caller); see the module docstring.

        Args:
          state: the model's ``nnx`` state (weights).
          config: the model's config.
          prompt_ids: B non-empty id lists.
          params: the sampling parameters.
          eos_ids: ids that end a row unless ``params.ignore_eos``.
          pad_id: id used for padding (any valid id; padding is masked).
          adapters: ``None``, one adapter or K stacked (see :func:`as_lora`).
          copies: :meth:`split`'s output for ``state`` (kept by the caller), or ``None``.
          seeds: one seed per prompt (see "Randomness" in the module docstring), or ``None``: ``params.seed``.
          timings: if a dict, the call waits for the prefill program before starting the decode program and
            stores ``prefill_s`` and ``decode_s`` (wall seconds, the decode's up to its tokens on the host).
        Returns:
          B lists of generated ids (stop token excluded), or K such lists with stacked adapters.
        """
        lora = as_lora(adapters, config)
        n = len(prompt_ids)
        b = batch_bucket(n, self.mesh, stacked=stacked_count(None if lora is None else lora.scale))
        t = tok.bucket(max(len(p) for p in prompt_ids))
        out_len = tok.bucket(params.max_new_tokens)
        rows = [list(p) for p in prompt_ids] + [[pad_id]] * (b - n)
        ids, mask = tok.pad_left(rows, pad_id, t)
        done = np.arange(b) >= n

        stops = sorted({*params.stop_token_ids, *(() if params.ignore_eos else eos_ids)})
        slots = max(MIN_STOP_SLOTS, _pow2(len(stops)))
        stop_ids = np.full((slots,), -1, np.int32)
        stop_ids[:len(stops)] = stops

        knobs = knob_arrays(params, pad_id, b, seeds)
        lw, ls = None, None
        if lora is not None and lora.ready:  # (placed as readied, in their layout)
            lw, ls = lora.weights, self.put_replicated(lora.scale)
        elif lora is not None:
            lw, ls = self.put_replicated((lora.weights, lora.scale))
        start = time.perf_counter()
        ids, mask = self.put_batch(ids), self.put_batch(mask)
        prefill = self.prefill_program(state, ids, lw, ls, t + out_len)
        logits, cache = prefill(state, ids, mask, lw, ls, cache_len=t + out_len)
        if timings is not None:
            jax.block_until_ready(cache)
            timings["prefill_s"] = time.perf_counter() - start
            start = time.perf_counter()
        decode = self.decode_program(cache)
        tokens, lengths, _ = decode(state, cache, logits, lw, ls, self.put_replicated(knobs),
                                    self.put_replicated(jnp.asarray(stop_ids)), self.put_batch(done), copies,
                                    out_len=out_len, greedy=bool(params.temperature == 0))
        tokens, lengths = shd.to_host(tokens), shd.to_host(lengths)
        if timings is not None:
            timings["decode_s"] = time.perf_counter() - start

        def rows_of(tk: np.ndarray, ln: np.ndarray) -> list[list[int]]:
            return [tk[i, :ln[i]].tolist() for i in range(n)]

        if lora is not None and lora.stacked:
            return [rows_of(tokens[k], lengths[k]) for k in range(tokens.shape[0])]
        return rows_of(tokens, lengths)
