"""REDIS_URL=unix://...: the frontend and the workers reach Redis over a Unix socket."""

from __future__ import annotations

import subprocess
import time

import pytest
import redis
from conftest import ServiceProcesses
from support import assert_close, fair_esm_outputs

from esm2_service import queue
from esm2_service.client import Esm2Client
from esm2_service.server.embedded_redis import redis_server_binary


@pytest.fixture
def unix_socket_redis(tmp_path):
    """A redis-server listening on a Unix socket only (no TCP port); its unix:// URL."""
    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(socket_path)]
        + ["--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    url = f"unix://{socket_path}?db=0"
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert server.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
        with redis.Redis.from_url(url) as client:
            assert client.ping()
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_service_runs_with_redis_on_a_unix_socket(
    unix_socket_redis, tiny_checkpoint, tiny_reference
):
    processes = ServiceProcesses(unix_socket_redis, tiny_checkpoint)
    try:
        processes.wait_serving()
        with Esm2Client(processes.target, timeout_s=60) as client:
            (result,) = client.encode(["MKTAYIAKQRQ"], include=["mean", "contacts"])
        expected = fair_esm_outputs(tiny_reference, "MKTAYIAKQRQ")
        assert_close(result.embeddings[6], expected["mean"][6], what="mean")
        assert_close(result.contacts, expected["contacts"], what="contacts")
        with redis.Redis.from_url(unix_socket_redis) as direct:
            assert direct.zcard(queue.HEARTBEATS) == 1  # the worker's heartbeat arrived
    finally:
        processes.stop()
