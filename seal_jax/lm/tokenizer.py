"""Tokenizer loading, chat formatting and left-padded batching."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer that is missing or cannot do what was asked."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds Hugging Face tokenizer files."""
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path) -> Any:
    """Load the Hugging Face tokenizer saved in ``folder`` (``tokenizer.json`` / ``tokenizer_config.json``)."""
    from transformers import AutoTokenizer  # deferred: ~1 s to import; this module imports without it

    folder = Path(folder)
    if not has_tokenizer(folder):
        raise TokenizerError(
            f"no tokenizer files in {folder}; save one there with tokenizer.save_pretrained(...), or for Qwen3 "
            "models pass tokenizer=seal_jax.assets.qwen3_tokenizer_dir()"
        )
    return AutoTokenizer.from_pretrained(str(folder))


def format_chat(tokenizer: Any, prompt: str | Sequence[dict[str, str]], *, enable_thinking: bool = False,
                system: str | None = None) -> str:
    """Apply the tokenizer's chat template with the generation prompt.

    Args:
      prompt: a user message, or a whole list of ``{"role", "content"}`` messages.
      enable_thinking: passed to the template (Qwen3 opens an empty think block when it is off).
      system: an optional system message put first.
    Returns the formatted text, ready to tokenize without adding special tokens again.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                             "use chat=False for base models")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)


def bucket(n: int, minimum: int = 16, multiple: int = 64) -> int:
    """The padded size for ``n``: powers of two from ``minimum`` up to ``multiple``, then multiples of it.

    Padding sizes to a few buckets keeps the number of compiled programs small.
    """
    if n <= minimum:
        return minimum
    if n <= multiple:
        return 1 << (n - 1).bit_length()
    return -(-n // multiple) * multiple


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists into a batch.

    Returns ``(ids, mask)``, int32 ``[B, T]`` each, with ``T = length`` or the longest sequence; ``mask``
    is 1 on real tokens.
    """
    longest = max((len(s) for s in sequences), default=0)
    t = longest if length is None else length
    if t < longest:
        raise ValueError(f"pad length {t} is shorter than the longest sequence ({longest})")
    ids = np.full((len(sequences), t), pad_id, np.int32)
    mask = np.zeros((len(sequences), t), np.int32)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, t - len(s):] = s
            mask[i, t - len(s):] = 1
    return ids, mask


def pad_id_of(tokenizer: Any, fallback: int = 0) -> int:
    """The tokenizer's pad id, else its EOS id, else ``fallback``."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return fallback
