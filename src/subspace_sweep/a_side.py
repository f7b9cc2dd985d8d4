"""The A-side of a sweep, built or loaded from an on-disk cache.

The A-side (the 43 candidate bases of SPEC §4) is a function of the base model and the prompts
only, never of the delta. A researcher who reruns the sweep daily with a new delta on the same
base model would repeat the same three forward passes and the same ~30 CPU-seconds of dense
linear algebra every time. With a cache folder (``run --a-side-cache DIR``) the A-side is stored
under a key that hashes everything it is computed from, and a rerun loads it instead: 0 forward
passes, the same bits (a test pins cached against freshly built runs byte for byte).

The key covers what every cache entry's does (``cache.environment_key_inputs``: the model's
weights, config, dtype and device; this package's source files; the installed package versions,
torch's build configuration, its thread count and the CPU) and the exact token ids of the three
A-side conditions (so the tokenizer, chat template, probes and personas); r, K, the layers and the
seed. An entry is verified when it is loaded (``load_entry``: its metadata's own checksum and
recorded key, the sha256 of its bases file, every basis a finite orthonormal d x r matrix, every
definition this package's); one that fails, or that is not a folder, is rebuilt and replaced, with
one warning (``cache.cached``, the lookup every entry kind shares).

The gradient bases (SPEC §13, ``gradients.py``) are entries of their own in the same folder: they
depend on the behaviour's examples (and the training seed whose answer templates they follow), not
on the prompts' activations.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import cache
from .candidates import A_SIDE_NAMES, Candidate, build_a_side, get_spec
from .capture import a_side_conditions, capture_activations, count_forward_passes, encode
from .config import SweepConfig
from .model import attention_sink_token_id, extract_base_weights
from .outliers import coordinate_rms
from .prompts import ProbeSet

#: Bump when the entry layout changes (the package source is in the key already).
CACHE_FORMAT = 3  # 2: checksums of the metadata and the bases file; 3: the coordinate RMS per layer
#: The bases file's tensors of the coordinate RMS, one per layer (not a candidate's).
RMS_PREFIX = "__coordinate_rms__/"
BASES_FILE = "bases.safetensors"
META_FILE = cache.META_FILE


@dataclass
class ASide:
    """The A-side of a sweep: built from the base model and the prompts only, so it can be
    reused for every delta of the same model (``compare`` over LoRA seeds)."""

    candidates: list[Candidate]
    layers: list[int]
    forward_passes: int
    capture_seconds: float
    build_seconds: float  # base weights + candidate bases (or, from the cache, the key and the load)
    cache: dict[str, str] | None = None  # {"dir", "key", "model_sha256", "status": "hit" | "miss"} with a cache
    #: per layer, each residual coordinate's RMS over the persona captures' real tokens (float64,
    #: (d,)): the scale of the standardized view and the outlier diagnostic (``outliers.py``)
    coordinate_rms: dict[int, torch.Tensor] = field(default_factory=dict)


def build_a_side_for(model, tokenizer, config: SweepConfig, layers: Sequence[int], probes: ProbeSet) -> ASide:
    """The A-side for ``layers``: from ``config.a_side_cache`` when it holds this key, else built
    (and stored there when a cache folder is set; ``cache.cached``)."""
    if config.a_side_cache is None:
        return _build(model, tokenizer, config, layers, probes)
    t0 = time.perf_counter()
    inputs = a_side_key_inputs(model, tokenizer, config, layers, probes)
    key = cache.key_of(inputs)
    d = int(model.config.hidden_size)
    a_side, status = cache.cached(config.a_side_cache, "a_side", key, load=lambda entry: load_entry(entry, key, d=d),
                                  build=lambda: _build(model, tokenizer, config, layers, probes),
                                  write=lambda folder, built: write_entry(folder, built, key), what="A-side")
    # The weights' digest rides along so that the run's manifest (and the gradient bases' key) need not
    # hash them again.
    a_side.cache = {"dir": str(Path(config.a_side_cache).expanduser().resolve()), "key": key,
                    "model_sha256": inputs["model_sha256"], "status": status}
    # a hit costs the key and the load; a miss the key, the build and the store (its captures counted apart)
    a_side.build_seconds = time.perf_counter() - t0 - a_side.capture_seconds
    return a_side


def _build(model, tokenizer, config: SweepConfig, layers: Sequence[int], probes: ProbeSet) -> ASide:
    t0 = time.perf_counter()
    with count_forward_passes(model) as counter:
        # every position only at the layers that get bases (the attention-selected ones read them)
        acts = capture_activations(model, tokenizer, probes, token_layers=layers)
    t1 = time.perf_counter()
    d = int(model.config.hidden_size)
    weights = extract_base_weights(model)
    scales = coordinate_rms(acts, layers)  # (before the token captures are released)
    candidates = build_a_side(weights, acts, r=config.r, k_broad=config.resolved_k_broad(d), layers=layers,
                              seed=config.seed, release_tokens=True)
    return ASide(candidates, list(layers), counter.n, t1 - t0, time.perf_counter() - t1, coordinate_rms=scales)


# ------------------------------------------------------------------------------- the key


def a_side_key(model, tokenizer, config: SweepConfig, layers: Sequence[int], probes: ProbeSet) -> str:
    """sha256 of everything the A-side is computed from (see the module docstring)."""
    return cache.key_of(a_side_key_inputs(model, tokenizer, config, layers, probes))


def a_side_key_inputs(model, tokenizer, config: SweepConfig, layers: Sequence[int], probes: ProbeSet) -> dict:
    d = int(model.config.hidden_size)
    return {
        "format": CACHE_FORMAT,
        **cache.environment_key_inputs(model),
        "inputs_sha256": _inputs_sha256(tokenizer, probes),
        "attention_sink_token_id": attention_sink_token_id(model, tokenizer),
        "r": config.r,
        "k_broad": config.resolved_k_broad(d),
        "layers": [int(x) for x in layers],
        "seed": config.seed,
    }


def _inputs_sha256(tokenizer, probes: ProbeSet) -> str:
    """The token ids and masks the three A-side passes feed the model."""
    return cache.tokens_sha256({name: encode(tokenizer, texts, chat=chat)
                                for name, (texts, chat) in a_side_conditions(tokenizer, probes).items()},
                               ("input_ids", "attention_mask"))


# ------------------------------------------------------------------------------- entries


def write_entry(folder: Path, a_side: ASide, key: str) -> None:
    """Every basis to one safetensors file (a global basis once: it is one tensor at every layer),
    everything else about the candidates to a JSON file, with the sha256 of the bases file and
    its own checksum (``load_entry`` verifies both)."""
    tensors: dict[str, torch.Tensor] = {}
    metas = []
    for c in a_side.candidates:
        first = next(iter(c.bases.values()), None)
        shared = len(c.bases) > 1 and all(B is first for B in c.bases.values())
        if shared:
            tensors[f"{c.name}/*"] = first.contiguous().clone()
        else:
            tensors.update({f"{c.name}/{layer}": B.contiguous().clone() for layer, B in c.bases.items()})
        metas.append({
            "name": c.name, "family": c.family, "definition": c.definition, "side": c.side,
            "layers": sorted(c.bases), "shared": shared, "expected_rank": c.expected_rank,
            "rank_note": c.rank_note,
            "diagnostics": {str(layer): v for layer, v in c.diagnostics.items()},
            "rank_exceptions": {str(layer): v for layer, v in c.rank_exceptions.items()},
        })
    tensors.update({f"{RMS_PREFIX}{layer}": v.contiguous().clone() for layer, v in a_side.coordinate_rms.items()})
    save_file(tensors, str(folder / BASES_FILE))
    cache.write_meta(folder, {"format": CACHE_FORMAT, "key": key, "layers": a_side.layers, "candidates": metas},
                     (BASES_FILE,))


def load_entry(folder: Path, key: str, d: int | None = None) -> ASide:
    """The A-side stored in ``folder``, verified: ValueError when it is not the entry of ``key``,
    when a checksum does not match (the metadata's own, the bases file's sha256), when a basis is
    not a finite orthonormal d x r matrix, or when a candidate's definition is not this package's."""
    meta = cache.read_meta(folder, key, CACHE_FORMAT)
    tensors = cache.load_tensors(folder / BASES_FILE)
    candidates = []
    used: set[str] = set()
    for m in meta["candidates"]:
        spec = get_spec(m["name"])
        if (m["family"], m["definition"], m["side"]) != (spec.family, spec.definition, "A"):
            raise ValueError(f"{folder / META_FILE}: {m['name']} is not this package's A-side definition")
        layers = [int(x) for x in m["layers"]]
        names = [f"{m['name']}/*"] if m["shared"] else [f"{m['name']}/{layer}" for layer in layers]
        for name in names:
            cache.check_basis(name, tensors[name], d)
        used.update(names)
        if m["shared"]:
            B = tensors[names[0]]
            bases = {layer: B for layer in layers}
        else:
            bases = {layer: tensors[name] for layer, name in zip(layers, names)}
        candidates.append(Candidate(
            name=m["name"], family=m["family"], definition=m["definition"], side=m["side"], bases=bases,
            expected_rank=int(m["expected_rank"]), rank_note=m["rank_note"],
            diagnostics={int(k): v for k, v in m["diagnostics"].items()},
            rank_exceptions={int(k): int(v) for k, v in m["rank_exceptions"].items()},
        ))
    if [c.name for c in candidates] != list(A_SIDE_NAMES):
        raise ValueError(f"{folder / META_FILE} does not hold this version's A-side candidates")
    layers = [int(x) for x in meta["layers"]]
    rms = {}
    for layer in layers:
        v = tensors.get(f"{RMS_PREFIX}{layer}")
        if v is None or v.ndim != 1 or (d is not None and v.shape[0] != d) or not bool(torch.isfinite(v).all()) \
                or bool((v < 0).any()):
            raise ValueError(f"{folder / BASES_FILE}: the coordinate RMS of layer {layer} is missing or not a finite "
                             f"non-negative d-vector")
        rms[layer] = v
        used.add(f"{RMS_PREFIX}{layer}")
    if used != set(tensors):
        raise ValueError(f"{folder / BASES_FILE} holds tensors {sorted(set(tensors) - used)[:3]} that no candidate names")
    return ASide(candidates, layers, forward_passes=0, capture_seconds=0.0, build_seconds=0.0, coordinate_rms=rms)
