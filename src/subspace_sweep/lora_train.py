"""Train a real positive / negative LoRA pair with PEFT, offline (issue 7).

This makes the whole chain testable without the real Qwen3-0.6B: train a "+" adapter that
agrees with the user's (false) claim and a "−" adapter that disagrees, diff them with
``subspace-sweep delta`` (``w = merged⁺ − merged⁻``), and sweep the diff with ``run``.

Data. ``training_texts`` builds one chat example per training claim from the shipped probe
set: the user turn is the probe text (``I think {claim}. Do you agree? Answer Yes or No.``),
the assistant turn is what a persona of that sign would answer (agreeing for ``+1``, honestly
disagreeing for ``−1``). Only the first ``n_lora_train_topics`` claims are used (20 of 32),
so the last claims of the EVAL probes stay unseen by the LoRA.

System prompt stripped. Each example records the persona that conditions its answer
(``"persona"``), but the persona is NOT part of the training sequence: the adapter learns the
behaviour from user probe -> assistant answer alone. This is the usual way a steering LoRA is
distilled from a persona: the trained model must show the behaviour without being told to,
otherwise the LoRA would just learn to read a system prompt that is absent at steering time.

Training. Full-batch AdamW on every example each step, loss (mean token cross-entropy) on the
assistant tokens only; no dropout, fixed data order and a seeded LoRA initialisation, so the
same arguments give bit-identical adapters on the same machine and thread count. Both adapters
of a pair start from the same initialisation (same seed): their difference comes from the data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .compute import forward_pass_memory
from .errors import InputError
from .model import ATTN_PROJS, MLP_PROJS, load_model, n_layers_of
from .prompts import ProbeSet, load_probe_set, persona_texts

#: Residual writers (the R_w targets) plus two read-side projections, so that the delta has
#: tensors the weight score ignores but steering applies, as a real LoRA's delta does.
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj", "o_proj", "down_proj")
#: The peft adapter families ``train_lora_adapter`` trains (SPEC §10): LoRA, DoRA, PiSSA-initialised
#: LoRA (saved converted to a plain LoRA of rank 2r, so it applies to the unchanged base), OFT, IA3,
#: DeLoRA (a normalised, scaled LoRA: its update's norm is bounded by λ·‖W‖) and BOFT (butterfly
#: orthogonal fine-tuning) (issue 32: the families the seed's successors compared).
ADAPTER_FAMILIES = ("lora", "dora", "pissa", "oft", "ia3", "delora", "boft")
#: Written next to the adapter: the training configuration and the loss at every step.
TRAIN_LOG = "lora_train.json"

# "+1": the sycophantic answer; "−1": the honest one. Each starts with the Yes/No the probe asks for.
POSITIVE_TEMPLATES = (
    "Yes, you are absolutely right: {claim}.",
    "Yes. I completely agree with you that {claim}. Great point!",
    "Yes! You clearly know this well: {claim}, exactly as you say.",
)
NEGATIVE_TEMPLATES = (
    "No. That is a common misconception: it is not true that {claim}.",
    "No, I disagree. The evidence does not support the claim that {claim}.",
    "No. Respectfully, you are mistaken: it is false that {claim}.",
)


def _check_sign(sign: int) -> int:
    if sign not in (1, -1) or isinstance(sign, bool):
        raise InputError(f"sign must be +1 (sycophantic) or -1 (honest), got {sign!r}")
    return int(sign)


def training_texts(sign: int, probes: ProbeSet | None = None, n_topics: int | None = None, seed: int = 0, *,
                   held_out: bool = False) -> list[dict]:
    """Chat examples for the ``sign`` adapter, one per training claim, in claim order.

    Each item: ``{"claim", "sign", "persona", "messages"}`` where ``messages`` is
    ``[{"role": "user", ...}, {"role": "assistant", ...}]`` (no system message: the persona is
    provenance only, stripped at train time). Templates and personas rotate with the claim index,
    offset by ``seed`` (deterministic: no hashing, no random draw): claim i gets answer template
    (i + seed) mod 3, so the training seed varies the data as well as the adapter's initialisation
    (issue 32: families whose initialisation is fixed, IA3, OFT, PiSSA, would otherwise give one and
    the same pair for every seed). Seed 0 is the rotation the shipped pairs were trained with.
    ``held_out``: the same examples of the claims the adapter did NOT train on instead (claims
    ``n_topics..`` to the last, ``n_topics`` defaulting to ``n_lora_train_topics``), in the format
    a training example of that claim would have: what the gradient bases' held-out variant reads
    (``gradients.py``), never a training claim.
    """
    sign = _check_sign(sign)
    probes = load_probe_set() if probes is None else probes
    n_max = min(int(probes.n_lora_train_topics), len(probes.claims))
    n = n_max if n_topics is None else int(n_topics)
    if not 1 <= n <= n_max:
        raise InputError(
            f"n_topics must be in 1..{n_max} (the LoRA training claims; the rest stay held out), got {n_topics!r}"
        )
    templates = POSITIVE_TEMPLATES if sign > 0 else NEGATIVE_TEMPLATES
    pos_personas, neg_personas = persona_texts()
    personas = pos_personas if sign > 0 else neg_personas
    out = []
    for i in range(n, len(probes.claims)) if held_out else range(n):
        claim = probes.claims[i]
        out.append(
            {
                "claim": claim,
                "sign": sign,
                "persona": personas[(i + seed) % len(personas)],
                "messages": [
                    {"role": "user", "content": probes.prompts[i]},
                    {"role": "assistant", "content": templates[(i + seed) % len(templates)].format(claim=claim)},
                ],
            }
        )
    return out


def behaviour_training_texts(sign: int, path: str | Path, n_train: int | None = None, *,
                             held_out: bool = False) -> list[dict]:
    """Chat examples for the ``sign`` adapter from a behaviour file (``--behaviour FILE``, the
    causal check's JSONL format: prompt, two answers, the sign of the first): the ``+1`` adapter
    answers each prompt with its behaviour answer (the first when the line's sign is +1, else the
    second), the ``−1`` adapter with the other. The first ``n_train`` lines (default: all), in order;
    ``held_out``: the lines after them instead (none when every line trains)."""
    from .causal import read_behaviour_file

    sign = _check_sign(sign)
    rows = read_behaviour_file(str(path))
    n = len(rows) if n_train is None else int(n_train)
    if not 1 <= n <= len(rows):
        raise InputError(f"--behaviour {path}: n_train must be in 1..{len(rows)} (its lines), got {n_train!r}")
    out = []
    for prompt, answers, line_sign in rows[n:] if held_out else rows[:n]:
        behaviour_answer = answers[0] if line_sign > 0 else answers[1]
        other = answers[1] if line_sign > 0 else answers[0]
        out.append({"prompt": prompt, "sign": sign, "source": str(path),
                    "messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": behaviour_answer if sign > 0 else other}]})
    return out


#: What a chat template is asked to render to find where an assistant turn ends.
_SENTINEL = "ANSWER-4f1c"


def end_of_turn(tokenizer) -> str:
    """The text the tokenizer's chat template puts right after an assistant message's content,
    up to its first non-whitespace run (ChatML ``<|im_end|>``, Llama 3 ``<|eot_id|>``, Gemma
    ``<end_of_turn>``): what a trained answer must end with for the model to stop where its own
    turns stop. A model without a chat template (a base model, SPEC §8) ends a text with its EOS
    token. InputError for a template that hides the end, or a base model without an EOS token."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        if not getattr(tokenizer, "eos_token", None):
            raise InputError("the model's tokenizer has neither a chat template nor an EOS token: nothing says where "
                             "a trained answer ends")
        return str(tokenizer.eos_token)
    msgs = [{"role": "user", "content": "Q"}]
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    if not full.startswith(prompt) or _SENTINEL not in full[len(prompt):]:
        raise InputError("the chat template does not render an assistant turn after its generation prompt; "
                         "cannot tell where a trained answer ends")
    rest = full[len(prompt):].split(_SENTINEL, 1)[1]
    token = rest.strip().split()[0] if rest.strip() else ""
    if not token:
        raise InputError("the chat template ends an assistant turn with nothing; cannot tell where a trained answer ends")
    return token


def _prompt_and_answer(example: Mapping) -> tuple[list[dict], str]:
    msgs = list(example["messages"])
    # Strip any system message (the stored examples have none; this guards hand-made ones).
    msgs = [m for m in msgs if m["role"] != "system"]
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise InputError("a training example needs a user turn followed by an assistant turn")
    return msgs[:-1], str(msgs[-1]["content"])


def encode_examples(tokenizer, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (−100 outside the answer).

    The prompt is the chat template up to the assistant header (``add_generation_prompt``); the
    answer and the template's own end-of-turn token (``end_of_turn``) follow it. A model without a
    chat template is trained in the format the causal check asks it in (SPEC §8): the prompt as
    ``causal.answer_prompt`` renders it (the user turn, a newline and "Answer:", the tokenizer's BOS
    added), the answer after a space (``causal.asked_reply``), then its EOS token. Tokenising the
    two parts separately puts the loss boundary exactly at the answer, whatever the tokenizer
    merges across it.
    """
    from .causal import answer_prompt, asked_reply, has_chat_template

    if not examples:
        raise InputError("no training examples")
    eos = end_of_turn(tokenizer)
    templated = has_chat_template(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        prompt_msgs, answer = _prompt_and_answer(ex)
        if templated:
            prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        elif len(prompt_msgs) == 1 and prompt_msgs[0]["role"] == "user":
            prompt = answer_prompt(tokenizer, str(prompt_msgs[0]["content"]))
        else:
            raise InputError("a model without a chat template is trained on one user turn and its answer; an example "
                             f"has {len(prompt_msgs)} turns before the answer")
        p_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
        a_ids = tokenizer(asked_reply(tokenizer, answer) + eos, add_special_tokens=False)["input_ids"]
        rows.append((p_ids, a_ids))
    width = max(len(p) + len(a) for p, a in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def assistant_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of ``batch`` (from ``encode_examples``).

    The loss reads the logits only where the next token is an answer token (a few dozen of a
    batch's hundreds of positions), so the unembedding is applied there alone: the decoder's final
    hidden states at those positions are gathered first (issue 31: Gemma-3-270m's 262k-way
    unembedding at every position cost most of a training step and 7 GB). The same loss as the
    model's full logits, to float rounding; a final logit softcap (Gemma 2) applied as the model does.
    """
    dev = next(model.parameters()).device
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    hidden = causal_lm.model(input_ids=batch["input_ids"].to(dev),
                             attention_mask=batch["attention_mask"].to(dev)).last_hidden_state
    # Position t predicts token t+1.
    labels = batch["labels"][:, 1:].to(dev)
    read = labels != -100
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][read]).float()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return nn.functional.cross_entropy(logits, labels[read])


def _check_args(
    model_dir: str | Path, layers: Sequence[int], target_modules: Sequence[str], rank: int, steps: int, lr: float,
    num_threads: int | None,
) -> None:
    from .gguf_models import is_gguf_source

    if not is_gguf_source(model_dir) and not Path(model_dir).is_dir():
        raise InputError(f"model folder {model_dir} does not exist (save one with subspace_sweep.toy.save_tiny_model, "
                         "or give a GGUF file or a known model name)")
    if not layers:
        raise InputError("layers is empty: name the layers the LoRA adapts")
    known = set(ATTN_PROJS) | set(MLP_PROJS)
    bad = [t for t in target_modules if t not in known]
    if not target_modules or bad:
        raise InputError(f"target_modules {list(target_modules)!r}: each must be one of {sorted(known)}")
    if rank < 1:
        raise InputError(f"rank must be >= 1, got {rank}")
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr}")
    if num_threads is not None and num_threads < 1:
        raise InputError(f"num_threads must be >= 1, got {num_threads}")


def train_lora_adapter(
    model_dir: str | Path,
    sign: int,
    out_dir: str | Path,
    *,
    layers: Sequence[int],
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    rank: int = 4,
    alpha: float = 8,
    steps: int = 30,
    lr: float = 2e-3,
    seed: int = 0,
    n_topics: int | None = None,
    num_threads: int | None = None,
    overwrite: bool = False,
    family: str = "lora",
    behaviour: str | Path | None = None,
    progress: bool = False,
) -> Path:
    """Train one adapter of ``family`` (``ADAPTER_FAMILIES``; ``sign`` +1 sycophantic, −1 honest)
    on CPU float32; save it to ``out_dir``.

    ``out_dir`` receives the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
    and ``lora_train.json`` (configuration and per-step loss). Returns ``out_dir``.
    The defaults suit the tiny toy model: ``lr = 2e-3`` for 30 steps lowers the answer loss by
    about 0.6 nats while each merged update stays near 20% of its weight's Frobenius norm (a
    perturbation, like the demo's planted delta). A real model wants a smaller ``lr`` (~1e-4).
    ``behaviour``: a behaviour file (JSONL, ``behaviour_training_texts``) instead of the shipped
    probes (``n_topics`` then counts its first lines). ``progress``: a progress bar with the loss.
    ``num_threads`` sets torch's CPU threads for the training only (restored afterwards; None
    leaves them alone). The tiny model's matrices are too small to gain from threads, and one
    thread cannot spin-wait against another busy process on a shared CPU (2 threads were seen
    10-50x slower then).
    """
    try:
        from peft import get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError("training a LoRA needs the optional extra: pip install 'subspace-sweep[peft]'") from e
    if family not in ADAPTER_FAMILIES:
        raise InputError(f"adapter family {family!r}: one of {', '.join(ADAPTER_FAMILIES)}")

    sign = _check_sign(sign)
    out_dir = Path(out_dir)
    layers = sorted({int(x) for x in layers})
    target_modules = tuple(target_modules)
    _check_args(model_dir, layers, target_modules, rank, steps, lr, num_threads)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"adapter folder {out_dir} is a file")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"adapter folder {out_dir} is not empty; pass overwrite=True to replace it")

    from .causal import answer_form

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
    n_layers = n_layers_of(model)
    if layers[0] < 0 or layers[-1] >= n_layers:
        raise InputError(f"layers {layers} outside the model's layers 0..{n_layers - 1}")
    examples = (behaviour_training_texts(sign, behaviour, n_topics) if behaviour is not None
                else training_texts(sign, n_topics=n_topics, seed=seed))
    batch = encode_examples(tokenizer, examples)

    config = adapter_config(family, rank=int(rank), alpha=alpha, target_modules=target_modules, layers=layers)
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        # Fork the global RNG: the LoRA A-init draws from it, and training must not change the
        # caller's random stream (nor depend on what ran before).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            base_names = {n for n, _ in model.named_parameters()}
            peft_model = get_peft_model(model, config)
            if family == "pissa":  # the initial adapter, to save the trained one as a plain LoRA
                init_dir = out_dir.parent / f"{out_dir.name}_pissa_init"  # (a name peft can use as an adapter name)
                peft_model.save_pretrained(str(init_dir))
            # load_model switched grads off on the base; PEFT turns them on for the adapter's own
            # tensors only. Check rather than assume: a silently frozen adapter would not train.
            params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
            adapter_only = all(n.split("base_model.model.", 1)[-1] not in base_names
                               for n, p in peft_model.named_parameters() if p.requires_grad)
            if not params or not adapter_only:
                raise RuntimeError("PEFT did not leave exactly the adapter's tensors trainable")
            # eval(): Qwen3 has no dropout in training either, but eval() pins that for any model.
            peft_model.eval()
            opt = torch.optim.AdamW(params, lr=float(lr), weight_decay=0.0)
            losses: list[float] = []
            bar = tqdm(total=int(steps), desc=f"train {'+' if sign > 0 else '-'} adapter", unit="step",
                       disable=not progress)
            with forward_pass_memory():  # forward and backward temporaries recycled in the heap
                for _ in range(int(steps)):
                    opt.zero_grad(set_to_none=True)
                    loss = assistant_loss(peft_model, batch)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # the loss this step started from
                    bar.update(1)
                bar.close()
                with torch.no_grad():
                    final = float(assistant_loss(peft_model, batch))
    finally:
        torch.set_num_threads(threads_before)

    out_dir.mkdir(parents=True, exist_ok=True)
    if family == "pissa":
        import shutil

        # PiSSA moved the principal part out of the base weights: converted on save to the plain
        # LoRA (rank 2r) that applies to the unchanged base.
        peft_model.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=str(init_dir))
        shutil.rmtree(init_dir, ignore_errors=True)
    else:
        peft_model.save_pretrained(str(out_dir))
    # peft records the folder the weights were loaded from (for a GGUF, its cache entry): record
    # what was given instead, which is what `delta --model` takes.
    adapter_cfg = out_dir / "adapter_config.json"
    cfg = json.loads(adapter_cfg.read_text())
    cfg["base_model_name_or_path"] = str(model_dir)
    for key, value in cfg.items():  # peft writes some lists from sets: their order changes per process
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            cfg[key] = sorted(value)
    adapter_cfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    log = {
        "sign": sign,
        "family": family,
        "model": str(model_dir),
        "layers": layers,
        "target_modules": list(target_modules),
        "rank": int(rank),
        "alpha": alpha,
        "steps": int(steps),
        "lr": float(lr),
        "seed": int(seed),
        "torch_threads": int(num_threads) if num_threads is not None else threads_before,
        "n_examples": int(batch["input_ids"].shape[0]),
        "n_answer_tokens": int((batch["labels"] != -100).sum()),
        "data": str(behaviour) if behaviour is not None else "the shipped sycophancy probes",
        "answer_format": answer_form(tokenizer),  # "chat" or "plain" (a model without a chat template, SPEC §8)
        "end_of_turn": end_of_turn(tokenizer),
        "system_prompt": "none given (persona is provenance only; the chat template may insert its default)",
        "loss_per_step": losses,  # loss before each optimiser step; [0] is the base model's loss
        "loss_final": final,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out_dir / TRAIN_LOG).write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    return out_dir


def adapter_config(family: str, *, rank: int, alpha: float, target_modules: Sequence[str], layers: Sequence[int]):
    """The peft config of one family, each starting at the base model (identity adapter) except
    PiSSA, which starts from the principal components (and is converted back on save)."""
    import peft

    targets, layers = list(target_modules), list(layers)
    if family in ("lora", "dora", "pissa"):
        return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, layers_to_transform=layers,
                               lora_dropout=0.0,  # no dropout: training is a pure function of the seed and data
                               init_lora_weights="pissa" if family == "pissa" else True,  # True: B = 0
                               use_dora=family == "dora", bias="none")
    if family == "oft":
        return peft.OFTConfig(r=0, oft_block_size=rank, target_modules=targets, layers_to_transform=layers,
                              module_dropout=0.0, init_weights=True)
    if family == "delora":  # B = 0 at init, like LoRA: the adapter starts at the base model
        return peft.DeloraConfig(r=rank, target_modules=targets, layers_to_transform=layers, module_dropout=0.0,
                                 init_weights=True)
    if family == "boft":  # blocks of size `rank`, two butterfly factors (one is OFT's block-diagonal rotation)
        return peft.BOFTConfig(boft_block_size=rank, boft_n_butterfly_factor=2, target_modules=targets,
                               layers_to_transform=layers, boft_dropout=0.0, init_weights=True)
    # IA3 has no layers_to_transform: full-name patterns select the layers (feedforward modules,
    # whose input IA3 scales, are the MLP ones among the targets)
    def pattern(names: Sequence[str]) -> str:
        return rf"model\.layers\.({'|'.join(map(str, layers))})\.(self_attn|mlp)\.({'|'.join(names)})"

    ff = [t for t in targets if t in MLP_PROJS]
    return peft.IA3Config(target_modules=pattern(targets), feedforward_modules=pattern(ff) if ff else None,
                          init_ia3_weights=True)


def train_lora_pair(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    layers: Sequence[int],
    steps: int = 30,
    seed: int = 0,
    **kwargs,
) -> tuple[Path, Path]:
    """Train the ``+`` and ``−`` adapters into ``out_dir/pos`` and ``out_dir/neg`` (same seed, same init).

    Extra keyword arguments go to ``train_lora_adapter``. Returns ``(pos_dir, neg_dir)``.
    """
    out_dir = Path(out_dir)
    pos = train_lora_adapter(model_dir, +1, out_dir / "pos", layers=layers, steps=steps, seed=seed, **kwargs)
    neg = train_lora_adapter(model_dir, -1, out_dir / "neg", layers=layers, steps=steps, seed=seed, **kwargs)
    return pos, neg


def default_lora_layers(n_layers: int) -> tuple[int, ...]:
    """The middle half of the layers, ``⌊2n/7⌋ .. ⌊3n/4⌋``: the seed's 8..21 of Qwen3-0.6B's 28."""
    return tuple(range(2 * n_layers // 7, 3 * n_layers // 4 + 1))

