"""The result of a Deferred that must already have fired (in-memory tests)."""

from __future__ import annotations

from typing import Any, List

from twisted.python.failure import Failure


def fired(d: Any) -> Any:
    """The Deferred's result; its exception is raised; not fired yet fails."""
    out: List[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]
