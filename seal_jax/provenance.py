"""What code produced a benchmark's figures: written into ``seal-jax bench``'s JSON reports (``"code"``).

An A/B of two commits runs one of them from another tree (``PYTHONPATH`` on a worktree); a report that names
the tree its ``seal_jax`` came from and that tree's commit says which side it measured. (``python -m`` run
from inside a checkout imports that checkout whatever ``PYTHONPATH`` says: the current directory comes first.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import seal_jax


def code() -> dict[str, Any]:
    """``{"seal_jax": version, "source": the folder it was imported from, "commit": the git commit of that
    folder (a ``+`` where ``seal_jax/`` has changes not committed, a ``?`` where git could not tell), or None
    outside a git checkout}``."""
    source = Path(seal_jax.__file__).resolve().parent.parent
    return {"seal_jax": seal_jax.__version__, "source": str(source), "commit": _commit(source)}


def _commit(folder: Path) -> str | None:
    def git(*args: str) -> str | None:
        # no optional locks: a status beside a running commit must not take the index lock; safe.directory:
        # a checkout owned by another user (a container's) is still read
        argv = ["git", "--no-optional-locks", "-c", f"safe.directory={folder}", "-C", str(folder), *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != folder.resolve():  # a checkout of seal-jax itself, not a tree above
        return None
    head = git("rev-parse", "--short=12", "HEAD")
    if head is None:
        return None
    dirty = git("status", "--porcelain", "--", "seal_jax")  # untracked modules count: an A/B imports them
    return head + ("?" if dirty is None else "+" if dirty else "")
