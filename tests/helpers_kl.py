"""The KL of greedy continuations computed the slow way, to hold ``strength.ContinuationKL`` to."""

from __future__ import annotations

import torch

from subspace_sweep.steering import weight_steer


def teacher_forced_kl(model, prompt_ids: list[list[int]], delta, alpha: float, n_tokens: int,
                      stops: set[int]) -> list[torch.Tensor]:
    """Per prompt (its token ids, alone: no padding, no cache), the per-position KL(steered ‖ model)
    over the steered model's greedy continuation: tokens chosen one full pass at a time, up to a stop
    token (which counts), then one full pass of each model over prompt + tokens; float64."""
    out = []
    for row in prompt_ids:
        ids = torch.tensor([row])
        with torch.no_grad():
            for _ in range(n_tokens):
                with weight_steer(model, delta, alpha):
                    nxt = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
                if int(nxt) in stops:
                    break
            with weight_steer(model, delta, alpha):
                s = model(input_ids=ids).logits[0].double().log_softmax(-1)
            r = model(input_ids=ids).logits[0].double().log_softmax(-1)
        pos = slice(len(row) - 1, ids.shape[1] - 1)
        out.append((s[pos].exp() * (s[pos] - r[pos])).sum(-1))
    return out


def meter_prompt_ids(meter) -> list[list[int]]:
    """The prompts' token ids as a ``ContinuationKL`` encoded them, left padding stripped."""
    return [meter.ids[i][meter.mask[i].bool()].tolist() for i in range(meter.ids.shape[0])]
