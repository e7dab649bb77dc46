"""A real browser for the status-page tests: Debian's chromium driven by Playwright in a CPython process.

The tests run under CPython and PyPy; Playwright (its ``greenlet``) may not
install on PyPy 3.9, so the browser is always driven from the CPython
environment (``.venv``) by :mod:`tests.integration.browser_driver`, one JSON
command a line.  Where no browser can be had the tests are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPYTHON = ROOT / ".venv" / "bin" / "python"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("SCREENSHOT_DIR", ROOT / "build" / "screenshots"))
"""Where the tests save a screenshot of each page (one is kept in ``docs/``)."""
ANSWER_TIMEOUT = 60.0


def missing() -> Optional[str]:
    """Why no browser can be driven here, or None."""
    if not CHROMIUM.exists():
        return "no /usr/bin/chromium (apt-get install chromium; scripts/test installs it when it may)"
    if not CPYTHON.exists():
        return f"no CPython environment at {CPYTHON} (scripts/venv python3 .venv)"
    probe = subprocess.run([str(CPYTHON), "-c", "import playwright"], capture_output=True)
    if probe.returncode != 0:
        return "Playwright is not installed in .venv (scripts/venv python3 .venv installs it)"
    return None


class Browser:
    """One headless chromium; :meth:`call` sends a command and returns its answer."""

    def __init__(self) -> None:
        reason = missing()
        if reason is not None:
            pytest.skip(reason)
        self.process = subprocess.Popen([str(CPYTHON), str(Path(__file__).with_name("browser_driver.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> Dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], ANSWER_TIMEOUT)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the browser driver did not answer (exit code {self.process.poll()})")
        answer: Dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"browser: {answer.get('error')}")
        return answer

    def call(self, op: str, **arguments: Any) -> Dict[str, Any]:
        """Run one command (see :mod:`tests.integration.browser_driver`)."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Close the browser and its driver."""
        if self.process.poll() is None:
            try:
                self.call("close")
            except (RuntimeError, BrokenPipeError):
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
