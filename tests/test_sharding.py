"""Meshes from specs, sharding rules, sharded forward == unsharded forward on 8 fake CPU devices."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import seal_jax as sj
from seal_jax.lm.params import param_axes, param_shapes
from seal_jax.lm.sharding import (
    MESH_AXES,
    Launch,
    MeshError,
    detect_launch,
    initialize_distributed,
    make_mesh,
    param_sharding,
    parse_mesh_spec,
    spec_for,
)

HEAD = param_axes("lm_head", sj.lm.preset("qwen3-8b"))


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_spec({"tensor": 2}) == {"data": 1, "fsdp": 1, "tensor": 2}
    with pytest.raises(MeshError, match="unknown mesh axes.*'model'"):
        parse_mesh_spec("model=2")
    with pytest.raises(MeshError, match="bad mesh spec part"):
        parse_mesh_spec("data:2")
    with pytest.raises(MeshError, match="mesh axis 'data' is given twice in 'data=2,data=4'"):
        parse_mesh_spec("data=2,data=4")
    with pytest.raises(MeshError, match="at most one"):
        parse_mesh_spec("data=-1,fsdp=-1")


def test_make_mesh_sizes_and_errors():
    mesh = make_mesh("data=2,fsdp=-1,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert tuple(mesh.axis_names) == MESH_AXES
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(MeshError, match="needs 16 devices but 8"):
        make_mesh("data=4,fsdp=4")


def test_rules_replicate_what_does_not_divide():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert tuple(spec_for(mesh, ("layers", "embed", "heads"), (4, 64, 64))) == (None, "fsdp", "tensor")
    assert tuple(spec_for(mesh, ("layers", "embed", "heads"), (4, 63, 64))) == (None, None, "tensor")
    assert tuple(spec_for(mesh, ("vocab", "embed"), (151, 64))) == (None, "fsdp")
    qwen = sj.lm.preset("qwen3-8b")
    assert all(len(param_axes(path, qwen)) == len(shape) for path, shape in param_shapes(qwen).items())


def test_the_output_head_is_split_over_its_vocabulary():
    """lm_head [D, V]: the vocabulary over fsdp × tensor (their product; only the axes of size > 1), the
    width whole, so no program all-reduces partial full-vocabulary logits."""
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert HEAD == (None, "head_vocab")
    assert tuple(spec_for(mesh, HEAD, (64, 256))) == (None, ("fsdp", "tensor"))
    assert tuple(spec_for(make_mesh("data=2,fsdp=4"), HEAD, (64, 256))) == (None, "fsdp")
    assert tuple(spec_for(make_mesh("data=8"), HEAD, (64, 256))) == (None, None)
    assert tuple(spec_for(mesh, HEAD, (64, 250))) == (None, None)  # 250 % 4: replicated
    # an axis an earlier dimension took is left out of a product
    assert tuple(spec_for(mesh, ("heads", "head_vocab"), (64, 256))) == ("tensor", "fsdp")


def test_a_tied_embedding_is_split_as_the_output_head():
    """Tied to the head, the embedding ``[V, D]`` is split over its vocabulary on fsdp × tensor and whole in
    its width, as ``lm_head``'s ``[D, V]`` is; untied, its vocabulary over tensor and its width over fsdp.
    A tied vocabulary that fsdp × tensor does not divide keeps the width split (not a whole table)."""
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    tied, untied = sj.lm.preset("smollm2-135m"), sj.lm.preset("qwen3-8b")
    assert tied.tie_word_embeddings and not untied.tie_word_embeddings
    assert tuple(param_sharding(mesh, "embedding", (256, 64), tied).spec) == (("fsdp", "tensor"), None)
    assert tuple(spec_for(mesh, HEAD, (64, 256))) == (None, ("fsdp", "tensor"))  # the head's split
    assert tuple(param_sharding(mesh, "embedding", (256, 64), untied).spec) == ("tensor", "fsdp")
    assert tuple(param_sharding(mesh, "embedding", (250, 64), tied).spec) == (None, "fsdp")  # 250 % 4


@pytest.mark.parametrize("spec", ["data=2,fsdp=2,tensor=2", "fsdp=8", "tensor=8", "data=8", "data=2,fsdp=4"])
def test_sharded_forward_equals_unsharded(tiny_hf, spec):
    _, folder = tiny_hf("qwen3-untied")
    ref_lm = sj.load(folder, progress=False)
    lm = sj.load(folder, mesh=spec, progress=False)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 160, (8, 19))
    mask = np.ones_like(ids)
    mask[3, :7] = 0
    np.testing.assert_allclose(lm.logits(ids, mask), ref_lm.logits(ids, mask), atol=1e-5, rtol=0)
    sizes = dict(lm.mesh.shape)
    for path, value in lm.params().items():
        spec_tuple = tuple(value.sharding.spec)
        for dim, axis in enumerate(spec_tuple):
            if axis is not None:
                ways = math.prod(sizes[a] for a in ((axis,) if isinstance(axis, str) else axis))
                assert value.addressable_shards[0].data.shape[dim] == value.shape[dim] // ways, path
    q = lm.params()["layers.q_proj"]
    if sizes["fsdp"] > 1 or sizes["tensor"] > 1:
        assert len({s.data.shape for s in q.addressable_shards}) == 1
        assert q.addressable_shards[0].data.size < q.size, "weights should really be split across devices"


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for var in ("SEAL_JAX_COORDINATOR", "SEAL_JAX_NUM_PROCESSES", "SEAL_JAX_PROCESS_ID", "SLURM_JOB_ID",
                "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "SEAL_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS",
                "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed() is False


SRUN_2 = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "2",
          "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_detect_launch_single_process_cases():
    assert detect_launch({}) == Launch("single")
    # an salloc shell: a job but no srun step -> one process (jax's SLURM detection would fail here)
    assert not detect_launch({"SLURM_JOB_ID": "4242"}).distributed
    assert not detect_launch({**SRUN_2, "SLURM_NTASKS": "1"}).distributed
    assert not detect_launch({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}).distributed
    assert not detect_launch({"OMPI_COMM_WORLD_SIZE": "1"}).distributed
    assert not detect_launch({**SRUN_2, "SEAL_JAX_DISTRIBUTED": "off"}).distributed
    assert not detect_launch({"SEAL_JAX_NUM_PROCESSES": "1", "SEAL_JAX_PROCESS_ID": "0"}).distributed


def test_detect_launch_clusters_leave_the_values_to_jax():
    assert detect_launch(SRUN_2) == Launch("slurm", None, None, None, 2, 1)
    tpu = {"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1,t1k-2,t1k-3", "TPU_WORKER_ID": "2"}
    assert detect_launch(tpu) == Launch("tpu", None, None, None, 4, 2)
    assert detect_launch({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}).source == "tpu"
    assert detect_launch({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}) == Launch("ompi", None, None,
                                                                                                None, 4, 3)
    assert detect_launch({"SEAL_JAX_DISTRIBUTED": "auto"}) == Launch("auto")


def test_detect_launch_explicit_values_and_precedence():
    env = {"SEAL_JAX_COORDINATOR": "10.0.0.1:1234", "SEAL_JAX_NUM_PROCESSES": "4", "SEAL_JAX_PROCESS_ID": "3"}
    assert detect_launch(env) == Launch("environment", "10.0.0.1:1234", 4, 3, 4, 3)
    jax_env = {"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert detect_launch(jax_env) == Launch("environment", "h0:99", 2, 0, 2, 0)
    # arguments win over SEAL_JAX_*, which win over JAX_*
    got = detect_launch({**env, **jax_env}, process_id=1)
    assert (got.source, got.coordinator_address, got.num_processes, got.process_id) == ("arguments", "10.0.0.1:1234", 4, 1)
    # a coordinator port under srun: the rest comes from SLURM
    got = detect_launch({**SRUN_2, "SEAL_JAX_COORDINATOR": "gpu001:5555"})
    assert (got.coordinator_address, got.num_processes, got.detected_processes) == ("gpu001:5555", None, 2)


def test_detect_launch_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="missing the number of processes, process id"):
        detect_launch({"SEAL_JAX_COORDINATOR": "10.0.0.1:1234"})
    with pytest.raises(ValueError, match="SEAL_JAX_NUM_PROCESSES='two' must be an integer"):
        detect_launch({"SEAL_JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="SEAL_JAX_DISTRIBUTED='yes'"):
        detect_launch({"SEAL_JAX_DISTRIBUTED": "yes"})
