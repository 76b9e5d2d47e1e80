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
    folder (a ``+`` where the tree has uncommitted changes), or None outside a git checkout}``."""
    source = Path(seal_jax.__file__).resolve().parent.parent
    return {"seal_jax": seal_jax.__version__, "source": str(source), "commit": _commit(source)}


def _commit(folder: Path) -> str | None:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != folder.resolve():  # a checkout of seal-jax itself, not a tree above
        return None
    head = git("rev-parse", "--short=12", "HEAD")
    if head is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "seal_jax")
    return head + ("+" if dirty else "")
