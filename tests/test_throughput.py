"""The SEAL-workload suite (`seal-jax bench --preset ... --random-weights`) and bench/device.sh, on the CPU.

bench/device.sh is what a GPU machine runs; here it runs end to end with the tiny preset (the same CLI path,
``seal-jax bench --preset tiny --random-weights --quick``, PyTorch reference included), and the report it
writes is checked: schema, MFU and bandwidth fractions in (0, 1], rooflines from the compiled programs, and
the evaluations per hour equal to what the measured pieces give. The command line's own parts (options,
attention choice, the table) are tests/test_throughput_cli.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import seal_jax as sj
from seal_jax import hlo, plan, throughput
from seal_jax.lm import api
from seal_jax.lm.config import preset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-sh")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "SEAL_BENCH_PRESET": "tiny",
           "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a one-accelerator machine has
    run = subprocess.run(["bash", str(REPO / "bench" / "device.sh")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "bench-tiny.log").is_file()
    return json.loads((out / "bench-tiny.json").read_text()), run.stdout


def test_device_script_prints_the_table_last_and_writes_the_report(report):
    data, stdout = report
    tail = stdout[stdout.index("| piece |"):]
    assert "evaluation" in tail and "self-edit evaluations per hour" in tail
    assert data["suite"] == "seal-workload" and data["dtype"] == "float32"
    assert data["model"] == "preset tiny, random weights"
    assert data["code"]["seal_jax"] and data["code"]["source"]  # which tree was measured (seal_jax.provenance)
    machine = data["machine"]
    assert machine["platform"] == "cpu" and machine["devices"] == 1
    assert machine["peak_flops"] == machine["ceilings"]["matmul_flops"] > 0
    ceilings = machine["ceilings"]
    assert machine["peak_bandwidth"] == ceilings["memory_bandwidth"] == max(
        ceilings["read_bandwidth"], ceilings["copy_bandwidth"], ceilings["read_bandwidth_working_set"]) > 0
    k = data["shapes"]["candidates"]
    names = [r["name"] for r in data["rows"]]
    assert names == ["decode_b1", f"decode_b{data['shapes']['questions']}", "prefill", "self_edit", f"train_k{k}",
                     f"decode_k{k}x{data['shapes']['questions']}", "evaluation"]
    assert data["only"] is None  # every row
    # a CPU runs its own attention, unchecked (a GPU or TPU checks its fused kernel first: test_throughput_cli)
    assert data["attention"] == "causal_blocks" and data["attention_note"] is None


def test_every_row_has_its_fractions_roofline_and_reference(report):
    data, _ = report
    rows = {r["name"]: r for r in data["rows"]}
    for name, r in rows.items():
        assert r["seconds"] > 0 and r["rate"] > 0, name
        if name == "evaluation":
            continue
        assert 0 < r["mfu"] <= 1, name
        assert r["useful_flops"] > 0 and r["roofline_s"] > 0, name
        assert r["vs_roofline"] == pytest.approx(r["seconds"] / r["roofline_s"])
        assert r["tokens"] / r["seconds"] == pytest.approx(r["rate"])
        if name.startswith("decode") or name == "self_edit":
            assert 0 < r["bandwidth_fraction"] <= 1, name
            assert r["min_bytes"] > 0
    for name in ("decode_b1", "decode_b8", "self_edit", "train_k5", "decode_k5x8", "evaluation"):
        assert rows[name]["reference_s"] > 0 and rows[name]["ratio"] == pytest.approx(
            rows[name]["reference_s"] / (rows[name]["detail"].get("generate_s") or rows[name]["seconds"])), name
    assert rows["prefill"]["reference_s"] is None
    # the roofline of decoding is one of the compiled decode program, counted per step over the whole loop
    assert rows["decode_b8"]["detail"]["roofline"]["decode"]["flops"] > rows["decode_b8"]["detail"]["roofline"][
        "prefill"]["flops"] / 100


def test_evaluations_per_hour_follow_from_the_measured_pieces(report):
    data, _ = report
    row = data["rows"][-1]
    k = data["shapes"]["candidates"]
    parts = row["detail"]["parts_s"]
    assert set(parts) == {"self_edit", "train", "answer_k"}
    assert row["seconds"] == pytest.approx(sum(parts.values()))
    assert row["rate"] == pytest.approx(3600 * k / row["seconds"])
    assert data["summary"] == {"evaluation_seconds": row["seconds"], "evaluations_per_hour": row["rate"],
                               "candidates": k, "reference_errors": {}}
    assert row["detail"]["wall_s"] >= row["seconds"] * 0.999
    # each piece of the evaluation takes about as long as its own row (same programs, warm)
    rows = {r["name"]: r for r in data["rows"]}
    assert parts["train"] < 5 * rows[f"train_k{k}"]["seconds"]
    assert parts["self_edit"] < 5 * rows["self_edit"]["seconds"]
    ref = row["detail"]["reference_parts_s"]
    assert row["reference_s"] == pytest.approx(ref["self_edit"] + ref["train"] + ref["answer"])
    assert ref["answer"] == pytest.approx(k * rows["decode_b8"]["reference_s"])


def test_device_script_times_decodes_and_training_again_without_split_k(report):
    """bench/device.sh passes --split-k-ab: each decode row and the training row also hold their piece timed,
    and compiled for its roofline, with the model's programs compiled without XLA's split-K rewrite
    (``LM.compiler_options``: a GPU's option, so here the same CPU programs), and the table says so; no other
    row has it."""
    data, stdout = report
    varied = []
    for r in data["rows"]:
        variants = r["detail"].get("variants")
        if not r["name"].startswith(("decode", "train")):
            assert variants is None, r["name"]
            continue
        varied.append(r["name"])
        v = variants["split_k_off"]
        assert v["options"] == throughput.SPLIT_K_OFF == {"xla_gpu_experimental_force_split_k": 1}
        assert v["seconds"] > 0 and v["speedup"] == pytest.approx(r["seconds"] / v["seconds"]), r["name"]
        assert v["vs_roofline"] == pytest.approx(v["seconds"] / v["roofline_s"])
        assert v["roofline_s"] == pytest.approx(r["roofline_s"], rel=1e-6), r["name"]  # a CPU ignores it
        assert f"{r['name']} with split_k_off: {v['seconds']:.4g} s" in stdout[stdout.index("| piece |"):]
    k, q = data["shapes"]["candidates"], data["shapes"]["questions"]
    assert varied == ["decode_b1", f"decode_b{q}", f"train_k{k}", f"decode_k{k}x{q}"]


def test_a_variant_runs_under_its_options_and_gives_the_models_back():
    """``Suite._variant`` measures with ``LM.compiler_options`` set to the variant's (its programs compiled
    apart from the default ones, which stay the model's) and puts the model's own back, also where the
    measurement fails (an option this JAX rejects): the variant then says why, and the row keeps its figures."""
    lm = sj.LM.random("tiny", dtype="float32")
    peaks = throughput.Peaks("cpu", "cpu", 1, 1e11, 1e10, 1e9, "test")
    suite = throughput.Suite(lm, throughput.SuiteShapes.quick(), peaks, repeats=1, reference=None,
                             variants={"split_k_off": throughput.SPLIT_K_OFF})
    default = lm._sampler
    seen = []

    def measure() -> tuple[float, float]:
        seen.append(dict(lm.compiler_options))
        lm.generate_ids([[5, 6, 7]], sj.SamplingParams(max_new_tokens=3))
        return 0.5, 0.25

    out = suite._variant(throughput.SPLIT_K_OFF, measure, seconds=1.0)
    assert seen == [throughput.SPLIT_K_OFF] and lm.compiler_options == {} and lm._sampler is default
    assert out == {"options": throughput.SPLIT_K_OFF, "seconds": 0.5, "speedup": 2.0, "roofline_s": 0.25,
                   "vs_roofline": 2.0}
    assert ("sampler", *throughput.SPLIT_K_OFF.items()) in api._PROGRAMS[(lm.graphdef, lm.mesh)]

    def fails() -> tuple[float, float]:
        raise ValueError("no such option")

    assert suite._variant({"xla_no_such_option": 1}, fails, 1.0) == {
        "options": {"xla_no_such_option": 1}, "error": "ValueError: no such option"}
    assert lm.compiler_options == {}
    with pytest.raises(ValueError, match="compiler_options take XLA option names"):
        lm.compiler_options = {"xla_gpu_experimental_force_split_k": [1]}


def test_useful_flops_are_the_hand_count():
    c = preset("qwen3-8b")
    n_mm = plan.matmul_parameters(c)
    head = c.vocab_size * c.hidden_size
    lora = c.num_layers * 32 * ((c.hidden_size + c.q_dim) + (c.hidden_size + c.kv_dim))
    assert plan.lora_parameters(c, 32, ("q_proj", "v_proj")) == lora
    # decode: 3 steps after a 10-token prompt attend over 11, 12 and 13 positions
    expected = 2 * (3 * 2 * (n_mm + lora) + 4 * (11 + 12 + 13) * c.q_dim * c.num_layers)
    assert throughput.decode_flops(c, 2, 10, 3, lora_rank=32) == pytest.approx(expected)
    # prefill: the head on the last position only, causal attention
    t = 100
    assert throughput.prefill_flops(c, 1, t) == pytest.approx(
        2 * (n_mm - head) * t + 2 * head + 2 * t * t * c.q_dim * c.num_layers)
    # training: 4 per base parameter and token (no weight gradients), 6 per adapter parameter
    assert throughput.train_flops(c, 1, t, 32) == pytest.approx(
        t * (4 * n_mm + 6 * lora) + 6 * t * t * c.q_dim * c.num_layers)


def test_device_kinds_map_to_the_peak_table():
    assert throughput.hardware_for("NVIDIA H200").name == "h200"
    assert throughput.hardware_for("NVIDIA H100 80GB HBM3").name == "h100"
    assert throughput.hardware_for("NVIDIA A100-SXM4-80GB").name == "a100-80g"
    assert throughput.hardware_for("TPU v5 lite").name == "tpu-v5e"
    assert throughput.hardware_for("TPU v5p").name == "tpu-v5p"
    assert throughput.hardware_for("TPU v5").name == "tpu-v5p"
    assert throughput.hardware_for("TPU v6 lite").name == "tpu-v6e"
    assert throughput.hardware_for("cpu") is None


def test_shapes_the_model_cannot_hold_are_named():
    with pytest.raises(throughput.BenchError, match="exceeds the model's context of 512 tokens; use --quick"):
        throughput.SuiteShapes().check(preset("tiny").max_position_embeddings)
    with pytest.raises(throughput.BenchError, match=r"passage_len \+ self_edit_tokens = 2 exceeds the model's "
                                                    "context of 1 token; use --quick"):
        throughput.SuiteShapes(passage_len=1, self_edit_tokens=1).check(1)
    with pytest.raises(throughput.BenchError, match="candidates must be a positive integer"):
        throughput.SuiteShapes(candidates=0).check(4096)


def test_suite_shapes_are_those_seal_jax_compile_predicts():
    """`seal-jax compile --model P -k 5 --new-tokens 256` compiles the suite's programs at the suite's shapes,
    so its roofline predictions (BENCHMARKS.md) compare with the measured rows."""
    from seal_jax.aot import Shapes, workload_from_flags

    suite, shapes = throughput.SuiteShapes(), Shapes()
    programs = {p.name: p.args for p in workload_from_flags("qwen3-8b", shapes, candidates=suite.candidates,
                                                               dtype="bfloat16", mesh=None, remat=False,
                                                               lora_rank=suite.lora_rank,
                                                               new_tokens=suite.self_edit_tokens).programs}
    assert programs["answer"] == {"batch": suite.questions, "prompt_len": suite.question_len,
                                  "max_new_tokens": suite.answer_tokens, "greedy": True}  # the suite's answers
    assert programs["self_edit"] == {"batch": suite.candidates, "prompt_len": suite.passage_len,
                                     "max_new_tokens": suite.self_edit_tokens, "greedy": False}
    train = programs["train"]
    assert (train["candidates"], train["sequences"], train["seq_len"]) == (suite.candidates, suite.sequences,
                                                                           suite.seq_len)
    assert train["train"].epochs == suite.epochs and train["lora"].rank == suite.lora_rank
    assert programs["answer_k"]["adapters"][0] == suite.candidates


def test_device_script_runs_the_suite_again_on_chunked_attention_after_a_crash(tmp_path):
    """A suite that dies of a crash signal (a kernel compiler's abort at the model's shapes) is run once more
    on chunked attention, its report and log beside the first; not where the attention was chosen. (A stand-in
    Python dies of SIGSEGV in place of the suite.)"""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
if [[ " $* " == *" -m seal_jax.cli bench "* ]]; then
  if [[ " $* " == *" --attention chunked"* ]]; then echo "| piece | (chunked)"; exit 0; fi
  kill -SEGV $$
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "SEAL_BENCH_PRESET": "tiny", "JAX_PLATFORMS": "cpu",
           "SEAL_BENCH_INSTALL": "0"}
    run = subprocess.run(["bash", str(REPO / "bench" / "device.sh")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "the suite died of signal 11; running it again with --attention chunked" in run.stderr
    benches = [line for line in calls.read_text().splitlines() if "seal_jax.cli bench" in line]
    # the second run leaves the split-K timings out (a second compile of each program, where one crashed)
    assert benches == [f"-m seal_jax.cli bench --preset tiny --random-weights --out {out}/bench-tiny.json "
                       "--quick --split-k-ab",
                       f"-m seal_jax.cli bench --preset tiny --random-weights --out {out}/bench-tiny-chunked.json "
                       "--quick --attention chunked"]
    assert run.stdout.rstrip().endswith(f"log in {out}/bench-tiny-chunked.log (exit 0)")
    assert (out / "bench-tiny.log").is_file() and "(chunked)" in (out / "bench-tiny-chunked.log").read_text()
    calls.unlink()
    env["SEAL_BENCH_ARGS"] = "--attention triton"
    run = subprocess.run(["bash", str(REPO / "bench" / "device.sh")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert run.returncode == 139 and "running it again" not in run.stderr
    assert len([line for line in calls.read_text().splitlines() if "seal_jax.cli bench" in line]) == 1


def test_hlo_this_module_cannot_read_leaves_the_rows_without_rooflines(report, capsys):
    """A newer JAX whose compiled HLO :mod:`seal_jax.hlo` cannot read costs the rooflines, not the run: the
    first failure is said once (and kept for the report), and no more rooflines are compiled."""
    data, _ = report
    assert data["roofline_note"] is None
    suite = throughput.Suite.__new__(throughput.Suite)
    suite.rooflines, suite.roofline_error = True, None
    tried = []

    def unreadable():
        tried.append(1)
        raise hlo.HloParseError("unknown element type f4e2m1fn")

    assert suite._rooflines_of(unreadable) is None and suite._rooflines_of(unreadable) is None
    assert tried == [1] and suite.roofline_error == (
        "seal_jax.hlo cannot read this JAX's compiled HLO (unknown element type f4e2m1fn)")
    assert capsys.readouterr().out.count("roofline: none from here on") == 1
    assert suite._rooflines_of(lambda: {"roofline_s": 1.0}) is None  # compiles no more


def test_device_script_stops_at_once_where_flax_cannot_load_with_the_machines_jax(tmp_path):
    """An image whose flax predates its jax (flax 0.12.8's NNX with jax 0.11.2) fails in the version check,
    in seconds, with what to install, before any suite runs. (A stand-in flax whose NNX fails to import.)"""
    fake = tmp_path / "site" / "flax"
    (fake / "nnx").mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.12.8"\n')
    (fake / "nnx" / "__init__.py").write_text(
        "raise AttributeError(\"module 'jax.experimental.hijax' has no attribute 'HiPrimitive'\")\n")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "SEAL_BENCH_PRESET": "tiny",
           "JAX_PLATFORMS": "cpu", "SEAL_BENCH_INSTALL": "0", "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run(["bash", str(REPO / "bench" / "device.sh")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert run.returncode == 1
    import jax

    assert (f"device.sh: flax 0.12.8 cannot load flax.nnx with jax {jax.__version__} (AttributeError: module "
            "'jax.experimental.hijax' has no attribute 'HiPrimitive'); install a flax release made for this jax"
            ) in run.stderr.replace("\n", " ")
    assert not (tmp_path / "out" / "bench-tiny.log").exists()
    (fake / "__init__.py").write_text('raise ImportError("No module named \'flax\'")\n')  # no flax at all
    run = subprocess.run(["bash", str(REPO / "bench" / "device.sh")], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert run.returncode == 1 and f"device.sh: flax is not installed in {sys.executable}" in run.stderr


def test_a_partial_runs_evaluation_compiles_its_programs_before_its_clock_starts(report, monkeypatch):
    """`--only evaluation`: no earlier row compiled the evaluation's programs (as a full run's do), so the
    suite compiles them first, untimed; the section its ``wall_s`` times compiles nothing, in either kind of
    run. The summary has a full run's keys, its figures the row's."""
    config = preset("tiny").replace(num_layers=1)  # programs no other test of this process compiled
    lm = sj.LM.random(config, dtype="float32")
    peaks = throughput.Peaks("cpu", "cpu", 1, 1e11, 1e10, 1e9, "test")
    suite = throughput.Suite(lm, throughput.SuiteShapes.quick(), peaks, repeats=1, reference=None,
                             rooflines=False, only=["evaluation"])
    compiles, timing = [], []

    def compiled(event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append("timed" if timing else "before")

    parts = suite._evaluation_parts

    def timed(*args):
        timing.append(True)
        try:
            return parts(*args)
        finally:
            timing.clear()

    monkeypatch.setattr(suite, "_evaluation_parts", timed)
    rows = []
    jax.monitoring.register_event_duration_secs_listener(compiled)
    try:
        summary = suite.run(rows.append)
    finally:
        jax.monitoring.unregister_event_duration_listener(compiled)
    assert "before" in compiles and "timed" not in compiles
    [row] = rows
    assert row.name == "evaluation" and set(row.detail["parts_s"]) == {"self_edit", "train", "answer_k"}
    assert row.detail["wall_s"] >= row.seconds * 0.999
    assert "wall_s: the section that times the parts, end to end, its programs compiled before it" in row.detail[
        "what"]
    assert summary == {"evaluation_seconds": row.seconds, "evaluations_per_hour": row.rate, "candidates": 5,
                       "reference_errors": {}}
    assert list(summary) == list(report[0]["summary"])  # a full run's keys, in its order
