"""A GPU worker's second stage: a computed batch's replies are written while the next
batch computes.

The queue loop computes a batch, collects its outputs (wire bytes, on the host) and
hands their writing (chunking, the reply streams, acknowledging its queue entries) to
one thread of its own; it then takes and computes the next batch. At most one batch
waits to be written: handing over the next one first waits for it, which bounds the
outputs held in memory to two batches' and keeps a slow client's backpressure
(`ReplyWriter` waits for lagging readers) reaching the queue loop.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class WriteBehind:
    """Runs one write at a time on a thread of its own; `submit` waits for the last."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="esm2-replies")
        self._pending: Future | None = None

    def submit(self, write: Callable[[], None]) -> None:
        """Starts `write` once the previous write has ended."""
        self.drain()
        self._pending = self._thread.submit(write)

    def drain(self) -> None:
        """Waits for the write in progress; an exception it raised is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._thread.shutdown()
