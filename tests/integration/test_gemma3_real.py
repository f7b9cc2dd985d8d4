"""The second real-model tier (issue 31): Gemma-3-270m, the hard case. A base model (no chat
template: SPEC §8's plain-text answer format), ``gemma3_text`` with post-norms of ``1 + weight``
gains behind both residual writers (SPEC §4.1), massive activations (coordinate 163's residual RMS
~850x the median), a 262k vocabulary; Q4_K_M in five data packages (Gemma terms of use: the notice
beside the shipped pair). A real trained sycophancy LoRA pair is shipped as test data
(tests/integration/data/gemma3_pair).

What it holds the method to:
- the model assembled from its packages is the pinned file, converted exactly;
- every read basis, circuit (with the post-norm gains) and the attention sink against the real
  modules, the gain-free seed construction failing them (SPEC §6 concern 10);
- concern 14 on real weights: the concentration warning fires and names coordinates whose scale
  the test reads from the model's own hidden states; a delta planted in each candidate's span is
  recovered first in the standardized view; the conclusion, the BLUF and the figures lead with it;
- the base-model answer format: the answers get more than 0.3 of the probability where the
  behaviour is read (the raw text's last token: 1e-4, a strict xfail);
- the trained pair shows the behaviour on held-out probes;
- the sweep of the pair: golden rankings in both views (the causal check is left to the README's
  real run: its steered passes cost more than the rest of the tier).

Runs whenever the five Gemma packages and gguf are installed (make test installs them); skips with
the pip command otherwise. The session's closing summary gives the seconds of each part.
"""

from __future__ import annotations

import copy
import json
import re

import polars as pl
import pytest
import torch

from subspace_sweep.arch import architecture_of
from subspace_sweep.candidates import A_SIDE_NAMES
from subspace_sweep.capture import a_side_conditions, encode, record_activations
from subspace_sweep.demo import plant_in
from subspace_sweep.model import block_name, write_gains
from subspace_sweep.outliers import SOURCE_RATIO
from subspace_sweep.prompts import load_probe_set
from tests.helpers_outliers import check_coordinate_rms_against_the_forward, check_transforms_against_the_modules
from tests.helpers_sweep import standardized_weight_summary
from tests.integration.conftest import GEMMA, GEMMA_PAIR, GEMMA_SHA256, GEMMA_TIMES, timed
from tests.module_checks import check_bases_span_the_modules, check_ov_circuit, check_qk_circuit, check_readers, weights_for

pytestmark = pytest.mark.integration
PROBES = load_probe_set()
#: Held out from the pair's training: claims 20..31 (the LoRA trained on the first 20).
HELD_OUT = PROBES.prompts[PROBES.n_lora_train_topics:]
#: Layers the module checks and the planted recovery look at: the first, a middle and the last of
#: the pair's (5..13); 5 and 11 hold a full-attention layer's neighbours, 11 is one (every 6th).
CHECK_LAYERS = (5, 11, 13)
LEGACY_GAINS = pytest.param("legacy_gain_free", marks=pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="legacy (seed v7): circuits and read bases ignore the RMSNorm gains (SPEC §6 concern 10); Gemma's "
           "`1 + weight` gains are nothing like ones"))


# ----------------------------------------------------------------------------- the model itself


def test_the_packages_assemble_the_pinned_gguf(gemma_converted):
    rec = gemma_converted.record
    assert rec["gguf_sha256"] == GEMMA_SHA256 and rec["architecture"] == "gemma3"
    assert rec["model_type"] == "gemma3_text" and (rec["d"], rec["n_layers"]) == (640, 18)
    assert rec["chat_template"] is False  # a base model: SPEC §8's plain-text format
    q = rec["quantization"]
    assert q["file_type"] == "MOSTLY_Q4_K_M" and q["tensor_types"] == {"F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9,
                                                                      "Q8_0": 10}


# ----------------------------------------------------------------------------- circuits vs the modules


@pytest.mark.parametrize("method", ["residual", LEGACY_GAINS])
def test_readers_and_unembedding_are_what_the_real_modules_multiply_by(gemma, method):
    model, _ = gemma
    with timed("module checks", GEMMA_TIMES):
        check_readers(model, weights_for(model, method), layers=CHECK_LAYERS)


@pytest.mark.parametrize("method", ["residual", LEGACY_GAINS])
def test_qk_circuit_is_each_real_heads_score_form(gemma, method):
    """Gemma 3 has q_norm/k_norm: the QK circuit carries γ_in and γ_q ⊙ γ_k (SPEC §4.1)."""
    model, _ = gemma
    with timed("module checks", GEMMA_TIMES):
        check_qk_circuit(model, weights_for(model, method), layers=CHECK_LAYERS)


@pytest.mark.parametrize("method", ["residual", LEGACY_GAINS])
@pytest.mark.parametrize("layer", [5, 11])
def test_ov_circuit_reproduces_the_real_attention_output(gemma, method, layer):
    model, tok = gemma
    with timed("module checks", GEMMA_TIMES):
        check_ov_circuit(model, tok, weights_for(model, method), layer, PROBES.fit[0])


def test_weight_bases_span_the_real_modules(gemma, gemma_run):
    """Readers, the unembedding (262k rows, through the final norm's `1 + weight` gain), the OV and
    QK circuits, the MLP round trip, the gate kernel (with the MLP's own activations) and the
    attention sink (through a real 1-token forward pass) at three scored layers."""
    model, tok = gemma
    candidates = [c for c in gemma_run.result.candidates if c.side == "A"]
    mlp = architecture_of(model.config).mlp
    names = [f"{block_name(layer)}.{mlp}" for layer in CHECK_LAYERS]
    enc = tok(list(PROBES.fit), return_tensors="pt", padding=True)  # the A-side's clean condition
    last = enc["attention_mask"].long().cumsum(1).argmax(1)  # each prompt's last real token, either padding side
    with timed("module checks", GEMMA_TIMES):
        with torch.no_grad(), record_activations(model, names, inputs=True, outputs=False) as rec:
            model(**enc)
        inputs = {layer: rec.input(n)[torch.arange(len(last)), last] for layer, n in zip(CHECK_LAYERS, names)}
        worst = check_bases_span_the_modules(model, tok, candidates, CHECK_LAYERS, r=8, mlp_inputs=inputs)
    assert set(worst) >= {"attn_qkv_read", "lm_head_read", "attn_ov_write", "gate_kernel", "attention_sink",
                          "mlp_roundtrip_write"}


def test_the_standardized_view_against_the_real_modules(gemma, gemma_run):
    """The A-side's coordinate RMS against the model's own forward pass, and the vector / covector
    transforms against its MLP readers and o_proj behind its post-norm (SPEC §5, concern 14)."""
    from subspace_sweep.outliers import StandardizedView

    model, tok = gemma
    with timed("module checks", GEMMA_TIMES):
        check_coordinate_rms_against_the_forward(model, tok, gemma_run.a_side, PROBES)
        for layer in (5, 13):
            check_transforms_against_the_modules(model, layer, StandardizedView.of(gemma_run.a_side.coordinate_rms[layer]))


# ----------------------------------------------------------------------------- concern 14 on real weights


def _hidden_state_rms(model, tok) -> dict[int, torch.Tensor]:
    """Each block output's coordinate RMS over every real token of the persona± FIT prompts, from
    the model's own ``output_hidden_states`` (not the A-side's captures)."""
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for name, (texts, chat) in a_side_conditions(tok, PROBES).items():
        if not name.startswith("persona"):
            continue
        enc = encode(tok, texts, chat=chat)
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states
        real = enc["attention_mask"].bool()
        count += int(real.sum())
        for layer in range(len(hidden) - 2):  # hidden[l + 1] is block l's output; the last is after the final norm
            sums[layer] = sums.get(layer, 0.0) + hidden[layer + 1][real].double().pow(2).sum(0)
    return {layer: (s / count).sqrt() for layer, s in sums.items()}


def test_the_warning_fires_and_names_coordinates_the_hidden_states_say_are_outliers(gemma, gemma_run):
    """The combined weight target sits on its top-8 coordinates at most scored layers; the warning
    names the eight coordinates met most often, and a coordinate it gives a source to is one by the
    model's own scales: its RMS in the residual stream (read here from the hidden states) ≥ 10x the
    median, or its writer's post-norm gain ≥ 10x its median, at some scored layer; coordinate 163
    (RMS ~850x the median at the scored layers) among them."""
    model, tok = gemma
    result = gemma_run.result
    assert result.outlier_warning is not None and result.leading_view == "standardized"
    top8 = result.spectra.filter(pl.col("target") == "combined_top8_coordinates")
    assert (top8["energy"] > 0.5).sum() >= len(result.scored_layers) // 2, top8
    with timed("hidden-state scales", GEMMA_TIMES):
        rms = _hidden_state_rms(model, tok)
    named = result.outlier_coordinates
    assert 163 in named and len(named) == 8
    for j in named:
        ratios = [float(rms[layer][j] / rms[layer].median()) for layer in result.scored_layers]
        gains = [float(g.abs()[j] / g.abs().median()) for layer in result.scored_layers
                 for g in write_gains(model, layer).values()]
        # a coordinate the warning gives a source ("163: ...") is one by the model's own scales; one it
        # lists as "also ... (no norm gain or residual scale ≥ 10x its median)" is not (measured: 65,
        # residual RMS 4.8x, post-norm gain 9.4x its median: concentrated, not an outlier)
        sourced = re.search(rf"(?<![0-9]){j}: ", result.outlier_warning) is not None
        if sourced:
            assert max(ratios) >= SOURCE_RATIO or max(gains) >= SOURCE_RATIO, (j, max(ratios), max(gains))
        else:
            assert re.search(rf"(?<![0-9]){j}(?![0-9])", result.outlier_warning.split("; also ")[-1]), j
    assert re.search(r"(?<![0-9])163: ", result.outlier_warning), result.outlier_warning
    assert min(float(rms[layer][163] / rms[layer].median()) for layer in result.scored_layers) > 100.0


def test_the_bluf_and_the_figures_lead_with_the_standardized_view(gemma_run):
    """SPEC §12: where the warning fires, the BLUF's numbers are the standardized view's, the
    residual ones beside them marked as decided by the named coordinates (which views' winners the
    causal check tests: tests/unit/test_outliers.py, causal_candidates)."""
    result, out = gemma_run.result, gemma_run.out
    text = (out / "conclusion.md").read_text()
    bluf = text.split("## BLUF", 1)[1].split("##", 1)[0]
    best = result.ranking("joint", "standardized").filter(pl.col("axis_kind").is_in(["write", "mixed"])).row(0, named=True)
    coords = ", ".join(str(j) for j in result.outlier_coordinates)
    assert bluf.lstrip().startswith("The standardized view leads this report")
    assert f"**`{best['candidate']}`**" in bluf and "in the standardized view" in bluf
    assert f"| standardized (leads) | {best['joint_gain_std']:.3f} |" in bluf
    assert f"| residual (decided by coordinates {coords}) | {best['joint_gain']:.3f} |" in bluf
    assert "In residual coordinates (the seed's view; decided by coordinates" in bluf


# ----------------------------------------------------------------------------- planted recovery


def test_every_a_side_candidate_planted_in_the_real_weights_ranks_first_in_the_standardized_view(gemma, gemma_run):
    """A delta planted in each candidate's span (behind the post-norm gains, SPEC §4.1) at three
    scored layers is ranked first among the 43 A-side candidates by gain_w_combined_std; a candidate
    the view maps as a vector (the plant's own transform) reaches ≥ 95% of the standardized combined
    oracle. The read-side bases (covectors: the view scales them by σ, the planted write columns by
    1/σ) and the random baseline (uniform) cannot hold a plant made in residual coordinates whole:
    measured 58-92% there on Gemma's scales, still first."""
    from subspace_sweep.candidates import get_spec
    from subspace_sweep.outliers import transform_of

    model, _ = gemma
    candidates = [c for c in gemma_run.result.candidates if c.name in A_SIDE_NAMES]
    assert [c.name for c in candidates] == list(A_SIDE_NAMES)
    gains = {layer: write_gains(model, layer) for layer in CHECK_LAYERS}
    missed, partial = {}, {}
    with timed("planted recovery, 43 candidates (standardized view)", GEMMA_TIMES):
        for i, c in enumerate(candidates):
            delta = plant_in(model, c, CHECK_LAYERS, seed=2000 + i)
            summary = standardized_weight_summary(candidates, delta, CHECK_LAYERS, gemma_run.a_side.coordinate_rms, gains)
            names = summary["candidate"].to_list()
            pct = float(summary.filter(pl.col("candidate") == c.name)["pct_oracle_combined_std"][0])
            vector = transform_of(get_spec(c.name).family) == "vector"
            if names.index(c.name) != 0 or (vector and pct < 95.0):
                missed[c.name] = (names.index(c.name) + 1, round(pct, 1))
            elif not vector:
                partial[c.name] = round(pct, 1)
    assert not missed, f"planted candidates not recovered first (rank, % of oracle): {missed}"
    assert set(partial) <= {"lm_head_read", "logits_null", "global_read", "mlp_up_read", "mlp_gate_read",
                            "attn_qkv_read", "qk_circuit", "input_super", "kv_super", "input_super_not_lm_read",
                            "randn_orthogonal"}, partial


# ----------------------------------------------------------------------------- the base-model answer


@pytest.mark.parametrize("position", ["answer", pytest.param("legacy_raw_text", marks=pytest.mark.xfail(
    strict=True, reason="legacy: the raw probe's last token is where a base model continues the text; the two answers "
                        "get ~1e-4 of the probability there (SPEC §6 concern 13, §8 base models)"))])
def test_the_behaviour_is_read_where_the_base_model_answers(gemma, position):
    """SPEC §8's plain-text format (the probe, a newline and "Answer:", the answers " Yes"/" No"):
    the unsteered model gives the two answers ≥ 0.3 of the probability (measured 0.39)."""
    from subspace_sweep.causal import BehaviourSet, answer_tokens, behaviour_and_mass

    model, tok = gemma
    bset = (BehaviourSet.from_probes(tok, PROBES.eval) if position == "answer"
            else BehaviourSet.from_probes(tok, PROBES.eval, answer_tokens(tok), raw=True))
    with timed("answer mass", GEMMA_TIMES):
        _, mass = behaviour_and_mass(model, tok, bset.texts, bset)
    if position == "answer":
        assert bset.form == "plain" and "after the plain-text answer cue" in bset.description
        assert tok.convert_ids_to_tokens(bset.first_ids[0]) == "▁Yes"
    assert float(mass.mean()) >= 0.3, float(mass.mean())


def _agreement(model, tok, texts):
    """Per prompt: P(" Yes")/(P(" Yes") + P(" No")) and the two answers' mass where the base model answers."""
    from subspace_sweep.causal import BehaviourSet, behaviour_and_mass

    bset = BehaviourSet.from_probes(tok, texts)
    b, mass = behaviour_and_mass(model, tok, bset.texts, bset)
    return torch.sigmoid(b), mass


#: The + model must agree (mean over the held-out probes) this much more often than the − model.
AGREEMENT_MARGIN = 0.5


def test_the_trained_pair_shows_the_behaviour_on_held_out_probes(gemma):
    from peft import PeftModel

    model, tok = gemma
    stats = {}
    with timed("the pair's behaviour (two merges)", GEMMA_TIMES):
        for side in ("pos", "neg"):
            merged = PeftModel.from_pretrained(copy.deepcopy(model), str(GEMMA_PAIR / side)).merge_and_unload()
            agree, mass = _agreement(merged, tok, HELD_OUT)
            stats[side] = {"agree": float(agree.mean()), "mass": float(mass.mean())}
            del merged
    assert stats["pos"]["mass"] > 0.3 and stats["neg"]["mass"] > 0.3, stats
    assert stats["pos"]["agree"] - stats["neg"]["agree"] >= AGREEMENT_MARGIN, stats
    manifest = json.loads((GEMMA_PAIR / "manifest.json").read_text())
    assert manifest["answer_format"] == "plain" and manifest["model"] == GEMMA


# ----------------------------------------------------------------------------- the sweep of the pair


def test_golden_rankings_of_the_real_pair_in_both_views(gemma_run, num_regression, data_regression):
    """The top 10 of the joint ranking in each view, and their gains to 2 decimals (regenerate with
    ``--force-regen`` for a deliberate methodology change only, and say so)."""
    result = gemma_run.result
    res, std = result.ranking("joint").head(10), result.ranking("joint", "standardized").head(10)
    data_regression.check({"top10_by_joint_gain": res["candidate"].to_list(),
                           "top10_by_joint_gain_std": std["candidate"].to_list()})
    num_regression.check({**{c: res[c].to_numpy() for c in ("joint_gain", "gain_act", "gain_w_combined")},
                          **{c: std[c].to_numpy() for c in ("joint_gain_std", "gain_act_std", "gain_w_combined_std")}},
                         default_tolerance={"atol": 0.005, "rtol": 0.0})


def test_the_manifest_records_the_assembled_gguf(gemma_run):
    m = json.loads((gemma_run.out / "manifest.json").read_text())
    assert m["model"] == GEMMA and m["model_source"]["gguf_sha256"] == GEMMA_SHA256
    assert m["model_source"]["gguf_quantization"]["file_type"] == "MOSTLY_Q4_K_M"
