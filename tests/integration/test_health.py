"""The frontend's health monitor against a real Redis."""

from __future__ import annotations

import asyncio
import logging
import time

from esm2_service import queue
from esm2_service.server.health import HealthMonitor
from esm2_service.server.redis_link import RedisLink


async def test_a_check_redis_refuses_reports_not_serving_and_the_checks_go_on(
    redis_server, redis_client, caplog
):
    """Redis refuses the heartbeat count (an ACL here): health says why, and recovers
    once Redis answers again, rather than freezing at the last verdict."""
    user = "esm2-test-no-zcount"
    redis_client.acl_setuser(
        user, enabled=True, nopass=True, keys="*", channels="*", commands=["+@all", "-zcount"]
    )
    client = RedisLink(f"redis://{user}:any@127.0.0.1:{redis_server.port}/1", "test")
    monitor = HealthMonitor(client, worker_timeout_s=10, interval_s=0.05)
    running = asyncio.get_running_loop().create_task(monitor.run())
    try:
        reason = await monitor.check_once()
        assert reason.startswith("Redis refused a health check:"), reason
        assert "zcount" in reason.lower()
        redis_client.zadd(queue.HEARTBEATS, {"worker-1": time.time()})
        with caplog.at_level(logging.INFO, logger="esm2_service.server.health"):
            redis_client.acl_setuser(user, commands=["+zcount"])
            for _ in range(100):
                if await monitor.check_once() is None and "health: SERVING" in caplog.text:
                    break
                await asyncio.sleep(0.05)
        assert not running.done()
        assert "health: SERVING" in caplog.text
    finally:
        running.cancel()
        await client.aclose()
        redis_client.acl_deluser(user)
