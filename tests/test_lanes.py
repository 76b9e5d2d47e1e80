"""Lane packing: K training candidates on M lanes, and the length bucket of each step."""

from __future__ import annotations

import types

import numpy as np

from seal_jax.lm.lanes import assign_lanes, length_buckets, make_lane_plan


def test_lane_packing() -> None:
    steps = [48, 4, 8, 16, 8, 12, 8]
    lanes = assign_lanes(steps)
    assert sorted(c for lane in lanes for c in lane) == list(range(7))
    assert len(lanes) == 3 and max(sum(steps[c] for c in lane) for lane in lanes) == 48
    assert assign_lanes([5, 5, 5], lanes=3) == [[0], [1], [2]]
    assert assign_lanes([5, 5, 5], lanes=1) == [[0, 1, 2]]
    assert length_buckets(np.array([10, 20, 40, 300, 0]), 320) == (32, 64, 320)
    assert length_buckets(np.array([10, 20, 40, 300]), 320, max_buckets=2)[-1] == 320


def _plan(steps: list[int], lengths: list[int], full: int = 64) -> types.SimpleNamespace:
    """A training plan's fields as make_lane_plan reads them: candidate c has steps[c] micro-steps of one
    row each, every row lengths[c] tokens long."""
    k, s = len(steps), max(steps)
    active = np.array([[t < n for t in range(s)] for n in steps])
    order = np.where(active[..., None], np.arange(s)[None, :, None] % 2, -1).astype(np.int32)  # [K, S, 1]
    attention = np.zeros((k, 2, full), np.int32)
    for c, n in enumerate(lengths):
        attention[c, :, :n] = 1
    weights = attention.astype(np.float32)
    weights[..., 0] = 0  # the first token is no target: a row needs its own length only
    return types.SimpleNamespace(order=order, active=active, boundary=active.copy(),
                                 lr=np.where(active, 1e-3, 0.0).astype(np.float32), attention=attention,
                                 weights=weights, tokens=np.zeros((k, 2, full), np.int32))


def test_lane_plan_keeps_each_candidates_schedule_on_one_lane() -> None:
    plan = _plan([6, 2, 2, 4, 3], [10, 10, 60, 30, 10])
    lp = make_lane_plan(plan, lanes=None, multiple=4)
    m = lp.cand.shape[1]
    assert m % 4 == 0 and lp.cand.shape[0] % 8 == 0
    for c, n in enumerate([6, 2, 2, 4, 3]):
        lane, slot = lp.lane_of[c], lp.slot_of[c]
        assert lp.home[lane, slot] == c
        steps = np.flatnonzero(lp.cand[:, lane] == c)
        assert len(steps) == n and np.all(lp.active[steps, lane])
        assert np.array_equal(lp.step[steps, lane], np.arange(n))
        assert np.all(lp.slot[steps, lane] == slot)
    assert lp.lengths[-1] == 64 and len(lp.lengths) > 1  # short steps get a shorter bucket
    short = np.flatnonzero(lp.cand[:, lp.lane_of[0]] == 0)  # candidate 0's rows are 10 tokens
    assert all(lp.lengths[lp.length_bucket[t]] < 64 for t in short if not (lp.cand[t] == 2).any())
    for t in range(lp.cand.shape[0]):  # each step's bucket covers the rows it trains on; idle steps skip
        if not lp.active[t].any():
            assert lp.length_bucket[t] == len(lp.lengths)
            continue
        need = max(int(plan.attention[lp.cand[t, j]].sum(-1).max()) for j in range(m) if lp.active[t, j])
        assert lp.lengths[lp.length_bucket[t]] >= need
