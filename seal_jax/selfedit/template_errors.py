"""TemplateError, and the reading of model-written numbers that raises it.

They sit below :mod:`~seal_jax.selfedit.templates` and :mod:`~seal_jax.selfedit.diversity` so that both
can raise the same error without either importing the other (``templates`` re-exports ``diversity``'s
similarity functions). Import :class:`TemplateError` from ``seal_jax.selfedit.templates``, where it is
public.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["TemplateError"]


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

