"""The PyTorch reference of the SEAL-workload suite (seal_jax.torch_reference), on the CPU with the tiny
preset's architecture and random weights."""

from __future__ import annotations

import pytest
import torch

from seal_jax.lm.config import preset
from seal_jax.torch_reference import Reference


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return Reference(preset("tiny"), "float32", "cpu", threads=1)


def test_generate_gives_exactly_the_new_tokens_of_every_left_padded_row(reference):
    rows = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    greedy = reference.generate(rows, 7)
    assert [len(r) for r in greedy] == [7, 7, 7]
    assert greedy == reference.generate(rows, 7)  # greedy: the same tokens again
    vocab = preset("tiny").vocab_size
    sampled = [reference.generate(rows, 7, {"temperature": 1.0, "top_p": 0.95}) for _ in range(3)]
    assert all(0 <= t < vocab for run in sampled for r in run for t in r)
    assert any(run != greedy for run in sampled)  # a random model's near-uniform logits: sampling differs


def test_lora_training_leaves_the_base_model_as_it_was(reference):
    base = {name: p.detach().clone() for name, p in reference.model.named_parameters()}
    seconds = reference.train_seconds([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12]], epochs=2, rank=4)
    assert seconds > 0
    after = dict(reference.model.named_parameters())
    assert after.keys() == base.keys()  # the adapter layers unloaded: no lora_A / lora_B left
    assert all(torch.equal(after[name], p) for name, p in base.items())  # a frozen base
