"""Lanes: K training candidates packed onto M <= K parallel lanes, each lane running its candidates one
after another (host side, numpy). :func:`make_lane_plan` turns a training plan's K schedules into the
``[S, M]`` schedule that :func:`seal_jax.lm.training.train_lanes` runs, with each step's token length
bucketed so that a step computes only on the tokens its rows need."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from seal_jax.lm.tokenizer import bucket


@dataclasses.dataclass
class LanePlan:
    """A training plan's (:class:`seal_jax.lm.training.Plan`) schedules packed onto lanes (all ``[S, M]`` unless noted; candidate K is a dummy).

    cand: which candidate a lane works on; idx ``[S, M, B]``; active/boundary/lr as in :class:`~seal_jax.lm.training.Plan`;
    step: the candidate's own micro-step number; length_bucket ``[S]`` indexes ``lengths`` (the static
    token lengths compiled, one branch each); ``len(lengths)`` marks a step where no lane works (skipped).

    A candidate trains on one lane only, so its state lives there: ``home`` ``[M, R]`` lists each lane's
    candidates in order (R = the most any lane has; the dummy K fills the rest); ``slot`` ``[S, M]`` is the
    slot of the candidate a lane works on (after its last candidate, a lane's idle steps stay on that
    candidate's slot: a masked step leaves the state untouched); ``lane_of``/``slot_of`` ``[K+1]`` say where
    each candidate lives (the dummy's entry, lane 0 slot 0, is never read).
    """

    cand: np.ndarray
    idx: np.ndarray
    active: np.ndarray
    boundary: np.ndarray
    lr: np.ndarray
    step: np.ndarray
    length_bucket: np.ndarray
    lengths: tuple[int, ...]
    slot: np.ndarray
    home: np.ndarray
    lane_of: np.ndarray
    slot_of: np.ndarray


def assign_lanes(steps: Sequence[int], lanes: int | None = None) -> list[list[int]]:
    """Pack candidates with ``steps`` micro-steps each onto lanes (longest first onto the emptiest lane).

    ``lanes=None`` picks ``ceil(sum / max)`` lanes, so that no lane is much longer than the longest
    candidate; ``lanes=K`` gives every candidate its own lane.
    """
    k = len(steps)
    m = max(1, math.ceil(sum(steps) / max(steps))) if lanes is None else lanes
    m = min(max(1, m), k)
    loads = [0] * m
    out: list[list[int]] = [[] for _ in range(m)]
    for c in sorted(range(k), key=lambda i: (-steps[i], i)):
        lane = min(range(m), key=lambda j: (loads[j], j))
        out[lane].append(c)
        loads[lane] += steps[c]
    return [lane for lane in out if lane]


def length_buckets(needed: np.ndarray, full: int, max_buckets: int = 3) -> tuple[int, ...]:
    """At most ``max_buckets`` token lengths (the last is ``full``) covering the ``needed`` lengths."""
    sizes = sorted({min(full, bucket(int(n))) for n in needed if n > 0} | {full})
    while len(sizes) > max_buckets:
        # drop the bucket whose removal wastes least (its steps move up to the next size)
        costs = [(np.sum((needed > (sizes[i - 1] if i else 0)) & (needed <= sizes[i])) * (sizes[i + 1] - sizes[i]), i)
                 for i in range(len(sizes) - 1)]
        sizes.pop(min(costs)[1])
    return tuple(sizes)


def make_lane_plan(plan: Any, lanes: int | None = None, max_buckets: int = 3, multiple: int = 1) -> LanePlan:
    """Pack ``plan``'s (a :class:`seal_jax.lm.training.Plan`) K schedules onto lanes (see :func:`assign_lanes`) and bucket each step's length.

    ``multiple``: the number of lanes is made a multiple of it (candidates re-packed onto that many lanes,
    idle lanes where there are fewer candidates), so that the lane axis splits evenly over a mesh axis."""
    k, _, batch = plan.order.shape
    steps = [int(plan.active[c].sum()) for c in range(k)]
    groups = assign_lanes(steps, lanes)
    if len(groups) % multiple:
        want = -(-len(groups) // multiple) * multiple
        groups = assign_lanes(steps, want)
        groups += [[] for _ in range(want - len(groups))]
    m = len(groups)
    s = max(sum(steps[c] for c in g) for g in groups)
    s = -(-s // 8) * 8
    r = max(1, max(len(g) for g in groups))
    home = np.full((m, r), k, np.int32)
    lane_of = np.zeros(k + 1, np.int32)
    slot_of = np.zeros(k + 1, np.int32)
    slot = np.zeros((s, m), np.int32)
    cand = np.full((s, m), k, np.int32)
    idx = np.full((s, m, batch), -1, np.int32)
    active = np.zeros((s, m), bool)
    boundary = np.zeros((s, m), bool)
    lr = np.zeros((s, m), np.float32)
    step = np.zeros((s, m), np.int32)
    for lane, group in enumerate(groups):
        t = 0
        for j, c in enumerate(group):
            n = steps[c]
            home[lane, j], lane_of[c], slot_of[c] = c, lane, j
            slot[t:, lane] = j
            cand[t:t + n, lane] = c
            idx[t:t + n, lane] = plan.order[c, :n]
            active[t:t + n, lane] = True
            boundary[t:t + n, lane] = plan.boundary[c, :n]
            lr[t:t + n, lane] = plan.lr[c, :n]
            step[t:t + n, lane] = np.arange(n)
            t += n
    seq_len = plan.attention.sum(-1)  # [K, N]
    seal_padded = plan.weights.sum(-1) > plan.attention.sum(-1) - 1  # loss beyond the text: needs all of T
    need_row = np.where(seal_padded, plan.tokens.shape[-1], seq_len)
    need = np.zeros(s, np.int64)
    for t in range(s):
        for lane in range(m):
            if active[t, lane]:
                rows = [r for r in idx[t, lane] if r >= 0]
                need[t] = max([need[t]] + [int(need_row[cand[t, lane], r]) for r in rows])
    lengths = length_buckets(need, plan.tokens.shape[-1], max_buckets)
    length_bucket = np.searchsorted(np.asarray(lengths), need).astype(np.int32)
    length_bucket[~active.any(axis=1)] = len(lengths)  # padding steps: the idle branch, no compute
    return LanePlan(cand, idx, active, boundary, lr, step, length_bucket, lengths, slot, home, lane_of, slot_of)
