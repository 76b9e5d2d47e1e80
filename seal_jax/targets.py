"""Accelerator targets for ahead-of-time compilation on a CPU host: one table, chips × count.

A :class:`Target` names a TPU topology (compiled by libtpu) or a number of NVIDIA GPUs (compiled by the
CUDA PJRT plugin from a ``GpuTargetConfigProto``), plus the chip's published peaks from
:data:`seal_jax.plan.HARDWARE` for the roofline. :func:`devices` returns the target's devices, from which
an ordinary :func:`~seal_jax.lm.sharding.make_mesh` builds a mesh; programs lowered for that mesh compile
for the real chip without one being present (``pip install 'seal-jax[aot]'`` brings both compilers).

Facts checked here (jax 0.10.2): libtpu needs ``TPU_SKIP_MDS_QUERY=1`` off Google Cloud and only one process
at a time may initialise it; topology names look like ``v5p:2x2x2``. A deviceless GPU compile needs the
numeric ``gpu_device_info`` fields (a config with only the compute capability crashes the process); the
device facts below are those of XLA's own target specs (``xla/backends/gpu/target_config/specs``). Without
a GPU there is no autotuning, so temporary bytes may differ from a compile on the device, and
``cost_analysis()`` is ``None`` (:mod:`seal_jax.hlo` counts FLOPs and bytes from the HLO instead).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seal_jax.plan import Hardware


class TargetError(ValueError):
    """An unknown target, or a compiler that is not installed."""


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """The ``gpu_device_info`` facts a deviceless CUDA compile needs (from XLA's target specs)."""

    name: str
    compute_capability: tuple[int, int]
    core_count: int
    fpus_per_core: int
    memory_bandwidth: int
    l2_cache_size: int
    clock_rate_ghz: float
    device_memory_size: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    cudnn: tuple[int, int, int] = (9, 8, 0)

    def target_config(self) -> str:
        """The text-format ``GpuTargetConfigProto`` for this GPU."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {self.core_count}
  fpus_per_core: {self.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_cache_size}
  clock_rate_ghz: {self.clock_rate_ghz}
  device_memory_size: {self.device_memory_size}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {self.cudnn[0]} minor: {self.cudnn[1]} patch: {self.cudnn[2]} }}
device_description_str: "{self.name}"
"""


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 3_352_320_000_000, 52_428_800, 1.98,
                    84_942_979_072, 233_472, 232_448),
    "h200": GpuSpec("NVIDIA H200 141GB HBM3e", (9, 0), 132, 128, 4_800_000_000_000, 52_428_800, 1.98,
                    151_397_597_184, 233_472, 232_448),
    "a100-80g": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 2_039_040_000_000, 41_943_040, 1.41,
                        85_100_068_864, 167_936, 166_912),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: ``chips`` devices of one kind.

    Attributes:
      name: e.g. ``tpu-v5p-16`` or ``h100-8``.
      platform: ``"tpu"`` or ``"gpu"``.
      chip: the key of the chip's peaks in :data:`seal_jax.plan.HARDWARE`.
      chips: number of devices (chips; a v5p chip's two TensorCores are one JAX device).
      topology: the TPU topology name (``v5p:2x2x2``) or the GPU topology (``1x1x8``: partitions × hosts ×
        devices per host).
      gpu: the key of the GPU's facts in :data:`GPUS` (GPU targets only).
    """

    name: str
    platform: str
    chip: str
    chips: int
    topology: str
    gpu: str | None = None

    @property
    def hardware(self) -> Hardware:
        """The chip's published peaks (FLOP/s, HBM bytes and bandwidth, interconnect)."""
        from seal_jax.plan import HARDWARE  # deferred: plan imports the engine (jax); the table must not

        return HARDWARE[self.chip]

    def runs_on(self, platform: str, device_kind: str, count: int) -> bool:
        """Whether ``count`` devices of ``platform`` reporting ``device_kind`` (JAX's) are this target."""
        kinds = DEVICE_KINDS[self.chip]
        same_kind = device_kind in kinds if platform == "tpu" else device_kind.startswith(kinds)
        return platform == self.platform and count == self.chips and same_kind

    @property
    def hbm_bytes(self) -> int:
        """Memory per device the compiler plans against (the GPU spec's device memory; the TPU figure of
        :data:`~seal_jax.plan.HARDWARE`)."""
        return GPUS[self.gpu].device_memory_size if self.gpu else int(self.hardware.hbm_bytes)


# What JAX's ``device_kind`` says on each chip (TPU kinds exactly, as Pallas's ``tpu_info`` matches them; GPU
# kinds by prefix, the CUDA device name: "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", ...).
DEVICE_KINDS: dict[str, tuple[str, ...]] = {
    "tpu-v5e": ("TPU v5 lite", "TPU v5e"),
    "tpu-v5p": ("TPU v5", "TPU v5p"),
    "tpu-v6e": ("TPU v6 lite", "TPU v6e"),
    "h100": ("NVIDIA H100",),
    "h200": ("NVIDIA H200",),
    "a100-80g": ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB"),
}


# TPU names are Cloud TPU accelerator types, so a name here is what `gcloud compute tpus tpu-vm create
# --accelerator-type` takes: v5e and v6e count chips, v5p counts TensorCores (two per chip, one JAX
# device per chip), so `tpu-v5p-8` is one host of 4 chips and `tpu-v5p-16` is 8 chips on two hosts.
# GPU names count GPUs.
def _tpu(name: str, chip: str, chips: int, topology: str) -> Target:
    return Target(name, "tpu", chip, chips, topology)


def _gpu(chip: str, chips: int) -> Target:
    return Target(f"{chip}-{chips}", "gpu", chip, chips, f"1x1x{chips}", gpu=chip)


TARGETS: dict[str, Target] = {t.name: t for t in [
    _tpu("tpu-v5e-4", "tpu-v5e", 4, "v5e:2x2"),
    _tpu("tpu-v5e-8", "tpu-v5e", 8, "v5e:2x4"),
    _tpu("tpu-v5e-256", "tpu-v5e", 256, "v5e:16x16"),
    _tpu("tpu-v5p-8", "tpu-v5p", 4, "v5p:2x2x1"),
    _tpu("tpu-v5p-16", "tpu-v5p", 8, "v5p:2x2x2"),
    _tpu("tpu-v5p-128", "tpu-v5p", 64, "v5p:4x4x4"),
    _tpu("tpu-v5p-256", "tpu-v5p", 128, "v5p:4x4x8"),
    _tpu("tpu-v6e-8", "tpu-v6e", 8, "v6e:2x4"),
    _tpu("tpu-v6e-256", "tpu-v6e", 256, "v6e:16x16"),
    _gpu("h100", 1), _gpu("h100", 8), _gpu("h200", 1), _gpu("h200", 8), _gpu("a100-80g", 8),
]}


def get_target(name: str) -> Target:
    """The target called ``name`` (see :data:`TARGETS`)."""
    if name not in TARGETS:
        known = ", ".join(f"{t.name} ({t.chips} devices)" for t in TARGETS.values())
        raise TargetError(f"unknown target {name!r}; targets: {known}")
    return TARGETS[name]


def target_of(platform: str, device_kind: str, count: int) -> Target | None:
    """The target that ``count`` devices of ``platform`` and ``device_kind`` are, or None when none is."""
    return next((t for t in TARGETS.values() if t.runs_on(platform, device_kind, count)), None)


def target_of_devices(devs: Sequence[Any]) -> Target | None:
    """The target that JAX devices ``devs`` (all of a slice's or host group's) are, or None."""
    platform = "gpu" if devs[0].platform in ("cuda", "rocm") else devs[0].platform
    return target_of(platform, devs[0].device_kind, len(devs))


def running_target() -> Target | None:
    """The target this process's devices (all hosts') are, or None (a CPU, or a slice not in
    :data:`TARGETS`). Call it after ``jax.distributed.initialize``, which must come before JAX's devices."""
    import jax  # deferred: importing this module must not start JAX

    return target_of_devices(jax.devices())


LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"


def _tpu_topology(topologies: Any, target: Target, tries: int = 5) -> Any:
    """libtpu's topology for ``target``. Only one process at a time may hold libtpu (its lockfile); a
    process starting beside another one's start can find the lockfile busy for a moment, so that is
    tried again a few times (libtpu allows it) before it is reported."""
    import jax  # deferred: importing this module must not start JAX

    tries = max(1, tries)
    for attempt in range(tries):
        try:
            return topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
        except jax.errors.JaxRuntimeError as e:
            if "lockfile" not in str(e):
                raise
            if attempt == tries - 1:
                raise TargetError(
                    f"compiling for {target.name} needs libtpu, and another process holds it (its lockfile "
                    f"{LIBTPU_LOCKFILE}): one process at a time may compile for TPUs. Wait for it, or, when no "
                    f"such process runs, remove {LIBTPU_LOCKFILE}. ({e})") from None
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _has_module(name: str) -> bool:
    """Whether ``name`` is importable here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # its parent package is missing
        return False


@functools.cache
def devices(name: str) -> tuple[Any, ...]:
    """The devices of target ``name``, for a mesh that compiles for it on this (CPU) host.

    Raises :class:`TargetError` when the compiler for the target is not installed (``pip install
    'seal-jax[aot]'``)."""
    target = get_target(name)
    import jax  # deferred: importing this module (e.g. for the table) must not start JAX
    from jax.experimental import topologies

    if target.platform == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        try:
            import libtpu  # noqa: F401  (deferred heavy optional dependency: only to say what is missing)
        except ImportError:
            raise TargetError(f"compiling for {name} needs libtpu: pip install 'seal-jax[aot]' "
                              "(or pip install 'jax[tpu]')") from None
        desc = _tpu_topology(topologies, target)
    else:
        if not any(_has_module(f"jax_plugins.xla_cuda{v}") for v in (13, 12)):  # either registers "cuda"
            raise TargetError(f"compiling for {name} needs the CUDA PJRT plugin: pip install 'seal-jax[aot]' "
                              "(or pip install 'jax[cuda12-local]', or 'jax[cuda13-local]' with JAX 0.11)")
        desc = topologies.get_topology_desc(platform="cuda", target_config=GPUS[target.gpu].target_config(),
                                            topology=target.topology)
    devs = tuple(desc.devices)
    if len(devs) != target.chips:
        raise TargetError(f"target {name} ({target.topology}) gave {len(devs)} devices, expected {target.chips}")
    del jax
    return devs
