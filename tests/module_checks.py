"""Checks that a formula describes a module, run on any subject model (scikit-learn's estimator
checks: one property, many subjects). Each compares what ``extract_base_weights`` and the A-side
builders say with the model's OWN modules' forward passes, never with a re-derivation of the code
under test. Subjects: a tiny random model of every architecture row (tests/unit/test_architectures.py)
and the real SmolLM2-135M-Instruct (tests/integration/test_smollm2_real.py), whose RMSNorm gains are
~0.02-3, nothing like ones.

- ``check_readers``: every reader (q, k, v, gate, up) and the unembedding is what the modules
  multiply the residual by, probed with ``X = √d·I`` through the real norm and projection;
- ``check_qk_circuit``: each head's QK circuit is its bilinear score form up to per-token scalars;
- ``check_ov_circuit``: the OV circuits with the real attention probabilities give o_proj's output;
- ``check_bases_span_the_modules``: the A-side's weight bases (readers, circuits, the MLP round
  trip, the gate kernel with the MLP's own activations, the attention sink through a real 1-token
  forward pass) span the top singular spaces of matrices probed from the modules.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from subspace_sweep import linalg
from subspace_sweep.arch import architecture_of, fused_rows
from subspace_sweep.candidates import ov_circuit, qk_circuit
from subspace_sweep.capture import record_activations
from subspace_sweep.model import attention_sink_token_id, block_name, extract_base_weights

DT = torch.float64


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def eps_of(module) -> float:
    return float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))


def reader_outputs(model, layer: int, X: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each reader of ``layer`` outputs for residual rows X, through the real modules, minus
    the projection's bias (the affine part is not a subspace)."""
    arch = architecture_of(model.config)
    blk = model.get_submodule(block_name(layer))
    out = {}
    for name, norm in (("q", arch.attn_norm), ("k", arch.attn_norm), ("v", arch.attn_norm),
                       ("gate", arch.mlp_norm), ("up", arch.mlp_norm)):
        path, part = arch.projection(name)
        proj = blk.get_submodule(path)
        x = blk.get_submodule(norm)(X) if norm is not None else X
        y = proj(x) - (proj.bias if proj.bias is not None else 0.0)
        out[name] = y if part is None else y[..., fused_rows(arch, part, model.config)]
    return out


def _probe_scale(model, layer: int, name: str, d: int) -> float:
    arch = architecture_of(model.config)
    norm = arch.attn_norm if name in ("q", "k", "v") else arch.mlp_norm
    if norm is None:
        return math.sqrt(d)
    return math.sqrt(d) / math.sqrt(1.0 + eps_of(model.get_submodule(f"{block_name(layer)}.{norm}")))


def probed_readers(model, layer: int) -> dict[str, torch.Tensor]:
    """Each reader of ``layer`` as the modules apply it to the residual (out x d, float64):
    ``module(norm(√d·I))ᵀ`` rescaled by the norm's own √(1+eps)/√d."""
    d = int(model.config.hidden_size)
    X = math.sqrt(d) * torch.eye(d, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        outs = reader_outputs(model, layer, X)
    return {name: y.double().T / _probe_scale(model, layer, name, d) for name, y in outs.items()}


def probed_unembedding(model) -> torch.Tensor:
    """The unembedding as it reads the residual through the final norm (vocab x d, float64)."""
    arch = architecture_of(model.config)
    d = int(model.config.hidden_size)
    X = math.sqrt(d) * torch.eye(d, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        final = model.get_submodule(arch.final_norm)
        return model.get_output_embeddings()(final(X)).double().T.mul_(math.sqrt(1.0 + eps_of(final)) / math.sqrt(d))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, msg: str) -> None:
    """``torch.testing.assert_close``'s test (shapes and dtypes equal, |actual − expected| ≤ atol +
    rtol·|expected| everywhere, no NaN), in a few whole-tensor passes: torch's own takes 13 s on
    Gemma-3-270m's 262k × 640 unembedding; it still writes the message when the check fails."""
    ok = actual.shape == expected.shape and actual.dtype == expected.dtype
    if ok:
        bound = expected.abs().mul_(rtol).add_(atol)
        ok = bool((actual - expected).abs_().le_(bound).all())
    if not ok:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)
        raise AssertionError(f"{msg}: not within atol {atol:g} + rtol {rtol:g}")  # torch's test passed, ours did not


#: Rows of the unembedding compared at a time.
UNEMBED_ROWS = 8192


def check_readers(model, W, layers=None, *, rtol: float = 1e-5, atol_rel: float = 1e-6) -> None:
    """Every reader and the unembedding: W·diag(γ) (extract_base_weights) = the probed module.
    ``atol_rel``: absolute tolerance relative to the largest entry compared."""
    for layer in (range(len(W.layers)) if layers is None else layers):
        lw = W.layers[layer]
        probed = probed_readers(model, layer)
        for name, gain in (("q", lw.attn_gain), ("k", lw.attn_gain), ("v", lw.attn_gain),
                           ("gate", lw.mlp_gain), ("up", lw.mlp_gain)):
            want = probed[name]
            assert_close(linalg.as64(getattr(lw, name)) * linalg.as64(gain)[None, :], want, rtol=rtol,
                         atol=atol_rel * float(want.abs().max()), msg=f"layer {layer} {name}")
    lm = probed_unembedding(model)
    low, high = torch.aminmax(lm)
    atol = atol_rel * max(float(high), -float(low))
    gain = linalg.as64(W.final_gain)[None, :]
    for i in range(0, lm.shape[0], UNEMBED_ROWS):  # a few MB of temporaries, not GBs (Gemma: 262k rows)
        assert_close(linalg.as64(W.unembed[i:i + UNEMBED_ROWS]) * gain, lm[i:i + UNEMBED_ROWS], rtol=rtol, atol=atol,
                     msg=f"unembedding rows {i}..{min(i + UNEMBED_ROWS, lm.shape[0]) - 1}")


def one_head(lw, h: int, g: int, hd: int):
    rows = lambda t, i: None if t is None else t[i * hd:(i + 1) * hd]  # noqa: E731
    return dataclasses.replace(lw, q=lw.q[h * hd:(h + 1) * hd], k=lw.k[g * hd:(g + 1) * hd],
                               v=lw.v[g * hd:(g + 1) * hd], o=lw.o[:, h * hd:(h + 1) * hd],
                               q_gain=rows(lw.q_gain, h), k_gain=rows(lw.k_gain, g))


def _qk_hat(model, layer: int, X: torch.Tensor):
    """q̂ and k̂ of residual rows X as the scores see them (before RoPE, which cancels at equal
    positions): the real projections, then the real q/k norms where the row has them; and the
    per-token scalars those norms divide by (per head, or one for the whole projection)."""
    arch = architecture_of(model.config)
    blk = model.get_submodule(block_name(layer))
    outs = reader_outputs(model, layer, X)
    hd = int(getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads)
    hats, scalars = [], []
    for name, norm in (("q", arch.q_norm), ("k", arch.k_norm)):
        y = outs[name]
        heads = y.shape[-1] // hd
        if norm is None:
            hats.append(y.double())
            scalars.append(torch.ones(y.shape[0], heads, dtype=DT))
            continue
        mod = blk.get_submodule(norm)
        per_head = mod.weight.shape[-1] == hd
        yh = y.view(y.shape[0], heads, hd)
        hats.append((mod(yh).reshape(y.shape) if per_head else mod(y)).double())
        r = rms(yh.double(), eps_of(mod))[..., 0] if per_head else rms(y.double(), eps_of(mod)).expand(-1, heads)
        scalars.append(r)
    return hats, scalars


def check_qk_circuit(model, W, layers=None, *, rtol: float = 1e-4, atol_rel: float = 1e-5) -> None:
    """q̂_h(x)·k̂_g(y) = xᵀ M_h y / (r(x) r(y) ρ_h(x) ρ'_g(y)): r the attention norm's RMS of the
    residual (1 without one), ρ the q/k norms' RMS of the projections (1 without them)."""
    arch = architecture_of(model.config)
    hd, g = W.head_dim, W.group
    X = torch.randn(6, W.d_model, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.5, 3, 6)[:, None]
    X = X.to(next(model.parameters()).dtype)
    for layer in (range(len(W.layers)) if layers is None else layers):
        lw = W.layers[layer]
        with torch.no_grad():
            (qh, kh), (rq, rk) = _qk_hat(model, layer, X)
        norm = model.get_submodule(f"{block_name(layer)}.{arch.attn_norm}") if arch.attn_norm else None
        r = rms(linalg.as64(X), eps_of(norm))[:, 0] if norm is not None else torch.ones(6, dtype=DT)
        for h in range(W.n_heads):
            M = linalg.as64(qk_circuit(one_head(lw, h, h // g, hd), 1, 1, hd))
            real = qh[:, h * hd:(h + 1) * hd] @ kh[:, (h // g) * hd:((h // g) + 1) * hd].T
            bil = linalg.as64(X) @ M @ linalg.as64(X).T
            pred = bil / ((r * rq[:, h])[:, None] * (r * rk[:, h // g])[None, :])
            torch.testing.assert_close(real, pred, rtol=rtol, atol=atol_rel * float(real.abs().max()),
                                       msg=f"layer {layer} head {h}")


def check_ov_circuit(model, tok, W, layer: int, text: str, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """o_proj's output at each token = Σ_h Σ_s a_hts·OV_h x_s / r_s (+ the biases' part), OV_h the
    per-head circuit without a post-projection norm; with one, the norm's output is ∝ diag(γ_post)·it."""
    arch = architecture_of(model.config)
    hd, g = W.head_dim, W.group
    enc = tok([text], return_tensors="pt")
    blk = block_name(layer)
    names = [blk, f"{blk}.{arch.attention}", f"{blk}.{arch.attention}.o_proj"]
    post = f"{blk}.{arch.attn_out_norm}" if arch.attn_out_norm else None
    with torch.no_grad(), record_activations(model, [f"{blk}.{arch.attention}"], index=1) as ra, \
            record_activations(model, names[:1], inputs=True, outputs=False) as rx, \
            record_activations(model, [names[2]] + ([post] if post else [])) as ro:
        model(**enc)
    x = rx.input(blk)[0].double()  # (S, d) residual entering the block
    a = ra.output(names[1])[0].double()  # (H, S, S)
    o_out = ro.output(names[2])[0].double()
    lw = W.layers[layer]
    attn = model.get_submodule(f"{blk}.{arch.attention}")
    norm = model.get_submodule(f"{blk}.{arch.attn_norm}") if arch.attn_norm else None
    r = rms(x, eps_of(norm)) if norm is not None else torch.ones(x.shape[0], 1, dtype=DT)
    v_path, v_part = arch.projection("v")
    v_mod = attn.get_submodule(v_path.split(".", 1)[1])
    v_bias = v_mod.bias[fused_rows(arch, "v", model.config)] if (v_mod.bias is not None and v_part) else v_mod.bias
    pred = torch.zeros_like(o_out)
    for h in range(W.n_heads):
        one = dataclasses.replace(one_head(lw, h, h // g, hd), o_gain=None)
        OV = linalg.as64(ov_circuit(one, 1, 1, hd))
        pred += a[h] @ ((x / r) @ OV.T)
        if v_bias is not None:  # Σ_s a = 1: the value bias adds W_o,h b_v at every token
            pred += linalg.as64(lw.o[:, h * hd:(h + 1) * hd]) @ v_bias[(h // g) * hd:((h // g) + 1) * hd].double()
    o_bias = attn.o_proj.bias
    if o_bias is not None:
        pred += o_bias.double()
    torch.testing.assert_close(o_out, pred, rtol=rtol, atol=atol * max(1.0, float(o_out.abs().max())))
    if post:
        out = ro.output(post)[0].double()
        want = o_out * linalg.as64(lw.o_gain)[None, :]
        cos = (out * want).sum(1) / (out.norm(dim=1) * want.norm(dim=1))
        assert float(cos.min()) > 1 - 1e-6


# ----------------------------------------------------------------------------- bases vs modules


def top_left(M: torch.Tensor, r: int) -> torch.Tensor:
    """Independent reference: the top-r left singular vectors of M by a float64 SVD of M itself."""
    U, _, _ = torch.linalg.svd(linalg.as64(M), full_matrices=False)
    return U[:, :r]


def top_right(M: torch.Tensor, r: int) -> torch.Tensor:
    """The top-r right singular vectors of M by a float64 SVD; of a tall M (the unembedding), by the
    SVD of R of its QR (M = QR: the same right singular vectors and values), without forming U
    (Gemma's 262k × 640: 6 s against 14)."""
    M = linalg.as64(M)
    if M.shape[0] > 2 * M.shape[1]:
        M = torch.linalg.qr(M, mode="r").R
    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return Vh[:r].T


def principal_axes(rows: torch.Tensor, r: int) -> torch.Tensor:
    """PCA by SVD: the top-r right singular vectors of the centred rows."""
    X = linalg.as64(rows)
    return top_right(X - X.mean(0, keepdim=True), r)


def min_cosine(A: torch.Tensor, B: torch.Tensor) -> float:
    """The smallest principal cosine between two orthonormal bases of one width (float64 SVD)."""
    assert A.shape[1] == B.shape[1], (A.shape, B.shape)
    return float(torch.linalg.svdvals(linalg.as64(A).T @ linalg.as64(B)).min())


def probed_attention(model, layer: int) -> dict[str, torch.Tensor]:
    """Per head h (kv head g = h // group), from the modules only: W_o,h (o_proj on the identity's
    columns of head h) and the probed q/k/v readers cut to their heads."""
    cfg = model.config
    n_heads, n_kv = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    arch = architecture_of(cfg)
    attn = model.get_submodule(f"{block_name(layer)}.{arch.attention}")
    o_proj = attn.get_submodule(arch.projection("o")[0].split(".", 1)[1])
    with torch.no_grad():
        eye = torch.eye(n_heads * hd, dtype=next(model.parameters()).dtype)
        o = (o_proj(eye) - (o_proj.bias if o_proj.bias is not None else 0.0)).double().T  # (d, n_heads·hd)
    return {**probed_readers(model, layer), "o": o, "n_heads": n_heads, "n_kv": n_kv, "hd": hd}


def probed_circuits(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_h M_h, Σ_h OV_h) from probed module matrices only (no q/k norms: see ``check_qk_circuit``
    for those), head loop with kv head h // group."""
    p = probed_attention(model, layer)
    hd, group = p["hd"], p["n_heads"] // p["n_kv"]
    d = p["o"].shape[0]
    qk, ov = torch.zeros(d, d, dtype=DT), torch.zeros(d, d, dtype=DT)
    for h in range(p["n_heads"]):
        g = h // group
        qk += p["q"][h * hd:(h + 1) * hd].T @ p["k"][g * hd:(g + 1) * hd]
        ov += p["o"][:, h * hd:(h + 1) * hd] @ p["v"][g * hd:(g + 1) * hd]
    return qk, ov


def probed_sink_vectors(model, tok, layer: int) -> torch.Tensor:
    """Rows W_o,h W_v,kv(h) s for the sink token's residual s as layer ``layer``'s attention norm
    outputs it, from a 1-token forward pass of the model itself (output_hidden_states) and the
    modules: the norm, v_proj, and o_proj on the value vector placed in head h's slice."""
    arch = architecture_of(model.config)
    p = probed_attention(model, layer)
    hd, group = p["hd"], p["n_heads"] // p["n_kv"]
    blk = model.get_submodule(block_name(layer))
    ids = torch.tensor([[attention_sink_token_id(model, tok)]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, 0]
        s = blk.get_submodule(arch.attn_norm)(hidden) if arch.attn_norm else hidden
        attn = blk.get_submodule(arch.attention)
        v_path, v_part = arch.projection("v")
        v_mod = attn.get_submodule(v_path.split(".", 1)[1])
        v = v_mod(s) - (v_mod.bias if v_mod.bias is not None else 0.0)
        if v_part is not None:
            v = v[fused_rows(arch, "v", model.config)]
        o_proj = attn.get_submodule(arch.projection("o")[0].split(".", 1)[1])
        rows = []
        for h in range(p["n_heads"]):
            z = torch.zeros(p["n_heads"] * hd, dtype=v.dtype)
            z[h * hd:(h + 1) * hd] = v[(h // group) * hd:((h // group) + 1) * hd]
            rows.append((o_proj(z) - (o_proj.bias if o_proj.bias is not None else 0.0)).double())
    return torch.stack(rows)


def probed_gate_kernel(model, layer: int, mlp_inputs: torch.Tensor) -> torch.Tensor:
    """W_down·diag(mean_i act(gate(x_i)))·W_up·diag(γ_mlp) from the modules: the MLP's own gate
    activation on the normed inputs x_i it really received, down_proj on the identity, and the
    probed up reader."""
    arch = architecture_of(model.config)
    mlp = model.get_submodule(f"{block_name(layer)}.{arch.mlp}")
    gate_path, gate_part = arch.projection("gate")
    down_path, _ = arch.projection("down")
    gate_mod = model.get_submodule(f"{block_name(layer)}.{gate_path}")
    down_mod = model.get_submodule(f"{block_name(layer)}.{down_path}")
    with torch.no_grad():
        x = mlp_inputs.to(next(model.parameters()).dtype)
        pre = gate_mod(x)
        if gate_part is not None:
            pre = pre[..., fused_rows(arch, "gate", model.config)]
        act = mlp.act_fn(pre).double().mean(0)
        n_mlp = act.shape[0]
        down = (down_mod(torch.eye(n_mlp, dtype=x.dtype)) - (down_mod.bias if down_mod.bias is not None else 0.0)).double().T
    return down @ torch.diag(act) @ probed_readers(model, layer)["up"]


def check_bases_span_the_modules(model, tok, candidates, layers, r: int, *, mlp_inputs=None,
                                 tol: float = 1e-5) -> dict[str, float]:
    """Each weight family's basis spans the top-r singular space of its probed module matrix at
    each of ``layers`` (min principal cosine ≥ 1 − tol); returns the worst cosine per family.
    ``mlp_inputs[layer]``: the MLP's normed inputs the gate kernel was built from (the A-side's
    up_in_clean); without them the gate kernel is not checked."""
    by = {c.name: c for c in candidates}
    lm = probed_unembedding(model)
    lm_ref: list[torch.Tensor] = []

    def lm_top() -> torch.Tensor:  # the unembedding's SVD once for every layer (262k rows on Gemma)
        if not lm_ref:
            lm_ref.append(top_right(lm, r))
        return lm_ref[0]

    worst: dict[str, float] = {}
    for layer in layers:
        p = probed_readers(model, layer)
        qk, ov = probed_circuits(model, layer)
        down_mod = model.get_submodule(f"{block_name(layer)}.{architecture_of(model.config).projection('down')[0]}")
        # behind a post-projection norm the residual receives diag(γ_post)·(the writer's output)/rms:
        # the write-side references in those coordinates (SPEC §4.1)
        g_o, g_down = probed_post_gain(model, layer, "o_proj"), probed_post_gain(model, layer, "down_proj")
        ov, sink = g_o[:, None] * ov, lambda: g_o[None, :] * probed_sink_vectors(model, tok, layer)
        refs = {
            "attn_qkv_read": lambda: top_right(torch.cat([p["q"], p["k"], p["v"]]), r),
            "kv_super": lambda: top_right(torch.cat([p["k"], p["v"]]), r),
            "mlp_up_read": lambda: top_right(p["up"], r),
            "mlp_gate_read": lambda: top_right(p["gate"], r),
            "input_super": lambda: top_right(torch.cat([p["q"], p["k"], p["v"], p["up"], p["gate"]]), r),
            "lm_head_read": lm_top,
            "attn_ov_write": lambda: top_left(ov, r),
            "mlp_roundtrip_write": lambda: top_left(g_down[:, None] * (_module_matrix(down_mod) @ p["up"]), r),
            "attention_sink": lambda: principal_axes(sink(), by["attention_sink"].bases[layer].shape[1]),
        }
        if architecture_of(model.config).q_norm is None:  # with q/k norms, check_qk_circuit holds it
            refs["qk_circuit"] = lambda: top_left(qk, r)
        if mlp_inputs is not None:
            refs["gate_kernel"] = lambda: top_left(g_down[:, None] * probed_gate_kernel(model, layer, mlp_inputs[layer]), r)
        for family, ref in refs.items():
            B = by[family].bases[layer]
            cos = min_cosine(B, ref())
            worst[family] = min(worst.get(family, 1.0), cos)
    bad = {f: c for f, c in worst.items() if c < 1.0 - tol}
    assert not bad, f"bases that do not span their modules' top singular space (min principal cosine): {bad}"
    return worst


def probed_post_gain(model, layer: int, writer: str) -> torch.Tensor:
    """The gain of the norm between ``writer`` (o_proj, down_proj) and the residual add, from the norm
    module's own forward pass on a constant input (x/rms(x) = 1 up to its eps: read off the output's
    ratio to the input's normalised value); ones (float64) without such a norm."""
    arch = architecture_of(model.config)
    path = arch.attn_out_norm if writer == "o_proj" else arch.mlp_out_norm
    d = int(model.config.hidden_size)
    if path is None:
        return torch.ones(d, dtype=DT)
    norm = model.get_submodule(f"{block_name(layer)}.{path}")
    x = torch.full((1, d), 4096.0, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        y = norm(x)[0].double()
    return y * math.sqrt(4096.0 ** 2 + eps_of(norm)) / 4096.0


def _module_matrix(linear) -> torch.Tensor:
    """A linear module's matrix probed on the identity (out x in, float64), bias removed."""
    with torch.no_grad():
        eye = torch.eye(linear.in_features, dtype=linear.weight.dtype)
        return (linear(eye) - (linear.bias if linear.bias is not None else 0.0)).double().T


def weights_for(model, method: str):
    """The model's weights as a method reads them: "residual" (this project's, with every gain) or
    the legacy gain-free ones (``gain_free``)."""
    W = extract_base_weights(model)
    return W if method == "residual" else gain_free(W)


def gain_free(W):
    """The legacy methodology (seed v7): the same matrices with every norm gain 1."""
    def strip(lw):
        return dataclasses.replace(lw, attn_gain=torch.ones_like(lw.attn_gain), mlp_gain=torch.ones_like(lw.mlp_gain),
                                   q_gain=None, k_gain=None)

    return dataclasses.replace(W, layers=tuple(strip(lw) for lw in W.layers), final_gain=torch.ones_like(W.final_gain))

