# The proxy benchmarks' backend: a bare twisted.web resource answering a short text.
import os

from twisted.application import internet, service
from twisted.web import resource, server


class Hello(resource.Resource):
    isLeaf = True

    def render(self, request):
        return b"Server bench answer"


application = service.Application("bare-backend")
internet.TCPServer(int(os.environ["BENCH_PORT"]), server.Site(Hello()), interface="127.0.0.1").setServiceParent(application)
