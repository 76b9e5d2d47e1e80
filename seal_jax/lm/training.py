"""LoRA training by next-token prediction: K heterogeneous candidates in one compiled program.

The host turns each candidate's sequences and :class:`TrainSpec` into a *plan*: token arrays
``[K, N, T]``, loss weights, and a schedule over micro-steps ``[K, S]`` (which examples, whether the
step is real, whether it ends a gradient-accumulation window, the learning rate of that update). The
device runs one ``lax.scan`` over micro-steps, ``vmap``-ed over lanes of candidates (:func:`train_lanes`) with
the frozen base weights broadcast. A candidate with fewer epochs, fewer sequences or more accumulation simply has masked
micro-steps that leave its adapter and optimiser state untouched, so each candidate trains exactly as it
would alone. Its randomness (LoRA init, dropout, data order) comes from its own ``TrainSpec.seed`` mixed
with the call's seed, never from its position in the batch.

The optimiser is AdamW as in PyTorch (betas 0.9/0.999, eps 1e-8, decoupled weight decay) with a linear
warm-up/decay schedule stepped once per optimiser step (transformers' ``get_linear_schedule_with_warmup``).
The loss of an update is the mean next-token cross-entropy over every target token of its accumulated
micro-batches.

On a mesh, the ``data`` axis splits the work: the lanes (candidates side by side) when their number
divides it, else the rows of each micro-batch (data parallelism within one adapter, e.g. one CPT adapter
on 8 devices), else the lanes padded with idle ones to a multiple of it (:func:`data_layout`). A
candidate's adapter and optimiser state live on the lane that trains it, so lanes split over devices need
no collective per step (:func:`train_lanes`).

The device-side state is small dataclass pytrees: :class:`CandidateData` (what a candidate trains on),
:class:`Trainee` (its adapter, optimiser state and failure step), :class:`Accumulator` (a gradient
window), :class:`Step` (one micro-step of its schedule) and :class:`Schedule` (the lanes' steps).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seal_jax.lm import sharding as shd
from seal_jax.lm.cross_entropy import token_nll
from seal_jax.lm.lanes import LanePlan, make_lane_plan
from seal_jax.lm.lora import Adapters, candidate_key, init_adapters
from seal_jax.lm.model import Decoder, LoraInputs
from seal_jax.lm.tokenizer import bucket
from seal_jax.lm.types import LoraSpec, TrainError, TrainSpec, is_int


def lr_at(spec: TrainSpec, step: int, total_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based) out of ``total_steps``."""
    if spec.schedule == "constant":
        return spec.learning_rate
    if step < spec.warmup:
        return spec.learning_rate * step / max(1, spec.warmup)
    return spec.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - spec.warmup))


# ----------------------------------------------------------------------------------------------------
# Host side: tokenisation and the plan


Item = str | tuple[str, str] | Sequence[int]


def _is_ids(item: Any) -> bool:
    """Whether a training item is a sequence of token ids (rather than text or a text pair)."""
    if isinstance(item, np.ndarray):
        return item.ndim == 1 and np.issubdtype(item.dtype, np.integer)
    return isinstance(item, (list, tuple)) and len(item) > 0 and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in item)


@dataclasses.dataclass
class Example:
    """One tokenised training sequence: ``ids`` and the number of leading prompt tokens (no loss)."""

    ids: list[int]
    prompt_len: int = 0


def tokenize(tokenizer: Any, items: Sequence[Item], spec: TrainSpec, eos_id: int) -> list[Example]:
    """Tokenise training items: a string (loss on every token), ``(prompt, completion)`` (loss on the
    completion only) or a list of token ids (loss on every token; no tokenizer needed). Truncates to
    ``spec.max_len``; appends EOS in masked mode when ``append_eos``."""
    out = []
    for item in items:
        if isinstance(item, str):
            prompt_ids: list[int] = []
            body = tokenizer(item, add_special_tokens=False)["input_ids"]
        elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
            prompt_ids = tokenizer(item[0], add_special_tokens=False)["input_ids"]
            body = tokenizer(item[1], add_special_tokens=False)["input_ids"]
        elif _is_ids(item):
            prompt_ids, body = [], [int(x) for x in item]
        else:
            raise TrainError("a training item must be a string, a (prompt, completion) pair or a list of token "
                             f"ids, got {type(item).__name__}")
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
                   positions: jax.Array, weights: jax.Array, layers: Any = None) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of target tokens.

    tokens, attention, positions, weights: ``[B, T]`` (``weights[:, t]`` = 1 if token t is a target);
    layers: the base weights per layer (``Decoder.unstacked_layers``) or None (the stacked ones, scanned).
    Returns ``(sum of -log p, count)`` as float32 scalars.
    """
    hidden, _ = model.hidden_states(tokens, attention, lora=lora, positions=positions, layers=layers)
    # chunked over tokens, gradient formed in the forward pass: no [T, V] logits are kept for the backward
    head, vocab_major = model.head_as_stored()
    nll = token_nll(hidden[:, :-1], jax.lax.stop_gradient(head), tokens[:, 1:], vocab_major)
    w = weights[:, 1:]
    return jnp.sum(nll * w), jnp.sum(w)


def _where_tree(cond: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CandidateData:
    """What one candidate trains on and with (a leading ``[K+1]`` axis when it holds all candidates).

    scale: LoRA's ``alpha / rank``; dropout: LoRA dropout rate; weight_decay: AdamW's; key: the dropout PRNG
    key (None when no candidate uses dropout); tokens/attention/positions ``[N, T]``; loss_weights ``[N, T]``
    (1 where token t is a target).
    """

    scale: Any
    dropout: Any
    weight_decay: Any
    key: Any
    tokens: Any
    attention: Any
    positions: Any
    loss_weights: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Trainee:
    """One candidate's training state between micro-steps: adapter ``weights``, AdamW state ``opt`` and
    ``failed_at`` (the micro-step whose update became non-finite, or -1)."""

    weights: Any
    opt: Any
    failed_at: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Accumulator:
    """A gradient-accumulation window in progress: summed ``grads``, ``loss`` and target ``count``."""

    grads: Any
    loss: Any
    count: Any

    @staticmethod
    def zeros(weights: Any) -> Accumulator:
        return Accumulator(jax.tree.map(jnp.zeros_like, weights), jnp.float32(0), jnp.float32(0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Step:
    """One micro-step of one candidate's schedule (a leading ``[S]`` / ``[S, M]`` axis for a schedule).

    idx: ``[B]`` example rows (-1 = none); active: whether the step is real; boundary: whether it closes an
    accumulation window; lr: the learning rate of that update; number: the candidate's own micro-step
    number (its dropout key).
    """

    idx: Any
    active: Any
    boundary: Any
    lr: Any
    number: Any


def micro_step(model: Decoder, trainee: Trainee, acc: Accumulator, data: CandidateData, step: Step, *,
               length: int | None = None, rows: Any = None, layers: Any = None) -> tuple[Trainee, Accumulator, jax.Array]:
    """One micro-step of one candidate: gradient on a micro-batch, accumulation, and (at a window's end)
    the AdamW update, skipped if anything is non-finite.

    length: compute on the first ``length`` tokens only (a static bucket that covers the micro-batch); rows:
    a sharding for the micro-batch ``[B, t]`` (data parallelism within one candidate: the rows split over
    devices, the gradient summed across them by the compiler), or None; layers: the base weights per layer,
    made once per call (``Decoder.train_layers == "unrolled"``), or None.
    Returns ``(trainee, accumulator, loss of the update or NaN)``.
    """
    tx = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.add_decayed_weights(data.weight_decay))
    safe = jnp.maximum(step.idx, 0)
    valid = (step.idx >= 0)[:, None]
    t = data.tokens.shape[-1] if length is None else length
    batch = [x[safe][:, :t] for x in (data.tokens, data.attention, data.positions, data.loss_weights)]
    batch[3] = batch[3] * valid
    if rows is not None:
        batch = [jax.lax.with_sharding_constraint(x, rows) for x in batch]
    step_key = jax.random.fold_in(data.key, step.number) if data.key is not None else None

    def loss_fn(w: Any) -> tuple[jax.Array, jax.Array]:
        lora = LoraInputs(weights=w, scale=data.scale, dropout=data.dropout, key=step_key)
        return token_loss_sum(model, lora, *batch, layers=layers)

    w, opt, failed_at = trainee.weights, trainee.opt, trainee.failed_at
    (loss_sum, count), g = jax.value_and_grad(loss_fn, has_aux=True)(w)
    act = step.active & (failed_at < 0)
    acc = Accumulator(_where_tree(act, jax.tree.map(jnp.add, acc.grads, g), acc.grads),
                      jnp.where(act, acc.loss + loss_sum, acc.loss), jnp.where(act, acc.count + count, acc.count))
    update_now = act & step.boundary
    denom = jnp.maximum(acc.count, 1.0)
    grads = jax.tree.map(lambda x: x / denom, acc.grads)
    updates, new_opt = tx.update(grads, opt, w)
    new_w = jax.tree.map(lambda p, u: p - step.lr * u, w, updates)
    finite = jnp.isfinite(acc.loss) & _all_finite(grads) & _all_finite(new_w)
    apply = update_now & finite
    trainee = Trainee(_where_tree(apply, new_w, w), _where_tree(apply, new_opt, opt),
                      jnp.where(update_now & ~finite & (failed_at < 0), step.number, failed_at))
    step_loss = jnp.where(update_now, acc.loss / denom, jnp.nan)
    acc = _where_tree(update_now, Accumulator.zeros(w), acc)
    return trainee, acc, step_loss


def init_opt_state(w: Any) -> Any:
    """AdamW state for one adapter (the moments start at zero)."""
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.0)).init(w)


def train_candidate(graphdef: Any, state: Any, lora_w: Any, data: CandidateData,
                    steps: Step) -> tuple[Any, jax.Array, jax.Array, Any]:
    """Train one candidate's adapter over its own micro-step schedule (the reference layout).

    Shapes: lora_w ``{p: {"a": [L, in, R], "b": [L, R, out]}}``; data as in :class:`CandidateData`;
    steps: a :class:`Step` per micro-step (leading axis ``[S]``).
    Returns ``(trained lora_w, loss per micro-step [S] (NaN where no update), failed micro-step or -1,
    final optimiser state)``.
    """
    model = nnx.merge(graphdef, state)

    def body(carry: tuple[Trainee, Accumulator], step: Step) -> tuple[Any, jax.Array]:
        trainee, acc, loss = micro_step(model, *carry, data, step)
        return (trainee, acc), loss

    init = (Trainee(lora_w, init_opt_state(lora_w), jnp.int32(-1)), Accumulator.zeros(lora_w))
    (trainee, _), losses = jax.lax.scan(body, init, steps)
    return trainee.weights, losses, trainee.failed_at, trainee.opt


@dataclasses.dataclass(frozen=True)
class TrainLayout:
    """The static choices of one compiled training program (its cache key besides the model).

    lengths: the token lengths compiled (one branch each, see :class:`LanePlan`); dropout: whether any
    candidate uses LoRA dropout; rows: the sharding of a micro-batch's rows (data parallelism within a
    candidate, see :func:`data_layout`) or None; lanes: the sharding of the lane axis of the candidates'
    state (the lanes split over ``data``) or None.
    """

    lengths: tuple[int, ...]
    dropout: bool
    rows: Any = None
    lanes: Any = None


def data_layout(mesh: Any, lanes: int, batch: int) -> tuple[str, Any]:
    """How a training call uses the mesh's ``data`` axis (size D): ``("lanes", None)`` when the ``lanes``
    divide by D (or D is 1); ``("rows", sharding)`` when they do not but the micro-batch size ``batch`` does
    (every device takes ``batch / D`` rows of each lane's micro-batch; the compiler sums the adapter
    gradients across devices); otherwise ``("pad", None)``: the lanes are padded with idle ones to a multiple
    of D. Rows come before padding because they add no idle work."""
    d = 1 if mesh is None else int(mesh.shape.get("data", 1))
    if d == 1 or lanes % d == 0:
        return "lanes", None
    if batch % d == 0:
        return "rows", jax.sharding.NamedSharding(mesh, shd.spec_for(mesh, ("batch", None), (batch, 1)))
    return "pad", None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Schedule:
    """A :class:`LanePlan` on the device: per step ``[S]`` and lane ``[S, M]``, which candidate a lane works on
    (``cand``) and in which of the lane's slots it lives (``slot``; on a lane's idle steps after its last
    candidate, ``cand`` is the dummy K and ``slot`` that last candidate's, whose state a masked step leaves
    untouched), that candidate's :class:`Step` and the step's ``length_bucket`` (``[S]``)."""

    cand: Any
    slot: Any
    step: Step
    length_bucket: Any


def train_lanes(graphdef: Any, layout: TrainLayout, state: Any, lora_w: Any, data: CandidateData,
                schedule: Schedule) -> tuple[Any, jax.Array, jax.Array]:
    """Train K candidates on M lanes: a scan over steps; at each step every lane
    takes its candidate's adapter and optimiser state from the lane's own slots, gathers the candidate's
    data, runs :func:`micro_step` (``vmap`` over lanes, at the step's token length) and puts the state back.

    The candidates' state is kept where their lanes run: lora_w comes (donated) and goes in the lanes'
    layout ``[M, R, ...]`` (``LanePlan.home``), so with the lanes split over devices a step reads and writes
    only its own device's state: no collective per step. Every field of ``data`` has a leading ``K+1`` axis;
    ``layout`` holds the static choices (token lengths, dropout, how the micro-batch rows and the lanes are
    sharded).
    Returns ``(lora_w [M, R, ...], loss per step and lane [S, M], failed micro-step [M, R])``.
    """
    model = nnx.merge(graphdef, state)
    # per-layer weights, taken here outside the loop over steps (a slice of a stacked array taken inside it is
    # copied on every step on GPUs, where the weights are stored split and this takes them as they lie)
    layers = model.unstacked_layers() if model.train_layers == "unrolled" else None
    m = schedule.cand.shape[1]
    if layout.lanes is not None:  # the lanes take `data`: an attention kernel keeps each lane's rows whole
        model.attention_placement = dataclasses.replace(model.attention_placement, rows_split=False)

    def resident(x: jax.Array) -> jax.Array:
        return x if layout.lanes is None else jax.lax.with_sharding_constraint(x, layout.lanes)

    home_w = jax.tree.map(resident, lora_w)  # [M, R, ...]
    slots = jax.tree.leaves(lora_w)[0].shape[:2]
    trainees = Trainee(home_w, jax.vmap(jax.vmap(init_opt_state))(home_w), resident(jnp.full(slots, -1, jnp.int32)))
    acc0 = jax.vmap(lambda _: Accumulator.zeros(jax.tree.map(lambda x: x[0, 0], lora_w)))(jnp.arange(m))

    def take(tree: Any, slot: jax.Array) -> Any:  # each lane's own slot: [M, R, ...] -> [M, ...]
        if slots[1] == 1:  # no lane holds more than one candidate: the state is the lanes' own, no gather
            return jax.tree.map(lambda x: x[:, 0], tree)
        return jax.vmap(lambda t, s: jax.tree.map(lambda x: x[s], t))(tree, slot)

    def put(tree: Any, slot: jax.Array, new: Any) -> Any:
        if slots[1] == 1:
            return jax.tree.map(lambda y: y[:, None], new)
        return jax.vmap(lambda t, s, n: jax.tree.map(lambda x, y: x.at[s].set(y), t, n))(tree, slot, new)

    def lane_step(length: int, trainee: Trainee, acc: Accumulator, c: Any, step: Step) -> Any:
        mine = jax.tree.map(lambda x: x[c], dataclasses.replace(data, key=data.key if layout.dropout else None))
        return micro_step(model, trainee, acc, mine, step, length=length, rows=layout.rows, layers=layers)

    def idle(trainee: Trainee, acc: Accumulator, *_: Any) -> Any:
        return trainee, acc, jnp.full((m,), jnp.nan, jnp.float32)

    spmd = None if layout.lanes is None else "data"  # lanes over `data`: so told to the kernels' shard_map
    branches = [jax.vmap(functools.partial(lane_step, n), spmd_axis_name=spmd) for n in layout.lengths] + [idle]

    def body(carry: tuple[Trainee, Accumulator], xs: Any) -> tuple[Any, jax.Array]:
        everyone, acc = carry
        c, slot, step, bucket = xs
        lanes = take(everyone, slot)
        lanes, acc, loss = jax.lax.switch(bucket, branches, lanes, acc, c, step)
        return (put(everyone, slot, lanes), acc), loss

    xs = (schedule.cand, schedule.slot, schedule.step, schedule.length_bucket)
    (trainees, _), losses = jax.lax.scan(body, (trainees, acc0), xs)
    return trainees.weights, losses, trainees.failed_at


class TrainPrograms(dict):
    """Compiled lane trainers by :class:`TrainLayout`, all compiled with the XLA ``compiler_options``
    (``jax.jit``'s; ``None``: the compiler's defaults). The LM facade keeps one per set of options."""

    def __init__(self, compiler_options: dict[str, Any] | None = None):
        super().__init__()
        self.compiler_options = dict(compiler_options) if compiler_options else None


def make_train_program(graphdef: Any, layout: TrainLayout, compiler_options: dict[str, Any] | None = None) -> Any:
    """The jitted lane trainer for one :class:`TrainLayout` (see :func:`train_lanes`)."""
    return jax.jit(functools.partial(train_lanes, graphdef, layout), donate_argnums=(1,),
                   compiler_options=compiler_options)


def _candidate_sharding(mesh: Any, shape: Sequence[int]) -> Any:
    """Per-candidate data and specs ``[K+1, ...]`` are replicated: every lane gathers any candidate's (the
    adapters and optimiser state live in the lanes' layout instead, see :func:`_home_sharding`)."""
    del shape
    return shd.replicated(mesh)


def _lane_sharding(mesh: Any, shape: Sequence[int]) -> Any:
    """Lane arrays ``[S, M, ...]`` have their lane axis over the candidate (``data``) axis."""
    return jax.sharding.NamedSharding(mesh, shd.spec_for(mesh, (None, "candidates") + (None,) * (len(shape) - 2), shape))


def _home_sharding(mesh: Any, shape: Sequence[int]) -> Any:
    """The candidates' state in the lanes' layout ``[M, R, ...]``: the lane axis as in :func:`_lane_sharding`."""
    return jax.sharding.NamedSharding(mesh, shd.spec_for(mesh, ("candidates",) + (None,) * (len(shape) - 1), shape))


def _place(mesh: Any, tree: Any, sharding: Any, abstract: bool) -> Any:
    """Arrays of ``tree`` placed with ``sharding(mesh, shape)``, or (``abstract``) their
    ``jax.ShapeDtypeStruct`` with that sharding, for lowering without data."""
    def one(x: Any) -> Any:
        shape, dtype = tuple(np.shape(x)), x.dtype
        where = None if mesh is None else sharding(mesh, shape)
        if abstract:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=where)
        return jnp.asarray(x) if where is None else jax.device_put(x, where)

    return jax.tree.map(one, tree)


def initial_adapters(params: dict[str, jax.Array], loras: Sequence[LoraSpec], trains: Sequence[TrainSpec],
                     seed: int) -> dict[str, dict[str, jax.Array]]:
    """The stacked adapters that :func:`train_adapters` starts from (PEFT-like init, per-candidate keys)."""
    keys = [jax.random.fold_in(candidate_key(seed, t.seed), 0) for t in trains]
    return init_adapters(params, loras, keys)


@dataclasses.dataclass
class TrainCall:
    """One training call made ready: its jitted program (from the cache), device arguments and plans."""

    program: Any
    args: tuple[Any, ...]
    plan: Plan
    lanes: LanePlan
    loras: list[LoraSpec]
    trains: list[TrainSpec]


def check_specs(k: int, lora: LoraSpec | Sequence[LoraSpec],
                train: TrainSpec | Sequence[TrainSpec]) -> tuple[list[LoraSpec], list[TrainSpec]]:
    """One :class:`LoraSpec` and :class:`TrainSpec` per candidate (a single spec is repeated K times)."""
    for name, given, kind in (("lora", lora, LoraSpec), ("train", train, TrainSpec)):
        wrong = [given] if not isinstance(given, (list, tuple)) else given
        wrong = next((s for s in wrong if not isinstance(s, kind)), None)
        if wrong is not None:
            raise TrainError(f"{name} must be a seal_jax.{kind.__name__} (or a list of them, one per candidate), "
                             f"got {type(wrong).__name__} {wrong!r}: e.g. seal_jax.{kind.__name__}(**{{...}})")
    specs_l = [lora] * k if isinstance(lora, LoraSpec) else list(lora)
    specs_t = [train] * k if isinstance(train, TrainSpec) else list(train)
    if len(specs_l) != k or len(specs_t) != k:
        raise TrainError(f"got {k} candidates but {len(specs_l)} LoraSpecs and {len(specs_t)} TrainSpecs")
    if len({s.batch_size for s in specs_t}) > 1:
        raise TrainError("all candidates of one call must share TrainSpec.batch_size; split the call by batch size")
    return specs_l, specs_t


def _assemble(graphdef: Any, state: Any, params: dict[str, Any], examples: Sequence[Sequence[Example]],
              specs_l: list[LoraSpec], specs_t: list[TrainSpec], *, seed: int, eos_id: int, pad_id: int,
              mesh: Any, programs: dict[Any, Any] | None, lanes: int | None, abstract: bool) -> TrainCall:
    """Plans, initial adapters, the program and its placed (or, ``abstract``, shape-only) arguments."""
    plan = make_plan(examples, specs_t, seed, pad_id, eos_id)
    lp = make_lane_plan(plan, lanes)
    how, rows = data_layout(mesh, lp.cand.shape[1], plan.order.shape[-1])
    if how == "pad":
        lp = make_lane_plan(plan, lanes, multiple=int(mesh.shape.get("data", 1)))
    if abstract:
        weights = jax.eval_shape(lambda: initial_adapters(params, specs_l, specs_t, seed))
        keys = jax.eval_shape(lambda: jnp.stack([jax.random.fold_in(candidate_key(seed, s.seed), 1) for s in specs_t]))
    else:
        weights = initial_adapters(params, specs_l, specs_t, seed)
        keys = jnp.stack([jax.random.fold_in(candidate_key(seed, s.seed), 1) for s in specs_t])

    def with_dummy(x: Any) -> Any:  # one more candidate: the data of idle lane steps, the filler of empty slots
        if abstract:
            return jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype)
        x = jnp.asarray(x)
        return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])

    def floats(values: list[float]) -> Any:
        if abstract:
            return with_dummy(jax.ShapeDtypeStruct((len(values),), jnp.float32))
        return with_dummy(np.asarray(values, np.float32))

    def data(x: np.ndarray) -> Any:
        return with_dummy(jax.ShapeDtypeStruct(x.shape, x.dtype) if abstract else x)

    candidates = CandidateData(
        scale=floats([s.scale for s in specs_l]), dropout=floats([s.dropout for s in specs_l]),
        weight_decay=floats([s.weight_decay for s in specs_t]), key=with_dummy(keys), tokens=data(plan.tokens),
        attention=data(plan.attention), positions=data(plan.positions), loss_weights=data(plan.weights))
    steps = Step(lp.idx, lp.active, lp.boundary, lp.lr, lp.step)
    lanes_split = mesh is not None and how != "rows" and int(mesh.shape.get("data", 1)) > 1
    lane_state = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")) if lanes_split else None)
    layout = TrainLayout(lp.lengths, any(s.dropout > 0 for s in specs_l), rows, lane_state)
    if programs is None:
        programs = TrainPrograms()
    if layout not in programs:
        programs[layout] = make_train_program(graphdef, layout, getattr(programs, "compiler_options", None))
    length_bucket = (jax.ShapeDtypeStruct(lp.length_bucket.shape, jnp.int32,
                                          sharding=None if mesh is None else shd.replicated(mesh))
                     if abstract else jnp.asarray(lp.length_bucket))
    cand, slot, steps = _place(mesh, (lp.cand, lp.slot, steps), _lane_sharding, abstract)
    def at_home(x: Any) -> Any:  # [K+1, ...] -> the lanes' layout [M, R, ...]
        if abstract:
            return jax.ShapeDtypeStruct((*lp.home.shape, *x.shape[1:]), x.dtype)
        return x[lp.home]

    home_w = _place(mesh, jax.tree.map(lambda x: at_home(with_dummy(x)), weights), _home_sharding, abstract)
    args = (state, home_w, _place(mesh, candidates, _candidate_sharding, abstract),
            Schedule(cand, slot, steps, length_bucket))
    return TrainCall(programs[layout], args, plan, lp, specs_l, specs_t)


def check_context(examples: Sequence[Sequence[Example]], specs: Sequence[TrainSpec], context: int) -> None:
    """Refuse rows longer than the model's context (``max_position_embeddings``), as logits and generation
    do: past it the rotary positions are ones the model never saw.

    Raises:
      TrainError: the first candidate whose longest row (or ``seal_padded`` rows' ``max_len``) exceeds it.
    """
    for i, (ex, spec) in enumerate(zip(examples, specs, strict=True)):
        if spec.loss == "seal_padded" and spec.max_len > context:
            raise TrainError(f"candidate {i}: loss 'seal_padded' pads every row to TrainSpec.max_len = {spec.max_len} "
                             f"tokens, past this model's context of {context} (max_position_embeddings); set "
                             f"max_len <= {context}")
        longest = max(len(e.ids) for e in ex)
        if longest > context:
            raise TrainError(f"candidate {i} has a training row of {longest} tokens, past this model's context of "
                             f"{context} (max_position_embeddings); set TrainSpec.max_len <= {context} to truncate "
                             "rows, or split the text")


def prepare_call(graphdef: Any, state: Any, params: dict[str, jax.Array], tokenizer: Any,
                 sequences: Sequence[Sequence[Item]], lora: LoraSpec | Sequence[LoraSpec],
                 train: TrainSpec | Sequence[TrainSpec], *, seed: int, eos_id: int, pad_id: int, mesh: Any,
                 programs: dict[Any, Any] | None, lanes: int | None, context: int | None = None) -> TrainCall:
    """Validate and tokenise a training call, build its plans, and place its arguments (see
    :func:`train_adapters` for the arguments). Raises :class:`TrainError` on bad input."""
    if not is_int(seed):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not 0 <= seed < 2**32:
        raise TrainError(f"seed must be in [0, 2**32) (the call's seed, mixed with each TrainSpec.seed), got {seed}")
    k = len(sequences)
    if k == 0:
        raise TrainError("sequences is empty: pass a list (K candidates) of lists of training strings")
    if isinstance(sequences[0], str):
        raise TrainError("sequences must be a list (K candidates) of lists of strings; wrap a single list as [texts]")
    specs_l, specs_t = check_specs(k, lora, train)
    if tokenizer is None and not all(_is_ids(item) for items in sequences for item in items):
        raise TrainError("this model has no tokenizer; load it with tokenizer=... to train on text, or pass "
                         "token-id lists")
    examples = [tokenize(tokenizer, items, spec, eos_id) for items, spec in zip(sequences, specs_t, strict=True)]
    vocab = params["embedding"].shape[0]
    for i, ex in enumerate(examples):
        bad = [t for e in ex for t in e.ids if not 0 <= t < vocab]
        if bad:
            raise TrainError(f"candidate {i} has token ids outside [0, {vocab}) (e.g. {bad[0]}); token-id "
                             "training items must be ids of this model's vocabulary")
    empty = [i for i, ex in enumerate(examples) if not ex]
    if empty:
        raise TrainError(f"candidates {empty} have no usable training sequence (empty texts, or prompts that fill "
                         "TrainSpec.max_len?)")
    if context is not None:
        check_context(examples, specs_t, context)
    return _assemble(graphdef, state, params, examples, specs_l, specs_t, seed=seed, eos_id=eos_id, pad_id=pad_id,
                     mesh=mesh, programs=programs, lanes=lanes, abstract=False)


def lower_train(graphdef: Any, state: Any, params: dict[str, Any], *, candidates: int, sequences: int, seq_len: int,
                lora: LoraSpec | Sequence[LoraSpec], train: TrainSpec | Sequence[TrainSpec], seed: int = 0,
                mesh: Any = None, programs: dict[Any, Any] | None = None, lanes: int | None = None) -> Any:
    """Lower (without compiling or running) the training program of a call with ``candidates`` candidates of
    ``sequences`` sequences of ``seq_len`` tokens each (``state``/``params`` real or abstract). The plan is the
    one :func:`train_adapters` builds for such data, so the program is the one a run executes.
    Returns a ``jax.stages.Lowered``."""
    if candidates < 1 or sequences < 1 or seq_len < 2:
        raise TrainError(f"lower_train needs candidates >= 1, sequences >= 1 and seq_len >= 2, got "
                         f"{candidates}, {sequences}, {seq_len}")
    specs_l, specs_t = check_specs(candidates, lora, train)
    length = min(seq_len, min(s.max_len for s in specs_t))
    examples = [[Example([1] * length) for _ in range(sequences)] for _ in range(candidates)]
    call = _assemble(graphdef, state, params, examples, specs_l, specs_t, seed=seed, eos_id=0, pad_id=0, mesh=mesh,
                     programs=programs, lanes=lanes, abstract=True)
    return call.program.lower(*call.args)


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
    programs: dict[Any, Any] | None = None,
    lanes: int | None = None,
    context: int | None = None,
) -> Adapters:
    """Train K LoRA adapters (one per list of sequences) in one compiled program.

    Args:
      graphdef, state: the split base model (frozen, broadcast to every candidate).
      params: base parameters ``{dotted path: array}`` (shapes for the adapters).
      sequences: K lists of training items (strings, or ``(prompt, completion)`` pairs for SFT).
      lora, train: one spec for all candidates or one per candidate.
      seed: the call's seed, mixed with every candidate's ``TrainSpec.seed``.
      mesh: if given, the mesh's ``data`` axis splits the lanes, or else each micro-batch's rows, or else
        the lanes padded with idle ones to a multiple of it (:func:`data_layout`).
      programs: a cache of compiled programs to reuse across calls (the LM facade keeps one).
      lanes: how many candidates train side by side (default: as few lanes as keep the run as short as
        its longest candidate; ``lanes=K`` runs every candidate in its own lane); raised to a multiple of
        the mesh's ``data`` size when the lanes are padded.
      context: the model's ``max_position_embeddings``; a longer row is a :class:`TrainError`.
    Returns:
      :class:`Adapters` with K candidates, their loss histories and failure reasons.
    """
    call = prepare_call(graphdef, state, params, tokenizer, sequences, lora, train, seed=seed, eos_id=eos_id,
                        pad_id=pad_id, mesh=mesh, programs=programs, lanes=lanes, context=context)
    plan, lp, specs_l, specs_t, k = call.plan, call.lanes, call.loras, call.trains, len(sequences)
    trained, losses, failed_at = call.program(*call.args)
    where = (lp.lane_of[:k], lp.slot_of[:k])  # each candidate's slot in the lanes' layout
    trained = jax.tree.map(lambda x: x[where], trained)
    if mesh is not None:  # the adapters leave replicated, as every program that reads them expects
        trained = jax.device_put(trained, shd.replicated(mesh))
    failed_at = failed_at[where]
    losses = np.asarray(shd.to_host(losses))
    failed_at = np.asarray(shd.to_host(failed_at))
    histories: list[list[float]] = [[] for _ in range(k)]
    for t, lane in zip(*np.nonzero(lp.active & lp.boundary), strict=True):
        histories[lp.cand[t, lane]].append(float(losses[t, lane]))
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


def training_memory(graphdef: Any, state: Any, params: dict[str, jax.Array], tokenizer: Any,
                    sequences: Sequence[Sequence[Item]], lora: LoraSpec | Sequence[LoraSpec],
                    train: TrainSpec | Sequence[TrainSpec], *, seed: int = 0, eos_id: int, pad_id: int,
                    mesh: Any = None, programs: dict[Any, Any] | None = None,
                    lanes: int | None = None, context: int | None = None) -> dict[str, int]:
    """Bytes the compiled program of a :func:`train_adapters` call needs, from XLA's memory analysis
    (compiles, does not train): ``{"arguments", "outputs", "temporaries", "total"}`` per device, where
    ``arguments`` include the base weights and ``temporaries`` are activations, gradients and optimiser
    work space."""
    call = prepare_call(graphdef, state, params, tokenizer, sequences, lora, train, seed=seed, eos_id=eos_id,
                        pad_id=pad_id, mesh=mesh, programs=programs, lanes=lanes, context=context)
    m = call.program.lower(*call.args).compile().memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "temporaries": int(m.temp_size_in_bytes)}
    out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - int(m.alias_size_in_bytes)
    return out
