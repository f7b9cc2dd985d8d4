"""Loading a model, checking its layout and reading its weights (issue 3)."""

from __future__ import annotations

import time

import pytest
import torch

from subspace_sweep.errors import InputError
from subspace_sweep.model import (
    check_architecture,
    extract_base_weights,
    load_model,
    resolve_dtype,
    residual_writer_keys,
    state_dict_sha256,
)
from subspace_sweep.toy import build_tiny_model


def test_load_local_folder_defaults(tiny_dir):
    model, tok = load_model(tiny_dir, device="cpu")
    assert next(model.parameters()).dtype == torch.float32  # CPU default
    assert model.config._attn_implementation == "eager"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None
    ref, _ = build_tiny_model(seed=0)
    assert state_dict_sha256(model) == state_dict_sha256(ref)


def test_load_dtype_override(tiny_dir):
    model, _ = load_model(str(tiny_dir), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_resolve_dtype():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    assert resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nope")
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="is a file"):
        load_model(f)


@pytest.mark.parametrize("how", ["env", "arg"])
def test_uncached_hub_id_offline_fails_fast_and_says_where_it_looked(monkeypatch, how):
    kwargs = {}
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        kwargs["local_files_only"] = True
    t0 = time.perf_counter()
    with pytest.raises(InputError) as exc:
        load_model("subspace-sweep-test/no-such-model-xyz", **kwargs)
    assert time.perf_counter() - t0 < 20
    msg = str(exc.value)
    assert "no-such-model-xyz" in msg and "Hugging Face cache" in msg and "offline" in msg


def test_check_architecture_names_the_missing_module():
    model, _ = build_tiny_model(seed=0)
    check_architecture(model)  # complete model passes
    del model.model.layers[2].mlp.up_proj
    with pytest.raises(InputError, match=r"model\.layers\.2\.mlp\.up_proj"):
        check_architecture(model)


def test_check_architecture_rejects_a_model_without_config():
    with pytest.raises(InputError, match="num_hidden_layers"):
        check_architecture(torch.nn.Linear(2, 2))


def test_extract_base_weights(tiny):
    model, tok = tiny
    bw = extract_base_weights(model)
    cfg = model.config
    assert bw.n_layers == 4 and bw.d_model == 64
    assert (bw.n_heads, bw.n_kv_heads, bw.head_dim, bw.group) == (4, 2, 16, 2)
    lw = bw.layers[1]
    assert lw.q.shape == (64, 64) and lw.k.shape == (32, 64) and lw.v.shape == (32, 64)
    assert lw.o.shape == (64, 64) and lw.up.shape == (192, 64) and lw.gate.shape == (192, 64)
    assert lw.down.shape == (64, 192)
    for t in (lw.q, lw.down, bw.unembed, lw.attn_gain, lw.q_gain, bw.final_gain):
        assert t.dtype == torch.float32 and t.device.type == "cpu"
    # views of the CPU model's parameters (no copy), in the model's dtype
    assert lw.o.data_ptr() == model.model.layers[1].self_attn.o_proj.weight.data_ptr()
    half_model = build_tiny_model(seed=0)[0].to(torch.bfloat16)  # (not the shared model)
    half = extract_base_weights(half_model)
    assert half.layers[1].o.dtype == torch.bfloat16 and half.unembed.dtype == torch.bfloat16
    assert half.layers[1].mlp_gain.dtype == torch.float32
    assert torch.equal(half.layers[1].mlp_gain, half_model.model.layers[1].post_attention_layernorm.weight.float())
    assert half.layers[1].at_least_float32().o.dtype == torch.float32
    assert torch.equal(bw.unembed, model.model.embed_tokens.weight)  # tied
    assert bw.unembed.shape == (cfg.vocab_size, 64)
    # the gains: the modules' own (toy gains are exp(N(0, 0.3²)), not ones)
    blk = model.model.layers[1]
    assert torch.equal(lw.attn_gain, blk.input_layernorm.weight) and torch.equal(lw.mlp_gain, blk.post_attention_layernorm.weight)
    # per row of W_q / W_k: Qwen3's q_norm/k_norm act on each head with one shared gain
    assert torch.equal(lw.q_gain, blk.self_attn.q_norm.weight.repeat(4))
    assert torch.equal(lw.k_gain, blk.self_attn.k_norm.weight.repeat(2))
    assert torch.equal(bw.final_gain, model.model.norm.weight)
    assert float((lw.attn_gain - 1).abs().max()) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_norm_gain_is_what_the_module_multiplies_by(dtype):
    """norm_gain reads the gain from the norm's forward; on random inputs the module's output is
    gain ⊙ x/rms(x), also for a Gemma-style norm that multiplies by 1 + weight."""
    from subspace_sweep.model import norm_gain

    class OnePlusWeightRMSNorm(torch.nn.Module):  # Gemma's convention
        def __init__(self, w):
            super().__init__()
            self.weight = torch.nn.Parameter(w)

        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight.float())).to(x.dtype)

    model = build_tiny_model(seed=3)[0].to(dtype)
    g = torch.Generator().manual_seed(0)
    norms = [model.model.layers[0].input_layernorm, model.model.norm, model.model.layers[2].self_attn.k_norm,
             OnePlusWeightRMSNorm(0.3 * torch.randn(64, generator=g)).to(dtype)]
    for norm in norms:
        width = norm.weight.shape[0]
        gain = norm_gain(norm, width)
        assert gain.dtype == torch.float32
        x = torch.randn(5, width, generator=g, dtype=torch.float64)
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        got = norm(x.to(dtype)).double()
        want = gain.double() * (x.to(dtype).double() / rms)
        tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # the Gemma-style gain is 1 + weight, not weight
    assert torch.allclose(norm_gain(norms[-1], 64), (1.0 + norms[-1].weight.float()).to(dtype).float())


def test_residual_writer_keys():
    assert residual_writer_keys(2) == [
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]


def test_state_dict_sha256_sees_one_changed_bit():
    model, _ = build_tiny_model(seed=0)
    h = state_dict_sha256(model)
    with torch.no_grad():
        w = model.model.layers[3].mlp.down_proj.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0))
    assert state_dict_sha256(model) != h


def test_no_network_fails_fast_without_retrying_downloads(monkeypatch):
    import subspace_sweep.model as model_mod

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # The probe decides; no download is attempted when it reports the hub unreachable.
    monkeypatch.setattr(model_mod, "_hub_unreachable", lambda timeout=5.0: "no connection to https://hub.test (down)")
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"Hugging Face cache .*no connection to https://hub\.test"):
        load_model("subspace-sweep-test/no-such-model-xyz")
    assert time.perf_counter() - t0 < 20
