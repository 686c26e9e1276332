"""`esm2 serve` restarts its embedded Redis when it dies, and gives up on a crash loop."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import redis

from esm2_service.server import serve
from esm2_service.server.embedded_redis import EmbeddedRedis


def test_the_guard_allows_a_few_restarts_a_window_then_refuses():
    guard = serve.CrashLoopGuard(max_restarts=3, window_s=60)
    assert [guard.allows_restart(at) for at in (0, 1, 2)] == [True, True, True]
    assert guard.allows_restart(3) is False  # a fourth death within 60 s


def test_the_guard_forgets_deaths_older_than_its_window():
    guard = serve.CrashLoopGuard(max_restarts=3, window_s=60)
    assert all(guard.allows_restart(at) for at in (0, 10, 20, 61))  # 0 is out of the window
    assert guard.allows_restart(62) is False  # 10, 20, 61 and 62
    steady = serve.CrashLoopGuard(max_restarts=3, window_s=60)
    assert all(steady.allows_restart(at) for at in range(0, 3600, 20))  # 3 a minute, forever


def test_serves_defaults_give_up_after_more_than_three_deaths_in_a_minute():
    assert (serve.REDIS_MAX_RESTARTS, serve.REDIS_RESTART_WINDOW_S) == (3, 60.0)


@pytest.fixture
def embedded(tmp_path):
    server = EmbeddedRedis(tmp_path, password="s3cret", unix_socket=True)  # as serve has it
    yield server
    server.stop()


def _kill_9(server: EmbeddedRedis) -> None:
    os.kill(server.pid, signal.SIGKILL)
    server.process.wait(timeout=10)


def test_a_dead_redis_comes_back_empty_on_its_port_with_its_password(embedded, caplog):
    client = redis.Redis.from_url(embedded.url, retry_on_error=[redis.ConnectionError])
    local = redis.Redis.from_url(embedded.local_url, retry_on_error=[redis.ConnectionError])
    assert embedded.local_url == f"unix://:s3cret@{embedded.socket_path}?db=0"
    client.set("queued", 1)
    assert local.get("queued") == b"1"
    old_pid, port = embedded.pid, embedded.port
    _kill_9(embedded)
    caplog.set_level(logging.INFO, logger=serve.log.name)
    guard = serve.CrashLoopGuard(max_restarts=1, window_s=60)
    assert serve._keep_redis_running(embedded, guard) is True
    assert (embedded.port, embedded.process.poll()) == (port, None)
    assert embedded.pid != old_pid
    # The same URL, password included, reaches the new one; the queue went with the old.
    assert client.ping() and client.get("queued") is None
    assert local.ping() and local.client_info()["addr"].startswith(str(embedded.socket_path))
    local.close()
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert "queue was lost" in warning.getMessage() and "UNAVAILABLE" in warning.getMessage()
    client.close()


def test_a_live_redis_is_left_alone(embedded, caplog):
    pid = embedded.pid
    assert serve._keep_redis_running(embedded, serve.CrashLoopGuard(1, 60)) is True
    assert embedded.pid == pid and caplog.records == []


def test_serve_gives_up_when_redis_dies_again_and_again(embedded, caplog):
    guard = serve.CrashLoopGuard(max_restarts=1, window_s=60)
    _kill_9(embedded)
    assert serve._keep_redis_running(embedded, guard) is True
    _kill_9(embedded)
    caplog.clear()
    assert serve._keep_redis_running(embedded, guard) is False
    (error,) = caplog.records
    assert error.levelno == logging.ERROR and "more than 1 deaths within 60 s" in error.getMessage()
    assert embedded.process.poll() is not None  # not restarted


def test_supervise_exits_1_when_it_gives_up_on_redis(embedded, monkeypatch):
    monkeypatch.setattr(serve, "REDIS_MAX_RESTARTS", 0)
    _kill_9(embedded)
    assert serve._supervise([], [], None, {}, [], embedded) == 1


def test_a_socket_path_too_long_for_an_address_leaves_the_tcp_port_alone(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    server = EmbeddedRedis(deep, unix_socket=True)
    try:
        assert server.socket_path is None and server.local_url == server.url
        assert redis.Redis.from_url(server.local_url).ping()
    finally:
        server.stop()
