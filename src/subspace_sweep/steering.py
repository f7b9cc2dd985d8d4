"""Weight steering ``W ← W + α·w`` as a context manager that restores the model bit for bit."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .delta import check_keys_and_shapes


@contextmanager
def weight_steer(model: nn.Module, delta: Mapping[str, Tensor], alpha: float) -> Iterator[nn.Module]:
    """Add ``alpha * delta[k]`` to each parameter ``k`` for the duration of the block.

    The sum is formed in float32 and cast to the parameter's dtype (a float32 delta on a bf16
    model is rounded once, not twice). On exit — normal or by exception — every touched
    parameter is restored from a saved copy: subtracting ``alpha * w`` again would not undo the
    rounding. Keys and shapes are checked before anything is changed.
    """
    params = check_keys_and_shapes(delta, model)
    # Tied aliases (lm_head.weight / embed_tokens.weight) are one tensor: save it once, before
    # any change, and add each key's delta to it.
    originals: dict[int, tuple[nn.Parameter, Tensor]] = {}
    for p in params.values():
        originals.setdefault(id(p), (p, p.detach().clone()))
    try:
        with torch.no_grad():
            if alpha != 0:
                acc: dict[int, Tensor] = {}
                for k, p in params.items():
                    base = acc.get(id(p))
                    if base is None:
                        base = p.detach().to(torch.float32)
                    acc[id(p)] = base + float(alpha) * delta[k].detach().to(device=p.device, dtype=torch.float32)
                for pid, new in acc.items():
                    p = originals[pid][0]
                    p.copy_(new.to(p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for p, orig in originals.values():
                p.copy_(orig)
