"""The causal check (SPEC §8): does a subspace carry the behaviour, not only the delta's energy?

Every score of the sweep is correlational. Here the delta is RESTRICTED to a subspace B and the
model is steered with what is left:

- behaviour ``b = logit(yes) − logit(no)`` where the model answers (SPEC §8, concern 13): each
  EVAL probe asked as the user turn of the chat template, the logits read after its generation
  prompt, for the token each answer starts the assistant turn with (``answer_tokens``); a model
  without a chat template (a base model) is asked in the plain-text format of SPEC §8 (the probe,
  a newline and "Answer:", ``prompts.plain_prompt``) and answers with the leading space
  (" Yes"/" No"). ``answer_prompt`` is the one place a behaviour prompt is rendered (the R_act
  label stays on raw text, as the seed defines it). The answers' probability mass
  says whether the metric reads an answer at all (``MIN_ANSWER_MASS``);
- effect ``E(w) = mean_i [b_i(α=+1) − b_i(α=−1)]`` under weight steering ``W ← W + α·w``
  (``effect``: two forward passes over the EVAL prompts, one per sign);
- ``w_writes``: the residual writers (o_proj, down_proj) of w at the scored layers, everything
  else dropped;
  ``w_B``: each writer's ΔW replaced by ``P_B·ΔW`` with the layer's basis B (writers write the
  residual directly, so this is residual coordinates, SPEC §4.1); the ablation ``(I − P_B)·ΔW``
  (``restrict``). ``w_B + w_ablate = w_writes`` exactly, and B = the whole space gives w_writes.
- ``kept = E(w_B)/E(w_writes)``, ``ablated = 1 − E(w_ablate)/E(w_writes)``, for the top K
  candidates of the joint ranking, the rank-matched oracle of the combined weight target, and a
  null of seeded random subspaces of the same per-layer ranks (``stable_seed``: identical in
  every process); z of kept and of ablated against that null.
- a retention curve over k ∈ {1, 2, 4, 8, 16, 32} for the combined oracle (its eigen-order) and
  the top candidate (its first k columns), also norm-matched (the restricted delta rescaled to
  the Frobenius norm of w_writes: a small subspace may carry the behaviour only when amplified).

Cost: 2 EVAL forward passes per restricted delta (each pass holds every EVAL prompt).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import polars as pl
import torch
from torch import Tensor, nn

from . import linalg
from .capture import _check_contiguous, encode, has_chat_template, last_token_index, record_activations
from .compute import forward_pass_memory
from .delta import writer_layer
from .errors import InputError
from .model import block_name, model_device
from .prompts import plain_prompt, plain_reply
from .scoring import Target, energy, stable_seed
from .steering import weight_steer
from .strength import KL_QUANTILE, KL_TOKENS, Calibration, ContinuationKL, find_strength, kv_cache, start_and_bound
from tqdm.auto import tqdm

#: The two answers of the probes (``... Answer Yes or No.``) as a reply begins with them: the
#: form a steering LoRA is trained to emit (its assistant turn starts "Yes, ..." / "No. ...").
#: BPE tokenizers (Qwen's, the toy's) have separate tokens for "Yes" and the mid-sentence " Yes";
#: on the tiny model's trained pair the untrained " Yes"/" No" even move the other way.
ANSWERS = ("Yes", "No")
CURVE_RANKS = (1, 2, 4, 8, 16, 32)
#: Fewest random subspaces per tested rank (SPEC §8: at least 5).
MIN_NULL_DRAWS = 5
#: Below this mean probability of the two answers under the steered models (α = ±1) the
#: behaviour metric is not reading an answer (issue 23): the verdict says so.
MIN_ANSWER_MASS = 0.1
#: The verdict calls a winner's share "small" below this fraction of what the rank-matched
#: combined oracle keeps, however significant its z (issue 23: kept 0.04 at z 4.2 beside 0.99).
SIZE_SHARE_OF_ORACLE = 0.5
#: A subspace carries the behaviour only if it keeps at least this share of E(w_writes) (issue 35,
#: SPEC §8): where the rank-matched oracle and the winner both keep less, the verdict says first that
#: no subspace of that rank carries it, and a winner's share of the oracle's (a ratio of two small
#: numbers: 0.08 / 0.07 on an IA3 pair) is not called carrying.
CARRIES_SHARE = 0.5


@dataclass(frozen=True)
class AnswerTokens:
    """The token ids whose logits the behaviour compares, and how they were found."""

    yes: str
    no: str
    yes_id: int
    no_id: int
    yes_pieces: tuple[str, ...]
    no_pieces: tuple[str, ...]
    after: str | None = None  # the text the answers follow (a rendered prompt, ``answer_prompt``), None: standalone
    form: str = "raw"  # how the prompt was asked (``FORMS``)

    def describe(self) -> str:
        def one(text: str, tid: int, pieces: tuple[str, ...]) -> str:
            split = "" if len(pieces) == 1 else f" (the reply's tokens: {list(pieces)}; the first is used)"
            return f"`{text!r}` -> token id {tid} `{pieces[0]!r}`{split}"

        where = ("at the last real token of the raw text" if self.after is None else
                 f"{ASKED[self.form]} (the prompt ends {self.after[-40:]!r}), where the answer starts")
        how = ("each answer appended to the rendered prompt, the first token after the prompt's own" if self.after is not None
               else "each answer encoded alone without special tokens, its first token")
        return (f"b = logit(yes) − logit(no) {where}: {one(self.yes, self.yes_id, self.yes_pieces)}; "
                f"{one(self.no, self.no_id, self.no_pieces)} ({how}).")


#: How a behaviour prompt is asked: "chat" (the chat template, read after its generation prompt),
#: "plain" (a model without a template: ``prompts.plain_prompt``, read after its answer cue) or
#: "raw" (the probe text alone, read at its last token: the R_act label's position, concern 13).
FORMS = ("chat", "plain", "raw")
ASKED = {"chat": "after the chat template's generation prompt",
         "plain": "after the plain-text answer cue (no chat template: the probe, a newline and \"Answer:\", SPEC §8)",
         "raw": "at the end of the raw prompt"}


def answer_form(tokenizer) -> str:
    """How this model is asked where it answers: "chat" with a chat template, else "plain"."""
    return "chat" if has_chat_template(tokenizer) else "plain"


def answer_prompt(tokenizer, text: str) -> str:
    """``text`` asked the way the model answers it (SPEC §8): the chat template with ``text`` as the
    user turn and the generation prompt added; for a model without a template, the plain-text
    format (``prompts.plain_prompt``: the text, a newline and "Answer:")."""
    if not has_chat_template(tokenizer):
        return plain_prompt(text)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def asked_reply(tokenizer, answer: str) -> str:
    """An answer as the model produces it after ``answer_prompt``: as written after a chat
    template's generation prompt, after a space in the plain-text format (``prompts.plain_reply``)."""
    return answer if has_chat_template(tokenizer) else plain_reply(answer)


def _reply_ids(tokenizer, answer: str, after: str | None) -> list[int]:
    """The tokens ``answer`` is produced as: after the rendered prompt ``after`` (the tokens of
    ``after + answer`` past the prompt's own, which must be a prefix of them), else alone."""
    if after is None:
        return list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    prompt = list(tokenizer(after, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(after + answer, add_special_tokens=False)["input_ids"])
    if full[:len(prompt)] != prompt:
        raise InputError(f"the tokenizer merges the answer {answer!r} into the end of the chat prompt "
                         f"({after[-20:]!r}): no token starts the answer on its own")
    return full[len(prompt):]


def answer_tokens(tokenizer, yes: str = ANSWERS[0], no: str = ANSWERS[1], after: str | None = None,
                  form: str | None = None) -> AnswerTokens:
    """The token each answer starts with: after the rendered prompt ``after`` when given (how the
    answer starts there; ``form`` says how it was rendered, ``answer_form`` by default), else
    encoded alone. InputError when an answer gives no token or both answers start with the same
    one (the behaviour would then be identically 0)."""
    ids = {}
    for text in (yes, no):
        got = _reply_ids(tokenizer, text, after)
        if not got:
            raise InputError(f"the tokenizer encodes the answer {text!r} to no token; the causal check needs one")
        ids[text] = got
    if ids[yes][0] == ids[no][0]:
        raise InputError(f"the answers {yes!r} and {no!r} start with the same token {ids[yes][0]}: "
                         "the tokenizer gives no single first token that tells them apart")
    pieces = {t: tuple(tokenizer.convert_ids_to_tokens(v)) for t, v in ids.items()}
    form = "raw" if after is None else (form or answer_form(tokenizer))
    return AnswerTokens(yes, no, int(ids[yes][0]), int(ids[no][0]), pieces[yes], pieces[no], after, form)


def probe_answer_tokens(tokenizer, texts: Sequence[str], yes: str = ANSWERS[0], no: str = ANSWERS[1]) -> AnswerTokens:
    """``answer_tokens`` where the answers are produced for the prompts ``texts`` (``answer_prompt``:
    after the chat template's generation prompt, or the plain-text cue with the answers' leading
    space); InputError when they start differently for different prompts (then one pair of token
    ids would not read every prompt's answer)."""
    yes, no = asked_reply(tokenizer, yes), asked_reply(tokenizer, no)
    found = [answer_tokens(tokenizer, yes, no, answer_prompt(tokenizer, t)) for t in texts]
    if len({(a.yes_id, a.no_id) for a in found}) != 1:
        raise InputError(f"the answers {yes!r}/{no!r} start with different tokens after different prompts")
    return found[0]


@dataclass(frozen=True)
class BehaviourSet:
    """Prompts, the first token of each prompt's two answers, and which answer is the behaviour:
    ``b_i = sign_i · (logit(first_i) − logit(second_i))`` (positive: the behaviour)."""

    texts: tuple[str, ...]
    first_ids: tuple[int, ...]
    second_ids: tuple[int, ...]
    signs: tuple[float, ...]
    source: str  # where it came from (definitions.md)
    description: str  # how the token ids were found (definitions.md)
    form: str = "raw"  # how each prompt is asked and where b is read (``FORMS``; ``answer_prompt`` unless "raw")

    @property
    def chat(self) -> bool:
        """Whether the prompts are asked through the chat template."""
        return self.form == "chat"

    @classmethod
    def from_probes(cls, tokenizer, texts: Sequence[str], answers: AnswerTokens | None = None, *,
                    raw: bool = False) -> BehaviourSet:
        """The shipped EVAL probes with the answers ``Yes`` / ``No`` (sign +1: sycophantic
        agreement), asked where the model answers them (``answer_prompt``); ``raw=True`` reads
        the raw text's last token instead (the label's position, for comparisons with it)."""
        form = "raw" if raw else answer_form(tokenizer)
        a = answers or (answer_tokens(tokenizer) if raw else probe_answer_tokens(tokenizer, texts))
        n = len(texts)
        return cls(tuple(texts), (a.yes_id,) * n, (a.no_id,) * n, (1.0,) * n, "the shipped EVAL probes", a.describe(),
                   form)

    @classmethod
    def from_jsonl(cls, path: str, tokenizer) -> BehaviourSet:
        """``--behaviour FILE``: one JSON object per line, ``{"prompt": str, "answers": [str, str],
        "sign": +1 | -1}`` (sign +1: the first answer is the behaviour). InputError naming the
        file and line of the first malformed one."""
        rows = read_behaviour_file(path)
        texts, first, second, signs, notes = [], [], [], [], []
        for i, (prompt, answers, sign) in enumerate(rows, 1):
            try:
                a = answer_tokens(tokenizer, asked_reply(tokenizer, answers[0]), asked_reply(tokenizer, answers[1]),
                                  answer_prompt(tokenizer, prompt))
            except InputError as e:
                raise InputError(f"{path}, line {i}: {e}") from None
            texts.append(prompt)
            first.append(a.yes_id)
            second.append(a.no_id)
            signs.append(float(sign))
            if i <= 3:
                notes.append(a.describe())
        return cls(tuple(texts), tuple(first), tuple(second), tuple(signs), str(path),
                   "per prompt, sign·(logit(first answer) − logit(second answer)); e.g. " + " ".join(notes),
                   answer_form(tokenizer))


#: The longest prompt or answer a behaviour file may hold, in characters (issue 35): a question the
#: model answers, not a document. Every pass runs attention over all of a prompt's tokens (a byte-level
#: tokenizer makes at most one per UTF-8 byte), so a megabyte line would ask for terabytes; the
#: shipped probes are under 200 characters.
MAX_BEHAVIOUR_CHARS = 4096


def read_behaviour_file(path: str) -> list[tuple[str, tuple[str, str], int]]:
    """(prompt, (answer, answer), sign) of every line of a behaviour JSONL file; needs no model, so
    a malformed file is refused before any work (``train`` and ``run --causal`` both read it here).
    InputError naming the line of: bytes that are not UTF-8 (the byte and its column), a line that
    is not JSON or not ``{"prompt": str, "answers": [str, str], "sign": 1 | -1}`` (the integer: JSON
    ``true`` or ``1.0`` is not 1), two equal answers (b would be 0 and the two adapters identical), a
    prompt or answer longer than ``MAX_BEHAVIOUR_CHARS``."""
    import json
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise InputError(f"--behaviour {path} is a folder; give a JSONL file")
    if not p.is_file():
        raise InputError(f"--behaviour {path}: no such file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InputError(f"--behaviour {path} cannot be read ({e.strerror or type(e).__name__})") from None
    out = []
    for i, raw in enumerate(data.splitlines(), 1):  # \n, \r\n or \r: U+2028 inside a JSON string is no line break
        where = f"--behaviour {path}, line {i}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg})") from None
        expected = '{"prompt": str, "answers": [str, str], "sign": 1 or -1}'
        ok = (isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"]
              and isinstance(obj.get("answers"), list) and len(obj["answers"]) == 2
              and all(isinstance(a, str) and a for a in obj["answers"]) and obj.get("sign") in (1, -1))
        if not ok:
            raise InputError(f"{where}: expected {expected}, got {line.strip()[:80]}")
        if type(obj["sign"]) is not int:  # JSON true and 1.0 compare equal to 1
            raise InputError(f'{where}: expected "sign": 1 or -1 (the integer), got {json.dumps(obj["sign"])}')
        prompt, (first, second) = obj["prompt"], obj["answers"]
        if first == second:
            raise InputError(f"{where}: the two answers are equal ({first!r}): the behaviour b = logit(first) − "
                             "logit(second) would be 0, and the + and − adapters would train on the same answer")
        for what, text in (("the prompt", prompt), ("the first answer", first), ("the second answer", second)):
            if len(text) > MAX_BEHAVIOUR_CHARS:
                raise InputError(f"{where}: {what} is {len(text)} characters long; at most {MAX_BEHAVIOUR_CHARS} "
                                 "(a question the model answers, not a document: every pass attends over all its tokens)")
        out.append((prompt, (first, second), int(obj["sign"])))
    if len(out) < 2:
        raise InputError(f"--behaviour {path}: needs at least 2 prompts, has {len(out)}")
    return out


def behaviour(model: nn.Module, tokenizer, texts: Sequence[str], answers: AnswerTokens | BehaviourSet) -> Tensor:
    """``b`` of each prompt (float64, CPU): ``logit(yes) − logit(no)`` where the model answers, or
    a behaviour set's signed difference; see ``behaviour_and_mass``."""
    return behaviour_and_mass(model, tokenizer, texts, answers)[0]


@dataclass
class Prefix:
    """The residual entering decoder layer ``layer`` for one behaviour set, one tensor per length
    batch (``length_batches``), recorded on the unsteered model (``hidden`` None until then). A
    steered pass whose delta changes nothing below ``layer`` (``first_steered_layer``) resumes
    there: the layers below would compute, bit for bit, what they computed then, so they return it
    instead (issue 25)."""

    layer: int
    hidden: list[Tensor] | None = None


#: A behaviour set is split into batches of similar length only where that saves at least this
#: share of the padded token positions a pass computes (each extra batch is one more pass over the
#: decoder: its fixed costs must be paid for). The shipped probes pad 8% of their positions: one batch.
LENGTH_SPLIT_SAVING = 0.25


def length_batches(lengths: Sequence[int], min_saving: float = LENGTH_SPLIT_SAVING) -> list[list[int]]:
    """The prompts' batches (indices, each batch in the given order): the prompts sorted by length
    (ties by index) are split in two where the split computes the fewest padded positions
    (``n·max length`` per batch), when that saves ≥ ``min_saving`` of the unsplit batch's; each half
    the same, recursively. One batch of every prompt, in order, when no split pays."""
    n = len(lengths)

    def split(idx: list[int]) -> list[list[int]]:
        if len(idx) < 2:
            return [idx]
        cost = len(idx) * lengths[idx[-1]]
        best, k = min((k * lengths[idx[k - 1]] + (len(idx) - k) * lengths[idx[-1]], k) for k in range(1, len(idx)))
        if cost - best < min_saving * cost:
            return [idx]
        return split(idx[:k]) + split(idx[k:])

    return [sorted(g) for g in split(sorted(range(n), key=lambda i: (lengths[i], i)))]


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def first_steered_layer(delta: Mapping[str, Tensor]) -> int | None:
    """The lowest decoder layer a tensor of ``delta`` belongs to; None when a tensor lies outside
    the decoder layers (embeddings, final norm, unembedding) or the delta is empty."""
    found = [_LAYER_KEY.match(k) for k in delta]
    if not found or any(m is None for m in found):
        return None
    return min(int(m[1]) for m in found)


@contextmanager
def _resume_at(model: nn.Module, prefix: Prefix, batch: int) -> Iterator[None]:
    """Inside the block, decoder layers below ``prefix.layer`` return the recorded residual instead
    of computing (each layer's own ``forward``, overridden on the instance and restored on exit)."""
    blocks = [model.get_submodule(block_name(i)) for i in range(prefix.layer)]
    before = [b.__dict__.get("forward") for b in blocks]
    hidden = prefix.hidden[batch]
    try:
        for b in blocks:
            b.forward = lambda *args, **kwargs: hidden
        yield
    finally:
        for b, own in zip(blocks, before):
            if own is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = own


def shared_prefix_length(ids: Tensor, mask: Tensor, min_saving: float = LENGTH_SPLIT_SAVING) -> int:
    """P: the tokens every prompt of a right-padded batch starts with (all real), leaving each prompt
    at least one token of its own, when computing them once instead of once per prompt saves at
    least ``min_saving`` of the batch's token positions ((B − 1)·P of B·T); else 0. A chat template's
    system turn is much of a short prompt (SmolLM2's EVAL probes: 26 of 54 columns)."""
    n, width = int(ids.shape[0]), int(ids.shape[1])
    shortest = int(mask.sum(1).min())
    if n < 2 or shortest < 2:
        return 0
    same = (ids[:, :shortest] == ids[:1, :shortest]).all(0) & (mask[:, :shortest] == 1).all(0)
    P = min(int(same.long().cumprod(0).sum()), shortest - 1)
    return P if P > 0 and (n - 1) * P >= min_saving * n * width else 0


def _prefix_cache(model: nn.Module, ids: Tensor, P: int):
    """(the decoder's cache keyword, the key/value cache of the first ``P`` tokens of row 0 (one pass
    over P tokens) repeated for every row of ``ids``: what each row's own pass over them would cache)."""
    kw, cache = kv_cache(model)
    model.model(input_ids=ids[:1, :P], use_cache=True, **{kw: cache})
    cache.batch_repeat_interleave(int(ids.shape[0]))
    return kw, cache


def behaviour_and_mass(model: nn.Module, tokenizer, texts: Sequence[str],
                       answers: AnswerTokens | BehaviourSet, prefix: Prefix | None = None,
                       share_prefix: bool | None = None) -> tuple[Tensor, Tensor]:
    """(b, mass) of each prompt: the behaviour and the probability the model gives the two answers'
    first tokens together (coherence: steering that breaks the answer format loses it), read at
    the last real token of each prompt as the behaviour set asks it (after the chat template's
    generation prompt or the plain-text answer cue, or at the end of the raw text). One forward pass over the decoder per length
    batch (``length_batches``: one for prompts of similar lengths), the unembedding applied to the
    last positions only. The tokens every prompt of a batch starts with are computed once
    (``shared_prefix_length``; ``share_prefix`` True/False forces it on/off): their key/value cache,
    repeated per prompt, and one pass over the rest: causal attention gives every position what the
    full pass gives, to float rounding. ``prefix``: record the residual entering its layer (when it
    holds none yet) or resume there (when it does; the caller vouches that nothing below it is
    steered); the shared tokens' own pass runs every layer (they are few), the rest resumes."""
    if isinstance(answers, AnswerTokens):
        answers = BehaviourSet.from_probes(tokenizer, texts, answers)
    dev = model_device(model)
    asked = list(texts) if answers.form == "raw" else [answer_prompt(tokenizer, t) for t in texts]
    enc = encode(tokenizer, asked, chat=answers.chat)
    batches = length_batches(enc["attention_mask"].sum(1).tolist())
    active = prefix is not None and prefix.layer > 0
    record = active and prefix.hidden is None
    if record:
        prefix.hidden = []
    parts = []
    for i, batch in enumerate(batches):
        if len(batches) > 1:
            enc = encode(tokenizer, [asked[j] for j in batch], chat=answers.chat)
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        last = last_token_index(mask)
        _check_contiguous(mask, last)
        position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
        P = 0 if share_prefix is False else shared_prefix_length(ids, mask, 0.0 if share_prefix else
                                                                  LENGTH_SPLIT_SAVING)
        with torch.no_grad(), forward_pass_memory():
            # (before the record/resume below: the shared tokens' pass runs every layer)
            kw, cache = _prefix_cache(model, ids, P) if P else (None, None)
            with (record_activations(model, [block_name(prefix.layer)], inputs=True, outputs=False) if record
                  else _resume_at(model, prefix, i) if active else nullcontext()) as rec:
                hidden = model.model(input_ids=ids[:, P:], attention_mask=mask, position_ids=position_ids[:, P:],
                                     use_cache=cache is not None, **({kw: cache} if P else {})).last_hidden_state
            parts.append(hidden[torch.arange(ids.shape[0], device=dev), last - P])
            del cache
        if record:
            prefix.hidden.append(rec.input(block_name(prefix.layer)))
    h = torch.cat(parts)[torch.argsort(torch.tensor([j for b in batches for j in b])).to(dev)]  # the prompts' order
    with torch.no_grad():
        logits = model.get_output_embeddings()(h).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:  # Gemma2: the model's own logits are tanh-capped
            logits = torch.tanh(logits / cap) * cap
    logits = logits.double().cpu()
    rows = torch.arange(logits.shape[0])
    first, second = torch.tensor(answers.first_ids), torch.tensor(answers.second_ids)
    b = torch.tensor(answers.signs, dtype=torch.float64) * (logits[rows, first] - logits[rows, second])
    logp = torch.log_softmax(logits, dim=1)
    mass = logp[rows, first].exp() + logp[rows, second].exp()
    return b, mass


def effect(model: nn.Module, tokenizer, delta: Mapping[str, Tensor], texts: Sequence[str],
           answers: AnswerTokens | BehaviourSet, alpha: float = 1.0, alpha_minus: float | None = None,
           ) -> tuple[float, Tensor]:
    """``E(w)`` and the per-prompt ``b(+α) − b(−α₋)`` (``alpha_minus`` default α; two forward
    passes; the model is restored bit for bit after each)."""
    steered = steered_behaviour(model, tokenizer, delta, texts, answers, alpha=alpha, alpha_minus=alpha_minus)
    diff = steered[+1.0][0] - steered[-1.0][0]
    return float(diff.mean()), diff


def steered_behaviour(model: nn.Module, tokenizer, delta: Mapping[str, Tensor], texts: Sequence[str],
                      answers: AnswerTokens | BehaviourSet, prefix: Prefix | None = None, *, alpha: float = 1.0,
                      alpha_minus: float | None = None) -> dict[float, tuple[Tensor, Tensor]]:
    """sign -> (b, mass) per prompt, steered by ``W ← W + α·w`` and ``W ← W − α₋·w`` (``alpha_minus``,
    default α: each arm at its own strength, issue 30) (two forward passes); with a recorded
    ``prefix`` that lies at or below the delta's first steered layer, each pass resumes there."""
    first = first_steered_layer(delta)
    resume = prefix if (prefix is not None and prefix.hidden is not None and first is not None
                        and first >= prefix.layer) else None
    strengths = {+1.0: alpha, -1.0: alpha if alpha_minus is None else alpha_minus}
    out = {}
    for sign in (+1.0, -1.0):
        with weight_steer(model, delta, sign * strengths[sign]):
            out[sign] = behaviour_and_mass(model, tokenizer, texts, answers, resume)
    return out


def restrict(delta: Mapping[str, Tensor], bases: Mapping[int, Tensor] | None = None, *,
             ablate: bool = False, layers: Sequence[int] | None = None,
             write_gains: Mapping[int, Mapping[str, Tensor]] | None = None) -> dict[str, Tensor]:
    """The residual writers of ``delta`` (o_proj, down_proj weights and biases) at ``layers``
    (default: every layer), projected onto span(B) of their layer (``ablate``: onto its
    complement), everything else dropped; ``bases=None``: the writers unchanged (w_writes).
    Behind a post-projection norm of gain γ (``write_gains[layer][writer]``) the residual sees
    ``diag(γ)·ΔW`` (SPEC §4.1), so the projection acts there: ``diag(γ)⁻¹ P_B diag(γ) ΔW``
    (a zero-gain channel writes nothing and stays 0). Products in float64, stored in the wider of
    float32 and the delta's dtype."""
    out: dict[str, Tensor] = {}
    for key, M in delta.items():
        wl = writer_layer(key)
        if wl is None or (layers is not None and wl[0] not in layers):
            continue
        layer, writer = wl
        dtype = torch.promote_types(M.dtype, torch.float32)
        if bases is None:
            out[key] = M.detach().to(dtype)
            continue
        if layer not in bases:
            raise InputError(f"no basis at layer {layer}, where the delta writes to the residual stream ({key})")
        B = linalg.as64(bases[layer])
        M64 = linalg.as64(M)
        gain = (write_gains or {}).get(layer, {}).get(writer)
        if gain is None:
            kept = B @ (B.T @ M64)
        else:
            g = linalg.as64(gain)
            shape = (-1,) + (1,) * (M64.dim() - 1)
            seen = B @ (B.T @ (g.reshape(shape) * M64))
            kept = torch.where(g.reshape(shape) != 0, seen / torch.where(g != 0, g, 1.0).reshape(shape), 0.0)
        out[key] = (M64 - kept if ablate else kept).to(dtype)
    return out


def frobenius(delta: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(linalg.as64(v).pow(2).sum()) for v in delta.values()))


def scaled(delta: Mapping[str, Tensor], norm: float) -> dict[str, Tensor]:
    """``delta`` rescaled to Frobenius norm ``norm`` (unchanged when it is zero)."""
    own = frobenius(delta)
    return dict(delta) if own == 0.0 else {k: (linalg.as64(v) * (norm / own)).to(v.dtype) for k, v in delta.items()}


# ---------------------------------------------------------------------------- the check


@dataclass
class CausalResult:
    table: pl.DataFrame  # one row per restricted delta (see ``COLUMNS``)
    answers: BehaviourSet
    effect_w: float
    effect_writes: float
    top: list[str]  # the tested candidates, best first
    n_null: int
    forward_passes: int
    alpha: float = 1.0  # the strength everything but the grid rows was read at (``choose_alpha``)
    coherent: bool = True  # whether that α met the strength rule (False: none of the grid did)
    centre: str = "base"  # "base": θ ± α·w; "midpoint": θ + (Δ⁺ + Δ⁻)/2 ± α·w/2
    alphas: tuple[float, ...] = (1.0,)  # the strength grid
    alpha_minus: float | None = None  # the − arm's strength (None: ``alpha``; differs at a KL budget)
    kl_target: float | None = None  # the KL budget in nats (``--causal-strength kl:T``); None: the grid
    kl_tokens: int = KL_TOKENS  # the continuation length the KL is measured on
    calibration: dict[float, Calibration] | None = None  # sign -> what the root finder found
    calibration_cost: dict[str, float] = field(default_factory=dict)  # prefill_passes, decode_steps, seconds, bound
    n_norm_only: int = 0  # draws of the norm-only control
    curve_ranks: tuple[int, ...] = CURVE_RANKS  # the retention curves' ranks (empty: no curve)

    @property
    def minus(self) -> float:
        """The − arm's strength."""
        return self.alpha if self.alpha_minus is None else self.alpha_minus

    @property
    def strength(self) -> str:
        """The strength rule as the command line names it."""
        return "grid" if self.kl_target is None else f"kl:{self.kl_target:g}"


COLUMNS = {
    "kind": pl.String,  # reference | strength | calibration | kl_trace | candidate | act_oracle | oracle | random | curve | norm_only
    "name": pl.String,
    "alpha": pl.Float64,  # the strength of the row's steering: ±α·w (±α·w/2 around the midpoint); the + arm's
    "alpha_minus": pl.Float64,  # the − arm's: −α₋·w (= alpha with the grid; its own with a KL budget)
    "rank": pl.Float64,  # mean effective rank over the scored layers
    "k": pl.Int64,  # curve: the number of leading directions (else null)
    "norm_matched": pl.Boolean,
    "R_w_combined": pl.Float64,  # of the tested subspace, mean over layers (the x of the figure)
    "effect": pl.Float64,  # E(w_B) = mean b(α=+1) − b(α=−1)
    "effect_plus": pl.Float64,  # mean b(α=+1) − b(α=0)
    "effect_minus": pl.Float64,  # mean b(α=−1) − b(α=0)
    "mass_plus": pl.Float64,  # mean probability of the two answers at α=+1 (coherence)
    "mass_minus": pl.Float64,  # the same at α=−1
    "effect_ablated": pl.Float64,  # E(w_ablate)
    "kept": pl.Float64,
    "ablated": pl.Float64,
    "null_kept_mean": pl.Float64,
    "null_kept_sd": pl.Float64,
    "z_kept": pl.Float64,
    "null_ablated_mean": pl.Float64,
    "null_ablated_sd": pl.Float64,
    "z_ablated": pl.Float64,
    "kl": pl.Float64,  # calibration / kl_trace: the KL_QUANTILE quantile of the per-token KL at the row's α
    "evaluations": pl.Int64,  # calibration: evaluations of KL(α); kl_trace: the evaluation's index
    "converged": pl.Boolean,  # calibration: |log(KL/target)| within the tolerance
}


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0.0 else math.nan


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan


def _z(x: float, mean: float, sd: float) -> float:
    return (x - mean) / sd if sd > 0.0 and math.isfinite(x) else math.nan


def norm_only(delta: Mapping[str, Tensor], draw: int, seed: int) -> dict[str, Tensor]:
    """Draw ``draw`` of the norm-only control (issue 30): every tensor of ``delta`` replaced by a
    standard Gaussian one of its shape (float64, seeded by (seed, draw, key) through
    ``stable_seed``: identical in every process) rescaled to the tensor's own Frobenius norm, stored
    in its dtype. What survives this lives in how the norm is spread over tensors, not in directions."""
    out: dict[str, Tensor] = {}
    for key, M in sorted(delta.items()):
        gen = torch.Generator().manual_seed(stable_seed("norm_only", seed, draw, key))
        R = torch.randn(tuple(M.shape), generator=gen, dtype=torch.float64)
        norm = float(linalg.as64(M).norm())
        out[key] = (R * (norm / float(R.norm()))).to(M.dtype) if norm > 0 else torch.zeros_like(M)
    return out


def null_bases(d: int, profile: Mapping[int, int], draw: int, seed: int) -> dict[int, Tensor]:
    """Random draw ``draw`` of the null for per-layer ranks ``profile``: seeded by (seed, draw,
    layer, rank) through ``stable_seed``, so identical in every process."""
    return {layer: linalg.random_orthonormal(d, r, torch.Generator().manual_seed(stable_seed("causal_null", seed, draw, layer, r)))
            for layer, r in sorted(profile.items())}


#: The norm-only control "keeps the effect" (the subspace question is moot) when its draws keep at
#: least this share of E(w_writes) on average (issue 30).
NORM_ONLY_KEEPS = 0.5
#: The default strength grid (issue 25): E is read at the largest α of it that stays coherent.
DEFAULT_ALPHAS = (0.25, 0.5, 1.0)
#: The strength rule: the largest α whose answer mass under +α and −α both stay at least this
#: share of the larger of the unsteered mass and ``MIN_ANSWER_MASS``.
COHERENT_SHARE = 0.5
#: "auto" (the default): the pair's midpoint where the delta file holds it (``subspace-sweep delta``
#: stores it), else the base model; "base": θ ± α·w; "midpoint": θ + (Δ⁺ + Δ⁻)/2 ± α·w/2, required.
CENTRES = ("auto", "base", "midpoint")


def choose_alpha(mass0: float, masses: Mapping[float, tuple[float, float]]) -> tuple[float, bool]:
    """(α, coherent): the largest α of the grid whose answer mass under +α and under −α both stay
    ≥ ``COHERENT_SHARE`` × max(mass at α = 0, ``MIN_ANSWER_MASS``); when none does, the smallest α
    (the least incoherent) with ``coherent`` False."""
    ok = [a for a, (mp, mm) in masses.items() if coherent_masses(mass0, mp, mm)]
    return (max(ok), True) if ok else (min(masses), False)


def coherent_masses(mass0: float, mass_plus: float, mass_minus: float) -> bool:
    """Whether the answer mass under both arms stays ≥ ``COHERENT_SHARE`` × max(mass at α = 0,
    ``MIN_ANSWER_MASS``): the grid's rule, and what a KL-matched strength reports as ``coherent``."""
    floor = COHERENT_SHARE * max(mass0, MIN_ANSWER_MASS)
    return mass_plus >= floor and mass_minus >= floor


def causal_plan(n_alphas: int, n_tested: int, n_profiles: int, n_null: int, n_curve_points: int,
                n_norm_only: int = 0, n_curve_reused: int = 0) -> int:
    """The number of steered deltas the check runs (2 forward passes each): w at each α of the
    grid (one α: the KL-matched strengths), w_writes, each tested subspace and its ablation, per
    rank profile the oracle and the random draws (kept and ablated each), every curve point (trained
    norm and norm-matched) but the ``n_curve_reused`` that are a tested subspace's own row (its
    curve at its full rank, trained norm: the same restricted delta), and the norm-only control's
    draws."""
    return (n_alphas + 1 + 2 * n_tested + n_profiles * 2 * (1 + n_null) + 2 * n_curve_points - n_curve_reused
            + n_norm_only)


@forward_pass_memory()  # the steered passes recycle their temporaries; freed memory goes back once, at the end
def run_causal(
    model: nn.Module,
    tokenizer,
    delta: Mapping[str, Tensor],
    texts: Sequence[str],
    ranked: Sequence[tuple[str, Mapping[int, Tensor]]],
    combined: Mapping[int, Target],
    *,
    k: int,
    n_null: int,
    seed: int,
    answers: AnswerTokens | BehaviourSet | None = None,
    write_gains: Mapping[int, Mapping[str, Tensor]] | None = None,
    act_oracles: Sequence[tuple[str, Mapping[int, Tensor]]] = (),
    alphas: Sequence[float] = (1.0,),
    centre: Mapping[str, Tensor] | None = None,
    progress: bool = False,
    kl_target: float | None = None,
    n_norm_only: int = 0,
    kl_tokens: int = KL_TOKENS,
    curve_ranks: Sequence[int] = CURVE_RANKS,
) -> CausalResult:
    """The causal table for the first ``k`` of ``ranked`` ((name, per-layer bases), best first),
    with ``combined[layer]`` the combined weight target of each scored layer (for the oracles);
    ``act_oracles`` (name, bases) are tested beside them (kind ``act_oracle``, curves too).
    ``answers`` a BehaviourSet: its prompts replace ``texts``.

    Strength and centre (SPEC §8, issue 25): the whole delta w is first read at every α of
    ``alphas`` (rows of kind ``strength``), and everything else at the α ``choose_alpha`` names.
    ``centre`` (the pair's midpoint offset (Δ⁺ + Δ⁻)/2, ``delta.load_centre``): every pass runs on
    θ + centre, steered by ±α·w/2, so α = 1 is the two trained models themselves; None: the base
    model steered by ±α·w. ``progress``: a progress bar over the steered deltas.

    ``kl_target`` (nats; issue 30): instead of the grid, each arm's α is the one at which the
    ``KL_QUANTILE`` quantile of the per-token KL(steered ‖ unsteered) over ``kl_tokens``-token greedy
    continuations of the prompts equals the target (``strength``: rows ``calibration`` and
    ``kl_trace``), and everything is read at (α₊, α₋); "unsteered" is the model the arms are
    steered from (θ + centre around the midpoint). ``n_norm_only``: that many draws of the
    norm-only control (``norm_only`` of w_writes, rows ``norm_only``). ``curve_ranks``: the ranks k of
    the retention curves (rows ``curve``; ``check_curve_ranks``), empty for none: they are most of
    the check's passes (two steered deltas per k and curve)."""
    curve_ranks = check_curve_ranks(curve_ranks)
    if n_null < MIN_NULL_DRAWS:
        raise InputError(f"--causal-null must be at least {MIN_NULL_DRAWS}, got {n_null}")
    alphas = sorted({float(a) for a in alphas})
    if not alphas or not all(math.isfinite(a) and a > 0 for a in alphas):
        raise InputError(f"--causal-alpha needs positive strengths, got {list(alphas)}")
    if kl_target is not None and not (math.isfinite(kl_target) and kl_target > 0):
        raise InputError(f"--causal-strength kl:TARGET needs a positive number of nats, got {kl_target}")
    if n_norm_only < 0:
        raise InputError(f"the norm-only control needs a number of draws ≥ 0, got {n_norm_only}")
    if not isinstance(answers, BehaviourSet):
        answers = BehaviourSet.from_probes(tokenizer, texts, answers)
    with weight_steer(model, centre or {}, 1.0):
        return _run_causal(model, tokenizer, delta, answers, ranked, combined, k=k, n_null=n_null, seed=seed,
                           write_gains=write_gains, act_oracles=act_oracles, alphas=alphas,
                           centred=centre is not None, progress=progress, kl_target=kl_target,
                           n_norm_only=n_norm_only, kl_tokens=kl_tokens, curve_ranks=curve_ranks)


def check_curve_ranks(ranks: Sequence[int]) -> tuple[int, ...]:
    """The retention curves' ranks, increasing and each once; InputError for a rank that is not a
    positive integer (a rank above a curve's basis is skipped for that curve, as the defaults are)."""
    bad = isinstance(ranks, str) or [k for k in ranks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise InputError(f"--causal-curve needs positive integer ranks (e.g. 1,2,4,8) or 'none', got {list(ranks)}")
    return tuple(sorted(set(ranks)))


def kl_meter(model: nn.Module, tokenizer, answers: BehaviourSet, n_tokens: int = KL_TOKENS) -> ContinuationKL:
    """KL(α) on the behaviour set's prompts, rendered and encoded exactly as ``behaviour_and_mass``
    reads them (``answer_prompt`` for a chat set, the raw text otherwise)."""
    asked = [answer_prompt(tokenizer, t) for t in answers.texts] if answers.chat else list(answers.texts)
    return ContinuationKL(model, tokenizer, asked, add_special_tokens=not answers.chat, n_tokens=n_tokens)


def _calibrate(model, tokenizer, delta, answers: BehaviourSet, step: float, target: float,
               n_tokens: int) -> tuple[dict[float, Calibration], dict[str, float]]:
    """Each arm's KL-matched α (sign -> ``Calibration``; the check steers by ±α·step·w) and the
    calibration's cost: full passes over the prompts, one-token steps, seconds. The prompts are
    rendered exactly as ``behaviour_and_mass`` reads them."""
    t0 = time.perf_counter()
    meter = kl_meter(model, tokenizer, answers, n_tokens)
    start, bound = start_and_bound(model, delta, step)
    cost = {"prefill_passes": meter.reference_passes, "decode_steps": 0}

    def kl(sign: float, alpha: float) -> float:
        reading = meter(delta, sign * step * alpha)
        cost["prefill_passes"] += reading.prefill_passes
        cost["decode_steps"] += reading.decode_steps
        return reading.kl

    found = {sign: find_strength(lambda a, s=sign: kl(s, a), target, start=start, bound=bound) for sign in (+1.0, -1.0)}
    cost["seconds"] = time.perf_counter() - t0
    cost["bound"] = bound
    return found, cost


def _run_causal(model, tokenizer, delta, answers: BehaviourSet, ranked, combined, *, k, n_null, seed, write_gains,
                act_oracles, alphas: list[float], centred: bool, progress: bool, kl_target: float | None = None,
                n_norm_only: int = 0, kl_tokens: int = KL_TOKENS, curve_ranks: tuple[int, ...] = CURVE_RANKS,
                ) -> CausalResult:
    texts = answers.texts
    layers = sorted(combined)
    d = next(iter(combined.values())).d
    step = 0.5 if centred else 1.0  # around the midpoint, ±α·w/2
    top = list(ranked[:k])
    tested_sets = [*(("candidate", n, b) for n, b in top), *(("act_oracle", n, b) for n, b in act_oracles)]
    profile_of = lambda bases: tuple((lay, int(bases[lay].shape[1])) for lay in layers)  # noqa: E731
    curves = []
    if curve_ranks:
        curves.append(("oracle_combined", {lay: combined[lay].oracle_basis(max(curve_ranks)) for lay in layers}))
        if top:
            curves.append((top[0][0], dict(top[0][1])))
        curves += [(name, dict(bases)) for name, bases in act_oracles]
    curve_ks = {name: [x for x in curve_ranks if x <= min(min(int(o[lay].shape[1]) for lay in layers), d)]
                for name, o in curves}
    # A curve of a tested subspace (the top candidate, an activation oracle) reaches, at its full rank
    # and trained norm, the very delta its own row restricts to: that point reads the row's effect.
    tested_names = {name for _, name, _ in tested_sets}
    whole_k: dict[str, int] = {}
    for name, o in curves:
        ranks = {int(o[lay].shape[1]) for lay in layers}
        if name in tested_names and len(ranks) == 1 and min(ranks) in curve_ks[name]:
            whole_k[name] = min(ranks)
    total = causal_plan(len(alphas) if kl_target is None else 1, len(tested_sets),
                        len({profile_of(b) for _, _, b in tested_sets}), n_null,
                        sum(len(v) for v in curve_ks.values()), n_norm_only, n_curve_reused=len(whole_k))
    bar = tqdm(total=total, desc="causal check", unit="delta", disable=not progress)
    rows: list[dict] = []
    passes = 1
    # The α = 0 reference, recording the residual entering the first scored layer: every restricted
    # delta steers only scored layers, so each of their passes resumes there (bit for bit the same).
    prefix = Prefix(min(layers))
    b0, mass0 = behaviour_and_mass(model, tokenizer, texts, answers, prefix)

    def E(w: Mapping[str, Tensor], alpha: float, into: dict | None = None, minus: float | None = None) -> float:
        nonlocal passes
        passes += 2
        got = steered_behaviour(model, tokenizer, w, texts, answers, prefix, alpha=step * alpha,
                                alpha_minus=None if minus is None else step * minus)
        bar.update(1)
        (bp, mp), (bm, mm) = got[+1.0], got[-1.0]
        if into is not None:
            into.update(effect_plus=float((bp - b0).mean()), effect_minus=float((bm - b0).mean()),
                        mass_plus=float(mp.mean()), mass_minus=float(mm.mean()))
        return float((bp - bm).mean())

    def R_w(bases: Mapping[int, Tensor]) -> float:
        vals = [energy(combined[layer], bases[layer]) / (bases[layer].shape[1] / d)
                for layer in layers if bases[layer].shape[1] > 0]
        return sum(vals) / len(vals) if len(vals) == len(layers) else math.nan

    rows.append({"kind": "reference", "name": "alpha_0", "alpha": 0.0, "effect": float(b0.mean()),
                 "mass_plus": float(mass0.mean()), "mass_minus": float(mass0.mean())})
    calibration: dict[float, Calibration] | None = None
    cost: dict[str, float] = {}
    strengths: dict[float, dict] = {}
    if kl_target is None:
        # The strength grid: the whole delta at each α, then the largest coherent one for everything else.
        for a in alphas:
            row: dict = {}
            e = E(delta, a, row)
            strengths[a] = {"kind": "strength", "name": f"w@{a:g}", "alpha": a, "effect": e, **row}
        alpha, coherent = choose_alpha(float(mass0.mean()), {a: (r["mass_plus"], r["mass_minus"]) for a, r in strengths.items()})
        e_w, ref_w = strengths[alpha]["effect"], {c: strengths[alpha][c] for c in ("effect_plus", "effect_minus", "mass_plus", "mass_minus")}
        minus = alpha
    else:
        # Each arm at the α of the KL budget (issue 30), then the whole delta there.
        calibration, cost = _calibrate(model, tokenizer, delta, answers, step, kl_target, kl_tokens)
        passes += int(cost["prefill_passes"] + cost["decode_steps"])
        alpha, minus = calibration[+1.0].alpha, calibration[-1.0].alpha
        for sign, arm in ((+1.0, "plus"), (-1.0, "minus")):
            c = calibration[sign]
            rows.append({"kind": "calibration", "name": arm, "alpha": c.alpha, "kl": c.kl, "evaluations": c.evaluations,
                         "converged": c.converged})
            rows += [{"kind": "kl_trace", "name": arm, "alpha": a, "kl": v, "evaluations": i + 1}
                     for i, (a, v) in enumerate(c.trace)]
        ref_w = {}
        e_w = E(delta, alpha, ref_w, minus)
        coherent = coherent_masses(float(mass0.mean()), ref_w["mass_plus"], ref_w["mass_minus"])
    at = {"alpha": alpha, "alpha_minus": minus}
    writes = restrict(delta, layers=layers, write_gains=write_gains)
    ref_writes: dict = {}
    e_writes = E(writes, alpha, ref_writes, minus)
    writes_norm = frobenius(writes)
    rows += [{**r, "alpha_minus": a, "kept": _ratio(r["effect"], e_writes) if a == alpha else None}
             for a, r in strengths.items()]
    rows.append({"kind": "reference", "name": "w", **at, "effect": e_w, "kept": _ratio(e_w, e_writes), **ref_w})
    rows.append({"kind": "reference", "name": "w_writes", **at, "effect": e_writes,
                 "kept": 1.0 if e_writes else math.nan, "R_w_combined": 1.0, **ref_writes})

    tested_effect: dict[str, float] = {}

    def tested(kind: str, name: str, bases: Mapping[int, Tensor]) -> dict:
        row: dict = {}
        e_b = E(restrict(delta, bases, layers=layers, write_gains=write_gains), alpha, row, minus)
        tested_effect[name] = e_b
        e_abl = E(restrict(delta, bases, ablate=True, layers=layers, write_gains=write_gains), alpha, None, minus)
        row.update({"kind": kind, "name": name, **at,
                    "rank": sum(int(bases[lay].shape[1]) for lay in layers) / len(layers),
                    "R_w_combined": R_w(bases), "effect": e_b, "effect_ablated": e_abl,
                    "kept": _ratio(e_b, e_writes), "ablated": 1.0 - _ratio(e_abl, e_writes)})
        return row

    subjects = [tested(kind, name, bases) for kind, name, bases in tested_sets]
    profiles: dict[tuple[tuple[int, int], ...], list[dict]] = {}
    for (_, _, bases), row in zip(tested_sets, subjects):
        profiles.setdefault(profile_of(bases), []).append(row)
    for profile, members in profiles.items():
        ranks = dict(profile)
        tag = "@" + ",".join(str(r) for r in sorted(set(ranks.values())))
        oracle = tested("oracle", f"oracle_combined{tag}", {lay: combined[lay].oracle_basis(r) for lay, r in ranks.items()})
        draws = [tested("random", f"random_{i}{tag}", null_bases(d, ranks, i, seed)) for i in range(n_null)]
        km, ks = _mean_sd([r["kept"] for r in draws])
        am, asd = _mean_sd([r["ablated"] for r in draws])
        for row in (*members, oracle):
            row.update(null_kept_mean=km, null_kept_sd=ks, z_kept=_z(row["kept"], km, ks),
                       null_ablated_mean=am, null_ablated_sd=asd, z_ablated=_z(row["ablated"], am, asd))
        rows += [*members, oracle, *draws]

    # Retention curves: the combined oracle (eigen-order) and the top candidate's leading columns.
    for name, ordered in curves:
        for kk in curve_ks[name]:
            bases = {lay: ordered[lay][:, :kk] for lay in layers}
            w_b = restrict(delta, bases, layers=layers, write_gains=write_gains)
            for matched, w in ((False, w_b), (True, scaled(w_b, writes_norm))):
                e_b = tested_effect[name] if not matched and whole_k.get(name) == kk else E(w, alpha, None, minus)
                rows.append({"kind": "curve", "name": name, **at, "rank": float(kk), "k": kk,
                             "norm_matched": matched, "R_w_combined": R_w(bases), "effect": e_b,
                             "kept": _ratio(e_b, e_writes)})
    # Direction or allocation (issue 30): w_writes with every tensor's direction drawn at random, its norm kept.
    for i in range(n_norm_only):
        row = {}
        e = E(norm_only(writes, i, seed), alpha, row, minus)
        rows.append({"kind": "norm_only", "name": f"norm_only_{i}", **at, "effect": e, "kept": _ratio(e, e_writes), **row})
    bar.close()
    table = pl.DataFrame([{c: row.get(c) for c in COLUMNS} for row in rows], schema=COLUMNS)
    return CausalResult(table, answers, e_w, e_writes, [name for name, _ in top], n_null, passes, alpha=alpha,
                        coherent=coherent, centre="midpoint" if centred else "base", alphas=tuple(alphas),
                        alpha_minus=minus, kl_target=kl_target, kl_tokens=kl_tokens,
                        calibration=calibration, calibration_cost=cost, n_norm_only=n_norm_only,
                        curve_ranks=curve_ranks)


def answer_masses(result: CausalResult) -> dict[float, float]:
    """α -> mean probability of the two answers: the unsteered model (α = 0) and the model steered
    with the whole delta w at +α₊ and −α₋ of the check (the reference rows ``alpha_0`` and ``w``)."""
    t = result.table
    a0 = t.filter((pl.col("kind") == "reference") & (pl.col("name") == "alpha_0")).row(0, named=True)
    w = t.filter((pl.col("kind") == "reference") & (pl.col("name") == "w")).row(0, named=True)
    return {0.0: a0["mass_plus"], result.alpha: w["mass_plus"], -result.minus: w["mass_minus"]}


def norm_only_line(result: CausalResult) -> str | None:
    """The norm-only control's paragraph (None without draws): moot when its draws keep at least
    ``NORM_ONLY_KEEPS`` of E(w_writes) on average."""
    rows = result.table.filter(pl.col("kind") == "norm_only")
    if not rows.height:
        return None
    mean, sd = _mean_sd(rows["kept"].to_list())
    said = (f"Direction or allocation (the norm-only control): w_writes with every tensor's direction replaced by a "
            f"seeded random one of the same Frobenius norm keeps {mean:.2f} ± {sd:.2f} of E(w_writes) ({rows.height} "
            "draws, at the same strengths)")
    if mean >= NORM_ONLY_KEEPS:
        return (f"Verdict (norm-only control): {said}: the behaviour change survives losing every direction of the "
                "delta, so it lives in how the norm is spread over layers and modules, and the subspace question is "
                f"MOOT for this pair (random directions at the trained norms do as well as any subspace; 'keeps': at "
                f"least {NORM_ONLY_KEEPS:g} on average).")
    return (f"{said}: the delta's directions carry the behaviour, not only how its norm is spread over layers and "
            "modules, so the subspace question stands.")


def strength_sentence(result: CausalResult) -> str:
    """How the check's strength was chosen, for the verdict: the grid and its rule, or the KL
    budget with each arm's α, the KL it reached, its evaluations and whether it converged."""
    def f(x, spec=".2f"):
        return "nan" if x is None or not math.isfinite(x) else format(x, spec)

    t = result.table
    if result.kl_target is None:
        a = result.alpha
        mass0 = answer_masses(result)[0.0]
        grid = "; ".join(f"α = {r['alpha']:g}: {f(r['mass_plus'])} / {f(r['mass_minus'])}"
                         for r in t.filter(pl.col("kind") == "strength").sort("alpha").iter_rows(named=True))
        rule = (f"α = {a:g}, the largest whose mass under +α and −α both stay ≥ {COHERENT_SHARE:g} × max(mass at α = 0, "
                f"{MIN_ANSWER_MASS:g})" if result.coherent else
                f"α = {a:g}, the smallest: NONE of the grid keeps the mass under ±α at ≥ {COHERENT_SHARE:g} × max(mass at "
                f"α = 0, {MIN_ANSWER_MASS:g}), so every number below is read where steering breaks the answer format")
        return f"the strength grid's answer mass under +α / −α: {grid} (unsteered {f(mass0)}); the check reads {rule}."
    reference = "θ + (Δ⁺ + Δ⁻)/2, the model the arms are steered from" if result.centre == "midpoint" else "the base model"
    arms = []
    for sign, name in ((+1.0, "α₊"), (-1.0, "α₋")):
        c = result.calibration[sign]
        how = (f"KL {f(c.kl, '.3f')}, {c.evaluations} evaluations" +
               ("" if c.converged else
                f"; NOT converged: {'the target is not reached within the bound α ≤ ' + format(c.alpha, '.4g') + ', read at the bound' if c.at_bound else 'read at the evaluation nearest the target'}"))
        arms.append(f"{name} = {c.alpha:.4g} ({how})")
    return (f"the strength is a matched KL budget (`--causal-strength {result.strength}`): each arm's α is the one at "
            f"which the {KL_QUANTILE:.0%} quantile of the per-token KL(steered ‖ {reference}) over {result.kl_tokens}-token "
            f"greedy continuations generated by the steered model from where b is read equals {result.kl_target:g} nat "
            f"(±5%): {'; '.join(arms)}; everything below is read at θ + α₊·w and θ − α₋·w"
            f"{' (±α·w/2 around the midpoint)' if result.centre == 'midpoint' else ''}. The answer mass under the two "
            f"arms {'stays' if result.coherent else 'does NOT stay'} ≥ {COHERENT_SHARE:g} × max(unsteered, "
            f"{MIN_ANSWER_MASS:g}).")


def verdict(result: CausalResult) -> str:
    """One paragraph for conclusion.md: does the winner carry the behaviour, against the null?"""
    t = result.table
    if not result.top:
        return "Causal check: no candidate was tested."
    best = t.filter((pl.col("kind") == "candidate") & (pl.col("name") == result.top[0])).row(0, named=True)
    oracle = t.filter(pl.col("kind") == "oracle").row(0, named=True)

    def f(x, spec=".2f"):
        return "nan" if x is None or not math.isfinite(x) else format(x, spec)

    carries = best["z_kept"] is not None and math.isfinite(best["z_kept"]) and best["z_kept"] > 2.0
    share = _ratio(best["kept"], oracle["kept"]) if oracle["kept"] and oracle["kept"] > 0 else math.nan
    mass = answer_masses(result)
    a, m = result.alpha, result.minus
    where = ASKED[result.answers.form]
    how = ("around the pair's midpoint θ + (Δ⁺ + Δ⁻)/2, steered by ±α·w/2 (α = 1: the two trained models)"
           if result.centre == "midpoint" else "around the base model, steered by ±α·w")
    lines = [
        f"Causal check (restricted steering, the behaviour b of {result.answers.source}, read {where}; {how}): "
        f"{strength_sentence(result)} "
        f"E(w) = {f(result.effect_w, '.3f')}, E(w_writes) = {f(result.effect_writes, '.3f')} "
        f"(the residual writers alone carry {f(_ratio(result.effect_writes, result.effect_w))} of the effect). "
        f"Probability mass on the two answers: {f(mass[0.0])} unsteered (α = 0), {f(mass[a])} at +α"
        f"{'' if a == m else '₊'}, {f(mass[-m])} at −α{'' if a == m else '₋'}. "
        f"The delta restricted to the winner `{best['name']}` (rank {f(best['rank'], '.0f')}) keeps "
        f"{f(best['kept'])} of E(w_writes); {result.n_null} random subspaces of the same ranks keep "
        f"{f(best['null_kept_mean'])} ± {f(best['null_kept_sd'])} (z = {f(best['z_kept'], '.1f')}); the rank-matched "
        f"combined weight oracle keeps {f(oracle['kept'])}. Ablating the winner removes {f(best['ablated'])} of the "
        f"effect (random: {f(best['null_ablated_mean'])} ± {f(best['null_ablated_sd'])}).",
        "",
    ]
    rank = "nan" if oracle["rank"] is None else format(oracle["rank"], "g")
    oracle_little = oracle["kept"] is not None and math.isfinite(oracle["kept"]) and oracle["kept"] < CARRIES_SHARE
    if oracle_little and not (best["kept"] is not None and best["kept"] >= CARRIES_SHARE):
        ratio = f" ({f(100 * share, '.0f')}% of the oracle's)" if math.isfinite(share) else ""
        no_curve = ",".join(map(str, result.curve_ranks)) + ": no rank within the bases" if result.curve_ranks else "none"
        above = (f"more than random subspaces of its rank (z_kept = {f(best['z_kept'], '.1f')} > 2), yet its "
                 f"share{ratio} is a ratio of two small numbers, not evidence that it carries the behaviour"
                 if carries else f"no more than random subspaces of its rank (z_kept = {f(best['z_kept'], '.1f')} ≤ 2)")
        lines.append(f"Verdict: at rank {rank} no subspace carries the behaviour: even the rank-matched oracle (the "
                     f"rank-{rank} subspace holding the most of the residual writers' weight energy) keeps only "
                     f"{f(oracle['kept'])} of E(w_writes), below {CARRIES_SHARE:g} (a subspace carries the behaviour "
                     f"when it keeps at least {CARRIES_SHARE:g} of it). The winner keeps {f(best['kept'])}: {above}. "
                     + ("The retention curve (causal.tsv, rows `curve`) shows at which rank, if any, the oracle's "
                        "leading directions carry it." if t.filter(pl.col("kind") == "curve").height else
                        f"This check drew no retention curve (`--causal-curve {no_curve}`); one shows at which "
                        "rank, if any, the oracle's leading directions carry it."))
    elif not carries:
        lines.append("Verdict: the winner does NOT carry more of the behaviour than a random subspace of its rank "
                     "(z_kept ≤ 2): its weight-energy score is not evidence that it carries the behaviour.")
    elif not (share >= SIZE_SHARE_OF_ORACLE):
        lines.append(f"Verdict: the winner carries more of the behaviour than a random subspace of its rank "
                     f"(z_kept = {f(best['z_kept'], '.1f')} > 2), but little of it: it keeps {f(best['kept'])} of the "
                     f"effect, {f(100 * share, '.0f')}% of what the rank-matched oracle keeps ({f(oracle['kept'])}; "
                     f"'little': below {SIZE_SHARE_OF_ORACLE:.0%}). Significant, not explanatory.")
    else:
        lines.append(f"Verdict: the winner carries the behaviour: it keeps {f(best['kept'])} of the effect "
                     f"(z_kept = {f(best['z_kept'], '.1f')} > 2 against random subspaces of its rank), "
                     f"{f(100 * share, '.0f')}% of what the rank-matched oracle keeps ({f(oracle['kept'])}).")
    control = norm_only_line(result)
    if control:
        lines += ["", control]
    low = {x: m for x, m in mass.items() if x != 0.0 and not (m >= MIN_ANSWER_MASS)}
    if low:
        which = " and ".join(f"α = {x:+g} ({f(m)})" for x, m in sorted(low.items(), reverse=True))
        lines += ["", f"Warning: the behaviour metric is not reading an answer: under the steered model at {which} the "
                      f"two answers' first tokens get less than {MIN_ANSWER_MASS:g} of the probability, so b there is a "
                      "logit difference between tokens the model does not produce, and E, kept and ablated measure "
                      "the format breaking, not the behaviour. (Little mass at α = 0 alone is no fault: a model "
                      "without an answer format can still be a valid test once steered.)"]
    if not result.coherent and result.centre == "base":
        lines += ["", "The way out: around the pair's midpoint θ + (Δ⁺ + Δ⁻)/2, α = 1 is the two trained models "
                      "themselves, which answer; a delta written by `subspace-sweep delta` holds the midpoint, and "
                      "the check steers around it by default (`--causal-centre auto`; `midpoint` requires it)."]
    if result.effect_writes == 0.0 or (result.effect_w * result.effect_writes) < 0:
        lines += ["", "Caveat: E(w_writes) is zero or has the opposite sign of E(w): the residual writers do not carry "
                      "the behaviour, and kept/ablated ratios are not meaningful."]
    return "\n".join(lines)
