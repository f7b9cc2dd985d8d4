"""One scoring mechanism for every target (SPEC §5).

A *target* is a PSD ``d x d`` matrix ``G`` with ``t = tr G > 0``. For an orthonormal basis
``B`` (d x r):

- energy ``e(B) = tr(Bᵀ G B) / t`` and concentration ``R = e / (r/d)``;
- exact null (B uniform on the Grassmannian): ``E[e] = r/d`` and
  ``Var[e] = 2r(d-r) / (d(d-1)(d+2)) · ‖G − (t/d)I‖²_F / t²`` (the spread ``‖G − (t/d)I‖²_F/t²``
  equals ``tr(G²)/t² − 1/d`` but keeps its digits for near-isotropic G); ``z = (e - r/d) / SD[e]``
  (identical to ``(R - 1)/SD[R]``);
- Ky Fan oracle: ``max_B e(B)`` over rank-r bases is the sum of the top-r eigenvalues / t,
  reached by the top-r eigenvectors; ``pct_oracle = 100 · e(B) / e_max(rank B)``;
- oracle gain (the rank-fair ranking key, SPEC §5): ``gain = (e − r/d) / (e_max(r) − r/d)``,
  0 in expectation for a random basis of any rank, 1 for the oracle of its rank, NaN where
  the target is isotropic (``e_max(r) = r/d``).

Numerical rank (oracle ranks, the LoRA slice) counts eigenvalues above a floor that follows the
precision the delta was stored in: rounding each entry of M to a format with unit roundoff u moves
every singular value by at most ``‖E‖₂ ≤ u·‖M‖_F``, so eigenvalues of ``M Mᵀ`` below ``u²·tr(M Mᵀ)``
cannot be told from rounding (``Target.noise_floor``). A bf16-stored delta then has the slice of
its float32 copy instead of ~n_in "directions" of rounding noise.

Restricted nulls replace the ambient space by a subspace S (dimension D) and G by its
compression ``Sᵀ G S``. Everything is float64.

A target built from few rows (the activation label: n prompts, n < d) keeps its factor
``F`` (d x n, G = F Fᵀ): its spectrum comes from the n x n kernel and its energies from
``‖Fᵀ B‖²``, both exact. A sweep scores all candidates of a layer in one product per target
(``energies``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import compute, linalg
from .errors import InputError

DTYPE = torch.float64
#: The targets every candidate is scored on, in column order: the activation label, each
#: residual-writing weight tensor, and their Frobenius-balanced combination.
WEIGHT_TARGETS = ("o_proj", "down_proj", "combined")
TARGETS = ("act", *WEIGHT_TARGETS)


@dataclass(frozen=True, eq=False)
class Target:
    """A PSD target ``G`` (float64, d x d) with its trace, tr(G²) and, on demand, its top spectrum."""

    name: str
    gram: Tensor
    trace: float
    spread: float  # ‖G − (t/d)I‖²_F / t²: the null variance's target term, no eigenvalues needed
    factor: Tensor | None = None  # d x m with G = F Fᵀ and m < d, when the target was built from m rows
    noise_floor: float = 0.0  # eigenvalues at or below this are storage rounding, not directions
    # "top", "all": the cached spectra; "eigen": the shared eigenproblem inside ``shared_reductions``
    _spectrum: dict[str, object] = field(default_factory=dict, repr=False, compare=False)
    # (r, n, seed) -> the seeded Monte-Carlo null's (mean, variance) (``monte_carlo_null``)
    _mc_null: dict[tuple[int, int, int], tuple[float, float]] = field(default_factory=dict, repr=False,
                                                                       compare=False)

    @classmethod
    def from_gram(cls, name: str, gram: Tensor, factor: Tensor | None = None, noise_floor: float = 0.0) -> Target:
        G = linalg.as64(gram)
        if G.ndim != 2 or G.shape[0] != G.shape[1]:
            raise InputError(f"target {name!r}: expected a square Gram, got shape {tuple(G.shape)}")
        if not bool(torch.isfinite(G).all()):
            raise InputError(f"target {name!r}: Gram has NaN/Inf entries")
        G = (G + G.T) / 2
        t = float(torch.trace(G))
        if not t > 0.0:
            raise InputError(f"target {name!r} is zero (trace {t}); nothing to explain")
        return cls(name=name, gram=G, trace=t, spread=isotropic_spread(G, t), factor=factor,
                   noise_floor=float(noise_floor))

    @classmethod
    def from_rows(cls, name: str, rows: Tensor) -> Target:
        """Activation target: ``G = mean_i u_i u_iᵀ / ‖u_i‖²`` over the rows u_i (so t = 1).

        Zero rows carry no direction; they are an error rather than silently dropped.
        """
        U = linalg.as64(rows)
        norms = U.norm(dim=1)
        if U.shape[0] == 0 or bool((norms == 0).any()):
            bad = [] if U.shape[0] == 0 else torch.nonzero(norms == 0).flatten().tolist()
            raise InputError(f"target {name!r}: label rows {bad or '(none)'} are zero; the delta changed nothing there")
        F = (U / norms[:, None]).T / math.sqrt(U.shape[0])  # d x n
        return cls.from_gram(name, F @ F.T, factor=F if F.shape[1] < F.shape[0] else None)

    @classmethod
    def from_matrix(cls, name: str, M: Tensor, stored: torch.dtype | None = None) -> Target:
        """Weight target for one residual-writing tensor M (d x n_in) as stored: ``G = M Mᵀ``,
        formed in float64 (a float32 Gram of a rank-2 delta has round-off eigenvalues ~1e-7 of
        the top, which would pass for directions). Its noise floor follows the dtype the tensor
        was stored in: M's own, or ``stored`` when M is a rescaled float64 image of it."""
        G = linalg.row_gram(linalg.as64(M))
        return cls.from_gram(name, G, noise_floor=unit_roundoff(stored or M.dtype) ** 2 * float(torch.trace(G)))

    @classmethod
    def combine(cls, name: str, targets: Sequence[Target]) -> Target:
        """Frobenius-balanced combination ``Σ_T G_T / tr G_T``: each tensor counts once, whatever its
        size. Noise floors add (Weyl), each in its tensor's normalisation."""
        if not targets:
            raise InputError(f"target {name!r}: no tensors to combine")
        G = sum((t.gram / t.trace for t in targets[1:]), targets[0].gram / targets[0].trace)
        return cls.from_gram(name, G, noise_floor=sum(t.noise_floor / t.trace for t in targets))

    @classmethod
    def balanced(cls, name: str, matrices: Mapping[str, Tensor] | Sequence[Tensor]) -> Target:
        """``combine`` of the weight targets of ``matrices`` (``Σ_T M_T M_Tᵀ / ‖M_T‖²_F``)."""
        mats = list(matrices.items()) if isinstance(matrices, Mapping) else list(enumerate(matrices))
        return cls.combine(name, [cls.from_matrix(f"{name}/{key}", M) for key, M in mats])

    @property
    def d(self) -> int:
        return int(self.gram.shape[0])

    def spectrum(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues (descending, clipped at 0) and eigenvectors, computed once per size.

        With a factor (m < d columns), eigenvalues beyond the m-th are exactly 0 and only the
        eigenvectors of the nonzero ones (``rank``) are returned: the others are not determined.
        """
        k = max(0, min(k, self.d))
        cached = self._spectrum.get("top")
        if cached is None or cached[0].shape[0] < k:  # type: ignore[union-attr]
            if self.factor is not None:
                evals, evecs = linalg.top_eigh_rows(self.factor.T, k)
                evals = torch.cat([evals, evals.new_zeros(k - evals.shape[0])])
            else:
                evals, evecs = self._eigen().top(k)
            cached = (evals.clamp_min(0.0), evecs)
            self._spectrum["top"] = cached
        return cached[0][:k], cached[1][:, :k]  # type: ignore[index]

    def eigenvalues(self) -> Tensor:
        """Every nonzero-capable eigenvalue of G, descending, clipped at 0 (values only, once):
        d of them, or the m of the kernel when the target has an m-column factor (the rest are 0)."""
        cached = self._spectrum.get("all")
        if cached is None:
            if self.factor is not None:
                with compute.gemm_threads():
                    kernel = self.factor.T @ self.factor
                cached = linalg.eigenvalues(kernel).flip(0).clamp_min(0.0)
            else:
                cached = self._eigen().values().flip(0).clamp_min(0.0)
            self._spectrum["all"] = cached
        return cached  # type: ignore[return-value]

    def _eigen(self) -> linalg.SymmetricEigen:
        """G's eigenproblem: the one shared inside ``shared_reductions``, else a fresh one."""
        shared = self._spectrum.get("eigen")
        return shared if isinstance(shared, linalg.SymmetricEigen) else linalg.SymmetricEigen(self.gram)

    def _above_floor(self, evals: Tensor) -> Tensor:
        """Which of ``evals`` (descending) are directions: above ``RANK_TOL`` x the largest (float64
        round-off) and above the storage noise floor."""
        if not evals.numel() or not float(evals[0]) > 0.0:
            return torch.zeros(evals.shape, dtype=torch.bool)
        return evals > max(linalg.RANK_TOL * float(evals[0]), self.noise_floor)

    def numerical_rank(self) -> int:
        """The dimension of G's range at the precision the target was stored in."""
        return int(self._above_floor(self.eigenvalues()).sum())

    def restrict(self, S: Tensor, name: str | None = None) -> Target:
        """Compression ``Sᵀ G S`` to an orthonormal d x D basis S, in S's coordinates."""
        S = linalg.as64(S)
        return Target.from_gram(name or f"{self.name}|S", S.T @ self.gram @ S)

    def oracle_energy(self, r: int) -> float:
        """Ky Fan: the largest energy any rank-r basis can reach."""
        return float(self.spectrum(r)[0].sum()) / self.trace

    def rank(self, r: int) -> int:
        """Numerical rank of G capped at r (see ``numerical_rank``)."""
        evals = self.spectrum(max(r, 1))[0]
        return int(self._above_floor(evals[:r]).sum())

    def oracle_basis(self, r: int) -> Tensor:
        """Top-r eigenvectors of G (reaching ``oracle_energy(r)``), zero-eigenvalue directions dropped."""
        return self.spectrum(r)[1][:, : self.rank(r)]


@contextlib.contextmanager
def shared_reductions(targets: Iterable[Target]) -> Iterator[None]:
    """Inside the block each target's eigenproblems (top-k spectra at any k, all eigenvalues)
    share one tridiagonal reduction, the O(d³) part (``linalg.SymmetricEigen``): the sweep asks a
    layer's weight targets for top-k at two k and the combined one for all its eigenvalues too.
    The results are those of separate solves bit for bit; the reductions (a d x d copy each) are
    freed at exit. Targets with a factor solve their small kernel instead and are left alone."""
    held = [t for t in targets if t.factor is None and "eigen" not in t._spectrum]
    try:
        for t in held:
            t._spectrum["eigen"] = linalg.SymmetricEigen(t.gram)
        yield
    finally:
        for t in held:
            t._spectrum.pop("eigen", None)


def energy(target: Target, B: Tensor) -> float:
    """Fraction of the target's trace inside span(B): ``tr(Bᵀ G B) / t``."""
    return float(energies(target, [B])[0])


def energies(target: Target, bases: Sequence[Tensor]) -> Tensor:
    """``energy(target, B)`` of every basis, in one product with all their columns side by side
    (a sweep scores ~50 candidates per layer and target: one GEMM instead of ~50 small ones)."""
    bases = [linalg.as64(B) for B in bases]
    for B in bases:
        if B.ndim != 2 or B.shape[0] != target.d:
            raise InputError(f"basis of shape {tuple(B.shape)} has {B.shape[0]} rows but target {target.name!r} has d = {target.d}")
    widths = [int(B.shape[1]) for B in bases]
    out = torch.zeros(len(bases), dtype=DTYPE)
    if sum(widths) == 0:
        return out
    stacked = torch.cat(bases, dim=1)
    if target.factor is not None:
        per_column = (target.factor.T @ stacked).pow(2).sum(0)  # ‖Fᵀb‖² = bᵀGb
    else:
        with compute.gemm_threads():
            GB = target.gram @ stacked  # (not einsum: it picks a ~10x slower order)
        per_column = (GB * stacked).sum(0)
    for i, part in enumerate(per_column.split(widths)):
        out[i] = part.sum()
    return out / target.trace


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next number of a floating format: the largest relative
    error of rounding to it (bf16 2^-8, fp16 2^-11, float32 2^-24, float64 2^-53)."""
    return float(torch.finfo(dtype).eps) / 2.0


def isotropic_spread(G: Tensor, t: float) -> float:
    """``‖G − (t/d)I‖²_F / t²`` (= tr(G²)/t² − 1/d, without the cancellation of that difference)."""
    d = G.shape[0]
    off = G - torch.diag(torch.diagonal(G))
    diag = torch.diagonal(G) - t / d
    return float((off * off).sum() + (diag * diag).sum()) / t**2


def null_moments(target: Target, r: int) -> tuple[float, float]:
    """Exact mean and variance of e(B) for B uniform among rank-r subspaces of R^d."""
    return _moments(r, target.d, target.spread)


def _moments(r: int, d: int, spread: float) -> tuple[float, float]:
    """Null mean and variance of e(B), B uniform among rank-r subspaces of R^d, for a target
    with ``spread = ‖G − (t/d)I‖²_F / t²``."""
    if r < 0 or r > d:
        raise InputError(f"rank r = {r} outside [0, d = {d}]")
    mean = r / d
    if d == 1:
        return mean, 0.0
    var = 2.0 * r * (d - r) / (d * (d - 1) * (d + 2)) * max(spread, 0.0)
    return mean, var


@dataclass(frozen=True)
class Score:
    rank: int
    energy: float
    concentration: float  # R = e / (r/d); NaN for rank 0
    z: float  # NaN when the null has zero variance (r = 0, r = d, or an isotropic target)
    oracle_energy: float  # e_max at the same rank
    pct_oracle: float  # 100 · e / e_max(rank); NaN for rank 0
    gain: float  # (e − r/d) / (e_max − r/d); NaN for rank 0 or where e_max = r/d (isotropic, r = d)


def _z(e: float, mean: float, var: float) -> float:
    return (e - mean) / math.sqrt(var) if var > 0.0 else math.nan


def score(target: Target, B: Tensor) -> Score:
    """Energy, concentration, exact-null z and rank-matched pct of the Ky Fan oracle."""
    return score_energy(target, int(B.shape[1]), energy(target, B))


def score_energy(target: Target, r: int, e: float) -> Score:
    """``score`` of a rank-r basis whose energy ``e`` is already known (``energies``)."""
    mean, var = null_moments(target, r)
    e_max = target.oracle_energy(r)
    if r == 0:
        return Score(0, 0.0, math.nan, math.nan, 0.0, math.nan, math.nan)
    return Score(
        rank=r,
        energy=e,
        concentration=e / mean,
        z=_z(e, mean, var),
        oracle_energy=e_max,
        pct_oracle=100.0 * e / e_max if e_max > 0 else math.nan,
        gain=oracle_gain(e, mean, e_max),
    )


#: Relative size of ``e_max − r/d`` below which a target counts as isotropic at that rank (the
#: gain's denominator is then round-off of the Ky Fan sum, not an attainable excess).
ISOTROPIC_TOL = 1e-12


def oracle_gain(e: float, null_mean: float, e_max: float) -> float:
    """``(e − null mean) / (e_max − null mean)``: the fraction of the attainable excess energy."""
    excess = e_max - null_mean
    return (e - null_mean) / excess if excess > ISOTROPIC_TOL * max(e_max, 1.0) else math.nan


@dataclass(frozen=True)
class RestrictedNull:
    """The null of random rank-r subspaces drawn inside span(S) (dimension D), for one target.

    Energies keep the ambient normalisation by tr G; inside S a random basis has
    ``E[e] = (r/D)·tr(G_S)/t`` and the variance scales by ``(tr(G_S)/t)²``, where
    ``G_S = Sᵀ G S``. When S is spanned by the target's top-D eigenvectors, or contains its
    column space (the LoRA slice; the complement of the clean PCs for a label projected away from
    them), the eigenvalues of ``G_S`` are G's top D: no basis is needed (``top_eigenspace``).
    Built once per (target, S) and shared by every candidate.
    """

    target: Target
    dim: int  # D
    trace_s: float  # tr(G_S); 0 when S is empty or G vanishes on it
    spread_s: float  # ‖G_S − (tr G_S / D) I‖²_F / tr(G_S)²

    @classmethod
    def inside(cls, target: Target, S: Tensor) -> RestrictedNull:
        S = linalg.as64(S)
        if S.shape[1] == 0:
            return cls(target, 0, 0.0, 0.0)
        G_S = S.T @ target.gram @ S
        t_s = float(torch.trace(G_S))
        if not t_s > 0.0:
            return cls(target, int(S.shape[1]), 0.0, 0.0)
        return cls(target, int(S.shape[1]), t_s, isotropic_spread((G_S + G_S.T) / 2, t_s))

    @classmethod
    def top_eigenspace(cls, target: Target, dim: int) -> RestrictedNull:
        """S = the span of the target's top ``dim`` eigenvectors, or any S of that dimension that
        contains the target's column space: ``G_S`` has G's top ``dim`` eigenvalues (zeros past
        G's rank), from the values-only spectrum (``Target.eigenvalues``)."""
        if not 0 <= dim <= target.d:
            raise InputError(f"subspace dimension {dim} outside [0, d = {target.d}]")
        if dim == 0:
            return cls(target, 0, 0.0, 0.0)
        top = target.eigenvalues()[:dim]
        t_s = float(top.sum())
        if not t_s > 0.0:
            return cls(target, int(dim), 0.0, 0.0)
        # Σ_{i≤D} (λ_i − t_S/D)², the (D − len(top)) zero eigenvalues included
        dev = float(((top - t_s / dim) ** 2).sum()) + (dim - top.shape[0]) * (t_s / dim) ** 2
        return cls(target, int(dim), t_s, dev / t_s**2)

    def moments(self, r: int) -> tuple[float, float] | None:
        """(mean, variance) of e(B) for random rank-r B inside S, or None when undefined."""
        if self.trace_s == 0.0 or r == 0 or r > self.dim:
            return None
        mean, var = _moments(r, self.dim, self.spread_s)
        ratio = self.trace_s / self.target.trace
        return mean * ratio, var * ratio**2

    def z_of(self, r: int, e: float) -> float:
        """z of a rank-r basis with energy ``e`` (from ``energies``)."""
        m = self.moments(r)
        return math.nan if m is None else _z(e, *m)

    def z(self, B: Tensor) -> float:
        return self.z_of(int(B.shape[1]), energy(self.target, B))


def restricted_z(target: Target, B: Tensor, S: Tensor) -> float:
    """z of e(B) against random rank-r subspaces drawn inside span(S) (see ``RestrictedNull``)."""
    return RestrictedNull.inside(target, S).z(B)


def random_energies(target: Target, r: int, n: int, generator: torch.Generator, S: Tensor | None = None) -> Tensor:
    """Energies of n Haar-random rank-r bases (inside span(S) when given), batched."""
    D = target.d if S is None else int(S.shape[1])
    Bs = linalg.random_orthonormal(D, r, generator, batch=n)
    if S is not None:
        Bs = linalg.as64(S) @ Bs
    return ((target.gram @ Bs) * Bs).sum(dim=(1, 2)) / target.trace


def monte_carlo_null(target: Target, r: int, n: int, seed: int) -> tuple[float, float]:
    """Seeded Monte-Carlo estimate of (mean, variance) of e(B); a cross-check of ``null_moments``.
    Drawn once per (r, n, seed) and kept on the target: every candidate of rank r scored on it
    reads the same null (the sweep's seed names the layer, the target and r, not the candidate)."""
    key = (int(r), int(n), int(seed))
    if key not in target._mc_null:
        draws = random_energies(target, r, n, torch.Generator().manual_seed(int(seed)))
        target._mc_null[key] = (float(draws.mean()), float(draws.var(unbiased=True)))
    return target._mc_null[key]


def mc_score_z(target: Target, B: Tensor, n: int, seed: int) -> float:
    """z of e(B) against a seeded Monte-Carlo null (``--null mc``)."""
    r = int(B.shape[1])
    if r == 0:
        return math.nan
    mean, var = monte_carlo_null(target, r, n, seed)
    return _z(energy(target, B), mean, var)


def stable_seed(*parts: object) -> int:
    """A seed derived from its parts identically in every process (never Python's ``hash``)."""
    import zlib

    return zlib.crc32("\x1f".join(map(str, parts)).encode("utf-8")) & 0x7FFFFFFF


def row_fractions(rows: Tensor, B: Tensor) -> Tensor:
    """Per-row energy fractions ``‖Bᵀu_i‖²/‖u_i‖²``: the activation energy is their mean."""
    U = linalg.as64(rows)
    U = U / U.norm(dim=1, keepdim=True)
    return (U @ linalg.as64(B)).pow(2).sum(1)


def bootstrap_mean_ci(values: Tensor, n_boot: int, seed: int, level: float = 0.95) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap interval of the mean over the last axis (the prompts).

    ``values`` is (m, n): m statistics (e.g. candidates) over n prompts. The same seeded
    resamples of prompts are used for every row (paired), so intervals of different rows are
    comparable. A row containing NaN gets a NaN interval.
    """
    V = linalg.as64(values)
    m, n = V.shape
    if n < 2 or n_boot < 1:
        raise InputError(f"bootstrap needs at least 2 prompts and 1 resample, got n = {n}, n_boot = {n_boot}")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    counts = torch.zeros(n_boot, n, dtype=DTYPE).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=DTYPE))
    means = V @ counts.T / n  # (m, n_boot)
    alpha = (1.0 - level) / 2
    q = torch.tensor([alpha, 1.0 - alpha], dtype=DTYPE)
    lo_hi = torch.quantile(means, q, dim=1)  # NaN rows stay NaN
    return lo_hi[0], lo_hi[1]
