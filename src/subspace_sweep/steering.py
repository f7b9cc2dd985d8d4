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

    The sum is formed in the wider of float32 and the parameter's dtype and cast to the
    parameter's dtype: in float32 for half and float32 parameters (a float32 delta on a bf16
    model is rounded once, not twice), in float64 for a float64 parameter (``alpha * w`` is not
    rounded through float32). On exit — normal or by exception — every touched parameter is
    restored from a saved copy: subtracting ``alpha * w`` again would not undo the rounding.
    Keys and shapes are checked before anything is changed.
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
                    work = torch.promote_types(torch.float32, p.dtype)
                    base = acc.get(id(p))
                    if base is None:
                        base = p.detach().to(work)
                    acc[id(p)] = base + float(alpha) * delta[k].detach().to(device=p.device, dtype=work)
                for pid, new in acc.items():
                    p = originals[pid][0]
                    p.copy_(new.to(p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for p, orig in originals.values():
                p.copy_(orig)
