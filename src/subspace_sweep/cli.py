"""The ``subspace-sweep`` command line: run, demo, train, delta, compare, report, explain.

Bad input ends with exit code 2 and one line naming the fault; nothing is written then.
Ctrl-C ends with exit code 130 and one line. Warnings are one line each, without source lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from .config import parse_layers
from .errors import InputError
from .lora_train import DEFAULT_TARGET_MODULES

EXIT_BAD_INPUT = 2
EXIT_DEMO_NOT_RECOVERED = 1
EXIT_JOBS_FAILED = 1  # study: some jobs failed (each named on stderr); the others finished
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (its default prints the usage block first)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _layers_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_layers(text)
    except ValueError as e:
        if str(e).startswith(("the range", "it names")):
            raise argparse.ArgumentTypeError(f"cannot read layers {text!r}: {e}") from None
        raise argparse.ArgumentTypeError(f"cannot read layers {text!r}; use e.g. 8..21 or 3,5,7") from None


def _alphas_arg(text: str) -> tuple[float, ...]:
    if text.strip() and any(not item.strip() for item in text.split(",")):  # "1,,2" or "1,2,": not 1,2
        raise argparse.ArgumentTypeError(f"cannot read strengths {text!r}: an empty item between commas; "
                                         "use e.g. 0.25,0.5,1")
    try:
        out = tuple(float(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read strengths {text!r}; use e.g. 0.25,0.5,1") from None
    if not out:
        raise argparse.ArgumentTypeError("it names no strength; use e.g. 0.25,0.5,1")
    return out


def _ranks_arg(text: str) -> tuple[int, ...]:
    """--causal-curve: "none" or comma-separated integers (``SweepConfig.validate`` wants them positive)."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read ranks {text!r}; use e.g. 1,2,4,8 or none") from None


def _strength(args: argparse.Namespace) -> str:
    """--causal-strength as given; --causal-alpha alone selects the grid (it is the grid's option)."""
    if args.causal_alpha and args.causal_strength not in (None, "grid"):
        raise InputError(f"--causal-alpha is the grid of --causal-strength grid; it does not go with "
                         f"--causal-strength {args.causal_strength}")
    return args.causal_strength or "grid"


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--r", type=int, default=8, help="rank of every candidate basis (default 8)")
    p.add_argument("--k-broad", type=int, default=None,
                   help="rank of the broad read bases projected away (default 64, capped at d/4)")
    p.add_argument("--layers", type=_layers_arg, default=None,
                   help="scored layers, e.g. 8..21 (default: where the delta writes to the residual stream)")
    p.add_argument("--n-fit", type=int, default=None, help="number of FIT probes (default: first half)")
    p.add_argument("--null", choices=("exact", "mc"), default="exact", help="exact null (default) or Monte-Carlo cross-check")
    p.add_argument("--n-null", type=int, default=2000, help="Monte-Carlo draws with --null mc (at least 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", choices=("block_output", "block_local"), default="block_output",
                   help="activation label: change of the block output (default) or of (output - input)")
    p.add_argument("--topic-holdout", type=int, nargs="?", const=-1, default=None, metavar="N",
                   help="also score R_act on EVAL probes whose claim is not among the first N LoRA training "
                        "claims (N defaults to the data's n_lora_train_topics, 20)")
    p.add_argument("--n-boot", type=int, default=2000,
                   help="bootstrap resamples of EVAL prompts (0: none; else at least 200 for the 95%% interval)")
    p.add_argument("--a-side-cache", default=None, metavar="DIR",
                   help="reuse the A-side (captures + candidate bases, which never depend on the delta) and the "
                        "gradient bases (their loss gradients on the behaviour's examples) from DIR when the model, "
                        "inputs and options match exactly, else build them and store them there")
    p.add_argument("--causal", type=int, default=0, metavar="K",
                   help="causal check: steer with the delta restricted to each of the top K candidates of the joint "
                        "ranking, the rank-matched oracle and random subspaces (2 EVAL forward passes per restricted "
                        "delta; default 0 = off)")
    p.add_argument("--behaviour", default=None, metavar="FILE",
                   help="the behaviour's prompts: JSONL lines {\"prompt\", \"answers\": [a, b], \"sign\": 1|-1}: the "
                        "causal check's prompts and the gradient bases' training examples (default: the shipped probes)")
    p.add_argument("--n-train", type=int, default=None, metavar="N",
                   help="the pair trained on the first N claims (default: the shipped 20) or --behaviour lines (default: "
                        "all): the gradient bases' examples; grad_heldout reads the rest")
    p.add_argument("--causal-strength", default=None, metavar="kl:T|grid",
                   help="the causal check's strength: kl:T (default kl:0.5) steers each arm at the α where the 95th "
                        "percentile of the per-token KL(steered ‖ unsteered) over 32-token greedy continuations of the "
                        "EVAL prompts is T nats (comparable across adapter families and seeds); grid reads the "
                        "largest coherent α of --causal-alpha")
    p.add_argument("--causal-alpha", type=_alphas_arg, default=None, metavar="A,B,...",
                   help="the strength grid of --causal-strength grid (default 0.25,0.5,1; giving it selects the grid): "
                        "it reads the largest α whose answer mass under ±α stays at least half the unsteered one (or of 0.1)")
    p.add_argument("--causal-centre", choices=("auto", "base", "midpoint"), default="auto",
                   help="steer around the pair's midpoint (θ + (Δ⁺+Δ⁻)/2 ± α·w/2: α = 1 is the two trained models; "
                        "needs a delta made by `subspace-sweep delta`, which stores it) or the base model (θ ± α·w); "
                        "default auto: the midpoint where the delta holds it, else the base")
    p.add_argument("--causal-curve", type=_ranks_arg, default=None, metavar="K,K,...|none",
                   help="the ranks k of the causal check's retention curves (the combined oracle's, the winner's and "
                        "the activation oracles' leading k directions, at the trained norm and norm-matched; default "
                        "1,2,4,8,16,32): two steered deltas per k and curve, most of the check's passes; none: no curve")
    p.add_argument("--causal-null", type=int, default=8, metavar="N",
                   help="random subspaces per tested rank in the causal null (default 8, at least 5)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="subspace-sweep",
        description="Score base-model subspaces against a steering LoRA's activation change and weight delta.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="also show the libraries' deprecation warnings (hidden by default: they are theirs, not ours)")

    run = sub.add_parser("run", parents=[common], help="run the sweep on a model and a delta")
    run.add_argument("--model", default="Qwen/Qwen3-0.6B", help="HF id (from the local cache) or a local folder")
    run.add_argument("--delta", required=True, action="append",
                     help="w = θ⁺ − θ⁻ as .safetensors (preferred) or .pt; repeat for several deltas of the same "
                          "model (e.g. LoRA seeds): the A-side is built once, one run folder per delta under --out")
    run.add_argument("--out", required=True, help="output folder (written atomically)")
    run.add_argument("--dtype", default=None,
                     help="model dtype: bfloat16, float16, float32 or float64 (default bfloat16 on GPU, float32 on CPU)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    _add_sweep_options(run)

    demo = sub.add_parser("demo", parents=[common], help="offline demo: tiny Qwen3 + a planted delta; checks the plant is recovered")
    demo.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    demo.add_argument("--plant", default="mlp_write", help="A-side candidate whose span the delta is planted in")
    _add_sweep_options(demo)

    train = sub.add_parser("train", parents=[common], help="train the +/− adapter pair (peft) of a behaviour on a chat model")
    train.add_argument("--model", required=True,
                       help="base model: HF id, local folder, .gguf file or a known name (smollm2-135m-instruct)")
    train.add_argument("--out", required=True, help="output folder: pos/ and neg/ adapters (written atomically)")
    train.add_argument("--behaviour", default=None, metavar="FILE",
                       help="train on a behaviour file (JSONL {\"prompt\", \"answers\": [a, b], \"sign\": 1|-1}: the + "
                            "adapter answers the behaviour answer, the − adapter the other; default: the shipped "
                            "sycophancy probes, agreeing vs honestly disagreeing)")
    train.add_argument("--n-train", type=int, default=None, metavar="N",
                       help="train on the first N prompts (default: the shipped probes' 20 LoRA training claims, "
                            "or every line of --behaviour)")
    train.add_argument("--family", default="lora", help="adapter family: lora (default), dora, pissa, oft, ia3, delora, boft")
    train.add_argument("--rank", type=int, default=8, help="adapter rank (default 8)")
    train.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    train.add_argument("--layers", type=_layers_arg, default=None,
                       help="adapted layers, e.g. 8..21 (default: the middle half, 8..21 of 28 as the seed)")
    train.add_argument("--target-modules", default=",".join(DEFAULT_TARGET_MODULES),
                       help=f"adapted projections (default {','.join(DEFAULT_TARGET_MODULES)})")
    train.add_argument("--steps", type=int, default=20, help="full-batch AdamW steps (default 20)")
    train.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--overwrite", action="store_true", help="replace a folder this command wrote")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    delta = sub.add_parser("delta", parents=[common], help="w = merged(adapter+) − merged(adapter−) from two PEFT adapters")
    delta.add_argument("--model", required=True, help="base model: HF id, local folder, .gguf file or a known name")
    delta.add_argument("--adapter-pos", required=True)
    delta.add_argument("--adapter-neg", required=True)
    delta.add_argument("--out", required=True, help="output .safetensors file")
    delta.add_argument("--overwrite", action="store_true")

    compare = sub.add_parser("compare", parents=[common], help="stability of the ranking across runs of the same model (e.g. LoRA seeds)")
    compare.add_argument("runs", nargs="+", help="run folders written by `run`")
    compare.add_argument("--out", required=True, help="output folder (written atomically)")
    compare.add_argument("--top-k", type=int, default=5, help="top-k of the joint ranking counted (default 5)")
    compare.add_argument("--min-runs", type=int, default=None, help="stable: in the top-k of at least this many runs "
                         "(default: half of them, rounded up)")
    compare.add_argument("--z-min", type=float, default=2.0, help="stable: z_w_combined above this in every run")
    compare.add_argument("--overwrite", action="store_true")

    study = sub.add_parser("study", parents=[common],
                           help="the question over models × adapter families × seeds: train, delta and run per job, "
                                "then the aggregate")
    study.add_argument("spec", help="the study spec (TOML): models, families, seeds, train, run, slurm")
    study.add_argument("--out", required=True, help="the study folder (created; rerun the same command to resume)")
    study.add_argument("--executor", default="local", choices=("local", "slurm", "submitit-local"),
                       help="local: one job at a time in this process (default); slurm: a submitit job array; "
                            "submitit-local: the same submitit path as local subprocesses")
    study.add_argument("--dry-run", action="store_true", help="list the jobs and their state; run nothing")
    study.add_argument("--aggregate-only", action="store_true",
                       help="run nothing: write DIR/study/ from the jobs finished so far (the others listed as not "
                            "finished), e.g. a long study's interim answer")
    study.add_argument("--only", action="append", default=[], metavar="GLOB",
                       help="run only the jobs whose id matches (e.g. 'gemma-3-270m/*', 'smollm2-135m-instruct/*/seed2'; "
                            "repeatable); the aggregate still lists every job of the spec")
    study.add_argument("--merge", action="append", default=[], metavar="INPUTS.json",
                       help="with --aggregate-only: take the jobs this folder has not finished from another "
                            "aggregate's inputs.json of the same spec (each job's hash must match; repeatable)")
    study.add_argument("--overwrite", action="store_true",
                       help="accept a changed spec: redo the jobs it changes, delete the ones it drops")
    study.add_argument("--quiet", action="store_true", help="no progress bar")

    report = sub.add_parser("report", parents=[common], help="(re)write report.html of a run or compare folder")
    report.add_argument("folder", help="a run or compare folder written by subspace-sweep (old ones included)")

    explain = sub.add_parser("explain", help="print a candidate's definition")
    explain.add_argument("name")
    return parser


def _config(args: argparse.Namespace, **overrides):
    from .config import SweepConfig

    holdout = args.topic_holdout
    if holdout == -1:
        from .prompts import load_probe_set

        holdout = load_probe_set().n_lora_train_topics
    fields = dict(
        r=args.r, k_broad=args.k_broad, layers=args.layers, n_fit=args.n_fit, null=args.null,
        n_null=args.n_null, seed=args.seed, overwrite=args.overwrite, quiet=args.quiet,
        label=args.label, topic_holdout=holdout, n_boot=args.n_boot, a_side_cache=args.a_side_cache,
        causal=args.causal, causal_null=args.causal_null, behaviour=args.behaviour, n_train=args.n_train,
        causal_centre=args.causal_centre, **({"causal_alpha": args.causal_alpha} if args.causal_alpha else {}),
        **({"causal_curve": args.causal_curve} if args.causal_curve is not None else {}),
        **({"causal_strength": _strength(args)} if args.causal_strength or args.causal_alpha else {}),
    )
    fields.update(overrides)
    return SweepConfig(**fields)


def cmd_run(args: argparse.Namespace) -> int:
    from .sweep import run_sweeps

    config = _config(args, model=args.model, delta=args.delta[0], out=args.out, dtype=args.dtype, device=args.device)
    results = run_sweeps(config, args.delta)
    if not args.quiet:
        for path, result in zip(args.delta, results):
            print(f"delta {path}:")
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


def cmd_train(args: argparse.Namespace) -> int:
    from .train_command import train_pair_folder

    out = train_pair_folder(
        args.model, args.out, behaviour=args.behaviour, n_train=args.n_train, family=args.family, rank=args.rank,
        alpha=args.alpha, layers=args.layers, target_modules=[t for t in args.target_modules.replace(",", " ").split()],
        steps=args.steps, lr=args.lr, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {out} (pos/, neg/); the delta: subspace-sweep delta --model {args.model} --adapter-pos {out / 'pos'} "
          f"--adapter-neg {out / 'neg'} --out w.safetensors")
    return 0


def cmd_delta(args: argparse.Namespace) -> int:
    from . import preflight
    from .delta import write_pair_delta

    out = preflight.check_delta_command(args.model, args.adapter_pos, args.adapter_neg, args.out, args.overwrite)
    # w, the midpoint (--causal-centre midpoint) and the family and seed (the gradient bases, SPEC §13)
    delta, centre, record = write_pair_delta(args.model, args.adapter_pos, args.adapter_neg, out,
                                             overwrite=args.overwrite)
    print(f"wrote {out} ({len(delta)} tensors of w, {len(centre)} of the pair's midpoint offset; adapter family "
          f"{record['peft_type']}, seed {record['seed'] if record['seed'] is not None else 'not recorded'})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import publish
    from .compare import compare_runs, load_run, write_comparison

    for line in publish.recover_for(args.out):
        warnings.warn(line)
    snapshot = publish.check_destination(args.out, overwrite=args.overwrite, inputs=args.runs)
    runs = [load_run(p) for p in args.runs]
    cmp = compare_runs(runs, top_k=args.top_k, min_runs=args.min_runs, z_min=args.z_min)
    write_comparison(cmp, args.out, overwrite=args.overwrite, snapshot=snapshot, run_paths=args.runs,
                     settings={"top_k": args.top_k, "min_runs": args.min_runs, "z_min": args.z_min})
    print(f"compared {len(runs)} runs")
    for note in cmp.notes:
        print(note)
    for view in cmp.views:  # the view to read first first (compare.md says why)
        stable = cmp.stable(view)
        print(f"stable candidates, {view} view: {', '.join(stable) if stable else 'none'}")
    print(f"wrote {args.out}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study import run_study

    outcome = run_study(args.spec, args.out, executor=args.executor, dry_run=args.dry_run, overwrite=args.overwrite,
                        progress=not args.quiet, aggregate_only=args.aggregate_only, merge=args.merge,
                        only=args.only)
    if args.dry_run:
        width = max((len(j) for j in outcome.states), default=0)
        for job, state in outcome.states.items():
            print(f"{job:<{width}}  {state}")
        todo = sum(state != "done" for state in outcome.states.values())
        print(f"{len(outcome.states)} jobs, {todo} to run")
        return 0
    for job, state in outcome.failed.items():
        print(f"subspace-sweep study: job {job} {state}", file=sys.stderr)
    done = sum(state == "done" for state in outcome.states.values())
    print(f"{done} of {len(outcome.states)} jobs done ({len(outcome.ran)} run by this command); "
          f"wrote {outcome.aggregate}")
    return EXIT_JOBS_FAILED if outcome.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from .html_report import rebuild

    print(f"wrote {rebuild(args.folder)}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .candidates import get_spec

    spec = get_spec(args.name)
    print(f"{spec.name}  ({spec.side}-side, family {spec.family}, axis_kind {spec.axis_kind})")
    print(spec.definition)
    return 0


def bluf_table(result, top: int = 12) -> str:
    """The joint A-side ranking's head as a fixed-width table, in the view the report leads with
    (SPEC §12: the standardized one where the concentration warning fired)."""
    view = getattr(result, "leading_view", "residual")
    c = (lambda name: f"{name}_std") if view == "standardized" else (lambda name: name)  # noqa: E731
    rows = result.ranking("joint", view).head(top)
    ci = "R_act_lo" in rows.columns and view == "residual"
    head = (f"{'#':>3} {'candidate':<34} {'axis':<6} {'sees':<19} {'rank':>5} {'j_gain':>7} {'gain_a':>7} {'gain_w':>7} "
            f"{'R_act':>8} " + (f"{'R_act CI':>15} " if ci else "") + f"{'R_w_comb':>9} {'%orc_w':>7} {'z_w':>7}")
    where = (" in standardized coordinates: the outlier warning fired, see the conclusion"
             if view == "standardized" else "")
    lines = [f"A-side write+mixed ranking (joint oracle gain, mean over scored layers{where}; "
             "gain: 0 = random subspace, 1 = oracle of the same rank; sees: what a basis is built from, "
             "'behaviour data' = the behaviour's training examples)", head]
    for i, r in enumerate(rows.iter_rows(named=True), 1):
        interval = f"[{r['R_act_lo']:>6.2f},{r['R_act_hi']:>6.2f}] " if ci else ""
        lines.append(
            f"{i:>3} {r['candidate']:<34} {r['axis_kind']:<6} {r['sees']:<19} {r['rank']:>5.1f} "
            f"{r[c('joint_gain')]:>7.3f} {r[c('gain_act')]:>7.3f} {r[c('gain_w_combined')]:>7.3f} {r[c('R_act')]:>8.2f} "
            f"{interval}{r[c('R_w_combined')]:>9.2f} {r[c('pct_oracle_combined')]:>7.1f} {r[c('z_w_combined')]:>7.1f}"
        )
    return "\n".join(lines)


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "train": cmd_train, "delta": cmd_delta, "compare": cmd_compare,
            "study": cmd_study, "report": cmd_report, "explain": cmd_explain}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def is_library_deprecation(category: type[Warning], filename: str) -> bool:
    """A deprecation notice raised outside this package (transformers', peft's, torch's): what a
    library says to its own callers, which this tool's user cannot act on (issue 26)."""
    deprecation = issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
    ours = os.path.abspath(str(filename)).startswith(os.path.abspath(_PACKAGE_DIR) + os.sep)
    return deprecation and not ours


def _close_progress_bars() -> None:
    """Close every progress bar still open (ours and the libraries': tqdm keeps them in one set),
    so that the interrupted line starts on a line of its own and no bar is drawn after it (a bar
    left open redraws itself when it is garbage-collected, issue 35)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except (OSError, ValueError):  # its stream is gone: nothing to end there
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("subspace-sweep: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.command is None:
        parser.print_help()
        return 0
    prog = f"subspace-sweep {args.command}"
    shown = warnings.showwarning

    verbose = getattr(args, "verbose", False)

    def show(message, category, filename, lineno, file=None, line=None):  # no source file or line
        if not verbose and is_library_deprecation(category, filename):
            return
        print(f"{prog}: warning: {_one_line(message)}", file=sys.stderr)

    warnings.showwarning = show
    try:
        from .compute import return_freed_memory

        return_freed_memory()  # freed tensors go back to the OS: peak RSS is what is live (issue 16)
        if getattr(args, "quiet", False):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Loading weights" bars are transformers', not ours
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # Staging folders are removed on the way out (publish.write_folder); no partial output.
        _close_progress_bars()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
