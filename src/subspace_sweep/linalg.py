"""Linear algebra on orthonormal bases of the residual stream.

Conventions (one way to do each thing):
- A *basis* is a ``d x r`` float64 CPU tensor with orthonormal columns; ``r`` may be 0.
- Singular bases are computed through the ``d x d`` Gram in float64 (``eigh``), never
  by an SVD of a ``d x n`` matrix with ``n`` in the hundreds of thousands.
- Eigenvector signs are fixed (largest-magnitude entry positive) so that bases are
  reproducible bit for bit across runs and independent of LAPACK's sign choice.
- Directions with (relative) eigenvalue below ``RANK_TOL`` are numerically absent:
  functions return fewer than ``r`` columns instead of arbitrary directions, and the
  caller reads the effective rank off ``basis.shape[1]``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

DTYPE = torch.float64
#: Relative eigenvalue (squared singular value) below which a direction is treated as absent.
RANK_TOL = 1e-10
#: Relative residual norm below which a column is linearly dependent on earlier ones.
ORTHO_TOL = 1e-6


def as64(x: Tensor) -> Tensor:
    return x.detach().to(device="cpu", dtype=DTYPE)


def empty_basis(d: int) -> Tensor:
    return torch.zeros(d, 0, dtype=DTYPE)


def fix_signs(B: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive (first on ties)."""
    if B.shape[1] == 0:
        return B
    idx = B.abs().argmax(dim=0)
    signs = torch.sign(B[idx, torch.arange(B.shape[1])])
    signs[signs == 0] = 1
    return B * signs


def orthonormalize(M: Tensor, tol: float = ORTHO_TOL) -> Tensor:
    """Order-preserving, rank-revealing orthonormalisation (Gram-Schmidt, twice).

    Column j is kept iff its component orthogonal to the kept earlier columns has norm
    above ``tol`` times its own norm (and the column is not negligible against the largest
    column). The first k kept columns span the same space as the first columns of M.
    """
    M = as64(M)
    d, k = M.shape
    if k == 0:
        return empty_basis(d)
    norms = M.norm(dim=0)
    scale = float(norms.max())
    if scale == 0.0:
        return empty_basis(d)
    kept: list[Tensor] = []
    for j in range(k):
        v = M[:, j].clone()
        n0 = float(norms[j])
        if n0 <= tol * scale:
            continue
        if kept:
            Q = torch.stack(kept, dim=1)
            v = v - Q @ (Q.T @ v)
            v = v - Q @ (Q.T @ v)  # re-orthogonalise: classical GS loses orthogonality once
        n = float(v.norm())
        if n <= tol * n0:
            continue
        kept.append(v / n)
    if not kept:
        return empty_basis(d)
    return torch.stack(kept, dim=1)


def is_orthonormal(B: Tensor, tol: float = 1e-4) -> bool:
    if B.shape[1] == 0:
        return True
    eye = torch.eye(B.shape[1], dtype=B.dtype)
    return bool((B.T @ B - eye).abs().max() <= tol)


# ---------------------------------------------------------------- the eigensolver
# scipy.linalg.eigh's f2py wrapper holds the GIL for the whole LAPACK call, so eigenproblems on
# two threads run one after the other. Calling the same dsyevr of SciPy's bundled OpenBLAS
# through ctypes releases the GIL: candidate building runs its ~20 eigenproblems per layer on a
# thread pool (measured 1.9x on 2 cores). Same routine, same arguments: bit-identical results;
# where that OpenBLAS is absent, SciPy's wrapper is used.


_OPENBLAS: list[object] = []  # cached handle of SciPy's bundled OpenBLAS (None if absent)


def scipy_openblas():
    """SciPy's bundled OpenBLAS (scipy.libs/libscipy_openblas*.so), or None for any other BLAS."""
    if not _OPENBLAS:
        lib = None
        try:
            import scipy

            libs_dir = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs")
            paths = sorted(glob.glob(os.path.join(libs_dir, "libscipy_openblas*.so*")))
            if paths:
                cand = ctypes.CDLL(paths[0])
                if hasattr(cand, "scipy_openblas_set_num_threads") and hasattr(cand, "scipy_openblas_get_num_threads"):
                    lib = cand
        except OSError:
            lib = None
        _OPENBLAS.append(lib)
    return _OPENBLAS[0]


class _LapackSyevr:
    """``?syevr`` (range 'I', lower) of SciPy's bundled OpenBLAS through ctypes, for one real type.

    scipy.linalg.eigh's f2py wrapper of syevr holds the GIL for the whole call, so two threads
    run it one after the other; a ctypes call releases the GIL (measured: 8 eigenproblems of
    1024 x 1024, 0.46 s serially, 0.24 s on two threads). Same routine, same arguments as
    ``scipy.linalg.eigh(driver="evr", subset_by_index=...)``: bit-identical results.
    """

    def __init__(self, fn, real: type[np.floating]) -> None:
        self.fn = fn
        self.real = real
        self.c_real = ctypes.c_double if real is np.float64 else ctypes.c_float

    def workspace(self, n: int) -> tuple[int, int]:
        """(LWORK, LIWORK) syevr asks for at order n: its workspace query (A is not read; the
        answer is the same for every JOBZ and RANGE: ``max((NB+1)·n, 26n)`` and ``10n``)."""
        c_int, byref = ctypes.c_int, ctypes.byref
        work, iwork, isuppz = np.zeros(1, dtype=self.real), np.zeros(1, dtype=np.int32), np.zeros(2, dtype=np.int32)
        info, m = c_int(0), c_int(0)
        ptr = lambda x: x.ctypes.data_as(ctypes.POINTER(self.c_real))  # noqa: E731
        iptr = lambda x: x.ctypes.data_as(ctypes.POINTER(c_int))  # noqa: E731
        zero = self.c_real(0.0)
        self.fn(byref(ctypes.c_char(b"V")), byref(ctypes.c_char(b"I")), byref(ctypes.c_char(b"L")), byref(c_int(n)),
                ptr(work), byref(c_int(max(n, 1))), byref(zero), byref(zero), byref(c_int(1)), byref(c_int(1)),
                byref(zero), byref(m), ptr(work), ptr(work), byref(c_int(max(n, 1))), iptr(isuppz),
                ptr(work), byref(c_int(-1)), iptr(iwork), byref(c_int(-1)), byref(info),
                ctypes.c_size_t(1), ctypes.c_size_t(1), ctypes.c_size_t(1))  # Fortran lengths of the 3 flags
        if info.value != 0:
            raise RuntimeError(f"LAPACK syevr workspace query failed: info = {info.value}")
        return int(work[0]), int(iwork[0])

    def __call__(self, A: np.ndarray, il: int, iu: int, *, vectors: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Eigenpairs il..iu (1-based, ascending) of the symmetric matrix A (read from its lower
        triangle); ``vectors=False``: ALL eigenvalues (range 'A', ``sterf``) and no vectors."""
        n = A.shape[0]
        real, c_real, c_int = self.real, self.c_real, ctypes.c_int
        a = np.array(A, dtype=real, order="F")  # overwritten by LAPACK
        k = iu - il + 1 if vectors else n
        w = np.zeros(n, dtype=real)
        z = np.zeros((n, k) if vectors else (1, 1), dtype=real, order="F")
        isuppz = np.zeros(2 * max(1, k), dtype=np.int32)
        m, info = c_int(0), c_int(0)
        fixed = [ctypes.c_char(b"V" if vectors else b"N"), ctypes.c_char(b"I" if vectors else b"A"), ctypes.c_char(b"L"), c_int(n)]
        lda, vl, vu, c_il, c_iu, abstol, ldz = c_int(n), c_real(0.0), c_real(0.0), c_int(il), c_int(iu), c_real(0.0), c_int(n if vectors else 1)
        ptr = lambda x: x.ctypes.data_as(ctypes.POINTER(c_real))  # noqa: E731

        def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
            self.fn(
                *(ctypes.byref(x) for x in fixed), ptr(a), ctypes.byref(lda),
                ctypes.byref(vl), ctypes.byref(vu), ctypes.byref(c_il), ctypes.byref(c_iu), ctypes.byref(abstol),
                ctypes.byref(m), ptr(w), ptr(z), ctypes.byref(ldz), isuppz.ctypes.data_as(ctypes.POINTER(c_int)),
                ptr(work), ctypes.byref(c_int(lwork)),
                iwork.ctypes.data_as(ctypes.POINTER(c_int)), ctypes.byref(c_int(liwork)), ctypes.byref(info),
                ctypes.c_size_t(1), ctypes.c_size_t(1), ctypes.c_size_t(1),  # Fortran lengths of the 3 flags
            )

        lwork, liwork = self.workspace(n)
        call(np.zeros(lwork, dtype=real), lwork, np.zeros(liwork, dtype=np.int32), liwork)
        if info.value != 0:
            raise RuntimeError(f"LAPACK syevr failed: info = {info.value}")
        return w[: m.value].copy(), (z[:, : m.value] if vectors else z[:, :0])


class _SyevrSteps:
    """``?syevr``'s own steps as separate calls (LAPACK 3.12 ``dsyevr.f``, range 'I' and range 'A'
    without vectors, lower triangle): ``reduce`` is the tridiagonal reduction ``?sytrd``, the
    O(d³) part; ``pairs`` is ``?stebz`` + ``?stein`` + ``?ormtr`` (O(d² k)) and ``values`` is
    ``?sterf`` (O(d²)). One matrix asked for several subsets is reduced once. Each routine gets
    the workspace share syevr gives it (the share fixes ``?sytrd``'s block size), so every result
    is syevr's bit for bit; ``gil_free_syevr_steps`` checks that once against syevr itself.
    """

    SYMBOLS = ("sytrd", "stebz", "stein", "ormtr", "sterf")

    def __init__(self, lib, prefix: str, syevr: _LapackSyevr) -> None:
        self.fns = {name: getattr(lib, f"scipy_{prefix}{name}_") for name in self.SYMBOLS}
        self.syevr = syevr
        self.real = syevr.real
        info = np.finfo(self.real)
        safmin, eps = float(info.tiny), float(info.eps)  # LAPACK's ?lamch('S'), ?lamch('P')
        # syevr first rescales a matrix whose largest entry lies outside [rmin, rmax]; such a
        # matrix is left to syevr itself (``reduce`` returns None), with a factor 2 of margin.
        self.rmin = 2.0 * np.sqrt(safmin / eps)
        self.rmax = 0.5 * min(np.sqrt(eps / safmin), 1.0 / np.sqrt(np.sqrt(safmin)))

    def _ptr(self, x: np.ndarray):
        return x.ctypes.data_as(ctypes.POINTER(self.syevr.c_real))

    def reduce(self, A: np.ndarray) -> _Reduction | None:
        """``?sytrd`` of A as syevr calls it, or None where syevr would first rescale A."""
        n = int(A.shape[0])
        anrm = float(np.abs(np.tril(A)).max()) if n else 0.0  # ?lansy('M', 'L')
        if n < 2 or (anrm > 0.0 and not self.rmin < anrm < self.rmax):
            return None
        c_int, byref = ctypes.c_int, ctypes.byref
        lwork = self.syevr.workspace(n)[0]
        a = np.array(A, dtype=self.real, order="F")  # overwritten by the reflectors
        diag, off, tau = (np.zeros(n, dtype=self.real) for _ in range(3))
        share = lwork - 5 * n  # syevr's LLWORK: its workspace after tau, d, e and two copies
        info = c_int(0)
        self.fns["sytrd"](byref(ctypes.c_char(b"L")), byref(c_int(n)), self._ptr(a), byref(c_int(n)),
                          self._ptr(diag), self._ptr(off), self._ptr(tau), self._ptr(np.zeros(share, dtype=self.real)),
                          byref(c_int(share)), byref(info), ctypes.c_size_t(1))
        if info.value != 0:
            raise RuntimeError(f"LAPACK sytrd failed: info = {info.value}")
        return _Reduction(a, diag, off, tau, lwork)

    def values(self, red: _Reduction) -> np.ndarray:
        """All eigenvalues, ascending (``?sterf`` on copies of the tridiagonal, as syevr)."""
        w, off, info = red.diag.copy(), red.off.copy(), ctypes.c_int(0)
        self.fns["sterf"](ctypes.byref(ctypes.c_int(red.n)), self._ptr(w), self._ptr(off), ctypes.byref(info))
        if info.value != 0:
            raise RuntimeError(f"LAPACK sterf failed: info = {info.value}")
        return w

    def pairs(self, red: _Reduction, il: int, iu: int) -> tuple[np.ndarray, np.ndarray]:
        """Eigenpairs il..iu (1-based, ascending; not all n of them: syevr takes another route
        there) as syevr computes them. Not re-entrant on one reduction (``?ormtr`` writes into
        the reflectors and restores them): callers serialise requests per reduction."""
        n, real = red.n, self.real
        c_int, byref, char, length = ctypes.c_int, ctypes.byref, ctypes.c_char, ctypes.c_size_t(1)
        ip = lambda x: x.ctypes.data_as(ctypes.POINTER(c_int))  # noqa: E731
        zero = self.syevr.c_real(0.0)
        m, nsplit, info = c_int(0), c_int(0), c_int(0)
        w = np.zeros(n, dtype=real)
        iblock, isplit = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
        work, iwork = np.zeros(5 * n, dtype=real), np.zeros(3 * n, dtype=np.int32)
        self.fns["stebz"](byref(char(b"I")), byref(char(b"B")), byref(c_int(n)), byref(zero), byref(zero),
                          byref(c_int(il)), byref(c_int(iu)), byref(zero), self._ptr(red.diag), self._ptr(red.off),
                          byref(m), byref(nsplit), self._ptr(w), ip(iblock), ip(isplit), self._ptr(work), ip(iwork),
                          byref(info), length, length)
        if info.value != 0:
            raise RuntimeError(f"LAPACK stebz failed: info = {info.value}")
        k = m.value
        z = np.zeros((n, iu - il + 1), dtype=real, order="F")
        ifail = np.zeros(max(k, 1), dtype=np.int32)
        self.fns["stein"](byref(c_int(n)), self._ptr(red.diag), self._ptr(red.off), byref(m), self._ptr(w),
                          ip(iblock), ip(isplit), self._ptr(z), byref(c_int(n)), self._ptr(work), ip(iwork),
                          ip(ifail), byref(info))
        if info.value != 0:
            raise RuntimeError(f"LAPACK stein failed: info = {info.value}")
        share = red.lwork - 2 * n  # syevr's LLWRKN
        self.fns["ormtr"](byref(char(b"L")), byref(char(b"L")), byref(char(b"N")), byref(c_int(n)), byref(m),
                          self._ptr(red.a), byref(c_int(n)), self._ptr(red.tau), self._ptr(z), byref(c_int(n)),
                          self._ptr(np.zeros(share, dtype=real)), byref(c_int(share)), byref(info),
                          length, length, length)
        if info.value != 0:
            raise RuntimeError(f"LAPACK ormtr failed: info = {info.value}")
        # syevr's closing selection sort (stebz orders by split block): first strict minimum
        for j in range(k - 1):
            i = j + 1 + int(np.argmin(w[j + 1 : k]))
            if w[i] < w[j]:
                w[i], w[j] = w[j], w[i]
                z[:, [i, j]] = z[:, [j, i]]
        return w[:k].copy(), z[:, :k]


@dataclass(frozen=True)
class _Reduction:
    """A matrix reduced to tridiagonal form by ``?sytrd``: reflectors, diagonal, off-diagonal."""

    a: np.ndarray
    diag: np.ndarray
    off: np.ndarray
    tau: np.ndarray
    lwork: int  # syevr's workspace at this order

    @property
    def n(self) -> int:
        return int(self.a.shape[0])


#: real type name -> ctypes binding, or None where SciPy's OpenBLAS is absent (checked once).
_SYEVR: dict[str, _LapackSyevr | None] = {}
_SYEVR_SYMBOLS = {"float64": "scipy_dsyevr_", "float32": "scipy_ssyevr_"}


def gil_free_syevr(real: type[np.floating] = np.float64) -> _LapackSyevr | None:
    """The ctypes ``dsyevr`` / ``ssyevr``, or None (then SciPy's wrapper is used).

    ``scipy_?syevr_`` are the LP64 (32-bit integer) symbols of scipy-openblas (the ILP64 build
    names them ``scipy_?syevr_64_``). Each binding is checked once against scipy on a small matrix.
    """
    name = np.dtype(real).name
    if name not in _SYEVR:
        lib = scipy_openblas()
        fn = getattr(lib, _SYEVR_SYMBOLS[name], None) if lib is not None else None
        binding = _LapackSyevr(fn, np.dtype(real).type) if fn is not None else None
        if binding is not None:
            A = (np.diag(np.arange(1.0, 7.0)) + 0.1).astype(real)
            try:
                w, z = binding(A, 4, 6)
                w_ref, z_ref = scipy.linalg.eigh(A, subset_by_index=[3, 5], driver="evr")
                w_all = binding(A, 1, 6, vectors=False)[0]
                w_all_ref = scipy.linalg.eigh(A, eigvals_only=True, driver="evr")
                if not (np.array_equal(w, w_ref) and np.array_equal(np.abs(z), np.abs(z_ref))
                        and np.array_equal(w_all, w_all_ref)):
                    binding = None
            except (RuntimeError, ValueError, OSError):
                binding = None
        _SYEVR[name] = binding
    return _SYEVR[name]


_STEPS: dict[str, _SyevrSteps | None] = {}
_STEPS_SYMBOL_PREFIX = {"float64": "d", "float32": "s"}


def gil_free_syevr_steps(real: type[np.floating] = np.float64) -> _SyevrSteps | None:
    """syevr's steps as separate ctypes calls, or None (then every request is a whole syevr).

    Checked once against the syevr binding, bit for bit, on a matrix large enough for
    ``?sytrd``'s blocked code, with a split tridiagonal (two diagonal blocks) for syevr's sort."""
    name = np.dtype(real).name
    if name not in _STEPS:
        syevr = gil_free_syevr(real)
        lib = scipy_openblas()
        prefix = _STEPS_SYMBOL_PREFIX[name]
        steps = None
        if syevr is not None and all(hasattr(lib, f"scipy_{prefix}{s}_") for s in _SyevrSteps.SYMBOLS):
            steps = _SyevrSteps(lib, prefix, syevr)
            try:
                if not _steps_match_syevr(steps, syevr, np.dtype(real).type):
                    steps = None
            except (RuntimeError, ValueError, OSError):
                steps = None
        _STEPS[name] = steps
    return _STEPS[name]


def _steps_match_syevr(steps: _SyevrSteps, syevr: _LapackSyevr, real: type[np.floating]) -> bool:
    """The steps' values and pairs equal syevr's bit for bit on a 300 x 300 Gram (?sytrd's blocked
    code) and on a split tridiagonal (two diagonal blocks: syevr's closing sort)."""
    X = np.random.default_rng(0).standard_normal((300, 40))
    split = np.zeros((12, 12), dtype=real)
    split[:6, :6], split[6:, 6:] = np.diag(np.arange(1.0, 7.0)) + 0.25, np.diag(np.arange(9.0, 3.0, -1.0)) + 0.5
    for M, ranges in (((X @ X.T).astype(real), ((300, 300), (281, 300), (250, 300))), (split, ((6, 12), (1, 11)))):
        red = steps.reduce(M)
        if red is None or not np.array_equal(steps.values(red), syevr(M, 1, M.shape[0], vectors=False)[0]):
            return False
        for il, iu in ranges:
            (w, z), (w_ref, z_ref) = steps.pairs(red, il, iu), syevr(M, il, iu)
            if not (np.array_equal(w, w_ref) and np.array_equal(z, z_ref)):
                return False
    return True


class SymmetricEigen:
    """The eigenproblem of one symmetric matrix (float64, or float32 with ``single``, read from its
    lower triangle) for any number of requests: top or bottom k pairs, all eigenvalues.

    Every request returns what the one-shot LAPACK ``syevr`` call returns, bit for bit; where
    syevr's steps are available (``gil_free_syevr_steps``) its O(d³) tridiagonal reduction runs
    once, on the first request, and each further request costs O(d² k). The sweep asks each
    weight target of a layer for top-k at two k and the combined one for all eigenvalues too: 3
    reductions instead of 7. The reduction is a d x d copy, alive as long as this object.
    Requests are serialised (thread-safe).
    """

    def __init__(self, G: Tensor, *, single: bool = False) -> None:
        G = as64(G)
        if G.ndim != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(G.shape)}")
        if not bool(torch.isfinite(G).all()):
            raise ValueError("matrix has NaN/Inf entries")
        self.d = int(G.shape[0])
        self.single = single
        self._A = G.numpy().astype(np.float32 if single else np.float64, copy=False)
        self._steps = gil_free_syevr_steps(self._A.dtype.type)
        self._lock = threading.Lock()
        self._reduced: list[_Reduction | None] = []  # [] until the first request

    def _reduction(self) -> _Reduction | None:
        if not self._reduced:
            self._reduced.append(self._steps.reduce(self._A) if self._steps is not None else None)
        return self._reduced[0]

    def _pairs(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            red = self._reduction() if hi - lo + 1 < self.d else None  # all n pairs: syevr's MRRR route
            if red is None:
                return _syevr(self._A, lo, hi)
            return self._steps.pairs(red, lo + 1, hi + 1)

    def values(self) -> Tensor:
        """All eigenvalues, ascending, float64."""
        with self._lock:
            red = self._reduction()
            w = self._steps.values(red) if red is not None else _syevr(self._A, 0, self.d - 1, vectors=False)[0]
        return torch.from_numpy(np.asarray(w, dtype=np.float64))

    def top(self, k: int, *, largest: bool = True) -> tuple[Tensor, Tensor]:
        """The k largest (or smallest) eigenpairs, float64, from the extreme inwards, signs fixed
        (see ``top_eigh``)."""
        d = self.d
        k = max(0, min(k, d))
        if k == 0:
            return torch.zeros(0, dtype=DTYPE), empty_basis(d)
        evals, evecs = self._pairs(*((d - k, d - 1) if largest else (0, k - 1)))
        evals = torch.from_numpy(np.asarray(evals, dtype=np.float64))
        evecs = torch.from_numpy(np.ascontiguousarray(evecs, dtype=np.float64))
        if largest:
            evals, evecs = evals.flip(0), evecs.flip(1)
        if self.single:
            evecs = signed_qr(evecs)  # Gram-Schmidt in order, each vector keeping its direction
        return evals, fix_signs(evecs.contiguous())


def _syevr(A: np.ndarray, lo: int, hi: int, *, vectors: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """LAPACK ``syevr`` on A (float32 or float64): eigenpairs lo..hi (0-based, ascending), or with
    ``vectors=False`` all eigenvalues. The GIL-free binding when there is one, else SciPy's."""
    syevr = gil_free_syevr(A.dtype.type)
    if syevr is not None:
        return syevr(A, lo + 1, hi + 1, vectors=vectors)
    if not vectors:
        return scipy.linalg.eigh(A, eigvals_only=True, driver="evr", check_finite=False), A[:, :0]
    return scipy.linalg.eigh(A, subset_by_index=[lo, hi], driver="evr", check_finite=False)


def top_eigh(G: Tensor, k: int, *, largest: bool = True, single: bool = False) -> tuple[Tensor, Tensor]:
    """The k largest (or smallest) eigenpairs of a symmetric matrix, float64, ordered from the
    extreme inwards, eigenvector signs fixed. Only those pairs are computed (LAPACK ``syevr``,
    which reads one triangle): for k = 8 of d = 1024 ~4x faster than ``eigh``.

    ``single=True`` solves in float32, for Grams formed from float32 products (they carry no
    more accuracy than that; ~25% faster). The eigenvectors are then re-orthonormalised in
    float64 (order kept), so bases are orthonormal to float64 precision either way.
    Several requests on one matrix: ``SymmetricEigen``.
    """
    return SymmetricEigen(G, single=single).top(k, largest=largest)


def top_eigvecs(G: Tensor, r: int, *, largest: bool = True, rel_tol: float = RANK_TOL, single: bool = False) -> Tensor:
    """Top-r (or bottom-r) eigenvectors of a symmetric PSD matrix, float64, signs fixed.

    With ``largest=True`` eigenvalues at or below ``rel_tol * max`` are dropped, so the
    returned rank is the numerical rank capped at r. With ``largest=False`` all r are returned
    (bottom directions legitimately have small eigenvalues). A float32 solve (``single``) puts
    round-off eigenvalues ~1e-7 of the top where G has none: ask it only for ranks G has
    (the candidate builders cap r at each Gram's structural rank).
    """
    evals, evecs = top_eigh(G, r, largest=largest, single=single)
    if not largest or evecs.shape[1] == 0:
        return evecs
    top = float(evals[0])
    if top <= 0.0:
        return empty_basis(evecs.shape[0])
    return evecs[:, evals > rel_tol * top]


def eigenvalues(G: Tensor) -> Tensor:
    """All eigenvalues of a symmetric matrix, ascending, float64 (no eigenvectors: LAPACK
    ``syevr`` range 'A', GIL-free like ``top_eigh``; ~40% faster than ``torch.linalg.eigvalsh``)."""
    return SymmetricEigen(G).values()


def numerical_rank(G: Tensor, rel_tol: float = RANK_TOL) -> int:
    """Number of eigenvalues of a symmetric PSD matrix above ``rel_tol`` x the largest (the
    dimension of its range; eigenvalues only, no eigenvectors)."""
    evals = eigenvalues(G)
    top = float(evals[-1]) if evals.numel() else 0.0
    return int((evals > rel_tol * top).sum()) if top > 0.0 else 0


def row_gram(M: Tensor) -> Tensor:
    """``M Mᵀ`` (d x d for a d x n matrix) in float64.

    The product runs in M's own precision when it is float32 (a d x 100k float64 GEMM
    costs ~10x more), then is promoted; use float64 input where tiny singular values matter.
    """
    if M.dtype not in (torch.float32, torch.float64):
        M = M.float()
    return as64(_sym_gram(M.T))


#: Below this width a Gram is one GEMM; above it, symmetric blocks (see ``_sym_gram``).
SYM_BLOCK_MIN = 512


def _sym_gram(X: Tensor) -> Tensor:
    """``Xᵀ X`` computing each symmetric off-diagonal block once: with X = [A | B],
    ``[[AᵀA, AᵀB], [BᵀA, BᵀB]]`` costs 3 GEMMs of a quarter size instead of 4, recursively
    while the width is at least ``SYM_BLOCK_MIN`` (5/8 of the flops at d = 1024). The Grams of
    every weight matrix, the bulk of candidate building, are formed this way."""
    d = X.shape[1]
    if d < SYM_BLOCK_MIN:
        return X.T @ X
    h = d // 2
    A, B = X[:, :h], X[:, h:]
    off = A.T @ B
    return torch.cat([torch.cat([_sym_gram(A), off], 1), torch.cat([off.T, _sym_gram(B)], 1)], 0)


def pack_symmetric(G: Tensor) -> Tensor:
    """The upper triangle of a d x d matrix that is exactly symmetric, row by row (d(d+1)/2
    values: half the memory of a Gram kept for later); ``G`` itself when it is not exactly
    symmetric. ``unpack_symmetric`` returns the same matrix bit for bit either way."""
    if G.ndim != 2 or not torch.equal(G, G.T):  # (a non-square G differs from its transpose in shape)
        return G
    d = G.shape[0]
    return torch.cat([G[i, i:] for i in range(d)]) if d else G.new_zeros(0)


def unpack_symmetric(P: Tensor, d: int) -> Tensor:
    """The d x d matrix ``pack_symmetric`` packed (a 2-D input is returned as it is)."""
    if P.ndim == 2:
        return P
    if P.numel() != d * (d + 1) // 2:
        raise ValueError(f"a packed symmetric {d} x {d} matrix has {d * (d + 1) // 2} values, got {P.numel()}")
    G = P.new_empty(d, d)
    start = 0
    for i in range(d):
        row = P[start : start + d - i]
        G[i, i:] = row
        G[i:, i] = row
        start += d - i
    return G


#: Rows per chunk of ``col_gram``: a bf16 unembedding (151,936 x 1024) is never copied whole to float32.
GRAM_CHUNK_ROWS = 16384


def col_gram(M: Tensor) -> Tensor:
    """``Mᵀ M`` (d x d for an n x d matrix) in float64.

    Tall matrices go chunk by chunk: each chunk's product in (at least) float32, the sum of the
    chunks in float64, so a half-precision input needs no full float32 copy.
    """
    total = None
    for start in range(0, max(M.shape[0], 1), GRAM_CHUNK_ROWS):
        X = M[start : start + GRAM_CHUNK_ROWS]
        if X.dtype not in (torch.float32, torch.float64):
            X = X.float()
        part = as64(_sym_gram(X))
        total = part if total is None else total + part
    return total


def left_basis(M: Tensor, r: int) -> Tensor:
    """Top-r left singular vectors of a d x n matrix (through its d x d row Gram)."""
    return top_eigvecs(row_gram(M), r)


def right_basis(M: Tensor, r: int) -> Tensor:
    """Top-r right singular vectors of an n x d matrix (through its d x d column Gram)."""
    return top_eigvecs(col_gram(M), r)


def pca(X: Tensor, r: int) -> Tensor:
    """Top-r principal axes (d x r_eff) of the rows of X (n x d) after centring.

    Solved on the smaller of the two Grams; n - 1 bounds the rank.
    """
    X = as64(X)
    n, d = X.shape
    if n < 2 or r <= 0:
        return empty_basis(d)
    Xc = X - X.mean(dim=0, keepdim=True)
    return weighted_pca_rows(Xc, r)


def weighted_pca_rows(X: Tensor, r: int) -> Tensor:
    """Top-r right singular vectors of the rows of X, NOT centred (used on pre-centred or
    pre-weighted rows); directions with eigenvalue below ``RANK_TOL`` x the top are dropped."""
    return top_eigh_rows(X, r)[1]


def top_eigh_rows(X: Tensor, k: int, kernel: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k eigenvalues of ``XᵀX`` (d x d) for the rows of X (n x d), and the eigenvectors of
    those above ``RANK_TOL`` x the largest (fewer columns than values when XᵀX is rank-deficient).

    With n < d the n x n kernel ``X Xᵀ`` has the same nonzero eigenvalues, and its eigenvectors
    u map to ``Xᵀu/√λ``: exact, at the cost of an n x n problem. ``kernel``: ``X Xᵀ`` when the
    caller already has it (several weightings of the same rows share one product).
    """
    X = as64(X)
    n, d = X.shape
    k = max(0, min(k, d))
    if n == 0 or k == 0:
        return torch.zeros(0, dtype=DTYPE), empty_basis(d)
    if n >= d:
        evals, evecs = top_eigh(X.T @ X, k)
    else:
        evals, U = top_eigh(X @ X.T if kernel is None else kernel, k)
        evecs = X.T @ U
    top = float(evals[0])
    keep = evals > RANK_TOL * top if top > 0.0 else torch.zeros_like(evals, dtype=torch.bool)
    evecs = evecs[:, keep]
    if n < d and evecs.shape[1]:
        # Columns of XᵀU are orthogonal with norms √λ: the QR only normalises them (and removes
        # the error of dividing by a small √λ), keeping each column's order and direction.
        evecs = fix_signs(signed_qr(evecs))
    return evals, evecs


def projector(B: Tensor) -> Tensor:
    B = as64(B)
    return B @ B.T


def project_out(F: Tensor, M: Tensor) -> Tensor:
    """``(I - F Fᵀ) M`` without forming the d x d projector."""
    F = as64(F)
    M = as64(M)
    if F.shape[1] == 0:
        return M
    return M - F @ (F.T @ M)


def project_out_gram(F: Tensor, G: Tensor) -> Tensor:
    """``(I - P_F) G (I - P_F)`` for a symmetric d x d Gram G and orthonormal F (d x k): the Gram of
    ``(I - P_F) M``. Written as ``G - F Aᵀ - A Fᵀ`` with ``A = G F - F (Fᵀ G F) / 2``: one d x d x 2k
    product after ``G F`` (half the work of multiplying out both projectors)."""
    F = as64(F)
    G = as64(G)
    if F.shape[1] == 0:
        return G
    GF = G @ F
    A = GF - F @ (F.T @ GF) / 2
    return torch.addmm(G, torch.cat([F, A], dim=1), torch.cat([A, F], dim=1).T, alpha=-1.0)


def project_away(B: Tensor, F: Tensor) -> Tensor:
    """Orthonormal basis of ``(I - P_F) B`` (order-preserving, rank-revealing).

    A column is dropped when its projection is below ``ORTHO_TOL`` times its OWN norm before
    projecting: judged against the projected columns alone, the round-off left when F spans B
    would be normalised into spurious directions.
    """
    B = as64(B)
    M = project_out(F, B)
    keep = M.norm(dim=0) > ORTHO_TOL * B.norm(dim=0)
    return orthonormalize(M[:, keep])


def union(*bases: Tensor) -> Tensor:
    """Orthonormal basis of the sum of the spans, earlier bases first."""
    nonempty = [as64(B) for B in bases if B.shape[1] > 0]
    if not nonempty:
        return empty_basis(bases[0].shape[0])
    return orthonormalize(torch.cat(nonempty, dim=1))


def principal_cosines(A: Tensor, B: Tensor) -> Tensor:
    """Cosines of the principal angles between span(A) and span(B), descending, in [0, 1]."""
    A = as64(A)
    B = as64(B)
    if A.shape[1] == 0 or B.shape[1] == 0:
        return torch.zeros(0, dtype=DTYPE)
    return torch.linalg.svdvals(A.T @ B).clamp(0.0, 1.0)


def bisector(A: Tensor, B: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Principal-vector bisector of two subspaces and the principal cosines used.

    For principal vector pairs (a_i, b_i) with cosine c_i, the bisector direction is
    (a_i + b_i)/|a_i + b_i|; these are mutually orthogonal. Returns the top-r (most aligned
    pairs first) as a basis together with the cosines of those pairs.
    """
    A = as64(A)
    B = as64(B)
    d = A.shape[0]
    if A.shape[1] == 0 or B.shape[1] == 0 or r <= 0:
        return empty_basis(d), torch.zeros(0, dtype=DTYPE)
    U, s, Vh = torch.linalg.svd(A.T @ B, full_matrices=False)
    k = min(r, s.shape[0])
    pa = A @ U[:, :k]
    pb = B @ Vh.T[:, :k]
    basis = orthonormalize(pa + pb)
    return fix_signs(basis), s[:k].clamp(0.0, 1.0)


def signed_qr(X: Tensor) -> Tensor:
    """Q of ``X = QR`` with diag(R) made non-negative (batched): Gram-Schmidt of the columns in
    order, each output column on the same side as its input column."""
    Q, R = torch.linalg.qr(X)
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs[signs == 0] = 1
    return Q * signs.unsqueeze(-2)


def random_orthonormal(d: int, r: int, generator: torch.Generator, batch: int | None = None) -> Tensor:
    """Uniform (Haar) random orthonormal d x r basis (or a batch of them) from a seeded generator.
    (The sign-fixed QR of a Gaussian matrix is exactly Haar.)"""
    shape = (d, r) if batch is None else (batch, d, r)
    return signed_qr(torch.randn(shape, generator=generator, dtype=DTYPE))
