"""Bounds on the HTTP door's connections, below the ASGI app.

uvicorn reads request headers without a deadline, and accepts connections until the
process runs out of file descriptors, when asyncio logs every failed accept() (up to
the backlog, 2,048, per wake-up). Here: a deadline on each request's headers and on a
body still arriving after its response went out (the app puts its own deadline on the
body it reads); a cap on open connections (fitted to the open-file limit by
`connection_limit`); and log records rate-limited per kind.
"""

from __future__ import annotations

import asyncio
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from esm2_service.server.connection_limit import DEFAULT_MAX_CONNECTIONS

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT_S = 10.0
LOG_INTERVAL_S = 10.0
# The loggers a flood of clients can fill: asyncio's (accept() failures), uvicorn's
# (one warning per request past the connection cap, per malformed request), this one.
NOISY_LOGGERS = ("asyncio", "uvicorn.error", __name__)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines and a cap on open connections.

    A connection must send each request's complete headers within `header_timeout_s`
    of opening, or of its previous response; a request body still arriving after its
    response has gone out must end within `body_timeout_s`. Past either, the
    connection is closed. A connection past `max_connections` open is closed as soon as
    it is accepted. Subclassed with the settings by `bounded_h11_protocol`."""

    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s = 30.0
    max_connections = DEFAULT_MAX_CONNECTIONS

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_for: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning(
                "refused a connection: %d are open (--max-connections %d)",
                len(self.connections) - 1,
                self.max_connections,
            )
            self.transport.close()
            return
        self._update_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_deadline()

    def _awaited_part(self) -> str | None:
        """What the connection waits for from the client under a deadline of this
        class: "headers", the "body" of a request already answered, or None."""
        if self.transport.is_closing():
            return None
        if self.conn.their_state is h11.IDLE:
            return "headers"
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY:
            return "body"
        return None  # the app is reading the body (under its own deadline) or answering

    def _update_deadline(self) -> None:
        awaited = self._awaited_part()
        if awaited == self._deadline_for:
            return  # still waiting for the same part: its deadline stands
        self._cancel_deadline()
        if awaited is not None:
            timeout_s = self.header_timeout_s if awaited == "headers" else self.body_timeout_s
            self._deadline = self.loop.call_later(timeout_s, self._time_out, awaited, timeout_s)
            self._deadline_for = awaited

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._deadline_for = None, None

    def _time_out(self, awaited: str, timeout_s: float) -> None:
        self._deadline, self._deadline_for = None, None
        log.debug("closed a connection: no complete request %s within %g s", awaited, timeout_s)
        self.transport.close()


def bounded_h11_protocol(
    header_timeout_s: float, body_timeout_s: float, max_connections: int
) -> type[BoundedH11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with these settings."""
    settings = {
        "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s,
        "max_connections": max_connections,
    }
    return type("BoundedH11Protocol", (BoundedH11Protocol,), settings)


class RateLimitedLogs(logging.Filter):
    """Lets one record of a kind through per `interval_s`; the next one let through
    tells how many were dropped before it. A kind is a logger, a level and the first
    line of a message template (asyncio's handler writes the context below it)."""

    MAX_KINDS = 1024  # forgets them all past this, so odd messages cannot grow it

    def __init__(self, interval_s: float = LOG_INTERVAL_S, clock=time.monotonic):
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._kinds: dict[tuple, tuple[float, int]] = {}  # kind -> (last let through, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg).partition("\n")[0])
        now = self.clock()
        last = self._kinds.get(kind)
        if last is not None and now - last[0] < self.interval_s:
            self._kinds[kind] = (last[0], last[1] + 1)
            return False
        if len(self._kinds) >= self.MAX_KINDS:
            self._kinds.clear()
        self._kinds[kind] = (now, 0)
        if last is not None and last[1]:
            record.msg = (
                f"{record.msg} [and {last[1]:,} more like it in the {now - last[0]:.0f} s "
                "before, not logged]"
            )
        return True


def rate_limit_logs(interval_s: float = LOG_INTERVAL_S) -> None:
    """Rate-limits NOISY_LOGGERS' records, each logger on its own."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(RateLimitedLogs(interval_s))
