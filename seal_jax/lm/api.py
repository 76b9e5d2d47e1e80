"""The ``LM`` facade: one object that holds a loaded model, its tokenizer and its mesh.

Everything outside :mod:`seal_jax.lm` (the self-edit loop, benchmarks, the CLI) reaches the engine
through this class.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from seal_jax.lm import attention as attn
from seal_jax.lm import cpu_decode, sampling, scoring, training, weights
from seal_jax.lm import sharding as shd
from seal_jax.lm import tokenizer as tok
from seal_jax.lm.config import ModelConfig, from_hf, preset
from seal_jax.lm.lora import Adapters, AdapterStack, LoraSpec, ReadyAdapters, ready_layout
from seal_jax.lm.model import (
    LAYER_STORAGE,
    Decoder,
    LoraInputs,
    layer_storage_for,
    stack_leaf,
    train_layers_for,
)
from seal_jax.lm.params import flatten, nest
from seal_jax.lm.training import TrainSpec
from seal_jax.lm.types import TRAIN_WEIGHTS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def build_model(config: ModelConfig, params: dict[str, jax.Array], *, dtype: Any = jnp.float32,
                remat: str | bool = "minimal") -> Decoder:
    """A :class:`Decoder` holding ``params`` (``{dotted path: array}``) without random initialisation."""
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0), remat=remat))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, nest(params))
    return nnx.merge(graphdef, state)


_PROGRAMS: dict[tuple[Any, Any], dict[Any, Any]] = {}  # (graphdef, mesh) -> compiled programs, see LM._shared


def _train_programs(graphdef: Any, mesh: Mesh | None, options: Mapping[str, Any]) -> dict[Any, Any]:
    """The compiled training programs shared by every LM with this structure on this mesh and these compiler
    options (see ``LM._shared``)."""
    programs, key = _PROGRAMS.setdefault((graphdef, mesh), {}), ("train", *sorted(options.items()))
    if key not in programs:
        programs[key] = training.TrainPrograms(dict(options))
    return programs[key]


def _layer_storage(layer_storage: str | None, mesh: Mesh | None) -> str:
    """``layer_storage`` checked, or the default for the mesh's platform (see :meth:`LM.load`)."""
    layer_storage = layer_storage_for(shd.platform(mesh)) if layer_storage is None else layer_storage
    if layer_storage not in LAYER_STORAGE:
        raise ValueError(f"unknown layer_storage {layer_storage!r}; choose one of {LAYER_STORAGE}")
    return layer_storage


def _train_weights(train_weights: str, train_mesh: Mesh | None) -> str:
    """``train_weights`` checked against the train mesh (see :meth:`LM.load`)."""
    if train_weights not in TRAIN_WEIGHTS:
        raise ValueError(f"unknown train_weights {train_weights!r}; choose one of {TRAIN_WEIGHTS}")
    if train_weights == "fsdp" and (train_mesh is None or int(train_mesh.shape["data"]) == 1):
        raise shd.MeshError("train_weights='fsdp' splits the layer weights over the train mesh's data axis: give a "
                            "train_mesh with data > 1 (e.g. train_mesh='data=8')")
    return train_weights


def _check_sizes(what: str, **sizes: Any) -> None:
    """Raise ``ValueError`` unless every one of ``sizes`` is a whole number of at least 1 (``what``: the method)."""
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1}
    if bad:
        raise ValueError(f"{what} needs {', '.join(sizes)} of at least 1 each (whole numbers), got "
                         + ", ".join(f"{k}={v!r}" for k, v in bad.items()))


class LM:
    """A loaded language model: config, tokenizer, parameters (possibly sharded) and jitted entry points.

    Create it with :meth:`LM.load` (or :func:`seal_jax.load`). ``layer_storage`` (one of
    ``model.LAYER_STORAGE``, default by the mesh's platform: ``"split"`` on GPUs, ``"stacked"`` elsewhere) is
    how the layer weights are held on the devices (see :class:`~seal_jax.lm.model.LayerStack`); the programs'
    results do not depend on it. ``attention`` (one of ``attention.IMPLEMENTATIONS``, default by the mesh's
    platform: ``"causal_blocks"`` on CPUs, the fused kernels ``"splash"`` on TPUs and ``"triton"`` on GPUs) is how T
    tokens attend to their own keys; ``"chunked"`` runs anywhere without a kernel, for a machine whose
    JAX rejects one (``attention.check_kernel`` says). :attr:`compiler_options` (default ``{}``) are XLA
    options the model's compute programs are compiled with (logits, log-probs, generation, training).
    :attr:`source` (the hub id as given, or the folder's absolute path) is the adapters' base model;
    :attr:`generation_config`, the folder's ``generation_config.json`` (or ``None``), what :meth:`export` writes.
    """

    def __init__(self, model: Decoder, tokenizer: Any, *, mesh: Mesh | None = None, path: Path | None = None,
                 source: str | None = None, train_mesh: Mesh | str | None = None, layer_storage: str | None = None,
                 train_weights: str = "replicated", attention: str | None = None):
        # attention's implementation follows the platform the programs run on (the mesh's devices), unless
        # given or the model was built with one
        if attention is not None:
            model.attention_impl = attn.chosen(attention, shd.platform(mesh))
        elif model.attention_impl is None:
            model.attention_impl = attn.implementation_for(shd.platform(mesh))
        if model.train_layers is None:  # likewise how training runs the layers
            model.train_layers = train_layers_for(shd.platform(mesh))
        # and how the layer weights are stored: split into per-layer arrays on GPUs (model.LayerStack)
        chosen = layer_storage is not None
        layer_storage = _layer_storage(layer_storage, mesh)
        if layer_storage == "split":
            model.layers.store_split()
        elif model.layers.split:
            how = "given" if chosen else f"the default on {shd.platform(mesh)}"
            raise ValueError(f"layer_storage='stacked' ({how}) for a model whose layer weights are stored split; "
                             "build the model again from LM.params(), or pass layer_storage='split'")
        self.layer_storage = layer_storage
        if mesh is not None:  # each weight in the layout its chip's programs read (layouts.py: under a mesh)
            model.lay_out(shd.platform(mesh), shd.device_kind(mesh))
        model.attention_placement = attn.Placement(mesh)
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.path = path
        self.source = str(Path(path).resolve()) if source is None and path is not None else source
        self.generation_config: dict[str, Any] | None = None
        self.graphdef, self.state = nnx.split(model)
        self._weight_copies: Any = None  # Sampler.split's output, made at the first generation (CPU only)
        self._keeps_copies: bool | None = None  # decided once, at the first generation
        self.is_abstract = False  # True for LM.abstract models (shapes only: lower and compile, no data)
        self.train_mesh = shd.train_mesh_of(train_mesh, mesh)
        self.train_weights = _train_weights(train_weights, self.train_mesh)
        if self.train_weights == "fsdp" and model.remat == "none":
            raise ValueError("train_weights='fsdp' needs remat 'minimal' or 'full': without remat the backward "
                             "pass keeps every layer's gathered weights, a whole replica")
        self._train_graphdef: Any = None  # the model's structure on train_mesh, made at the first training
        self._place: Any = None  # the jitted placement of the weights on train_mesh (see _placement)
        self.compiler_options = {}

    @property
    def compiler_options(self) -> Mapping[str, Any]:
        """XLA options (``jax.jit``'s ``compiler_options``) of the model's compute programs, read-only; assign
        a new dict to change them, e.g. ``{"xla_gpu_experimental_force_split_k": 1}`` (no split-K rewrite of
        a GPU's matmuls). Each set of options has compiled programs of its own."""
        return MappingProxyType(self._compiler_options)

    @compiler_options.setter
    def compiler_options(self, options: Mapping[str, Any]) -> None:
        bad = {k: v for k, v in options.items() if not isinstance(k, str) or not isinstance(v, str | bool | int | float)}
        if bad:
            raise ValueError(f"compiler_options take XLA option names with str, bool, int or float values; got {bad}")
        self._compiler_options = dict(options)

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
        remat: str | bool = "minimal",
        progress: bool = True,
        train_mesh: Mesh | str | None = None,
        layer_storage: str | None = None,
        train_weights: str = "replicated",
        attention: str | None = None,
    ) -> LM:
        """Load a Hugging Face-format model folder (or hub id, when online).

        Args:
          path_or_id: a folder with ``config.json``, safetensors weights and (usually) tokenizer files, or a
            hub id (``"Qwen/Qwen3-0.6B"``, downloaded to the hub's cache; :attr:`source` keeps the id).
          dtype: ``"float32"`` (CPU, exact parity), ``"bfloat16"`` (accelerators) or ``"float16"``.
          mesh: a :class:`~jax.sharding.Mesh` or a spec like ``"data=2,fsdp=2,tensor=2"``; weights are
            placed sharded as they are read.
          tokenizer: a tokenizer, or a folder to load one from (default: the model folder's, if it has
            one; without a tokenizer only id-level methods such as :meth:`logits` work).
          remat: what LoRA training keeps of each layer for the backward pass: ``"minimal"`` (default: the
            projections' outputs; attention and elementwise work recomputed), ``"full"`` (the layer input
            only: least memory, about 1/3 more training compute) or ``"none"``; see ``lm.types.REMAT_POLICIES``.
          train_mesh: another layout of the same devices for LoRA training (e.g. ``"data=8"``: the base
            replicated, each device training its own candidates with no collective), where ``mesh`` suits
            generation (e.g. ``"data=2,tensor=4"``). Each training call places a copy of the base weights on
            it (one all-gather; the copy lives for the call; with ``train_weights="fsdp"`` a split of it).
            ``None``: train on ``mesh``.
          layer_storage: ``"stacked"`` or ``"split"`` (see the class); default by the mesh's platform.
          train_weights: how the base weights lie on ``train_mesh``: ``"replicated"`` (default: a whole copy on
            every device, no collective while training) or ``"fsdp"`` (each layer's weights split over the
            train mesh's ``data`` axis along the model width and all-gathered before the layer runs, forward
            and again backward: a replica's memory divided by ``data``, for chips too small for one).
          attention: how T tokens attend to their own keys (see the class): ``None`` for the platform's
            default, or one of ``"einsum"``, ``"causal_blocks"``, ``"chunked"``, ``"splash"``, ``"triton"``.
        """
        hub_id = not Path(path_or_id).expanduser().is_dir()  # (resolve_checkpoint: a local folder comes first)
        folder = weights.resolve_checkpoint(path_or_id)
        attn.chosen(attention)
        config = from_hf(folder)
        generation_config = weights.read_generation_config(folder)  # (checked before minutes of loading)
        if isinstance(mesh, str):
            mesh = shd.make_mesh(mesh)
        _train_weights(train_weights, shd.train_mesh_of(train_mesh, mesh))  # checked before minutes of loading
        _layer_storage(layer_storage, mesh)
        dt = _dtype(dtype)
        if tokenizer is None:
            tokenizer = tok.load_tokenizer(folder) if tok.has_tokenizer(folder) else None
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = tok.load_tokenizer(tokenizer)
        # the model holds the only reference to the weights: splitting them (layer_storage) releases each
        # stacked array as it goes
        model = build_model(config, weights.load_params(folder, config, dtype=dt, mesh=mesh, progress=progress),
                            dtype=dt, remat=remat)
        lm = cls(model, tokenizer, mesh=mesh, path=folder, source=str(path_or_id) if hub_id else None,
                 train_mesh=train_mesh, layer_storage=layer_storage, train_weights=train_weights, attention=attention)
        lm.generation_config = generation_config
        return lm

    @classmethod
    def abstract(cls, config: ModelConfig | str, *, mesh: Mesh | str | None = None, dtype: Any = "bfloat16",
                 remat: str | bool = "minimal", tokenizer: Any = None, train_mesh: Mesh | str | None = None,
                 layer_storage: str | None = None, train_weights: str = "replicated",
                 attention: str | None = None) -> LM:
        """A model that exists only as shapes and shardings: every parameter is a ``jax.ShapeDtypeStruct``
        placed as :meth:`load` would place it on ``mesh``. Nothing is allocated; use it to lower and compile
        the engine's programs ahead of time (:meth:`lower_logits`, :meth:`lower_generate`,
        :meth:`lower_train`), including for a mesh of a TPU or GPU topology's devices on a CPU host
        (:mod:`seal_jax.targets`).

        Args:
          config: a :class:`ModelConfig` or a preset name (``"qwen3-8b"``; see ``lm.config.PRESETS``).
          mesh: a mesh or a spec such as ``"data=8"`` (over ``jax.devices()``); ``None`` for one device.
          dtype, remat, train_mesh, layer_storage, train_weights, attention: as in :meth:`load`.
        """
        if isinstance(config, str):
            config = preset(config)
        if isinstance(mesh, str):
            mesh = shd.make_mesh(mesh)
        dt = _dtype(dtype)
        model = nnx.eval_shape(lambda: Decoder(config, dtype=dt, rngs=nnx.Rngs(0), remat=remat))
        graphdef, state = nnx.split(model)
        flat = flatten(nnx.to_pure_dict(state))
        placed = {path: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=None if mesh is None else
                                             shd.param_sharding(mesh, path, x.shape, config)) for path, x in flat.items()}
        nnx.replace_by_pure_dict(state, nest(placed))
        lm = cls(nnx.merge(graphdef, state), tokenizer, mesh=mesh, path=None, train_mesh=train_mesh,
                 layer_storage=layer_storage, train_weights=train_weights, attention=attention)
        lm.is_abstract = True
        return lm

    @classmethod
    def random(cls, config: ModelConfig | str, *, mesh: Mesh | str | None = None, dtype: Any = "bfloat16",
               seed: int = 0, train_mesh: Mesh | str | None = None, remat: str | bool = "minimal",
               train_weights: str = "replicated", tokenizer: Any = None, layer_storage: str | None = None,
               attention: str | None = None) -> LM:
        """A model with random weights, created on the devices in their shards (for benchmarks: the real
        programs at the real shapes without a checkpoint; see :func:`~seal_jax.lm.weights.random_params`).

        Args:
          config: a :class:`ModelConfig` or a preset name (``"qwen3-8b"``; see ``lm.config.PRESETS``).
          mesh: a mesh or a spec such as ``"data=8"``; ``None`` for one device.
          dtype: ``"bfloat16"`` (default) or ``"float32"``.
          seed: the weights depend on the seed only (not on the mesh).
          train_mesh, remat, train_weights, layer_storage, attention: as in :meth:`load`.
          tokenizer: optional; without one, use the id-level methods (``generate_ids``, ``logits``, and
            ``train_adapters`` with token-id sequences).
        """
        if isinstance(config, str):
            config = preset(config)
        if isinstance(mesh, str):
            mesh = shd.make_mesh(mesh)
        _train_weights(train_weights, shd.train_mesh_of(train_mesh, mesh))
        _layer_storage(layer_storage, mesh)
        attn.chosen(attention)
        dt = _dtype(dtype)
        model = build_model(config, weights.random_params(config, dtype=dt, mesh=mesh, seed=seed), dtype=dt,
                            remat=remat)  # the only reference to the weights, as in load
        return cls(model, tokenizer, mesh=mesh, path=None, train_mesh=train_mesh, train_weights=train_weights,
                   layer_storage=layer_storage, attention=attention)

    def _require_weights(self, what: str) -> None:
        if self.is_abstract:
            raise ValueError(f"{what} needs weights, and this LM is abstract (LM.abstract: shapes only); lower "
                             "and compile its programs with lower_logits / lower_generate / lower_train, or load "
                             "a checkpoint with seal_jax.load")

    def abstract_adapters(self, k: int, lora: LoraSpec | Sequence[LoraSpec], ready: bool = False) -> LoraInputs:
        """Shapes of K stacked adapters (``{projection: {"a": [K, L, in, R], "b": [K, L, R, out]}}``, float32,
        scale ``[K]``) as :meth:`train_adapters` returns them for these specs, or with ``ready`` as
        :meth:`ready_adapters` gives them, for :meth:`lower_generate`."""
        specs = [lora] * k if isinstance(lora, LoraSpec) else list(lora)
        trains = [TrainSpec()] * len(specs)
        params = {p: jax.ShapeDtypeStruct(x.shape, x.dtype) for p, x in self.param_structs().items()}
        weights = jax.eval_shape(lambda: training.initial_adapters(params, specs, trains, 0))
        if ready:
            count = self._sampler.traces["ready"]
            weights = jax.eval_shape(self._sampler._ready, self.state, weights)
            self._sampler.traces["ready"] = count
            formats = self._sampler.ready_formats(weights)
            if formats is not None:
                weights = jax.tree.map(lambda x, f: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=f), weights, formats)
        return LoraInputs(weights=weights, scale=jax.ShapeDtypeStruct((len(specs),), jnp.float32))

    def lower_logits(self, batch: int, length: int) -> Any:
        """The lowered program of :meth:`logits` for ``[batch, length]`` ids (length bucketed as
        :meth:`forward` does); a ``jax.stages.Lowered`` to ``.compile()``."""
        _check_sizes("lower_logits", batch=batch, length=length)
        tb = tok.bucket(length)
        shape = (batch, tb)
        sharding = None if self.mesh is None else shd.batch_sharding(self.mesh, shape)
        ids = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
        return self._logits_fn.lower(self.state, ids, ids)

    def lower_generate(self, batch: int, prompt_len: int, max_new_tokens: int,
                       adapters: LoraInputs | AdapterStack | None = None, greedy: bool = False) -> dict[str, Any]:
        """The lowered prefill and decode programs of :meth:`generate_ids` for ``batch`` prompts of up to
        ``prompt_len`` tokens and ``max_new_tokens`` new tokens, with ``adapters`` stacked (real, or shapes
        from :meth:`abstract_adapters`) or none: ``{"prefill": Lowered, "decode": Lowered}``. ``greedy``:
        the decode program that ``temperature == 0`` runs (no sampling in it). A ``prompt_len`` that with
        ``max_new_tokens`` exceeds the model's context is a ``SamplingError``, as in :meth:`generate_ids`."""
        _check_sizes("lower_generate", batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens)
        sampling.check_context("lower_generate's prompt (prompt_len)", prompt_len, max_new_tokens, self.config)
        if isinstance(adapters, AdapterStack):  # (Adapters, or ReadyAdapters: these lowered where and as they lie)
            self._lora(adapters)
            ready = isinstance(adapters, ReadyAdapters) and self.mesh is not None
            adapters = adapters.as_inputs()
            if ready:
                adapters = LoraInputs(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.format),
                                                   adapters.weights), adapters.scale)
        return self._sampler.lower(self.state, batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                   adapters=adapters, greedy=greedy)

    def lower_train(self, candidates: int, sequences: int, seq_len: int,
                    lora: LoraSpec | Sequence[LoraSpec] | None = None,
                    train: TrainSpec | Sequence[TrainSpec] | None = None, seed: int = 0) -> Any:
        """The lowered program of :meth:`train_adapters` for ``candidates`` candidates of ``sequences``
        training sequences of ``seq_len`` tokens each (SEAL's specs where ``lora``/``train`` are None)."""
        graphdef, state, mesh = self._train_view()
        return training.lower_train(
            graphdef, state, self.param_structs(), candidates=candidates, sequences=sequences,
            seq_len=seq_len, lora=LoraSpec.seal() if lora is None else lora,
            train=TrainSpec.seal() if train is None else train, seed=seed, mesh=mesh,
            programs=_train_programs(graphdef, mesh, self.compiler_options))

    def lower_train_placement(self) -> Any:
        """The lowered program that places the base weights on :attr:`train_mesh` (what each training call
        runs first), or ``None`` without a train mesh."""
        if self.train_mesh is None:
            return None
        return self._placement().lower(self.state)

    def _placement(self) -> Any:
        """The jitted program that places the base weights on :attr:`train_mesh` (made once)."""
        if self._place is None:
            fsdp = self.train_weights == "fsdp"
            flat = {path: self._sharding_on(self.train_mesh, path, x,
                                            shd.FSDP_LAYER_RULES if fsdp and path.startswith("layers.") else shd.RULES)
                    for path, x in self._stored_params().items()}
            target = nnx.clone(self.state)
            nnx.replace_by_pure_dict(target, nest(flat))
            self._place = jax.jit(lambda state: state, out_shardings=target)
        return self._place

    def _train_view(self) -> tuple[Any, Any, Mesh | None]:
        """``(graphdef, state, mesh)`` that LoRA training runs with: the model's own, or, with a
        :attr:`train_mesh`, its structure for that mesh and the base weights placed on it."""
        if self.train_mesh is None:
            return self.graphdef, self.state, self.mesh
        if self._train_graphdef is None:
            model = nnx.merge(self.graphdef, self.state)
            model.attention_placement = attn.Placement(self.train_mesh)
            if self.train_weights == "fsdp":  # each layer's weights gathered before it runs
                model.layer_gather = self.train_mesh
            self._train_graphdef, _ = nnx.split(model)
        if self.is_abstract:  # shapes placed as the placement program would place them
            state = jax.eval_shape(self._placement(), self.state)
        else:  # the program `seal-jax compile` reports as <program>.placement
            state = self._placement()(self.state)
        return self._train_graphdef, state, self.train_mesh

    def _sharding_on(self, mesh: Mesh, path: str, x: Any, rules: Any = shd.RULES) -> Any:
        """The sharding on ``mesh`` by ``rules`` of the parameter at ``path`` held as ``x`` (an array, or
        per-layer ones)."""
        if isinstance(x, tuple):  # split layer weights: the stacked one's, less the layer axis
            stacked = shd.param_sharding(mesh, path, (len(x), *x[0].shape), self.config, rules)
            return (shd.layer_slice_sharding(stacked),) * len(x)
        return shd.param_sharding(mesh, path, x.shape, self.config, rules)

    def _stored_params(self) -> dict[str, Any]:
        """The base parameters as stored: ``{dotted path: array}``, split layer weights as tuples of their
        per-layer arrays (no copy)."""
        return flatten(nnx.to_pure_dict(self.state))

    def params(self) -> dict[str, jax.Array]:
        """The base parameters as ``{dotted path: array}``, per-layer ones ``[L, ...]`` (where the layer weights
        are stored split, stacked copies of them)."""
        flat = self._stored_params()
        return {p: stack_leaf(x) if isinstance(x, tuple) else x for p, x in flat.items()}

    def param_structs(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes, dtypes and shardings of :meth:`params`, without copying anything."""
        def struct(x: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

        flat = self._stored_params()
        return {p: stack_leaf([struct(v) for v in x]) if isinstance(x, tuple) else struct(x) for p, x in flat.items()}

    def export(self, out_dir: str | Path, *, dtype: Any = None, progress: bool = False) -> Path:
        """Write this model (weights, config, tokenizer, and :attr:`generation_config` where it has one; where it
        has none, an earlier export's ``generation_config.json`` in the folder is removed) as a Hugging Face
        folder; returns the folder.

        In a multi-host run every process must call it (the weights are gathered from all processes);
        process 0 writes the folder (a bar over its tensors with ``progress``). Weights stored split go to
        the host layer by layer, never stacked."""
        self._require_weights("export")  # (export_hf checks the dtype before it gathers or writes anything)
        return weights.export_hf(self._stored_params(), self.config, out_dir, dtype=dtype, tokenizer=self.tokenizer,
                                 generation_config=self.generation_config, progress=progress)

    def merge_adapter(self, adapters: Adapters, k: int = 0) -> LM:
        """A new :class:`LM` whose base weights have adapter ``k`` of ``adapters`` folded in
        (``W + alpha/rank · A @ B`` on every adapted projection; same tokenizer, mesh and dtype).

        The merged model's forward equals this model's forward with that adapter applied. This model is
        left unchanged; export the result with :meth:`export`.
        """
        if not isinstance(adapters, Adapters):
            raise TypeError(f"merge_adapter takes seal_jax.Adapters, got {type(adapters).__name__}")
        self._require_weights("merge_adapter")
        k = adapters._index(k)  # negative k counts from the end, as adapters[k] and save_peft do
        if adapters.failed and adapters.failed[k]:
            raise ValueError(f"adapter {k} failed in training ({adapters.failed[k]}); refusing to merge it")
        self._lora(adapters)
        # the new model holds the only reference to the merged weights (weights stored split are merged layer by
        # layer, without a stacked copy) and shares the ones the adapter leaves alone
        model = build_model(self.config, adapters.merged_params(self._stored_params(), k),
                            dtype=self.dtype, remat=self.model.remat)
        model.attention_impl, model.train_layers = self.model.attention_impl, self.model.train_layers  # as chosen
        merged = LM(model, self.tokenizer, mesh=self.mesh, path=None, train_mesh=self.train_mesh,
                    layer_storage=self.layer_storage, train_weights=self.train_weights)
        merged.compiler_options = dict(self.compiler_options)
        merged.generation_config = self.generation_config  # (the same eos/bos/pad ids: export writes it again)
        return merged

    def ready_adapters(self, adapters: Adapters) -> ReadyAdapters:
        """``adapters`` as this model's generation, log-probabilities and logits read them: in its compute
        dtype, each input's ``a`` matrices joined, one piece per layer where the layers are stored split
        (GPUs). Answering with them costs no per-call cast or copy; drop the float32 ``adapters`` afterwards
        to free their memory (training, merging and saving take those). Their shapes, for
        :meth:`lower_generate`: :meth:`abstract_adapters` with ``ready=True``."""
        self._require_weights("ready_adapters")
        if not isinstance(adapters, Adapters):
            raise TypeError(f"ready_adapters takes seal_jax.Adapters (from train_adapters), got {type(adapters).__name__}")
        self._lora(adapters)
        weights = self._sampler.ready(self.state, self._sampler.put_replicated(adapters.weights))
        return ReadyAdapters(weights, adapters.specs, adapters.losses, adapters.failed, adapters.single,
                             layout=self._ready_layout())

    def _ready_layout(self) -> tuple[str | None, ...]:
        return ready_layout(self.config, self.dtype, self.layer_storage, self.mesh)

    def _lora(self, adapters: Any) -> Any:
        """``adapters`` checked for this model (readied ones by the model they were readied for, others by
        their shapes: an error saying which differ) and normalised (``sampling.as_lora``)."""
        if isinstance(adapters, ReadyAdapters):
            adapters.check(self._ready_layout())
        return sampling.as_lora(adapters, self.config)

    # ------------------------------------------------------------------------------------------------

    def _shared(self, name: Hashable, make: Any) -> Any:
        """A compiled-program holder shared by every LM with the same structure (graphdef), mesh and
        :attr:`compiler_options` (``make`` compiles with them). The programs take the weights as arguments,
        so a model with new weights of the same shapes (a merged generator, a reloaded checkpoint) reuses them.
        """
        programs = _PROGRAMS.setdefault((self.graphdef, self.mesh), {})
        key = (name, *sorted(self.compiler_options.items()))
        if key not in programs:
            programs[key] = make()
        return programs[key]

    def _jit(self, fn: Any, **kwargs: Any) -> Any:
        """``jax.jit(fn, **kwargs)`` with this model's :attr:`compiler_options` (for :meth:`_shared` makers)."""
        return jax.jit(fn, compiler_options=dict(self.compiler_options) or None, **kwargs)

    # Scoring given tokens (see seal_jax.lm.scoring for the checks, batches and programs)

    @property
    def _scorer(self) -> scoring.Scorer:
        return self._shared("scorer", lambda: scoring.Scorer(self.graphdef, self._jit))

    @property
    def _logits_fn(self) -> Any:
        return self._scorer.logits_program

    def _put_batch(self, array: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, shd.batch_sharding(self.mesh, array.shape))

    def forward(self, ids: Any, attention_mask: Any = None, adapter: AdapterStack | None = None) -> jax.Array:
        """Like :meth:`logits` but returns the device array (padded length trimmed), without a host copy."""
        self._require_weights("logits")
        ids, mask = scoring.check_ids(ids, attention_mask, self.config)
        if adapter is not None:
            if not isinstance(adapter, AdapterStack):
                raise TypeError(f"adapter must be seal_jax.Adapters (from train_adapters) or ReadyAdapters (from "
                                f"ready_adapters), got {type(adapter).__name__}")
            self._lora(adapter)
        return self._scorer.logits(self.state, ids, mask, adapter, self._put_batch)

    def logits(self, ids: Any, attention_mask: Any = None, adapter: AdapterStack | None = None) -> np.ndarray:
        """Next-token logits for a batch of token ids.

        Args:
          ids: int ``[B, T]`` (left-padded when rows differ in length).
          attention_mask: ``[B, T]``, 1 on real tokens and 0 on padding, as Hugging Face's (default: all ones;
            other values are refused). Rotary positions count real tokens only, so a left-padded row gives the
            same logits as the row alone.
          adapter: LoRA :class:`~seal_jax.lm.lora.Adapters` (or readied, :meth:`ready_adapters`); one
            adapter (``adapters[k]``) gives ``[B, T, V]``, a stack of K (even K = 1) gives ``[K, B, T, V]``.
        Returns:
          float32 numpy ``[B, T, V]`` (or ``[K, B, T, V]``).
        """
        return shd.to_host(self.forward(ids, attention_mask, adapter))

    def train_adapters(
        self,
        sequences: Sequence[Sequence[Any]],
        lora: LoraSpec | Sequence[LoraSpec] | None = None,
        train: TrainSpec | Sequence[TrainSpec] | None = None,
        seed: int = 0,
    ) -> Adapters:
        """Train K LoRA adapters by next-token prediction, all in one compiled program.

        Args:
          sequences: a list (K candidates) of lists of training strings (or ``(prompt, completion)``
            pairs: loss on the completion only; or lists of token ids, which need no tokenizer).
          lora, train: one :class:`LoraSpec` / :class:`TrainSpec` for all candidates or one per candidate
            (default: SEAL's inner loop, ``LoraSpec.seal()`` and ``TrainSpec.seal()``).
          seed: mixed with each candidate's ``TrainSpec.seed`` (init, dropout, data order).
        Returns:
          :class:`Adapters` (K stacked; ``adapters[k]``, ``adapters.losses``, ``adapters.failed``).
        """
        adapters = self._with_training_args(training.train_adapters, sequences, lora, train, seed)
        adapters.base_model = self.source  # save_peft's base_model_name_or_path: the hub id, or the folder
        return adapters

    def training_memory(
        self,
        sequences: Sequence[Sequence[Any]],
        lora: LoraSpec | Sequence[LoraSpec] | None = None,
        train: TrainSpec | Sequence[TrainSpec] | None = None,
        seed: int = 0,
    ) -> dict[str, int]:
        """Bytes per device that :meth:`train_adapters` with these arguments needs, from XLA's memory
        analysis of its compiled program (compiles, does not train): ``{"arguments", "outputs",
        "temporaries", "total"}``; ``arguments`` include the base weights, ``temporaries`` the
        activations, gradients and optimiser work space."""
        return self._with_training_args(training.training_memory, sequences, lora, train, seed)

    def _with_training_args(self, fn: Any, sequences: Sequence[Sequence[Any]], lora: Any, train: Any,
                            seed: int) -> Any:
        """``fn`` (``training.train_adapters`` or ``training.training_memory``) called with this model's
        weights, tokenizer, ids, mesh and programs, and SEAL's specs where ``lora``/``train`` are None."""
        self._require_weights("training")
        graphdef, state, mesh = self._train_view()
        out = fn(
            graphdef, state, self.param_structs(), self.tokenizer, sequences,
            LoraSpec.seal() if lora is None else lora, TrainSpec.seal() if train is None else train,
            seed=seed, eos_id=self._train_eos_id(), pad_id=self._pad_id(), mesh=mesh,
            programs=_train_programs(graphdef, mesh, self.compiler_options),
            context=self.config.max_position_embeddings,
        )
        if isinstance(out, Adapters) and mesh is not self.mesh:  # back to the mesh that generates with them
            out.weights = jax.device_put(out.weights, shd.replicated(self.mesh))
        return out

    def _train_eos_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            if not self.config.eos_token_ids:
                raise ValueError("neither the tokenizer nor config.json names an EOS token; set eos_token_id")
            eos = self.config.eos_token_ids[0]
        return int(eos)

    # ------------------------------------------------------------------------------------------------
    # Generation (see seal_jax.lm.sampling for the programs)

    @property
    def _sampler(self) -> sampling.Sampler:
        return self._shared("sampler", lambda: sampling.Sampler(self.graphdef, self.mesh,
                                                                 compiler_options=self.compiler_options))

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if eos is not None:
            ids.add(int(eos))
        return tuple(sorted(ids))

    def _pad_id(self) -> int:
        if self.tokenizer is not None:
            return tok.pad_id_of(self.tokenizer, fallback=self.config.pad_token_id or 0)
        return int(self.config.pad_token_id or 0)

    def generate_ids(self, prompt_ids: list[list[int]], params: sampling.SamplingParams | None = None,
                     adapters: Any = None, timings: dict[str, float] | None = None,
                     seeds: Sequence[int] | None = None) -> list[list[int]] | list[list[list[int]]]:
        """Generate token ids after each prompt.

        Args:
          prompt_ids: B non-empty lists of token ids (no padding; rows may differ in length).
          params: a :class:`~seal_jax.lm.sampling.SamplingParams` (default: greedy, 64 new tokens).
          adapters: ``None``; :class:`~seal_jax.lm.lora.Adapters` (K candidates stacked: K lists of answers;
            ``adapters[k]``, one adapter, answers without the K axis; ``adapters.take([k])`` is a stack of one)
            or the same readied (:meth:`ready_adapters`); one raw adapter (``.weights`` leaves ``a [L, in, r]``,
            ``b [L, r, out]``, scalar ``.scale``, e.g. :class:`~seal_jax.lm.model.LoraInputs`); or K raw
            stacked adapters (leaves with a leading K axis, ``.scale`` ``[K]``). Stacks run under ``vmap``.
          timings: if a dict, receives ``prefill_s`` and ``decode_s``, the wall seconds of the two programs
            (the call then waits for the prefill before it starts the decode; for benchmarks).
          seeds: one seed per prompt, replacing ``params.seed``: the rows of one seed draw the numbers of a
            call of their own with that seed (several requests in one batch, each as if alone).
        Returns:
          B lists of generated ids, each ending before its stop token (EOS ids of the config and tokenizer,
          unless ``ignore_eos``, plus ``stop_token_ids``); with K stacked adapters, K such lists.
        Raises:
          SamplingError: empty input, out-of-vocabulary ids, prompt + ``max_new_tokens`` beyond the
            model's context, or malformed adapters (all checked before anything runs).
        """
        self._require_weights("generate")
        params = sampling.SamplingParams() if params is None else params
        rows = sampling.check_prompt_ids(prompt_ids, params, self.config)
        self._lora(adapters)  # validate before compiling anything
        if seeds is not None:
            seeds = list(seeds)
            bad = [x for x in seeds if not (isinstance(x, int | np.integer) and 0 <= x < 2**32)]
            if len(seeds) != len(rows) or bad:
                raise sampling.SamplingError(f"seeds: one integer in [0, 2**32) per prompt ({len(rows)}), got "
                                             f"{len(seeds)} values" + (f", among them {bad[:3]}" if bad else ""))
        return self._sampler.generate(self.state, self.config, rows, params, eos_ids=self._eos_ids(),
                                      pad_id=self._pad_id(), adapters=adapters, copies=self._decode_copies(),
                                      seeds=seeds, timings=timings)

    def _decode_copies(self) -> Any:
        """Per-layer weight copies kept for decoding on a CPU (see :mod:`seal_jax.lm.cpu_decode`), made on
        first use; ``None`` where they are not kept."""
        if self._keeps_copies is None:
            self._keeps_copies = cpu_decode.keeps_weight_copies(self.state, shd.platform(self.mesh))
            if self._keeps_copies:
                self._weight_copies = self._sampler.split(self.state)
        return self._weight_copies

    def generate(self, prompts: list[str], params: sampling.SamplingParams | None = None, adapters: Any = None,
                 chat: bool = False, enable_thinking: bool = False,
                 seeds: Sequence[int] | None = None) -> list[str] | list[list[str]]:
        """Generate text after each prompt (see :meth:`generate_ids` for ``params`` and ``adapters``).

        Args:
          prompts: B non-empty strings. Plain prompts are tokenized with the tokenizer's default special
            tokens (e.g. a BOS if it adds one); ``chat=True`` instead wraps each prompt as a user message in
            the tokenizer's chat template with the generation prompt (and adds no special tokens again).
          enable_thinking: passed to the chat template (Qwen3 thinking; off by default).
          seeds: one seed per prompt instead of ``params.seed`` (see :meth:`generate_ids`).
        Returns:
          B strings decoded with ``skip_special_tokens=True``; with K stacked adapters, K lists of B.
        """
        sampling.check_texts(prompts, "prompts", self.tokenizer, "generate() needs a tokenizer and this LM has none: load it "
                     "with tokenizer=FOLDER, or use generate_ids() with token ids")
        lora = self._lora(adapters)  # validate before tokenizing
        out = self.generate_ids(self._prompt_ids(prompts, chat, enable_thinking), params, adapters, seeds=seeds)

        def decode(rows: list[list[int]]) -> list[str]:
            return [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]

        if lora is not None and lora.stacked:
            return [decode(rows) for rows in out]
        return decode(out)

    def _prompt_ids(self, prompts: Sequence[str], chat: bool, enable_thinking: bool = False) -> list[list[int]]:
        """Token ids of prompts as :meth:`generate` reads them (chat template, or the tokenizer's specials)."""
        if chat:
            texts = [tok.format_chat(self.tokenizer, p, enable_thinking=enable_thinking) for p in prompts]
            return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return [self.tokenizer(p)["input_ids"] for p in prompts]

    def completion_logprobs(self, prompts: list[str], completions: list[str], adapters: AdapterStack | None = None,
                            chat: bool = False, enable_thinking: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Log-likelihood of each completion after its prompt, by teacher forcing (no sampling).

        The prompt is tokenized as :meth:`generate` does (``chat`` wraps it in the chat template), the
        completion on its own without special tokens, and the two are joined; the model scores the
        completion's tokens only.

        Args:
          prompts, completions: B non-empty strings each.
          adapters: none (the base model) or :class:`Adapters` (K stacked, or one; or readied:
            :meth:`ready_adapters`).
        Returns:
          ``(logprobs, tokens)``: float64 sums of the completion tokens' log-probabilities, ``[B]`` (or
          ``[K, B]`` with K stacked adapters), and int ``[B]`` token counts (divide for nats per token).
        """
        self._require_weights("completion_logprobs")
        scoring.check_completions(prompts, completions, self.tokenizer)
        lora = self._lora(adapters)
        heads = self._prompt_ids(prompts, chat, enable_thinking)
        tails = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        batch = scoring.completion_batch(heads, tails, pad_id=self._pad_id(),
                                         context=self.config.max_position_embeddings, mesh=self.mesh)
        sums = self._scorer.completion_logprobs(self.state, batch, self._put_batch, None if lora is None else adapters)
        return sums, np.array([len(t) for t in tails])


def load(path_or_id: str | Path, dtype: Any = "float32", mesh: Mesh | str | None = None, **kwargs: Any) -> LM:
    """Load a model; see :meth:`LM.load`."""
    return LM.load(path_or_id, dtype=dtype, mesh=mesh, **kwargs)
