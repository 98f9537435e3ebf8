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


# ------------------------------------------------------------------ the CPU's compute dtype
#: ``fp32`` / ``bf16`` / ``auto`` (default): what ``dtype="auto"`` means on a CPU, for the LM and
#: the encoder alike (an explicit ``dtype=`` / ``--dtype`` still wins)
CPU_DTYPE_ENV = "NBCE_RAG_CPU_DTYPE"
#: CPU features that run bf16 matrix products in hardware (Intel since Cooper Lake / Sapphire
#: Rapids, AMD since Zen 4). Without one, bf16 is emulated and slower than fp32.
BF16_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}
_CPU_DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "auto": "auto"}
_logged_choices: set = set()


def cpu_features() -> frozenset:
    """The CPU features that matter for the dtype choice, as lower-case ``/proc/cpuinfo`` flag
    names: what torch's own dispatcher reports (``torch.cpu._is_amx_tile_supported`` and co.;
    the oneDNN ISA check), united with the kernel's flags where readable (Linux)."""
    found = set()
    try:
        import torch

        probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
        for flag, fn in probes.items():
            probe = getattr(torch.cpu, fn, None)
            if probe is not None and probe():
                found.add(flag)
    except Exception:  # noqa: BLE001 - an old torch without the probes: fall back to cpuinfo
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    found.update(f for f in line.split(":", 1)[1].split() if f in BF16_FEATURES)
                    break
    except OSError:
        pass
    return frozenset(found)


def bf16_units(features) -> list:
    """The bf16 hardware among ``features`` (pure: for tests), e.g. ``["AMX-BF16", "AVX512-BF16"]``."""
    return [name for flag, name in BF16_FEATURES.items() if flag in set(features)]


def cpu_auto_dtype(features=None, env=None) -> "tuple[str, str]":
    """``(dtype name, why)`` for ``dtype="auto"`` on a CPU: ``$NBCE_RAG_CPU_DTYPE`` when set to
    fp32/bf16, else ``bfloat16`` when the CPU has bf16 units (:data:`BF16_FEATURES`), else
    ``float32``. ``features`` / ``env`` replace the detection and the environment (tests)."""
    from nbce_rag.errors import ConfigError

    raw = (os.environ if env is None else env).get(CPU_DTYPE_ENV, "auto").strip().lower() or "auto"
    if raw not in _CPU_DTYPE_NAMES:
        raise ConfigError(f"{CPU_DTYPE_ENV}={raw!r} is not a CPU dtype; use fp32, bf16 or auto (or unset it)")
    if _CPU_DTYPE_NAMES[raw] != "auto":
        return _CPU_DTYPE_NAMES[raw], f"{CPU_DTYPE_ENV}={raw}"
    units = bf16_units(cpu_features() if features is None else features)
    if units:
        return "bfloat16", f"the CPU has {' and '.join(units)}"
    return "float32", "the CPU has no bf16 units (AMX-BF16 / AVX512-BF16), where bf16 is slower than fp32"


def log_dtype_choice(what: str, dtype_name: str, why: str) -> None:
    """One INFO line per process and choice: which dtype ``auto`` gave on the CPU, and why."""
    key = (what, dtype_name, why)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("%s runs in %s on the CPU: %s (dtype= / --dtype or %s=fp32|bf16 override)",
                    what, dtype_name, why, CPU_DTYPE_ENV)
