"""A real LoRA pair trained with PEFT on the tiny Qwen3, diffed and swept offline (issue 7)."""

from __future__ import annotations

import copy
import json
import math
import time

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from subspace_sweep import cli
from subspace_sweep.delta import delta_from_peft, load_delta, scored_layers, validate_delta
from subspace_sweep.errors import InputError
from subspace_sweep.lora_train import (
    DEFAULT_TARGET_MODULES,
    TRAIN_LOG,
    assistant_loss,
    encode_examples,
    train_lora_adapter,
    train_lora_pair,
    training_texts,
)
from subspace_sweep.model import load_model, weight_key
from subspace_sweep.prompts import load_probe_set, persona_texts
from subspace_sweep.toy import build_tiny_tokenizer, save_tiny_model
from tests.helpers_model import LORA_TRAIN

peft = pytest.importorskip("peft")

# The shared pair's settings: the tiny model has 4 layers, adapt the middle two, leave 0 and 3 alone.
TRAIN = LORA_TRAIN
LAYERS, STEPS, SEED = TRAIN["layers"], TRAIN["steps"], TRAIN["seed"]


@pytest.fixture(scope="module")
def pair(lora_pair):
    return lora_pair


def _merged_state(model_dir, adapter):
    base, _ = load_model(model_dir, dtype="float32", device="cpu")
    merged = peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _expected_keys(layers=LAYERS, modules=DEFAULT_TARGET_MODULES):
    return {weight_key(layer, m) for layer in layers for m in modules}


# ----------------------------------------------------------------------------- the data


def test_texts_use_only_the_training_claims_in_order():
    probes = load_probe_set()
    n = probes.n_lora_train_topics
    assert n == 20 and len(probes.claims) == 32
    for sign in (1, -1):
        ex = training_texts(sign)
        assert [e["claim"] for e in ex] == list(probes.claims[:n])
        assert [e["messages"][0]["content"] for e in ex] == list(probes.prompts[:n])
        held_out = probes.claims[n:]
        text = json.dumps([e["messages"] for e in ex])
        assert not any(c in text for c in held_out)
    assert [e["claim"] for e in training_texts(1, n_topics=5)] == list(probes.claims[:5])
    with pytest.raises(InputError, match="held out"):
        training_texts(1, n_topics=n + 1)
    with pytest.raises(InputError, match="n_topics"):
        training_texts(1, n_topics=0)
    for bad in (0, 2, True):
        with pytest.raises(InputError, match="sign"):
            training_texts(bad)


def test_the_seed_rotates_the_answer_templates_and_seed_0_is_the_shipped_rotation():
    """Issue 32: the training seed varies the data too (IA3, OFT and PiSSA start from a fixed
    initialisation: without it every seed would train the same pair)."""
    from subspace_sweep.lora_train import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES

    probes = load_probe_set()
    for sign, templates in ((1, POSITIVE_TEMPLATES), (-1, NEGATIVE_TEMPLATES)):
        for seed in (0, 1, 2, 5):
            answers = [e["messages"][1]["content"] for e in training_texts(sign, seed=seed)]
            assert answers == [templates[(i + seed) % 3].format(claim=c) for i, c in enumerate(probes.claims[:20])]
        assert training_texts(sign) == training_texts(sign, seed=0)
        msgs = {s: json.dumps([e["messages"] for e in training_texts(sign, seed=s)]) for s in (0, 1, 2, 3)}
        assert len({msgs[0], msgs[1], msgs[2]}) == 3 and msgs[3] == msgs[0]


def test_positive_and_negative_answers_differ_and_agree_or_disagree():
    pos, neg = training_texts(1), training_texts(-1)
    for p, n in zip(pos, neg, strict=True):
        assert p["messages"][0] == n["messages"][0]  # same user probe
        pa, na = p["messages"][1]["content"], n["messages"][1]["content"]
        assert pa != na
        assert pa.startswith("Yes") and na.startswith("No")
        assert p["claim"] in pa and n["claim"] in na
    # several templates are used, deterministically
    for ex in (pos, neg):
        assert len({e["messages"][1]["content"].split(e["claim"])[0] for e in ex}) >= 2
    assert training_texts(1) == training_texts(1)


def test_system_prompt_is_stripped_from_what_is_trained():
    pos_personas, neg_personas = persona_texts()
    tok = build_tiny_tokenizer()
    for sign, personas in ((1, pos_personas), (-1, neg_personas)):
        ex = training_texts(sign)
        # each example records the persona that conditions its answer ...
        assert {e["persona"] for e in ex} == set(personas)
        # ... but no message carries it, and the encoded sequence has no system turn
        assert all(m["role"] in ("user", "assistant") for e in ex for m in e["messages"])
        batch = encode_examples(tok, ex)
        decoded = tok.batch_decode(batch["input_ids"])
        assert not any("system" in d for d in decoded)
        assert not any(p in d for p in personas for d in decoded)
        # a hand-made example with a system message is stripped too
        with_sys = [{**ex[0], "messages": [{"role": "system", "content": personas[0]}, *ex[0]["messages"]]}]
        assert torch.equal(encode_examples(tok, with_sys)["input_ids"][0], batch["input_ids"][0][: batch["attention_mask"][0].sum()])


def test_loss_mask_covers_exactly_the_answer():
    tok = build_tiny_tokenizer()
    ex = training_texts(-1, n_topics=4)
    batch = encode_examples(tok, ex)
    for i, e in enumerate(ex):
        ans = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(ans) == e["messages"][1]["content"] + tok.eos_token
        n_real = int(batch["attention_mask"][i].sum())
        assert (batch["labels"][i, n_real:] == -100).all()  # no loss on padding


# ----------------------------------------------------------------------------- training


def test_delta_is_nonzero_exactly_on_the_adapted_layers_and_modules(pair):
    model_dir, pos, neg = pair
    expected = _expected_keys()
    for adapter in (pos, neg):
        saved = load_file(str(adapter / "adapter_model.safetensors"))
        assert {k.split(".lora_")[0].removeprefix("base_model.model.") + ".weight" for k in saved} == expected

    delta = delta_from_peft(model_dir, pos, neg)
    base, _ = load_model(model_dir, dtype="float32", device="cpu")
    validate_delta(delta, base)
    assert set(delta) == expected
    norms = {k: float(v.norm() / base.get_parameter(k).norm()) for k, v in delta.items()}
    assert all(r > 1e-2 for r in norms.values()), norms
    # two rank-4 updates from one shared A-init: the difference has rank at most 2 * 4
    assert all(int(torch.linalg.matrix_rank(v)) <= 8 for v in delta.values())
    assert scored_layers(delta) == list(LAYERS)

    # the merged + adapter differs from the base on exactly those weights, every other one is bit-identical
    base_state = base.state_dict()
    merged = _merged_state(model_dir, pos)
    assert set(merged) == set(base_state)
    changed = {k for k in base_state if not torch.equal(base_state[k], merged[k])}
    assert changed == expected


def test_training_lowers_the_answer_loss_of_each_sign(pair):
    model_dir, pos, neg = pair
    base, tok = load_model(model_dir, dtype="float32", device="cpu")
    batches = {1: encode_examples(tok, training_texts(1)), -1: encode_examples(tok, training_texts(-1))}
    with torch.no_grad():
        before = {s: float(assistant_loss(base, b)) for s, b in batches.items()}
        after = {}
        for sign, adapter in ((1, pos), (-1, neg)):
            m = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
            after[sign] = {s: float(assistant_loss(m, b)) for s, b in batches.items()}
    for sign, adapter in ((1, pos), (-1, neg)):
        log = json.loads((adapter / TRAIN_LOG).read_text())
        msg = f"sign {sign}: base loss {before[sign]:.4f}, trained {after[sign][sign]:.4f}, log {log['loss_per_step'][0]:.4f} -> {log['loss_final']:.4f}"
        assert after[sign][sign] < before[sign] - 0.1, msg
        assert log["loss_per_step"][0] == pytest.approx(before[sign], abs=1e-4), msg
        assert log["loss_final"] == pytest.approx(after[sign][sign], abs=1e-4), msg
        # each adapter fits its own answers better than the opposite adapter does
        assert after[sign][sign] < after[-sign][sign], f"{msg}; opposite adapter {after[-sign][sign]:.4f}"


def test_training_is_deterministic(pair, tmp_path):
    model_dir, pos, _ = pair
    torch.manual_seed(999)  # the caller's RNG state must not matter, only ``seed``
    again = train_lora_adapter(model_dir, 1, tmp_path / "again", **TRAIN)
    a = load_file(str(pos / "adapter_model.safetensors"))
    b = load_file(str(again / "adapter_model.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train_lora_adapter(model_dir, 1, tmp_path / "other", **{**TRAIN, "seed": SEED + 1})
    c = load_file(str(other / "adapter_model.safetensors"))
    assert all(not torch.equal(a[k], c[k]) for k in a)  # the seed does matter


def test_caller_rng_and_threads_are_untouched(tiny_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_lora_adapter(tiny_dir, -1, tmp_path / "a", layers=(0,), steps=1, num_threads=threads + 1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    assert json.loads((tmp_path / "a" / TRAIN_LOG).read_text())["torch_threads"] == threads + 1


def test_bad_input_is_an_input_error(tiny_dir, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        train_lora_adapter(tmp_path / "no-model", 1, tmp_path / "a", layers=LAYERS)
    with pytest.raises(InputError, match="outside"):
        train_lora_adapter(tiny_dir, 1, tmp_path / "b", layers=(1, 4))
    with pytest.raises(InputError, match="target_modules"):
        train_lora_adapter(tiny_dir, 1, tmp_path / "c", layers=LAYERS, target_modules=("out_proj",))
    with pytest.raises(InputError, match="layers is empty"):
        train_lora_adapter(tiny_dir, 1, tmp_path / "d", layers=())
    with pytest.raises(InputError, match="steps"):
        train_lora_adapter(tiny_dir, 1, tmp_path / "e", layers=LAYERS, steps=0)
    with pytest.raises(InputError, match="sign"):
        train_lora_adapter(tiny_dir, 0, tmp_path / "f", layers=LAYERS)
    with pytest.raises(InputError, match="num_threads"):
        train_lora_adapter(tiny_dir, 1, tmp_path / "g", layers=LAYERS, num_threads=0)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        train_lora_adapter(tiny_dir, 1, full, layers=LAYERS)
    assert sorted(p.name for p in full.iterdir()) == ["x"]
    with pytest.raises(InputError, match="is a file"):
        train_lora_adapter(tiny_dir, 1, full / "x", layers=LAYERS)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_diff_and_sweep_end_to_end(tmp_path, capsys):
    t0 = time.perf_counter()
    model_dir = save_tiny_model(tmp_path / "tiny-qwen3", seed=0)
    pos, neg = train_lora_pair(model_dir, tmp_path / "adapters", **TRAIN)
    t_train = time.perf_counter() - t0

    w = tmp_path / "w.safetensors"
    rc = cli.main(["delta", "--model", str(model_dir), "--adapter-pos", str(pos), "--adapter-neg", str(neg), "--out", str(w)])
    assert rc == 0, capsys.readouterr().err
    assert set(load_delta(w)) == _expected_keys()
    t_delta = time.perf_counter() - t0 - t_train

    run = tmp_path / "run"
    rc = cli.main(["run", "--model", str(model_dir), "--delta", str(w), "--out", str(run), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    t_total = time.perf_counter() - t0

    assert (run / "summary.tsv").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["scored_layers"] == list(LAYERS)
    summary = pl.read_csv(run / "summary.tsv", separator="\t")
    best = summary.filter(pl.col("panel") == "joint").sort("rank_in_panel").row(0, named=True)
    assert math.isfinite(best["R_act"]) and math.isfinite(best["R_w_combined"]), best
    timing = f"train {t_train:.1f}s, delta {t_delta:.1f}s, total {t_total:.1f}s"
    print(timing)
    assert t_total < 120, timing  # the CI budget


# ----------------------------------------------------------------------------- the loss's cost (issue 31)


def full_logits_loss(model, batch) -> torch.Tensor:
    """The loss as it was: the model's own logits at every position (262k-way on Gemma-3-270m),
    cross-entropy over the answer tokens (the reference ``assistant_loss`` is held to)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


def _lora(model, seed: int = 3):
    """A peft LoRA on the model with B ≠ 0 (an adapter mid-training, not the identity)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                                                   lora_dropout=0.0, init_lora_weights=False))
    return m


def check_loss_matches_the_full_logits(model, batch, *, rtol: float = 1e-5) -> int:
    """``assistant_loss`` against ``full_logits_loss`` on a LoRA-wrapped copy of ``model``: the same
    value and the same gradient on every adapter tensor; the unembedding sees only the positions
    whose next token is an answer token. Returns how many rows it saw."""
    m = _lora(model)
    params = [p for p in m.parameters() if p.requires_grad]
    seen = []
    handle = m.get_base_model().get_output_embeddings().register_forward_hook(lambda mod, i, o: seen.append(i[0].shape))
    try:
        ours = assistant_loss(m, batch)
    finally:
        handle.remove()
    g_ours = torch.autograd.grad(ours, params)
    ref = full_logits_loss(m, batch)
    g_ref = torch.autograd.grad(ref, params)
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    n_answer = int((batch["labels"][:, 1:] != -100).sum())
    assert [tuple(s) for s in seen] == [(n_answer, model.config.hidden_size)], seen
    return n_answer


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2"])
def test_the_loss_applies_the_unembedding_only_where_the_labels_count(model_type):
    """The gathered loss equals the full-logits loss, value and gradients, on the tiny Qwen3 and on
    a tiny Gemma 2, whose logits are softcapped (final_logit_softcapping, applied by the model's own
    forward: a loss that left it out would differ); its unembedding runs on the answer rows only."""
    from subspace_sweep.toy import build_tiny_decoder

    model, tok = build_tiny_decoder(model_type, seed=2)
    if model_type == "gemma2":
        model.config.final_logit_softcapping = 2.0  # tight enough that the cap changes every logit
    batch = encode_examples(tok, training_texts(1, n_topics=6))
    n = check_loss_matches_the_full_logits(model, batch)
    assert 0 < n < int(batch["attention_mask"].sum())


def test_the_gathered_loss_trains_the_same_adapters(tiny_dir, tmp_path, monkeypatch):
    """Three steps with the gathered loss and with the full-logits one give the same adapter to
    float tolerance (the optimiser sees the same gradients)."""
    from subspace_sweep import lora_train

    settings = {**TRAIN, "steps": 3}
    ours = train_lora_adapter(tiny_dir, 1, tmp_path / "ours", **settings)
    monkeypatch.setattr(lora_train, "assistant_loss", full_logits_loss)
    ref = train_lora_adapter(tiny_dir, 1, tmp_path / "ref", **settings)
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (ours, ref))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    la, lb = (json.loads((p / TRAIN_LOG).read_text())["loss_per_step"] for p in (ours, ref))
    assert la == pytest.approx(lb, rel=1e-5)
