"""seal_jax.hlo: whole-program FLOPs, bytes, collectives and loop trip counts read from optimised HLO."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seal_jax import hlo


def compiled_text(fn, *args) -> tuple[str, object]:
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.as_text(), compiled


def test_matmul_flops_equal_hand_count_and_xla():
    a = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    b = jax.ShapeDtypeStruct((128, 48), jnp.float32)
    text, compiled = compiled_text(lambda x, y: x @ y, a, b)
    stats = hlo.analyze(text)
    assert stats.flops == 2 * 64 * 128 * 48
    assert stats.flops == pytest.approx(compiled.cost_analysis()["flops"], rel=0.01)  # no loop: XLA agrees
    # reads both operands and writes the result once
    assert stats.bytes == pytest.approx(4 * (64 * 128 + 128 * 48 + 64 * 48), rel=0.05)
    assert stats.loops == [] and stats.collectives == {}


def scanned(h, w):
    def body(x, wi):
        return jnp.tanh(x @ wi), None

    return jax.lax.scan(body, h, w)[0]


def test_scan_trip_count_multiplies_the_body():
    layers = 6
    h = jax.ShapeDtypeStruct((16, 256), jnp.float32)
    w = jax.ShapeDtypeStruct((layers, 256, 256), jnp.float32)
    text, compiled = compiled_text(scanned, h, w)
    stats = hlo.analyze(text)
    one_layer = 2 * 16 * 256 * 256
    assert stats.flops == layers * one_layer
    assert [loop.trips for loop in stats.loops] == [layers]
    # XLA's own cost analysis counts the body once: the reason this module exists
    assert compiled.cost_analysis()["flops"] < 2 * one_layer
    # a trip reads one layer's slice of the stacked weight, not all of it (XLA:CPU copies the slice out,
    # then the matmul reads the copy: about three slices per trip)
    slice_bytes = 256 * 256 * 4
    assert 2 * slice_bytes < stats.loops[0].bytes_per_trip < 4 * slice_bytes < layers * slice_bytes
    assert stats.bytes == pytest.approx(layers * stats.loops[0].bytes_per_trip, rel=0.05)


def test_unknown_trip_count_is_counted_as_told():
    def until_small(x, w):
        return jax.lax.while_loop(lambda c: jnp.sum(c) > 1.0, lambda c: c @ w * 0.5, x)

    x = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    text, _ = compiled_text(until_small, x, w)
    once, ten = hlo.analyze(text), hlo.analyze(text, unknown_trips=10)
    assert [loop.trips for loop in once.loops] == [None]
    assert once.flops == 2 * 8 * 32 * 32
    assert ten.flops == 10 * once.flops
    assert once.loops[0].flops_per_trip == once.flops


def test_collectives_are_counted_with_their_bytes():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.ShapeDtypeStruct((8, 1024), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))

    def total(v):  # a sum over the sharded axis needs an all-reduce of each device's partial sums
        return jnp.sum(v, axis=0)

    text, _ = compiled_text(total, x)
    stats = hlo.analyze(text)
    assert stats.collectives["all-reduce"]["count"] >= 1
    assert stats.collectives["all-reduce"]["bytes"] >= 1024 * 4
    assert stats.collective_bytes == sum(c["bytes"] for c in stats.collectives.values())


def test_shapes_and_malformed_text():
    assert hlo.shape_bytes("bf16[4,128]{1,0:T(8,128)(2,1)}") == 4 * 128 * 2
    assert hlo.shape_bytes("(s32[], f32[2,3]{1,0}, pred[5])") == 4 + 24 + 5
    assert hlo.shape_dims("f32[2,3]{1,0}") == [2, 3]
    with pytest.raises(hlo.HloParseError, match="ENTRY"):
        hlo.analyze("HloModule m\n")


def test_convolution_counts_only_real_taps():
    # the TPU compiler writes batched matmuls as convolutions with padded windows; a padded tap reads no input
    attrs = "window={size=1x4 pad=0_0x3_3 rhs_reversal=0x1}, dim_labels=b01f_01io->b01f"
    fmas = hlo._convolution_fmas(attrs, "bf16[2,1,4,32]", "bf16[1,4,32,8]", "bf16[2,1,7,8]")
    pairs = sum(1 for o in range(7) for k in range(4) if 0 <= o + k - 3 <= 3)
    assert fmas == 2 * 32 * 8 * pairs
    plain = hlo._convolution_fmas("window={size=1}, dim_labels=0bf_io0->0bf", "f32[16,2,64]", "f32[64,32,1]",
                                  "f32[16,2,32]")
    assert plain == np.prod([16, 2, 32]) * 64


def test_on_chip_memory_spaces_are_not_hbm_traffic():
    """A TPU prefetches buffers into on-chip memory (layout ``S(1)``): filling one reads HBM, writing it and
    reading it back do not."""
    text = """HloModule m, entry_computation_layout={(bf16[64,1024]{1,0})->bf16[8,1024]{1,0}}

%fused_slice (p0: bf16[64,1024]) -> bf16[8,1024] {
  %p0 = bf16[64,1024]{1,0} parameter(0)
  ROOT %s = bf16[8,1024]{1,0} slice(%p0), slice={[0:8], [0:1024]}
}

%fused_neg (p1: bf16[8,1024]) -> bf16[8,1024] {
  %p1 = bf16[8,1024]{1,0:T(8,128)S(1)} parameter(0)
  ROOT %n = bf16[8,1024]{1,0} negate(%p1)
}

ENTRY %main (w: bf16[64,1024]) -> bf16[8,1024] {
  %w = bf16[64,1024]{1,0} parameter(0)
  %prefetch = bf16[8,1024]{1,0:T(8,128)S(1)} fusion(%w), kind=kLoop, calls=%fused_slice
  ROOT %out = bf16[8,1024]{1,0} fusion(%prefetch), kind=kLoop, calls=%fused_neg
}
"""
    slab = 8 * 1024 * 2
    assert hlo.hbm_bytes("(bf16[8,1024]{1,0:T(8,128)S(1)}, f32[2]{0})") == 8
    # the prefetch reads its slab from HBM; the negate reads on-chip memory and writes its result to HBM
    assert hlo.analyze(text).bytes == slab + slab


def test_a_gather_reads_the_rows_it_gathers():
    """An embedding lookup inside a fusion reads the looked-up rows, not the whole table (as XLA's own cost
    model counts a gather); the table read whole elsewhere counts whole."""
    table = jnp.zeros((4096, 256), jnp.float32)
    ids = jnp.arange(8, dtype=jnp.int32)
    text, _ = compiled_text(lambda t, i: (t[i] * 2.0).sum(-1), table, ids)
    rows = 8 * 256 * 4
    assert hlo.analyze(text).bytes < 4 * rows + 4096  # not the 4 MB table
    whole, _ = compiled_text(lambda t, i: t[i].sum() + t.sum(), table, ids)
    assert hlo.analyze(whole).bytes >= 4096 * 256 * 4


@pytest.mark.parametrize("body, expected_slabs", [
    # one update returned beside the fusion's other output: the update and that output written, x read
    ("""  %u = bf16[36,64,1024]{2,1,0} dynamic-update-slice(%p0, %b, %p2, %z, %z)
  ROOT %t = (bf16[36,64,1024]{2,1,0}, bf16[64,1024]{1,0}) tuple(%u, %n)""", 1 + 1 + 1),
    # two updates of one buffer in a chain, through a bitcast, returned through a bitcast: two slabs written
    ("""  %u1 = bf16[36,64,1024]{2,1,0} dynamic-update-slice(%p0, %b, %p2, %z, %z)
  %c = bf16[36,64,1024]{2,1,0} bitcast(%u1)
  %u = bf16[36,64,1024]{2,1,0} dynamic-update-slice(%c, %b, %z, %z, %z)
  %r = bf16[36,64,1024]{2,1,0} bitcast(%u)
  ROOT %t = (bf16[36,64,1024]{2,1,0}, bf16[64,1024]{1,0}) tuple(%r, %n)""", 1 + 2 + 1),
    # the buffer is also read whole (a reduction's input): that read counts
    ("""  %u = bf16[36,64,1024]{2,1,0} dynamic-update-slice(%p0, %b, %p2, %z, %z)
  %m = bf16[] constant(0)
  %s = bf16[64,1024]{1,0} reduce(%p0, %m), dimensions={0}, to_apply=%add
  %n2 = bf16[64,1024]{1,0} add(%n, %s)
  ROOT %t = (bf16[36,64,1024]{2,1,0}, bf16[64,1024]{1,0}) tuple(%u, %n2)""", 1 + 36 + 1 + 1),
    # the update is not of a parameter (a fresh buffer): the whole output is written
    ("""  %zero = bf16[] constant(0)
  %fresh = bf16[36,64,1024]{2,1,0} broadcast(%zero), dimensions={}
  %u = bf16[36,64,1024]{2,1,0} dynamic-update-slice(%fresh, %b, %p2, %z, %z)
  ROOT %t = (bf16[36,64,1024]{2,1,0}, bf16[64,1024]{1,0}) tuple(%u, %n)""", 1 + 36 + 1),
])
def test_in_place_updates_count_what_they_write_and_what_else_reads(body, expected_slabs):
    """libtpu writes a scanned layer's saved activations into their stacked buffer from the fusion that
    computes them, returning both (a tuple root): the buffer is updated in place, so the fusion writes the
    updates and its other output, and reads the stacked buffer only where something else reads it (not 36
    slabs read and 36 written per update, as counted before)."""
    text = """HloModule m, entry_computation_layout={(bf16[36,64,1024]{2,1,0}, bf16[64,1024]{1,0}, s32[])->(bf16[36,64,1024]{2,1,0}, bf16[64,1024]{1,0})}

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

%fused_save (p0: bf16[36,64,1024], p1: bf16[64,1024], p2: s32[]) -> (bf16[36,64,1024], bf16[64,1024]) {
  %p0 = bf16[36,64,1024]{2,1,0} parameter(0)
  %p1 = bf16[64,1024]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %n = bf16[64,1024]{1,0} negate(%p1)
  %b = bf16[1,64,1024]{2,1,0} bitcast(%n)
  %z = s32[] constant(0)
""" + body + """
}

ENTRY %main (stack: bf16[36,64,1024], x: bf16[64,1024], i: s32[]) -> (bf16[36,64,1024], bf16[64,1024]) {
  %stack = bf16[36,64,1024]{2,1,0} parameter(0)
  %x = bf16[64,1024]{1,0} parameter(1)
  %i = s32[] parameter(2)
  ROOT %f = (bf16[36,64,1024]{2,1,0}, bf16[64,1024]{1,0}) fusion(%stack, %x, %i), kind=kLoop, calls=%fused_save
}
"""
    slab = 64 * 1024 * 2
    # x read (one slab), the index (4 bytes), the writes and reads listed per case
    assert hlo.analyze(text).bytes == expected_slabs * slab + 4


DOT_AS_SUM = """HloModule m, entry_computation_layout={(bf16[64]{0}, bf16[64,32]{1,0})->(bf16[32]{0}, f32[])}

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

%add_f32 (c: f32[], d: f32[]) -> f32[] {
  %c = f32[] parameter(0)
  %d = f32[] parameter(1)
  ROOT %e = f32[] add(%c, %d)
}

%matvec (p0: bf16[64], p1: bf16[64,32]) -> bf16[32] {
  %p0 = bf16[64]{0} parameter(0)
  %bc = bf16[64,32]{1,0} broadcast(%p0), dimensions={0}
  %p1 = bf16[64,32]{1,0} parameter(1)
  %m = bf16[64,32]{1,0} multiply(%bc, %p1)
  %z = bf16[] constant(0)
  ROOT %r = bf16[32]{0} reduce(%m, %z), dimensions={0}, to_apply=%add, metadata={op_name="jit(f)/while/body/dot_general" stack_frame_id=3}
}

%total (q0: bf16[64,32]) -> f32[] {
  %q0 = bf16[64,32]{1,0} parameter(0)
  %cv = f32[64,32]{1,0} convert(%q0)
  %z2 = f32[] constant(0)
  ROOT %r2 = f32[] reduce(%cv, %z2), dimensions={0,1}, to_apply=%add_f32, metadata={op_name="jit(f)/reduce_sum"}
}

ENTRY %main (x: bf16[64], w: bf16[64,32]) -> (bf16[32], f32[]) {
  %x = bf16[64]{0} parameter(0)
  %w = bf16[64,32]{1,0} parameter(1)
  %f = bf16[32]{0} fusion(%x, %w), kind=kLoop, calls=%matvec
  %g = f32[] fusion(%w), kind=kLoop, calls=%total
  ROOT %t = (bf16[32]{0}, f32[]) tuple(%f, %g)
}
"""


def test_a_dot_made_into_a_multiply_and_a_sum_counts_its_flops():
    """libtpu lowers a one-row matmul (a decode step of one row per chip) to a broadcast, a multiply and a
    reduce, whose metadata still names the ``dot_general``: its FLOPs are the dot's (Qwen3-8B's one-row decode
    on tpu-v5p-16 ``data=8`` counted 7.1 GFLOP for 63 steps before, 961 after). A plain sum counts none."""
    stats = hlo.analyze(DOT_AS_SUM)
    assert stats.flops == 2 * 64 * 32


@pytest.mark.parametrize("m,k,n", [(2, 4096, 12288), (1, 12288, 4096), (168, 4096, 6144)])
def test_a_gpu_matmul_counts_its_flops_once(m, k, n):
    """Compiled for 8 H100s (the weight split over 8 by columns), the GPU compiler splits these matmuls'
    contraction (split-K: a dot of partial sums, then their reduce) or makes a one-row one a multiply and
    a sum in two stages; each reduce still names the ``dot_general``. The count is the matmul's, once."""
    from seal_jax import targets
    from seal_jax.lm import sharding as shd

    mesh = shd.make_mesh("data=1,fsdp=1,tensor=8", devices=targets.devices("h100-8"))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "tensor")))
    text = jax.jit(lambda a, b: a @ b).lower(x, w).compile().as_text()
    assert re.search(r" reduce\(.*dot_general", text)  # the compiler's sums carry the dot's name
    assert hlo.analyze(text).flops == 2 * m * k * n // 8
