"""Activation capture: hooks, padding, fused passes, labels (issue 3, SPEC §3)."""

from __future__ import annotations

import pytest
import torch

from subspace_sweep.capture import (
    capture_activations,
    capture_labels,
    chat_texts,
    count_forward_passes,
    last_token_index,
    record_activations,
    right_align,
)
from subspace_sweep.delta import ZeroDeltaError, random_delta
from subspace_sweep.errors import InputError
from subspace_sweep.model import state_dict_sha256
from subspace_sweep.steering import weight_steer
from subspace_sweep.toy import build_tiny_model, build_tiny_tokenizer
from tests.helpers_model import hook_count, probes_with_fit, small_probes

BLOCKS = [f"model.layers.{i}" for i in range(4)]
# Tolerance for "same prompt, different batch": batched matmuls may reassociate sums
# (in practice the tiny model on CPU is bit-identical, but that is not guaranteed).
ATOL = 1e-5


def _hidden_states(model, tok, text, *, chat_system=None):
    if chat_system is not None:
        text = chat_texts(tok, [text], chat_system)[0]
    enc = tok([text], return_tensors="pt", add_special_tokens=chat_system is None)
    with torch.no_grad():
        return model(**enc, output_hidden_states=True).hidden_states


def test_block_hook_equals_hidden_states_and_last_layer_is_pre_norm(tiny):
    model, tok = tiny
    enc = tok(["I think the earth is flat. Do you agree?"], return_tensors="pt")
    with torch.no_grad(), record_activations(model, BLOCKS) as rec:
        out = model(**enc, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == 5
    for layer in range(3):
        h = rec.output(BLOCKS[layer])
        assert h.shape == hs[layer + 1].shape  # a Tensor of (B, T, d), not a batch row of a tuple
        assert torch.equal(h, hs[layer + 1])
    last = rec.output(BLOCKS[3])
    assert not torch.allclose(last, hs[4])  # hidden_states[-1] is after the final norm ...
    assert torch.equal(model.model.norm(last), hs[4])  # ... of the block output


def test_record_inputs_and_outputs_of_up_proj(tiny):
    model, tok = tiny
    enc = tok(["I think so."], return_tensors="pt")
    names = ["model.layers.1.post_attention_layernorm", "model.layers.1.mlp.up_proj"]
    with torch.no_grad(), record_activations(model, names, inputs=True, outputs=True) as rec:
        model(**enc)
    x = rec.input("model.layers.1.mlp.up_proj")
    assert torch.equal(x, rec.output("model.layers.1.post_attention_layernorm"))
    assert torch.equal(rec.output("model.layers.1.mlp.up_proj"), model.model.layers[1].mlp.up_proj(x))


def test_recorded_tensors_are_detached_clones(tiny):
    model, tok = tiny
    enc = tok(["I think so."], return_tensors="pt")
    with torch.no_grad(), record_activations(model, BLOCKS[:1], transform=lambda x: x[:, -1]) as rec:
        model(**enc)
        model(**enc)
    assert len(rec.outputs[BLOCKS[0]]) == 2  # one per call
    with pytest.raises(RuntimeError, match="ran 2 times"):
        rec.output(BLOCKS[0])
    a, b = rec.outputs[BLOCKS[0]]
    assert a.shape == (1, 64) and not a.requires_grad and a.data_ptr() != b.data_ptr()
    assert torch.equal(a, b)


def test_no_hooks_remain_after_a_forward_that_raises(tiny):
    model, tok = tiny
    before = hook_count(model)
    bad_ids = torch.tensor([[model.config.vocab_size + 5]])  # out of the embedding's range
    with pytest.raises(IndexError):
        with record_activations(model, BLOCKS + ["model.layers.0.mlp.up_proj"], inputs=True):
            assert hook_count(model) == before + 5
            model(input_ids=bad_ids)
    assert hook_count(model) == before
    # and when the body itself raises after a good forward
    with pytest.raises(KeyError):
        with record_activations(model, BLOCKS):
            model(**tok(["hi"], return_tensors="pt"))
            raise KeyError("boom")
    assert hook_count(model) == before


def test_unknown_module_is_a_clear_error_and_registers_nothing(tiny):
    model, _ = tiny
    before = hook_count(model)
    with pytest.raises(InputError, match="model.layers.9"):
        with record_activations(model, ["model.layers.0", "model.layers.9"]):
            pass
    assert hook_count(model) == before


def test_last_token_index_and_right_align():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4]
    assert last_token_index(left).tolist() == [4, 4]
    x = torch.arange(10.0).view(2, 5, 1) + 1
    lengths = torch.tensor([3, 5])
    out = right_align(x, last_token_index(right), lengths, 5)
    assert out[0, :, 0].tolist() == [0, 0, 1, 2, 3]
    assert out[1, :, 0].tolist() == [6, 7, 8, 9, 10]
    out_l = right_align(x, last_token_index(left), lengths, 4)
    assert out_l[0, :, 0].tolist() == [0, 3, 4, 5]
    with pytest.raises(InputError, match="zero tokens"):
        last_token_index(torch.tensor([[0, 0]]))


def test_capture_shapes_dtypes_and_internal_consistency(tiny):
    model, tok = tiny
    probes = small_probes(n_fit=3)
    cap = capture_activations(model, tok, probes)
    L, n, d = 4, 3, 64
    for name in ("clean", "persona_pos", "persona_neg", "up_in_clean", "up_in_pos", "up_in_neg",
                 "up_written_pos", "up_written_neg"):
        t = getattr(cap, name)
        assert t.shape == (L, n, d), name
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert torch.isfinite(t).all()
    T = cap.tokens_pos.shape[2]
    assert cap.tokens_pos.shape == cap.tokens_neg.shape == (L, n, T, d)
    assert cap.attn_pos.shape == cap.attn_neg.shape == (L, n, T)
    # right-aligned: the last position is the last real token
    assert torch.equal(cap.tokens_pos[:, :, -1], cap.persona_pos)
    assert torch.equal(cap.tokens_neg[:, :, -1], cap.persona_neg)
    # the final token's attention is a distribution over the prompt's own tokens
    torch.testing.assert_close(cap.attn_pos.sum(-1), torch.ones(L, n))
    torch.testing.assert_close(cap.attn_neg.sum(-1), torch.ones(L, n))
    # positions before a prompt's first token are exactly zero, in both tensors
    texts = chat_texts(tok, probes.fit, probes.persona_pos)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    for i, n_tok in enumerate(lengths):
        assert (cap.tokens_pos[:, i, : T - n_tok] == 0).all() and (cap.attn_pos[:, i, : T - n_tok] == 0).all()
        assert (cap.tokens_pos[:, i, T - n_tok :].abs().sum(-1) > 0).all()
    assert T == max(lengths + [len(tok(t, add_special_tokens=False)["input_ids"])
                               for t in chat_texts(tok, probes.fit, probes.persona_neg)])
    # persona+ and persona- are different conditions
    assert not torch.allclose(cap.persona_pos, cap.persona_neg)


def test_captures_match_single_prompt_forwards(tiny):
    model, tok = tiny
    probes = small_probes(n_fit=2)
    cap = capture_activations(model, tok, probes)
    i = 1
    hs = _hidden_states(model, tok, probes.fit[i])
    for layer in range(3):
        torch.testing.assert_close(cap.clean[layer, i], hs[layer + 1][0, -1], atol=ATOL, rtol=0)
    hs_p = _hidden_states(model, tok, probes.fit[i], chat_system=probes.persona_pos)
    for layer in range(3):
        torch.testing.assert_close(cap.persona_pos[layer, i], hs_p[layer + 1][0, -1], atol=ATOL, rtol=0)
        n_tok = hs_p[0].shape[1]
        torch.testing.assert_close(cap.tokens_pos[layer, i, -n_tok:], hs_p[layer + 1][0], atol=ATOL, rtol=0)
    # up_proj input/output at the last token, and the written-back map x_up @ W_down^T
    text = chat_texts(tok, [probes.fit[i]], probes.persona_neg)[0]
    enc = tok([text], return_tensors="pt", add_special_tokens=False)
    name = "model.layers.2.mlp.up_proj"
    with torch.no_grad(), record_activations(model, [name], inputs=True, outputs=True) as rec:
        out = model(**enc, output_attentions=True)
    torch.testing.assert_close(cap.up_in_neg[2, i], rec.input(name)[0, -1], atol=ATOL, rtol=0)
    written = rec.output(name)[0, -1] @ model.model.layers[2].mlp.down_proj.weight.T
    torch.testing.assert_close(cap.up_written_neg[2, i], written, atol=ATOL, rtol=0)
    attn = out.attentions[2][0, :, -1, :].mean(0)
    torch.testing.assert_close(cap.attn_neg[2, i, -attn.shape[0]:], attn, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_capture_is_the_same_alone_and_batched_with_longer_prompts(side):
    model, _ = build_tiny_model(seed=0)
    tok = build_tiny_tokenizer()
    tok.padding_side = side
    base = small_probes(n_fit=4)
    short = min(base.fit, key=len)
    longer = sorted(base.fit, key=len)[-2:]
    alone = capture_activations(model, tok, probes_with_fit([short]))
    batched = capture_activations(model, tok, probes_with_fit(longer[:1] + [short] + longer[1:]))
    assert batched.tokens_pos.shape[2] > alone.tokens_pos.shape[2]  # the short prompt really was padded
    for name in ("clean", "persona_pos", "persona_neg", "up_in_clean", "up_in_pos", "up_written_pos"):
        torch.testing.assert_close(getattr(batched, name)[:, 1], getattr(alone, name)[:, 0], atol=ATOL, rtol=0)
    T = alone.tokens_pos.shape[2]
    torch.testing.assert_close(batched.tokens_pos[:, 1, -T:], alone.tokens_pos[:, 0], atol=ATOL, rtol=0)
    assert (batched.tokens_pos[:, 1, :-T] == 0).all()
    torch.testing.assert_close(batched.attn_neg[:, 1, -T:], alone.attn_neg[:, 0], atol=ATOL, rtol=0)
    # and the labels (B-side) too
    delta = random_delta(model, [1], rank=2, seed=0)
    lab_alone = capture_labels(model, tok, delta, probes_with_fit([short, short]))
    lab_batched = capture_labels(model, tok, delta, probes_with_fit(longer[:1] + [short] + longer[1:]))
    torch.testing.assert_close(lab_batched.fit[:, 1], lab_alone.fit[:, 0], atol=ATOL, rtol=0)


def test_left_and_right_padding_give_the_same_captures():
    model, _ = build_tiny_model(seed=0)
    probes = small_probes(n_fit=3)
    caps = {}
    for side in ("left", "right"):
        tok = build_tiny_tokenizer()
        tok.padding_side = side
        caps[side] = capture_activations(model, tok, probes)
    for name, t in vars(caps["left"]).items():
        torch.testing.assert_close(t, getattr(caps["right"], name), atol=ATOL, rtol=0, msg=name)


def test_one_forward_pass_per_condition(tiny):
    model, tok = tiny
    probes = small_probes(n_fit=4, n_eval=3)
    with count_forward_passes(model) as c:
        capture_activations(model, tok, probes)
    assert c.n == 4  # clean, persona+, persona-, the sink token alone
    delta = random_delta(model, [2], rank=1, seed=0)
    with count_forward_passes(model) as c:
        capture_labels(model, tok, delta, probes)
    assert c.n == 2  # alpha=+1 and alpha=-1, FIT and EVAL together
    with count_forward_passes(model) as c:
        capture_activations(model, tok, probes, batch_size=2)
    assert c.n == 3 * 2 + 1


def test_sink_capture_is_what_each_layer_reads_of_the_sink_token(tiny):
    """capture_sink = the attention norm's output at the sink token when it starts a prompt (at
    position 0 a token attends only to itself, so what follows cannot change it); at layer 0 it
    is the norm of the token's embedding row, gain included."""
    from subspace_sweep.capture import capture_sink
    from subspace_sweep.model import attention_sink_token_id

    model, tok = tiny
    sink_id = attention_sink_token_id(model, tok)
    got = capture_sink(model, sink_id)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    assert got.shape == (L, d) and got.dtype == torch.float32
    ids = torch.tensor([[sink_id, *tok("I think so. Do you agree?")["input_ids"]]])
    names = [f"model.layers.{i}.input_layernorm" for i in range(L)]
    with torch.no_grad(), record_activations(model, names) as rec:
        model(input_ids=ids)
    for i, name in enumerate(names):
        torch.testing.assert_close(got[i], rec.output(name)[0, 0], atol=1e-5, rtol=1e-5)
    e = model.model.embed_tokens.weight[sink_id]
    norm = model.model.layers[0].input_layernorm
    want = norm.weight * e / torch.sqrt(e.pow(2).mean() + norm.variance_epsilon)
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got[0], e / torch.sqrt(e.pow(2).mean()), atol=1e-3)  # the gain matters


def test_batch_size_does_not_change_captures(tiny):
    model, tok = tiny
    probes = small_probes(n_fit=3)
    a = capture_activations(model, tok, probes)
    b = capture_activations(model, tok, probes, batch_size=2)
    for name, t in vars(a).items():
        torch.testing.assert_close(t, getattr(b, name), atol=ATOL, rtol=0, msg=name)


def test_capture_switches_to_eager_for_attention_and_restores():
    model, tok = build_tiny_model(seed=0)
    model.set_attn_implementation("sdpa")
    cap = capture_activations(model, tok, small_probes(n_fit=2))
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(cap.attn_pos.sum(-1), torch.ones(4, 2))


def test_labels_are_steered_difference_and_leave_the_model_unchanged(tiny):
    model, tok = tiny
    probes = small_probes(n_fit=3, n_eval=2)
    delta = random_delta(model, [2, 3], rank=2, seed=1, scale=0.2)
    h = state_dict_sha256(model)
    lab = capture_labels(model, tok, delta, probes)
    assert state_dict_sha256(model) == h
    assert lab.fit.shape == (4, 3, 64) and lab.eval.shape == (4, 2, 64)
    assert lab.fit.dtype == torch.float32 and lab.eval.device.type == "cpu"
    # layers before the first steered layer see identical computations: exactly zero
    assert (lab.fit[:2] == 0).all() and (lab.eval[:2] == 0).all()
    assert (lab.eval[2:].norm(dim=-1) > 0).all()
    # against a manual steered forward of one EVAL prompt (raw text, no chat template)
    text = probes.eval[1]
    with weight_steer(model, delta, +1.0):
        hp = _hidden_states(model, tok, text)
    with weight_steer(model, delta, -1.0):
        hn = _hidden_states(model, tok, text)
    for layer in range(3):
        torch.testing.assert_close(lab.eval[layer, 1], hp[layer + 1][0, -1] - hn[layer + 1][0, -1], atol=ATOL, rtol=0)


def test_labels_validate_the_delta_before_any_forward(tiny):
    model, tok = tiny
    delta = {k: torch.zeros_like(v) for k, v in random_delta(model, [1], rank=1).items()}
    with count_forward_passes(model) as c, pytest.raises(ZeroDeltaError):
        capture_labels(model, tok, delta, small_probes())
    assert c.n == 0


def test_token_level_captures_at_chosen_layers_equal_the_full_ones(tiny):
    """capture_activations(token_layers=...) keeps every position only at those layers, bit for bit
    the rows of the all-layer capture; the last-token captures are unchanged; a layer that was not
    captured is refused by name."""
    model, tok = tiny
    probes = small_probes(3, 2)
    full = capture_activations(model, tok, probes)
    some = capture_activations(model, tok, probes, token_layers=[2, 1])
    assert some.token_layers == (1, 2) and some.tokens_pos.shape[0] == 2
    for i, layer in enumerate((1, 2)):
        assert some.token_index(layer) == i
        for name in ("tokens_pos", "tokens_neg", "attn_pos", "attn_neg"):
            assert torch.equal(getattr(some, name)[i], getattr(full, name)[layer]), name
    for name in ("clean", "persona_pos", "persona_neg", "up_in_pos", "up_written_neg", "sink"):
        assert torch.equal(getattr(some, name), getattr(full, name)), name
    with pytest.raises(InputError, match="not layer 3"):
        some.token_index(3)
