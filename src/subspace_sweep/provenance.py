"""Provenance helpers every output uses: file digests, checksummed JSON records and the installed
package versions.

A low module on purpose: the A-side (the hypotheses), the delta's I/O, the model cache and the
run's report all record provenance, and none of them may import another just for these helpers
(the A-side must not even appear to read the delta).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
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


def record_checksum(record: Mapping[str, object], field: str) -> str:
    """sha256 of a JSON record without its own checksum ``field`` (canonical JSON)."""
    return hashlib.sha256(json.dumps({k: v for k, v in record.items() if k != field}, sort_keys=True)
                          .encode()).hexdigest()


def write_record(path: Path, record: Mapping[str, object], field: str) -> None:
    """``record`` with its checksum under ``field`` (``record_checksum``), as JSON at ``path``
    (``verify_record`` reads it back)."""
    record = {**record, field: record_checksum(record, field)}
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def verify_record(path: Path, field: str, expect: Mapping[str, object], other: str) -> dict:
    """The record at ``path`` (a cache entry's: the model cache's conversion record, an A-side or
    gradient entry's metadata), verified: ValueError when its checksum under ``field`` does not match
    (edited or damaged), when it records values other than ``expect`` ("records another {other}"),
    or when a file of its ``files_sha256`` (beside it) does not match its sha256."""
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or record.get(field) != record_checksum(record, field):
        raise ValueError(f"{path} does not match its checksum (edited or damaged)")
    if any(record.get(k) != v for k, v in expect.items()):
        raise ValueError(f"{path} records another {other}")
    for name, digest in record["files_sha256"].items():
        if sha256_file(path.parent / name) != digest:
            raise ValueError(f"{path.parent / name} does not match the sha256 in {path.name} (damaged)")
    return record
