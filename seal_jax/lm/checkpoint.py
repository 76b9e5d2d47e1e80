"""Orbax save/restore of a pytree of arrays (adapters' weights, training state).

:meth:`seal_jax.lm.lora.Adapters.save` writes its weights with :func:`save_pytree` beside its specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
