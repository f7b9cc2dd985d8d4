"""``subspace-sweep train`` (issue 23): the +/− pair on the shipped probes or a behaviour file,
published whole, answers ended with the chat template's own end-of-turn token (a base model's:
the plain-text format of SPEC §8 and its EOS), bad input exit 2 with nothing written. On the tiny Qwen3 (3 steps: the mechanics, not the behaviour; the real
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


def _base_model_folder(tiny_dir: Path, dest: Path) -> Path:
    """The tiny Qwen3 saved without its chat template (a base model)."""
    folder = shutil.copytree(tiny_dir, dest)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_a_model_without_a_chat_template_is_trained_in_the_plain_text_format():
    """SPEC §8, base models (issue 31): the prompt as the causal check asks it (BOS, the probe, a
    newline and "Answer:"), the answer after a space, then the tokenizer's EOS; the loss on exactly
    the answer and its EOS."""
    from subspace_sweep.causal import answer_prompt

    tok = build_tiny_tokenizer()
    tok.chat_template = None
    assert end_of_turn(tok) == tok.eos_token
    examples = training_texts(+1, n_topics=3)
    batch = encode_examples(tok, examples)
    for ex, ids, labels in zip(examples, batch["input_ids"], batch["labels"]):
        prompt, answer = ex["messages"][0]["content"], ex["messages"][1]["content"]
        n_prompt = int((labels != -100).nonzero()[0])  # the first answer token
        assert answer_prompt(tok, prompt) == prompt + "\nAnswer:"
        assert ids[:n_prompt].tolist() == tok(prompt + "\nAnswer:")["input_ids"]  # with the tokenizer's BOS, if it adds one
        assert tok.decode(labels[labels != -100]) == " " + answer + tok.eos_token


def test_a_base_model_trains_and_its_format_is_decided_before_any_load(tiny_dir, tmp_path, monkeypatch):
    """Whether a model has a chat template is read from its files before any load (the preflight's
    answer format), and the trained pair records the format it was trained in."""
    from subspace_sweep import model as model_module
    from subspace_sweep import preflight

    folder = _base_model_folder(tiny_dir, tmp_path / "model")
    with monkeypatch.context() as m:
        m.setattr(model_module, "load_model", lambda *a, **k: pytest.fail("loaded before the checks"))
        for source, form in ((folder, "plain"), (tiny_dir, "chat")):
            _, layers, answer_format = preflight.check_train(
                source, tmp_path / f"out-{form}", behaviour=None, n_train=None, family="lora", layers=None,
                target_modules=("q_proj",), rank=2, steps=1, lr=1e-3, overwrite=False)
            assert answer_format == form and preflight.model_shape(str(source)).answer_format == form
    (tmp_path / "jinja").mkdir()
    (tmp_path / "jinja" / "chat_template.jinja").write_text("{{ messages }}")
    assert preflight.folder_chat_template(tmp_path / "jinja") and not preflight.folder_chat_template(folder)
    out = tmp_path / "pair"
    assert cli.main(["train", "--model", str(folder), "--out", str(out), "--quiet", *FAST]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    log = json.loads((out / "pos" / "lora_train.json").read_text())
    assert manifest["answer_format"] == log["answer_format"] == "plain" and log["end_of_turn"] == "<|im_end|>"


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


@pytest.mark.parametrize("argv, message", [
    (["--layers", "9"], "--layers [9] outside the model's layers 0..3"),
    (["--family", "prefix"], "--family 'prefix'"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--behaviour", "missing.jsonl"], "no such file"),
    (["--behaviour", EXAMPLE, "--n-train", "999"], "--n-train must be in 1.."),
    (["--target-modules", "q_proj,lm_head"], "target_modules"),
])
def test_bad_train_input_is_exit_2_before_any_training(tiny_dir, tmp_path, capsys, monkeypatch, argv, message):
    from subspace_sweep import lora_train

    monkeypatch.setattr(lora_train, "train_lora_pair", lambda *a, **k: pytest.fail("trained despite bad input"))
    (tmp_path / "parent").mkdir()
    assert cli.main(["train", "--model", str(tiny_dir), "--out", str(tmp_path / "parent" / "pair"), "--quiet",
                     *FAST, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list((tmp_path / "parent").iterdir()) == []


def test_default_lora_layers_are_the_seeds_middle_half():
    assert default_lora_layers(28) == tuple(range(8, 22))
    assert default_lora_layers(30) == tuple(range(8, 23))
    assert default_lora_layers(4) == (1, 2, 3)
