"""Device meshes, logical-axis sharding rules (kept as data), and multi-host start-up.

The mesh has three axes: ``data`` (batch and LoRA candidates), ``fsdp`` (weights split along the model
width) and ``tensor`` (weights split along heads / MLP / vocabulary). Every parameter names its
*logical* axes in :data:`PARAM_AXES`; :data:`RULES` maps logical axes to mesh axes. A dimension that does
not divide evenly by its mesh axis is replicated instead (see :func:`spec_for`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axes of every parameter of `model.Decoder` (dotted path -> one name per dimension).
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embedding": ("vocab", "embed"),
    "layers.q_proj": ("layers", "embed", "heads"),
    "layers.k_proj": ("layers", "embed", "kv_heads"),
    "layers.v_proj": ("layers", "embed", "kv_heads"),
    "layers.o_proj": ("layers", "heads", "embed"),
    "layers.gate_proj": ("layers", "embed", "mlp"),
    "layers.up_proj": ("layers", "embed", "mlp"),
    "layers.down_proj": ("layers", "mlp", "embed"),
    "layers.input_norm": ("layers", None),
    "layers.post_attention_norm": ("layers", None),
    "layers.q_norm": ("layers", None),
    "layers.k_norm": ("layers", None),
    "final_norm": (None,),
    "lm_head": ("embed", "vocab"),
}

# Logical axis -> mesh axis (None = replicated).
RULES: dict[str, str | None] = {
    "batch": "data",
    "candidates": "data",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "length": None,
}

log = logging.getLogger(__name__)


class MeshError(ValueError):
    """A mesh specification that cannot be built on the available devices."""


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """Parse ``"data=2,fsdp=4,tensor=1"`` into ``{"data": 2, "fsdp": 4, "tensor": 1}``.

    Missing axes get size 1; at most one axis may be ``-1`` ("whatever is left").
    """
    if isinstance(spec, Mapping):
        items = dict(spec)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            m = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", part)
            if not m:
                raise MeshError(f"bad mesh spec part {part!r} in {spec!r}; expected e.g. 'data=2,fsdp=4,tensor=1'")
            items[m.group(1)] = int(m.group(2))
    unknown = set(items) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)} in {spec!r}; axes are {list(MESH_AXES)}")
    sizes = {a: int(items.get(a, 1)) for a in MESH_AXES}
    if sum(v == -1 for v in sizes.values()) > 1:
        raise MeshError(f"at most one mesh axis may be -1 in {spec!r}")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise MeshError(f"mesh axis sizes must be positive (or -1) in {spec!r}")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices).

    Args:
      spec: sizes as ``"data=2,fsdp=2,tensor=2"`` or a dict; ``None`` puts every device on ``fsdp``.
      devices: the devices to use (their number must equal the product of the sizes).
    Returns:
      a :class:`jax.sharding.Mesh` with axis types ``Auto`` (sharding propagates through jit).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec if spec is not None else {"fsdp": -1})
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    for axis, v in sizes.items():
        if v == -1:
            if len(devices) % known:
                raise MeshError(f"{len(devices)} devices do not divide into mesh {sizes}")
            sizes[axis] = len(devices) // known
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise MeshError(
            f"mesh {sizes} needs {total} devices but {len(devices)} are available; "
            "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def spec_for(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int],
             rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions have the ``logical`` axis names.

    A dimension whose size is not divisible by its mesh axis, or whose mesh axis is already used by an
    earlier dimension, is replicated.
    """
    out: list[str | None] = []
    used: set[str] = set()
    for name, size in zip(logical, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
            out.append(None)
            continue
        used.add(axis)
        out.append(axis)
    return PartitionSpec(*out)


def param_sharding(mesh: Mesh, path: str, shape: Sequence[int]) -> NamedSharding:
    """The sharding of the model parameter at dotted ``path`` (see :data:`PARAM_AXES`) with ``shape``."""
    if path not in PARAM_AXES:
        raise KeyError(f"no sharding rule for parameter {path!r}; known: {sorted(PARAM_AXES)}")
    return NamedSharding(mesh, spec_for(mesh, PARAM_AXES[path], shape))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding for a batch-major array ``[B, ...]``: the batch over ``data``, the rest replicated."""
    return NamedSharding(mesh, spec_for(mesh, ("batch",) + (None,) * (len(shape) - 1), shape))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    cpu_collectives: str | None = None,
) -> bool:
    """Start multi-host JAX (``jax.distributed.initialize``) from arguments or the environment.

    Arguments left as ``None`` are read from ``SEAL_JAX_COORDINATOR``, ``SEAL_JAX_NUM_PROCESSES`` and
    ``SEAL_JAX_PROCESS_ID``; if none of those is set either, JAX's own auto-detection runs (TPU pods,
    SLURM, Open MPI). On CPU pass ``cpu_collectives="gloo"``. Returns ``True`` if this call initialised
    the distributed runtime, ``False`` if it already was or there is nothing to join (one process).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("SEAL_JAX_COORDINATOR")
    if num_processes is None and env.get("SEAL_JAX_NUM_PROCESSES"):
        num_processes = int(env["SEAL_JAX_NUM_PROCESSES"])
    if process_id is None and env.get("SEAL_JAX_PROCESS_ID"):
        process_id = int(env["SEAL_JAX_PROCESS_ID"])
    if jax.distributed.is_initialized():
        return False
    auto = any(k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"))
    if coordinator_address is None and num_processes is None and not auto:
        return False
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
        local_device_ids=local_device_ids,
    )
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def to_host(array: jax.Array) -> np.ndarray:
    """A numpy copy of ``array`` on this host, gathering shards from other processes when needed."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
