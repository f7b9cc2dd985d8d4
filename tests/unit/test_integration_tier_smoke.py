"""The Qwen3-0.6B tier cannot run here (no weights), but its code can: run it on the tiny model
folder through the same environment variable a GPU runner would use. (The SmolLM2 tier runs for
real in `make test`.)"""

from __future__ import annotations

import os
import subprocess
import sys


def test_integration_tier_runs_on_the_tiny_model(tiny_dir):
    env = dict(os.environ, SUBSPACE_SWEEP_QWEN3=str(tiny_dir), HF_HUB_OFFLINE="1")
    env.pop("SUBSPACE_SWEEP_DELTA", None)
    env.pop("SUBSPACE_SWEEP_REGEN_GOLDEN", None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "integration", "tests/integration/test_qwen3_real.py", "-q", "-rs",
         "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert "7 passed" in last and "1 skipped" in last, last  # only the Qwen3-0.6B golden file skips
    assert "golden file is for Qwen3-0.6B" in out.stdout
