"""Weight steering W <- W + alpha*w, streamed one module at a time, and its bit-exact restore
(issues 3 and 16).

What a forward inside the block computes is checked against an independent reference: a deep
copy of the model with θ + α·w written into its parameters (``helpers_model.materialized``).
"""

from __future__ import annotations

import pytest
import torch

from subspace_sweep.delta import ShapeMismatchError, UnknownKeyError, random_delta
from subspace_sweep.model import state_dict_sha256
from subspace_sweep.steering import steered_value, weight_steer
from subspace_sweep.toy import build_tiny_model
from tests.helpers_model import SeenWeights, hook_count, materialized

KEY = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture
def model():
    return build_tiny_model(seed=0)[0]


def _ids(model, n=2, t=7, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37])
def test_each_module_computes_with_the_shifted_weights(model, alpha):
    delta = random_delta(model, [1, 3], rank=2, seed=0, scale=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with weight_steer(model, delta, alpha) as m, SeenWeights(model) as seen:
        assert m is model
        _logits(model, _ids(model))
        # outside a module's forward the parameters hold θ: nothing is written
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert set(delta) <= set(seen.seen)
    for k, v in seen.seen.items():
        want = before[k] + alpha * delta[k] if k in delta else before[k]
        assert torch.equal(v, want), k


@pytest.mark.parametrize("alpha", [1.0, -0.37])
def test_outputs_are_bit_identical_to_the_weights_written_in(model, alpha):
    delta = random_delta(model, [0, 2, 3], rank=3, seed=4, scale=0.2,
                         projections=["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"])
    ids = _ids(model, seed=1)
    with weight_steer(model, delta, alpha):
        got = _logits(model, ids)
    assert torch.equal(got, _logits(materialized(model, delta, alpha), ids))
    assert not torch.equal(got, _logits(model, ids))


def test_only_one_modules_steered_weights_exist_at_a_time(model):
    """Streaming: when any module's forward starts, every steered parameter outside it holds its
    original tensor and values (the old eager steering held θ + α·w for all of them at once,
    plus a copy of each θ)."""
    delta = random_delta(model, [0, 1, 2, 3], rank=2, seed=2,
                         projections=["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"])
    params = dict(model.named_parameters())
    before = {k: (params[k].data_ptr(), params[k].detach().clone()) for k in delta}
    steered_elsewhere = []
    with weight_steer(model, delta, 1.0):
        hooks = []
        for name, mod in model.named_modules():
            def probe(m, _a, name=name):
                steered_elsewhere.append([k for k, (ptr, v) in before.items() if not k.startswith(name + ".")
                                          and (params[k].data_ptr() != ptr or not torch.equal(params[k], v))])
            hooks.append(mod.register_forward_pre_hook(probe))
        _logits(model, _ids(model))
        for h in hooks:
            h.remove()
    assert len(steered_elsewhere) > len(delta) and not any(steered_elsewhere)


def test_normal_exit_restores_state_dict_bit_exactly_and_removes_hooks(model):
    h, n_hooks = state_dict_sha256(model), hook_count(model)
    ptrs = {k: p.data_ptr() for k, p in model.named_parameters()}
    delta = random_delta(model, [0, 1, 2, 3], rank=3, seed=5, scale=0.5,
                         projections=["self_attn.o_proj", "mlp.down_proj", "self_attn.q_proj"])
    with weight_steer(model, delta, 1.0):
        assert hook_count(model) > n_hooks
        _logits(model, _ids(model))
    assert state_dict_sha256(model) == h and hook_count(model) == n_hooks
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == ptrs  # the very same tensors


def test_exception_inside_a_forward_restores_bit_exactly(model):
    """A module raising mid-forward leaves its parameters pointed at the steered value until
    the block's exit points them back."""
    h, n_hooks = state_dict_sha256(model), hook_count(model)
    delta = random_delta(model, [2], rank=2, seed=1, projections=["self_attn.o_proj", "mlp.down_proj"])
    down = model.get_submodule("model.layers.2.mlp.down_proj")

    def boom(_m, _a):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with weight_steer(model, delta, -1.0):
            down.register_forward_pre_hook(boom)  # runs after the steering's pre-hook
            _logits(model, _ids(model))
    down._forward_pre_hooks.clear()
    assert state_dict_sha256(model) == h and hook_count(model) == n_hooks


def test_exception_in_the_block_restores_bit_exactly(model):
    h = state_dict_sha256(model)
    with pytest.raises(RuntimeError, match="boom"):
        with weight_steer(model, random_delta(model, [2], rank=2, seed=1), -1.0):
            raise RuntimeError("boom")
    assert state_dict_sha256(model) == h


def test_nested_steering_composes_and_restores_each_level(model):
    h = state_dict_sha256(model)
    d1 = random_delta(model, [1], rank=1, seed=1)
    d2 = random_delta(model, [1, 2], rank=1, seed=2)
    ids = _ids(model, seed=3)
    with weight_steer(model, d1, 1.0):
        outer = _logits(model, ids)
        with weight_steer(model, d2, -1.0):
            both = _logits(model, ids)
        assert torch.equal(_logits(model, ids), outer)
    assert state_dict_sha256(model) == h
    assert torch.equal(outer, _logits(materialized(model, d1, 1.0), ids))
    # the inner sum is formed on the outer's steered value, as two in-place steps would be
    assert torch.equal(both, _logits(materialized(materialized(model, d1, 1.0), d2, -1.0), ids))


def test_bf16_model_float32_delta_adds_in_float32_and_restores_exactly(model):
    model.to(torch.bfloat16)
    h = state_dict_sha256(model)
    W = model.get_parameter(KEY).detach().clone()
    delta = random_delta(model, [1], rank=2, seed=3, scale=0.01)
    assert delta[KEY].dtype == torch.float32
    with weight_steer(model, delta, 1.0), SeenWeights(model) as seen:
        _logits(model, _ids(model))
    inside = seen.seen[KEY]
    assert inside.dtype == torch.bfloat16
    assert torch.equal(inside, (W.float() + delta[KEY]).to(torch.bfloat16))
    assert not torch.equal(inside, W.float().to(torch.bfloat16) + delta[KEY].to(torch.bfloat16))  # not rounded twice
    assert state_dict_sha256(model) == h
    # why the original tensor is kept: undoing by subtraction does not return the bf16 weights
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
    with weight_steer(model, delta, alpha), SeenWeights(model) as seen:
        _logits(model, _ids(model))
    for k, v in seen.seen.items():
        assert v.dtype == torch.float64, k
        want = before[k] + alpha * delta[k] if k in delta else before[k]
        assert torch.equal(v, want), k
        if k in delta:  # teeth: the old path (sum in float32, cast up) gives other numbers
            old_path = (before[k].to(torch.float32) + alpha * delta[k].to(torch.float32)).to(torch.float64)
            assert not torch.equal(v, old_path), k
    assert state_dict_sha256(model) == h


def test_steered_value_rounds_once_in_the_wider_type():
    base = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    w = torch.tensor([2.0 ** -9, 2.0 ** -8 * 3])  # below bf16's resolution of 1 and 3 on their own
    assert torch.equal(steered_value(base, [w, w], 1.0), (base.float() + w + w).to(torch.bfloat16))
    assert steered_value(base, [w], 1.0).dtype == torch.bfloat16
    b64 = torch.tensor([1.0], dtype=torch.float64)
    assert float(steered_value(b64, [torch.tensor([1e-12], dtype=torch.float64)], 1.0)) == 1.0 + 1e-12


def test_tied_alias_key_steers_the_shared_embedding_and_restores(model):
    h = state_dict_sha256(model)
    E = model.model.embed_tokens.weight.detach().clone()
    d = torch.randn(E.shape, generator=torch.Generator().manual_seed(0)) * 0.01
    ids = _ids(model, seed=5)
    with weight_steer(model, {"lm_head.weight": d}, 1.0), SeenWeights(model) as seen:
        got = _logits(model, ids)
    # the embedding and the unembedding are one tensor: both modules compute with E + d
    assert torch.equal(seen.seen["model.embed_tokens.weight"], E + d)
    assert torch.equal(seen.seen["lm_head.weight"], E + d)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(got, _logits(materialized(model, {"lm_head.weight": d}, 1.0), ids))
    assert state_dict_sha256(model) == h
    # both aliases in one delta: both increments apply to the one tensor
    with weight_steer(model, {"lm_head.weight": d, "model.embed_tokens.weight": d}, 1.0), SeenWeights(model) as seen:
        _logits(model, ids)
    torch.testing.assert_close(seen.seen["lm_head.weight"], E + 2 * d)
    assert state_dict_sha256(model) == h


def test_bad_keys_or_shapes_change_nothing(model):
    h, n_hooks = state_dict_sha256(model), hook_count(model)
    good = random_delta(model, [1], rank=1, seed=0)
    with pytest.raises(UnknownKeyError, match="model.layers.9"):
        with weight_steer(model, {**good, "model.layers.9.mlp.down_proj.weight": torch.ones(64, 192)}, 1.0):
            pytest.fail("body must not run")
    with pytest.raises(ShapeMismatchError, match=r"\(64, 191\)"):
        with weight_steer(model, {**good, "model.layers.2.mlp.down_proj.weight": torch.ones(64, 191)}, 1.0):
            pytest.fail("body must not run")
    assert state_dict_sha256(model) == h and hook_count(model) == n_hooks


def test_alpha_zero_changes_nothing(model):
    h, n_hooks = state_dict_sha256(model), hook_count(model)
    ids = _ids(model)
    base = _logits(model, ids)
    with weight_steer(model, random_delta(model, [0], rank=1), 0.0):
        assert torch.equal(_logits(model, ids), base)
        assert hook_count(model) == n_hooks
    assert state_dict_sha256(model) == h
