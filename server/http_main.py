"""`esm2 http`: BioLM's esm2-8m JSON API over the service's queue and workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import uvicorn

from esm2_service.allocator import keep_freed_memory
from esm2_service.cli_help import SERVER_EXIT_CODES, HelpFormatter, epilog
from esm2_service.config import (
    LOOPBACK,
    add_observability_arguments,
    add_setting,
    check_redis_address,
    env_or,
    redact_url,
)
from esm2_service.logs import configure_logging
from esm2_service.server.auth import load_tokens
from esm2_service.server.broker import Broker, BrokerSettings, connect
from esm2_service.server.connection_limit import DEFAULT_MAX_CONNECTIONS, fit_to_open_file_limit
from esm2_service.server.health import HealthMonitor
from esm2_service.server.http_app import HttpDoor, HttpLimits, build_app
from esm2_service.server.http_bounds import (
    DEFAULT_HEADER_TIMEOUT_S,
    bounded_h11_protocol,
    rate_limit_logs,
)
from esm2_service.server.metrics import FrontendMetrics
from esm2_service.server.redis_link import check_url
from esm2_service.server.settings import ServerSettings

log = logging.getLogger("esm2_service.http")

DEFAULT_HTTP_PORT = 8000
# On stdout once the socket is bound; `esm2 serve` reads the port from it.
LISTENING_LINE = "esm2 http listening on port"
# On stdout when /readyz first answers 200; `esm2 serve` waits for it before saying ready.
READY_LINE = "esm2 http ready"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esm2 http",
        description="BioLM's esm2-8m JSON API (POST /api/v3/esm2-8m/{encode,predict,log_prob}/), "
        "served by the same queue and workers as the gRPC frontend. 'esm2 serve' runs it "
        "on port 8000.",
        epilog=epilog(
            "esm2 http --redis-url redis://127.0.0.1:6379/0 --port 8000", SERVER_EXIT_CODES
        ),
        formatter_class=HelpFormatter,
    )
    d, limits = ServerSettings(), HttpLimits()
    parser.add_argument(
        "--host",
        default=env_or("ESM2_HOST", LOOPBACK),
        help=f"address to bind (ESM2_HOST, default {LOOPBACK}; 0.0.0.0 or [::]: every interface)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env_or("ESM2_HTTP_PORT", str(DEFAULT_HTTP_PORT))),
        help=f"HTTP port; 0 picks a free one (ESM2_HTTP_PORT, default {DEFAULT_HTTP_PORT})",
    )
    parser.add_argument(
        "--redis-url",
        default=env_or("REDIS_URL", d.redis_url),
        help=f"Redis URL (REDIS_URL, default {d.redis_url})",
    )
    add_setting(parser, "--max-queue-items", d.max_queue_items, "queued items before 429", kind=int)
    add_setting(
        parser, "--request-timeout-s", d.request_timeout_s, "deadline of every request", kind=float
    )
    add_setting(
        parser, "--result-ttl-s", d.result_ttl_s, "reply streams expire after this", kind=int
    )
    add_setting(
        parser,
        "--worker-timeout-s",
        d.worker_timeout_s,
        "a worker is alive if it sent a heartbeat this recently",
        kind=float,
    )
    add_setting(
        parser,
        "--max-request-bytes",
        limits.max_request_bytes,
        "largest request body, after gzip",
        kind=int,
    )
    add_setting(
        parser,
        "--max-response-mb",
        limits.max_response_bytes // 2**20,
        "largest JSON response (MiB), estimated before any work; past it: 413",
        kind=int,
    )
    add_setting(
        parser,
        "--header-timeout-s",
        DEFAULT_HEADER_TIMEOUT_S,
        "a connection that has not sent a request's whole headers this long after opening "
        "(or after its last response) is closed",
        kind=float,
    )
    add_setting(
        parser,
        "--body-timeout-s",
        limits.body_timeout_s,
        "a request body must arrive in full within this; past it: 408, and the connection closes",
        kind=float,
    )
    add_setting(
        parser,
        "--max-connections",
        DEFAULT_MAX_CONNECTIONS,
        "connections open at once: with this many open a request gets 503, and a further "
        "connection is closed on accept (lowered to fit the open-file limit)",
        kind=int,
    )
    parser.add_argument(
        "--auth-tokens-file",
        default=env_or("ESM2_AUTH_TOKENS_FILE"),
        help="require 'Authorization: Token <token>' with this file's tokens "
        "(ESM2_AUTH_TOKENS_FILE; ESM2_AUTH_TOKENS adds more)",
    )
    parser.add_argument(
        "--log-level",
        default=env_or("ESM2_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (ESM2_LOG_LEVEL, default INFO)",
    )
    add_observability_arguments(parser, metrics_port=0, metrics_help="default 0: none")
    return parser


async def serve(
    args: argparse.Namespace, tokens: tuple[str, ...], metrics: FrontendMetrics
) -> None:
    redis = connect(args.redis_url, "esm2-http")
    broker = Broker(
        redis,
        BrokerSettings(
            max_queue_items=args.max_queue_items,
            request_timeout_s=args.request_timeout_s,
            result_ttl_s=args.result_ttl_s,
        ),
        on_item_complete=metrics.item_latency.observe,
    )
    monitor = HealthMonitor(redis, args.worker_timeout_s, 1.0, metrics)
    limits = HttpLimits(
        max_request_bytes=args.max_request_bytes,
        max_response_bytes=args.max_response_mb * 2**20,
        request_timeout_s=args.request_timeout_s,
        body_timeout_s=args.body_timeout_s,
    )
    door = HttpDoor(broker, monitor, limits, tokens, metrics)
    max_connections = fit_to_open_file_limit(args.max_connections)
    config = uvicorn.Config(
        build_app(door),
        host=args.host.strip("[]"),
        port=args.port,
        http=bounded_h11_protocol(args.header_timeout_s, args.body_timeout_s, max_connections),
        ws="none",
        limit_concurrency=max_connections,  # uvicorn's 503, its own connection counted
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=ServerSettings.grace_s,
    )
    server = uvicorn.Server(config)
    running = asyncio.create_task(server.serve())
    while not server.started and not running.done():
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        log.info(
            "listening on http://%s:%d (Redis %s)", args.host, port, redact_url(args.redis_url)
        )
        print(f"{LISTENING_LINE} {port}", flush=True)
    announcer = asyncio.create_task(_announce_ready(door))
    try:
        await running
    finally:
        announcer.cancel()
        await broker.aclose()
        await redis.aclose()


async def _announce_ready(door: HttpDoor) -> None:
    while door.unready is not None:
        await asyncio.sleep(0.05)
    print(READY_LINE, flush=True)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    args = build_parser().parse_args(argv)
    try:
        tokens = load_tokens(args.auth_tokens_file, env_or("ESM2_AUTH_TOKENS"))
        check_redis_address(args.redis_url, env_or("REDIS_ADDRESS"))
        check_url(args.redis_url)
    except ValueError as error:
        print(f"esm2 http: {error}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)
    rate_limit_logs()
    log.info("token authentication %s", f"on: {len(tokens)} token(s)" if tokens else "off")
    metrics = FrontendMetrics()
    try:
        metrics.serve(args.metrics_host, args.metrics_port)
    except OSError as error:
        log.error(
            "cannot serve metrics on port %d: %s; --metrics-port or ESM2_METRICS_PORT picks "
            "another, 0 none",
            args.metrics_port,
            error,
        )
        return 2
    asyncio.run(serve(args, tokens, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
