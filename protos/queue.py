"""The Redis protocol between frontend and workers: key names and entry fields.

Every key is versioned under `esm2:v1:`; every per-request key carries a TTL.
Values are protobuf bytes (`esm2.internal.v1`, `esm2.v1`) or plain strings:
nothing in Redis is pickled.
"""

from __future__ import annotations

PREFIX = "esm2:v1"

# The stream of QueueItems (one entry per item) and the group all workers share.
QUEUE_STREAM = f"{PREFIX}:queue"
WORKER_GROUP = "workers"
# Entries that failed `max_deliveries` times, kept for inspection.
DEAD_LETTER_STREAM = f"{PREFIX}:dead"
# Sorted set: worker id -> unix time of its last heartbeat.
HEARTBEATS = f"{PREFIX}:heartbeats"

# Field names of entries.
ITEM_FIELD = b"item"  # QUEUE_STREAM: QueueItem bytes
CHUNK_FIELD = b"chunk"  # reply stream: ResultChunk bytes
ERROR_FIELD = b"error"  # reply stream: ItemError bytes


def reply_stream(request_id: str) -> str:
    """Where workers write a request's ResultChunks and ItemErrors."""
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
