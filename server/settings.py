"""Frontend settings: flags override environment variables, which override defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from esm2_service.cli_help import SERVER_EXIT_CODES, HelpFormatter, epilog
from esm2_service.config import (
    DEFAULT_REDIS_URL,
    LOOPBACK,
    add_observability_arguments,
    add_setting,
    check_observability,
    env_or,
    redact_url,
)
from esm2_service.server.auth import load_tokens

DEFAULT_METRICS_PORT = 9090


@dataclass(frozen=True)
class ServerSettings:
    host: str = LOOPBACK
    port: int = 50051
    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    max_queue_items: int = 1024
    request_timeout_s: float = 600.0
    result_ttl_s: int = 600
    worker_timeout_s: float = 10.0
    health_interval_s: float = 1.0
    max_connections: int = 1000  # open client connections; past it, closed as accepted
    handshake_timeout_s: float = 10.0  # to send HTTP/2's preface and settings, or be closed
    grace_s: float = 30.0
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int = DEFAULT_METRICS_PORT  # 0: no metrics endpoint
    metrics_host: str = LOOPBACK
    # Secrets: never in repr or logs; describe() gives only their count.
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    auth_tokens_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")
        check_observability(self.metrics_port, self.log_format)
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port and port are both {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in (
            "max_queue_items",
            "request_timeout_s",
            "result_ttl_s",
            "worker_timeout_s",
            "max_connections",
            "handshake_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def describe(self) -> str:
        """The settings for logs, with the Redis password and the tokens hidden."""
        return (
            f"{self!r} redis_url={redact_url(self.redis_url)} "
            f"auth_tokens=<{len(self.auth_tokens)} configured>"
        )


def build_parser(prog: str = "esm2 server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="The ESM-2 gRPC frontend: queues the items of Encode, Predict and Score "
        "calls in Redis for the workers and streams their results back. 'esm2 serve' runs "
        "it with a Redis and workers; run it alone to scale frontends and workers apart.",
        epilog=epilog(
            "esm2 server --redis-url redis://127.0.0.1:6379/0 --port 50051", SERVER_EXIT_CODES
        ),
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerSettings()
    parser.add_argument(
        "--host",
        default=env_or("ESM2_HOST", d.host),
        help=f"address to bind (ESM2_HOST, default {d.host}: this machine only; 0.0.0.0 or "
        "[::] for every interface)",
    )
    add_setting(parser, "--port", d.port, "gRPC port; 0 picks a free one", kind=int)
    parser.add_argument(
        "--redis-url",
        default=env_or("REDIS_URL", d.redis_url),
        help="Redis URL, e.g. redis://:password@host:6379/0, rediss:// for TLS or "
        f"unix:///path/redis.sock (REDIS_URL, default {d.redis_url})",
    )
    add_setting(
        parser,
        "--max-queue-items",
        d.max_queue_items,
        "queued + in-progress items before new requests get RESOURCE_EXHAUSTED; "
        "raise it with more workers",
        kind=int,
    )
    add_setting(
        parser,
        "--request-timeout-s",
        d.request_timeout_s,
        "deadline for requests that set none",
        kind=float,
    )
    add_setting(
        parser,
        "--result-ttl-s",
        d.result_ttl_s,
        "reply streams expire this long after their last write",
        kind=int,
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
        "--max-connections",
        d.max_connections,
        "open client connections; one past it is closed as it is accepted",
        kind=int,
    )
    add_setting(
        parser,
        "--handshake-timeout-s",
        d.handshake_timeout_s,
        "a connection that has not sent HTTP/2's preface and settings this soon is closed",
        kind=float,
    )
    parser.add_argument(
        "--log-level",
        default=env_or("ESM2_LOG_LEVEL", d.log_level),
        help=f"DEBUG, INFO, WARNING or ERROR (ESM2_LOG_LEVEL, default {d.log_level})",
    )
    add_observability_arguments(
        parser, metrics_port=d.metrics_port, metrics_help="default 9090, 0 disables"
    )
    _add_security_arguments(parser)


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--auth-tokens-file",
        default=env_or("ESM2_AUTH_TOKENS_FILE"),
        help="require 'authorization: Token <token>' on every RPC but health checks, with "
        "the tokens of this file, one per line, # comments (ESM2_AUTH_TOKENS_FILE). "
        "ESM2_AUTH_TOKENS (comma-separated, no flag) adds more",
    )
    parser.add_argument(
        "--tls-cert", default=env_or("ESM2_TLS_CERT"), help="PEM certificate chain (ESM2_TLS_CERT)"
    )
    parser.add_argument(
        "--tls-key", default=env_or("ESM2_TLS_KEY"), help="PEM private key (ESM2_TLS_KEY)"
    )
    parser.add_argument(
        "--tls-client-ca",
        default=env_or("ESM2_TLS_CLIENT_CA"),
        help="PEM CA bundle: require client certificates it signed, mutual TLS "
        "(ESM2_TLS_CLIENT_CA)",
    )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The settings of parsed flags; reads the auth tokens (ValueError if unusable)."""
    return ServerSettings(
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        max_queue_items=args.max_queue_items,
        request_timeout_s=args.request_timeout_s,
        result_ttl_s=args.result_ttl_s,
        worker_timeout_s=args.worker_timeout_s,
        max_connections=args.max_connections,
        handshake_timeout_s=args.handshake_timeout_s,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        # The raw tokens have no flag, so they never show in `ps`.
        auth_tokens=load_tokens(args.auth_tokens_file, env_or("ESM2_AUTH_TOKENS")),
        auth_tokens_file=args.auth_tokens_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
    )
