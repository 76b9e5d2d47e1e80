"""seal-jax compile: the engine's programs compiled ahead of time for TPU (libtpu) and GPU (CUDA plugin)
targets on this CPU host, from abstract models, and their reports checked against hand counts."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seal_jax as sj
from seal_jax import aot, hlo, layout_search, targets
from seal_jax.cli import main as cli_main
from seal_jax.lm import sharding as shd
from seal_jax.lm.config import preset
from seal_jax.lm.lora import LoraSpec
from seal_jax.lm.params import param_axes, param_shapes, projection_shape
from seal_jax.lm.training import TrainSpec
from seal_jax.lm.types import PROJECTIONS

TINY = preset("tiny")
TINY_LLAMA = TINY.replace(family="llama", qk_norm=False, tie_word_embeddings=True)
# K = 3 heterogeneous candidates: ranks 8/4/8 (padded to 8), their own lr, dropout and epochs
HETERO_LORA = [LoraSpec(rank=8, alpha=16), LoraSpec(rank=4, alpha=4, dropout=0.1), LoraSpec(rank=8, alpha=8)]
HETERO_TRAIN = [TrainSpec(learning_rate=1e-3, epochs=2), TrainSpec(learning_rate=3e-4, epochs=2),
                TrainSpec(learning_rate=1e-4, epochs=1, grad_accum=2)]


def tiny_workload(config, name: str) -> aot.Workload:
    k = 3
    programs = (
        aot.Program("logits", "logits", {"batch": 4, "length": 32}),
        aot.Program("train", "train", {"candidates": k, "sequences": 4, "seq_len": 32, "lora": HETERO_LORA,
                                       "train": HETERO_TRAIN}),
        aot._generate("answer", 4, 32, 16),
        aot._generate("answer_k", 4, 32, 16, adapters=(k, HETERO_LORA)),
        aot._train("sft", 1, 4, 64, LoraSpec.seal_sft(), TrainSpec(learning_rate=3e-4, epochs=2), per_passage=0),
    )
    return aot.Workload(name, config, "bfloat16", None, False, programs, k, "test")


@pytest.fixture(scope="module", params=[("tpu-v5e-4", "data=2,fsdp=2"), ("h100-8", "data=4,fsdp=2")],
                ids=["tpu-v5e-4", "h100-8"])
def reports(request):
    target, mesh = request.param
    out = {}
    for name, config in (("qwen3", TINY), ("llama", TINY_LLAMA)):
        workload = dataclasses.replace(tiny_workload(config, name), mesh=mesh)
        out[name] = aot.compile_workload(workload, target)
    return target, mesh, out


ROW_KEYS = {"program", "target", "mesh", "compile_s", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
            "peak_bytes", "hbm_bytes", "fits", "flops", "bytes", "collectives", "collective_bytes", "min_bytes",
            "roofline_s", "bound", "per_passage", "note"}


def test_every_program_compiles_and_reports(reports):
    target, mesh, out = reports
    for report in out.values():
        names = [r["program"] for r in report["rows"]]
        assert names == ["logits", "train", "answer.prefill", "answer.decode", "answer_k.prefill", "answer_k.decode",
                         "sft"]
        for row in report["rows"]:
            assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
            assert row["target"] == target and row["mesh"] == mesh and row["fits"]
            assert row["flops"] > 0 and row["bytes"] > 0 and row["roofline_s"] > 0
            assert row["bound"] in ("compute", "memory", "collectives")
            assert 0 < row["min_bytes"] <= row["peak_bytes"] <= row["hbm_bytes"]
        decode = next(r for r in report["rows"] if r["program"] == "answer.decode")
        assert decode["per_step"]["steps"] == 15  # max_new_tokens - 1 loop trips after the first token
        assert decode["flops"] == pytest.approx(decode["per_step"]["flops"] * 15, rel=0.05)
        # the table gives each decode's bytes a step against its minimum, and nothing of the kind elsewhere
        table = {line.split(" | ")[0][2:]: line.split(" | ") for line in aot.format_rows(report).splitlines()
                 if line.startswith("| ") and not line.startswith("| program")}
        ratio = decode["per_step"]["bytes"] / decode["min_bytes"]
        assert table["answer.decode"][9] == f"{decode['per_step']['bytes'] / 1e9:.2f} ({ratio:.2f}×)"
        assert table["train"][9] == "–" and len(table["train"]) == 13
    json.dumps(out["qwen3"])  # the JSON rows are plain data


def hand_argument_bytes(config, mesh_sizes: dict[str, int], dtype_bytes: int) -> int:
    """Per-device bytes of the base weights, sharded by hand: every weight with an embedding axis is split
    over fsdp, and the output head (a tied embedding too) over fsdp by its vocabulary (the tiny widths all
    divide); norms are replicated."""
    total = 0
    for path, shape in param_shapes(config).items():
        split = mesh_sizes["fsdp"] if {"embed", "head_vocab"} & set(param_axes(path, config)) else 1
        total += math.prod(shape) * dtype_bytes // split
    return total


def test_argument_bytes_equal_the_sharded_parameters(reports):
    target, mesh, out = reports
    sizes = shd.parse_mesh_spec(mesh)
    for name, config in (("qwen3", TINY), ("llama", TINY_LLAMA)):
        row = next(r for r in out[name]["rows"] if r["program"] == "logits")
        ids = 2 * (4 // sizes["data"]) * 32 * 4  # ids and mask, int32, batch over data
        expected = hand_argument_bytes(config, sizes, 2) + ids
        if target.startswith("tpu"):  # TPU layouts pad small arrays to (8, 128) tiles
            assert expected <= row["argument_bytes"] <= 1.25 * expected
        else:
            assert row["argument_bytes"] == expected


def hand_training_flops(config, *, seq_len: int, rank: int, targets_: tuple[str, ...], lanes: int, steps: int) -> float:
    """Matrix FLOPs of the lane trainer: per micro-step, forward and backward (input gradients) through the
    frozen base's matmuls and head, attention forward (2 matmuls) and backward (4), LoRA forward and both
    gradients (3× its forward); every lane works at every step."""
    c, t = config, seq_len
    layer = sum(math.prod(projection_shape(c, p)) for p in PROJECTIONS)
    head = c.hidden_size * c.vocab_size
    base = 2 * (2 * layer * t * c.num_layers + 2 * head * (t - 1))
    attention = 3 * c.num_layers * 4 * t * t * c.num_heads * c.head_dim
    lora = 3 * c.num_layers * t * sum(2 * rank * sum(projection_shape(c, p)) for p in targets_)
    return float((base + attention + lora) * lanes * steps)


def test_training_flops_equal_a_hand_count(reports):
    target, mesh, out = reports
    sizes = shd.parse_mesh_spec(mesh)
    for name, config in (("qwen3", TINY), ("llama", TINY_LLAMA)):
        row = next(r for r in out[name]["rows"] if r["program"] == "train")
        # 3 candidates of 8, 8 and 4 micro-steps pack onto 3 lanes of 8 steps; 3 lanes do not divide the data
        # axis (nor does the batch of 1), so the trainer pads them to 4 lanes over data (training.data_layout):
        # each device runs 4 / data lanes, with the embedding contraction split over fsdp
        lanes = 4 // sizes["data"]
        full = hand_training_flops(config, seq_len=32, rank=8, targets_=("q_proj", "v_proj"), lanes=lanes, steps=8)
        attention = 3 * config.num_layers * 4 * 32 * 32 * config.num_heads * config.head_dim * lanes * 8
        per_device = (full - attention) / sizes["fsdp"] + attention
        assert row["flops"] == pytest.approx(per_device, rel=0.05), (row["flops"], per_device)


def test_compile_follows_the_target_not_the_host():
    """The decode program compiled for a TPU topology is the accelerator one (no CPU-only barrier around the
    head copy); the same program for the host's CPU devices keeps it."""
    tpu_mesh = shd.make_mesh("data=4", devices=targets.devices("tpu-v5e-4"))
    cpu_mesh = shd.make_mesh("data=4", devices=jax.devices()[:4])
    texts = {}
    for name, mesh in (("tpu", tpu_mesh), ("cpu", cpu_mesh)):
        lm = sj.LM.abstract(TINY, mesh=mesh, dtype="bfloat16")
        assert lm._sampler.platform == name
        texts[name] = lm.lower_generate(4, 16, 8)["decode"].as_text()
    assert "optimization_barrier" in texts["cpu"]
    assert "optimization_barrier" not in texts["tpu"]


def test_a_program_too_big_for_the_device_exits_3(tmp_path, capsys):
    big = TINY.replace(vocab_size=48_000_000, hidden_size=1024, intermediate_size=1024, num_heads=8, num_kv_heads=8,
                       head_dim=128, max_position_embeddings=4096)  # a 98 GB embedding in bf16
    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(big.to_hf_dict()))
    code = cli_main(["compile", "--model", str(folder), "--target", "h100-1", "--only", "answer", "--questions", "1",
                     "--question-len", "16", "--new-tokens", "4"])
    assert code == aot.EXIT_DOES_NOT_FIT
    err = capsys.readouterr().err
    assert "answer.prefill does not fit one h100-1 device" in err and "GB of 84.94 GB" in err


def test_cli_json_and_errors(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = cli_main(["compile", "--model", "tiny", "--target", "h100-8", "--mesh", "data=8", "-k", "2",
                     "--only", "train", "--sequences", "2", "--seq-len", "32", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["target"] == "h100-8" and [r["program"] for r in report["rows"]] == ["train"]
    assert ROW_KEYS <= set(report["rows"][0])
    # --only left out programs a passage runs: no passage time or evaluations per hour from the train row alone
    assert report["summary"] == {"fits": True, "passage_seconds": None, "evaluations_per_hour": None,
                                 "left_out": ["answer", "self_edit", "answer_k"]}
    out = capsys.readouterr().out
    assert "| train |" in out and "One passage by roofline" not in out
    assert "Partial: --only left out answer, self_edit, answer_k, which a passage also runs" in out
    assert cli_main(["compile", "--model", "tiny", "--target", "tpu-v9-1"]) == 2
    assert "unknown target 'tpu-v9-1'" in capsys.readouterr().err
    assert cli_main(["compile", "--model", "tiny", "--target", "h100-8", "--mesh", "data=4"]) == 2
    err = capsys.readouterr().err
    assert "mesh 'data=4' does not lay out target h100-8's 8 devices" in err and err.count("product is 8") == 1
    assert cli_main(["compile", "--model", "tiny", "--target", "h100-8", "--mesh", "data=3,fsdp=-1"]) == 2
    assert "pass --mesh with sizes whose product is 8" in capsys.readouterr().err
    assert cli_main(["compile", "--model", "tiny", "--target", "h100-8", "--only", "nope"]) == 2
    capsys.readouterr()
    # the tiny model's 512-token context holds no 512-token passage and its self-edit: named before compiling
    assert cli_main(["compile", "--model", "tiny", "--target", "h100-8", "--mesh", "data=8"]) == 2
    assert ("self_edit: a 512-token prompt and 1024 new tokens exceed the model's context of 512 tokens"
            in capsys.readouterr().err)
    assert cli_main(["compile", "--model", "tiny", "--target", "h100-8", "--search"]) == 2  # once, not per layout
    assert capsys.readouterr().err.count("exceed the model's context") == 1


def test_workloads_from_the_papers_configs():
    shapes = aot.Shapes()
    seal = aot.workload_from_config("experiments/seal-qwen3-8b.toml", shapes)
    assert seal.config == preset("qwen3-8b") and "not on this machine" in seal.source
    # passage (1) + implications, rewrite, self_qa, replay (5 each) trained together
    assert seal.candidates == 21 and seal.passages == 2 and seal.train_mesh == "data=8"
    assert [p.name for p in seal.programs] == ["answer", "self_edit", "train", "answer_k", "judge"]
    # 3 generating conditions, two passages' self-edits in one call (passages_per_program = 2)
    self_edit = next(p for p in seal.programs if p.name == "self_edit")
    assert self_edit.per_passage == 3 / 2 and self_edit.args["batch"] == 2 * 5
    # the judge as the run calls it, 32 answers a call: both passages' 2 x 8 base answers in one call (half a
    # call each), then 21 x 8 answers under the adapters in 6 calls per passage
    judge = next(p for p in seal.programs if p.name == "judge")
    assert judge.args["batch"] == 32 and judge.per_passage == 0.5 + 6
    # a target with a [hardware] table compiles with its settings; one without, with the top-level ones
    v5e = aot.workload_from_config("experiments/seal-qwen3-8b.toml", shapes, target="tpu-v5e-8")
    assert (v5e.mesh, v5e.train_mesh, v5e.remat, v5e.passages) == ("data=2,fsdp=1,tensor=4", None, "full", 1)
    assert next(p for p in v5e.programs if p.name == "train").args["candidates"] == 21
    v5p = aot.workload_from_config("experiments/seal-qwen3-8b.toml", shapes, target="tpu-v5p-8")
    assert (v5p.mesh, v5p.train_mesh, v5p.remat, v5p.passages) == ("data=1,fsdp=1,tensor=4", "data=2,tensor=2",
                                                                   "minimal", 1)
    h100 = aot.workload_from_config("experiments/seal-qwen3-8b.toml", shapes, target="h100-8")
    assert (h100.mesh, h100.train_mesh, h100.passages) == (seal.mesh, seal.train_mesh, 2)
    search = aot.workload_from_config("experiments/templates-archive-qwen3-8b.toml", shapes)
    assert search.candidates == 15
    assert {"proposal", "fill", "train", "answer_k", "sft"} <= {p.name for p in search.programs}
    restem = aot.workload_from_config("experiments/restem-qwen3-8b.toml", shapes)
    assert "sft" in [p.name for p in restem.programs]
    # the configs whose passages are SEAL's take its layout, and its tables; CPT trains on data=2,tensor=4
    for workload in (restem, search):
        assert (workload.mesh, workload.train_mesh) == (seal.mesh, seal.train_mesh)
    for name in ("restem", "templates-archive"):
        on_v5p = aot.workload_from_config(f"experiments/{name}-qwen3-8b.toml", shapes, target="tpu-v5p-8")
        assert (on_v5p.mesh, on_v5p.train_mesh) == (v5p.mesh, v5p.train_mesh)
    continual = aot.workload_from_config("experiments/continual-qwen3-8b.toml", shapes)
    assert (continual.mesh, continual.train_mesh) == (seal.mesh, None)
    cpt = aot.workload_from_config("experiments/cpt-qwen3-8b.toml", shapes)
    assert (cpt.mesh, cpt.train_mesh) == (seal.mesh, "data=2,tensor=4")
    train = next(p for p in cpt.programs if p.name == "train")
    # 3 conditions' adapters on SEAL's 200 passages, each with its text and 5 self-edits of 15 sequences
    assert cpt.candidates == 0 and train.args["candidates"] == 3 and train.args["sequences"] == 200 * 76
    assert train.per_passage == 0 and next(p for p in cpt.programs if p.name == "answer_k").args["batch"] == 8 * 8
    assert aot.summarize([{"roofline_s": 2.0, "per_passage": 1, "fits": True}], cpt)["evaluations_per_hour"] is None
    with pytest.raises(aot.CompileError, match="pass --model PRESET"):
        aot.model_config("/nowhere/SomeModel")


def test_passages_training_together_fill_the_lanes_one_passage_leaves_idle(capsys):
    """``--passages-per-program 2``: SEAL's 21 candidates per passage leave one of 22 lanes idle on
    ``data=2``; two passages' 42 fill 42 lanes. The training program holds both passages' candidates, counts
    half per passage, and its matrix FLOPs per passage fall by that idle lane (21/22)."""
    shapes = aot.Shapes(sequences=2, seq_len=64)
    flops = {}
    for p in (1, 2):
        workload = aot.workload_from_config("experiments/seal-qwen3-8b.toml", shapes, model="tiny", mesh="data=2,fsdp=4",
                                            passages=p, train_mesh="")  # training on the mesh
        train, answer = (next(q for q in workload.programs if q.name == name) for name in ("train", "answer"))
        assert train.args["candidates"] == 21 * p and train.per_passage == 1 / p and workload.candidates == 21
        assert answer.args["batch"] == shapes.questions * p and answer.per_passage == 1 / p
        report = aot.compile_workload(workload, "h100-8", only=["train"])
        row = report["rows"][0]
        flops[p] = row["flops"] * row["per_passage"]
        assert report["summary"]["passage_seconds"] is None and "answer" in report["summary"]["left_out"]
        whole = aot.summarize(report["rows"], workload)  # as if the train row were all a passage runs
        assert whole["passage_seconds"] == pytest.approx(row["roofline_s"] / p)
        assert layout_search.layout_time(report) == pytest.approx(row["roofline_s"] / p)
        assert ("2 passages per program" in aot.format_rows({**report, "summary": whole})) == (p == 2)
    assert flops[2] / flops[1] == pytest.approx(21 / 22, rel=0.02)
    with pytest.raises(aot.CompileError, match="knowledge and ReST-EM configs only"):
        aot.workload_from_config("experiments/templates-archive-qwen3-8b.toml", shapes, passages=2)
    assert cli_main(["compile", "--model", "tiny", "--target", "h100-8", "--passages-per-program", "2"]) == 2
    assert "needs a run config" in capsys.readouterr().err


def test_training_on_its_own_mesh_layout(capsys):
    """``--train-mesh data=8``: the training program compiles on the replicated layout (no collective), a
    ``train.placement`` row (the all-gather that places the weights, once per training call) joins it, and
    the training row's peak counts the weights that stay in the generation layout."""
    shapes = aot.Shapes(sequences=2, seq_len=64)
    workload = aot.workload_from_config("experiments/seal-qwen3-8b.toml", shapes, model="tiny", mesh="data=2,fsdp=4",
                                        train_mesh="data=8")
    assert workload.train_mesh == "data=8"
    report = aot.compile_workload(workload, "h100-8", only=["train", "answer"])
    rows = {r["program"]: r for r in report["rows"]}
    train, placement = rows["train"], rows["train.placement"]
    assert train["mesh"] == "data=8" and train["collectives"] == {} and rows["answer.prefill"]["mesh"] == "data=2,fsdp=4"
    weights = sum(math.prod(s) * 2 for s in param_shapes(TINY).values())  # bfloat16, split 4 ways by fsdp
    assert weights / 4 <= train["resident_bytes"] <= weights / 2
    assert train["peak_bytes"] == (train["argument_bytes"] + train["output_bytes"] + train["temp_bytes"]
                                   - train["alias_bytes"] + train["resident_bytes"])
    assert set(placement["collectives"]) == {"all-gather"} and placement["per_passage"] == train["per_passage"]
    assert "training on data=8" in aot.format_rows(report)
    assert aot.workload_from_config("experiments/seal-qwen3-8b.toml", shapes, model="tiny", train_mesh="").train_mesh is None
    assert cli_main(["compile", "experiments/seal-qwen3-8b.toml", "--model", "tiny", "--target", "h100-8",
                     "--train-mesh", "data=3"]) == 2
    assert "train mesh 'data=3'" in capsys.readouterr().err


def test_a_configs_attention_is_what_its_programs_compile_with(tmp_path, capsys):
    """``attention = "chunked"`` in a run config, or ``--attention chunked`` (the way out where a machine's JAX
    rejects the fused kernel), reaches the compiled programs: no Triton kernel in them, where the GPU's
    default calls it; the report says which attention compiled."""
    config = tmp_path / "chunked.toml"
    config.write_text('attention = "chunked"\n' + Path("experiments/seal-qwen3-8b.toml").read_text())
    assert aot.workload_from_config(config, aot.Shapes(), model="tiny").attention == "chunked"
    kernel = "__gpu$xla.gpu.triton"
    workload = aot.workload_from_config("experiments/seal-qwen3-8b.toml", aot.Shapes(), model="tiny", mesh="data=1",
                                        train_mesh="")
    assert workload.attention is None
    report = aot.compile_workload(workload, "h100-1", only=["answer"])
    assert report["attention"] == "triton" and "attention triton" in aot.format_rows(report)
    assert report["rows"][0]["program"] == "answer.prefill" and report["rows"][0]["custom_calls"].get(kernel, 0) > 0
    out = tmp_path / "chunked.json"
    assert cli_main(["compile", "--model", "tiny", "--target", "h100-1", "--mesh", "data=1", "--only", "answer",
                     "--attention", "chunked", "--json", str(out)]) == 0
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["attention"] == "chunked" and report["rows"][0]["custom_calls"].get(kernel, 0) == 0


def test_summary_line_counts_with_thousands_separators():
    report = {"workload": "seal-qwen3-8b", "target": "h100-8", "mesh": "data=8", "dtype": "bfloat16",
              "model": "preset qwen3-8b", "rows": [], "passages": 1, "candidates": 21,
              "summary": {"fits": True, "passage_seconds": 0.0246, "evaluations_per_hour": 3070027.4, "left_out": []}}
    assert ("One passage by roofline: 0.02 s per device; 3,070,027 self-edit evaluations per hour on the whole "
            "mesh, one passage at a time (21 candidates per passage).") in aot.format_rows(report)


def test_roofline_picks_the_bound():
    t = targets.get_target("h100-8")
    hw = t.hardware
    # no overlap: compute (1 s) or memory (2 s), whichever is larger, plus communication (3 s), per program
    rows = [{"flops": hw.bf16_flops, "bytes": 2 * hw.hbm_bandwidth, "collective_bytes": 1.5 * hw.link_bandwidth,
             "per_passage": 0.5}, {"flops": 0, "bytes": 0, "collective_bytes": 0, "per_passage": None}]
    assert aot.no_overlap_seconds(rows, t) == pytest.approx(0.5 * (2 + 3))
    assert aot.no_overlap_seconds([{"program": "train", "error": "RESOURCE_EXHAUSTED"}], t) is None
    assert aot.roofline(hw.bf16_flops, 0, 0, t) == (1.0, "compute")
    # float32 programs at the TF32 peak on NVIDIA GPUs (JAX's default matmul precision), half the bf16 one
    assert aot.roofline(hw.bf16_flops, 0, 0, t, "float32") == (pytest.approx(989 / 494.7), "compute")
    assert aot.no_overlap_seconds([{"flops": hw.bf16_flops, "bytes": 0, "per_passage": 1, "dtype": "float32"}],
                                  t) == pytest.approx(989 / 494.7)
    assert aot.roofline(0, 2 * hw.hbm_bandwidth, 0, t) == (2.0, "memory")
    seconds, bound = aot.roofline(0, 0, hw.link_bandwidth, t)
    assert bound == "collectives" and seconds == pytest.approx(2.0)
    assert np.isclose(targets.get_target("h200-8").hbm_bytes, 151_397_597_184)
    with pytest.raises(targets.TargetError, match="unknown target"):
        targets.get_target("h300-8")


def test_hlo_counts_a_tpu_convolution_program():
    """On a TPU target the compiler writes the model's matmuls as convolutions; the logits program's matrix
    FLOPs still equal the hand count: matmuls (embedding contraction split over fsdp) plus attention."""
    mesh = shd.make_mesh("data=2,fsdp=2", devices=targets.devices("tpu-v5e-4"))
    lm = sj.LM.abstract(TINY, mesh=mesh, dtype="bfloat16")
    stats = hlo.analyze(lm.lower_logits(4, 64).compile().as_text())
    c, tokens = TINY, 2 * 64  # per device: 2 rows of 64
    layer = sum(math.prod(projection_shape(c, p)) for p in PROJECTIONS)
    matmuls = 2 * tokens * (c.num_layers * layer + c.hidden_size * c.vocab_size) / 2
    attention = c.num_layers * 4 * 2 * 64 * 64 * c.num_heads * c.head_dim
    assert stats.flops == pytest.approx(matmuls + attention, rel=0.01)


def test_an_abstract_model_refuses_to_run():
    lm = sj.LM.abstract("tiny")
    assert lm.is_abstract and all(p.shape for p in lm.params().values())
    with pytest.raises(ValueError, match="abstract"):
        lm.logits(np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="abstract"):
        lm.generate_ids([[1, 2]])
    with pytest.raises(ValueError, match="abstract"):
        lm.train_adapters([["some text"]])


def test_tpu_decode_scans_the_layers_and_moves_about_its_minimum():
    """On a TPU the decode program scans the layers over the stacked weights and one stacked cache: per
    step it reads about its arguments once (the weights shard, cache and adapters; the embedding only
    through the new tokens' rows), with no per-call copy of the weights in its temporaries. A config whose
    layer weights (0.5 GB per device) do not fit on-chip memory, as an 8B model's do not; the unrolled
    decode of CPUs and GPUs compiled for the same TPU reads ~7x its minimum and copies the weights."""
    config = TINY.replace(vocab_size=8192, hidden_size=2048, intermediate_size=8192, num_layers=8, num_heads=16,
                          num_kv_heads=8, head_dim=128)
    mesh = shd.make_mesh("data=2,fsdp=2", devices=targets.devices("tpu-v5e-4"))
    lm = sj.LM.abstract(config, mesh=mesh, dtype="bfloat16")
    assert lm._sampler.scan_layers
    embedding = config.vocab_size * config.hidden_size * 2 // 2  # bf16, split over fsdp = 2
    for adapters in (None, lm.abstract_adapters(2, LoraSpec.seal())):
        row = aot.compile_row("decode", lm.lower_generate(4, 32, 16, adapters=adapters)["decode"],
                              targets.get_target("tpu-v5e-4"), unknown_trips=15)
        minimum = row["argument_bytes"] - embedding
        assert 0.5 * minimum <= row["per_step"]["bytes"] <= 1.3 * minimum, (row["per_step"]["bytes"] / minimum,
                                                                              adapters is not None)
        assert row["temp_bytes"] <= 0.1 * minimum, (row["temp_bytes"] / minimum, adapters is not None)


def test_tpu_decode_reads_the_weights_and_the_cache_in_their_layouts(monkeypatch):
    """On a TPU the key, value and head weights lie input-minor and the KV cache with its slots major
    (lm/layouts.py): the prefill writes the cache in the layout the decode reads and hands back, and the
    decode holds its arguments and less than 10% more. In the default layouts libtpu copied those weights
    and the cache into its own on every call (v5p-8, tensor=4: 14.5% more without adapters). Adapters
    readied for it (``LM.ready_adapters``) come cast, joined and laid out as the decode reads them: no copy
    of them among its temporaries, where float32 ones are cast and laid out on every call."""
    from seal_jax.lm import layouts

    config = TINY.replace(vocab_size=8192, hidden_size=2048, intermediate_size=8192, num_layers=8, num_heads=16,
                          num_kv_heads=8, head_dim=128)
    mesh = shd.make_mesh("data=1,tensor=4", devices=targets.devices("tpu-v5p-8"))

    def temporaries(adapters: int, lora: LoraSpec | None = None, ready: bool = False) -> float:
        lm = sj.LM.abstract(config, mesh=mesh, dtype="bfloat16")
        given = lm.abstract_adapters(adapters, lora or LoraSpec.seal(), ready=ready) if adapters else None
        lowered = lm.lower_generate(8, 128, 64, greedy=True, adapters=given)
        prefill, decode = lowered["prefill"].compile(), lowered["decode"].compile()
        if ready:  # the decode reads the adapters in the layouts they are given in
            wanted = [layouts.adapter_layout("tpu", x.shape) for x in jax.tree.leaves(given.weights)]
            assert [x.format.layout for x in jax.tree.leaves(given.weights)] == wanted
            read = [f.layout.major_to_minor for f in jax.tree.leaves(decode.input_formats[0][3])]
            assert read == [w.major_to_minor for w in wanted], read
        written = [f.layout.major_to_minor for f in jax.tree.leaves(prefill.output_formats[1])]
        read = [f.layout.major_to_minor for f in jax.tree.leaves(decode.input_formats[0][1])][:len(written)]
        handed_back = [f.layout.major_to_minor for f in jax.tree.leaves(decode.output_formats[2])][:len(written)]
        assert written[:2] == read[:2] == handed_back[:2], (written, read, handed_back)
        k_proj, head = decode.input_formats[0][0]["layers"]["k_proj"], decode.input_formats[0][0]["lm_head"]
        assert (k_proj.layout.major_to_minor, head.layout.major_to_minor) == (
            ((0, 2, 1), (1, 0)) if layouts.LAID_OUT else ((0, 1, 2), (0, 1)))
        memory = decode.memory_analysis()
        return memory.temp_size_in_bytes / memory.argument_size_in_bytes

    laid_out = {k: temporaries(k) for k in (0, 2)}
    assert max(laid_out.values()) <= 0.1, laid_out
    wide = LoraSpec(rank=64, alpha=128.0, targets="all")  # the templates config's adapters
    readied, cast = temporaries(8, wide, ready=True), temporaries(8, wide)
    assert readied <= 0.1 < cast and readied < cast / 2, (readied, cast)  # 7.3% against 18.6%
    monkeypatch.setattr(layouts, "LAID_OUT", ())
    default = temporaries(0)
    assert default > 0.1 and default > 1.5 * laid_out[0], (default, laid_out)


def test_gpu_decode_under_stacked_adapters_moves_about_its_minimum():
    """On an H100 a greedy decode step under K stacked adapters reads about its arguments once (weights,
    cache, adapters; the embedding only through the new tokens' rows): the adapters are cast and each
    input's ``a`` matrices joined once per call, not on every step (1.22x before), and a greedy program
    holds no sampling branch, whose top-p search reads the vocabulary's logits ~30 times. The program's
    memory is its arguments and less than 10% more (with the weights stored stacked, a copy of them more);
    with the adapters readied (``LM.ready_adapters``, as the loop answers) it holds no copy of them."""
    config = TINY.replace(vocab_size=8192, hidden_size=2048, intermediate_size=8192, num_layers=8, num_heads=16,
                          num_kv_heads=8, head_dim=128)
    mesh = shd.make_mesh("data=1", devices=targets.devices("h100-1"))
    lm = sj.LM.abstract(config, mesh=mesh, dtype="bfloat16")
    embedding = config.vocab_size * config.hidden_size * 2  # bf16
    layers = sum(2 * math.prod(shape) for path, shape in param_shapes(config).items() if path.startswith("layers."))
    per_step, temps = {}, {}
    joined = 4 * config.num_layers * config.hidden_size * 2 * LoraSpec.seal().rank * 2  # q and v's `a`, bf16
    for k, greedy, ready in ((0, True, False), (4, True, False), (4, False, False), (4, True, True)):
        adapters = lm.abstract_adapters(k, LoraSpec.seal(), ready=ready) if k else None
        row = aot.compile_row("decode", lm.lower_generate(4, 32, 16, adapters=adapters, greedy=greedy)["decode"],
                              targets.get_target("h100-1"), unknown_trips=15)
        per_step[k, greedy, ready] = row["per_step"]["bytes"] / (row["argument_bytes"] - embedding)
        temps[k, greedy, ready] = row["temp_bytes"]
        # the program holds its arguments (weights, cache, adapters) and 10% more at most: the layer weights,
        # stored split, are read where they lie
        assert row["temp_bytes"] <= 0.1 * row["argument_bytes"], (k, greedy, row["temp_bytes"])
    # float32 adapters are cast and joined once per call, a copy held by the program; readied ones are not
    assert temps[4, True, False] >= joined > temps[4, True, True], (temps, joined)
    assert per_step[4, True, True] <= 1.15, per_step
    per_step = {key[:2]: v for key, v in per_step.items() if not key[2]}
    assert per_step[0, True] <= 1.1 and per_step[4, True] <= 1.15, per_step
    assert per_step[4, True] < per_step[4, False], per_step  # the sampled program samples
    # stored stacked, a GPU decode copies the layer weights once per call and holds the copy
    stacked = sj.LM.abstract(config, mesh=mesh, dtype="bfloat16", layer_storage="stacked")
    assert stacked.lower_generate(4, 32, 16, greedy=True)["decode"].compile().memory_analysis().temp_size_in_bytes >= layers


def test_compiler_options_compile_the_gpu_programs_without_split_k():
    """``LM.compiler_options`` are the XLA options of every program of the model: on an H100 the matmuls
    of a 4-row decode and of a training step are split along their inner dimension by default (float32
    partial sums written and read back), and not with ``xla_gpu_experimental_force_split_k=1`` (``seal-jax
    bench --split-k-ab`` times both); the default programs stay the LM's when the options are put back."""
    config = TINY.replace(vocab_size=8192, hidden_size=2048, intermediate_size=8192, num_layers=2, num_heads=16,
                          num_kv_heads=8, head_dim=128)
    mesh = shd.make_mesh("data=1", devices=targets.devices("h100-1"))
    lm = sj.LM.abstract(config, mesh=mesh, dtype="bfloat16")
    default = lm._sampler
    h100 = targets.get_target("h100-1")
    # a split matmul: a dot batched over the splits (the weight's reshaped inner dimension), float32 out
    split_dot = re.compile(r"= f32\[[^]]*\]\{[^}]*\} dot\(.*rhs_batch_dims=\{1\}")

    def compiled() -> dict[str, tuple[float, int]]:
        """Bytes a decode step and a training program access, and how many float32 dots batched like a split
        matmul each holds (attention's backward has such dots too, under JAX 0.11's XLA)."""
        decode = lm.lower_generate(4, 32, 16, greedy=True)["decode"]
        train = lm.lower_train(1, 2, 64, LoraSpec.seal(), TrainSpec.seal(epochs=1))
        out = {}
        for name, lowered in (("decode", decode), ("train", train)):
            row = aot.compile_row(name, lowered, h100, unknown_trips=15)
            split = sum(map(bool, map(split_dot.search, lowered.compile().as_text().splitlines())))
            out[name] = (row["per_step"]["bytes"] if name == "decode" else row["bytes"], split)
        return out

    by_default, logits = compiled(), lm._logits_fn
    lm.compiler_options = {"xla_gpu_experimental_force_split_k": 1}
    assert lm._sampler is not default and lm._sampler.compiler_options == lm.compiler_options
    assert lm._logits_fn is not logits
    unsplit = compiled()
    lm.compiler_options = {}
    assert lm._sampler is default and lm._logits_fn is logits
    for name in ("decode", "train"):
        assert by_default[name][1] > unsplit[name][1], (name, unsplit, by_default)
        assert name == "train" or unsplit[name][1] == 0, unsplit
        assert unsplit[name][0] < by_default[name][0], (name, unsplit, by_default)  # no partial sums


@pytest.mark.parametrize("config", [TINY, TINY_LLAMA], ids=["untied", "tied"])
def test_no_program_all_reduces_full_vocabulary_logits(config):
    """The output head is split over its vocabulary: the logits, training and prefill programs compiled for
    8 H100s (data=4, fsdp=2) all-reduce nothing as wide as the vocabulary (256 in the tiny config, a width
    nothing else has). With the head split over its input width, as before, each of them all-reduced
    partial logits ``[B, T, V]``; so did a tied head, the embedding split over its width, until the
    embedding of a tied model was split as the head is. (A sampled decode step gathers no ``[V]`` row
    either: ``tests/test_next_token.py``.)"""
    import re

    mesh = shd.make_mesh("data=4,fsdp=2", devices=targets.devices("h100-8"))
    lm = sj.LM.abstract(config, mesh=mesh, dtype="bfloat16")
    assert config.vocab_size == 256 and 256 not in (config.hidden_size, config.intermediate_size, config.q_dim)
    programs = {"logits": lm.lower_logits(4, 32), "train": lm.lower_train(4, 4, 32),
                "prefill": lm.lower_generate(4, 16, 8)["prefill"]}
    for name, lowered in programs.items():
        text = lowered.compile().as_text()
        reduced = [m.group(1) for m in re.finditer(r"= (\S+\[[\d,]*\]\S*) all-reduce(?:-start)?\(", text)]
        assert reduced, name  # the fsdp-split projections still all-reduce: the pattern finds them
        wide = [shape for shape in reduced if re.search(r"[\[,]256[\],]", shape)]
        assert not wide, (name, wide)


@pytest.mark.parametrize("target,mesh_spec", [("h100-8", "data=1,fsdp=4,tensor=2"), ("tpu-v5p-8", "data=1,fsdp=2,tensor=2")])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_one_token_is_taken_from_the_split_embedding_without_gathering_it(target, mesh_spec, tied):
    """A decode step of one row looks up one token's embedding. Compiled with the table split over the
    vocabulary (over ``tensor`` and its width over ``fsdp``; tied to the head, over both and its width
    whole), ``embed_tokens`` takes it where it lies (an all-reduce of the row). For 8 H100s plain indexing
    all-gathers the table instead (the GPU compiler lowers a one-index lookup to a dynamic slice: 1.2 GB a step
    for Qwen3-8B on tensor=8, when continual learning's one-row self-edits decoded there); libtpu does not.
    A GPU now also decodes one row per device as two (``sampling.pads_one_row``)."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec

    from seal_jax.lm.model import embed_tokens

    mesh = shd.make_mesh(mesh_spec, devices=targets.devices(target))
    config = TINY_LLAMA if tied else TINY
    spec = shd.param_sharding(mesh, "embedding", (256, 64), config).spec
    assert tuple(spec) == ((("fsdp", "tensor"), None) if tied else ("tensor", "fsdp"))
    table = jax.ShapeDtypeStruct((256, 64), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))

    def gathered(fn):  # the shapes of every all-gather (an async one's tuple holds its operand's and result's)
        return re.findall(r"= (\(?[^=]*?) all-gather(?:-start)?\(", jax.jit(fn).lower(table, ids).compile().as_text())

    plain = [g for g in gathered(lambda t, i: t[i]) if "[256," in g]  # the table's rows gathered
    assert bool(plain) == (target == "h100-8"), plain
    assert gathered(embed_tokens) == []


def test_an_accelerator_decodes_one_row_per_device_as_two():
    """On a GPU a decode of one row per device runs the two-row program (its matmuls as GEMMs: a one-row
    step's are multiply-and-reduce fusions that write weight-sized products, 2.2x the bytes of a two-row step
    for Qwen3-8B on h100-8's tensor=8); on a TPU where a device holds at least half of each weight (libtpu
    copies the projections into another layout on every one-row step: 1.25x the roofline time on v5p-8's
    data=4); CPUs, and TPUs whose weights are split four ways or more, keep one row
    (``sampling.pads_one_row``)."""
    from seal_jax.lm import sampling

    gpu = shd.make_mesh("data=1,fsdp=4,tensor=2", devices=targets.devices("h100-8"))
    assert [sampling.batch_bucket(n, gpu) for n in (1, 2, 3)] == [2, 2, 4]
    assert sampling.batch_bucket(1, gpu, decode=False) == 1  # rows scored whole: a matmul row per token
    assert sampling.batch_bucket(1, shd.make_mesh("data=1,fsdp=1,tensor=1", devices=jax.devices()[:1])) == 1
    # two rows on each device of a data axis: 8 questions on data=8, or 2 on data=2
    data8 = shd.make_mesh("data=8", devices=targets.devices("h100-8"))
    assert [sampling.batch_bucket(n, data8) for n in (1, 8, 9)] == [16, 16, 16]
    assert sampling.batch_bucket(8, data8, decode=False) == 8
    data2 = shd.make_mesh("data=2,tensor=4", devices=targets.devices("h100-8"))
    assert [sampling.batch_bucket(n, data2) for n in (1, 2, 3)] == [4, 4, 4]
    # the planner, given mesh sizes only, is told the platform
    assert [sampling.batch_bucket(1, None, platform=p) for p in ("gpu", "tpu", "cpu")] == [2, 2, 1]
    # a TPU pads where a device holds half of each weight or more, not where they are split four ways
    sizes = {"data=4": 8, "data=2,tensor=2": 4, "data=1,tensor=4": 1, "data=1,fsdp=2,tensor=2": 1,
             "data=2,fsdp=2": 4}
    tpu = {spec: sampling.batch_bucket(n, shd.make_mesh(spec, devices=targets.devices("tpu-v5p-8")))
           for spec, n in (("data=4", 4), ("data=2,tensor=2", 2), ("data=1,tensor=4", 1),
                           ("data=1,fsdp=2,tensor=2", 1), ("data=2,fsdp=2", 2))}
    assert tpu == sizes
    # one row under K >= 2 stacked adapters already gives the matmuls K rows: no padding
    assert [sampling.batch_bucket(1, gpu, stacked=k) for k in (1, 2, 4)] == [2, 1, 1]
    assert sampling.batch_bucket(8, data8, stacked=5) == 8
    lm = sj.LM.abstract(TINY, mesh=gpu, dtype="bfloat16")
    one, two = (lm.lower_generate(b, 16, 8)["decode"].as_text() for b in (1, 2))
    assert one == two
    adapters = lm.abstract_adapters(3, LoraSpec(rank=4, targets=("q_proj", "v_proj")))
    one, two = (lm.lower_generate(b, 16, 8, adapters=adapters)["decode"].as_text() for b in (1, 2))
    assert one != two and "tensor<3x1xi1>" in one  # the rows' done flags, [K, 1]


def test_gpu_training_reads_each_layers_weights_where_they_lie():
    """On an H100 the layer weights are stored split (the LM's choice for GPUs, model.LayerStack) and the
    training program runs the layers unrolled over them: no layer weight is sliced (copied) inside the loop
    over steps, as the scanned layers' every step does, and the program accesses fewer bytes by at least
    those copies. Unrolled over stacked weights, each call first copies them (the temporaries grow by them)."""
    from flax import nnx

    mesh = shd.make_mesh("data=1", devices=targets.devices("h100-1"))
    config = TINY.replace(num_layers=5)  # a layer count no other axis has: the stacked shapes are the weights'
    stacked = {tuple(shape) for path, shape in param_shapes(config).items() if path.startswith("layers.")}
    weights = sum(2 * math.prod(shape) for shape in stacked)  # bf16
    stats, loop_slices, temps = {}, {}, {}
    for form in ("split", "unrolled", "scan"):
        lm = sj.LM.abstract(config, mesh=mesh, dtype="bfloat16", layer_storage=None if form == "split" else "stacked")
        assert lm.model.train_layers == "unrolled"  # the GPU's choice
        assert lm.layer_storage == ("split" if form == "split" else "stacked")
        if form == "scan":
            lm.model.train_layers = form
            lm.graphdef, lm.state = nnx.split(lm.model)
        compiled = lm.lower_train(2, 8, 64).compile()
        temps[form] = compiled.memory_analysis().temp_size_in_bytes
        text = compiled.as_text()
        stats[form] = hlo.analyze(text)
        comps, entry = hlo.parse_module(text)
        inside = set()  # computations that run inside a while loop (the steps, and the scanned layers)
        for comp in comps.values():
            for ins in comp.instrs:
                if ins.opcode == "while":
                    inside.add(hlo._attr(ins.attrs, "body"))
        grow = True
        while grow:  # and whatever they call
            called = {c for name in inside for ins in comps[name].instrs for key in ("calls", "to_apply")
                      if (c := hlo._attr(ins.attrs, key)) in comps}
            called |= {b for name in inside for ins in comps[name].instrs
                       for b in hlo._attr_list(ins.attrs, "branch_computations")}
            grow = not called <= inside
            inside |= called
        loop_slices[form] = [ins.name for name in inside for ins in comps[name].instrs
                             if ins.opcode in ("slice", "dynamic-slice")
                             and tuple(hlo.shape_dims(comps[name].by_name[ins.operands[0]].shape)
                                       if ins.operands[0] in comps[name].by_name else ()) in stacked]
    assert loop_slices["scan"], "the pattern finds the scan's per-step weight slices"
    assert not loop_slices["unrolled"] and not loop_slices["split"], loop_slices
    # every step of the scan copies each layer's weights (a write and a read at least) that the unrolled
    # layers read where they lie
    steps = max(loop.trips or 0 for loop in stats["split"].loops)
    assert steps >= 40 and stats["scan"].bytes - stats["split"].bytes >= 2 * steps * weights
    assert stats["split"].flops <= stats["scan"].flops  # and no more arithmetic
    assert temps["unrolled"] - temps["split"] >= weights  # the per-call copy that split storage does without
