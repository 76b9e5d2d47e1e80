"""Shared helpers for the template-search tests (templates, diversity, meta-prompts, archive): a valid
template dict and a builder of Templates from it."""

from __future__ import annotations

from seal_jax.selfedit.templates import Template

INSTRUCTION = "Write ten questions about the passage, each followed by its answer."
GOOD = {"data_creation_instruction": INSTRUCTION, "lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.05,
        "learning_rate": 3e-4, "num_epochs": 5, "gradient_accumulation_steps": 2}


def template(instruction: str = INSTRUCTION, **hp) -> Template:
    return Template.from_dict({**GOOD, "data_creation_instruction": instruction, **hp})
