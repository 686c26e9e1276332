"""The HTTP door's rate-limited logs and its fit of --max-connections to the open-file
limit (the read deadlines and the connection cap run against a real door in
tests/integration/test_http.py)."""

from __future__ import annotations

import asyncio
import logging
import resource

import pytest

from esm2_service.server import connection_limit
from esm2_service.server.connection_limit import FD_RESERVE, fit_to_open_file_limit
from esm2_service.server.http_bounds import RateLimitedLogs

ACCEPT_FAILED = "socket.accept() out of system resource"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_record_of_a_kind_per_interval_then_the_count_of_those_dropped(caplog):
    clock = Clock()
    logger = logging.getLogger("test.http_bounds.flood")
    limiter = RateLimitedLogs(10.0, clock)
    logger.addFilter(limiter)
    with caplog.at_level(logging.INFO, logger=logger.name):
        for second in range(25):  # 10 records a second for 25 s
            clock.now = 100.0 + second
            for attempt in range(10):
                logger.error("accept() failed on fd %d", attempt)
        logger.warning("accept() failed on fd %d", 0)  # another level: another kind
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "accept() failed on fd 0",
        "accept() failed on fd 0 [and 99 more like it in the 10 s before, not logged]",
        "accept() failed on fd 0 [and 99 more like it in the 10 s before, not logged]",
        "accept() failed on fd 0",
    ]


def test_asyncios_accept_errors_are_one_kind_whatever_their_context(caplog):
    """The flood of the review: asyncio's default exception handler, once per failed
    accept(), the listening socket's details below the message."""
    limiter = RateLimitedLogs(10.0, Clock())
    logging.getLogger("asyncio").addFilter(limiter)
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for fd in range(2000):
                error = OSError(24, "Too many open files")
                loop.call_exception_handler(
                    {"message": ACCEPT_FAILED, "exception": error, "socket": f"<socket fd={fd}>"}
                )
    finally:
        loop.close()
        logging.getLogger("asyncio").removeFilter(limiter)
    assert [record.getMessage().splitlines()[0] for record in caplog.records] == [ACCEPT_FAILED]


def fake_limits(monkeypatch, soft: int, hard: int, settable: bool = True) -> list:
    """Makes the module see these RLIMIT_NOFILE limits; returns the setrlimit calls."""
    calls = []

    def setrlimit(which, limits):
        if not settable:
            raise ValueError("not allowed")
        calls.append(limits)

    monkeypatch.setattr(connection_limit.resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(connection_limit.resource, "setrlimit", setrlimit)
    return calls


def test_a_bound_within_the_open_file_limit_stands(monkeypatch):
    calls = fake_limits(monkeypatch, 1000 + FD_RESERVE, 4096)
    assert fit_to_open_file_limit(1000) == 1000
    assert calls == []


@pytest.mark.parametrize("hard", [4096, resource.RLIM_INFINITY])
def test_the_soft_limit_is_raised_toward_the_hard_one(monkeypatch, caplog, hard):
    calls = fake_limits(monkeypatch, 1024, hard)
    with caplog.at_level(logging.INFO, logger=connection_limit.__name__):
        assert fit_to_open_file_limit(2000) == 2000
    assert calls == [(2000 + FD_RESERVE, hard)]
    assert "raised the open-file limit from 1024 to 2064" in caplog.text


def test_past_the_hard_limit_the_bound_is_lowered_and_logged(monkeypatch, caplog):
    calls = fake_limits(monkeypatch, 256, 1024)
    with caplog.at_level(logging.INFO, logger=connection_limit.__name__):
        assert fit_to_open_file_limit(5000) == 1024 - FD_RESERVE
    assert calls == [(1024, 1024)]
    assert "serving at most 960 connections" in caplog.text


def test_a_soft_limit_that_cannot_be_raised_lowers_the_bound(monkeypatch, caplog):
    fake_limits(monkeypatch, 256, 1024, settable=False)
    with caplog.at_level(logging.INFO, logger=connection_limit.__name__):
        assert fit_to_open_file_limit(1000) == 256 - FD_RESERVE
    assert "cannot raise the open-file limit from 256 to 1024" in caplog.text
