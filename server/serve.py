"""`esm2 serve`: the whole service on one machine, in one command.

Starts a private Redis (unless REDIS_URL is set), the gRPC frontend and N workers
as child processes, restarts a worker that dies, and on Ctrl-C or SIGTERM stops
them in order: the frontend drains its streams, then the workers finish their
batch, then Redis goes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from esm2_service.config import env_or, redact_url
from esm2_service.logs import LOG_FORMATS, configure_logging
from esm2_service.server import settings as server_settings

log = logging.getLogger("esm2_service.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esm2 serve",
        description="Run Redis (embedded unless REDIS_URL is set), the gRPC frontend and workers.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env_or("ESM2_PORT", "50051")),
        help="gRPC port (ESM2_PORT, default 50051)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(env_or("ESM2_WORKERS", "1")),
        help="worker processes (ESM2_WORKERS, default 1)",
    )
    parser.add_argument(
        "--weights",
        default=env_or("ESM2_WEIGHTS"),
        help="fair-esm checkpoint for every worker (ESM2_WEIGHTS)",
    )
    parser.add_argument("--device", default=env_or("ESM2_DEVICE", "cpu"))
    parser.add_argument(
        "--threads",
        type=int,
        default=int(env_or("ESM2_THREADS", "0")),
        help="threads per worker; 0: the machine's cores split among the workers",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env_or("ESM2_METRICS_PORT", "9090")),
        help="the frontend's Prometheus port; worker i gets this + 1 + i; 0: no metrics "
        "(ESM2_METRICS_PORT, default 9090)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=env_or("ESM2_LOG_FORMAT", "text"),
        help="text or JSON lines, for every process (ESM2_LOG_FORMAT)",
    )
    return parser


def _child(module: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    # A session of its own: Ctrl-C reaches only this supervisor, which stops the
    # children in the order that loses nothing.
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, start_new_session=True)


def _frontend_args(args: argparse.Namespace) -> list[str]:
    # Auth and TLS settings reach the frontend through the environment it inherits
    # (ESM2_AUTH_TOKENS_FILE, ESM2_AUTH_TOKENS, ESM2_TLS_*), never through argv.
    return [
        *("--port", str(args.port)),
        *("--metrics-port", str(args.metrics_port)),
        *("--log-format", args.log_format),
    ]


def _worker_args(args: argparse.Namespace, index: int) -> list[str]:
    from esm2_service.worker.main import available_cores

    threads = args.threads or max(1, available_cores() // args.workers)
    worker_args = [
        "--device",
        args.device,
        "--threads",
        str(threads),
        "--worker-id",
        f"serve-{index}",
        # Explicit, so an inherited ESM2_METRICS_PORT never gives two processes one port.
        "--metrics-port",
        str(args.metrics_port + 1 + index if args.metrics_port else 0),
        "--log-format",
        args.log_format,
    ]
    if args.weights:
        worker_args += ["--weights", args.weights]
    return worker_args


def _stop(processes: list[subprocess.Popen], timeout_s: float) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(args: argparse.Namespace) -> int:
    from esm2_service.server.embedded_redis import EmbeddedRedis

    env = dict(os.environ)
    embedded = None
    with tempfile.TemporaryDirectory(prefix="esm2-redis-") as redis_dir:
        if not env_or("REDIS_URL"):
            embedded = EmbeddedRedis(Path(redis_dir))
            env["REDIS_URL"] = embedded.url
            log.info("started an embedded Redis on port %d", embedded.port)
        log.info("using Redis at %s", redact_url(env["REDIS_URL"]))
        frontend = _child("esm2_service.server", _frontend_args(args), env)
        workers = [
            _child("esm2_service.worker", _worker_args(args, i), env) for i in range(args.workers)
        ]
        stopping = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopping.append(True))
        try:
            code = _supervise(frontend, workers, args, env, stopping)
        finally:
            # The frontend first: it refuses new requests and drains the streams in
            # flight, which the workers are still serving; then the workers, then Redis.
            log.info("stopping the frontend, then the workers")
            _stop([frontend], timeout_s=server_settings.ServerSettings.grace_s + 5)
            _stop(workers, timeout_s=60)
            if embedded:
                embedded.stop()
        return code


def _supervise(frontend, workers, args, env, stopping) -> int:
    while not stopping:
        if frontend.poll() is not None:
            log.error("the frontend exited with %s; stopping", frontend.returncode)
            return 1
        for index, worker in enumerate(workers):
            if worker.poll() not in (None,) and not stopping:
                if worker.returncode == 2:
                    log.error("worker %d cannot start (exit 2: bad settings or checkpoint)", index)
                    return 1
                log.warning("worker %d exited with %s; restarting it", index, worker.returncode)
                workers[index] = _child("esm2_service.worker", _worker_args(args, index), env)
        time.sleep(0.2)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("esm2 serve: --workers must be at least 1", file=sys.stderr)
        return 2
    if not 0 <= args.metrics_port <= 65535 - args.workers:
        print(
            f"esm2 serve: --metrics-port {args.metrics_port} leaves no port for every worker",
            file=sys.stderr,
        )
        return 2
    configure_logging("INFO", args.log_format)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
