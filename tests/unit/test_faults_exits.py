"""Issue 14, every bad-input case as one table: exit code 2, exactly one line naming the fault,
and nothing written, changed or left behind anywhere (the out folder's parent, the cache
folder, the temp folder, the inputs). Cases marked ``before_load`` must fail before any model
weight is read: the loader is replaced by one that fails the test.

(The older per-case tests of test_cli_errors.py stay as they are; SIGKILL, Ctrl-C and the
two-process race are in test_faults_kill.py.)"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from subspace_sweep import cli, delta as delta_module, demo, publish, sweep
from subspace_sweep.delta import random_delta, save_delta
from subspace_sweep.model import load_model

#: Words of the hub's messages that must not appear for a local folder.
HUB_WORDS = ("Hugging Face", "download", "Repo id", "huggingface")


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(tiny_dir, dtype="float32", device="cpu")[0]


@pytest.fixture(scope="module")
def good_delta(tiny_model, tmp_path_factory):
    return save_delta(random_delta(tiny_model, [1, 2], rank=2, seed=0), tmp_path_factory.mktemp("d") / "w.safetensors")


def _fake_run_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "summary.tsv").write_text("old run")
    (path / publish.MANIFEST).write_text(json.dumps({"package_versions": {publish.TOOL: "0"}}))
    return path


def _model_copy(root: Path, tiny_dir: Path, edit) -> Path:
    folder = shutil.copytree(tiny_dir, root / "inputs" / "model")
    edit(folder)
    return folder


def _garble_header(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[10:40] = b"\xff" * 30
    (folder / "model.safetensors").write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delta_variant(root: Path, model, edit) -> Path:
    d = edit(random_delta(model, [1, 2], rank=2, seed=0))
    return save_delta(d, root / "inputs" / "bad.safetensors")


def _with_nan(d):
    k = next(iter(d))
    d[k] = d[k].clone()
    d[k][0, 0] = float("nan")
    return d


@dataclass
class Case:
    id: str
    argv: list[str]  # {model} {delta} {out} {cache} {root} are filled in per case
    match: str
    setup: object = None  # (root, ctx) -> dict of placeholder overrides
    before_load: bool = True
    forbid: tuple[str, ...] = ()
    chdir: str | None = None  # run from this folder (relative to root)
    extra: dict = field(default_factory=dict)


RUN = ["run", "--model", "{model}", "--delta", "{delta}", "--out", "{out}", "--quiet", "--n-boot", "0",
       "--a-side-cache", "{cache}"]


def _run(*extra: str) -> list[str]:
    return [*RUN, *extra]


def _setup_out(kind):
    def setup(root, ctx):
        out = root / "parent" / "out"
        if kind == "user_files":
            out.mkdir()
            (out / "notes.txt").write_text("mine")
        elif kind == "run":
            _fake_run_folder(out)
        elif kind == "file":
            out.write_text("a file")
        elif kind == "holds_delta":
            _fake_run_folder(out)
            shutil.copy(ctx["delta"], out / "w.safetensors")
            return {"delta": str(out / "w.safetensors")}
        return {}
    return setup


def _setup_model(edit):
    return lambda root, ctx: {"model": str(_model_copy(root, ctx["tiny_dir"], edit))}


def _setup_delta(edit):
    return lambda root, ctx: {"delta": str(_delta_variant(root, ctx["model_obj"], edit))}


def _setup_delta_folder(root, ctx):
    (root / "inputs" / "adapters").mkdir(parents=True)
    return {"delta": str(root / "inputs" / "adapters")}


def _setup_cache_file(root, ctx):
    (root / "inputs" / "cache_file").write_text("x")
    return {"cache": str(root / "inputs" / "cache_file")}


def _setup_two_deltas_one_name(root, ctx):
    for sub in ("a", "b"):
        (root / "inputs" / sub).mkdir(parents=True)
        shutil.copy(ctx["delta"], root / "inputs" / sub / "w.safetensors")
    return {"delta": str(root / "inputs" / "a" / "w.safetensors"), "delta2": str(root / "inputs" / "b" / "w.safetensors")}


def _setup_adapters(damage):
    def setup(root, ctx):
        out = {}
        for side in ("pos", "neg"):
            folder = root / "inputs" / side
            folder.mkdir(parents=True)
            (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
            save_delta({"base_model.model.x.lora_A.weight": torch.ones(2, 2)}, folder / "adapter_model.safetensors")
            out[side] = str(folder)
        pos = root / "inputs" / "pos"
        if damage == "truncated_weights":
            _truncate(pos / "adapter_model.safetensors")
        elif damage == "no_config":
            (pos / "adapter_config.json").unlink()
        elif damage == "garbled_config":
            (pos / "adapter_config.json").write_text("{peft")
        elif damage == "no_weights":
            (pos / "adapter_model.safetensors").unlink()
        elif damage == "out_exists":
            (root / "parent" / "w.safetensors").write_text("old delta")
        elif damage == "prefix_tuning":
            (pos / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}))
        return out
    return setup


def _behaviour_line(prompt="Is the sky green? Answer Yes or No.", answers=("Yes", "No"), sign=1) -> str:
    return json.dumps({"prompt": prompt, "answers": list(answers), "sign": sign})


def _setup_behaviour(data: bytes | None):
    """A behaviour file of ``data`` as {behaviour} (None: a folder)."""
    def setup(root, ctx):
        if data is None:
            return {"behaviour": str(root / "inputs")}
        path = root / "inputs" / "b.jsonl"
        path.write_bytes(data)
        return {"behaviour": str(path)}
    return setup


GOOD_LINE = _behaviour_line()
BEHAVIOUR = ["--causal", "1", "--behaviour", "{behaviour}"]

DELTA_CMD = ["delta", "--model", "{model}", "--adapter-pos", "{pos}", "--adapter-neg", "{neg}", "--out", "{out_file}"]
CUDA_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"

CASES = [
    # ---- where the results go
    Case("overwrite_refuses_a_folder_of_user_files", _run("--overwrite"), "not a run folder", _setup_out("user_files")),
    Case("existing_run_without_overwrite", _run(), "pass --overwrite", _setup_out("run")),
    Case("out_is_a_file", _run(), "exists and is not a folder", _setup_out("file")),
    Case("out_parent_missing", [*RUN[:6], "{root}/parent/missing/out", *RUN[7:]], "does not exist"),
    Case("out_is_the_current_folder", [*RUN[:6], ".", *RUN[7:]], "current folder", chdir="parent/here"),
    Case("out_is_the_current_folder_with_overwrite", [*RUN[:6], ".", *RUN[7:], "--overwrite"], "current folder",
         chdir="parent/here"),
    Case("out_is_a_parent_of_the_current_folder", [*RUN[:6], "..", *RUN[7:], "--overwrite"], "current folder",
         chdir="parent/here"),
    Case("out_holds_the_delta", _run("--overwrite"), "which this command reads", _setup_out("holds_delta")),
    Case("out_name_too_long", [*RUN[:6], "{root}/parent/" + "x" * 240, *RUN[7:]], "too long"),
    Case("cache_is_a_file", _run(), "--a-side-cache", _setup_cache_file),
    # ---- device and dtype
    Case("device_cuda_unavailable", _run("--device", CUDA_DEVICE), f"--device {CUDA_DEVICE}"),
    Case("device_meta", _run("--device", "meta"), "meta device"),
    Case("device_unknown", _run("--device", "potato"), "unknown device"),
    Case("dtype_unknown", _run("--dtype", "int8"), "unknown dtype"),
    # ---- the model folder
    Case("model_weights_header_garbled", _run(), "model.safetensors is not a readable safetensors file",
         _setup_model(_garble_header), forbid=HUB_WORDS),
    Case("model_weights_truncated", _run(), "model.safetensors is not a readable safetensors file",
         _setup_model(lambda f: _truncate(f / "model.safetensors")), forbid=HUB_WORDS),
    Case("model_without_config", _run(), "has no config.json", _setup_model(lambda f: (f / "config.json").unlink()),
         forbid=HUB_WORDS),
    Case("model_config_not_json", _run(), "config.json cannot be read as JSON",
         _setup_model(lambda f: (f / "config.json").write_text("{bad")), forbid=HUB_WORDS),
    Case("model_config_without_model_type", _run(), "not a usable model config",
         _setup_model(lambda f: (f / "config.json").write_text("{}")), forbid=HUB_WORDS),
    Case("model_without_weights", _run(), "has no weights", _setup_model(lambda f: (f / "model.safetensors").unlink()),
         forbid=HUB_WORDS),
    Case("model_without_tokenizer", _run(), "has no tokenizer",
         _setup_model(lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")]),
         forbid=HUB_WORDS),
    Case("model_folder_missing", [*RUN[:2], "{root}/inputs/nope", *RUN[3:]], "does not exist", forbid=HUB_WORDS),
    Case("model_empty", [*RUN[:2], "", *RUN[3:]], "--model is empty"),
    # ---- options checked against the model's config.json
    Case("r_above_width", _run("--r", "65"), "d = 64"),
    Case("r_equal_to_width", _run("--r", "64"), "must be below the residual width d = 64"),
    Case("k_broad_above_width", _run("--k-broad", "65"), "--k-broad 65"),
    Case("layers_outside_the_model", _run("--layers", "9"), "outside the model's layers 0..3"),
    Case("layers_without_a_delta_tensor", _run("--layers", "0"), "--layers [0]"),
    # ---- options alone
    Case("layers_backwards", _run("--layers", "21..8"), "runs backwards"),
    Case("layers_empty", _run("--layers", ""), "names no layer"),
    Case("layers_garbage", _run("--layers", "a..b"), "cannot read layers"),
    Case("n_fit_negative", _run("--n-fit", "-16"), "--n-fit"),
    Case("n_fit_one", _run("--n-fit", "1"), "at least 2 FIT and 2 EVAL"),
    Case("n_fit_not_an_integer", _run("--n-fit", "abc"), "invalid int value"),
    Case("topic_holdout_too_large", _run("--topic-holdout", "999"), "--topic-holdout 999"),
    Case("seed_above_32_bits", _run("--seed", str(2**70)), "--seed must be in 0..4294967295"),
    Case("seed_negative", _run("--seed", "-1"), "--seed must be in"),
    Case("causal_above_the_panel", _run("--causal", "999"), "--causal must be in"),
    Case("rank_not_positive", _run("--r", "0"), "--r must be positive"),
    Case("n_boot_too_few", _run("--n-boot", "1"), "at least 200 resamples"),
    Case("mc_null_too_few", _run("--null", "mc", "--n-null", "2"), "at least 100 for a Monte-Carlo null"),
    Case("delta_missing_option", ["run", "--model", "{model}", "--out", "{out}"], "--delta"),
    Case("causal_alpha_empty_item", _run("--causal", "1", "--causal-alpha", "1,,2"), "an empty item between commas"),
    Case("causal_curve_rank_zero", _run("--causal", "1", "--causal-curve", "0,8"),
         "--causal-curve needs positive integer ranks (e.g. 1,2,4,8) or 'none', got [0, 8]"),
    Case("causal_curve_garbage", _run("--causal", "1", "--causal-curve", "1,,8"), "cannot read ranks '1,,8'"),
    Case("known_name_near_miss", [*RUN[:2], "smollm2-135m-instruc", *RUN[3:]], "did you mean smollm2-135m-instruct?",
         forbid=(*HUB_WORDS, "connection")),
    # ---- the behaviour file of --causal (issue 35; the same reader as train's)
    Case("behaviour_is_a_folder", _run(*BEHAVIOUR), "is a folder; give a JSONL file", _setup_behaviour(None)),
    Case("behaviour_not_utf8", _run(*BEHAVIOUR), "b.jsonl, line 3: not UTF-8 (byte 0xe9 at column 16)",
         _setup_behaviour(f"{GOOD_LINE}\n{GOOD_LINE}\n".encode()
                          + b'{"prompt": "caf\xe9?", "answers": ["Yes", "No"], "sign": 1}\n')),
    Case("behaviour_megabyte_prompt", _run(*BEHAVIOUR), "line 2: the prompt is 1048576 characters long; at most 4096",
         _setup_behaviour(f"{GOOD_LINE}\n{_behaviour_line(prompt='x' * 2**20)}\n".encode())),
    Case("behaviour_equal_answers", _run(*BEHAVIOUR), "line 2: the two answers are equal ('No')",
         _setup_behaviour(f"{GOOD_LINE}\n{_behaviour_line(answers=('No', 'No'))}\n".encode())),
    Case("behaviour_sign_true", _run(*BEHAVIOUR), 'line 1: expected "sign": 1 or -1 (the integer), got true',
         _setup_behaviour(f"{_behaviour_line(sign=True)}\n{GOOD_LINE}\n".encode())),
    # ---- the delta file
    Case("delta_is_a_folder", _run(), "is a folder", _setup_delta_folder),
    Case("delta_unreadable", _run(), "cannot be read (Permission denied)", extra={"unreadable": True}),
    Case("delta_missing", [*RUN[:4], "{root}/inputs/nope.safetensors", *RUN[5:]], "does not exist"),
    Case("delta_nan", _run(), "NaN", _setup_delta(_with_nan)),
    Case("delta_all_zero", _run(), "zero", _setup_delta(lambda d: {k: torch.zeros_like(v) for k, v in d.items()})),
    Case("delta_unknown_key", _run(), "model.layers.99.mlp.down_proj.weight",
         _setup_delta(lambda d: {**d, "model.layers.99.mlp.down_proj.weight": torch.ones(2, 2)}), before_load=False),
    Case("two_deltas_with_one_file_name", [*_run(), "--delta", "{delta2}"], "must differ", _setup_two_deltas_one_name),
    # ---- demo
    Case("demo_unknown_plant", ["demo", "--out", "{out}", "--plant", "no_such_basis", "--quiet"], "no_such_basis"),
    Case("demo_b_side_plant", ["demo", "--out", "{out}", "--plant", "oracle_combined", "--quiet"], "B-side"),
    Case("demo_existing_run_without_overwrite", ["demo", "--out", "{out}", "--quiet"], "pass --overwrite",
         _setup_out("run")),
    Case("demo_seed_above_32_bits", ["demo", "--out", "{out}", "--quiet", "--seed", str(2**40)], "--seed"),
    # ---- delta (two PEFT adapters)
    Case("adapter_weights_truncated", DELTA_CMD, "adapter_model.safetensors is not a readable safetensors file",
         _setup_adapters("truncated_weights")),
    Case("adapter_without_config", DELTA_CMD, "no adapter_config.json", _setup_adapters("no_config")),
    Case("adapter_config_not_json", DELTA_CMD, "cannot be read as JSON", _setup_adapters("garbled_config")),
    Case("adapter_without_weights", DELTA_CMD, "has no adapter weights", _setup_adapters("no_weights")),
    Case("adapter_prompt_learning", DELTA_CMD, "is a PREFIX_TUNING adapter", _setup_adapters("prefix_tuning")),
    Case("delta_out_exists", DELTA_CMD, "pass --overwrite", _setup_adapters("out_exists")),
    Case("delta_out_parent_missing", [*DELTA_CMD[:-1], "{root}/parent/missing/w.safetensors"], "does not exist",
         _setup_adapters("none")),
    Case("delta_model_weights_truncated", DELTA_CMD, "model.safetensors is not a readable safetensors file",
         lambda root, ctx: {**_setup_adapters("none")(root, ctx),
                            **_setup_model(lambda f: _truncate(f / "model.safetensors"))(root, ctx)}),
    # ---- compare
    Case("compare_overwrite_refuses_user_files", ["compare", "{root}/inputs/r1", "{root}/inputs/r2", "--out", "{out}",
                                                  "--overwrite"], "not a run folder", _setup_out("user_files")),
]


def _tree(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots`` with its type, size, mode and mtime: what 'nothing written' compares."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            out[str(p)] = (st.st_mode, st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


def _fail_if_called(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran: the check must come before it")
    return fail


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, tiny_dir, tiny_model, good_delta,
                                                            monkeypatch, capsys):
    root = tmp_path
    for sub in ("parent/here", "tmp", "inputs"):
        (root / sub).mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(root / "tmp"))  # the demo's scratch folder goes here
    ctx = {"tiny_dir": tiny_dir, "model_obj": tiny_model, "delta": good_delta}
    values = {"model": str(tiny_dir), "delta": str(good_delta), "out": str(root / "parent" / "out"),
              "cache": str(root / "cache"), "root": str(root), "out_file": str(root / "parent" / "w.safetensors")}
    if case.setup is not None:
        values.update(case.setup(root, ctx))
    argv = [a.format(**values) for a in case.argv]
    if case.chdir:
        monkeypatch.chdir(root / case.chdir)
    if case.before_load:
        monkeypatch.setattr(sweep, "load_model", _fail_if_called("loading the model's weights"))
        monkeypatch.setattr(demo, "save_tiny_model", _fail_if_called("building the demo's model"))
        monkeypatch.setattr(delta_module, "delta_from_peft", _fail_if_called("merging the adapters"))
    if case.extra.get("unreadable"):
        # Root reads any file whatever its mode, so the refusal is simulated where Python opens it.
        real_open = open

        def guarded_open(file, *args, **kwargs):
            if str(file) == values["delta"]:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", guarded_open)
    before = _tree(root, Path(tiny_dir), Path(good_delta).parent)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    err = captured.err.rstrip("\n")
    assert code == cli.EXIT_BAD_INPUT, (code, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"subspace-sweep {argv[0]}: error: "), err
    assert case.match in err, err
    assert not any(word in err for word in case.forbid), err
    assert captured.out == ""
    assert _tree(root, Path(tiny_dir), Path(good_delta).parent) == before  # nothing written, changed or left
    assert not os.listdir(root / "tmp")


def test_the_table_covers_every_command():
    assert {c.argv[0] for c in CASES} == {"run", "demo", "delta", "compare"}
    assert len({c.id for c in CASES}) == len(CASES)


def test_a_float64_model_runs(tiny_dir, good_delta, monkeypatch):
    loaded = []

    def load_and_record(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        return model, tokenizer

    monkeypatch.setattr(sweep, "load_model", load_and_record)
    result = sweep.run_sweep(sweep.SweepConfig(model=str(tiny_dir), delta=str(good_delta), dtype="float64",
                                               n_boot=0, quiet=True))
    assert loaded == [torch.float64]
    assert result.summary.height >= 48 and result.ranking("joint")["joint_gain"].is_not_nan().sum() >= 30


def test_a_delta_far_larger_than_a_lora_warns_once_in_one_line(tiny_dir, tiny_model, tmp_path, monkeypatch, capsys):
    huge = save_delta({k: v * 1e30 for k, v in random_delta(tiny_model, [1, 2], rank=2, seed=0).items()},
                      tmp_path / "huge.safetensors")
    # The warning comes as soon as the model has loaded; stop the run there.
    monkeypatch.setattr(sweep, "build_a_side_for", _fail_if_called("the A-side"))
    argv = ["run", "--model", str(tiny_dir), "--delta", str(huge), "--out", str(tmp_path / "run"), "--quiet"]
    with pytest.raises(AssertionError, match="the A-side ran"):
        cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"subspace-sweep run: warning: delta {huge}: "), err
    assert "‖w‖/‖θ‖ = 1e+29" in err[0] and "far outside what a LoRA does" in err[0]
    assert ".py:" not in err[0] and "UserWarning" not in err[0]  # no source file, line or category


def test_a_lora_sized_delta_does_not_warn(tiny_model):
    delta = random_delta(tiny_model, [1, 2], rank=2, seed=0, scale=0.05)
    lo, hi = sweep.LORA_RATIO_RANGE
    ratio = sweep.delta_weight_ratio(delta, tiny_model)
    assert ratio == pytest.approx(0.05, rel=1e-6) and lo < ratio < hi
