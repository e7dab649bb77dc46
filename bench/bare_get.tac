# The /get baseline: a bare twisted.web resource serving the same data from a
# plain dict, under twistd like gradesvc (same reactor, same access log).
import json
import os

from twisted.application import internet, service
from twisted.web import resource, server

USERS = int(os.environ.get("BENCH_USERS", "10000"))
DATA = {str(i): {"user_id": str(i), "postpaid_limit": i, "spp": 2 * i, "shipping_fee": 20, "return_fee": 29}
        for i in range(USERS)}


class Get(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        user = DATA.get(request.args.get(b"user_id", [b""])[0].decode())
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"Result": user}).encode()


root = resource.Resource()
root.putChild(b"get", Get())
application = service.Application("bare-get")
internet.TCPServer(int(os.environ["BENCH_PORT"]), server.Site(root), interface="127.0.0.1").setServiceParent(application)
