"""The A-side of a sweep, built or loaded from an on-disk cache.

The A-side (the 43 candidate bases of SPEC §4) is a function of the base model and the prompts
only, never of the delta. A researcher who reruns the sweep daily with a new delta on the same
base model would repeat the same three forward passes and the same ~30 CPU-seconds of dense
linear algebra every time. With a cache folder (``run --a-side-cache DIR``) the A-side is stored
under a key that hashes everything it is computed from, and a rerun loads it instead: 0 forward
passes, the same bits (a test pins cached against freshly built runs byte for byte).

The key covers the model's weights (``state_dict_sha256``), config, dtype and device; the exact
token ids of the three A-side conditions (so the tokenizer, chat template, probes and personas);
r, K, the layers and the seed; this package's source files; the installed package versions,
torch's build configuration, its thread count and the CPU (BLAS kernels and thread partitioning
change last bits). An entry is verified when it is loaded (``load_entry``: its metadata's own
checksum and recorded key, the sha256 of its bases file, every basis a finite orthonormal d x r
matrix, every definition this package's); one that fails, or that is not a folder, is rebuilt and
replaced, with one warning. Entries are published like run folders (``publish.write_folder``:
staged, renamed into place; a killed store's staging is deleted by the next use of the cache);
delete the folder to clear the cache.

The gradient bases (SPEC §13, ``gradients.py``) are not part of it: their family variant depends on
the delta's adapter record, and the others are rebuilt by every sweep (5 forward and backward passes).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import publish
from .candidates import A_SIDE_NAMES, Candidate, build_a_side, get_spec
from .capture import a_side_conditions, capture_activations, count_forward_passes, encode
from .arch import architecture_of
from .config import SweepConfig
from .errors import InputError
from .model import attention_sink_token_id, extract_base_weights, model_device, state_dict_sha256
from .outliers import coordinate_rms
from .prompts import ProbeSet
from .provenance import package_versions, sha256_file

#: Bump when the entry layout changes (the package source is in the key already).
CACHE_FORMAT = 3  # 2: checksums of the metadata and the bases file; 3: the coordinate RMS per layer
#: The bases file's tensors of the coordinate RMS, one per layer (not a candidate's).
RMS_PREFIX = "__coordinate_rms__/"
BASES_FILE = "bases.safetensors"
META_FILE = "meta.json"


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
    (and stored there when a cache folder is set)."""
    if config.a_side_cache is None:
        return _build(model, tokenizer, config, layers, probes)
    t0 = time.perf_counter()
    root = Path(config.a_side_cache).expanduser()
    for line in publish.recover(root):  # what a killed store left: its staging goes
        warnings.warn(line, stacklevel=2)
    inputs = a_side_key_inputs(model, tokenizer, config, layers, probes)
    key = key_of(inputs)
    entry = root / f"a_side-{key[:32]}"
    # The weights' digest rides along so that the run's manifest need not hash them again.
    info = {"dir": str(root.resolve()), "key": key, "model_sha256": inputs["model_sha256"]}
    if os.path.lexists(entry):
        try:
            loaded = load_entry(entry, key, d=int(model.config.hidden_size))
        except Exception as exc:  # noqa: BLE001 - any entry that fails verification is rebuilt, never trusted
            why = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")[:300]
            warnings.warn(f"A-side cache entry {entry} is unreadable or damaged ({type(exc).__name__}: {why}); "
                          "rebuilding and replacing it", stacklevel=2)
        else:
            loaded.build_seconds = time.perf_counter() - t0
            loaded.cache = {**info, "status": "hit"}
            return loaded
    key_seconds = time.perf_counter() - t0
    built = _build(model, tokenizer, config, layers, probes)
    built.cache = {**info, "status": "miss"}
    t1 = time.perf_counter()
    try:
        root.mkdir(exist_ok=True)
        # The cache folder is this tool's: whatever sits under an entry's name (a broken entry, a
        # file) is replaced, through the same staged rename as every output.
        publish.write_folder(entry, lambda tmp: write_entry(tmp, built, key), overwrite=True, snapshot=None,
                             replaceable=lambda _: True, what="--a-side-cache entry", label="cache")
    except (OSError, InputError) as exc:  # the sweep's results stand; only the next run is slower
        warnings.warn(f"could not store the A-side in {root} ({exc!r})", stacklevel=2)
    built.build_seconds += key_seconds + time.perf_counter() - t1
    return built


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


def check_cache_dir(path: str | os.PathLike) -> None:
    """Fail before any work when the cache folder cannot be used (nothing is created here)."""
    root = Path(path).expanduser()
    if root.exists():
        if not root.is_dir():
            raise InputError(f"--a-side-cache {path} exists and is not a folder")
        if not os.access(root, os.W_OK):
            raise InputError(f"--a-side-cache {path} is not writable")
        return
    parent = root.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"--a-side-cache {path}: parent folder {parent} does not exist or is not writable")


# ------------------------------------------------------------------------------- the key


def a_side_key(model, tokenizer, config: SweepConfig, layers: Sequence[int], probes: ProbeSet) -> str:
    """sha256 of everything the A-side is computed from (see the module docstring)."""
    return key_of(a_side_key_inputs(model, tokenizer, config, layers, probes))


def key_of(inputs: dict) -> str:
    return _sha256(json.dumps(inputs, sort_keys=True))


def a_side_key_inputs(model, tokenizer, config: SweepConfig, layers: Sequence[int], probes: ProbeSet) -> dict:
    device = model_device(model)
    d = int(model.config.hidden_size)
    return {
        "format": CACHE_FORMAT,
        "package_source_sha256": package_source_sha256(),
        "package_versions": package_versions(),
        "torch_config_sha256": _sha256(torch.__config__.show()),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "model_sha256": state_dict_sha256(model),
        "model_config_sha256": _model_config_sha256(model),
        "architecture": repr(architecture_of(model.config)),  # where the table says the modules and norms are
        "attn_implementation": str(getattr(model.config, "_attn_implementation", None)),
        "model_dtype": str(next(model.parameters()).dtype),
        "device": str(device) + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "inputs_sha256": _inputs_sha256(tokenizer, probes),
        "attention_sink_token_id": attention_sink_token_id(model, tokenizer),
        "r": config.r,
        "k_broad": config.resolved_k_broad(d),
        "layers": [int(x) for x in layers],
        "seed": config.seed,
    }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _model_config_sha256(model) -> str:
    """The architecture's config, without where it was loaded from (a moved folder is the same model)."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    return _sha256(json.dumps(config, sort_keys=True, default=str))


def _inputs_sha256(tokenizer, probes: ProbeSet) -> str:
    """The token ids and masks the three A-side passes feed the model."""
    h = hashlib.sha256()
    for name, (texts, chat) in a_side_conditions(tokenizer, probes).items():
        enc = encode(tokenizer, texts, chat=chat)
        for part in ("input_ids", "attention_mask"):
            t = enc[part].to(torch.int64).contiguous()
            h.update(f"{name}|{part}|{tuple(t.shape)}|".encode())
            h.update(t.numpy())
    return h.hexdigest()


@functools.cache
def package_source_sha256() -> str:
    """sha256 of this package's Python source: a code change invalidates every entry."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for path in sorted(here.rglob("*.py")):
        h.update(f"{path.relative_to(here).as_posix()}|".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip()


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
    meta = {"format": CACHE_FORMAT, "key": key, "layers": a_side.layers, "candidates": metas,
            "files_sha256": {BASES_FILE: sha256_file(folder / BASES_FILE)}}
    meta["meta_sha256"] = _meta_checksum(meta)
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _meta_checksum(meta: dict) -> str:
    """sha256 of the entry's metadata without this checksum (canonical JSON)."""
    return _sha256(json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"}, sort_keys=True))


#: A stored basis must be orthonormal like every basis the sweep builds (SPEC §4).
ORTHONORMAL_TOL = 1e-4


def _check_basis(name: str, B: torch.Tensor, d: int | None) -> None:
    if B.ndim != 2 or not B.is_floating_point() or (d is not None and B.shape[0] != d):
        raise ValueError(f"basis {name} has shape {tuple(B.shape)} and dtype {B.dtype}, not d x r floats (d = {d})")
    if not bool(torch.isfinite(B).all()):
        raise ValueError(f"basis {name} holds NaN or Inf entries")
    if B.shape[1]:
        B64 = B.to(torch.float64)
        err = float((B64.T @ B64 - torch.eye(B.shape[1], dtype=torch.float64)).abs().max())
        if err > ORTHONORMAL_TOL:
            raise ValueError(f"basis {name} is not orthonormal (max |BᵀB − I| = {err:.2e})")


def load_entry(folder: Path, key: str, d: int | None = None) -> ASide:
    """The A-side stored in ``folder``, verified: ValueError when it is not the entry of ``key``,
    when a checksum does not match (the metadata's own, the bases file's sha256), when a basis is
    not a finite orthonormal d x r matrix, or when a candidate's definition is not this package's."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    meta = json.loads((folder / META_FILE).read_text())
    if not isinstance(meta, dict) or meta.get("meta_sha256") != _meta_checksum(meta):
        raise ValueError(f"{folder / META_FILE} does not match its checksum (edited or damaged)")
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        raise ValueError(f"{folder / META_FILE} records another key or format")
    for name, digest in meta["files_sha256"].items():
        if sha256_file(folder / name) != digest:
            raise ValueError(f"{folder / name} does not match the sha256 in {META_FILE} (damaged)")
    tensors = load_file(str(folder / BASES_FILE))
    candidates = []
    used: set[str] = set()
    for m in meta["candidates"]:
        spec = get_spec(m["name"])
        if (m["family"], m["definition"], m["side"]) != (spec.family, spec.definition, "A"):
            raise ValueError(f"{folder / META_FILE}: {m['name']} is not this package's A-side definition")
        layers = [int(x) for x in m["layers"]]
        names = [f"{m['name']}/*"] if m["shared"] else [f"{m['name']}/{layer}" for layer in layers]
        for name in names:
            _check_basis(name, tensors[name], d)
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
