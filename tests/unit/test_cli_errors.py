"""Bad input: exit code 2, one clear line naming the fault, and nothing written (one test per case)."""

from __future__ import annotations

import pickle

import pytest
import torch

from subspace_sweep import cli
from subspace_sweep.delta import random_delta, save_delta
from subspace_sweep.model import load_model


@pytest.fixture(scope="module")
def tiny_loaded(tiny_dir):
    return load_model(tiny_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def good_delta(tiny_loaded, tmp_path_factory):
    model, _ = tiny_loaded
    path = tmp_path_factory.mktemp("delta") / "w.safetensors"
    save_delta(random_delta(model, [1, 2], rank=2, seed=0), path)
    return path


def _delta_file(tmp_path, tiny_loaded, edit) -> str:
    model, _ = tiny_loaded
    delta = random_delta(model, [1, 2], rank=2, seed=0)
    delta = edit(delta)
    path = tmp_path / "bad.safetensors"
    save_delta(delta, path)
    return str(path)


def _run_fails(capsys, argv, out, match: str) -> None:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_BAD_INPUT
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    assert not out.exists() or not any(out.iterdir())


def _run_argv(model, delta, out, *extra):
    return ["run", "--model", str(model), "--delta", str(delta), "--out", str(out), "--quiet", *extra]


def test_missing_delta(capsys, tmp_path, tiny_dir):
    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, tmp_path / "nope.safetensors", out), out, "does not exist")


def test_unreadable_delta(capsys, tmp_path, tiny_dir):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, bad, out), out, "safetensors")


def test_delta_unknown_key(capsys, tmp_path, tiny_dir, tiny_loaded):
    path = _delta_file(tmp_path, tiny_loaded, lambda d: {**d, "model.layers.99.mlp.down_proj.weight": torch.ones(2, 2)})
    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, path, out), out, "model.layers.99.mlp.down_proj.weight")


def test_delta_shape_mismatch(capsys, tmp_path, tiny_dir, tiny_loaded):
    def edit(d):
        k = next(iter(d))
        return {**d, k: torch.ones(d[k].shape[0] + 1, d[k].shape[1])}

    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, _delta_file(tmp_path, tiny_loaded, edit), out), out, "shape")


def test_delta_nan(capsys, tmp_path, tiny_dir, tiny_loaded):
    def edit(d):
        k = next(iter(d))
        v = d[k].clone()
        v[0, 0] = float("nan")
        return {**d, k: v}

    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, _delta_file(tmp_path, tiny_loaded, edit), out), out, "NaN")


def test_delta_all_zero(capsys, tmp_path, tiny_dir, tiny_loaded):
    out = tmp_path / "out"
    path = _delta_file(tmp_path, tiny_loaded, lambda d: {k: torch.zeros_like(v) for k, v in d.items()})
    _run_fails(capsys, _run_argv(tiny_dir, path, out), out, "zero")


def test_delta_without_residual_writer(capsys, tmp_path, tiny_dir, tiny_loaded):
    model, _ = tiny_loaded
    path = tmp_path / "qk.safetensors"
    save_delta(random_delta(model, [1], rank=2, seed=0, projections=["self_attn.q_proj"]), path)
    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, path, out), out, "o_proj")


class _Boom:
    def __reduce__(self):
        return (print, ("pwned",))


def test_delta_malicious_pickle(capsys, tmp_path, tiny_dir):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model.layers.0.mlp.down_proj.weight": _Boom()}))
    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, path, out), out, "refused")
    assert "pwned" not in capsys.readouterr().out


def test_unknown_candidate_name_in_demo(capsys, tmp_path):
    out = tmp_path / "out"
    _run_fails(capsys, ["demo", "--out", str(out), "--plant", "no_such_basis", "--quiet"], out, "no_such_basis")


def test_unknown_candidate_name_in_explain(capsys, tmp_path):
    _run_fails(capsys, ["explain", "no_such_basis"], tmp_path / "unused", "no_such_basis")


@pytest.mark.parametrize("r", ["0", "-3"])
def test_rank_not_positive(capsys, tmp_path, tiny_dir, good_delta, r):
    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, good_delta, out, "--r", r), out, "--r")


def test_rank_above_width(capsys, tmp_path, tiny_dir, good_delta):
    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, good_delta, out, "--r", "65"), out, "d = 64")


@pytest.mark.parametrize("n_fit", ["1", "31"])
def test_fewer_than_two_fit_or_eval_prompts(capsys, tmp_path, tiny_dir, good_delta, n_fit):
    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, good_delta, out, "--n-fit", n_fit), out, "at least 2 FIT and 2 EVAL")


def test_existing_nonempty_output_without_overwrite(capsys, tmp_path, tiny_dir, good_delta):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = cli.main(_run_argv(tiny_dir, good_delta, out))
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_BAD_INPUT and "--overwrite" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_model_of_an_unsupported_type(capsys, tmp_path, good_delta):
    from transformers import GPT2Config, GPT2LMHeadModel

    from subspace_sweep.toy import build_tiny_tokenizer

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=512)).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(folder, good_delta, out), out, "model_type 'gpt2' is not supported")


def test_a_supported_model_lacking_a_module_the_table_names():
    from subspace_sweep.errors import InputError
    from subspace_sweep.model import check_architecture
    from subspace_sweep.toy import build_tiny_model

    model, _ = build_tiny_model(seed=0)
    del model.model.layers[2].self_attn.k_norm
    with pytest.raises(InputError, match="has no module 'model.layers.2.self_attn.k_norm'"):
        check_architecture(model)


def test_layers_without_delta_tensor(capsys, tmp_path, tiny_dir, good_delta):
    out = tmp_path / "out"
    _run_fails(capsys, _run_argv(tiny_dir, good_delta, out, "--layers", "0"), out, "--layers [0]")
