"""Host memory: malloc's free pages handed back after compiles."""

from __future__ import annotations

import jax
import numpy as np

from seal_jax.lm import host_memory


def test_free_host_memory_is_released_after_compiles(monkeypatch):
    """``LM`` hands malloc's free pages back after every XLA compile and before training (``malloc_trim``;
    see seal_jax/lm/host_memory.py); without glibc that is a no-op."""
    monkeypatch.setattr(host_memory, "_malloc_trim", None)
    host_memory.release()  # looks libc up: glibc's malloc_trim, or False elsewhere
    assert host_memory._malloc_trim is not None
    calls: list[int] = []
    monkeypatch.setattr(host_memory, "_malloc_trim", calls.append)
    host_memory.install_trim_listener()
    host_memory.install_trim_listener()  # installed once, however many models are made
    jax.jit(lambda x: x * 3.0 + 0.25)(np.arange(11.0))  # a new program: one backend compile
    assert calls == [0]
    monkeypatch.setattr(host_memory, "_malloc_trim", False)
    host_memory.release()
    assert calls == [0]
