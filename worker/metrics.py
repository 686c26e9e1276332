"""A worker's Prometheus metrics, on a registry of its own; no torch, no Redis.

The queue loop calls `batch` after each packed forward pass and `items` for every
item it finishes, drops or sets aside; `serve` exposes them on a port of its own.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

OUTCOMES = ("completed", "failed", "expired", "cancelled", "dead_lettered")
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64)
BATCH_TOKEN_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

log = logging.getLogger(__name__)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.batch_size = Histogram(
            "esm2_worker_batch_size",
            "Items per packed batch",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "esm2_worker_batch_tokens",
            "Tokens (with BOS/EOS) per packed batch",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "esm2_worker_batch_seconds",
            "Wall time of a batch: the forward pass and writing its results",
            buckets=BATCH_SECONDS_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Gauge(
            "esm2_worker_padding_ratio",
            "Padded / (padded + real) tokens of the last batch. The engine packs sequences "
            "end to end without padding, so this is 0 by construction",
            registry=r,
        )
        self.tokens = Counter(
            "esm2_worker_tokens", "Tokens run through the model; rate() gives tokens/s", registry=r
        )
        self.tokens_per_second = Gauge(
            "esm2_worker_tokens_per_second", "Tokens / wall time of the last batch", registry=r
        )
        self.items_by_outcome = Counter(
            "esm2_worker_items",
            "Items by outcome: completed, failed (model error or reader gone), expired "
            "(deadline passed in the queue), cancelled, dead_lettered (too many deliveries)",
            ("outcome",),
            registry=r,
        )
        # Every series exists from the start, at 0.
        self._items = {outcome: self.items_by_outcome.labels(outcome) for outcome in OUTCOMES}

    def serve(self, host: str, port: int) -> None:
        """Serves /metrics over HTTP on `host`:`port` from a daemon thread (0: not at all)."""
        if port:
            start_http_server(port, addr=host, registry=self.registry)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def batch(self, items: int, tokens: int, seconds: float, padded_tokens: int = 0) -> None:
        """One packed batch of `items` holding `tokens` real tokens, run in `seconds`."""
        self.batch_size.observe(items)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)
        self.padding_ratio.set(padded_tokens / max(1, tokens + padded_tokens))
        self.tokens.inc(tokens)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)

    def items(self, outcome: str, count: int = 1) -> None:
        try:
            self._items[outcome].inc(count)
        except KeyError:
            raise ValueError(f"unknown item outcome {outcome!r}") from None


def abandoned_outcome(code: str) -> str:
    """The outcome of an item whose reader went away, from the code it was dropped with."""
    return "cancelled" if code == "CANCELLED" else "failed"
