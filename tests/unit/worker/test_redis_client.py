"""The worker's Redis client packs small commands in one buffer (hiredis) and sends large
values as they are, and both give redis-py's own bytes."""

from __future__ import annotations

import pytest
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer
from redis.exceptions import DataError

from esm2_service.worker.command_packer import COPY_AT_MOST_BYTES
from esm2_service.worker.main import redis_client
from esm2_service.worker.settings import WorkerSettings


@pytest.fixture
def connection():
    client = redis_client(WorkerSettings(redis_url="redis://127.0.0.1:1/0", worker_id="w"))
    return client.connection_pool.make_connection()


def redis_pys_own(*args) -> bytes:
    return b"".join(
        PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode).pack(*args)
    )


def test_large_values_are_sent_without_being_copied_into_one_buffer(connection):
    value = b"x" * 435_000
    packed = connection.pack_command("XADD", "stream", "*", "chunk", value)
    assert any(part is value for part in packed)  # the value itself, not a copy
    assert b"".join(packed) == redis_pys_own("XADD", "stream", "*", "chunk", value)


def test_a_write_of_small_values_is_one_buffer_with_redis_pys_bytes(connection):
    args = ("EVALSHA", "ab" * 20, 2, "key:1", b"key:2", 600, 1.5, "é", *[b"v" * 1280] * 16)
    packed = connection.pack_command(*args)
    assert len(packed) == 1
    assert packed[0] == redis_pys_own(*args)
    at_the_bound = ("SET", "k", b"v" * COPY_AT_MOST_BYTES)
    assert len(connection.pack_command(*at_the_bound)) == 1
    assert len(connection.pack_command(*at_the_bound, b"v")) > 1


def test_what_hiredis_would_pack_differently_goes_the_way_redis_py_does(connection):
    assert b"".join(connection.pack_command("CONFIG GET", "maxmemory")) == redis_pys_own(
        "CONFIG", "GET", "maxmemory"
    )
    view = memoryview(b"abc")
    assert b"".join(connection.pack_command("SET", "k", view)) == redis_pys_own("SET", "k", view)
    with pytest.raises(DataError):
        connection.pack_command("SET", "k", True)
