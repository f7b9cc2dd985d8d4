"""Loading a Llama/Qwen-style decoder and reading its weights (SPEC §2).

Module and parameter names follow the HF layout the sweep assumes:
``model.layers.{i}.self_attn.{q,k,v,o}_proj`` and ``model.layers.{i}.mlp.{gate,up,down}_proj``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .weights import BaseWeights, LayerWeights

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
#: The projections that write into the residual stream (their delta is the R_w target).
WRITER_PROJS = ("self_attn.o_proj", "mlp.down_proj")
#: The norms in front of the readers (SPEC §4.1), relative to a decoder block; the final norm is
#: ``FINAL_NORM``. q/k norms are optional (Qwen3 has them, Llama does not).
ATTN_NORM = "input_layernorm"
MLP_NORM = "post_attention_layernorm"
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
FINAL_NORM = "model.norm"

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


def check_architecture(model: nn.Module) -> None:
    """Raise InputError naming the first missing module of the layout the sweep needs."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise InputError(f"{type(model).__name__}: config.num_hidden_layers is missing or < 1 ({n!r})")
    names = dict(model.named_modules())
    required = ["model.embed_tokens", "model.layers", FINAL_NORM]
    for layer in range(n):
        required.append(block_name(layer))
        required += [module_name(layer, p) for p in ATTN_PROJS + MLP_PROJS]
        required += [f"{block_name(layer)}.{norm}" for norm in (ATTN_NORM, MLP_NORM)]
    for name in required:
        if name not in names:
            raise InputError(
                f"{type(model).__name__} has no module '{name}': the sweep needs a Llama/Qwen-style decoder "
                f"(model.layers.{{i}}.self_attn.{{q,k,v,o}}_proj, mlp.{{gate,up,down}}_proj, {ATTN_NORM}, {MLP_NORM}; "
                f"{FINAL_NORM})"
            )
        if name.endswith("_proj") and not isinstance(getattr(names[name], "weight", None), torch.Tensor):
            raise InputError(f"module '{name}' of {type(model).__name__} has no weight tensor")


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
    """Load ``(model, tokenizer)`` from a local folder or an HF id, eager attention, eval mode, no grads.

    ``local_files_only=None`` means: offline when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set,
    otherwise the HF cache is tried first and a download only if the model is not cached.
    A model that cannot be found raises InputError saying where it looked.
    The tokenizer gets ``pad_token = eos_token`` when it has none (padding is needed for batching).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
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


def extract_base_weights(model: nn.Module) -> BaseWeights:
    """Everything the A-side may read, on the CPU in the model's dtype (no delta is applied here).

    For a CPU model the matrices are views of its parameters, not copies (a float32 copy of
    Qwen3-0.6B is 2.4 GB and ~1.5 s of page faults); candidate building converts one layer at a
    time. They change if the model's weights change: build the A-side before steering the model.
    The norm gains (SPEC §4.1) are read from the norm modules' forward (``norm_gain``).
    """
    check_architecture(model)
    cfg = model.config
    d = int(cfg.hidden_size)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    modules = dict(model.named_modules())
    layers = []
    for i in range(n_layers_of(model)):
        get = lambda p: _cpu(model.get_parameter(weight_key(i, p)))  # noqa: E731
        q_norm, k_norm = (modules.get(f"{block_name(i)}.{n}") for n in QK_NORMS)
        layers.append(
            LayerWeights(
                q=get("q_proj"), k=get("k_proj"), v=get("v_proj"), o=get("o_proj"),
                gate=get("gate_proj"), up=get("up_proj"), down=get("down_proj"),
                attn_gain=norm_gain(modules[f"{block_name(i)}.{ATTN_NORM}"], d),
                mlp_gain=norm_gain(modules[f"{block_name(i)}.{MLP_NORM}"], d),
                q_gain=norm_gain(q_norm, head_dim) if q_norm is not None else None,
                k_gain=norm_gain(k_norm, head_dim) if k_norm is not None else None,
            )
        )
    embed = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # The unembedding is only reduced to its d x d Gram, chunk by chunk (linalg.col_gram).
    unembed = _cpu(lm_head.weight if lm_head is not None and getattr(lm_head, "weight", None) is not None else embed)
    return BaseWeights(
        layers=tuple(layers),
        unembed=unembed,
        final_gain=norm_gain(modules[FINAL_NORM], d),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
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

