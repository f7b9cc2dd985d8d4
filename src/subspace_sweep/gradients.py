"""Gradient bases (SPEC §13, issue 34): the base model's own loss gradient at its residual writers.

The seed's 43 bases see the base model's weights and its activations on the shipped prompts. A
basis may also see the behaviour's training examples without seeing the trained pair: the
direction in which the base model's own loss on the behaviour would move each residual writer,
before any training. These bases are A-side (never the delta's values) but data-aware: their
``sees`` column says "behaviour data" in every table (``candidates.FAMILY_SEES``).

**The gradient.** For a loss L, ``writer_gradients`` returns ``G_T = ∂L/∂W_T`` of each residual
writer T (the o_proj and down_proj weights of the scored layers) at the base model: one forward and
one backward pass, only those weights requiring grad (restored afterwards; nothing is written to
``.grad``, no optimiser). L is the loss ``subspace-sweep train`` trains on, on its examples: the mean
next-token cross-entropy of the answer tokens (``lora_train.assistant_loss``) of the chat examples
``lora_train.training_texts`` / ``behaviour_training_texts`` build, encoded by
``lora_train.encode_examples`` (called, not copied: a cheaper loss or another prompt format there is
this module's too).

**The basis.** ``gradient_basis``: the Ky Fan oracle (top-r eigenvectors) of the gradient's combined
weight target, ``delta.weight_targets`` with the gradient in place of the delta: per layer
``Σ_T G̃_T G̃_Tᵀ / ‖G̃_T‖²_F``, ``G̃_T = diag(γ_post)·G_T`` behind a post-projection norm (SPEC §4.1),
each writer balanced as the delta's own target is. The top of a d x d Gram, never an SVD of the wide
matrix.

**Variants** (``GRAD_NAMES``): ``grad_behaviour`` (``∇L⁻ − ∇L⁺`` on the pair's training examples),
``grad_shared`` (``∇L⁻ + ∇L⁺``: what both adapters learn), ``grad_heldout`` (``∇L⁻ − ∇L⁺`` on the
examples the pair did not train on only: the shipped claims after the first ``n_train``, or the
``--behaviour`` lines after them), ``grad_neutral`` (the next-token loss of every prompt token of the
training examples, without the answers: a control) and ``grad_behaviour_family`` (below).

**Why the first gradient predicts a trained delta.** One plain SGD step from θ moves a full weight by
``−η∇L``: the pair's ``w = θ⁺ − θ⁻`` is ``η(∇L⁻ − ∇L⁺)`` exactly. An adapter moves only its own
parameters, and its first step's delta is the full gradient seen through its parametrization
(``family_matrix``):
- LoRA, ``ΔW = s·B·A`` with B = 0 at init: ``∂L/∂B = s·∇_W L·Aᵀ`` and ``∂L/∂A = 0``, so the first step
  gives ``ΔW = −η s²·∇_W L·AᵀA``: inside the full gradient's column span, compressed by the init's A.
  The variant rebuilds that A (``adapter_layers``: the recorded peft config, seeded as
  ``lora_train.train_lora_adapter`` seeds it) rather than arguing from its law: for an iid init
  ``E[(AᵀA)²] = c·I``, so the full-weight variant is the LoRA variant's expectation over inits, and the
  actual A is what the trained pair had.
- IA3 (peft: a feed-forward module scales its input, ``W·diag(l)``; any other its output,
  ``diag(l)·W``; l = 1 at init): ``∂L/∂l_j = Σ_i (∇_W L ⊙ W)_ij`` resp. ``∂L/∂l_i = Σ_j (∇_W L ⊙ W)_ij``,
  and the first step's delta is ``W·diag(Δl)`` resp. ``diag(Δl)·W``: exact, IA3 is linear in l.
- OFT (peft: the input is rotated block-wise, ``W' = W·R_bdᵀ``, ``R = I + 2Q + O(Q²)`` from the skew
  generator Q = 0 at init, parametrized by its upper triangle): ``ΔW ∝ W·P(WᵀG − GᵀW)`` to first order
  in η, P keeping the rotation's diagonal blocks (their sum over blocks with ``block_share``).
Other families (DoRA, PiSSA, BOFT, ...) are not modelled: their variant is empty and says why.

**Cost.** One forward and one backward pass per loss (L⁺ and L⁻ on the training examples, L⁺ and L⁻
on the held-out ones, the neutral loss: 5 of each, in batches of ``GRADIENT_BATCH`` examples), one
d x d eigenproblem per variant and layer; the family variant rebuilds the adapter's init on an
uninitialised CPU copy of the architecture (no forward pass). With a cache folder (``run
--a-side-cache DIR``) the four delta-free variants and ∇L⁻ − ∇L⁺ per writer (what the family variant
reads) are an entry of their own beside the A-side's (``cache.cached``), keyed by the examples'
token ids, the training seed whose templates they follow, r and the layers: a study's jobs of one
seed, whatever their adapter family, and a rerun load it (0 passes, the same bits); the family
variant is rebuilt from each delta's adapter record.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from . import cache, compute, linalg
from .candidates import GRAD_NAMES, Candidate, get_spec
from .capture import count_forward_passes
from .errors import InputError
from .lora_train import assistant_loss, behaviour_training_texts, encode_examples, training_texts
from .model import WRITER_PROJS, weight_key, write_gains
from .prompts import ProbeSet
from .delta import weight_targets

#: Examples per forward/backward pass (the shipped probes' 20 training claims are one pass, like
#: one full-batch training step); a larger behaviour file is summed over passes, each weighted by
#: its share of the predicted tokens (the gradient of the mean over all of them).
GRADIENT_BATCH = 32
#: The peft types whose first step ``family_matrix`` models.
MODELLED_FAMILIES = ("LORA", "IA3", "OFT")
#: The adapter name peft gives the one adapter of ``get_peft_model``.
ADAPTER_NAME = "default"


# ------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class BehaviourData:
    """The behaviour's training-format examples (``lora_train``'s), per sign: those the pair trained on
    and those it did not (``held_out``, possibly empty), and where they come from."""

    source: str
    train: dict[int, list[dict]]
    held_out: dict[int, list[dict]]
    seed: int = 0  # the training seed whose answer-template rotation the shipped probes' examples follow


def behaviour_data(probes: ProbeSet, behaviour: str | None = None, n_train: int | None = None,
                   seed: int = 0) -> BehaviourData:
    """The examples ``subspace-sweep train`` trains on: the shipped claims' (the first ``n_train``,
    default ``n_lora_train_topics``; held out: the claims after them), in the answer templates'
    rotation of training seed ``seed`` (``training_texts``), or a behaviour file's (the first
    ``n_train`` lines, default all; held out: the lines after them; no rotation)."""
    if behaviour is None:
        train = {s: training_texts(s, probes, n_train, seed) for s in (1, -1)}
        held = {s: training_texts(s, probes, n_train, seed, held_out=True) for s in (1, -1)}
        n = len(train[1])
        source = (f"the shipped sycophancy probes: claims 1..{n} trained the pair, "
                  f"{len(held[1])} held out (claims {n + 1}..{n + len(held[1])})"
                  + (f", the templates of training seed {seed}" if seed else ""))
    else:
        train = {s: behaviour_training_texts(s, behaviour, n_train) for s in (1, -1)}
        held = {s: behaviour_training_texts(s, behaviour, n_train, held_out=True) for s in (1, -1)}
        n = len(train[1])
        source = f"{behaviour}: lines 1..{n} trained the pair, {len(held[1])} held out"
        seed = 0  # a behaviour file's examples do not rotate
    return BehaviourData(source, train, held, seed)


def prompt_batch(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The prompts of an ``encode_examples`` batch with every prompt token a label and the answers
    cut off (masked: the batch stays right-padded): the neutral control's next-token loss."""
    prompt = (batch["attention_mask"] == 1) & (batch["labels"] == -100)
    return {"input_ids": batch["input_ids"], "attention_mask": prompt.to(batch["attention_mask"].dtype),
            "labels": torch.where(prompt, batch["input_ids"], torch.full_like(batch["input_ids"], -100))}


def _n_predicted(batch: Mapping[str, Tensor]) -> int:
    """Tokens the loss predicts (``assistant_loss`` reads labels[:, 1:])."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _rows(batch: Mapping[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    part = {k: v[start:stop] for k, v in batch.items()}
    width = int(part["attention_mask"].sum(1).max())  # the part's own padding only
    return {k: v[:, :width] for k, v in part.items()}


# ------------------------------------------------------------------------------- gradients


def writer_keys(layers: Sequence[int]) -> list[str]:
    """The residual writers' weight names at ``layers`` (o_proj, then down_proj, per layer)."""
    return [weight_key(layer, proj) for layer in layers for proj in WRITER_PROJS]


def writer_gradients(model: nn.Module, batch: Mapping[str, Tensor], layers: Sequence[int]) -> dict[str, Tensor]:
    """``∂L/∂W`` (float32, CPU) of each residual writer's weight at ``layers``, keyed by parameter name
    (a "gradient delta": ``delta.weight_targets`` reads it as it reads a delta), for L =
    ``assistant_loss(model, batch)`` at the model's current weights. Only those weights require grad,
    for the pass only; ``torch.autograd.grad`` leaves ``.grad`` alone. InputError when the batch
    predicts no token."""
    keys = writer_keys(layers)
    params = [model.get_parameter(k) for k in keys]
    total_tokens = _n_predicted(batch)
    if total_tokens == 0:
        raise InputError("the examples have no token to predict (every label is masked)")
    n = int(batch["input_ids"].shape[0])
    sums: list[Tensor | None] = [None] * len(params)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for start in range(0, n, GRADIENT_BATCH):
                part = batch if n <= GRADIENT_BATCH else _rows(batch, start, start + GRADIENT_BATCH)
                share = _n_predicted(part) / total_tokens
                if share == 0.0:
                    continue
                grads = torch.autograd.grad(assistant_loss(model, part), params)
                for i, g in enumerate(grads):
                    g = g.detach().to("cpu", torch.float32)
                    g = g if share == 1.0 else g * share
                    sums[i] = g if sums[i] is None else sums[i] + g
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return {k: g.contiguous() for k, g in zip(keys, sums)}  # type: ignore[union-attr]


def combine(a: Mapping[str, Tensor], b: Mapping[str, Tensor], sign: float) -> dict[str, Tensor]:
    """``a + sign·b`` key by key (the pair's ∇L⁻ − ∇L⁺ and ∇L⁻ + ∇L⁺)."""
    return {k: a[k] + sign * b[k] for k in a}


def gradient_target(gradient: Mapping[str, Tensor], layer: int, gains: Mapping[str, Tensor] | None = None):
    """The combined weight target of ``gradient`` at ``layer`` (``delta.weight_targets``), or None
    where no writer's gradient is nonzero there."""
    return weight_targets(gradient, layer, gains).get("combined")


def gradient_basis(gradient: Mapping[str, Tensor], layer: int, gains: Mapping[str, Tensor] | None, r: int,
                   d: int) -> Tensor:
    """The top-r eigenvectors of the gradient's combined weight target at ``layer`` (its Ky Fan
    oracle: directions of a zero eigenvalue dropped, so a rank-k gradient gives k columns); empty
    where the gradient is zero there."""
    target = gradient_target(gradient, layer, gains)
    return target.oracle_basis(r) if target is not None else linalg.empty_basis(d)


# ------------------------------------------------------------------------------- the adapter family


def family_of(record: Mapping | None) -> tuple[str | None, str]:
    """(the peft type whose first step ``family_matrix`` models, or None; a sentence saying what the
    family variant is built from, or why it is not built) for a delta's adapter record
    (``delta.adapter_record``)."""
    if record is None:
        return None, ("the delta records no adapter family (a delta not made by `subspace-sweep delta`, or a .pt "
                      "file): the full-weight variants only")
    config = record.get("config") or {}
    kind = str(record.get("peft_type") or config.get("peft_type") or "").upper()
    trained = ((record.get("training") or {}).get("pos") or {}).get("family")
    if not record.get("configs_agree", False):
        return None, "the two adapters' peft configs differ: no one family to model"
    if kind == "LORA":
        init = config.get("init_lora_weights", True)
        if config.get("use_dora"):
            return None, "a DoRA adapter (magnitude and column normalisation): not modelled"
        if trained == "pissa" or init not in (True, "gaussian"):
            return None, (f"a LoRA initialised by {trained if trained == 'pissa' else init!r} (B ≠ 0 at init or A from "
                          "the weights): not modelled")
        if record.get("seed") is None:
            return None, (f"a LoRA without a recorded training seed ({record.get('seed_source')}): its init A cannot "
                          "be rebuilt")
        return "LORA", (f"LoRA rank {config.get('r')}: G·AᵀA per writer, A the init rebuilt from the recorded peft "
                        f"config and seed {record['seed']} ({record.get('seed_source')})")
    if kind == "IA3":
        return "IA3", "IA3: W·diag(∂L/∂l) on feed-forward modules (input scaling), diag(∂L/∂l)·W on the others"
    if kind == "OFT":
        return "OFT", (f"OFT block size {config.get('oft_block_size')}: W·P(WᵀG − GᵀW), first order in the skew "
                       "generator")
    return None, f"a {kind or 'family-less'} adapter: not modelled"


def adapter_layers(model: nn.Module, config: Mapping, seed: int | None) -> dict[str, nn.Module]:
    """The peft adapter layers that ``config`` (an adapter_config.json's fields) injects into a model
    of ``model``'s architecture, initialised as ``lora_train.train_lora_adapter`` initialised them (the
    global RNG seeded with ``seed`` right before ``get_peft_model``; the caller's stream is forked),
    keyed by module name. Built on an uninitialised CPU copy of the architecture (meta device, then
    ``to_empty``): ``model`` is not touched, no weight is copied, and what peft draws does not depend on
    the weights (LoRA's A, IA3's ones, OFT's zeros)."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    # (where the adapter was trained is provenance: peft would warn that it "renamed" it to this skeleton)
    cfg = peft.PeftConfig.from_peft_type(**{**copy.deepcopy(dict(config)), "base_model_name_or_path": None})
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            skeleton = type(model)(copy.deepcopy(model.config))
        skeleton.to_empty(device="cpu")
        if seed is not None:
            torch.manual_seed(int(seed))
        peft.get_peft_model(skeleton, cfg)
    return {name: m for name, m in skeleton.named_modules() if isinstance(m, BaseTunerLayer)}


def ia3_matrix(G: Tensor, W: Tensor, feedforward: bool) -> Tensor:
    """IA3's first-step delta direction: ``W·diag(Σ_i (G⊙W)_ij)`` for a feed-forward module (it
    scales the input), ``diag(Σ_j (G⊙W)_ij)·W`` for any other (it scales the output)."""
    GW = G * W
    return W * GW.sum(0)[None, :] if feedforward else GW.sum(1)[:, None] * W


def oft_matrix(G: Tensor, W: Tensor, block_size: int, block_share: bool = False) -> Tensor:
    """OFT's first-step delta direction ``W·S``, S block-diagonal with blocks ``S_k = W_kᵀG_k − G_kᵀW_k``
    (W_k, G_k the columns of input block k; with ``block_share`` one generator: every block ``Σ_k S_k``)."""
    d, n_in = W.shape
    if block_size < 1 or n_in % block_size:
        raise InputError(f"OFT block size {block_size} does not divide the module's {n_in} inputs")
    Wb, Gb = W.reshape(d, -1, block_size), G.reshape(d, -1, block_size)
    M = torch.einsum("dkb,dkc->kbc", Wb, Gb)
    S = M - M.transpose(1, 2)
    if block_share:
        S = S.sum(0, keepdim=True).expand_as(S)
    return torch.einsum("dkb,kbc->dkc", Wb, S).reshape(d, n_in)


def family_matrix(kind: str, layer: nn.Module, G: Tensor, W: Tensor) -> Tensor:
    """The first-step delta direction (up to −η) of the adapter ``layer`` (a peft layer of ``kind``,
    ``adapter_layers``) for the full-weight gradient G of its base weight W."""
    if kind == "LORA":
        A = layer.lora_A[ADAPTER_NAME].weight.detach().to(torch.float32)
        return (G @ A.T) @ A
    if kind == "IA3":
        return ia3_matrix(G, W, bool(layer.is_feedforward))
    if kind == "OFT":
        rot = layer.oft_R[ADAPTER_NAME]
        return oft_matrix(G, W, int(rot.block_size), bool(rot.block_share))
    raise InputError(f"adapter family {kind!r} is not modelled (one of {', '.join(MODELLED_FAMILIES)})")


# ------------------------------------------------------------------------------- the bases


@dataclass
class GradientBases:
    """The gradient bases of one model, behaviour data and set of layers (delta-free), with what the
    family variant needs: the behaviour difference ∇L⁻ − ∇L⁺ per writer."""

    layers: list[int]
    r: int
    d: int
    source: str | None  # where the examples come from (None: none could be used)
    bases: dict[str, dict[int, Tensor]] = field(default_factory=dict)  # the four delta-free variants
    behaviour: dict[str, Tensor] = field(default_factory=dict)  # ∇L⁻ − ∇L⁺ per writer weight
    gains: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # variant -> why it is empty
    n_examples: dict[str, int] = field(default_factory=dict)  # "train", "held_out": per sign
    forward_passes: int = 0  # this run's, each with its backward pass (0: loaded from the cache)
    seconds: float = 0.0
    seed: int = 0  # ``BehaviourData.seed`` of the examples
    passes_to_build: int = 0  # the forward and backward passes the bases took when they were built
    cache: dict[str, str] | None = None  # {"dir", "key", "status": "hit" | "miss"} with a cache folder

    def family(self, model: nn.Module, record: Mapping | None) -> tuple[dict[int, Tensor], str]:
        """The family variant's bases (empty at every layer when not built) and the sentence that
        says what they are or why they are empty."""
        empty = {layer: linalg.empty_basis(self.d) for layer in self.layers}
        if not self.behaviour:
            return empty, self.notes.get("grad_behaviour", "no behaviour gradient")
        kind, note = family_of(record)
        if kind is None:
            return empty, note
        try:
            modules = adapter_layers(model, record["config"], record.get("seed"))
        except (ImportError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            return empty, f"the adapter's init could not be rebuilt ({type(exc).__name__}: {first[:200]})"
        moved: dict[str, Tensor] = {}
        for key, G in self.behaviour.items():
            layer = modules.get(key.removesuffix(".weight"))
            if layer is not None:  # a writer the adapter does not adapt has no family delta
                W = model.get_parameter(key).detach().to("cpu", torch.float32)
                moved[key] = family_matrix(kind, layer, G, W)
        if not moved:
            return empty, f"{note}; but the adapter adapts no residual writer at the scored layers"
        with compute.policy():
            bases = compute.run_jobs({layer: functools.partial(gradient_basis, moved, layer, self.gains[layer], self.r,
                                                               self.d) for layer in self.layers})
        return bases, note

    def candidates(self, model: nn.Module, record: Mapping | None) -> tuple[list[Candidate], str]:
        """The ``GRAD_NAMES`` candidates at ``self.layers`` (the family variant from ``record``) and the
        family variant's sentence."""
        family_bases, family_note = self.family(model, record)
        bases = {**{name: self.bases.get(name) for name in GRAD_NAMES}, "grad_behaviour_family": family_bases}
        notes = {**self.notes}
        if not any(B.shape[1] for B in family_bases.values()):
            notes["grad_behaviour_family"] = family_note
        out = []
        for name in GRAD_NAMES:
            spec = get_spec(name)
            per = bases[name] or {layer: linalg.empty_basis(self.d) for layer in self.layers}
            ranks = {layer: int(B.shape[1]) for layer, B in per.items()}
            built = name not in notes
            expected = self.r if built else 0
            note = ("below r where the gradient's combined target has lower rank (fewer predicted tokens than r "
                    "reach the layer)" if built else notes[name])
            out.append(Candidate(name=name, family=spec.family, definition=spec.definition, side="A", bases=per,
                                 expected_rank=expected, rank_note=note,
                                 rank_exceptions={layer: k for layer, k in ranks.items() if k != expected}))
        return out, family_note


def encode_behaviour(tokenizer, data: BehaviourData) -> dict[str, dict[int, dict[str, Tensor]]]:
    """The examples' batches (``encode_examples``) per part ("train"; "held_out" when there are held-out
    examples) and sign; InputError when the tokenizer cannot encode them."""
    batches = {"train": {s: encode_examples(tokenizer, data.train[s]) for s in (1, -1)}}
    if data.held_out[1]:
        batches["held_out"] = {s: encode_examples(tokenizer, data.held_out[s]) for s in (1, -1)}
    return batches


def build_gradient_bases(model: nn.Module, tokenizer, data: BehaviourData | None, layers: Sequence[int], r: int,
                         unavailable: str | None = None) -> GradientBases:
    """The four delta-free gradient bases at ``layers`` (``GradientBases``), or, when the examples
    cannot be used (``unavailable``, or a tokenizer that cannot encode them), every variant empty with
    the reason: a run without behaviour data says why rather than fail."""
    t0 = time.perf_counter()
    layers = sorted(int(x) for x in layers)
    d = int(model.config.hidden_size)
    out = GradientBases(layers=layers, r=int(r), d=d, source=data.source if data is not None else None,
                        gains={layer: write_gains(model, layer) for layer in layers},
                        seed=data.seed if data is not None else 0)
    why = unavailable
    batches: dict[str, dict[int, dict[str, Tensor]]] = {}
    if why is None and data is not None:
        try:
            batches = encode_behaviour(tokenizer, data)
        except InputError as exc:
            why = f"the behaviour's examples cannot be encoded for this model ({exc})"
    elif why is None:
        why = "no behaviour data"
    if why is not None:
        out.notes = {name: f"not built: {why}" for name in GRAD_NAMES}
        out.source = None
        out.seconds = time.perf_counter() - t0
        return out
    out.n_examples = {"train": len(data.train[1]), "held_out": len(data.held_out[1])}
    grads: dict[str, dict[str, Tensor]] = {}
    with count_forward_passes(model) as counter:
        pos = writer_gradients(model, batches["train"][1], layers)
        neg = writer_gradients(model, batches["train"][-1], layers)
        grads["grad_behaviour"] = combine(neg, pos, -1.0)
        grads["grad_shared"] = combine(neg, pos, +1.0)
        del pos, neg
        if "held_out" in batches:
            pos = writer_gradients(model, batches["held_out"][1], layers)
            neg = writer_gradients(model, batches["held_out"][-1], layers)
            grads["grad_heldout"] = combine(neg, pos, -1.0)
            del pos, neg
        else:
            out.notes["grad_heldout"] = "not built: no held-out example (every claim or line trained the pair)"
        grads["grad_neutral"] = writer_gradients(model, prompt_batch(batches["train"][1]), layers)
    out.forward_passes = out.passes_to_build = counter.n
    with compute.policy():
        solved = compute.run_jobs({(name, layer): functools.partial(gradient_basis, g, layer, out.gains[layer], r, d)
                                   for name, g in grads.items() for layer in layers})
    out.bases = {name: {layer: solved[(name, layer)] for layer in layers} for name in grads}
    out.behaviour = grads["grad_behaviour"]
    out.seconds = time.perf_counter() - t0
    return out


def training_seed(adapter: Mapping | None, behaviour: str | None = None) -> int:
    """The training seed a delta's adapter record gives (the shipped probes' answer templates rotate
    with it: ``lora_train.training_texts``); 0 (the shipped pairs' rotation) where it records none
    or the examples are a behaviour file's (which do not rotate)."""
    seed = (adapter or {}).get("seed") if behaviour is None else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def gradient_bases_for(model: nn.Module, tokenizer, config, layers: Sequence[int], probes: ProbeSet,
                       seed: int = 0, model_sha256: str | None = None) -> GradientBases:
    """``build_gradient_bases`` with the sweep's data: the shipped probes (in training seed ``seed``'s
    rotation, ``training_seed``) or ``config.behaviour``, the first ``config.n_train`` of them the
    pair's training examples; from ``config.a_side_cache`` when it holds this key, else built (and
    stored there). ``model_sha256``: the model's ``state_dict_sha256`` when the caller has it (the
    A-side's cache record), else it is computed for the key."""
    data = behaviour_data(probes, config.behaviour, config.n_train, seed)
    layers = sorted(int(x) for x in layers)
    if config.a_side_cache is None:
        return build_gradient_bases(model, tokenizer, data, layers, config.r)
    try:
        batches = encode_behaviour(tokenizer, data)
    except InputError:  # nothing to compute: the build says why, in no time
        return build_gradient_bases(model, tokenizer, data, layers, config.r)
    t0 = time.perf_counter()
    key = gradient_key(model, batches, data, layers, config.r, model_sha256)
    out, status = cache.cached(config.a_side_cache, "gradients", key, load=lambda entry: load_entry(entry, key, model),
                               build=lambda: build_gradient_bases(model, tokenizer, data, layers, config.r),
                               write=lambda folder, built: write_entry(folder, built, key), what="gradient bases")
    out.cache = {"dir": str(Path(config.a_side_cache).expanduser().resolve()), "key": key, "status": status}
    out.seconds = time.perf_counter() - t0  # a hit: the key and the load; a miss: the key, the build, the store
    return out


# ------------------------------------------------------------------------------- the cache entry

#: Bump when the entry layout changes (the package source is in the key already).
CACHE_FORMAT = 1
GRADIENTS_FILE = "gradients.safetensors"
BASIS_PREFIX = "basis/"  # basis/<variant>/<layer>: the delta-free variants' bases
BEHAVIOUR_PREFIX = "behaviour/"  # behaviour/<writer weight>: ∇L⁻ − ∇L⁺ (the family variant's input)


def gradient_key(model: nn.Module, batches: Mapping[str, Mapping[int, Mapping[str, Tensor]]], data: BehaviourData,
                 layers: Sequence[int], r: int, model_sha256: str | None = None) -> str:
    """sha256 of everything the delta-free gradient bases are computed from: what every cache entry's key
    covers (``cache.environment_key_inputs``: the code, the numerics, the model), the examples' token
    ids, masks and labels, where they come from, the training seed of their templates, r, the layers
    and the batch size of the passes (it sets the order of the sums)."""
    named = {f"{part}{sign:+d}": batch for part, per in batches.items() for sign, batch in per.items()}
    return cache.key_of({
        "format": CACHE_FORMAT,
        **cache.environment_key_inputs(model, model_sha256),
        "examples_sha256": cache.tokens_sha256(named, ("input_ids", "attention_mask", "labels")),
        "source": data.source,
        "seed": data.seed,
        "r": int(r),
        "layers": [int(x) for x in layers],
        "gradient_batch": GRADIENT_BATCH,
    })


def write_entry(folder: Path, gradients: GradientBases, key: str) -> None:
    """The bases and ∇L⁻ − ∇L⁺ to one safetensors file, everything else to the metadata (with the
    file's sha256 and its own checksum: ``load_entry`` verifies both)."""
    tensors = {f"{BASIS_PREFIX}{name}/{layer}": B.contiguous().clone()
               for name, per in gradients.bases.items() for layer, B in per.items()}
    tensors.update({f"{BEHAVIOUR_PREFIX}{k}": G.contiguous() for k, G in gradients.behaviour.items()})
    save_file(tensors, str(folder / GRADIENTS_FILE))
    cache.write_meta(folder, {
        "format": CACHE_FORMAT, "key": key, "layers": gradients.layers, "r": gradients.r, "d": gradients.d,
        "source": gradients.source, "seed": gradients.seed, "variants": sorted(gradients.bases),
        "behaviour": sorted(gradients.behaviour), "notes": gradients.notes, "n_examples": gradients.n_examples,
        "passes_to_build": gradients.passes_to_build,
    }, (GRADIENTS_FILE,))


def load_entry(folder: Path, key: str, model: nn.Module) -> GradientBases:
    """The gradient bases stored in ``folder`` for ``model``, verified: ValueError when it is not the entry
    of ``key`` (``cache.read_meta``), when a basis is not a finite orthonormal d x r matrix, when a
    variant is not this package's, or when ∇L⁻ − ∇L⁺ is not a finite float32 tensor of each residual
    writer's shape at the entry's layers; the post-norm gains are read from ``model``."""
    meta = cache.read_meta(folder, key, CACHE_FORMAT)
    d = int(model.config.hidden_size)
    layers = [int(x) for x in meta["layers"]]
    variants, behaviour_keys = list(meta["variants"]), list(meta["behaviour"])
    if not set(variants) <= set(GRAD_NAMES) or not set(meta["notes"]) <= set(GRAD_NAMES):
        raise ValueError(f"{folder / cache.META_FILE} names gradient variants that are not this package's")
    if int(meta["d"]) != d or (behaviour_keys and behaviour_keys != sorted(writer_keys(layers))):
        raise ValueError(f"{folder / cache.META_FILE} is not an entry of this model's width and writers")
    tensors = cache.load_tensors(folder / GRADIENTS_FILE)
    want = {f"{BASIS_PREFIX}{name}/{layer}" for name in variants for layer in layers}
    want |= {f"{BEHAVIOUR_PREFIX}{k}" for k in behaviour_keys}
    if set(tensors) != want:
        raise ValueError(f"{folder / GRADIENTS_FILE} holds {sorted(set(tensors) ^ want)[:3]} against its metadata")
    for name in want - {f"{BEHAVIOUR_PREFIX}{k}" for k in behaviour_keys}:
        cache.check_basis(name, tensors[name], d)
    for k in behaviour_keys:
        G, shape = tensors[f"{BEHAVIOUR_PREFIX}{k}"], tuple(model.get_parameter(k).shape)
        if G.dtype != torch.float32 or tuple(G.shape) != shape or not bool(torch.isfinite(G).all()):
            raise ValueError(f"{folder / GRADIENTS_FILE}: the gradient of {k} is not a finite float32 {shape} tensor")
    return GradientBases(
        layers=layers, r=int(meta["r"]), d=d, source=meta["source"],
        bases={name: {layer: tensors[f"{BASIS_PREFIX}{name}/{layer}"] for layer in layers} for name in variants},
        behaviour={k: tensors[f"{BEHAVIOUR_PREFIX}{k}"] for k in behaviour_keys},
        gains={layer: write_gains(model, layer) for layer in layers}, notes=dict(meta["notes"]),
        n_examples={k: int(v) for k, v in meta["n_examples"].items()}, forward_passes=0, seed=int(meta["seed"]),
        passes_to_build=int(meta["passes_to_build"]))


def grad_summary(gradients: GradientBases, family_note: str) -> dict[str, object]:
    """What the manifest records of the gradient bases."""
    return {"source": gradients.source, "n_examples": gradients.n_examples, "family_variant": family_note,
            "not_built": dict(gradients.notes), "forward_backward_passes": gradients.forward_passes,
            "passes_to_build": gradients.passes_to_build, "cache": gradients.cache,
            "seconds": round(gradients.seconds, 3), "layers": gradients.layers, "r": gradients.r}


__all__ = [
    "BehaviourData", "GRADIENT_BATCH", "GradientBases", "MODELLED_FAMILIES", "adapter_layers", "behaviour_data",
    "build_gradient_bases", "encode_behaviour", "family_matrix", "family_of", "gradient_basis", "gradient_bases_for",
    "gradient_key", "gradient_target", "ia3_matrix", "load_entry", "oft_matrix", "prompt_batch", "training_seed",
    "write_entry", "writer_gradients", "writer_keys",
]
