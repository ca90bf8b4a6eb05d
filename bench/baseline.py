"""The baseline: `python -m bench.baseline --port P --body FILE`, a bare aiohttp server.

It answers `POST /api/v1/worker-queues/{queue_id}/start` with the bytes of FILE (a real /start
answer of the operator, so the same size), precomputed in memory: what aiohttp costs with no work
at all. Every other /api/v1/ request gets the same bytes too, so that it also stands in for an
upstream control plane in the pass-through benchmark. Same event loop policy, no access log, as the
operator's HTTP server. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aiohttp import web

START_ROUTE = "/api/v1/worker-queues/{queue_id}/start"
BODY = web.AppKey("body", bytes)


async def start_worker(request: web.Request) -> web.Response:
    await request.read()  # the body is received as the operator receives it, then ignored
    return web.Response(body=request.app[BODY], content_type="application/json", charset="utf-8")


async def readyz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


def make_app(body: bytes) -> web.Application:
    app = web.Application()
    app[BODY] = body
    app.router.add_post(START_ROUTE, start_worker)
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/api/v1/{tail:.*}", start_worker)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body", type=Path, required=True, help="the response body to serve")
    args = p.parse_args(argv)
    web.run_app(make_app(args.body.read_bytes()), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
