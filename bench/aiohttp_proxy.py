"""A proxy baseline: aiohttp's server and client, one pooled session (CPython)."""

import os

import aiohttp
from aiohttp import web

BACKEND = f"http://127.0.0.1:{os.environ['BENCH_BACKEND_PORT']}"
HOP = {"connection", "transfer-encoding", "content-length", "keep-alive"}


async def session(app: web.Application):
    app["client"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), auto_decompress=False)
    yield
    await app["client"].close()


async def proxy(request: web.Request) -> web.Response:
    async with request.app["client"].request(request.method, BACKEND + request.path_qs,
                                             data=await request.read()) as upstream:
        body = await upstream.read()
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
        return web.Response(body=body, status=upstream.status, headers=headers)


app = web.Application()
app.cleanup_ctx.append(session)
app.router.add_route("*", "/{tail:.*}", proxy)
web.run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), access_log=None, print=None)
