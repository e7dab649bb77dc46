"""Where the stream begins, and whether a jump in delivered offsets lost messages.

A jump is not always a loss: the broker writes chunks that occupy offsets but
are never delivered over AMQP, and that the stream protocol delivers as
tracking chunks (tracking and writer snapshots, typically at the start of a
segment).  So on a jump the consumer asks the broker where the
stream now begins (a short-lived consumer at ``first``): if the stream still
holds the first offset that was skipped, the skipped offsets carried no
message and nothing is lost; if retention has dropped it, messages are gone
(:class:`StreamGap`).
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gradesvc.stream.link import IBroker, IStreamLink
from gradesvc.stream.verification import BROKER_TROUBLE, first_delivery

log = Logger()


class StreamGap(Exception):
    """Offsets from ``wanted`` to ``first_available - 1`` held messages the stream has dropped."""

    def __init__(self, wanted: int, first_available: int) -> None:
        super().__init__(wanted, first_available)
        self.wanted = wanted
        self.first_available = first_available


class StreamStart:
    """Asks the broker where ``broker``'s stream begins; judges jumps by it."""

    def __init__(self, broker: IBroker, registry: CollectorRegistry, clock: IReactorTime) -> None:
        self.broker = broker
        self.clock = clock
        self._jumps = Counter(
            "gradesvc_stream_offset_jumps", "Offset jumps checked, by verdict"
            " (empty: the skipped offsets held no message; gap: messages were lost).",
            ["verdict"], registry=registry,
        )

    async def first_offset(self, link: IStreamLink) -> Optional[int]:
        """The offset of the first message the stream still holds (None: unknown)."""
        delivery = await first_delivery(link, "first", self.clock)
        return None if delivery is None else delivery[0]

    async def now(self) -> Optional[int]:
        """The stream's first retained offset, over the current connection (None: unknown)."""
        link = self.broker.link
        if link is None:
            return None
        try:
            return await self.first_offset(link)
        except BROKER_TROUBLE as e:
            log.info("Could not ask where the stream starts: {error!r}", error=e)
            return None

    async def check_jump(self, link: IStreamLink, expected: int, delivered: int) -> None:
        """Offsets ``expected`` .. ``delivered - 1`` were skipped: return if they held no message, raise
        :class:`StreamGap` if messages were lost."""
        first = await self.first_offset(link)
        if first is not None and first <= expected:
            self._jumps.labels("empty").inc()
            log.debug("Offsets {expected}..{last} hold no message (the stream starts at {first})",
                      expected=expected, last=delivered - 1, first=first)
            return
        self._jumps.labels("gap").inc()
        raise StreamGap(expected, delivered if first is None else first)
