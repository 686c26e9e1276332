"""`python -m esm2_service.worker.healthcheck`: a worker container's health check.

Exits 0 when this container's worker has sent a heartbeat to Redis within the
frontend's notion of a live worker (ESM2_WORKER_TIMEOUT_S, default 10 s), 1 otherwise.
The worker is the one named by ESM2_WORKER_ID, or else by the file ESM2_WORKER_ID_FILE
(the images set it; the worker writes its id there once it serves). Reads REDIS_URL
as the worker does.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import redis

from esm2_service import queue
from esm2_service.config import DEFAULT_REDIS_URL, env_or

DEFAULT_WORKER_TIMEOUT_S = 10.0
ID_FILE_ENV = "ESM2_WORKER_ID_FILE"


def own_worker_id() -> str | None:
    worker_id = os.environ.get("ESM2_WORKER_ID")
    if worker_id:
        return worker_id
    try:
        return Path(os.environ[ID_FILE_ENV]).read_text().strip() or None
    except (KeyError, OSError):
        return None  # not serving yet


def main() -> int:
    bound = float(os.environ.get("ESM2_WORKER_TIMEOUT_S") or DEFAULT_WORKER_TIMEOUT_S)
    client = redis.Redis.from_url(
        env_or("REDIS_URL", DEFAULT_REDIS_URL), socket_timeout=3, socket_connect_timeout=3
    )
    worker_id = own_worker_id()
    if worker_id is None:
        return 1
    try:
        beat = client.zscore(queue.HEARTBEATS, worker_id)
    except redis.RedisError:
        return 1
    finally:
        client.close()
    return 0 if beat is not None and time.time() - beat < bound else 1


if __name__ == "__main__":
    sys.exit(main())
