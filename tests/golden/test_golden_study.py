"""The real study's aggregate (issue 32), shipped in tests/golden/study_real/ by `make study-real`
(SmolLM2-135M-Instruct × every adapter family × 3 seeds, Gemma-3-270m × LoRA × 3 seeds; hours on 2
cores, so CI does not rerun it). The aggregate stores its own input (inputs.json: each job's numbers,
its joint ranking, its candidates' gains): rebuilt from it, every table and the conclusion must be
byte for byte the shipped ones, and the figures the same images. A change of the aggregate's
methodology regenerates it with `make study-real` (or, for the aggregation alone, by rebuilding from
the shipped inputs: `python -c "from subspace_sweep.study_aggregate import rebuild; ..."`)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from subspace_sweep.study_aggregate import INPUTS, rebuild

GOLDEN = Path(__file__).parent / "study_real"
FIGURES = ("forest.png", "heatmap.png", "forest.pdf", "heatmap.pdf")
# Until `make study-real` has shipped its aggregate (issue 32 stays open until it has): listed in
# tests/QUARANTINES.md. The aggregation itself is held by tests/unit/test_study_aggregate.py and the
# tiny study's rebuild in tests/unit/test_study.py.
pytestmark = pytest.mark.skipif(not (GOLDEN / INPUTS).is_file(),
                                reason="tests/golden/study_real/ is not shipped yet: run `make study-real` (hours)")


def test_the_shipped_real_study_rebuilds_from_its_inputs(tmp_path):
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    rebuild(GOLDEN / INPUTS, tmp_path, manifest)
    # report.html is the study command's page over these files (tests/unit/test_study.py opens it)
    shipped = sorted(p.name for p in GOLDEN.iterdir() if p.is_file() and p.name != "report.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    for name in shipped:
        if name in FIGURES:
            continue
        assert (tmp_path / name).read_bytes() == (GOLDEN / name).read_bytes(), name
    for name in ("forest.png", "heatmap.png"):
        assert matplotlib.image.imread(tmp_path / name).shape == matplotlib.image.imread(GOLDEN / name).shape


def _jobs() -> dict[str, set[tuple[str, int]]]:
    data = json.loads((GOLDEN / INPUTS).read_text())
    jobs: dict[str, set[tuple[str, int]]] = {}
    for r in data["rows"]:
        jobs.setdefault(r["model"], set()).add((r["family"], r["seed"]))
    return jobs


def test_the_shipped_real_study_has_two_seeds_or_more_of_every_family_on_smollm2():
    """Every family's claims have an interval (n >= 2) in the shipped aggregate."""
    from subspace_sweep.lora_train import ADAPTER_FAMILIES

    smol = _jobs().get("smollm2-135m-instruct", set())
    seeds = {f: sorted(s for g, s in smol if g == f) for f in ADAPTER_FAMILIES}
    assert all(len(v) >= 2 for v in seeds.values()), seeds


@pytest.mark.xfail(strict=True, reason="the shipped aggregate (2026-12-07, `make study-real STUDY_ARGS="
                   "--aggregate-only`) holds 15 of the 24 jobs: every SmolLM2 family at seeds 0 and 1, LoRA at seed "
                   "2; not yet the other six families' seed 2 nor Gemma-3-270m's three LoRA jobs. Issue 32 stays "
                   "open until `--only` runs them and `--aggregate-only --merge` joins them (Makefile)")
def test_the_shipped_real_study_is_complete():
    from subspace_sweep.lora_train import ADAPTER_FAMILIES

    jobs = _jobs()
    assert {(f, s) for f in ADAPTER_FAMILIES for s in (0, 1, 2)} <= jobs.get("smollm2-135m-instruct", set())
    assert {("lora", s) for s in (0, 1, 2)} <= jobs.get("gemma-3-270m", set())
