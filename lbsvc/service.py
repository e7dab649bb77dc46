"""The gateway service: load the users, then listen; reload backends on SIGHUP.

Listening waits for the user table (a request with a valid key must never be
refused because the table is not loaded yet); a load that fails is logged
and retried with back-off while ``/ready`` on the admin port says why.
"""

from __future__ import annotations

import signal
from typing import Any, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.logger import Logger

from lbsvc.backends import servers as servers_config
from lbsvc.backends.healthcheck import HealthChecker
from lbsvc.backends.pool import BackendPool
from lbsvc.users.database import StorageUnavailable
from lbsvc.users.store import UserStore
from svckit.readiness import Readiness
from svckit.supervisor import Supervisor, backoff

log = Logger()

USERS = "users"
DATABASE = "database"


class GatewayService(service.MultiService):
    """Holds the listening ports; starts them once the users are loaded."""

    def __init__(self, reactor: Any, users: UserStore, pool: BackendPool, checker: HealthChecker,
                 checks: Supervisor, servers_path: str, readiness: Readiness) -> None:
        super().__init__()
        self.reactor: IReactorThreads = reactor
        self.clock: IReactorTime = reactor
        self.users, self.pool, self.checker, self.checks = users, pool, checker, checks
        self.servers_path = servers_path
        self.readiness = readiness
        self._previous_hup: Any = None
        self._attempts = 0
        self._retry: Optional[IDelayedCall] = None
        self._loading: Optional[defer.Deferred[None]] = None

    def startService(self) -> None:
        """Load the users; the ports start once they are in."""
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        self._load()

    def _load(self) -> None:
        self._retry = None
        self._loading = defer.ensureDeferred(self.users.open())
        self._loading.addCallbacks(self._loaded, self._load_failed)

    def _loaded(self, _: Any) -> None:
        self.readiness.ok(USERS)
        service.MultiService.startService(self)

    def _load_failed(self, failure: Any) -> None:
        if failure.check(defer.CancelledError):
            return
        self._attempts += 1
        delay = backoff(self._attempts)
        if failure.check(StorageUnavailable):
            log.error("Cannot load the users ({error}); retrying in {delay:.1f}s",
                      error=failure.value, delay=delay)
        else:
            log.failure("Cannot load the users; retrying in {delay:.1f}s", failure, delay=delay)
        self.readiness.fail(USERS, str(failure.value))
        self._retry = self.clock.callLater(delay, self._load)

    def stopService(self) -> defer.Deferred[None]:
        """Stop listening and close the database."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._loading is not None:
            self._loading.cancel()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        d: defer.Deferred[None] = (
            service.MultiService.stopService(self) if self.running else defer.succeed(None)
        )
        d.addBoth(lambda _: self.users.close())
        return d

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Re-read ``servers.yaml``; keep the old configuration when it is invalid."""
        try:
            new = servers_config.load(self.servers_path)
        except servers_config.ConfigError as e:
            log.error("Reload refused, keeping the current backends: {error}", error=e)
            return
        self.pool.apply(new)
        if self.checker.interval_changed:
            self.checks.restart()
        log.info("Reloaded {path}: {names}", path=self.servers_path,
                 names=", ".join(b.name for b in self.pool.backends))


USER_SYNC = "user_sync"
STALE_AFTER = 3.0
"""Seconds without reading the change log before ``/ready`` says so."""


def watch_database(users: UserStore, readiness: Readiness) -> None:
    """One check of the database file, reflected in readiness."""
    users.watch()
    if users.problem is None:
        readiness.ok(DATABASE)
    else:
        readiness.fail(DATABASE, users.problem)


class UserSync:
    """Polls the user change log (:meth:`UserStore.sync`) for the changes of other gateways.

    While the database cannot be read, keys and limits changed elsewhere are
    not seen: after :data:`STALE_AFTER` seconds of that, ``/ready`` is 503
    (``problems.user_sync``) so that nothing stale is served as ready; the
    gateway keeps serving the users it knows, and catches up from its place
    in the log once the database is back.
    """

    def __init__(self, users: UserStore, readiness: Readiness, clock: Any) -> None:
        self.users = users
        self.readiness = readiness
        self.clock = clock
        self.failing = False

    async def __call__(self) -> None:
        """One poll."""
        try:
            await self.users.sync()
        except StorageUnavailable as e:
            if not self.failing:
                log.warn("Cannot read the user change log ({error}); retrying", error=e)
                self.failing = True
            synced = self.users.synced_at
            if synced is not None and self.clock.seconds() - synced > STALE_AFTER:
                self.readiness.fail(USER_SYNC, f"other gateways' user changes unseen for"
                                               f" {self.clock.seconds() - synced:.0f}s: {e}")
            return
        if self.failing:
            log.info("User change log readable again")
            self.failing = False
        self.readiness.ok(USER_SYNC)
