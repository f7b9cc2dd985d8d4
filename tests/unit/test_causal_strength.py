"""The causal check's strength and centre (SPEC §8, issue 25): the strength grid and its rule, the
pair's midpoint as the centre, the delta file that carries it, and the progress bar."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch
from torch import nn

from subspace_sweep import cli
from subspace_sweep.causal import (
    COHERENT_SHARE,
    MIN_ANSWER_MASS,
    AnswerTokens,
    BehaviourSet,
    causal_plan,
    choose_alpha,
    run_causal,
    steered_behaviour,
    verdict,
)
from subspace_sweep.delta import CENTRE_PREFIX, load_centre, load_delta, pair_from_peft, save_delta
from subspace_sweep.errors import InputError
from subspace_sweep.prompts import load_probe_set
from subspace_sweep.sweep import weight_targets

EVAL = load_probe_set().eval


# ----------------------------------------------------------------------------- the rule


def test_choose_alpha_takes_the_largest_strength_whose_mass_stays_at_half_the_reference():
    masses = {0.25: (0.5, 0.45), 0.5: (0.3, 0.226), 1.0: (0.9, 0.05)}
    assert choose_alpha(0.45, masses) == (0.5, True)  # floor 0.225: 1.0 fails on its −α side
    assert choose_alpha(0.45, {**masses, 0.5: (0.3, 0.224)}) == (0.25, True)
    assert choose_alpha(0.45, {**masses, 0.5: (0.3, 0.225)}) == (0.5, True)  # at the floor itself: coherent
    # a model with almost no mass unsteered: the floor is half of MIN_ANSWER_MASS, not half of ~0
    assert choose_alpha(1e-5, {0.5: (0.06, 0.06), 1.0: (0.04, 0.9)}) == (0.5, True)
    assert COHERENT_SHARE * MIN_ANSWER_MASS == pytest.approx(0.05)
    # none coherent: the smallest strength, flagged
    assert choose_alpha(0.45, {0.5: (0.1, 0.1), 1.0: (0.01, 0.9)}) == (0.5, False)


class _CoherenceToy(nn.Module):
    """A model built to lose its answer format above a known strength: one residual writer
    (``model.layers.0.mlp.down_proj``, d = 2, zero) whose output h is read as logits
    ``yes = k·h₀, no = −k·h₀, garbage = g·|h₀|`` (and 0 for the other V − 3 tokens). Steering by
    ±α·w with w = e₀ gives h₀ = ±α, so the answer mass is (e^{kα} + e^{−kα}) / (e^{kα} + e^{−kα}
    + e^{gα} + V − 3) under either sign."""

    V, K, G = 8, 2.0, 4.0

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"final_logit_softcapping": None, "hidden_size": 2, "num_hidden_layers": 1})()

        class Mlp(nn.Module):
            def __init__(self):
                super().__init__()
                self.down_proj = nn.Linear(1, 2, bias=False)
                nn.init.zeros_(self.down_proj.weight)

        class Layer(nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = Mlp()

        class Decoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList([Layer()])

            def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
                h = self.layers[0].mlp.down_proj(torch.ones(*input_ids.shape, 1))
                feats = torch.stack([h[..., 0], h[..., 0].abs()], dim=-1)
                return type("Out", (), {"last_hidden_state": feats})()

        self.model = Decoder()
        self.lm_head = nn.Linear(2, self.V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            self.lm_head.weight[1, 0], self.lm_head.weight[2, 0], self.lm_head.weight[3, 1] = self.K, -self.K, self.G

    def get_output_embeddings(self):
        return self.lm_head

    @classmethod
    def mass(cls, alpha: float) -> float:
        a, b = math.exp(cls.K * alpha), math.exp(-cls.K * alpha)
        return (a + b) / (a + b + math.exp(cls.G * alpha) + cls.V - 3)


def _coherence_case(tiny, alphas):
    _, tok = tiny
    model = _CoherenceToy()
    key = "model.layers.0.mlp.down_proj.weight"
    delta = {key: torch.tensor([[1.0], [0.0]])}
    answers = AnswerTokens("Yes", "No", 1, 2, ("Yes",), ("No",))
    bset = BehaviourSet.from_probes(tok, EVAL[:2], answers)
    targets = {0: weight_targets(delta, 0)["combined"]}
    e0 = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    return run_causal(model, tok, delta, bset.texts, [("e0", {0: e0})], targets, k=1, n_null=5, seed=0,
                      answers=bset, alphas=alphas)


def test_the_alpha_chosen_is_the_one_the_rule_names_on_a_model_that_loses_coherence(tiny):
    """Masses 0.25 unsteered, 0.226 at 0.25, 0.199 at 0.5 and 0.112 at 1 against the floor
    0.5 × 0.25 = 0.125: the check reads α = 0.5, and says so."""
    masses = {a: _CoherenceToy.mass(a) for a in (0.0, 0.25, 0.5, 1.0)}
    assert masses[0.5] >= COHERENT_SHARE * masses[0.0] > masses[1.0]  # the model is what it says
    res = _coherence_case(tiny, (1.0, 0.25, 0.5))
    assert (res.alpha, res.coherent) == (0.5, True)
    strength = res.table.filter(pl.col("kind") == "strength").sort("alpha")
    assert strength["alpha"].to_list() == [0.25, 0.5, 1.0]
    for row in strength.iter_rows(named=True):
        assert row["mass_plus"] == pytest.approx(masses[row["alpha"]], rel=1e-5)
        assert row["mass_minus"] == pytest.approx(masses[row["alpha"]], rel=1e-5)
    t = res.table
    others = t.filter(~pl.col("kind").is_in(["strength"]) & (pl.col("name") != "alpha_0"))
    assert set(others["alpha"].to_list()) == {0.5}  # everything else is read at the chosen α
    w = t.filter(pl.col("name") == "w").row(0, named=True)
    assert w["mass_plus"] == pytest.approx(masses[0.5], rel=1e-5)
    assert "the check reads α = 0.5, the largest whose mass" in verdict(res)
    # a grid that never stays coherent: its smallest strength, and the verdict says none did
    res = _coherence_case(tiny, (1.0, 2.0))
    assert (res.alpha, res.coherent) == (1.0, False)
    assert "NONE of the grid keeps the mass" in verdict(res)


def test_the_progress_bar_counts_every_steered_delta(tiny, capsys):
    res = _coherence_case(tiny, (0.25, 0.5, 1.0))
    # the candidate's curve at its full rank (1) and trained norm is its own row: one delta fewer
    n = causal_plan(3, 1, 1, 5, int((res.table["kind"] == "curve").sum()) // 2, n_curve_reused=1)
    assert res.forward_passes == 1 + 2 * n
    _, tok = tiny
    model = _CoherenceToy()
    key = "model.layers.0.mlp.down_proj.weight"
    delta = {key: torch.tensor([[1.0], [0.0]])}
    bset = BehaviourSet.from_probes(tok, EVAL[:2], AnswerTokens("Yes", "No", 1, 2, ("Yes",), ("No",)))
    run_causal(model, tok, delta, bset.texts, [("e0", {0: torch.tensor([[1.0], [0.0]], dtype=torch.float64)})],
               {0: weight_targets(delta, 0)["combined"]}, k=1, n_null=5, seed=0, answers=bset,
               alphas=(0.25, 0.5, 1.0), progress=True)
    err = capsys.readouterr().err
    assert "causal check" in err and f"{n}/{n}" in err


# ----------------------------------------------------------------------------- the midpoint


@pytest.fixture(scope="module")
def pair(lora_pair):
    from subspace_sweep.model import load_model

    model_dir, pos, neg = lora_pair
    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    w, centre = pair_from_peft(model_dir, pos, neg)
    return model, tok, w, centre, pos, neg


def _merged(model, adapter):
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).merge_and_unload()


def test_the_midpoint_steered_at_alpha_1_is_the_two_trained_models(pair):
    """θ + (Δ⁺ + Δ⁻)/2 ± w/2: the logits of the merged + and − models (to float32 rounding)."""
    from subspace_sweep.steering import weight_steer

    model, tok, w, centre, pos, neg = pair
    enc = tok(list(EVAL[:4]), return_tensors="pt", padding=True)
    with torch.no_grad():
        want = {+1: _merged(model, pos)(**enc).logits, -1: _merged(model, neg)(**enc).logits}
        for sign in (+1, -1):
            with weight_steer(model, centre, 1.0), weight_steer(model, w, sign * 0.5):
                got = model(**enc).logits
            torch.testing.assert_close(got, want[sign], rtol=1e-5, atol=1e-5)
            with weight_steer(model, w, sign * 1.0):  # the base-centred steering is another model
                assert float((model(**enc).logits - want[sign]).abs().max()) > 1e-3


def test_the_midpoint_check_reads_the_trained_models_at_alpha_1(pair):
    """run_causal with the centre: its α = 1 strength row is b and mass of the two merged models."""
    from subspace_sweep.causal import behaviour_and_mass

    model, tok, w, centre, pos, neg = pair
    layers = [1, 2]
    targets = {layer: weight_targets(w, layer)["combined"] for layer in layers}
    res = run_causal(model, tok, w, EVAL[:4], [], targets, k=0, n_null=5, seed=0, alphas=(1.0,), centre=centre)
    assert res.centre == "midpoint"
    bset = res.answers
    row = res.table.filter(pl.col("kind") == "strength").row(0, named=True)
    b_pos, m_pos = behaviour_and_mass(_merged(model, pos), tok, bset.texts, bset)
    b_neg, m_neg = behaviour_and_mass(_merged(model, neg), tok, bset.texts, bset)
    assert row["effect"] == pytest.approx(float((b_pos - b_neg).mean()), rel=1e-4, abs=1e-4)
    assert row["mass_plus"] == pytest.approx(float(m_pos.mean()), rel=1e-4)
    assert row["mass_minus"] == pytest.approx(float(m_neg.mean()), rel=1e-4)
    assert "around the pair's midpoint" in verdict(res) or not res.top  # (no candidate tested here)


def test_delta_files_carry_the_midpoint_beside_w(pair, tmp_path):
    _, _, w, centre, _, _ = pair
    path = save_delta(w, tmp_path / "w.safetensors", centre=centre)
    assert set(load_delta(path)) == set(w)  # the centre is not part of the delta
    back = load_centre(path)
    assert set(back) == set(centre) and all(torch.equal(back[k], centre[k]) for k in centre)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert {k for k in f.keys() if k.startswith(CENTRE_PREFIX)} == {CENTRE_PREFIX + k for k in centre}
    plain = save_delta(w, tmp_path / "plain.safetensors")
    with pytest.raises(InputError, match="holds w only"):
        load_centre(plain)


def test_the_delta_command_stores_the_midpoint_and_run_refuses_a_file_without_it(lora_pair, tmp_path, capsys):
    model_dir, pos, neg = lora_pair
    out = tmp_path / "w.safetensors"
    assert cli.main(["delta", "--model", str(model_dir), "--adapter-pos", str(pos), "--adapter-neg", str(neg),
                     "--out", str(out)]) == 0
    assert load_centre(out)
    capsys.readouterr()
    plain = save_delta(load_delta(out), tmp_path / "plain.safetensors")
    (tmp_path / "runs").mkdir()
    argv = ["run", "--model", str(model_dir), "--delta", str(plain), "--out", str(tmp_path / "runs" / "r"), "--quiet",
            "--causal", "1", "--causal-centre", "midpoint"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds w only" in err[0] and str(plain) in err[0]
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("alphas, message", [("0,1", "positive strengths"), ("x", "cannot read strengths"),
                                             ("-0.5", "positive strengths")])
def test_bad_strengths_are_exit_2(tiny_dir, tmp_path, capsys, alphas, message):
    (tmp_path / "w.safetensors").write_bytes(b"")
    argv = ["run", "--model", str(tiny_dir), "--delta", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "r"),
            "--causal", "1", "--causal-alpha", alphas]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own refusal of an unreadable value (the same one line, exit 2)
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_steered_behaviour_scales_by_alpha(tiny):
    """sign·α·w: α = 0.5 of w is α = 1 of w/2, bit for bit (the same θ + α·w sums)."""
    from subspace_sweep.delta import random_delta
    from subspace_sweep.model import WRITER_PROJS

    model, tok = tiny
    w = random_delta(model, [1], rank=2, seed=0, projections=WRITER_PROJS)
    half = {k: v * 0.5 for k, v in w.items()}
    bset = BehaviourSet.from_probes(tok, EVAL[:2])
    a = steered_behaviour(model, tok, w, bset.texts, bset, alpha=0.5)
    b = steered_behaviour(model, tok, half, bset.texts, bset, alpha=1.0)
    for sign in (1.0, -1.0):
        torch.testing.assert_close(a[sign][0], b[sign][0], rtol=1e-6, atol=1e-6)


def test_config_json_records_the_grid_and_centre(tmp_path):
    from subspace_sweep.config import SweepConfig

    c = SweepConfig(causal=1, causal_alpha=(0.5, 1.0), causal_strength="grid", causal_centre="midpoint")
    c.validate()
    assert json.loads(json.dumps(c.to_json()))["causal_alpha"] == [0.5, 1.0]
    # a grid under the default KL budget would go unread (a study's [run] table): refused, naming both
    with pytest.raises(InputError, match=r"--causal-alpha \[0.5, 1.0\].*--causal-strength kl:0.5"):
        SweepConfig(causal=1, causal_alpha=(0.5, 1.0)).validate()
    with pytest.raises(InputError, match="--causal-centre"):
        SweepConfig(causal=1, causal_centre="middle").validate()


def test_the_default_centre_is_the_midpoint_where_the_delta_holds_it(lora_pair, tmp_path):
    """SPEC §8 (issue 31): --causal-centre auto (the default) steers around the pair's midpoint
    when the delta file holds it (what `delta` writes), around the base model when it does not;
    base ignores a stored midpoint; midpoint requires one. (The preflight reads the stored midpoint
    whatever the centre: the pair's geometry reads it.)"""
    from subspace_sweep import preflight
    from subspace_sweep.config import SweepConfig
    from subspace_sweep.sweep import steering_centre

    model_dir, pos, neg = lora_pair
    full = tmp_path / "w.safetensors"
    assert cli.main(["delta", "--model", str(model_dir), "--adapter-pos", str(pos), "--adapter-neg", str(neg),
                     "--out", str(full)]) == 0
    plain = save_delta(load_delta(full), tmp_path / "plain.safetensors")
    assert SweepConfig().causal_centre == "auto"
    for centre, path, want in (("auto", full, True), ("auto", plain, False), ("base", full, False),
                               ("midpoint", full, True)):
        config = SweepConfig(model=str(model_dir), causal=1, causal_centre=centre, quiet=True)
        stored = preflight.check_run(config, [str(path)]).centres[0]
        assert (stored is not None) == (path == full), (centre, path.name)
        got = steering_centre(config, stored)
        assert (got is not None) == want, (centre, path.name)
        if want:
            assert got.keys() == load_centre(full).keys()
    with pytest.raises(InputError, match="holds w only"):
        preflight.check_run(SweepConfig(model=str(model_dir), causal=1, causal_centre="midpoint"), [str(plain)])
