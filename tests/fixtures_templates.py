"""Shared helpers for the template-search tests (templates, diversity, meta-prompts, archive): a valid
template dict in the flat form and in the seed paper's nested form, a builder of Templates from it, and two
templates written as in the seed paper (Cheong et al., arXiv 2601.14532)."""

from __future__ import annotations

from seal_jax.selfedit.templates import Template

INSTRUCTION = "Write ten questions about the passage, each followed by its answer."
GOOD = {"data_creation_instruction": INSTRUCTION, "lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.05,
        "learning_rate": 3e-4, "num_epochs": 5, "gradient_accumulation_steps": 2}
# GOOD in the nested form Template.to_dict writes
GOOD_NESTED = {"data_creation_instruction": INSTRUCTION,
               "hyperparameters": {"lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "learning_rate": 3e-4,
                                   "num_epochs": 5, "gradient_accumulation_steps": 2}}

# Hand-written in the seed paper's JSON form (ints where the paper writes ints).
PAPER = {"data_creation_instruction": "Generate a set of question-answer pairs that cover every fact, name and "
                                      "date in the passage, one pair per training example.",
         "hyperparameters": {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "learning_rate": 1e-4,
                             "num_epochs": 3, "gradient_accumulation_steps": 2}}
PAPER_2 = {"data_creation_instruction": "Rewrite the passage as a short story told by a witness, keeping all "
                                        "the facts of the original.",
           "hyperparameters": {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.1, "learning_rate": 1e-3,
                               "num_epochs": 5, "gradient_accumulation_steps": 4}}


def flat(d: dict) -> dict:
    """A nested template dict in the flat form."""
    return {"data_creation_instruction": d["data_creation_instruction"], **d["hyperparameters"]}


def template(instruction: str = INSTRUCTION, **hp) -> Template:
    return Template.from_dict({**GOOD, "data_creation_instruction": instruction, **hp})
