"""`esm2 server`: the gRPC frontend alone (validate, enqueue, relay)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from esm2_service.allocator import keep_freed_memory
from esm2_service.config import check_redis_address, env_or
from esm2_service.logs import configure_logging
from esm2_service.server.auth import TokenAuthInterceptor
from esm2_service.server.broker import Broker, BrokerSettings, connect
from esm2_service.server.connection_limit import fit_to_open_file_limit
from esm2_service.server.handlers import SERVICE_NAME, add_esm2_service
from esm2_service.server.health import HealthMonitor
from esm2_service.server.metrics import FrontendMetrics, MetricsInterceptor
from esm2_service.server.redis_link import check_url
from esm2_service.server.service import Esm2Service
from esm2_service.server.settings import ServerSettings, build_parser, settings_from_args
from esm2_service.server.tls import server_credentials

log = logging.getLogger("esm2_service.server")

# Requests are small (8 x 2,048 characters); refuse anything far larger unread.
MAX_REQUEST_BYTES = 256 * 1024
# Every response message is built under gRPC's default 4 MiB limit.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# Streams one client connection may have open at once (HTTP/2 MAX_CONCURRENT_STREAMS):
# a client with more queues them on its side. Without a limit, grpc cancelled some calls
# of a client that kept 1,024 in flight on one connection (CANCELLED, no reason given).
# gRPC's overload protection, which counts a stream until the server has freed it, is
# off: with it, a client that starts a new stream as soon as one ends had some refused
# (UNAVAILABLE, RST_STREAM REFUSED_STREAM). Measured with bench.plumbing at 2,048 in flight.
MAX_STREAMS_PER_CONNECTION = 256
# Idle connections go after this long (GOAWAY: a client reconnects when it next calls);
# a peer that answers no keepalive ping within the timeout is dropped with its streams.
MAX_CONNECTION_IDLE_S = 300
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 60, 20


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """gRPC core's bounds on messages, streams and connections (docs/operations.md, Security)."""
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.http.overload_protection", 0),
        ("grpc.max_allowed_incoming_connections", fit_to_open_file_limit(settings.max_connections)),
        ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_S * 1000),
        ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
    ]


# On stdout, after "esm2 server listening on port N": health first reported SERVING (Redis
# answers and a worker is alive), so requests are taken. `esm2 serve` waits for it.
READY_LINE = "esm2 server ready"


async def serve(
    settings: ServerSettings,
    ready: asyncio.Event | None = None,
    *,
    credentials: grpc.ServerCredentials | None = None,
    metrics: FrontendMetrics | None = None,
) -> None:
    """Runs the frontend until cancelled or SIGTERM/SIGINT; then drains in-flight streams.

    `credentials`: TLS, read from the settings' files when None; `metrics`: where to
    count (a registry nobody serves when None)."""
    metrics = metrics or FrontendMetrics()
    if credentials is None:
        credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
    redis = connect(settings.redis_url, "esm2-server")
    broker = Broker(
        redis,
        BrokerSettings(
            max_queue_items=settings.max_queue_items,
            request_timeout_s=settings.request_timeout_s,
            result_ttl_s=settings.result_ttl_s,
        ),
        on_item_complete=metrics.item_latency.observe,
    )
    monitor = HealthMonitor(
        redis,
        settings.worker_timeout_s,
        settings.health_interval_s,
        metrics,
        on_first_serving=lambda: print(READY_LINE, flush=True),
    )
    # The metrics interceptor comes first, so it also counts the calls auth refuses.
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(metrics)]
    if settings.auth_tokens:
        interceptors.append(TokenAuthInterceptor(settings.auth_tokens))
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    add_esm2_service(Esm2Service(broker, settings.worker_timeout_s), server)
    health_pb2_grpc.add_HealthServicer_to_server(monitor.servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await server.start()
    monitor_task = asyncio.create_task(monitor.run())
    log.info(
        "listening on %s:%d; requests wait until health reports SERVING (a worker is ready) (%s)",
        settings.host,
        port,
        settings.describe(),
    )
    print(f"esm2 server listening on port {port}", flush=True)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("stopping: no new requests; up to %.0f s for streams in flight", settings.grace_s)
        await monitor.servicer.enter_graceful_shutdown()
    finally:
        monitor_task.cancel()
        await server.stop(settings.grace_s)
        await broker.aclose()
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        check_redis_address(settings.redis_url, env_or("REDIS_ADDRESS"))
        check_url(settings.redis_url)
        credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
    except ValueError as error:
        print(f"esm2 server: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    _log_security(settings)
    metrics = FrontendMetrics()
    try:
        metrics.serve(settings.metrics_host, settings.metrics_port)
    except OSError as error:
        log.error(
            "cannot serve metrics on port %d: %s; --metrics-port or ESM2_METRICS_PORT picks "
            "another, 0 none",
            settings.metrics_port,
            error,
        )
        return 2
    asyncio.run(serve(settings, credentials=credentials, metrics=metrics))
    return 0


def _log_security(settings: ServerSettings) -> None:
    """How clients are authenticated and whether the channel is encrypted; never a secret."""
    tls = settings.tls_cert is not None
    if settings.tls_client_ca:
        log.info("TLS on; clients must present a certificate signed by %s", settings.tls_client_ca)
    elif tls:
        log.info("TLS on (server certificate %s)", settings.tls_cert)
    if settings.auth_tokens:
        log.info("token authentication on: %d token(s) configured", len(settings.auth_tokens))
        if not tls:
            log.warning("tokens travel in plaintext without TLS; use --tls-cert off loopback")
    else:
        log.info("token authentication off (no --auth-tokens-file or ESM2_AUTH_TOKENS)")


if __name__ == "__main__":
    sys.exit(main())
