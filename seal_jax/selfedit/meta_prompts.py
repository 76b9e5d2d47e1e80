"""Template search's prompts: the meta-prompt asking for a new template, the fill prompt, proposal sampling.

:func:`meta_prompt` asks the model for a template (showing archive entries with their scores, and novelty
when set); :func:`fill_prompt` asks it to fill a template for one passage. Model-written text is inserted
verbatim, never used as a format string. The wording is seal-jax's own; the structure asked for (and shown
in the example and in the archive's entries) is the seed paper's: the instruction plus a nested
``"hyperparameters"`` object.

Proposal sampling follows the paper: 3 *exploit* proposals (temperature 0.6, top-p 0.95, min-p 0.05) and 2
*explore* proposals (temperature 1.3, top-p 0.95, min-p 0.1) per iteration.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from seal_jax.lm.types import SamplingParams
from seal_jax.selfedit.archive import ArchiveEntry
from seal_jax.selfedit.templates import HYPERPARAMETERS_KEY, PLACEHOLDER_INSTRUCTION, Template, TemplateError

__all__ = ["EXPLOIT", "EXPLORE", "PROPOSAL_SCHEDULE", "fill_prompt", "meta_prompt", "proposal_sampling"]


_INSTRUCTION_HELP = ("text telling the model what training data to write from a passage. The model will see "
                     "the passage and your instruction and must answer with a list of training texts.")
_FIELD_HELP = (   # the fields of the nested "hyperparameters" object
    ("lora_rank", "one of 4, 8, 16, 32, 64."),
    ("lora_alpha", "a number from 1 to 256 (the adapter's update is scaled by alpha / rank)."),
    ("lora_dropout", "a number from 0 to 0.99 (0 = no dropout)."),
    ("learning_rate", "a number from 0.00001 to 0.005."),
    ("num_epochs", "a whole number from 1 to 20 (passes over the training texts)."),
    ("gradient_accumulation_steps", "a whole number from 1 to 8 (training texts per optimiser step)."),
)

_EXAMPLE = {"data_creation_instruction": PLACEHOLDER_INSTRUCTION,
            HYPERPARAMETERS_KEY: {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "learning_rate": 0.0003,
                                  "num_epochs": 5, "gradient_accumulation_steps": 2}}


SCORE_SENTENCES = {
    "accuracy": "A plan is scored by the fraction of those questions answered correctly (0 to 1).",
    "gold_loglik": "A plan is scored by the mean log-probability per token that the fine-tuned model gives to the "
                   "correct answers of those questions (0 at best; higher is better).",
}


def meta_prompt(shown: Sequence[ArchiveEntry] | None = None, reward: str = "accuracy") -> str:
    """The request for a new template (the user message; the caller applies the chat template).

    ``shown``: archive entries to show with their scores (and novelty, when set), e.g.
    ``archive.shown()``; ``None`` or empty gives the no-archive prompt. ``reward``: what a score is
    (``accuracy`` or ``gold_loglik``, see :data:`SCORE_SENTENCES`).
    """
    if reward not in SCORE_SENTENCES:
        raise ValueError(f"reward must be one of {sorted(SCORE_SENTENCES)}, got {reward!r}")
    lines = [
        "You are designing a learning plan for a language model. The model will read a passage it has never "
        "seen, write its own training data from the passage by following your instruction, and then be "
        "fine-tuned on that data with a LoRA adapter (next-token prediction, one text per batch) using your "
        "hyperparameters. Afterwards it must answer questions about the passage without seeing the passage "
        "again. " + SCORE_SENTENCES[reward],
        "",
        "Write the plan as one JSON object with exactly two fields:",
        f'- "data_creation_instruction": {_INSTRUCTION_HELP}',
        f'- "{HYPERPARAMETERS_KEY}": an object with exactly these six fields:',
    ]
    lines += [f'  - "{name}": {help_text}' for name, help_text in _FIELD_HELP]
    lines += ["", "The shape of the answer (replace every value with your own choice):",
              json.dumps(_EXAMPLE, ensure_ascii=False), ""]
    entries = list(shown or [])
    if entries:
        with_novelty = any(e.novelty is not None for e in entries)
        lines.append("Plans tried so far, with their scores" + (" and novelty" if with_novelty else "") + ":")
        for number, entry in enumerate(entries, 1):
            label = f"score {entry.score:.3f}"
            if entry.novelty is not None:
                label += f", novelty {entry.novelty:.3f}"
            lines += [f"Plan {number} ({label}):", entry.template.to_json()]
        lines.append("")
        if with_novelty:
            lines.append("Novelty measures how different a plan is from the plans tried before (0 = a copy). "
                         "Plans are rewarded for a high score and for novelty.")
        lines.append("Write a new plan that you expect to score higher than every plan above. Do not copy a "
                     "plan above: change the instruction, the hyperparameters, or both.")
    else:
        lines.append("Write the plan you expect to score highest.")
    lines.append("Reply with the JSON object only.")
    return "\n".join(lines)


def fill_prompt(template: Template | Mapping[str, Any], title: str, context: str) -> str:
    """The request to fill ``template`` for one passage (``title\\ncontext``): the passage, the template's
    instruction, and the answer format ``{"training_sequences": [...]}``. Model-written text is inserted
    verbatim (never used as a format string)."""
    if not isinstance(template, Template):
        template = Template.from_dict(template)
    return ("Passage:\n" + f"{title}\n{context}" + "\n\nInstruction:\n" + template.data_creation_instruction
            + '\n\nFollow the instruction for the passage above. Reply with one JSON object of the form '
            '{"training_sequences": ["first training text", "second training text"]}: a list of strings, '
            "each a self-contained training text. Reply with the JSON object only.")


EXPLOIT: dict[str, float] = {"temperature": 0.6, "top_p": 0.95, "min_p": 0.05}
EXPLORE: dict[str, float] = {"temperature": 1.3, "top_p": 0.95, "min_p": 0.1}
PROPOSAL_SCHEDULE: tuple[str, ...] = ("exploit", "exploit", "exploit", "explore", "explore")


def proposal_sampling(kind: str, max_new_tokens: int, seed: int = 0) -> SamplingParams:
    """``seal_jax.SamplingParams`` for a template proposal: ``kind`` is ``"exploit"`` (temperature 0.6,
    top-p 0.95, min-p 0.05) or ``"explore"`` (1.3, 0.95, 0.1)."""
    settings = {"exploit": EXPLOIT, "explore": EXPLORE}.get(kind)
    if settings is None:
        raise TemplateError(f"unknown proposal kind {kind!r}; choose 'exploit' or 'explore'")
    return SamplingParams(max_new_tokens=max_new_tokens, seed=seed, **settings)
