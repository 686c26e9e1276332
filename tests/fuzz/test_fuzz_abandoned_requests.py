"""Requests abandoned at random moments leave nothing behind in Redis.

Clients cancel at a random moment, or set a deadline that passes before the request
arrives, while it is queued, or while its results stream. Whatever the moment, once the
workers are idle Redis holds no reply stream and no request marker of them: nothing
waits for a TTL to expire. (Issue 24: a cancellation during the enqueue's round trip
left its results in Redis for 10 minutes; an expired deadline was queued and computed.)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import grpc
import grpc.aio
import pytest
import redis
from queue_helpers import pending_count, queue_length

from esm2_service import queue
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc

SEED = 24
CALLS = 240
IN_FLIGHT = 24
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def abandoned_call(rng: random.Random) -> tuple[pb.EncodeRequest, float | None, float | None]:
    """A request with large results (they go through reply streams, not inline), and
    either a deadline (s) or a moment (s) at which its client cancels it."""
    sequences = [
        "".join(rng.choices(AMINO_ACIDS, k=rng.randint(150, 400))) for _ in range(rng.randint(1, 8))
    ]
    params = pb.EncodeParams(include=[pb.INCLUDE_PER_TOKEN, pb.INCLUDE_LOGITS])
    request = pb.EncodeRequest(items=[pb.Item(sequence=s) for s in sequences], params=params)
    if rng.random() < 0.5:
        return request, rng.choice([1e-4, 1e-3, rng.uniform(0.001, 0.2)]), None
    return request, None, rng.uniform(0.0, 0.2)


async def run_call(stub, request, timeout_s, cancel_after_s) -> str:
    call = stub.Encode(request, timeout=timeout_s if timeout_s else 60)
    if cancel_after_s is not None:
        asyncio.get_running_loop().call_later(cancel_after_s, call.cancel)
    try:
        async for _ in call:
            pass
    except asyncio.CancelledError:
        return "CANCELLED"
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def run_calls(target: str, calls: list) -> Counter:
    limit = asyncio.Semaphore(IN_FLIGHT)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)

        async def one(call):
            async with limit:
                return await run_call(stub, *call)

        return Counter(await asyncio.gather(*(one(call) for call in calls)))


def leftovers(client: redis.Redis) -> list[bytes]:
    return [
        *client.scan_iter(match=queue.reply_stream("*")),
        *client.scan_iter(match=queue.request_key("*")),
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_requests_abandoned_at_any_moment_leave_nothing_in_redis(service, redis_server):
    rng = random.Random(SEED)
    calls = [abandoned_call(rng) for _ in range(CALLS)]
    outcomes = asyncio.run(run_calls(service.target, calls))
    assert set(outcomes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, outcomes
    assert outcomes["CANCELLED"] and outcomes["DEADLINE_EXCEEDED"], outcomes

    client = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 60
    while queue_length(client) or pending_count(client):
        assert time.monotonic() < deadline, "the workers never drained the queue"
        time.sleep(0.1)
    time.sleep(3)  # the frontends' cleanups are asynchronous: a few seconds at most
    assert leftovers(client) == [], outcomes
