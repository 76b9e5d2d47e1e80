"""How fast could eight candidates train together on this machine at best? An upper bound for candidates_k8.

``seal-jax bench``'s ``candidates_k8`` trains 8 LoRA candidates (batch 1, 64-token sequences) in one
program and compares them with the same 8 trained one after another. This script measures what the
*matmuls alone* allow: a stand-in of the model with every projection and the head of the real config
(no attention, no norms, no optimiser; one addition stands in for attention so q, k and v stay in the
graph), forward and backward to rank-32 q/v adapters, jitted, float32. Real training does all of this
and more, so its tokens/s cannot exceed the stand-in's at the same number of rows.

It prints tokens/s at 64 rows (one candidate's step) and at 512 rows (eight candidates' step) and the
GFLOP/s of each, next to the machine's measured matmul peak. Compare the 512-row figure with twice the
sequential rate in BENCHMARKS.md to see whether the 2x goal is reachable here.

    python experiments/candidates_ceiling.py [--model checkpoints/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from seal_jax.bench import matmul_flops
from seal_jax.lm.config import ModelConfig, from_hf

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"


def stand_in(config: ModelConfig, rank: int, seed: int = 0) -> tuple[list[dict], jax.Array, list[dict]]:
    """Random base weights (per layer q, k, v, o, gate, up, down), a head ``[D, V]`` and q/v adapters."""
    rng = np.random.default_rng(seed)
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def w(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.02)

    base = [dict(q=w(d, q_out), k=w(d, kv_out), v=w(d, kv_out), o=w(q_out, d), gate=w(d, f), up=w(d, f),
                 down=w(f, d)) for _ in range(config.num_layers)]
    adapters = [dict(qa=w(d, rank), qb=w(rank, q_out), va=w(d, rank), vb=w(rank, kv_out))
                for _ in range(config.num_layers)]
    return base, w(d, v), adapters


def loss(adapters: list[dict], x: jax.Array, base: list[dict], head: jax.Array) -> jax.Array:
    """Mean cross-entropy-like loss of the stand-in for rows ``x`` ``[N, D]`` (target: token 0)."""
    for b, a in zip(base, adapters, strict=True):
        q = x @ b["q"] + (x @ a["qa"]) @ a["qb"]
        k = x @ b["k"]
        v = x @ b["v"] + (x @ a["va"]) @ a["vb"]
        mixed = q + jnp.tile(k * v, (1, q.shape[1] // k.shape[1]))  # stands in for attention
        x = x + mixed @ b["o"]
        x = x + (jax.nn.silu(x @ b["gate"]) * (x @ b["up"])) @ b["down"]
    logits = x @ head
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])


def matmul_flops_per_token(base: list[dict], head: jax.Array) -> float:
    """Forward + backward-to-activations FLOPs per token: 4 per weight of every projection and the head."""
    weights = sum(int(np.prod(m.shape)) for layer in base for m in layer.values()) + int(np.prod(head.shape))
    return 4.0 * weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (its config.json is read)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = from_hf(args.model)
    base, head, adapters = stand_in(config, args.rank)
    step = jax.jit(jax.value_and_grad(loss))
    per_token = matmul_flops_per_token(base, head)
    peak = matmul_flops("float32")
    print(f"matmul peak (float32): {peak / 1e9:.0f} GFLOP/s")
    for rows in (64, 512):
        x = jnp.asarray(np.random.default_rng(1).standard_normal((rows, config.hidden_size)).astype(np.float32))
        jax.block_until_ready(step(adapters, x, base, head))
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(adapters, x, base, head))
            best = min(best, time.perf_counter() - start)
        rate = rows / best
        print(f"{rows:4d} rows: {rate:6.0f} tok/s, {rate * per_token / 1e9:4.0f} GFLOP/s "
              f"({rate * per_token / peak:.0%} of peak)")


if __name__ == "__main__":
    main()
