"""The planner (seal_jax.plan) checked by the compiler: `seal-jax plan`'s bytes and FLOPs against the same
programs compiled for 8 H100s (deviceless GPU compile) and counted by seal_jax.hlo."""

from __future__ import annotations

import dataclasses
import math

import pytest

import seal_jax as sj
from seal_jax import hlo, targets
from seal_jax import plan as pl
from seal_jax.lm import sharding as shd
from seal_jax.lm.config import preset

CASES = {
    # a small Qwen3 on data=2 x fsdp=4: the prefill is the sampling peak
    "small-fsdp4": (preset("tiny").replace(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=4,
                                           num_heads=8, num_kv_heads=4, head_dim=64, max_position_embeddings=4096),
                    {"data": 2, "fsdp": 4, "tensor": 1}, 256, 512),
    # Qwen3-0.6B's widths and vocabulary (4 of its layers) on data=4 x fsdp=2
    "qwen3-0.6b-fsdp2": (preset("qwen3-0.6b").replace(num_layers=4), {"data": 4, "fsdp": 2, "tensor": 1}, 512, 1024),
}
K, BATCH, SEQUENCES = 4, 8, 8


def peak(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


@pytest.fixture(scope="module", params=list(CASES))
def compiled(request):
    config, mesh_sizes, seq_len, cache = CASES[request.param]
    spec = ",".join(f"{k}={v}" for k, v in mesh_sizes.items())
    lm = sj.LM.abstract(config, mesh=shd.make_mesh(spec, devices=targets.devices("h100-8")), dtype="bfloat16")
    lora = sj.LoraSpec(rank=32, alpha=64)
    train = lm.lower_train(K, SEQUENCES, seq_len, lora, sj.TrainSpec(epochs=1)).compile()
    gen = lm.lower_generate(BATCH, cache // 2, cache // 2, adapters=lm.abstract_adapters(K, lora))
    workload = pl.Workload(candidates=K, seq_len=seq_len, sample_batch=BATCH, dtype="bfloat16", lora_rank=32,
                           cache_len=cache, prompt_len=cache // 2)
    return {"config": config, "mesh": mesh_sizes, "workload": workload, "train": train,
            "prefill": gen["prefill"].compile(), "decode": gen["decode"].compile(),
            "logits": lm.lower_logits(4, 64).compile()}


def test_weights_bytes_are_the_compiled_arguments(compiled):
    mem = pl.memory_plan(compiled["config"], compiled["mesh"], compiled["workload"], "gpu")
    ids = 2 * (4 // compiled["mesh"]["data"]) * 64 * 4  # the logits program's ids and mask (int32)
    assert compiled["logits"].memory_analysis().argument_size_in_bytes - ids == pytest.approx(mem.weights, rel=1e-3)


def test_flops_per_step_match_the_compiled_programs(compiled):
    times = pl.step_times(compiled["config"], compiled["mesh"], compiled["workload"], pl.HARDWARE["h100"])
    peak_flops = pl.HARDWARE["h100"].bf16_flops
    train = hlo.analyze(compiled["train"].as_text())
    steps = max(loop.trips for loop in train.loops if loop.trips)  # the scan over micro-steps
    assert train.flops / steps == pytest.approx(times["train_step"].compute * peak_flops, rel=0.10)
    prefill = hlo.analyze(compiled["prefill"].as_text())
    assert prefill.flops == pytest.approx(times["prefill"].compute * peak_flops, rel=0.10)
    decode = hlo.analyze(compiled["decode"].as_text())
    step = next(loop for loop in decode.loops if loop.trips is None)  # one token per row
    assert step.flops_per_trip == pytest.approx(times["decode_token"].compute * peak_flops, rel=0.10)


def test_remat_policies_order_memory_as_planned(compiled):
    """The three remat policies compiled: "none" at most 10% above the plan ("minimal", the default, is held
    to it both ways in the test below), "full" the least memory; the planner orders them the same way."""
    config, mesh = compiled["config"], compiled["mesh"]
    spec = ",".join(f"{k}={v}" for k, v in mesh.items())
    peaks = {"minimal": peak(compiled["train"])}
    for remat in ("none", "full"):
        lm = sj.LM.abstract(config, mesh=shd.make_mesh(spec, devices=targets.devices("h100-8")), dtype="bfloat16",
                            remat=remat)
        peaks[remat] = peak(lm.lower_train(K, SEQUENCES, compiled["workload"].seq_len, sj.LoraSpec(rank=32, alpha=64),
                                           sj.TrainSpec(epochs=1)).compile())
    plans = {r: pl.memory_plan(config, mesh, dataclasses.replace(compiled["workload"], remat=r), "gpu").train
             for r in peaks}
    assert peaks["full"] < peaks["minimal"] < peaks["none"]
    assert plans["full"] < plans["minimal"] < plans["none"]
    # with the layers unrolled (GPU training, Decoder.train_layers) the compiler frees part of what remat
    # "none" keeps per layer in a scan: the plan bounds it from above (42.1 vs 63.7 MB on small-fsdp4)
    assert 0.6 * plans["none"] <= peaks["none"] <= 1.10 * plans["none"]


def test_peak_memory_matches_the_compiled_programs(compiled):
    """The H100 programs' peaks as planned for a GPU. GPUs store the layer weights split (model.LayerStack), so
    neither training nor decoding holds a copy of them: the GPU plan equals the scanned (TPU) one, and the
    decode program holds the weights and the cache and at most 10% above the planned sampling total."""
    mem = pl.memory_plan(compiled["config"], compiled["mesh"], compiled["workload"], "gpu")
    scanned = pl.memory_plan(compiled["config"], compiled["mesh"], compiled["workload"], "tpu")
    assert mem.train == scanned.train and mem.layer_copy == scanned.layer_copy == 0
    assert peak(compiled["train"]) == pytest.approx(mem.train, rel=0.10)
    assert peak(compiled["prefill"]) == pytest.approx(mem.sample, rel=0.10)
    assert mem.weights + mem.kv_cache <= peak(compiled["decode"]) <= mem.sample * 1.1
    # training unrolled over stacked weights (train_layers "unrolled" on a TPU) copies them for each call
    forced = pl.memory_plan(compiled["config"], compiled["mesh"],
                            dataclasses.replace(compiled["workload"], train_layers="unrolled"), "tpu")
    assert forced.train - scanned.train == forced.layer_copy > 0
    assert math.isfinite(mem.peak)
