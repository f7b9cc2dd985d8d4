"""publish.py: the one way outputs reach their destination (issue 14). In-process cases; the
SIGKILL and two-process cases are in test_faults_kill.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from subspace_sweep import publish
from subspace_sweep.errors import InputError


def _run_folder(path: Path, tag: str = "old") -> Path:
    """A minimal folder that counts as a run folder: a manifest naming this tool."""
    path.mkdir()
    (path / "summary.tsv").write_text(tag)
    (path / publish.MANIFEST).write_text(json.dumps({"package_versions": {publish.TOOL: "0"}, "tag": tag}))
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def dead_owner():
    """The owner token of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        token = publish.owner_token(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not publish.owner_alive(token)
    return token


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _write(tmp: Path) -> None:
    (tmp / "a.txt").write_text("new")
    (tmp / "sub").mkdir(mode=0o700)
    (tmp / "sub" / "b.bin").write_bytes(b"x")
    os.chmod(tmp / "sub" / "b.bin", 0o600)  # what safetensors' save_file leaves


def test_a_new_folder_is_published_with_the_modes_the_umask_gives(tmp_path, umask_022):
    out = tmp_path / "out"
    snap = publish.check_destination(out, overwrite=False)
    assert publish.write_folder(out, _write, overwrite=False, snapshot=snap) == out
    assert _listing(tmp_path) == ["out"] and _listing(out) == ["a.txt", "sub"]
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes == {".": 0o755, "a.txt": 0o644, "sub": 0o755, "sub/b.bin": 0o644}


def test_a_stricter_umask_is_honoured_too(tmp_path):
    old = os.umask(0o077)
    try:
        out = publish.write_folder(tmp_path / "out", _write, overwrite=False,
                                   snapshot=publish.check_destination(tmp_path / "out", overwrite=False))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700 and stat.S_IMODE((out / "a.txt").stat().st_mode) == 0o600


def test_an_empty_folder_is_filled(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    publish.write_folder(out, _write, overwrite=False, snapshot=publish.check_destination(out, overwrite=False))
    assert _listing(out) == ["a.txt", "sub"] and _listing(tmp_path) == ["out"]


def test_a_folder_published_while_this_one_ran_is_kept(tmp_path):
    """Both runs passed the start check (out absent); the later one must not replace the first."""
    out = tmp_path / "out"
    snap = publish.check_destination(out, overwrite=False)

    def fill(tmp):
        _run_folder(out, "first")  # the concurrent run publishes while this one writes
        _write(tmp)

    with pytest.raises(InputError, match="another process wrote there while this run ran"):
        publish.write_folder(out, fill, overwrite=False, snapshot=snap)
    assert json.loads((out / publish.MANIFEST).read_text())["tag"] == "first"
    assert _listing(tmp_path) == ["out"]


def test_with_overwrite_only_the_folder_seen_at_the_start_is_replaced(tmp_path):
    out = _run_folder(tmp_path / "out", "old")
    snap = publish.check_destination(out, overwrite=True)

    def fill(tmp):  # a concurrent --overwrite run replaces the old run first
        publish.remove(out)
        _run_folder(out, "concurrent")
        _write(tmp)

    with pytest.raises(InputError, match="another process wrote there"):
        publish.write_folder(out, fill, overwrite=True, snapshot=snap)
    assert json.loads((out / publish.MANIFEST).read_text())["tag"] == "concurrent"
    assert _listing(tmp_path) == ["out"]


def test_overwrite_replaces_a_run_folder_and_deletes_the_old_one_last(tmp_path):
    out = _run_folder(tmp_path / "out")
    publish.write_folder(out, _write, overwrite=True, snapshot=publish.check_destination(out, overwrite=True))
    assert _listing(out) == ["a.txt", "sub"] and _listing(tmp_path) == ["out"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_user_files_is_never_replaced(tmp_path, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a run folder" if overwrite else "pass --overwrite"):
        publish.check_destination(out, overwrite=overwrite)
    assert _listing(out) == ["notes.txt"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_while_filling_leaves_the_destination_as_it_was(tmp_path, error):
    out = _run_folder(tmp_path / "out")
    before = (out / publish.MANIFEST).read_bytes()

    def fill(tmp):
        _write(tmp)
        raise error

    with pytest.raises(type(error)):
        publish.write_folder(out, fill, overwrite=True, snapshot=publish.check_destination(out, overwrite=True))
    assert (out / publish.MANIFEST).read_bytes() == before and _listing(tmp_path) == ["out"]


def test_a_failure_between_the_two_renames_puts_the_old_run_back(tmp_path, monkeypatch):
    out = _run_folder(tmp_path / "out")
    before = (out / publish.MANIFEST).read_bytes()

    def pause(point):
        if point == "out_between_renames":
            assert not out.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1
            raise KeyboardInterrupt

    monkeypatch.setattr(publish, "pause_point", pause)
    with pytest.raises(KeyboardInterrupt):
        publish.write_folder(out, _write, overwrite=True, snapshot=publish.check_destination(out, overwrite=True))
    assert (out / publish.MANIFEST).read_bytes() == before and _listing(tmp_path) == ["out"]


@pytest.mark.parametrize("layout,expected", [
    ("run", True), ("runs", True), ("runs_and_a_file", False), ("user", False), ("manifest_of_another_tool", False),
])
def test_which_folders_count_as_this_tools(tmp_path, layout, expected):
    path = tmp_path / "x"
    if layout == "run":
        _run_folder(path)
    elif layout.startswith("runs"):
        path.mkdir()
        _run_folder(path / "seed0")
        _run_folder(path / "seed1")
        if layout == "runs_and_a_file":
            (path / "notes.txt").write_text("mine")
    elif layout == "user":
        path.mkdir()
        (path / "data.csv").write_text("1,2")
    else:
        path.mkdir()
        (path / publish.MANIFEST).write_text(json.dumps({"name": "other"}))
    assert publish.is_tool_folder(path) is expected


def test_the_current_folder_and_its_ancestors_are_refused(tmp_path, monkeypatch):
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    for dest in (".", "..", str(here)):
        with pytest.raises(InputError, match="current folder"):
            publish.check_destination(dest, overwrite=True)


@pytest.mark.parametrize("case,match", [
    ("no_parent", "does not exist"), ("parent_is_a_file", "is not a folder"), ("a_file", "exists and is not a folder"),
    ("too_long", "too long"), ("empty", "is empty"), ("holds_an_input", "which this command reads"),
])
def test_destinations_that_cannot_be_used(tmp_path, case, match):
    dest = {"no_parent": tmp_path / "missing" / "out", "parent_is_a_file": tmp_path / "f" / "out",
            "a_file": tmp_path / "f", "too_long": tmp_path / ("x" * 250), "empty": "",
            "holds_an_input": tmp_path / "run"}[case]
    (tmp_path / "f").write_text("x")
    inputs = []
    if case == "holds_an_input":
        _run_folder(tmp_path / "run")
        (tmp_path / "run" / "w.safetensors").write_text("delta")
        inputs = [tmp_path / "run" / "w.safetensors"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(InputError, match=match):
        publish.check_destination(dest, overwrite=True, inputs=inputs)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_recover_restores_a_dead_owners_old_run_and_deletes_its_staging(tmp_path, dead_owner):
    parent = tmp_path
    old = _run_folder(parent / publish.aside_name("out", "old", dead_owner), "old")
    (parent / publish.aside_name("out", "stage", dead_owner)).mkdir()
    (parent / publish.aside_name("other", "stage", dead_owner)).mkdir()  # another destination: left alone
    live = parent / publish.aside_name("out", "stage")  # this (living) process's staging: left alone
    live.mkdir()
    notes = publish.recover(parent, "out")
    assert len(notes) == 1 and "restored" in notes[0]
    assert not old.exists() and json.loads((parent / "out" / publish.MANIFEST).read_text())["tag"] == "old"
    assert _listing(parent) == sorted(["out", live.name, publish.aside_name("other", "stage", dead_owner)])


def test_recover_deletes_an_old_run_once_the_new_one_is_in_place(tmp_path, dead_owner):
    _run_folder(tmp_path / "out", "new")
    _run_folder(tmp_path / publish.aside_name("out", "old", dead_owner), "old")
    assert publish.recover(tmp_path) == []
    assert _listing(tmp_path) == ["out"] and json.loads((tmp_path / "out" / publish.MANIFEST).read_text())["tag"] == "new"


def test_recover_never_touches_another_hosts_folders_and_says_so_once(tmp_path, dead_owner):
    other = "otherhost" + dead_owner[len(publish.HOST):]
    foreign = [tmp_path / publish.aside_name(name, "stage", other) for name in ("out", "run2")]
    for f in foreign:
        f.mkdir()
    notes = publish.recover(tmp_path)
    assert len(notes) == 1 and "2 staging or moved-aside folder(s) of processes on other hosts" in notes[0]
    assert all(f.exists() for f in foreign)


def test_a_start_cleans_every_dead_runs_leftovers_in_the_parent_whatever_their_name(tmp_path, dead_owner):
    """Issue 26: a run killed while writing A leaves A's staging; a later start writing B in the same
    folder cleans it (and restores a dead owner's moved-aside run whose destination is missing);
    living owners' folders stay."""
    (tmp_path / publish.aside_name("A", "stage", dead_owner)).mkdir()
    _run_folder(tmp_path / publish.aside_name("C", "old", dead_owner), "old C")
    (tmp_path / publish.aside_name("C", "stage", dead_owner)).mkdir()
    (tmp_path / publish.aside_name("w.safetensors", "stage", dead_owner)).write_bytes(b"half a file")
    live = tmp_path / publish.aside_name("D", "stage")
    live.mkdir()
    notes = publish.recover_for(tmp_path / "B")
    assert len(notes) == 1 and "restored" in notes[0] and str(tmp_path / "C") in notes[0]
    assert _listing(tmp_path) == sorted(["C", live.name])


def test_a_recycled_pid_is_another_owner():
    host, pid, start = publish.owner_token().rsplit("-", 2)
    assert publish.owner_alive(publish.owner_token())
    assert not publish.owner_alive(f"{host}-{pid}-{int(start) + 1}")


def test_work_dir_is_removed_on_exit_and_a_dead_owners_by_recover(tmp_path, dead_owner):
    with publish.work_dir(tmp_path, "demo") as work:
        (work / "model").write_text("x")
        assert work.name == publish.aside_name("demo", "work")
    stale = tmp_path / publish.aside_name("demo", "work", dead_owner)
    stale.mkdir()
    publish.recover(tmp_path, "demo")
    assert _listing(tmp_path) == []


def test_a_file_is_published_without_replacing_one_that_appeared(tmp_path, umask_022):
    dest = tmp_path / "w.safetensors"

    def write(staged):
        staged.write_bytes(b"ours")
        os.chmod(staged, 0o600)

    publish.write_file(dest, write, overwrite=False)
    assert dest.read_bytes() == b"ours" and stat.S_IMODE(dest.stat().st_mode) == 0o644
    with pytest.raises(InputError, match="pass --overwrite"):
        publish.write_file(dest, write, overwrite=False)
    other = tmp_path / "x.safetensors"

    def racing(staged):
        other.write_bytes(b"theirs")  # created by another process while this one wrote
        staged.write_bytes(b"ours")

    with pytest.raises(InputError, match="another process wrote there"):
        publish.write_file(other, racing, overwrite=False)
    assert other.read_bytes() == b"theirs"
    publish.write_file(other, write, overwrite=True)
    assert other.read_bytes() == b"ours" and _listing(tmp_path) == ["w.safetensors", "x.safetensors"]


def test_the_pause_hook_ignores_other_points(tmp_path, monkeypatch):
    signal = tmp_path / "signal"
    monkeypatch.setenv(publish.PAUSE_ENV, f"out_staged={signal}")
    publish.pause_point("cache_staged")
    assert not signal.exists()
