"""`esm2 server`: the gRPC frontend alone (validate, enqueue, relay)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from esm2_service.esm2.v1 import esm2_pb2
from esm2_service.server.broker import Broker, BrokerSettings
from esm2_service.server.handlers import add_esm2_service
from esm2_service.server.health import HealthMonitor
from esm2_service.server.service import Esm2Service
from esm2_service.server.settings import ServerSettings, build_parser, settings_from_args

log = logging.getLogger("esm2_service.server")

# Requests are small (8 x 2,048 characters); refuse anything far larger unread.
MAX_REQUEST_BYTES = 256 * 1024
# Every response message is built under gRPC's default 4 MiB limit.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


async def serve(settings: ServerSettings, ready: asyncio.Event | None = None) -> None:
    """Runs the frontend until cancelled or SIGTERM/SIGINT; then drains in-flight streams."""
    redis = aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,  # longer than one blocking read (1 s); a hung Redis fails requests
        health_check_interval=10,
    )
    broker = Broker(
        redis,
        BrokerSettings(
            max_queue_items=settings.max_queue_items,
            request_timeout_s=settings.request_timeout_s,
            result_ttl_s=settings.result_ttl_s,
        ),
    )
    monitor = HealthMonitor(redis, settings.worker_timeout_s, settings.health_interval_s)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
        ]
    )
    add_esm2_service(Esm2Service(broker, settings.worker_timeout_s), server)
    health_pb2_grpc.add_HealthServicer_to_server(monitor.servicer, server)
    reflection.enable_server_reflection(
        (
            esm2_pb2.DESCRIPTOR.services_by_name["Esm2"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    monitor_task = asyncio.create_task(monitor.run())
    log.info("listening on port %d (%s)", port, settings.describe())
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
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"esm2 server: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
