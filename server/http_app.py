"""The HTTP/JSON door: BioLM's esm2-8m API on the same broker, lanes and workers.

A request runs as the gRPC frontend runs it: the same validation, the same broker
(one Lua script queues every item on its length lane), the same reply streams, the
same error table (mapped to HTTP statuses). Results are gathered in full before the
response starts, so a failure still gets its own status, then written as JSON in
pieces (gzip when asked). A budget bounds the floats held for responses at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from esm2_service.client.results import StreamAssembler, encode_result, predict_result
from esm2_service.server.auth import TokenChecker
from esm2_service.server.broker import Broker, new_request_id
from esm2_service.server.errors import (
    BackendUnavailable,
    PayloadTooLarge,
    ServiceError,
    Unauthenticated,
    to_http_error,
)
from esm2_service.server.health import HealthMonitor
from esm2_service.server.http_requests import ACTIONS, HttpRequest, parse_request, read_body
from esm2_service.server.http_results import (
    MAX_BYTES_PER_FLOAT,
    encode_json,
    log_prob_json,
    predict_json,
    response_floats,
)
from esm2_service.server.http_schema import API_PREFIX, DOCS_PAGE, openapi_document, request_schema
from esm2_service.server.metrics import FrontendMetrics
from esm2_service.validation import FieldViolation, InvalidRequest, clip

log = logging.getLogger(__name__)

# esm2_requests_total's code for a client that left before sending its whole body.
CLIENT_DISCONNECTED = "CLIENT_DISCONNECTED"


@dataclass(frozen=True)
class HttpLimits:
    max_request_bytes: int = 1024 * 1024
    max_response_bytes: int = 256 * 1024 * 1024
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0  # the whole request body must arrive within this


class BodyTimeout(ServiceError):
    """The request body did not arrive within the door's body timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408


class FloatBudget:
    """Floats the process may hold for responses at once; requests wait their turn.
    One request larger than the whole budget still runs, alone."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, floats: int) -> None:
        while self.used and self.used + floats > self.capacity:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self.used += floats

    def release(self, floats: int) -> None:
        self.used -= floats
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # each checks again whether it fits now
            if not waiter.done():
                waiter.set_result(None)


class HttpDoor:
    """The handlers, over one broker and one health monitor."""

    def __init__(
        self,
        broker: Broker,
        monitor: HealthMonitor,
        limits: HttpLimits,
        tokens: tuple[str, ...] = (),
        metrics: FrontendMetrics | None = None,
    ):
        self.broker = broker
        self.monitor = monitor
        self.limits = limits
        self.checker = TokenChecker(tokens) if tokens else None
        self.metrics = metrics or FrontendMetrics()
        self.unready: str | None = "starting"  # why not ready; None when ready
        # Twice one largest response: one streams out while the next is gathered.
        self.budget = FloatBudget(2 * limits.max_response_bytes // MAX_BYTES_PER_FLOAT)
        self._cleanups: set[asyncio.Task] = set()

    async def watch_health(self) -> None:
        """Refreshes readiness (and the queue metrics) every health interval."""
        while True:
            self.unready = await self.monitor.check_once()
            await asyncio.sleep(self.monitor.interval_s)

    async def action(self, request: Request) -> Response:
        action = request.path_params["action"]
        request_id = new_request_id()
        started = time.perf_counter()
        try:
            self._authorize(request)
            parsed = await self._parse(request, action)
            response = await self._answer(request, parsed, request_id)
            code = "OK"
            log.info(
                "http %s request_id=%s items=%d done in %.1f ms",
                action,
                request_id,
                len(parsed.valid.sequences),
                1000 * (time.perf_counter() - started),
                extra={"request_id": request_id},
            )
        except asyncio.CancelledError:
            log.info("http %s request_id=%s: the client went away", action, request_id)
            self._count(action, "CANCELLED", started)
            raise
        except ClientDisconnect:
            log.debug("http %s request_id=%s: the client left mid-body", action, request_id)
            code, response = CLIENT_DISCONNECTED, Response(status_code=499)  # nobody reads it
        except Exception as error:  # one table turns every error into a status
            log.info(
                "http %s request_id=%s failed: %s",
                action,
                request_id,
                error,
                extra={"request_id": request_id},
            )
            # After a body timeout the rest of the body may still come: not another request.
            close = isinstance(error, BodyTimeout)
            code, response = _error_response(error, request_id, close_connection=close)
        self._count(action, code, started)
        return response

    def _authorize(self, request: Request) -> None:
        if self.checker is None:
            return
        values = request.headers.getlist("authorization")
        reason = self.checker.check(values)
        if reason is not None:
            raise Unauthenticated(reason)

    async def _parse(self, request: Request, action: str) -> HttpRequest:
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                f"the request body is {int(declared):,} bytes; the limit is {limit:,}"
            )
        timeout_s = self.limits.body_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                raw = await _read_stream(request, limit)
        except TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
        document = read_body(raw, request.headers.get("content-encoding", ""), limit)
        return parse_request(action, document)

    async def _answer(self, request: Request, parsed: HttpRequest, request_id: str) -> Response:
        floats = response_floats(parsed.valid, parsed.action)
        if floats * MAX_BYTES_PER_FLOAT > self.limits.max_response_bytes:
            raise PayloadTooLarge(
                f"the response would hold {floats:,} floats (up to "
                f"{floats * MAX_BYTES_PER_FLOAT / 1e6:,.0f} MB of JSON), over the limit of "
                f"{self.limits.max_response_bytes / 1e6:,.0f} MB: ask for fewer outputs, layers "
                "or items per request, or use the gRPC API, which streams packed float32"
            )
        if self.unready is not None:
            raise BackendUnavailable(f"the service is not ready: {self.unready}")
        await self.budget.acquire(floats)
        try:
            items = await _until_disconnected(request, self._gather(parsed, request_id))
            body = _body(parsed, items)
        except BaseException:
            self.budget.release(floats)
            raise
        headers = {"X-Request-Id": request_id}
        gzipped = "gzip" in request.headers.get("accept-encoding", "").lower()
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        chunks = _released(_gzip(body) if gzipped else body, lambda: self.budget.release(floats))
        return StreamingResponse(chunks, media_type="application/json", headers=headers)

    async def _gather(self, parsed: HttpRequest, request_id: str) -> list:
        valid = parsed.valid
        deadline = await self.broker.submit(valid, request_id, self.limits.request_timeout_s)
        assembler = StreamAssembler(len(valid.sequences))
        finished = False
        try:
            async for responses in self.broker.results(request_id, len(valid.sequences), deadline):
                for response in responses:
                    assembler.add(response)
            finished = True
        finally:
            cleanup = self.broker.finish if finished else self.broker.cancel
            task = asyncio.get_running_loop().create_task(cleanup(request_id))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
        return assembler.finish()

    def _count(self, action: str, code: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.metrics.observe_request(f"POST {API_PREFIX}/{action}/", code, seconds)


async def _read_stream(request: Request, limit: int) -> bytes:
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit:,} bytes")
    return bytes(raw)


def _error_response(
    error: Exception, request_id: str, close_connection: bool = False
) -> tuple[str, Response]:
    """The code (for the metrics) and the JSON error response of `error`."""
    status, body, headers = to_http_error(error)
    body |= {"status_code": status, "request_id": request_id}
    headers = {**headers, "X-Request-Id": request_id}
    if close_connection:
        headers["Connection"] = "close"
    return body["code"], _json(body, status, headers)


def _body(parsed: HttpRequest, items: list) -> Iterator[bytes]:
    valid = parsed.valid
    if parsed.action == "predict":
        return predict_json(predict_result(item, i) for i, item in enumerate(items))
    results = [
        encode_result(item, i, valid.include, valid.repr_layers) for i, item in enumerate(items)
    ]
    if parsed.action == "log_prob":
        return log_prob_json(results, valid.sequences)
    return encode_json(results)


async def _until_disconnected(request: Request, work):
    """`work`'s result; cancels it (and so its queued items) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return await task


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)


async def _released(chunks: Iterator[bytes], release) -> AsyncIterator[bytes]:
    """The response's pieces; `release` runs once they are sent (or the client left)."""
    try:
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(0)  # let other requests run between pieces
    finally:
        release()


def _gzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    # Level 1: float text still shrinks about 2.1x (level 6: 2.3x) at 7x the speed, 110
    # MB/s here (a per-token response is megabytes: level 6 cost 0.7 s of CPU a request).
    deflater = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip framing
    pending = bytearray()
    for chunk in chunks:
        pending += deflater.compress(chunk)
        if len(pending) >= 64 * 1024:
            yield bytes(pending)
            pending.clear()
    yield bytes(pending) + deflater.flush()


def _json(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


async def _schema(request: Request) -> Response:
    action = request.path_params["action"]
    if action not in ACTIONS:
        raise _no_action(action)
    return JSONResponse(request_schema(action))


def _no_action(action: str) -> HTTPException:
    return HTTPException(404, f"no action {clip(action)!r}; actions: {', '.join(ACTIONS)}")


async def _healthz(_: Request) -> Response:
    return _json({"status": "ok"})


async def _http_error(_: Request, error: HTTPException) -> Response:
    body = {"detail": error.detail, "status_code": error.status_code}
    return _json(body, error.status_code, getattr(error, "headers", None))


async def _unexpected(_: Request, error: Exception) -> Response:
    log.error("unexpected error in the HTTP door", exc_info=error)
    return _json(
        {"detail": "internal error; the server logged the details", "status_code": 500}, 500
    )


class RefuseAmbiguousFraming:
    """Refuses a request with both Content-Length and Transfer-Encoding (400, then the
    connection closes). h11 frames it by Transfer-Encoding, a proxy in front may frame it
    by Content-Length: the bytes between the two would pass the proxy as a request of
    their own (request smuggling). RFC 9112 6.1 lets a server refuse it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        names = {name for name, _ in scope.get("headers", ())}
        if scope["type"] == "http" and {b"content-length", b"transfer-encoding"} <= names:
            request_id = new_request_id()
            log.info("refused request_id=%s: Content-Length and Transfer-Encoding", request_id)
            violation = FieldViolation(
                "headers", "Content-Length and Transfer-Encoding together; send one of them"
            )
            _, response = _error_response(
                InvalidRequest([violation]), request_id, close_connection=True
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_app(door: HttpDoor) -> Starlette:
    async def action(request: Request) -> Response:
        if request.path_params["action"] not in ACTIONS:
            raise _no_action(request.path_params["action"])
        return await door.action(request)

    async def readyz(_: Request) -> Response:
        if door.unready is None:
            return _json({"status": "ready"})
        return _json({"status": "not ready", "detail": door.unready}, 503)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        watcher = asyncio.create_task(door.watch_health())
        try:
            yield
        finally:
            watcher.cancel()

    document = openapi_document()
    routes = [
        Route(f"{API_PREFIX}/{{action}}/", action, methods=["POST"]),
        Route("/api/v3/schema/esm2-8m/{action}/", _schema, methods=["GET"]),
        Route("/openapi.json", lambda _: JSONResponse(document), methods=["GET"]),
        Route("/docs", lambda _: HTMLResponse(DOCS_PAGE), methods=["GET"]),
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected},
        middleware=[Middleware(RefuseAmbiguousFraming)],
        lifespan=lifespan,
    )
