"""The causal check (SPEC §8): does a subspace carry the behaviour, not only the delta's energy?

Every score of the sweep is correlational. Here the delta is RESTRICTED to a subspace B and the
model is steered with what is left:

- behaviour ``b = logit(yes) − logit(no)`` at the last real token of each EVAL probe (raw text,
  like the label), for the first token of each answer (``answer_tokens``);
- effect ``E(w) = mean_i [b_i(α=+1) − b_i(α=−1)]`` under weight steering ``W ← W + α·w``
  (``effect``: two forward passes over the EVAL prompts, one per sign);
- ``w_writes``: the residual writers (o_proj, down_proj) of w at the scored layers, everything
  else dropped;
  ``w_B``: each writer's ΔW replaced by ``P_B·ΔW`` with the layer's basis B (writers write the
  residual directly, so this is residual coordinates, SPEC §4.1); the ablation ``(I − P_B)·ΔW``
  (``restrict``). ``w_B + w_ablate = w_writes`` exactly, and B = the whole space gives w_writes.
- ``kept = E(w_B)/E(w_writes)``, ``ablated = 1 − E(w_ablate)/E(w_writes)``, for the top K
  candidates of the joint ranking, the rank-matched oracle of the combined weight target, and a
  null of seeded random subspaces of the same per-layer ranks (``stable_seed``: identical in
  every process); z of kept and of ablated against that null.
- a retention curve over k ∈ {1, 2, 4, 8, 16, 32} for the combined oracle (its eigen-order) and
  the top candidate (its first k columns), also norm-matched (the restricted delta rescaled to
  the Frobenius norm of w_writes: a small subspace may carry the behaviour only when amplified).

Cost: 2 EVAL forward passes per restricted delta (each pass holds every EVAL prompt).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor, nn

from . import linalg
from .capture import _check_contiguous, encode, last_token_index
from .delta import writer_layer
from .errors import InputError
from .model import model_device
from .scoring import Target, energy, stable_seed
from .steering import weight_steer

#: The two answers of the probes (``... Answer Yes or No.``) as a reply begins with them: the
#: form a steering LoRA is trained to emit (its assistant turn starts "Yes, ..." / "No. ...").
#: BPE tokenizers (Qwen's, the toy's) have separate tokens for "Yes" and the mid-sentence " Yes";
#: on the tiny model's trained pair the untrained " Yes"/" No" even move the other way.
ANSWERS = ("Yes", "No")
CURVE_RANKS = (1, 2, 4, 8, 16, 32)
#: Fewest random subspaces per tested rank (SPEC §8: at least 5).
MIN_NULL_DRAWS = 5


@dataclass(frozen=True)
class AnswerTokens:
    """The token ids whose logits the behaviour compares, and how they were found."""

    yes: str
    no: str
    yes_id: int
    no_id: int
    yes_pieces: tuple[str, ...]
    no_pieces: tuple[str, ...]

    def describe(self) -> str:
        def one(text: str, tid: int, pieces: tuple[str, ...]) -> str:
            split = "" if len(pieces) == 1 else f" (the tokenizer splits it into {list(pieces)}; the first piece is used)"
            return f"`{text!r}` -> token id {tid} `{pieces[0]!r}`{split}"

        return (f"b = logit(yes) − logit(no) at the last real token: {one(self.yes, self.yes_id, self.yes_pieces)}; "
                f"{one(self.no, self.no_id, self.no_pieces)} (each answer encoded without special tokens, its first "
                "token taken).")


def answer_tokens(tokenizer, yes: str = ANSWERS[0], no: str = ANSWERS[1]) -> AnswerTokens:
    """The first token of each answer; InputError when an answer encodes to nothing or both
    answers start with the same token (the behaviour would then be identically 0)."""
    ids = {}
    for text in (yes, no):
        got = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not got:
            raise InputError(f"the tokenizer encodes the answer {text!r} to no token; the causal check needs one")
        ids[text] = got
    if ids[yes][0] == ids[no][0]:
        raise InputError(f"the answers {yes!r} and {no!r} start with the same token {ids[yes][0]}: "
                         "the tokenizer gives no single first token that tells them apart")
    pieces = {t: tuple(tokenizer.convert_ids_to_tokens(v)) for t, v in ids.items()}
    return AnswerTokens(yes, no, int(ids[yes][0]), int(ids[no][0]), pieces[yes], pieces[no])


def behaviour(model: nn.Module, tokenizer, texts: Sequence[str], answers: AnswerTokens) -> Tensor:
    """``logit(yes) − logit(no)`` at each prompt's last real token (float64, CPU): ONE forward
    pass over the decoder, the unembedding applied to the last positions only."""
    dev = model_device(model)
    enc = encode(tokenizer, texts, chat=False)
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    last = last_token_index(mask)
    _check_contiguous(mask, last)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
        h = hidden[torch.arange(ids.shape[0], device=dev), last]
        logits = model.get_output_embeddings()(h).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:  # Gemma2: the model's own logits are tanh-capped
            logits = torch.tanh(logits / cap) * cap
    return (logits[:, answers.yes_id] - logits[:, answers.no_id]).double().cpu()


def effect(model: nn.Module, tokenizer, delta: Mapping[str, Tensor], texts: Sequence[str],
           answers: AnswerTokens) -> tuple[float, Tensor]:
    """``E(w)`` and the per-prompt ``b(α=+1) − b(α=−1)`` (two forward passes; the model is
    restored bit for bit after each)."""
    per = []
    for alpha in (+1.0, -1.0):
        with weight_steer(model, delta, alpha):
            per.append(behaviour(model, tokenizer, texts, answers))
    diff = per[0] - per[1]
    return float(diff.mean()), diff


def restrict(delta: Mapping[str, Tensor], bases: Mapping[int, Tensor] | None = None, *,
             ablate: bool = False, layers: Sequence[int] | None = None,
             write_gains: Mapping[int, Mapping[str, Tensor]] | None = None) -> dict[str, Tensor]:
    """The residual writers of ``delta`` (o_proj, down_proj weights and biases) at ``layers``
    (default: every layer), projected onto span(B) of their layer (``ablate``: onto its
    complement), everything else dropped; ``bases=None``: the writers unchanged (w_writes).
    Behind a post-projection norm of gain γ (``write_gains[layer][writer]``) the residual sees
    ``diag(γ)·ΔW`` (SPEC §4.1), so the projection acts there: ``diag(γ)⁻¹ P_B diag(γ) ΔW``
    (a zero-gain channel writes nothing and stays 0). Products in float64, stored in the wider of
    float32 and the delta's dtype."""
    out: dict[str, Tensor] = {}
    for key, M in delta.items():
        wl = writer_layer(key)
        if wl is None or (layers is not None and wl[0] not in layers):
            continue
        layer, writer = wl
        dtype = torch.promote_types(M.dtype, torch.float32)
        if bases is None:
            out[key] = M.detach().to(dtype)
            continue
        if layer not in bases:
            raise InputError(f"no basis at layer {layer}, where the delta writes to the residual stream ({key})")
        B = linalg.as64(bases[layer])
        M64 = linalg.as64(M)
        gain = (write_gains or {}).get(layer, {}).get(writer)
        if gain is None:
            kept = B @ (B.T @ M64)
        else:
            g = linalg.as64(gain)
            shape = (-1,) + (1,) * (M64.dim() - 1)
            seen = B @ (B.T @ (g.reshape(shape) * M64))
            kept = torch.where(g.reshape(shape) != 0, seen / torch.where(g != 0, g, 1.0).reshape(shape), 0.0)
        out[key] = (M64 - kept if ablate else kept).to(dtype)
    return out


def frobenius(delta: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(linalg.as64(v).pow(2).sum()) for v in delta.values()))


def scaled(delta: Mapping[str, Tensor], norm: float) -> dict[str, Tensor]:
    """``delta`` rescaled to Frobenius norm ``norm`` (unchanged when it is zero)."""
    own = frobenius(delta)
    return dict(delta) if own == 0.0 else {k: (linalg.as64(v) * (norm / own)).to(v.dtype) for k, v in delta.items()}


# ---------------------------------------------------------------------------- the check


@dataclass
class CausalResult:
    table: pl.DataFrame  # one row per restricted delta (see ``COLUMNS``)
    answers: AnswerTokens
    effect_w: float
    effect_writes: float
    top: list[str]  # the tested candidates, best first
    n_null: int
    forward_passes: int


COLUMNS = {
    "kind": pl.String,  # reference | candidate | oracle | random | curve
    "name": pl.String,
    "rank": pl.Float64,  # mean effective rank over the scored layers
    "k": pl.Int64,  # curve: the number of leading directions (else null)
    "norm_matched": pl.Boolean,
    "R_w_combined": pl.Float64,  # of the tested subspace, mean over layers (the x of the figure)
    "effect": pl.Float64,  # E(w_B)
    "effect_ablated": pl.Float64,  # E(w_ablate)
    "kept": pl.Float64,
    "ablated": pl.Float64,
    "null_kept_mean": pl.Float64,
    "null_kept_sd": pl.Float64,
    "z_kept": pl.Float64,
    "null_ablated_mean": pl.Float64,
    "null_ablated_sd": pl.Float64,
    "z_ablated": pl.Float64,
}


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0.0 else math.nan


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan


def _z(x: float, mean: float, sd: float) -> float:
    return (x - mean) / sd if sd > 0.0 and math.isfinite(x) else math.nan


def null_bases(d: int, profile: Mapping[int, int], draw: int, seed: int) -> dict[int, Tensor]:
    """Random draw ``draw`` of the null for per-layer ranks ``profile``: seeded by (seed, draw,
    layer, rank) through ``stable_seed``, so identical in every process."""
    return {layer: linalg.random_orthonormal(d, r, torch.Generator().manual_seed(stable_seed("causal_null", seed, draw, layer, r)))
            for layer, r in sorted(profile.items())}


def run_causal(
    model: nn.Module,
    tokenizer,
    delta: Mapping[str, Tensor],
    texts: Sequence[str],
    ranked: Sequence[tuple[str, Mapping[int, Tensor]]],
    combined: Mapping[int, Target],
    *,
    k: int,
    n_null: int,
    seed: int,
    answers: AnswerTokens | None = None,
    write_gains: Mapping[int, Mapping[str, Tensor]] | None = None,
) -> CausalResult:
    """The causal table for the first ``k`` of ``ranked`` ((name, per-layer bases), best first),
    with ``combined[layer]`` the combined weight target of each scored layer (for the oracles)."""
    if n_null < MIN_NULL_DRAWS:
        raise InputError(f"--causal-null must be at least {MIN_NULL_DRAWS}, got {n_null}")
    answers = answers or answer_tokens(tokenizer)
    layers = sorted(combined)
    d = next(iter(combined.values())).d
    rows: list[dict] = []
    passes = 0

    def E(w: Mapping[str, Tensor]) -> float:
        nonlocal passes
        passes += 2
        return effect(model, tokenizer, w, texts, answers)[0]

    def R_w(bases: Mapping[int, Tensor]) -> float:
        vals = [energy(combined[layer], bases[layer]) / (bases[layer].shape[1] / d)
                for layer in layers if bases[layer].shape[1] > 0]
        return sum(vals) / len(vals) if len(vals) == len(layers) else math.nan

    e_w = E(delta)
    writes = restrict(delta, layers=layers, write_gains=write_gains)
    e_writes = E(writes)
    writes_norm = frobenius(writes)
    rows.append({"kind": "reference", "name": "w", "effect": e_w, "kept": _ratio(e_w, e_writes)})
    rows.append({"kind": "reference", "name": "w_writes", "effect": e_writes, "kept": 1.0 if e_writes else math.nan,
                 "R_w_combined": 1.0})

    def tested(kind: str, name: str, bases: Mapping[int, Tensor]) -> dict:
        e_b = E(restrict(delta, bases, layers=layers, write_gains=write_gains))
        e_abl = E(restrict(delta, bases, ablate=True, layers=layers, write_gains=write_gains))
        return {"kind": kind, "name": name, "rank": sum(int(bases[lay].shape[1]) for lay in layers) / len(layers),
                "R_w_combined": R_w(bases), "effect": e_b, "effect_ablated": e_abl,
                "kept": _ratio(e_b, e_writes), "ablated": 1.0 - _ratio(e_abl, e_writes)}

    top = list(ranked[:k])
    subjects = [tested("candidate", name, bases) for name, bases in top]
    profiles: dict[tuple[tuple[int, int], ...], list[dict]] = {}
    for (_, bases), row in zip(top, subjects):
        profiles.setdefault(tuple((lay, int(bases[lay].shape[1])) for lay in layers), []).append(row)
    for profile, members in profiles.items():
        ranks = dict(profile)
        tag = "@" + ",".join(str(r) for r in sorted(set(ranks.values())))
        oracle = tested("oracle", f"oracle_combined{tag}", {lay: combined[lay].oracle_basis(r) for lay, r in ranks.items()})
        draws = [tested("random", f"random_{i}{tag}", null_bases(d, ranks, i, seed)) for i in range(n_null)]
        km, ks = _mean_sd([r["kept"] for r in draws])
        am, asd = _mean_sd([r["ablated"] for r in draws])
        for row in (*members, oracle):
            row.update(null_kept_mean=km, null_kept_sd=ks, z_kept=_z(row["kept"], km, ks),
                       null_ablated_mean=am, null_ablated_sd=asd, z_ablated=_z(row["ablated"], am, asd))
        rows += [*members, oracle, *draws]

    # Retention curves: the combined oracle (eigen-order) and the top candidate's leading columns.
    curves = [("oracle_combined", {lay: combined[lay].oracle_basis(max(CURVE_RANKS)) for lay in layers})]
    if top:
        curves.append((top[0][0], dict(top[0][1])))
    for name, ordered in curves:
        width = min(int(ordered[lay].shape[1]) for lay in layers)
        for kk in [x for x in CURVE_RANKS if x <= min(width, d)]:
            bases = {lay: ordered[lay][:, :kk] for lay in layers}
            w_b = restrict(delta, bases, layers=layers, write_gains=write_gains)
            for matched, w in ((False, w_b), (True, scaled(w_b, writes_norm))):
                e_b = E(w)
                rows.append({"kind": "curve", "name": name, "rank": float(kk), "k": kk, "norm_matched": matched,
                             "R_w_combined": R_w(bases), "effect": e_b, "kept": _ratio(e_b, e_writes)})
    table = pl.DataFrame([{c: row.get(c) for c in COLUMNS} for row in rows], schema=COLUMNS)
    return CausalResult(table, answers, e_w, e_writes, [name for name, _ in top], n_null, passes)


def verdict(result: CausalResult) -> str:
    """One paragraph for conclusion.md: does the winner carry the behaviour, against the null?"""
    t = result.table
    if not result.top:
        return "Causal check: no candidate was tested."
    best = t.filter((pl.col("kind") == "candidate") & (pl.col("name") == result.top[0])).row(0, named=True)
    oracle = t.filter(pl.col("kind") == "oracle").row(0, named=True)

    def f(x, spec=".2f"):
        return "nan" if x is None or not math.isfinite(x) else format(x, spec)

    carries = best["z_kept"] is not None and math.isfinite(best["z_kept"]) and best["z_kept"] > 2.0
    lines = [
        f"Causal check (restricted steering, {result.answers.yes.strip()}/{result.answers.no.strip()} logit difference on "
        f"the EVAL probes): E(w) = {f(result.effect_w, '.3f')}, E(w_writes) = {f(result.effect_writes, '.3f')} "
        f"(the residual writers alone carry {f(_ratio(result.effect_writes, result.effect_w))} of the effect). "
        f"The delta restricted to the winner `{best['name']}` (rank {f(best['rank'], '.0f')}) keeps "
        f"{f(best['kept'])} of E(w_writes); {result.n_null} random subspaces of the same ranks keep "
        f"{f(best['null_kept_mean'])} ± {f(best['null_kept_sd'])} (z = {f(best['z_kept'], '.1f')}); the rank-matched "
        f"combined weight oracle keeps {f(oracle['kept'])}. Ablating the winner removes {f(best['ablated'])} of the "
        f"effect (random: {f(best['null_ablated_mean'])} ± {f(best['null_ablated_sd'])}).",
        "",
        ("Verdict: the winner carries more of the behaviour than a random subspace of its rank (z_kept > 2)."
         if carries else
         "Verdict: the winner does NOT carry more of the behaviour than a random subspace of its rank (z_kept ≤ 2): "
         "its weight-energy score is not evidence that it carries the behaviour."),
    ]
    if result.effect_writes == 0.0 or (result.effect_w * result.effect_writes) < 0:
        lines += ["", "Caveat: E(w_writes) is zero or has the opposite sign of E(w): the residual writers do not carry "
                      "the behaviour, and kept/ablated ratios are not meaningful."]
    return "\n".join(lines)
