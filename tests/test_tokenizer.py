"""Tokenizer loading, chat formatting (SmolLM2 and Qwen3 with enable_thinking), padding, buckets."""

from __future__ import annotations

import numpy as np
import pytest

from seal_jax.lm.tokenizer import TokenizerError, bucket, format_chat, has_tokenizer, load_tokenizer, pad_left


def test_pad_left():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    ids, mask = pad_left([[1]], pad_id=9, length=3)
    np.testing.assert_array_equal(ids, [[9, 9, 1]])
    with pytest.raises(ValueError, match="shorter than the longest"):
        pad_left([[1, 2, 3]], 0, length=2)


def test_buckets_are_few_and_cover():
    assert [bucket(n) for n in (1, 16, 17, 33, 64, 65, 200)] == [16, 16, 32, 64, 64, 128, 256]
    # the rule: powers of two from 16 up to 64 (16, 32, 64), then multiples of 64 (128, 192, ..., 1024);
    # so the lengths 1..1024 use 3 + (1024 - 128) / 64 + 1 = 18 sizes
    expected = {16, 32, 64} | set(range(128, 1025, 64))
    assert len(expected) == 18
    assert {bucket(n) for n in range(1, 1025)} == expected
    # each length gets the smallest allowed size that holds it
    assert all(bucket(n) == min(b for b in expected if b >= n) for n in range(1, 1025))
    assert all(bucket(n) >= n for n in range(1, 3000))


def test_bundled_chat_template(bundled_dir):
    tok = load_tokenizer(bundled_dir)
    text = format_chat(tok, "Hello there")
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert tok.decode(tok("A short sentence.")["input_ids"]) == "A short sentence."
    with_system = format_chat(tok, "Hi", system="Be brief.")
    assert with_system.index("Be brief.") < with_system.index("Hi")


def test_qwen3_thinking_switch():
    from seal_jax.assets import qwen3_tokenizer_dir

    tok = load_tokenizer(qwen3_tokenizer_dir())
    off = format_chat(tok, "What is 2+2?")
    on = format_chat(tok, "What is 2+2?", enable_thinking=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645


def test_missing_tokenizer(tmp_path):
    assert not has_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_base_tokenizer_without_template(bundled_dir):
    tok = load_tokenizer(bundled_dir)
    tok.chat_template = None
    with pytest.raises(TokenizerError, match="no chat template"):
        format_chat(tok, "x")
