"""Capacity planner: will a model, mesh and self-edit workload fit on an accelerator, and how fast will it run?

``seal-jax plan --model qwen3-8b --mesh data=2,fsdp=4,tensor=1 --candidates 4 --seq-len 2048`` prints, per
device and for each hardware in :data:`HARDWARE`:

* **bytes** — base weights (sharded exactly as :mod:`seal_jax.lm.sharding` places them: the real
  :func:`~seal_jax.lm.params.param_axes` and :data:`~seal_jax.lm.sharding.RULES` through
  :func:`~seal_jax.lm.sharding.spec_for`), LoRA adapters and AdamW state (float32, kept on the lanes that
  train them: a device holds its lanes' candidates, see ``lanes.LanePlan``), per-lane
  gradient accumulators, training activations (per ``Decoder(remat=...)``: "none" keeps every layer's
  intermediates, "minimal" each layer's input and projection outputs, "full" only each layer's input
  ``[B, T, D]``; the last two recompute one layer's rest at a time), the chunked cross-entropy and the sampling KV cache ``[K, L, B, S, KVH, Dh]`` (batch over ``data``, KV heads over
  ``tensor``);
* **time** — a roofline estimate of one training micro-step (all candidate lanes), one prefill and one
  decode step: the largest of compute (FLOPs / the dtype's peak matmul FLOP/s:
  bf16, or for float32 TF32 on NVIDIA GPUs and one bf16 pass on TPUs), memory (bytes / HBM bandwidth) and
  communication (bytes / interconnect bandwidth); latency, kernel efficiency and overlap are ignored, so
  real steps are slower;
* **verdict** — whether the peak of training and sampling fits in :data:`USABLE_FRACTION` of HBM.

Activation bytes are an estimate of what XLA keeps (on TPUs and GPUs attention runs in a fused kernel,
``attention.splash_attention`` / ``attention.triton_attention``, which keeps no attention scores in HBM;
the einsum of sequences under one 128-token tile and the "chunked" fallback are not modelled),
not a measurement; the weights, LoRA and KV-cache bytes are exact for the arrays the code
allocates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seal_jax.lm.attention import KERNEL_BLOCK, TRITON_BACKWARD_BLOCK, causal_share, head_axes
from seal_jax.lm.config import PRESETS, ModelConfig, from_hf, preset
from seal_jax.lm.cross_entropy import chunk_length
from seal_jax.lm.model import layer_storage_for, train_layers_for
from seal_jax.lm.params import param_axes, param_shapes, projection_shape
from seal_jax.lm.sampling import batch_bucket
from seal_jax.lm.sharding import MESH_AXES, MeshError, parse_mesh_spec, spec_for
from seal_jax.lm.types import PROJECTIONS, REMAT_POLICIES, remat_name

DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4}
LORA_BYTES = 4  # adapters, gradients and AdamW moments are float32 (seal_jax.lm.lora / training)
USABLE_FRACTION = 0.9  # of HBM: the rest is left to the runtime, XLA's scratch buffers and fragmentation


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Published peak figures of one accelerator chip (per chip, dense, no sparsity).

    Attributes:
      name: the key in :data:`HARDWARE`.
      bf16_flops: peak dense bf16 matmul FLOP/s (float16 runs at the same peak).
      fp32_flops: peak dense float32 matmul FLOP/s at JAX's default matmul precision, which the engine keeps
        (it sets no ``jax_default_matmul_precision``): TF32 tensor cores on NVIDIA GPUs, one bf16 pass on a
        TPU's MXU (so a TPU's figure is its bf16 peak).
      hbm_bytes: HBM capacity in bytes.
      hbm_bandwidth: HBM bandwidth in bytes/s.
      link_bandwidth: chip-to-chip bandwidth in bytes/s, bidirectional, as published (NVLink / ICI);
        collectives are estimated at half of it (one direction).
      link: the interconnect's name.
      chips_per_host: accelerators per host (for the number of processes to launch).
      source: where the figures come from.
    """

    name: str
    bf16_flops: float
    fp32_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    link_bandwidth: float
    link: str
    chips_per_host: int
    source: str

    @property
    def platform(self) -> str:
        """``"tpu"`` or ``"gpu"``."""
        return "tpu" if self.name.startswith("tpu") else "gpu"

    def matmul_flops(self, dtype: str) -> float:
        """Peak dense matmul FLOP/s for weights and activations of ``dtype`` (a key of :data:`DTYPE_BYTES`)."""
        return self.fp32_flops if DTYPE_BYTES[dtype] == 4 else self.bf16_flops

    def peak_name(self, dtype: str) -> str:
        """Which peak :meth:`matmul_flops` takes for ``dtype``."""
        if DTYPE_BYTES[dtype] != 4:
            return "bf16"
        return "TF32" if self.platform == "gpu" else "bf16 one-pass"  # JAX's default precision on the MXU


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware(
        "h100", bf16_flops=989e12, fp32_flops=494.7e12, hbm_bytes=80e9, hbm_bandwidth=3.35e12, link_bandwidth=900e9,
        link="NVLink 4", chips_per_host=8,
        source="NVIDIA H100 Tensor Core GPU datasheet, SXM5: BF16 1,979 TFLOPS with sparsity (989 dense), TF32 989 "
               "with sparsity (494.7 dense), "
               "80 GB HBM3, 3.35 TB/s, NVLink 900 GB/s"),
    "h200": Hardware(
        "h200", bf16_flops=989e12, fp32_flops=494.7e12, hbm_bytes=141e9, hbm_bandwidth=4.8e12, link_bandwidth=900e9,
        link="NVLink 4", chips_per_host=8,
        source="NVIDIA H200 Tensor Core GPU datasheet, SXM: BF16 1,979 TFLOPS with sparsity (989 dense), TF32 989 "
               "with sparsity (494.7 dense), "
               "141 GB HBM3e, 4.8 TB/s, NVLink 900 GB/s"),
    "tpu-v5e": Hardware(
        "tpu-v5e", bf16_flops=197e12, fp32_flops=197e12, hbm_bytes=16e9, hbm_bandwidth=819e9, link_bandwidth=400e9,
        link="ICI", chips_per_host=8,
        source="Google Cloud TPU v5e documentation (cloud.google.com/tpu/docs/v5e): 197 TFLOPS bf16, "
               "16 GB HBM2 at 819 GBps, bidirectional ICI 400 GBps (1,600 Gbps) per chip; 8 chips per host"),
    "tpu-v5p": Hardware(
        "tpu-v5p", bf16_flops=459e12, fp32_flops=459e12, hbm_bytes=95e9, hbm_bandwidth=2765e9, link_bandwidth=1200e9,
        link="ICI", chips_per_host=4,
        source="Google Cloud TPU v5p documentation (cloud.google.com/tpu/docs/v5p): 459 TFLOPS bf16, "
               "95 GB HBM2e at 2,765 GBps, bidirectional ICI 1,200 GBps (4,800 Gbps) per chip; 4 chips per host"),
    "tpu-v6e": Hardware(
        "tpu-v6e", bf16_flops=918e12, fp32_flops=918e12, hbm_bytes=32e9, hbm_bandwidth=1640e9, link_bandwidth=448e9,
        link="ICI", chips_per_host=8,
        source="Google Cloud TPU v6e (Trillium) documentation (cloud.google.com/tpu/docs/v6e): 918 TFLOPS bf16, "
               "32 GB HBM at 1,640 GBps, ICI 3,584 Gbps (448 GBps) per chip"),
    "a100-80g": Hardware(
        "a100-80g", bf16_flops=312e12, fp32_flops=156e12, hbm_bytes=80e9, hbm_bandwidth=2.039e12, link_bandwidth=600e9,
        link="NVLink 3", chips_per_host=8,
        source="NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM: BF16 312 TFLOPS dense, TF32 156 dense, 80 GB HBM2e, "
               "2,039 GB/s, NVLink 600 GB/s"),
}


class PlanError(ValueError):
    """A planning request that cannot be evaluated (unknown model or hardware, bad mesh or sizes)."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """What runs on the mesh.

    Attributes:
      candidates: K LoRA candidates trained together (the lanes of the trainer; on ``data``).
      seq_len: T, the padded training sequence length.
      batch: training micro-batch per candidate (SEAL: 1).
      sample_batch: prompts per candidate when sampling with K stacked adapters (e.g. a passage's questions).
      dtype: weights and activations (``bfloat16`` on accelerators).
      lora_rank: adapter rank (padded rank of all candidates).
      lora_targets: adapted projections.
      remat: what training keeps per layer for the backward pass (``LM.load(remat=...)``): "minimal"
        (the projections' outputs), "full" (the layer input) or "none"; a bool means "full" / "none".
      cache_len: S, KV-cache slots when sampling (prompt + new tokens; default ``seq_len``).
      prompt_len: P, the padded prompt that prefill runs over (default ``cache_len``: the bound).
      train_layers: how training runs the layers (``Decoder.train_layers``: "scan" or "unrolled"), or None
        for the platform's choice (unrolled on GPUs, where each training call holds a per-layer copy of
        the layer weights).
    """

    candidates: int = 5
    seq_len: int = 2048
    batch: int = 1
    sample_batch: int = 8
    dtype: str = "bfloat16"
    lora_rank: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    remat: str | bool = "minimal"
    cache_len: int | None = None
    prompt_len: int | None = None
    train_layers: str | None = None

    @property
    def cache_slots(self) -> int:
        """S: ``cache_len`` or, if unset, ``seq_len``."""
        return self.seq_len if self.cache_len is None else self.cache_len

    @property
    def prompt_tokens(self) -> int:
        """P: ``prompt_len`` or, if unset, the cache slots."""
        return self.cache_slots if self.prompt_len is None else self.prompt_len

    def __post_init__(self) -> None:
        for name in ("cache_len", "prompt_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PlanError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("candidates", "seq_len", "batch", "sample_batch", "lora_rank"):
            if int(getattr(self, name)) < 1:
                raise PlanError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.prompt_len is not None and self.prompt_len > self.cache_slots:
            cache = (f"cache_len {self.cache_len}" if self.cache_len is not None
                     else f"cache_len {self.cache_slots} (the default: seq_len)")
            raise PlanError(f"prompt_len {self.prompt_len} exceeds {cache}: the prompt fills the KV cache, so "
                            f"raise --cache-len to {self.prompt_len} + the new tokens or lower "
                            "--prompt-len")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"unknown dtype {self.dtype!r}; choose from {sorted(DTYPE_BYTES)}")
        try:
            remat_name(self.remat)
        except ValueError as e:
            raise PlanError(str(e)) from None
        unknown = [t for t in self.lora_targets if t not in PROJECTIONS]
        if unknown or not self.lora_targets:
            raise PlanError(f"unknown LoRA targets {unknown or '(none)'}; choose from {list(PROJECTIONS)}")


@dataclasses.dataclass(frozen=True)
class _MeshShape:
    """Stands in for a :class:`jax.sharding.Mesh` in :func:`spec_for` (only ``.shape`` is read)."""

    shape: Mapping[str, int]


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"data=2,fsdp=4,tensor=1"`` -> ``{"data": 2, "fsdp": 4, "tensor": 1}`` (missing axes are 1).

    Unlike :func:`seal_jax.lm.sharding.make_mesh` there are no devices to fill a ``-1`` axis, so every
    size must be given. Raises :class:`PlanError` naming the problem.
    """
    try:
        sizes = parse_mesh_spec(spec)
    except MeshError as e:
        raise PlanError(str(e)) from None
    if any(v == -1 for v in sizes.values()):
        raise PlanError(f"mesh {spec!r}: the planner has no devices to fill a -1 axis; give every size, "
                        "e.g. 'data=2,fsdp=4,tensor=1'")
    return sizes


def shard_shape(shape: Sequence[int], logical: Sequence[str | None], mesh: Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape of an array with ``logical`` axis names on a mesh of ``mesh`` sizes (real rules)."""
    spec = spec_for(_MeshShape(mesh), logical, shape)  # type: ignore[arg-type]

    def ways(entry: str | tuple[str, ...] | None) -> int:
        return 1 if entry is None else mesh[entry] if isinstance(entry, str) else math.prod(mesh[a] for a in entry)

    return tuple(n // ways(a) for n, a in zip(shape, tuple(spec), strict=True))


def weight_bytes_per_device(config: ModelConfig, mesh: Mapping[str, int], dtype: str) -> int:
    """Bytes of base weights on one device: every parameter of ``param_shapes(config)`` sharded by
    :func:`~seal_jax.lm.params.param_axes` and :data:`RULES` (a dimension that does not divide is replicated)."""
    total = 0
    for path, shape in param_shapes(config).items():
        total += math.prod(shard_shape(shape, param_axes(path, config), mesh))
    return total * DTYPE_BYTES[dtype]


def layer_weight_bytes_per_device(config: ModelConfig, mesh: Mapping[str, int], dtype: str) -> int:
    """Bytes of the decoder layers' weights on one device (the stacked ``layers.*`` parameters)."""
    return sum(math.prod(shard_shape(shape, param_axes(path, config), mesh))
               for path, shape in param_shapes(config).items() if path.startswith("layers.")) * DTYPE_BYTES[dtype]


def lora_parameters(config: ModelConfig, rank: int, targets: Sequence[str]) -> int:
    """Parameters of one adapter: ``L * rank * (in + out)`` summed over the adapted projections."""
    return sum(config.num_layers * rank * sum(projection_shape(config, t)) for t in targets)


def lanes_per_device(candidates: int, batch: int, mesh: Mapping[str, int]) -> tuple[int, int]:
    """``(lanes, rows)``: the candidate lanes each device computes and the micro-batch rows of each, as the
    trainer splits the ``data`` axis (:func:`~seal_jax.lm.training.data_layout`): K / data lanes of
    ``batch`` rows when K divides by ``data``; else all K lanes of ``batch / data`` rows when the batch
    divides (data parallelism within a candidate); else the lanes padded to a multiple of ``data``.
    Candidates of equal length get one lane each (``lanes.assign_lanes``); unequal ones may share lanes,
    so K lanes is the upper bound."""
    d = mesh["data"]
    if candidates % d == 0:
        return candidates // d, batch
    if batch % d == 0:
        return candidates, batch // d
    return -(-candidates // d), batch


def matmul_parameters(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: every projection plus the output head."""
    per_layer = sum(math.prod(projection_shape(config, p)) for p in PROJECTIONS)
    return config.num_layers * per_layer + config.vocab_size * config.hidden_size


# matmuls of a fused attention kernel's backward pass over [query rows, keys, head size], on a TPU (splash's
# dq kernel 3, its dkv kernel 4) and a GPU (Triton's one kernel, 4 + 3), and the tiles they work on
# (seal_jax.hlo.ATTENTION_KERNELS)
KERNEL_BACKWARD_MATMULS = 7
KERNEL_BACKWARD_TILE = {"tpu": KERNEL_BLOCK, "gpu": TRITON_BACKWARD_BLOCK}


def attention_split(config: ModelConfig, mesh: Mapping[str, int], fsdp: bool = True) -> int:
    """How many ways the fused attention kernels split the heads (``attention.head_axes``): in training, over
    ``tensor`` or else ``fsdp``; in a generation's prefill (``fsdp=False``), over ``tensor`` as its cache."""
    return math.prod(mesh[a] for a in head_axes(mesh, config.num_kv_heads, fsdp))


def layer_activation_bytes(config: ModelConfig, rows: int, length: int, act: int, tensor: int,
                           split: int | None = None) -> int:
    """Estimated bytes one decoder layer keeps for its backward pass (``rows`` sequences of ``length``).

    Per token: the layer input, two norm outputs and the residual (``4 D``), q/k/v before and after
    norm+RoPE and the attention output (``3 q_dim + 4 kv_dim``), gate, up, silu and product (``4 F``) in the
    activation dtype. The fused attention kernel keeps no scores (it recomputes them in its backward pass).
    MLP widths are divided by ``tensor``, head and KV-head widths by ``split`` (the attention kernels' head
    split, :func:`attention_split`; default ``tensor``): the kernels' ``shard_map`` splits the heads over
    ``fsdp`` too, and the projections' outputs follow it.
    """
    c = config
    split = tensor if split is None else split
    per_token = act * 4 * c.hidden_size
    per_token += act * (3 * c.q_dim + 4 * c.kv_dim) // split + act * 4 * c.intermediate_size // tensor
    return rows * length * per_token


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device; ``train`` and ``sample`` are the two phases' totals (weights included)."""

    weights: int
    lora_params: int
    lora_state: int
    accumulators: int
    activations: int
    logits: int
    kv_cache: int
    prompt_kv: int
    prefill_mlp: int
    lanes: int
    train: int
    sample: int
    layer_copy: int = 0

    @property
    def peak(self) -> int:
        """The larger of the training and sampling totals."""
        return max(self.train, self.sample)


def memory_plan(config: ModelConfig, mesh: Mapping[str, int], w: Workload,
                platform: str | None = None) -> MemoryPlan:
    """Bytes per device of the base weights, the K-candidate LoRA trainer and the K-adapter sampler, on
    ``platform`` ("gpu", "tpu"; None: as a TPU or a CPU, where training scans the layers)."""
    act = DTYPE_BYTES[w.dtype]
    tensor = mesh["tensor"]
    weights = weight_bytes_per_device(config, mesh, w.dtype)
    p = lora_parameters(config, w.lora_rank, w.lora_targets)
    lanes, lane_rows = lanes_per_device(w.candidates, w.batch, mesh)
    slots = lanes  # each candidate's state lives on its lane (equal candidates: one per lane)
    # the adapters come and go in the lanes' layout (donated: one buffer), split over data with the lanes
    lora_params = slots * p * LORA_BYTES
    lora_state = 2 * slots * p * LORA_BYTES  # AdamW first and second moments
    accumulators = 2 * lanes * p * LORA_BYTES  # gradient accumulator + the fresh gradient, per lane
    rows = lanes * lane_rows
    t = w.seq_len
    split = attention_split(config, mesh)
    one_layer = layer_activation_bytes(config, rows, t, act, tensor, split)
    remat = remat_name(w.remat)
    if remat == "full":  # layer inputs for every layer, one layer's intermediates recomputed at a time
        activations = config.num_layers * rows * t * config.hidden_size * act + one_layer
    elif remat == "minimal":
        # per layer its input and the projection outputs that feed non-linear work (q, k, v, gate, up; the
        # o/down outputs only join the residual)
        saved = config.hidden_size + (config.q_dim + 2 * config.kv_dim) // split + 2 * config.intermediate_size // tensor
        activations = config.num_layers * rows * t * saved * act
    else:
        activations = config.num_layers * one_layer
    # the head, tied or not, is split over the vocabulary on fsdp x tensor (sharding.RULES["head_vocab"]), and
    # so are its logits (a vocabulary its axes do not divide is replicated: sharding.spec_for)
    vocab = shard_shape((config.vocab_size,), ("head_vocab",), mesh)[0]
    # the chunked cross-entropy (lm/cross_entropy.py): per lane one chunk's float32 logits and its softmax in
    # the activation dtype, and the loss's gradient direction [rows, T, D] kept for the backward pass; a tied
    # table whose vocabulary fsdp x tensor does not divide keeps its width split over fsdp, and its partial
    # logits are all-reduced (a second float32 buffer, seen on the H100 compile before tied tables were split
    # over the vocabulary)
    tokens = chunk_length(w.batch, t, config.vocab_size)  # the code chunks by the head's global width
    reduced = config.tie_word_embeddings and vocab == config.vocab_size and mesh["fsdp"] > 1
    logits = rows * tokens * vocab * (4 + act + (4 if reduced else 0)) + rows * t * config.hidden_size * act
    # training unrolled over per-layer weights (Decoder.train_layers) copies them from stacked ones for each
    # call, unless they are stored split (LayerStack: GPUs)
    on = platform or "tpu"
    unrolled = (w.train_layers or train_layers_for(on)) == "unrolled"
    layer_copy = layer_weight_bytes_per_device(config, mesh, w.dtype) if unrolled and layer_storage_for(on) == "stacked" else 0
    train = weights + layer_copy + lora_params + lora_state + accumulators + activations + logits
    b_pad = batch_bucket(w.sample_batch, _MeshShape(mesh), platform=on, stacked=w.candidates)  # type: ignore[arg-type]
    kv_heads = config.num_kv_heads // tensor if config.num_kv_heads % tensor == 0 else config.num_kv_heads
    s = w.cache_slots
    kv_cache = 2 * config.num_layers * w.candidates * (b_pad // mesh["data"]) * s * kv_heads * config.head_dim * act
    p_len = w.prompt_tokens
    # prefill's scan also returns every layer's keys and values of the prompt before they fill the cache;
    # unrolled over split weights (GPUs, LayerStack), each layer's go straight into it
    prompt_kv = 0 if layer_storage_for(on) == "split" else 2 * config.num_layers * w.candidates * (b_pad // mesh["data"]) * p_len * kv_heads * config.head_dim * act
    # one layer's MLP intermediates for every prompt token at once: gate and its silu in float32 (the GPU
    # compiler computes bf16 element-wise work in float32), [K, rows, P, F / tensor] each
    mlp = config.intermediate_size // tensor if config.intermediate_size % tensor == 0 else config.intermediate_size
    prefill_mlp = 2 * 4 * w.candidates * (b_pad // mesh["data"]) * p_len * mlp
    sample = weights + w.candidates * p * LORA_BYTES + kv_cache + prompt_kv + prefill_mlp
    return MemoryPlan(weights, lora_params, lora_state, accumulators, activations, logits, kv_cache,
                      prompt_kv, prefill_mlp, lanes, train, sample, layer_copy)


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Roofline estimate of one step in seconds: ``max(compute, memory, comm)``."""

    compute: float
    memory: float
    comm: float

    @property
    def seconds(self) -> float:
        """The bound: the largest of the three."""
        return max(self.compute, self.memory, self.comm)

    @property
    def bound(self) -> str:
        """Which of compute / memory / comm sets :attr:`seconds`."""
        return max(("compute", self.compute), ("memory", self.memory), ("comm", self.comm), key=lambda x: x[1])[0]


def step_times(config: ModelConfig, mesh: Mapping[str, int], w: Workload, hw: Hardware) -> dict[str, StepTime]:
    """Roofline times of a training micro-step (every lane once), a prefill and a decode step.

    FLOPs, as the compiled programs do them (``seal-jax compile`` counts them from the HLO, and
    ``tests/test_plan_vs_compile.py`` holds the two together): the projections and the head are split over
    ``fsdp × tensor`` (XLA contracts over the ``fsdp``-sharded width), training's and prefill's attention
    over the fused kernels' head split (:func:`attention_split`), decode's over ``tensor``; a training
    micro-step runs the frozen base forward and backward to its inputs (2 passes, 3 with remat "full": no
    weight gradients), the attention kernel forward (2 matmuls over the causal tiles,
    ``attention.causal_share``; again when recomputed by "minimal" or "full") and backward
    (:data:`KERNEL_BACKWARD_MATMULS`, over :data:`KERNEL_BACKWARD_TILE`), and the adapters forward
    and both their gradients (3 passes); prefill runs the prompt (P tokens); a decode step runs one token
    per row and attends over the cache (S slots); prefill applies the head to the last position only. Memory and communication: training reads the gathered
    weights once per forward, backward and (with remat "full") recomputation, and all-gathers the ``fsdp`` shards as
    often; decode reads this device's weights and KV cache once per token and all-reduces the partial sums
    of the projections that contract over the ``fsdp``-sharded width.
    """
    act = DTYPE_BYTES[w.dtype]
    peak = hw.matmul_flops(w.dtype)
    f, tp = mesh["fsdp"], mesh["tensor"]
    n_mm = matmul_parameters(config)
    n_lora = lora_parameters(config, w.lora_rank, w.lora_targets)
    t = w.seq_len
    split = attention_split(config, mesh)
    # one matmul of the attention kernels over the causal tiles, per sequence, all layers
    def kernel_matmul(length: int, tile: int = KERNEL_BLOCK) -> float:
        return 2 * length * length * config.q_dim * config.num_layers * causal_share(length, tile)

    link = hw.link_bandwidth / 2
    gathered = weight_bytes_per_device(config, {"data": 1, "fsdp": 1, "tensor": tp}, w.dtype)
    gather_comm = gathered * (f - 1) / f / link if f > 1 else 0.0

    lanes, lane_rows = lanes_per_device(w.candidates, w.batch, mesh)
    remat = remat_name(w.remat)
    passes = 4 if remat == "full" else 3  # weight reads: forward, backward (2x), recomputed forward
    rows = lanes * lane_rows
    base_passes = 3 if remat == "full" else 2  # forward, input gradients (, recomputed forward)
    # forward (2), recomputed forward (2, under remat) and the backward kernels
    attention = ((2 + (0 if remat == "none" else 2)) * kernel_matmul(t)
                 + KERNEL_BACKWARD_MATMULS * kernel_matmul(t, KERNEL_BACKWARD_TILE[hw.platform]))
    train_flops = rows * ((base_passes * 2 * n_mm * t + 3 * 2 * n_lora * t) / (f * tp) + attention / split)
    train = StepTime(train_flops / peak,
                     (passes - 1) * gathered / hw.hbm_bandwidth,
                     (passes - 1) * gather_comm)

    b_pad = batch_bucket(w.sample_batch, _MeshShape(mesh), platform=hw.platform, stacked=w.candidates)  # type: ignore[arg-type]
    srows = w.candidates * b_pad // mesh["data"]
    s, p_len = w.cache_slots, w.prompt_tokens
    prefill_attn = 2 * kernel_matmul(p_len)
    n_head = config.vocab_size * config.hidden_size  # prefill applies the head to the last position only
    prefill_mm = 2 * ((n_mm - n_head + n_lora) * p_len + n_head) / (f * tp)
    prefill = StepTime(srows * (prefill_mm + prefill_attn / attention_split(config, mesh, fsdp=False)) / peak,
                       gathered / hw.hbm_bandwidth, gather_comm)
    mem = memory_plan(config, mesh, w, hw.platform)
    reduce_width = config.q_dim + 2 * config.kv_dim + 2 * config.intermediate_size
    reduce_bytes = 2 * srows * config.num_layers * reduce_width * act * (f - 1) / f if f > 1 else 0.0
    decode_attn = 4 * s * config.q_dim * config.num_layers
    decode = StepTime(srows * (2 * (n_mm + n_lora) / (f * tp) + decode_attn / tp) / peak,
                      (mem.weights + mem.kv_cache) / hw.hbm_bandwidth,
                      reduce_bytes / link)
    return {"train_step": train, "prefill": prefill, "decode_token": decode}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether the plan fits one device of ``hardware``, with a message that says what to change."""

    hardware: str
    fits: bool
    peak_bytes: int
    usable_bytes: float
    message: str


def verdict(config: ModelConfig, mesh: Mapping[str, int], w: Workload, hw: Hardware) -> Verdict:
    """Fit check of :func:`memory_plan`'s peak against ``USABLE_FRACTION`` of ``hw``'s HBM."""
    mem = memory_plan(config, mesh, w, hw.platform)
    usable = USABLE_FRACTION * hw.hbm_bytes
    gb = 1e9
    if mem.peak <= usable:
        return Verdict(hw.name, True, mem.peak, usable,
                       f"fits: {mem.peak / gb:.1f} GB of {usable / gb:.1f} GB usable per {hw.name} "
                       f"({100 * mem.peak / hw.hbm_bytes:.0f}% of HBM)")
    phase = "training" if mem.train >= mem.sample else "sampling"
    hints = []
    if mem.weights > 0.5 * usable:
        hints.append("shard the weights over more devices (raise fsdp or tensor)")
    if phase == "training" and remat_name(w.remat) != "full":
        hints.append('recompute whole layers in training (--remat full; remat = "full" in a run config)')
    if mem.lanes > 1:
        hints.append("fewer candidates per device (raise data, or lower --candidates)")
    hints.append("a shorter --seq-len")
    return Verdict(hw.name, False, mem.peak, usable,
                   f"does NOT fit: {phase} needs {mem.peak / gb:.1f} GB per device but a {hw.name} has "
                   f"{usable / gb:.1f} GB usable; try: " + "; ".join(hints))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything :func:`make_plan` computes, JSON-able through :meth:`to_json`."""

    model: str
    config: ModelConfig
    mesh: dict[str, int]
    workload: Workload
    memory: MemoryPlan
    times: dict[str, dict[str, StepTime]]
    verdicts: dict[str, Verdict]
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (bytes as ints, seconds as floats)."""
        return {
            "model": self.model, "parameters": self.config.num_parameters(), "mesh": self.mesh,
            "devices": math.prod(self.mesh.values()), "workload": dataclasses.asdict(self.workload),
            "memory_bytes_per_device": {**dataclasses.asdict(self.memory), "peak": self.memory.peak},
            "step_seconds": {h: {k: {**dataclasses.asdict(s), "seconds": s.seconds, "bound": s.bound}
                                 for k, s in times.items()} for h, times in self.times.items()},
            "verdicts": {h: dataclasses.asdict(v) for h, v in self.verdicts.items()},
            "hardware": {h: dataclasses.asdict(HARDWARE[h]) for h in self.verdicts},
            "peak_flops": {h: HARDWARE[h].matmul_flops(self.workload.dtype) for h in self.verdicts},
            "warnings": list(self.warnings),
        }


def resolve_model(name: str) -> ModelConfig:
    """A preset name (see :data:`seal_jax.lm.config.PRESETS`) or an HF model folder / ``config.json``."""
    if name in PRESETS:
        return preset(name)
    if Path(name).exists():
        return from_hf(name)
    raise PlanError(f"unknown model {name!r}: give a preset ({', '.join(sorted(PRESETS))}) or an HF model folder")


def resolve_hardware(name: str) -> list[Hardware]:
    """``"all"`` or one key of :data:`HARDWARE` -> the hardware to plan for."""
    if name == "all":
        return list(HARDWARE.values())
    if name not in HARDWARE:
        raise PlanError(f"unknown hardware {name!r}; choose from {sorted(HARDWARE)} or 'all'")
    return [HARDWARE[name]]


def make_plan(model: str, mesh: str | Mapping[str, int], workload: Workload, hardware: str = "all") -> Plan:
    """Plan ``workload`` for ``model`` (preset or HF folder) on ``mesh`` for ``hardware`` (a name or "all")."""
    config = resolve_model(model)
    sizes = parse_mesh(mesh)
    hws = resolve_hardware(hardware)
    warnings = []
    if workload.candidates % sizes["data"] and workload.batch % sizes["data"]:
        lanes = -(-workload.candidates // sizes["data"]) * sizes["data"]
        warnings.append(
            f"{workload.candidates} candidates do not divide by data={sizes['data']} and neither does the batch "
            f"({workload.batch}): the trainer pads to {lanes} lanes, {lanes - workload.candidates} of them idle "
            "(choose K or the batch a multiple of data)")
    for axis, dim in (("tensor", config.num_kv_heads), ("tensor", config.num_heads),
                      ("tensor", config.intermediate_size), ("fsdp", config.hidden_size)):
        if sizes[axis] > 1 and dim % sizes[axis]:
            warnings.append(f"{axis}={sizes[axis]} does not divide a width of {dim}: those weights are replicated")
    if workload.seq_len > config.max_position_embeddings:
        warnings.append(f"seq_len {workload.seq_len} exceeds the model's context {config.max_position_embeddings}")
    platforms = {hw.platform for hw in hws}  # the memory table's; each verdict uses its hardware's own
    mem = memory_plan(config, sizes, workload, platforms.pop() if len(platforms) == 1 else None)
    times = {hw.name: step_times(config, sizes, workload, hw) for hw in hws}
    verdicts = {hw.name: verdict(config, sizes, workload, hw) for hw in hws}
    return Plan(model, config, sizes, workload, mem, times, verdicts, tuple(dict.fromkeys(warnings)))


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def _secs(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


def format_plan(plan: Plan) -> str:
    """The plan as Markdown: memory per device, step times and verdict per hardware, warnings, sources."""
    c, m, w, mem = plan.config, plan.mesh, plan.workload, plan.memory
    devices = math.prod(m.values())
    mesh_s = ",".join(f"{a}={m[a]}" for a in MESH_AXES)
    lines = [
        f"## {plan.model}: {c.num_parameters():,} parameters, mesh {mesh_s} ({devices} devices), {w.dtype}",
        f"K={w.candidates} candidates (lanes per device: {mem.lanes}), seq_len={w.seq_len}, batch={w.batch}, "
        f"sample_batch={w.sample_batch}, cache_len={w.cache_slots}, LoRA r={w.lora_rank} on {'/'.join(w.lora_targets)}, "
        f"remat={remat_name(w.remat)}",
        "",
        "| per device | bytes |",
        "|---|---:|",
        f"| base weights ({w.dtype}, sharded) | {_gb(mem.weights)} |",
        f"| LoRA adapters (float32, the device's lanes' candidates) | {_gb(mem.lora_params)} |",
        f"| AdamW moments (float32) | {_gb(mem.lora_state)} |",
        f"| gradient accumulators (per lane) | {_gb(mem.accumulators)} |",
        f"| training activations (remat {remat_name(w.remat)}, estimate) | {_gb(mem.activations)} |",
        f"| training cross-entropy (a chunk of float32 logits, the gradient direction) | {_gb(mem.logits)} |",
        *([f"| per-layer copy of the layer weights (GPU training) | {_gb(mem.layer_copy)} |"] if mem.layer_copy else []),
        f"| **training total** | **{_gb(mem.train)}** |",
        f"| sampling KV cache (K adapters x {w.sample_batch} rows x {w.cache_slots} slots) | {_gb(mem.kv_cache)} |",
        f"| prompt keys and values before they fill the cache | {_gb(mem.prompt_kv)} |",
        f"| prefill: one layer's MLP intermediates (float32, estimate) | {_gb(mem.prefill_mlp)} |",
        f"| **sampling total** | **{_gb(mem.sample)}** |",
        "",
        "| hardware | HBM | fits? | train micro-step | prefill (K x rows x S) | decode / token |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, v in plan.verdicts.items():
        hw = HARDWARE[name]
        t = plan.times[name]
        cells = [f"{_secs(t[k].seconds)} ({t[k].bound})" for k in ("train_step", "prefill", "decode_token")]
        lines.append(f"| {name} | {hw.hbm_bytes / 1e9:.0f} GB | {'yes' if v.fits else '**no**'} | " + " | ".join(cells) + " |")
    lines.append("")
    for v in plan.verdicts.values():
        hw = HARDWARE[v.hardware]
        hosts = max(1, math.ceil(devices / hw.chips_per_host))
        lines.append(f"- {v.hardware}: {v.message}; {devices} chips = {hosts} host(s) of {hw.chips_per_host}")
    for warning in plan.warnings:
        lines.append(f"- warning: {warning}")
    lines += ["", "Times are roofline bounds (max of compute, HBM and interconnect time; no latency, no kernel "
              f"inefficiency); compute time uses each chip's dense matmul peak for {w.dtype}. Peak figures:"]
    for name in plan.verdicts:
        hw = HARDWARE[name]
        lines.append(f"- {name} ({w.dtype} at the {hw.peak_name(w.dtype)} peak, {hw.matmul_flops(w.dtype) / 1e12:g} "
                     f"TFLOP/s): {hw.source}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``seal-jax plan`` options to ``parser``."""
    parser.add_argument("--model", default="qwen3-8b",
                        help="a preset (e.g. qwen3-8b) or an HF model folder (default: %(default)s)")
    parser.add_argument("--mesh", default="data=2,fsdp=4,tensor=1", help="mesh sizes (default: %(default)s)")
    parser.add_argument("--candidates", "-k", type=int, default=4,
                        help="K LoRA candidates trained together (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=2048,
                        help="padded training sequence length T (default: %(default)s)")
    parser.add_argument("--cache-len", type=int, default=None,
                        help="KV-cache slots S when sampling (prompt + new tokens; default: --seq-len)")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="padded prompt length P that prefill runs over (default: --cache-len)")
    parser.add_argument("--batch", type=int, default=1,
                        help="training micro-batch per candidate (default: %(default)s, as SEAL)")
    parser.add_argument("--sample-batch", type=int, default=8,
                        help="prompts per candidate when sampling (default: %(default)s)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES),
                        help="weights and activations (default: %(default)s)")
    parser.add_argument("--lora-rank", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--lora-targets", default="q_proj,v_proj",
                        help="comma-separated projections (default: %(default)s)")
    parser.add_argument("--remat", nargs="?", const="full", default="minimal", choices=REMAT_POLICIES,
                        help="what training keeps per layer for the backward pass (default: %(default)s; --remat "
                             "alone = full)")
    parser.add_argument("--hardware", default="all", help=f"one of {', '.join(HARDWARE)} or all (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")


def main(args: argparse.Namespace) -> int:
    """Print the plan; return 0 if it fits every requested hardware, 3 if it does not fit some, 2 for a
    request it cannot plan (:class:`PlanError`: unknown model or hardware, bad mesh or sizes)."""
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.dtype, args.dtype)
    try:
        workload = Workload(candidates=args.candidates, seq_len=args.seq_len, batch=args.batch,
                            sample_batch=args.sample_batch, dtype=dtype, lora_rank=args.lora_rank,
                            lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                            remat=args.remat, cache_len=args.cache_len,
                            prompt_len=args.prompt_len)
        plan = make_plan(args.model, args.mesh, workload, args.hardware)
    except PlanError as error:
        print(f"seal-jax plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0 if all(v.fits for v in plan.verdicts.values()) else 3
