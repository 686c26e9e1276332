"""gRPC health: SERVING only while Redis answers and at least one worker is alive."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2
from redis.exceptions import RedisError

from esm2_service import queue
from esm2_service.server.broker import REDIS_ERRORS, queue_depths
from esm2_service.server.handlers import SERVICE_NAME

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthMonitor:
    """Polls Redis and the worker heartbeats; publishes the result to the health service."""

    def __init__(
        self,
        redis,
        worker_timeout_s: float,
        interval_s: float,
        metrics=None,
        on_first_serving: Callable[[], None] | None = None,
    ):
        self.redis = redis
        self.metrics = metrics  # FrontendMetrics: queue depth and live workers, every check
        self.worker_timeout_s = worker_timeout_s
        self.interval_s = interval_s
        self.servicer = health.aio.HealthServicer()
        self._reason: str | None = "starting"
        # Called once, after health first reports SERVING: the service takes requests.
        self._on_first_serving = on_first_serving

    async def check_once(self) -> str | None:
        """None when healthy, else why not."""
        try:
            alive = await self.redis.execute(
                "ZCOUNT", queue.HEARTBEATS, time.time() - self.worker_timeout_s, "+inf"
            )
            if self.metrics is not None:
                for lane, depth in (await queue_depths(self.redis)).items():
                    self.metrics.queue_depth.labels(lane=lane).set(depth)
                self.metrics.workers_alive.set(alive)
        except REDIS_ERRORS as error:
            if self.metrics is not None:
                self.metrics.workers_alive.set(0)  # none that this frontend can reach
            return f"Redis unreachable: {error}"
        except RedisError as error:  # a refused command must not end the checks for good
            return f"Redis refused a health check: {error}"
        return None if alive else "no live worker"

    async def run(self) -> None:
        while True:
            reason = await self.check_once()
            status = NOT_SERVING if reason else SERVING
            for name in ("", SERVICE_NAME):
                await self.servicer.set(name, status)
            if reason != self._reason:
                self._log_change(reason)
            await asyncio.sleep(self.interval_s)

    def _log_change(self, reason: str | None) -> None:
        self._reason = reason
        if reason:
            log.warning("health: NOT_SERVING (%s)", reason)
            return
        log.info("health: SERVING")
        if self._on_first_serving is not None:
            self._on_first_serving()
            self._on_first_serving = None
