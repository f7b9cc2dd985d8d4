"""Weight steering ``W ← W + α·w`` as a context manager that leaves the model bit for bit as it was."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from .delta import check_keys_and_shapes


def steered_value(base: Tensor, increments: list[Tensor], alpha: float) -> Tensor:
    """``base + α·Σ increments`` formed in the wider of float32 and ``base``'s dtype, cast once to it.

    In float32 for half and float32 parameters (a float32 delta on a bf16 model is rounded once,
    not twice), in float64 for a float64 parameter (``α·w`` is not rounded through float32).
    Increments add in order (a tied parameter named twice in one delta gets both).
    """
    work = torch.promote_types(torch.float32, base.dtype)
    acc = base.detach().to(work)
    for w in increments:
        acc = acc + float(alpha) * w.detach().to(device=base.device, dtype=work)
    return acc.to(base.dtype)


@contextmanager
def weight_steer(model: nn.Module, delta: Mapping[str, Tensor], alpha: float) -> Iterator[nn.Module]:
    """Inside the block the model computes with ``θ + α·w``, one module at a time.

    Each module that owns a steered parameter gets a forward pre-hook that forms its steered value
    (``steered_value``) and points the parameter at it, and a forward hook that points it back:
    only one module's steered weights exist at any moment (a copy of every touched parameter, as
    before, was the sweep's largest allocation: 2x the delta, 5 GiB at Qwen3-1.7B shapes). The
    original tensors are never written, so restoring is re-pointing, bit for bit by
    construction; on exit, normal or by exception (also one raised inside a module's forward),
    every touched parameter is pointed back at its original tensor and every hook removed.

    A forward sees exactly the weights an in-place ``W + α·w`` would give it, so outputs are
    bit-identical to that. Reading a parameter outside its module's forward (``state_dict()``
    inside the block) sees θ. Blocks nest: the inner block's sum is formed on the outer's steered
    value, and its hook restores first (prepended). Keys and shapes are checked before anything
    is changed.
    """
    params = check_keys_and_shapes(delta, model)
    # Tied aliases (lm_head.weight / embed_tokens.weight) are one tensor: every key's delta adds to it.
    increments: dict[int, list[Tensor]] = {}
    originals: dict[int, tuple[nn.Parameter, Tensor]] = {}
    for k, p in params.items():
        increments.setdefault(id(p), []).append(delta[k])
        originals.setdefault(id(p), (p, p.data))
    with ExitStack() as stack:
        stack.callback(_point_back, originals)
        if alpha != 0:
            for module in model.modules():
                owned = [p for p in module._parameters.values() if p is not None and id(p) in increments]
                if owned:
                    _hook(stack, module, owned, increments, alpha)
        yield model


def _point_back(originals: Mapping[int, tuple[nn.Parameter, Tensor]]) -> None:
    with torch.no_grad():
        for p, tensor in originals.values():
            p.data = tensor


def _hook(stack: ExitStack, module: nn.Module, owned: list[nn.Parameter], increments: Mapping[int, list[Tensor]],
          alpha: float) -> None:
    replaced: list[list[Tensor]] = []  # one entry per forward in flight (LIFO)

    def swap_in(_module, _args):
        with torch.no_grad():
            replaced.append([p.data for p in owned])
            for p in owned:
                p.data = steered_value(p.data, increments[id(p)], alpha)

    def swap_back(_module, _args, _output):
        with torch.no_grad():
            for p, tensor in zip(owned, replaced.pop()):
                p.data = tensor

    stack.enter_context(module.register_forward_pre_hook(swap_in))
    stack.enter_context(module.register_forward_hook(swap_back, prepend=True))
