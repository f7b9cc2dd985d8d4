"""Small shared helpers for tests that run the tiny model (kept here so test files stay short)."""

from __future__ import annotations

import dataclasses

from torch import nn

from subspace_sweep.prompts import ProbeSet, load_probe_set


def small_probes(n_fit: int = 3, n_eval: int = 3) -> ProbeSet:
    """The shipped probe set cut to ``n_fit`` FIT and ``n_eval`` EVAL prompts (fast captures)."""
    p = load_probe_set()
    return dataclasses.replace(p, fit=p.fit[:n_fit], eval=p.eval[:n_eval])


def probes_with_fit(fit: list[str] | tuple[str, ...], n_eval: int = 2) -> ProbeSet:
    p = load_probe_set()
    return dataclasses.replace(p, fit=tuple(fit), eval=p.eval[:n_eval])


def hook_count(model: nn.Module) -> int:
    """Every forward / pre-forward hook registered on any submodule."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n


#: The LoRA pair every test that needs a trained one shares (``conftest.lora_pair``). One thread:
#: as fast as two on the tiny model, and immune to spin-waiting when another process shares the CPU.
LORA_TRAIN = dict(layers=(1, 2), steps=30, seed=0, num_threads=1)
