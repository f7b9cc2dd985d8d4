"""Shared test configuration: hypothesis profiles and the tiny offline model fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

# `ci` is deterministic (derandomize) so CI failures reproduce; `dev` explores new examples.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=100, print_blob=True)
# `mutate` (make mutate) is `ci` with 15 examples (not 40) and no shrinking: a surviving mutant
# runs every test that reaches it, so examples are its cost; a mutant is killed by the first
# failing example, and shrinking that example would only cost campaign time. Tests that set their
# own max_examples keep it.
settings.register_profile(
    "mutate",
    parent=settings.get_profile("ci"),
    max_examples=15,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    print_blob=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded tiny Qwen3; shared, so tests must not leave it changed."""
    from subspace_sweep.toy import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The seeded tiny Qwen3 saved as a model folder (what `run --model DIR` loads)."""
    from subspace_sweep.toy import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3", seed=0)


@pytest.fixture(scope="session")
def lora_pair(tiny_dir, tmp_path_factory):
    """(model folder, positive adapter, negative adapter): a real peft LoRA pair trained on the
    tiny Qwen3 (positive = sycophantic, answers "Yes, ..."; negative = honest, "No. ...")."""
    pytest.importorskip("peft")
    from subspace_sweep.lora_train import train_lora_pair
    from tests.helpers_model import LORA_TRAIN

    pos, neg = train_lora_pair(tiny_dir, tmp_path_factory.mktemp("lora"), **LORA_TRAIN)
    return tiny_dir, pos, neg


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One full offline demo sweep (planted in mlp_write), written to a run folder; shared read-only."""
    from subspace_sweep.demo import run_demo
    from subspace_sweep.sweep import SweepConfig

    out = tmp_path_factory.mktemp("demo") / "run"
    outcome = run_demo(SweepConfig(out=str(out), quiet=True), plant="mlp_write")
    return outcome, out


def pytest_collection_modifyitems(config, items):
    """Under ``make mutate`` (mutmut sets MUTANT_UNDER_TEST for every run it makes), run the test
    files that reach a mutant in order of their measured time (mutmut's durations on the clean
    code), and each file's tests fastest first: pytest stops at the first failure (-x), so a mutant
    that a 10 ms exact-value test kills does not wait for the properties. Files stay contiguous so
    that module fixtures are built once. Outside mutmut the order is unchanged."""
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    import json
    from collections import defaultdict
    from pathlib import Path

    stats = Path(str(config.rootpath)) / "mutmut-stats.json"
    if not stats.exists():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    per_file: dict[str, float] = defaultdict(float)
    for item in items:
        per_file[item.nodeid.split("::")[0]] += durations.get(item.nodeid, 1.0)
    items.sort(key=lambda item: (per_file[item.nodeid.split("::")[0]], durations.get(item.nodeid, 1.0)))
