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
