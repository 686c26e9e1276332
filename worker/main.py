"""`esm2 worker`: one model on one device, serving the Redis queue."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from esm2_service.allocator import keep_freed_memory
from esm2_service.config import check_redis_address, env_or, redact_url
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.logs import configure_logging
from esm2_service.worker.command_packer import CommandPacker
from esm2_service.worker.healthcheck import ID_FILE_ENV
from esm2_service.worker.metrics import WorkerMetrics
from esm2_service.worker.openmp import configure_openmp_wait
from esm2_service.worker.settings import WorkerSettings, build_parser, settings_from_args

log = logging.getLogger("esm2_service.worker")


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def load_engine(settings: WorkerSettings):
    """Loads the checkpoint and builds the engine; returns it with its ModelInfo."""
    import torch

    from esm2_service.worker.checkpoint import load_checkpoint
    from esm2_service.worker.engine import Engine
    from esm2_service.worker.model import Esm2

    threads = settings.threads or available_cores()
    torch.set_num_threads(threads)
    checkpoint = load_checkpoint(settings.weights)
    info = pb.ModelInfo(
        name=checkpoint.name,
        checkpoint_sha256=checkpoint.sha256,
        random_weights=checkpoint.random_weights,
        device=settings.device,
        precision=settings.precision,
    )
    log.info(
        "loaded %s (sha256 %s) on %s, %s, %d threads",
        checkpoint.name,
        checkpoint.sha256,
        settings.device,
        settings.precision,
        threads,
    )
    if checkpoint.random_weights:
        log.warning(
            "this checkpoint has RANDOM weights: outputs are meaningless (tests/benchmarks only)"
        )
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    engine = Engine(Esm2.from_checkpoint(checkpoint), settings.device, dtype[settings.precision])
    runner = with_openvino(engine, settings, dtype[settings.precision], threads)
    started = time.perf_counter()
    runner.warm_up()
    log.info("warmed up in %.1f s", time.perf_counter() - started)
    return runner, info


def with_openvino(engine, settings: WorkerSettings, dtype, threads: int):
    """The engine, behind OpenVINO for CPU batches without attention maps where that is
    installed and on."""
    from esm2_service.worker.openvino_backend import OpenVinoRunner, openvino_available

    if settings.device != "cpu" or settings.openvino == "off":
        return engine
    if not openvino_available():
        log.info("OpenVINO is not installed: every batch runs on the torch engine")
        return engine
    log.info("batches without contacts or attentions run on OpenVINO")
    return OpenVinoRunner.for_engine(engine, dtype, threads)


def run_worker(
    settings: WorkerSettings, stop: threading.Event, metrics: WorkerMetrics | None = None
) -> None:
    from esm2_service.worker.checkpoint import CheckpointError
    from esm2_service.worker.queue_loop import QueueWorker

    try:
        engine, info = load_engine(settings)
    except CheckpointError as error:
        log.error("%s", error)
        raise SystemExit(2) from error
    client = redis_client(settings)
    _wait_for_redis(client, settings, stop)
    worker = QueueWorker(client, engine, settings, info, metrics)
    log.info("worker %s serving (%s)", settings.worker_id, settings.describe())
    _write_id_file(settings.worker_id)
    print(f"esm2 worker {settings.worker_id} ready", flush=True)
    worker.run(stop)
    log.info("worker %s stopped after %d items", settings.worker_id, worker.stats["items"])


def _write_id_file(worker_id: str) -> None:
    """Tells a container's health check (worker/healthcheck.py) which heartbeat is its
    worker's: the images set ESM2_WORKER_ID_FILE."""
    path = os.environ.get(ID_FILE_ENV)
    if path:
        Path(path).write_text(worker_id + "\n")


def redis_client(settings: WorkerSettings) -> redis.Redis:
    """The worker's Redis client: TCP (redis://, rediss://) or a Unix socket (unix://)."""
    # Keepalive probes find a peer that vanished without a FIN; Unix sockets have none.
    tcp = {} if settings.redis_url.startswith("unix:") else {"socket_keepalive": True}
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2.0,
        socket_timeout=max(10.0, settings.block_ms / 1000 + 5),
        health_check_interval=10,
        command_packer=CommandPacker(),
        # from_url's connections retry nothing (unlike Redis()'s): a dropped
        # connection would fail a batch's write, and its items would wait --claim-idle-s
        # to run again. A write sent twice is relayed once (frontends keep each piece once).
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        **tcp,
    )


def _wait_for_redis(client, settings: WorkerSettings, stop: threading.Event) -> None:
    """Creates the queue's consumer group, retrying until Redis answers (or stop)."""
    from esm2_service.worker.queue_loop import ensure_group

    delay_s = 0.5
    while not stop.is_set():
        try:
            ensure_group(client)
            return
        except redis.ConnectionError as error:
            log.warning(
                "Redis at %s unreachable (%s); retrying", redact_url(settings.redis_url), error
            )
            stop.wait(delay_s)
            delay_s = min(2 * delay_s, 10.0)


def main(argv: list[str] | None = None) -> int:
    configure_openmp_wait()  # before torch loads OpenMP
    keep_freed_memory()
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        check_redis_address(settings.redis_url, env_or("REDIS_ADDRESS"))
    except ValueError as error:
        print(f"esm2 worker: {error}", file=sys.stderr)
        return 2
    configure_logging(
        settings.log_level,
        settings.log_format,
        text_format=f"%(asctime)s %(levelname)s worker[{settings.worker_id}] %(name)s %(message)s",
        fields={"worker_id": settings.worker_id},
    )
    metrics = WorkerMetrics()
    try:
        metrics.serve(settings.metrics_host, settings.metrics_port)
    except OSError as error:
        log.error(
            "cannot serve metrics on port %d: %s; --metrics-port or ESM2_METRICS_PORT picks "
            "another, 0 none",
            settings.metrics_port,
            error,
        )
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        run_worker(settings, stop, metrics)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except redis.RedisError as error:
        log.error("cannot reach Redis: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
