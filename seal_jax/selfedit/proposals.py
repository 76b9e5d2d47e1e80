"""Asking a model for templates: exploit/explore sampling, retries of invalid output, one record per attempt.

Shared by the template search (:mod:`seal_jax.selfedit.template_search`) and the ``template`` condition of
knowledge runs (:mod:`seal_jax.selfedit.knowledge`). Every slot asks the same meta-prompt; a slot's kind
(``exploit`` or ``explore``) fixes its sampling (:func:`seal_jax.selfedit.meta_prompts.proposal_sampling`).
All pending slots of one kind are sampled in one batched ``generate`` call per attempt; a slot whose
output does not parse as a template (:func:`~seal_jax.selfedit.templates.parse_template`) is asked again,
up to ``max_retries`` more times. Every attempt is recorded with its raw text and, if rejected, the reason;
model output is parsed, never executed. Seeds derive from ``(seed, tag, kind, attempt)``, so a run repeats
exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from seal_jax.selfedit.engine import LanguageModel
from seal_jax.selfedit.meta_prompts import proposal_sampling
from seal_jax.selfedit.run_config import derived_seed
from seal_jax.selfedit.templates import Template, TemplateError, parse_template

PROPOSAL_FIELDS = ("slot", "kind", "attempt", "valid", "reason", "notes", "template", "text")


@dataclasses.dataclass(frozen=True)
class Proposal:
    """One attempt at a template.

    Attributes:
      slot: which of the iteration's templates this attempt is for (0-based).
      kind: ``"exploit"`` or ``"explore"``.
      attempt: 0 for the first try, 1 … ``max_retries`` for retries.
      text: the model's raw answer.
      template: the parsed template, or ``None`` when rejected.
      reason: why the answer was rejected (``None`` when valid).
    """

    slot: int
    kind: str
    attempt: int
    text: str
    template: Template | None
    reason: str | None

    @property
    def valid(self) -> bool:
        """Whether the answer parsed as a template."""
        return self.template is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record with :data:`PROPOSAL_FIELDS` (``template`` as a dict in the nested form,
        ``notes`` its clamps)."""
        return {"slot": self.slot, "kind": self.kind, "attempt": self.attempt, "valid": self.valid,
                "reason": self.reason, "notes": list(self.template.notes) if self.template else [],
                "template": self.template.to_dict() if self.template else None, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Proposal:
        """The proposal of a record written by :meth:`to_dict`."""
        template = Template.from_dict(d["template"]) if d.get("template") else None
        return cls(int(d["slot"]), str(d["kind"]), int(d["attempt"]), str(d["text"]), template, d.get("reason"))


def schedule(n: int, kinds: Sequence[str]) -> list[str]:
    """The kinds of ``n`` slots in the proportions of ``kinds`` (the paper's 3 exploit + 2 explore).

    Each kind gets ``round(n · its share)`` slots (the first kind takes the remainder), in the order of
    ``kinds``: ``n = 5`` gives ``kinds`` itself, ``n = 2`` one exploit and one explore, ``n = 1`` one
    exploit, ``n = 10`` six and four.
    """
    if n < 1:
        raise TemplateError(f"need at least one template slot, got {n}")
    order = list(dict.fromkeys(kinds))
    counts = {kind: int(round(n * kinds.count(kind) / len(kinds) + 1e-9)) for kind in order[1:]}
    counts = {order[0]: max(n - sum(counts.values()), 0), **counts}
    out = [kind for kind in order for _ in range(counts[kind])]
    return out[:n]


def propose(lm: LanguageModel, prompt: str, kinds: Sequence[str], *, max_new_tokens: int, max_retries: int, seed: int,
            chat: bool = True) -> list[Proposal]:
    """Ask ``lm`` for one template per slot (``kinds[i]`` is slot ``i``'s kind), retrying invalid answers.

    Args:
      lm: a :class:`~seal_jax.LM` (anything with ``generate(prompts, params, chat=...)``).
      prompt: the meta-prompt (a user message when ``chat``).
      kinds: ``"exploit"``/``"explore"`` per slot.
      max_new_tokens: proposal length; max_retries: extra attempts per slot after an invalid answer.
      seed: the base seed; each (kind, attempt) batch gets its own seed derived from it.
    Returns:
      every attempt in the order made (attempt, then kind, then slot); a slot's last record is valid or it
      ran out of retries.
    """
    if max_retries < 0:
        raise TemplateError(f"max_retries must be >= 0, got {max_retries}")
    records: list[Proposal] = []
    pending = list(range(len(kinds)))
    for attempt in range(max_retries + 1):
        if not pending:
            break
        for kind in dict.fromkeys(kinds[s] for s in pending):
            slots = [s for s in pending if kinds[s] == kind]
            params = proposal_sampling(kind, max_new_tokens, seed=derived_seed(seed, "proposal", kind, attempt))
            texts = lm.generate([prompt] * len(slots), params, chat=chat)
            for slot, text in zip(slots, texts, strict=True):
                try:
                    template, reason = parse_template(text), None
                except TemplateError as error:
                    template, reason = None, str(error)
                records.append(Proposal(slot, kind, attempt, text, template, reason))
        valid = {r.slot for r in records if r.valid}
        pending = [s for s in pending if s not in valid]
    return records


def chosen(records: Sequence[Proposal]) -> dict[int, Template]:
    """``{slot: template}`` of the slots that got a valid template (the first valid attempt of each)."""
    out: dict[int, Template] = {}
    for r in records:
        if r.template is not None and r.slot not in out:
            out[r.slot] = r.template
    return dict(sorted(out.items()))
