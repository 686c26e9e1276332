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

import redis

from esm2_service import queue
from esm2_service.alphabet import VOCAB_TOKENS, split_tokens
from esm2_service.esm2.internal.v1 import queue_pb2 as qpb
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.tensors import chunk_messages
from esm2_service.worker.work import TensorOutput

log = logging.getLogger(__name__)

_POLL_S = 0.005


def item_key(item: qpb.QueueItem) -> tuple[str, int]:
    return item.request_id, item.sequence_index


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

    def emit(self, item: qpb.QueueItem, output: TensorOutput) -> None:
        """Writes one output tensor of `item`, chunked, then waits while its reader lags."""
        if item_key(item) in self.abandoned:
            return
        stream = queue.reply_stream(item.request_id)
        pipe = self.redis.pipeline(transaction=False)
        for chunk in chunk_messages(
            output.kind, output.layer, output.shape, item.dtype, output.data, output.offset
        ):
            message = pb.ResultChunk(sequence_index=item.sequence_index, chunk=chunk)
            pipe.xadd(stream, {queue.CHUNK_FIELD: message.SerializeToString()})
        pipe.expire(stream, self.result_ttl_s)
        pipe.xlen(stream)
        backlog = pipe.execute()[-1]
        if backlog > self.max_reply_chunks:
            self._wait_for_reader(item, stream)

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
        """Marks the item done, or reports why it was abandoned."""
        abandoned = self.abandoned.pop(item_key(item), None)
        if abandoned:
            self.error(item, *abandoned)
            return
        done = pb.ItemComplete(vocab_tokens=VOCAB_TOKENS, model=self.model)
        if predict:
            done.sequence_tokens.extend(split_tokens(item.sequence))
        message = pb.ResultChunk(sequence_index=item.sequence_index, complete=done)
        self._write(item.request_id, {queue.CHUNK_FIELD: message.SerializeToString()})

    def error(self, item: qpb.QueueItem, code: str, message: str) -> None:
        error = qpb.ItemError(sequence_index=item.sequence_index, code=code, message=message)
        self._write(item.request_id, {queue.ERROR_FIELD: error.SerializeToString()})

    def _write(self, request_id: str, fields) -> None:
        stream = queue.reply_stream(request_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(stream, fields)
        pipe.expire(stream, self.result_ttl_s)
        pipe.execute()
