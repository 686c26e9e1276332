"""The images' health checks (python -m esm2_service.{server,worker}.healthcheck) against
a live service."""

from __future__ import annotations

import os
import subprocess
import sys

from esm2_service.server.embedded_redis import free_port


def check(module: str, env: dict, *args) -> int:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **env},
        capture_output=True,
        timeout=60,
    ).returncode


def test_the_frontend_check_passes_only_where_a_frontend_serves(service):
    assert check("esm2_service.server.healthcheck", {"ESM2_PORT": str(service.port)}) == 0
    assert check("esm2_service.server.healthcheck", {"ESM2_PORT": str(free_port())}) == 1


def test_the_worker_check_passes_only_for_a_worker_that_heartbeats(service, tmp_path):
    redis_url = service.env["REDIS_URL"]
    named = {"REDIS_URL": redis_url, "ESM2_WORKER_ID": "test-worker-0"}
    assert check("esm2_service.worker.healthcheck", named) == 0
    assert check("esm2_service.worker.healthcheck", named | {"ESM2_WORKER_ID": "gone"}) == 1
    id_file = tmp_path / "worker-id"
    from_file = {"REDIS_URL": redis_url, "ESM2_WORKER_ID": "", "ESM2_WORKER_ID_FILE": str(id_file)}
    assert check("esm2_service.worker.healthcheck", from_file) == 1  # not serving yet
    id_file.write_text("test-worker-0\n")
    assert check("esm2_service.worker.healthcheck", from_file) == 0
