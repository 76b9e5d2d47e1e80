"""Benchmarks: seal-jax against Hugging Face transformers on PyTorch, in one process, same threads.

Every entry is a JSON row ``{name, ours, reference, unit, ratio, fraction_of_limit, detail}``; the
machine's limits (float32 matmul FLOP/s, memory read bandwidth) are measured in the same run, so each
entry can say what fraction of the machine it uses. ``seal-jax bench --help`` lists the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class BenchRow:
    """One benchmark result; ``ratio = ours / reference`` for rates (higher is better)."""

    name: str
    ours: float
    reference: float | None
    unit: str
    ratio: float | None
    fraction_of_limit: float | None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


def best_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Smallest wall time in seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_flops(dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
    """The machine's measured matmul rate in FLOP/s: best jitted JAX ``[n, n] @ [n, n]`` over ``sizes``."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    f = jax.jit(lambda x: x @ x)
    for n in sizes:
        a = jnp.full((n, n), 0.5, dtype)
        t = best_time(lambda a=a: f(a).block_until_ready(), repeats)
        best = max(best, 2 * n**3 / t)
    return best


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """The machine's measured memory read bandwidth in bytes/s (a jitted sum over a large array)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((megabytes * 1024 * 1024 // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    t = best_time(lambda: f(x).block_until_ready(), repeats)
    return x.nbytes / t


def forward_flops(config: Any, batch: int, length: int) -> float:
    """Matmul FLOPs of one full forward with logits at every position (attention counted unmasked)."""
    c = config
    per_token = 2 * (c.num_parameters() - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2))
    per_token += 2 * c.vocab_size * c.hidden_size  # the output head
    attention = 2 * 2 * batch * length * length * c.q_dim * c.num_layers
    return per_token * batch * length + attention


def bench_prefill(lm: Any, hf_model: Any, *, batch: int, length: int, repeats: int, peak: float) -> BenchRow:
    """Forward tokens/s at ``[batch, length]`` (full logits), ours vs transformers' forward."""
    import torch

    rng = np.random.default_rng(0)
    ids = rng.integers(0, lm.config.vocab_size, (batch, length))
    ours_t = best_time(lambda: lm.forward(ids).block_until_ready(), repeats)
    ids_t = torch.tensor(ids)

    def reference() -> None:
        with torch.inference_mode():
            hf_model(input_ids=ids_t)

    ref_t = best_time(reference, repeats)
    tokens = batch * length
    return BenchRow(
        name="prefill",
        ours=tokens / ours_t,
        reference=tokens / ref_t,
        unit="tok/s",
        ratio=ref_t / ours_t,
        fraction_of_limit=forward_flops(lm.config, batch, length) / ours_t / peak,
        detail={
            "batch": batch,
            "length": length,
            "ours_s": ours_t,
            "reference_s": ref_t,
            "limit": "float32 matmul FLOP/s",
        },
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``seal-jax bench`` options to ``parser``."""
    parser.add_argument("--model", default="checkpoints/smollm2-135m-instruct", help="HF-format model folder")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller shapes (< 5 minutes)")
    parser.add_argument("--out", default=None, help="write the JSON rows to this file")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names to run")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )


def print_table(rows: list[BenchRow], machine: dict[str, Any]) -> None:
    """Print the rows as a Markdown table."""
    print(
        f"\nmachine: {machine['cpu']}, {machine['cores']} cores; float32 matmul "
        f"{machine['matmul_flops'] / 1e9:.1f} GFLOP/s; read bandwidth {machine['read_bandwidth'] / 1e9:.1f} GB/s"
    )
    print("| benchmark | seal-jax | reference | unit | ratio | fraction of limit |")
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        ref = "" if r.reference is None else f"{r.reference:.1f}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}×"
        frac = "" if r.fraction_of_limit is None else f"{100 * r.fraction_of_limit:.0f}%"
        print(f"| {r.name} | {r.ours:.1f} | {ref} | {r.unit} | {ratio} | {frac} |")


def main(args: argparse.Namespace) -> int:
    """Run the selected benchmarks; print a table; write JSON to ``args.out`` if given."""
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    import seal_jax as sj

    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model at {folder}; run `seal-jax fetch smollm2-135m-instruct` first")
    only = set(args.only.split(",")) if args.only else None
    repeats = 2 if args.quick else 5
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "jax_devices": len(jax.devices()),
        "jax": jax.__version__,
        "torch": torch.__version__,
    }
    machine["matmul_flops"] = matmul_flops(repeats=repeats + 2)
    machine["read_bandwidth"] = read_bandwidth(repeats=repeats + 2)
    lm = sj.load(folder, dtype="float32")
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows: list[BenchRow] = []
    if only is None or "prefill" in only:
        batch, length = (8, 256) if not args.quick else (8, 128)
        rows.append(
            bench_prefill(
                lm, hf_model, batch=batch, length=length, repeats=repeats, peak=machine["matmul_flops"]
            )
        )
    print_table(rows, machine)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"machine": machine, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2)
        )
    return 0
