"""Issue 14: the CLI killed (SIGKILL) or interrupted (SIGINT) at injected points, and two
processes racing for one --out. The invariant after a restart: --out holds either the complete
old or the complete new run, never neither, and the later run cleans the stale staging.

The processes pause at ``publish.pause_point`` (``SUBSPACE_SWEEP_TEST_PAUSE=point=signal``:
they create ``signal`` and wait for ``signal.go``). All of them are started at once by one
module fixture, on the shared tiny model with --n-boot 0, so their work overlaps; each test
then waits for its own process to reach its point.
"""

from __future__ import annotations

import json
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import pytest

from subspace_sweep import cli, publish
from subspace_sweep.a_side import build_a_side_for
from subspace_sweep.config import SweepConfig
from subspace_sweep.provenance import sha256_file
from subspace_sweep.delta import random_delta, save_delta
from subspace_sweep.model import load_model
from tests.helpers_kill import Paused
from tests.helpers_model import small_probes

WAIT_S = 600  # a paused process reaches its point within this (shared 2-core machine, 7 processes)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def world(tiny_dir, demo_run, lora_pair, tmp_path_factory):
    """Inputs, an old run to replace, and every scenario's process, started together."""
    base = tmp_path_factory.mktemp("faults")
    model, _ = load_model(tiny_dir, dtype="float32", device="cpu")
    deltas = {name: save_delta(random_delta(model, [1, 2], rank=2, seed=seed), base / f"{name}.safetensors")
              for name, seed in (("a", 0), ("b", 1))}
    old_run = demo_run[1]  # a complete run folder (the shared demo run), copied where one is replaced
    procs: dict[str, Paused] = {}

    def start(name: str, point: str, argv: list[str], **extra_env: str) -> None:
        # 7 processes on 2 cores: one thread each
        procs[name] = Paused.start(name, point, argv, base / name, WAIT_S, OMP_NUM_THREADS="1", **extra_env)

    def run_argv(delta: str, out: Path, *extra: str) -> list[str]:
        return ["run", "--model", str(tiny_dir), "--delta", str(deltas[delta]), "--out", str(out), "--quiet",
                "--n-boot", "0", *extra]

    for name in ("staged", "between_renames"):
        shutil.copytree(old_run, base / name / "parent" / "out")
    (base / "race" / "parent").mkdir(parents=True)
    (base / "cache_store" / "parent").mkdir(parents=True)
    (base / "sigint" / "parent").mkdir(parents=True)
    (base / "demo" / "tmp").mkdir(parents=True)
    start("staged", "out_staged", run_argv("b", base / "staged" / "parent" / "out", "--overwrite"))
    start("between_renames", "out_between_renames", run_argv("b", base / "between_renames" / "parent" / "out",
                                                             "--overwrite"))
    start("race_a", "out_staged", run_argv("a", base / "race" / "parent" / "out"))
    start("race_b", "out_staged", run_argv("b", base / "race" / "parent" / "out"))
    start("cache_store", "cache_staged", run_argv("a", base / "cache_store" / "parent" / "out", "--a-side-cache",
                                                  str(base / "cache_store" / "cache")))
    start("sigint", "cache_staged", run_argv("a", base / "sigint" / "parent" / "out", "--a-side-cache",
                                             str(base / "sigint" / "cache")))
    start("demo", "file_staged", ["demo", "--out", str(base / "demo" / "out"), "--quiet", "--n-boot", "0"],
          TMPDIR=str(base / "demo" / "tmp"))
    (base / "delta_file" / "parent").mkdir(parents=True)
    _, pos, neg = lora_pair
    start("delta_file", "file_staged", ["delta", "--model", str(tiny_dir), "--adapter-pos", str(pos), "--adapter-neg",
                                        str(neg), "--out", str(base / "delta_file" / "parent" / "w1.safetensors")])
    yield {"base": base, "procs": procs, "deltas": deltas, "old_run": old_run, "tiny_dir": tiny_dir}
    for p in procs.values():
        p.stop()


def test_sigkill_with_the_new_run_staged_keeps_the_old_run_and_a_restart_publishes_the_new_one(world, capsys):
    p = world["procs"]["staged"]
    parent = world["base"] / "staged" / "parent"
    assert p.kill() == -signal.SIGKILL
    assert _tree_bytes(parent / "out") == _tree_bytes(world["old_run"])  # the complete old run
    stale = parent / publish.aside_name("out", "stage", p.owner)
    assert _listing(parent) == sorted(["out", stale.name]) and not publish.owner_alive(p.owner)
    assert (stale / publish.MANIFEST).is_file()  # the staging was complete: it is the new run that died

    # A start that writes ANOTHER name in the same folder cleans it (issue 26), even one that then
    # stops at bad input (here: a missing delta).
    other = ["run", "--model", str(world["tiny_dir"]), "--delta", str(parent / "missing.safetensors"), "--out",
             str(parent / "other"), "--quiet"]
    assert cli.main(other) == cli.EXIT_BAD_INPUT
    assert _listing(parent) == ["out"]

    argv = ["run", "--model", str(world["tiny_dir"]), "--delta", str(world["deltas"]["b"]), "--out",
            str(parent / "out"), "--quiet", "--n-boot", "0", "--overwrite"]
    assert cli.main(argv) == 0
    assert _listing(parent) == ["out"]  # the stale staging is gone
    manifest = json.loads((parent / "out" / publish.MANIFEST).read_text())
    assert manifest["delta_sha256"] == sha256_file(world["deltas"]["b"])  # the complete new run
    assert _listing(parent / "out") == _listing(world["old_run"])
    mask = publish.umask()  # a shared results folder stays as readable as the umask allows
    assert stat.S_IMODE((parent / "out").stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(f.stat().st_mode) for f in (parent / "out").iterdir()} == {0o666 & ~mask}


def test_sigkill_between_the_two_renames_and_a_restart_restores_the_old_run(world, capsys):
    p = world["procs"]["between_renames"]
    parent = world["base"] / "between_renames" / "parent"
    assert p.kill() == -signal.SIGKILL
    old = parent / publish.aside_name("out", "old", p.owner)
    new = parent / publish.aside_name("out", "stage", p.owner)
    # Killed in the one window where --out is missing: both complete runs are there, named.
    assert _listing(parent) == sorted([old.name, new.name])
    assert _tree_bytes(old) == _tree_bytes(world["old_run"]) and (new / publish.MANIFEST).is_file()

    capsys.readouterr()
    # A start that writes another name in the same folder puts the old run back (issue 26).
    other = ["run", "--model", str(world["tiny_dir"]), "--delta", str(parent / "missing.safetensors"), "--out",
             str(parent / "other"), "--quiet"]
    assert cli.main(other) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("subspace-sweep run: warning: restored ") and "missing" in err[1]
    assert _listing(parent) == ["out"]
    argv = ["run", "--model", str(world["tiny_dir"]), "--delta", str(world["deltas"]["b"]), "--out",
            str(parent / "out"), "--quiet", "--n-boot", "0"]
    assert cli.main(argv) == cli.EXIT_BAD_INPUT  # without --overwrite, once the old run is back
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pass --overwrite" in err[0]
    assert _listing(parent) == ["out"]
    assert _tree_bytes(parent / "out") == _tree_bytes(world["old_run"])  # the complete old run, never neither


def test_two_concurrent_runs_to_one_out_exactly_one_wins(world):
    a, b = world["procs"]["race_a"], world["procs"]["race_b"]
    parent = world["base"] / "race" / "parent"
    a.wait_paused()
    b.wait_paused()  # both have checked --out (absent) and staged a complete run
    assert not (parent / "out").exists()
    a.release()
    b.release()
    codes = {p.name: p.proc.wait(timeout=WAIT_S) for p in (a, b)}
    assert sorted(codes.values()) == [0, cli.EXIT_BAD_INPUT], codes
    winner, loser = (a, b) if codes["race_a"] == 0 else (b, a)
    err = loser.err_lines()
    assert len(err) == 1 and err[0].startswith("subspace-sweep run: error: --out ") and \
        "another process wrote there while this run ran" in err[0], err
    manifest = json.loads((parent / "out" / publish.MANIFEST).read_text())
    assert manifest["delta_sha256"] == sha256_file(world["deltas"]["a" if winner is a else "b"])
    assert _listing(parent / "out") == _listing(world["old_run"]) and _listing(parent) == ["out"]


def test_sigkill_while_storing_a_cache_entry_and_the_next_use_cleans_it(world, tiny):
    p = world["procs"]["cache_store"]
    cache = world["base"] / "cache_store" / "cache"
    assert p.kill() == -signal.SIGKILL
    (stale,) = list(cache.iterdir())
    assert stale.name.startswith(".a_side-") and stale.name.endswith(f".stage-{p.owner}")
    assert _listing(world["base"] / "cache_store" / "parent") == []  # no run folder, no staging

    model, tokenizer = tiny
    built = build_a_side_for(model, tokenizer, SweepConfig(a_side_cache=str(cache)), [1, 2], small_probes(4, 3))
    assert built.cache["status"] == "miss"
    (entry,) = list(cache.iterdir())  # the stale staging is gone, the new entry stored
    assert entry.name.startswith("a_side-") and (entry / "meta.json").is_file()


def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(world):
    p = world["procs"]["sigint"]
    assert p.kill(signal.SIGINT) == cli.EXIT_INTERRUPTED
    assert p.err_lines() == ["subspace-sweep run: interrupted"]
    cache = world["base"] / "sigint" / "cache"
    assert not cache.exists() or _listing(cache) == []  # the entry's staging was removed on the way out
    assert _listing(world["base"] / "sigint" / "parent") == []


def test_sigkill_of_the_demo_leaves_its_scratch_folder_and_the_next_demo_cleans_it(world, monkeypatch, capsys):
    p = world["procs"]["demo"]
    tmp = world["base"] / "demo" / "tmp"
    assert p.kill() == -signal.SIGKILL
    (work,) = list(tmp.iterdir())
    assert work.name == publish.aside_name("subspace-sweep-demo", "work", p.owner)
    assert (work / "tiny-qwen3" / "config.json").is_file()

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    # A later demo cleans up first, whatever it then does (here: a bad --plant, exit 2).
    assert cli.main(["demo", "--out", str(world["base"] / "demo" / "out"), "--plant", "no_such", "--quiet"]) == 2
    assert _listing(tmp) == []
    assert not (world["base"] / "demo" / "out").exists()


def test_sigkill_of_delta_while_its_file_is_staged_and_a_delta_to_another_name_cleans_it(world, capsys):
    p = world["procs"]["delta_file"]
    parent = world["base"] / "delta_file" / "parent"
    assert p.kill() == -signal.SIGKILL
    assert _listing(parent) == [publish.aside_name("w1.safetensors", "stage", p.owner)]
    argv = ["delta", "--model", str(world["tiny_dir"]), "--adapter-pos", str(parent / "no_adapter"),
            "--adapter-neg", str(parent / "no_adapter"), "--out", str(parent / "w2.safetensors")]
    assert cli.main(argv) == cli.EXIT_BAD_INPUT  # a bad adapter folder, after the start cleaned up
    assert _listing(parent) == []
