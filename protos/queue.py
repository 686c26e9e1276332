"""The Redis protocol between frontend and workers: key names and entry fields.

Every key is versioned under `esm2:v1:`; every per-request key carries a TTL.
Values are protobuf bytes (`esm2.internal.v1`, `esm2.v1`) or plain strings:
nothing in Redis is pickled.
"""

from __future__ import annotations

PREFIX = "esm2:v1"

# QueueItems (one entry per item) wait in lanes, one stream per length class, so a
# short item never queues behind a backlog of long ones: workers take from the
# shortest lane first (see worker/queue_loop.py for the starvation guard).
# A lane holds sequences of at most LANE_MAX_TOKENS[i] tokens (residues and masks;
# BOS and EOS not counted); the last lane takes the rest, up to the 2,048-token limit.
# With doubling bounds, an item past the first lane only ever queues behind items at
# most twice its length. All workers share one group on every lane.
LANE_MAX_TOKENS = (128, 256, 512, 1024)
LANE_NAMES = (*(f"to{limit}" for limit in LANE_MAX_TOKENS), f"over{LANE_MAX_TOKENS[-1]}")
QUEUE_LANES = tuple(f"{PREFIX}:queue:{name}" for name in LANE_NAMES)
WORKER_GROUP = "workers"
# Entries that failed `max_deliveries` times, kept for inspection.
DEAD_LETTER_STREAM = f"{PREFIX}:dead"
# Sorted set: worker id -> unix time of its last heartbeat.
HEARTBEATS = f"{PREFIX}:heartbeats"

# Field names of entries.
ITEM_FIELD = b"item"  # queue lanes: QueueItem bytes
CHUNK_FIELD = b"chunk"  # reply stream: EncodeResponse or PredictResponse bytes
ERROR_FIELD = b"error"  # reply stream: ItemError bytes
# Reply stream: the piece a chunk or completion is, so the frontend relays each piece once
# without parsing it: b"INDEX" for an item's completion, b"INDEX:KIND:LAYER:OFFSET" for a
# chunk. Entries without it (older workers) are parsed.
PIECE_FIELD = b"piece"


def chunk_piece(index: int, kind: int, layer: int, offset: int) -> bytes:
    """PIECE_FIELD's value for a chunk of item `index`."""
    return f"{index}:{kind}:{layer}:{offset}".encode()


def completion_piece(index: int) -> bytes:
    """PIECE_FIELD's value for item `index`'s completion."""
    return str(index).encode()


def is_completion(piece: bytes) -> bool:
    return b":" not in piece


NEWS_FIELD = b"requests"  # a frontend's news stream: ids of requests with new replies
# A frontend's news stream also carries small replies inline, one field each, named
# `KIND|REQUEST_ID|PIECE` (KIND: c for a CHUNK_FIELD entry, e for an ERROR_FIELD one).
_INLINE_KINDS = {CHUNK_FIELD: b"c", ERROR_FIELD: b"e"}
_INLINE_FIELDS = {kind: field for field, kind in _INLINE_KINDS.items()}


def inline_field(request_id: str, field: bytes, piece: bytes) -> bytes:
    """The field name of an inline reply entry in a news stream."""
    return b"|".join((_INLINE_KINDS[field], request_id.encode(), piece))


def parse_inline_field(name: bytes) -> tuple[str, bytes, bytes] | None:
    """(request id, CHUNK_FIELD or ERROR_FIELD, piece) of an inline field; None if the
    field is not one (NEWS_FIELD)."""
    parts = name.split(b"|", 2)
    if len(parts) != 3 or parts[0] not in _INLINE_FIELDS:
        return None
    return parts[1].decode(), _INLINE_FIELDS[parts[0]], parts[2]


def reply_stream(request_id: str) -> str:
    """Where workers write a request's response messages and ItemErrors."""
    return f"{PREFIX}:reply:{request_id}"


def request_key(request_id: str) -> str:
    """Exists while a request is being served; if it vanishes, Redis lost the request's
    state (a restart without persistence, an eviction) and waiting for it is futile."""
    return f"{PREFIX}:request:{request_id}"


def cancel_key(request_id: str) -> str:
    """Set by the frontend when a request's client went away; workers skip its items."""
    return f"{PREFIX}:cancelled:{request_id}"


def worker_info_key(worker_id: str) -> str:
    """A worker's ModelInfo bytes, refreshed with its heartbeat."""
    return f"{PREFIX}:worker:{worker_id}"


def lane_index(tokens: int) -> int:
    """The lane (index into QUEUE_LANES) of a sequence of `tokens` tokens."""
    fits = (i for i, limit in enumerate(LANE_MAX_TOKENS) if tokens <= limit)
    return next(fits, len(LANE_MAX_TOKENS))
