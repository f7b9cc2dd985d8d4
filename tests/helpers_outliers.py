"""Module checks of the standardized view (SPEC §5, concern 14), shared by the tiny models and
the real one: the view's transforms and its scales against the modules' own forward passes."""

from __future__ import annotations

import pytest
import torch

from subspace_sweep.arch import architecture_of
from subspace_sweep.model import block_name, norm_gain, write_gains
from subspace_sweep.outliers import StandardizedView

D64 = torch.float64


def check_transforms_against_the_modules(model, layer: int, view: StandardizedView, r: int = 8, seed: int = 5) -> None:
    """(1) The MLP's read basis (top right singular vectors of [W_up; W_gate]·diag(γ_mlp), the rows
    its modules apply to x/rms(x), checked against up_proj(norm(x))): a residual change it pairs to
    zero stays orthogonal to it in standardized coordinates when it transforms as a covector, and
    not as a vector. (2) What o_proj writes (through its post-norm where the architecture has one)
    from inputs in its top-r input directions lies wholly inside its top-r write basis transformed
    as a vector, and not as a covector."""
    arch = architecture_of(model.config)
    block = model.get_submodule(block_name(layer))
    d = int(model.config.hidden_size)
    gen = torch.Generator().manual_seed(seed)
    up_path, up_part = arch.projection("up")
    gate_path, gate_part = arch.projection("gate")
    assert up_part is None and gate_part is None, "a fused gate_up needs its rows split first"
    up, gate = block.get_submodule(up_path), block.get_submodule(gate_path)
    norm = block.get_submodule(arch.mlp_norm)

    gamma = norm_gain(norm, d).double()
    rows = torch.cat([up.weight, gate.weight]).double() * gamma[None, :]
    x = torch.randn(2, d, generator=gen)
    with torch.no_grad():
        read = up(norm(x)).double()
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    xhat = x.double() / (x.double().pow(2).mean(1, keepdim=True) + eps).sqrt()
    assert torch.allclose(read, xhat @ rows[: up.out_features].T, rtol=1e-4, atol=1e-5)
    Vh = torch.linalg.svd(rows, full_matrices=True)[2]
    read_basis, rest = Vh[:r].T, Vh[r:].T
    u = rest @ torch.randn(rest.shape[1], generator=gen, dtype=D64)  # read_basisᵀu = 0
    Du = view.vectors(u[:, None])[:, 0]
    assert float((view.basis(read_basis, "covector").T @ Du).norm()) < 1e-10 * float(Du.norm())
    assert float((view.basis(read_basis, "vector").T @ Du).norm()) > 1e-3 * float(Du.norm())

    o_proj = block.get_submodule(arch.projection("o")[0])
    gain = write_gains(model, layer).get("o_proj")
    g = torch.ones(d, dtype=D64) if gain is None else gain.double()
    U, _, Vh_o = torch.linalg.svd(g[:, None] * o_proj.weight.double())
    write_basis = U[:, :r]
    x = (Vh_o[:r].T @ torch.randn(r, 3, generator=gen, dtype=D64)).T.float()  # inputs in the top-r directions
    post = block.get_submodule(arch.attn_out_norm) if arch.attn_out_norm is not None else None
    with torch.no_grad():
        out = o_proj(x) if post is None else post(o_proj(x))
    Dout = view.vectors(out.double().T)
    kept = {t: float((view.basis(write_basis, t).T @ Dout).norm() ** 2 / Dout.norm() ** 2) for t in ("vector", "covector")}
    assert kept["vector"] == pytest.approx(1.0, abs=1e-6)  # float32 forward
    assert kept["covector"] < 1.0 - 1e-3


def check_coordinate_rms_against_the_forward(model, tokenizer, a_side, probes) -> None:
    """The A-side's coordinate RMS = the RMS over the persona± FIT prompts' real tokens of the
    model's own hidden_states[l + 1] (block l's output), padding masked out."""
    from subspace_sweep.capture import a_side_conditions, encode

    rows = {layer: [] for layer in a_side.coordinate_rms}
    for name, (texts, chat) in a_side_conditions(tokenizer, probes).items():
        if not name.startswith("persona"):
            continue
        enc = encode(tokenizer, texts, chat=chat)
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states
        real = enc["attention_mask"].bool()
        for layer in rows:
            assert layer + 1 < len(hidden) - 1, "the last hidden state is after the final norm"
            rows[layer].append(hidden[layer + 1][real].double())
    for layer, parts in rows.items():
        want = torch.cat(parts).pow(2).mean(0).sqrt()
        got = a_side.coordinate_rms[layer]
        assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-4, atol=0), layer
