"""Delta I/O, validation and the helpers scoring uses (issue 3)."""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings

import pytest
import torch

from subspace_sweep.delta import (
    DeltaFormatError,
    NonFiniteDeltaError,
    NoResidualWriterError,
    ShapeMismatchError,
    UnknownKeyError,
    UnsafePickleError,
    ZeroDeltaError,
    load_delta,
    random_delta,
    residual_writer_tensors,
    save_delta,
    scored_layers,
    validate_delta,
    writer_layer,
)
from subspace_sweep.errors import DeltaError, InputError
from subspace_sweep.provenance import sha256_file
from subspace_sweep.toy import build_tiny_model

O1 = "model.layers.1.self_attn.o_proj.weight"
D1 = "model.layers.1.mlp.down_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def delta():
    model, _ = build_tiny_model(seed=0)
    return random_delta(model, [1, 2], rank=2, seed=0)


def test_safetensors_round_trip_is_bit_exact(tmp_path, delta):
    path = save_delta(delta, tmp_path / "w.safetensors")
    back = load_delta(path)
    assert back.keys() == delta.keys()
    assert all(torch.equal(back[k], delta[k]) and back[k].dtype == delta[k].dtype for k in delta)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_pt_round_trip_and_peft_prefix(tmp_path, delta):
    torch.save({f"base_model.model.{k}": v for k, v in delta.items()}, tmp_path / "w.pt")
    back = load_delta(tmp_path / "w.pt")
    assert back.keys() == delta.keys()  # the documented prefix is stripped
    assert all(torch.equal(back[k], delta[k]) for k in delta)


def test_prefix_collision_is_refused(tmp_path, delta):
    torch.save({O1: delta[O1], f"base_model.model.{O1}": delta[O1]}, tmp_path / "w.pt")
    with pytest.raises(DeltaFormatError, match="both with and without"):
        load_delta(tmp_path / "w.pt")


def _truncated_pt(path):
    torch.save({O1: torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.with_suffix(".npz").write_bytes(b"x"), "unknown delta format"),
        (lambda p: torch.save([torch.ones(2)], p.with_suffix(".pt")), "expected a dict"),
        (lambda p: torch.save({O1: 3}, p.with_suffix(".pt")), "not a tensor"),
        (lambda p: torch.save({O1: torch.ones(2, dtype=torch.long)}, p.with_suffix(".pt")), "floating point"),
        (lambda p: p.with_suffix(".safetensors").write_bytes(b"garbage"), "safetensors"),
        (lambda p: _truncated_pt(p.with_suffix(".pt")), "torch file"),
    ],
    ids=["missing", "suffix", "list", "int-value", "int-tensor", "bad-safetensors", "bad-pt"],
)
def test_unreadable_files_raise_delta_format_error(tmp_path, setup, match):
    base = tmp_path / "w"
    setup(base)
    candidates = [p for p in tmp_path.iterdir()] or [base.with_suffix(".safetensors")]
    with pytest.raises(DeltaFormatError, match=match) as exc:
        load_delta(candidates[0])
    assert isinstance(exc.value, DeltaError) and isinstance(exc.value, InputError)


class _Payload:
    """Unpickling this would create the marker file (if the loader executed it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("wrap", ["inside-dict", "bare-protocol-2", "bare-protocol-4"])
def test_malicious_pickle_is_refused_without_executing_it(tmp_path, delta, wrap):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if wrap == "inside-dict":
        torch.save({O1: delta[O1], "x": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=int(wrap[-1])))
    control = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload is live: plain pickle runs it
    assert control.exists()
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="not executed") as exc, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)  # torch's note on protocol 4
        load_delta(path)
    assert not marker.exists()
    assert "evil.pt" in str(exc.value) and "weights_only=False" not in str(exc.value)


def test_save_requires_safetensors_suffix(tmp_path, delta):
    with pytest.raises(DeltaFormatError, match=".safetensors"):
        save_delta(delta, tmp_path / "w.pt")


# ------------------------------------------------------------------ validation


def _bad_deltas():
    model, _ = build_tiny_model(seed=0)
    good = random_delta(model, [1], rank=2, seed=0)
    other, _ = build_tiny_model(seed=0, d_model=48, n_heads=4, n_kv_heads=2, head_dim=12, d_mlp=144)
    nan = dict(good)
    nan[D1] = good[D1].clone()
    nan[D1][3, 5] = float("nan")
    inf = dict(good)
    inf[O1] = good[O1].clone()
    inf[O1][0, 0] = float("-inf")
    return model, {
        "unknown-key": ({**good, "model.layers.7.mlp.down_proj.weight": torch.ones(64, 192)}, UnknownKeyError,
                        "model.layers.7.mlp.down_proj.weight"),
        "peft-prefix-unstripped": ({f"base_model.model.{k}": v for k, v in good.items()}, UnknownKeyError,
                                   "load_delta"),
        "shape-other-model": (random_delta(other, [1], rank=2), ShapeMismatchError, r"\(48, 48\).*\(64, 64\)"),
        "shape-transposed": ({O1: good[O1], D1: good[D1].T.contiguous()}, ShapeMismatchError,
                             r"mlp.down_proj.weight.*\(192, 64\).*\(64, 192\)"),
        "nan": (nan, NonFiniteDeltaError, r"down_proj.*1 NaN and 0 Inf"),
        "inf": (inf, NonFiniteDeltaError, r"o_proj.*0 NaN and 1 Inf"),
        "all-zero": ({k: torch.zeros_like(v) for k, v in good.items()}, ZeroDeltaError, "every entry"),
        "empty": ({}, ZeroDeltaError, "no tensors"),
        "no-writer": ({Q1: torch.ones(64, 64)}, NoResidualWriterError, "it has none"),
        "zero-writers": ({Q1: torch.ones(64, 64), O1: torch.zeros(64, 64)}, NoResidualWriterError, "all zero"),
    }


_MODEL, _BAD = _bad_deltas()


@pytest.mark.parametrize("case", list(_BAD))
def test_each_bad_delta_raises_its_own_error(case):
    bad, cls, match = _BAD[case]
    with pytest.raises(DeltaError, match=match) as exc:
        validate_delta(bad, _MODEL)
    assert type(exc.value) is cls


def test_the_error_classes_are_distinct():
    classes = {cls for _, cls, _ in _BAD.values()} | {UnsafePickleError, DeltaFormatError}
    assert len(classes) == 7
    assert all(issubclass(c, DeltaError) for c in classes)


def test_valid_delta_passes(delta):
    model, _ = build_tiny_model(seed=0)
    assert validate_delta(delta, model) is None
    # a bf16 delta and a delta on read-side tensors as well as writers are fine
    validate_delta({k: v.to(torch.bfloat16) for k, v in delta.items()} | {Q1: torch.ones(64, 64)}, model)


# ------------------------------------------------------------------ views for scoring


def test_residual_writer_tensors_and_scored_layers():
    model, _ = build_tiny_model(seed=0)
    d = random_delta(model, [1, 3], rank=2, seed=0)
    d["model.layers.3.mlp.down_proj.weight"] = torch.zeros(64, 192)  # present but zero: left out
    d[Q1] = torch.ones(64, 64)
    d["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(64, 64)
    w1 = residual_writer_tensors({k: v.to(torch.bfloat16) for k, v in d.items()}, 1)
    assert set(w1) == {"o_proj", "down_proj"}
    assert w1["o_proj"].shape == (64, 64) and w1["down_proj"].shape == (64, 192)
    assert w1["down_proj"].dtype == torch.bfloat16 and w1["down_proj"].device.type == "cpu"  # as stored
    assert set(residual_writer_tensors(d, 3)) == {"o_proj"}
    assert residual_writer_tensors(d, 0) == {} and residual_writer_tensors(d, 2) == {}
    assert scored_layers(d) == [1, 3]
    assert writer_layer("model.layers.12.mlp.down_proj.weight") == (12, "down_proj")
    assert writer_layer(Q1) is None


def test_random_delta_is_seeded_low_rank_and_scaled():
    model, _ = build_tiny_model(seed=0)
    a = random_delta(model, [2, 0], rank=3, seed=7, scale=0.25)
    b = random_delta(model, [0, 2], rank=3, seed=7, scale=0.25)
    c = random_delta(model, [0, 2], rank=3, seed=8, scale=0.25)
    assert list(a) == list(b) == [
        "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight",
    ]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[O1.replace("1", "0")], c[O1.replace("1", "0")])
    for k, v in a.items():
        assert v.dtype == torch.float32
        assert int(torch.linalg.matrix_rank(v)) == 3
        W = model.get_parameter(k)
        torch.testing.assert_close(v.norm(), 0.25 * W.norm())


def test_random_delta_planted_in_a_basis():
    model, _ = build_tiny_model(seed=0)
    B, _ = torch.linalg.qr(torch.randn(64, 5, generator=torch.Generator().manual_seed(0)))
    d = random_delta(model, [1], rank=2, seed=0, basis=B,
                     projections=["self_attn.o_proj", "mlp.down_proj", "mlp.up_proj"])
    for k in (O1, D1):
        M = d[k]
        assert (M - B @ (B.T @ M)).norm() < 1e-5 * M.norm()  # column space inside span(B)
    up = d["model.layers.1.mlp.up_proj.weight"]  # output side is the MLP, not the residual: not planted
    assert up.shape == (192, 64)


def test_sha256_file(tmp_path, delta):
    path = save_delta(delta, tmp_path / "w.safetensors")
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path, chunk=7) == sha256_file(path)
