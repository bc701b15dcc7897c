"""One thread model for the process: how many threads moei2's C kernels use, and what the other
thread pools in the process do while they run.

The C kernels run on their own short-lived pool (csrc/parallel.c) with OpenBLAS pinned to one
thread inside it, so moei2 itself never runs more threads than ``num_threads()``. This module
must not import torch: moei2.search works without it.
"""
from __future__ import annotations

import contextlib
import os


def num_threads() -> int:
    """Threads for the C kernels: the CPUs this process may run on (its affinity mask), at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


@contextlib.contextmanager
def kernel_section():
    """Wraps a run of C kernel calls."""
    yield
