"""The queue loop's own connection (worker/direct_connection.py) against a real Redis."""

from __future__ import annotations

import pytest
import redis

from esm2_service.worker.direct_connection import DirectConnection


def test_a_transaction_returns_each_commands_reply(redis_client):
    direct = DirectConnection(redis_client)
    replies = direct.transaction(
        [("SET", "k", b"v"), ("EXISTS", "k", "missing"), ("XADD", "s", "*", "f", 1)]
    )
    assert replies[:2] == [b"OK", 1] and redis_client.xlen("s") == 1
    direct.close()


def test_a_refused_command_raises_and_the_connection_stays_in_step(redis_client):
    """Redis runs the others (a transaction has no rollback); every reply is read, so
    the next command gets its own."""
    direct = DirectConnection(redis_client)
    redis_client.xadd("stream", {"f": 1})
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        direct.transaction([("INCR", "counter"), ("INCR", "stream"), ("INCR", "counter")])
    assert redis_client.get("counter") == b"2"
    with pytest.raises(redis.ResponseError, match="unknown command"):
        direct.transaction([("INCR", "counter"), ("NOSUCHCOMMAND",)])  # refused when queued
    assert redis_client.get("counter") == b"2"  # EXECABORT: nothing ran
    assert direct.execute("PING") in (b"PONG", True)
    direct.close()


def test_a_lost_connection_fails_one_transaction_and_the_next_reconnects(redis_client):
    """As redis-py's own commands (the loop logs the error and steps again)."""
    direct = DirectConnection(redis_client)
    direct.execute("PING")
    redis_client.client_kill_filter(_type="normal", skipme=True)  # drops the direct one
    with pytest.raises(redis.ConnectionError):
        direct.transaction([("INCR", "counter")])
    assert direct.transaction([("INCR", "counter")]) == [1]
    direct.close()


def test_a_command_rides_along_with_the_next_round_trip_whatever_its_outcome(redis_client):
    direct = DirectConnection(redis_client)
    assert direct.rider_reply() is None  # nothing rode along
    direct.ride_along("INCR", "rides")
    assert direct.transaction([("SET", "k", b"v")]) == [b"OK"]
    assert direct.rider_reply() == 1 and direct.rider_reply() is None  # taken once

    redis_client.xadd("stream", {"f": 1})
    direct.ride_along("INCR", "rides")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        direct.execute("INCR", "stream")
    assert direct.rider_reply() == 2  # read past the refusal: the connection is in step
    direct.ride_along("INCR", "stream")
    assert direct.execute("GET", "k") == b"v"
    assert isinstance(direct.rider_reply(), redis.ResponseError)

    direct.ride_along("INCR", "rides")
    assert direct.rider_reply() is None  # taken back before any round trip: never sent
    assert direct.execute("GET", "rides") == b"2"
    direct.close()


def test_the_workers_own_client_reconnects_and_sends_again(redis_server, redis_client):
    """So a dropped connection costs a batch's write a retry, not --claim-idle-s."""
    from esm2_service.worker.main import redis_client as workers_client
    from esm2_service.worker.settings import WorkerSettings

    settings = WorkerSettings(redis_url=redis_server.url_for_db(1), worker_id="w")
    direct = DirectConnection(workers_client(settings))
    direct.execute("PING")
    redis_client.client_kill_filter(_type="normal", skipme=True)  # drops the direct one
    assert direct.transaction([("INCR", "counter")]) == [1]
    direct.close()
