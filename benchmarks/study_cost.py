"""What a study cost, from its jobs' records: a script, not a test (issue 32: "report the wall time").

    .venv/bin/python benchmarks/study_cost.py runs/study-real

Each finished job's ``job.json`` records the seconds of each of its steps (train, delta, run) as it
ran them. This prints, as a Markdown table, per model × family: the jobs finished, the mean seconds
of each step over them, and the total; then per model and over the study the sum of the jobs'
seconds: the study's wall time when its jobs ran one at a time, an upper bound when several ran at
once (two processes of one thread each, a cluster). Peak memory is not in the records: measure the
study's process (``/usr/bin/time -v``: "Maximum resident set size"). A job folder may be a link
(jobs joined from another folder of the same spec). Timings on a shared machine: compare ratios.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

STEPS = ("train", "delta", "run")


def job_seconds(study_dir: Path) -> list[tuple[str, str, str, dict[str, float]]]:
    """(model, family, seed folder, {step: seconds}) of every finished job, in a stable order."""
    rows = []
    for record in sorted((study_dir / "jobs").glob("*/*/*/job.json")):
        job = json.loads(record.read_text())
        if job.get("status") != "done":
            continue
        model, family, seed = job["job"].split("/")
        rows.append((model, family, seed, {s: float(job["steps"][s]["seconds"]) for s in STEPS}))
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "jobs").is_dir():
        print("usage: study_cost.py STUDY_DIR (a folder with jobs/)", file=sys.stderr)
        return 2
    rows = job_seconds(Path(argv[0]))
    groups: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    for model, family, _, seconds in rows:
        groups[model, family].append(seconds)
    print("| model | family | jobs | " + " | ".join(f"{s} (s, mean)" for s in STEPS) + " | job (min, mean) |")
    print("|---|---|---|" + "---|" * (len(STEPS) + 1))
    per_model: dict[str, float] = defaultdict(float)
    for (model, family), jobs in groups.items():
        means = {s: sum(j[s] for j in jobs) / len(jobs) for s in STEPS}
        per_model[model] += sum(sum(j.values()) for j in jobs)
        print(f"| {model} | {family} | {len(jobs)} | " + " | ".join(f"{means[s]:.0f}" for s in STEPS)
              + f" | {sum(means.values()) / 60:.1f} |")
    for model, seconds in per_model.items():
        print(f"\n{model}: {seconds / 3600:.2f} h of jobs")
    print(f"study: {len(rows)} finished jobs, {sum(per_model.values()) / 3600:.2f} h of jobs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
