"""Retrying a proxied request on the next backend, within a budget.

A request is sent again, to a backend it has not tried, when the attempt
failed before any byte of an answer reached the client (a reset, a
connection lost, a malformed answer, no answer within ``timeouts.response``),
and only when that is safe: the method is idempotent (GET, HEAD, OPTIONS,
PUT, DELETE) and no byte of a request body was sent (a body already on its
way is not kept for a replay).  ``retries: {tries, timeout, budget}`` in
``servers.yaml`` bounds it: ``tries`` attempts in all, none started after
``timeout`` seconds, and at most ``budget`` of the requests in flight on a
retry at once (at least :data:`MIN_RETRY_CONCURRENCY`), so a struggling
backend pool is not sent a multiple of its load (Envoy's retry budget).
A refused connect is not an attempt: it moves on to the next backend as
before, whatever the budget.
"""

from __future__ import annotations

from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter

from lbsvc.backends.servers import Retries

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
MIN_RETRY_CONCURRENCY = 3


class RetryBudget:
    """Which failed attempts may be retried; the count of requests in flight and of those retrying."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.active = 0
        """Proxied requests in flight."""
        self.retrying = 0
        """Of those, the ones on a second or later attempt."""
        verdicts = Counter(
            "lbsvc_upstream_retries", "Failed attempts that could be retried, by verdict"
            " (retried; budget: refused to protect the backends; exhausted: tries or timeout used up).",
            ["verdict"], registry=registry,
        )
        self._retried, self._budget, self._exhausted = (
            verdicts.labels("retried"), verdicts.labels("budget"), verdicts.labels("exhausted"))

    def allows(self, settings: Retries, method: bytes, body: Optional[Any], attempts: int,
               elapsed: float, retrying: bool) -> bool:
        """Whether a request that failed after ``attempts`` sends may go out once more."""
        if method not in IDEMPOTENT or (body is not None and getattr(body, "started", True)):
            return False
        if attempts >= settings.tries or elapsed > settings.timeout:
            self._exhausted.inc()
            return False
        if not retrying and self.retrying >= max(MIN_RETRY_CONCURRENCY, settings.budget * self.active):
            self._budget.inc()
            return False
        self._retried.inc()
        return True
