"""The one way this tool writes an output: staged beside it, published by a rename, never lost.

Every output (a run folder, a folder of runs, a compare folder, an A-side cache entry, a delta
file) is built in a staging folder (or file) in its destination's parent, so on the same file
system, named ``.{name}.stage-{owner}``; ``owner`` = ``{host}-{pid}-{start}`` identifies the
process that made it (``start``: the process's start time from /proc, so a recycled pid is
another owner). Then it is published by rename(2):

- rename(2) of a folder onto a non-empty folder fails: it is the kernel, at the moment of the
  rename, that refuses to replace an existing result (a check made when the command started
  would let two concurrent runs both pass it). So of two concurrent runs to one destination,
  exactly one publishes; the other gets an ``InputError``.
- With ``overwrite`` the destination is replaced only if it is a folder this tool wrote
  (``is_tool_folder``: its manifest.json names subspace-sweep) and still the one the command saw
  when it started (``Snapshot``). It is first renamed aside to ``.{name}.old-{owner}``, the new
  one is renamed into place, and only then is the old one deleted: at every moment one complete
  run exists under a name that says what it is.
- The check-and-rename steps hold an flock on the parent folder, so two processes' steps never
  interleave (where the file system has no flock, the rename rule above still holds).
- A process that is killed leaves its staging (and, between the two renames, the moved-aside
  old folder) under its owner's name. ``recover`` (run first by every command that writes into
  that folder, whatever its destination's name) puts a dead owner's old folder back where the
  destination is missing and deletes its staging; it never touches a living owner's folders, nor
  anything on another host (it says so, once).
- Published files and folders get the modes the umask gives (0666 / 0777 minus the umask), like
  any tool's output; some writers (safetensors) would create 0600 files.

``pause_point`` is a test hook: with ``SUBSPACE_SWEEP_TEST_PAUSE=point=/path/signal`` set, the
process creates ``/path/signal`` at ``point`` and waits until ``/path/signal.go`` exists (the kill
tests SIGKILL it there). Points: ``{label}_staged`` (the staging is complete), ``{label}_between_renames``
(the old folder is moved aside, the new one not yet in place), for the labels ``out`` (run,
compare, train and demo folders), ``cache`` (A-side cache entries), ``model`` (converted GGUF
models) and ``file`` (delta files).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

TOOL = "subspace-sweep"
MANIFEST = "manifest.json"
PAUSE_ENV = "SUBSPACE_SWEEP_TEST_PAUSE"
#: The host part of an owner: alphanumerics only, so ``{host}-{pid}-{start}`` splits unambiguously.
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
#: A staging, moved-aside or scratch name: ``.{name}.{kind}-{owner}``.
ASIDE_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>stage|old|work)-(?P<owner>[A-Za-z0-9]+-\d+-\d+)$")
NAME_MAX = 255


# ------------------------------------------------------------------------------- owners


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of ``pid`` from /proc, None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ("?", "0")
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]  # fields 3 (state) and 22 (starttime) of proc(5)


def owner_token(pid: int | None = None) -> str:
    """``{host}-{pid}-{start}`` of a process (this one by default); start is 0 without /proc."""
    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    return f"{HOST}-{pid}-{stat[1] if stat else 0}"


def owner_alive(owner: str) -> bool:
    """Whether the process that ``owner`` names may still run. Unknown hosts count as alive: a
    folder is only ever deleted for an owner known to be gone."""
    host, pid_text, start = owner.rsplit("-", 2)
    if host != HOST:
        return True
    pid = int(pid_text)
    if start == "0":  # no /proc where it was made: all we can ask is whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[1] == start  # a zombie has ended


def aside_name(name: str, kind: str, owner: str | None = None) -> str:
    return f".{name}.{kind}-{owner or owner_token()}"


# ------------------------------------------------------------------------------- modes


def umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes plain open/mkdir give."""
    mask = umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# ------------------------------------------------------------------------------- what is there


def has_tool_manifest(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    versions = manifest.get("package_versions") if isinstance(manifest, dict) else None
    return isinstance(versions, dict) and TOOL in versions


def is_tool_folder(path: Path) -> bool:
    """A folder this tool wrote: its manifest.json names subspace-sweep among its package
    versions, or it is a non-empty folder of such folders (``run --delta A --delta B``)."""
    if path.is_symlink() or not path.is_dir():
        return False
    if has_tool_manifest(path):
        return True
    entries = list(path.iterdir())
    return bool(entries) and all(not e.is_symlink() and e.is_dir() and has_tool_manifest(e) for e in entries)


def _identity(path: Path) -> tuple:
    """What tells this folder from one published in its place: its inode and the digest of its
    listing and manifests (an inode number can be reused as soon as a folder is deleted)."""
    st = path.lstat()
    h = hashlib.sha256()
    for entry in sorted(path.iterdir()) if path.is_dir() else []:
        h.update(f"{entry.name}|".encode())
        for manifest in (entry, entry / MANIFEST):
            if manifest.name == MANIFEST and manifest.is_file():
                h.update(manifest.read_bytes())
    return st.st_dev, st.st_ino, st.st_mtime_ns, h.hexdigest()


def _state(path: Path) -> str:
    if not os.path.lexists(path):
        return "absent"
    if path.is_dir() and not path.is_symlink():
        return "empty" if not any(path.iterdir()) else "folder"
    return "file"


@dataclass(frozen=True)
class Snapshot:
    """What a destination held when the command started (``check_destination``)."""

    path: Path  # absolute, symlinks resolved
    state: str  # "absent", "empty" or "folder" (a folder this tool wrote, to be replaced)
    identity: tuple | None = None


def _absolute(dest: str | os.PathLike, what: str) -> Path:
    if str(dest).strip() == "":
        raise InputError(f"{what} is empty; give a path")
    path = Path(dest).expanduser().resolve()
    if path.parent == path:
        raise InputError(f"{what} {dest} is the root of the file system; give a folder inside it")
    if len(aside_name(path.name, "stage").encode()) > NAME_MAX:
        raise InputError(f"{what} {dest}: the name is too long for its staging name (at most "
                         f"{NAME_MAX - len(aside_name('', 'stage').encode())} bytes)")
    return path


def _check_parent(path: Path, dest: str | os.PathLike, what: str) -> None:
    parent = path.parent
    if not parent.exists():
        raise InputError(f"{what} {dest}: parent folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise InputError(f"{what} {dest}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {dest}: parent folder {parent} is not writable")


def check_destination(
    dest: str | os.PathLike, *, overwrite: bool, what: str = "--out",
    replaceable: Callable[[Path], bool] = is_tool_folder, inputs: Iterable[str | os.PathLike] = (),
) -> Snapshot:
    """Fail before any work when ``dest`` cannot receive a published folder; nothing is created.

    ``inputs`` are paths the command reads: a folder that holds one of them is never replaced.
    """
    path = _absolute(dest, what)
    _check_parent(path, dest, what)
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise InputError(f"{what} {dest} is the current folder or holds it: an output is published by renaming a "
                         f"finished folder into place, which cannot replace the folder you are in; give a new "
                         f"folder, e.g. {what} {Path(dest) / 'run'}")
    state = _state(path)
    if state in ("absent", "empty"):
        return Snapshot(path, state)
    if state == "file" and not replaceable(path):
        raise InputError(f"{what} {dest} exists and is not a folder")
    if not overwrite:
        raise InputError(f"{what} {dest} exists and is not empty; pass --overwrite to replace a run folder")
    if not replaceable(path):
        raise InputError(f"{what} {dest} is not a run folder of {TOOL} (no {MANIFEST} of this tool): --overwrite "
                         "replaces only run folders; move its files elsewhere or choose another folder")
    for item in inputs:
        inside = Path(item).expanduser()
        if not os.path.lexists(inside):  # e.g. a model's HF id
            continue
        inside = inside.resolve()
        if inside == path or path in inside.parents:
            raise InputError(f"{what} {dest} holds {item}, which this command reads: --overwrite would delete it")
    return Snapshot(path, "folder", _identity(path))


def check_file_destination(dest: str | os.PathLike, *, overwrite: bool, what: str = "--out") -> Path:
    """``check_destination`` for an output file (a delta)."""
    path = _absolute(dest, what)
    _check_parent(path, dest, what)
    if path.is_dir():
        raise InputError(f"{what} {dest} is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise InputError(f"{what} {dest} exists; pass --overwrite to replace it")
    return path


# ------------------------------------------------------------------------------- publishing


def pause_point(point: str) -> None:
    """The kill tests' hook (see the module docstring); a no-op unless ``SUBSPACE_SWEEP_TEST_PAUSE``
    names this point."""
    spec = os.environ.get(PAUSE_ENV, "")
    want, _, signal = spec.partition("=")
    if want != point or not signal:
        return
    Path(signal).write_text(f"{os.getpid()}\n")
    go = Path(f"{signal}.go")
    while not go.exists():
        time.sleep(0.02)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``folder`` (released when the process dies, however it dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without flock: the rename rule still holds
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _raced(what: str, path: Path) -> InputError:
    return InputError(f"{what} {path}: another process wrote there while this run ran (a concurrent run to the same "
                      "folder?); what is there was kept and this run's output discarded")


def write_folder(
    dest: str | os.PathLike, fill: Callable[[Path], object], *, overwrite: bool, snapshot: Snapshot | None,
    replaceable: Callable[[Path], bool] = is_tool_folder, what: str = "--out", label: str = "out",
) -> Path:
    """Call ``fill(staging)`` on a new staging folder beside ``dest``, then publish it as ``dest``.

    Without ``overwrite`` only an absent or empty ``dest`` is filled. With it, ``snapshot`` (what
    ``check_destination`` saw when the command started) says what may be replaced: the folder it
    saw and nothing else (``snapshot=None``: whatever ``replaceable`` accepts, for cache entries).
    A crash or Ctrl-C leaves ``dest`` as it was and removes the staging.
    """
    path = Path(os.path.abspath(Path(dest).expanduser())) if snapshot is None else snapshot.path
    staged = path.parent / aside_name(path.name, "stage")
    os.mkdir(staged)
    try:
        fill(staged)
        apply_umask(staged)
        pause_point(f"{label}_staged")
        with _locked(path.parent):
            _publish(staged, path, overwrite=overwrite, snapshot=snapshot, replaceable=replaceable, what=what,
                     label=label)
    except BaseException:
        remove(staged)
        raise
    return path


def _publish(staged: Path, path: Path, *, overwrite: bool, snapshot: Snapshot | None,
             replaceable: Callable[[Path], bool], what: str, label: str) -> None:
    state = _state(path)
    if state in ("absent", "empty"):
        try:
            os.rename(staged, path)  # onto nothing or an empty folder only: the kernel refuses anything else
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise _raced(what, path) from None
            raise
        return
    if not overwrite or (snapshot is not None and snapshot.state != "folder"):
        raise _raced(what, path)
    if not replaceable(path) or (snapshot is not None and _identity(path) != snapshot.identity):
        raise _raced(what, path)
    old = path.parent / aside_name(path.name, "old")
    os.rename(path, old)
    try:
        pause_point(f"{label}_between_renames")
        os.rename(staged, path)
    except BaseException:
        if not os.path.lexists(path):
            os.rename(old, path)  # the new one did not make it: the old one goes back
        raise
    remove(old)


def write_file(dest: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool,
               what: str = "--out") -> Path:
    """``write_folder`` for one file: ``write(staging)`` then, under the parent's lock, a hard link
    that fails if ``dest`` appeared meanwhile (without ``overwrite``) or an atomic replace (with it)."""
    path = check_file_destination(dest, overwrite=overwrite, what=what)
    staged = path.parent / aside_name(path.name, "stage")
    try:
        write(staged)
        apply_umask(staged)
        pause_point("file_staged")
        with _locked(path.parent):
            if overwrite:
                if path.is_dir():
                    raise InputError(f"{what} {dest} is a folder; give a file name")
                os.replace(staged, path)
            else:
                try:
                    os.link(staged, path)
                except FileExistsError:
                    raise _raced(what, path) from None
    finally:
        remove(staged)
    return path


# ------------------------------------------------------------------------------- recovery


def recover(parent: str | os.PathLike, name: str | None = None) -> list[str]:
    """Finish what killed processes left in ``parent`` (for the destination ``name`` only, or all):
    a dead owner's moved-aside old folder goes back where its destination is missing or empty
    (the kill came between the two renames), or is deleted where a new one was published; its
    staging and scratch folders are deleted. A folder whose owner may be alive is never touched;
    one of another host cannot be checked, so it stays, and one line says so. Returns a line per
    restored folder (and that line)."""
    folder = Path(parent).expanduser()
    if not folder.is_dir():
        return []
    restored: list[str] = []
    foreign: list[str] = []
    with contextlib.suppress(OSError), _locked(folder):
        for entry in sorted(folder.iterdir()):
            m = ASIDE_RE.match(entry.name)
            if m is None or (name is not None and m["name"] != name):
                continue
            if m["owner"].rsplit("-", 2)[0] != HOST:
                foreign.append(entry.name)
                continue
            if owner_alive(m["owner"]):
                continue
            with contextlib.suppress(OSError):
                dest = folder / m["name"]
                if m["kind"] == "old" and _state(dest) in ("absent", "empty"):
                    os.rename(entry, dest)
                    restored.append(f"restored {dest}: a process killed while replacing it had moved it aside")
                    continue
                remove(entry)
    if foreign:
        restored.append(f"left {len(foreign)} staging or moved-aside folder(s) of processes on other hosts in {folder} "
                        f"(e.g. {foreign[0]}): this host cannot tell whether they still run; delete them once they do not")
    return restored


def recover_for(dest: str | os.PathLike) -> list[str]:
    """``recover`` in the parent folder of the destination ``dest``, for every name: what any dead
    run left there goes, whatever output it was writing (issue 26); nothing for a path that cannot
    be a destination (those fail the command's checks)."""
    if str(dest).strip() == "":
        return []
    try:
        path = Path(dest).expanduser().resolve()
    except (OSError, RuntimeError):
        return []
    return [] if path.parent == path else recover(path.parent)


@contextlib.contextmanager
def work_dir(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A scratch folder ``.{name}.work-{owner}`` in ``parent``, deleted on exit; one a killed
    process left is deleted by the next ``recover(parent, name)``."""
    path = Path(parent) / aside_name(name, "work")
    os.mkdir(path)
    try:
        yield path
    finally:
        remove(path)
