"""Reading and writing the queue lanes directly, as tests of the Redis protocol need."""

from __future__ import annotations

import threading

import redis

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


class ConnectionCounter:
    """The most connections Redis's CLIENT LIST showed under one client name, sampled."""

    def __init__(self, url: str, name: str):
        self.client = redis.Redis.from_url(url)
        self.name = name
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            named = [c for c in self.client.client_list() if c["name"] == self.name]
            self.peak = max(self.peak, len(named))
            self._stop.wait(0.05)


def sequence_number(index: int) -> str:
    """A distinct short sequence (5 to 44 residues) for each index."""
    residues = "ACDEFGHIKLMNPQRSTVWY"
    return "".join(residues[(index * 7 + k) % 20] for k in range(5 + index % 40))
