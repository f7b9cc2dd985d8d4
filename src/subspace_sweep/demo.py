"""The offline demo: the tiny Qwen3 plus a delta PLANTED in one A-side candidate's span.

The delta's o_proj/down_proj columns lie in the planted candidate's basis at every planted
layer, so that candidate's weight energy is 1 (the Ky Fan maximum at its rank, gain 1) and it
must rank first on gain_w_combined among the A-side candidates, whatever its rank (SPEC §5's
rank-fair ranking: a larger basis containing it also reaches gain 1 and loses the tie to the
lower rank). A sweep that misses it is broken.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import torch

from . import publish
from .candidates import Candidate, get_spec
from . import linalg
from .delta import WRITER_SHORT, model_parameters, random_delta, save_delta
from .errors import InputError
from .model import WRITER_PROJS, load_model, n_layers_of, weight_key, write_gains
from .prompts import load_probe_set
from .report import rank_fair_order
from .a_side import build_a_side_for
from .config import SweepConfig
from .sweep import SweepResult, run_sweeps
from .toy import build_tiny_decoder, plant_outlier_gains, save_tiny_model

#: Frobenius norm of each planted tensor relative to the base weight: large enough that the
#: steered activations change measurably in float32, small enough to stay a perturbation.
PLANT_SCALE = 0.2
PLANT_RANK = 4
#: The demo's scratch folder in the temp folder: ``.subspace-sweep-demo.work-{owner}``.
WORK_NAME = "subspace-sweep-demo"


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The middle layers (the seed steered 8..21 of 28): all but the first and the last."""
    return tuple(range(1, n_layers - 1)) if n_layers > 2 else tuple(range(n_layers))


def base_candidates(model, tokenizer, layers: Sequence[int], config: SweepConfig) -> list[Candidate]:
    """The A-side candidates of the base model, exactly as the sweep builds them."""
    return build_a_side_for(model, tokenizer, config, layers, load_probe_set(config.n_fit)).candidates


def plant_in(model, candidate: Candidate, layers: Sequence[int], *, seed: int) -> dict[str, torch.Tensor]:
    """A delta whose o_proj/down_proj columns lie in ``candidate``'s basis at each layer, as the
    residual sees them: behind a post-projection norm of gain γ (SPEC §4.1) the columns are
    ``diag(γ)⁻¹·B·c``, so that the weight target ``diag(γ)·ΔW`` lies in span(B)."""
    delta: dict[str, torch.Tensor] = {}
    for layer in layers:
        B = candidate.bases[layer]
        if B.shape[1] == 0:
            raise InputError(f"--plant {candidate.name}: its basis is empty at layer {layer}; choose other --layers")
        gains = write_gains(model, layer)
        if not gains:  # both writers add to the residual directly: one draw for both
            delta.update(random_delta(model, [layer], rank=PLANT_RANK, seed=seed + layer, scale=PLANT_SCALE,
                                      projections=WRITER_PROJS, basis=B.float()))
            continue
        for i, proj in enumerate(WRITER_PROJS):
            gain = gains.get(WRITER_SHORT[proj])
            basis = B if gain is None else B / linalg.as64(gain)[:, None]
            delta.update(random_delta(model, [layer], rank=PLANT_RANK, seed=seed + layer + 7919 * i, scale=PLANT_SCALE,
                                      projections=[proj], basis=basis.float()))
    return delta


def planted_delta(model, tokenizer, plant: str, layers: Sequence[int], config: SweepConfig) -> dict[str, torch.Tensor]:
    """A delta planted in the base model's A-side candidate ``plant`` (see ``plant_in``)."""
    if get_spec(plant).side != "A":  # unknown name -> InputError before any work
        raise InputError(f"--plant {plant!r} is a B-side reference; plant an A-side candidate")
    candidates = base_candidates(model, tokenizer, layers, config)
    return plant_in(model, next(c for c in candidates if c.name == plant), layers, seed=config.seed)


@dataclass
class DemoOutcome:
    result: SweepResult
    plant: str
    rank_on_w: int  # 1 = first among A-side candidates on gain_w_combined (rank-fair order)
    pct_oracle_combined: float

    @property
    def recovered(self) -> bool:
        return self.rank_on_w == 1

    def verdict(self) -> str:
        state = "RECOVERED" if self.recovered else "NOT RECOVERED"
        return (f"planted candidate `{self.plant}`: rank {self.rank_on_w} on gain_w_combined among A-side candidates, "
                f"{self.pct_oracle_combined:.1f}% of the combined weight oracle -> {state}")


def plant_rank(summary: pl.DataFrame, plant: str) -> tuple[int, float]:
    """(place of ``plant`` among the A-side rows of ``summary`` on gain_w_combined, its pct of the
    combined weight oracle)."""
    order = rank_fair_order(summary.filter(pl.col("side") == "A"), "gain_w_combined", "z_w_combined")
    names = order["candidate"].to_list()
    row = order.filter(pl.col("candidate") == plant).row(0, named=True)
    return names.index(plant) + 1, float(row["pct_oracle_combined"])


def run_demo(config: SweepConfig, plant: str = "mlp_write", *, model_seed: int = 0) -> DemoOutcome:
    """Build and save the tiny model, plant a delta, run the whole sweep from the saved files."""
    # First finish what a killed demo left (its scratch folder, its staging), then every check
    # that needs only the options, before the model is built.
    publish.recover(tempfile.gettempdir(), WORK_NAME)
    for line in publish.recover_for(config.out) if config.out is not None else []:
        warnings.warn(line, stacklevel=2)
    if get_spec(plant).side != "A":  # unknown name -> InputError
        raise InputError(f"--plant {plant!r} is a B-side reference; plant an A-side candidate")
    config.validate()
    snapshot = publish.check_destination(config.out, overwrite=config.overwrite) if config.out is not None else None
    # The tiny model and the planted delta live in a scratch folder of this process.
    with publish.work_dir(tempfile.gettempdir(), WORK_NAME) as tmp:
        model_dir = save_tiny_model(Path(tmp) / "tiny-qwen3", seed=model_seed)
        model, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
        layers = config.layers or default_layers(n_layers_of(model))
        bad = [x for x in layers if not 0 <= x < n_layers_of(model)]
        if bad:
            raise InputError(f"--layers {bad} outside the tiny model's layers 0..{n_layers_of(model) - 1}")
        delta = planted_delta(model, tokenizer, plant, layers, config)
        delta_path = save_delta(delta, Path(tmp) / "planted_delta.safetensors")
        config = replace(config, model=str(model_dir), delta=str(delta_path), layers=tuple(layers),
                         dtype="float32", device="cpu")
        result = run_sweeps(config, [config.delta], snapshot=snapshot)[0]
    rank, pct = plant_rank(result.summary, plant)
    return DemoOutcome(result=result, plant=plant, rank_on_w=rank, pct_oracle_combined=pct)


#: SPEC §6 concern 14's toy: a tiny Gemma-2 (post-norm writers) whose writers' post-norm gains are
#: ×OUTLIER_FACTOR on these coordinates, and the residual energy of a delta's generic part against
#: its planted part (``plant_away_from``).
OUTLIER_COORDINATES = (3, 17, 29, 41)
OUTLIER_FACTOR = 300.0
OUTLIER_GENERIC_RATIO = 1000.0


def outlier_toy(config: SweepConfig):
    """(model, tokenizer, scored layers, A-side) of concern 14's toy (``OUTLIER_COORDINATES``)."""
    model, tok = build_tiny_decoder("gemma2", seed=0, n_layers=4)
    plant_outlier_gains(model, OUTLIER_COORDINATES, OUTLIER_FACTOR)
    layers = default_layers(model.config.num_hidden_layers)
    return model, tok, layers, build_a_side_for(model, tok, config, layers, load_probe_set(config.n_fit))


def plant_away_from(model, candidate: Candidate, layers: Sequence[int], coordinates: Sequence[int], *,
                    generic_ratio: float, seed: int) -> dict[str, torch.Tensor]:
    """A delta with two parts in every residual writer (SPEC §6 concern 14's toy):

    - planted: residual writes inside ``candidate``'s span and exactly zero on ``coordinates``
      (``B·N·C``, N the null space of B's rows there), mapped back through the post-norm gain as in
      ``plant_in``;
    - generic: a rank-2 update drawn in the writer's own (pre-gain) coordinates, as a LoRA would
      make it, scaled so that its residual energy ``‖diag(γ)·ΔW‖²`` is ``generic_ratio`` times the
      planted part's. Behind outlier gains its residual write sits on the outlier coordinates.

    Each tensor is then rescaled to ``PLANT_SCALE·‖W‖_F``. Needs rank B > len(coordinates)."""
    params = model_parameters(model)
    idx = list(coordinates)
    gen = torch.Generator().manual_seed(int(seed))
    delta: dict[str, torch.Tensor] = {}
    for layer in layers:
        B = linalg.as64(candidate.bases[layer])
        if B.shape[1] <= len(idx):
            raise InputError(f"{candidate.name}: rank {B.shape[1]} at layer {layer} leaves no direction away from "
                             f"{len(idx)} coordinates")
        N = torch.linalg.svd(B[idx, :])[2][len(idx):].T  # r x (r − k): B·N is zero on the coordinates
        gains = write_gains(model, layer)
        for proj in WRITER_PROJS:
            W = params[weight_key(layer, proj)].detach()
            n_in = int(W.shape[1])
            gain = gains.get(WRITER_SHORT[proj])
            g = torch.ones(W.shape[0], dtype=torch.float64) if gain is None else linalg.as64(gain)
            draw = lambda m, n: torch.randn(m, n, generator=gen, dtype=torch.float64)  # noqa: E731
            planted = B @ N @ draw(N.shape[1], PLANT_RANK) @ draw(PLANT_RANK, n_in)  # residual write
            generic = draw(W.shape[0], 2) @ draw(2, n_in)  # pre-gain
            generic *= math.sqrt(generic_ratio) * float(planted.norm()) / float((g[:, None] * generic).norm())
            tensor = planted / g[:, None] + generic
            tensor *= PLANT_SCALE * float(W.double().norm()) / float(tensor.norm())
            delta[weight_key(layer, proj)] = tensor.float()
    return delta
