"""Writing results to the per-request reply streams, paced to their readers.

A write to reply streams goes through one Lua script that skips those of cancelled
requests (nobody reads them, and a stream the frontend deleted must not come back)
and acknowledges the batch's queue entries in the same step, so an entry is never
acknowledged without its results. A batch whose results are all small rides in its
frontends' news streams, which need no skipping: that write, with its
acknowledgements, is one MULTI/EXEC, a third of the script's cost to Redis.

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
from esm2_service.tensors import serialized_chunk_responses
from esm2_service.worker.direct_connection import DirectConnection
from esm2_service.worker.work import TensorOutput

log = logging.getLogger(__name__)

_POLL_S = 0.005
# Outputs this large are written as soon as they exist; smaller ones go out with
# the batch's completions and acknowledgements in one round trip.
WRITE_AT_ONCE_BYTES = 1 << 20
MAX_BUFFERED_BYTES = 16 << 20


# A queue entry: (lane stream, entry id). Ids are unique per stream only.
EntryRef = tuple[str, bytes]
# A reply entry waiting to be written: (its item, field, value, piece or b"").
Entry = tuple[qpb.QueueItem, bytes, bytes, bytes]
# A frontend trims its news stream as it reads it (no MAXLEN here: entries carry inline
# results, which must not be trimmed unread). A dead frontend's stream holds at most the
# results of the requests it had queued, and expires with them.
# An item whose whole output is at most this large, written in one step, travels inside
# its frontend's news entry: the frontend reads it without a fetch of its own.
INLINE_MAX_BYTES = 64 << 10

# KEYS: n reply streams, their n requests' cancel keys, their n request markers, their n
# news streams (a request whose frontend listens to none names its reply stream again),
# then the lanes to acknowledge on. ARGV: n, TTL (s), group; for each request, its
# reply-stream entry count and (field, value, piece) per entry (piece: queue.PIECE_FIELD's
# value, or "" for none), then its inline entry count and (field, value) per inline entry;
# for each lane its id count, then the ids. Each news stream gets one entry: the requests
# given reply-stream entries, and every inline entry. Returns each reply stream's length
# after the write (0 where nothing went to it), or CANCELLED / UNKNOWN where nothing was
# written: the request was cancelled, or Redis does not know it (it restarted, or the
# request ended).
PIECE = queue.PIECE_FIELD.decode()
CANCELLED, UNKNOWN = -1, -2
_WRITE_SCRIPT = f"""
local n, ttl, group = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local at = 4
local lengths = {{}}
local news = {{}}
local function news_of(listener)
  if news[listener] == nil then news[listener] = {{ids = {{}}, inline = {{}}}} end
  return news[listener]
end
for i = 1, n do
  local count = tonumber(ARGV[at])
  local inline_at = at + 1 + 3 * count
  local inline_count = tonumber(ARGV[inline_at])
  local listener = KEYS[3 * n + i]
  if redis.call('EXISTS', KEYS[n + i]) == 1 then
    lengths[i] = {CANCELLED}
  elseif redis.call('EXISTS', KEYS[2 * n + i]) == 0 then
    lengths[i] = {UNKNOWN}
  else
    for e = at + 1, at + 3 * count, 3 do
      if ARGV[e + 2] == '' then
        redis.call('XADD', KEYS[i], '*', ARGV[e], ARGV[e + 1])
      else
        redis.call('XADD', KEYS[i], '*', ARGV[e], ARGV[e + 1], '{PIECE}', ARGV[e + 2])
      end
    end
    lengths[i] = 0
    if count > 0 then
      redis.call('EXPIRE', KEYS[i], ttl)
      lengths[i] = redis.call('XLEN', KEYS[i])
      if listener ~= KEYS[i] then
        table.insert(news_of(listener).ids, string.sub(KEYS[i], {len(queue.reply_stream("")) + 1}))
      end
    end
    for e = inline_at + 1, inline_at + 2 * inline_count, 2 do
      local inline = news_of(listener).inline
      table.insert(inline, ARGV[e])
      table.insert(inline, ARGV[e + 1])
    end
  end
  at = inline_at + 1 + 2 * inline_count
end
for listener, new in pairs(news) do
  local fields = new.inline
  if #new.ids > 0 then
    table.insert(fields, '{queue.NEWS_FIELD.decode()}')
    table.insert(fields, table.concat(new.ids, ' '))
  end
  redis.call('XADD', listener, '*', unpack(fields))
  redis.call('EXPIRE', listener, ttl)
end
for lane = 4 * n + 1, #KEYS do
  local count = tonumber(ARGV[at])
  local ids = {{unpack(ARGV, at + 1, at + count)}}
  redis.call('XACK', KEYS[lane], group, unpack(ids))
  redis.call('XDEL', KEYS[lane], unpack(ids))
  at = at + 1 + count
end
return lengths
"""


_UNKNOWN_LOG = "dropped results of request %s: Redis does not know it (restarted, or it ended)"


def _dropped(item: qpb.QueueItem, length: int) -> tuple[str, str]:
    """Why an item's results were dropped, from the write script's verdict (CANCELLED or
    UNKNOWN); its outcome counts as cancelled either way."""
    if length == UNKNOWN:
        log.info(_UNKNOWN_LOG, item.request_id, extra={"request_id": item.request_id})
        return ("CANCELLED", "the queue (Redis) no longer knows the request")
    return ("CANCELLED", "the request was cancelled")


def item_key(item: qpb.QueueItem) -> tuple[str, int]:
    return item.request_id, item.sequence_index


def group_by_stream(refs: Sequence[EntryRef]) -> dict[str, list[bytes]]:
    grouped: dict[str, list[bytes]] = {}
    for stream, entry_id in refs:
        grouped.setdefault(stream, []).append(entry_id)
    return grouped


def response_type(task: int) -> type[pb.EncodeResponse] | type[pb.PredictResponse]:
    """The response message of the item's RPC (the two have the same fields, so their
    bytes are the same: the frontend relays either unchanged)."""
    return pb.PredictResponse if task == qpb.TASK_PREDICT else pb.EncodeResponse


class ReplyWriter:
    def __init__(
        self,
        client: redis.Redis,
        direct: DirectConnection,
        model: pb.ModelInfo,
        *,
        result_ttl_s: int,
        max_reply_chunks: int,
        reader_stall_s: float,
    ):
        self.redis = client
        self.direct = direct  # for the writes: a thread's own
        self.model = model
        self.result_ttl_s = result_ttl_s
        self.max_reply_chunks = max_reply_chunks
        self.reader_stall_s = reader_stall_s
        # Items whose reader went away: (request_id, index) -> (code, message).
        self.abandoned: dict[tuple[str, int], tuple[str, str]] = {}
        self._buffer: list[Entry] = []
        self._buffered_bytes = 0
        # Items with entries in their reply stream: the rest of them goes there too.
        self._streamed: set[tuple[str, int]] = set()
        self._write_script = client.register_script(_WRITE_SCRIPT)
        # An Encode item's completion but for its index: serialized once. Fields go out in
        # number order, so index + this is the message's own serialization.
        done = pb.ItemComplete(vocab_tokens=VOCAB_TOKENS, model=model)
        self._encode_completion = pb.EncodeResponse(complete=done).SerializeToString()

    def emit(self, item: qpb.QueueItem, output: TensorOutput) -> None:
        """Writes one output tensor of `item`, chunked. Small outputs wait in a buffer
        for the batch's single final write (`flush`); large ones are written at once,
        then the writer waits while the item's reader lags."""
        if item_key(item) in self.abandoned:
            return
        entries = [
            (
                item,
                queue.CHUNK_FIELD,
                message,  # an EncodeResponse, or a PredictResponse: the same bytes
                queue.chunk_piece(item.sequence_index, output.kind, output.layer, chunk_offset),
            )
            for chunk_offset, message in serialized_chunk_responses(
                item.sequence_index,
                output.kind,
                output.layer,
                output.shape,
                item.dtype,
                output.data,
                output.offset,
            )
        ]
        if len(output.data) < WRITE_AT_ONCE_BYTES:
            self._buffer += entries
            self._buffered_bytes += len(output.data)
            if self._buffered_bytes > MAX_BUFFERED_BYTES:
                self.flush()
            return
        self.flush()
        self._streamed.add(item_key(item))
        length = self._write(entries)[item.request_id]
        if length < 0:
            self.abandoned[item_key(item)] = _dropped(item, length)
        elif length > self.max_reply_chunks:
            self._wait_for_reader(item, queue.reply_stream(item.request_id))

    def flush(self, acks: Sequence[EntryRef] = ()) -> set[str]:
        """Writes everything buffered, then acknowledges (and deletes) the queue entries
        `acks`, in one step. Returns the ids of requests found cancelled, whose
        results were dropped. With `acks` (the batch's last write), an item whose whole
        output is here and small travels inline in its frontend's news entry."""
        if not self._buffer and not acks:
            return set()
        inline = self._inline_items() if acks else set()
        if not acks:
            self._streamed.update(item_key(item) for item, *_ in self._buffer)
        lengths = self._write(self._buffer, acks, inline)
        if acks:
            self._streamed.difference_update(item_key(item) for item, *_ in self._buffer)
        self.discard()
        for request_id, length in lengths.items():
            if length == UNKNOWN:
                log.info(_UNKNOWN_LOG, request_id, extra={"request_id": request_id})
        return {request_id for request_id, length in lengths.items() if length < 0}

    def _inline_items(self) -> set[tuple[str, int]]:
        sizes: dict[tuple[str, int], int] = {}
        for item, _, value, _ in self._buffer:
            if item.news_stream:
                key = item_key(item)
                sizes[key] = sizes.get(key, 0) + len(value)
        return {
            key
            for key, size in sizes.items()
            if size <= INLINE_MAX_BYTES and key not in self._streamed
        }

    def _write(
        self,
        entries: Sequence[Entry],
        acks: Sequence[EntryRef] = (),
        inline: set[tuple[str, int]] = frozenset(),
    ) -> dict[str, int]:
        """Appends `entries` to their reply streams (those of `inline` items to their
        frontends' news streams) unless the request was cancelled, and acknowledges
        `acks`, atomically. Returns each request's reply stream length (CANCELLED or
        UNKNOWN: nothing of it written to its reply stream)."""
        if acks and all(item_key(item) in inline for item, *_ in entries):
            return self._write_news(entries, acks)
        return self._write_with_script(entries, acks, inline)

    def _write_with_script(
        self, entries: Sequence[Entry], acks: Sequence[EntryRef], inline: set[tuple[str, int]]
    ) -> dict[str, int]:
        streamed: dict[str, list[bytes]] = {}
        inlined: dict[str, list[bytes]] = {}
        news: dict[str, str] = {}
        for item, field, value, piece in entries:
            request_id = item.request_id
            streamed.setdefault(request_id, [])
            inlined.setdefault(request_id, [])
            if item_key(item) in inline:
                inlined[request_id] += [queue.inline_field(request_id, field, piece), value]
            else:
                streamed[request_id] += [field, value, piece]
            news[request_id] = item.news_stream or queue.reply_stream(request_id)
        args: list = [len(streamed), self.result_ttl_s, queue.WORKER_GROUP]
        for request_id, triples in streamed.items():  # (field, value, piece) per entry
            pairs = inlined[request_id]  # (field, value) per inline entry
            args += [len(triples) // 3, *triples, len(pairs) // 2, *pairs]
        lanes = group_by_stream(acks)  # the lanes' lengths are the backlog: delete, too
        for entry_ids in lanes.values():
            args += [len(entry_ids), *entry_ids]
        keys = [
            *map(queue.reply_stream, streamed),
            *map(queue.cancel_key, streamed),
            *map(queue.request_key, streamed),
            *(news[request_id] for request_id in streamed),
            *lanes,
        ]
        lengths = self.direct.run_script(self._write_script, keys, args)
        return dict(zip(streamed, lengths, strict=True))

    def _write_news(self, entries: Sequence[Entry], acks: Sequence[EntryRef]) -> dict[str, int]:
        """`_write` for a batch's last write when every entry rides inline: news streams
        only, in one MULTI/EXEC (Redis: 22 us for 8 mean items, against 60 to 80 through
        the script). Nothing needs skipping: a frontend drops the inline entries of a
        request it no longer waits on, and no reply stream is touched. The verdicts
        come from the same transaction."""
        fields: dict[str, list[bytes]] = {}
        requests: dict[str, None] = {}
        for item, field, value, piece in entries:
            requests[item.request_id] = None
            inlined = queue.inline_field(item.request_id, field, piece)
            fields.setdefault(item.news_stream, []).extend((inlined, value))
        commands: list[tuple] = []
        for request_id in requests:
            commands.append(("EXISTS", queue.cancel_key(request_id)))
            commands.append(("EXISTS", queue.request_key(request_id)))
        for stream, pairs in fields.items():
            commands.append(("XADD", stream, "*", *pairs))
            commands.append(("EXPIRE", stream, self.result_ttl_s))
        for lane, entry_ids in group_by_stream(acks).items():
            commands.append(("XACK", lane, queue.WORKER_GROUP, *entry_ids))
            commands.append(("XDEL", lane, *entry_ids))
        checks = self.direct.transaction(commands)[: 2 * len(requests)]
        verdicts = zip(requests, checks[0::2], checks[1::2], strict=True)
        return {
            request_id: CANCELLED if cancelled else 0 if known else UNKNOWN
            for request_id, cancelled, known in verdicts
        }

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
        piece = queue.completion_piece(item.sequence_index)
        self._buffer.append((item, queue.CHUNK_FIELD, self._completion(item, predict), piece))

    def _completion(self, item: qpb.QueueItem, predict: bool) -> bytes:
        """The item's serialized completion message."""
        index = item.sequence_index
        if not predict:
            return pb.EncodeResponse(sequence_index=index).SerializeToString() + (
                self._encode_completion
            )
        done = pb.ItemComplete(vocab_tokens=VOCAB_TOKENS, model=self.model)
        done.sequence_tokens.extend(split_tokens(item.sequence))
        return response_type(item.task)(sequence_index=index, complete=done).SerializeToString()

    def error(self, item: qpb.QueueItem, code: str, message: str) -> None:
        """Buffers an error for the item, in place of its results."""
        error = qpb.ItemError(sequence_index=item.sequence_index, code=code, message=message)
        piece = f"{item.sequence_index}!".encode()
        self._buffer.append((item, queue.ERROR_FIELD, error.SerializeToString(), piece))
