"""Host memory: malloc's free pages handed back before training."""

from __future__ import annotations

import seal_jax as sj
from seal_jax.lm import host_memory


def test_free_host_memory_is_released_before_training(monkeypatch, tiny_chat_dir):
    """``LM.train_adapters`` hands malloc's free pages back first (``malloc_trim``; see
    seal_jax/lm/host_memory.py); without glibc that is a no-op."""
    monkeypatch.setattr(host_memory, "_malloc_trim", None)
    host_memory.release()  # looks libc up: glibc's malloc_trim, or False elsewhere
    assert host_memory._malloc_trim is not None
    calls: list[int] = []
    monkeypatch.setattr(host_memory, "_malloc_trim", calls.append)
    lm = sj.load(tiny_chat_dir, progress=False)
    assert calls == []  # loading and compiling do not trim
    lm.train_adapters([["Velmora is a harbour town."]], sj.LoraSpec(rank=2, alpha=4.0), sj.TrainSpec(epochs=1))
    assert calls == [0]
    monkeypatch.setattr(host_memory, "_malloc_trim", False)
    host_memory.release()
    assert calls == [0]
