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
