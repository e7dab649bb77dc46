"""Readiness as a set of named conditions, each reported by its owner.

A daemon is ready when none of its conditions is failing.  Each part of the
daemon (the user database, a supervised loop) sets or clears its own
condition, so ``/ready`` says exactly what is wrong.
"""

from __future__ import annotations

from typing import Dict


class Readiness:
    """Named conditions that must all hold."""

    def __init__(self, *pending: str) -> None:
        self._problems: Dict[str, str] = {name: "not started" for name in pending}

    def fail(self, name: str, why: str = "failed") -> None:
        """Condition ``name`` does not hold, because ``why``."""
        self._problems[name] = why

    def ok(self, name: str) -> None:
        """Condition ``name`` holds."""
        self._problems.pop(name, None)

    @property
    def ready(self) -> bool:
        """Whether every condition holds."""
        return not self._problems

    def problems(self) -> Dict[str, str]:
        """The failing conditions and why."""
        return dict(self._problems)
