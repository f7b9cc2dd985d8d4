"""Weight steering W <- W + alpha*w and its bit-exact restore (issue 3)."""

from __future__ import annotations

import pytest
import torch

from subspace_sweep.delta import ShapeMismatchError, UnknownKeyError, random_delta
from subspace_sweep.model import state_dict_sha256
from subspace_sweep.steering import weight_steer
from subspace_sweep.toy import build_tiny_model

KEY = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture
def model():
    return build_tiny_model(seed=0)[0]


@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37])
def test_inside_the_context_weights_are_shifted(model, alpha):
    delta = random_delta(model, [1, 3], rank=2, seed=0, scale=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with weight_steer(model, delta, alpha) as m:
        assert m is model
        sd = model.state_dict()
        for k, v in sd.items():
            if k in delta:
                assert torch.equal(v, before[k] + alpha * delta[k])
            else:
                assert torch.equal(v, before[k]), k


def test_normal_exit_restores_state_dict_bit_exactly(model):
    h = state_dict_sha256(model)
    delta = random_delta(model, [0, 1, 2, 3], rank=3, seed=5, scale=0.5,
                         projections=["self_attn.o_proj", "mlp.down_proj", "self_attn.q_proj"])
    with weight_steer(model, delta, 1.0):
        assert state_dict_sha256(model) != h
    assert state_dict_sha256(model) == h


def test_exception_restores_state_dict_bit_exactly(model):
    h = state_dict_sha256(model)
    delta = random_delta(model, [2], rank=2, seed=1)
    with pytest.raises(RuntimeError, match="boom"):
        with weight_steer(model, delta, -1.0):
            assert state_dict_sha256(model) != h
            raise RuntimeError("boom")
    assert state_dict_sha256(model) == h


def test_nested_steering_restores_each_level(model):
    h = state_dict_sha256(model)
    d1 = random_delta(model, [1], rank=1, seed=1)
    d2 = random_delta(model, [1, 2], rank=1, seed=2)
    with weight_steer(model, d1, 1.0):
        h1 = state_dict_sha256(model)
        with weight_steer(model, d2, -1.0):
            pass
        assert state_dict_sha256(model) == h1
    assert state_dict_sha256(model) == h


def test_bf16_model_float32_delta_adds_in_float32_and_restores_exactly(model):
    model.to(torch.bfloat16)
    h = state_dict_sha256(model)
    W = model.get_parameter(KEY).detach().clone()
    delta = random_delta(model, [1], rank=2, seed=3, scale=0.01)
    assert delta[KEY].dtype == torch.float32
    with weight_steer(model, delta, 1.0):
        inside = model.get_parameter(KEY).detach().clone()
    assert inside.dtype == torch.bfloat16
    assert torch.equal(inside, (W.float() + delta[KEY]).to(torch.bfloat16))
    assert state_dict_sha256(model) == h
    # why restore from a copy: undoing by subtraction does not return the original bf16 weights
    undone = (inside.float() - delta[KEY]).to(torch.bfloat16)
    assert not torch.equal(undone, W)


def _float64_model_and_delta():
    model = build_tiny_model(seed=0)[0].to(torch.float64)
    keys = random_delta(model, [1, 3], rank=2, seed=0).keys()
    gen = torch.Generator().manual_seed(7)
    params = dict(model.named_parameters())
    delta = {k: torch.randn(params[k].shape, dtype=torch.float64, generator=gen) * 0.01 for k in keys}
    return model, delta


@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37])
def test_float64_model_float64_delta_adds_in_float64_and_restores_exactly(alpha):
    model, delta = _float64_model_and_delta()
    h = state_dict_sha256(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with weight_steer(model, delta, alpha):
        sd = model.state_dict()
        for k, v in sd.items():
            assert v.dtype == torch.float64, k
            if k in delta:
                assert torch.equal(v, before[k] + alpha * delta[k]), k
            else:
                assert torch.equal(v, before[k]), k
    assert state_dict_sha256(model) == h


@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37])
def test_float64_steering_differs_from_the_old_float32_rounded_sum(alpha):
    # teeth for the test above: the old path (sum in float32, cast up) gives other numbers
    model, delta = _float64_model_and_delta()
    before = {k: model.get_parameter(k).detach().clone() for k in delta}
    with weight_steer(model, delta, alpha):
        for k in delta:
            inside = model.get_parameter(k).detach()
            old_path = (before[k].to(torch.float32) + alpha * delta[k].to(torch.float32)).to(torch.float64)
            assert not torch.equal(inside, old_path), k


def test_tied_alias_key_steers_the_shared_embedding_and_restores(model):
    h = state_dict_sha256(model)
    E = model.model.embed_tokens.weight.detach().clone()
    d = torch.randn(E.shape, generator=torch.Generator().manual_seed(0)) * 0.01
    with weight_steer(model, {"lm_head.weight": d}, 1.0):
        assert torch.equal(model.model.embed_tokens.weight, E + d)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert state_dict_sha256(model) == h
    # both aliases in one delta: both increments apply to the one tensor, restored once
    with weight_steer(model, {"lm_head.weight": d, "model.embed_tokens.weight": d}, 1.0):
        torch.testing.assert_close(model.model.embed_tokens.weight, E + 2 * d)
    assert state_dict_sha256(model) == h


def test_bad_keys_or_shapes_change_nothing(model):
    h = state_dict_sha256(model)
    good = random_delta(model, [1], rank=1, seed=0)
    with pytest.raises(UnknownKeyError, match="model.layers.9"):
        with weight_steer(model, {**good, "model.layers.9.mlp.down_proj.weight": torch.ones(64, 192)}, 1.0):
            pytest.fail("body must not run")
    with pytest.raises(ShapeMismatchError, match=r"\(64, 191\)"):
        with weight_steer(model, {**good, "model.layers.2.mlp.down_proj.weight": torch.ones(64, 191)}, 1.0):
            pytest.fail("body must not run")
    assert state_dict_sha256(model) == h


def test_alpha_zero_changes_nothing(model):
    h = state_dict_sha256(model)
    with weight_steer(model, random_delta(model, [0], rank=1), 0.0):
        assert state_dict_sha256(model) == h
    assert state_dict_sha256(model) == h
