"""The FastAPI app behind `vidsieve serve`: WebSocket streaming, OpenAI-compatible HTTP,
health, readiness and metrics, over one `Engine` that owns the model.

    /health                liveness, never needs the API key
    /ready                 200 while serving, 503 while draining (the model loads before the server listens)
    /metrics               Prometheus text
    /v1/models, /v1/chat/completions   OpenAI-compatible (server/openai_api.py)
    /v1/stream             WebSocket live sessions (server/ws.py, docs/protocol.md)

On SIGTERM the server drains: it stops accepting connections, sessions and questions, lets
answers in flight finish for up to `drain_timeout_s`, tells WebSocket clients it is going
away, and only then lets uvicorn close what is left.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kernels.errors import VidsieveError
from server import openai_api, ws
from server.auth import require_api_key
from server.errors import ApiError, api_error
from server.logs import configure_logging, request_id_var
from server.metrics import Metrics
from server.settings import Settings, get_settings
from streaming.engine import Engine, EngineConfig

log = logging.getLogger("vidsieve.server")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def create_app(settings: Settings | None = None, model=None) -> FastAPI:
    """The app; `settings` (else `get_settings()`) is what every route sees. `model`: one
    already loaded (else the app loads `settings.model` at startup)."""
    app = FastAPI(title="vidsieve", version="0.1.0", lifespan=lifespan)
    app.state.preloaded_model = model
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    app.include_router(openai_api.router)
    app.include_router(ws.router)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"], dependencies=[Depends(require_api_key)])
    app.add_api_route("/metrics", metrics, methods=["GET"], dependencies=[Depends(require_api_key)])
    app.add_exception_handler(ApiError, lambda request, error: error.response())
    app.add_exception_handler(VidsieveError, _vidsieve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(RequestContext)
    app.state.connections = set()
    return app


def resolve_settings(app: FastAPI) -> Settings:
    return app.dependency_overrides.get(get_settings, get_settings)()


def load_model(settings: Settings):
    """The served model (raises a VidsieveError naming the problem when it cannot load)."""
    from vlm.model import VLM

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    return VLM.from_pretrained(settings.model, device=settings.device, dtype=settings.dtype, attention=settings.attention)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = resolve_settings(app)
    model = app.state.preloaded_model
    if model is None:
        model = await asyncio.to_thread(load_model, settings)
    app.state.preloaded_model = None
    engine = Engine(model, EngineConfig(max_sessions=settings.max_sessions)).start()
    app.state.model = model
    app.state.model_id = settings.served_model_name or model.config.name
    app.state.engine = engine
    app.state.metrics = Metrics(engine.stats)
    app.state.started_at = int(time.time())
    log.info("ready", extra={"model": model.display_name, "device": str(model.device),
                             "max_sessions": settings.max_sessions})
    try:
        yield
    finally:
        engine.begin_drain()
        engine.shutdown()


async def drain(app: FastAPI, timeout_s: float) -> None:
    """Refuse new work, give answers in flight up to `timeout_s`, then tell every WebSocket
    client the server is going away."""
    engine: Engine | None = getattr(app.state, "engine", None)
    if engine is None:
        return
    engine.begin_drain()
    log.info("draining", extra={"timeout_s": timeout_s, "sessions": engine.stats().sessions})
    deadline = time.monotonic() + timeout_s
    connections = app.state.connections
    while time.monotonic() < deadline and (engine.busy() or any(c.channel.waiting for c in connections)):
        await asyncio.sleep(0.05)
    for connection in list(connections):
        connection.shutdown_soon()
    while connections and time.monotonic() < deadline + 1.0:
        await asyncio.sleep(0.05)


class DrainingServer(uvicorn.Server):
    """uvicorn, draining the app before its own shutdown (which closes WebSockets at once)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float):
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # no new connections while draining
        await drain(self.app, self.drain_timeout_s)
        await super().shutdown(sockets)


def uvicorn_config(app: FastAPI, settings: Settings, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, ws_max_size=settings.max_ws_message_bytes,
                          ws_ping_interval=settings.ws_ping_interval_s, ws_ping_timeout=settings.ws_ping_interval_s,
                          timeout_graceful_shutdown=2, log_config=None, access_log=False, lifespan="on")


def run_server(settings: Settings, host: str, port: int) -> None:
    """`vidsieve serve`: load the model first (a bad one fails here, with a clear message),
    then serve until SIGTERM or SIGINT, then drain."""
    configure_logging(settings.log_level)
    app = create_app(settings, model=load_model(settings))
    DrainingServer(uvicorn_config(app, settings, host, port), app, settings.drain_timeout_s).run()


# --- routes -----------------------------------------------------------------------------------


async def health() -> dict:
    return {"status": "ok"}


async def ready(request: Request) -> JSONResponse:
    """The model loads before the server listens, so this turns 503 only while draining."""
    if request.app.state.engine.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ready", "model": request.app.state.model_id})


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


# --- errors -----------------------------------------------------------------------------------


def _vidsieve_error(request: Request, error: VidsieveError) -> JSONResponse:
    return api_error(error, resolve_settings(request.app).retry_after_s).response()


def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    return ApiError("bad_request", f"{where}: {first['msg']}", param=where or None).response()


def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
    response = ApiError(code, str(error.detail)).response()
    response.status_code = error.status_code
    return response


def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=error)
    return ApiError("internal", "internal error").response()


class RequestContext:
    """Pure ASGI middleware: a request id per HTTP request and WebSocket connection (the
    client's `X-Request-ID` when sane, else a fresh one), echoed in the response and set for
    every log line, plus one access log line per HTTP request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = {"code": None}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["type"] == "http":
                log.info("request", extra={"method": scope["method"], "path": scope["path"], "status": status["code"],
                                           "duration_ms": round(1000 * (time.perf_counter() - started), 1)})
            request_id_var.reset(token)
