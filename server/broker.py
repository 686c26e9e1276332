"""The frontend's side of the Redis queue: enqueue items, relay their results.

A request becomes one QueueItem entry per item, each on the queue lane of its length. Workers
write the results (see `reply_reader` for the way they travel); `results` yields each
response message as soon as it arrives, through the process's one `ReplyReader`, which
trims what was relayed so Redis holds only what the client has not taken yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

from esm2_service import queue
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.server.errors import BackendUnavailable, DeadlineExceeded, ItemFailed, QueueFull
from esm2_service.server.redis_link import RedisLink
from esm2_service.server.reply_reader import REDIS_ERRORS, ReplyReader
from esm2_service.validation import ValidRequest

# Longer than one blocking read of the news (read_block_ms): a Redis that answers
# nothing for this long fails the requests waiting on it.
REPLY_TIMEOUT_S = 5.0
# A process's connections to Redis, however many requests are in flight: the shared
# link and the news stream's blocking read (both named `NAME-PID`).
REDIS_CONNECTIONS = 2


# Checks the bound and queues a request's items atomically, in one round trip.
# KEYS: the request marker, its cancel key, then the queue lanes. ARGV: max items, marker
# TTL (s), then (lane number from 0, item) pairs. Returns QUEUED, CANCELLED (the frontend
# cancelled it before this ran: nothing queued), else the queue depth that refused it.
_QUEUED, _CANCELLED = -1, -2
_ENQUEUE_SCRIPT = f"""
if redis.call('EXISTS', KEYS[2]) == 1 then return {_CANCELLED} end
local depth = 0
for i = 3, #KEYS do depth = depth + redis.call('XLEN', KEYS[i]) end
local items = (#ARGV - 2) / 2
if depth + items > tonumber(ARGV[1]) then return depth end
redis.call('SET', KEYS[1], items, 'EX', ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('XADD', KEYS[3 + tonumber(ARGV[i])], '*', '{queue.ITEM_FIELD.decode()}', ARGV[i + 1])
end
return {_QUEUED}
"""


async def queue_depths(redis: RedisLink) -> dict[str, int]:
    """Items waiting or being computed, by lane name (workers delete what they acknowledge)."""
    depths = await redis.pipeline([("XLEN", lane) for lane in queue.QUEUE_LANES])
    for depth in depths:
        if isinstance(depth, Exception):
            raise depth
    return dict(zip(queue.LANE_NAMES, depths, strict=True))


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


def connect(url: str, name: str) -> RedisLink:
    """A process's shared Redis link: one connection however many requests are in
    flight, named `NAME-PID` in Redis's CLIENT LIST."""
    return RedisLink(url, f"{name}-{os.getpid()}", reply_timeout_s=REPLY_TIMEOUT_S)


class Broker:
    def __init__(
        self,
        redis: RedisLink,
        settings: BrokerSettings,
        on_item_complete: Callable[[float], None] | None = None,
    ):
        self.redis = redis
        self.settings = settings
        self.on_item_complete = on_item_complete  # called with each item's s since enqueue
        # The news stream's blocking read has a connection of its own.
        block_s = settings.read_block_ms / 1000
        self._listen = RedisLink(redis.url, redis.name, reply_timeout_s=block_s + REPLY_TIMEOUT_S)
        self.reader = ReplyReader(
            redis, self._listen, settings.read_block_ms, cancel_ttl_s=settings.result_ttl_s
        )

    async def aclose(self) -> None:
        """Stops the reply reader and closes its connection (not the shared client's)."""
        await self.reader.aclose()
        await self._listen.aclose()

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
        """The absolute deadline (unix s) of a request whose client allows `timeout_s`
        (None: no deadline of its own); DeadlineExceeded if it has already passed."""
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded("the request's deadline had passed when it arrived")
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
        them: QueueFull when they would take the queue past its bound. When the outcome
        is unknown (cancelled or failed while Redis ran the script), the request is
        cancelled in Redis: whatever was queued is skipped, and nothing it writes stays."""
        lanes_and_items = []
        for item, tokens in zip(items, token_counts, strict=True):
            item.news_stream = self.reader.news_stream
            lanes_and_items += [queue.lane_index(tokens), item.SerializeToString()]
        marker_ttl_s = max(1, int(deadline - time.time())) + self.settings.result_ttl_s
        first = not self.reader.subscribed(request_id)
        self.reader.subscribe(request_id)  # before the items exist, so no news is missed
        depth = None
        try:
            depth = await self.redis.evalsha(
                _ENQUEUE_SCRIPT,
                keys=[
                    queue.request_key(request_id),
                    queue.cancel_key(request_id),
                    *queue.QUEUE_LANES,
                ],
                args=[self.settings.max_queue_items, marker_ttl_s, *lanes_and_items],
            )
        except REDIS_ERRORS as error:
            raise BackendUnavailable(f"the queue (Redis) is unreachable: {error}") from error
        finally:
            if first and depth is None:  # queued or not: make sure nothing of it runs
                self.reader.forget(request_id, cancelled=True)
            elif first and depth != _QUEUED:
                self.reader.unsubscribe(request_id)
        if depth == _CANCELLED:  # only a cancellation of this request sets its cancel key
            raise asyncio.CancelledError
        if depth >= 0:
            raise QueueFull(
                f"the queue holds {depth} of at most {self.settings.max_queue_items} items; "
                f"retry in {self.settings.retry_after_s:g} s",
                self.settings.retry_after_s,
            )

    async def results(
        self, request_id: str, items: int, deadline: float
    ) -> AsyncIterator[list[bytes]]:
        """Yields the request's serialized response messages, those that arrived together
        in one list, until every item is complete."""
        remaining = items
        enqueued = time.monotonic()  # submit() has just queued the items
        async with contextlib.aclosing(self.replies(request_id, deadline)) as replies:
            async for batch in replies:
                for piece in batch:
                    if piece.complete:
                        remaining -= 1
                        if self.on_item_complete is not None:
                            self.on_item_complete(time.monotonic() - enqueued)
                if batch:
                    yield [piece.raw for piece in batch]
                if not remaining:
                    return

    async def replies(self, request_id: str, deadline: float) -> AsyncIterator[list[Piece]]:
        """Batches of the request's new response messages until the caller stops; an
        empty batch when `read_block_ms` passed with nothing new.

        Raises ItemFailed for an item a worker failed. A worker that died mid-item leaves
        part of it written; the worker that retries the item writes it again. Each piece
        is yielded once. Relayed entries are trimmed from Redis when the caller asks for
        the next batch (when it is done, `finish` drops the whole stream).
        """
        subscription = self.reader.subscribe(request_id)
        relayed: set[bytes] = set()
        try:
            while True:
                left_s = deadline - time.time()
                if left_s <= 0:
                    raise DeadlineExceeded(
                        "the request's deadline passed before its results were ready"
                    )
                wait_s = min(self.settings.read_block_ms / 1000, left_s)
                entries = await subscription.next(wait_s)
                yield list(_new_pieces(entries, relayed))
        finally:
            self.reader.unsubscribe(request_id)

    async def cancel(self, request_id: str) -> None:
        """Tells workers to skip the request's items, and drops its results."""
        await self.reader.forget(request_id, cancelled=True)

    async def finish(self, request_id: str) -> None:
        """Drops the request's reply stream and marker."""
        await self.reader.forget(request_id, cancelled=False)


class Piece:
    """One response message from a reply stream, as the worker serialized it."""

    __slots__ = ("raw", "complete", "_message")

    def __init__(self, raw: bytes, complete: bool, message: pb.EncodeResponse | None = None):
        self.raw = raw
        self.complete = complete  # an item's completion, not a chunk
        self._message = message

    @property
    def message(self) -> pb.EncodeResponse:
        """Parsed (EncodeResponse and PredictResponse share one layout: either parses both)."""
        if self._message is None:
            self._message = pb.EncodeResponse.FromString(self.raw)
        return self._message


def _new_pieces(entries, relayed: set) -> Iterator[Piece]:
    for _, fields in entries:
        if queue.ERROR_FIELD in fields:
            error = qpb.ItemError.FromString(fields[queue.ERROR_FIELD])
            raise ItemFailed(error.sequence_index, error.code, error.message)
        piece = _piece(fields)
        key = fields.get(queue.PIECE_FIELD) or _piece_key(piece.message)
        if key not in relayed:
            relayed.add(key)
            yield piece


def _piece(fields) -> Piece:
    raw = fields[queue.CHUNK_FIELD]
    key = fields.get(queue.PIECE_FIELD)
    if key is not None:
        return Piece(raw, complete=queue.is_completion(key))
    message = pb.EncodeResponse.FromString(raw)  # an older worker's entry: no piece field
    return Piece(raw, message.HasField("complete"), message)


def _piece_key(message: pb.EncodeResponse) -> bytes:
    """queue.PIECE_FIELD's value for `message`."""
    if message.HasField("complete"):
        return queue.completion_piece(message.sequence_index)
    chunk = message.chunk
    return queue.chunk_piece(message.sequence_index, chunk.kind, chunk.layer, chunk.offset)


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
