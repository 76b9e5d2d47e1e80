"""GGUF (llama.cpp) checkpoints → Hugging Face Llama folders.

`convert_gguf_to_hf` reads a Llama-architecture GGUF file, dequantizes every tensor to float32 with the
`gguf` package, renames it to the Hugging Face Llama layout, undoes llama.cpp's rotary row permutation of
the query/key projections, and writes a folder that `transformers` (and `seal_jax.lm.weights`) load
directly: `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer files.

Layout facts this module relies on (checked against transformers' own GGUF loader in tests/test_gguf.py):

* GGUF lists tensor dimensions fastest-first (ggml's `ne`), so `ReaderTensor.shape` is the reverse of
  the numpy/HF shape. After `gguf.quants.dequantize` the array already has the numpy shape, which for
  a matrix is HF's `[out_features, in_features]`.
* llama.cpp's converter permutes the rows of `attn_q`/`attn_k` so that each head's rotary pairs are
  interleaved (`(heads, 2, head_dim/2)` → `(heads, head_dim/2, 2)`). HF's Llama uses the "rotate half"
  layout, so the rows are put back: reshape to `(heads, head_dim/2, 2, in)`, swap axes 1 and 2, reshape.
  Query rows use `num_attention_heads`, key rows `num_key_value_heads`.
* Everything else (value/output projections, MLP, norms, embeddings, `output`) is stored in HF layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from seal_jax.lm.config import ConfigError, from_hf_dict
from seal_jax.lm.params import declared

__all__ = [
    "GGUFError",
    "GGUFLlamaSpec",
    "convert_gguf_to_hf",
    "read_llama_spec",
    "undo_rotary_permutation",
]

SUPPORTED_ARCHITECTURES = ("llama",)

# Output dtypes: name -> safetensors dtype tag
_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file that cannot be converted (not GGUF, unsupported architecture, unexpected tensors)."""


@dataclass(frozen=True)
class GGUFLlamaSpec:
    """Model hyperparameters read from a Llama GGUF's metadata."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    chat_template: str | None
    name: str | None

    def hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """Return the `config.json` dict of the equivalent Hugging Face `LlamaForCausalLM`."""
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # transformers 4 reads the top-level rope_theta, transformers 5 reads rope_parameters.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": dtype,
            "dtype": dtype,
        }
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None:
                config[key] = value
        return config

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Return the expected HF tensor name → shape map (weights only; biases are checked separately), from
        the one table of parameters (:mod:`seal_jax.lm.params`)."""
        # the weights' shapes only: a GGUF with attention biases converts (they are checked separately), even
        # though seal-jax's own model has no biases
        hf = dict(self.hf_config(), attention_bias=False)
        try:
            config = from_hf_dict(hf, where=f"the config of GGUF model {self.name or '(unnamed)'}")
        except ConfigError as e:
            raise GGUFError(str(e)) from e
        return {name: decl.hf_shape(config) for decl in declared(config) for name in decl.hf_names(config)}


def _open_reader(gguf_path: Path):
    """Open `gguf_path` with `gguf.GGUFReader`, turning every failure into a message naming the file."""
    # deferred: gguf is needed only to convert a .gguf file, and `import seal_jax` loads this module
    from gguf import GGUFReader

    gguf_path = Path(gguf_path)
    if not gguf_path.exists():
        raise FileNotFoundError(
            f"GGUF file {gguf_path} does not exist: pass the path of a .gguf file "
            "(or fetch the bundled model with seal_jax.assets.fetch_model())"
        )
    if not gguf_path.is_file():
        raise GGUFError(f"{gguf_path} is not a file: pass the path of a .gguf file, not a folder")
    with open(gguf_path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(
            f"{gguf_path} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF'): "
            "pass a llama.cpp .gguf checkpoint"
        )
    try:
        return GGUFReader(gguf_path, "r")
    except Exception as exc:  # the reader raises assorted errors on truncated/corrupt files
        raise GGUFError(
            f"cannot read GGUF file {gguf_path} ({exc}); the file may be truncated: fetch it again"
        ) from exc


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _f32_round(value: float) -> float:
    """GGUF stores floats as float32; write the shortest decimal that rounds to the same float32 (1e-05)."""
    return float(str(np.float32(value)))


def read_llama_spec(gguf_path: Path) -> GGUFLlamaSpec:
    """Read a Llama GGUF's metadata into a `GGUFLlamaSpec`.

    Raises FileNotFoundError when the file is missing and `GGUFError` when it is not GGUF, not a
    Llama-architecture model, or lacks a required metadata key.
    """
    reader = _open_reader(Path(gguf_path))
    return _spec_from_reader(reader, Path(gguf_path))


def _spec_from_reader(reader, gguf_path: Path) -> GGUFLlamaSpec:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{gguf_path} holds a {arch!r} model; only Llama-architecture GGUF files "
            f"({', '.join(SUPPORTED_ARCHITECTURES)}) can be converted. Use a Llama GGUF, or load the model "
            "from a Hugging Face folder instead"
        )

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{gguf_path} lacks the metadata key {arch}.{key}; it cannot be converted")
        return value

    for key in ("rope.scaling.type",):
        scaling = _field(reader, f"{arch}.{key}")
        if scaling not in (None, "none"):
            raise GGUFError(
                f"{gguf_path} uses rope scaling {scaling!r}, which this converter does not handle; "
                "convert the original Hugging Face checkpoint instead"
            )

    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise GGUFError(
            f"{gguf_path} carries a rope_freqs tensor (Llama 3 rope scaling), which this converter "
            "does not handle; convert the original Hugging Face checkpoint instead"
        )
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    token_embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if token_embd is None:
        raise GGUFError(f"{gguf_path} has no token_embd.weight tensor; it is not a complete Llama model")
    vocab = int(_field(reader, f"{arch}.vocab_size", int(token_embd.shape[-1])))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None and vocab != len(tokens.data):
        raise GGUFError(f"{gguf_path}: vocab_size {vocab} but the tokenizer has {len(tokens.data)} tokens")

    def token_id(key: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    return GGUFLlamaSpec(
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        rms_norm_eps=_f32_round(need("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32_round(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("padding_token_id"),
        unk_token_id=token_id("unknown_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        name=_field(reader, "general.name"),
    )


def undo_rotary_permutation(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Turn llama.cpp's interleaved rotary row order of a q/k projection back into HF's rotate-half order.

    rows: `[n_heads * head_dim, ...]` (a weight `[out, in]` or a bias `[out]`); returns the same shape.
    """
    head_dim = rows.shape[0] // n_heads
    if n_heads * head_dim != rows.shape[0] or head_dim % 2:
        raise GGUFError(f"cannot split {rows.shape[0]} rows into {n_heads} heads of even size")
    rest = rows.shape[1:]
    return rows.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows.shape)


def _hf_name(gguf_name: str) -> tuple[str, str | None]:
    """Map a GGUF tensor name to (HF name, rotary kind 'q'/'k'/None); raise GGUFError for unknown names."""
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        layer, part, kind = m.groups()
        rotary = {"attn_q": "q", "attn_k": "k"}.get(part)
        return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{kind}", rotary
    m = _GLOBAL_RE.match(gguf_name)
    if m and m.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}", None
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def _iter_hf_tensors(reader, spec: GGUFLlamaSpec, gguf_path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 array in HF layout) for every tensor of the GGUF, in file order."""
    from gguf.quants import dequantize  # deferred: gguf only for converting a .gguf file, as in _open_reader

    expected = spec.hf_shapes()
    for t in reader.tensors:
        name, rotary = _hf_name(t.name)
        try:
            array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as exc:
            raise GGUFError(
                f"{gguf_path}: tensor {t.name} uses quantization {t.tensor_type.name}, which the installed "
                f"gguf package cannot dequantize ({exc}); upgrade gguf (pip install -U gguf)"
            ) from exc
        numpy_shape = tuple(int(n) for n in reversed(t.shape))
        if array.shape != numpy_shape:
            raise GGUFError(
                f"{gguf_path}: tensor {t.name} dequantized to {array.shape}, expected {numpy_shape}"
            )
        want = expected.get(name)
        if name.endswith(".bias"):
            weight_shape = expected.get(name[: -len("bias")] + "weight")
            want = None if weight_shape is None else weight_shape[:1]
        if want is None:
            raise GGUFError(
                f"{gguf_path}: unexpected tensor {t.name} (→ {name}) for this model configuration"
            )
        if array.shape != want:
            raise GGUFError(f"{gguf_path}: tensor {t.name} has shape {array.shape}, but {name} needs {want}")
        if rotary == "q":
            array = undo_rotary_permutation(array, spec.num_attention_heads)
        elif rotary == "k":
            array = undo_rotary_permutation(array, spec.num_key_value_heads)
        yield name, np.ascontiguousarray(array)


class _SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time (header first, computed from the known shapes)."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtype: str):
        self.path, self.dtype, self.tag = path, dtype, _DTYPES[dtype]
        itemsize = 4 if dtype == "float32" else 2
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, shape in shapes.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
            header[name] = {
                "dtype": self.tag,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.offsets[name] = (offset, offset + nbytes)
            offset += nbytes
        self.order = list(shapes)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)
        self.data_start = 8 + len(raw)
        self.written: set[str] = set()

    def write(self, name: str, array: np.ndarray) -> None:
        if self.dtype == "bfloat16":
            import ml_dtypes  # deferred: about a second to import, and only bfloat16 output needs it

            data = array.astype(ml_dtypes.bfloat16)
        else:
            data = array.astype(np.dtype(self.dtype), copy=False)
        begin, end = self.offsets[name]
        buf = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        if len(buf) != end - begin:
            raise GGUFError(f"internal error: {name} has {len(buf)} bytes, expected {end - begin}")
        self.file.seek(self.data_start + begin)
        self.file.write(buf)
        self.written.add(name)

    def close(self) -> None:
        self.file.close()

    def check_complete(self) -> None:
        missing = [n for n in self.order if n not in self.written]
        if missing:
            raise GGUFError(
                f"GGUF lacks tensors for {missing[:5]} ({len(missing)} missing): it is incomplete"
            )


GGUF_CONTROL_TOKEN_TYPES = (3, 4)  # llama.cpp: 3 = control, 4 = user-defined; both become added special tokens


def tokenizer_json_from_gguf(reader: Any, gguf_path: Path) -> dict[str, Any]:
    """The Hugging Face ``tokenizer.json`` of a GGUF's byte-level BPE (``tokenizer.ggml.model == "gpt2"``).

    Built from ``tokenizer.ggml.tokens`` / ``token_type`` / ``merges`` without transformers (whose GGUF
    reader needs PyTorch): vocabulary and merges as stored, byte-level pre-tokenizer and decoder, control
    tokens as added special tokens.
    """
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{gguf_path}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens or [])
    if not tokens or not merges:
        raise GGUFError(f"{gguf_path}: tokenizer.ggml.tokens / tokenizer.ggml.merges are missing")
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind in GGUF_CONTROL_TOKEN_TYPES
    ]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": {"type": "ByteLevel", **byte_level, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ", 1) for m in merges]},
    }


def _save_tokenizer(gguf_path: Path, spec: GGUFLlamaSpec, out_dir: Path) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` from the GGUF."""
    reader = _open_reader(gguf_path)
    tokenizer = tokenizer_json_from_gguf(reader, gguf_path)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n")
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def name(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config: dict[str, Any] = {"backend": "tokenizers"}
    for field, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                       ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        if name(key) is not None:
            config[field] = name(key)
    config["model_max_length"] = spec.max_position_embeddings
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if spec.chat_template:
        (out_dir / "chat_template.jinja").write_text(spec.chat_template)


def _remove_stale_temp_dirs(out_dir: Path) -> None:
    """Delete temp folders of earlier (killed) conversions into out_dir whose process is gone."""
    stale_dirs = [
        *out_dir.parent.glob(f".{out_dir.name}.tmp-*"),
        *out_dir.parent.glob(f".{out_dir.name}.old-*"),
    ]
    for stale in stale_dirs:
        try:
            pid = int(stale.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
            continue  # still running
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            continue


def convert_gguf_to_hf(
    gguf_path: Path,
    out_dir: Path,
    *,
    dtype: str = "float32",
    progress: bool = True,
) -> Path:
    """Convert a Llama GGUF checkpoint into a Hugging Face folder and return `out_dir`.

    gguf_path: a llama.cpp `.gguf` file of architecture `llama` (any quantization the `gguf` package can
        dequantize, e.g. Q8_0, Q4_1, F16). out_dir: the folder to write; it is written to a temporary
        sibling first and renamed into place at the end, so it exists only when complete. An existing
        out_dir is replaced if it is empty or holds a model (`config.json`); otherwise this refuses.
    dtype: "float32" (default), "bfloat16" or "float16" for `model.safetensors`.
    progress: show a per-tensor tqdm bar.

    Writes `config.json`, `generation_config.json`, `model.safetensors`, the tokenizer
    (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`) and `conversion.json` (provenance).
    Raises FileNotFoundError for a missing file and `GGUFError` for a file that is not a Llama GGUF.
    """
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir).resolve()
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use one of {sorted(_DTYPES)}")
    reader = _open_reader(gguf_path)
    spec = _spec_from_reader(reader, gguf_path)
    if out_dir.exists() and not (
        out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / "config.json").exists())
    ):
        raise FileExistsError(
            f"{out_dir} exists and does not look like a converted model folder; choose another output "
            "folder or remove it first"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _save_tokenizer(gguf_path, spec, tmp)

        shapes = spec.hf_shapes()
        for t in reader.tensors:
            name, _ = _hf_name(t.name)
            weight_shape = shapes.get(name[: -len("bias")] + "weight")
            if name.endswith(".bias") and weight_shape is not None:
                shapes[name] = weight_shape[:1]
        writer = _SafetensorsStreamWriter(tmp / "model.safetensors", shapes, dtype)
        try:
            tensors = _iter_hf_tensors(reader, spec, gguf_path)
            if progress:
                tensors = tqdm(
                    tensors, total=len(reader.tensors), desc=f"converting {gguf_path.name}", unit="tensor"
                )
            for name, array in tensors:
                writer.write(name, array)
        finally:
            writer.close()
        writer.check_complete()

        config = spec.hf_config(dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        provenance = {
            "converter": "seal_jax.lm.gguf.convert_gguf_to_hf",
            "source": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size,
            "general.name": spec.name,
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
            "dtype": dtype,
        }
        (tmp / "conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")

        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
