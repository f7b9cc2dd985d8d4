"""Every row of the architecture table (SPEC §9, issue 13) gets the same checks, on a seeded tiny
random model of it built in the test (non-trivial norm gains; Llama also with every bias):

- captures equal the model's own hidden states; weight steering is bit-exact and restores;
- the readers the A-side uses are what the modules multiply the residual by (probed through the
  real norm and projection modules, fused Phi-3 projections split by their documented layout);
- the QK circuit is each head's bilinear score form up to per-token scalars (the ratio of the real
  q̂·k̂ to xᵀM_h y is an outer product c_t·c'_s), the OV circuit reproduces o_proj's output;
- post-norm rows (Gemma2/3, OLMo2): the write space is diag(γ_post)·col(W), and a small o_proj
  delta changes the residual inside span(diag(γ_post)·col(ΔW), diag(γ_post)·o_t) to first order
  (the second direction is the norm's own rescaling, which the first-order target leaves out);
- a planted delta is recovered and ``run`` on the saved folder writes a sane run folder.
A new row of the table gets every check (the parametrisation reads ``ARCHITECTURES``).
"""

from __future__ import annotations

import copy

import polars as pl
import pytest
import torch

from subspace_sweep import cli, linalg
from subspace_sweep.arch import ARCHITECTURES, architecture_of
from subspace_sweep.candidates import build_a_side
from subspace_sweep.capture import capture_activations, record_activations
from subspace_sweep.delta import save_delta
from subspace_sweep.demo import plant_in, plant_rank
from subspace_sweep.model import block_name, extract_base_weights, state_dict_sha256, write_gains
from subspace_sweep.prompts import load_probe_set
from subspace_sweep.steering import weight_steer
from subspace_sweep.toy import build_tiny_decoder, save_tiny_decoder
from tests.helpers_model import materialized
from tests.module_checks import check_ov_circuit, check_qk_circuit, check_readers
from tests.helpers_sweep import weight_summary

DT = torch.float64
CASES = [*ARCHITECTURES, "llama+bias"]
PROBES = load_probe_set()


def _build(case: str):
    model_type, _, extra = case.partition("+")
    return build_tiny_decoder(model_type, seed=3, bias=extra == "bias")


@pytest.fixture(scope="module", params=CASES)
def tiny_arch(request):
    model, tok = _build(request.param)
    W = extract_base_weights(model)
    A = capture_activations(model, tok, PROBES)
    return request.param, model, tok, W, A


# ----------------------------------------------------------------------------- captures and steering


def test_captures_are_the_models_hidden_states(tiny_arch):
    _, model, tok, _, A = tiny_arch
    enc = tok(list(PROBES.fit[:3]), return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(1) - 1  # right padding
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    for i in range(model.config.num_hidden_layers - 1):  # hidden_states[-1] is after the final norm
        torch.testing.assert_close(A.clean[i, :3], hs[i + 1][torch.arange(3), last].float(), atol=1e-5, rtol=1e-5)


def test_weight_steering_is_bit_exact_and_restores(tiny_arch):
    """Streamed steering (each module computes with θ + α·w during its own forward) gives
    exactly the logits of the weights written in, on every row: a parameter some architecture
    read outside its own module's forward would show here."""
    _, model, _, _, _ = tiny_arch
    gen = torch.Generator().manual_seed(0)
    delta = {n: 0.01 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()
             if n.startswith(block_name(1) + ".") and n.endswith((".weight", ".bias"))}
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=gen)
    h = state_dict_sha256(model)
    with torch.no_grad():
        with weight_steer(model, delta, 0.5):
            got = model(input_ids=ids).logits
        want = materialized(model, delta, 0.5)(input_ids=ids).logits
        base = model(input_ids=ids).logits
    assert torch.equal(got, want) and not torch.equal(got, base)
    assert state_dict_sha256(model) == h


def test_the_prompts_shared_tokens_computed_once_give_what_the_full_pass_gives(tiny_arch):
    """The tokens every prompt starts with (the chat template's turn opening and "I think") run once,
    their key/value cache repeated per prompt, then one pass over the rest (``shared_prefix_length``):
    b and mass are the full pass's to float rounding in every architecture (each has its own cache
    and mask code; sliding windows, post-norms, softcaps), unsteered, steered, and resumed at a
    recorded layer (then bit for bit the shared full pass's). The passes see the shared tokens once."""
    from subspace_sweep.causal import BehaviourSet, Prefix, behaviour_and_mass

    _, model, tok, _, _ = tiny_arch
    bset = BehaviourSet.from_probes(tok, PROBES.eval[:4])
    shapes = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        full = behaviour_and_mass(model, tok, bset.texts, bset, share_prefix=False)
        (B, T), = shapes
        shapes.clear()
        shared = behaviour_and_mass(model, tok, bset.texts, bset, share_prefix=True)
    finally:
        hook.remove()
    P = shapes[0][1]
    assert shapes == [(1, P), (B, T - P)] and P >= 2, shapes
    for got, want in zip(shared, full):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(5)
    delta = {n: 0.05 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()
             if n.startswith((block_name(1) + ".", block_name(2) + ".")) and n.endswith("proj.weight")}
    prefix = Prefix(1)
    behaviour_and_mass(model, tok, bset.texts, bset, prefix, share_prefix=True)  # records the rest's residual
    for sign in (1.0, -1.0):
        with weight_steer(model, delta, sign):
            want = behaviour_and_mass(model, tok, bset.texts, bset, share_prefix=False)
            got = behaviour_and_mass(model, tok, bset.texts, bset, share_prefix=True)
            resumed = behaviour_and_mass(model, tok, bset.texts, bset, prefix, share_prefix=True)
        for g, r, w in zip(got, resumed, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            assert torch.equal(r, g)


def test_a_steered_pass_resumed_at_its_first_steered_layer_is_bit_identical(tiny_arch):
    """The causal check's passes resume at the first scored layer from the unsteered residual
    recorded there (issue 25): the behaviour and mass equal the full pass's bit for bit, on every
    row; a delta that reaches below the recorded layer is computed in full."""
    from subspace_sweep.causal import BehaviourSet, Prefix, behaviour_and_mass, first_steered_layer, steered_behaviour

    _, model, tok, _, _ = tiny_arch
    gen = torch.Generator().manual_seed(3)
    delta = {n: 0.05 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()
             if n.startswith((block_name(1) + ".", block_name(2) + ".")) and n.endswith("proj.weight")}
    bset = BehaviourSet.from_probes(tok, PROBES.eval[:4])
    prefix = Prefix(1)
    base = behaviour_and_mass(model, tok, bset.texts, bset, prefix)
    assert prefix.hidden is not None and torch.equal(base[0], behaviour_and_mass(model, tok, bset.texts, bset)[0])
    full = steered_behaviour(model, tok, delta, bset.texts, bset)
    resumed = steered_behaviour(model, tok, delta, bset.texts, bset, prefix)
    for alpha in (1.0, -1.0):
        assert torch.equal(full[alpha][0], resumed[alpha][0]) and torch.equal(full[alpha][1], resumed[alpha][1])
        assert not torch.equal(full[alpha][0], base[0])
    # resuming really skips the layers below: a wrong recorded residual would change the result
    wrong = Prefix(1, hidden=[torch.zeros_like(h) for h in prefix.hidden])
    assert not torch.equal(steered_behaviour(model, tok, delta, bset.texts, bset, wrong)[1.0][0], full[1.0][0])
    assert first_steered_layer(delta) == 1 and first_steered_layer({"model.embed_tokens.weight": None}) is None
    down0 = f"{block_name(0)}.mlp.down_proj.weight"  # a zero tensor at layer 0: the same steering, from layer 0
    deeper = {**delta, down0: torch.zeros_like(model.get_parameter(down0))}
    assert torch.equal(steered_behaviour(model, tok, deeper, bset.texts, bset, wrong)[1.0][0], full[1.0][0])


def test_the_kl_of_greedy_continuations_is_the_teacher_forced_one(tiny_arch):
    """The KL-matched strength's meter (issue 30: KV cache, one left-padded batch, the reference on
    its cached prompts) on every row: the per-token KL of its continuations is the one computed
    without a cache, each prompt alone; the unsteered model reads KL 0."""
    from subspace_sweep.causal import BehaviourSet, kl_meter
    from tests.helpers_kl import meter_prompt_ids, teacher_forced_kl

    _, model, tok, _, _ = tiny_arch
    gen = torch.Generator().manual_seed(4)
    delta = {n: 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()
             if n.startswith(block_name(1) + ".") and n.endswith("proj.weight")}
    meter = kl_meter(model, tok, BehaviourSet.from_probes(tok, PROBES.eval[:3]), n_tokens=5)
    got = meter(delta, 1.0)
    want = torch.cat(teacher_forced_kl(model, meter_prompt_ids(meter), delta, 1.0, 5, set(meter.stops.tolist())))
    assert got.positions == want.numel() and float(want.max()) > 1e-4
    assert got.kl == pytest.approx(float(torch.quantile(want, 0.95)), rel=1e-4)
    assert meter(delta, 0.0).kl < 1e-8


# ----------------------------------------------------------------------------- readers and circuits


def test_readers_are_what_the_modules_multiply_the_residual_by(tiny_arch):
    """Probe with X = √d·I (each row has rms 1, up to eps): the module chain gives W·diag(γ)·√d/√(1+eps)."""
    _, model, _, W, _ = tiny_arch
    check_readers(model, W)


def test_qk_circuit_is_each_heads_score_form_up_to_per_token_scalars(tiny_arch):
    """q̂_h(x)·k̂_g(y) = xᵀ M_h y / (r(x) r(y) ρ_h(x) ρ'_g(y)): r the attention norm's RMS of the
    residual (1 without one), ρ the q/k norms' RMS of the projections (1 without them)."""
    _, model, _, W, _ = tiny_arch
    check_qk_circuit(model, W)


def test_ov_circuit_reproduces_the_attention_output(tiny_arch):
    """o_proj's output at each token = Σ_h Σ_s a_hts·OV_h x_s / r_s (+ the biases' part), OV_h the
    per-head circuit without a post-projection norm; with one, the norm's output is ∝ diag(γ_post)·it."""
    _, model, tok, W, _ = tiny_arch
    check_ov_circuit(model, tok, W, 1, PROBES.fit[0])


def test_post_norm_write_space_to_first_order(tiny_arch):
    """A small o_proj delta ΔW changes what the attention adds to the residual, to first order, by
    J(o_t)·ΔW z_t: J the Jacobian of the post-projection norm at o_proj's output o_t (its own
    forward, differentiated with torch.func.jvp), z_t o_proj's input. That lies inside
    span(diag(γ)·col(ΔW), diag(γ)·o_t): the weight target's write space diag(γ)·col(ΔW) plus the
    norm's rescaling along the token's own output, which the first-order target leaves out.
    Pre-norm rows: the change is ΔW z_t itself, inside col(ΔW)."""
    case, model, tok, W, _ = tiny_arch
    arch = architecture_of(model.config)
    layer, blk = 1, block_name(1)
    o_name = f"{blk}.{arch.attention}.o_proj"
    gen = torch.Generator().manual_seed(5)
    dW = (torch.randn(W.d_model, 2, generator=gen) @ torch.randn(2, W.layers[layer].o.shape[1], generator=gen)).double()
    enc = tok([PROBES.fit[1]], return_tensors="pt")
    with torch.no_grad(), record_activations(model, [o_name], inputs=True) as rec:
        model(**enc)
    z, o = rec.input(o_name)[0].double(), rec.output(o_name)[0].double()
    gain = W.layers[layer].o_gain
    U = linalg.orthonormalize((linalg.as64(gain)[:, None] if gain is not None else 1.0) * dW)
    if not arch.attn_out_norm:
        assert gain is None
        change = z @ dW.T
    else:
        norm = copy.deepcopy(model.get_submodule(f"{blk}.{arch.attn_out_norm}")).double()
        change = torch.stack([torch.func.jvp(norm, (o[t],), (dW @ z[t],))[1] for t in range(z.shape[0])])
    outside_write_space = []
    for t in range(change.shape[0]):
        span = U if gain is None else linalg.orthonormalize(torch.cat([U, (linalg.as64(gain) * o[t])[:, None]], 1))
        resid = change[t] - span @ (span.T @ change[t])
        assert float(resid.norm()) <= 1e-5 * float(change[t].norm()), (case, t)
        outside_write_space.append(float((change[t] - U @ (U.T @ change[t])).norm() / change[t].norm()))
    if gain is not None:  # the own-output direction is really needed: the write space alone misses some
        assert max(outside_write_space) > 1e-2, outside_write_space


# ----------------------------------------------------------------------------- recovery and the CLI


def test_a_planted_delta_is_recovered(tiny_arch):
    _, model, tok, W, A = tiny_arch
    layers = [1]
    cands = build_a_side(W, A, k_broad=16, layers=layers)
    by = {c.name: c for c in cands}
    for plant in ("mlp_write", "attn_ov_write", "TaskDiff_contrast"):
        delta = plant_in(model, by[plant], layers, seed=11)
        rank, pct = plant_rank(weight_summary(cands, delta, layers, write_gains={1: write_gains(model, 1)}), plant)
        assert rank == 1 and pct >= 95.0, (plant, rank, pct)


@pytest.mark.parametrize("case", CASES)
def test_run_end_to_end_on_the_saved_folder(tmp_path, case):
    model_type, _, extra = case.partition("+")
    folder = save_tiny_decoder(tmp_path / "model", model_type, seed=3, bias=extra == "bias")
    model, tok = build_tiny_decoder(model_type, seed=3, bias=extra == "bias")
    gen = torch.Generator().manual_seed(2)
    delta = {n: 0.02 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()
             if n.startswith(block_name(1) + ".") and "norm" not in n}
    path = save_delta(delta, tmp_path / "w.safetensors")
    out = tmp_path / "run"
    assert cli.main(["run", "--model", str(folder), "--delta", str(path), "--out", str(out), "--quiet",
                     "--n-boot", "0"]) == 0
    s = pl.read_csv(out / "summary.tsv", separator="\t")
    joint = s.filter(pl.col("panel") == "joint")
    # a delta file without the pair's adapter record: the gradient bases' family variant is empty
    # (declared; scores NaN, ranked last); every other candidate is scored
    assert joint.filter(pl.col("joint_gain").is_nan())["candidate"].to_list() == ["grad_behaviour_family"]
    assert joint["joint_gain"].null_count() == 0
    pct = pl.read_csv(out / "summary_pct.tsv", separator="\t").select(pl.col("^pct_oracle_.*$")).to_numpy()
    assert (pct[pct == pct] <= 100.0 + 1e-6).all()
    if extra == "bias":  # the writer biases are scored (one more column), the rest listed as unscored
        import json

        manifest = json.loads((out / "manifest.json").read_text())
        assert all("o_proj" not in k and "down_proj" not in k for k in manifest["delta_unscored_keys"])
        assert any(k.endswith("q_proj.bias") for k in manifest["delta_unscored_keys"])


@pytest.mark.parametrize("model_type, build", [
    ("qwen3_moe", lambda: __import__("transformers").Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=2, num_experts_per_tok=1)),
    ("gpt2", lambda: __import__("transformers").GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2)),
])
def test_an_unsupported_model_type_is_refused_before_its_weights_load(capsys, tmp_path, tiny_dir, model_type, build):
    """The weights file is garbage: the refusal must come from the config alone."""
    folder = tmp_path / model_type
    folder.mkdir()
    build().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dir / name).exists():
            (folder / name).write_bytes((tiny_dir / name).read_bytes())
    (folder / "model.safetensors").write_bytes(b"not weights")
    gen = torch.Generator().manual_seed(0)
    path = save_delta({"model.layers.0.self_attn.o_proj.weight": torch.randn(4, 4, generator=gen)}, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    code = cli.main(["run", "--model", str(folder), "--delta", str(path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_BAD_INPUT and len(err.splitlines()) == 1, err
    assert model_type in err and "supported: llama" in err, err
    assert not out.exists()


def test_weight_bases_span_the_probed_modules_behind_any_norm(tiny_arch, request):
    """The real tiers' module check (``check_bases_span_the_modules``: readers, the unembedding, the
    OV and MLP round-trip circuits, the gate kernel, the attention sink, each against its probed
    module) on every tiny architecture, post-norm ones (Gemma 2/3, OLMo 2) included: behind a
    post-projection norm the residual receives diag(γ_post)·(the writer's output), and the check's
    write-side references carry that gain (without it Gemma-3-270m's write bases failed it)."""
    from subspace_sweep.a_side import build_a_side_for
    from subspace_sweep.config import SweepConfig
    from tests.module_checks import check_bases_span_the_modules

    case, model, tok, _, _ = tiny_arch
    if case == "llama+bias":
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
            "gate_kernel against the probed MLP with a gate bias: min cosine 0.02 (found 2026-12-06, not yet traced "
            "to the candidate or the probe; tests/QUARANTINES.md)")))
    layers = (1, 2)
    a_side = build_a_side_for(model, tok, SweepConfig(quiet=True, n_boot=0, r=8), list(layers), PROBES)
    mlp = architecture_of(model.config).mlp
    names = [f"{block_name(layer)}.{mlp}" for layer in layers]
    enc = tok(list(PROBES.fit), return_tensors="pt", padding=True)
    last = enc["attention_mask"].long().cumsum(1).argmax(1)
    with torch.no_grad(), record_activations(model, names, inputs=True, outputs=False) as rec:
        model(**enc)
    inputs = {layer: rec.input(n)[torch.arange(len(last)), last] for layer, n in zip(layers, names)}
    fused = architecture_of(model.config).projection("gate")[1] is not None  # the probe reads mlp.act_fn: not phi3's
    worst = check_bases_span_the_modules(model, tok, a_side.candidates, layers, r=8,
                                         mlp_inputs=None if fused else inputs)
    assert {"attn_ov_write", "mlp_roundtrip_write", "attention_sink"} | (set() if fused else {"gate_kernel"}) <= set(worst)
