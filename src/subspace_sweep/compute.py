"""The thread policy of the heavy linear algebra (candidate building, target spectra).

At Qwen3-0.6B shapes the cost is ~21 dense eigenproblems per layer plus large Gram GEMMs. GEMMs
gain from every torch thread; LAPACK's tridiagonal reduction does not (thousands of BLAS-2 calls
that each wait for a descheduled thread), so eigenproblems run as independent single-threaded
calls on a pool of the same size (``run_jobs``; ``linalg.top_eigh`` releases the GIL) and every
small op runs single-threaded. Results never depend on the pool: each job is deterministic.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from . import linalg

T = TypeVar("T")
K = TypeVar("K")


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


# The active policy (at most one per process): the caller's torch thread count for the GEMMs
# and the eigen pool (None: run jobs serially). A nested ``policy()`` keeps the outer one.
_ACTIVE: list[tuple[int, ThreadPoolExecutor | None]] = []


@contextlib.contextmanager
def policy() -> Iterator[None]:
    """Thread policy of a build or a scoring pass: one torch thread and one LAPACK thread per
    task, except inside ``gemm_threads()``.

    On a 2-core machine shared with any other process, every small multi-threaded torch op
    waits at its barrier for a descheduled thread (measured: k-means on 48 points took 0.5 s
    instead of 10 ms). Only the large Gram GEMMs gain from threads; they run in ``gemm_threads()``
    with the caller's thread count. The eigenproblems (most of the time of a build) run as
    independent single-threaded LAPACK calls on a pool of the same size (``run_jobs``).
    """
    if _ACTIVE:  # nested (e.g. the B-side inside a sweep's scoring pass): the outer policy stands
        yield
        return
    full = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=full, thread_name_prefix="eig") if full > 1 and linalg.gil_free_syevr() else None
    _ACTIVE.append((full, pool))
    torch.set_num_threads(1)
    try:
        with single_thread_lapack():
            yield
    finally:
        _ACTIVE.pop()
        if pool is not None:
            pool.shutdown(wait=True)
        torch.set_num_threads(full)


def run_jobs(jobs: Mapping[K, Callable[[], T]]) -> dict[K, T]:
    """Run independent computations (eigenproblems), on the eigen pool when there is one.

    Each job is deterministic and independent of the others, so the results do not depend on
    the pool (tests pin that against a serial build).
    """
    pool = _ACTIVE[-1][1] if _ACTIVE else None
    if pool is None:
        return {name: job() for name, job in jobs.items()}
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    return {name: fut.result() for name, fut in futures.items()}


@contextlib.contextmanager
def gemm_threads() -> Iterator[None]:
    """Inside ``policy``: run the block on the caller's torch thread count (outside: a no-op)."""
    prev = torch.get_num_threads()
    want = _ACTIVE[-1][0] if _ACTIVE else prev
    if want == prev:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


#: glibc's mallopt parameters (malloc.h): M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1.
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
#: glibc's default trim threshold (DEFAULT_TRIM_THRESHOLD): free memory at the heap's top beyond
#: this goes back to the OS at once. A fixed mmap threshold freezes it there.
DEFAULT_TRIM_THRESHOLD_BYTES = 128 << 10
#: Allocations at least this large get their own mapping, returned to the OS when freed.
MMAP_THRESHOLD_BYTES = 1 << 20
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): inside a forward pass
#: every activation temporary up to this size is served from the heap.
FORWARD_MMAP_THRESHOLD_BYTES = 32 << 20
# The fixed threshold return_freed_memory set (None: this process's allocator is left alone), and
# how many forward_pass_memory blocks are open.
_MANAGED: list[int] = []
_FORWARD_DEPTH = [0]


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(param, int(value)))


def _mallopt_threshold(threshold: int) -> bool:
    return _mallopt(_M_MMAP_THRESHOLD, threshold)


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc serve every allocation of at least ``threshold`` bytes from its own mapping,
    so that freeing a tensor gives its memory back to the OS at once (process-wide; True when set).

    glibc's default threshold adapts upwards to 32 MiB after the first large free, so the sweep's
    many 1-32 MiB temporaries (one layer's activations, d x d Grams) were served from the heap and
    their freed memory stayed in the process: measured 0.3 GiB of RSS kept after the Qwen3-0.6B
    captures, half of their peak. A fixed threshold costs a page fault per fresh page of those
    allocations, which forward passes cannot afford (``forward_pass_memory``). Called by the command
    line and the benchmark; a no-op returning False where the C library has no ``mallopt`` (macOS, musl).
    """
    if not _mallopt_threshold(threshold):
        return False
    _MANAGED[:] = [int(threshold)]
    return True


@contextlib.contextmanager
def forward_pass_memory() -> Iterator[None]:
    """Forward and backward passes (captures, the causal check's steered passes, LoRA training)
    allocate and free many 1-32 MiB activation temporaries in quick succession. With
    ``return_freed_memory``'s fixed threshold each gets a fresh mapping, every page of it faulted in
    and zeroed: measured on 2 cores, a SmolLM2-135M pass over 16 chat prompts 1.0 -> 1.6 s, and the
    Qwen3-0.6B benchmark's captures 14 -> 33 s (issue 25). Inside the block glibc's heap serves
    them (a freed temporary's pages are reused by the next one, faulted once); leaving the
    outermost block restores the fixed threshold and ``malloc_trim(0)`` gives what the heap holds
    free back to the OS. A no-op where ``return_freed_memory`` was not called (the allocator is
    then the caller's) or there is no glibc."""
    outer = _FORWARD_DEPTH[0] == 0 and bool(_MANAGED)
    if outer:
        _mallopt_threshold(FORWARD_MMAP_THRESHOLD_BYTES)
        _mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # nor is the heap's top given back between two temporaries
    _FORWARD_DEPTH[0] += 1
    try:
        yield
    finally:
        _FORWARD_DEPTH[0] -= 1
        if outer:
            _mallopt_threshold(_MANAGED[0])
            _mallopt(_M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD_BYTES)
            libc = _libc()
            trim = getattr(libc, "malloc_trim", None) if libc is not None else None
            if trim is not None:
                trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
                trim(0)
