"""The compile targets: names that mean what a user rents, and devices that match them."""

from __future__ import annotations

import pytest

from seal_jax import targets


@pytest.mark.parametrize("name, chips, cores", [
    ("tpu-v5p-8", 4, 8), ("tpu-v5p-16", 8, 16), ("tpu-v5p-128", 64, 128), ("tpu-v5p-256", 128, 256)])
def test_v5p_names_count_tensorcores_like_cloud_tpu(name: str, chips: int, cores: int) -> None:
    """A Cloud TPU `v5p-N` has N TensorCores, two per chip, and JAX sees one device per chip: the target
    `tpu-v5p-8` is the one-host slice of 4 chips, not 8 (the `2x2x1` topology in Google's v5p table)."""
    t = targets.get_target(name)
    assert t.chips == chips == cores // 2
    x, y, z = (int(n) for n in t.topology.split(":")[1].split("x"))
    assert x * y * z == chips


def test_v5e_and_gpu_names_count_devices() -> None:
    for name in ("tpu-v5e-4", "tpu-v5e-8", "tpu-v6e-8", "h100-8", "h200-1"):
        assert targets.get_target(name).chips == int(name.rsplit("-", 1)[1])


def test_libtpu_gives_the_v5p_8_its_four_chips() -> None:
    """The compiler agrees: the deviceless `v5p:2x2x1` topology has four devices, one per chip."""
    pytest.importorskip("libtpu", reason="the [aot] extra (libtpu) is part of the test install")
    devs = targets.devices("tpu-v5p-8")
    assert len(devs) == 4
    assert {d.device_kind for d in devs} == {"TPU v5"}
    assert targets.target_of_devices(devs).name == "tpu-v5p-8"  # a run on them finds its [hardware] table


def test_the_deviceless_gpus_are_their_target() -> None:
    if not any(targets._has_module(f"jax_plugins.xla_cuda{v}") for v in (13, 12)):
        pytest.skip("the [aot] extra (the CUDA plugin) is part of the test install")
    assert targets.target_of_devices(targets.devices("h100-8")).name == "h100-8"


def test_either_cuda_plugin_compiles_for_gpus_and_neither_is_named(monkeypatch) -> None:
    """The CUDA 12 or the CUDA 13 PJRT plugin (JAX 0.11 images bring the latter) registers the "cuda"
    platform the deviceless GPUs are compiled with; without either, the error says what to install."""
    seen, real = [], targets._has_module
    assert real("seal_jax.targets") and not real("no_such_package.module")

    def has(name: str) -> bool:
        seen.append(name)
        return False

    monkeypatch.setattr(targets, "_has_module", has)
    with pytest.raises(targets.TargetError, match=r"compiling for h100-8 needs the CUDA PJRT plugin: pip install "
                                                  r"'seal-jax\[aot\]'.*'jax\[cuda13-local\]'"):
        targets.devices.__wrapped__("h100-8")  # past the cache of each target's devices
    assert seen == ["jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"]


@pytest.mark.parametrize("platform, kind, count, name", [
    ("tpu", "TPU v5", 8, "tpu-v5p-16"), ("tpu", "TPU v5p", 4, "tpu-v5p-8"), ("tpu", "TPU v5 lite", 8, "tpu-v5e-8"),
    ("tpu", "TPU v6 lite", 8, "tpu-v6e-8"), ("gpu", "NVIDIA H100 80GB HBM3", 8, "h100-8"),
    ("gpu", "NVIDIA H100 PCIe", 1, "h100-1"), ("gpu", "NVIDIA H200", 8, "h200-8"),
    ("gpu", "NVIDIA A100-SXM4-80GB", 8, "a100-80g-8"),
    ("gpu", "NVIDIA A100-SXM4-40GB", 8, None), ("tpu", "TPU v5", 6, None), ("gpu", "NVIDIA H100 80GB HBM3", 4, None),
    ("cpu", "cpu", 8, None), ("tpu", "TPU v5 lite", 16, None)])
def test_devices_are_matched_to_their_target_by_kind_and_count(platform, kind, count, name) -> None:
    """What JAX's devices say on a rented slice names the target whose settings a config gives it; a kind
    or count that no target has (an A100 40GB, a 4-GPU host) is none."""
    found = targets.target_of(platform, kind, count)
    assert (found.name if found else None) == name


def test_an_unknown_target_lists_the_known_ones_with_their_devices() -> None:
    with pytest.raises(targets.TargetError, match=r"unknown target 'tpu-v5p-6'.*tpu-v5p-8 \(4 devices\)"):
        targets.get_target("tpu-v5p-6")


def test_a_busy_libtpu_lockfile_is_tried_again_then_named(monkeypatch) -> None:
    """libtpu lets one process at a time hold it: a lockfile found busy (as by a process starting beside
    this one) is tried again, and when it stays busy the error names the lockfile and what to do."""
    import jax

    monkeypatch.setattr(targets.time, "sleep", lambda s: None)
    target = targets.get_target("tpu-v5e-4")

    class Topologies:
        def __init__(self, busy: int):
            self.busy, self.calls = busy, 0

        def get_topology_desc(self, **kwargs):
            self.calls += 1
            if self.calls <= self.busy:
                raise jax.errors.JaxRuntimeError("ABORTED: Internal error when accessing libtpu multi-process lockfile.")
            return "topology"

    once = Topologies(busy=2)
    assert targets._tpu_topology(once, target) == "topology" and once.calls == 3
    always = Topologies(busy=99)
    with pytest.raises(targets.TargetError, match="another process holds it.*remove /tmp/libtpu_lockfile"):
        targets._tpu_topology(always, target, tries=3)
    assert always.calls == 3


def test_other_libtpu_errors_are_not_retried() -> None:
    import jax

    class Broken:
        calls = 0

        def get_topology_desc(self, **kwargs):
            Broken.calls += 1
            raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: unknown topology")

    with pytest.raises(jax.errors.JaxRuntimeError, match="unknown topology"):
        targets._tpu_topology(Broken(), targets.get_target("tpu-v5e-4"))
    assert Broken.calls == 1
