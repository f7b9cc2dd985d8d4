"""The kill tests' one mechanism: a CLI subprocess started to pause at a ``publish.pause_point``
(``SUBSPACE_SWEEP_TEST_PAUSE=point=signal``: it creates ``signal`` and waits for ``signal.go``),
waited for, then killed or released. Used by the fault tests of runs, conversions and studies."""

from __future__ import annotations

import os
import signal as signals
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import subspace_sweep
from subspace_sweep import publish

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(subspace_sweep.__file__).resolve().parents[1]
WAIT_S = 900  # by default a paused process reaches its point within this (shared 2-core machine, several processes)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment a CLI subprocess of the tests runs in: this checkout's package and tests on
    its path, no hub."""
    path = os.pathsep.join([str(SRC), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **extra}


@dataclass
class Paused:
    """A CLI process started to pause at ``point`` within ``wait_s`` seconds; its stderr goes to the
    file ``stderr``."""

    name: str
    point: str
    proc: subprocess.Popen
    signal: Path
    stderr: Path
    wait_s: float = WAIT_S
    owner: str = ""

    @classmethod
    def start(cls, name: str, point: str, argv: list[str], folder: Path, wait_s: float = WAIT_S,
              **extra_env: str) -> Paused:
        """``subspace-sweep argv`` run in ``folder`` (its signal and stderr files are kept there)."""
        folder.mkdir(parents=True, exist_ok=True)
        sig, err = folder / "signal", folder / "stderr.txt"
        with open(err, "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "subspace_sweep.cli", *argv], cwd=folder,
                                    stdout=subprocess.DEVNULL, stderr=stderr,
                                    env=cli_env(**{publish.PAUSE_ENV: f"{point}={sig}", **extra_env}))
        return cls(name, point, proc, sig, err, wait_s)

    def wait_paused(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while not self.signal.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited {self.proc.returncode} before {self.point}: {self.stderr.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not reach {self.point} within {self.wait_s} s")
            time.sleep(0.05)
        self.owner = publish.owner_token(self.proc.pid)  # read while it is alive

    def kill(self, sig: int = signals.SIGKILL) -> int:
        """Waits for the pause, sends ``sig`` and reaps the process (its owner token is dead then);
        a process that never pauses is killed before the test fails."""
        try:
            self.wait_paused()
        except BaseException:
            self.stop()
            raise
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def release(self) -> None:
        Path(f"{self.signal}.go").write_text("")

    def stop(self) -> None:
        """Kills the process if it still runs (a test's cleanup, whatever happened)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def err_lines(self) -> list[str]:
        return self.stderr.read_text().splitlines()
