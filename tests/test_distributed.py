"""Multi-host: two processes on localhost, four CPU devices each, one global mesh of eight."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import seal_jax as sj

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_two_processes_match_single_process(tiny_hf, tmp_path):
    _, folder = tiny_hf("qwen3-untied")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # process 0 starts from arguments, process 1 from the environment (SEAL_JAX_*)
    env1 = {**env, "SEAL_JAX_COORDINATOR": f"127.0.0.1:{port}", "SEAL_JAX_NUM_PROCESSES": "2",
            "SEAL_JAX_PROCESS_ID": "1", "SEAL_JAX_CPU_COLLECTIVES": "gloo"}
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(folder), str(tmp_path)] + (["env"] if i else []),
                         env=env1 if i else env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    ids = np.random.default_rng(0).integers(0, 160, (4, 9))
    single = sj.load(folder, progress=False).logits(ids)
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"logits{i}.npy"), single, atol=1e-5, rtol=0)
