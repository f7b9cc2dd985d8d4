"""Provenance helpers every output uses: file digests and the installed package versions.

A low module on purpose: the A-side (the hypotheses), the delta's I/O, the model cache and the
run's report all record provenance, and none of them may import another just for these helpers
(the A-side must not even appear to read the delta).
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path

#: The packages whose versions a run's manifest and the A-side cache key record.
PACKAGES = ("subspace-sweep", "torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "polars",
            "matplotlib", "gguf", "peft")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
