"""The architecture table (SPEC §9): where each supported decoder keeps its projections and norms.

Data, not branches: one ``Architecture`` row per ``model_type``. Everything that needs a module
(weight extraction, captures, the A-side cache key, delta validation) asks the row, so a new
decoder is one row (and every table-parametrised test runs on it).

Per row:
- the projections, relative to a decoder block: separate ``q/k/v`` and ``gate/up`` modules, or a
  fused one with its documented row layout (Phi-3: ``qkv_proj`` rows = [q; k; v], ``gate_up_proj``
  rows = [gate; up]); ``o_proj`` and ``down_proj`` are never fused in the supported models;
- the norms in front of the readers (``attn_norm``, ``mlp_norm``; None where a block reads the raw
  residual, as OLMo2 does), q/k norms where the model has them (per head: Qwen3, Gemma3; over the
  whole projection: OLMo2), the post-projection norms between a writer and the residual add
  (Gemma2/3, OLMo2: ``attn_out_norm``, ``mlp_out_norm``), and the final norm. Each norm's effective
  gain is read from its module's own forward pass (``model.norm_gain``), which covers Gemma's
  ``1 + weight`` without a special case.

A post-projection norm writes ``γ_post ⊙ n(W z)``: the write space of W is ``diag(γ_post)·col(W)``
and the weight target of a delta there is ``diag(γ_post)·ΔW`` to first order (SPEC §4.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Fused:
    """A fused projection: ``path`` holds ``parts`` stacked by rows in this order."""

    path: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    model_type: str
    attn_norm: str | None = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"
    q_norm: str | None = None
    k_norm: str | None = None
    attn_out_norm: str | None = None  # a norm between o_proj and the residual add
    mlp_out_norm: str | None = None  # a norm between down_proj and the residual add
    final_norm: str = "model.norm"
    qkv: Fused | None = None  # None: self_attn.{q,k,v}_proj
    gate_up: Fused | None = None  # None: mlp.{gate,up}_proj
    attention: str = "self_attn"
    mlp: str = "mlp"

    @property
    def post_norm(self) -> bool:
        return self.attn_out_norm is not None or self.mlp_out_norm is not None

    def projection(self, name: str) -> tuple[str, str | None]:
        """(module path relative to a block, part of a fused module or None) of q/k/v/o/gate/up/down."""
        for fused in (self.qkv, self.gate_up):
            if fused is not None and name in fused.parts:
                return fused.path, name
        if name in ("q", "k", "v", "o"):
            return f"{self.attention}.{name}_proj", None
        if name in ("gate", "up", "down"):
            return f"{self.mlp}.{name}_proj", None
        raise KeyError(name)

    def module_paths(self) -> list[str]:
        """Every module a block must have (relative paths), for ``check_architecture``."""
        paths = {self.projection(n)[0] for n in ("q", "k", "v", "o", "gate", "up", "down")}
        paths |= {p for p in (self.attn_norm, self.mlp_norm, self.q_norm, self.k_norm, self.attn_out_norm,
                              self.mlp_out_norm) if p is not None}
        return sorted(paths | {self.attention, self.mlp})

    def write_norm(self, writer: str) -> str | None:
        """The post-projection norm of ``o_proj`` / ``down_proj`` (None: it writes the residual directly)."""
        return {"o_proj": self.attn_out_norm, "down_proj": self.mlp_out_norm}[writer]


_QK = dict(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
_GEMMA = dict(mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
              mlp_out_norm="post_feedforward_layernorm")

#: THE table: model_type -> where things are.
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama"),
    Architecture("mistral"),
    Architecture("qwen2"),
    Architecture("qwen3", **_QK),
    Architecture("gemma2", **_GEMMA),
    Architecture("gemma3_text", **_GEMMA, **_QK),
    Architecture("olmo2", attn_norm=None, mlp_norm=None, attn_out_norm="post_attention_layernorm",
                 mlp_out_norm="post_feedforward_layernorm", **_QK),
    Architecture("phi3", qkv=Fused("self_attn.qkv_proj", ("q", "k", "v")),
                 gate_up=Fused("mlp.gate_up_proj", ("gate", "up"))),
)}
SUPPORTED = tuple(ARCHITECTURES)


def architecture_of(config) -> Architecture:
    """The table row of a model config; InputError naming the model_type and the supported list."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise InputError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)} "
                         "(MoE, GPT-2-style Conv1D and encoder-decoder models are not)")
    return ARCHITECTURES[model_type]


def fused_rows(arch: Architecture, part: str, config) -> slice:
    """The rows of ``part`` inside its fused projection, from the config's head layout."""
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    hd = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    d_mlp = int(config.intermediate_size)
    sizes = {"q": n_heads * hd, "k": n_kv * hd, "v": n_kv * hd, "gate": d_mlp, "up": d_mlp}
    fused = arch.qkv if part in ("q", "k", "v") else arch.gate_up
    start = 0
    for p in fused.parts:
        if p == part:
            return slice(start, start + sizes[p])
        start += sizes[p]
    raise KeyError(part)
