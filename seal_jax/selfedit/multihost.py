"""Run folders in multi-host runs: one process writes, every process agrees on what the folder holds.

Every process of a multi-host run (``jax.distributed``, see ``seal-jax run``) executes the same program and
computes the same rows. Only process 0 writes the run folder, so a folder on a shared file system gets
each row once; and whatever is read back from the folder to decide what to compute next (which passages
are finished, a saved template) is read by process 0 and broadcast, so every process runs the same
compiled programs even when the folder lives on process 0's local disk only. With one process these are
plain reads and writes.

This module does not import jax: a process that has not imported it cannot have joined a distributed
run (``jax.distributed.initialize`` comes first), so it is the only process. Reading a run folder, as
``seal-jax report`` does, therefore never starts jax.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm.auto import tqdm

T = TypeVar("T")


def process_index() -> int:
    """This process's index in a distributed run (0 when jax was never imported: one process)."""
    jax = sys.modules.get("jax")
    return 0 if jax is None else int(jax.process_index())


def process_count() -> int:
    """The processes of the run (1 when jax was never imported)."""
    jax = sys.modules.get("jax")
    return 1 if jax is None else int(jax.process_count())


def is_writer() -> bool:
    """True on the process that writes run folders (process 0; the only process of a one-host run)."""
    return process_index() == 0


def say(message: str) -> None:
    """One progress line on stderr, written by process 0 only (through tqdm, so it never tears a bar)."""
    if is_writer():
        tqdm.write(message, file=sys.stderr)


def require_visible(path: str | Path, what: str) -> None:
    """Raise on every process unless ``path`` exists on every process.

    A folder that process 0 wrote (an exported generator) and every process then loads must live on a file
    system all hosts share. Called by every process before such a load, so that a folder on process 0's
    local disk is one clear error everywhere instead of a missing file on some processes (and the others
    waiting for them). ``what`` names the folder in the message.
    """
    here = Path(path).exists()
    if process_count() == 1:
        seen = [here]
    else:
        from jax.experimental import (
            multihost_utils,  # deferred: only a multi-process run (jax loaded) needs it
        )

        seen = np.asarray(multihost_utils.process_allgather(np.array([here]))).reshape(-1).tolist()
    missing = [i for i, ok in enumerate(seen) if not ok]
    if missing:
        raise FileNotFoundError(
            f"{what} {path} is missing on process(es) {missing}; every process loads it, so a multi-host run "
            "needs its run folder (--out) on a file system all hosts share")


def agree(read: Callable[[], T]) -> T:
    """Process 0's ``read()``, on every process.

    ``read`` is called on process 0 only. Its result must be JSON-able: every process (process 0 and a
    one-process run included, so that all see the same types) gets it back through JSON, so tuples come
    back as lists. An exception raised by ``read``, or a result that is not JSON-able, is raised on every
    process: the original on process 0, a ``RuntimeError`` naming it elsewhere.
    """
    if process_count() == 1:
        return json.loads(json.dumps(read()))
    from jax.experimental import multihost_utils  # deferred: only a multi-process run (jax loaded) needs it

    error: BaseException | None = None
    payload = np.zeros(0, np.uint8)
    if is_writer():
        try:
            text = json.dumps({"value": read()})
        except Exception as e:  # raised everywhere below, after the broadcast
            error, text = e, json.dumps({"error": f"{type(e).__name__}: {e}"})
        payload = np.frombuffer(text.encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(payload.size)))
    buffer = np.zeros(size, np.uint8)
    if is_writer():
        buffer[:] = payload
    message = json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode())
    if error is not None:
        raise error
    if "error" in message:
        raise RuntimeError(f"process 0 failed reading the run folder: {message['error']}")
    return message["value"]
