"""The code a benchmark report names (seal_jax.provenance): this checkout, its commit, and a mark for edits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import seal_jax
from seal_jax import provenance

REPO = Path(__file__).resolve().parents[1]


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_report_names_this_checkout():
    if not (REPO / ".git").exists():  # an unpacked copy (a device machine's): no commit to name
        assert provenance.code()["commit"] is None
        pytest.skip("not a git checkout: the commit is checked in one")
    got = provenance.code()
    assert got["seal_jax"] == seal_jax.__version__ and Path(got["source"]) == REPO
    assert got["commit"] is not None and got["commit"].rstrip("+") == git(REPO, "rev-parse", "--short=12", "HEAD")


def test_a_commit_with_edits_is_marked_and_a_folder_outside_git_has_none(tmp_path):
    assert provenance._commit(tmp_path) is None
    (tmp_path / "seal_jax").mkdir()
    (tmp_path / "seal_jax" / "x.py").write_text("a = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-qm", "x")
    head = git(tmp_path, "rev-parse", "--short=12", "HEAD")
    assert provenance._commit(tmp_path) == head
    (tmp_path / "seal_jax" / "y.py").write_text("b = 1\n")  # a new module, not yet added, is an edit too
    assert provenance._commit(tmp_path) == head + "+"
    (tmp_path / "seal_jax" / "y.py").unlink()
    (tmp_path / "seal_jax" / "x.py").write_text("a = 2\n")
    assert provenance._commit(tmp_path) == head + "+"
    assert provenance._commit(tmp_path / "seal_jax") is None  # a folder inside a checkout is not one
