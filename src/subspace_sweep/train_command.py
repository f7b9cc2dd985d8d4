"""``subspace-sweep train``: check, train the +/− adapter pair, publish it as one folder.

The layers read top-down (issue 35): this command calls the checks (``preflight.check_train``),
which read what they check from the trainer (``lora_train``: its families, default layers and
argument checks); the trainer imports neither.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from . import lora_train, preflight, publish
from .lora_train import DEFAULT_TARGET_MODULES

#: What ``train_pair_folder`` writes beside the two adapters (a run-like manifest: this tool's).
TRAIN_MANIFEST = "manifest.json"


def train_pair_folder(
    model: str | Path,
    out: str | Path,
    *,
    behaviour: str | Path | None = None,
    n_train: int | None = None,
    family: str = "lora",
    rank: int = 8,
    alpha: float | None = None,
    layers: Sequence[int] | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    steps: int = 20,
    lr: float = 5e-4,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """The +/− pair trained into ``out/pos`` and ``out/neg`` and published as one folder
    (``publish.write_folder``: staged, renamed into place; nothing is left on bad input, a crash or
    Ctrl-C), with a manifest of the settings and the model's source. Every check that needs no
    weights runs first (``preflight.check_train``: the destination, the model's files or GGUF
    header, the layers, the rank against the adapted modules' sizes, alpha, lr, seed, the behaviour
    file, --n-train, the family); the model's chat template is checked before the first step.
    ``alpha`` defaults to ``rank`` (LoRA scale 1); ``layers`` to ``lora_train.default_lora_layers``."""
    from .gguf_models import convert, is_gguf_source
    from .provenance import package_versions

    snapshot, layers = preflight.check_train(model, out, behaviour=behaviour, n_train=n_train, family=family,
                                             layers=layers, target_modules=target_modules, rank=rank, alpha=alpha,
                                             steps=steps, lr=lr, seed=seed, overwrite=overwrite)
    alpha = float(rank) if alpha is None else float(alpha)
    settings = {"family": family, "rank": int(rank), "alpha": alpha, "layers": sorted(int(x) for x in layers),
                "target_modules": list(target_modules), "steps": int(steps), "lr": float(lr), "seed": int(seed),
                "behaviour": str(Path(behaviour).resolve()) if behaviour is not None else None, "n_train": n_train}

    def fill(tmp: Path) -> None:
        lora_train.train_lora_pair(model, tmp, layers=layers, steps=steps, seed=seed, rank=rank, alpha=alpha,
                                   target_modules=tuple(target_modules), lr=lr, family=family, behaviour=behaviour,
                                   n_topics=n_train, progress=progress)
        source = convert(model).provenance() if is_gguf_source(model) else None
        manifest = {"kind": "train", "package_versions": package_versions(), "model": str(model),
                    "model_source": source, "settings": settings,
                    "adapters": {"pos": "pos (+1: the behaviour)", "neg": "neg (−1: its opposite)"}}
        (tmp / TRAIN_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    return publish.write_folder(out, fill, overwrite=overwrite, snapshot=snapshot)
