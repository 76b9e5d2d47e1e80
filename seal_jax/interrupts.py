"""Ctrl-C on the command line: the first press stops a command at its next Python step, a second press ends
the process at once.

Python runs a signal's handler only when the main thread is back in Python bytecode. During a long XLA call
(a compile, a training step of an 8B model) a press therefore waits for the call to end, and JAX's
garbage-collection callback can swallow the ``KeyboardInterrupt`` altogether, so that a run goes on as if
nothing was pressed. The C-level handler, though, writes each signal's number to the wakeup file
descriptor the moment it arrives (:func:`signal.set_wakeup_fd`): :class:`SecondPressQuits` reads it on a
thread of its own, and on the second press says what it does and exits while the main thread waits in
XLA (compiles and executions release the GIL; a C call that holds it, such as a large host copy, delays the
exit until it returns). An asyncio loop that sets signal handlers inside the context takes the wakeup
descriptor over, and the second press then goes unseen; seal-jax runs none.
The run folders survive that: results are appended a passage at a time and every state file is replaced
whole, so a resume takes up at the last finished passage.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import TracebackType

INTERRUPTED = 128 + int(signal.SIGINT)  # the shell's exit status after Ctrl-C


class SecondPressQuits:
    """A context in which a second Ctrl-C (SIGINT) ends the process with :data:`INTERRUPTED` after writing
    ``message()`` to stderr; the first still raises ``KeyboardInterrupt`` in the main thread as usual.

    Outside the main thread (where no wakeup descriptor can be set) it does nothing.
    """

    def __init__(self, message: Callable[[], str], presses: int = 2) -> None:
        self.message = message
        self.presses = presses
        self._write_fd: int | None = None
        self._previous = -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SecondPressQuits:
        if threading.current_thread() is not threading.main_thread():
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # (set_wakeup_fd's requirement: a signal never blocks on it)
        try:
            self._previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main interpreter's main thread after all
            os.close(read_fd)
            os.close(write_fd)
            return self
        self._write_fd = write_fd
        self._thread = threading.Thread(target=self._watch, args=(read_fd,), name="seal-jax-ctrl-c", daemon=True)
        self._thread.start()
        return self

    def _watch(self, read_fd: int) -> None:
        presses = 0
        try:
            while data := os.read(read_fd, 64):  # (b"" once __exit__ closes the other end)
                presses += data.count(int(signal.SIGINT))
                if presses >= self.presses:
                    try:
                        sys.stderr.write(self.message() + "\n")
                        sys.stderr.flush()
                    finally:
                        os._exit(INTERRUPTED)
        finally:
            os.close(read_fd)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._write_fd is None:
            return
        signal.set_wakeup_fd(self._previous)
        os.close(self._write_fd)
        self._write_fd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
