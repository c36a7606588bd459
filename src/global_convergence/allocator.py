"""The process's memory allocator, as ``gconv`` sets it (docs/performance.md, "Memory")."""
from __future__ import annotations


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of returning it to the system
    (``mallopt``: no ``mmap`` allocations, no heap trimming); True where that took effect.

    Tensors over 32 MB (a LeNet m_c = 4 activation at n = 1000, a 4000 × 4000 Gram matrix) are
    otherwise mapped and unmapped at every use, and the page faults of touching them again cost a
    fifth of the CPU time of a LeNet step (docs/reproduction.md) and a third of a ResNet-18 feature
    pass (docs/performance.md). It changes the allocator of the whole process, so ``gconv`` runs it
    when it starts (and each worker of :func:`global_convergence.experiments.subruns.run_jobs`);
    a library call never does. Not glibc: nothing happens.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    m_mmap_max, m_trim_threshold = -4, -1                  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
