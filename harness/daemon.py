"""A daemon as a process: ``twistd -n <plugin>`` with its log in a work directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional

TWISTD = str(Path(sys.executable).with_name("twistd"))


class Daemon:
    """A ``twistd -n <plugin>`` process with its log in ``workdir``."""

    def __init__(self, plugin: str, args: List[str], env: Dict[str, str], workdir: Path, name: str) -> None:
        self.plugin, self.args, self.env, self.workdir, self.name = plugin, args, env, workdir, name
        self.process: Optional[subprocess.Popen] = None
        self.log_path = workdir / f"{name}.log"
        self.twistd = TWISTD
        """The ``twistd`` to run (the benchmarks may point one at another release)."""

    def start(self) -> Daemon:
        env = dict(os.environ)
        env.update(self.env)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [self.twistd, "-n", "--pidfile=", "--logfile=-", *([self.plugin] if self.plugin else []), *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir),
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logged_errors(self) -> List[str]:
        """Lines of the log that report an unexpected error (tracebacks, unhandled errors).

        Expected trouble is logged as plain warnings or errors without a
        traceback; a traceback in a daemon's log is a bug, and fails the test.
        """
        if not self.log_path.exists():
            return []
        return [line for line in self.log().splitlines()
                if "Traceback (most recent call last)" in line or "Unhandled" in line]


def assert_no_logged_errors(daemons: Iterable[Daemon]) -> None:
    """Fail the test when a daemon logged a traceback or an unhandled error."""
    found = {d.name: d.logged_errors() for d in daemons}
    found = {name: lines for name, lines in found.items() if lines}
    if found:
        raise AssertionError(f"daemons logged unexpected errors: {found}")
