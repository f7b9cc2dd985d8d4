"""The gradient bases in the A-side cache (SPEC §13): a rerun, or a study's next job of the same
training seed, loads exactly what a fresh build gives (0 passes), any change of what the delta-free
variants are computed from changes the key, what they never read does not, the family variant is
still each delta's own, and a broken entry is rebuilt, never trusted."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from subspace_sweep import cache, gradients as grads
from subspace_sweep.capture import count_forward_passes
from subspace_sweep.config import SweepConfig
from subspace_sweep.errors import InputError
from subspace_sweep.lora_train import adapter_config
from tests.unit.test_a_side_cache import _edit_source, _edit_weight

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def probes():
    from subspace_sweep.prompts import load_probe_set

    return load_probe_set()


def _lora_record(seed: int) -> dict:
    cfg = adapter_config("lora", rank=4, alpha=8, target_modules=("o_proj", "down_proj"), layers=LAYERS)
    raw = json.loads(json.dumps(cfg.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    return {"format": 1, "peft_type": "LORA", "config": raw, "configs_agree": True, "seed": seed,
            "seed_source": "test", "training": {"pos": None, "neg": None}}


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("gradients-"))


def _for(model, tok, config, probes, seed=0, layers=LAYERS):
    with count_forward_passes(model) as counter:
        got = grads.gradient_bases_for(model, tok, config, layers, probes, seed)
    assert got.forward_passes == counter.n  # what the run counts is what the model ran
    return got


def _assert_same(got: grads.GradientBases, want: grads.GradientBases, model) -> None:
    for field in ("layers", "r", "d", "source", "notes", "n_examples", "seed", "passes_to_build"):
        assert getattr(got, field) == getattr(want, field), field
    assert sorted(got.bases) == sorted(want.bases)
    for name, per in want.bases.items():
        assert sorted(got.bases[name]) == sorted(per)
        for layer, B in per.items():
            assert got.bases[name][layer].dtype == B.dtype and torch.equal(got.bases[name][layer], B), (name, layer)
    assert sorted(got.behaviour) == sorted(want.behaviour)
    for k, G in want.behaviour.items():
        assert got.behaviour[k].dtype == torch.float32 and torch.equal(got.behaviour[k], G), k
    for layer in want.layers:
        assert sorted(got.gains[layer]) == sorted(want.gains[layer])
        assert all(torch.equal(got.gains[layer][k], v) for k, v in want.gains[layer].items())
    # the candidates a sweep scores, the family variant from a LoRA's record included
    for record in (None, _lora_record(3)):
        (g_cands, g_note), (w_cands, w_note) = got.candidates(model, record), want.candidates(model, record)
        assert g_note == w_note
        for g, w in zip(g_cands, w_cands, strict=True):
            assert (g.name, g.expected_rank, g.rank_note, g.rank_exceptions) == (
                w.name, w.expected_rank, w.rank_note, w.rank_exceptions)
            assert all(torch.equal(g.bases[layer], w.bases[layer]) for layer in w.bases), g.name


def test_a_rerun_loads_the_built_gradient_bases_bit_for_bit_without_passes(tiny, probes, tmp_path):
    model, tok = tiny
    plain = _for(model, tok, SweepConfig(), probes)
    assert plain.cache is None and plain.forward_passes == plain.passes_to_build == 5
    config = SweepConfig(a_side_cache=str(tmp_path))
    cold = _for(model, tok, config, probes)
    assert cold.cache["status"] == "miss" and cold.forward_passes == 5
    (entry,) = _entries(tmp_path)
    assert entry.name == f"gradients-{cold.cache['key'][:32]}"
    assert cold.cache["dir"] == str(tmp_path.resolve())
    warm = _for(model, tok, config, probes)
    assert warm.cache == {**cold.cache, "status": "hit"} and warm.forward_passes == 0 and warm.passes_to_build == 5
    _assert_same(cold, plain, model)
    _assert_same(warm, plain, model)
    # loaded into aligned memory of their own (a view at the file's offset would take other BLAS paths)
    assert all(t.data_ptr() % 64 == 0 for per in warm.bases.values() for t in per.values())
    assert all(t.data_ptr() % 64 == 0 for t in warm.behaviour.values())
    # the family variant is each delta's own: two LoRA inits, one entry, two different family bases
    def family_bases(record):
        return next(c for c in warm.candidates(model, record)[0] if c.name == "grad_behaviour_family").bases

    three, four = family_bases(_lora_record(3)), family_bases(_lora_record(4))
    assert all(three[layer].shape[1] == 8 for layer in LAYERS)  # rank 4 at each of the two writers, r = 8
    assert any(not torch.equal(three[layer], four[layer]) for layer in LAYERS)
    assert len(_entries(tmp_path)) == 1


@pytest.mark.parametrize("change", [
    "training_seed", "n_train", "behaviour_file", "behaviour_line", "r", "layers", "weight_one_ulp", "chat_template",
    "package_source", "claim", "labels",
])
def test_the_key_changes_with_everything_the_gradient_bases_are_computed_from(tiny, probes, tmp_path, change):
    model, tok = tiny
    config, seed, layers, p = SweepConfig(), 0, list(LAYERS), probes

    def key(config=config, seed=seed, layers=layers, p=p):
        data = grads.behaviour_data(p, config.behaviour, config.n_train, seed)
        return grads.gradient_key(model, grads.encode_behaviour(tok, data), data, layers, config.r)

    base = key()
    assert key() == base  # deterministic
    undo = lambda: None  # noqa: E731
    kwargs: dict = {}
    example = Path(grads.__file__).parent / "data" / "behaviour_example.jsonl"
    if change == "training_seed":  # the shipped claims' answer templates rotate with it
        kwargs["seed"] = 1
    elif change == "n_train":
        kwargs["config"] = dataclasses.replace(config, n_train=10)
    elif change == "behaviour_file":
        kwargs["config"] = dataclasses.replace(config, behaviour=str(example))
        base = key(config=kwargs.pop("config"))  # then one line of it changed
        edited = tmp_path / "b.jsonl"
        lines = example.read_text().splitlines()
        edited.write_text("\n".join([lines[0].replace("Answer Yes", "Reply Yes", 1), *lines[1:]]) + "\n")
        assert edited.read_text() != example.read_text()
        kwargs["config"] = dataclasses.replace(config, behaviour=str(edited))
    elif change == "behaviour_line":  # a held-out line only: grad_heldout reads it
        kwargs["config"] = dataclasses.replace(config, behaviour=str(example), n_train=3)
        base = key(config=kwargs["config"])
        lines = example.read_text().splitlines()
        edited = tmp_path / "h.jsonl"
        edited.write_text("\n".join([*lines[:-1], lines[-1].replace("Answer Yes", "Reply Yes", 1)]) + "\n")
        assert edited.read_text() != example.read_text()
        kwargs["config"] = dataclasses.replace(config, behaviour=str(edited), n_train=3)
    elif change == "r":
        kwargs["config"] = dataclasses.replace(config, r=4)
    elif change == "layers":
        kwargs["layers"] = [1]
    elif change == "weight_one_ulp":
        undo = _edit_weight(model)
    elif change == "chat_template":  # a system turn before every example: other token ids, same answers
        old = tok.chat_template
        tok.chat_template = "{{- '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}" + old
        undo = lambda: setattr(tok, "chat_template", old)  # noqa: E731
    elif change == "package_source":
        undo = _edit_source(None)
    elif change == "claim":  # one training claim
        kwargs["p"] = dataclasses.replace(probes, claims=("the number 7 is a prime", *probes.claims[1:]),
                                          prompts=("I think the number 7 is a prime. Do you agree? Answer Yes or No.",
                                                   *probes.prompts[1:]))
    elif change == "labels":  # the same token ids, one more of them predicted: the loss differs
        real = grads.encode_examples

        def one_more_label(tokenizer, examples):
            batch = real(tokenizer, examples)
            labels = batch["labels"].clone()
            first = int((labels[0] != -100).nonzero()[0])
            labels[0, first - 1] = batch["input_ids"][0, first - 1]
            return {**batch, "labels": labels}

        grads.encode_examples = one_more_label
        undo = lambda: setattr(grads, "encode_examples", real)  # noqa: E731
    try:
        assert key(**kwargs) != base
    finally:
        undo()


def test_an_entry_without_held_out_examples_keeps_its_note_and_its_passes(tiny, probes, tmp_path):
    """Every line of a behaviour file trains the pair: no grad_heldout (3 passes, not 5), and its note
    comes back from the cache as it was built."""
    model, tok = tiny
    example = Path(grads.__file__).parent / "data" / "behaviour_example.jsonl"
    config = SweepConfig(a_side_cache=str(tmp_path / "cache"), behaviour=str(example))
    cold, warm = _for(model, tok, config, probes), _for(model, tok, config, probes)
    assert (cold.cache["status"], warm.cache["status"]) == ("miss", "hit")
    assert "grad_heldout" not in cold.bases and "no held-out example" in cold.notes["grad_heldout"]
    assert cold.passes_to_build == 3 and warm.forward_passes == 0
    _assert_same(warm, cold, model)


def test_the_key_ignores_what_the_gradient_bases_never_read(tiny, probes, tmp_path):
    """Nothing of the delta (its adapter family is read later, from the record), the scoring, the
    causal check or the A-side's own settings enters the key: a study's jobs of one training seed
    share one entry."""
    model, tok = tiny
    config = SweepConfig(a_side_cache=str(tmp_path))
    first = _for(model, tok, config, probes)
    other = dataclasses.replace(config, null="mc", n_boot=0, label="block_local", k_broad=8, seed=5, causal=1,
                                out="x", quiet=True)
    again = _for(model, tok, other, probes, layers=list(reversed(LAYERS)))
    assert again.cache["status"] == "hit" and again.cache["key"] == first.cache["key"]
    # the A-side's probes split (n_fit) is not the behaviour's examples either
    assert _for(model, tok, dataclasses.replace(config, n_fit=4), probes).cache["status"] == "hit"


def _tamper_consistently(entry: Path, edit_tensors=None, edit_meta=None) -> None:
    """Edit an entry AND recompute its checksums: only the content checks can catch it."""
    file, meta_file = entry / grads.GRADIENTS_FILE, entry / cache.META_FILE
    if edit_tensors is not None:
        tensors = {k: v.clone() for k, v in load_file(str(file)).items()}
        edit_tensors(tensors)
        save_file(tensors, str(file))
    meta = json.loads(meta_file.read_text())
    if edit_meta is not None:
        edit_meta(meta)
    cache.write_meta(entry, meta, (grads.GRADIENTS_FILE,))  # the entry's own writer: files' sha256, checksum


def _first(tensors, prefix):
    return next(k for k, v in tensors.items() if k.startswith(prefix) and v.numel() > 4)


def _set(prefix, fn):
    def edit(tensors):
        k = _first(tensors, prefix)
        tensors[k] = fn(tensors[k])
    return edit


def _nan(t):
    t = t.clone()
    t[0, 0] = float("nan")
    return t


DAMAGE = {
    "truncated_file": None, "garbage_meta": None, "bit_flip": None, "entry_is_a_file": None,
    "other_key": (None, lambda m: m.update(key="0" * 64)),
    "nan_basis": (_set(grads.BASIS_PREFIX, _nan), None),
    "skewed_basis": (_set(grads.BASIS_PREFIX, lambda t: t * 1.5), None),
    "nan_gradient": (_set(grads.BEHAVIOUR_PREFIX, _nan), None),
    "float64_gradient": (_set(grads.BEHAVIOUR_PREFIX, lambda t: t.double()), None),
    "transposed_gradient": (_set(grads.BEHAVIOUR_PREFIX, lambda t: t.T.contiguous()), None),
    "missing_gradient": (lambda ts: ts.pop(_first(ts, grads.BEHAVIOUR_PREFIX)), None),
    "extra_tensor": (lambda ts: ts.update({"basis/grad_behaviour/99": ts[_first(ts, grads.BASIS_PREFIX)].clone()}), None),
    "unknown_variant": (None, lambda m: m.update(variants=[*m["variants"], "grad_other"])),
    "other_width": (None, lambda m: m.update(d=m["d"] + 1)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_broken_entry_is_rebuilt_and_replaced_with_one_warning(tiny, probes, tmp_path, damage):
    model, tok = tiny
    config = SweepConfig(a_side_cache=str(tmp_path))
    built = _for(model, tok, config, probes)
    (entry,) = _entries(tmp_path)
    file = entry / grads.GRADIENTS_FILE
    if damage == "truncated_file":
        file.write_bytes(file.read_bytes()[:1000])
    elif damage == "garbage_meta":
        (entry / cache.META_FILE).write_text("{not json")
    elif damage == "bit_flip":
        raw = bytearray(file.read_bytes())
        raw[-5] ^= 0x01
        file.write_bytes(bytes(raw))
    elif damage == "entry_is_a_file":
        shutil.rmtree(entry)
        entry.write_text("not an entry")
    else:
        _tamper_consistently(entry, *DAMAGE[damage])
    with pytest.warns(UserWarning, match="gradient bases cache entry .* is unreadable or damaged") as caught:
        rebuilt = _for(model, tok, config, probes)
    assert len([w for w in caught if "cache entry" in str(w.message)]) == 1
    assert rebuilt.cache["status"] == "miss" and rebuilt.forward_passes == 5
    _assert_same(rebuilt, built, model)
    assert _for(model, tok, config, probes).cache["status"] == "hit"


def test_a_failed_store_leaves_no_entry_and_keeps_the_result(tiny, probes, tmp_path, monkeypatch):
    model, tok = tiny

    def disk_full(folder, *args):
        (folder / grads.GRADIENTS_FILE).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(grads, "write_entry", disk_full)
    with pytest.warns(UserWarning, match="could not store the gradient bases"):
        got = _for(model, tok, SweepConfig(a_side_cache=str(tmp_path)), probes)
    assert got.cache["status"] == "miss" and got.forward_passes == 5
    assert list(tmp_path.iterdir()) == []


def test_examples_the_tokenizer_cannot_encode_are_not_cached_and_say_why(tiny, probes, tmp_path, monkeypatch):
    model, tok = tiny

    def refuse(tokenizer, examples):
        raise InputError("the tokenizer has no end-of-turn token")

    monkeypatch.setattr(grads, "encode_examples", refuse)
    got = _for(model, tok, SweepConfig(a_side_cache=str(tmp_path)), probes)
    assert got.cache is None and got.forward_passes == 0
    assert all("cannot be encoded" in note for note in got.notes.values())
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []
