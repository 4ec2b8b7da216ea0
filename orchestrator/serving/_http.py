"""The serving HTTP server's app (Starlette, run by uvicorn): both REST dialects and the metrics, on one port.

    POST /model/NAME[/version/N]:METHOD      MindSpore Serving's RESTful API (``_rest``)
    GET|POST /v2/...                         KServe v2's HTTP protocol (``_kserve_http``)
    GET  /metrics                            Prometheus text (``_metrics``)

An unknown URL or method answers in the dialect its path belongs to: ``{"error": ...}`` under
``/v2``, ``{"error_msg": ...}`` elsewhere.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import _kserve_http, _rest


def make_app(dispatcher, max_body_bytes: int, metrics=None, timeout: float | None = None) -> Starlette:
    routes = _rest.routes(dispatcher, max_body_bytes, timeout) + _kserve_http.routes(dispatcher, max_body_bytes, timeout)
    if metrics is not None:
        from prometheus_client import CONTENT_TYPE_LATEST

        async def scrape(request: Request):
            return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

        routes.append(Route("/metrics", scrape, methods=["GET"]))
    app = Starlette(routes=routes)

    def not_found(request: Request, exc):
        path = request.url.path
        if path == "/v2" or path.startswith("/v2/"):
            return JSONResponse({"error": f"URL {path} is not a KServe v2 endpoint served here (/v2, "
                                          f"/v2/health/live|ready, /v2/models/NAME[/versions/V][/ready|/infer|"
                                          f"/config], /v2/repository/index)"}, 404)
        return JSONResponse({"error_msg": f"URL {path} is not /model/NAME[/version/N]:METHOD (POST), /v2/... "
                                          f"(KServe v2) or /metrics"}, 404)

    def not_allowed(request: Request, exc):
        path = request.url.path
        if path == "/v2" or path.startswith("/v2/"):
            allowed = "POST" if path.endswith(("/infer", "/repository/index")) else "GET"
            return JSONResponse({"error": f"{request.method} {path}: only {allowed} is served"}, 405)
        if path == "/metrics":
            return JSONResponse({"error_msg": f"{request.method} {path}: only GET is served"}, 405)
        return JSONResponse({"error_msg": f"{request.method} {path}: only POST is served"}, 405)

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_allowed)
    return app
