"""Reading and writing the queue lanes directly, as tests of the Redis protocol need."""

from __future__ import annotations

from esm2_service import queue
from esm2_service.alphabet import split_tokens


def lane_of(sequence: str) -> str:
    """The lane stream an item of `sequence` is queued on."""
    return queue.QUEUE_LANES[queue.lane_index(len(split_tokens(sequence)))]


def queue_length(client) -> int:
    """Entries on all lanes: waiting or being computed."""
    return sum(client.xlen(lane) for lane in queue.QUEUE_LANES)


def pending_count(client, consumer: str | None = None) -> int:
    """Entries delivered to a worker (`consumer`, or any) and not yet acknowledged, on
    all lanes."""
    lanes = [lane for lane in queue.QUEUE_LANES if client.exists(lane)]
    if consumer is not None:
        return sum(
            len(client.xpending_range(lane, queue.WORKER_GROUP, "-", "+", 1000, consumer))
            for lane in lanes
        )
    return sum(group["pending"] for lane in lanes for group in client.xinfo_groups(lane))


def last_generated_ids(client) -> list:
    """Each lane's last entry id: unchanged when nothing was queued."""
    return [
        client.xinfo_stream(lane)["last-generated-id"] if client.exists(lane) else None
        for lane in queue.QUEUE_LANES
    ]
