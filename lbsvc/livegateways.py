"""How many gateway processes share the Redis buckets: a heartbeat with a TTL in Redis.

Every gateway process (each ``--workers`` process too) adds itself to one
sorted set every :data:`INTERVAL` seconds, scored by the Redis server's own
clock (``TIME``: no gateway clock is trusted), drops members not seen for
:data:`TTL` seconds, and reads how many remain, all in one script.  The
count is what the ``local`` fallback divides each user's budget by
(:mod:`lbsvc.fallbackshare`); while Redis cannot be asked it keeps its last
value, which is the count of the gateways that lost Redis with it.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

KEY = "lbsvc:gateways"
INTERVAL = 1.0
TTL = 3.0
SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
return redis.call('ZCARD', KEYS[1])
"""


class LiveGateways(service.Service):
    """This process's heartbeat, and the number of live gateway processes it reads back."""

    def __init__(self, link: Any, clock: IReactorTime, on_count: Any = None) -> None:
        self.link = link
        self.id = uuid.uuid4().hex
        self.count = 1
        """Live gateway processes, this one included (1 until Redis said otherwise)."""
        self.on_count = on_count
        self.loop = task.LoopingCall(self.beat)
        self.loop.clock = clock

    def startService(self) -> None:
        """Beat now and every :data:`INTERVAL` seconds."""
        super().startService()
        self.loop.start(INTERVAL, now=True)

    def stopService(self) -> defer.Deferred[Any]:
        """Stop beating and leave the set (best effort: the TTL removes it anyway)."""
        super().stopService()
        if self.loop.running:
            self.loop.stop()
        redis = self.link.current()
        if redis is None:
            return defer.succeed(None)
        d: defer.Deferred[Any] = redis.execute_command("ZREM", KEY, self.id)
        return d.addErrback(lambda _: None)

    def beat(self) -> defer.Deferred[None]:
        """One heartbeat; failures leave the count as it was."""
        redis = self.link.current()
        if redis is None:
            return defer.succeed(None)
        d: defer.Deferred[Any] = redis.eval(SCRIPT, [KEY], [self.id, repr(TTL)])

        def counted(count: Any) -> None:
            number = max(1, int(count))
            if number != self.count:
                log.info("Gateway processes sharing the Redis buckets: {count}", count=number)
            self.count = number
            if self.on_count is not None:
                self.on_count(number)

        def failed(reason: Failure) -> None:
            log.debug("Heartbeat not written: {error}", error=reason.getErrorMessage())

        return d.addCallbacks(counted, failed)
