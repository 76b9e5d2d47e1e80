"""LoRA training by next-token prediction: K heterogeneous candidates in one compiled program.

The host turns each candidate's sequences and :class:`TrainSpec` into a *plan*: token arrays
``[K, N, T]``, loss weights, and a schedule over micro-steps ``[K, S]`` (which examples, whether the
step is real, whether it ends a gradient-accumulation window, the learning rate of that update). The
device runs one ``lax.scan`` over micro-steps, ``vmap``-ed over candidates with the frozen base weights
broadcast. A candidate with fewer epochs, fewer sequences or more accumulation simply has masked
micro-steps that leave its adapter and optimiser state untouched, so each candidate trains exactly as it
would alone. Its randomness (LoRA init, dropout, data order) comes from its own ``TrainSpec.seed`` mixed
with the call's seed, never from its position in the batch.

The optimiser is AdamW as in PyTorch (betas 0.9/0.999, eps 1e-8, decoupled weight decay) with a linear
warm-up/decay schedule stepped once per optimiser step (transformers' ``get_linear_schedule_with_warmup``).
The loss of an update is the mean next-token cross-entropy over every target token of its accumulated
micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seal_jax.lm import sharding as shd
from seal_jax.lm.lora import Adapters, LoraSpec, candidate_key, init_adapters
from seal_jax.lm.model import Decoder, LoraInputs
from seal_jax.lm.tokenizer import bucket

LOSS_MODES = ("masked", "seal_padded")
SCHEDULES = ("linear", "constant")


class TrainError(ValueError):
    """Invalid training input or specification."""


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """How one candidate is trained.

    Attributes:
      learning_rate: peak AdamW learning rate.
      epochs: passes over the candidate's sequences.
      batch_size: sequences per micro-batch (equal for all candidates of one call).
      grad_accum: micro-batches per optimiser step.
      max_len: sequences are truncated to this many tokens.
      schedule: ``"linear"`` (warm-up then linear decay to 0) or ``"constant"``.
      warmup: warm-up optimiser steps.
      weight_decay: decoupled weight decay (0 as in SEAL / transformers' Trainer).
      loss: ``"masked"`` (mean over real target tokens; the default) or ``"seal_padded"`` (SEAL's quirk:
        every sequence padded to ``max_len`` with EOS and the padding left in the loss).
      seed: this candidate's seed (LoRA init, dropout, data order).
      append_eos: in ``"masked"`` mode, end every sequence with EOS so the model learns to stop.
      shuffle: reshuffle the sequences every epoch.
    """

    learning_rate: float = 1e-3
    epochs: int = 10
    batch_size: int = 1
    grad_accum: int = 1
    max_len: int = 2048
    schedule: str = "linear"
    warmup: int = 0
    weight_decay: float = 0.0
    loss: str = "masked"
    seed: int = 0
    append_eos: bool = True
    shuffle: bool = True

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise TrainError(f"TrainSpec.learning_rate must be positive, got {self.learning_rate!r}")
        for name in ("epochs", "batch_size", "grad_accum", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise TrainError(f"TrainSpec.{name} must be a positive integer, got {value!r}")
        if self.max_len < 2:
            raise TrainError(f"TrainSpec.max_len must be at least 2, got {self.max_len}")
        if self.warmup < 0:
            raise TrainError(f"TrainSpec.warmup must be >= 0, got {self.warmup}")
        if self.weight_decay < 0:
            raise TrainError(f"TrainSpec.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"TrainSpec.schedule {self.schedule!r} is unknown; choose from {SCHEDULES}")
        if self.loss not in LOSS_MODES:
            raise TrainError(f"TrainSpec.loss {self.loss!r} is unknown; choose from {LOSS_MODES}")

    @classmethod
    def seal(cls, **changes: Any) -> TrainSpec:
        """SEAL's inner loop: lr 1e-3, 10 epochs, batch 1, linear decay, AdamW (plus ``changes``)."""
        return dataclasses.replace(cls(learning_rate=1e-3, epochs=10, batch_size=1, grad_accum=1), **changes)


def lr_at(spec: TrainSpec, step: int, total_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based) out of ``total_steps``."""
    if spec.schedule == "constant":
        return spec.learning_rate
    if step < spec.warmup:
        return spec.learning_rate * step / max(1, spec.warmup)
    return spec.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - spec.warmup))


# ----------------------------------------------------------------------------------------------------
# Host side: tokenisation and the plan


Item = str | tuple[str, str]


@dataclasses.dataclass
class Example:
    """One tokenised training sequence: ``ids`` and the number of leading prompt tokens (no loss)."""

    ids: list[int]
    prompt_len: int = 0


def tokenize(tokenizer: Any, items: Sequence[Item], spec: TrainSpec, eos_id: int) -> list[Example]:
    """Tokenise training items: a string (loss on every token) or ``(prompt, completion)`` (loss on the
    completion only). Truncates to ``spec.max_len``; appends EOS in masked mode when ``append_eos``."""
    out = []
    for item in items:
        if isinstance(item, str):
            prompt_ids: list[int] = []
            body = tokenizer(item, add_special_tokens=False)["input_ids"]
        elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
            prompt_ids = tokenizer(item[0], add_special_tokens=False)["input_ids"]
            body = tokenizer(item[1], add_special_tokens=False)["input_ids"]
        else:
            raise TrainError(f"a training item must be a string or a (prompt, completion) pair, got {type(item).__name__}")
        ids = list(prompt_ids) + list(body)
        if spec.append_eos and spec.loss == "masked":
            ids.append(eos_id)
        ids = ids[: spec.max_len]
        if len(ids) - len(prompt_ids) < 1 or len(ids) < 2:
            continue  # nothing to learn from (empty text, or the prompt fills max_len)
        out.append(Example(ids, min(len(prompt_ids), len(ids))))
    return out


@dataclasses.dataclass
class Plan:
    """Device inputs of one training call (numpy, K candidates).

    tokens, attention, positions: ``[K, N, T]``; weights: float ``[K, N, T]`` (1 where token t is a
    target, predicted from t-1); order: ``[K, S, B]`` example indices; active, boundary: bool ``[K, S]``;
    lr: float ``[K, S]`` (the rate of the update made at a boundary); steps: optimiser steps per candidate.
    """

    tokens: np.ndarray
    attention: np.ndarray
    positions: np.ndarray
    weights: np.ndarray
    order: np.ndarray
    active: np.ndarray
    boundary: np.ndarray
    lr: np.ndarray
    steps: list[int]


def make_plan(examples: Sequence[Sequence[Example]], specs: Sequence[TrainSpec], seed: int, pad_id: int,
              eos_id: int) -> Plan:
    """Build the :class:`Plan` for K candidates' tokenised examples and specs (shapes bucketed)."""
    k = len(examples)
    batch = specs[0].batch_size
    seal_mode = [s.loss == "seal_padded" for s in specs]
    lengths = [len(e.ids) for ex in examples for e in ex]
    t = max([s.max_len for s, sm in zip(specs, seal_mode, strict=True) if sm] + [bucket(max(lengths))])
    n = 1 << (max(len(ex) for ex in examples) - 1).bit_length()
    tokens = np.full((k, n, t), pad_id, np.int32)
    attention = np.zeros((k, n, t), np.int32)
    positions = np.tile(np.arange(t, dtype=np.int32), (k, n, 1))
    weights = np.zeros((k, n, t), np.float32)
    for i, ex in enumerate(examples):
        for j, e in enumerate(ex):
            length = len(e.ids)
            tokens[i, j, :length] = e.ids
            attention[i, j, :length] = 1
            weights[i, j, max(1, e.prompt_len):length] = 1.0
            if seal_mode[i]:
                tokens[i, j, length:] = eos_id
                weights[i, j, length:] = 1.0
    schedules = []
    for i, (ex, spec) in enumerate(zip(examples, specs, strict=True)):
        per_epoch = math.ceil(len(ex) / batch)
        steps_per_epoch = math.ceil(per_epoch / spec.grad_accum)
        total = steps_per_epoch * spec.epochs
        rng = np.random.default_rng([seed, spec.seed, 7])
        rows = []
        step = 0
        for _ in range(spec.epochs):
            perm = rng.permutation(len(ex)) if spec.shuffle else np.arange(len(ex))
            for m in range(per_epoch):
                idx = perm[m * batch:(m + 1) * batch]
                idx = np.concatenate([idx, np.full(batch - len(idx), -1)])
                end = (m + 1) % spec.grad_accum == 0 or m == per_epoch - 1
                rows.append((idx, True, end, lr_at(spec, step, total)))
                step += end
        schedules.append((rows, total))
        del i
    s = max(len(rows) for rows, _ in schedules)
    s = -(-s // 8) * 8
    order = np.full((k, s, batch), -1, np.int32)
    active = np.zeros((k, s), bool)
    boundary = np.zeros((k, s), bool)
    lr = np.zeros((k, s), np.float32)
    for i, (rows, _) in enumerate(schedules):
        for j, (idx, act, end, rate) in enumerate(rows):
            order[i, j], active[i, j], boundary[i, j], lr[i, j] = idx, act, end, rate
    return Plan(tokens, attention, positions, weights, order, active, boundary, lr,
                [total for _, total in schedules])


# ----------------------------------------------------------------------------------------------------
# Device side


def token_loss_sum(model: Decoder, lora: LoraInputs, tokens: jax.Array, attention: jax.Array,
                   positions: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of target tokens.

    tokens, attention, positions, weights: ``[B, T]`` (``weights[:, t]`` = 1 if token t is a target).
    Returns ``(sum of -log p, count)`` as float32 scalars.
    """
    hidden, _ = model.hidden_states(tokens, attention, lora=lora, positions=positions)
    logits = model.head(hidden[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = weights[:, 1:]
    return jnp.sum(nll * w), jnp.sum(w)


def _where_tree(cond: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def train_candidate(graphdef: Any, state: Any, lora_w: Any, scale: jax.Array, dropout: jax.Array,
                    weight_decay: jax.Array, key: jax.Array, tokens: jax.Array, attention: jax.Array,
                    positions: jax.Array, weights: jax.Array, order: jax.Array, active: jax.Array,
                    boundary: jax.Array, lr: jax.Array) -> tuple[Any, jax.Array, jax.Array, Any]:
    """Train one candidate's adapter over its micro-step schedule (``vmap`` this over candidates).

    Shapes (one candidate): lora_w ``{p: {"a": [L, in, R], "b": [L, R, out]}}``; tokens/attention/
    positions/weights ``[N, T]``; order ``[S, B]``; active/boundary/lr ``[S]``.
    Returns ``(trained lora_w, loss per micro-step [S] (NaN where no update), failed micro-step or -1,
    final optimiser state)``.
    """
    model = nnx.merge(graphdef, state)
    tx = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.add_decayed_weights(weight_decay))
    opt = tx.init(lora_w)
    zeros = jax.tree.map(jnp.zeros_like, lora_w)

    def loss_fn(w: Any, idx: jax.Array, step_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        safe = jnp.maximum(idx, 0)
        valid = (idx >= 0)[:, None]
        lora = LoraInputs(weights=w, scale=scale, dropout=dropout, key=step_key if key is not None else None)
        return token_loss_sum(model, lora, tokens[safe], attention[safe], positions[safe],
                              weights[safe] * valid)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(carry: Any, xs: Any) -> tuple[Any, jax.Array]:
        w, opt, acc, acc_loss, acc_tok, failed_at = carry
        idx, act, end, rate, s = xs
        step_key = jax.random.fold_in(key, s) if key is not None else None
        (loss_sum, count), g = grad_fn(w, idx, step_key)
        act = act & (failed_at < 0)
        acc = _where_tree(act, jax.tree.map(jnp.add, acc, g), acc)
        acc_loss = jnp.where(act, acc_loss + loss_sum, acc_loss)
        acc_tok = jnp.where(act, acc_tok + count, acc_tok)
        update_now = act & end
        denom = jnp.maximum(acc_tok, 1.0)
        grads = jax.tree.map(lambda x: x / denom, acc)
        finite = jnp.isfinite(acc_loss) & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(grads)]))
        updates, new_opt = tx.update(grads, opt, w)
        new_w = jax.tree.map(lambda p, u: p - rate * u, w, updates)
        finite = finite & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_w)]))
        apply = update_now & finite
        w = _where_tree(apply, new_w, w)
        opt = _where_tree(apply, new_opt, opt)
        failed_at = jnp.where(update_now & ~finite & (failed_at < 0), s, failed_at)
        step_loss = jnp.where(update_now, acc_loss / denom, jnp.nan)
        acc = _where_tree(update_now, zeros, acc)
        acc_loss = jnp.where(update_now, 0.0, acc_loss)
        acc_tok = jnp.where(update_now, 0.0, acc_tok)
        return (w, opt, acc, acc_loss, acc_tok, failed_at), step_loss

    steps = jnp.arange(order.shape[0])
    init = (lora_w, opt, zeros, jnp.float32(0), jnp.float32(0), jnp.int32(-1))
    (w, opt, _, _, _, failed_at), losses = jax.lax.scan(micro, init, (order, active, boundary, lr, steps))
    return w, losses, failed_at, opt


def make_train_program(graphdef: Any, use_dropout: bool) -> Any:
    """The jitted K-candidate trainer: ``run(state, *per-candidate args)`` -> ``(lora_w, losses, failed_at)``.

    ``use_dropout=False`` compiles the adapters without dropout masks (all candidates have rate 0).
    """

    def one(*args: Any) -> Any:
        args = list(args)
        if not use_dropout:
            args[5] = None  # the key slot: no dropout masks at all
        return train_candidate(graphdef, *args)

    vmapped = jax.vmap(one, in_axes=(None,) + (0,) * 13)
    return jax.jit(vmapped, donate_argnums=(1,))


def _put_candidates(mesh: Any, tree: Any) -> Any:
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    return jax.tree.map(
        lambda x: jax.device_put(x, jax.sharding.NamedSharding(
            mesh, shd.spec_for(mesh, ("candidates",) + (None,) * (np.ndim(x) - 1), np.shape(x)))), tree)


def initial_adapters(params: dict[str, jax.Array], loras: Sequence[LoraSpec], trains: Sequence[TrainSpec],
                     seed: int) -> dict[str, dict[str, jax.Array]]:
    """The stacked adapters that :func:`train_adapters` starts from (PEFT-like init, per-candidate keys)."""
    keys = [jax.random.fold_in(candidate_key(seed, t.seed), 0) for t in trains]
    return init_adapters(params, loras, keys)


def train_adapters(
    graphdef: Any,
    state: Any,
    params: dict[str, jax.Array],
    tokenizer: Any,
    sequences: Sequence[Sequence[Item]],
    lora: LoraSpec | Sequence[LoraSpec],
    train: TrainSpec | Sequence[TrainSpec],
    *,
    seed: int = 0,
    eos_id: int,
    pad_id: int,
    mesh: Any = None,
    programs: dict[bool, Any] | None = None,
) -> Adapters:
    """Train K LoRA adapters (one per list of sequences) in one compiled program.

    Args:
      graphdef, state: the split base model (frozen, broadcast to every candidate).
      params: base parameters ``{dotted path: array}`` (shapes for the adapters).
      sequences: K lists of training items (strings, or ``(prompt, completion)`` pairs for SFT).
      lora, train: one spec for all candidates or one per candidate.
      seed: the call's seed, mixed with every candidate's ``TrainSpec.seed``.
      mesh: if given, the candidate axis is sharded over the mesh's ``data`` axis.
      programs: a cache of compiled programs to reuse across calls (the LM facade keeps one).
    Returns:
      :class:`Adapters` with K candidates, their loss histories and failure reasons.
    """
    k = len(sequences)
    if k == 0:
        raise TrainError("sequences is empty: pass a list (K candidates) of lists of training strings")
    if isinstance(sequences[0], str):
        raise TrainError("sequences must be a list (K candidates) of lists of strings; wrap a single list as [texts]")
    specs_l = [lora] * k if isinstance(lora, LoraSpec) else list(lora)
    specs_t = [train] * k if isinstance(train, TrainSpec) else list(train)
    if len(specs_l) != k or len(specs_t) != k:
        raise TrainError(f"got {k} candidates but {len(specs_l)} LoraSpecs and {len(specs_t)} TrainSpecs")
    if len({s.batch_size for s in specs_t}) > 1:
        raise TrainError("all candidates of one call must share TrainSpec.batch_size; split the call by batch size")
    if tokenizer is None:
        raise TrainError("this model has no tokenizer; load it with tokenizer=... to train on text")
    examples = [tokenize(tokenizer, items, spec, eos_id) for items, spec in zip(sequences, specs_t, strict=True)]
    empty = [i for i, ex in enumerate(examples) if not ex]
    if empty:
        raise TrainError(f"candidates {empty} have no usable training sequence (empty texts?)")
    plan = make_plan(examples, specs_t, seed, pad_id, eos_id)
    keys = [candidate_key(seed, s.seed) for s in specs_t]
    dropout_keys = jnp.stack([jax.random.fold_in(key, 1) for key in keys])
    weights = initial_adapters(params, specs_l, specs_t, seed)
    args = (
        weights,
        jnp.asarray([s.scale for s in specs_l], jnp.float32),
        jnp.asarray([s.dropout for s in specs_l], jnp.float32),
        jnp.asarray([s.weight_decay for s in specs_t], jnp.float32),
        dropout_keys, plan.tokens, plan.attention, plan.positions, plan.weights, plan.order,
        plan.active, plan.boundary, plan.lr,
    )
    args = _put_candidates(mesh, args)
    use_dropout = any(s.dropout > 0 for s in specs_l)
    if programs is None:
        programs = {}
    if use_dropout not in programs:
        programs[use_dropout] = make_train_program(graphdef, use_dropout)
    trained, losses, failed_at, _ = programs[use_dropout](state, *args)
    losses = np.asarray(shd.to_host(losses))
    failed_at = np.asarray(shd.to_host(failed_at))
    histories = [[float(x) for x in row[plan.boundary[i]]] for i, row in enumerate(losses)]
    failed: list[str | None] = []
    for i in range(k):
        if failed_at[i] >= 0:
            step = int(plan.boundary[i, : failed_at[i] + 1].sum())
            failed.append(f"loss or gradients became non-finite at optimiser step {step} of {plan.steps[i]} "
                          f"(learning rate {specs_t[i].learning_rate:g}); the adapter keeps its last finite weights")
            histories[i] = histories[i][: step - 1]
        else:
            failed.append(None)
    return Adapters(trained, tuple(specs_l), histories, failed)
