"""Per-file mutation score of ``make mutate`` (issue 18), net of the listed equivalent mutants.

Run from the repository root after ``mutmut run``::

    python tests/mutation_report.py [--require FILE ...] [--threshold 0.9] PATTERN ...

PATTERNs are the mutant-name patterns given to ``mutmut run`` (fnmatch, as mutmut reads them):
only mutants they match are in scope. A mutant counts as killed when the tests failed, crashed or
timed out on it. A surviving mutant (or one no test reaches) is set aside as equivalent only if
``tests/MUTATION_EQUIVALENTS.md`` lists it by name WITH the change it makes: when the code of its
function changes, mutmut renumbers its mutants, the listed change no longer matches, and the
mutant is counted as a survivor until someone judges it again.

Exit status 1 when a file given with ``--require`` scores below the threshold.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

EQUIVALENTS = Path("tests/MUTATION_EQUIVALENTS.md")
# mutmut 3.8 exit codes (mutmut.stats.status_by_exit_code): 1 and 3 are test failures, 24/152/-24/
# 255/36 timeouts, -9/-11 crashes; 0 survived, 5/33 no test reached the mutant; None not run.
KILLED = {1, 3, 24, 36, 152, 255, -24, -9, -11, 37}
SURVIVED = {0, 5, 33}
ENTRY = re.compile(r"^- `(?P<name>[^`]+)`: `(?P<old>.*?)` → `(?P<new>.*?)` — (?P<why>.+)$")


def short_name(mutant: str) -> str:
    """``subspace_sweep.scoring.xǁTargetǁspectrum__mutmut_3`` -> ``scoring.Target.spectrum#3``."""
    module, _, rest = mutant.rpartition(".")
    func, _, number = rest.rpartition("__mutmut_")
    func = func[2:].replace("ǁ", ".") if func.startswith("xǁ") else func.removeprefix("x_")
    return f"{module.rpartition('.')[2]}.{func}#{number}"


def change_of(mutant: str, source: Path) -> tuple[str, str]:
    """(original lines, mutated lines) of the mutant's one-function diff, whitespace-normalised."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(mutant, path=source).splitlines()
    norm = lambda lines: " / ".join(" ".join(x[1:].split()) for x in lines)  # noqa: E731
    old = [x for x in diff if x.startswith("-") and not x.startswith("---")]
    new = [x for x in diff if x.startswith("+") and not x.startswith("+++")]
    return norm(old), norm(new)


def read_equivalents(path: Path = EQUIVALENTS) -> dict[str, tuple[str, str, str]]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = ENTRY.match(line)
        if m:
            out[m["name"]] = (m["old"], m["new"], m["why"])
    return out


@dataclass
class FileScore:
    killed: int = 0
    equivalent: int = 0
    not_run: int = 0
    survivors: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def judged(self) -> int:
        return self.killed + len(self.survivors)

    @property
    def score(self) -> float:
        return self.killed / self.judged if self.judged else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patterns", nargs="+")
    ap.add_argument("--require", action="append", default=[], help="source file that must reach the threshold")
    ap.add_argument("--threshold", type=float, default=0.9)
    args = ap.parse_args(argv)

    equivalents = read_equivalents()
    matched: set[str] = set()
    scores: dict[str, FileScore] = defaultdict(FileScore)
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        source = meta.relative_to("mutants").with_suffix("")  # src/subspace_sweep/x.py
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for mutant, code in sorted(codes.items(), key=lambda kv: short_name(kv[0])):
            if not any(fnmatch.fnmatch(mutant, p) for p in args.patterns):
                continue
            s = scores[str(source)]
            if code in KILLED:
                s.killed += 1
                continue
            if code not in SURVIVED:
                s.not_run += 1
                continue
            name = short_name(mutant)
            old, new = change_of(mutant, source)
            listed = equivalents.get(name)
            if listed and (listed[0], listed[1]) == (old, new):
                s.equivalent += 1
                matched.add(name)
            else:
                s.survivors.append((name, old, new))

    failed = False
    print(f"{'file':40} {'killed':>7} {'judged':>7} {'equiv':>6} {'score':>7}")
    for source, s in sorted(scores.items()):
        print(f"{source:40} {s.killed:7d} {s.judged:7d} {s.equivalent:6d} {100 * s.score:6.1f}%"
              + (f"  ({s.not_run} not run)" if s.not_run else ""))
    for source, s in sorted(scores.items()):
        if s.survivors:
            print(f"\nsurvivors in {source} ({len(s.survivors)}):")
            for name, old, new in s.survivors:
                print(f"- `{name}`: `{old}` → `{new}`")
        if any(source.endswith(r) or r.endswith(source) for r in args.require) and not s.score >= args.threshold:
            failed = True
    stale = sorted(n for n in equivalents if n not in matched
                   and any(n.startswith(Path(src).stem + ".") for src in scores))
    if stale:
        print("\nlisted as equivalent but killed, not run or changed (re-judge them):")
        for n in stale:
            print(f"- {n}")
    if failed:
        print(f"\nFAIL: a required file is below {100 * args.threshold:.0f}% of its non-equivalent mutants killed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
