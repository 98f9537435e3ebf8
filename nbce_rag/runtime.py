"""Process-level settings for CPU inference.

:func:`keep_freed_memory`: on Linux with glibc, large allocations (a KV-cache layer, a decode
lane's buffers) are served by ``mmap`` and handed back to the kernel when freed, so the next one
is fresh memory that page-faults on first touch, page by page. On the 2-core CPU this was what a
big copy cost: merging 16 requests' caches into one decode lane (~170 MB) took 1.3 s, 0.05 s once
freed memory was kept and reused (cProfile of ``RAGPipeline.batch``, see the README's server
section). It is what PyTorch's CPU performance guide gets from jemalloc/tcmalloc, done with
glibc's own ``mallopt``. The CLI (``nbce-rag ask``, ``serve``, ...) calls it at start; an
application embedding the library can call it once (it only changes how this process's malloc
recycles memory; resident memory then stays at its peak instead of shrinking).
``NBCE_RAG_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: allocations up to this size come from the heap (glibc's maximum on 64-bit)
MMAP_THRESHOLD = 32 * 2**20
#: free memory kept at the top of the heap before it is returned to the kernel
TRIM_THRESHOLD = 2**31 - 1  # (a C int)
TOP_PAD = 256 * 2**20

_done = None


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory (see the module docstring). Returns whether it
    applied (False: not Linux/glibc, turned off by the environment, or refused)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("NBCE_RAG_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                            (_M_TOP_PAD, TOP_PAD)))
    _done = ok
    logger.debug("glibc malloc keeps freed memory: %s", ok)
    return ok


def env_setting(name: str, parse: Callable[[str], T]) -> Optional[T]:
    """The value of environment variable ``name`` read by ``parse``; ``None`` when unset or
    blank. A value ``parse`` rejects (``ValueError``) is a :class:`~nbce_rag.errors.ConfigError`
    that names the variable, so the user knows which setting to fix."""
    from nbce_rag.errors import ConfigError

    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return parse(raw)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={raw!r}: {e}; fix or unset it") from None
