"""Every test fails if it leaves an error in the log that it did not expect.

Trial's ``TestCase`` fails a test that logs an unhandled error unless the test
takes it with ``flushLoggedErrors``; :func:`logged_errors` does the same for
pytest: it watches ``twisted.logger``'s global publisher, and a test that
expects an error takes it with ``logged_errors.flush(SomeError)``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher


class LoggedErrors:
    """Errors logged during one test: failures, and events at error level or above."""

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []

    def __call__(self, event: Dict[str, Any]) -> None:
        level = event.get("log_level")
        if "log_failure" in event or level in (LogLevel.error, LogLevel.critical):
            self.events.append(event)

    def flush(self, *types: type) -> List[Dict[str, Any]]:
        """Take the logged errors (those whose failure is one of ``types``, if given)."""
        taken = [e for e in self.events if not types or ("log_failure" in e and e["log_failure"].check(*types))]
        self.events = [e for e in self.events if e not in taken]
        return taken

    def describe(self) -> str:
        """The remaining errors, as text."""
        out = []
        for event in self.events:
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            out.append(text)
        return "\n".join(out)


@pytest.fixture(autouse=True)
def logged_errors() -> Iterator[LoggedErrors]:
    """Fail the test if it logged an error it did not flush."""
    errors = LoggedErrors()
    globalLogPublisher.addObserver(errors)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(errors)
    if errors.events:
        pytest.fail(f"the test logged {len(errors.events)} unexpected error(s):\n{errors.describe()}")
