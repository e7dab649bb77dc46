"""Building the ``twisted.web`` sites the daemons listen with.

Every site here serves JSON or proxies bytes, never HTML forms, so Twisted's
parsing of form bodies (``parsePOSTFormSubmission``, which runs the ``email``
package over every POST's ``Content-Type``) is turned off: it cost more than
the rest of a ``POST /set``.

The access log is chosen by the operator: ``-`` writes a combined-log-format
line per request into the daemon's own log, a path writes them to that file,
and ``off`` writes none (the request counters on ``/metrics`` remain).
"""

from __future__ import annotations

from typing import Any, Optional, Type

from twisted.web import resource, server

ACCESS_LOG_OFF = "off"
ACCESS_LOG_MAIN = "-"


class _QuietSite(server.Site):
    """A site that writes no access log."""

    def log(self, request: Any) -> None:
        """Write nothing."""


def make_site(
    root: resource.IResource,
    request_factory: Type[server.Request],
    access_log: str = ACCESS_LOG_MAIN,
) -> server.Site:
    """A site for ``root`` whose requests are ``request_factory`` instances."""
    site_class = _QuietSite if access_log == ACCESS_LOG_OFF else server.Site
    path: Optional[str] = None if access_log in (ACCESS_LOG_MAIN, ACCESS_LOG_OFF) else access_log
    site = site_class(root, logPath=path, parsePOSTFormSubmission=False)
    site.requestFactory = request_factory
    return site
