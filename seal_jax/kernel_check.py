"""The fused attention kernel's check, in a process of its own: ``python -m seal_jax.kernel_check``.

:func:`seal_jax.lm.attention.check_kernel` answers for what a kernel *raises*. A kernel compiler that aborts
(an assertion in a new jaxlib's Triton or LLVM, a driver fault) ends the process that asked, and one that
hangs stalls it: on a machine lent for one run, the whole run. ``seal-jax bench`` on a GPU therefore asks
a child process, which shares the GPU with it, and reads back one JSON line. A child that dies, outlives
its time or prints no result is an answer too, in one line, and the suite goes on with ``chunked``
attention (:func:`seal_jax.throughput_cli.choose_attention`). On a TPU the check stays in the suite's
process: a TPU serves one process at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

import jax

from seal_jax.lm import attention

# Seconds a child may take: importing JAX, starting the device and two small compiles take well under a
# minute on a GPU; a child still running after this is taken as hung.
CHECK_SECONDS = 180.0


def command(kernel: str, *, heads: int, kv_heads: int, head_dim: int, dtype: str,
            python: str = sys.executable) -> list[str]:
    """The command line of a child that checks ``kernel`` (``"triton"`` or ``"splash"``) at the model's
    head group and head size in ``dtype`` (``"bfloat16"`` or ``"float32"``)."""
    return [python, "-m", "seal_jax.kernel_check", kernel, "--heads", str(heads), "--kv-heads", str(kv_heads),
            "--head-dim", str(head_dim), "--dtype", dtype]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _verdict(returncode: int, stdout: str, stderr: str) -> str | None:
    """What a finished child said: its verdict line, else what became of it."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the check's process was killed by {name} ({_last_line(stderr)})"
    if returncode > 0:
        return f"the check's process exited with status {returncode} ({_last_line(stderr)})"
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                verdict = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(verdict, dict) and "reason" in verdict:
                reason = verdict["reason"]
                return None if reason is None else str(reason)
            break
    return f"the check's process printed no result ({_last_line(stderr or stdout)})"


def run(argv: Sequence[str], *, timeout: float = CHECK_SECONDS, env: dict[str, str] | None = None) -> str | None:
    """Run a check's child ``argv`` and read its verdict: ``None`` where the kernel compiled, ran and agreed
    with the einsum, else the reason in one line, the child's own failure included (killed by a signal,
    a non-zero exit, no result within ``timeout`` seconds, no result line). Where the child failed, the last
    lines of its stderr go to this process's stderr: on a lent machine they are the evidence. The child
    runs in a session of its own, so a timeout ends whatever it started too (a ``ptxas``, say)."""
    try:
        child = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as error:
        return f"the check's process could not start: {error}"
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        reason: str | None = f"the check's process gave no result in {timeout:g} s (a compiler that hangs?)"
    else:
        reason = _verdict(child.returncode, stdout, stderr)
    if reason is not None and reason.startswith("the check's process") and stderr.strip():
        print(f"the kernel check's process, last lines of its stderr:\n{_tail(stderr)}", file=sys.stderr, flush=True)
    return reason


def child_env(gpu: int | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: this one's, device memory allocated as needed
    (``XLA_PYTHON_CLIENT_PREALLOCATE=false``: the parent holds its share), and with ``gpu`` (a CUDA ordinal
    among the GPUs this process sees) only that GPU visible, so that on an 8-GPU host the child starts one
    device, not eight (``CUDA_VISIBLE_DEVICES``, read through this process's own list where it has one; an
    ordinal beyond that list leaves it as it is)."""
    env = {**(os.environ if environ is None else environ), "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if gpu is not None:
        listed = "CUDA_VISIBLE_DEVICES" in env
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if gpu < len(visible):
            env["CUDA_VISIBLE_DEVICES"] = visible[gpu]
        elif not listed:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def isolated(kernel: str, *, heads: int, kv_heads: int, head_dim: int, dtype: str,
             gpu: int | None = None) -> str | None:
    """:func:`seal_jax.lm.attention.check_kernel` of ``kernel`` in a child process (see the module's note) on
    the GPU of CUDA ordinal ``gpu`` (:func:`child_env`; None: every device, the child checks the first),
    within :data:`CHECK_SECONDS`: ``None`` where it passed, else the reason."""
    return run(command(kernel, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype), env=child_env(gpu))


def main(argv: Sequence[str] | None = None) -> int:
    """The child: check one kernel on JAX's first device and print ``{"reason": ..., "device": ...}``."""
    parser = argparse.ArgumentParser(prog="python -m seal_jax.kernel_check",
                                     description="Check a fused attention kernel against the einsum on this "
                                                 "machine's first device; print the verdict as one JSON line.")
    parser.add_argument("kernel", choices=("triton", "splash"))
    parser.add_argument("--heads", type=int, required=True)
    parser.add_argument("--kv-heads", type=int, required=True)
    parser.add_argument("--head-dim", type=int, required=True)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    reason = attention.check_kernel(args.kernel, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                                    dtype=args.dtype, device=device)
    print(json.dumps({"reason": reason, "device": f"{device.platform}:{device.device_kind}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
