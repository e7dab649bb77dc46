# A proxy baseline: Twisted's Agent with a persistent HTTPConnectionPool.
import os

from twisted.application import internet, service
from twisted.internet import reactor
from twisted.web import client, resource, server

backend = int(os.environ["BENCH_BACKEND_PORT"])
pool = client.HTTPConnectionPool(reactor, persistent=True)
pool.maxPersistentPerHost = 64
agent = client.Agent(reactor, pool=pool)


class AgentProxy(resource.Resource):
    isLeaf = True

    def render(self, request):
        url = b"http://127.0.0.1:%d%s" % (backend, request.uri)
        d = agent.request(request.method, url)

        def relay(response):
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in (b"connection", b"transfer-encoding", b"content-length"):
                    request.responseHeaders.setRawHeaders(name, values)
            return client.readBody(response)

        def done(body):
            request.write(body)
            request.finish()

        def failed(reason):
            request.setResponseCode(502)
            request.finish()

        d.addCallback(relay).addCallbacks(done, failed)
        return server.NOT_DONE_YET


application = service.Application("agent-proxy")
internet.TCPServer(int(os.environ["BENCH_PORT"]), server.Site(AgentProxy()), interface="127.0.0.1").setServiceParent(application)
