"""Helpers every entry point's settings share."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from esm2_service.logs import LOG_FORMATS

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# What the frontend and the metrics endpoints bind unless told otherwise: this machine
# only. Containers set ESM2_HOST / ESM2_METRICS_HOST to every interface (deploy/).
LOOPBACK = "127.0.0.1"


def redact_url(url: str) -> str:
    """The URL with any password (in the userinfo or a `password=` query parameter,
    both of which redis-py reads) replaced, fit for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None and "password" not in parts.query:
        return url  # as given: unsplitting drops the // of unix:///path
    if parts.password is not None:
        user = parts.username or ""
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
        parts = parts._replace(netloc=f"{user}:***@{host}{port}")
    if "password" in parts.query:
        query = [
            (name, "***" if name == "password" else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*/"))
    return urlunsplit(parts)


def check_redis_address(redis_url: str, address: str | None) -> None:
    """ValueError unless `address` (REDIS_ADDRESS: host:port of the same Redis, for KEDA's
    redis-streams scaler, which takes no URL) is unset or names REDIS_URL's host and port."""
    if not address:
        return
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        raise ValueError(
            f"REDIS_ADDRESS={address} names a TCP address, but REDIS_URL is a Unix socket"
        )
    expected = f"{parts.hostname}:{parts.port or 6379}"
    host, _, port = address.rpartition(":")
    if (host.strip("[]").lower(), port) != (
        (parts.hostname or "").lower(),
        str(parts.port or 6379),
    ):
        raise ValueError(
            f"REDIS_ADDRESS={address} is not the Redis of REDIS_URL ({expected}): KEDA would "
            f"scale the workers on another Redis's queue; set REDIS_ADDRESS={expected}"
        )


def env_or(name: str, default: str | None = None) -> str | None:
    """An environment variable, or `default` when unset or empty."""
    value = os.environ.get(name, "")
    return value if value else default


def add_setting(parser, flag: str, default, help: str, kind=str) -> None:
    """A flag whose default comes from its environment variable, ESM2_<FLAG> (e.g.
    --max-queue-items: ESM2_MAX_QUEUE_ITEMS), then from `default`."""
    env = "ESM2_" + flag.removeprefix("--").replace("-", "_").upper()
    value = env_or(env)
    parser.add_argument(
        flag,
        type=kind,
        default=default if value is None else kind(value),
        help=f"{help} ({env}, default {default})",
    )


def add_observability_arguments(parser, *, metrics_port: int, metrics_help: str) -> None:
    """--metrics-port, --metrics-host and --log-format, which the frontend and workers share."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env_or("ESM2_METRICS_PORT", str(metrics_port))),
        help=f"Prometheus /metrics port (ESM2_METRICS_PORT); {metrics_help}",
    )
    parser.add_argument(
        "--metrics-host",
        default=env_or("ESM2_METRICS_HOST", LOOPBACK),
        help=f"address the metrics endpoint binds (ESM2_METRICS_HOST, default {LOOPBACK}; "
        "0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=env_or("ESM2_LOG_FORMAT", "text"),
        help="text lines, or JSON lines with ts, level, logger, message, request_id "
        "(ESM2_LOG_FORMAT, default text)",
    )


def check_observability(metrics_port: int, log_format: str) -> None:
    """Raises ValueError for a metrics port or log format no process accepts."""
    if not 0 <= metrics_port <= 65535:
        raise ValueError(f"metrics_port {metrics_port} is outside 0..65535 (0 disables metrics)")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
