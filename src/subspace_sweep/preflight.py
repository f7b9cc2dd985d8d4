"""Checks of a command's inputs that need no model weights (issue 14): they run before the
weights load, so a wrong option costs no load and no computation.

Each command's whole sequence of such checks, in order, is one function here (issue 26):
``check_run`` (run, demo), ``check_delta_command`` (delta), ``check_train`` (train). The checks
themselves stay beside what they check; this module owns their order and the promise that nothing
is loaded before them. The checks of the inputs themselves:

- the device: ``--device cuda`` on a torch without CUDA, a CUDA index that is not there,
  ``meta`` (shapes only, no data) and any device torch cannot allocate on;
- a local model folder: config.json present and readable, weight files present with readable
  safetensors headers (a truncated or garbled file), tokenizer files present; its residual width
  and layer count (``ModelShape``) for the checks of ``SweepConfig.validate_for_model``;
- a PEFT adapter folder: adapter_config.json and readable adapter weights;
- a GGUF source (a ``.gguf`` file or a known name): its header (``gguf_models.model_shape``).
- whether the model has a chat template (``ModelShape.chat_template``: a folder's
  tokenizer_config.json or chat_template file, a GGUF's ``tokenizer.chat_template``): without one
  (a base model) the causal check and ``train`` ask it in the plain-text format of SPEC §8, which
  is decided here, before any conversion or load.

A model given as an HF id is looked up in the local HF cache only here; when it is not there,
``model.load_model`` says where it looked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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
#: peft's prompt-learning adapter types: they add virtual tokens or a prefix to every input and
#: change no weight, so there is no merged model and no w (issue 26).
PROMPT_LEARNING_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT",
                         "CPT")
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


#: transformers' config names of the sizes that give each projection's shape (``projection_dims``).
SIZE_NAMES = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


@dataclass(frozen=True)
class ModelShape:
    d: int  # residual width (hidden_size)
    n_layers: int
    where: str  # the config it was read from, for messages
    sizes: Mapping[str, int | None] | None = None  # ``SIZE_NAMES`` as the config or GGUF header gives them
    chat_template: bool | None = None  # None: not known before the load (an HF id)

    def projection_dims(self) -> dict[str, tuple[int, int]] | None:
        """(out, in) of each projection an adapter may target, from the config's sizes (head_dim
        defaults to d / heads, the kv heads to the heads, as transformers reads them); None when
        the config gives no FFN width or head count."""
        s = dict(self.sizes or {})
        ffn, heads = s.get("intermediate_size"), s.get("num_attention_heads")
        if not isinstance(ffn, int) or not isinstance(heads, int) or ffn < 1 or heads < 1:
            return None
        kv = s.get("num_key_value_heads") or heads
        head_dim = s.get("head_dim") or self.d // heads
        q, k, d = heads * head_dim, kv * head_dim, self.d
        return {"q_proj": (q, d), "k_proj": (k, d), "v_proj": (k, d), "o_proj": (d, q),
                "gate_proj": (ffn, d), "up_proj": (ffn, d), "down_proj": (d, ffn)}

    @property
    def answer_format(self) -> str | None:
        """How the model is asked where it answers (``causal.answer_form``): "chat" or "plain"."""
        return None if self.chat_template is None else "chat" if self.chat_template else "plain"


#: Where a saved tokenizer keeps its chat template: a key of tokenizer_config.json, or a file of its own.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def folder_chat_template(folder: Path) -> bool:
    """Whether a saved model folder's tokenizer has a chat template (what ``AutoTokenizer`` would
    load as ``chat_template``), from its files alone."""
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    data = _read_json(config, f"model folder {folder}")
    return isinstance(data, dict) and bool(data.get("chat_template"))


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
        d, n_layers, where, templated, sizes = gguf_shape(name)
        return ModelShape(d, n_layers, where, sizes, templated)
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
        near = _near_known_name(name)
        if near is not None:  # a typo of a known name, not an HF id: no hub, no connection talk
            raise InputError(f"--model {name}: not a known model name, a model folder, a .gguf file or an HF id in "
                             f"the local cache; did you mean {near}?") from None
        return None  # not in the local cache: load_model reports where it looked
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d, n_layers = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
    where = f"{path / CONFIG_FILE}" if local else f"the config of {name}"
    if not isinstance(d, int) or not isinstance(n_layers, int) or d < 1 or n_layers < 1:
        raise InputError(f"{where} has no positive hidden_size / num_hidden_layers ({d!r}, {n_layers!r})")
    sizes = {k: v if isinstance(v := getattr(text, k, None), int) and v > 0 else None for k in SIZE_NAMES}
    return ModelShape(d, n_layers, where, sizes, folder_chat_template(path) if local else None)


def _near_known_name(name: str) -> str | None:
    """The known GGUF name (``gguf_models.KNOWN_MODELS``) that ``name`` is a near miss of, if any."""
    import difflib

    from .gguf_models import KNOWN_MODELS

    found = difflib.get_close_matches(name.strip().lower(), list(KNOWN_MODELS), n=1, cutoff=0.8)
    return found[0] if found else None


def check_adapter_folder(folder: str | Path, what: str) -> None:
    """A PEFT adapter folder: adapter_config.json (JSON) and readable adapter weights."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InputError(f"{what} {folder} is not a folder (a PEFT adapter folder holds {ADAPTER_CONFIG})")
    if not (path / ADAPTER_CONFIG).is_file():
        raise InputError(f"{what} {folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    config = _read_json(path / ADAPTER_CONFIG, f"{what} {folder}")
    peft_type = str(config.get("peft_type", "")).upper() if isinstance(config, dict) else ""
    if peft_type in PROMPT_LEARNING_TYPES:
        raise InputError(f"{what} {folder} is a {peft_type} adapter: prompt-learning adapters prepend virtual tokens and "
                         "change no weight, so they cannot be merged into a weight delta w")
    present = [name for name in ADAPTER_WEIGHTS if (path / name).is_file()]
    if not present:
        raise InputError(f"{what} {folder} has no adapter weights ({', '.join(ADAPTER_WEIGHTS)})")
    if present[0].endswith(".safetensors"):
        _check_safetensors(path / present[0], f"{what} {folder}")


# ------------------------------------------------------------------------------- the sequences
# Each command's checks that need no weights, in the order they run, in one function per command:
# the promise "bad input costs no load and writes nothing" lives here. The checks themselves stay
# beside what they check (SweepConfig.validate, publish.check_destination, delta.load_delta, ...);
# each sequence imports them when it runs (the A-side's and training's modules are heavy to import).


@dataclass
class RunInputs:
    """What ``check_run`` read and checked, for the load and the sweep."""

    probes: object  # ProbeSet
    shape: ModelShape | None  # None: an HF id outside the local cache (load_model says where it looked)
    snapshot: object | None  # publish.Snapshot of --out
    names: list[str]  # the run folders' names (the deltas' file stems)
    deltas: list[dict]
    centres: list[dict | None]  # the pairs' midpoint offsets (where the files store them): the pair's geometry, and --causal-centre midpoint (required) or auto
    adapters: list[dict | None]  # the pairs' adapter records (``delta.load_adapter_record``), for the gradient bases


def check_run(config, deltas, snapshot=None) -> RunInputs:
    """Every check of ``run`` (and ``demo``) that needs no weights, in order: first what a killed
    run left in --out's folder is cleaned (``publish.recover_for``, one warning line per restore);
    then the options alone, the probe set and the topic holdout, the device and dtype, the model's
    files or GGUF header (width and layers) with the options that need them, --out (unless the
    caller took its ``snapshot``), the cache folder, the deltas' names, files and values, the
    layers they score, and the midpoint offsets the files store (``--causal-centre midpoint`` needs
    them, auto steers around them where a delta holds one; the pair's geometry reads them: finite,
    of w's shapes where both hold a tensor)."""
    import warnings

    from .cache import check_cache_dir
    from .delta import check_delta_values, check_finite, load_adapter_record, load_delta_and_centre, raise_no_centre
    from .pair import check_shapes
    from .model import resolve_dtype
    from .prompts import holdout_rows, load_probe_set
    from . import publish

    for line in publish.recover_for(config.out) if config.out is not None else []:
        warnings.warn(line, stacklevel=3)
    config.validate()
    probes = load_probe_set(config.n_fit)
    if config.topic_holdout is not None:
        holdout_rows(probes, config.topic_holdout)
    if config.behaviour is None and config.n_train is not None and config.n_train > probes.n_lora_train_topics:
        raise InputError(f"--n-train {config.n_train}: the shipped probes' LoRA training claims are the first "
                         f"{probes.n_lora_train_topics} (the rest are held out); N must be in 1..{probes.n_lora_train_topics}")
    resolve_dtype(config.dtype, check_device(config.device))
    shape = model_shape(config.model)
    if shape is not None:
        config.validate_for_model(shape.d, shape.n_layers, shape.where)
    if config.out is not None and snapshot is None:
        inputs = [*deltas, config.model, *([config.a_side_cache] if config.a_side_cache is not None else [])]
        snapshot = publish.check_destination(config.out, overwrite=config.overwrite, inputs=inputs)
    if config.a_side_cache is not None:
        check_cache_dir(config.a_side_cache)
    names = [Path(p).stem for p in deltas]
    if len(set(names)) != len(names):
        raise InputError(f"the deltas' file names must differ (they name the run folders): {names}")
    pairs = [load_delta_and_centre(p) for p in deltas]  # one read of each file
    loaded, centres = [d for d, _ in pairs], [c for _, c in pairs]
    for delta in loaded:
        check_delta_values(delta)
        if shape is not None:
            config.scored_layers(delta, shape.n_layers)
    # the midpoint: required by --causal-centre midpoint, used where the delta holds it by auto (SPEC §8),
    # and the pair's geometry whenever it is stored
    required = bool(config.causal) and config.causal_centre == "midpoint"
    for path, centre in zip(deltas, centres):
        if centre is None and required:
            raise_no_centre(path)
    for delta, centre in zip(loaded, centres):
        if centre is not None:
            check_finite(centre, "the pair's midpoint offset")
            check_shapes(delta, centre)
    return RunInputs(probes, shape, snapshot, names, loaded, centres, [load_adapter_record(p) for p in deltas])


def check_delta_command(model: str, adapter_pos: str, adapter_neg: str, out: str, overwrite: bool) -> Path:
    """Every check of ``delta`` that needs no weights, in order: what a killed run left in --out's
    folder is cleaned, --out (a new .safetensors file in an existing folder), the model's files or
    GGUF header, the two adapter folders. Returns --out as an absolute path."""
    import warnings

    from . import publish

    for line in publish.recover_for(out):
        warnings.warn(line, stacklevel=3)
    path = Path(out)
    if path.suffix != ".safetensors":
        raise InputError(f"--out {path}: the delta is written as .safetensors")
    publish.check_file_destination(path, overwrite=overwrite)
    model_shape(model)
    check_adapter_folder(adapter_pos, "--adapter-pos")
    check_adapter_folder(adapter_neg, "--adapter-neg")
    return path


def check_train(model, out, *, behaviour, n_train, family, layers, target_modules, rank, steps, lr, overwrite,
                alpha=None, seed=0):
    """Every check of ``train`` that needs no weights, in order: what a killed run left in --out's
    folder is cleaned, --out, peft, the adapter family, the options alone (--seed in 0..2³²−1 as for
    ``run``, --alpha and --lr finite and > 0, --n-train within the shipped probes' training claims),
    the model's files or GGUF header (its layer count and projection sizes; an HF id outside the
    local cache fails its load here, before any output), the layers (default:
    ``lora_train.default_lora_layers``), the target modules, steps and lr, the rank (at most the
    smaller dimension of every adapted projection: ``ModelShape.projection_dims``, else d), the
    behaviour file (``causal.read_behaviour_file``) and --n-train against its lines. Returns (the
    --out snapshot, the layers, the answer format: "chat", or "plain" for a model without a chat
    template, SPEC §8; None for an HF id, known once loaded)."""
    import importlib.util
    import math
    import warnings

    from . import publish
    from .causal import read_behaviour_file
    from .config import SEED_MAX
    from .lora_train import ADAPTER_FAMILIES, _check_args, default_lora_layers
    from .model import load_model

    for line in publish.recover_for(out):
        warnings.warn(line, stacklevel=3)
    snapshot = publish.check_destination(out, overwrite=overwrite,
                                         inputs=[str(model), *([str(behaviour)] if behaviour is not None else [])])
    if importlib.util.find_spec("peft") is None:  # pragma: no cover - depends on the environment
        raise InputError("training adapters needs the optional extra: pip install 'subspace-sweep[peft]'")
    if family not in ADAPTER_FAMILIES:
        raise InputError(f"--family {family!r}: one of {', '.join(ADAPTER_FAMILIES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise InputError(f"--seed must be in 0..{SEED_MAX} (an unsigned 32-bit integer, as for run), got {seed}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise InputError(f"--alpha must be finite and > 0 (the LoRA scale is alpha/rank; 0 never changes the "
                         f"model), got {alpha}")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"--lr must be finite and > 0, got {lr}")
    if behaviour is None and n_train is not None:
        from .prompts import load_probe_set

        probes = load_probe_set()
        n_max = min(int(probes.n_lora_train_topics), len(probes.claims))
        if not 1 <= n_train <= n_max:
            raise InputError(f"--n-train must be in 1..{n_max} (the shipped probes' LoRA training claims; the rest "
                             f"stay held out), got {n_train}")
    shape = model_shape(str(model))
    if shape is None:  # an HF id outside the local cache: load_model says where it looked
        load_model(model, dtype="float32", device="cpu")
    layers = default_lora_layers(shape.n_layers) if layers is None else layers
    bad = sorted({x for x in layers if not 0 <= x < shape.n_layers})
    if bad:
        raise InputError(f"--layers {bad} outside the model's layers 0..{shape.n_layers - 1} ({shape.where})")
    _check_args(model, layers, tuple(target_modules), rank, steps, lr, None)
    dims = shape.projection_dims()
    if dims is None:
        bound, which = shape.d, f"the residual width d = {shape.d}"
    else:
        name = min(target_modules, key=lambda t: (min(dims[t]), t))
        bound, which = min(dims[name]), f"the smaller dimension of {name} ({dims[name][0]} x {dims[name][1]})"
    if rank > bound:
        raise InputError(f"--rank {rank}: at most {bound}, {which} among the adapted modules ({shape.where}); a "
                         "higher rank adds no direction")
    if behaviour is not None:
        rows = read_behaviour_file(str(behaviour))
        if n_train is not None and not 1 <= n_train <= len(rows):
            raise InputError(f"--n-train must be in 1..{len(rows)} (the lines of {behaviour}), got {n_train}")
    return snapshot, layers, shape.answer_format
