"""Logging set-up shared by the frontend and the workers: text or JSON lines.

Log calls attach context with `extra={"request_id": ...}`. Text lines keep their
usual shape (the messages already name the request); JSON lines carry `ts`,
`level`, `logger`, `message`, and `request_id` / `worker_id` when known, so a log
pipeline can follow one request across the frontend and the workers.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
# Attributes of a LogRecord copied into JSON lines when a log call set them.
CONTEXT_FIELDS = ("request_id", "worker_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `fields` (e.g. the worker id) are added to every line."""

    def __init__(self, fields: dict[str, str] | None = None):
        super().__init__()
        self.fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.fields,
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def configure_logging(
    level: str, log_format: str = "text", *, text_format: str | None = None, fields=None
) -> None:
    """Sends the root logger's records to stderr as text (`text_format`) or JSON lines."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(fields))
    else:
        handler.setFormatter(
            logging.Formatter(text_format or "%(asctime)s %(levelname)s %(name)s %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
