"""Writing results to the per-request reply streams, paced to their readers.

A reply stream only shrinks as the frontend relays it to the client (it deletes
what it has sent). When a stream holds more than `max_reply_chunks` chunks, the
writer waits for the reader to catch up, so a slow client cannot make Redis
hold an unbounded amount of results. A reader that falls silent for
`reader_stall_s` (or whose request was cancelled or expired) has the rest of its
item dropped and gets an error instead of a completion.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis

from esm2_service import queue
from esm2_service.alphabet import VOCAB_TOKENS, split_tokens
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import chunk_messages
from esm2_service.worker.work import TensorOutput

log = logging.getLogger(__name__)

_POLL_S = 0.005
# Outputs this large are written as soon as they exist; smaller ones go out with
# the batch's completions and acknowledgements in one round trip.
WRITE_AT_ONCE_BYTES = 1 << 20
MAX_BUFFERED_BYTES = 16 << 20


# A queue entry: (lane stream, entry id). Ids are unique per stream only.
EntryRef = tuple[str, bytes]


def item_key(item: qpb.QueueItem) -> tuple[str, int]:
    return item.request_id, item.sequence_index


def group_by_stream(refs: Sequence[EntryRef]) -> dict[str, list[bytes]]:
    grouped: dict[str, list[bytes]] = {}
    for stream, entry_id in refs:
        grouped.setdefault(stream, []).append(entry_id)
    return grouped


class ReplyWriter:
    def __init__(
        self,
        client: redis.Redis,
        model: pb.ModelInfo,
        *,
        result_ttl_s: int,
        max_reply_chunks: int,
        reader_stall_s: float,
    ):
        self.redis = client
        self.model = model
        self.result_ttl_s = result_ttl_s
        self.max_reply_chunks = max_reply_chunks
        self.reader_stall_s = reader_stall_s
        # Items whose reader went away: (request_id, index) -> (code, message).
        self.abandoned: dict[tuple[str, int], tuple[str, str]] = {}
        self._buffer: list[tuple[str, dict]] = []  # (reply stream, entry fields)
        self._buffered_bytes = 0

    def emit(self, item: qpb.QueueItem, output: TensorOutput) -> None:
        """Writes one output tensor of `item`, chunked. Small outputs wait in a buffer
        for the batch's single final write (`flush`); large ones are written at once,
        then the writer waits while the item's reader lags."""
        if item_key(item) in self.abandoned:
            return
        stream = queue.reply_stream(item.request_id)
        entries = [
            (stream, {queue.CHUNK_FIELD: message.SerializeToString()})
            for message in (
                pb.ResultChunk(sequence_index=item.sequence_index, chunk=chunk)
                for chunk in chunk_messages(
                    output.kind, output.layer, output.shape, item.dtype, output.data, output.offset
                )
            )
        ]
        if len(output.data) < WRITE_AT_ONCE_BYTES:
            self._buffer += entries
            self._buffered_bytes += len(output.data)
            if self._buffered_bytes > MAX_BUFFERED_BYTES:
                self.flush()
            return
        self.flush()
        pipe = self.redis.pipeline(transaction=False)
        for _, fields in entries:
            pipe.xadd(stream, fields)
        pipe.expire(stream, self.result_ttl_s)
        pipe.xlen(stream)
        if pipe.execute()[-1] > self.max_reply_chunks:
            self._wait_for_reader(item, stream)

    def flush(self, acks: Sequence[EntryRef] = ()) -> None:
        """Writes everything buffered, then acknowledges (and deletes) the queue entries
        `acks`, in one transaction: an entry is never acknowledged without its results."""
        if not self._buffer and not acks:
            return
        pipe = self.redis.pipeline(transaction=True)
        for stream, fields in self._buffer:
            pipe.xadd(stream, fields)
        for stream in {stream for stream, _ in self._buffer}:
            pipe.expire(stream, self.result_ttl_s)
        for lane, entry_ids in group_by_stream(acks).items():
            pipe.xack(lane, queue.WORKER_GROUP, *entry_ids)
            pipe.xdel(lane, *entry_ids)  # the lanes' lengths are the backlog
        pipe.execute()
        self.discard()

    def discard(self) -> None:
        """Drops buffered writes (their batch failed and will run again)."""
        self._buffer = []
        self._buffered_bytes = 0

    def _wait_for_reader(self, item: qpb.QueueItem, stream: str) -> None:
        give_up = time.time() + self.reader_stall_s
        if item.deadline_unix_s:
            give_up = min(give_up, item.deadline_unix_s)
        while self.redis.xlen(stream) > self.max_reply_chunks:
            if self.redis.exists(queue.cancel_key(item.request_id)):
                self.abandoned[item_key(item)] = ("CANCELLED", "the request was cancelled")
                return
            if time.time() > give_up:
                reason = f"the client read no results for {self.reader_stall_s:g} s"
                log.warning("dropping item %s: %s", item_key(item), reason)
                self.abandoned[item_key(item)] = ("RESOURCE_EXHAUSTED", reason)
                return
            time.sleep(_POLL_S)

    def complete(self, item: qpb.QueueItem, predict: bool) -> None:
        """Buffers the item's completion, or the reason it was abandoned."""
        abandoned = self.abandoned.pop(item_key(item), None)
        if abandoned:
            self.error(item, *abandoned)
            return
        done = pb.ItemComplete(vocab_tokens=VOCAB_TOKENS, model=self.model)
        if predict:
            done.sequence_tokens.extend(split_tokens(item.sequence))
        message = pb.ResultChunk(sequence_index=item.sequence_index, complete=done)
        self._buffer.append(
            (queue.reply_stream(item.request_id), {queue.CHUNK_FIELD: message.SerializeToString()})
        )

    def error(self, item: qpb.QueueItem, code: str, message: str) -> None:
        """Buffers an error for the item, in place of its results."""
        error = qpb.ItemError(sequence_index=item.sequence_index, code=code, message=message)
        self._buffer.append(
            (queue.reply_stream(item.request_id), {queue.ERROR_FIELD: error.SerializeToString()})
        )
