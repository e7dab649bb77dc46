"""The epoll reactor without a log context around every I/O event (issue #32).

Twisted's ``EPollReactor.doPoll`` runs each ready descriptor's read or write
through ``twisted.python.log.callWithLogger``: it asks the descriptor for its
``logPrefix()`` and pushes a context holding it, so that a legacy
``log.msg`` made meanwhile carries it as its ``system``.  Both daemons log
through ``twisted.logger``, whose events name their own namespace, so that
context is never read; it cost about 8% of a proxied request's main thread
on CPython (py-spy under ``wrk``: ``callWithLogger``, ``callWithContext`` and
the context tracker, six Python calls an event, two to four events a
request).

:class:`QuietEPollReactor` handles the same events in the same order without
it; an exception escaping an event's handling is still logged, as
``callWithLogger`` logged it (Twisted's ``_doReadOrWrite`` already logs and
disconnects for one raised by ``doRead`` or ``doWrite``).  :func:`quieten`
makes the reactor twistd installed (an ``EPollReactor`` on Linux, by the
time a plugin's options are parsed) one of these, in place: the subclass
adds no state.  Any other reactor (a test's ``MemoryReactor``, ``--reactor``
given to twistd) is left as it is.
"""

from __future__ import annotations

import errno
from typing import Any, Optional

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


class QuietEPollReactor(EPollReactor):
    """``EPollReactor`` whose I/O events run without a legacy log context each."""

    def doPoll(self, timeout: Optional[float]) -> None:
        """Poll for events and handle each (Twisted's ``doPoll``, without ``callWithLogger``)."""
        if timeout is None:
            timeout = -1  # wait until something happens
        try:
            ready = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except Exception:
                log.failure("Unhandled error handling an I/O event of {selectable!r}", selectable=selectable)

    doIteration = doPoll


def quieten(reactor: Any) -> None:
    """Make ``reactor`` a :class:`QuietEPollReactor` if it is a plain ``EPollReactor`` (the same object)."""
    if type(reactor) is EPollReactor:
        reactor.__class__ = QuietEPollReactor
