"""One process of the two-process `jax.distributed` test (run by tests/test_distributed.py): logits, a LoRA
training call and greedy decodes (base and adapted) on a model sharded over both processes.

Usage: python distributed_worker.py PROCESS_ID PORT MODEL_DIR OUT_DIR CHAT_MODEL_DIR [env]
(CHAT_MODEL_DIR: a model with a tokenizer, for the training call).
With ``env`` the worker starts from the environment (SEAL_JAX_* set by the test) instead of arguments.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"  # before jax starts (a fresh process)
    import jax

    from seal_jax.lm.sharding import initialize_distributed, to_host

    process_id, port, model_dir, out_dir, chat_dir = int(sys.argv[1]), sys.argv[2], *sys.argv[3:6]
    if sys.argv[6:] == ["env"]:
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
    # a LoRA training call (two candidates, a few steps) and a greedy decode, with and without the adapters
    lm = sj.load(chat_dir, mesh="data=2,fsdp=2,tensor=2", progress=False)
    adapters = lm.train_adapters(TRAIN_TEXTS, sj.LoraSpec(rank=4, alpha=8.0),
                                 sj.TrainSpec(learning_rate=1e-2, epochs=2, max_len=32))
    weights = {f"{p}.{n}": to_host(x) for p, ab in adapters.weights.items() for n, x in ab.items()}
    greedy = sj.SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompts = [[3, 14, 15, 9], [2, 6, 5]]
    base = lm.generate_ids(prompts, greedy)
    adapted = lm.generate_ids(prompts, greedy, adapters=adapters)
    losses = {f"losses{k}": np.asarray(h) for k, h in enumerate(adapters.losses)}
    np.savez(os.path.join(out_dir, f"train{process_id}.npz"), base=np.asarray(base), adapted=np.asarray(adapted),
             **losses, **weights)


TRAIN_TEXTS = [["the river runs north past the mill", "a bell rang twice"], ["seven blue stones lay in a row"]]


if __name__ == "__main__":
    main()
