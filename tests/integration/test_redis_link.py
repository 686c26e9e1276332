"""The frontend's pipelined Redis link against a real Redis: replies reach their callers,
and a cancelled caller, a hung or lost connection, or a refusal harms nobody else."""

from __future__ import annotations

import asyncio
import socket

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from esm2_service.server.redis_link import RedisLink


@pytest.fixture
async def link(redis_server, redis_client):
    link = RedisLink(redis_server.url_for_db(1), "test-link")
    yield link
    await link.aclose()


def link_connections(redis_client, name: str = "test-link") -> list[dict]:
    return [c for c in redis_client.client_list() if c["name"] == name]


async def test_concurrent_callers_share_one_connection_and_each_gets_its_reply(link, redis_client):
    async def one(index: int):
        await link.execute("SET", f"key:{index}", index)
        return await link.pipeline([("GET", f"key:{index}"), ("INCRBY", f"key:{index}", index)])

    replies = await asyncio.gather(*(one(i) for i in range(500)))
    assert replies == [[str(i).encode(), 2 * i] for i in range(500)]
    assert len(link_connections(redis_client)) == 1
    assert int(redis_client.get("key:499")) == 998


async def test_a_refused_command_fails_only_itself(link, redis_client):
    redis_client.set("text", "not a number")
    with pytest.raises(ResponseError, match="not an integer"):
        await link.execute("INCR", "text")
    replies = await link.pipeline([("SET", "a", 1), ("INCR", "text"), ("GET", "a")])
    assert replies[0] == b"OK" and replies[2] == b"1"
    assert isinstance(replies[1], ResponseError)
    assert await link.execute("PING") == b"PONG"


async def test_a_cancelled_caller_leaves_the_connection_usable(link, redis_client):
    waiting = asyncio.get_running_loop().create_task(
        link.execute("BLPOP", "nothing-here", 0.3)  # its reply comes after the cancellation
    )
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # The late reply (nil) is read and dropped; the next caller gets its own.
    assert await link.execute("ECHO", "mine") == b"mine"
    assert len(link_connections(redis_client)) == 1


async def test_a_redis_that_does_not_answer_times_out_and_the_link_reconnects(
    redis_server, redis_client
):
    link = RedisLink(redis_server.url_for_db(1), "test-link", reply_timeout_s=0.2)
    try:
        with pytest.raises(RedisTimeoutError, match="did not answer within 0.2 s"):
            await link.execute("BLPOP", "nothing-here", 2)
        assert await link.execute("ECHO", "again") == b"again"
    finally:
        await link.aclose()


async def test_a_lost_connection_fails_its_commands_and_the_next_one_reconnects(link, redis_client):
    await link.execute("PING")
    (connection,) = link_connections(redis_client)
    waiting = asyncio.get_running_loop().create_task(link.execute("BLPOP", "nothing-here", 5))
    await asyncio.sleep(0.05)
    redis_client.client_kill_filter(_id=connection["id"])
    with pytest.raises(RedisConnectionError, match="lost the connection to Redis"):
        await waiting
    assert await link.execute("ECHO", "back") == b"back"
    (reconnected,) = link_connections(redis_client)
    assert reconnected["id"] != connection["id"]


async def test_an_unreachable_redis_is_named(tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    link = RedisLink(f"redis://127.0.0.1:{port}/0", "test-link")
    with pytest.raises(RedisConnectionError, match=f"cannot connect to Redis at 127.0.0.1:{port}"):
        await link.execute("PING")
    await link.aclose()
    with pytest.raises(RedisConnectionError, match="closed"):
        await link.execute("PING")


async def test_a_refused_login_is_a_connection_error(redis_server, redis_client):
    user = "esm2-test-link-login"
    redis_client.acl_setuser(user, enabled=True, passwords=["+right"], commands=["+@all"])
    link = RedisLink(f"redis://{user}:wrong@127.0.0.1:{redis_server.port}/1", "test-link")
    try:
        with pytest.raises(RedisConnectionError, match="refused the connection: WRONGPASS"):
            await link.execute("PING")
    finally:
        await link.aclose()
        redis_client.acl_deluser(user)


async def test_the_url_selects_the_database(redis_server, redis_client):
    link = RedisLink(redis_server.url_for_db(1), "test-link")
    await link.execute("SET", "where", "db1")
    await link.aclose()
    assert redis_client.get("where") == b"db1"


async def test_a_script_redis_forgot_is_loaded_again(link, redis_client):
    script = "return tonumber(ARGV[1]) + 1"
    assert await link.evalsha(script, keys=[], args=[1]) == 2
    redis_client.script_flush()
    assert await link.evalsha(script, keys=[], args=[41]) == 42


def test_an_unsupported_url_option_is_refused_at_once():
    with pytest.raises(ValueError, match="not supported here: socket_timeout"):
        RedisLink("redis://localhost:6379/0?socket_timeout=3", "test-link")
