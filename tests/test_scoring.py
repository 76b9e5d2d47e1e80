"""Scoring given tokens: the checks of ids and masks, the length padding, the completion batch (its targets,
dummy rows and scored tail), and the scorer's programs against a plain forward pass."""

from __future__ import annotations

import numpy as np
import pytest

import seal_jax as sj
from seal_jax.lm import scoring
from seal_jax.lm.config import preset


def test_check_mask_takes_0_and_1_only():
    for good in (np.array([[0, 1, 1]]), np.array([[False, True, True]]), np.array([[0.0, 1.0, 1.0]], np.float32)):
        scoring.check_mask(good)
    with pytest.raises(ValueError, match=r"got \[-1, 2, 3, 4, 5\] and 1 other values$"):
        scoring.check_mask(np.array([[1, 2, 3, 4, 5, 6, -1, 0]]))
    with pytest.raises(ValueError, match=r"like Hugging Face's; got dtype object"):
        scoring.check_mask(np.array([[None, 1]], dtype=object))


def test_check_ids_gives_the_mask_and_refuses_what_a_model_cannot_read():
    config = preset("tiny")
    ids, mask = scoring.check_ids([[3, 4, 5]], None, config)
    assert ids.shape == mask.shape == (1, 3) and mask.tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 .* got \[3\]"):
        scoring.check_ids([[3, 4, 5]], [[1, 3, 1]], config)
    with pytest.raises(ValueError, match="attention_mask shape"):
        scoring.check_ids([[3, 4, 5]], [[1, 1]], config)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, "):
        scoring.check_ids([[3, config.vocab_size]], None, config)


def test_pad_length_pads_on_the_right_to_the_bucket():
    ids, mask = scoring.pad_length(np.array([[7, 8, 9]]), np.array([[0, 1, 1]]))
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (1, 16)
    assert ids[0, :4].tolist() == [7, 8, 9, 0] and mask[0, :4].tolist() == [0, 1, 1, 0] and mask[0, 3:].sum() == 0


def test_completion_batch_marks_the_completions_and_fills_the_batch():
    batch = scoring.completion_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0, context=64, mesh=None)
    assert batch.rows == 2 and batch.ids.shape == (2, 16) and batch.tail == 15  # the width less the first token
    assert batch.ids[0, -5:].tolist() == [1, 2, 3, 5, 6] and batch.ids[1, -4:].tolist() == [4, 7, 8, 9]
    assert batch.targets[0].tolist() == [0] * 14 + [1, 1] and batch.targets[1].tolist() == [0] * 13 + [1, 1, 1]
    assert batch.mask[1].tolist() == [0] * 12 + [1] * 4
    three = scoring.completion_batch([[1]] * 3, [[2]] * 3, pad_id=9, context=64, mesh=None)
    assert three.rows == 3 and three.ids.shape[0] == 4  # a dummy row: one token, nothing scored
    assert three.mask[3].tolist() == [0] * 15 + [1] and three.targets[3].sum() == 0 and three.ids[3, 0] == 9
    long = scoring.completion_batch([[1] * 40], [[2] * 20], pad_id=0, context=64, mesh=None)
    assert long.ids.shape == (1, 64) and long.tail == 32  # the longest completion rounded up to 16 tokens
    with pytest.raises(ValueError, match=r"a prompt with its completion has 70 tokens, more than the model's "
                                         r"context \(64\)"):
        scoring.completion_batch([[1] * 50], [[2] * 20], pad_id=0, context=64, mesh=None)


def test_scorer_sums_what_the_logits_give():
    """The scorer's completion sums equal the log-softmax of the logits at the completion's tokens."""
    from scipy.special import log_softmax

    lm = sj.LM.random("tiny", dtype="float32", seed=3)
    heads, tails = [[5, 9, 14], [3]], [[77, 21], [8, 8, 40]]
    batch = scoring.completion_batch(heads, tails, pad_id=0, context=lm.config.max_position_embeddings, mesh=None)
    scorer = scoring.Scorer(lm.graphdef, lm._jit)
    sums = scorer.completion_logprobs(lm.state, batch, lm._put_batch)
    assert sums.shape == (2,) and sums.dtype == np.float64
    for i, (h, t) in enumerate(zip(heads, tails, strict=True)):
        logits = np.asarray(scorer.logits(lm.state, *scoring.check_ids([h + t], None, lm.config), None,
                                          lm._put_batch))[0]
        assert logits.shape == (len(h + t), lm.config.vocab_size)
        logp = log_softmax(logits.astype(np.float64), axis=-1)
        assert sums[i] == pytest.approx(sum(logp[len(h) - 1 + j, x] for j, x in enumerate(t)), abs=1e-4)
