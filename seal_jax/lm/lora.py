"""LoRA adapters as a pytree separate from the base weights.

K candidate adapters are stacked on a leading axis: for every adapted projection
``{"a": [K, L, in, R], "b": [K, L, R, out]}`` where ``R`` is the largest rank of the K candidates.
A candidate of smaller rank has zero columns of ``a`` and zero rows of ``b`` past its rank, and a
candidate that does not adapt a projection has zero ``a`` and ``b`` there; both stay exactly zero under
training (their gradients are zero). Each candidate's scale ``alpha / rank`` and dropout rate are arrays
``[K]``. :class:`Adapters` bundles all of it with the specs, the loss histories and PEFT / orbax I/O;
:class:`ReadyAdapters` holds the same adapters as one model's inference reads them (``LM.ready_adapters``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from seal_jax.lm.config import ModelConfig
from seal_jax.lm.model import LoraInputs
from seal_jax.lm.params import BY_PATH, peft_module, projection_shape
from seal_jax.lm.types import PROJECTIONS, LoraError, LoraSpec, SamplingError


def projection_dims(params: dict[str, Any], name: str) -> tuple[int, int, int]:
    """``(layers, in, out)`` of projection ``name`` in base params ``{dotted path: [L, in, out]}``."""
    shape = params[f"layers.{name}"].shape
    return int(shape[0]), int(shape[1]), int(shape[2])


def init_lora(key: jax.Array, layers: int, fan_in: int, fan_out: int, rank: int, padded_rank: int) -> dict[str, jax.Array]:
    """One adapter for one projection, initialised like PEFT.

    ``a`` is Kaiming-uniform (PEFT's ``a=sqrt(5)``: uniform in ±1/sqrt(in)), ``b`` is zero; columns of
    ``a`` past ``rank`` are zero. Returns ``{"a": [L, in, padded_rank], "b": [L, padded_rank, out]}`` float32.
    """
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(key, (layers, rank, fan_in), jnp.float32, -bound, bound)
    a = jnp.swapaxes(a, 1, 2)  # drawn as PEFT's [r, in] weight, stored as [in, r]
    a = jnp.pad(a, ((0, 0), (0, 0), (0, padded_rank - rank)))
    return {"a": a, "b": jnp.zeros((layers, padded_rank, fan_out), jnp.float32)}


def candidate_key(seed: int, candidate_seed: int) -> jax.Array:
    """The PRNG key of one candidate: the call's ``seed`` mixed with the candidate's own seed.

    It does not depend on the candidate's position in the batch, so training a candidate alone or among
    others draws the same numbers.
    """
    return jax.random.fold_in(jax.random.PRNGKey(seed), candidate_seed)


def check_ranks(params: dict[str, Any], specs: Sequence[LoraSpec]) -> None:
    """Raise a :class:`LoraError` for a spec whose rank exceeds the narrower width of a projection it adapts
    (``min(in, out)`` in base ``params``, only shapes read): its ``A @ B`` cannot reach that rank, and the
    columns past it only cost memory and compute. Every adapter made for a model comes through here
    (:func:`init_adapters`: training, its lowering and ``LM.abstract_adapters``)."""
    for i, spec in enumerate(specs):
        for p in spec.targets:
            _, fan_in, fan_out = projection_dims(params, p)
            if spec.rank > min(fan_in, fan_out):
                which = f"candidate {i}'s " if len(specs) > 1 else ""
                raise LoraError(f"{which}LoraSpec rank {spec.rank} exceeds the width of {p}, which maps {fan_in} -> "
                                f"{fan_out} in this model: an adapter of it reaches rank {min(fan_in, fan_out)} at "
                                f"most; lower the rank to {min(fan_in, fan_out)} or less, or leave {p} out of targets")


def init_adapters(params: dict[str, Any], specs: Sequence[LoraSpec], keys: Sequence[jax.Array]) -> dict[str, dict[str, jax.Array]]:
    """Stacked initial adapters for K candidates.

    Args:
      params: base parameters ``{dotted path: array}`` (only shapes are read).
      specs: one :class:`LoraSpec` per candidate.
      keys: one PRNG key per candidate (see :func:`candidate_key`).
    Returns:
      ``{projection: {"a": [K, L, in, R], "b": [K, L, R, out]}}`` over the union of the candidates'
      targets, ``R = max rank``.
    """
    if len(specs) != len(keys) or not specs:
        raise LoraError(f"need one key per spec, got {len(specs)} specs and {len(keys)} keys")
    check_ranks(params, specs)
    targets = [p for p in PROJECTIONS if any(p in s.targets for s in specs)]
    padded = max(s.rank for s in specs)
    out: dict[str, dict[str, jax.Array]] = {}
    for p in targets:
        layers, fan_in, fan_out = projection_dims(params, p)
        per = []
        for spec, key in zip(specs, keys, strict=True):
            if p in spec.targets:
                per.append(init_lora(jax.random.fold_in(key, PROJECTIONS.index(p)), layers, fan_in, fan_out,
                                     spec.rank, padded))
            else:
                per.append({"a": jnp.zeros((layers, fan_in, padded), jnp.float32),
                            "b": jnp.zeros((layers, padded, fan_out), jnp.float32)})
        out[p] = {"a": jnp.stack([x["a"] for x in per]), "b": jnp.stack([x["b"] for x in per])}
    return out


def merge(params: dict[str, Any], weights: dict[str, dict[str, jax.Array]], scale: float) -> dict[str, Any]:
    """Base params with one adapter folded in: ``W + scale * a @ b`` for every adapted projection.

    ``weights`` is one adapter (no K axis): ``{projection: {"a": [L, in, r], "b": [L, r, out]}}``. A per-layer
    parameter is stacked ``[L, ...]`` or split (a tuple of its L per-layer arrays: merged layer by layer, so
    nothing is stacked). Returns new params ``{dotted path: array}`` in the base dtype (and the base's form).
    """
    def merged(w: jax.Array, a: jax.Array, b: jax.Array, subscripts: str) -> jax.Array:
        delta = jnp.einsum(subscripts, a.astype(jnp.float32), b.astype(jnp.float32)) * scale
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    out = dict(params)
    for p, ab in weights.items():
        base = params[f"layers.{p}"]
        if isinstance(base, tuple):
            out[f"layers.{p}"] = tuple(merged(w, ab["a"][i], ab["b"][i], "ir,ro->io") for i, w in enumerate(base))
        else:
            out[f"layers.{p}"] = merged(base, ab["a"], ab["b"], "lir,lro->lio")
    return out


def ready_layout(config: Any, dtype: Any, layer_storage: str, mesh: Any) -> tuple[str | None, ...]:
    """What adapters readied for a model depend on (``ReadyAdapters.layout``): its shapes, dtype, layer
    storage and mesh."""
    c = config
    return (f"{c.num_layers} layers", f"width {c.hidden_size}/{c.intermediate_size}",
            f"heads {c.num_heads}/{c.num_kv_heads}x{c.head_dim}", jnp.dtype(dtype).name, layer_storage,
            None if mesh is None else f"mesh {dict(mesh.shape)} on {[d.id for d in mesh.devices.flat]}")


# rows of every leaf of stacked adapters, in one program (a per-layer form has a leaf per layer)
_gather = jax.jit(lambda weights, rows: jax.tree.map(lambda x: x[rows], weights))


@dataclasses.dataclass
class AdapterStack:
    """K LoRA adapters stacked on a leading axis, with what training said of each: the part that
    :class:`Adapters` (float32, as trained) and :class:`ReadyAdapters` (readied for inference) share.

    Attributes:
      weights: the adapters' arrays, every leaf with a leading K axis.
      specs: one :class:`LoraSpec` per candidate.
      losses: per candidate, the training loss at every optimizer step (mean over its micro-batches).
      failed: per candidate, ``None`` or the reason training stopped (e.g. a non-finite loss).
      single: ``True`` for one adapter taken out of a stack (``adapters[k]``): ``LM.generate`` and
        ``LM.logits`` then answer without the K axis. The arrays keep a leading axis of 1 either way.
    """

    weights: Any
    specs: tuple[LoraSpec, ...]
    losses: list[list[float]] = dataclasses.field(default_factory=list)
    failed: list[str | None] = dataclasses.field(default_factory=list)
    single: bool = False
    # a single adapter's as_inputs, with the leaves and specs it was made from: its leaves are sliced once,
    # not on every generate/logits call (the price: one more copy of this one adapter while it lives)
    _inputs: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.specs = tuple(self.specs)
        k = len(self.specs)
        if not self.losses:
            self.losses = [[] for _ in range(k)]
        if not self.failed:
            self.failed = [None] * k

    def __len__(self) -> int:
        return len(self.specs)

    def _picked(self, picked: Sequence[int], single: bool = False) -> Any:
        """The candidates ``picked`` as a stack of this class (their arrays gathered in one program)."""
        weights = _gather(self.weights, np.asarray(picked, np.int32))
        return dataclasses.replace(self, weights=weights, specs=tuple(self.specs[k] for k in picked),
                                   losses=[list(self.losses[k]) for k in picked],
                                   failed=[self.failed[k] for k in picked], single=single)

    def _index(self, k: int) -> int:
        """``k`` as an index from 0 (negative ones count from the end); out of range is an IndexError."""
        if not -len(self) <= k < len(self):
            raise IndexError(f"adapter index {k} out of range for {len(self)} candidates")
        return k % len(self)

    def __getitem__(self, k: int) -> Any:
        """Candidate ``k`` as one adapter (``single=True``; arrays keep a leading axis of 1 and the stack's rank)."""
        return self._picked([self._index(k)], single=True)

    def take(self, indices: Sequence[int]) -> Any:
        """Candidates ``indices`` (in that order) as a stack of their own: what one passage's candidates
        answer with after several passages trained together. Ranks stay padded to the stack's."""
        picked = [int(k) for k in indices]
        if not picked:
            raise IndexError("take needs at least one adapter index")
        bad = [k for k in picked if not -len(self) <= k < len(self)]
        if bad:
            raise IndexError(f"adapter indices {bad} out of range for {len(self)} candidates (0 to {len(self) - 1}, "
                             "or negative from the end)")
        picked = [k % len(self) for k in picked]  # negative ones count from the end, as adapters[k]
        if picked == list(range(len(self))):
            return self
        return self._picked(picked)

    @property
    def scales(self) -> jax.Array:
        """``alpha / rank`` per candidate, float32 ``[K]``."""
        return jnp.asarray([s.scale for s in self.specs], jnp.float32)

    def as_inputs(self) -> LoraInputs:
        """The adapters as the model's :class:`LoraInputs`, no dropout: leaves ``[K, ...]`` and scale ``[K]``
        for a stack; leaves without the K axis and a scalar scale when :attr:`single`."""
        if not self.single:
            return LoraInputs(weights=self.weights, scale=self.scales)
        leaves = tuple(jax.tree.leaves(self.weights))
        made = self._inputs
        if made is not None and made[1] == self.specs and len(made[0]) == len(leaves) \
                and all(a is b for a, b in zip(made[0], leaves, strict=True)):
            return made[2]
        inputs = LoraInputs(weights=jax.tree.map(lambda x: x[0], self.weights), scale=self.scales[0])
        self._inputs = (leaves, self.specs, inputs)
        return inputs


@dataclasses.dataclass
class ReadyAdapters(AdapterStack):
    """Adapters readied for one model's inference by ``LM.ready_adapters``: in its compute dtype, each
    input's ``a`` matrices joined (``model.group_adapters``), and where the model stores its layers split
    (GPUs) a list of per-layer pieces. Generation, log-probabilities and logits read them as they are, with
    no per-call cast or copy; training, merging and saving take the float32 :class:`Adapters`.

    Attributes:
      layout: the model they were readied for (:func:`ready_layout`: its shapes, dtype, layer storage and
        mesh); another model refuses them.
    """

    layout: tuple[Any, ...] = ()

    def check(self, layout: tuple[Any, ...]) -> None:
        """Raise unless these adapters were readied for a model of ``layout`` (:func:`ready_layout`)."""
        if self.layout != layout:
            raise SamplingError(f"these adapters were readied for a model with {self.layout}, and this one has "
                                f"{layout}: ready the float32 Adapters with this model's ready_adapters")

    def _picked(self, picked: Sequence[int], single: bool = False) -> Any:
        """As :meth:`AdapterStack._picked`, the taken arrays placed where and as the stack's lie (a TPU's
        layout, ``layouts.adapter_layout``), so that the programs read them without a copy."""
        out = super()._picked(picked, single)
        out.weights = jax.device_put(out.weights, jax.tree.map(lambda x: x.format, self.weights))
        return out


@dataclasses.dataclass
class Adapters(AdapterStack):
    """K trained (or hand-made) LoRA adapters stacked on a leading axis, in float32.

    Attributes:
      weights: ``{projection: {"a": [K, L, in, R], "b": [K, L, R, out]}}`` float32.
      base_model: the model they were trained on (``LM.source``: its folder's absolute path, or the hub id it
        was loaded by; a PEFT folder's ``base_model_name_or_path``): :meth:`save_peft` writes it there.
      (the others: :class:`AdapterStack`)
    """

    weights: dict[str, dict[str, jax.Array]]
    base_model: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        k = len(self.specs)
        for p, ab in self.weights.items():
            if ab["a"].shape[0] != k or ab["b"].shape[0] != k:
                raise LoraError(f"adapter {p}: leading axis {ab['a'].shape[0]} != {k} specs")

    @property
    def dropouts(self) -> jax.Array:
        """Dropout rate per candidate, float32 ``[K]``."""
        return jnp.asarray([s.dropout for s in self.specs], jnp.float32)

    def unpadded(self, k: int) -> dict[str, dict[str, np.ndarray]]:
        """Candidate ``k``'s own weights, trimmed to its rank and its targets: ``{p: {"a": [L, in, r], "b": [L, r, out]}}``."""
        k = self._index(k)
        spec = self.specs[k]
        out = {}
        for p, ab in self.weights.items():
            if p in spec.targets:
                out[p] = {"a": np.asarray(ab["a"][k, :, :, :spec.rank]), "b": np.asarray(ab["b"][k, :, :spec.rank, :])}
        return out

    def merged_params(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        """Base ``params`` with candidate ``k`` merged in (see :func:`merge`)."""
        weights = {p: {n: jnp.asarray(v) for n, v in ab.items()} for p, ab in self.unpadded(k).items()}
        return merge(params, weights, self.specs[k].scale)

    def save_peft(self, path: str | Path, k: int = 0, *, base_model: str | None = None) -> Path:
        """Write candidate ``k`` as a Hugging Face PEFT adapter folder.

        Writes ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's tensor names
        (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` ``[r, in]``, ``lora_B`` ``[out, r]``);
        ``peft.PeftModel.from_pretrained(base, path)`` loads it, and ``AutoPeftModelForCausalLM`` too where
        ``base_model_name_or_path`` names the base: ``base_model``, by default :attr:`base_model` (the training
        model's folder, or the hub id it was loaded by). Returns the folder.
        """
        spec = self.specs[self._index(k)]
        base_model = self.base_model if base_model is None else base_model
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, np.ndarray] = {}
        for p, ab in self.unpadded(k).items():
            for layer in range(ab["a"].shape[0]):
                prefix = peft_module(p, layer)
                tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(ab["a"][layer].T, np.float32)
                tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(ab["b"][layer].T, np.float32)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": sorted(spec.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        }
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        return out

    @classmethod
    def load_peft(cls, path: str | Path, *, config: ModelConfig | None = None) -> Adapters:
        """Read a Hugging Face PEFT LoRA adapter folder (``adapter_config.json`` and
        ``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes) as one adapter
        (``single=True``: ``lm.generate(..., adapters=it)`` answers with it).

        ``config`` (``lm.config``) checks the adapter's layers and widths against the model and is needed
        when the adapter covers only some layers (``layers_to_transform``); without it, the layer count is
        read from the tensors. Plain LoRA only: DoRA, trained biases, ``modules_to_save``, per-module
        ``rank_pattern`` / ``alpha_pattern``, ``fan_in_fan_out`` and LoRA on modules other than the seven
        projections are refused with a :class:`LoraError` naming the setting. rsLoRA (scale
        ``alpha / sqrt(r)``) is read as ``alpha * sqrt(r)`` so that :attr:`LoraSpec.scale` is the same.
        """
        folder = Path(path)
        meta_file, tensor_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not meta_file.is_file():
            what = f"{folder} has no adapter_config.json" if folder.is_dir() else f"no folder {folder}"
            raise FileNotFoundError(f"{what}: give a PEFT adapter folder (what PeftModel.save_pretrained writes)")
        if not tensor_file.is_file():
            if (folder / "adapter_model.bin").is_file():
                raise LoraError(f"{folder} holds its weights as adapter_model.bin (a PyTorch pickle), which seal-jax "
                                "does not read: load it with PEFT and save it again as safetensors "
                                "(PeftModel.from_pretrained(base, folder).save_pretrained(new_folder))")
            raise FileNotFoundError(f"{folder} has adapter_config.json but no adapter_model.safetensors")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise LoraError(f"{meta_file} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise LoraError(f"{meta_file} is not a JSON object")
        found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
        try:
            with safe_open(str(tensor_file), "numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                    projection, layer, part = _peft_tensor(name, tensor_file)
                    tensor = np.asarray(f.get_tensor(name), np.float32)
                    found.setdefault(projection, {"A": {}, "B": {}})[part][layer] = tensor
        except SafetensorError as e:  # (not an OSError: a cut-off or empty file)
            raise LoraError(f"{tensor_file} is not a readable safetensors file ({e}); save the adapter again") from None
        if not found:
            raise LoraError(f"{tensor_file} has no LoRA tensors")
        spec, kept = _peft_spec(meta, meta_file, list(found))
        seen = {layer for ab in found.values() for part in ab.values() for layer in part}
        if config is None and kept is not None:
            raise LoraError(f"{meta_file} adapts only layers {kept}: pass config=lm.config so that the model's "
                            "layer count is known (the others get zero adapters)")
        layers = config.num_layers if config is not None else max(seen) + 1
        if max(seen) >= layers:
            raise LoraError(f"{tensor_file} has LoRA tensors for layer {max(seen)}, and the model has {layers} layers")
        regex = isinstance(meta.get("target_modules"), str)
        weights: dict[str, dict[str, jax.Array]] = {}
        for p, ab in found.items():
            # the layers this projection must have: layers_to_transform's, all, or (a pattern) those present
            wanted = kept if kept is not None else sorted(set(ab["A"]) | set(ab["B"])) if regex else range(layers)
            missing = [f"lora_{part} of layer {i}" for i in wanted for part in "AB" if i not in ab[part]]
            extra = sorted((set(ab["A"]) | set(ab["B"])) - set(wanted))
            if extra:
                raise LoraError(f"{tensor_file} has {p} tensors for layers {extra}, outside layers_to_transform {kept}")
            if missing:
                raise LoraError(f"{tensor_file}: {p} lacks {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
            first = next(iter(wanted))
            want_in, want_out = (projection_shape(config, p) if config is not None
                                 else (ab["A"][first].shape[-1], ab["B"][first].shape[0]))
            a = np.zeros((1, layers, want_in, spec.rank), np.float32)
            b = np.zeros((1, layers, spec.rank, want_out), np.float32)
            for i in wanted:
                if ab["A"][i].shape != (spec.rank, want_in) or ab["B"][i].shape != (want_out, spec.rank):
                    raise LoraError(f"{tensor_file}: {p} of layer {i} has lora_A {ab['A'][i].shape} and lora_B "
                                    f"{ab['B'][i].shape}, expected {(spec.rank, want_in)} and {(want_out, spec.rank)} "
                                    f"(r = {spec.rank}; the {'model' if config is not None else 'first layer'}'s "
                                    f"{p} maps {want_in} -> {want_out})")
                a[0, i], b[0, i] = ab["A"][i].T, ab["B"][i].T
            weights[p] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
        base = meta.get("base_model_name_or_path")
        return cls(weights, (spec,), single=True, base_model=base if isinstance(base, str) else None)

    def save(self, path: str | Path) -> Path:
        """Save all K adapters (weights with orbax, specs/losses/failures as JSON) under ``path``."""
        from seal_jax.lm.checkpoint import save_pytree  # deferred: orbax loads only when adapters are saved

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_pytree(path / "weights", self.weights)
        meta = {"specs": [dataclasses.asdict(s) for s in self.specs], "losses": self.losses, "failed": self.failed,
                "single": self.single, "base_model": self.base_model}
        (path / "adapters.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Adapters:
        """Restore adapters written by :meth:`save`."""
        from seal_jax.lm.checkpoint import CheckpointError, restore_pytree  # deferred: orbax, as in save

        path = Path(path)
        meta_file = path / "adapters.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved adapter stack (no adapters.json)")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{meta_file} is corrupt ({e}); delete the folder and save again") from None
        weights = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restore_pytree(path / "weights"))
        specs = tuple(LoraSpec(**{**s, "targets": tuple(s["targets"])}) for s in meta["specs"])
        return cls(weights, specs, meta["losses"], meta["failed"], single=bool(meta.get("single", False)),
                   base_model=meta.get("base_model"))

    @staticmethod
    def stack(items: Sequence[Adapters]) -> Adapters:
        """Concatenate several stacks into one (ranks padded to the largest, targets united)."""
        if not items:
            raise LoraError("nothing to stack")
        for p in PROJECTIONS:  # adapters of one model: the same layers and widths for each projection
            shapes = {(int(it.weights[p]["a"].shape[1]), int(it.weights[p]["a"].shape[2]),
                       int(it.weights[p]["b"].shape[3])) for it in items if p in it.weights}
            if len(shapes) > 1:
                raise LoraError(f"cannot stack adapters of different models: {p} has (layers, in, out) "
                                f"{sorted(shapes)}; stack only adapters trained on the same base model")
        rank = max(int(ab["a"].shape[-1]) for it in items for ab in it.weights.values())
        targets = [p for p in PROJECTIONS if any(p in it.weights for it in items)]
        weights: dict[str, dict[str, jax.Array]] = {}
        for p in targets:
            parts_a, parts_b = [], []
            for it in items:
                if p in it.weights:
                    a, b = it.weights[p]["a"], it.weights[p]["b"]
                    r = a.shape[-1]
                    parts_a.append(jnp.pad(a, ((0, 0),) * 3 + ((0, rank - r),)))
                    parts_b.append(jnp.pad(b, ((0, 0), (0, 0), (0, rank - r), (0, 0))))
                else:
                    ref = next(x.weights[p] for x in items if p in x.weights)
                    k = len(it)
                    parts_a.append(jnp.zeros((k, *ref["a"].shape[1:3], rank), jnp.float32))
                    parts_b.append(jnp.zeros((k, ref["b"].shape[1], rank, ref["b"].shape[3]), jnp.float32))
            weights[p] = {"a": jnp.concatenate(parts_a), "b": jnp.concatenate(parts_b)}
        bases = {it.base_model for it in items}
        return Adapters(weights, tuple(s for it in items for s in it.specs),
                        [h for it in items for h in it.losses], [f for it in items for f in it.failed],
                        base_model=bases.pop() if len(bases) == 1 else None)


# PEFT's tensor names: base_model.model.<Hugging Face module>.lora_A.weight (some writers keep the adapter's
# name: lora_A.default.weight)
_PEFT_TENSOR = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[\w-]+)?\.weight")
_PEFT_MODULES = [(p, BY_PATH[f"layers.{p}"].hf_pattern()) for p in PROJECTIONS]


def _peft_tensor(name: str, where: Path) -> tuple[str, int, str]:
    """``(projection, layer, "A" or "B")`` of a PEFT tensor name; anything else is a LoraError."""
    m = _PEFT_TENSOR.fullmatch(name)
    if m is not None:
        for p, pattern in _PEFT_MODULES:
            hit = pattern.fullmatch(m["module"] + ".weight")
            if hit is not None:
                return p, int(hit[1]), m["part"]
    raise LoraError(f"{where}: tensor {name!r} is not LoRA on one of the projections {list(PROJECTIONS)} of a "
                    "decoder layer; seal-jax reads plain LoRA on those only")


def _peft_spec(meta: Any, where: Path, found: Sequence[str]) -> tuple[LoraSpec, list[int] | None]:
    """The :class:`LoraSpec` of a PEFT ``adapter_config.json`` whose tensors adapt the projections ``found``,
    and the layers it adapts (``None``: every layer that has tensors)."""
    kind = str(meta.get("peft_type", "")).upper()
    if kind != "LORA":
        raise LoraError(f"{where} is a {kind or 'untyped'} adapter (peft_type); seal-jax reads LoRA adapters only")
    refused = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D weights)",
               "modules_to_save": "modules_to_save (fully trained modules)",
               "rank_pattern": "a per-module rank_pattern", "alpha_pattern": "a per-module alpha_pattern"}
    for key, what in refused.items():
        if meta.get(key):
            raise LoraError(f"{where} uses {what} ({key} = {meta[key]!r}); seal-jax reads plain LoRA with one rank "
                            "and alpha for every module")
    if meta.get("bias", "none") != "none":
        raise LoraError(f"{where} trains biases (bias = {meta['bias']!r}); seal-jax reads LoRA with bias 'none'")
    targets = meta.get("target_modules")
    if isinstance(targets, str):  # a regular expression over module names (PEFT): the tensors say what it hit
        targets = [p for p in PROJECTIONS if p in found]
    elif not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise LoraError(f"{where}: target_modules {targets!r} is neither a list of module names nor a pattern")
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
        raise LoraError(f"{where}: target_modules {unknown} are not among the projections {list(PROJECTIONS)}; "
                        "seal-jax adapts those only")
    if sorted(targets) != sorted(found):
        raise LoraError(f"{where} targets {sorted(targets)} and its tensors adapt {sorted(found)}")
    rank, alpha = meta.get("r"), meta.get("lora_alpha", meta.get("r"))
    if meta.get("use_rslora") and isinstance(rank, int) and isinstance(alpha, int | float) and rank > 0:
        alpha = float(alpha) * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); LoraSpec.scale is alpha / rank
    try:
        spec = LoraSpec(rank=rank, alpha=alpha, dropout=meta.get("lora_dropout", 0.0) or 0.0,
                        targets=tuple(p for p in PROJECTIONS if p in targets))
    except (LoraError, TypeError) as e:
        raise LoraError(f"{where}: {e}") from None
    kept = meta.get("layers_to_transform")
    if kept is None:
        return spec, None
    kept = [kept] if isinstance(kept, int) else kept
    if not isinstance(kept, list) or not kept or not all(isinstance(i, int) and i >= 0 for i in kept):
        raise LoraError(f"{where}: layers_to_transform {meta['layers_to_transform']!r} is not a list of layer indices")
    return spec, sorted(set(kept))
