"""esm2_service.allocator: freed result-sized buffers are reused, not faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from esm2_service.allocator import REDIS_ENVIRONMENT, redis_environment

# Writes 100 batches of 8 buffers of 435 KB (a batch's per-token embeddings), each batch
# freed before the next; prints the page faults that cost and whether keep_freed_memory
# applied. Fresh pages each time would be 8 x 107 a batch.
_PROBE = """
import json, resource, sys
from esm2_service.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def batch():
    buffers = [bytearray(435_000) for _ in range(8)]
    for buffer in buffers:
        buffer[::4096] = bytes(len(range(0, len(buffer), 4096)))
for _ in range(5):
    batch()
before = faults()
for _ in range(100):
    batch()
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def _probe(mode: str, **environment: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**env, **environment},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(done.stdout)


def test_kept_memory_spares_a_page_fault_per_page_of_each_buffer():
    kept, default = _probe("keep"), _probe("default")
    assert kept["applied"] is True
    assert default["faults"] >= 100 * 8 * 100  # about 107 new pages a buffer
    assert kept["faults"] < 1000


def test_a_users_malloc_variable_wins():
    probe = _probe("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert probe["applied"] is False


def test_redis_gets_the_thresholds_unless_the_user_set_them():
    assert redis_environment({"PATH": "/bin"}) == {"PATH": "/bin", **REDIS_ENVIRONMENT}
    mine = {"MALLOC_TRIM_THRESHOLD_": "1"}
    assert redis_environment(mine)["MALLOC_TRIM_THRESHOLD_"] == "1"
    assert redis_environment(mine)["MALLOC_MMAP_THRESHOLD_"] == str(16 << 20)


def _redis_faults(directory: Path) -> int:
    """Page faults of an embedded redis-server storing and dropping 50 batches of 8
    buffers of 435 KB."""
    import redis

    from esm2_service.server.embedded_redis import EmbeddedRedis

    directory.mkdir()
    server = EmbeddedRedis(directory)
    try:
        client = redis.Redis.from_url(server.url)
        value = bytes(435_000)
        stat = Path(f"/proc/{server.process.pid}/stat")
        before = int(stat.read_text().rsplit(")", 1)[1].split()[7])
        for _ in range(50):
            client.mset({f"buffer{i}": value for i in range(8)})
            client.delete(*(f"buffer{i}" for i in range(8)))
        return int(stat.read_text().rsplit(")", 1)[1].split()[7]) - before
    finally:
        server.stop()


def test_the_embedded_redis_server_reuses_freed_buffers(tmp_path, monkeypatch):
    for name in REDIS_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    kept = _redis_faults(tmp_path / "kept")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # glibc's defaults: the user's
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    default = _redis_faults(tmp_path / "default")
    assert default > 50 * 8 * 100  # about 107 new pages a buffer
    assert kept < default / 10
