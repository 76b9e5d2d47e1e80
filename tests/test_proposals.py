"""Template proposals: the exploit/explore schedule, batched attempts, retries and their records."""

from __future__ import annotations

import json

import pytest

from seal_jax.selfedit.meta_prompts import EXPLOIT, EXPLORE, PROPOSAL_SCHEDULE
from seal_jax.selfedit.proposals import Proposal, chosen, propose, schedule
from seal_jax.selfedit.templates import TemplateError

VALID = {"data_creation_instruction": "Restate every fact of the passage in plain sentences.", "lora_rank": 24,
         "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 1e-4, "num_epochs": 3,
         "gradient_accumulation_steps": 1}


class ScriptedLM:
    """Answers each generate call with the next scripted list of texts; records the calls."""

    def __init__(self, *batches):
        self.batches, self.calls = list(batches), []

    def generate(self, prompts, params, chat=False):
        self.calls.append((list(prompts), params, chat))
        texts = self.batches.pop(0)
        assert len(texts) == len(prompts)
        return texts


def test_schedule_keeps_the_papers_proportion():
    assert schedule(5, PROPOSAL_SCHEDULE) == list(PROPOSAL_SCHEDULE)
    assert schedule(1, PROPOSAL_SCHEDULE) == ["exploit"]
    assert schedule(2, PROPOSAL_SCHEDULE) == ["exploit", "explore"]
    assert schedule(10, PROPOSAL_SCHEDULE) == ["exploit"] * 6 + ["explore"] * 4
    with pytest.raises(TemplateError, match="at least one"):
        schedule(0, PROPOSAL_SCHEDULE)


def test_propose_batches_by_kind_and_retries_only_invalid_slots():
    good = json.dumps(VALID)
    lm = ScriptedLM([good, "nothing useful"],      # attempt 0, exploit slots 0 and 1
                    ["{\"lora_rank\": 8"],          # attempt 0, explore slot 2 (cut off)
                    ["still nothing"],              # attempt 1, exploit slot 1
                    ["```json\n" + good + "\n```"],  # attempt 1, explore slot 2
                    ["no"])                         # attempt 2, exploit slot 1: out of retries
    records = propose(lm, "META", ["exploit", "exploit", "explore"], max_new_tokens=32, max_retries=2, seed=5)
    assert [(r.slot, r.kind, r.attempt, r.valid) for r in records] == [
        (0, "exploit", 0, True), (1, "exploit", 0, False), (2, "explore", 0, False),
        (1, "exploit", 1, False), (2, "explore", 1, True), (1, "exploit", 2, False)]
    assert "cut off" in records[2].reason and records[0].reason is None
    assert records[0].template.lora_rank == 32 and records[0].template.notes  # 24 snapped, noted
    params = [c[1] for c in lm.calls]
    assert all(c[0] == ["META"] * len(c[0]) and c[2] is True for c in lm.calls)
    assert (params[0].temperature, params[0].min_p) == (EXPLOIT["temperature"], EXPLOIT["min_p"])
    assert (params[1].temperature, params[1].min_p) == (EXPLORE["temperature"], EXPLORE["min_p"])
    assert params[0].max_new_tokens == 32 and len({p.seed for p in params}) == 5  # a seed per (kind, attempt)
    assert sorted(chosen(records)) == [0, 2]
    again = [Proposal.from_dict(json.loads(json.dumps(r.to_dict()))) for r in records]
    assert again == records
    with pytest.raises(TemplateError, match="max_retries"):
        propose(lm, "META", ["exploit"], max_new_tokens=8, max_retries=-1, seed=0)
