"""Loading a supported decoder and reading its weights (SPEC §2, §9).

Where a model keeps its projections and norms comes from the architecture table (``arch.py``):
``model.layers.{i}`` blocks with ``self_attn.o_proj`` and ``mlp.down_proj`` writing the residual
stream in every supported model; the readers separate or fused (Phi-3), the norms where the row
says.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .arch import Architecture, architecture_of, fused_rows
from .errors import InputError
from .weights import BaseWeights, LayerWeights

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
#: The projections that write into the residual stream (their delta is the R_w target).
WRITER_PROJS = ("self_attn.o_proj", "mlp.down_proj")

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def block_name(layer: int) -> str:
    """Module name of decoder block ``layer`` (its forward output is the block output h_l)."""
    return layer_prefix(layer)


def module_name(layer: int, proj: str) -> str:
    """``proj`` is ``self_attn.o_proj``-style, or a bare projection name (``o_proj``, ``up_proj``)."""
    if "." not in proj:
        proj = f"self_attn.{proj}" if proj in ATTN_PROJS else f"mlp.{proj}"
    return f"{layer_prefix(layer)}.{proj}"


def weight_key(layer: int, proj: str) -> str:
    """State-dict key of a projection's weight, e.g. ``model.layers.3.self_attn.o_proj.weight``."""
    return f"{module_name(layer, proj)}.weight"


def residual_writer_keys(n_layers: int) -> list[str]:
    """All o_proj / down_proj weight keys, layer-major."""
    return [weight_key(layer, p) for layer in range(n_layers) for p in WRITER_PROJS]


def n_layers_of(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def check_architecture(model: nn.Module) -> Architecture:
    """The model's architecture table row; InputError for an unsupported model_type or a module
    the row names that the model lacks (the first one)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise InputError(f"{type(model).__name__}: config.num_hidden_layers is missing or < 1 ({n!r})")
    arch = architecture_of(config)
    names = dict(model.named_modules())
    required = ["model.embed_tokens", "model.layers", arch.final_norm]
    for layer in range(n):
        required.append(block_name(layer))
        required += [f"{block_name(layer)}.{p}" for p in arch.module_paths()]
    for name in required:
        if name not in names:
            raise InputError(f"{type(model).__name__} (model_type {arch.model_type!r}) has no module '{name}', "
                             "which the architecture table expects")
        if name.endswith("_proj") and not isinstance(getattr(names[name], "weight", None), torch.Tensor):
            raise InputError(f"module '{name}' of {type(model).__name__} has no weight tensor")
    return arch


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}: {e}") from None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on GPU, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def _env_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return os.environ.get("HF_HUB_CACHE", "~/.cache/huggingface/hub")


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (None when it can): a bounded probe before any download.

    huggingface_hub retries a failed request with back-off (~25 s per file), so without this
    a machine with no network would wait about a minute before failing.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"no connection to {endpoint} ({e})")

    # A thread, because name resolution ignores the socket timeout.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return result[0] if result else f"no answer from {endpoint} within {timeout:.0f} s"


def _looks_like_path(s: str) -> bool:
    # HF ids are "name" or "org/name"; anything else that is not on disk was meant as a path.
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or "\\" in s or s.endswith(os.sep)


def load_model(
    model: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    local_files_only: bool | None = None,
):
    """Load ``(model, tokenizer)`` from a local folder, an HF id or a GGUF source (a ``.gguf`` file or a
    known name such as ``smollm2-135m-instruct``: converted once into a cached plain folder,
    ``gguf_models.convert``), eager attention, eval mode, no grads.

    ``local_files_only=None`` means: offline when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set,
    otherwise the HF cache is tried first and a download only if the model is not cached.
    A model that cannot be found raises InputError saying where it looked.
    The tokenizer gets ``pad_token = eos_token`` when it has none (padding is needed for batching).
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    from .gguf_models import convert, is_gguf_source

    if is_gguf_source(model):
        model = convert(model).folder
    offline = _env_offline() if local_files_only is None else bool(local_files_only)
    name = str(model)
    path = Path(name).expanduser()
    if path.is_dir():
        source, where = str(path), f"local folder {path.resolve()}"
        attempts = [True]
    elif path.exists():
        raise InputError(f"model path {path} is a file; give a model folder (config.json + weights) or an HF id")
    elif isinstance(model, Path) or _looks_like_path(name):
        raise InputError(f"model folder {path} does not exist")
    else:
        source, where = name, f"Hugging Face cache {_hub_cache()}"
        # Cache first, so that a cached model never touches the network.
        attempts = [True] if offline else [True, False]

    errors: list[str] = []
    loaded = None
    for files_only in attempts:
        if not files_only and (why := _hub_unreachable()):
            errors.append(f"download: {why}")
            break
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=files_only)
        except (OSError, ValueError, KeyError) as e:
            errors.append(f"{'cache' if files_only else 'download'}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        architecture_of(config)  # an unsupported model_type: refused before any weight is read
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=files_only)
            mdl = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, attn_implementation="eager", local_files_only=files_only
            )
            loaded = (mdl, tok)
            break
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            # OSError: not found / no connection; ValueError: invalid repo id or unknown architecture;
            # SafetensorError: a damaged weight file.
            errors.append(f"{'cache' if files_only else 'download'}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    if loaded is None:
        if path.is_dir():  # a local folder: nothing was looked up or downloaded anywhere else
            raise InputError(f"could not load the model folder {path.resolve()}: " + errors[0].split(": ", 1)[1])
        how = "offline (HF_HUB_OFFLINE=1 or local_files_only), nothing downloaded" if offline else "not downloaded either"
        raise InputError(f"could not load model '{name}': looked in {where}; {how}. Details: " + " | ".join(errors))
    mdl, tok = loaded

    mdl.to(dev).eval()
    mdl.requires_grad_(False)
    check_architecture(mdl)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InputError(f"tokenizer of '{name}' has neither a pad nor an eos token; batching needs one")
        tok.pad_token = tok.eos_token
    return mdl, tok


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def attention_sink_token_id(model: nn.Module, tokenizer=None) -> int:
    """The token whose residual ``attention_sink`` uses: bos, else eos, of the tokenizer, else the config."""
    for src in (tokenizer, model.config):
        for attr in ("bos_token_id", "eos_token_id"):
            v = getattr(src, attr, None) if src is not None else None
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
    raise InputError("neither the tokenizer nor the config has a bos or eos token id (needed for attention_sink)")


#: The probe ``norm_gain`` feeds a norm: every entry 2^12, exact in every float format. Its mean
#: square 2^24 swallows any eps ≤ 1 in float32, so the norm's ``x/rms(x)`` is exactly 1.
_GAIN_PROBE = 4096.0


def norm_gain(norm: nn.Module, width: int) -> torch.Tensor:
    """What an RMSNorm module multiplies ``x/rms(x)`` by (float32, CPU), read from its own forward:
    on an input whose every entry is equal, ``x/rms(x)`` is exactly 1, so the output is the gain
    itself, whatever the module stores (``weight`` for Llama/Qwen, ``1 + weight`` for Gemma).
    """
    ref = next(iter(norm.parameters()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    with torch.no_grad():
        out = norm(torch.full((1, width), _GAIN_PROBE, dtype=dtype, device=device))
    return out.reshape(width).detach().to(device="cpu", dtype=torch.float32)


def projection_weight(model: nn.Module, arch: Architecture, layer: int, name: str) -> torch.Tensor:
    """The (out x in) weight of projection ``name`` (q/k/v/o/gate/up/down) at ``layer``: the
    module's own parameter, or its rows inside a fused projection (a view, no copy)."""
    path, part = arch.projection(name)
    W = model.get_submodule(f"{block_name(layer)}.{path}").weight
    return W if part is None else W[fused_rows(arch, part, model.config)]


def _gain_or_ones(model: nn.Module, path: str | None, width: int) -> torch.Tensor:
    """The gain of the norm at ``path`` (absolute module path), ones where there is no norm."""
    if path is None:
        return torch.ones(width)
    return norm_gain(model.get_submodule(path), width)


def _row_gain(model: nn.Module, path: str | None, n_heads: int, head_dim: int) -> torch.Tensor | None:
    """A q/k norm's gain per projection row (n_heads·head_dim): tiled over the heads when the norm
    acts on each head (Qwen3, Gemma3), as is when it acts on the whole projection (OLMo2)."""
    if path is None:
        return None
    norm = model.get_submodule(path)
    width = int(next(iter(norm.parameters())).shape[-1])
    gain = norm_gain(norm, width)
    if width == head_dim:
        return gain.repeat(n_heads)
    if width == n_heads * head_dim:
        return gain
    raise InputError(f"{path} has width {width}: neither head_dim {head_dim} nor n_heads·head_dim {n_heads * head_dim}")


def mlp_activation_name(config) -> str:
    """The MLP's gate activation (transformers' ACT2FN name)."""
    return str(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "silu")


def write_gains(model: nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """The post-projection norm gains of the layer's writers (``"o_proj"``, ``"down_proj"``), for
    post-norm architectures; empty where the writers add to the residual directly."""
    arch = architecture_of(model.config)
    d = int(model.config.hidden_size)
    return {w: norm_gain(model.get_submodule(f"{block_name(layer)}.{p}"), d)
            for w in ("o_proj", "down_proj") if (p := arch.write_norm(w)) is not None}


def extract_base_weights(model: nn.Module) -> BaseWeights:
    """Everything the A-side may read, on the CPU in the model's dtype (no delta is applied here).

    For a CPU model the matrices are views of its parameters, not copies (a float32 copy of
    Qwen3-0.6B is 2.4 GB and ~1.5 s of page faults); candidate building converts one layer at a
    time. They change if the model's weights change: build the A-side before steering the model.
    The norm gains (SPEC §4.1) are read from the norm modules' forward (``norm_gain``); where the
    architecture table puts a norm, its gain is used, else ones (readers) or None (writers).
    """
    arch = check_architecture(model)
    cfg = model.config
    d = int(cfg.hidden_size)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    layers = []
    for i in range(n_layers_of(model)):
        blk = block_name(i)
        get = lambda name: _cpu(projection_weight(model, arch, i, name))  # noqa: E731
        at = lambda rel: None if rel is None else f"{blk}.{rel}"  # noqa: E731
        post = write_gains(model, i)
        layers.append(
            LayerWeights(
                q=get("q"), k=get("k"), v=get("v"), o=get("o"), gate=get("gate"), up=get("up"), down=get("down"),
                attn_gain=_gain_or_ones(model, at(arch.attn_norm), d),
                mlp_gain=_gain_or_ones(model, at(arch.mlp_norm), d),
                q_gain=_row_gain(model, at(arch.q_norm), n_heads, head_dim),
                k_gain=_row_gain(model, at(arch.k_norm), n_kv, head_dim),
                o_gain=post.get("o_proj"),
                down_gain=post.get("down_proj"),
            )
        )
    embed = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # The unembedding is only reduced to its d x d Gram, chunk by chunk (linalg.col_gram).
    unembed = _cpu(lm_head.weight if lm_head is not None and getattr(lm_head, "weight", None) is not None else embed)
    return BaseWeights(
        layers=tuple(layers),
        unembed=unembed,
        final_gain=norm_gain(model.get_submodule(arch.final_norm), d),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        mlp_act=mlp_activation_name(cfg),
    )


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over every state-dict entry (name, dtype, shape, raw bytes), in key order."""
    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no 1.2 GB copy
    return h.hexdigest()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device

