"""The thread policy of the heavy linear algebra (candidate building, target spectra).

On a 2-core machine the cost is ~20 dense eigenproblems per layer plus large Gram GEMMs. GEMMs
gain from every torch thread; LAPACK's tridiagonal reduction does not (thousands of BLAS-2 calls
that each wait for a descheduled thread), so eigenproblems run as independent single-threaded
calls on a pool of the same size (``run_jobs``; ``linalg.top_eigh`` releases the GIL) and every
small op runs single-threaded. Results never depend on the pool: each job is deterministic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from . import linalg

T = TypeVar("T")


@contextlib.contextmanager
def single_thread_lapack() -> Iterator[None]:
    """Run SciPy's OpenBLAS single-threaded inside the block (restored afterwards).

    Measured on 2 cores: ``scipy.linalg.eigh`` (syevr) on a 1024 x 1024 matrix takes 0.05 s
    single-threaded but 0.7-5 s when OpenBLAS's two threads compete with torch's OpenMP
    threads or any other process: the tridiagonal reduction's thousands of BLAS-2 calls each
    wait for a descheduled thread. torch still uses every core for the Gram GEMMs.
    If the BLAS is not SciPy's bundled OpenBLAS this is a no-op.
    """
    lib = linalg.scipy_openblas()
    if lib is None:
        yield
        return
    prev = int(lib.scipy_openblas_get_num_threads())
    if prev <= 1:
        yield
        return
    lib.scipy_openblas_set_num_threads(1)
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads(prev)


# The policy lives in module state (two stacks): one policy at a time per process (nesting is fine).
#: torch threads for the big GEMMs inside ``policy`` (a stack: the policy may nest).
_GEMM_THREADS: list[int] = []
#: The thread pool that runs eigenproblems inside ``policy`` (None: run them serially).
_EIG_POOL: list[ThreadPoolExecutor | None] = []


@contextlib.contextmanager
def policy() -> Iterator[None]:
    """Thread policy of a build or a scoring pass: one torch thread and one LAPACK thread per task, except inside ``gemm_threads()``.

    On a 2-core machine shared with any other process, every small multi-threaded torch op
    waits at its barrier for a descheduled thread (measured: k-means on 48 points took 0.5 s
    instead of 10 ms). Only the large Gram GEMMs gain from threads; they run in ``gemm_threads()``
    with the caller's thread count. The eigenproblems (most of the time of a build) run as
    independent single-threaded LAPACK calls on a pool of the same size (``run_jobs``).
    """
    full = torch.get_num_threads()
    _GEMM_THREADS.append(full)
    pool = ThreadPoolExecutor(max_workers=full, thread_name_prefix="eig") if full > 1 and linalg.gil_free_syevr() else None
    _EIG_POOL.append(pool)
    torch.set_num_threads(1)
    try:
        with single_thread_lapack():
            yield
    finally:
        _EIG_POOL.pop()
        if pool is not None:
            pool.shutdown(wait=True)
        _GEMM_THREADS.pop()
        torch.set_num_threads(full)


def run_jobs(jobs: Mapping[str, Callable[[], T]]) -> dict[str, T]:
    """Run independent computations (eigenproblems), on the eigen pool when there is one.

    Each job is deterministic and independent of the others, so the results do not depend on
    the pool (tests pin that against a serial build).
    """
    pool = _EIG_POOL[-1] if _EIG_POOL else None
    if pool is None:
        return {name: job() for name, job in jobs.items()}
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    return {name: fut.result() for name, fut in futures.items()}


@contextlib.contextmanager
def gemm_threads() -> Iterator[None]:
    """Inside ``policy``: run the block on the caller's torch thread count."""
    prev = torch.get_num_threads()
    want = _GEMM_THREADS[-1] if _GEMM_THREADS else prev
    if want == prev:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
