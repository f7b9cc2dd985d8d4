"""Activation capture on plain torch forward hooks (SPEC §3).

``record_activations`` is the one hook mechanism (modelled on steering-vectors'
``record_activations``): it hooks named modules, keeps inputs and/or outputs (untupled,
detached, cloned, optionally reduced inside the hook) and removes every hook in ``finally``.

``capture_activations`` (A-side) and ``capture_labels`` (B-side, the only capture that sees the
delta) run each condition as ONE forward pass that records everything needed from it:

=================  =======================  ===========================================
condition          text                     recorded
=================  =======================  ===========================================
clean (FIT)        raw probe                block outputs, up_proj input (last token)
persona+ (FIT)     chat, system=persona+    block outputs (last token and every token),
persona- (FIT)     chat, system=persona-    up_proj input and output (last token),
                                            final token's attention (mean over heads)
sink               the sink token alone     the attention norm's output (attention_sink)
alpha=+1           raw probe, FIT + EVAL    block outputs (last token)
alpha=-1           raw probe, FIT + EVAL    block outputs (last token)
=================  =======================  ===========================================

So ``capture_activations`` makes 4 forward passes (the sink's is one token long) and
``capture_labels`` 2 (with the default ``batch_size=None``; with a batch size each prompt
condition takes ``ceil(n / batch_size)``).
``count_forward_passes`` counts them.

Padding: the last real token is found from the attention mask, so left and right padding both
work, and position ids are computed from the mask (``cumsum - 1``) so every prompt sees the
positions it would see alone. A prompt's captures then match its unbatched captures; on the
CPU with the tiny model they are even bit-identical, but that is not guaranteed (batched
kernels of other shapes or devices may reassociate sums), so tests compare with atol 1e-5.

Raw probe text is tokenised with the tokenizer's default special tokens (the seed's convention;
Qwen adds none); chat-template text with ``add_special_tokens=False``, since the template
already holds them. A model without a chat template (a base model) gets the persona conditions in
the plain-text format of SPEC §8 (``chat_texts``: the persona, a blank line, the probe, "Answer:"),
tokenised like raw text (its BOS added).

Token-level tensors are right-aligned: position ``T-1`` is the last real token of every prompt,
``T`` is the longest prompt of the two persona conditions, and positions before a prompt's first
token are zero (in ``tokens_*`` and ``attn_*``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .capture_types import ActivationCaptures, SteeredLabels
from .compute import forward_pass_memory
from .errors import InputError
from .arch import architecture_of, fused_rows
from .model import attention_sink_token_id, block_name, model_device, n_layers_of, projection_weight, write_gains
from .prompts import ProbeSet, plain_prompt
from .steering import weight_steer

# ---------------------------------------------------------------- hooks


@dataclass
class Recording:
    """What ``record_activations`` kept: module name -> one tensor per call of that module."""

    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)

    @staticmethod
    def _one(store: dict[str, list[Tensor]], name: str, what: str) -> Tensor:
        got = store.get(name)
        if got is None:
            raise KeyError(f"no {what} recorded for module '{name}'")
        if len(got) != 1:
            raise RuntimeError(f"module '{name}' ran {len(got)} times; use .{what}s['{name}'] for every call")
        return got[0]

    def input(self, name: str) -> Tensor:
        return self._one(self.inputs, name, "input")

    def output(self, name: str) -> Tensor:
        return self._one(self.outputs, name, "output")


def _first_input(args: tuple, kwargs: dict) -> Tensor | None:
    if args:
        return args[0]
    # HF calls some modules with keyword arguments only (e.g. self_attn(hidden_states=...)).
    for key in ("hidden_states", "x", "input", "inputs_embeds"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    return next((v for v in kwargs.values() if isinstance(v, Tensor)), None)


def _untuple(value: object, index: int) -> object:
    if isinstance(value, (tuple, list)):
        return value[index] if len(value) > index else None
    # transformers 5 decoder layers return a bare Tensor; a tuple index would pick batch row 0.
    if hasattr(value, "to_tuple") and not isinstance(value, Tensor):
        return value.to_tuple()[index]
    return value


@contextmanager
def record_activations(
    model: nn.Module,
    module_names: Sequence[str],
    *,
    inputs: bool = False,
    outputs: bool = True,
    index: int = 0,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[Recording]:
    """Record the (first positional) input and/or output of each named module on every call.

    A tuple output is reduced to its element ``index`` (0: hidden states; 1 on an attention
    module: the attention weights). Each kept tensor is detached, passed through ``transform``
    (e.g. a last-token gather, done inside the hook so full activations are never stored), and
    cloned. It stays on the model's device and dtype. All hooks are removed on exit, also when
    the forward pass raises.
    """
    if module_names and not inputs and not outputs:
        raise ValueError("record_activations: nothing to record (inputs=False, outputs=False)")
    modules = dict(model.named_modules())
    missing = [n for n in module_names if n not in modules]
    if missing:
        raise InputError(f"{type(model).__name__} has no module(s) {', '.join(repr(m) for m in missing)}")
    rec = Recording()

    def keep(name: str, what: str, value: object) -> Tensor:
        if not isinstance(value, Tensor):
            raise InputError(
                f"module '{name}' gave no tensor {what} (got {type(value).__name__})"
                + ("; attention weights need attn_implementation='eager'" if what == "output" and index else "")
            )
        value = value.detach()
        if transform is not None:
            value = transform(value)
        return value.clone()

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            if inputs:
                rec.inputs.setdefault(name, []).append(keep(name, "input", _first_input(args, kwargs)))
            if outputs:
                rec.outputs.setdefault(name, []).append(keep(name, "output", _untuple(output, index)))

        return hook

    handles = []
    try:
        for name in module_names:
            handles.append(modules[name].register_forward_hook(make_hook(name), with_kwargs=True))
        yield rec
    finally:
        for h in handles:
            h.remove()


@dataclass
class ForwardCounter:
    n: int = 0


@contextmanager
def count_forward_passes(model: nn.Module) -> Iterator[ForwardCounter]:
    """Count forward passes of ``model`` (calls of its input embedding) inside the block."""
    counter = ForwardCounter()

    def pre_hook(module, args):
        counter.n += 1

    handle = model.get_input_embeddings().register_forward_pre_hook(pre_hook)
    try:
        yield counter
    finally:
        handle.remove()


# ---------------------------------------------------------------- token positions


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token of each row, for left or right padding. ``(B,)`` long."""
    mask = attention_mask.to(torch.long)
    pos = torch.arange(mask.shape[1], device=mask.device)
    if bool((mask.sum(1) == 0).any()):
        raise InputError("a prompt tokenised to zero tokens")
    return (mask * (pos + 1)).argmax(1)


def _check_contiguous(mask: Tensor, last: Tensor) -> Tensor:
    lengths = mask.to(torch.long).sum(1)
    first = last - lengths + 1
    pos = torch.arange(mask.shape[1], device=mask.device)
    expected = (pos[None, :] >= first[:, None]) & (pos[None, :] <= last[:, None])
    if not torch.equal(expected, mask.bool()):
        raise InputError("attention mask with holes: only left or right padding is supported")
    return lengths


def right_align(x: Tensor, last: Tensor, lengths: Tensor, T: int) -> Tensor:
    """``(B, S, *rest) -> (B, T, *rest)``: each row's real tokens end at position ``T-1``, zeros before."""
    B = x.shape[0]
    offs = torch.arange(T, device=x.device) - (T - 1)
    src = last.to(x.device)[:, None] + offs[None, :]  # (B, T)
    valid = src >= (last - lengths + 1).to(x.device)[:, None]
    idx = src.clamp(min=0).view(B, T, *([1] * (x.dim() - 2))).expand(B, T, *x.shape[2:])
    out = x.gather(1, idx)
    return out * valid.view(B, T, *([1] * (x.dim() - 2))).to(out.dtype)


def _left_pad_time(x: Tensor, T: int) -> Tensor:
    """Pad a right-aligned ``(L, n, t, ...)`` tensor with zeros on the left to ``t = T``."""
    t = x.shape[2]
    if t == T:
        return x
    pad = x.new_zeros(*x.shape[:2], T - t, *x.shape[3:])
    return torch.cat([pad, x], dim=2)


# ---------------------------------------------------------------- fused passes


@dataclass(frozen=True)
class _Want:
    block_in: bool = False
    up_in: bool = False
    up_out: bool = False
    tokens: bool = False
    attn: bool = False
    token_layers: tuple[int, ...] | None = None  # the layers of the token-level captures; None: all


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_texts(tokenizer, prompts: Sequence[str], system: str) -> list[str]:
    """Each prompt asked with system = ``system``, where the model answers: the chat template
    (user = prompt, generation prompt added), or for a model without one (a base model) the
    plain-text format of SPEC §8 (``prompts.plain_prompt``: the system text, the prompt, the cue)."""
    if not has_chat_template(tokenizer):
        return [plain_prompt(p, system) for p in prompts]
    return [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": p}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in prompts
    ]


@contextmanager
def _eager_attention(model: nn.Module, needed: bool):
    """Attention weights exist only with eager attention (sdpa returns none): switch for the block."""
    before = getattr(model.config, "_attn_implementation", None)
    switch = needed and before != "eager"
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def encode(tokenizer, texts: Sequence[str], *, chat: bool):
    """The padded batch a forward pass sees: raw text with the tokenizer's default special tokens,
    chat-template text without (the template holds them)."""
    return tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=not chat)


def _one_pass(model: nn.Module, tokenizer, texts: Sequence[str], want: _Want, *, chat: bool) -> dict[str, Tensor]:
    """One forward pass over ``texts``; every returned tensor is float32 on the CPU, layer-first."""
    dev = model_device(model)
    enc = encode(tokenizer, texts, chat=chat)
    ids = enc["input_ids"].to(dev)
    mask = enc["attention_mask"].to(dev)
    last = last_token_index(mask)
    lengths = _check_contiguous(mask, last)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    B = ids.shape[0]
    rows = torch.arange(B, device=dev)
    L = n_layers_of(model)
    arch = architecture_of(model.config)
    blocks = [block_name(i) for i in range(L)]
    # What the MLP reads (its input: the normed residual) and the up projection's output (the up
    # rows of a fused gate_up projection).
    mlps = [f"{block_name(i)}.{arch.mlp}" for i in range(L)]
    up_path, up_part = arch.projection("up")
    ups = [f"{block_name(i)}.{up_path}" for i in range(L)]
    up_rows = fused_rows(arch, "up", model.config) if up_part is not None else slice(None)
    token_layers = list(range(L)) if want.token_layers is None else list(want.token_layers)
    token_blocks = [blocks[i] for i in token_layers]
    attns = [f"{block_name(i)}.{arch.attention}" for i in token_layers]

    def at_last(x: Tensor) -> Tensor:
        return x[rows, last]

    def final_attn(w: Tensor) -> Tensor:  # (B, H, S, S) -> (B, S): final query row, mean over heads
        return w[rows, :, last, :].float().mean(1)

    with (
        torch.no_grad(),
        _eager_attention(model, want.attn),
        record_activations(model, blocks, inputs=want.block_in, transform=at_last) as rb,
        record_activations(model, token_blocks if want.tokens else []) as rt,
        record_activations(model, mlps if want.up_in else [], inputs=True, outputs=False, transform=at_last) as rm,
        record_activations(model, ups if want.up_out else [], transform=lambda x: at_last(x)[..., up_rows]) as ru,
        record_activations(model, attns if want.attn else [], index=1, transform=final_attn) as ra,
    ):
        # The decoder alone: no capture needs logits. (Not logits_to_keep=1: its strided
        # last-position slice sends torch's CPU bf16 linear down a path ~300x slower, 16 s a pass.)
        model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)

    f32 = lambda xs: torch.stack([x.float().cpu() for x in xs])  # noqa: E731
    out: dict[str, Tensor] = {"blocks": f32([rb.output(n) for n in blocks])}
    if want.tokens:
        # Filled layer by layer, each recorded output released once copied: the recording and
        # the result never both hold every layer (one (L_tok, B, T, d) float32 tensor).
        T = int(lengths.max())
        out["tokens"] = torch.empty(len(token_blocks), B, T, out["blocks"].shape[-1], dtype=torch.float32)
        for i, n in enumerate(token_blocks):
            out["tokens"][i] = right_align(rt.output(n), last, lengths, T).float().cpu()
            rt.outputs[n].clear()
    if want.block_in:
        out["block_in"] = f32([rb.input(n) for n in blocks])
    if want.up_in:
        out["up_in"] = f32([rm.input(n) for n in mlps])
    if want.up_out:
        out["up_out"] = f32([ru.output(n) for n in ups])
    if want.attn:
        T = int(lengths.max())
        out["attn"] = f32([right_align(ra.output(n), last, lengths, T) for n in attns])
    return out


def _run_condition(
    model: nn.Module, tokenizer, texts: Sequence[str], want: _Want, *, chat: bool, batch_size: int | None
) -> dict[str, Tensor]:
    """One pass per batch (one pass in all when ``batch_size`` is None), concatenated over prompts."""
    if not texts:
        raise InputError("no prompts to capture")
    bs = len(texts) if batch_size is None else int(batch_size)
    if bs < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    parts = [_one_pass(model, tokenizer, texts[i : i + bs], want, chat=chat) for i in range(0, len(texts), bs)]
    out = {}
    for key in parts[0]:
        xs = [p[key] for p in parts]
        if key in ("tokens", "attn"):
            T = max(x.shape[2] for x in xs)
            xs = [_left_pad_time(x, T) for x in xs]
        out[key] = torch.cat(xs, dim=1)
    return out


def a_side_conditions(tokenizer, probes: ProbeSet) -> dict[str, tuple[list[str], bool]]:
    """The A-side conditions as (texts, chat): everything of the prompts the A-side sees (``chat``:
    chat-template text, which holds its own special tokens)."""
    fit = list(probes.fit)
    templated = has_chat_template(tokenizer)
    return {
        "clean": (fit, False),
        "persona_pos": (chat_texts(tokenizer, fit, probes.persona_pos), templated),
        "persona_neg": (chat_texts(tokenizer, fit, probes.persona_neg), templated),
    }


def capture_sink(model: nn.Module, token_id: int) -> Tensor:
    """(L, d) float32: the token ``token_id`` alone at position 0, as each layer's attention reads
    it (the attention module's input: its norm's output, or the raw residual where a block has no
    norm in front of attention). At position 0 a token attends only to itself, so this is also
    its residual at the start of any prompt it begins (one forward pass)."""
    dev = model_device(model)
    ids = torch.tensor([[int(token_id)]], device=dev)
    arch = architecture_of(model.config)
    names = [f"{block_name(i)}.{arch.attention}" for i in range(n_layers_of(model))]
    with torch.no_grad(), record_activations(model, names, inputs=True, outputs=False, transform=lambda x: x[0, 0]) as rec:
        model.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids),
                    use_cache=False)
    return torch.stack([rec.input(n).float().cpu() for n in names])


def capture_activations(
    model: nn.Module, tokenizer, probes: ProbeSet, *, batch_size: int | None = None,
    token_layers: Sequence[int] | None = None,
) -> ActivationCaptures:
    """A-side captures on the FIT prompts: clean, persona+ and persona-, and the sink token
    (4 forward passes). ``token_layers``: the layers whose every position (and the final token's
    attention) is kept, the largest captures; default every layer (the sweep keeps the scored ones)."""
    tl = None if token_layers is None else tuple(sorted({int(x) for x in token_layers}))
    full = _Want(up_in=True, up_out=True, tokens=True, attn=True, token_layers=tl)
    want = {"clean": _Want(up_in=True), "persona_pos": full, "persona_neg": full}
    with forward_pass_memory():
        got = {
            name: _run_condition(model, tokenizer, texts, want[name], chat=chat, batch_size=batch_size)
            for name, (texts, chat) in a_side_conditions(tokenizer, probes).items()
        }
    clean, pos, neg = got["clean"], got["persona_pos"], got["persona_neg"]
    T = max(pos["tokens"].shape[2], neg["tokens"].shape[2])

    arch = architecture_of(model.config)

    def written(up_out: Tensor) -> Tensor:  # (L, n, d_mlp) -> (L, n, d): x_up @ (diag(γ_post) W_down)^T per layer
        out = []
        for i in range(up_out.shape[0]):
            down = projection_weight(model, arch, i, "down").detach().float().cpu()
            gain = write_gains(model, i).get("down_proj")
            out.append(up_out[i] @ (down if gain is None else down * gain[:, None]).T)
        return torch.stack(out)

    return ActivationCaptures(
        clean=clean["blocks"],
        persona_pos=pos["blocks"],
        persona_neg=neg["blocks"],
        up_in_clean=clean["up_in"],
        up_in_pos=pos["up_in"],
        up_in_neg=neg["up_in"],
        up_written_pos=written(pos["up_out"]),
        up_written_neg=written(neg["up_out"]),
        tokens_pos=_left_pad_time(pos["tokens"], T),
        tokens_neg=_left_pad_time(neg["tokens"], T),
        attn_pos=_left_pad_time(pos["attn"], T),
        attn_neg=_left_pad_time(neg["attn"], T),
        sink=capture_sink(model, attention_sink_token_id(model, tokenizer)),
        token_layers=tl,
    )


LABEL_KINDS = ("block_output", "block_local")


def capture_labels(
    model: nn.Module,
    tokenizer,
    delta: Mapping[str, Tensor],
    probes: ProbeSet,
    *,
    batch_size: int | None = None,
    label: str = "block_output",
) -> SteeredLabels:
    """B-side label: block outputs at alpha=+1 minus alpha=-1, raw text, last token (2 passes).

    ``label="block_local"`` takes the change of (block output - block input) instead: what the
    block itself writes, without what earlier steered layers already changed upstream.
    FIT and EVAL prompts share one pass per sign. The delta is validated first; the model is
    restored bit for bit afterwards.
    """
    from .delta import validate_delta

    if label not in LABEL_KINDS:
        raise InputError(f"label must be one of {LABEL_KINDS}, got {label!r}")
    validate_delta(delta, model)
    texts = list(probes.fit) + list(probes.eval)
    want = _Want(block_in=True)  # both kinds from the same passes (the scope diagnostic reads both)
    steered: dict[tuple[float, str], Tensor] = {}
    for alpha in (+1.0, -1.0):
        with forward_pass_memory(), weight_steer(model, delta, alpha):
            got = _run_condition(model, tokenizer, texts, want, chat=False, batch_size=batch_size)
        steered[alpha, "block_output"] = got["blocks"]
        steered[alpha, "block_local"] = got["blocks"] - got["block_in"]
    diffs = {kind: steered[+1.0, kind] - steered[-1.0, kind] for kind in LABEL_KINDS}
    n_fit = len(probes.fit)
    return SteeredLabels(
        eval=diffs[label][:, n_fit:].contiguous(), fit=diffs[label][:, :n_fit].contiguous(),
        eval_cumulative=diffs["block_output"][:, n_fit:].contiguous(),
        eval_local=diffs["block_local"][:, n_fit:].contiguous(),
        eval_midpoint=((steered[+1.0, "block_output"] + steered[-1.0, "block_output"]) / 2)[:, n_fit:].contiguous(),
    )
