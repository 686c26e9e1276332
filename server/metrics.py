"""The frontend's Prometheus metrics, on a registry of its own and a port of its own.

Every RPC is counted by an interceptor (method and final status code, refusals by
the token check included); the health loop refreshes the queue depth and the
number of live workers; the broker reports each item's latency from enqueue to
completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Requests wait in the queue up to --request-timeout-s (600 s by default).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

log = logging.getLogger(__name__)


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "esm2_requests",
            "RPCs finished, by full method name and gRPC status code",
            ("method", "code"),
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "esm2_request_duration_seconds",
            "Wall time of an RPC, from its start to its last message or its error",
            ("method",),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.item_latency = Histogram(
            "esm2_item_latency_seconds",
            "Time from enqueueing an item to relaying its completion (queueing + compute)",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "esm2_queue_depth",
            "Items queued or in progress per queue lane (XLEN), refreshed by the health loop",
            ["lane"],
            registry=self.registry,
        )
        self.workers_alive = Gauge(
            "esm2_workers_alive",
            "Workers whose last heartbeat is within --worker-timeout-s",
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> None:
        """Serves /metrics over HTTP on `host`:`port` from a daemon thread (0: not at all)."""
        if port:
            start_http_server(port, addr=host, registry=self.registry)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def observe_request(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method=method, code=getattr(code, "name", str(code))).inc()
        self.request_duration.labels(method=method).observe(seconds)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every RPC with a handler and counts it by its final status code.

    Only methods the server knows are labelled, so clients cannot grow the label
    set. A call the client cancels (or whose deadline passes) counts as CANCELLED."""

    def __init__(self, metrics: FrontendMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.lstrip("/")
        if handler.request_streaming and handler.response_streaming:
            make, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
        elif handler.request_streaming:
            make, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        elif handler.response_streaming:
            make, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
        else:
            make, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        return make(
            self._timed(method, behavior),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _timed(self, method: str, behavior):
        observe = self.metrics.observe_request
        if inspect.isasyncgenfunction(behavior):

            async def timed_stream(request, context):
                started = time.perf_counter()
                code = grpc.StatusCode.UNKNOWN
                try:
                    # Closed here, not left to the garbage collector, if this one is closed.
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            yield response
                    code = context.code() or grpc.StatusCode.OK
                except BaseException as error:
                    code = _code_of(error, context)
                    raise
                finally:
                    observe(method, code, time.perf_counter() - started)

            return timed_stream

        async def timed(request, context):
            started = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                code = context.code() or grpc.StatusCode.OK
                return result
            except BaseException as error:
                code = _code_of(error, context)
                raise
            finally:
                observe(method, code, time.perf_counter() - started)

        return timed


def _code_of(error: BaseException, context) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return context.code() or grpc.StatusCode.UNKNOWN
