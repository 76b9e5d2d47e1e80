"""Orbax save/restore of LoRA adapters (and any training-state pytree)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be read."""


def save_pytree(path: str | Path, tree: Any, step: int | None = None) -> Path:
    """Save a pytree of arrays under ``path`` with an orbax ``CheckpointManager``; returns ``path``.

    ``step`` defaults to one past the latest saved step; only the newest step is kept, so saving again
    replaces the previous contents.
    """
    path = Path(path).absolute()
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)) as mgr:
        if step is None:
            latest = mgr.latest_step()
            step = 0 if latest is None else latest + 1
        mgr.save(step, args=ocp.args.StandardSave(tree), force=True)
        mgr.wait_until_finished()
    return path


def restore_pytree(path: str | Path, like: Any | None = None) -> Any:
    """Restore the latest step saved by :func:`save_pytree`; ``like`` gives target shapes/shardings."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with ocp.CheckpointManager(path) as mgr:
        step = mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"{path} holds no orbax checkpoint step")
        args = ocp.args.StandardRestore(like) if like is not None else ocp.args.StandardRestore()
        try:
            return mgr.restore(step, args=args)
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"checkpoint {path} (step {step}) is corrupt or unreadable ({type(e).__name__}: {str(e)[:300]}); "
                "delete it and save again") from None


def save_adapters(adapters: Any, path: str | Path) -> Path:
    """Save :class:`~seal_jax.lm.lora.Adapters`: ``path/weights`` (orbax) and ``path/adapters.json``."""
    import dataclasses

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_pytree(path / "weights", adapters.weights)
    meta = {
        "specs": [dataclasses.asdict(s) for s in adapters.specs],
        "losses": adapters.losses,
        "failed": adapters.failed,
    }
    (path / "adapters.json").write_text(json.dumps(meta, indent=2))
    return path


def load_adapters(path: str | Path) -> Any:
    """Restore :class:`~seal_jax.lm.lora.Adapters` written by :func:`save_adapters`."""
    from seal_jax.lm.lora import Adapters, LoraSpec

    path = Path(path)
    meta_file = path / "adapters.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved adapter stack (no adapters.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is corrupt ({e}); delete the folder and save again") from None
    weights = restore_pytree(path / "weights")
    weights = jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x)), weights)
    specs = tuple(LoraSpec(**{**s, "targets": tuple(s["targets"])}) for s in meta["specs"])
    return Adapters(weights, specs, meta["losses"], meta["failed"])
