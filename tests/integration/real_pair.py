"""`make real-pair`: retrain the SmolLM2-135M-Instruct sycophancy pair the real tier ships
(tests/integration/data/smollm2_pair) with the settings recorded in its manifest, say how far the
new delta is from the shipped one, and replace the shipped pair with the new one.

The goldens of tests/integration/test_smollm2_real.py hold the shipped pair's sweep: if the delta
moved (another CPU, another torch), rerun that file with --force-regen and say why in the commit.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "data" / "smollm2_pair"
MODEL = "smollm2-135m-instruct"


def main() -> int:
    from subspace_sweep.delta import delta_from_peft

    settings = json.loads((SHIPPED / "manifest.json").read_text())["settings"]
    with tempfile.TemporaryDirectory(dir=SHIPPED.parent) as tmp:
        new = Path(tmp) / "pair"
        argv = [sys.executable, "-m", "subspace_sweep.cli", "train", "--model", MODEL, "--out", str(new),
                "--family", settings["family"], "--rank", str(settings["rank"]), "--alpha", str(settings["alpha"]),
                "--layers", ",".join(map(str, settings["layers"])), "--target-modules", ",".join(settings["target_modules"]),
                "--steps", str(settings["steps"]), "--lr", str(settings["lr"]), "--seed", str(settings["seed"])]
        t0 = time.perf_counter()
        subprocess.run(argv, check=True)
        print(f"trained in {time.perf_counter() - t0:.0f} s")
        old_w = delta_from_peft(MODEL, SHIPPED / "pos", SHIPPED / "neg")
        new_w = delta_from_peft(MODEL, new / "pos", new / "neg")
        if set(old_w) != set(new_w):
            print(f"the new delta has other tensors: {sorted(set(old_w) ^ set(new_w))[:5]}")
        else:
            diff = math.sqrt(sum(float((new_w[k].double() - old_w[k].double()).square().sum()) for k in old_w))
            norm = math.sqrt(sum(float(old_w[k].double().square().sum()) for k in old_w))
            worst = max(float((new_w[k] - old_w[k]).abs().max()) for k in old_w)
            same = all(new_w[k].equal(old_w[k]) for k in old_w)
            print(f"new vs shipped delta: ‖Δw‖_F/‖w‖_F = {diff / norm:.3g}, max |Δw| = {worst:.3g}"
                  + (" (bit for bit identical)" if same else ""))
        shutil.rmtree(SHIPPED)
        shutil.move(str(new), SHIPPED)
    print(f"replaced {SHIPPED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
