"""The on-disk A-side cache: a rerun loads exactly what a fresh build gives, any change of what
the A-side is computed from changes the key, and a broken entry is rebuilt, never trusted."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from subspace_sweep import a_side, cache, cli
from subspace_sweep.a_side import a_side_key, build_a_side_for, load_entry
from subspace_sweep.capture import count_forward_passes
from subspace_sweep.provenance import record_checksum, sha256_file
from subspace_sweep.delta import random_delta, save_delta
from subspace_sweep.model import load_model
from subspace_sweep.sweep import SweepConfig
from tests.helpers_model import small_probes

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def probes():
    return small_probes(4, 3)


def _entries(root):
    return sorted(p for p in root.iterdir() if p.name.startswith("a_side-"))


def _assert_same_a_side(got, want):
    assert [c.name for c in got.candidates] == [c.name for c in want.candidates]
    # the standardized view's scales (concern 14) travel with the bases, bit for bit
    assert sorted(got.coordinate_rms) == sorted(want.coordinate_rms) == sorted(want.layers)
    for layer, v in want.coordinate_rms.items():
        assert got.coordinate_rms[layer].dtype == v.dtype and torch.equal(got.coordinate_rms[layer], v), layer
    for g, w in zip(got.candidates, want.candidates):
        assert (g.family, g.definition, g.side, g.expected_rank, g.rank_note) == (
            w.family, w.definition, w.side, w.expected_rank, w.rank_note), g.name
        assert g.rank_exceptions == w.rank_exceptions, g.name
        assert json.dumps(g.diagnostics, sort_keys=True) == json.dumps(w.diagnostics, sort_keys=True), g.name
        assert sorted(g.bases) == sorted(w.bases), g.name
        for layer in w.bases:
            assert g.bases[layer].dtype == w.bases[layer].dtype
            assert torch.equal(g.bases[layer], w.bases[layer]), (g.name, layer)
        # A global basis stays one tensor at every layer.
        shared = all(B is w.bases[LAYERS[0]] for B in w.bases.values())
        assert shared == all(B is g.bases[LAYERS[0]] for B in g.bases.values()), g.name


def test_a_rerun_loads_the_built_a_side_bit_for_bit_without_forward_passes(tiny, probes, tmp_path):
    model, tokenizer = tiny
    plain = build_a_side_for(model, tokenizer, SweepConfig(), LAYERS, probes)
    config = SweepConfig(a_side_cache=str(tmp_path / "cache"))
    first = build_a_side_for(model, tokenizer, config, LAYERS, probes)
    assert first.cache["status"] == "miss" and first.forward_passes == 4  # clean, persona±, the sink token
    assert len(_entries(tmp_path / "cache")) == 1
    with count_forward_passes(model) as counter:
        second = build_a_side_for(model, tokenizer, config, LAYERS, probes)
    assert second.cache["status"] == "hit" and second.cache["key"] == first.cache["key"]
    assert counter.n == 0 and second.forward_passes == 0 and second.capture_seconds == 0.0
    assert second.layers == LAYERS
    _assert_same_a_side(first, plain)
    _assert_same_a_side(second, plain)


def _edit_weight(model):
    p = model.model.layers[0].mlp.down_proj.weight
    flat = p.data.view(-1)
    old = flat[0].clone()
    flat[0] = torch.nextafter(old, old + 1)  # one ulp
    return lambda: flat.__setitem__(0, old)


def _edit_template(tokenizer):
    old = tokenizer.chat_template
    tokenizer.chat_template = old.replace("<|im_start|>", "<|im_start|> ", 1)
    return lambda: setattr(tokenizer, "chat_template", old)


def _edit_sink_token(tokenizer):
    # bos is added to no prompt (Qwen-style), so the token ids stay the same: only attention_sink's
    # token changes.
    old = tokenizer.bos_token
    tokenizer.bos_token = "<|im_start|>"
    return lambda: setattr(tokenizer, "bos_token", old)


def _edit_source(_):
    real = cache.package_source_sha256
    cache.package_source_sha256 = lambda: "edited"  # type: ignore[assignment]
    return lambda: setattr(cache, "package_source_sha256", real)


@pytest.mark.parametrize("change", [
    "weight_one_ulp", "chat_template", "sink_token", "package_source", "r", "k_broad", "layers", "seed", "fit_probe", "persona",
])
def test_the_key_changes_with_everything_the_a_side_is_computed_from(tiny, probes, change):
    model, tokenizer = tiny
    config, layers = SweepConfig(), list(LAYERS)
    base = a_side_key(model, tokenizer, config, layers, probes)
    assert a_side_key(model, tokenizer, config, layers, probes) == base  # deterministic
    undo = lambda: None  # noqa: E731
    p = probes
    if change == "weight_one_ulp":
        undo = _edit_weight(model)
    elif change == "chat_template":
        undo = _edit_template(tokenizer)
    elif change == "sink_token":
        undo = _edit_sink_token(tokenizer)
    elif change == "package_source":
        undo = _edit_source(None)
    elif change in ("r", "k_broad", "seed"):
        config = dataclasses.replace(config, **{change: {"r": 4, "k_broad": 8, "seed": 1}[change]})
    elif change == "layers":
        layers = [1]
    elif change == "fit_probe":
        p = dataclasses.replace(probes, fit=(probes.fit[0] + " really", *probes.fit[1:]))
    elif change == "persona":
        p = dataclasses.replace(probes, persona_pos=probes.persona_pos + " Always.")
    try:
        assert a_side_key(model, tokenizer, config, layers, p) != base
    finally:
        undo()
    assert a_side_key(model, tokenizer, SweepConfig(), list(LAYERS), probes) == base


def test_the_key_ignores_what_the_a_side_never_sees(tiny, probes):
    model, tokenizer = tiny
    base = a_side_key(model, tokenizer, SweepConfig(), LAYERS, probes)
    other = SweepConfig(null="mc", n_boot=0, label="block_local", topic_holdout=2, out="x", quiet=True)
    assert a_side_key(model, tokenizer, other, LAYERS, dataclasses.replace(probes, eval=probes.eval[:1])) == base


def _tamper_consistently(entry, edit_bases=None, edit_meta=None):
    """Edit an entry AND recompute its checksums: only the content checks can catch it."""
    bases_file, meta_file = entry / a_side.BASES_FILE, entry / a_side.META_FILE
    if edit_bases is not None:
        tensors = load_file(str(bases_file))
        edit_bases(tensors)
        save_file(tensors, str(bases_file))
    meta = json.loads(meta_file.read_text())
    if edit_meta is not None:
        edit_meta(meta)
    cache.write_meta(entry, meta, (a_side.BASES_FILE,))  # the entry's own writer: files' sha256, checksum


def _first_basis(tensors):
    return next(name for name, t in tensors.items() if t.numel() > 4 and not name.startswith(a_side.RMS_PREFIX))


def _nan(tensors):
    name = _first_basis(tensors)
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")


def _negative_rms(tensors):
    name = next(n for n in tensors if n.startswith(a_side.RMS_PREFIX))
    tensors[name] = -tensors[name]


def _drop_rms(tensors):
    del tensors[next(n for n in tensors if n.startswith(a_side.RMS_PREFIX))]


def _skew(tensors):
    name = _first_basis(tensors)
    tensors[name] = tensors[name] * 1.5


def _edit_definition(meta):
    meta["candidates"][0]["definition"] += " (edited)"


@pytest.mark.parametrize("damage", [
    "truncated_bases", "garbage_meta", "other_key", "missing_candidate", "bit_flip", "edited_definition",
    "nan_basis_consistent_checksums", "skewed_basis_consistent_checksums", "edited_definition_consistent_checksums",
    "extra_tensor_consistent_checksums", "entry_is_a_file", "negative_rms_consistent_checksums",
    "missing_rms_consistent_checksums",
])
def test_a_broken_entry_is_rebuilt_and_replaced_with_one_warning(tiny, probes, tmp_path, damage):
    model, tokenizer = tiny
    config = SweepConfig(a_side_cache=str(tmp_path))
    built = build_a_side_for(model, tokenizer, config, LAYERS, probes)
    (entry,) = _entries(tmp_path)
    bases, meta_file = entry / a_side.BASES_FILE, entry / a_side.META_FILE
    if damage == "truncated_bases":
        bases.write_bytes(bases.read_bytes()[:1000])
    elif damage == "garbage_meta":
        meta_file.write_text("{not json")
    elif damage == "bit_flip":
        original = {n: t.clone() for n, t in load_file(str(bases)).items()}  # not views of the mapped file
        data = bytearray(bases.read_bytes())
        data[len(data) - 100] ^= 0x04  # inside the last tensor's data
        bases.write_bytes(bytes(data))
        flipped = load_file(str(bases))  # loads without complaint: only the sha256 tells
        assert sum(not torch.equal(flipped[n], original[n]) for n in original) == 1
    elif damage == "nan_basis_consistent_checksums":
        _tamper_consistently(entry, edit_bases=_nan)
    elif damage == "skewed_basis_consistent_checksums":
        _tamper_consistently(entry, edit_bases=_skew)
    elif damage == "negative_rms_consistent_checksums":
        _tamper_consistently(entry, edit_bases=_negative_rms)
    elif damage == "missing_rms_consistent_checksums":
        _tamper_consistently(entry, edit_bases=_drop_rms)
    elif damage == "extra_tensor_consistent_checksums":
        _tamper_consistently(entry, edit_bases=lambda t: t.update({"planted/1": torch.eye(64, 2, dtype=torch.float64)}))
    elif damage == "edited_definition_consistent_checksums":
        _tamper_consistently(entry, edit_meta=_edit_definition)
    elif damage == "entry_is_a_file":
        shutil.rmtree(entry)
        entry.write_text("not an entry")
    else:
        meta = json.loads(meta_file.read_text())
        if damage == "other_key":
            meta["key"] = "0" * 64
        elif damage == "edited_definition":
            _edit_definition(meta)
        else:
            meta["candidates"] = meta["candidates"][1:]
        meta_file.write_text(json.dumps(meta))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = build_a_side_for(model, tokenizer, config, LAYERS, probes)
    assert len(caught) == 1 and "unreadable or damaged" in str(caught[0].message), [str(w.message) for w in caught]
    assert "\n" not in str(caught[0].message) and str(entry) in str(caught[0].message)
    assert again.cache["status"] == "miss" and again.forward_passes == 4
    _assert_same_a_side(again, built)
    _assert_same_a_side(load_entry(entry, built.cache["key"], d=64), built)  # the entry is whole again
    assert _entries(tmp_path) == [entry] and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    with count_forward_passes(model) as counter:  # and it is trusted again
        assert build_a_side_for(model, tokenizer, config, LAYERS, probes).cache["status"] == "hit"
    assert counter.n == 0


def test_verification_reads_the_checksums_the_entry_records(tiny, probes, tmp_path):
    model, tokenizer = tiny
    built = build_a_side_for(model, tokenizer, SweepConfig(a_side_cache=str(tmp_path)), LAYERS, probes)
    (entry,) = _entries(tmp_path)
    meta = json.loads((entry / a_side.META_FILE).read_text())
    assert meta["files_sha256"] == {a_side.BASES_FILE: sha256_file(entry / a_side.BASES_FILE)}
    assert meta[cache.CHECKSUM_FIELD] == record_checksum(meta, cache.CHECKSUM_FIELD)
    _assert_same_a_side(load_entry(entry, built.cache["key"], d=64), built)


def test_a_failed_store_leaves_no_entry_and_keeps_the_result(tiny, probes, tmp_path, monkeypatch):
    model, tokenizer = tiny

    def disk_full(folder, *args):
        (folder / a_side.BASES_FILE).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(a_side, "write_entry", disk_full)
    with pytest.warns(UserWarning, match="could not store"):
        got = build_a_side_for(model, tokenizer, SweepConfig(a_side_cache=str(tmp_path)), LAYERS, probes)
    assert got.cache["status"] == "miss" and len(got.candidates) == len(a_side.A_SIDE_NAMES)
    assert list(tmp_path.iterdir()) == []


def test_cli_rerun_hits_the_cache_and_writes_the_same_results(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    delta = save_delta(random_delta(model, LAYERS, rank=2, seed=0), tmp_path / "w.safetensors")
    cache_dir = tmp_path / "cache"
    runs = {}
    for name, extra in [("plain", []), ("cold", ["--a-side-cache", str(cache_dir)]),
                        ("warm", ["--a-side-cache", str(cache_dir)])]:
        runs[name] = tmp_path / name
        argv = ["run", "--model", str(tiny_dir), "--delta", str(delta), "--out", str(runs[name]), "--quiet",
                "--n-boot", "200", *extra]
        assert cli.main(argv) == 0
    manifests = {n: json.loads((p / "manifest.json").read_text()) for n, p in runs.items()}
    assert manifests["plain"]["a_side_cache"] is None
    assert manifests["cold"]["a_side_cache"]["status"] == "miss"
    assert manifests["warm"]["a_side_cache"]["status"] == "hit"
    # the warm run makes only the label captures' passes: the A-side's 4 and the gradient bases' 5 are cached
    assert [manifests[n]["forward_passes"] for n in ("plain", "cold", "warm")] == [11, 11, 2]
    assert [(manifests[n]["gradient_bases"]["cache"] or {}).get("status") for n in ("plain", "cold", "warm")] == [
        None, "miss", "hit"]
    assert [manifests[n]["gradient_bases"]["forward_backward_passes"] for n in ("plain", "cold", "warm")] == [5, 5, 0]
    # The cached runs take the weights' digest from the key instead of hashing them again.
    assert manifests["warm"]["a_side_cache"]["model_sha256"] == manifests["plain"]["model_sha256"]
    assert manifests["cold"]["model_sha256"] == manifests["warm"]["model_sha256"] == manifests["plain"]["model_sha256"]
    for f in ("summary.tsv", "summary_pct.tsv", "per_layer.csv", "specific_per_layer.csv", "specific_summary.tsv",
              "definitions.md", "conclusion.md", "weight_oracles.safetensors"):
        plain = (runs["plain"] / f).read_bytes()
        assert (runs["cold"] / f).read_bytes() == plain, f
        assert (runs["warm"] / f).read_bytes() == plain, f


def test_cli_rejects_an_unusable_cache_folder_before_any_work(tiny_dir, tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    out = tmp_path / "out"
    argv = ["run", "--model", str(tiny_dir), "--delta", str(tmp_path / "w.safetensors"), "--out", str(out),
            "--quiet", "--a-side-cache", str(not_a_folder)]
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--a-side-cache" in err and "not a folder" in err, err
    assert not out.exists()


def test_the_same_model_from_a_moved_folder_keeps_its_key(tiny_dir, probes, tmp_path):
    import shutil

    moved = shutil.copytree(tiny_dir, tmp_path / "elsewhere")
    keys = []
    for folder in (tiny_dir, moved):
        model, tokenizer = load_model(folder, dtype="float32", device="cpu")
        keys.append(a_side_key(model, tokenizer, SweepConfig(), LAYERS, probes))
    assert keys[0] == keys[1]
