"""One process of the two-process `jax.distributed` test (run by tests/test_distributed.py).

Usage: python distributed_worker.py PROCESS_ID PORT MODEL_DIR OUT_DIR [env]
With ``env`` the worker starts from the environment (SEAL_JAX_* set by the test) instead of arguments.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

from seal_jax.lm.sharding import initialize_distributed  # noqa: E402


def main() -> None:
    process_id, port, model_dir, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    if sys.argv[5:] == ["env"]:
        started = initialize_distributed()
    else:
        started = initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                                         cpu_collectives="gloo")
    assert started and jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np

    import seal_jax as sj

    lm = sj.load(model_dir, mesh="data=2,fsdp=2,tensor=2", progress=False)
    q = lm.params()["layers.q_proj"]
    assert not q.is_fully_addressable, "weights should span both processes"
    ids = np.random.default_rng(0).integers(0, lm.config.vocab_size, (4, 9))
    np.save(os.path.join(out_dir, f"logits{process_id}.npy"), lm.logits(ids))


if __name__ == "__main__":
    main()
