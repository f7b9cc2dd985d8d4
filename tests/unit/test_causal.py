"""The causal check (SPEC §8, issue 15): restricted steering, its exact facts and its null."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from subspace_sweep import cli, linalg
from subspace_sweep.config import JOINT_PANEL_SIZE
from subspace_sweep.causal import (
    CURVE_RANKS,
    answer_prompt,
    answer_tokens,
    behaviour,
    effect,
    null_bases,
    restrict,
    run_causal,
)
from subspace_sweep.capture import count_forward_passes, encode, last_token_index
from subspace_sweep.delta import delta_from_peft, random_delta, save_delta, writer_layer
from subspace_sweep.errors import InputError
from subspace_sweep.model import WRITER_PROJS, load_model
from subspace_sweep.prompts import load_probe_set
from subspace_sweep.sweep import weight_targets

ROOT = Path(__file__).resolve().parents[2]
LAYERS = (1, 2)
EVAL = load_probe_set().eval


def _random_bases(d: int, r: int, seed: int) -> dict[int, torch.Tensor]:
    return {layer: linalg.random_orthonormal(d, r, torch.Generator().manual_seed(seed + layer)) for layer in LAYERS}


@pytest.fixture(scope="module")
def lora(lora_pair):
    """(model, tokenizer, w) of the shared trained LoRA pair (float32 model)."""
    model_dir, pos, neg = lora_pair
    model, tok = load_model(model_dir, dtype="float32", device="cpu")
    return model, tok, delta_from_peft(model_dir, pos, neg)


# ----------------------------------------------------------------------------- the metric


def test_answer_tokens_of_the_tiny_tokenizer_are_single_distinct_tokens(tiny):
    _, tok = tiny
    a = answer_tokens(tok)
    assert (a.yes, a.no) == ("Yes", "No")
    assert a.yes_id == tok("Yes", add_special_tokens=False)["input_ids"][0] != a.no_id
    assert str(a.yes_id) in a.describe() and str(a.no_id) in a.describe()


class _Tok:
    """A stand-in tokenizer whose answers share their first token (or encode to nothing)."""

    def __init__(self, ids):
        self.ids = ids

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.ids[text]}

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


@pytest.mark.parametrize("ids, match", [({"Yes": [5, 6], "No": [5, 7]}, "same token"),
                                        ({"Yes": [], "No": [3]}, "no token")])
def test_a_tokenizer_without_distinct_first_tokens_is_an_input_error(ids, match):
    with pytest.raises(InputError, match=match):
        answer_tokens(_Tok(ids))


def _full_model_b(model, tok, texts, a, *, chat: bool) -> torch.Tensor:
    """logit(yes) − logit(no) of the full model's own forward pass at each prompt's last token:
    the chat-template text with its generation prompt (``chat``), or the raw text."""
    asked = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in texts] if chat else list(texts)
    enc = encode(tok, asked, chat=chat)
    with torch.no_grad():
        logits = model(**enc).logits
    last = last_token_index(enc["attention_mask"])
    want = logits[torch.arange(len(texts)), last][:, [a.yes_id, a.no_id]].double()
    return want[:, 0] - want[:, 1]


def test_behaviour_is_the_models_own_logit_difference_where_it_answers(tiny):
    """behaviour() = logits[yes] − logits[no] of the full model's forward pass after the chat
    template's generation prompt (SPEC §8, concern 13), not at the end of the raw probe text."""
    model, tok = tiny
    a = answer_tokens(tok)
    got = behaviour(model, tok, EVAL[:5], a)
    torch.testing.assert_close(got, _full_model_b(model, tok, EVAL[:5], a, chat=True), rtol=1e-5, atol=1e-5)
    raw = _full_model_b(model, tok, EVAL[:5], a, chat=False)  # the old reading: another position, other numbers
    assert float((got - raw).abs().min()) > 1e-2
    alone = torch.cat([behaviour(model, tok, [t], a) for t in EVAL[:5]])  # batching changes nothing
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_answer_tokens_are_the_first_tokens_the_assistant_turn_produces(tiny):
    """The answers' token ids are those that follow the generation prompt in the tokenisation of
    prompt + answer (the tiny template's "assistant\\n" then "Yes"), and the description says where."""
    from subspace_sweep.causal import answer_prompt, probe_answer_tokens

    _, tok = tiny
    a = probe_answer_tokens(tok, EVAL[:3])
    prompt = answer_prompt(tok, EVAL[0])
    assert prompt.endswith("<|im_start|>assistant\n")
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert tok(prompt + "Yes", add_special_tokens=False)["input_ids"][n] == a.yes_id
    assert tok(prompt + "No", add_special_tokens=False)["input_ids"][n] == a.no_id
    assert "after the chat template's generation prompt" in a.describe()


# ----------------------------------------------------------------------------- exact facts


def test_restriction_is_linear_and_the_whole_space_gives_w_writes(tiny):
    model, _ = tiny
    d = model.config.hidden_size
    delta = random_delta(model, LAYERS, rank=3, seed=4, projections=[*WRITER_PROJS, "self_attn.q_proj"])
    writes = restrict(delta)
    assert set(writes) == {k for k in delta if writer_layer(k)}  # the q_proj tensors are dropped
    for k, v in writes.items():
        assert torch.equal(v, delta[k])
    B = _random_bases(d, 5, 0)
    kept, away = restrict(delta, B), restrict(delta, B, ablate=True)
    for k in writes:
        torch.testing.assert_close((kept[k].double() + away[k].double()), writes[k].double(), rtol=0, atol=1e-6)
        assert float((B[writer_layer(k)[0]].T @ away[k].double()).abs().max()) < 1e-6  # ablation ⟂ B
    whole = restrict(delta, {layer: torch.eye(d, dtype=torch.float64) for layer in LAYERS})
    for k in writes:
        torch.testing.assert_close(whole[k], writes[k], rtol=0, atol=1e-7)
    with pytest.raises(InputError, match="no basis at layer 2"):
        restrict(delta, {1: B[1]})
    assert set(restrict(delta, {1: B[1]}, layers=[1])) == {k for k in writes if writer_layer(k)[0] == 1}


def test_a_delta_planted_inside_span_b_keeps_everything_and_its_ablation_nothing(tiny):
    """kept = 1 and ablated = 1 to float tolerance: w_B = w_writes and w_ablate = 0 up to round-off."""
    model, tok = tiny
    d = model.config.hidden_size
    B = _random_bases(d, 4, 7)
    delta = {}
    for layer in LAYERS:
        delta.update(random_delta(model, [layer], rank=2, seed=layer, scale=0.3, projections=WRITER_PROJS, basis=B[layer].float()))
    targets = {layer: weight_targets(delta, layer)["combined"] for layer in LAYERS}
    res = run_causal(model, tok, delta, EVAL, [("planted", B)], targets, k=1, n_null=5, seed=0)
    row = res.table.filter(pl.col("kind") == "candidate").row(0, named=True)
    assert abs(res.effect_writes) > 0.05
    assert row["kept"] == pytest.approx(1.0, abs=1e-4) and row["ablated"] == pytest.approx(1.0, abs=1e-4)
    assert row["R_w_combined"] == pytest.approx(d / 4, rel=1e-5)


# ----------------------------------------------------------------------------- the whole check


def test_run_causal_table_forward_passes_and_seeded_null(tiny):
    model, tok = tiny
    d = model.config.hidden_size
    delta = random_delta(model, LAYERS, rank=4, seed=1, scale=0.3, projections=WRITER_PROJS)
    targets = {layer: weight_targets(delta, layer)["combined"] for layer in LAYERS}
    ranked = [("a", _random_bases(d, 8, 1)), ("b", _random_bases(d, 8, 2)), ("c", _random_bases(d, 3, 3))]
    with count_forward_passes(model) as counter:
        res = run_causal(model, tok, delta, EVAL, ranked, targets, k=3, n_null=5, seed=0)
    assert counter.n == res.forward_passes
    t = res.table
    kinds = t["kind"].to_list()
    assert kinds.count("candidate") == 3 and kinds.count("oracle") == 2 and kinds.count("random") == 10
    # the α = 0 pass, then 2 references + 3 candidates + 2 oracles + 10 draws (keep + ablate each)
    # + curves, 2 passes apiece, but the top candidate's at its full rank (8) and trained norm: that
    # is its own row's restricted delta, and reads its effect
    n_curve = kinds.count("curve")
    assert res.forward_passes == 1 + 2 * (2 + 2 * (3 + 2 + 10) + n_curve - 1)
    whole = t.filter((pl.col("kind") == "curve") & (pl.col("name") == "a") & (pl.col("k") == 8)).sort("norm_matched")
    a_row = t.filter((pl.col("kind") == "candidate") & (pl.col("name") == "a")).row(0, named=True)
    assert whole["effect"].to_list()[0] == a_row["effect"]
    own = effect(model, tok, restrict(delta, ranked[0][1], layers=LAYERS), EVAL, res.answers)[0]
    assert a_row["effect"] == pytest.approx(own, rel=1e-12)
    assert whole["effect"].to_list()[1] != a_row["effect"]  # the norm-matched point is its own pass
    a0 = t.filter(pl.col("name") == "alpha_0").row(0, named=True)  # the unsteered model's own output
    assert a0["effect"] == pytest.approx(float(behaviour(model, tok, EVAL, res.answers).mean()), rel=1e-12)
    w = t.filter(pl.col("name") == "w").row(0, named=True)
    assert w["effect_plus"] - w["effect_minus"] == pytest.approx(w["effect"], rel=1e-9)  # (b+ − b0) − (b− − b0)
    assert 0 < w["mass_plus"] <= 1 and 0 < w["mass_minus"] <= 1
    assert {int(k) for k in t.filter(pl.col("kind") == "curve")["k"]} <= set(CURVE_RANKS)
    # the null's draws are the seeded random subspaces of the profile
    rnd = t.filter(pl.col("kind") == "random")
    draws = [r for r in rnd.iter_rows(named=True) if r["name"].endswith("@3")]
    B0 = null_bases(d, {layer: 3 for layer in LAYERS}, 0, 0)
    again = effect(model, tok, restrict(delta, B0, layers=LAYERS), EVAL, res.answers)[0]
    assert draws[0]["effect"] == pytest.approx(again, rel=1e-12)
    kept = [r["kept"] for r in draws]
    c = t.filter(pl.col("name") == "c").row(0, named=True)
    mean = sum(kept) / 5
    assert c["null_kept_mean"] == pytest.approx(mean, rel=1e-12)
    assert c["null_kept_sd"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in kept) / 4), rel=1e-12)
    assert c["z_kept"] == pytest.approx((c["kept"] - mean) / c["null_kept_sd"], rel=1e-12)
    oracle8 = t.filter(pl.col("name") == "oracle_combined@8").row(0, named=True)
    assert oracle8["kept"] > oracle8["null_kept_mean"]
    with pytest.raises(InputError, match="at least 5"):
        run_causal(model, tok, delta, EVAL, ranked, targets, k=1, n_null=4, seed=0)


def test_the_curve_ranks_choose_the_retention_curves_points_and_none_draws_none(tiny):
    """``curve_ranks`` (--causal-curve): the curves hold exactly those ranks (sorted, each once; a
    rank above a curve's basis skipped for it), the check makes exactly the passes ``causal_plan``
    counts, every other row is the same, and () draws no curve; ranks that are not positive
    integers are refused."""
    from subspace_sweep.causal import causal_plan

    model, tok = tiny
    d = model.config.hidden_size
    delta = random_delta(model, LAYERS, rank=4, seed=1, scale=0.3, projections=WRITER_PROJS)
    targets = {layer: weight_targets(delta, layer)["combined"] for layer in LAYERS}
    ranked = [("a", _random_bases(d, 8, 1))]
    runs = {ranks: run_causal(model, tok, delta, EVAL, ranked, targets, k=1, n_null=5, seed=0, curve_ranks=ranks)
            for ranks in ((16, 2, 16), ())}
    t = runs[(16, 2, 16)].table
    curve = t.filter(pl.col("kind") == "curve")
    assert runs[(16, 2, 16)].curve_ranks == (2, 16)
    # 16 is above both bases (a: rank 8; the oracle: the combined target of a rank-4 delta per writer)
    assert sorted(zip(curve["name"], curve["k"], curve["norm_matched"])) == [
        ("a", 2, False), ("a", 2, True), ("oracle_combined", 2, False), ("oracle_combined", 2, True)]
    # the α = 0 pass, then per steered delta 2: w, w_writes, a, the oracle and 5 draws (kept and ablated
    # each), 2 curve points (trained norm and norm-matched each); no norm-only draw
    assert runs[(16, 2, 16)].forward_passes == 1 + 2 * causal_plan(1, 1, 1, 5, 2) == 1 + 2 * (2 + 2 * 7 + 4)
    assert runs[()].forward_passes == 1 + 2 * causal_plan(1, 1, 1, 5, 0) == 1 + 2 * (2 + 2 * 7)
    assert not runs[()].table.filter(pl.col("kind") == "curve").height and runs[()].curve_ranks == ()
    assert runs[()].table.equals(t.filter(pl.col("kind") != "curve"))
    for bad in ((0, 2), (2.0,), (True,), "1,2"):
        with pytest.raises(InputError, match="positive integer ranks"):
            run_causal(model, tok, delta, EVAL, ranked, targets, k=1, n_null=5, seed=0, curve_ranks=bad)


def test_causal_curve_from_the_command_line_to_the_config_json():
    """--causal-curve: "1,8" and "none" as the config holds and writes them; the default the six ranks."""
    import json

    from subspace_sweep.config import SweepConfig

    def config(*argv):
        args = cli.build_parser().parse_args(["run", "--delta", "x", "--out", "y", *argv])
        return cli._config(args, model=args.model, delta=args.delta[0], out=args.out, dtype=None, device=None)

    assert config().causal_curve == CURVE_RANKS == (1, 2, 4, 8, 16, 32)
    assert config("--causal-curve", "8,1").causal_curve == (8, 1)  # run_causal sorts them
    assert config("--causal-curve", "none").causal_curve == ()
    assert json.loads(json.dumps(config("--causal-curve", "1,8").to_json()))["causal_curve"] == [1, 8]
    with pytest.raises(InputError, match="positive integer ranks"):
        SweepConfig(causal=1, causal_curve=(0, 8)).validate()


def test_the_random_null_is_identical_across_processes(tmp_path):
    script = (
        "import json, torch\n"
        "from subspace_sweep.causal import null_bases\n"
        "b = null_bases(64, {1: 8, 2: 3}, 4, 0)\n"
        "print(json.dumps({k: v.flatten().tolist() for k, v in b.items()}))\n"
    )
    outs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        outs.append(subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True,
                                   text=True, cwd=ROOT).stdout)
    assert outs[0] == outs[1] and len(json.loads(outs[0])["1"]) == 64 * 8


def test_on_the_trained_lora_pair(lora):
    """E(w) has the sign the training asked for (the + adapter answers "Yes"); the residual writers
    carry it; the rank-matched combined oracle keeps more than the random-subspace mean."""
    model, tok, w = lora
    layers = sorted({writer_layer(k)[0] for k in w if writer_layer(k)})
    targets = {layer: weight_targets(w, layer)["combined"] for layer in layers}
    d = model.config.hidden_size
    ranked = [("random_basis", {layer: linalg.random_orthonormal(d, 8, torch.Generator().manual_seed(layer))
                                for layer in layers})]
    res = run_causal(model, tok, w, EVAL, ranked, targets, k=1, n_null=5, seed=0)
    assert res.effect_w > 0.5, res.effect_w
    assert res.effect_writes > 0.5
    oracle = res.table.filter(pl.col("kind") == "oracle").row(0, named=True)
    assert oracle["kept"] > oracle["null_kept_mean"] + 2 * oracle["null_kept_sd"], oracle


# ----------------------------------------------------------------------------- the run folder and the CLI


@pytest.mark.parametrize("argv, match", [(["--causal", "-1"], f"--causal must be in 0..{JOINT_PANEL_SIZE}"),
                                         (["--causal", str(JOINT_PANEL_SIZE + 1)], f"--causal must be in 0..{JOINT_PANEL_SIZE}"),
                                         (["--causal", "2", "--causal-null", "4"], "--causal-null must be at least 5")])
def test_bad_causal_options_exit_2_before_any_work(capsys, tmp_path, tiny_dir, argv, match):
    out = tmp_path / "out"
    code = cli.main(["run", "--model", str(tiny_dir), "--delta", str(tmp_path / "missing.safetensors"), "--out",
                     str(out), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_BAD_INPUT and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()


@pytest.mark.slow
def test_run_with_causal_writes_the_table_figure_and_verdict_for_two_deltas_through_the_cache(lora, lora_pair, tmp_path):
    model_dir, _, _ = lora_pair
    _, _, w = lora
    paths = [save_delta(w, tmp_path / "lora.safetensors"),
             save_delta({k: -v for k, v in w.items()}, tmp_path / "flipped.safetensors")]
    out, cache = tmp_path / "runs", tmp_path / "cache"
    argv = ["run", "--model", str(model_dir), "--out", str(out), "--quiet", "--n-boot", "0", "--causal", "2",
            "--causal-null", "5", "--a-side-cache", str(cache)]
    for p in paths:
        argv += ["--delta", str(p)]
    assert cli.main(argv) == 0
    tables = {}
    for name in ("lora", "flipped"):
        run = out / name
        for f in ("causal.tsv", "causal_kept.png", "causal_kept.pdf"):
            assert (run / f).is_file(), f
        tables[name] = pl.read_csv(run / "causal.tsv", separator="\t")
        conclusion = (run / "conclusion.md").read_text()
        assert "## Causal check" in conclusion and "Verdict:" in conclusion
        kinds = set(tables[name]["kind"])
        assert {"act_oracle", "curve", "reference", "candidate", "oracle", "random"} <= kinds
        assert {"oracle_act_cumulative", "oracle_act_local"} <= set(tables[name]["name"])
        assert "token id" in (run / "definitions.md").read_text()
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["timings_s"]["causal"] > 0
    lora_e = tables["lora"].filter(pl.col("name") == "w")["effect"][0]
    flipped_e = tables["flipped"].filter(pl.col("name") == "w")["effect"][0]
    assert lora_e > 0 > flipped_e  # steering with −w swaps the signs
    # the same seeded null subspaces: kept of a random draw is the same for w and −w (E is odd in w
    # up to the model's nonlinearity, so only the subspaces are compared through R_w_combined)
    r0 = [t.filter(pl.col("kind") == "random")["R_w_combined"].to_list() for t in tables.values()]
    assert r0[0] == pytest.approx(r0[1], rel=1e-9)


def test_the_shipped_behaviour_example_is_a_valid_set(tiny):
    from importlib import resources

    from subspace_sweep.causal import BehaviourSet

    _, tok = tiny
    path = str(resources.files("subspace_sweep").joinpath("data/behaviour_example.jsonl"))
    b = BehaviourSet.from_jsonl(path, tok)
    assert len(b.texts) == 6 and set(b.signs) == {1.0, -1.0}
    yes, no = answer_tokens(tok).yes_id, answer_tokens(tok).no_id
    assert b.first_ids[0] == yes and b.first_ids[3] == no  # the second answer is the behaviour where sign = −1
    got = behaviour(tiny[0], tok, b.texts, b)
    raw = behaviour(tiny[0], tok, b.texts, answer_tokens(tok))
    torch.testing.assert_close(got, raw, rtol=1e-12, atol=1e-12)  # sign·(first − second) = Yes − No for both kinds


@pytest.mark.parametrize("text, match", [
    ('{"prompt": "a", "answers": ["Yes", "No"], "sign": 1}\nnot json\n', "line 2: not JSON"),
    ('{"prompt": "a", "answers": ["Yes"], "sign": 1}\n{"prompt": "b", "answers": ["Yes", "No"], "sign": 1}\n', "line 1: expected"),
    ('{"prompt": "a", "answers": ["Yes", "No"], "sign": 2}\n{"prompt": "b", "answers": ["Yes", "No"], "sign": 1}\n', "line 1: expected"),
])
def test_a_malformed_behaviour_file_is_exit_2_with_its_line(capsys, tmp_path, tiny_dir, text, match):
    f = tmp_path / "b.jsonl"
    f.write_text(text)
    out = tmp_path / "out"
    code = cli.main(["run", "--model", str(tiny_dir), "--delta", str(tmp_path / "missing.safetensors"), "--out",
                     str(out), "--quiet", "--causal", "1", "--behaviour", str(f)])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_BAD_INPUT and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()



def test_the_behaviour_reader_takes_exactly_the_stated_bound_and_the_integer_signs(tmp_path):
    """Issue 35: a prompt or answer of MAX_BEHAVIOUR_CHARS characters is read, one more is refused with
    its length; signs are the integers 1 and −1 only; a line may hold U+2028 inside a JSON string
    (no line break); CRLF lines are lines."""
    from subspace_sweep.causal import MAX_BEHAVIOUR_CHARS, read_behaviour_file

    def write(*lines, sep="\n"):
        f = tmp_path / "b.jsonl"
        f.write_bytes(sep.join(json.dumps(x, ensure_ascii=False) for x in lines).encode())
        return str(f)

    ok = {"prompt": "a", "answers": ["Yes", "No"], "sign": -1}
    edge = {"prompt": "é" * MAX_BEHAVIOUR_CHARS, "answers": ["Yes", "N" * MAX_BEHAVIOUR_CHARS], "sign": 1}
    rows = read_behaviour_file(write(edge, ok, sep="\r\n"))
    assert [len(r[0]) for r in rows] == [MAX_BEHAVIOUR_CHARS, 1] and [r[2] for r in rows] == [1, -1]
    assert all(type(r[2]) is int for r in rows)
    with pytest.raises(InputError, match=rf"line 1: the prompt is {MAX_BEHAVIOUR_CHARS + 1} characters long"):
        read_behaviour_file(write({**edge, "prompt": "é" * (MAX_BEHAVIOUR_CHARS + 1)}, ok))
    with pytest.raises(InputError, match=rf"line 2: the first answer is {MAX_BEHAVIOUR_CHARS + 1} characters"):
        read_behaviour_file(write(ok, {**ok, "answers": ["Y" * (MAX_BEHAVIOUR_CHARS + 1), "No"]}))
    assert read_behaviour_file(write({**ok, "prompt": "one\u2028line"}, ok))[0][0] == "one\u2028line"
    for bad in (True, False, 1.0, -1.0, "1", 0, 2):
        with pytest.raises(InputError, match="line 2: expected"):
            read_behaviour_file(write(ok, {**ok, "sign": bad}))
    with pytest.raises(InputError, match=r"line 1: the two answers are equal \('Yes'\)"):
        read_behaviour_file(write({**ok, "answers": ["Yes", "Yes"]}, ok))
    assert read_behaviour_file(write({**ok, "answers": ["Yes", "yes"]}, ok))  # different strings, different answers


# ----------------------------------------------------------------------------- the verdict


def _result(best_kept: float, z: float, oracle_kept: float, mass0: float, mass_plus: float, mass_minus: float,
            form: str = "chat", curve: bool = True):
    """A CausalResult whose table holds exactly the rows the verdict reads (``curve``: and a
    retention curve's point)."""
    from subspace_sweep.causal import COLUMNS, BehaviourSet, CausalResult

    rows = [
        {"kind": "reference", "name": "alpha_0", "effect": 0.1, "mass_plus": mass0, "mass_minus": mass0},
        {"kind": "reference", "name": "w", "effect": 9.0, "kept": 1.03, "mass_plus": mass_plus, "mass_minus": mass_minus},
        {"kind": "reference", "name": "w_writes", "effect": 8.7, "kept": 1.0},
        {"kind": "candidate", "name": "best", "rank": 8.0, "kept": best_kept, "ablated": 0.02, "z_kept": z,
         "null_kept_mean": 0.02, "null_kept_sd": 0.005, "null_ablated_mean": 0.01, "null_ablated_sd": 0.01},
        {"kind": "oracle", "name": "oracle_combined@8", "rank": 8.0, "kept": oracle_kept},
        *([{"kind": "curve", "name": "oracle_combined", "rank": 1.0, "k": 1, "norm_matched": False, "kept": 0.01}]
          if curve else []),
    ]
    table = pl.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], schema=COLUMNS)
    answers = BehaviourSet(("p",), (1,), (2,), (1.0,), "the shipped EVAL probes", "", form)
    return CausalResult(table, answers, 9.0, 8.7, ["best"], 5, 0)


def test_the_verdict_weighs_the_winners_share_against_the_oracle_not_only_its_z():
    """Issue 23's real case: kept 0.04 at z 4.2 beside the oracle's 0.99 is significant but small."""
    from subspace_sweep.causal import SIZE_SHARE_OF_ORACLE, verdict

    small = verdict(_result(0.04, 4.2, 0.99, 0.45, 0.85, 0.16))
    assert "but little of it" in small and "4% of what the rank-matched oracle keeps (0.99" in small
    assert "Significant, not explanatory" in small and "carries the behaviour:" not in small
    big = verdict(_result(0.9, 12.0, 0.99, 0.45, 0.85, 0.16))
    assert "Verdict: the winner carries the behaviour: it keeps 0.90" in big and "91%" in big
    edge = verdict(_result(SIZE_SHARE_OF_ORACLE * 0.99 + 1e-9, 5.0, 0.99, 0.45, 0.85, 0.16))
    assert "carries the behaviour:" in edge  # exactly at the stated share it is not "little"
    below = verdict(_result(SIZE_SHARE_OF_ORACLE * 0.99 - 1e-9, 5.0, 0.99, 0.45, 0.85, 0.16))
    assert "but little of it" in below
    none = verdict(_result(0.05, 1.5, 0.99, 0.45, 0.85, 0.16))
    assert "does NOT carry more of the behaviour than a random subspace" in none
    for text in (small, big, none):
        assert "0.45 unsteered (α = 0), 0.85 at +α, 0.16 at −α" in text
        assert "read after the chat template's generation prompt" in text and "not reading an answer" not in text
    assert "read at the end of the raw prompt" in verdict(_result(0.9, 12.0, 0.99, 0.45, 0.85, 0.16, form="raw"))


def test_where_the_rank_matched_oracle_keeps_little_no_subspace_of_that_rank_is_said_to_carry_the_behaviour():
    """Issue 35's IA3 pair: the winner kept 0.08 of E(w_writes), the rank-8 oracle 0.07, and the
    verdict said the winner "carries the behaviour ... 114% of what the rank-matched oracle keeps".
    Below CARRIES_SHARE = 0.5 for both, the verdict says first that no rank-8 subspace carries it."""
    from subspace_sweep.causal import CARRIES_SHARE, verdict

    assert CARRIES_SHARE == 0.5
    ia3 = verdict(_result(0.08, 5.1, 0.07, 0.45, 0.85, 0.16))
    line = next(ln for ln in ia3.splitlines() if ln.startswith("Verdict:"))
    assert line == (
        "Verdict: at rank 8 no subspace carries the behaviour: even the rank-matched oracle (the rank-8 subspace "
        "holding the most of the residual writers' weight energy) keeps only 0.07 of E(w_writes), below 0.5 (a "
        "subspace carries the behaviour when it keeps at least 0.5 of it). The winner keeps 0.08: more than random "
        "subspaces of its rank (z_kept = 5.1 > 2), yet its share (114% of the oracle's) is a ratio of two small "
        "numbers, not evidence that it carries the behaviour. The retention curve (causal.tsv, rows `curve`) shows "
        "at which rank, if any, the oracle's leading directions carry it.")
    assert "the winner carries" not in ia3 and "Significant, not explanatory" not in ia3
    # a check run without retention curves (--causal-curve none) does not point at rows it lacks
    bare_result = _result(0.08, 5.1, 0.07, 0.45, 0.85, 0.16, curve=False)
    bare_result.curve_ranks = ()
    bare = verdict(bare_result)
    assert "rows `curve`" not in bare and bare.replace(
        "This check drew no retention curve (`--causal-curve none`); one shows at which rank, if any, the oracle's "
        "leading directions carry it.", "The retention curve (causal.tsv, rows `curve`) shows at which rank, if any, "
        "the oracle's leading directions carry it.") == ia3
    # ranks were asked for but none fits a basis: the sentence names them, not `none`
    above = _result(0.08, 5.1, 0.07, 0.45, 0.85, 0.16, curve=False)
    above.curve_ranks = (64,)
    assert "(`--causal-curve 64: no rank within the bases`)" in verdict(above)
    noise = verdict(_result(0.06, 1.0, 0.07, 0.45, 0.85, 0.16))
    assert "Verdict: at rank 8 no subspace carries the behaviour" in noise
    assert "The winner keeps 0.06: no more than random subspaces of its rank (z_kept = 1.0 ≤ 2)." in noise
    negative = verdict(_result(0.05, 3.0, -0.1, 0.45, 0.85, 0.16))
    assert "keeps only -0.10 of E(w_writes)" in negative and "yet its share is a ratio" in negative
    # the bound exactly: an oracle keeping 0.5 is not "little" (the share rule decides), just below it is
    at = verdict(_result(0.3, 5.0, CARRIES_SHARE, 0.45, 0.85, 0.16))
    assert "Verdict: the winner carries the behaviour: it keeps 0.30" in at and "60%" in at
    below = verdict(_result(0.3, 5.0, CARRIES_SHARE - 1e-9, 0.45, 0.85, 0.16))
    assert "Verdict: at rank 8 no subspace carries the behaviour" in below
    # a winner that keeps at least half does carry it, whatever the energy oracle keeps
    strong = verdict(_result(CARRIES_SHARE, 5.0, 0.3, 0.45, 0.85, 0.16))
    assert "Verdict: the winner carries the behaviour: it keeps 0.50" in strong and "167%" in strong
    assert "no subspace carries" in verdict(_result(CARRIES_SHARE - 1e-9, 5.0, 0.3, 0.45, 0.85, 0.16))


@pytest.mark.parametrize("plus, minus, named", [(0.05, 0.5, "α = +1 (0.05)"), (0.5, 0.09, "α = -1 (0.09)"),
                                                (0.0, 0.01, "α = +1 (0.00) and α = -1 (0.01)")])
def test_the_mass_warning_fires_when_a_steered_model_gives_the_answers_under_a_tenth(plus, minus, named):
    from subspace_sweep.causal import MIN_ANSWER_MASS, verdict

    text = verdict(_result(0.9, 12.0, 0.99, 0.45, plus, minus))
    assert "the behaviour metric is not reading an answer" in text and named in text, text
    # no warning at the threshold itself, nor for little mass at α = 0 alone (a base model may be)
    assert "not reading an answer" not in verdict(_result(0.9, 12.0, 0.99, 0.001, MIN_ANSWER_MASS, MIN_ANSWER_MASS))


def test_the_mass_warning_fires_on_a_model_that_never_produces_the_answers(tiny):
    """The random tiny model spreads its probability over 512 tokens: the two answers get ~2/512,
    so the check says its metric reads no answer."""
    from subspace_sweep.causal import MIN_ANSWER_MASS, answer_masses, verdict

    model, tok = tiny
    d = model.config.hidden_size
    delta = random_delta(model, LAYERS, rank=2, seed=3, scale=0.3, projections=WRITER_PROJS)
    targets = {layer: weight_targets(delta, layer)["combined"] for layer in LAYERS}
    res = run_causal(model, tok, delta, EVAL[:4], [("a", _random_bases(d, 8, 1))], targets, k=1, n_null=5, seed=0)
    mass = answer_masses(res)
    assert max(mass.values()) < MIN_ANSWER_MASS, mass
    assert "Warning: the behaviour metric is not reading an answer" in verdict(res)


# ----------------------------------------------------------------------------- exact values (issue 25)


def test_restrict_behind_a_post_norm_acts_in_the_residual_and_undoes_the_gain():
    """Closed form: with gain γ = (2, 0.5, 1, 0) and B = e_0 the residual sees diag(γ)·ΔW, whose
    projection onto e_0 is 2·ΔW[0] in row 0; undoing the gain gives ΔW[0] in row 0, zeros elsewhere
    (row 3's zero gain writes nothing: it stays 0 in w_B and whole in the ablation). With B along
    (e_0 + e_1)/√2 the kept rows are diag(γ)⁻¹·B·Bᵀ·diag(γ)·ΔW, written out."""
    M = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0], [0.25, 4.0, 2.0], [-1.5, 0.5, 1.0]], dtype=torch.float64)
    key = "model.layers.0.self_attn.o_proj.weight"
    gains = {0: {"o_proj": torch.tensor([2.0, 0.5, 1.0, 0.0])}}
    e0 = torch.tensor([[1.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    kept = restrict({key: M}, {0: e0}, write_gains=gains)[key]
    want = torch.zeros_like(M)
    want[0] = M[0]
    assert torch.equal(kept, want)
    away = restrict({key: M}, {0: e0}, ablate=True, write_gains=gains)[key]
    assert torch.equal(away, M - want)
    b = torch.tensor([[1.0], [1.0], [0.0], [0.0]], dtype=torch.float64) / math.sqrt(2.0)
    kept = restrict({key: M}, {0: b}, write_gains=gains)[key]
    seen = 2.0 * M[0] + 0.5 * M[1]  # bᵀ·diag(γ)·ΔW·√2, the residual's component along b (·√2)
    want = torch.zeros_like(M)
    want[0] = (seen / 2.0) / 2.0  # b_0 = 1/√2 twice, then γ_0⁻¹
    want[1] = (seen / 2.0) / 0.5
    torch.testing.assert_close(kept, want, rtol=1e-15, atol=1e-15)


class _FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose logits at every position are ``logits`` (a decoder that returns
    zeros, an unembedding that adds its bias): the answer probabilities are known exactly."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.head = torch.nn.Linear(1, logits.shape[0], bias=True)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(logits)
        self.config = type("Config", (), {"final_logit_softcapping": None})()

        class Decoder(torch.nn.Module):
            def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
                return type("Out", (), {"last_hidden_state": torch.zeros(*input_ids.shape, 1)})()

        self.model = Decoder()

    def get_output_embeddings(self):
        return self.head


def test_the_answer_mass_is_both_answers_probability_and_b_their_logit_difference(tiny):
    """P(yes) = 0.3, P(no) = 0.2 exactly: mass 0.5, b = log 0.3 − log 0.2."""
    from subspace_sweep.causal import AnswerTokens, BehaviourSet, behaviour_and_mass

    _, tok = tiny
    V = len(tok)
    probs = torch.full((V,), 0.5 / (V - 2), dtype=torch.float64)
    probs[5], probs[9] = 0.3, 0.2
    model = _FixedLogits(probs.log().float())
    answers = AnswerTokens("Yes", "No", 5, 9, ("Yes",), ("No",))
    bset = BehaviourSet.from_probes(tok, EVAL[:3], answers)
    b, mass = behaviour_and_mass(model, tok, bset.texts, bset)
    torch.testing.assert_close(mass, torch.full((3,), 0.5, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(b, torch.full((3,), math.log(0.3 / 0.2), dtype=torch.float64), rtol=1e-6, atol=0)


def test_norm_matched_curve_deltas_have_the_frobenius_norm_of_w_writes(tiny, monkeypatch):
    """Every norm-matched curve point steers with a delta of exactly ‖w_writes‖_F; the others with
    the restricted delta as it is (smaller for k below the delta's rank)."""
    from subspace_sweep import causal
    from subspace_sweep.causal import frobenius

    model, tok = tiny
    delta = random_delta(model, LAYERS, rank=4, seed=5, scale=0.3, projections=WRITER_PROJS)
    targets = {layer: weight_targets(delta, layer)["combined"] for layer in LAYERS}
    seen: list[float] = []
    real = causal.steered_behaviour
    monkeypatch.setattr(causal, "steered_behaviour",
                        lambda m, t, w, *a, **k: (seen.append(frobenius(w)), real(m, t, w, *a, **k))[1])
    res = run_causal(model, tok, delta, EVAL[:3], [], targets, k=0, n_null=5, seed=0)
    writes = frobenius(restrict(delta, layers=LAYERS))
    curve = res.table.filter(pl.col("kind") == "curve")
    matched = curve["norm_matched"].to_list()
    norms = seen[-len(matched):]  # the curves come last, in table order
    for is_matched, norm in zip(matched, norms):
        if is_matched:
            assert norm == pytest.approx(writes, rel=1e-6)
    assert min(n for m, n in zip(matched, norms) if not m) < 0.9 * writes


def test_candidate_labels_of_coinciding_points_do_not_overprint():
    """Issue 26 (seen on the real run: chars_clusters over layer_clean_resid_pca): three candidates
    at one point and a fourth nearby get labels whose boxes do not overlap, each next to its point."""
    import matplotlib.pyplot as plt

    from subspace_sweep.causal import COLUMNS
    from subspace_sweep.report import draw_causal

    rows = [{"kind": "candidate", "name": n, "rank": 8.0, "R_w_combined": x, "kept": y}
            for n, x, y in (("layer_clean_resid_pca", 1.52, 0.028), ("chars_clusters", 1.52, 0.028),
                            ("a_third_one", 1.52, 0.028), ("WNR_union_TaskDiff", 1.30, 0.063))]
    rows.append({"kind": "oracle", "name": "oracle_combined@8", "rank": 8.0, "R_w_combined": 65.0, "kept": 0.98,
                 "null_kept_mean": 0.02, "null_kept_sd": 0.003})
    fig = draw_causal(pl.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], schema=COLUMNS))
    try:
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        texts = [t for t in ax.texts if t.get_text() in {r["name"] for r in rows}]
        assert sorted(t.get_text() for t in texts) == sorted(r["name"] for r in rows if r["kind"] == "candidate")
        boxes = [t.get_window_extent(renderer) for t in texts]
        for i in range(len(boxes)):
            for j in range(i):
                assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    finally:
        plt.close(fig)


def test_a_check_without_curves_draws_without_an_empty_legend():
    """A causal table with no curve rows (no candidate tested) draws its retention panel with a
    sentence saying so, and matplotlib warns of no empty legend ("No artists with labels")."""
    import warnings

    import matplotlib.pyplot as plt

    from subspace_sweep.causal import COLUMNS
    from subspace_sweep.report import draw_causal

    rows = [{"kind": "oracle", "name": "oracle_combined@8", "rank": 8.0, "R_w_combined": 65.0, "kept": 0.98,
             "null_kept_mean": 0.02, "null_kept_sd": 0.003}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = draw_causal(pl.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], schema=COLUMNS))
    try:
        right = fig.axes[1]
        assert right.get_legend() is None
        assert [t.get_text() for t in right.texts] == ["no retention curve in this check"]
        assert fig.axes[0].get_legend() is not None
    finally:
        plt.close(fig)


def test_length_batches_split_only_where_it_saves_a_quarter_of_the_padded_positions():
    from subspace_sweep.causal import LENGTH_SPLIT_SAVING, length_batches

    assert LENGTH_SPLIT_SAVING == 0.25
    assert length_batches([10, 12, 11, 10]) == [[0, 1, 2, 3]]  # similar lengths: one batch, in order
    # 4 x 52 = 208 positions unsplit; [5, 6] + [50, 52]: 2 x 6 + 2 x 52 = 116, a saving of 0.44
    assert length_batches([5, 50, 6, 52]) == [[0, 2], [1, 3]]
    # saving exactly at the threshold splits, just below does not: 4 x 40 = 160 vs 2 x 20 + 2 x 40 = 120 (0.25)
    assert length_batches([20, 40, 20, 40]) == [[0, 2], [1, 3]]
    assert length_batches([21, 40, 21, 40]) == [[0, 1, 2, 3]]  # 122: a saving of 0.2375
    # recursive: three length classes, ties by index
    assert length_batches([100, 3, 30, 3, 100, 30]) == [[1, 3], [2, 5], [0, 4]]
    assert length_batches([7]) == [[0]] and length_batches([]) == [[]]


def test_shared_prefix_length_counts_the_tokens_every_prompt_starts_with_when_that_pays():
    """P: the leading columns where every row has the same real token, at most the shortest row's
    length − 1 (each prompt keeps a token of its own to read), and only where (B − 1)·P ≥ 25% of the
    batch's B·T positions (or any P with min_saving 0); one row, or a row of one token, shares nothing."""
    from subspace_sweep.causal import shared_prefix_length

    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 2, 0], [5, 6, 7, 3, 4, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert shared_prefix_length(ids, mask) == 3  # (3 − 1)·3 = 6 ≥ 0.25·18
    assert shared_prefix_length(ids, mask, 0.3) == 3 and shared_prefix_length(ids, mask, 0.35) == 0  # 6 of 18
    same = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 0]])
    assert shared_prefix_length(same, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), 0.0) == 2  # the shortest keeps one
    assert shared_prefix_length(ids[:1], mask[:1], 0.0) == 0
    assert shared_prefix_length(same, torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]), 0.0) == 0
    assert shared_prefix_length(torch.tensor([[1, 2], [3, 2]]), torch.ones(2, 2, dtype=torch.long), 0.0) == 0


def test_a_behaviour_set_of_very_different_lengths_is_read_in_length_batches_as_each_prompt_alone(tiny):
    """Two short and two long prompts: split into two batches (fewer padded positions; the long two
    also share their first sentences, read once), b and mass equal each prompt read alone, and a steered pass resumed from the recorded prefix (one residual
    per batch) equals the full steered pass bit for bit."""
    from subspace_sweep.causal import BehaviourSet, Prefix, behaviour_and_mass, length_batches, steered_behaviour

    model, tok = tiny
    long = " ".join(EVAL[:4])
    texts = [EVAL[0], long + " " + EVAL[5], EVAL[1], long + " " + EVAL[6]]
    bset = BehaviourSet.from_probes(tok, texts)
    lengths = encode(tok, [answer_prompt(tok, t) for t in texts], chat=True)["attention_mask"].sum(1).tolist()
    assert length_batches(lengths) == [[0, 2], [1, 3]]
    prefix = Prefix(1)
    with count_forward_passes(model) as counter:
        b, mass = behaviour_and_mass(model, tok, texts, bset, prefix)
    # two batches; the long pair also shares its first sentences (``shared_prefix_length``): one pass over them
    assert counter.n == 3 and len(prefix.hidden) == 2 and [h.shape[0] for h in prefix.hidden] == [2, 2]
    alone = [behaviour_and_mass(model, tok, [t], BehaviourSet.from_probes(tok, [t])) for t in texts]
    torch.testing.assert_close(b, torch.cat([x[0] for x in alone]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mass, torch.cat([x[1] for x in alone]), rtol=1e-6, atol=1e-6)
    delta = random_delta(model, [1, 2], rank=2, seed=4, scale=0.1)
    full, resumed = steered_behaviour(model, tok, delta, texts, bset), steered_behaviour(model, tok, delta, texts, bset, prefix)
    for sign in (1.0, -1.0):
        assert torch.equal(full[sign][0], resumed[sign][0]) and torch.equal(full[sign][1], resumed[sign][1])
        assert not torch.equal(full[sign][0], b)


def test_a_delta_that_starts_below_the_scored_layers_is_steered_by_a_full_pass(tiny):
    """Issue 35 item 6: a steered pass resumes at the first scored layer only when the delta steers
    nothing below it. A pair trained on layers 1..3 checked with `--layers 2..3` steers layer 1
    too: its E must be the full pass's bit for bit (resuming would drop layer 1's steering; the
    condition replaced by "always resume" fails here). A delta on the scored layers alone resumes:
    layer 0's attention never runs, and E is still the full pass's bit for bit."""
    from subspace_sweep.causal import BehaviourSet, Prefix, behaviour_and_mass, first_steered_layer, steered_behaviour

    model, tok = tiny
    texts = EVAL[:4]
    bset = BehaviourSet.from_probes(tok, texts)
    prefix = Prefix(2)  # the scored layers 2..3
    behaviour_and_mass(model, tok, texts, bset, prefix)  # the unsteered pass records the residual entering layer 2
    below = random_delta(model, [1, 2, 3], rank=2, seed=6, scale=0.3)
    above = {k: v for k, v in below.items() if writer_layer(k)[0] >= 2}
    assert (first_steered_layer(below), first_steered_layer(above)) == (1, 2)
    assert first_steered_layer({"model.embed_tokens.weight": torch.ones(2, 2), **above}) is None
    assert first_steered_layer({}) is None
    calls = []
    hook = model.get_submodule("model.layers.0.self_attn").register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for delta, resumes in ((below, False), (above, True)):
            full = steered_behaviour(model, tok, delta, texts, bset)
            calls.clear()
            got = steered_behaviour(model, tok, delta, texts, bset, prefix)
            e_full, e_got = float((full[1.0][0] - full[-1.0][0]).mean()), float((got[1.0][0] - got[-1.0][0]).mean())
            assert e_got == e_full, (resumes, e_got, e_full)
            for sign in (1.0, -1.0):
                assert torch.equal(got[sign][0], full[sign][0]) and torch.equal(got[sign][1], full[sign][1])
            assert (len(calls) == 0) == resumes, (resumes, len(calls))  # layer 0 ran, or was skipped
    finally:
        hook.remove()
    # what "always resume" would compute for the delta that starts below: layer 1 unsteered, another E
    from subspace_sweep.steering import weight_steer

    with weight_steer(model, below, 1.0):
        dropped = behaviour_and_mass(model, tok, texts, bset, prefix)[0]
    assert not torch.allclose(dropped, steered_behaviour(model, tok, below, texts, bset)[1.0][0], rtol=1e-3, atol=1e-3)
