"""The SEAL-workload suite's command line (`seal-jax bench --preset ... --random-weights`), on the CPU: its
options and refusals, the attention it chooses and checks, the model it builds, the report and the table.

The suite's own measurements, and bench/device.sh running it end to end, are tests/test_throughput.py's.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

from seal_jax import throughput, throughput_cli
from seal_jax.cli import main
from seal_jax.lm.config import preset


def _report(**changes):
    """A suite report as ``throughput_cli.main`` writes it: one decode row (timed again with split-K off) and
    the evaluation row, with the summary those give."""
    decode = throughput.Row(name="decode_b1", seconds=0.5, tokens=64, rate=128.0, mfu=0.01,
                            bandwidth_fraction=0.25, roofline_s=0.1, vs_roofline=5.0, reference_s=1.0, ratio=2.0,
                            detail={"variants": {"split_k_off": {"seconds": 0.25, "speedup": 2.0,
                                                                 "roofline_s": 0.1},
                                                 "other": {"error": "ValueError: no such option"}}})
    evaluation = throughput.Row(name="evaluation", seconds=2.0, tokens=0, rate=9000.0, unit="evaluations/h")
    machine = {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "devices": 1, "peak_flops": 989e12,
               "peak_bandwidth": 3.35e12, "peak_source": "published (h100): NVIDIA's data sheet",
               "ceilings": {"matmul_flops": 700e12, "read_bandwidth": 3e12, "copy_bandwidth": 2.8e12}}
    report = {"model": "preset tiny, random weights", "mesh": "one device", "dtype": "bfloat16",
              "attention": "triton", "attention_note": None, "roofline_note": None, "machine": machine,
              "rows": [dataclasses.asdict(decode), dataclasses.asdict(evaluation)],
              "summary": {"evaluation_seconds": 2.0, "evaluations_per_hour": 9000.0, "candidates": 5,
                          "reference_errors": {}}}
    return {**report, **changes}


def test_the_table_holds_the_rows_variants_notes_and_evaluations_per_hour():
    table = throughput_cli.format_table(_report())
    assert table.startswith("preset tiny, random weights on 1 × NVIDIA H100 80GB HBM3 (gpu, mesh one device, "
                            "bfloat16, attention triton); peaks per device 989 TFLOP/s, 3350 GB/s (published (h100))")
    assert "| decode_b1 | 0.5 | 128 tok/s | 1.0% | 25.0% | 0.1 | 5.00 | 1 | 2.00× |" in table
    assert "\ndecode_b1 with split_k_off: 0.25 s against 0.5 s (2.00× its speed; roofline 0.1 s)" in table
    assert "\ndecode_b1 with other: failed (ValueError: no such option)" in table
    assert table.endswith("one passage (K = 5): 2 s → 9000 self-edit evaluations per hour on this machine")
    assert "\nattention:" not in table and "\nroofline:" not in table
    # a partial run (--only without evaluation) claims no evaluations per hour
    partial = _report(summary={"evaluation_seconds": None, "evaluations_per_hour": None, "candidates": 5,
                               "reference_errors": {}})
    assert "evaluations per hour" not in throughput_cli.format_table(partial)
    noted = throughput_cli.format_table(_report(
        attention="chunked", attention_note="the triton kernel failed",
        roofline_note="seal_jax.hlo cannot read this JAX's compiled HLO (unknown element type f4e2m1fn)"))
    assert "attention chunked)" in noted and "\nattention: the triton kernel failed" in noted
    assert "\nroofline: seal_jax.hlo cannot read this JAX's compiled HLO (unknown element type f4e2m1fn)" in noted


def test_a_kernel_that_fails_its_check_leaves_the_suite_on_chunked_attention():
    """On a TPU or GPU the suite checks the platform's fused attention kernel on the machine first and runs
    "chunked" if it fails (one run on a machine whose JAX rejects the kernel still measures everything);
    --attention chooses; a CPU runs its own ("causal_blocks") unchecked."""
    asked = []

    def failing(kernel):
        asked.append(kernel)
        return "TypeError: mha() got an unexpected keyword argument"

    assert throughput_cli.choose_attention(None, "gpu", failing) == (
        "chunked", "the triton kernel failed its check on this machine (TypeError: mha() got an unexpected keyword "
        "argument); ran chunked")
    assert throughput_cli.choose_attention(None, "tpu", lambda kernel: None) == (None, None)
    assert throughput_cli.choose_attention("einsum", "gpu", failing) == ("einsum", None)
    assert throughput_cli.choose_attention(None, "cpu", failing) == (None, None)
    assert asked == ["triton"]


def test_the_chosen_attention_builds_the_model_and_is_reported(tmp_path, monkeypatch, capsys):
    """--attention reaches the model the suite measures and the report (the pieces themselves stubbed)."""
    built = []

    class Pieces:
        roofline_error = None

        def __init__(self, lm, *args, **kwargs):
            built.append(lm.model.attention_impl)

        def run(self, emit):
            return {"candidates": 5, "evaluation_seconds": 1.0, "evaluations_per_hour": 18000.0}

    monkeypatch.setattr(throughput_cli, "Suite", Pieces)
    out = tmp_path / "report.json"
    assert main(["bench", "--preset", "tiny", "--random-weights", "--quick", "--no-reference", "--no-roofline",
                 "--attention", "chunked", "--out", str(out)]) == 0
    assert built == ["chunked"] and json.loads(out.read_text())["attention"] == "chunked"
    assert "attention chunked)" in capsys.readouterr().out


def test_bad_requests_are_named(capsys):
    assert main(["bench", "--preset", "tiny", "--no-reference", "--quick"]) != 0
    assert "--preset tiny has no weights: add --random-weights, or pass --model DIR" in capsys.readouterr().err
    assert main(["bench", "--preset", "qwen9", "--random-weights", "--no-reference", "--quick"]) != 0
    assert "unknown preset 'qwen9'" in capsys.readouterr().err


def test_only_runs_the_named_rows_and_k_must_be_positive(tmp_path, capsys):
    """--only picks the suite's own rows (their names carry K), refusing others before any model is built;
    --candidates 0 is refused, not taken for the default K = 5. A partial run's summary has a full run's keys."""
    base = ["bench", "--preset", "tiny", "--random-weights", "--quick", "--no-reference", "--no-roofline"]
    assert main(base + ["--only", "bogus,prefill"]) == 1
    assert ("unknown row(s) ['bogus'] in --only; the SEAL-workload suite's rows are decode_b1, decode_b8, prefill, "
            "self_edit, train_k5, decode_k5x8, evaluation") in capsys.readouterr().err
    assert main(base + ["--candidates", "0"]) == 1
    assert "--candidates must be at least 1" in capsys.readouterr().err
    assert throughput_cli.wants_suite(SimpleNamespace(candidates=0))  # K = 0 reaches the suite, which refuses it
    assert not throughput_cli.wants_suite(SimpleNamespace(model="checkpoints/x", only="prefill"))  # bench.py's
    out = tmp_path / "report.json"
    assert main(base + ["--candidates", "3", "--only", "decode_k3x8,prefill", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["prefill", "decode_k3x8"]  # the suite's order
    assert data["only"] == ["decode_k3x8", "prefill"]
    assert data["summary"] == {"evaluation_seconds": None, "evaluations_per_hour": None, "candidates": 3,
                               "reference_errors": {}}
    assert "self-edit evaluations per hour" not in capsys.readouterr().out


def test_a_gpu_checks_in_a_child_and_a_tpu_in_the_suite_process(monkeypatch, capsys):
    """The suite's checker: a child process on a GPU, which allocates device memory as it needs it beside the
    suite; ``check_kernel`` itself elsewhere (a TPU serves one process at a time)."""
    calls = []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(throughput_cli.kernel_check, "run",
                        lambda argv, env, timeout=None: calls.append((argv, env)) or "killed")
    monkeypatch.setattr(throughput_cli.attn, "check_kernel", lambda kernel, **kw: calls.append((kernel, kw)) or None)
    config = preset("qwen3-8b")
    gpu, tpu = SimpleNamespace(platform="gpu", local_hardware_id=3), SimpleNamespace(platform="tpu")
    assert throughput_cli.kernel_checker(config, "bfloat16", gpu)("triton") == "killed"
    argv, env = calls.pop()
    assert argv[-9:] == ["triton", "--heads", "32", "--kv-heads", "8", "--head-dim", "128", "--dtype", "bfloat16"]
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["CUDA_VISIBLE_DEVICES"] == "3"  # the suite's first device's CUDA ordinal: the child sees it alone
    assert "checking the triton kernel in a process of its own" in capsys.readouterr().out
    assert throughput_cli.kernel_checker(config, "bfloat16", tpu)("splash") is None
    assert calls == [("splash", {"dtype": "bfloat16", "device": tpu, "heads": 32, "kv_heads": 8, "head_dim": 128})]


def test_a_mesh_the_devices_cannot_make_is_named(capsys):
    """--mesh is refused with the mesh's own reason, before any model is built."""
    assert main(["bench", "--preset", "tiny", "--random-weights", "--quick", "--no-reference", "--mesh",
                 "bogus=2"]) == 1
    assert "--mesh bogus=2: unknown mesh axes ['bogus'] in 'bogus=2'" in capsys.readouterr().err
