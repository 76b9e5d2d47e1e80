"""Meshes from specs, sharding rules, sharded forward == unsharded forward on 8 fake CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import seal_jax as sj
from seal_jax.lm.sharding import (
    MESH_AXES,
    PARAM_AXES,
    MeshError,
    initialize_distributed,
    make_mesh,
    parse_mesh_spec,
    spec_for,
)


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_spec({"tensor": 2}) == {"data": 1, "fsdp": 1, "tensor": 2}
    with pytest.raises(MeshError, match="unknown mesh axes.*'model'"):
        parse_mesh_spec("model=2")
    with pytest.raises(MeshError, match="bad mesh spec part"):
        parse_mesh_spec("data:2")
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
    assert set(PARAM_AXES) >= set(sj.lm.model.param_shapes(sj.lm.preset("qwen3-8b")))


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
                assert value.addressable_shards[0].data.shape[dim] == value.shape[dim] // sizes[axis], path
    q = lm.params()["layers.q_proj"]
    if sizes["fsdp"] > 1 or sizes["tensor"] > 1:
        assert len({s.data.shape for s in q.addressable_shards}) == 1
        assert q.addressable_shards[0].data.size < q.size, "weights should really be split across devices"


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for var in ("SEAL_JAX_COORDINATOR", "SEAL_JAX_NUM_PROCESSES", "SEAL_JAX_PROCESS_ID", "SLURM_JOB_ID",
                "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed() is False
