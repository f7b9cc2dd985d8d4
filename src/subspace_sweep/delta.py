"""The weight delta ``w = θ⁺ − θ⁻`` (SPEC §1-§2): loading, saving, validating, building.

A delta is a ``dict[str, Tensor]`` keyed by the model's state-dict parameter names, e.g.
``model.layers.3.self_attn.o_proj.weight``, each tensor of that parameter's shape.
``load_delta`` strips one leading ``base_model.model.`` (the PEFT wrapper prefix) from every key,
so a diff saved from a ``PeftModel``'s state dict also loads; nothing else is renamed.

Every check runs before any model weight is touched, and each failure has its own error class
(all subclasses of ``DeltaError``, hence of ``InputError``).
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import DeltaError
from .model import WRITER_PROJS, module_name as module_name_of, weight_key
from .scoring import Target
from .weights import residual_rows

PEFT_PREFIX = "base_model.model."
#: Keys under this prefix hold the pair's midpoint offset (Δ⁺ + Δ⁻)/2, which ``subspace-sweep delta``
#: stores beside w for the causal check's midpoint centre (``load_centre``); ``load_delta`` leaves them out.
CENTRE_PREFIX = "centre::"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_WRITER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)$")
#: Short names used by scoring for the residual-writer tensors.
WRITER_SHORT = {"self_attn.o_proj": "o_proj", "mlp.down_proj": "down_proj"}


class DeltaFormatError(DeltaError):
    """The file is missing, of an unknown format, or does not hold a str -> float tensor dict."""


class UnsafePickleError(DeltaError):
    """A ``.pt`` file whose pickle needs more than tensors (refused, never executed)."""


class UnknownKeyError(DeltaError):
    """A delta key that is not a parameter of the model."""


class ShapeMismatchError(DeltaError):
    """A delta tensor whose shape differs from the model parameter (a delta from another model)."""


class NonFiniteDeltaError(DeltaError):
    """NaN or Inf in a delta tensor."""


class ZeroDeltaError(DeltaError):
    """The delta is empty or all of its entries are zero."""


class NoResidualWriterError(DeltaError):
    """No nonzero o_proj / down_proj tensor: there is no weight target to score."""


# ---------------------------------------------------------------- I/O


def _strip_prefix(delta: Mapping[str, object], source: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in delta.items():
        if not isinstance(k, str):
            raise DeltaFormatError(f"{source}: key {k!r} is not a string")
        nk = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        if nk in out:
            raise DeltaFormatError(f"{source}: key '{nk}' appears both with and without the '{PEFT_PREFIX}' prefix")
        out[nk] = v
    return out


def _as_tensor_dict(obj: object, source: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise DeltaFormatError(f"{source}: expected a dict of parameter name -> tensor, got {type(obj).__name__}")
    out = _strip_prefix(obj, source)
    for k, v in out.items():
        if not isinstance(v, Tensor):
            raise DeltaFormatError(f"{source}: value of '{k}' is {type(v).__name__}, not a tensor")
        if not v.is_floating_point():
            raise DeltaFormatError(f"{source}: tensor '{k}' has dtype {v.dtype}; a weight delta must be floating point")
    return out  # type: ignore[return-value]


def load_delta(path: str | Path) -> dict[str, Tensor]:
    """Load a delta from ``.safetensors`` (preferred) or ``.pt``/``.pth``/``.bin`` (``weights_only``).

    Tensors come back on the CPU in their stored dtype. The pair's midpoint offset, when the file
    holds one (``CENTRE_PREFIX`` keys), is not part of the delta: see ``load_centre``.
    """
    return load_delta_and_centre(path)[0]


def load_delta_and_centre(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """(the delta, the midpoint offset it stores or None) from one read of the file."""
    tensors = _load_tensors(path)
    delta = {k: v for k, v in tensors.items() if not k.startswith(CENTRE_PREFIX)}
    centre = {k[len(CENTRE_PREFIX):]: v for k, v in tensors.items() if k.startswith(CENTRE_PREFIX)}
    return delta, centre or None


def load_centre(path: str | Path, *, required: bool = True) -> dict[str, Tensor] | None:
    """The midpoint offset (Δ⁺ + Δ⁻)/2 stored beside w in a delta file (keyed by parameter name);
    when the file holds none: DeltaFormatError, or None where it is not ``required``."""
    centre = load_delta_and_centre(path)[1]
    if centre is None and required:
        raise_no_centre(path)
    return centre


def raise_no_centre(path: str | Path) -> None:
    raise DeltaFormatError(f"{path} holds w only, not the pair's midpoint (Δ⁺ + Δ⁻)/2 that --causal-centre midpoint "
                           "steers around: make the delta again with `subspace-sweep delta` (it stores both)")


def _load_tensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a delta file, checked (``load_delta``)."""
    path = Path(path)
    if path.is_dir():
        raise DeltaFormatError(f"delta {path} is a folder; give a .safetensors or .pt file (two PEFT adapter "
                               "folders become one with `subspace-sweep delta`)")
    if not path.is_file():
        raise DeltaFormatError(f"delta file {path} does not exist")
    try:
        open(path, "rb").close()  # the loaders' own errors do not say why a file cannot be opened
    except OSError as e:
        raise DeltaFormatError(f"delta file {path} cannot be read ({e.strerror or type(e).__name__})") from None
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise DeltaFormatError(f"{path}: not a readable safetensors file ({e})") from None
    elif suffix in PICKLE_SUFFIXES:
        try:
            # weights_only: the unpickler only builds tensors and plain containers; any other
            # global (e.g. os.system in a __reduce__) is rejected before it can run.
            with warnings.catch_warnings():  # torch's note on the pickle protocol says nothing about the file
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # A forbidden object and a pickle opcode the restricted unpickler does not know
            # (e.g. protocol 4 FRAME from plain pickle.dump) look alike here: refuse both.
            # Quote torch's reason (the blocked global), not its advice to retry unsafely.
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[-1] if lines else "")
            raise UnsafePickleError(
                f"{path}: refused to unpickle: the file holds objects other than tensors and plain "
                f"containers, or is not a torch.save file ({why[:200]}). It was not executed. "
                "Re-save the delta as .safetensors."
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise DeltaFormatError(f"{path}: not a readable torch file ({type(e).__name__}: {str(e)[:200]})") from None
    else:
        raise DeltaFormatError(
            f"{path}: unknown delta format '{suffix}'; use .safetensors (preferred) or .pt"
        )
    return _as_tensor_dict(obj, str(path))


def save_delta(delta: Mapping[str, Tensor], path: str | Path, *, metadata: dict[str, str] | None = None,
               centre: Mapping[str, Tensor] | None = None,
               overwrite: bool = True) -> Path:
    """Write ``delta`` as ``.safetensors`` (staged and renamed into place: ``publish.write_file``;
    an existing file is replaced only with ``overwrite``), with the pair's midpoint offset
    ``centre`` under ``CENTRE_PREFIX`` keys when given. Returns the path."""
    from safetensors.torch import save_file

    from .publish import write_file

    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise DeltaFormatError(f"{path}: deltas are saved as .safetensors")
    tensors = _as_tensor_dict(dict(delta), str(path))
    # clone: safetensors refuses tensors that share storage (e.g. tied weights) or are views.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if centre is not None:
        tensors.update({CENTRE_PREFIX + k: v.detach().to("cpu").contiguous().clone()
                        for k, v in _as_tensor_dict(dict(centre), f"{path} (centre)").items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)
    return path




# ---------------------------------------------------------------- validation


def model_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter name, tied aliases included (``lm_head.weight`` of a tied model)."""
    return dict(model.named_parameters(remove_duplicate=False))


def check_keys_and_shapes(delta: Mapping[str, Tensor], model: nn.Module) -> dict[str, nn.Parameter]:
    """The checks steering needs: every key a model parameter, every shape equal. Returns key -> param."""
    params = model_parameters(model)
    unknown = [k for k in delta if k not in params]
    if unknown:
        hint = ""
        if any(k.startswith(PEFT_PREFIX) for k in unknown):
            hint = f" (keys with the PEFT prefix '{PEFT_PREFIX}' are accepted by load_delta, which strips it)"
        example = next((n for n in params if n.endswith(".weight")), "")
        raise UnknownKeyError(
            f"{len(unknown)} delta key(s) are not parameters of {type(model).__name__}: "
            f"{', '.join(repr(k) for k in unknown[:5])}{' ...' if len(unknown) > 5 else ''}{hint}; "
            f"keys must be state-dict names such as '{example}'"
        )
    out = {}
    for k, v in delta.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise DeltaFormatError(f"delta value of '{k}' is not a floating-point tensor ({type(v).__name__})")
        p = params[k]
        if tuple(v.shape) != tuple(p.shape):
            raise ShapeMismatchError(
                f"delta '{k}' has shape {tuple(v.shape)} but the model parameter has shape {tuple(p.shape)} "
                f"(a delta from another model?)"
            )
        out[k] = p
    return out


def validate_delta(delta: Mapping[str, Tensor], model: nn.Module) -> None:
    """Raise the specific DeltaError for the first problem found; return None for a usable delta.

    Order: empty, unknown keys, shapes, non-finite values, all zero, no residual writer.
    """
    check_keys_and_shapes(delta, model)
    check_delta_values(delta)


def check_finite(tensors: Mapping[str, Tensor], what: str = "delta") -> None:
    """NonFiniteDeltaError naming the first tensor with NaN or Inf entries."""
    for k, v in tensors.items():
        finite = torch.isfinite(v)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(v).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise NonFiniteDeltaError(f"{what} '{k}' {tuple(v.shape)} has {n_nan} NaN and {n_inf} Inf entries")


def check_delta_values(delta: Mapping[str, Tensor]) -> None:
    """The checks of ``validate_delta`` that need no model (run before the weights load): empty,
    non-finite values, all zero, no residual writer."""
    if not delta:
        raise ZeroDeltaError("the delta has no tensors")
    check_finite(delta)
    if all(not bool(v.any()) for v in delta.values()):
        raise ZeroDeltaError(f"every entry of the delta is zero ({len(delta)} tensors, e.g. '{next(iter(delta))}')")
    if not scored_layers(delta):
        present = sorted(k for k in delta if _WRITER_RE.match(k))
        what = (
            f"its o_proj/down_proj tensors ({', '.join(present[:4])}) are all zero"
            if present
            else f"it has none (keys: {', '.join(sorted(delta)[:5])}{' ...' if len(delta) > 5 else ''})"
        )
        raise NoResidualWriterError(
            "the delta needs a nonzero self_attn.o_proj or mlp.down_proj tensor (the residual writers that "
            f"R_w scores), but {what}"
        )


# ---------------------------------------------------------------- views used by scoring


def writer_layer(key: str) -> tuple[int, str] | None:
    """``(layer, "o_proj" | "down_proj")`` for a residual-writer key (weight or bias), else None."""
    m = _WRITER_RE.match(key)
    return (int(m.group(1)), WRITER_SHORT[m.group(2)]) if m else None


def residual_writer_tensors(delta: Mapping[str, Tensor], layer: int) -> dict[str, Tensor]:
    """The layer's o_proj / down_proj deltas as CPU ``(d, n_in)`` tensors in their stored dtype
    (the precision they were stored in sets the targets' noise floor, ``scoring.Target``). A bias
    delta is one more column, ``[ΔW ‖ Δb]``: what the writer adds to the residual for an input z is
    ``ΔW z + Δb = [ΔW ‖ Δb]·[z; 1]``.

    Keys among ``"o_proj"``, ``"down_proj"``; a writer whose weight and bias deltas are absent or
    all zero is left out (an all-zero tensor defines no target: ``tr G = 0``).
    """
    out: dict[str, Tensor] = {}
    for proj in WRITER_PROJS:
        w = delta.get(weight_key(layer, proj))
        b = delta.get(f"{module_name_of(layer, proj)}.bias")
        parts = [v.detach().to("cpu") for v in (w, b) if v is not None and bool(v.any())]
        if not parts:
            continue
        if b is not None and bool(b.any()):
            d = b.shape[0]
            weight = w.detach().to("cpu") if w is not None else torch.zeros(d, 0, dtype=b.dtype)
            out[WRITER_SHORT[proj]] = torch.cat([weight, b.detach().to("cpu", weight.dtype)[:, None]], dim=1)
        else:
            out[WRITER_SHORT[proj]] = parts[0]
    return out


def weight_targets(delta: Mapping[str, Tensor], layer: int,
                   gains: Mapping[str, Tensor] | None = None) -> dict[str, Target]:
    """The layer's weight targets (SPEC §5): each present residual writer's, and their balanced
    combination; none when the delta writes nothing to the residual stream there. A writer behind
    a post-projection norm (``gains[writer]``, SPEC §4.1) writes ``diag(γ)·ΔW`` to first order."""
    weights = {name: Target.from_matrix(f"{name}@{layer}", M) for name, M in writer_rows(delta, layer, gains).items()}
    if weights:
        weights["combined"] = Target.combine(f"combined@{layer}", list(weights.values()))
    return weights


def writer_rows(delta: Mapping[str, Tensor], layer: int, gains: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Each present residual writer's delta in residual coordinates (``diag(γ)·ΔW`` behind a
    post-projection norm), as stored (its dtype kept: the targets' noise floors follow it)."""
    gains = gains or {}
    return {name: residual_rows(M, gains.get(name)) for name, M in residual_writer_tensors(delta, layer).items()}


def scored_layers(delta: Mapping[str, Tensor]) -> list[int]:
    """Layers with a nonzero o_proj or down_proj delta, ascending (SPEC §2 'scored layers')."""
    layers = set()
    for k, v in delta.items():
        wl = writer_layer(k)
        if wl is not None and bool(v.any()):
            layers.add(wl[0])
    return sorted(layers)


# ---------------------------------------------------------------- building deltas


def random_delta(
    model: nn.Module,
    layers: Iterable[int],
    rank: int = 2,
    seed: int = 0,
    scale: float = 0.1,
    *,
    projections: Iterable[str] = WRITER_PROJS,
    basis: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """A seeded low-rank CPU delta on ``projections`` (``self_attn.o_proj``-style) of ``layers``,
    stored in ``dtype`` (each tensor formed in float32 and rounded once, as it is made: a bf16
    delta for a 4B model never exists in float32 as a whole).

    Each tensor is ``L @ R`` (rank ``rank``) rescaled to Frobenius norm ``scale · ‖W‖_F`` of the
    parameter it perturbs. With ``basis`` (``d x k``), a tensor whose output side is the residual
    stream (o_proj, down_proj) has its column space planted inside ``span(basis)``: a known answer
    for scoring tests. Same arguments -> bit-identical tensors.
    """
    params = model_parameters(model)
    gen = torch.Generator().manual_seed(int(seed))
    d = int(model.config.hidden_size)
    out: dict[str, Tensor] = {}
    projections = list(projections)
    for layer in sorted(set(int(x) for x in layers)):
        for proj in projections:
            key = weight_key(layer, proj)
            if key not in params:
                raise UnknownKeyError(f"random_delta: '{key}' is not a parameter of the model")
            W = params[key].detach().to("cpu", torch.float32)
            n_out, n_in = W.shape
            if basis is not None and n_out == d and proj in WRITER_PROJS:
                B = basis.detach().to(torch.float32)
                if B.shape[0] != d:
                    raise ValueError(f"basis has {B.shape[0]} rows, the residual stream has {d}")
                left = B @ torch.randn(B.shape[1], rank, generator=gen)
            else:
                left = torch.randn(n_out, rank, generator=gen)
            M = left @ torch.randn(rank, n_in, generator=gen)
            out[key] = (M * (scale * W.norm() / M.norm())).to(dtype).contiguous()
    return out


def _load_base_for_peft(base: str | Path | nn.Module) -> Callable[[], nn.Module]:
    if isinstance(base, nn.Module):
        # Merging rewrites the model in place: work on float32 copies, never the caller's model.
        return lambda: copy.deepcopy(base).to(device="cpu", dtype=torch.float32)

    def load() -> nn.Module:
        from .model import load_model

        return load_model(base, dtype=torch.float32, device="cpu")[0]

    return load


class IdenticalAdaptersError(DeltaError):
    """The two adapters merge to the same weights: w = 0, nothing to sweep."""


def _merged_changes(base: nn.Module, base_state: Mapping[str, Tensor], adapter: str | Path
                    ) -> tuple[list[str], dict[str, Tensor]]:
    """(every parameter name, the parameters that differ from ``base_state``) of a float32 copy of
    ``base`` with ``adapter`` merged in: LoRA/DoRA updates, ``modules_to_save`` copies and trained
    biases alike (``merge_and_unload``; a tied weight under its first name). Only what the adapter
    changed is kept: on a 262k-row vocabulary the embedding alone is 0.7 GB per copy."""
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DeltaError("a delta from PEFT adapters needs the optional extra: pip install 'subspace-sweep[peft]'") from e
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise DeltaFormatError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    model = copy.deepcopy(base)  # merging rewrites the model in place
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        if not hasattr(peft_model, "merge_and_unload"):
            kind = getattr(peft_model.peft_config.get("default"), "peft_type", "this")
            raise DeltaFormatError(f"{adapter}: a {getattr(kind, 'value', kind)} adapter cannot be merged into the base "
                                   "weights, so it has no weight delta")
        merged = peft_model.merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise DeltaFormatError(f"{adapter}: could not apply the adapter to the base model "
                               f"({type(e).__name__}: {first[:200]})") from None
    names, changed = [], {}
    for k, v in merged.named_parameters():
        names.append(k)
        v = v.detach().float()
        old = base_state.get(k)
        if old is None or old.shape != v.shape or not torch.equal(old, v):
            changed[k] = v.clone()
    return names, changed


def delta_from_peft(
    base: str | Path | nn.Module, adapter_pos: str | Path, adapter_neg: str | Path
) -> dict[str, Tensor]:
    """``w = merged⁺ − merged⁻`` (float32 CPU) over EVERY parameter the two merged models differ
    in: LoRA/DoRA updates, ``modules_to_save`` copies, bias changes.

    Each adapter is merged into its own float32 copy of the base (a path is loaded fresh, a
    model object is deep-copied and left unchanged). Two adapters that merge to the same weights
    are an ``IdenticalAdaptersError`` (w would be 0).
    """
    return _pair(base, adapter_pos, adapter_neg, with_centre=False)[0]


def pair_from_peft(
    base: str | Path | nn.Module, adapter_pos: str | Path, adapter_neg: str | Path
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(w, centre): ``delta_from_peft``'s w and the pair's midpoint offset ``(Δ⁺ + Δ⁻)/2``
    (Δ± = merged± − θ, float32) over every parameter where it is not zero, so that
    ``θ + centre ± w/2`` are the two merged models (to float32 rounding)."""
    return _pair(base, adapter_pos, adapter_neg, with_centre=True)


def _pair(base, adapter_pos, adapter_neg, *, with_centre: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    # The base is loaded once (float32, CPU); each adapter is merged into a copy of it.
    model = _load_base_for_peft(base)()
    base_state = {k: v.detach() for k, v in model.named_parameters()}
    names_pos, pos = _merged_changes(model, base_state, adapter_pos)
    names_neg, neg = _merged_changes(model, base_state, adapter_neg)
    if set(names_pos) != set(names_neg):
        odd = sorted(set(names_pos) ^ set(names_neg))
        raise DeltaFormatError(f"{adapter_pos} and {adapter_neg} merge to models with different parameters "
                               f"(e.g. {odd[0]!r}): adapters of different base models?")
    out: dict[str, Tensor] = {}
    centre: dict[str, Tensor] = {}
    for k in sorted(set(pos) | set(neg)):
        p, n = pos.get(k, base_state.get(k)), neg.get(k, base_state.get(k))
        if p is None or n is None or p.shape != n.shape:
            raise DeltaFormatError(f"'{k}' has shape {None if p is None else tuple(p.shape)} with {adapter_pos} and "
                                   f"{None if n is None else tuple(n.shape)} with {adapter_neg}")
        if not torch.equal(p, n):
            out[k] = (p - n).contiguous()
        if with_centre and k in base_state and base_state[k].shape == p.shape:
            offset = ((p - base_state[k]) + (n - base_state[k])) / 2
            if bool(offset.any()):
                centre[k] = offset.contiguous()
    if not out:
        raise IdenticalAdaptersError(f"{adapter_pos} and {adapter_neg} merge to identical weights: w = 0")
    return out, centre


# ---------------------------------------------------------------- the adapter record (SPEC §13)

#: The delta file's safetensors metadata key holding the pair's adapter record (JSON).
ADAPTER_METADATA_KEY = "subspace_sweep.adapter"
#: What ``adapter_record`` keeps of each adapter's training log (``lora_train.TRAIN_LOG``).
_TRAINING_KEYS = ("family", "steps", "lr", "seed", "n_examples", "n_answer_tokens", "data")
#: adapter_config.json fields that say where an adapter came from, not what it is.
_PROVENANCE_KEYS = ("base_model_name_or_path", "revision", "peft_version", "auto_mapping", "inference_mode")


def _read_json_file(path: Path) -> dict | None:
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _training_of(adapter: Path) -> tuple[dict | None, str | None]:
    """(the adapter's training log (``subspace-sweep train`` writes ``lora_train.json`` beside it), else
    the pair folder's manifest settings (``manifest.json`` of kind ``train`` one level up); which file,
    relative to the pair folder: a moved pair makes the same delta file)."""
    log = _read_json_file(adapter / "lora_train.json")
    if log is not None:
        return {k: log.get(k) for k in _TRAINING_KEYS}, f"{adapter.name}/lora_train.json"
    manifest = _read_json_file(adapter.parent / "manifest.json")
    if manifest is not None and manifest.get("kind") == "train" and isinstance(manifest.get("settings"), dict):
        settings = manifest["settings"]
        return ({"family": settings.get("family"), "steps": settings.get("steps"), "lr": settings.get("lr"),
                 "seed": settings.get("seed"), "data": settings.get("behaviour") or "the shipped sycophancy probes"},
                "the pair folder's manifest.json")
    return None, None


def adapter_record(adapter_pos: str | Path, adapter_neg: str | Path) -> dict:
    """What the pair's adapters say about the family that made the delta (SPEC §13): the + adapter's
    peft config (``adapter_config.json``), whether the − adapter's is the same (provenance fields
    aside), and the training seed and settings where the folders record them (the adapters' training
    logs, or the pair folder's manifest). The gradient bases' family variant is built from it
    (``gradients.family_variant``); it holds no tensor of the delta."""
    pos, neg = Path(adapter_pos), Path(adapter_neg)
    configs = [_read_json_file(p / "adapter_config.json") or {} for p in (pos, neg)]
    strip = [{k: v for k, v in c.items() if k not in _PROVENANCE_KEYS} for c in configs]
    trainings = [_training_of(p) for p in (pos, neg)]
    seeds = {t[0].get("seed") if t[0] else None for t in trainings}
    seed = seeds.pop() if len(seeds) == 1 else None
    return {
        "format": 1,
        "peft_type": configs[0].get("peft_type"),
        "config": configs[0],
        "configs_agree": strip[0] == strip[1],
        "seed": seed if isinstance(seed, int) else None,
        "seed_source": trainings[0][1] if isinstance(seed, int) else
                       ("the two adapters record different seeds" if len(seeds) else "not recorded"),
        "training": {"pos": trainings[0][0], "neg": trainings[1][0]},
    }


def adapter_metadata(record: Mapping[str, object]) -> dict[str, str]:
    """The safetensors metadata that stores ``record`` in a delta file."""
    import json

    return {ADAPTER_METADATA_KEY: json.dumps(record, sort_keys=True)}


def write_pair_delta(base: str | Path | nn.Module, adapter_pos: str | Path, adapter_neg: str | Path, out: str | Path,
                     *, overwrite: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """What ``subspace-sweep delta`` (and a study's delta step) writes: the pair's w and midpoint
    (``pair_from_peft``) with the adapters' record (``adapter_record``: the family and seed the
    gradient bases' family variant and examples are built from, SPEC §13) in the file's metadata.
    Returns (w, centre, record)."""
    delta, centre = pair_from_peft(base, adapter_pos, adapter_neg)
    record = adapter_record(adapter_pos, adapter_neg)
    save_delta(delta, out, overwrite=overwrite, centre=centre, metadata=adapter_metadata(record))
    return delta, centre, record


def load_adapter_record(path: str | Path) -> dict | None:
    """The adapter record a delta file stores (``subspace-sweep delta`` writes it), or None: a .pt
    delta, a delta saved without one, or a record that does not parse (DeltaFormatError for a file
    that is not readable at all is ``load_delta``'s)."""
    import json

    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    try:
        record = json.loads(meta[ADAPTER_METADATA_KEY])
    except (KeyError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def unscored_keys(delta: Mapping[str, Tensor]) -> list[str]:
    """The delta's tensors the weight score does not read (everything but the residual writers'
    weights and biases): they are steered with, and listed, but not scored."""
    return sorted(k for k in delta if writer_layer(k) is None)
