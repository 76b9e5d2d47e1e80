"""What decoding does on a CPU and nowhere else: the tricks that earned their keep on XLA:CPU.

One switch decides them, :func:`applies`, from the platform of the mesh's devices (never the host's); the
:class:`~seal_jax.lm.sampling.Sampler` asks it once. On TPUs and GPUs none of this runs and none of it
appears in their programs (``tests/test_aot.py`` checks the compiled TPU decode).

- **Kept weight copies.** A decode call slices the stacked ``[L, ...]`` weights into per-layer arrays
  (and lays a tied embedding out as a ``[D, V]`` head), which copies every weight once per call. For the
  135M bundled model on two CPU cores, making these copies once per model instead made 128-token
  generations ~5% (batch 8) to ~10% (batch 1) faster (BENCHMARKS.md, run 5). ``LM`` keeps them
  (:func:`weight_copies`) when the weights take at most :data:`KEEP_WEIGHT_COPIES_MAX_BYTES`
  (:func:`keeps_weight_copies`); the price is a second copy of the weights in host memory.
- **Column blocks.** The kept copies of the projections that run alone (:data:`COLUMN_BLOCKED`) and of the
  head are cut into :data:`COLUMN_BLOCKS` column blocks (:class:`ColumnBlocks`): XLA:CPU runs independent
  matmuls on different cores at once (two ``[8, 576] @ [576, 1536]`` side by side read ~33 GB/s together)
  but shares one matmul between cores less well (~24 GB/s), while q/k/v and gate/up already come in
  independent groups. On the bundled model this made batch-8 generations ~3.5% and batch-32 ones ~8%
  faster, batch 1 about the same (BENCHMARKS.md, run 6); the tokens do not change. A :class:`ColumnBlocks`
  multiplies like the kernel it was cut from (``x @ blocks``), so the model's code does not know of it.
- **Keys stored transposed.** The per-layer KV cache keeps its keys ``[B, KVH, Dh, S]`` (the sampler asks
  ``Decoder.prefill`` for ``keys_transposed``), so that both attention matmuls of a decode step are plain
  batched matmuls, which XLA:CPU runs about 4x faster with one new token than the einsum over keys laid out
  as the values. Compiled for ``h100-8`` (Qwen3-8B), the layout makes no difference to the GPU decode
  (the same bytes and roofline either way), so the GPU keeps the values' layout like the TPU.
- **A head laid out once per call.** Without kept copies, the ``[D, V]`` view of a tied embedding is
  materialised once per call behind an ``optimization_barrier`` (:func:`head_once_per_call`): XLA:CPU reads
  the transposed view ~15% slower at batch 8, and the barrier keeps it from folding the transpose back into
  the matmul.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KEEP_WEIGHT_COPIES_MAX_BYTES = 4 << 30  # see "Kept weight copies" in the module docstring
COLUMN_BLOCKS = 2  # column blocks of the kept copies of COLUMN_BLOCKED and of the head (module docstring)
COLUMN_BLOCKED = ("o_proj", "down_proj")


def applies(platform: str) -> bool:
    """The one switch: whether the CPU tricks apply to programs for ``platform`` (that of the mesh's devices,
    :func:`~seal_jax.lm.sharding.platform`)."""
    return platform == "cpu"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ColumnBlocks:
    """A kernel ``[in, out]`` kept as column blocks ``[in, out_i]`` (in order), each its own array;
    ``x @ blocks`` runs one independent matmul per block and concatenates the results (``[..., out]``)."""

    blocks: tuple[jax.Array, ...]

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([x @ block for block in self.blocks], axis=-1)

    def __len__(self) -> int:
        return len(self.blocks)


def split_columns(kernel: jax.Array, blocks: int) -> ColumnBlocks:
    """``kernel`` ``[in, out]`` cut into ``blocks`` column blocks (widths differ by at most one column)."""
    if blocks < 1:
        raise ValueError(f"split_columns needs at least one block, got {blocks}")
    out = kernel.shape[-1]
    edges = [i * out // blocks for i in range(blocks + 1)]
    return ColumnBlocks(tuple(kernel[:, lo:hi] for lo, hi in zip(edges[:-1], edges[1:], strict=True)))


def keeps_weight_copies(state: Any, platform: str) -> bool:
    """Whether ``LM`` should keep :func:`weight_copies` for ``state`` (an ``nnx`` state) on ``platform``: when
    the tricks apply and the weights take at most :data:`KEEP_WEIGHT_COPIES_MAX_BYTES`."""
    leaves = jax.tree.leaves(state)
    if not applies(platform) or not leaves:
        return False
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves) <= KEEP_WEIGHT_COPIES_MAX_BYTES


def weight_copies(layers: list[dict[str, jax.Array]], head: jax.Array) -> tuple[tuple[dict[str, Any], ...], ColumnBlocks]:
    """The kept copies: per layer its weights (``layers``, already sliced) with the :data:`COLUMN_BLOCKED`
    projections in column blocks, and the head ``[D, V]`` in column blocks."""
    blocked = tuple({name: split_columns(w, COLUMN_BLOCKS) if name in COLUMN_BLOCKED else w
                     for name, w in layer.items()} for layer in layers)
    return blocked, split_columns(head, COLUMN_BLOCKS)


def head_once_per_call(head: jax.Array) -> jax.Array:
    """The head kernel ``[D, V]`` materialised once per decode call (see the module docstring)."""
    return jax.lax.optimization_barrier(head)
