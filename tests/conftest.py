"""Shared test configuration: hypothesis profiles and the tiny offline model fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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
