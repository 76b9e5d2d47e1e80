"""What this machine can do at most, measured: best-of-N timing, matmul FLOP/s, memory bandwidth.

Shared by :mod:`seal_jax.bench` (the CPU comparison with transformers) and :mod:`seal_jax.throughput`
(the SEAL workload on accelerators), whose rows are fractions of these ceilings or of published peaks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


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
    best = 0.0
    f = jax.jit(lambda x: x @ x)
    for n in sizes:
        a = jnp.full((n, n), 0.5, dtype)
        t = best_time(lambda a=a: f(a).block_until_ready(), repeats)
        best = max(best, 2 * n**3 / t)
    return best


def read_program(passes: int = 1) -> Callable[[jax.Array], jax.Array]:
    """A jitted program that reads its array ``passes`` times (a sum of ``x + i`` for each pass ``i``: nothing
    to hoist out of the loop), all inside one call."""
    if passes == 1:
        return jax.jit(jnp.sum)
    return jax.jit(lambda x: jax.lax.fori_loop(0, passes, lambda i, acc: acc + jnp.sum(x + i.astype(x.dtype)),
                                               jnp.zeros((), x.dtype)))


def read_bandwidth(megabytes: int = 512, repeats: int = 5, passes: int = 1) -> float:
    """The machine's measured memory read bandwidth in bytes/s (a jitted sum over an array of ``megabytes``,
    ``passes`` times in one call: a small array, which the caches hold, takes several passes to outweigh a
    call's own cost, as a decode loop's steps do in one program)."""
    x = jnp.ones((megabytes * 1024 * 1024 // 4,), jnp.float32)
    f = read_program(passes)
    t = best_time(lambda: f(x).block_until_ready(), repeats)
    return passes * x.nbytes / t


def copy_bandwidth(megabytes: int, dtype: str = "float32", repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s of a jitted elementwise copy (read once, write once)."""
    x = jnp.ones((megabytes * 1024 * 1024 // jnp.dtype(dtype).itemsize,), dtype)
    f = jax.jit(lambda a: a + 1)
    t = best_time(lambda: f(x).block_until_ready(), repeats)
    return 2 * x.nbytes / t
