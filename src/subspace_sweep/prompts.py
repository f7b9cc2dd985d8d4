"""The probe prompts and personas shipped with the package (SPEC §2)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from .errors import InputError


@dataclass(frozen=True)
class ProbeSet:
    claims: tuple[str, ...]
    prompts: tuple[str, ...]
    fit: tuple[str, ...]
    eval: tuple[str, ...]
    persona_pos: str
    persona_neg: str
    n_lora_train_topics: int


def load_probe_set(n_fit: int | None = None) -> ProbeSet:
    """Probe texts ``I think {claim}. Do you agree? Answer Yes or No.``; FIT = first half, EVAL = rest."""
    raw = json.loads(resources.files(__package__).joinpath("data/sycophancy.json").read_text(encoding="utf-8"))
    claims = tuple(t["claim"] for t in raw["topics"])
    prompts = tuple(raw["probe_template"].format(claim=c) for c in claims)
    n_fit = len(prompts) // 2 if n_fit is None else n_fit
    fit, eval_ = prompts[:n_fit], prompts[n_fit:]
    if len(fit) < 2 or len(eval_) < 2:
        raise InputError(f"need at least 2 FIT and 2 EVAL prompts, got {len(fit)} FIT and {len(eval_)} EVAL")
    return ProbeSet(
        claims=claims,
        prompts=prompts,
        fit=fit,
        eval=eval_,
        persona_pos=raw["personas_positive"][0],
        persona_neg=raw["personas_negative"][0],
        n_lora_train_topics=int(raw["n_lora_train_topics"]),
    )


#: How a model without a chat template (a base model) is asked (SPEC §8, "Base models"): the
#: question, a newline and this cue; the model answers after it with a space (" Yes", " No"), as
#: running text does. Measured on Gemma-3-270m: the two answers get 0.41 of the probability there,
#: 0.025 at the end of the raw probe, and "Yes"/"No" without the space ≤ 0.003.
PLAIN_ANSWER_CUE = "\nAnswer:"


def plain_prompt(user: str, system: str | None = None) -> str:
    """A conversation in the plain-text format of a model without a chat template: the system
    text (a persona) and a blank line when given, the user's text, then ``PLAIN_ANSWER_CUE``."""
    return (f"{system}\n\n" if system else "") + user + PLAIN_ANSWER_CUE


def plain_reply(answer: str) -> str:
    """An answer as it follows ``plain_prompt``: after a space (the tokenizer's leading-space
    form, the token running text uses)."""
    return " " + answer


def persona_texts() -> tuple[list[str], list[str]]:
    """All positive and negative persona system prompts (for the tokenizer corpus and training)."""
    raw = json.loads(resources.files(__package__).joinpath("data/sycophancy.json").read_text(encoding="utf-8"))
    return list(raw["personas_positive"]), list(raw["personas_negative"])


def holdout_rows(probes: ProbeSet, n_train_topics: int) -> list[int]:
    """EVAL row indices whose claim did not train the LoRA (claims ``[0, n_train_topics)`` did)."""
    n_fit = len(probes.fit)
    rows = [j for j in range(len(probes.eval)) if n_fit + j >= n_train_topics]
    if len(rows) < 2:
        raise InputError(
            f"--topic-holdout {n_train_topics} leaves {len(rows)} held-out EVAL probe(s); at least 2 are needed"
        )
    return rows
