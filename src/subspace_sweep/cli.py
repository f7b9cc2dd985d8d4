"""The ``subspace-sweep`` command line: run, demo, delta, explain.

Bad input ends with exit code 2 and one line naming the fault; nothing is written then.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import InputError

EXIT_BAD_INPUT = 2
EXIT_DEMO_NOT_RECOVERED = 1


def _layers(text: str) -> tuple[int, ...]:
    """``8..21``, ``8-21``, ``3,5,7`` or ``3 5 7`` pieces."""
    out: list[int] = []
    for piece in text.replace(",", " ").split():
        for sep in ("..", "-"):
            if sep in piece:
                a, b = piece.split(sep, 1)
                out.extend(range(int(a), int(b) + 1))
                break
        else:
            out.append(int(piece))
    return tuple(out)


def _layers_arg(text: str) -> tuple[int, ...]:
    try:
        return _layers(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read layers {text!r}; use e.g. 8..21 or 3,5,7") from None


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--r", type=int, default=8, help="rank of every candidate basis (default 8)")
    p.add_argument("--k-broad", type=int, default=64, help="rank of the broad read bases projected away (default 64)")
    p.add_argument("--layers", type=_layers_arg, default=None,
                   help="scored layers, e.g. 8..21 (default: where the delta writes to the residual stream)")
    p.add_argument("--n-fit", type=int, default=None, help="number of FIT probes (default: first half)")
    p.add_argument("--null", choices=("exact", "mc"), default="exact", help="exact null (default) or Monte-Carlo cross-check")
    p.add_argument("--n-null", type=int, default=2000, help="Monte-Carlo draws with --null mc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subspace-sweep",
        description="Score base-model subspaces against a steering LoRA's activation change and weight delta.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the sweep on a model and a delta")
    run.add_argument("--model", default="Qwen/Qwen3-0.6B", help="HF id (from the local cache) or a local folder")
    run.add_argument("--delta", required=True, help="w = θ⁺ − θ⁻ as .safetensors (preferred) or .pt")
    run.add_argument("--out", required=True, help="output folder (written atomically)")
    run.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on GPU, float32 on CPU)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    _add_sweep_options(run)

    demo = sub.add_parser("demo", help="offline demo: tiny Qwen3 + a planted delta; checks the plant is recovered")
    demo.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    demo.add_argument("--plant", default="mlp_write", help="A-side candidate whose span the delta is planted in")
    _add_sweep_options(demo)

    delta = sub.add_parser("delta", help="w = merged(adapter+) − merged(adapter−) from two PEFT adapters")
    delta.add_argument("--model", required=True, help="base model: HF id or local folder")
    delta.add_argument("--adapter-pos", required=True)
    delta.add_argument("--adapter-neg", required=True)
    delta.add_argument("--out", required=True, help="output .safetensors file")
    delta.add_argument("--overwrite", action="store_true")

    explain = sub.add_parser("explain", help="print a candidate's definition")
    explain.add_argument("name")
    return parser


def _config(args: argparse.Namespace, **overrides):
    from .sweep import SweepConfig

    fields = dict(
        r=args.r, k_broad=args.k_broad, layers=args.layers, n_fit=args.n_fit, null=args.null,
        n_null=args.n_null, seed=args.seed, overwrite=args.overwrite, quiet=args.quiet,
    )
    fields.update(overrides)
    return SweepConfig(**fields)


def cmd_run(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    config = _config(args, model=args.model, delta=args.delta, out=args.out, dtype=args.dtype, device=args.device)
    result = run_sweep(config)
    if not args.quiet:
        print(bluf_table(result))
        print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    outcome = run_demo(_config(args, out=args.out), plant=args.plant)
    print(bluf_table(outcome.result))
    print(outcome.verdict())
    print(f"wrote {args.out}")
    return 0 if outcome.recovered else EXIT_DEMO_NOT_RECOVERED


def cmd_delta(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .delta import delta_from_peft, save_delta

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError(f"--out {out} exists; pass --overwrite to replace it")
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out}: the delta is written as .safetensors")
    delta = delta_from_peft(args.model, args.adapter_pos, args.adapter_neg)
    save_delta(delta, out)
    print(f"wrote {out} ({len(delta)} tensors)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .candidates import describe

    print(describe(args.name))
    return 0


def bluf_table(result, top: int = 12) -> str:
    """The joint A-side ranking's head as a fixed-width table."""
    rows = result.ranking("joint").head(top)
    head = f"{'#':>3} {'candidate':<34} {'axis':<6} {'R_act':>8} {'R_w_comb':>9} {'joint':>8} {'%orc_w':>7} {'z_w':>7}"
    lines = ["A-side write+mixed ranking (joint = sqrt(R_act * R_w_combined), mean over scored layers)", head]
    for i, r in enumerate(rows.iter_rows(named=True), 1):
        lines.append(
            f"{i:>3} {r['candidate']:<34} {r['axis_kind']:<6} {r['R_act']:>8.2f} {r['R_w_combined']:>9.2f} "
            f"{r['joint']:>8.2f} {r['pct_oracle_combined']:>7.1f} {r['z_w_combined']:>7.1f}"
        )
    return "\n".join(lines)


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "delta": cmd_delta, "explain": cmd_explain}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"subspace-sweep {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
