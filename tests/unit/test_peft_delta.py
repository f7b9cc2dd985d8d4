"""Delta from two PEFT LoRA adapters: w = merged+ - merged- (issue 3, optional extra `peft`)."""

from __future__ import annotations

import copy

import pytest
import torch

from subspace_sweep.delta import DeltaFormatError, IdenticalAdaptersError, delta_from_peft, validate_delta
from subspace_sweep.model import state_dict_sha256
from subspace_sweep.toy import build_tiny_decoder, build_tiny_model, save_tiny_model
from tests.helpers_model import effective_parameters as _effective_parameters

peft = pytest.importorskip("peft")

R, LORA_ALPHA = 2, 6
SCALE = LORA_ALPHA / R


def _make_adapter(out_dir, seed, targets):
    """A LoRA with B initialised nonzero (init_lora_weights=False), saved; returns {module: B @ A}."""
    model, _ = build_tiny_model(seed=0)
    cfg = peft.LoraConfig(r=R, lora_alpha=LORA_ALPHA, target_modules=targets, init_lora_weights=False,
                          lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(out_dir)
    prods = {}
    for name, mod in pm.get_base_model().named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            A = mod.lora_A["default"].weight.detach()
            B = mod.lora_B["default"].weight.detach()
            assert B.abs().sum() > 0
            prods[f"{name}.weight"] = B @ A
    return prods


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    # different target sets: o_proj in both, down_proj only in +, up_proj only in -
    pos = _make_adapter(root / "pos", 1, ["o_proj", "down_proj"])
    neg = _make_adapter(root / "neg", 2, ["o_proj", "up_proj"])
    return root / "pos", root / "neg", pos, neg


def _expected(pos, neg):
    out = {}
    for k in set(pos) | set(neg):
        zero = torch.zeros_like(pos[k] if k in pos else neg[k])
        out[k] = SCALE * (pos.get(k, zero) - neg.get(k, zero))
    return out


def test_delta_is_scaled_difference_of_lora_products(adapters):
    pos_dir, neg_dir, pos, neg = adapters
    base, _ = build_tiny_model(seed=0)
    h = state_dict_sha256(base)
    delta = delta_from_peft(base, pos_dir, neg_dir)
    assert state_dict_sha256(base) == h  # the caller's model is not merged into
    expected = _expected(pos, neg)
    assert set(delta) == set(expected)
    assert len(delta) == 4 * 3  # o_proj, down_proj, up_proj in each of 4 layers
    for k, v in delta.items():
        assert v.dtype == torch.float32 and v.shape == expected[k].shape
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-5)
    assert delta["model.layers.1.self_attn.o_proj.weight"].abs().max() > 1e-2  # not trivially zero
    validate_delta(delta, base)


def test_base_given_as_a_folder(adapters, tmp_path, monkeypatch):
    """The folder is loaded once for the pair and its midpoint (each adapter merges into a copy:
    on Gemma-3-270m three loads took 21 s and 5.4 GB, one takes 12 s and 2.8 GB)."""
    from subspace_sweep import model as model_module
    from subspace_sweep.delta import pair_from_peft

    pos_dir, neg_dir, pos, neg = adapters
    base_dir = save_tiny_model(tmp_path / "base", seed=0)
    loads = []
    real_load = model_module.load_model
    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    delta, centre = pair_from_peft(base_dir, pos_dir, neg_dir)
    assert len(loads) == 1
    expected = _expected(pos, neg)
    assert set(delta) == set(expected)
    for k, v in delta.items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-5)
    # the midpoint offset (Δ⁺ + Δ⁻)/2: a module only one adapter changes has half its update there
    assert set(centre) == set(expected)
    for k in centre:
        zero = torch.zeros_like(expected[k])
        half_sum = SCALE * (pos.get(k, zero) + neg.get(k, zero)) / 2
        torch.testing.assert_close(centre[k], half_sum, atol=1e-6, rtol=1e-5)


def test_same_adapter_twice_is_an_error_and_so_is_a_missing_one(adapters, tmp_path):
    pos_dir, _, _, _ = adapters
    base, _ = build_tiny_model(seed=0)
    with pytest.raises(IdenticalAdaptersError, match="identical weights"):
        delta_from_peft(base, pos_dir, pos_dir)
    with pytest.raises(DeltaFormatError, match="adapter_config.json"):
        delta_from_peft(base, pos_dir, tmp_path / "missing")


def test_an_adapter_of_another_model_is_one_line(adapters):
    """The LoRA of the 4-layer Qwen3 on a 3-layer Llama: one line, not peft's traceback text."""
    pos_dir, _, _, _ = adapters
    llama, _ = build_tiny_decoder("llama")
    with pytest.raises(DeltaFormatError) as e:
        delta_from_peft(llama, pos_dir, pos_dir)
    assert len(str(e.value).splitlines()) == 1


# ---------------------------------------------------------------------- nothing lost (issue 13)


def _trained_like(model, cfg, out_dir, seed):
    """A peft model of ``cfg`` on a copy of ``model`` with every trainable tensor perturbed (LoRA
    B nonzero, modules_to_save copies and biases moved), saved to ``out_dir``; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = peft.get_peft_model(copy.deepcopy(model), cfg)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(out_dir)
    return pm.eval()


PEFT_CASES = {
    "lora_attention_only+modules_to_save_o_proj": (
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["o_proj"]),
        dict(target_modules=["q_proj", "k_proj"], modules_to_save=["o_proj"])),
    "lora_mlp_only+bias_all": (dict(target_modules=["gate_proj", "up_proj", "down_proj"], bias="all"),
                               dict(target_modules=["gate_proj", "up_proj", "down_proj"], bias="all")),
    "dora_attention": (dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True),
                       dict(target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True)),
    "lora_mlp_vs_attention": (dict(target_modules=["down_proj", "up_proj"]), dict(target_modules=["o_proj", "q_proj"])),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_the_delta_is_every_parameter_that_differs(case, tmp_path):
    """w = merged⁺ − merged⁻ over every parameter that differs, against an independent computation
    of each parameter from the unmerged adapters' forward (Llama with every bias)."""
    base, _ = build_tiny_decoder("llama", seed=1, bias=True)
    configs = [peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, lora_dropout=0.0, **kw)
               for kw in PEFT_CASES[case]]
    pms = [_trained_like(base, cfg, tmp_path / sign, seed) for cfg, sign, seed in zip(configs, ("pos", "neg"), (1, 2))]
    eff = [_effective_parameters(pm, base) for pm in pms]
    delta = delta_from_peft(base, tmp_path / "pos", tmp_path / "neg")
    expected = {k: eff[0][k] - eff[1][k] for k in eff[0] if (eff[0][k] - eff[1][k]).abs().max() > 1e-6}
    assert set(delta) == set(expected), (sorted(set(delta) ^ set(expected)))[:5]
    for k, v in delta.items():
        torch.testing.assert_close(v, expected[k], atol=2e-5, rtol=1e-4, msg=k)
    if "modules_to_save" in case:
        assert any(k.endswith("o_proj.weight") for k in delta)  # the o_proj copy is part of w
    if "bias_all" in case:
        assert sum(k.endswith(".bias") for k in delta) >= 3 * 3  # gate/up/down biases of every layer


def test_a_prompt_learning_adapter_is_exit_2_naming_its_type(tiny_dir, tmp_path, capsys):
    """Issue 26: a real peft PrefixTuning adapter (virtual tokens, no weight change) has no merged
    model: `delta` refuses it before any load, one line naming the type, nothing written."""
    from peft import PrefixTuningConfig, get_peft_model

    from subspace_sweep import cli
    from subspace_sweep.model import load_model

    model, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        str(tmp_path / "prefix"))
    (tmp_path / "out").mkdir()
    capsys.readouterr()
    code = cli.main(["delta", "--model", str(tiny_dir), "--adapter-pos", str(tmp_path / "prefix"), "--adapter-neg",
                     str(tmp_path / "prefix"), "--out", str(tmp_path / "out" / "w.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a PREFIX_TUNING adapter" in err[0], err
    assert list((tmp_path / "out").iterdir()) == []
