"""Checks of a command's inputs that need no model weights (issue 14): they run before the
weights load, so a wrong option costs no load and no computation.

- the device: ``--device cuda`` on a torch without CUDA, a CUDA index that is not there,
  ``meta`` (shapes only, no data) and any device torch cannot allocate on;
- a local model folder: config.json present and readable, weight files present with readable
  safetensors headers (a truncated or garbled file), tokenizer files present; its residual width
  and layer count (``ModelShape``) for the checks of ``SweepConfig.validate_for_model``;
- a PEFT adapter folder: adapter_config.json and readable adapter weights.

A model given as an HF id is looked up in the local HF cache only here; when it is not there,
``model.load_model`` says where it looked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .model import _looks_like_path, resolve_device

CONFIG_FILE = "config.json"
#: A saved model's weights: one safetensors file, shards with an index, or torch's .bin files.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_device(device: str | None) -> torch.device:
    """The torch device ``--device`` names, usable for a model; InputError otherwise."""
    dev = resolve_device(device)
    if dev.type == "meta":
        raise InputError(f"--device {device}: the meta device holds shapes, not data; use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise InputError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s), "
                             f"0..{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError, ValueError) as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise InputError(f"--device {device} cannot be used: {first[:200]}") from None
    return dev


@dataclass(frozen=True)
class ModelShape:
    d: int  # residual width (hidden_size)
    n_layers: int
    where: str  # the config it was read from, for messages


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]


def _check_safetensors(path: Path, what: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{what}: {path} is not a readable safetensors file ({_first_line(e)})") from None


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{what}: {path} cannot be read as JSON ({_first_line(e)})") from None


def check_model_folder(folder: Path) -> None:
    """The files a model folder needs, before any weight is read."""
    what = f"model folder {folder}"
    if not (folder / CONFIG_FILE).is_file():
        raise InputError(f"{what} has no {CONFIG_FILE}; give a folder written by save_pretrained")
    config = _read_json(folder / CONFIG_FILE, what)
    # An unsupported architecture is refused from its config alone (SPEC §9), before its weights
    from types import SimpleNamespace

    from .arch import architecture_of

    if isinstance(config, dict) and "model_type" in config:  # (a config without one is refused below)
        architecture_of(SimpleNamespace(model_type=config["model_type"]))
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise InputError(f"{what} has no weights ({', '.join(WEIGHT_FILES)})")
    for name in present:
        if name.endswith(".index.json"):
            index = _read_json(folder / name, what)
            shards = sorted(set(index.get("weight_map", {}).values())) if isinstance(index, dict) else []
            if not shards:
                raise InputError(f"{what}: {folder / name} lists no weight files")
            for shard in shards:
                if not (folder / shard).is_file():
                    raise InputError(f"{what}: {shard}, listed in {name}, is missing")
                if shard.endswith(".safetensors"):
                    _check_safetensors(folder / shard, what)
        elif name.endswith(".safetensors"):
            _check_safetensors(folder / name, what)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{what} has no tokenizer ({', '.join(TOKENIZER_FILES)})")


def model_shape(model: str) -> ModelShape | None:
    """The residual width and layer count of ``--model`` from its config alone (a local folder is
    checked by ``check_model_folder`` first); None for an HF id that is not in the local cache."""
    from transformers import AutoConfig

    from .gguf_models import is_gguf_source
    from .gguf_models import model_shape as gguf_shape

    name = str(model)
    if not name.strip():
        raise InputError("--model is empty; give an HF id, a model folder or a GGUF file")
    if is_gguf_source(name):
        return ModelShape(*gguf_shape(name))
    path = Path(name).expanduser()
    local = path.is_dir()
    if local:
        check_model_folder(path)
    elif path.exists():
        raise InputError(f"model path {path} is a file; give a model folder (config.json + weights) or an HF id")
    elif _looks_like_path(name):
        raise InputError(f"model folder {path} does not exist")
    try:
        config = AutoConfig.from_pretrained(str(path) if local else name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        if local:
            raise InputError(f"model folder {path}: {CONFIG_FILE} is not a usable model config ({_first_line(e)})") from None
        return None  # not in the local cache: load_model reports where it looked
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d, n_layers = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
    where = f"{path / CONFIG_FILE}" if local else f"the config of {name}"
    if not isinstance(d, int) or not isinstance(n_layers, int) or d < 1 or n_layers < 1:
        raise InputError(f"{where} has no positive hidden_size / num_hidden_layers ({d!r}, {n_layers!r})")
    return ModelShape(d, n_layers, where)


def check_adapter_folder(folder: str | Path, what: str) -> None:
    """A PEFT adapter folder: adapter_config.json (JSON) and readable adapter weights."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InputError(f"{what} {folder} is not a folder (a PEFT adapter folder holds {ADAPTER_CONFIG})")
    if not (path / ADAPTER_CONFIG).is_file():
        raise InputError(f"{what} {folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    _read_json(path / ADAPTER_CONFIG, f"{what} {folder}")
    present = [name for name in ADAPTER_WEIGHTS if (path / name).is_file()]
    if not present:
        raise InputError(f"{what} {folder} has no adapter weights ({', '.join(ADAPTER_WEIGHTS)})")
    if present[0].endswith(".safetensors"):
        _check_safetensors(path / present[0], f"{what} {folder}")
