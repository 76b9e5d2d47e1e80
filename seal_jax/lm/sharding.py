"""Device meshes, logical-axis sharding rules (kept as data), and multi-host start-up.

The mesh has three axes: ``data`` (batch and LoRA candidates), ``fsdp`` (weights split along the model
width) and ``tensor`` (weights split along heads / MLP / vocabulary). Every parameter names its
*logical* axes in :data:`seal_jax.lm.params.PARAMS` (:func:`~seal_jax.lm.params.param_axes`); :data:`RULES` maps logical
axes to mesh axes. A dimension that does not divide evenly by its mesh axis is replicated instead (see
:func:`spec_for`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from seal_jax.lm.config import ModelConfig
from seal_jax.lm.params import param_axes
from seal_jax.lm.types import MESH_AXES, MeshError, parse_mesh_spec

# Logical axis -> mesh axis, or several (split over their product), or None (replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": "data",
    "candidates": "data",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    # the output head is split over the vocabulary, not its input width: each device computes its slice of
    # the logits, and the loss and sampling reduce [B, T] values across slices instead of all-reducing
    # partial [B, T, V] logits (a contraction over an fsdp-split width)
    "head_vocab": ("fsdp", "tensor"),
    "layers": None,
    "length": None,
}

log = logging.getLogger(__name__)


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None, *,
              keep_order: bool = False) -> Mesh:
    """Build a ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices).

    Args:
      spec: sizes as ``"data=2,fsdp=2,tensor=2"`` or a dict; ``None`` puts every device on ``fsdp``.
      devices: the devices to use (their number must equal the product of the sizes).
      keep_order: lay the devices out in the order given (another layout of an existing mesh's devices, so
        that one program may take arrays of both), instead of JAX's topology-aware order.
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
        hint = ("on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax"
                if total > len(devices) and all(d.platform == "cpu" for d in devices)
                else f"give sizes whose product is {len(devices)}")
        raise MeshError(f"mesh {sizes} needs {total} devices but {len(devices)} are available; {hint}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    if keep_order:
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
                    axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def spec_for(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int],
             rules: Mapping[str, str | tuple[str, ...] | None] = RULES) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions have the ``logical`` axis names.

    A dimension is split over its rule's mesh axes of size > 1 that no earlier dimension uses (several
    axes: over their product); it is replicated when none is left or its size does not divide.
    """
    out: list[str | tuple[str, ...] | None] = []
    used: set[str] = set()
    for name, size in zip(logical, shape, strict=True):
        rule = rules.get(name) if name is not None else None
        axes = () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or size % ways:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


# FSDP training (`LM(train_weights="fsdp")`): each layer's weights split over the train mesh's `data` axis along
# the model width (gathered before the layer runs), the rest as RULES say
FSDP_LAYER_RULES: dict[str, str | tuple[str, ...] | None] = {**RULES, "embed": "data"}


def train_mesh_of(train_mesh: Mesh | str | None, mesh: Mesh | None) -> Mesh | None:
    """``train_mesh`` (a :class:`Mesh` or a spec such as ``"data=8"``) checked as another layout of the devices
    of ``mesh``, in their order (``LM.load``'s ``train_mesh``), or ``None``."""
    if train_mesh is None:
        return None
    if mesh is None:
        raise MeshError("train_mesh needs a mesh: it is another layout of the mesh's devices")
    devices = list(mesh.devices.flat)
    if isinstance(train_mesh, str):  # in the mesh's device order: the placement maps one layout onto the other
        try:
            train_mesh = make_mesh(train_mesh, devices=devices, keep_order=True)
        except MeshError as error:
            raise MeshError(f"train_mesh {train_mesh!r} must be a layout of the mesh's {len(devices)} devices "
                                f"(sizes whose product is {len(devices)}): {error}") from None
    if not isinstance(train_mesh, Mesh):
        raise MeshError(f"train_mesh must be a Mesh or a spec like 'data=8', got {train_mesh!r}")
    if {d.id for d in train_mesh.devices.flat} != {d.id for d in devices}:
        raise MeshError(f"train_mesh {dict(train_mesh.shape)} must use the devices of the mesh "
                            f"{dict(mesh.shape)}: the base weights move between the two layouts")
    if [d.id for d in train_mesh.devices.flat] != [d.id for d in devices]:
        raise MeshError(f"train_mesh {dict(train_mesh.shape)} must list the mesh's devices in the mesh's order "
                            "(one program places the weights from one layout onto the other): build it with "
                            "make_mesh(spec, devices=list(mesh.devices.flat), keep_order=True), or pass the spec")
    return train_mesh


def layer_slice_sharding(sharding: Any) -> NamedSharding | None:
    """The sharding of one layer's slice of a stacked ``[L, ...]`` array placed with ``sharding`` (the layer
    axis, never split, dropped), or None where ``sharding`` is not a :class:`NamedSharding`."""
    if not isinstance(sharding, NamedSharding):
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))


def param_sharding(mesh: Mesh, path: str, shape: Sequence[int], config: ModelConfig,
                   rules: Mapping[str, str | tuple[str, ...] | None] = RULES) -> NamedSharding:
    """The sharding of the parameter at dotted ``path`` with ``shape`` in a model of ``config`` (its logical
    axes: :func:`param_axes`)."""
    return NamedSharding(mesh, spec_for(mesh, param_axes(path, config), shape, rules))


def platform(mesh: Mesh | None) -> str:
    """The platform (``"cpu"``, ``"tpu"``, ``"gpu"``) that programs for ``mesh`` run on: read from the mesh's
    devices, which may be a TPU or GPU topology's when compiling ahead of time on a CPU host; without a mesh,
    JAX's default backend. Every platform-dependent choice of the engine is made from this."""
    if mesh is None:
        return jax.default_backend()
    name = mesh.devices.flat[0].platform
    return "gpu" if name in ("cuda", "rocm") else name


def device_kind(mesh: Mesh | None) -> str:
    """The kind of chip programs for ``mesh`` run on (JAX's ``device_kind``, e.g. ``"TPU v5 lite"``), from the
    mesh's devices as :func:`platform`; without a mesh, JAX's default device's."""
    return (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).device_kind


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding for a batch-major array ``[B, ...]``: the batch over ``data``, the rest replicated."""
    return NamedSharding(mesh, spec_for(mesh, ("batch",) + (None,) * (len(shape) - 1), shape))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process run, as read from arguments or the environment.

    Attributes:
      source: ``"single"`` (nothing to join), ``"arguments"``, ``"environment"`` (``SEAL_JAX_*`` or JAX's
        own ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``), ``"slurm"``
        (inside ``srun``), ``"tpu"`` (a multi-host Cloud TPU slice), ``"ompi"`` (``mpirun``) or ``"auto"``
        (``SEAL_JAX_DISTRIBUTED=auto``: JAX asks the cluster, e.g. the TPU metadata server).
      coordinator_address, num_processes, process_id: the values passed to ``jax.distributed.initialize``
        (``None`` = JAX detects it from the cluster environment).
      detected_processes, detected_process_id: what the cluster variables say (for logs and checks).
    """

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    detected_processes: int | None = None
    detected_process_id: int | None = None

    @property
    def distributed(self) -> bool:
        """Whether ``jax.distributed.initialize`` should be called."""
        return self.source != "single"


def _int_var(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


SLURM_STEP_VARS = ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def detect_launch(env: Mapping[str, str], coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None) -> Launch:
    """Decide from arguments and environment ``env`` whether and how to start multi-process JAX.

    Precedence: arguments, then ``SEAL_JAX_COORDINATOR`` / ``SEAL_JAX_NUM_PROCESSES`` /
    ``SEAL_JAX_PROCESS_ID``, then ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
    (any missing value is left to JAX's cluster detection when a cluster is present). Without explicit
    values: ``SEAL_JAX_DISTRIBUTED=off`` never starts, ``=auto`` always lets JAX detect; SLURM starts
    only inside an ``srun`` step of more than one task (an ``salloc`` shell has ``SLURM_JOB_ID`` but no
    step); a Cloud TPU slice only when ``TPU_WORKER_HOSTNAMES`` names more than one host (or
    ``MEGASCALE_COORDINATOR_ADDRESS`` marks a multislice run); Open MPI when ``OMPI_COMM_WORLD_SIZE > 1``.
    Returns a :class:`Launch`; raises ValueError for an incomplete explicit set-up outside a cluster.
    """
    mode = env.get("SEAL_JAX_DISTRIBUTED", "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ValueError(f"SEAL_JAX_DISTRIBUTED={mode!r}: use 'auto' (let JAX detect the cluster) or 'off'")
    explicit = (coordinator_address, num_processes, process_id)
    source = "arguments" if any(v is not None for v in explicit) else "environment"
    for prefix, coord_var in (("SEAL_JAX_", "SEAL_JAX_COORDINATOR"), ("JAX_", "JAX_COORDINATOR_ADDRESS")):
        coordinator_address = coordinator_address or env.get(coord_var) or None
        if num_processes is None:
            num_processes = _int_var(env, f"{prefix}NUM_PROCESSES")
        if process_id is None:
            process_id = _int_var(env, f"{prefix}PROCESS_ID")

    cluster = _detect_cluster(env)
    given = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in given):
        if num_processes == 1:
            return Launch("single")
        if None in given and cluster is None and mode != "auto":
            missing = [n for n, v in zip(("coordinator address", "number of processes", "process id"), given,
                                         strict=True) if v is None]
            raise ValueError(
                f"multi-process start-up is missing the {', '.join(missing)}: set SEAL_JAX_COORDINATOR "
                "(host:port of process 0), SEAL_JAX_NUM_PROCESSES and SEAL_JAX_PROCESS_ID on every process, "
                "or run under srun / a Cloud TPU slice where JAX detects them")
        return Launch(source, coordinator_address, num_processes, process_id,
                      *(cluster[1:] if cluster else (num_processes, process_id)))
    if mode == "off":
        return Launch("single")
    if cluster is not None:
        name, count, pid = cluster
        return Launch(name, None, None, None, count, pid)
    if mode == "auto":
        return Launch("auto")
    return Launch("single")


def _detect_cluster(env: Mapping[str, str]) -> tuple[str, int | None, int | None] | None:
    """``(name, process count, process id)`` of a multi-process cluster launch in ``env``, or ``None``."""
    if "SLURM_JOB_ID" in env and all(v in env for v in SLURM_STEP_VARS):
        count = _int_var(env, "SLURM_NTASKS")
        if count is not None and count > 1:
            return "slurm", count, _int_var(env, "SLURM_PROCID")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu", (len(hosts) or None), _int_var(env, "TPU_WORKER_ID")
    count = _int_var(env, "OMPI_COMM_WORLD_SIZE")
    if count is not None and count > 1:
        return "ompi", count, _int_var(env, "OMPI_COMM_WORLD_RANK")
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    cpu_collectives: str | None = None,
) -> bool:
    """Start multi-host JAX (``jax.distributed.initialize``) from arguments or the environment.

    See :func:`detect_launch` for what is read (``SEAL_JAX_*``, ``JAX_*``, SLURM, Cloud TPU, Open MPI,
    ``SEAL_JAX_DISTRIBUTED=auto|off``). On CPU pass ``cpu_collectives="gloo"`` (or set
    ``SEAL_JAX_CPU_COLLECTIVES=gloo``). Returns ``True`` if this call initialised the distributed runtime,
    ``False`` if it already was or there is nothing to join (one process).
    """
    if jax.distributed.is_initialized():
        return False
    launch = detect_launch(os.environ, coordinator_address, num_processes, process_id)
    if not launch.distributed:
        return False
    cpu_collectives = cpu_collectives or os.environ.get("SEAL_JAX_CPU_COLLECTIVES")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
        process_id=launch.process_id, local_device_ids=local_device_ids,
    )
    log.info("jax.distributed (%s): process %d of %d", launch.source, jax.process_index(), jax.process_count())
    return True


def to_host(array: jax.Array) -> np.ndarray:
    """A numpy copy of ``array`` on this host, gathering shards from other processes when needed."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
