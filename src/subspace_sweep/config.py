"""The configuration of a sweep (``SweepConfig``) and the checks that need nothing but it.

Both halves of a run read it: ``a_side.py`` (what the A-side and its cache key depend on) and
``sweep.py`` (everything else), so it lives below both. ``from subspace_sweep.sweep import
SweepConfig`` keeps working (a re-export).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .candidates import DEFINITIONS, GRAD_DEFINITIONS, PANEL_AXES
from .capture import LABEL_KINDS
from .causal import CENTRES, CURVE_RANKS, DEFAULT_ALPHAS, MIN_NULL_DRAWS, check_curve_ranks, read_behaviour_file
from .errors import InputError
from .strength import DEFAULT_STRENGTH, parse_strength

#: How many A-side candidates the joint ranking holds (known before anything is built).
JOINT_PANEL_SIZE = sum(1 for s in (*DEFINITIONS, *GRAD_DEFINITIONS) if s.side == "A" and s.axis_kind in PANEL_AXES["joint"])
#: Fewest bootstrap resamples (issue 26): each tail of the (1 − level) percentile interval rests on
#: at least ``BOOT_TAIL`` resamples (200 for a 95% interval); fewer print an "interval" that need not
#: hold its own estimate.
BOOT_TAIL = 5
#: Fewest Monte-Carlo null draws (issue 26): the MC z divides by the draws' sample SD, whose relative
#: error is ~1/√(2(n−1)) (7% at 100; at 2 draws it reported z 29.7 where the exact null gives 4.7).
MIN_MC_NULL = 100
#: ``--seed`` is an unsigned 32-bit integer: every consumer (torch generators, ``stable_seed``,
#: the demo's per-layer offsets) takes it, and JSON readers that parse numbers as doubles keep it exact.
SEED_MAX = 2**32 - 1


def parse_layers(text: str) -> tuple[int, ...]:
    """Layers written ``8..21``, ``8-21``, ``3,5,7`` or ``3 5 7`` (pieces may mix); a range must run
    upwards. ValueError otherwise (``--layers`` and a study spec's ``layers`` read them so)."""
    out: list[int] = []
    for piece in text.replace(",", " ").split():
        for sep in ("..", "-"):
            if sep in piece:
                a, b = (int(x) for x in piece.split(sep, 1))
                if b < a:
                    raise ValueError(f"the range {piece} runs backwards; write {b}{sep}{a}")
                out.extend(range(a, b + 1))
                break
        else:
            out.append(int(piece))
    if not out:
        raise ValueError("it names no layer")
    return tuple(out)



@dataclass(frozen=True)
class SweepConfig:
    model: str = "Qwen/Qwen3-0.6B"
    delta: str | None = None
    out: str | None = None
    r: int = 8
    k_broad: int | None = None  # None: 64, capped at d/4 (see resolved_k_broad)
    layers: tuple[int, ...] | None = None  # None: the layers where the delta writes to the residual stream
    n_fit: int | None = None  # None: first half of the probes
    dtype: str | None = None
    device: str | None = None
    null: str = "exact"  # "exact" or "mc" (seeded Monte-Carlo cross-check)
    n_null: int = 2000
    seed: int = 0
    label: str = "block_output"  # or "block_local": the change of (block output - block input)
    topic_holdout: int | None = None  # claims [0, N) trained the LoRA: also score on EVAL probes of the others
    n_boot: int = 2000  # bootstrap resamples of EVAL prompts for R_act / joint intervals (0: none)
    ci_level: float = 0.95
    a_side_cache: str | None = None  # folder of cached A-sides (see a_side.py); None: always build
    causal: int = 0  # restricted steering of the top K of the joint ranking (SPEC §8); 0: off
    causal_null: int = 8  # random subspaces per tested rank in the causal null
    causal_alpha: tuple[float, ...] = DEFAULT_ALPHAS  # the strength grid; the check reads the largest coherent α
    causal_strength: str = DEFAULT_STRENGTH  # "kl:T": each arm at a KL budget of T nats (issue 30); "grid": causal_alpha
    causal_centre: str = "auto"  # "auto": the midpoint where the delta holds it, else base; "base": θ ± α·w;
    # "midpoint": θ + (Δ⁺ + Δ⁻)/2 ± α·w/2 (needs the delta's centre; SPEC §8)
    causal_curve: tuple[int, ...] = CURVE_RANKS  # the retention curves' ranks k; (): none (most of the check's passes)
    behaviour: str | None = None  # JSONL behaviour set: the causal check's prompts and the gradient bases' examples
    n_train: int | None = None  # the examples the pair trained on: the first N claims / --behaviour lines (SPEC §13)
    overwrite: bool = False
    quiet: bool = False

    def validate(self) -> None:
        """Every check that needs only the options (the model's width and layer count are
        checked by ``validate_for_model`` once its config.json is read)."""
        if self.null not in ("exact", "mc"):
            raise InputError(f"--null must be 'exact' or 'mc', got {self.null!r}")
        if self.null == "mc" and self.n_null < MIN_MC_NULL:
            raise InputError(f"--n-null must be at least {MIN_MC_NULL} for a Monte-Carlo null (its z divides by the draws' "
                             f"sample SD), got {self.n_null}")
        if self.r <= 0:
            raise InputError(f"--r must be positive, got {self.r}")
        if not 0 <= self.seed <= SEED_MAX:
            raise InputError(f"--seed must be in 0..{SEED_MAX} (an unsigned 32-bit integer), got {self.seed}")
        if self.n_fit is not None and self.n_fit < 2:
            raise InputError(f"--n-fit is the number of FIT probes: need at least 2 FIT and 2 EVAL prompts, got {self.n_fit}")
        if self.layers is not None and not self.layers:
            raise InputError("--layers names no layer; give e.g. 8..21 or 3,5,7 (or leave it out: the delta's layers)")
        if self.label not in LABEL_KINDS:
            raise InputError(f"--label must be one of {', '.join(LABEL_KINDS)}, got {self.label!r}")
        if self.n_boot < 0 or not 0.0 < self.ci_level < 1.0:
            raise InputError(f"--n-boot must be >= 0 and the CI level in (0, 1), got {self.n_boot}, {self.ci_level}")
        if 0 < self.n_boot < self.min_boot():
            raise InputError(f"--n-boot {self.n_boot} is too few for a {self.ci_level:.0%} interval: at least "
                             f"{self.min_boot()} resamples put {BOOT_TAIL} in each of its tails (or 0: no interval)")
        if self.topic_holdout is not None and self.topic_holdout < 0:
            raise InputError(f"--topic-holdout must be >= 0, got {self.topic_holdout}")
        if self.k_broad is not None and self.k_broad <= 0:
            raise InputError(f"--k-broad must be positive, got {self.k_broad}")
        if not 0 <= self.causal <= JOINT_PANEL_SIZE:
            raise InputError(f"--causal must be in 0..{JOINT_PANEL_SIZE} (the candidates of the joint ranking), "
                             f"got {self.causal}")
        if self.causal and self.causal_null < MIN_NULL_DRAWS:
            raise InputError(f"--causal-null must be at least {MIN_NULL_DRAWS}, got {self.causal_null}")
        import math

        if not self.causal_alpha or not all(isinstance(a, (int, float)) and math.isfinite(a) and a > 0
                                            for a in self.causal_alpha):
            raise InputError(f"--causal-alpha needs one or more positive strengths, got {list(self.causal_alpha)}")
        if parse_strength(self.causal_strength) is not None and tuple(self.causal_alpha) != DEFAULT_ALPHAS:
            # a grid under a KL budget would be silently unread (a study's [run] table, a script's config)
            raise InputError(f"--causal-alpha {list(self.causal_alpha)} is the grid of --causal-strength grid; "
                             f"with --causal-strength {self.causal_strength} each arm's α is calibrated instead "
                             "(set causal_strength = \"grid\" to read the grid)")
        check_curve_ranks(self.causal_curve)
        if self.causal_centre not in CENTRES:
            raise InputError(f"--causal-centre must be one of {', '.join(CENTRES)}, got {self.causal_centre!r}")
        if self.behaviour is not None:
            rows = read_behaviour_file(self.behaviour)  # a malformed file: refused before any work
            if self.n_train is not None and not 1 <= self.n_train <= len(rows):
                raise InputError(f"--n-train {self.n_train}: the pair trained on the first N lines of --behaviour "
                                 f"{self.behaviour}, which has {len(rows)}; N must be in 1..{len(rows)}")
        elif self.n_train is not None and self.n_train < 1:
            raise InputError(f"--n-train must be >= 1 (the first N shipped claims trained the pair), got {self.n_train}")

    def min_boot(self) -> int:
        """The fewest resamples ``n_boot`` may be, other than 0 (see ``BOOT_TAIL``)."""
        import math

        return math.ceil(BOOT_TAIL / ((1.0 - self.ci_level) / 2) - 1e-9)

    def validate_for_model(self, d: int, n_layers: int, where: str) -> None:
        """The checks that need the residual width ``d`` and the layer count (read from the model's
        config, ``where``), before any weight is loaded."""
        if self.r >= d:
            raise InputError(f"--r {self.r} must be below the residual width d = {d} ({where}): a rank-d basis is the "
                             "whole residual stream, whose energy is 1 for every target and whose gain is 0/0")
        if self.k_broad is not None and self.k_broad > d:
            raise InputError(f"--k-broad {self.k_broad} exceeds the residual width d = {d} ({where})")
        if self.layers is not None:
            bad = sorted({x for x in self.layers if not 0 <= x < n_layers})
            if bad:
                raise InputError(f"--layers {bad} outside the model's layers 0..{n_layers - 1} ({where})")

    def scored_layers(self, delta, n_layers: int) -> list[int]:
        """The layers a sweep of ``delta`` scores: ``--layers`` (each in the model and with a nonzero
        residual writer of the delta), else every layer where the delta writes to the residual stream."""
        from .delta import residual_writer_tensors, scored_layers

        if self.layers is None:
            layers = scored_layers(delta)
        else:
            layers = sorted(set(int(x) for x in self.layers))
            bad = [x for x in layers if not 0 <= x < n_layers]
            if bad:
                raise InputError(f"--layers {bad} outside the model's layers 0..{n_layers - 1}")
            missing = [x for x in layers if not residual_writer_tensors(delta, x)]
            if missing:
                raise InputError(f"--layers {missing}: the delta has no nonzero o_proj/down_proj tensor there")
        if not layers:
            raise InputError("no scored layers: the delta has no nonzero o_proj/down_proj tensor")
        return layers

    def resolved_k_broad(self, d: int) -> int:
        """K_BROAD of SPEC §2 (64), capped at d/4: projecting away 64 of 64 dimensions (the tiny
        model) would leave every write-not-read basis empty."""
        return self.k_broad if self.k_broad is not None else min(64, d // 4)

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["causal_alpha"] = list(self.causal_alpha)
        d["causal_curve"] = list(self.causal_curve)
        return d
