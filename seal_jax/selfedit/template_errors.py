"""TemplateError, and the reading of model-written numbers and template dicts that raises it.

They sit below :mod:`~seal_jax.selfedit.templates` and :mod:`~seal_jax.selfedit.diversity` so that both
can raise the same error, and read a template dict in the same way, without either importing the other
(``templates`` re-exports ``diversity``'s similarity functions). Import :class:`TemplateError` from
``seal_jax.selfedit.templates``, where it is public.

A template dict comes in two forms. The seed paper's (Cheong et al., arXiv 2601.14532), which seal-jax
writes: ``{"data_creation_instruction": "...", "hyperparameters": {"lora_rank": 16, "lora_alpha": 32,
"lora_dropout": 0.05, "learning_rate": 1e-4, "num_epochs": 3, "gradient_accumulation_steps": 2}}``; and the
flat one seal-jax wrote before, the six hyperparameters at the top level. :func:`_flat_template` reads both
(and a mix of them, as long as a field given twice has the same value).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["TemplateError"]

# The six hyperparameters of a template, in the order they are written and checked.
HYPERPARAMETER_NAMES = ("lora_rank", "lora_alpha", "lora_dropout", "learning_rate", "num_epochs",
                        "gradient_accumulation_steps")
# The key holding them in the seed paper's nested form.
HYPERPARAMETERS_KEY = "hyperparameters"


class TemplateError(ValueError):
    """A template, fill or archive row that cannot be used; the message says why."""


MAX_NUMBER_CHARS = 64        # a number written as a string may be at most this long


def _number(name: str, value: Any) -> float:
    """``value`` as a finite float; strings like ``"1e-4"`` are accepted, bools and NaN/inf are not."""
    if isinstance(value, bool) or value is None:
        raise TemplateError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not text or len(text) > MAX_NUMBER_CHARS:
            raise TemplateError(f"{name} must be a number, got the string {value[:80]!r}")
        try:
            value = float(text)
        except ValueError:
            raise TemplateError(f"{name} must be a number, got the string {value[:80]!r}") from None
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise TemplateError(f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise TemplateError(f"{name} must be a finite number, got {value!r}")
    return number



def _flat_template(d: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(flat, unknown)``: a template dict in either form with its hyperparameters at the top level, and
    the keys under ``"hyperparameters"`` that are not hyperparameters (for a note; they are dropped).

    Values are returned as written (not yet validated). Raises :class:`TemplateError` when
    ``"hyperparameters"`` is not an object, or when a hyperparameter stands both at the top level and under
    ``"hyperparameters"`` with different values (the message names the field).
    """
    flat = {key: value for key, value in d.items() if key != HYPERPARAMETERS_KEY}
    if HYPERPARAMETERS_KEY not in d:
        return flat, []
    nested = d[HYPERPARAMETERS_KEY]
    if not isinstance(nested, Mapping):
        raise TemplateError(f'"{HYPERPARAMETERS_KEY}" must be a JSON object with the fields '
                            f"{list(HYPERPARAMETER_NAMES)}, got {type(nested).__name__}")
    unknown: list[str] = []
    for name, value in nested.items():
        if name not in HYPERPARAMETER_NAMES:
            unknown.append(str(name))
            continue
        if name in flat and _number(name, flat[name]) != _number(name, value):
            raise TemplateError(f'{name} is {_shown(value)} under "{HYPERPARAMETERS_KEY}" but {_shown(flat[name])} '
                                "at the top level; give each hyperparameter once")
        flat[name] = value
    return flat, sorted(unknown)


# The hint of a template or fill answer cut off by the length limit; the run replaces it with the config
# key that sets that limit (:func:`name_length_key`).
CUT_OFF_HINT = "(raise max_new_tokens)"


def name_length_key(reason: str | None, key: str) -> str | None:
    """``reason`` (a rejection reason, or None) with :data:`CUT_OFF_HINT` naming the config ``key`` that
    sets the answer's length, e.g. ``templates.proposal_max_new_tokens``."""
    return None if reason is None else reason.replace(CUT_OFF_HINT, f"(raise {key})")


def _shown(value: Any) -> str:
    """``repr(value)`` cut to 40 characters (model output can be long)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
