"""A run's configuration: the knowledge-run config every run kind builds on, its TOML tables, checks and seeds.

:class:`RunConfig` is a knowledge-incorporation run (one TOML file in ``experiments/``); ReST-EM and
template search extend it with one table each (:func:`split_extension_table`, :func:`extension_json`).
Here too: the ``[data]`` table and the passages it selects (:func:`select_data`, :func:`pool_passages`) and
:func:`derived_seed`, from which every random choice of a run is drawn, so that the order of work never
changes a result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from seal_jax.lm.types import (
    ATTENTION_IMPLEMENTATIONS,
    DTYPE_NAMES,
    TRAIN_WEIGHTS,
    LoraSpec,
    MeshError,
    SamplingParams,
    TrainSpec,
    mesh_lays_out,
    parse_mesh_spec,
    remat_name,
)
from seal_jax.selfedit import grading
from seal_jax.selfedit.data import DataError, Passage, load_passages, load_seal_selfedits, select_passages
from seal_jax.selfedit.strategies import FILL_FALLBACKS, get_strategy
from seal_jax.selfedit.templates import Template
from seal_jax.targets import TargetError, get_target

# SEAL samples its self-edits: the defaults under a config's `selfedit_sampling`, which overrides them key by key
SELFEDIT_SAMPLING: dict[str, Any] = {"max_new_tokens": 256, "temperature": 1.0, "top_p": 0.95}


class RunConfigError(ValueError):
    """A run configuration that cannot be used."""


TEMPLATE_CONDITION_DEFAULTS: dict[str, Any] = {
    "archive": True, "proposal_max_new_tokens": 512, "max_retries": 2, "candidates": 1, "fill_max_new_tokens": None,
    "fill_fallback": "none", "max_epochs": None,
}

# [template_condition]: each key's type, its least value (None: no bound) and whether it may be absent (None)
_TEMPLATE_CONDITION_CHECKS: dict[str, tuple[type, int | None, bool]] = {
    "archive": (bool, None, False), "proposal_max_new_tokens": (int, 1, False), "max_retries": (int, 0, False),
    "candidates": (int, 1, False), "fill_max_new_tokens": (int, 1, True), "fill_fallback": (str, None, False),
    "max_epochs": (int, 1, True)}


# The settings a config's [hardware.<target>] table may set for that hardware (RunConfig.hardware).
HARDWARE_KEYS = ("mesh", "train_mesh", "train_weights", "remat", "passages_per_program", "attention")


# What a results row's ``reward`` measures (RunConfig.reward).
REWARDS = ("accuracy", "gold_loglik")

DATA_KEYS = frozenset({"source", "n", "start", "shuffle", "seed", "selfedits", "subset", "ids"})


_DATA_TYPES = (("source", str, "a file path, 'demo' or 'hub:NAME'"), ("n", int, "an integer"),
               ("start", int, "an integer"), ("seed", int, "an integer"), ("shuffle", bool, "true or false"),
               ("selfedits", str, "a file path"), ("subset", str, "'selfedits'"), ("ids", list, "a list of passage ids"))


def check_data_table(table: Any, where: str) -> None:
    """Check that a data table (``[data]``, ``restem.eval_data`` …) is a table of known keys (``None`` passes).

    Raises:
      RunConfigError: naming the table and the unknown keys.
    """
    if table is None:
        return
    if not isinstance(table, dict):
        raise RunConfigError(f"[{where}] must be a table, got {table!r}")
    unknown = sorted(set(table) - DATA_KEYS)
    if unknown:
        raise RunConfigError(f"unknown keys in [{where}]: {unknown}; known keys: {sorted(DATA_KEYS)}")
    for key, kinds, what in _DATA_TYPES:
        value = table.get(key)
        if value is not None and (not isinstance(value, kinds) or (kinds is int and isinstance(value, bool))):
            raise RunConfigError(f"{where}.{key} must be {what}, got {value!r}")
    if table.get("n") is not None and table["n"] < 1:
        raise RunConfigError(f"{where}.n must be at least 1 (or left out for every passage), got {table['n']}")
    if table.get("start") is not None and table["start"] < 0:
        raise RunConfigError(f"{where}.start must be >= 0, got {table['start']}")
    ids = table.get("ids")
    if ids is not None and not all(isinstance(i, str) for i in ids):
        raise RunConfigError(f"{where}.ids must be a list of passage ids (strings), got {ids!r}")
    if ids == []:
        raise RunConfigError(f"{where}.ids is empty, which selects no passage: list the passages to run, or leave "
                             "ids out to select them with n and start")


_SCALARS: dict[str, tuple[type, str]] = {"bool": (bool, "true or false"), "int": (int, "an integer"),
                                         "str": (str, "a string"), "float": ((int, float), "a number")}  # type: ignore[dict-item]


def check_field_types(cls: Any, table: dict[str, Any], prefix: str) -> None:
    """Check a table's values against the scalar types its dataclass ``cls`` declares (``bool``, ``int``,
    ``str``, ``float``, each optionally ``| None``): TOML gives a quoted ``"false"`` as a string, which every
    truth test would take as true.

    Raises:
      RunConfigError: ``prefix`` + the key, what it must be and what it got.
    """
    for field in dataclasses.fields(cls):
        if field.name not in table:
            continue
        declared = str(field.type).replace(" ", "")
        optional = declared.endswith("|None")
        kind = _SCALARS.get(declared.removesuffix("|None"))
        value = table[field.name]
        if kind is None or (optional and value is None):
            continue
        types, what = kind
        if not isinstance(value, types) or (types is not bool and isinstance(value, bool)):
            raise RunConfigError(f"{prefix}{field.name} must be {what}{' or absent' if optional else ''}, got {value!r}")


# What a run derives from its top-level seed instead of a ``seed`` in these tables (RunConfig's check).
_SEEDED = {"train": "adapter's training", "selfedit_sampling": "self-edit's sampling"}


def hardware_settings(table: dict[str, Any]) -> str:
    """A ``[hardware.<target>]`` table's settings as TOML writes them: ``mesh = "data=1,tensor=4", remat = "full"``."""
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items())


def _target(name: str, where: str) -> Any:
    """The target called ``name`` (:func:`seal_jax.targets.get_target`); an unknown one is a
    :class:`RunConfigError` naming ``where`` it was given and listing the targets."""
    try:
        return get_target(name)
    except TargetError as e:
        raise RunConfigError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A knowledge-incorporation run (one TOML file in ``experiments/``; see its README for every key).

    Attributes:
      name: run name (the default output folder is ``checkpoints/runs/NAME``).
      model: HF-format model folder (or hub id when online); ``tokenizer`` optionally another folder.
      dtype, mesh: engine settings (``mesh`` like ``"data=2,fsdp=4"``; empty for one device).
      train_mesh: another layout of the mesh's devices for LoRA training (e.g. ``"data=8"``: the base
        replicated, no collective while training), or None to train on ``mesh`` (``LM.load(train_mesh=...)``).
      train_weights: how the base weights lie on ``train_mesh``: ``"replicated"`` (default) or ``"fsdp"``
        (each layer's split over its ``data`` axis, gathered as the layer runs; ``LM.load(train_weights=...)``).
      remat: what LoRA training keeps of each layer for its backward pass (``LM.load(remat=...)``):
        ``"minimal"`` (default: the projections' outputs, the rest recomputed at little cost), ``"full"``
        (each layer's input only: least activation memory for about a third more training compute) or
        ``"none"``; ``true``/``false`` mean "full"/"none". ``seal-jax plan`` says when a model and sequence
        length need "full".
      attention: how T tokens attend to their own keys (``LM.load(attention=...)``): ``None`` (default) for
        the platform's (the fused kernel on TPUs and GPUs), or ``"chunked"`` (no kernel: for a machine whose
        JAX rejects it, as ``seal-jax bench`` reports), ``"einsum"``, ``"causal_blocks"``, ``"splash"``,
        ``"triton"``.
      hardware: settings for particular hardware: ``{target: {key: value}}``, a target being a name
        ``seal-jax compile --target`` knows (``"h100-8"``, ``"tpu-v5p-16"`` …) and the keys those of
        :data:`HARDWARE_KEYS` (``[hardware.tpu-v5p-16]`` in TOML). :meth:`on_target` applies one over the
        top-level keys: ``seal-jax run`` for the target its devices are, ``seal-jax compile --target``
        for the one it compiles for.
      chat: format prompts with the tokenizer's chat template (instruct models).
      data: ``{"source", "n", "start", "shuffle", "seed"}`` for :func:`load_passages`, ``"selfedits"``
        (SEAL's released self-edits, for ``replay``), ``"subset"`` (``"selfedits"``: SEAL's evaluation
        passages in that file's order, then ``start`` and ``n``) or ``"ids"`` (these passages, in this
        order); other keys are an error. See :func:`select_data`.
      conditions: strategy names (``base`` is always evaluated: it gives ``accuracy_before``).
      k: self-edits per passage and condition; repeats: adapters trained per self-edit.
      passages_per_program: passages that share each program (default 1): the base model answers their
        questions in one generation, each condition samples their self-edits in one batch (every passage
        with its own seeds) and all their candidates train in one program; each passage's adapters then
        answer its own questions. A passage's rows are the ones it gets alone, up to float rounding. More
        passages fill a mesh's candidate lanes (SEAL's 21 candidates leave lanes idle on a ``data`` axis
        they do not divide) and share each step's read of the base weights.
      selfedit_sampling: ``{"max_new_tokens", "temperature", "top_p", "top_k", "min_p"}``.
      include_passage: append the passage to every self-edit's training sequences.
      lora, train: :class:`~seal_jax.LoraSpec` / :class:`~seal_jax.TrainSpec` fields.
      eval_max_new_tokens: answer length; grader: a name from :data:`grading.GRADERS`, ``"judge"``
        (the loaded model judges every answer) or ``"rules+judge"`` (only what the offline rules leave
        undecided).
      reward: what a row's ``reward`` is (:data:`REWARDS`): ``accuracy`` after the update (the papers'), or
        ``gold_loglik``, the gold answers' mean log-likelihood per token after it (dense: it moves where a
        small model's accuracy stays at 0). ReST-EM selects self-edits by it.
      seed: the run's seed.
      template_condition: options of the ``template`` condition (see :data:`TEMPLATE_CONDITION_DEFAULTS`):
        ``archive`` (show the seeded archive in the meta-prompt), ``proposal_max_new_tokens``,
        ``max_retries``, ``candidates`` (proposals sampled together per attempt; the first valid one is
        used), ``fill_max_new_tokens`` (default: ``selfedit_sampling.max_new_tokens``),
        ``fill_fallback`` (``"none"`` or ``"lines"``), ``max_epochs`` (cap on the template's epochs, or
        ``None``).
    """

    name: str
    model: str
    tokenizer: str | None = None
    dtype: str = "float32"
    mesh: str | None = None
    train_mesh: str | None = None
    train_weights: str = "replicated"
    remat: str | bool = "minimal"
    attention: str | None = None
    hardware: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    chat: bool = True
    data: dict[str, Any] = dataclasses.field(default_factory=lambda: {"source": "demo"})
    conditions: tuple[str, ...] = ("base", "passage", "implications")
    k: int = 1
    repeats: int = 1
    passages_per_program: int = 1
    selfedit_sampling: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(SELFEDIT_SAMPLING))
    include_passage: bool = True
    lora: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_max_new_tokens: int = 64
    grader: str = "offline"
    reward: str = "accuracy"
    seed: int = 0
    template_condition: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        for c in self.conditions:
            get_strategy(c)
        if not self.conditions:
            raise RunConfigError("conditions is empty: name at least one strategy, e.g. conditions = [\"base\", "
                                 "\"implications\"] (\"base\" alone evaluates the model without self-edits)")
        repeated = sorted({c for c in self.conditions if self.conditions.count(c) > 1})
        if repeated:
            raise RunConfigError(f"conditions names {repeated} more than once; name each condition once")
        unknown = sorted(set(self.template_condition) - set(TEMPLATE_CONDITION_DEFAULTS))
        if unknown:
            raise RunConfigError(f"unknown keys in [template_condition]: {unknown}; known keys: "
                                 f"{sorted(TEMPLATE_CONDITION_DEFAULTS)}")
        options = self.template_options()
        if options["fill_fallback"] not in FILL_FALLBACKS:
            raise RunConfigError(f"template_condition.fill_fallback must be one of {FILL_FALLBACKS}, got "
                                 f"{options['fill_fallback']!r}")
        for key, (kind, least, optional) in _TEMPLATE_CONDITION_CHECKS.items():
            value = options[key]
            if optional and value is None:
                continue
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or (
                    least is not None and value < least):
                what = {bool: "true or false", int: "an integer", str: "a string"}[kind]
                what += f" >= {least}" if least is not None else ""
                raise RunConfigError(f"template_condition.{key} must be {what}{' or absent' if optional else ''}, "
                                     f"got {value!r}")
        if "template" in self.conditions and self.train.get("batch_size", 1) != 1:
            raise RunConfigError("the template condition trains with batch size 1 (the paper's) in the same call "
                                 "as the other conditions; set train.batch_size = 1")
        if self.reward not in REWARDS:
            raise RunConfigError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if not 0 <= self.seed < 2**32:  # (an int: _check_types) the engine's PRNG seeds are uint32
            raise RunConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        try:
            remat_name(self.remat)
        except ValueError as e:
            raise RunConfigError(str(e)) from None
        for key in ("k", "repeats", "eval_max_new_tokens", "passages_per_program"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RunConfigError(f"{key} must be a positive integer, got {value!r}")
        check_data_table(self.data, "data")
        for key, example in (("mesh", "data=2,tensor=4"), ("train_mesh", "data=8")):
            spec = getattr(self, key)
            if spec is not None and not isinstance(spec, str):
                raise RunConfigError(f"{key} must be a string like \"{example}\", got {spec!r}")
            if spec:
                try:
                    parse_mesh_spec(spec)
                except MeshError as e:
                    raise RunConfigError(f"{key}: {e}") from None
        if self.train_mesh and not self.mesh:
            raise RunConfigError(f"train_mesh = {self.train_mesh!r} is another layout of the mesh's devices; set mesh too")
        if self.train_mesh:
            devices = [math.prod(parse_mesh_spec(spec).values()) for spec in (self.mesh, self.train_mesh)]
            if min(devices) > 0 and devices[0] != devices[1]:  # (an axis of -1 fills whatever there is)
                raise RunConfigError(f"train_mesh = {self.train_mesh!r} lays out {devices[1]} devices but mesh = "
                                     f"{self.mesh!r} lays out {devices[0]}: the train mesh is another layout of the "
                                     "mesh's devices; give both the same number (e.g. both grown to every host's "
                                     "devices)")
        if self.train_weights not in TRAIN_WEIGHTS:
            raise RunConfigError(f"train_weights must be one of {list(TRAIN_WEIGHTS)}, got {self.train_weights!r}")
        if self.train_weights == "fsdp" and remat_name(self.remat) == "none":
            raise RunConfigError("train_weights = \"fsdp\" needs remat \"minimal\" or \"full\": without remat the "
                                 "backward pass keeps every layer's gathered weights")
        if self.train_weights != "replicated" and not self.train_mesh:
            raise RunConfigError(f"train_weights = {self.train_weights!r} lays the weights out on the train mesh; "
                                 "set train_mesh too (e.g. train_mesh = \"data=8\")")
        if self.dtype not in DTYPE_NAMES:
            raise RunConfigError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.attention is not None and self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise RunConfigError(f"attention must be one of {list(ATTENTION_IMPLEMENTATIONS)} (or left out for the "
                                 f"platform's), got {self.attention!r}")
        self._check_hardware()
        for table in ("train", "selfedit_sampling"):
            if isinstance(getattr(self, table), dict) and "seed" in getattr(self, table):
                raise RunConfigError(f"{table}.seed is ignored: each {_SEEDED[table]} seed derives from the run's "
                                     f"top-level seed; remove {table}.seed (the top-level seed changes them all)")
        known = sorted(f.name for f in dataclasses.fields(SamplingParams) if f.name != "seed")
        try:
            SamplingParams(**self.selfedit_sampling)
        except (TypeError, ValueError) as e:
            raise RunConfigError(f"[selfedit_sampling]: {e}; known keys: {known}") from None
        if self.grader not in grading.JUDGE_GRADERS and self.grader not in grading.GRADERS:
            raise RunConfigError(f"unknown grader {self.grader!r}; choose one of "
                                 f"{sorted(grading.GRADERS) + sorted(grading.JUDGE_GRADERS)} (the last two ask the "
                                 "run's model)")
        for table, build, spec_class in (("lora", self.lora_spec, LoraSpec), ("train", self.train_spec, TrainSpec)):
            try:
                build()
            except TypeError as e:
                known = sorted(f.name for f in dataclasses.fields(spec_class) if f.name != "seed")
                hint = f"known keys: {known}" if "unexpected keyword" in str(e) else "check the types of its values"
                raise RunConfigError(f"[{table}]: {e}; {hint}") from None
            except ValueError as e:
                raise RunConfigError(f"[{table}]: {e}") from None

    def _check_types(self) -> None:
        """Check the keys whose every use is a truth test or a path, where a value of another type would not
        fail but do something else (``chat = "false"`` is true; ``name = "../x"`` leaves the runs folder)."""
        check_field_types(RunConfig, {k: getattr(self, k) for k in ("name", "model", "tokenizer", "chat",
                                                                  "include_passage", "seed")}, "")
        for key in ("name", "model", "tokenizer"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise RunConfigError(f"{key} must be a non-empty string, got {getattr(self, key)!r}")
        if self.name in (".", "..") or any(c in self.name for c in "/\\"):
            raise RunConfigError(f"name {self.name!r} names the run's folder under checkpoints/runs/: use a plain "
                                 "name without '/' (--out chooses another folder)")
        if not isinstance(self.conditions, (tuple, list)) or not all(isinstance(c, str) for c in self.conditions):
            raise RunConfigError(f"conditions must be a list of strategy names, got {self.conditions!r}")

    def _check_hardware(self) -> None:
        """Check the ``[hardware.<target>]`` tables: known targets and keys, meshes that lay out the target's
        devices, and the settings each gives."""
        if not isinstance(self.hardware, dict) or not all(isinstance(t, dict) for t in self.hardware.values()):
            raise RunConfigError("hardware must hold one table per target, like [hardware.tpu-v5p-16] with "
                                 f"mesh = \"data=1,fsdp=2,tensor=4\", got {self.hardware!r}")
        for name, table in self.hardware.items():
            where = f"[hardware.{name}]"
            chips = _target(name, where).chips
            unknown = sorted(set(table) - set(HARDWARE_KEYS))
            if unknown:
                raise RunConfigError(f"{where}: unknown keys {unknown}; a target's table may set {list(HARDWARE_KEYS)} "
                                     "(in TOML the keys after a table's header belong to it: keep the [hardware] "
                                     "tables after the top-level keys)")
            for key in ("mesh", "train_mesh"):
                spec = table.get(key, getattr(self, key))
                if not spec:
                    continue
                if not isinstance(spec, str):
                    raise RunConfigError(f"{where}: {key} must be a string like \"data=2,tensor=4\", got {spec!r}")
                try:
                    sizes = parse_mesh_spec(spec)
                except MeshError as e:
                    raise RunConfigError(f"{where}: {key}: {e}") from None
                if not mesh_lays_out(sizes, chips):
                    origin = "its" if key in table else "the top-level"
                    empty = " (\"\" to train on the mesh)" if key == "train_mesh" else ""
                    raise RunConfigError(f"{where}: {origin} {key} {spec!r} does not lay out {name}'s {chips} devices: "
                                         f"set {key} in {where} to sizes whose product is {chips}{empty}")
            if "train_mesh" in table and not table["train_mesh"] and table.get("train_weights", self.train_weights) != "replicated":
                raise RunConfigError(f"{where}: train_mesh = \"\" trains on the mesh, where the weights are not laid "
                                     f"out FSDP-style: set train_weights = \"replicated\" in {where} too")
            try:
                dataclasses.replace(self, hardware={}, **table)
            except RunConfigError as e:
                raise RunConfigError(f"{where}: {e}") from None

    def on_target(self, name: str | None) -> RunConfig:
        """This config with the settings of its ``[hardware.<name>]`` table, if it has one, over the
        top-level ones, and without the tables: the config of a run on that hardware, as its
        ``run_config.json`` records it (``name`` None, or a target without a table: the top-level settings).
        """
        table = self.hardware.get(_target(name, "--target").name, {}) if name is not None else {}
        return dataclasses.replace(self, hardware={}, **table) if self.hardware else self

    def lora_spec(self) -> LoraSpec:
        """The run's :class:`~seal_jax.LoraSpec` (SEAL's defaults for missing fields)."""
        fields = dict(self.lora)
        if "targets" in fields and isinstance(fields["targets"], list):
            fields["targets"] = tuple(fields["targets"])
        return LoraSpec(**{**dataclasses.asdict(LoraSpec.seal()), **fields})

    def train_spec(self, seed: int = 0) -> TrainSpec:
        """The run's :class:`~seal_jax.TrainSpec` with ``seed`` (SEAL's defaults for missing fields)."""
        return TrainSpec(**{**dataclasses.asdict(TrainSpec.seal()), **self.train, "seed": seed})

    def template_options(self) -> dict[str, Any]:
        """``template_condition`` over :data:`TEMPLATE_CONDITION_DEFAULTS`."""
        return {**TEMPLATE_CONDITION_DEFAULTS, **self.template_condition}

    def template_specs(self, template: Template, seed: int, max_epochs: int | None = None
                       ) -> tuple[LoraSpec, TrainSpec]:
        """``(LoraSpec, TrainSpec)`` of one template candidate: the template's rank, alpha, dropout,
        learning rate, epochs (at most ``max_epochs``) and grad-accum, batch size 1; the run's LoRA targets
        and its other training fields (``max_len``, ``schedule``, ``loss``, …); ``seed``."""
        base = self.train_spec(seed)
        extra = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
                 if f.name not in ("learning_rate", "epochs", "batch_size", "grad_accum")}
        train = template.train_spec(**extra)
        if max_epochs is not None and train.epochs > max_epochs:
            train = dataclasses.replace(train, epochs=int(max_epochs))
        return template.lora_spec(self.lora_spec().targets), train

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> RunConfig:
        """Build from a parsed TOML/JSON table; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RunConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
        raw = dict(raw)
        if "conditions" in raw:
            if not isinstance(raw["conditions"], (list, tuple)):
                raise RunConfigError(f"{where}: conditions must be a list of strategy names, like [\"base\", "
                                     f"\"implications\"], got {raw['conditions']!r}")
            raw["conditions"] = tuple(raw["conditions"])
        try:
            return cls(**raw)
        except TypeError as e:
            raise RunConfigError(f"{where}: {e}") from None
        except ValueError as e:
            raise RunConfigError(f"{where}: {e}") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a run config TOML file."""
        return cls.from_dict(read_toml(path), where=str(path))

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict, as it reads back from ``run_config.json`` (tuples become lists), so a config
        built in Python compares equal to its saved form when a run resumes."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A run config file parsed; a missing file or bad TOML is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run config at {path}; see experiments/README.md")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RunConfigError(f"{path}: {e}") from None


def split_extension_table(raw: dict[str, Any], table_name: str, known: set[str], *, where: str, kind: str,
                          conditions_note: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """For a config that extends :class:`RunConfig` with one TOML table (ReST-EM's ``[restem]``, template
    search's ``[templates]``): the knowledge keys and that table, checked.

    Args:
      raw: the parsed TOML; table_name: the extension's table; known: the keys that table may hold.
      where: the file, for messages; kind: what the config is ("ReST-EM"); conditions_note: why such a
        config has no ``conditions`` key (completes "a {kind} config ...").
    Returns:
      ``(knowledge keys, table)``.
    Raises:
      RunConfigError: no such table, a ``conditions`` key, or unknown keys in the table.
    """
    raw = dict(raw)
    table = raw.pop(table_name, None)
    if not isinstance(table, dict):
        raise RunConfigError(f"{where}: a {kind} config needs a [{table_name}] table (see experiments/README.md)")
    if "conditions" in raw:
        raise RunConfigError(f"{where}: a {kind} config {conditions_note}")
    unknown = sorted(set(table) - known)
    if unknown:
        raise RunConfigError(f"{where}: unknown keys in [{table_name}]: {unknown}; known keys: {sorted(known)}")
    return raw, table


def extension_json(knowledge: RunConfig, extension: Any, table_name: str) -> dict[str, Any]:
    """The JSON form of a config extending ``knowledge`` (a dataclass whose other fields are its table):
    the knowledge keys without ``conditions`` plus ``{table_name: {field: value}}``."""
    out = knowledge.to_json()
    out.pop("conditions")
    table = {f.name: getattr(extension, f.name) for f in dataclasses.fields(extension) if f.name != "knowledge"}
    return json.loads(json.dumps({**out, table_name: table}))  # as run_config.json reads back (lists, not tuples)


# Knowledge keys that a run kind extending RunConfig reads nowhere, by its extension table: its loop sets
# what they would set. A value other than RunConfig's default is an error saying what sets it instead
# (:func:`check_ignored_keys`), not a setting silently ignored. ``table.key`` names a key inside a knowledge
# table. (``passages_per_program``, which [hardware] tables may set too, is ExtendedConfig.GROUPS_PASSAGES.)
_TEMPLATE_LORA = "each template sets its own LoRA rank, alpha and dropout ([lora] gives only the targets)"
_TEMPLATE_TRAIN = ("each template sets its own learning rate, epochs and grad-accum (templates.max_epochs caps the "
                   "epochs; [train] gives the other fields, such as max_len)")
IGNORED_KEYS: dict[str, dict[str, str]] = {
    "templates": {
        "k": "templates.fills sets the fills per template and passage",
        "repeats": "each (template, fill) trains one adapter",
        "lora.rank": _TEMPLATE_LORA, "lora.alpha": _TEMPLATE_LORA, "lora.dropout": _TEMPLATE_LORA,
        "train.learning_rate": _TEMPLATE_TRAIN, "train.epochs": _TEMPLATE_TRAIN, "train.grad_accum": _TEMPLATE_TRAIN,
        "selfedit_sampling.max_new_tokens": "templates.fill_max_new_tokens sets the fills' length",
        "template_condition": "the templates are the conditions: templates.proposal_max_new_tokens, max_retries, "
                              "fill_fallback and max_epochs set the search's options",
    },
    "continual": {
        "k": "each step writes one self-edit (continual.passages and continual.sequences set the steps)",
        "repeats": "each step trains and merges one adapter",
        "template_condition": "its conditions are base and continual.strategy",
    },
    "cpt": {
        "repeats": "each condition trains one adapter, on the pooled corpus",
        "include_passage": "each condition's corpus holds every passage's text once, beside its self-edits' sequences",
        "template_condition": "'template' is no CPT condition",
    },
    "restem": {
        "template_condition": "its conditions are base and restem.strategy",
    },
}

_ABSENT = object()  # a key a table lacks


def _field_default(cls: Any, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name`` (a fresh one for a ``default_factory``)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def check_ignored_keys(knowledge: RunConfig, table_name: str, kind: str, where: str) -> None:
    """Refuse the :data:`IGNORED_KEYS` of the run kind whose extension table is ``table_name`` when
    ``knowledge`` gives one a value other than :class:`RunConfig`'s default (a saved ``run_config.json``
    holds every top-level key with its default).

    Raises:
      RunConfigError: ``where``, the key, that this run kind ignores it and what sets that value instead.
    """
    for key, instead in IGNORED_KEYS.get(table_name, {}).items():
        top, _, inner = key.partition(".")
        value, default = getattr(knowledge, top), _field_default(RunConfig, top)
        if inner:
            value, default = value.get(inner, _ABSENT), default.get(inner, _ABSENT)
        if value is not _ABSENT and value != default:
            given = f"[{key}]" if isinstance(value, dict) else f"{key} = {value!r}"
            raise RunConfigError(f"{where}: {given} is ignored by a {kind} run: {instead}; remove it")


def _table_fields(cls: Any) -> list[str]:
    """The fields of an :class:`ExtendedConfig` subclass whose default is a table (``restem.sft_lora``,
    ``templates.novelty``, ``cpt.generators`` …)."""
    return [f.name for f in dataclasses.fields(cls)
            if f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), dict)]


class ExtendedConfig:
    """What every run kind that extends :class:`RunConfig` with one TOML table shares (ReST-EM's
    ``[restem]``, template search's ``[templates]``, CPT's ``[cpt]``, continual's ``[continual]``): reading
    the file (knowledge keys at the top level, the table's keys as the dataclass's other fields), the
    saved form and the name.

    A subclass is a frozen dataclass whose first field is ``knowledge: RunConfig`` and sets ``TABLE``,
    ``KIND`` (for messages), ``CONDITIONS_NOTE`` (why it has no ``conditions`` key), :meth:`conditions_of`
    (the knowledge config's conditions) and, when ``[data]`` is a pool it draws from, ``POOL_HINT`` (what to
    set instead of ``data.n``, ``ids`` or ``subset``). The knowledge keys its loop ignores are
    :data:`IGNORED_KEYS`, under its ``TABLE``.

    :meth:`from_dict` names the file in every error: a field whose default is a table (``sft_lora``,
    ``novelty`` …) must be one, and an error from building the config (its ``__post_init__``, a
    ``LoraSpec``/``TrainSpec`` of its tables) becomes a :class:`RunConfigError` naming the file and, when it
    comes from one of those tables, the table.
    """

    TABLE: ClassVar[str]
    KIND: ClassVar[str]
    CONDITIONS_NOTE: ClassVar[str]
    POOL_HINT: ClassVar[str | None] = None
    GROUPS_PASSAGES: ClassVar[bool] = False  # whether its loop honours ``passages_per_program``
    knowledge: RunConfig

    @classmethod
    def conditions_of(cls, table: dict[str, Any]) -> list[str]:
        """The knowledge config's conditions, from the extension's table."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The run's name (the default output folder is ``checkpoints/runs/NAME``)."""
        return self.knowledge.name

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> Any:
        """Build from a parsed TOML table: knowledge keys at the top level plus the extension's table."""
        known = {f.name for f in dataclasses.fields(cls)} - {"knowledge"}  # type: ignore[arg-type]
        raw, table = split_extension_table(raw, cls.TABLE, known, where=where, kind=cls.KIND,
                                           conditions_note=cls.CONDITIONS_NOTE)
        check_field_types(cls, table, f"{where}: {cls.TABLE}.")
        for name in _table_fields(cls):
            if name in table and not isinstance(table[name], dict):
                raise RunConfigError(f"{where}: {cls.TABLE}.{name} must be a table ([{cls.TABLE}.{name}] in TOML, "
                                     f"with one key = value per line), got {table[name]!r}")
        try:
            conditions = cls.conditions_of(table)
        except ValueError as e:
            raise RunConfigError(f"{where}: {e}") from None
        knowledge = RunConfig.from_dict({**raw, "conditions": conditions}, where=where)
        grouped = [knowledge.passages_per_program] + [t.get("passages_per_program", 1) for t in knowledge.hardware.values()]
        if any(p != 1 for p in grouped) and not cls.GROUPS_PASSAGES:
            raise RunConfigError(f"{where}: passages_per_program is for knowledge and ReST-EM runs; a {cls.KIND} "
                                 "run trains its own way: remove the key")
        check_ignored_keys(knowledge, cls.TABLE, cls.KIND, where)
        data = knowledge.data
        if cls.POOL_HINT and (data.get("n") is not None or data.get("subset") or "ids" in data):
            raise RunConfigError(f"{where}: [data] is the pool of passages this run draws from; {cls.POOL_HINT}")
        try:
            return cls(knowledge=knowledge, **table)
        except RunConfigError as e:  # its message names the key
            raise RunConfigError(f"{where}: {e}") from None
        except (ValueError, TypeError) as e:  # LoraError, TrainError …: from one of its tables
            raise RunConfigError(f"{where}: {cls._culprit(knowledge, table, e)}: {e}") from None

    @classmethod
    def _culprit(cls, knowledge: RunConfig, table: dict[str, Any], error: Exception) -> str:
        """Which of the table's sub-tables (:func:`_table_fields`, e.g. ``restem.sft_lora``) ``error``, raised
        by building the config, comes from: the first whose default in its place makes the error go;
        ``[TABLE]`` when none does."""
        for name in _table_fields(cls):
            if name not in table:
                continue
            try:
                cls(knowledge=knowledge, **{**table, name: _field_default(cls, name)})  # type: ignore[call-arg]
            except (ValueError, TypeError) as again:
                if type(again) is type(error) and str(again) == str(error):
                    continue
            return f"{cls.TABLE}.{name}"
        return f"[{cls.TABLE}]"

    @classmethod
    def from_toml(cls, path: str | Path) -> Any:
        """Read the run's config TOML file."""
        return cls.from_dict(read_toml(path), where=str(path))

    def on_target(self, name: str | None) -> Any:
        """This config with its knowledge config's :meth:`RunConfig.on_target`."""
        return dataclasses.replace(self, knowledge=self.knowledge.on_target(name))  # type: ignore[call-arg]

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict: the knowledge config's keys plus the extension's table (the form :meth:`from_dict`
        reads)."""
        return extension_json(self.knowledge, self, self.TABLE)


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------------
# The [data] table's passages


def select_data(d: dict[str, Any], *, where: str = "data", replay: bool = False
                ) -> tuple[list[Passage], dict[str, list[str]] | None]:
    """The passages a data table selects, and SEAL's released self-edits when they are needed.

    ``d`` holds ``source`` (default ``"demo"``) and one selection: ``ids`` (these passages, in this
    order), ``subset = "selfedits"`` (SEAL's evaluation passages, in the order of the ``selfedits`` file,
    then ``start`` and ``n``), or ``n``/``start``/``shuffle``/``seed`` (:func:`load_passages`). The
    self-edits (``{passage_id: [completion, ...]}``, matched on title and context against ``source``) are
    loaded for the subset or when ``replay`` is asked for; otherwise the second value is ``None``.
    ``where`` names the table in errors (``data``, ``restem.eval_data`` …).

    Raises:
      RunConfigError: a missing ``selfedits``, self-edits whose passages ``source`` lacks, an unknown
        subset or id, or ``ids`` together with another selection.
    """
    source = d.get("source", "demo")
    subset = d.get("subset")
    if subset not in (None, "selfedits"):
        raise RunConfigError(f"unknown {where}.subset {subset!r}; the only subset is 'selfedits'")
    if "ids" in d and (subset or any(k in d for k in ("n", "start", "shuffle", "seed"))):
        raise RunConfigError(f"{where}.ids selects the passages itself; drop subset, n, start, shuffle and seed")
    selfedits = None
    everything = load_passages(source) if (replay or subset or "ids" in d) else []
    if replay or subset:
        if not d.get("selfedits"):
            needs = [what for what, asked in (("the self-edits of condition 'replay'", replay),
                                              (f"{where}.subset = 'selfedits'", subset)) if asked]
            verb = "needs" if not replay else "need"  # the subset alone is one thing; the self-edits are several
            raise RunConfigError(f"{' and '.join(needs)} {verb} {where}.selfedits (SEAL's released self-edits, "
                                 "seal_base_selfedits_val.json)")
        try:
            selfedits = load_seal_selfedits(d["selfedits"], passages=everything)
        except DataError as e:
            raise RunConfigError(f"{e}. {where}.source ({source!r}) must hold the passages of {where}.selfedits: "
                                 "SEAL's squad_val.json for seal_base_selfedits_val.json") from None
    if subset or "ids" in d:
        wanted = list(selfedits) if subset else d["ids"]
        if not isinstance(wanted, list) or not all(isinstance(i, str) for i in wanted):
            raise RunConfigError(f"{where}.ids must be a list of passage ids (strings), got {wanted!r}")
        if len(set(wanted)) != len(wanted):
            twice = sorted({i for i in wanted if wanted.count(i) > 1})
            raise RunConfigError(f"{where}.ids names passages more than once: {twice[:5]}")
        by_id = {p.id: p for p in everything}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise RunConfigError(f"{where}: {source!r} has no passage {missing[0]!r} ({len(missing)} ids missing)")
        chosen = [by_id[i] for i in wanted]
        return (chosen[d.get("start", 0):][: d.get("n")] if subset else chosen), selfedits
    selection = {"n": d.get("n"), "start": d.get("start", 0), "shuffle": d.get("shuffle", False), "seed": d.get("seed", 0)}
    if everything:  # already read for the self-edits
        return select_passages(everything, **selection), selfedits
    return load_passages(source, **selection), selfedits


def pool_passages(d: dict[str, Any], held_out: Sequence[Passage] = ()) -> list[Passage]:
    """A training pool: ``d``'s source from ``d["start"]`` (shuffled first if asked), without the
    ``held_out`` evaluation passages, so training never sees one."""
    skip = {p.id for p in held_out}
    return [p for p in load_passages(d.get("source", "demo"), start=d.get("start", 0), shuffle=d.get("shuffle", False),
                                     seed=d.get("seed", 0)) if p.id not in skip]
