"""``/metrics`` of every ``--workers`` process, served by the parent.

Each worker serves its own registry on a private UNIX socket (in a directory
of mode 0700 the parent makes, removed when it stops); the parent's
``/metrics`` asks every worker for its text at scrape time, within
:data:`SCRAPE_TIMEOUT`, and answers one exposition: every sample of every
process, labelled ``worker="0"`` (the parent) to ``worker="N-1"``.  A
counter's total is ``sum without (worker)``.  ``lbsvc_worker_up{worker}``
says which processes answered this scrape; a worker that did not is left out
of that scrape rather than holding it up.

This is the equivalent of ``prometheus_client``'s multiprocess mode that
works the same on CPython and PyPy and costs nothing per request: the
multiprocess mode keeps every value in a memory-mapped file (a write per
increment, under a lock), must be switched on before ``prometheus_client`` is
imported, and leaves out collectors such as the callback gauges.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, Iterable, List, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from svckit import metrics
from svckit.accesslog import OFF, AccessLog
from svckit.responses import BytesResponse
from svckit.site import make_site
from svckit.web import Route, Router

log = Logger()

METRICS_SOCKET = "LBSVC_WORKER_METRICS"
"""Set in a worker's environment: the UNIX socket its ``/metrics`` is served on."""
SCRAPE_TIMEOUT = 1.0


class SocketDirectory:
    """The private directory of the workers' metrics sockets."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="lbsvc-workers-")  # mode 0700

    def socket_for(self, number: int) -> str:
        """Where worker ``number`` serves its metrics."""
        return os.path.join(self.path, f"worker-{number}.sock")

    def remove(self) -> None:
        """Remove the directory and its sockets."""
        shutil.rmtree(self.path, ignore_errors=True)


@implementer(IAgentEndpointFactory)
class _ToSocket:
    def __init__(self, reactor: Any, path: str) -> None:
        self.reactor, self.path = reactor, path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self.reactor, self.path, timeout=SCRAPE_TIMEOUT)


class _Families(Collector):
    """Already collected families, for :func:`generate_latest`."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge(texts: Dict[str, Optional[str]]) -> bytes:
    """One exposition of several processes' texts (``worker`` label → text, None: did not answer)."""
    families: Dict[str, Metric] = {}
    up = Metric("lbsvc_worker_up", "1 when the worker process answered this scrape.", "gauge")
    for worker, text in sorted(texts.items(), key=lambda item: int(item[0])):
        up.samples.append(Sample("lbsvc_worker_up", {"worker": worker}, 1.0 if text is not None else 0.0))
        for family in text_string_to_metric_families(text or ""):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            merged.samples.extend(s._replace(labels={**s.labels, "worker": worker}) for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), up]))
    return generate_latest(registry)


class WorkerScrape:
    """The parent's ``/metrics``: its own registry and every worker's, merged."""

    def __init__(self, reactor: Any, registry: CollectorRegistry, sockets: SocketDirectory,
                 workers: List[int]) -> None:
        self.reactor = reactor
        self.registry = registry
        self.sockets = sockets
        self.workers = workers
        """The workers' numbers (1 … N-1)."""

    def _fetch(self, number: int) -> defer.Deferred[Optional[str]]:
        agent = Agent.usingEndpointFactory(self.reactor, _ToSocket(self.reactor, self.sockets.socket_for(number)))
        d = agent.request(b"GET", b"http://worker/metrics")
        d.addCallback(readBody)
        d.addTimeout(SCRAPE_TIMEOUT, self.reactor)

        def text(body: bytes) -> str:
            return body.decode("utf-8")

        def missing(reason: Failure) -> None:
            log.info("Worker {number} did not answer a metrics scrape: {error}", number=number,
                     error=reason.getErrorMessage())
            return None

        fetched: defer.Deferred[Optional[str]] = d.addCallbacks(text, missing)
        return fetched

    def texts(self) -> defer.Deferred[Dict[str, Optional[str]]]:
        """Every process's exposition text by ``worker`` label ("0": this one; None: did not answer)."""
        own = generate_latest(self.registry).decode("utf-8")
        fetches = [self._fetch(n) for n in self.workers]

        def gathered(results: List[Optional[str]]) -> Dict[str, Optional[str]]:
            texts: Dict[str, Optional[str]] = {"0": own}
            texts.update({str(n): t for n, t in zip(self.workers, results)})
            return texts

        return defer.gatherResults(fetches).addCallback(gathered)

    def families(self) -> defer.Deferred[List[Metric]]:
        """Every process's metric families, parsed (the status page's sampler)."""
        return self.texts().addCallback(
            lambda texts: [f for text in texts.values() for f in text_string_to_metric_families(text or "")])

    def __call__(self, request: Any) -> defer.Deferred[BytesResponse]:
        """Scrape every worker, then answer."""
        return self.texts().addCallback(
            lambda texts: BytesResponse(merge(texts), content_type=CONTENT_TYPE_LATEST.encode("ascii")))


def worker_metrics_service(reactor: Any, path: str, registry: CollectorRegistry) -> service.Service:
    """A worker's ``/metrics`` on the UNIX socket ``path`` (only its parent connects)."""
    if os.path.exists(path):
        os.unlink(path)  # left by a worker this one replaces; the directory is the parent's own
    router = Router({b"/metrics": Route("metrics", {b"GET": lambda _: metrics.render(registry)}, max_body=0)},
                    registry=CollectorRegistry(), prefix="lbsvc_worker", max_body=0)
    endpoint = UNIXServerEndpoint(reactor, path, mode=0o600)
    return StreamServerEndpointService(endpoint, make_site(router, AccessLog(OFF, reactor)))
