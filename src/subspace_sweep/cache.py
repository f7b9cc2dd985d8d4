"""The on-disk cache of delta-free work (``run --a-side-cache DIR``): one mechanism for its entries.

Two kinds of entry share a cache folder: the A-side (``a_side.py``: the 43 bases from the weights and
the prompts' activations) and the gradient bases (``gradients.py``: the base model's loss gradient on
the behaviour's examples). Each is stored under a key that hashes everything it is computed from:
what every entry shares (``environment_key_inputs``: this package's source, the installed versions,
torch's build, threads and the CPU, the model's weights, config, dtype and device) and what the kind
adds (its inputs' token ids, r, the layers, ...). ``cached`` is the one lookup: an entry that loads
and verifies is a hit; one that fails (its metadata's checksum or recorded key, a file's sha256, a
tensor's shape or values) or is not a folder is rebuilt and replaced, with one warning; a new entry
is published like a run folder (``publish.write_folder``: staged, renamed into place; what a killed
store left is deleted by the next use of the cache). A store that fails keeps the result, with a
warning: only the next run is slower. Delete the folder to clear the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file

from . import publish
from .arch import architecture_of
from .errors import InputError
from .model import model_device, state_dict_sha256
from .provenance import package_versions, sha256_file, verify_record, write_record

META_FILE = "meta.json"
CHECKSUM_FIELD = "meta_sha256"  # the metadata's own checksum
#: A stored basis must be orthonormal like every basis the sweep builds (SPEC §4).
ORTHONORMAL_TOL = 1e-4

T = TypeVar("T")


def cached(root: str | os.PathLike, kind: str, key: str, *, load: Callable[[Path], T], build: Callable[[], T],
           write: Callable[[Path, T], None], what: str) -> tuple[T, str]:
    """(the entry ``kind-<key>`` of the cache folder ``root`` loaded by ``load``, "hit"), or, when it is
    absent or fails ``load`` (any exception: with one warning naming it), (``build()``, "miss"),
    stored there by ``write`` into a staging folder published under the entry's name."""
    root = Path(root).expanduser()
    for line in publish.recover(root):  # what a killed store left: its staging goes
        warnings.warn(line, stacklevel=3)
    entry = root / f"{kind}-{key[:32]}"
    if os.path.lexists(entry):
        try:
            return load(entry), "hit"
        except Exception as exc:  # noqa: BLE001 - any entry that fails verification is rebuilt, never trusted
            why = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")[:300]
            warnings.warn(f"{what} cache entry {entry} is unreadable or damaged ({type(exc).__name__}: {why}); "
                          "rebuilding and replacing it", stacklevel=3)
    built = build()
    try:
        root.mkdir(exist_ok=True)
        # The cache folder is this tool's: whatever sits under an entry's name (a broken entry, a
        # file) is replaced, through the same staged rename as every output.
        publish.write_folder(entry, lambda tmp: write(tmp, built), overwrite=True, snapshot=None,
                             replaceable=lambda _: True, what="--a-side-cache entry", label="cache")
    except (OSError, InputError) as exc:  # the sweep's results stand; only the next run is slower
        warnings.warn(f"could not store the {what} in {root} ({exc!r})", stacklevel=3)
    return built, "miss"


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


# ------------------------------------------------------------------------------- keys


def key_of(inputs: dict) -> str:
    return sha256_text(json.dumps(inputs, sort_keys=True))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def environment_key_inputs(model, model_sha256: str | None = None) -> dict:
    """What every entry's value depends on besides its own inputs: the code, the numerics (versions,
    torch's build and threads, the CPU: BLAS kernels and thread partitioning change last bits) and the
    model (``model_sha256``: its ``state_dict_sha256`` when the caller has it already)."""
    device = model_device(model)
    return {
        "package_source_sha256": package_source_sha256(),
        "package_versions": package_versions(),
        "torch_config_sha256": sha256_text(torch.__config__.show()),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "model_sha256": model_sha256 or state_dict_sha256(model),
        "model_config_sha256": model_config_sha256(model),
        "architecture": repr(architecture_of(model.config)),  # where the table says the modules and norms are
        "attn_implementation": str(getattr(model.config, "_attn_implementation", None)),
        "model_dtype": str(next(model.parameters()).dtype),
        "device": str(device) + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
    }


def model_config_sha256(model) -> str:
    """The architecture's config, without where it was loaded from (a moved folder is the same model)."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    return sha256_text(json.dumps(config, sort_keys=True, default=str))


def tokens_sha256(batches: dict[str, dict[str, torch.Tensor]], parts: tuple[str, ...]) -> str:
    """sha256 of the named batches' integer tensors ``parts`` (shape and values), in name order."""
    h = hashlib.sha256()
    for name in sorted(batches):
        for part in parts:
            t = batches[name][part].to(torch.int64).contiguous()
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
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip()


# ------------------------------------------------------------------------------- entries


def write_meta(folder: Path, meta: dict, files: tuple[str, ...]) -> None:
    """``meta`` with the sha256 of each of ``files`` (already in ``folder``) and its own checksum, as
    ``folder/meta.json`` (``read_meta`` verifies both)."""
    write_record(folder / META_FILE, {**meta, "files_sha256": {name: sha256_file(folder / name) for name in files}},
                 CHECKSUM_FIELD)


def read_meta(folder: Path, key: str, fmt: int) -> dict:
    """The verified metadata of the entry ``folder``: ValueError when it is not a folder, when the
    metadata's own checksum or a recorded file's sha256 does not match, or when it records another key
    or format (``provenance.verify_record``)."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    return verify_record(folder / META_FILE, CHECKSUM_FIELD, {"format": fmt, "key": key}, "key or format")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each in its own freshly allocated (64-byte aligned) memory:
    ``load_file`` hands out views at the file's offsets, and BLAS takes other code paths on unaligned
    data, so a product of a loaded tensor could differ in its last bits from the same product of the
    tensor that was stored (found on the gradient bases' family variant)."""
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def check_basis(name: str, B: torch.Tensor, d: int | None) -> None:
    """ValueError unless ``B`` is a finite orthonormal d x r float matrix (r may be 0)."""
    if B.ndim != 2 or not B.is_floating_point() or (d is not None and B.shape[0] != d):
        raise ValueError(f"basis {name} has shape {tuple(B.shape)} and dtype {B.dtype}, not d x r floats (d = {d})")
    if not bool(torch.isfinite(B).all()):
        raise ValueError(f"basis {name} holds NaN or Inf entries")
    if B.shape[1]:
        B64 = B.to(torch.float64)
        err = float((B64.T @ B64 - torch.eye(B.shape[1], dtype=torch.float64)).abs().max())
        if err > ORTHONORMAL_TOL:
            raise ValueError(f"basis {name} is not orthonormal (max |BᵀB − I| = {err:.2e})")
