"""Hundreds of concurrent streams on one frontend, over a bounded number of Redis connections."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import redis
from queue_helpers import ConnectionCounter, sequence_number

from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc
from esm2_service.server.broker import REDIS_CONNECTIONS

STREAMS = 512
HIDDEN = 32  # the tiny checkpoint's embedding width


async def encode_all(target: str, count: int) -> list[list[pb.EncodeResponse]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)

        async def one(index: int) -> list[pb.EncodeResponse]:
            request = pb.EncodeRequest(items=[pb.Item(sequence=sequence_number(index))])
            return [message async for message in stub.Encode(request, timeout=240)]

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_512_concurrent_streams_complete_over_a_bounded_pool(service, redis_server):
    name = f"esm2-server-{service.frontend.pid}"
    with ConnectionCounter(redis_server.url, name) as connections:
        replies = asyncio.run(encode_all(service.target, STREAMS))
    assert len(replies) == STREAMS
    for messages in replies:
        kinds = [m.WhichOneof("payload") for m in messages]
        assert kinds == ["chunk", "complete"], kinds
        chunk = messages[0].chunk
        assert (chunk.kind, chunk.layer, list(chunk.tensor.shape)) == (pb.INCLUDE_MEAN, 6, [HIDDEN])
        assert np.isfinite(np.frombuffer(chunk.tensor.data, "<f4")).all()
    # The shared link and the reply reader's own connection, whatever the load.
    assert 1 <= connections.peak <= REDIS_CONNECTIONS <= 16


def test_no_reply_stream_outlives_its_request(service, redis_server):
    asyncio.run(encode_all(service.target, 64))
    with redis.Redis.from_url(redis_server.url) as client:
        deadline = time.monotonic() + 5
        while client.keys("esm2:v1:reply:*") or client.keys("esm2:v1:request:*"):
            assert time.monotonic() < deadline, client.keys("esm2:v1:re*")
            time.sleep(0.05)
