"""The frontend's side of the Redis queue: enqueue items, relay their results.

A request becomes one QueueItem entry per item, each on the queue lane of its length. Workers
write the results to the request's own reply stream; `results` reads that stream
with blocking reads and yields each response message as soon as it arrives, deleting
what it has relayed so Redis holds only what the client has not taken yet.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from esm2_service import queue
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.server.errors import BackendUnavailable, DeadlineExceeded, ItemFailed, QueueFull
from esm2_service.validation import ValidRequest

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


# Checks the bound and queues a request's items atomically, in one round trip.
# KEYS: the request marker, then the queue lanes. ARGV: max items, marker TTL (s), then
# (lane number from 0, item) pairs. Returns -1 when queued, else the queue depth that refused it.
_ENQUEUE_SCRIPT = f"""
local depth = 0
for i = 2, #KEYS do depth = depth + redis.call('XLEN', KEYS[i]) end
local items = (#ARGV - 2) / 2
if depth + items > tonumber(ARGV[1]) then return depth end
redis.call('SET', KEYS[1], items, 'EX', ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('XADD', KEYS[2 + tonumber(ARGV[i])], '*', '{queue.ITEM_FIELD.decode()}', ARGV[i + 1])
end
return -1
"""


async def queue_depths(redis: aioredis.Redis) -> dict[str, int]:
    """Items waiting or being computed, by lane name (workers delete what they acknowledge)."""
    async with redis.pipeline(transaction=False) as pipe:
        for lane in queue.QUEUE_LANES:
            pipe.xlen(lane)
        return dict(zip(queue.LANE_NAMES, await pipe.execute(), strict=True))


@dataclass(frozen=True)
class BrokerSettings:
    max_queue_items: int = 1024  # items waiting or in progress before RESOURCE_EXHAUSTED
    request_timeout_s: float = 600.0  # longest a request waits when its client set no deadline
    result_ttl_s: int = 600  # reply streams expire this long after their last write
    read_block_ms: int = 1000  # one blocking read on a reply stream
    retry_after_s: float = 1.0  # the retry hint sent with RESOURCE_EXHAUSTED


def new_request_id() -> str:
    """A request's id: in its Redis keys, its log lines and the client's trailers."""
    return uuid.uuid4().hex


class Broker:
    def __init__(
        self,
        redis: aioredis.Redis,
        settings: BrokerSettings,
        on_item_complete: Callable[[float], None] | None = None,
    ):
        self.redis = redis
        self.settings = settings
        self.on_item_complete = on_item_complete  # called with each item's s since enqueue
        self._enqueue = redis.register_script(_ENQUEUE_SCRIPT)

    async def submit(
        self, request: ValidRequest, request_id: str, timeout_s: float | None
    ) -> float:
        """Queues every item of `request` under `request_id` (see `new_request_id`);
        returns its absolute deadline (unix s)."""
        now = time.time()
        deadline = self.deadline(timeout_s, now)
        items = [
            _queue_item(request, request_id, index, request.sequences[index], deadline, now)
            for index in range(len(request.sequences))
        ]
        await self.enqueue(request_id, items, request.token_counts, deadline)
        return deadline

    def deadline(self, timeout_s: float | None, now: float | None = None) -> float:
        """The absolute deadline (unix s) of a request whose client allows `timeout_s`."""
        limit = self.settings.request_timeout_s
        return (now or time.time()) + min(timeout_s or limit, limit)

    async def enqueue(
        self,
        request_id: str,
        items: list[qpb.QueueItem],
        token_counts: Sequence[int],
        deadline: float,
    ) -> None:
        """Queues `items` (each on the lane of its token count) atomically, or none of
        them: QueueFull when they would take the queue past its bound."""
        lanes_and_items = []
        for item, tokens in zip(items, token_counts, strict=True):
            lanes_and_items += [queue.lane_index(tokens), item.SerializeToString()]
        marker_ttl_s = max(1, int(deadline - time.time())) + self.settings.result_ttl_s
        try:
            depth = await self._enqueue(
                keys=[queue.request_key(request_id), *queue.QUEUE_LANES],
                args=[self.settings.max_queue_items, marker_ttl_s, *lanes_and_items],
            )
        except REDIS_ERRORS as error:
            raise BackendUnavailable(f"the queue (Redis) is unreachable: {error}") from error
        if depth >= 0:
            raise QueueFull(
                f"the queue holds {depth} of at most {self.settings.max_queue_items} items; "
                f"retry in {self.settings.retry_after_s:g} s",
                self.settings.retry_after_s,
            )

    async def results(self, request_id: str, items: int, deadline: float) -> AsyncIterator[bytes]:
        """Yields the request's serialized response messages until every item is complete."""
        remaining = items
        enqueued = time.monotonic()  # submit() has just queued the items
        async with contextlib.aclosing(self.replies(request_id, deadline)) as replies:
            async for batch in replies:
                for message, serialized in batch:
                    if message.HasField("complete"):
                        remaining -= 1
                        if self.on_item_complete is not None:
                            self.on_item_complete(time.monotonic() - enqueued)
                    yield serialized
                if not remaining:
                    return

    async def replies(
        self, request_id: str, deadline: float
    ) -> AsyncIterator[list[tuple[pb.EncodeResponse, bytes]]]:
        """Batches of the request's new response messages, parsed and as sent, until the
        caller stops; an empty batch when a blocking read found nothing.

        Raises ItemFailed for an item a worker failed. A worker that died mid-item leaves
        part of it written; the worker that retries the item writes it again. Each piece
        is yielded once. Relayed entries are deleted from Redis when the caller asks for
        the next batch (when it is done, `finish` drops the whole stream).
        """
        stream = queue.reply_stream(request_id)
        last_id = "0-0"
        relayed: set[tuple] = set()
        while True:
            entries = await self._read(stream, last_id, deadline)
            if not entries:
                await self._check_still_queued(request_id)
                yield []
                continue
            last_id = entries[-1][0]
            yield list(_new_pieces(entries, relayed))
            await self._forget(stream, [entry_id for entry_id, _ in entries])

    async def _read(self, stream: str, last_id, deadline: float):
        left_s = deadline - time.time()
        if left_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before its results were ready")
        block_ms = max(1, min(self.settings.read_block_ms, int(left_s * 1000)))
        try:
            # A few chunks per read bounds what the frontend holds per stream (~4 MiB each).
            reply = await self.redis.xread({stream: last_id}, count=8, block=block_ms)
        except REDIS_ERRORS as error:
            raise BackendUnavailable(
                f"lost the queue (Redis) while waiting for results: {error}"
            ) from error
        return reply[0][1] if reply else []

    async def _check_still_queued(self, request_id: str) -> None:
        try:
            exists = await self.redis.exists(queue.request_key(request_id))
        except REDIS_ERRORS as error:
            raise BackendUnavailable(f"lost the queue (Redis): {error}") from error
        if not exists:
            raise BackendUnavailable(
                "the queue lost this request (Redis restarted or evicted it); retry the request"
            )

    async def _forget(self, stream: str, entry_ids) -> None:
        with contextlib.suppress(*REDIS_ERRORS):  # the stream expires on its own
            await self.redis.xdel(stream, *entry_ids)

    async def cancel(self, request_id: str) -> None:
        """Tells workers to skip the request's items, and drops its results."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(queue.cancel_key(request_id), 1, ex=self.settings.result_ttl_s)
                pipe.delete(queue.reply_stream(request_id), queue.request_key(request_id))
                await pipe.execute()
        except REDIS_ERRORS:
            pass  # workers also skip items whose deadline passed

    async def finish(self, request_id: str) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self.redis.delete(queue.reply_stream(request_id), queue.request_key(request_id))


def _new_pieces(entries, relayed: set[tuple]) -> Iterator[tuple[pb.EncodeResponse, bytes]]:
    for _, fields in entries:
        if queue.ERROR_FIELD in fields:
            error = qpb.ItemError.FromString(fields[queue.ERROR_FIELD])
            raise ItemFailed(error.sequence_index, error.code, error.message)
        # EncodeResponse and PredictResponse share one layout: either parses both.
        message = pb.EncodeResponse.FromString(fields[queue.CHUNK_FIELD])
        key = _piece_key(message)
        if key not in relayed:
            relayed.add(key)
            yield message, fields[queue.CHUNK_FIELD]


def _piece_key(chunk: pb.EncodeResponse) -> tuple:
    if chunk.HasField("complete"):
        return (chunk.sequence_index,)
    piece = chunk.chunk
    return (chunk.sequence_index, piece.kind, piece.layer, piece.offset)


def _queue_item(request: ValidRequest, request_id, index, sequence, deadline, now) -> qpb.QueueItem:
    return qpb.QueueItem(
        request_id=request_id,
        sequence_index=index,
        task=request.task,
        sequence=sequence,
        repr_layers=request.repr_layers,
        include=request.include,
        dtype=request.dtype,
        deadline_unix_s=deadline,
        enqueued_unix_s=now,
    )
