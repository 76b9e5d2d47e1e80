"""Host memory: hand the pages malloc holds freed back to the system.

XLA's compiler and the CPU runtime allocate and free hundreds of MB of small blocks through
glibc's malloc, which keeps freed blocks in its heaps instead of returning them to the system: on the demo
(bundled 135M model, 2 CPU cores) ~0.5 GB of freed compiler scratch and program temporaries was still
resident when a LoRA training program (2.8 GB of temporaries) started, and its compile added ~0.5 GB more.
``malloc_trim`` hands the free pages back before every training call (the largest program of a run), from
the calling thread between programs. (Calling it from a listener after every XLA compile, too, saved
another ~0.5 GB on the demo but coincided with a segfault inside an XLA CPU compile in the test suite, so
it is not done.) It changes no program and no result; without glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

_malloc_trim: Any = None  # libc's malloc_trim, or False where there is none; looked up on first use


def release() -> None:
    """Return the host memory that malloc holds freed (glibc's ``malloc_trim(0)``; a no-op without glibc)."""
    global _malloc_trim
    if _malloc_trim is None:
        name = ctypes.util.find_library("c")
        try:
            _malloc_trim = getattr(ctypes.CDLL(name), "malloc_trim", False) if name else False
        except OSError:
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
