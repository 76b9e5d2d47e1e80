"""Memory layouts: how the weights and the KV cache lie in a TPU's memory.

An array's *layout* is the order of its dimensions in memory (JAX's :class:`~jax.experimental.layout.Layout`,
``major_to_minor``), apart from its logical shape, which every program and test sees unchanged. An entry
argument whose layout is not the one a TPU program reads makes libtpu copy it into that layout on every call
(a temporary as large as the argument). Three did so, measured with ``seal-jax compile`` for Qwen3-8B on
``tpu-v5p-8`` (``data=1,tensor=4``; BENCHMARKS.md, eighteenth and twenty-seventh sessions):

- **Weights.** A decode step multiplies a few rows by each weight. For the key and value projections and the
  output head libtpu reads the weight with its *input* (contracted) dimension minor-most — the order in which
  Hugging Face stores it — and copied them into that order on every call (``ParamDecl.tpu_input_minor``). The
  query projection is left in the default order: the decode under stacked adapters reads it so, and copied it
  back otherwise. The "lite" chips (v5e, v6e) keep the key and value projections in the default order: there
  the copy is smaller than what reading them input-minor adds to every decode step (1.8% of its bytes).
  Nor does a weight whose input-minor order would pad it to more memory tiles (a toy model's widths).
- **The KV cache.** The decode writes one slot of every row per step. libtpu keeps the cache with the batch
  next to the head dimension (the slots major), so that a step's writes fill whole tiles; the prefill wrote
  it in the default order and the decode copied it in and out on every call (:func:`cache_layout`).
- **Readied adapters** (``LM.ready_adapters``, K stacked ``[K, L, ...]``). The decode scans the layers and
  reads each layer's slice of every candidate's adapters: libtpu keeps them layer-major, and copied all of
  them into that order on every call (0.79 GB for the templates config's 15 adapters of rank 64, 13% of
  its arguments); the readying program writes them so (:func:`adapter_layout`).

Only TPUs get these layouts (the platform of the mesh's devices, :func:`seal_jax.lm.sharding.platform`), and
only under a mesh (the engine places nothing itself without one); CPUs and GPUs keep the default row-major
layouts. The weights are laid out once, as the model is built
(``LM``), and the prefill writes the cache in the layout that the decode reads and returns. (A training
call on another layout of the devices, ``train_mesh``, places its copy of the weights in the default
layouts, as it places them anyway.)
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental.layout import Format, Layout

from seal_jax.lm.params import BY_PATH

# the platforms whose programs get these layouts (the others keep the default, row-major ones)
LAID_OUT = ("tpu",)
# device kinds (a word of JAX's device_kind) whose decode reads the projections faster in the default order
PROJECTIONS_IN_DEFAULT_ORDER = ("lite",)
# major → minor: the order of a TPU KV cache's dimensions in memory (a decode step writes one `length` slot
# of every `batch` row: batch next to head_dim fills whole tiles)
TPU_CACHE_ORDER = ("layers", "length", "candidates", "kv_heads", "batch", "head_dim")
# the dimensions of one layer's keys or values as the engine shapes them
CACHE_DIMS = ("batch", "kv_heads", "length", "head_dim")


def weight_layout(platform: str, path: str, shape: tuple[int, ...], itemsize: int = 2,
                  device_kind: str = "") -> Layout | None:
    """The layout of the weight at ``path`` (dotted, as in :data:`~seal_jax.lm.params.PARAMS`) whose array on
    one device has ``shape`` (a per-layer one's without the layer axis when split) and elements of
    ``itemsize`` bytes, on ``platform`` and chips of ``device_kind`` (``sharding.device_kind``), or ``None``
    for the default. On a TPU, a weight declared ``tpu_input_minor`` has its input dimension minor-most (a
    lite chip's projections excepted), unless that would pad it to more memory tiles than the default order
    does (small widths, as in tests' toy models)."""
    decl = BY_PATH.get(path)
    if platform not in LAID_OUT or decl is None or not decl.tpu_input_minor or len(shape) < 2:
        return None
    if decl.per_layer and any(kind in device_kind.lower() for kind in PROJECTIONS_IN_DEFAULT_ORDER):
        return None
    rows, cols = shape[-2:]
    if _tiled(cols, rows, itemsize) > _tiled(rows, cols, itemsize):
        return None
    n = len(shape)
    return Layout((*range(n - 2), n - 1, n - 2))


def _tiled(second_minor: int, minor: int, itemsize: int) -> int:
    """Elements of a matrix in a TPU's memory, padded to whole tiles (8 rows of 32-bit words × 128: 16 rows
    of bfloat16)."""
    rows = 8 * max(1, 4 // itemsize)
    return -(-second_minor // rows) * rows * -(-minor // 128) * 128


def cache_layout(platform: str, lead: tuple[str, ...]) -> Layout | None:
    """The layout of a KV-cache buffer (keys or values: ``[*lead, B, KVH, S, Dh]``, ``lead`` naming the
    leading axes, e.g. ``("candidates", "layers")``) on ``platform``, or ``None`` for the default."""
    if platform not in LAID_OUT:
        return None
    dims = (*lead, *CACHE_DIMS)
    unknown = set(lead) - set(TPU_CACHE_ORDER)
    if unknown:
        raise ValueError(f"unknown cache axes {sorted(unknown)}; known: {TPU_CACHE_ORDER}")
    return Layout(tuple(dims.index(name) for name in TPU_CACHE_ORDER if name in dims))


def adapter_layout(platform: str, shape: tuple[int, ...], itemsize: int = 2) -> Layout | None:
    """The layout of a leaf of readied stacked adapters (``[K, L, rows, cols]``: an ``a`` ``[in, r]`` or a
    ``b`` ``[r, out]`` of every layer and candidate) on ``platform``, or ``None`` for the default: on a TPU
    the layers major, then the candidates, then the matrix, its rank dimension major where a rank narrower
    than a tile would pad it (an ``a`` of rank 32, say; libtpu reads it so)."""
    if platform not in LAID_OUT or len(shape) != 4:
        return None
    rows, cols = shape[-2:]
    if _tiled(cols, rows, itemsize) < _tiled(rows, cols, itemsize):
        return Layout((1, 0, 3, 2))
    return Layout((1, 0, 2, 3))


def place(x: Any, layout: Layout | None) -> Any:
    """``x`` (an array, or a ``jax.ShapeDtypeStruct`` with a sharding) in ``layout``, on the devices and in
    the sharding it has (unchanged for ``None``, or where it already has that layout)."""
    if layout is None:
        return x
    sharding = x.sharding
    if isinstance(x, jax.ShapeDtypeStruct):
        if sharding is None:  # (a shape placed nowhere: its programs are lowered for one device, as it is)
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=Format(layout, sharding))
    if x.format.layout is not None and x.format.layout.major_to_minor == layout.major_to_minor:
        return x
    return jax.device_put(x, Format(layout, sharding))
