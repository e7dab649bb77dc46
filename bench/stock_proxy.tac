# The proxy baseline: Twisted's stock ReverseProxyResource in front of the backend.
import os

from twisted.application import internet, service
from twisted.web import proxy, server

backend = int(os.environ["BENCH_BACKEND_PORT"])
root = proxy.ReverseProxyResource("127.0.0.1", backend, b"")
application = service.Application("stock-proxy")
internet.TCPServer(int(os.environ["BENCH_PORT"]), server.Site(root), interface="127.0.0.1").setServiceParent(application)
