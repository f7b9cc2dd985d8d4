"""The tiny offline Qwen3 and its tokenizer (issue 3)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subspace_sweep import toy
from subspace_sweep.toy import build_tiny_model, build_tiny_tokenizer, save_tiny_model


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_gives_identical_weights_and_other_seed_differs():
    a, _ = build_tiny_model(seed=3)
    b, _ = build_tiny_model(seed=3)
    c, _ = build_tiny_model(seed=4)
    assert a is not b
    assert _same_state(a, b)
    assert not torch.equal(a.model.layers[0].self_attn.o_proj.weight, c.model.layers[0].self_attn.o_proj.weight)


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_architecture_is_qwen3_like(tiny):
    model, tok = tiny
    cfg = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.head_dim > 1
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.num_hidden_layers == 4 and cfg.hidden_size == 64
    # tied embeddings: one tensor
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.weight.numel() == 3 * layer.self_attn.o_proj.weight.numel()
    assert layer.self_attn.k_proj.weight.shape == (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size)
    assert cfg._attn_implementation == "eager"
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert cfg.vocab_size == len(tok)


def test_custom_sizes():
    model, _ = build_tiny_model(seed=0, n_layers=2, d_model=32, n_heads=4, n_kv_heads=1, head_dim=8, d_mlp=96)
    assert len(model.model.layers) == 2
    assert model.model.layers[1].self_attn.q_proj.weight.shape == (32, 32)
    assert model.model.layers[1].self_attn.v_proj.weight.shape == (8, 32)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (32, 96)


def test_eager_attention_returns_weights(tiny):
    model, tok = tiny
    enc = tok(["I think so. Do you agree?"], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    assert len(out.attentions) == 4
    assert out.attentions[0].shape[1] == model.config.num_attention_heads
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones_like(out.attentions[0].sum(-1)))


def test_tokenizer_special_tokens_and_chat_template():
    tok = build_tiny_tokenizer()
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.bos_token == "<|endoftext|>"
    assert None not in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False)
    assert not no_gen.endswith("assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3  # special tokens are single ids, not split into bytes
    # Qwen-style: raw text gets no bos/eos added
    raw = tok("I think the earth is flat.")["input_ids"]
    assert tok.bos_token_id not in raw and tok.eos_token_id not in raw
    assert tok.decode(raw) == "I think the earth is flat."


def test_tokenizer_is_deterministic_and_each_call_is_a_fresh_object():
    a = build_tiny_tokenizer()
    a.padding_side = "left"
    b = build_tiny_tokenizer()
    assert b.padding_side == "right"  # a caller's change does not leak
    toy._tokenizer_json.cache_clear()  # retrain from scratch
    c = build_tiny_tokenizer()
    assert c.get_vocab() == b.get_vocab()
    text = "I think vaccines cause more harm than good. Do you agree? Answer Yes or No."
    assert c(text)["input_ids"] == b(text)["input_ids"]


def test_save_then_load_offline_is_identical(tmp_path, monkeypatch):
    path = save_tiny_model(tmp_path / "tiny", seed=0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ref, ref_tok = build_tiny_model(seed=0)
    assert _same_state(loaded, ref)
    text = "I think astrology accurately predicts personality."
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == ref_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert tok.pad_token_id == ref_tok.pad_token_id
    enc = ref_tok([text], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**enc).logits, ref(**enc).logits)
