"""The capacity planner: byte counts against real configs, arrays and shardings; mesh errors; verdicts; CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seal_jax import plan as pl
from seal_jax.cli import main as cli_main
from seal_jax.lm.config import preset
from seal_jax.lm.model import KVCache
from seal_jax.lm.params import param_shapes
from seal_jax.lm.sharding import make_mesh, param_sharding

QWEN3_8B_PARAMS = 8_190_735_360  # Qwen3-8B's published parameter count (model card / safetensors index)


def test_qwen3_8b_preset_has_the_real_parameter_count():
    cfg = preset("qwen3-8b")
    assert cfg.num_parameters() == QWEN3_8B_PARAMS
    assert sum(math.prod(s) for s in param_shapes(cfg).values()) == QWEN3_8B_PARAMS


def test_weight_bytes_are_params_times_dtype_over_shards():
    cfg = preset("qwen3-8b")
    # norms are (layers, None) / (None,): replicated; every matrix divides by fsdp=4 and tensor=2
    norms = cfg.num_layers * (2 * cfg.hidden_size + 2 * cfg.head_dim) + cfg.hidden_size
    mesh = {"data": 2, "fsdp": 4, "tensor": 2}
    assert pl.weight_bytes_per_device(cfg, mesh, "bfloat16") == (QWEN3_8B_PARAMS - norms) * 2 // 8 + norms * 2
    assert pl.weight_bytes_per_device(cfg, {"data": 8, "fsdp": 1, "tensor": 1}, "float32") == QWEN3_8B_PARAMS * 4


def test_weight_bytes_match_jax_shard_shapes_on_a_real_mesh():
    # a vocabulary that does not divide by tensor=4: the embedding and head must be replicated on that axis;
    # tied, the embedding is split as the head (sharding.param_axes)
    for tied in (False, True):
        cfg = preset("tiny").replace(vocab_size=250, tie_word_embeddings=tied)
        for spec in ("data=1,fsdp=2,tensor=4", "data=2,fsdp=4,tensor=1"):
            mesh = make_mesh(spec)
            expected = 0
            for path, shape in param_shapes(cfg).items():
                expected += math.prod(param_sharding(mesh, path, shape, cfg).shard_shape(shape)) * 4
            assert pl.weight_bytes_per_device(cfg, dict(mesh.shape), "float32") == expected, (tied, spec)
    assert pl.shard_shape((250, 64), ("vocab", "embed"), {"data": 1, "fsdp": 2, "tensor": 4}) == (250, 32)


def test_lora_bytes_by_hand_and_against_real_adapters():
    cfg = preset("qwen3-8b")
    # q_proj 4096 -> 4096, v_proj 4096 -> 1024, rank 32, 36 layers
    per_adapter = 36 * 32 * ((4096 + 4096) + (4096 + 1024))
    assert per_adapter == 15_335_424
    assert pl.lora_parameters(cfg, 32, ("q_proj", "v_proj")) == per_adapter
    w = pl.Workload(candidates=4, seq_len=256, dtype="bfloat16")
    mem = pl.memory_plan(cfg, {"data": 2, "fsdp": 4, "tensor": 1}, w)
    # float32: the candidates of the device's two lanes (the adapters live where their lanes train them)
    assert mem.lora_params == 2 * per_adapter * 4
    assert mem.lora_state == 2 * 2 * per_adapter * 4  # AdamW mu and nu of the lanes' candidates
    assert mem.lanes == 2 and mem.accumulators == 2 * 2 * per_adapter * 4

    from seal_jax.lm.lora import LoraSpec, init_adapters

    tiny = preset("tiny")
    params = {k: np.zeros(s, np.float32) for k, s in param_shapes(tiny).items()}
    spec = LoraSpec(rank=8, alpha=16.0, targets=("q_proj", "v_proj", "down_proj"))
    real = init_adapters(params, [spec], [jax.random.PRNGKey(0)])
    assert sum(x.size for x in jax.tree.leaves(real)) == pl.lora_parameters(tiny, 8, spec.targets)


def test_kv_cache_bytes_by_hand_and_against_the_model_cache():
    cfg = preset("qwen3-8b")
    w = pl.Workload(candidates=4, seq_len=2048, sample_batch=8, dtype="bfloat16")
    mem = pl.memory_plan(cfg, {"data": 2, "fsdp": 4, "tensor": 1}, w)
    # k and v, 36 layers, 4 adapters, 8 rows over data=2, 2048 slots, 8 KV heads of 128, 2 bytes
    assert mem.kv_cache == 2 * 36 * 4 * 4 * 2048 * 8 * 128 * 2
    tiny = preset("tiny")
    cache = jax.eval_shape(lambda: KVCache.create(tiny, 8, 128, jnp.float32))
    one = pl.memory_plan(tiny, {"data": 1, "fsdp": 1, "tensor": 1},
                         pl.Workload(candidates=1, seq_len=128, sample_batch=8, dtype="float32"))
    assert one.kv_cache == sum(x.size * 4 for x in (*cache.k, *cache.v))  # keys [B, KVH, Dh, S] and values [B, KVH, S, Dh] per layer
    longer = pl.memory_plan(cfg, {"data": 2, "fsdp": 4, "tensor": 1}, dataclasses.replace(w, cache_len=4096))
    assert longer.kv_cache == 2 * mem.kv_cache and longer.train == mem.train


def test_remat_policies_keep_what_they_say():
    cfg = preset("qwen3-8b")
    mesh = {"data": 1, "fsdp": 8, "tensor": 1}
    w = pl.Workload(candidates=1, seq_len=1024, dtype="bfloat16", remat="none")
    full = pl.memory_plan(cfg, mesh, w)
    remat = pl.memory_plan(cfg, mesh, dataclasses.replace(w, remat=True))
    minimal = pl.memory_plan(cfg, mesh, dataclasses.replace(w, remat="minimal"))
    assert pl.memory_plan(cfg, mesh, dataclasses.replace(w, remat=False)) == full
    assert pl.memory_plan(cfg, mesh, dataclasses.replace(w, remat="full")) == remat
    # the attention kernels split the 8 KV heads over fsdp = 8, and the projections' outputs follow them
    assert pl.attention_split(cfg, mesh) == 8
    one_layer = pl.layer_activation_bytes(cfg, 1, 1024, 2, 1, split=8)
    # the fused attention kernels keep no scores: a layer keeps only its activations, linear in T
    assert one_layer == 1024 * (4 * 4096 + (3 * 4096 + 4 * 1024) // 8 + 4 * 12288) * 2
    assert pl.layer_activation_bytes(cfg, 1, 2048, 2, 1, split=8) == 2 * one_layer
    assert pl.layer_activation_bytes(cfg, 1, 1024, 2, 1) == 1024 * (4 * 4096 + 3 * 4096 + 4 * 1024 + 4 * 12288) * 2
    assert full.activations == 36 * one_layer
    assert remat.activations == 36 * 1024 * 4096 * 2 + one_layer
    # layer input + q (4096 / 8) + k, v (1024 / 8 each) + gate, up (12288 each)
    assert minimal.activations == 36 * 1024 * (4096 + (4096 + 2 * 1024) // 8 + 2 * 12288) * 2
    assert remat.train < minimal.train < full.train and remat.sample == minimal.sample == full.sample
    assert pl.Workload().remat == "minimal"
    with pytest.raises(pl.PlanError, match="remat must be one of"):
        pl.Workload(remat="some")


def test_cross_entropy_is_chunked_not_the_whole_logits():
    """Training keeps one chunk of float32 logits (lm/cross_entropy.py), not [T, V]: doubling T adds only the
    gradient direction [T, D] once the sequence spans several chunks."""
    cfg = preset("qwen3-8b")
    mesh = {"data": 1, "fsdp": 8, "tensor": 1}
    short = pl.memory_plan(cfg, mesh, pl.Workload(candidates=1, seq_len=1024))
    long = pl.memory_plan(cfg, mesh, pl.Workload(candidates=1, seq_len=2048))
    assert long.logits - short.logits == 1024 * 4096 * 2
    assert short.logits < 1024 * cfg.vocab_size * 4  # less than the float32 logits of the sequence


def test_mesh_spec_errors_name_the_problem():
    assert pl.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(pl.PlanError, match="no devices to fill a -1"):
        pl.parse_mesh("data=-1,fsdp=4")
    with pytest.raises(pl.PlanError, match="unknown mesh axes.*'model'"):
        pl.parse_mesh("model=2")
    with pytest.raises(pl.PlanError, match="bad mesh spec part"):
        pl.parse_mesh("data:2")
    with pytest.raises(pl.PlanError, match="positive"):
        pl.parse_mesh("data=0")
    with pytest.raises(pl.PlanError, match="unknown hardware 'a100'"):
        pl.make_plan("qwen3-8b", "data=1", pl.Workload(), "a100")
    with pytest.raises(pl.PlanError, match="unknown model 'qwen9'"):
        pl.make_plan("qwen9", "data=1", pl.Workload())
    with pytest.raises(pl.PlanError, match="candidates must be a positive"):
        pl.Workload(candidates=0)


def test_fits_verdict_and_threshold():
    cfg = preset("qwen3-8b")
    w = pl.Workload(candidates=4, seq_len=2048, dtype="bfloat16", remat=True)
    one_chip = {"data": 1, "fsdp": 1, "tensor": 1}
    v = pl.verdict(cfg, one_chip, w, pl.HARDWARE["tpu-v5e"])  # 16.4 GB of weights on a 16 GB chip
    assert not v.fits and "does NOT fit" in v.message and "raise fsdp or tensor" in v.message
    host = {"data": 2, "fsdp": 4, "tensor": 1}
    assert pl.verdict(cfg, host, w, pl.HARDWARE["h100"]).fits
    peak = pl.memory_plan(cfg, host, w, "gpu").peak
    exact = dataclasses.replace(pl.HARDWARE["h100"], hbm_bytes=peak / pl.USABLE_FRACTION * (1 + 1e-9))
    short = dataclasses.replace(pl.HARDWARE["h100"], hbm_bytes=peak / pl.USABLE_FRACTION * (1 - 1e-6))
    assert pl.verdict(cfg, host, w, exact).fits
    assert not pl.verdict(cfg, host, w, short).fits
    no_remat = pl.verdict(cfg, host, dataclasses.replace(w, remat=False, candidates=8, seq_len=4096), pl.HARDWARE["h100"])
    assert not no_remat.fits and "--remat full" in no_remat.message


def test_candidates_not_dividing_data_split_rows_or_pad_lanes():
    """As the trainer splits the data axis (training.data_layout): lanes when K divides, else the
    micro-batch rows when the batch divides (same activations as K lanes of batch/data rows), else lanes
    padded with idle ones (warned)."""
    w = pl.Workload(candidates=5, seq_len=512)
    plan = pl.make_plan("qwen3-8b", "data=2,fsdp=4", w, "h100")
    assert plan.memory.lanes == 3  # 5 candidates padded to 6 lanes over data=2
    assert any("pads to 6 lanes, 1 of them idle" in x for x in plan.warnings)
    assert pl.make_plan("qwen3-8b", "data=2,fsdp=4", dataclasses.replace(w, candidates=6), "h100").memory.lanes == 3
    rows = pl.make_plan("qwen3-8b", "data=8", pl.Workload(candidates=1, seq_len=512, batch=8), "h100")
    one = pl.make_plan("qwen3-8b", "data=1", pl.Workload(candidates=1, seq_len=512, batch=1), "h100")
    assert rows.memory.lanes == 1 and not rows.warnings
    assert rows.memory.activations == one.memory.activations and rows.memory.logits == one.memory.logits
    assert pl.lanes_per_device(1, 8, {"data": 8}) == (1, 1)


def test_step_times_by_hand():
    cfg = preset("qwen3-8b")
    # matmul parameters: everything but the norms and the (looked-up, untied) embedding
    norms = cfg.num_layers * (2 * cfg.hidden_size + 2 * cfg.head_dim) + cfg.hidden_size
    assert pl.matmul_parameters(cfg) == QWEN3_8B_PARAMS - norms - cfg.vocab_size * cfg.hidden_size
    mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    w = pl.Workload(candidates=4, seq_len=1024, sample_batch=8, dtype="bfloat16")
    hw = pl.HARDWARE["h100"]
    t = pl.step_times(cfg, mesh, w, hw)
    rows = 4 * 8 // 2
    # prefill: projections and adapters over the 1024 prompt tokens split over fsdp = 4, the head on the last
    # position only, attention by the fused kernel over the 36 of 64 128-token tiles on or below the
    # diagonal, its heads split as the cache's (over tensor = 1: on every device)
    head = cfg.vocab_size * cfg.hidden_size
    lora = pl.lora_parameters(cfg, 32, ("q_proj", "v_proj"))
    matmuls = 2 * ((pl.matmul_parameters(cfg) - head + lora) * 1024 + head) / 4
    assert pl.attention_split(cfg, mesh, fsdp=False) == 1
    flops = rows * (matmuls + 4 * 1024**2 * cfg.q_dim * 36 * (36 / 64))
    assert t["prefill"].compute == pytest.approx(flops / 989e12)
    # a training micro-step: base forward + input gradients (no weight gradients), adapters 3 passes, the
    # attention kernel's forward (2 matmuls over the 36 of 64 128-token tiles on or below the diagonal), with
    # the default remat "minimal" its forward again, and its backward (7 matmuls: on a GPU over 32-token
    # tiles, 528 of 1,024), the 8 KV heads split over fsdp = 4, for K/data = 2 lanes of one sequence
    assert pl.attention_split(cfg, mesh) == 4
    unit = 2 * 1024**2 * cfg.q_dim * 36 / 4
    train = 2 * ((2 * 2 * pl.matmul_parameters(cfg) * 1024 + 3 * 2 * lora * 1024) / 4
                 + 4 * unit * 36 / 64 + 7 * unit * 528 / 1024)
    assert t["train_step"].compute == pytest.approx(train / 989e12)
    none = pl.step_times(cfg, mesh, dataclasses.replace(w, remat="none"), hw)["train_step"].compute
    assert none == pytest.approx((train - 2 * 2 * unit * 36 / 64) / 989e12)
    tpu = pl.step_times(cfg, mesh, w, pl.HARDWARE["tpu-v5p"])["train_step"].compute
    assert tpu == pytest.approx((train + 2 * 7 * unit * (36 / 64 - 528 / 1024)) / 459e12)
    mem = pl.memory_plan(cfg, mesh, w)
    assert t["decode_token"].memory == pytest.approx((mem.weights + mem.kv_cache) / 3.35e12)
    assert t["decode_token"].bound == "memory"
    gathered = QWEN3_8B_PARAMS * 2
    assert t["train_step"].comm == pytest.approx(2 * gathered * 3 / 4 / 450e9)


def test_cli_plan_exit_codes_and_json(capsys):
    args = ["plan", "--model", "qwen3-8b", "--mesh", "data=2,fsdp=4,tensor=1", "--candidates", "4",
            "--seq-len", "4096", "--remat"]
    assert cli_main(args + ["--hardware", "h100"]) == 0
    out = capsys.readouterr().out
    assert "8,190,735,360 parameters" in out and "| h100 | 80 GB | yes |" in out
    assert cli_main(args + ["--hardware", "tpu-v5e"]) == 3
    assert "does NOT fit" in capsys.readouterr().out
    assert cli_main(args + ["--hardware", "all", "--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"] == QWEN3_8B_PARAMS and data["devices"] == 8
    assert set(data["verdicts"]) == set(pl.HARDWARE)
    assert data["verdicts"]["h200"]["fits"] and not data["verdicts"]["tpu-v5e"]["fits"]
    assert cli_main(["plan", "--mesh", "data=-1"]) == 2  # a bad request, as `seal-jax compile` answers one
    assert capsys.readouterr().err.startswith("seal-jax plan: mesh 'data=-1': the planner has no devices to fill")


def test_float32_times_use_the_float32_matmul_peak(capsys):
    """fp32 matmuls run at JAX's default precision: TF32 on NVIDIA GPUs (half the bf16 peak on an H100), one
    bf16 pass on a TPU; the footer says which peak the times use."""
    cfg = preset("qwen3-8b")
    mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    bf16 = pl.Workload(candidates=4, seq_len=1024, dtype="bfloat16")
    fp32 = dataclasses.replace(bf16, dtype="float32")
    for name, ratio in (("h100", 989 / 494.7), ("a100-80g", 2.0), ("tpu-v5p", 1.0)):
        hw = pl.HARDWARE[name]
        for step in ("train_step", "prefill", "decode_token"):
            slow, fast = pl.step_times(cfg, mesh, fp32, hw)[step], pl.step_times(cfg, mesh, bf16, hw)[step]
            assert slow.compute == pytest.approx(ratio * fast.compute), (name, step)
    assert cli_main(["plan", "--dtype", "fp32", "--hardware", "h100"]) in (0, 3)
    out = capsys.readouterr().out
    assert "compute time uses each chip's dense matmul peak for float32" in out
    assert "- h100 (float32 at the TF32 peak, 494.7 TFLOP/s):" in out
    assert cli_main(["plan", "--hardware", "tpu-v5p", "--json"]) in (0, 3)
    assert json.loads(capsys.readouterr().out)["peak_flops"] == {"tpu-v5p": 459e12}


def test_a_prompt_longer_than_the_cache_is_refused(capsys):
    with pytest.raises(pl.PlanError, match="prompt_len 100 exceeds cache_len 10"):
        pl.Workload(prompt_len=100, cache_len=10)
    with pytest.raises(pl.PlanError, match=r"prompt_len 300 exceeds cache_len 256 \(the default: seq_len\)"):
        pl.Workload(seq_len=256, prompt_len=300)
    assert pl.Workload(seq_len=256, prompt_len=256).prompt_tokens == 256
    assert cli_main(["plan", "--prompt-len", "100", "--cache-len", "10"]) == 2
    err = capsys.readouterr().err
    assert "prompt_len 100 exceeds cache_len 10" in err and "--cache-len" in err
