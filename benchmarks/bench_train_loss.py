"""Benchmark of a training step's loss on a real model: the unembedding at the answer positions
only (``lora_train.assistant_loss``) against the model's full logits at every position (the loss
as it was), a script, not a test (issue 31).

    .venv/bin/python benchmarks/bench_train_loss.py --model smollm2-135m-instruct
    .venv/bin/python benchmarks/bench_train_loss.py --model gemma-3-270m --steps 2
    .venv/bin/python benchmarks/bench_train_loss.py --model gemma-3-270m --pair

``--pair`` times the whole ``subspace-sweep train`` of the real tier's shipped pair instead (its
manifest's settings: both adapters, 20 steps each, model load and writing included), once with the
loss as it is and once with the full-logits loss put in its place, each in its own process; it
prints the seconds and peak RSS of each and their ratio (issue 31: "the pair's training time
before and after").

Each loss runs in its own subprocess (so each peak RSS is its own): the model loaded as ``train``
loads it, the shipped probes' + examples encoded as ``train`` encodes them (SPEC §8's plain-text
format for a model without a chat template), a rank-8 LoRA on the default layers' q/v/o/down
projections, then ``--steps`` full-batch AdamW steps (forward, backward, step; the first is
timed apart: it warms the allocator). Prints ONE JSON line: seconds per step of each loss, their
ratio, each subprocess's peak RSS, the losses of the first step (equal to float rounding), the
vocabulary, the positions the loss reads and those the full logits compute. Timings on a shared
machine: compare the ratio, measured in one invocation.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def full_logits_loss(model, batch):
    """The loss as it was before issue 31: the model's logits at every position, the answer tokens read."""
    import torch

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    dev = next(model.parameters()).device
    logits = causal_lm(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             batch["labels"][:, 1:].reshape(-1).to(dev), ignore_index=-100)


def one(model_name: str, loss: str, steps: int) -> dict:
    import torch

    from subspace_sweep import lora_train
    from subspace_sweep.lora_train import adapter_config, default_lora_layers, encode_examples, training_texts
    from subspace_sweep.model import load_model, n_layers_of

    model, tok = load_model(model_name, dtype="float32", device="cpu")
    batch = encode_examples(tok, training_texts(+1))
    layers = default_lora_layers(n_layers_of(model))
    config = adapter_config("lora", rank=8, alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"),
                            layers=layers)
    import peft

    torch.manual_seed(0)
    m = peft.get_peft_model(model, config).eval()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)

    fn = lora_train.assistant_loss if loss == "gathered" else full_logits_loss
    times, losses = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        value = fn(m, batch)
        value.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(value.detach()))
    return {"loss": loss, "first_step_s": times[0], "s_per_step": sum(times[1:]) / steps, "loss_step0": losses[0],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "vocab": int(model.config.vocab_size), "answer_positions": int((batch["labels"][:, 1:] != -100).sum()),
            "positions": int(batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)),
            "threads": torch.get_num_threads()}


#: model -> the shipped pair whose manifest gives ``--pair``'s settings
PAIRS = {"smollm2-135m-instruct": "smollm2_pair", "gemma-3-270m": "gemma3_pair"}


def one_pair(model_name: str, loss: str) -> dict:
    """The whole `train` of the shipped pair's settings with ``loss`` (in this process)."""
    from subspace_sweep import cli, lora_train

    shipped = Path(__file__).resolve().parents[1] / "tests" / "integration" / "data" / PAIRS[model_name]
    s = json.loads((shipped / "manifest.json").read_text())["settings"]
    if loss == "full":
        lora_train.assistant_loss = full_logits_loss  # the training loop reads the module's name
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", "--model", model_name, "--out", str(Path(tmp) / "pair"), "--family", s["family"],
                "--rank", str(s["rank"]), "--alpha", str(s["alpha"]), "--layers", ",".join(map(str, s["layers"])),
                "--target-modules", ",".join(s["target_modules"]), "--steps", str(s["steps"]), "--lr", str(s["lr"]),
                "--seed", str(s["seed"])]
        t0 = time.perf_counter()
        assert cli.main(argv) == 0
        seconds = time.perf_counter() - t0
        losses = {sign: json.loads((Path(tmp) / "pair" / sign / "lora_train.json").read_text())["loss_final"]
                  for sign in ("pos", "neg")}
    return {"loss": loss, "pair_s": seconds, "loss_final": losses, "steps": s["steps"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pair", action="store_true", help="time the whole `train` of the shipped pair's settings")
    p.add_argument("--one", choices=("gathered", "full"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_pair(args.model, args.one) if args.pair else one(args.model, args.one, args.steps)))
        return 0
    out = {"model": args.model, **({"pair": True} if args.pair else {"steps": args.steps})}
    for loss in ("full", "gathered"):
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--one", loss,
                               *(["--pair"] if args.pair else [])], capture_output=True, text=True, check=True)
        out[loss] = json.loads(proc.stdout.strip().splitlines()[-1])
    if args.pair:
        out["full_over_gathered_pair_s"] = out["full"]["pair_s"] / out["gathered"]["pair_s"]
    else:
        out["full_over_gathered_s_per_step"] = out["full"]["s_per_step"] / out["gathered"]["s_per_step"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
