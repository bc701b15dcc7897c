"""One thread model for the process: how many threads moei2's C kernels use.

Every C kernel runs on threads moei2 starts for it (csrc/parallel.c: one ``par_for``, a spawner
whose threads exist only while a kernel runs) with OpenBLAS pinned to one thread inside it (a
counted pin, so overlapping calls from several Python threads restore the caller's BLAS thread
count). So a
kernel never runs more than ``num_threads()`` threads, and nothing of moei2 keeps spinning after
it returns.

What slowed the cache construction after torch work was pools spinning against each other: the
old NumPy path of ``Layer.from_moe`` made hundreds of small multi-threaded GEMM calls into
NumPy's OpenBLAS, whose idle workers busy-wait between calls, interleaved with moei2's own
OpenBLAS calls and with torch's OpenMP workers, which also spin after each parallel region. With
the candidate outputs and the factors computed in C on moei2's own threads, ``from_moe`` enters
no pool; torch's and NumPy's workers only spin out their own short wait (milliseconds) at the start.
benchmarks/bench_search.py measures ``from_moe`` fresh and after torch work.

This module must not import torch: moei2.search works without it.
"""
from __future__ import annotations

import os


def num_threads() -> int:
    """Threads for the C kernels: the CPUs this process may run on (its affinity mask), at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))
