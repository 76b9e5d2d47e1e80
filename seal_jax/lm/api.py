"""The ``LM`` facade: one object that holds a loaded model, its tokenizer and its mesh.

Everything outside :mod:`seal_jax.lm` (the self-edit loop, benchmarks, the CLI) reaches the engine
through this class.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from seal_jax.lm import sharding as shd
from seal_jax.lm import tokenizer as tok
from seal_jax.lm import weights
from seal_jax.lm.config import ModelConfig, from_hf
from seal_jax.lm.model import Decoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"layers.q_proj": x}`` -> ``{"layers": {"q_proj": x}}``."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of :func:`nest`."""
    out: dict[str, Any] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def build_model(config: ModelConfig, params: dict[str, jax.Array], *, dtype: Any = jnp.float32,
                remat: bool = False) -> Decoder:
    """A :class:`Decoder` holding ``params`` (``{dotted path: array}``) without random initialisation."""
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0), remat=remat))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, nest(params))
    return nnx.merge(graphdef, state)


class LM:
    """A loaded language model: config, tokenizer, parameters (possibly sharded) and jitted entry points.

    Create it with :meth:`LM.load` (or :func:`seal_jax.load`).
    """

    def __init__(self, model: Decoder, tokenizer: Any, *, mesh: Mesh | None = None, path: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.path = path
        self.graphdef, self.state = nnx.split(model)

    @property
    def config(self) -> ModelConfig:
        """The model's :class:`~seal_jax.lm.config.ModelConfig`."""
        return self.model.config

    @property
    def dtype(self) -> Any:
        """Parameter and activation dtype."""
        return self.model.dtype

    @classmethod
    def load(
        cls,
        path_or_id: str | Path,
        *,
        dtype: Any = "float32",
        mesh: Mesh | str | None = None,
        tokenizer: str | Path | Any | None = None,
        remat: bool = False,
        progress: bool = True,
    ) -> LM:
        """Load a Hugging Face-format model folder (or hub id, when online).

        Args:
          path_or_id: a folder with ``config.json``, safetensors weights and (usually) tokenizer files.
          dtype: ``"float32"`` (CPU, exact parity) or ``"bfloat16"`` (accelerators).
          mesh: a :class:`~jax.sharding.Mesh` or a spec like ``"data=2,fsdp=2,tensor=2"``; weights are
            placed sharded as they are read.
          tokenizer: a tokenizer, or a folder to load one from (default: the model folder's, if it has
            one; without a tokenizer only id-level methods such as :meth:`logits` work).
          remat: rematerialise layer activations in the backward pass (training memory).
        """
        folder = weights.resolve_checkpoint(path_or_id)
        config = from_hf(folder)
        if isinstance(mesh, str):
            mesh = shd.make_mesh(mesh)
        dt = _dtype(dtype)
        params = weights.load_params(folder, config, dtype=dt, mesh=mesh, progress=progress)
        if tokenizer is None:
            tokenizer = tok.load_tokenizer(folder) if tok.has_tokenizer(folder) else None
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = tok.load_tokenizer(tokenizer)
        return cls(build_model(config, params, dtype=dt, remat=remat), tokenizer, mesh=mesh, path=folder)

    def params(self) -> dict[str, jax.Array]:
        """The base parameters as ``{dotted path: array}``."""
        return flatten(nnx.to_pure_dict(self.state))

    def export(self, out_dir: str | Path, *, dtype: Any = None) -> Path:
        """Write this model (weights, config, tokenizer) as a Hugging Face folder; returns the folder."""
        return weights.export_hf(self.params(), self.config, out_dir, dtype=dtype, tokenizer=self.tokenizer)

    # ------------------------------------------------------------------------------------------------

    @functools.cached_property
    def _logits_fn(self) -> Any:
        graphdef = self.graphdef

        def run(state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, state)
            return model(ids, mask)[0]

        return jax.jit(run)

    def _put_batch(self, array: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, shd.batch_sharding(self.mesh, array.shape))

    def logits(self, ids: Any, attention_mask: Any = None, adapter: Any = None) -> np.ndarray:
        """Next-token logits for a batch of token ids.

        Args:
          ids: int ``[B, T]`` (left-padded when rows differ in length).
          attention_mask: ``[B, T]``, 1 on real tokens (default: all ones). Rotary positions count real
            tokens only, so a left-padded row gives the same logits as the row alone.
        Returns:
          float32 numpy ``[B, T, V]``.
        """
        if adapter is not None:
            raise NotImplementedError("adapters arrive with the LoRA inner loop (lm/lora.py)")
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"ids must be a non-empty int array [B, T], got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from ids shape {ids.shape}")
        b, t = ids.shape
        if t > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {t} exceeds the model's context ({self.config.max_position_embeddings})")
        # Right-pad the length to a bucket: causal attention keeps real tokens blind to the padding.
        tb = tok.bucket(t)
        ids_p = np.zeros((b, tb), np.int32)
        mask_p = np.zeros((b, tb), np.int32)
        ids_p[:, :t], mask_p[:, :t] = ids, mask
        out = self._logits_fn(self.state, self._put_batch(ids_p), self._put_batch(mask_p))
        return np.asarray(jax.device_get(out))[:, :t]


def load(path_or_id: str | Path, dtype: Any = "float32", mesh: Mesh | str | None = None, **kwargs: Any) -> LM:
    """Load a model; see :meth:`LM.load`."""
    return LM.load(path_or_id, dtype=dtype, mesh=mesh, **kwargs)
