"""Small shared helpers for tests that run the tiny model (kept here so test files stay short)."""

from __future__ import annotations

import dataclasses

import torch
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


def effective_parameters(pm, base) -> dict[str, torch.Tensor]:
    """Every base parameter as the UNMERGED peft model computes with it: each Linear probed
    through its (wrapped) forward, W = f(I) − f(0), b = f(0); every other parameter as stored.
    An independent route from merge_and_unload."""
    out = {}
    inner = pm.get_base_model()
    linear_names = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        for name in linear_names:
            mod = inner.get_submodule(name)
            n_in = base.get_submodule(name).in_features
            zero = mod(torch.zeros(1, n_in))[0]
            out[f"{name}.weight"] = (mod(torch.eye(n_in)) - zero).T
            if base.get_submodule(name).bias is not None:
                out[f"{name}.bias"] = zero
    for name, p in base.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner not in linear_names:
            out[name] = dict(inner.named_parameters()).get(name, p).detach()
    return out


def materialized(model: nn.Module, delta, alpha: float) -> nn.Module:
    """A deep copy of ``model`` with ``θ + α·w`` written into its parameters (the eager steering
    ``weight_steer`` must compute like): an independent reference for the streamed one."""
    import copy

    from subspace_sweep.steering import steered_value

    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters(remove_duplicate=False))
    sums: dict[int, tuple[nn.Parameter, list[torch.Tensor]]] = {}
    for k, w in delta.items():
        sums.setdefault(id(params[k]), (params[k], []))[1].append(w)
    with torch.no_grad():
        for p, ws in sums.values():
            p.copy_(steered_value(p.detach(), ws, alpha))
    return ref


class SeenWeights:
    """What each module's own parameters hold while its forward runs: a pre-hook registered
    after any steering hooks (so it runs after them) clones them per call, by parameter name."""

    def __init__(self, model: nn.Module):
        self.model, self.seen, self.handles = model, {}, []

    def __enter__(self):
        for name, module in self.model.named_modules():
            if module._parameters:
                def probe(mod, _args, name=name):
                    for pname, p in mod._parameters.items():
                        if p is not None:
                            self.seen.setdefault(f"{name}.{pname}" if name else pname, p.detach().clone())
                self.handles.append(module.register_forward_pre_hook(probe))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
