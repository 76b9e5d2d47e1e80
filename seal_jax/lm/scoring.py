"""Scoring given tokens: the logits of token ids (``LM.logits``, ``LM.forward``) and the log-likelihood of
completions after their prompts by teacher forcing (``LM.completion_logprobs``).

The checks of what a caller gives, the padded batches and the jitted programs. The ``LM`` facade holds the
programs (shared by every LM of the same structure, mesh and compiler options) and calls these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from seal_jax.lm import sampling
from seal_jax.lm import sharding as shd
from seal_jax.lm import tokenizer as tok
from seal_jax.lm.config import ModelConfig
from seal_jax.lm.cross_entropy import token_nll
from seal_jax.lm.model import LoraInputs

# jax.jit with the model's compiler options (``LM._jit``): the makers below compile with it
Jit = Callable[..., Any]
# candidate k of stacked adapters in one dispatch (readied ones for split layers have a leaf per layer)
_candidate = jax.jit(lambda weights, k: jax.tree.map(lambda x: x[k], weights))
TAIL_BUCKET = 16  # completions are scored over their last positions, the longest one rounded up to this


def check_mask(mask: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``mask`` holds only 0 and 1 (or False and True), as Hugging Face's
    ``attention_mask`` does: 1 on real tokens, 0 on padding."""
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.number):
        raise ValueError(f"attention_mask must hold 0 (padding) and 1 (real tokens), like Hugging Face's; got dtype "
                         f"{mask.dtype}")
    bad = np.unique(mask[(mask != 0) & (mask != 1)])
    if bad.size:
        more = f" and {bad.size - 5} other values" if bad.size > 5 else ""
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (real tokens), like Hugging Face's; got "
                         f"{bad[:5].tolist()}{more}")


def check_ids(ids: Any, attention_mask: Any, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` as numpy ``[B, T]`` arrays (the mask all ones where ``attention_mask`` is None), checked
    for a model of ``config``: non-empty integer ids in its vocabulary, a 0/1 mask of the same shape, no
    more tokens than its context. Raises ``ValueError`` saying which."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"ids must be a non-empty int array [B, T], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integer token ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got [{ids.min()}, {ids.max()}]")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from ids shape {ids.shape}")
    check_mask(mask)
    if ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds the model's context ({config.max_position_embeddings})")
    return ids, mask


def pad_length(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` and ``mask`` right-padded (int32) to the length's bucket (``tokenizer.bucket``): causal attention
    keeps the real tokens blind to the padding, so their logits are those of the unpadded rows."""
    b, t = ids.shape
    ids_p = np.zeros((b, tok.bucket(t)), np.int32)
    mask_p = np.zeros_like(ids_p)
    ids_p[:, :t], mask_p[:, :t] = ids, mask
    return ids_p, mask_p


def logits_program(graphdef: Any, jit: Jit) -> Any:
    """The jitted ``(state, ids, mask) -> logits [B, T, V]`` of the model ``graphdef`` (no adapter)."""

    def run(state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        return model(ids, mask)[0]

    return jit(run)


def adapter_logits_program(graphdef: Any, jit: Jit) -> Any:
    """The jitted ``(state, ids, mask, weights, scales) -> logits [K, B, T, V]`` under K stacked adapters."""

    def one(state: Any, ids: jax.Array, mask: jax.Array, weights: Any, scale: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        return model(ids, mask, lora=LoraInputs(weights=weights, scale=scale))[0]

    return jit(jax.vmap(one, in_axes=(None, None, None, 0, 0)))


def logprob_program(graphdef: Any, jit: Jit) -> Any:
    """The jitted ``(state, ids, mask, targets, weights, scale, tail=) -> [B]``: per row, the sum of the
    log-probabilities of the tokens where ``targets`` is 1 among the last ``tail`` (static) positions, under
    one adapter or none (``weights`` and ``scale`` None). The head runs on those positions only."""

    def total(state: Any, ids: jax.Array, mask: jax.Array, targets: jax.Array, weights: Any, scale: Any,
              tail: int) -> jax.Array:
        model = nnx.merge(graphdef, state)
        lora = None if weights is None else LoraInputs(weights=weights, scale=scale)
        x = model.hidden_states(ids, mask, lora=lora)[0][:, -tail - 1:-1]  # the positions that predict the tail
        head, vocab_major = model.head_as_stored()
        logp = -token_nll(x, head, ids[:, -tail:], vocab_major)  # the head only where a completion token is scored
        return jnp.sum(jnp.where(targets[:, -tail:] > 0, logp, 0.0), axis=-1)

    return jit(total, static_argnames="tail")


def check_completions(prompts: Any, completions: Any, tokenizer: Any) -> None:
    """Raise unless ``prompts`` and ``completions`` are as many non-empty strings each and there is a
    tokenizer (``SamplingError``, or ``TokenizerError`` without one)."""
    sampling.check_texts(prompts, "prompts", tokenizer, "completion_logprobs() needs a tokenizer and this LM has "
                         "none: load it with tokenizer=FOLDER")
    sampling.check_texts(completions, "completions", tokenizer, "")
    if len(prompts) != len(completions):
        raise sampling.SamplingError(f"{len(prompts)} prompts but {len(completions)} completions; give one each")


@dataclass(frozen=True)
class CompletionBatch:
    """Prompts joined with their completions, left-padded into one batch for :func:`logprob_program`.

    ``ids``, ``mask`` and ``targets`` (1 on the completion's tokens) are int32 ``[b, width]``; the first
    ``rows`` rows are real, the rest dummy rows (one token, nothing scored) that fill the batch to its
    bucket. ``tail``: the last positions scored, the longest completion rounded up to ``TAIL_BUCKET``.
    """

    ids: np.ndarray
    mask: np.ndarray
    targets: np.ndarray
    rows: int
    tail: int


def completion_batch(heads: Sequence[list[int]], tails: Sequence[list[int]], *, pad_id: int, context: int,
                     mesh: Mesh | None) -> CompletionBatch:
    """The batch that scores each completion's ids ``tails[i]`` after its prompt's ids ``heads[i]`` on ``mesh``
    (lengths bucketed as ``tokenizer.bucket``, rows as ``sampling.batch_bucket``). Raises ``ValueError``
    where a prompt with its completion is longer than the model's ``context``."""
    rows = [h + t for h, t in zip(heads, tails, strict=True)]
    longest = max(map(len, rows))
    if longest > context:
        raise ValueError(f"a prompt with its completion has {longest} tokens, more than the model's context "
                         f"({context})")
    width = tok.bucket(longest)
    ids, mask = tok.pad_left(rows, pad_id, width)
    targets = np.zeros_like(mask)
    for i, t in enumerate(tails):
        targets[i, width - len(t):] = 1
    b = sampling.batch_bucket(len(rows), mesh, decode=False)  # dummy rows (one token, scored nothing) fill the batch
    if b > len(rows):
        pad = b - len(rows)
        ids = np.concatenate([ids, np.full((pad, width), pad_id, ids.dtype)])
        mask = np.concatenate([mask, np.zeros((pad, width), mask.dtype)])
        mask[len(rows):, -1] = 1
        targets = np.concatenate([targets, np.zeros((pad, width), targets.dtype)])
    tail = min(width - 1, -(-max(map(len, tails)) // TAIL_BUCKET) * TAIL_BUCKET)
    return CompletionBatch(ids.astype(np.int32), mask.astype(np.int32), targets.astype(np.int32), len(rows), tail)


class Scorer:
    """The jitted scoring programs of one model structure (``graphdef``), compiled with ``jit``: held by the
    ``LM`` facade and shared by every LM of that structure, mesh and compiler options, as its sampler is."""

    def __init__(self, graphdef: Any, jit: Jit):
        self.logits_program = logits_program(graphdef, jit)
        self.adapter_logits_program = adapter_logits_program(graphdef, jit)
        self.logprob_program = logprob_program(graphdef, jit)

    def logits(self, state: Any, ids: np.ndarray, mask: np.ndarray, adapter: Any,
               put: Callable[[np.ndarray], jax.Array]) -> jax.Array:
        """The device array of logits ``[B, T, V]`` (``[K, B, T, V]`` under K stacked adapters) of the model
        weights ``state`` for ids and mask (checked: :func:`check_ids`) under ``adapter`` (None, or checked
        ``Adapters`` / ``ReadyAdapters``); the length runs padded to its bucket, trimmed from the result.
        ``put`` places a batch array on the devices."""
        t = ids.shape[1]
        ids_d, mask_d = map(put, pad_length(ids, mask))
        if adapter is None:
            out = self.logits_program(state, ids_d, mask_d)
        else:
            out = self.adapter_logits_program(state, ids_d, mask_d, adapter.weights, adapter.scales)
            out = out[0] if adapter.single else out
        return out if ids_d.shape[1] == t else out[..., :t, :]

    def completion_logprobs(self, state: Any, batch: CompletionBatch, put: Callable[[np.ndarray], jax.Array],
                            adapters: Any = None) -> np.ndarray:
        """float64 sums of the completion tokens' log-probabilities of ``batch``'s real rows, ``[rows]`` (or
        ``[K, rows]`` under K stacked adapters), on the model weights ``state``; ``put`` as in :meth:`logits`.
        ``adapters``: None or checked ``Adapters`` / ``ReadyAdapters``, run one per call (memory and compiled
        programs do not grow with K)."""
        args = [put(a) for a in (batch.ids, batch.mask, batch.targets)]
        program = self.logprob_program
        if adapters is None:
            sums = shd.to_host(program(state, *args, None, None, tail=batch.tail))
        else:
            sums = np.stack([shd.to_host(program(state, *args, _candidate(adapters.weights, k), adapters.scales[k],
                                                 tail=batch.tail)) for k in range(len(adapters.specs))])
            sums = sums[0] if adapters.single else sums
        return sums[..., :batch.rows].astype(np.float64)
