"""The frontend's broker against a real Redis: relaying, deduplication, lost state."""

from __future__ import annotations

import asyncio
import time

import pytest

from esm2_service import queue
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.server.broker import Broker, BrokerSettings, new_request_id
from esm2_service.server.errors import BackendUnavailable, DeadlineExceeded, ItemFailed
from esm2_service.server.redis_link import RedisLink
from esm2_service.validation import ValidRequest


@pytest.fixture
async def broker(redis_server, redis_client):
    client = RedisLink(redis_server.url_for_db(1), "test")
    broker = Broker(client, BrokerSettings(read_block_ms=100))
    yield broker
    await broker.aclose()
    await client.aclose()


def chunk(index: int, offset: int) -> bytes:
    piece = pb.TensorChunk(
        kind=pb.INCLUDE_MEAN, layer=6, offset=offset, tensor=pb.Tensor(shape=[2])
    )
    return pb.EncodeResponse(sequence_index=index, chunk=piece).SerializeToString()


def complete(index: int) -> bytes:
    return pb.EncodeResponse(sequence_index=index, complete=pb.ItemComplete()).SerializeToString()


async def collect(broker, request_id, items, deadline_s=5.0):
    return [
        pb.EncodeResponse.FromString(m)
        async for batch in broker.results(request_id, items, time.time() + deadline_s)
        for m in batch
    ]


async def test_submit_queues_one_entry_per_item_with_the_deadline(broker, redis_client):
    request = ValidRequest(
        task=qpb.TASK_ENCODE,
        sequences=("MKV", "AC", "A" * 300, "A" * 1025),
        repr_layers=(6,),
        include=(1,),
    )
    request_id = new_request_id()
    deadline = await broker.submit(request, request_id, timeout_s=30)
    queued = [
        [(lane, qpb.QueueItem.FromString(fields[queue.ITEM_FIELD])) for _, fields in entries]
        for lane, entries in enumerate(map(redis_client.xrange, queue.QUEUE_LANES))
    ]
    # Each item on the lane of its length, in order within a lane.
    assert [[(lane, i.sequence_index, len(i.sequence)) for lane, i in q] for q in queued] == [
        [(0, 0, 3), (0, 1, 2)],
        [],
        [(2, 2, 300)],
        [],
        [(4, 3, 1025)],
    ]
    items = [item for entries in queued for _, item in entries]
    assert {item.request_id for item in items} == {request_id}
    assert abs(items[0].deadline_unix_s - deadline) < 1e-6 and 29 < deadline - time.time() <= 30
    assert redis_client.exists(queue.request_key(request_id))


async def test_pieces_written_twice_by_a_retried_item_are_relayed_once(broker, redis_client):
    request_id = "dup"
    redis_client.set(queue.request_key(request_id), 1)
    stream = queue.reply_stream(request_id)
    for body in (
        chunk(0, 0),
        chunk(0, 0),
        chunk(0, 8),
        complete(0),
        complete(0),
        chunk(1, 0),
        complete(1),
    ):
        redis_client.xadd(stream, {queue.CHUNK_FIELD: body})
    relayed = await collect(broker, request_id, items=2)
    assert [(m.sequence_index, m.WhichOneof("payload"), m.chunk.offset) for m in relayed] == [
        (0, "chunk", 0),
        (0, "chunk", 8),
        (0, "complete", 0),
        (1, "chunk", 0),
        (1, "complete", 0),
    ]
    await broker.finish(request_id)
    assert not redis_client.exists(stream) and not redis_client.exists(
        queue.request_key(request_id)
    )


async def test_a_worker_error_fails_the_request_with_its_code(broker, redis_client):
    redis_client.set(queue.request_key("bad"), 1)
    error = qpb.ItemError(sequence_index=3, code="RESOURCE_EXHAUSTED", message="client too slow")
    redis_client.xadd(queue.reply_stream("bad"), {queue.ERROR_FIELD: error.SerializeToString()})
    with pytest.raises(ItemFailed, match=r"items\[3\]: client too slow") as raised:
        await collect(broker, "bad", items=4)
    assert raised.value.code.name == "RESOURCE_EXHAUSTED"


async def test_a_request_whose_state_redis_lost_fails_instead_of_hanging(broker, redis_client):
    with pytest.raises(BackendUnavailable, match="lost this request"):
        await collect(broker, "forgotten", items=1)


async def test_the_deadline_bounds_the_wait(broker, redis_client):
    redis_client.set(queue.request_key("slow"), 1)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await collect(broker, "slow", items=1, deadline_s=0.3)
    assert time.monotonic() - started < 1.0


async def test_closing_the_broker_closes_the_reply_readers_connection(redis_server, redis_client):
    client = RedisLink(redis_server.url_for_db(1), "test")
    broker = Broker(client, BrokerSettings(read_block_ms=5000))
    broker.reader.subscribe("waiting")
    await asyncio.sleep(0.2)  # the reader's blocking read is in flight

    def reading() -> list:
        return [
            c for c in redis_client.client_list() if c["name"] == "test" and c["cmd"] == "xread"
        ]

    assert len(reading()) == 1
    await broker.aclose()
    await asyncio.sleep(0.1)  # Redis notices the closed connection
    assert not reading()
    await client.aclose()


def queued_items(redis_client) -> int:
    return sum(redis_client.xlen(lane) for lane in queue.QUEUE_LANES)


ONE_ITEM = ValidRequest(task=qpb.TASK_ENCODE, sequences=("MKV",), repr_layers=(6,), include=(1,))


@pytest.mark.parametrize("timeout_s", [0.0, -0.5])
async def test_a_request_whose_deadline_passed_never_reaches_the_queue(
    broker, redis_client, timeout_s
):
    # grpc.aio's time_remaining() is 0 once the client's deadline has passed.
    with pytest.raises(DeadlineExceeded, match="had passed when it arrived"):
        await broker.submit(ONE_ITEM, new_request_id(), timeout_s=timeout_s)
    assert queued_items(redis_client) == 0
    assert not broker.reader._subscriptions


class ReplyHoldingProxy:
    """A TCP proxy in front of Redis that can hold Redis's replies back (commands still
    reach Redis): the window between a command running and its caller reading the reply."""

    def __init__(self, redis_port: int):
        self.redis_port = redis_port
        self.replies_flow = asyncio.Event()
        self.replies_flow.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _connect(self, client_reader, client_writer) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        await asyncio.gather(
            self._pipe(client_reader, redis_writer, None),
            self._pipe(redis_reader, client_writer, self.replies_flow),
            return_exceptions=True,
        )

    async def _pipe(self, reader, writer, gate: asyncio.Event | None) -> None:
        try:
            while data := await reader.read(65536):
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def aclose(self) -> None:
        self.replies_flow.set()
        self.server.close()


async def test_a_cancellation_while_redis_runs_the_enqueue_cancels_the_queued_request(
    redis_server, redis_client
):
    """The client leaves after Redis queued the items but before the frontend read the
    reply: the request must still be cancelled in Redis (workers skip it, and its
    marker goes, so nothing a worker writes for it is kept)."""
    proxy = ReplyHoldingProxy(redis_server.port)
    port = await proxy.start()
    client = RedisLink(
        redis_server.url_for_db(1).replace(f":{redis_server.port}/", f":{port}/"), "test"
    )
    broker = Broker(client, BrokerSettings(read_block_ms=100))
    try:
        await broker.submit(ONE_ITEM, new_request_id(), timeout_s=30)  # connected, warm
        redis_client.flushdb()
        request_id = new_request_id()
        proxy.replies_flow.clear()
        submitting = asyncio.get_running_loop().create_task(
            broker.submit(ONE_ITEM, request_id, timeout_s=30)
        )
        while not queued_items(redis_client):
            await asyncio.sleep(0.005)
        submitting.cancel()  # Redis has queued the item; its reply is held
        with pytest.raises(asyncio.CancelledError):
            await submitting
        proxy.replies_flow.set()
        for _ in range(100):
            if redis_client.exists(queue.cancel_key(request_id)):
                break
            await asyncio.sleep(0.02)
        assert redis_client.exists(queue.cancel_key(request_id))
        assert not redis_client.exists(queue.request_key(request_id))
        assert not broker.reader.subscribed(request_id)
    finally:
        await broker.aclose()
        await client.aclose()
        await proxy.aclose()


async def test_an_enqueue_that_arrives_after_its_cancellation_queues_nothing(broker, redis_client):
    # The cancellation's round trip can reach Redis before the enqueue it follows.
    request_id = new_request_id()
    redis_client.set(queue.cancel_key(request_id), 1)
    with pytest.raises(asyncio.CancelledError):
        await broker.submit(ONE_ITEM, request_id, timeout_s=30)
    assert queued_items(redis_client) == 0
    assert not redis_client.exists(queue.request_key(request_id))
    assert not broker.reader.subscribed(request_id)


async def test_a_command_redis_refuses_fails_nobody_else_and_the_drop_is_retried(
    redis_server, redis_client
):
    """Redis refuses the cancel key's SET (as it would under maxmemory): the round trip
    still relays another request's results, and the cancelled request's reply stream
    and marker still go."""
    user = "esm2-test-no-set"
    redis_client.acl_setuser(
        user, enabled=True, nopass=True, keys="*", channels="*", commands=["+@all", "-set"]
    )
    url = f"redis://{user}:any@127.0.0.1:{redis_server.port}/1"
    client = RedisLink(url, "test")
    broker = Broker(client, BrokerSettings(read_block_ms=100))
    try:
        for request_id in ("leaving", "staying"):
            redis_client.set(queue.request_key(request_id), 1)
        redis_client.xadd(queue.reply_stream("leaving"), {queue.CHUNK_FIELD: chunk(0, 0)})
        redis_client.xadd(queue.reply_stream("staying"), {queue.CHUNK_FIELD: complete(0)})
        staying = asyncio.get_running_loop().create_task(collect(broker, "staying", items=1))
        await broker.cancel("leaving")  # its SET is refused in the same round trip
        assert [m.WhichOneof("payload") for m in await staying] == ["complete"]
        assert not redis_client.exists(queue.reply_stream("leaving"))
        assert not redis_client.exists(queue.request_key("leaving"))
        assert broker.reader._forget_attempts["leaving"] >= 1  # tried again later
        assert not [task for task in broker.reader._tasks if task.done()]  # both loops live
    finally:
        await broker.aclose()
        await client.aclose()
        redis_client.acl_deluser(user)
