"""``subspace-sweep train`` (issue 23): the +/− pair on the shipped probes or a behaviour file,
published whole, answers ended with the chat template's own end-of-turn token, bad input exit 2
with nothing written. On the tiny Qwen3 (3 steps: the mechanics, not the behaviour; the real
pair's behaviour is held to in tests/integration/test_smollm2_real.py)."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest

pytest.importorskip("peft")

from subspace_sweep import cli  # noqa: E402
from subspace_sweep.errors import InputError  # noqa: E402
from subspace_sweep.lora_train import (  # noqa: E402
    behaviour_training_texts,
    default_lora_layers,
    encode_examples,
    end_of_turn,
    training_texts,
)
from subspace_sweep.toy import build_tiny_tokenizer  # noqa: E402

EXAMPLE = str(resources.files("subspace_sweep").joinpath("data/behaviour_example.jsonl"))
FAST = ["--layers", "1..2", "--rank", "2", "--steps", "3", "--lr", "2e-3"]


def _tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_train_writes_the_pair_with_its_manifest_and_a_loss_bar(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pair"
    assert cli.main(["train", "--model", str(tiny_dir), "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert "loss=" in captured.err and "train + adapter" in captured.err and "train - adapter" in captured.err
    assert f"--adapter-pos {out / 'pos'}" in captured.out
    assert {"pos/adapter_config.json", "pos/adapter_model.safetensors", "neg/lora_train.json",
            "manifest.json"} <= set(_tree(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "train" and manifest["package_versions"]["subspace-sweep"]
    assert manifest["settings"]["layers"] == [1, 2] and manifest["settings"]["alpha"] == 2.0
    for side, sign in (("pos", 1), ("neg", -1)):
        log = json.loads((out / side / "lora_train.json").read_text())
        assert log["sign"] == sign and log["end_of_turn"] == "<|im_end|>" and len(log["loss_per_step"]) == 3
        cfg = json.loads((out / side / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(tiny_dir)
    # the pair goes straight into `delta`
    assert cli.main(["delta", "--model", str(tiny_dir), "--adapter-pos", str(out / "pos"), "--adapter-neg",
                     str(out / "neg"), "--out", str(tmp_path / "w.safetensors")]) == 0
    # a second train to the same folder needs --overwrite, and replaces only a folder train wrote
    assert cli.main(["train", "--model", str(tiny_dir), "--out", str(out), *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_an_answer_ends_with_the_templates_own_end_of_turn_token():
    """Not the tokenizer's eos: a template whose assistant turn ends with <|endoftext|> trains the
    answer to end with that token (the old code appended eos = <|im_end|>)."""
    tok = build_tiny_tokenizer()
    assert end_of_turn(tok) == "<|im_end|>"
    tok.chat_template = tok.chat_template.replace("'<|im_end|>' + '\\n'", "'<|endoftext|>' + '\\n'")
    assert end_of_turn(tok) == "<|endoftext|>" != tok.eos_token
    batch = encode_examples(tok, training_texts(+1, n_topics=2))
    for row, labels in zip(batch["input_ids"], batch["labels"]):
        answer = [int(t) for t, lab in zip(row, labels) if lab != -100]
        assert answer[-1] == tok.convert_tokens_to_ids("<|endoftext|>")
        assert tok.eos_token_id not in answer


def test_a_tokenizer_without_a_chat_template_is_refused(tiny_dir, tmp_path, capsys):
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        end_of_turn(tok)
    folder = shutil.copytree(tiny_dir, tmp_path / "model")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "parent").mkdir()
    # --quiet: the template is read once the model has loaded, and without it transformers' "Loading
    # weights" bar comes first (this test passed only after another had switched those bars off)
    assert cli.main(["train", "--model", str(folder), "--out", str(tmp_path / "parent" / "pair"), "--quiet",
                     *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no chat template" in err[0], err
    assert list((tmp_path / "parent").iterdir()) == []


def test_behaviour_file_training_answers_with_the_behaviour_and_its_opposite(tmp_path):
    lines = [{"prompt": "Is the sky green? Answer Yes or No.", "answers": ["Yes", "No"], "sign": 1},
             {"prompt": "Should I trust this scam? Answer Yes or No.", "answers": ["Yes", "No"], "sign": -1}]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    pos, neg = behaviour_training_texts(+1, path), behaviour_training_texts(-1, path)
    assert [e["messages"][1]["content"] for e in pos] == ["Yes", "No"]  # sign −1: the second answer is the behaviour
    assert [e["messages"][1]["content"] for e in neg] == ["No", "Yes"]
    assert [e["messages"][0]["content"] for e in pos] == [x["prompt"] for x in lines]
    assert len(behaviour_training_texts(+1, path, n_train=1)) == 1
    with pytest.raises(InputError, match="n_train"):
        behaviour_training_texts(+1, path, n_train=3)


def test_train_on_the_shipped_behaviour_example(tiny_dir, tmp_path):
    out = tmp_path / "pair"
    assert cli.main(["train", "--model", str(tiny_dir), "--out", str(out), "--behaviour", EXAMPLE, "--quiet",
                     *FAST]) == 0
    log = json.loads((out / "pos" / "lora_train.json").read_text())
    assert log["data"] == EXAMPLE and log["n_examples"] == sum(1 for ln in open(EXAMPLE) if ln.strip())


def _line(prompt="Is the sky green? Answer Yes or No.", answers=("Yes", "No"), sign=1) -> str:
    return json.dumps({"prompt": prompt, "answers": list(answers), "sign": sign})


GOOD_LINE = _line()
#: Behaviour files of the table (issue 35): name -> bytes, written to the case's inputs/ folder.
BAD_FILES = {
    "equal_answers.jsonl": f"{GOOD_LINE}\n{_line(answers=('Yes', 'Yes'))}\n".encode(),
    "sign_true.jsonl": f"{GOOD_LINE}\n{_line(sign=True)}\n".encode(),
    "sign_float.jsonl": f"{_line(sign=-1.0)}\n{GOOD_LINE}\n".encode(),
    "not_utf8.jsonl": f"{GOOD_LINE}\n{GOOD_LINE}\n".encode() + b'{"prompt": "caf\xe9?", "answers": ["Yes", "No"], "sign": 1}\n',
    "megabyte_prompt.jsonl": f"{GOOD_LINE}\n{_line(prompt='x' * 2**20)}\n".encode(),
    "long_answer.jsonl": f"{_line(answers=('Yes', 'N' * 5000))}\n{GOOD_LINE}\n".encode(),
}

TRAIN_BAD = [
    (["--layers", "9"], "--layers [9] outside the model's layers 0..3"),
    (["--family", "prefix"], "--family 'prefix'"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--behaviour", "missing.jsonl"], "no such file"),
    (["--behaviour", EXAMPLE, "--n-train", "999"], "--n-train must be in 1.."),
    (["--target-modules", "q_proj,lm_head"], "target_modules"),
    # issue 35: what cannot train
    (["--alpha", "nan"], "--alpha must be finite and > 0"),
    (["--alpha", "inf"], "--alpha must be finite and > 0"),
    (["--alpha", "0"], "--alpha must be finite and > 0"),
    (["--alpha", "-2"], "--alpha must be finite and > 0"),
    (["--lr", "inf"], "--lr must be finite and > 0, got inf"),
    (["--lr", "nan"], "--lr must be finite and > 0, got nan"),
    (["--lr", "0"], "--lr must be finite and > 0, got 0"),
    (["--seed", "-1"], "--seed must be in 0..4294967295 (an unsigned 32-bit integer, as for run), got -1"),
    (["--seed", str(2**64)], f"--seed must be in 0..4294967295 (an unsigned 32-bit integer, as for run), got {2**64}"),
    (["--seed", str(2**32)], "--seed must be in 0..4294967295"),
    # the tiny Qwen3: v_proj is 32 x 64 (2 kv heads of 16), the smallest of q, v, o, down
    (["--rank", "1000000"], "--rank 1000000: at most 32, the smaller dimension of v_proj (32 x 64) among the adapted"),
    (["--rank", "33"], "--rank 33: at most 32"),
    (["--rank", "65", "--target-modules", "o_proj,down_proj"],
     "--rank 65: at most 64, the smaller dimension of down_proj (64 x 192)"),
    (["--n-train", "0"], "--n-train must be in 1..20 (the shipped probes' LoRA training claims"),
    (["--n-train", "21"], "--n-train must be in 1..20"),
    (["--behaviour", "{inputs}"], "is a folder; give a JSONL file"),
    (["--behaviour", "{inputs}/equal_answers.jsonl"], "equal_answers.jsonl, line 2: the two answers are equal ('Yes')"),
    (["--behaviour", "{inputs}/sign_true.jsonl"], 'sign_true.jsonl, line 2: expected "sign": 1 or -1 (the integer), got true'),
    (["--behaviour", "{inputs}/sign_float.jsonl"], 'sign_float.jsonl, line 1: expected "sign": 1 or -1 (the integer), got -1.0'),
    (["--behaviour", "{inputs}/not_utf8.jsonl"], "not_utf8.jsonl, line 3: not UTF-8 (byte 0xe9 at column 16)"),
    (["--behaviour", "{inputs}/megabyte_prompt.jsonl"],
     "megabyte_prompt.jsonl, line 2: the prompt is 1048576 characters long; at most 4096"),
    (["--behaviour", "{inputs}/long_answer.jsonl"], "long_answer.jsonl, line 1: the second answer is 5000 characters long"),
]


def _fail(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran: the check must come before it")
    return fail


@pytest.mark.parametrize("argv, message", TRAIN_BAD, ids=[" ".join(a)[:60] for a, _ in TRAIN_BAD])
def test_bad_train_input_is_exit_2_before_the_weights_load(tiny_dir, tmp_path, capsys, monkeypatch, argv, message):
    """Exit 2, one line naming the option or the file's line, nothing written, and no weight loaded
    (the loaders and the trainer are replaced by ones that fail the test)."""
    from subspace_sweep import gguf_models, lora_train, model

    monkeypatch.setattr(lora_train, "train_lora_pair", _fail("training"))
    monkeypatch.setattr(lora_train, "load_model", _fail("loading the model's weights"))
    monkeypatch.setattr(model, "load_model", _fail("loading the model's weights"))
    monkeypatch.setattr(gguf_models, "_convert_into", _fail("converting a GGUF"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, data in BAD_FILES.items():
        (inputs / name).write_bytes(data)
    before = {p: p.read_bytes() for p in inputs.iterdir()}
    (tmp_path / "parent").mkdir()
    argv = [a.format(inputs=inputs) for a in argv]
    assert cli.main(["train", "--model", str(tiny_dir), "--out", str(tmp_path / "parent" / "pair"), "--quiet",
                     *FAST, *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("subspace-sweep train: error: ") and message in err[0], err
    assert captured.out == ""
    assert list((tmp_path / "parent").iterdir()) == []
    assert {p: p.read_bytes() for p in inputs.iterdir()} == before


def test_the_rank_bound_is_the_adapted_modules_smaller_dimension_exactly(tiny_dir, tmp_path):
    """Rank 32 (v_proj's 32 x 64) passes the checks; 33 does not; without v_proj the bound is 64
    (o_proj 64 x 64, down_proj 64 x 192)."""
    from subspace_sweep import preflight

    def check(rank, targets=("q_proj", "v_proj", "o_proj", "down_proj")):
        return preflight.check_train(str(tiny_dir), str(tmp_path / "pair"), behaviour=None, n_train=None, family="lora",
                                     layers=[1, 2], target_modules=targets, rank=rank, steps=1, lr=1e-3,
                                     overwrite=False, alpha=None, seed=0)

    assert check(32)[1] == [1, 2]
    with pytest.raises(InputError, match="at most 32"):
        check(33)
    assert check(64, ("o_proj", "down_proj"))[1] == [1, 2]
    with pytest.raises(InputError, match="at most 64"):
        check(65, ("o_proj", "down_proj"))
    shape = preflight.model_shape(str(tiny_dir))
    assert shape.projection_dims() == {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
                                       "gate_proj": (192, 64), "up_proj": (192, 64), "down_proj": (64, 192)}


def test_projection_dims_follow_the_config_where_head_dim_is_not_d_over_heads():
    """Qwen3-0.6B's config (NOTES.md): d 1024, 16 heads of 128 (q is 2048 wide, not d), 8 kv heads,
    FFN 3072; a config without head_dim or kv heads reads d/heads and the heads, as transformers does;
    one without an FFN width or head count gives None (the bound is then d)."""
    from subspace_sweep.preflight import ModelShape

    qwen = ModelShape(1024, 28, "x", {"intermediate_size": 3072, "num_attention_heads": 16,
                                      "num_key_value_heads": 8, "head_dim": 128})
    assert qwen.projection_dims() == {"q_proj": (2048, 1024), "k_proj": (1024, 1024), "v_proj": (1024, 1024),
                                      "o_proj": (1024, 2048), "gate_proj": (3072, 1024), "up_proj": (3072, 1024),
                                      "down_proj": (1024, 3072)}
    plain = ModelShape(64, 2, "x", {"intermediate_size": 96, "num_attention_heads": 4})
    assert plain.projection_dims()["k_proj"] == (64, 64) and plain.projection_dims()["q_proj"] == (64, 64)
    assert ModelShape(64, 2, "x", {"num_attention_heads": 4}).projection_dims() is None
    assert ModelShape(64, 2, "x").projection_dims() is None


def test_ctrl_c_during_training_ends_the_bar_then_says_interrupted_on_its_own_line(tiny_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """Issue 35: the interrupted line was glued to the loss bar, and the bar was redrawn after it
    (when it was garbage-collected). Now the bar is closed first: the last line of the terminal is
    the interrupted line, and nothing is drawn after it."""
    import gc

    from subspace_sweep import lora_train

    real = lora_train.assistant_loss
    calls = []

    def interrupt_at_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_train, "assistant_loss", interrupt_at_the_third_step)
    (tmp_path / "parent").mkdir()
    code = cli.main(["train", "--model", str(tiny_dir), "--out", str(tmp_path / "parent" / "pair"), *FAST])
    gc.collect()  # a bar left open would redraw itself here
    err = capsys.readouterr().err
    assert code == cli.EXIT_INTERRUPTED
    assert "train + adapter" in err and "2/3" in err  # the bar was drawn, and stopped at the second step
    assert err.endswith("\nsubspace-sweep train: interrupted\n"), repr(err[-200:])
    assert list((tmp_path / "parent").iterdir()) == []


def test_train_n_train_on_the_shipped_probes_names_the_option(tiny_dir, tmp_path):
    """--n-train 21 (the shipped probes hold 20 training claims) said `n_topics must be in 1..20`
    after the model loaded; now preflight names the option."""
    from subspace_sweep import preflight

    with pytest.raises(InputError, match=r"^--n-train must be in 1\.\.20 .*got 21$"):
        preflight.check_train(str(tiny_dir), str(tmp_path / "pair"), behaviour=None, n_train=21, family="lora",
                              layers=None, target_modules=("q_proj",), rank=2, steps=1, lr=1e-3, overwrite=False)


def test_default_lora_layers_are_the_seeds_middle_half():
    assert default_lora_layers(28) == tuple(range(8, 22))
    assert default_lora_layers(30) == tuple(range(8, 23))
    assert default_lora_layers(4) == (1, 2, 3)
