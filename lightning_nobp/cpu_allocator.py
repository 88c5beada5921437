"""Keep freed CPU memory in the process, so that large tensors are not page-faulted in again at every step.

A population's forward allocates and frees the same large activation tensors at every step (for an MLP of width
256, 64 members and a batch of 256: 16 MiB each). glibc's ``malloc`` serves blocks of that size with ``mmap`` or
returns them to the kernel on ``free`` (``M_TRIM_THRESHOLD``), so the next step page-faults every 4 KiB page
again and the kernel zeroes it, which slows elementwise passes down markedly (``benchmarks/micro/cpu_allocator.py``
measures it; figures in ``docs/results.md``). Raising the mmap and trim thresholds keeps those pages in the
heap for reuse, as jemalloc and tcmalloc do by default. Only glibc is tuned; elsewhere nothing changes.

The tuning is process-wide, so the strategies apply it only when asked (``cpu_tuning=CpuTuning()``) and undo it when
training ends (:func:`restore_cpu_memory_defaults`: glibc's default thresholds back, the retained memory returned).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

#: ``mallopt`` parameters of glibc's ``malloc.h``
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

#: blocks below this come from the heap (and are reused) instead of fresh ``mmap`` pages
MMAP_THRESHOLD_BYTES = 128 * 1024 * 1024
#: freed memory at the top of the heap kept by the process before any is returned to the kernel
RETAINED_BYTES = 512 * 1024 * 1024
#: extra memory requested from the kernel each time the heap grows
TOP_PAD_BYTES = 32 * 1024 * 1024

#: glibc's defaults of the three settings (the mmap threshold's dynamic adjustment stays off once set)
GLIBC_DEFAULT_BYTES = 128 * 1024

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_cpu_memory(
    mmap_threshold: int = MMAP_THRESHOLD_BYTES,
    retained: int = RETAINED_BYTES,
    top_pad: int = TOP_PAD_BYTES,
) -> bool:
    """Tune glibc's ``malloc`` (process-wide, once) to reuse freed blocks instead of returning them to the kernel.

    The resident memory then stays near the peak of a step instead of falling between steps; the peak itself does
    not grow.

    Args:
        mmap_threshold: allocations of at least this many bytes still use ``mmap`` (and are returned on free).
        retained: bytes of free memory at the top of the heap kept before trimming.
        top_pad: bytes added to every growth of the heap.

    Returns:
        Whether the settings are in effect (``False`` on other C libraries, where nothing is changed).
    """
    global _applied
    if _applied is not None:
        return _applied
    libc = _glibc()
    if libc is None:
        _applied = False
        return False
    settings = ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, retained), (_M_TOP_PAD, top_pad))
    _applied = all(libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1 for option, value in settings)
    if _applied:
        log.debug("glibc malloc keeps up to %d MiB of freed memory for reuse", retained >> 20)
    return _applied


def restore_cpu_memory_defaults() -> bool:
    """Undo :func:`keep_freed_cpu_memory`: glibc's default thresholds (128 KiB) back, the freed memory the process
    kept returned to the kernel (``malloc_trim``). A no-op where nothing was tuned.

    Returns:
        Whether the defaults were set back.
    """
    global _applied
    libc = _glibc()
    if not _applied or libc is None:
        return False
    options = (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _M_TOP_PAD)
    restored = all(libc.mallopt(ctypes.c_int(option), ctypes.c_int(GLIBC_DEFAULT_BYTES)) == 1 for option in options)
    libc.malloc_trim(ctypes.c_size_t(0))
    _applied = None  # the next keep_freed_cpu_memory() applies the tuning again
    return restored
