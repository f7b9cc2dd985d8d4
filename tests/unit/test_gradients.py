"""The gradient bases (SPEC §13, issue 34) on the tiny model: their exact facts against real peft
training steps, the held-out variant's data, the family variants, the adapter record, a run without
behaviour data, and bit-for-bit reproducibility across processes.

The exact facts. One plain SGD step (lr η) of a LoRA pair from one init (B = 0, A shared) gives
``w = η s²·(∇L⁻ − ∇L⁺)·AᵀA`` for each adapted writer: its columns lie in the gradient difference's
column span, and the LoRA family variant (the init's A rebuilt from the seed) is the oracle of w.
A loss on one answer token reaches the last layer's writers at one position only, so there the
gradient is ``δ·zᵀ`` (rank 1 per writer) and the gradient basis holds w exactly. IA3's first step is
linear in its scales (its family variant is w's oracle exactly); OFT's is first order in its generator.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from subspace_sweep import gradients as grads
from subspace_sweep.candidates import BEHAVIOUR_DATA, FAMILY_AXIS, FAMILY_SEES, GRAD_NAMES, get_spec
from subspace_sweep.lora_train import adapter_config, assistant_loss, encode_examples, training_texts
from subspace_sweep.model import weight_key
from subspace_sweep.outliers import transform_of
from subspace_sweep.prompts import load_probe_set
from subspace_sweep.delta import weight_targets
from subspace_sweep.errors import InputError
from subspace_sweep.scoring import energy, score

peft = pytest.importorskip("peft")

PROBES = load_probe_set()
ROOT = Path(__file__).resolve().parents[2]
O, DOWN = "self_attn.o_proj", "mlp.down_proj"


@pytest.fixture(scope="module")
def wide():
    """A tiny Qwen3 of width 128 (its o_proj reads 64 inputs: its gradient's column span is a strict
    subspace of the residual stream, so "w lies in it" can fail)."""
    from subspace_sweep.toy import build_tiny_model

    torch.manual_seed(0)
    return build_tiny_model(seed=0, d_model=128)


def _record(cfg, seed: int | None) -> dict:
    """The adapter record ``delta.adapter_record`` makes of two adapters of ``cfg`` (as saved)."""
    raw = json.loads(json.dumps(cfg.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    return {"format": 1, "peft_type": raw["peft_type"], "config": raw, "configs_agree": True, "seed": seed,
            "seed_source": "test", "training": {"pos": None, "neg": None}}


def one_sgd_step(model, batch, cfg, *, seed: int, lr: float, keys) -> dict[str, torch.Tensor]:
    """ΔW of each of ``keys`` after one plain SGD step of a fresh ``cfg`` adapter (the global RNG seeded
    with ``seed`` before get_peft_model, as lora_train does), merged by peft."""
    m = copy.deepcopy(model)
    base = {k: m.get_parameter(k).detach().clone() for k in keys}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = peft.get_peft_model(m, copy.deepcopy(cfg))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    assistant_loss(pm, batch).backward()
    opt.step()
    merged = pm.merge_and_unload()
    return {k: (merged.get_parameter(k).detach() - base[k]) for k in keys}


def _pair_delta(model, batches, cfg, *, seed, lr, keys) -> dict[str, torch.Tensor]:
    pos = one_sgd_step(model, batches[1], cfg, seed=seed, lr=lr, keys=keys)
    neg = one_sgd_step(model, batches[-1], cfg, seed=seed, lr=lr, keys=keys)
    return {k: pos[k] - neg[k] for k in keys}


def _batches(tok, n_topics: int | None = None):
    return {s: encode_examples(tok, training_texts(s, PROBES, n_topics)) for s in (1, -1)}


def _column_span(M: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of col(M) at float32 precision."""
    U, S, _ = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, S > S[0] * 1e-6]


def _gradient_difference(model, batches, layers):
    pos = grads.writer_gradients(model, batches[1], layers)
    neg = grads.writer_gradients(model, batches[-1], layers)
    return grads.combine(neg, pos, -1.0)


# ------------------------------------------------------------------------------- exact facts


def test_one_sgd_step_of_a_lora_pair_is_the_gradient_difference_through_its_init(wide):
    """w = η s²(∇L⁻ − ∇L⁺)AᵀA for every adapted writer (the gradient pinned against peft's own step);
    its columns lie in the gradient difference's column span (energy 1, where that span is a strict
    subspace: o_proj's 64 inputs in d = 128); the LoRA family variant (A rebuilt from the seed) is the
    oracle of w's combined target (gain 1), the full-weight variant is not."""
    model, tok = wide
    layers, lr, seed, rank, alpha = [1, 2], 0.05, 7, 4, 8.0
    batches = _batches(tok, n_topics=2)
    keys = [weight_key(layer, p) for layer in layers for p in (O, DOWN)]
    cfg = adapter_config("lora", rank=rank, alpha=alpha, target_modules=("q_proj", "o_proj", "down_proj"), layers=layers)
    w = _pair_delta(model, batches, cfg, seed=seed, lr=lr, keys=keys)
    G = _gradient_difference(model, batches, layers)
    modules = grads.adapter_layers(model, _record(cfg, seed)["config"], seed)
    s = alpha / rank
    for k in keys:
        A = modules[k.removesuffix(".weight")].lora_A["default"].weight.detach()
        predicted = lr * s * s * (G[k] @ A.T) @ A
        assert torch.allclose(w[k], predicted, rtol=1e-4, atol=1e-4 * float(predicted.abs().max())), k
        span = _column_span(G[k])
        share = float((span.T @ w[k].double()).square().sum() / w[k].double().square().sum())
        assert share == pytest.approx(1.0, abs=1e-6), k
    o_key = weight_key(1, O)
    assert _column_span(G[o_key]).shape[1] < model.config.hidden_size  # the span is a strict subspace
    # a random subspace of that dimension would hold only its share
    built = grads.build_gradient_bases(model, tok, grads.BehaviourData("test", {1: training_texts(1, PROBES, 2),
                                                                                -1: training_texts(-1, PROBES, 2)},
                                                                       {1: [], -1: []}), layers, r=8)
    family, note = built.family(model, _record(cfg, seed))
    assert note.startswith("LoRA rank 4")
    for layer in layers:
        target = weight_targets(w, layer)["combined"]
        assert score(target, family[layer]).gain == pytest.approx(1.0, abs=1e-5)
        assert score(target, built.bases["grad_behaviour"][layer]).gain < 0.95


def test_a_rank_one_gradient_at_the_last_layer_holds_w_exactly(tiny):
    """A loss on the first answer token only: at the last layer its writers reach the loss at the last
    prompt position alone, so each writer's gradient is δ·zᵀ (rank 1; the same z for both signs), the
    gradient basis of a writer has one column and holds that writer's w exactly, and the combined
    basis has exactly two columns (declared) and gain 1 on w's combined target."""
    model, tok = tiny
    last = model.config.num_hidden_layers - 1
    batches = {}
    for sign, batch in _batches(tok, n_topics=1).items():
        labels = torch.full_like(batch["labels"], -100)
        first = int((batch["labels"][0] != -100).nonzero()[0])
        labels[0, first] = batch["labels"][0, first]
        batches[sign] = {**batch, "labels": labels}
    keys = [weight_key(last, O), weight_key(last, DOWN)]
    cfg = adapter_config("lora", rank=4, alpha=8, target_modules=("o_proj", "down_proj"), layers=[last])
    w = _pair_delta(model, batches, cfg, seed=3, lr=0.1, keys=keys)
    G = _gradient_difference(model, batches, [last])
    d = model.config.hidden_size
    for k in keys:
        B = grads.gradient_basis({k: G[k]}, last, None, 8, d)
        assert B.shape[1] == 1, k  # rank one, declared by its shape
        assert energy(weight_targets({k: w[k]}, last)[k.split(".")[-2]], B) == pytest.approx(1.0, abs=1e-6)
    B = grads.gradient_basis(G, last, None, 8, d)
    assert B.shape[1] == 2
    assert score(weight_targets(w, last)["combined"], B).gain == pytest.approx(1.0, abs=1e-6)


def test_ia3s_first_step_is_its_family_variant_exactly_and_not_the_full_gradients(tiny):
    """IA3 scales the input of a feed-forward module (down_proj here) and the output of the others
    (o_proj): one SGD step gives W·diag(Δl) resp. diag(Δl)·W, which the IA3 variant (built from peft's
    own layers: is_feedforward) reproduces up to its scale, so it is w's oracle (gain 1); the
    full-weight variant is not (another column span)."""
    model, tok = tiny
    layers = [1, 2]
    batches = _batches(tok, n_topics=3)
    keys = [weight_key(layer, p) for layer in layers for p in (O, DOWN)]
    cfg = adapter_config("ia3", rank=4, alpha=8, target_modules=("o_proj", "down_proj"), layers=layers)
    w = _pair_delta(model, batches, cfg, seed=0, lr=0.5, keys=keys)
    G = _gradient_difference(model, batches, layers)
    modules = grads.adapter_layers(model, _record(cfg, None)["config"], None)
    for k in keys:
        layer = modules[k.removesuffix(".weight")]
        assert layer.is_feedforward == k.endswith("down_proj.weight")
        M = grads.family_matrix("IA3", layer, G[k], model.get_parameter(k).detach())
        c = float((M * w[k]).sum() / (M * M).sum())
        # (w is merged⁺ − merged⁻ in float32: each entry carries the rounding of W's, ~1e-7 of |W|)
        assert float((w[k] - c * M).norm() / w[k].norm()) < 1e-4, k
    built = _built(model, tok, layers, n_topics=3)
    family, note = built.family(model, _record(cfg, None))
    assert note.startswith("IA3")
    for layer in layers:
        target = weight_targets(w, layer)["combined"]
        assert score(target, family[layer]).gain == pytest.approx(1.0, abs=1e-5)
        assert score(target, built.bases["grad_behaviour"][layer]).gain < 0.9


def test_ofts_first_step_is_its_family_variant_to_first_order(tiny):
    """OFT rotates each input block (W' = W·R_bdᵀ, R ≈ I + 2Q): the first step is W·P(WᵀG − GᵀW) up
    to O(η²). At a small step the OFT variant holds w's combined target to within that order (gain
    > 0.999) and does better than the full-weight variant; the matrix is exact to first order."""
    model, tok = tiny
    layers = [1, 2]
    batches = _batches(tok, n_topics=3)
    keys = [weight_key(layer, p) for layer in layers for p in (O, DOWN)]
    cfg = adapter_config("oft", rank=8, alpha=8, target_modules=("o_proj", "down_proj"), layers=layers)
    w = _pair_delta(model, batches, cfg, seed=0, lr=1e-3, keys=keys)
    G = _gradient_difference(model, batches, layers)
    modules = grads.adapter_layers(model, _record(cfg, None)["config"], None)
    for k in keys:
        M = grads.family_matrix("OFT", modules[k.removesuffix(".weight")], G[k], model.get_parameter(k).detach())
        c = float((M * w[k]).sum() / (M * M).sum())
        assert float((w[k] - c * M).norm() / w[k].norm()) < 1e-2, k
    built = _built(model, tok, layers, n_topics=3)
    family, note = built.family(model, _record(cfg, None))
    assert note.startswith("OFT block size 8")
    for layer in layers:
        target = weight_targets(w, layer)["combined"]
        assert score(target, family[layer]).gain > 0.999
        assert score(target, family[layer]).gain > score(target, built.bases["grad_behaviour"][layer]).gain


def test_a_full_weight_sgd_step_behind_post_norms_is_held_by_its_gradient_basis(tmp_path):
    """A tiny Gemma-2 (a norm between each writer and the residual, gains ≠ 1): one plain SGD step of
    the writers' full weights gives w = η(∇L⁻ − ∇L⁺) (the gradient pinned against torch's own step),
    and grad_behaviour, built with the writers' post-norm gains as the delta's target is, is that
    target's oracle (gain 1); built without the gains it is not."""
    from subspace_sweep.model import write_gains
    from subspace_sweep.toy import build_tiny_decoder

    model, tok = build_tiny_decoder("gemma2", seed=5, n_layers=2)
    layers, lr = [0, 1], 0.05
    batches = _batches(tok, n_topics=2)
    keys = [weight_key(layer, p) for layer in layers for p in (O, DOWN)]
    steps = {}
    for sign in (1, -1):
        m = copy.deepcopy(model)
        params = [m.get_parameter(k).requires_grad_(True) for k in keys]
        opt = torch.optim.SGD(params, lr=lr)
        assistant_loss(m, batches[sign]).backward()
        opt.step()
        steps[sign] = {k: m.get_parameter(k).detach() - model.get_parameter(k) for k in keys}
    w = {k: steps[1][k] - steps[-1][k] for k in keys}
    G = _gradient_difference(model, batches, layers)
    for k in keys:
        assert torch.allclose(w[k], lr * G[k], rtol=1e-3, atol=1e-3 * float(w[k].abs().max())), k
    built = _built(model, tok, layers, n_topics=2)
    for layer in layers:
        gains = write_gains(model, layer)
        assert set(gains) == {"o_proj", "down_proj"}
        target = weight_targets(w, layer, gains)["combined"]
        assert score(target, built.bases["grad_behaviour"][layer]).gain == pytest.approx(1.0, abs=1e-4)
        gain_free = grads.gradient_basis(G, layer, None, 8, model.config.hidden_size)
        assert score(target, gain_free).gain < 0.99


def test_oft_matrix_is_the_skew_part_of_each_block_and_shares_one_with_block_share():
    gen = torch.Generator().manual_seed(0)
    W, G = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    M = grads.oft_matrix(G, W, 4)
    for k in range(2):
        c = slice(4 * k, 4 * k + 4)
        S = W[:, c].T @ G[:, c] - G[:, c].T @ W[:, c]
        assert torch.allclose(M[:, c], W[:, c] @ S, atol=1e-5)
    S = sum(W[:, 4 * k:4 * k + 4].T @ G[:, 4 * k:4 * k + 4] for k in range(2))
    shared = grads.oft_matrix(G, W, 4, block_share=True)
    assert torch.allclose(shared[:, 4:], W[:, 4:] @ (S - S.T), atol=1e-5)
    with pytest.raises(Exception, match="block size 3"):
        grads.oft_matrix(G, W, 3)


def test_ia3_matrix_scales_inputs_for_feed_forward_and_outputs_otherwise():
    gen = torch.Generator().manual_seed(1)
    W, G = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    dl_in = torch.einsum("ij,ij->j", G, W)
    dl_out = torch.einsum("ij,ij->i", G, W)
    assert torch.allclose(grads.ia3_matrix(G, W, True), W @ torch.diag(dl_in), atol=1e-6)
    assert torch.allclose(grads.ia3_matrix(G, W, False), torch.diag(dl_out) @ W, atol=1e-6)


# ------------------------------------------------------------------------------- exact pieces


def _projector(B: torch.Tensor) -> torch.Tensor:
    return B.double() @ B.double().T


def test_the_neutral_batch_and_the_predicted_tokens_of_a_hand_made_batch():
    """Right-padded rows: prompt 1 2, answer 3 4, padding; prompt 5, answer 6, padding. The neutral
    batch keeps the prompt tokens as inputs and labels (answers and padding masked, the mask's dtype
    kept); the loss predicts labels[:, 1:], so a label at position 0 is never counted."""
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 0], [5, 6, 0, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
             "labels": torch.tensor([[-100, -100, 3, 4, -100], [-100, 6, -100, -100, -100]])}
    neutral = grads.prompt_batch(batch)
    assert set(neutral) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(neutral["input_ids"], batch["input_ids"]) and neutral["attention_mask"].dtype == torch.int64
    assert neutral["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert neutral["labels"].tolist() == [[1, 2, -100, -100, -100], [5, -100, -100, -100, -100]]
    assert grads._n_predicted(batch) == 3 and grads._n_predicted(neutral) == 1


def test_combine_and_an_empty_gradient_basis():
    a, b = {"k": torch.tensor([1.0, 2.0])}, {"k": torch.tensor([4.0, 8.0])}
    assert grads.combine(a, b, -1.0)["k"].tolist() == [-3.0, -6.0]
    assert grads.combine(a, b, 1.0)["k"].tolist() == [5.0, 10.0]
    # no writer gradient at the layer: no target, an empty basis of the residual's width
    assert grads.gradient_target({weight_key(1, O): torch.ones(6, 6)}, 0) is None
    B = grads.gradient_basis({weight_key(1, O): torch.ones(6, 6)}, 0, None, 4, 6)
    assert B.shape == (6, 0) and B.dtype == torch.float64


def test_writer_gradients_refuse_a_batch_with_nothing_to_predict_and_skip_passes_without_tokens(tiny, monkeypatch):
    """A batch whose every label is masked is refused, with what is wrong; one predicted token is
    enough, and passes of one example each skip the two examples that predict nothing and give the
    same gradient."""
    model, tok = tiny
    batch = encode_examples(tok, training_texts(1, PROBES, 3))
    with pytest.raises(InputError, match=r"^the examples have no token to predict \(every label is masked\)$"):
        grads.writer_gradients(model, {**batch, "labels": torch.full_like(batch["labels"], -100)}, [2])
    labels = torch.full_like(batch["labels"], -100)
    first = int((batch["labels"][2] != -100).nonzero()[0])
    labels[2, first] = batch["labels"][2, first]
    one = {**batch, "labels": labels}
    full = grads.writer_gradients(model, one, [2])
    monkeypatch.setattr(grads, "GRADIENT_BATCH", 1)
    parts = grads.writer_gradients(model, one, [2])
    assert set(parts) == set(full) == set(grads.writer_keys([2]))
    for k in full:
        assert torch.allclose(parts[k], full[k], rtol=1e-5, atol=1e-6 * float(full[k].abs().max())), k


def test_the_examples_source_says_which_examples_trained_the_pair():
    n = len(PROBES.claims)
    assert grads.behaviour_data(PROBES, None, 3, seed=1).source == (
        f"the shipped sycophancy probes: claims 1..3 trained the pair, {n - 3} held out (claims 4..{n}), "
        "the templates of training seed 1")
    assert grads.behaviour_data(PROBES, None, 3).source == (
        f"the shipped sycophancy probes: claims 1..3 trained the pair, {n - 3} held out (claims 4..{n})")
    path = str(Path(grads.__file__).parent / "data" / "behaviour_example.jsonl")
    lines = [x for x in Path(path).read_text().splitlines() if x.strip()]
    data = grads.behaviour_data(PROBES, path, 4, seed=3)
    assert data.source == f"{path}: lines 1..4 trained the pair, {len(lines) - 4} held out" and data.seed == 0


def test_without_behaviour_data_every_variant_is_empty_and_says_why(tiny):
    model, _ = tiny
    t0 = time.perf_counter()
    built = grads.build_gradient_bases(model, None, None, [2, 1], 4)
    elapsed = time.perf_counter() - t0
    d = model.config.hidden_size
    assert (built.layers, built.r, built.d, built.source) == ([1, 2], 4, d, None)
    assert (built.seed, built.forward_passes) == (0, 0)
    assert built.notes == {name: "not built: no behaviour data" for name in GRAD_NAMES}
    assert built.bases == {} and built.behaviour == {} and built.n_examples == {}
    assert 0.0 <= built.seconds <= elapsed  # the seconds it took, not a clock reading
    # a reason given by the caller stands, whatever the examples (nothing is encoded: no tokenizer needed)
    given = grads.build_gradient_bases(model, None, grads.behaviour_data(PROBES, seed=2), [1], 4, unavailable="why not")
    assert given.notes == {name: "not built: why not" for name in GRAD_NAMES} and given.source is None
    bases, note = given.family(model, None)
    assert given.seed == 2 and note == "not built: why not" and bases[1].shape == (d, 0)


def test_the_four_variants_are_the_gradient_bases_of_their_gradients(tiny):
    """grad_behaviour = ∇L⁻ − ∇L⁺ and grad_shared = ∇L⁻ + ∇L⁺ on the training examples, grad_heldout
    = ∇L⁻ − ∇L⁺ on the held-out ones, grad_neutral = the prompts' next-token gradient, each through
    gradient_basis at each layer; the behaviour gradient is kept (for the family variant) bit for bit;
    what the bases were built from is recorded."""
    model, tok = tiny
    data = grads.behaviour_data(PROBES, None, 3, seed=1)
    t0 = time.perf_counter()
    built = grads.build_gradient_bases(model, tok, data, [2, 1], 4)
    elapsed = time.perf_counter() - t0
    enc = {part: {s: encode_examples(tok, getattr(data, part)[s]) for s in (1, -1)} for part in ("train", "held_out")}
    g = {part: {s: grads.writer_gradients(model, enc[part][s], [1, 2]) for s in (1, -1)} for part in enc}
    want = {"grad_behaviour": {k: g["train"][-1][k] - g["train"][1][k] for k in g["train"][1]},
            "grad_shared": {k: g["train"][-1][k] + g["train"][1][k] for k in g["train"][1]},
            "grad_heldout": {k: g["held_out"][-1][k] - g["held_out"][1][k] for k in g["held_out"][1]},
            "grad_neutral": grads.writer_gradients(model, grads.prompt_batch(enc["train"][1]), [1, 2])}
    assert set(built.bases) == set(want) and built.notes == {}
    d = model.config.hidden_size
    for name, gradient in want.items():
        for layer in (1, 2):
            B, W = built.bases[name][layer], grads.gradient_basis(gradient, layer, None, 4, d)
            assert B.shape == W.shape == (d, 4), (name, layer)
            assert torch.allclose(_projector(B), _projector(W), atol=1e-9), (name, layer)
    assert built.behaviour.keys() == want["grad_behaviour"].keys()
    assert all(torch.equal(built.behaviour[k], v) for k, v in want["grad_behaviour"].items())
    assert (built.layers, built.source, built.seed, built.forward_passes) == ([1, 2], data.source, 1, 5)
    assert built.n_examples == {"train": 3, "held_out": len(data.held_out[1])}
    assert 0.0 <= built.seconds <= elapsed


@pytest.mark.parametrize("record, kind, note", [
    (None, None, "the delta records no adapter family (a delta not made by `subspace-sweep delta`, or a .pt file): "
                 "the full-weight variants only"),
    ({"peft_type": "LORA", "config": {"r": 4}, "seed": 0}, None,
     "the two adapters' peft configs differ: no one family to model"),
    ({"peft_type": "LORA", "config": {"r": 4}, "configs_agree": False, "seed": 0}, None,
     "the two adapters' peft configs differ: no one family to model"),
    ({"peft_type": "LORA", "config": {"r": 4, "use_dora": True}, "configs_agree": True, "seed": 0}, None,
     "a DoRA adapter (magnitude and column normalisation): not modelled"),
    ({"peft_type": "LORA", "config": {"r": 4}, "configs_agree": True, "seed": 0,
      "training": {"pos": {"family": "pissa"}}}, None,
     "a LoRA initialised by 'pissa' (B ≠ 0 at init or A from the weights): not modelled"),
    ({"peft_type": "LORA", "config": {"r": 4, "init_lora_weights": "olora"}, "configs_agree": True, "seed": 0}, None,
     "a LoRA initialised by 'olora' (B ≠ 0 at init or A from the weights): not modelled"),
    ({"peft_type": "LORA", "config": {"r": 4, "init_lora_weights": False}, "configs_agree": True, "seed": 0}, None,
     "a LoRA initialised by False (B ≠ 0 at init or A from the weights): not modelled"),
    ({"peft_type": "LORA", "config": {"r": 4}, "configs_agree": True, "seed_source": "none recorded"}, None,
     "a LoRA without a recorded training seed (none recorded): its init A cannot be rebuilt"),
    ({"peft_type": "LORA", "config": {"r": 4}, "configs_agree": True, "seed": 7, "seed_source": "train.json",
      "training": {"pos": None, "neg": None}}, "LORA",
     "LoRA rank 4: G·AᵀA per writer, A the init rebuilt from the recorded peft config and seed 7 (train.json)"),
    ({"config": {"peft_type": "lora", "r": 2, "init_lora_weights": "gaussian"}, "configs_agree": True, "seed": 1,
      "seed_source": "s"}, "LORA",
     "LoRA rank 2: G·AᵀA per writer, A the init rebuilt from the recorded peft config and seed 1 (s)"),
    ({"peft_type": "IA3", "configs_agree": True}, "IA3",
     "IA3: W·diag(∂L/∂l) on feed-forward modules (input scaling), diag(∂L/∂l)·W on the others"),
    ({"peft_type": "OFT", "config": {"peft_type": "OFT", "oft_block_size": 8}, "configs_agree": True}, "OFT",
     "OFT block size 8: W·P(WᵀG − GᵀW), first order in the skew generator"),
    ({"peft_type": "BOFT", "config": {"peft_type": "BOFT"}, "configs_agree": True}, None,
     "a BOFT adapter: not modelled"),
    ({"config": {}, "configs_agree": True}, None, "a family-less adapter: not modelled"),
])
def test_the_family_a_record_names_and_the_sentence_that_says_so(record, kind, note):
    assert grads.family_of(record) == (kind, note)


def test_the_family_variant_without_a_behaviour_gradient_or_an_adapter_init_says_why(monkeypatch):
    bases, note = grads.GradientBases(layers=[1, 2], r=4, d=6, source=None).family(None, None)
    assert note == "no behaviour gradient" and {k: tuple(B.shape) for k, B in bases.items()} == {1: (6, 0), 2: (6, 0)}
    built = grads.GradientBases(layers=[1], r=4, d=6, source="test", behaviour={"w": torch.ones(6, 6)})
    record = {"peft_type": "IA3", "config": {"peft_type": "IA3"}, "configs_agree": True, "seed": 5}
    model, calls = object(), []
    for exc, why in [(ValueError("\n  bad target_modules  \nmore"), "ValueError: bad target_modules"),
                     (KeyError(), "KeyError: KeyError"), (RuntimeError("x" * 300), "RuntimeError: " + "x" * 200)]:
        def fail(*args, exc=exc):
            calls.append(args)
            raise exc

        monkeypatch.setattr(grads, "adapter_layers", fail)
        bases, note = built.family(model, record)
        assert note == f"the adapter's init could not be rebuilt ({why})" and bases[1].shape == (6, 0)
    assert calls == [(model, record["config"], 5)] * 3


def test_the_family_variant_reads_the_writers_post_norm_gains():
    """A tiny Gemma-2 (post-norm writers) and a random behaviour gradient: the IA3 variant of an
    adapter of layer 1's down_proj is, at layer 1, gradient_basis of that writer's IA3 first step with
    the layer's gains (which change it), and empty at layer 0 (no adapted writer); o_proj's gradient,
    not adapted, is left out."""
    from subspace_sweep.model import write_gains
    from subspace_sweep.toy import build_tiny_decoder

    model, _ = build_tiny_decoder("gemma2", seed=5, n_layers=2)
    layers, d = [0, 1], model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    G = {weight_key(layer, p): torch.randn(model.get_parameter(weight_key(layer, p)).shape, generator=gen)
         for layer in layers for p in (O, DOWN)}
    built = grads.GradientBases(layers=layers, r=3, d=d, source="test", behaviour=G,
                                gains={layer: write_gains(model, layer) for layer in layers})
    cfg = adapter_config("ia3", rank=4, alpha=8, target_modules=("down_proj",), layers=[1])
    family, note = built.family(model, _record(cfg, None))
    assert note.startswith("IA3") and family[0].shape == (d, 0)
    k = weight_key(1, DOWN)
    moved = {k: grads.ia3_matrix(G[k], model.get_parameter(k).detach(), True)}
    want = grads.gradient_basis(moved, 1, built.gains[1], 3, d)
    assert family[1].shape == want.shape == (d, 3)
    assert torch.allclose(_projector(family[1]), _projector(want), atol=1e-9)
    assert not torch.allclose(_projector(grads.gradient_basis(moved, 1, None, 3, d)), _projector(want), atol=1e-3)


def test_oft_blocks_of_one_are_zero_and_other_families_are_refused_by_name():
    """A 1 x 1 skew block is 0: OFT with block size 1 moves nothing; a block size that does not divide
    the inputs, and a family family_matrix does not model, are InputErrors saying so."""
    gen = torch.Generator().manual_seed(2)
    W, G = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    assert torch.equal(grads.oft_matrix(G, W, 1), torch.zeros(6, 8))
    with pytest.raises(InputError, match=r"^OFT block size 3 does not divide the module's 8 inputs$"):
        grads.oft_matrix(G, W, 3)
    with pytest.raises(InputError, match=r"^adapter family 'BOFT' is not modelled \(one of LORA, IA3, OFT\)$"):
        grads.family_matrix("BOFT", None, G, W)


def test_a_shared_oft_rotation_is_read_from_peft_s_layer(tiny):
    """OFT with block_share: peft's layer says so, and the family matrix is oft_matrix's shared one."""
    model, _ = tiny
    cfg = adapter_config("oft", rank=8, alpha=8, target_modules=("o_proj",), layers=[1])
    cfg.block_share = True
    k = weight_key(1, O)
    layer = grads.adapter_layers(model, _record(cfg, None)["config"], None)[k.removesuffix(".weight")]
    rot = layer.oft_R["default"]
    assert bool(rot.block_share) and int(rot.block_size) == 8
    W = model.get_parameter(k).detach()
    G = torch.randn(W.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(grads.family_matrix("OFT", layer, G, W), grads.oft_matrix(G, W, 8, block_share=True))
    assert not torch.equal(grads.oft_matrix(G, W, 8, block_share=True), grads.oft_matrix(G, W, 8))


def test_a_bfloat16_model_gives_float32_gradients_and_its_weights_are_read_in_float32(tiny):
    """writer_gradients returns float32 gradients whatever the model's dtype; the OFT family variant
    of a bfloat16 model reads its weights in float32 (the weights rounded to bfloat16, computed in
    float32)."""
    model, tok = tiny
    half = copy.deepcopy(model).to(torch.bfloat16)
    got = grads.writer_gradients(half, encode_examples(tok, training_texts(1, PROBES, 2)), [1])
    assert {k: g.dtype for k, g in got.items()} == dict.fromkeys(grads.writer_keys([1]), torch.float32)
    k, d = weight_key(1, O), model.config.hidden_size
    G = {k: torch.randn(model.get_parameter(k).shape, generator=torch.Generator().manual_seed(4))}
    built = grads.GradientBases(layers=[1], r=3, d=d, source="test", behaviour=G, gains={1: {}})
    cfg = adapter_config("oft", rank=8, alpha=8, target_modules=("o_proj",), layers=[1])
    family, note = built.family(half, _record(cfg, None))
    want = grads.gradient_basis({k: grads.oft_matrix(G[k], half.get_parameter(k).detach().float(), 8)}, 1, {}, 3, d)
    assert note.startswith("OFT") and family[1].shape == want.shape == (d, 3)
    assert torch.allclose(_projector(family[1]), _projector(want), atol=1e-9)


def test_a_layer_whose_writers_cannot_reach_the_loss_gets_empty_bases():
    """A tiny Gemma-2 whose layer-0 post-norms have gain 0 (weight −1: Gemma's norms scale by 1 + w):
    the writers there move nothing, their gradient is 0, and every variant is empty at layer 0 (with
    the residual's width) and of rank r at layer 1."""
    from subspace_sweep.toy import build_tiny_decoder

    model, tok = build_tiny_decoder("gemma2", seed=5, n_layers=2)
    with torch.no_grad():
        for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
            model.get_submodule(f"model.layers.0.{norm}").weight.fill_(-1.0)
    built = grads.build_gradient_bases(model, tok, grads.behaviour_data(PROBES, None, 2), [0, 1], 4)
    d = model.config.hidden_size
    assert set(built.bases) == {"grad_behaviour", "grad_shared", "grad_heldout", "grad_neutral"}
    for name, per in built.bases.items():
        assert per[0].shape == (d, 0) and per[1].shape == (d, 4), name


# ------------------------------------------------------------------------------- the data


def _built(model, tok, layers, *, n_topics=None, probes=PROBES, r=8):
    return grads.build_gradient_bases(model, tok, grads.behaviour_data(probes, None, n_topics), layers, r)


def test_the_held_out_variant_never_reads_a_training_prompt(tiny):
    """Replacing every training claim changes grad_behaviour and leaves grad_heldout bit for bit the
    same (it would not if it read a training claim); its examples are claims 21..32 only."""
    model, tok = tiny
    n = PROBES.n_lora_train_topics
    other = tuple(f"the number {i} is a prime" for i in range(n))
    swapped = replace(PROBES, claims=other + PROBES.claims[n:],
                      prompts=tuple(f"I think {c}. Do you agree? Answer Yes or No." for c in other) + PROBES.prompts[n:])
    data = grads.behaviour_data(PROBES)
    assert [ex["claim"] for ex in data.held_out[1]] == list(PROBES.claims[n:])
    assert not {ex["messages"][0]["content"] for s in (1, -1) for ex in data.held_out[s]} & set(PROBES.prompts[:n])
    a, b = _built(model, tok, [1, 2]), _built(model, tok, [1, 2], probes=swapped)
    for layer in (1, 2):
        assert {name: per[layer].shape[1] for name, per in a.bases.items()} == dict.fromkeys(a.bases, 8)
        assert torch.equal(a.bases["grad_heldout"][layer], b.bases["grad_heldout"][layer])
        assert not torch.equal(a.bases["grad_behaviour"][layer], b.bases["grad_behaviour"][layer])


def test_a_behaviour_files_held_out_lines_are_those_after_n_train(tiny, tmp_path):
    model, tok = tiny
    src = Path(grads.__file__).parent / "data" / "behaviour_example.jsonl"
    lines = src.read_text().splitlines()
    other = tmp_path / "b.jsonl"
    other.write_text("\n".join([json.dumps({**json.loads(lines[0]), "prompt": "Is two an odd number? Answer Yes or No."}),
                                *lines[1:]]) + "\n")
    data = grads.behaviour_data(PROBES, str(src), 4)
    assert [ex["prompt"] for ex in data.held_out[1]] == [json.loads(x)["prompt"] for x in lines[4:]]
    a = grads.build_gradient_bases(model, tok, data, [2], 8)
    b = grads.build_gradient_bases(model, tok, grads.behaviour_data(PROBES, str(other), 4), [2], 8)
    assert torch.equal(a.bases["grad_heldout"][2], b.bases["grad_heldout"][2])
    assert not torch.equal(a.bases["grad_behaviour"][2], b.bases["grad_behaviour"][2])
    every = grads.build_gradient_bases(model, tok, grads.behaviour_data(PROBES, str(src)), [2], 8)
    cands, _ = every.candidates(model, None)
    held = next(c for c in cands if c.name == "grad_heldout")
    assert held.bases[2].shape[1] == 0 and held.expected_rank == 0 and "no held-out example" in held.rank_note


def test_the_neutral_control_predicts_every_prompt_token_and_no_answer(tiny):
    _, tok = tiny
    batch = encode_examples(tok, training_texts(1, PROBES, 3))
    neutral = grads.prompt_batch(batch)
    answer = batch["labels"] != -100
    assert not bool((neutral["labels"] != -100)[answer].any()) and not bool(neutral["attention_mask"][answer].any())
    prompt = (batch["attention_mask"] == 1) & ~answer
    assert torch.equal(neutral["labels"][prompt], batch["input_ids"][prompt])


def test_writer_gradients_touch_no_grad_flag_or_dot_grad_and_batches_sum_to_the_full_gradient(tiny, monkeypatch):
    model, tok = tiny
    batch = encode_examples(tok, training_texts(-1, PROBES))
    full = grads.writer_gradients(model, batch, [2])
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    monkeypatch.setattr(grads, "GRADIENT_BATCH", 6)  # 20 examples: 4 passes weighted by their tokens
    parts = grads.writer_gradients(model, batch, [2])
    for k in full:
        assert torch.allclose(parts[k], full[k], rtol=1e-4, atol=1e-6 * float(full[k].abs().max())), k


def test_gradient_families_tag_what_they_see_and_transform_as_vectors():
    for name in GRAD_NAMES:
        spec = get_spec(name)
        assert FAMILY_AXIS[spec.family] == "write" and transform_of(spec.family) == "vector"
    assert {get_spec(n).sees for n in GRAD_NAMES} == {BEHAVIOUR_DATA, "weights+activations"}
    assert get_spec("grad_neutral").sees == "weights+activations" and get_spec("TaskDiff_contrast").sees == "activations"
    assert set(FAMILY_SEES) == set(FAMILY_AXIS)


# ------------------------------------------------------------------------------- the adapter record


def test_the_lora_init_is_rebuilt_bit_for_bit_from_the_recorded_seed(tiny_dir, tmp_path):
    """train_lora_adapter's one AdamW step leaves A at its init (∂L/∂A = 0 at B = 0): the A that
    adapter_layers rebuilds from the delta's record is the saved one, bit for bit."""
    from safetensors.torch import load_file

    from subspace_sweep.delta import adapter_record
    from subspace_sweep.lora_train import train_lora_adapter
    from subspace_sweep.model import load_model

    for sign, name in ((1, "pos"), (-1, "neg")):
        train_lora_adapter(tiny_dir, sign, tmp_path / name, layers=(1, 3), rank=4, steps=1, seed=11, num_threads=1)
    record = adapter_record(tmp_path / "pos", tmp_path / "neg")
    assert record["seed"] == 11 and record["configs_agree"] and record["peft_type"] == "LORA"
    model, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    moved = {**record["config"], "base_model_name_or_path": "/somewhere/else"}  # where it trained: provenance only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modules = grads.adapter_layers(model, moved, record["seed"])
    assert not [w for w in caught if "renamed" in str(w.message)]  # (peft's note would reach the user)
    saved = load_file(str(tmp_path / "pos" / "adapter_model.safetensors"))
    assert len(modules) == 8
    for name, m in modules.items():
        assert torch.equal(m.lora_A["default"].weight, saved[f"base_model.model.{name}.lora_A.weight"]), name
    wrong = grads.adapter_layers(model, record["config"], 12)
    assert not torch.equal(next(iter(wrong.values())).lora_A["default"].weight,
                           next(iter(modules.values())).lora_A["default"].weight)


def test_the_delta_command_records_the_family_and_run_reads_it(lora_pair, tmp_path):
    from subspace_sweep import cli
    from subspace_sweep.delta import load_adapter_record, load_delta, save_delta

    model_dir, pos, neg = lora_pair
    out = tmp_path / "w.safetensors"
    assert cli.main(["delta", "--model", str(model_dir), "--adapter-pos", str(pos), "--adapter-neg", str(neg),
                     "--out", str(out)]) == 0
    record = load_adapter_record(out)
    assert record["peft_type"] == "LORA" and record["seed"] == 0 and record["configs_agree"]
    assert record["training"]["pos"]["steps"] == 30 and record["config"]["r"] == 4
    assert grads.family_of(record)[0] == "LORA"
    plain = save_delta(load_delta(out), tmp_path / "plain.safetensors")
    assert load_adapter_record(plain) is None and grads.family_of(None)[0] is None


@pytest.mark.parametrize("change, why", [
    ({"configs_agree": False}, "configs differ"),
    ({"seed": None}, "seed"),
    ({"config": {"peft_type": "LORA", "use_dora": True}}, "DoRA"),
    ({"config": {"peft_type": "LORA", "init_lora_weights": "pissa"}}, "not modelled"),
    ({"peft_type": "BOFT", "config": {"peft_type": "BOFT"}}, "BOFT adapter: not modelled"),
])
def test_families_the_tool_does_not_model_say_why(change, why):
    record = {"peft_type": "LORA", "config": {"peft_type": "LORA", "init_lora_weights": True}, "configs_agree": True,
              "seed": 0, "seed_source": "test", **change}
    kind, note = grads.family_of(record)
    assert kind is None and why in note


# ------------------------------------------------------------------------------- runs


def test_a_tokenizer_that_cannot_encode_the_examples_gets_empty_bases_and_a_reason(tiny, monkeypatch):
    """A model without a chat template is asked in SPEC §8's plain-text format (issue 31): its
    gradient bases are built from the examples in that format; examples the tokenizer cannot encode
    (``encode_examples`` refuses them) leave every variant empty with the reason, no pass made."""
    from subspace_sweep.errors import InputError

    model, tok = tiny
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    built = grads.build_gradient_bases(model, plain, grads.behaviour_data(PROBES), [1, 2], 8)
    assert built.forward_passes == 5 and all(B.shape[1] == 8 for B in built.bases["grad_behaviour"].values())

    def refuse(tokenizer, examples):
        raise InputError("the tokenizer has no end-of-turn token")

    monkeypatch.setattr(grads, "encode_examples", refuse)
    built = grads.build_gradient_bases(model, tok, grads.behaviour_data(PROBES), [1, 2], 8)
    cands, note = built.candidates(model, None)
    assert [c.name for c in cands] == list(GRAD_NAMES) and built.forward_passes == 0
    for c in cands:
        assert c.expected_rank == 0 and all(B.shape[1] == 0 for B in c.bases.values())
        assert "cannot be encoded" in c.rank_note and "end-of-turn token" in c.rank_note


def test_the_sweep_scores_the_gradient_bases_and_tells_what_they_see(demo_run):
    outcome, out = demo_run
    summary = outcome.result.summary
    rows = summary.filter(summary["candidate"].is_in(list(GRAD_NAMES)))
    assert rows.height == len(GRAD_NAMES) and set(rows["side"]) == {"A"}
    joint = set(outcome.result.ranking("joint")["candidate"])
    assert set(GRAD_NAMES) <= joint
    text = (out / "summary.tsv").read_text().splitlines()
    assert "sees" in text[0].split("\t") and "behaviour data" in "\n".join(text)
    assert "sees" in (out / "per_layer.csv").read_text().splitlines()[0].split(",")
    conclusion = (out / "conclusion.md").read_text()
    assert "## Gradient bases (SPEC §13)" in conclusion and "records no adapter family" in conclusion
    assert "## Gradient bases (`grad_*`, SPEC §13)" in (out / "definitions.md").read_text()
    info = outcome.result.gradients
    assert info["forward_backward_passes"] == 5 and info["n_examples"] == {"train": 20, "held_out": 12}


def test_gradient_bases_are_bit_for_bit_the_same_in_another_process(tiny, tmp_path):
    model, tok = tiny
    mine = _built(model, tok, [1, 3])
    script = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from subspace_sweep.toy import build_tiny_model\n"
        "from subspace_sweep.prompts import load_probe_set\n"
        "from subspace_sweep import gradients as g\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "m, t = build_tiny_model(seed=0)\n"
        "b = g.build_gradient_bases(m, t, g.behaviour_data(load_probe_set()), [1, 3], 8)\n"
        "save_file({f'{n}/{l}': B.contiguous() for n, per in b.bases.items() for l, B in per.items()}, sys.argv[1])\n"
    )
    out = tmp_path / "bases.safetensors"
    env = dict(os.environ, PYTHONHASHSEED="7", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, capture_output=True)
    from safetensors.torch import load_file

    theirs = load_file(str(out))
    assert set(theirs) == {f"{n}/{layer}" for n in mine.bases for layer in (1, 3)}
    for key, B in theirs.items():
        name, layer = key.split("/")
        assert torch.equal(B, mine.bases[name][int(layer)]), key
    assert not math.isnan(float(next(iter(theirs.values())).sum()))


def test_the_examples_follow_the_pairs_training_seed():
    """A pair trained with --seed s saw the shipped claims in answer-template rotation s
    (``training_texts``): the gradient bases read that rotation (the adapter record's seed), a
    behaviour file's examples (which do not rotate) and a record without a seed read rotation 0."""
    from subspace_sweep.lora_train import training_texts

    assert grads.training_seed({"seed": 2}) == 2 and grads.training_seed(None) == 0
    assert grads.training_seed({"seed": 2}, "behaviour.jsonl") == 0 and grads.training_seed({"seed": True}) == 0
    one, zero = grads.behaviour_data(PROBES, seed=1), grads.behaviour_data(PROBES)
    assert one.seed == 1 and one.train[1] == training_texts(1, PROBES, None, 1) != zero.train[1]
    assert one.held_out[-1] == training_texts(-1, PROBES, None, 1, held_out=True) != zero.held_out[-1]


def test_the_held_out_examples_are_the_given_probes_claims_after_n_train():
    """The held-out examples come from the probe set given (not the shipped one): a set of five claims,
    the last two unlike any shipped claim, holds out exactly those two, in its own prompts."""
    mine = tuple(f"the number {i} is a prime" for i in range(5))
    probes = replace(PROBES, claims=mine, prompts=tuple(f"I think {c}. Do you agree? Answer Yes or No." for c in mine))
    data = grads.behaviour_data(probes, None, 3, seed=1)
    for s in (1, -1):
        assert [ex["claim"] for ex in data.held_out[s]] == list(mine[3:])
        assert data.held_out[s] == training_texts(s, probes, 3, 1, held_out=True)
    assert data.source == ("the shipped sycophancy probes: claims 1..3 trained the pair, 2 held out (claims 4..5), "
                           "the templates of training seed 1")


def test_the_family_variant_copies_each_writer_weight_to_the_cpu(tiny):
    """The family variant reads each adapted writer's weight W as a float32 CPU copy (the gradient is on
    the CPU; a GPU model's W must come to it): on a model whose weights hold no data (the meta device)
    that copy is what fails, even for a LoRA, whose first step does not use W's values."""
    model, _ = tiny
    k, d = weight_key(1, O), model.config.hidden_size
    G = {k: torch.randn(model.get_parameter(k).shape, generator=torch.Generator().manual_seed(4))}
    built = grads.GradientBases(layers=[1], r=3, d=d, source="test", behaviour=G, gains={1: {}})
    cfg = adapter_config("lora", rank=4, alpha=8, target_modules=("o_proj",), layers=[1])
    family, note = built.family(model, _record(cfg, 0))  # on the CPU: built
    assert note.startswith("LoRA rank 4") and family[1].shape == (d, 3)
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        built.family(copy.deepcopy(model).to("meta"), _record(cfg, 0))


def test_without_held_out_examples_the_held_out_variant_says_so_exactly(tiny):
    """Examples with nothing held out: three passes (L⁺, L⁻, the neutral loss), three variants, and
    grad_heldout's note, word for word, is what its candidate reports."""
    model, tok = tiny
    data = grads.BehaviourData("test", {s: training_texts(s, PROBES, 1) for s in (1, -1)}, {1: [], -1: []})
    built = grads.build_gradient_bases(model, tok, data, [2], 2)
    why = "not built: no held-out example (every claim or line trained the pair)"
    assert built.notes == {"grad_heldout": why} and built.forward_passes == 3
    assert set(built.bases) == {"grad_behaviour", "grad_shared", "grad_neutral"}
    cands, _ = built.candidates(model, None)
    held = next(c for c in cands if c.name == "grad_heldout")
    assert held.rank_note == why and held.expected_rank == 0
