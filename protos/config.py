"""Helpers every entry point's settings share."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def env_or(name: str, default: str | None = None) -> str | None:
    """An environment variable, or `default` when unset or empty."""
    value = os.environ.get(name, "")
    return value if value else default
