"""The worker's Redis client sends large values as they are, hiredis installed or not."""

from __future__ import annotations

from redis.connection import PythonRespSerializer

from esm2_service.worker.main import redis_client
from esm2_service.worker.settings import WorkerSettings


def test_large_values_are_sent_without_being_copied_into_one_buffer():
    client = redis_client(WorkerSettings(redis_url="redis://127.0.0.1:1/0", worker_id="w"))
    connection = client.connection_pool.make_connection()
    assert isinstance(connection._command_packer, PythonRespSerializer)
    value = b"x" * 435_000
    packed = connection.pack_command("XADD", "stream", "*", "chunk", value)
    assert any(part is value for part in packed)  # the value itself, not a copy
    assert b"".join(packed).endswith(value + b"\r\n")
