"""The process's memory allocator, as ``gconv`` sets it (docs/performance.md, "Memory")."""
from __future__ import annotations


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of returning it to the system
    (``mallopt``: no ``mmap`` allocations, no heap trimming), and NumPy stop advising huge pages
    for it; True where that took effect.

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
    kept = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    if kept:
        _no_numpy_huge_page_advice()
    return kept


def _no_numpy_huge_page_advice() -> None:
    """Stop NumPy advising huge pages for its large arrays (``madvise(MADV_HUGEPAGE)``).

    On memory the heap keeps, that advice makes the kernel compact memory at the first touch
    where transparent huge pages are on ``madvise`` (the usual default), several times the cost
    of ordinary page faults (docs/performance.md, "Memory").
    """
    try:
        from numpy._core import multiarray
    except ImportError:                                    # NumPy < 2
        from numpy.core import multiarray
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)
