"""The fused attention kernel's check in a child process (``python -m seal_jax.kernel_check``): its verdict
read back, and a child that aborts, hangs, fails or prints nothing taken as the kernel's failure, so that a
kernel compiler that ends its process cannot end ``seal-jax bench`` on a GPU."""

from __future__ import annotations

import os
import sys
import time

from seal_jax import kernel_check

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


def test_the_child_sees_only_the_gpu_it_checks():
    """On a host of several GPUs the child starts one: CUDA ordinal ``gpu`` among those this process sees."""
    assert kernel_check.child_env(None, {"PATH": "/bin"}) == {"PATH": "/bin", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert kernel_check.child_env(2, {})["CUDA_VISIBLE_DEVICES"] == "2"
    assert kernel_check.child_env(1, {"CUDA_VISIBLE_DEVICES": "4, 6,7"})["CUDA_VISIBLE_DEVICES"] == "6"
    assert kernel_check.child_env(3, {"CUDA_VISIBLE_DEVICES": "4,6"})["CUDA_VISIBLE_DEVICES"] == "4,6"  # not ours


def test_a_child_that_dies_hangs_fails_or_says_nothing_is_the_answer(tmp_path, capsys):
    abort = 'import os, sys; sys.stderr.write("LLVM ERROR: Cannot select: intrinsic\\n"); sys.stderr.flush(); os.abort()'
    assert kernel_check.run(child(abort)) == (
        "the check's process was killed by SIGABRT (LLVM ERROR: Cannot select: intrinsic)")
    assert "last lines of its stderr:\nLLVM ERROR: Cannot select: intrinsic" in capsys.readouterr().err
    # a hung child is ended with what it started: here a grandchild that would touch a file after 3 s
    touched = tmp_path / "grandchild-ran"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import pathlib, time\ntime.sleep(3)\npathlib.Path({str(touched)!r}).touch()\n")
    hang = f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(grandchild)!r}]); time.sleep(60)"
    assert kernel_check.run(child(hang), timeout=1) == (
        "the check's process gave no result in 1 s (a compiler that hangs?)")
    time.sleep(4)
    assert not touched.exists()
    failed = 'import sys; sys.stderr.write("Traceback ...\\nImportError: no module named jax_plugins\\n"); sys.exit(3)'
    assert kernel_check.run(child(failed)) == (
        "the check's process exited with status 3 (ImportError: no module named jax_plugins)")
    assert kernel_check.run(child('print("hello"); print("{not json")')) == (
        "the check's process printed no result ({not json)")
    assert kernel_check.run(child("pass")) == "the check's process printed no result (no output)"
    quiet = 'import sys; print("compiled"); sys.stderr.write("E0000 triton: lost the device\\n")'
    assert kernel_check.run(child(quiet)) == "the check's process printed no result (E0000 triton: lost the device)"
    assert kernel_check.run(["/nonexistent/python"]).startswith("the check's process could not start: ")
