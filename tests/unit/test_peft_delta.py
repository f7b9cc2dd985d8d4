"""Delta from two PEFT LoRA adapters: w = merged+ - merged- (issue 3, optional extra `peft`)."""

from __future__ import annotations

import pytest
import torch

from subspace_sweep.delta import DeltaFormatError, delta_from_peft, validate_delta
from subspace_sweep.model import state_dict_sha256
from subspace_sweep.toy import build_tiny_model, save_tiny_model

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


def test_base_given_as_a_folder(adapters, tmp_path):
    pos_dir, neg_dir, pos, neg = adapters
    base_dir = save_tiny_model(tmp_path / "base", seed=0)
    delta = delta_from_peft(base_dir, pos_dir, neg_dir)
    expected = _expected(pos, neg)
    for k, v in delta.items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-5)


def test_same_adapter_twice_gives_zero_and_missing_adapter_is_an_error(adapters, tmp_path):
    pos_dir, _, _, _ = adapters
    base, _ = build_tiny_model(seed=0)
    delta = delta_from_peft(base, pos_dir, pos_dir)
    assert all(not v.any() for v in delta.values())
    with pytest.raises(DeltaFormatError, match="adapter_config.json"):
        delta_from_peft(base, pos_dir, tmp_path / "missing")
