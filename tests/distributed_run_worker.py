"""One process of the two-process knowledge-run test (run by tests/test_distributed.py).

Usage: python distributed_run_worker.py PROCESS_ID PORT MODEL_DIR RUN_DIR
Both processes write to the same RUN_DIR (a shared file system): RUN_DIR/full runs uninterrupted,
RUN_DIR/part is stopped after its first passage and resumed, as a killed run would be; then the same
again with a folder per process (RUN_DIR/own/pN, as on each host's local disk).
"""

from __future__ import annotations

import os
import sys

RUN = dict(name="tiny", chat=True, conditions=["base", "passage", "implications"], k=1,
           data={"source": "demo", "n": 2}, selfedit_sampling={"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.95},
           lora={"rank": 4, "alpha": 8.0}, train={"epochs": 2, "learning_rate": 1e-2, "max_len": 96},
           eval_max_new_tokens=8)


def main() -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # before jax starts (a fresh process)
    import jax

    from seal_jax.lm.sharding import initialize_distributed

    process_id, port, model_dir, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    started = initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                                     cpu_collectives="gloo")
    assert started and jax.process_count() == 2
    jax.config.update("jax_default_matmul_precision", "highest")
    import seal_jax as sj
    from seal_jax.selfedit.knowledge import RunConfig, run_knowledge

    lm = sj.load(model_dir, mesh="data=2,fsdp=2,tensor=2", progress=False)
    config = RunConfig.from_dict({**RUN, "model": model_dir})
    run_knowledge(config, os.path.join(run_dir, "full"), lm=lm, progress=False)
    run_knowledge(config, os.path.join(run_dir, "part"), lm=lm, progress=False, stop_after=1)
    run_knowledge(config, os.path.join(run_dir, "part"), lm=lm, progress=False, resume=True)
    # each process given its own folder, as with a folder on each host's local disk: process 1's stays
    # empty, and on resume it follows process 0's rows
    own = os.path.join(run_dir, "own", f"p{process_id}")
    run_knowledge(config, own, lm=lm, progress=False, stop_after=1)
    run_knowledge(config, own, lm=lm, progress=False, resume=True)


if __name__ == "__main__":
    main()
