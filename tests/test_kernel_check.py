"""The fused attention kernel's check in a child process (``python -m seal_jax.kernel_check``): its verdict
read back, and a child that aborts, hangs, fails or prints nothing taken as the kernel's failure, so that a
kernel compiler that ends its process cannot end ``seal-jax bench`` on a GPU."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from seal_jax import kernel_check, throughput
from seal_jax.lm.config import preset

CPU = {**os.environ, "JAX_PLATFORMS": "cpu"}


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_checks_the_kernel_and_answers_in_one_json_line():
    """The real child, on this CPU (Pallas' interpreter): the kernel agrees with the einsum."""
    argv = kernel_check.command("triton", heads=4, kv_heads=2, head_dim=64, dtype="float32")
    assert argv[1:] == ["-m", "seal_jax.kernel_check", "triton", "--heads", "4", "--kv-heads", "2", "--head-dim",
                        "64", "--dtype", "float32"]
    assert kernel_check.run(argv, env=CPU) is None
    verdict = 'print("compiling..."); print(\'{"reason": "its dq differs from the einsum\\\'s by 1", "device": "gpu"}\')'
    assert kernel_check.run(child(verdict)) == "its dq differs from the einsum's by 1"


def test_a_child_that_dies_hangs_fails_or_says_nothing_is_the_answer():
    abort = 'import os, sys; sys.stderr.write("LLVM ERROR: Cannot select: intrinsic\\n"); sys.stderr.flush(); os.abort()'
    assert kernel_check.run(child(abort)) == (
        "the check's process was killed by SIGABRT (LLVM ERROR: Cannot select: intrinsic)")
    assert kernel_check.run(child("import time; time.sleep(60)"), timeout=1) == (
        "the check's process gave no result in 1 s (a compiler that hangs?)")
    failed = 'import sys; sys.stderr.write("Traceback ...\\nImportError: no module named jax_plugins\\n"); sys.exit(3)'
    assert kernel_check.run(child(failed)) == (
        "the check's process exited with status 3 (ImportError: no module named jax_plugins)")
    assert kernel_check.run(child('print("hello"); print("{not json")')) == (
        "the check's process printed no result ({not json)")
    assert kernel_check.run(child("pass")) == "the check's process printed no result (nothing on stderr)"
    assert kernel_check.run(["/nonexistent/python"]).startswith("the check's process could not start: ")


def test_a_gpu_checks_in_a_child_and_a_tpu_in_the_suite_process(monkeypatch, capsys):
    """The suite's checker: a child process on a GPU, which allocates device memory as it needs it beside the
    suite; ``check_kernel`` itself elsewhere (a TPU serves one process at a time)."""
    calls = []
    monkeypatch.setattr(kernel_check, "run", lambda argv, timeout, env: calls.append((argv, env)) or "killed")
    monkeypatch.setattr(throughput.attn, "check_kernel", lambda kernel, **kw: calls.append((kernel, kw)) or None)
    config = preset("qwen3-8b")
    gpu, tpu = SimpleNamespace(platform="gpu"), SimpleNamespace(platform="tpu")
    assert throughput.kernel_checker(config, "bfloat16", gpu)("triton") == "killed"
    argv, env = calls.pop()
    assert argv[-9:] == ["triton", "--heads", "32", "--kv-heads", "8", "--head-dim", "128", "--dtype", "bfloat16"]
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "checking the triton kernel in a process of its own" in capsys.readouterr().out
    assert throughput.kernel_checker(config, "bfloat16", tpu)("splash") is None
    assert calls == [("splash", {"dtype": "bfloat16", "device": tpu, "heads": 32, "kv_heads": 8, "head_dim": 128})]
