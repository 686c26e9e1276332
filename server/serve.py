"""`esm2 serve`: the whole service on one machine, in one command.

Starts a private Redis (unless REDIS_URL is set), the gRPC frontend and N workers
as child processes, restarts a worker or the private Redis that dies, and on Ctrl-C
or SIGTERM stops them in order: the frontend drains its streams, then the workers
finish their batch, then Redis goes.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from esm2_service.cli_help import SERVER_EXIT_CODES, HelpFormatter, epilog
from esm2_service.config import LOOPBACK, add_setting, env_or, redact_url
from esm2_service.logs import LOG_FORMATS, configure_logging
from esm2_service.server import settings as server_settings

log = logging.getLogger("esm2_service.serve")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# The embedded Redis is restarted when it dies, unless it died more often than this
# within the window: then serve exits 1 and leaves it to a process manager.
REDIS_MAX_RESTARTS = 3
REDIS_RESTART_WINDOW_S = 60.0


def build_parser() -> argparse.ArgumentParser:
    from esm2_service.worker.settings import PRECISIONS

    parser = argparse.ArgumentParser(
        prog="esm2 serve",
        description="Run Redis (embedded unless REDIS_URL is set), the gRPC frontend and "
        "workers. Logs 'esm2 serve: ready to take requests on HOST:PORT' once a worker is "
        "ready. Auth and TLS: set ESM2_AUTH_TOKENS_FILE, ESM2_TLS_CERT, ... "
        "(see docs/operations.md).",
        epilog=epilog(
            "esm2 serve --weights .cache/random/esm2_t6_8M_UR50D.pt --workers 2",
            {**SERVER_EXIT_CODES, 2: "bad usage or settings, or a port in use"},
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--host",
        default=env_or("ESM2_HOST", LOOPBACK),
        help=f"address the gRPC frontend binds (ESM2_HOST, default {LOOPBACK}: this machine "
        "only; 0.0.0.0 or [::] for every interface, then set tokens and TLS)",
    )
    add_setting(parser, "--port", 50051, "gRPC port", kind=int)
    parser.add_argument(
        "--http-port",
        type=int,
        default=int(env_or("ESM2_HTTP_PORT", "8000")),
        help="port of the HTTP/JSON door (BioLM's esm2-8m API); 0: none "
        "(ESM2_HTTP_PORT, default 8000)",
    )
    add_setting(parser, "--workers", 1, "worker processes", kind=int)
    add_setting(
        parser,
        "--frontends",
        1,
        "gRPC frontend processes, sharing the port (the kernel spreads connections over "
        "them); more for many clients on many cores (see docs/performance.md)",
        kind=int,
    )
    parser.add_argument(
        "--weights",
        default=env_or("ESM2_WEIGHTS"),
        help="fair-esm checkpoint for every worker (ESM2_WEIGHTS; unset: esm2_t6_8M_UR50D "
        "through fair-esm's download cache)",
    )
    add_setting(parser, "--device", "cpu", "cpu, cuda or cuda:N, for every worker")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=env_or("ESM2_PRECISION", "fp32"),
        help="compute precision of every worker (ESM2_PRECISION, default fp32; "
        "see docs/precision.md)",
    )
    add_setting(
        parser,
        "--threads",
        0,
        "threads per worker; 0: the machine's cores split among the workers",
        kind=int,
    )
    add_setting(
        parser,
        "--metrics-port",
        9090,
        "the frontend's Prometheus port; worker i gets this + 1 + i, the HTTP door this + 1 "
        "+ workers, frontend k > 0 this + 1 + workers + k; 0: no metrics",
        kind=int,
    )
    parser.add_argument(
        "--metrics-host",
        default=env_or("ESM2_METRICS_HOST", LOOPBACK),
        help=f"address every metrics endpoint binds (ESM2_METRICS_HOST, default {LOOPBACK})",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=env_or("ESM2_LOG_LEVEL", "INFO").upper(),
        help="for every process (ESM2_LOG_LEVEL, default INFO; DEBUG adds a line per batch)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=env_or("ESM2_LOG_FORMAT", "text"),
        help="text or JSON lines, for every process (ESM2_LOG_FORMAT, default text)",
    )
    return parser


def _child(module: str, args: list[str], env: dict[str, str], stdout=None) -> subprocess.Popen:
    # A session of its own: Ctrl-C reaches only this supervisor, which stops the
    # children in the order that loses nothing.
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=env,
        stdout=stdout,
        text=True,
        start_new_session=True,
    )


def _frontend_args(args: argparse.Namespace, index: int = 0, port: int | None = None) -> list[str]:
    # Auth and TLS settings reach the frontend through the environment it inherits
    # (ESM2_AUTH_TOKENS_FILE, ESM2_AUTH_TOKENS, ESM2_TLS_*), never through argv.
    return [
        *("--host", args.host),
        *("--port", str(args.port if port is None else port)),
        *("--metrics-port", str(frontend_metrics_port(args, index))),
        *("--metrics-host", args.metrics_host),
        *("--log-level", args.log_level),
        *("--log-format", args.log_format),
    ]


def frontend_metrics_port(args: argparse.Namespace, index: int) -> int:
    """Frontend 0 has --metrics-port; the workers and the HTTP door the next ports; the
    other frontends the ports after those."""
    if not args.metrics_port or index == 0:
        return args.metrics_port
    return args.metrics_port + 1 + args.workers + index


def _http_args(args: argparse.Namespace) -> list[str]:
    metrics_port = args.metrics_port + 1 + args.workers if args.metrics_port else 0
    return [
        *("--host", args.host),
        *("--port", str(args.http_port)),
        *("--metrics-port", str(metrics_port)),
        *("--metrics-host", args.metrics_host),
        *("--log-level", args.log_level),
        *("--log-format", args.log_format),
    ]


def _worker_args(args: argparse.Namespace, index: int) -> list[str]:
    from esm2_service.worker.main import available_cores

    threads = args.threads or max(1, available_cores() // args.workers)
    worker_args = [
        *("--device", args.device),
        *("--precision", args.precision),
        *("--threads", str(threads)),
        *("--worker-id", f"serve-{index}"),
        # Explicit, so an inherited ESM2_METRICS_PORT never gives two processes one port.
        *("--metrics-port", str(args.metrics_port + 1 + index if args.metrics_port else 0)),
        *("--metrics-host", args.metrics_host),
        *("--log-level", args.log_level),
        *("--log-format", args.log_format),
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
            embedded = EmbeddedRedis(Path(redis_dir), unix_socket=True)
            env["REDIS_URL"] = embedded.local_url  # its Unix socket: half Redis's CPU of TCP
            log.info(
                "started an embedded Redis on port %d and socket %s (pid %d)",
                embedded.port,
                embedded.socket_path,
                embedded.pid,
            )
        log.info("using Redis at %s", redact_url(env["REDIS_URL"]))
        frontends, grpc_port = _start_frontends(args, env)
        if args.http_port:
            frontends.append(
                _child("esm2_service.server.http_main", _http_args(args), env, subprocess.PIPE)
            )
        workers = [
            _child("esm2_service.worker", _worker_args(args, i), env) for i in range(args.workers)
        ]
        stopping = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopping.append(True))
        try:
            addresses = f"{args.host}:{grpc_port} (gRPC)"
            if args.http_port:
                addresses += f" and http://{args.host}:{_read_port(frontends[-1])} (HTTP)"
            http_door = frontends[-1] if args.http_port else None
            grpc_frontends = frontends[:-1] if args.http_port else frontends
            ready = threading.Thread(
                target=_announce_ready, args=(grpc_frontends, http_door, addresses)
            )
            ready.daemon = True
            ready.start()
            code = _supervise(frontends, workers, args, env, stopping, embedded)
        finally:
            # The frontends first: they refuse new requests and drain the streams in
            # flight, which the workers are still serving; then the workers, then Redis.
            log.info("stopping the frontends, then the workers")
            _stop(frontends, timeout_s=server_settings.ServerSettings.grace_s + 5)
            _stop(workers, timeout_s=60)
            if embedded:
                embedded.stop()
        return code


def _start_frontends(
    args: argparse.Namespace, env: dict[str, str]
) -> tuple[list[subprocess.Popen], int]:
    """The gRPC frontends, the first on --port and the others on the port it took (0 if
    the first failed); returns them and the port."""
    first = _child("esm2_service.server", _frontend_args(args), env, subprocess.PIPE)
    port = _read_port(first)
    frontends = [first]
    for index in range(1, args.frontends if port else 1):
        frontend_args = _frontend_args(args, index, port=port)
        frontends.append(_child("esm2_service.server", frontend_args, env, subprocess.PIPE))
        _read_port(frontends[-1])
    return frontends, port


def _read_port(frontend: subprocess.Popen) -> int:
    """The port a frontend printed ("esm2 server listening on port N", "esm2 http
    listening on port N"); 0 if it failed."""
    line = frontend.stdout.readline()
    return int(line.rsplit(" ", 1)[1]) if "listening on port" in line else 0


def _announce_ready(
    grpc_frontends: list[subprocess.Popen], http_door: subprocess.Popen | None, address: str
) -> None:
    """Logs the one line that says the whole service takes requests, once every door
    says so: each gRPC frontend when its health is SERVING (a worker is alive), the HTTP
    door when its /readyz answers 200. Each door's stdout is drained meanwhile."""
    from esm2_service.server.http_main import READY_LINE as HTTP_READY_LINE
    from esm2_service.server.main import READY_LINE

    doors = [(frontend, READY_LINE) for frontend in grpc_frontends]
    if http_door is not None:
        doors.append((http_door, HTTP_READY_LINE))
    events = []
    for frontend, line in doors:
        event = threading.Event()
        threading.Thread(target=_watch_stdout, args=(frontend, line, event), daemon=True).start()
        events.append(event)
    for event in events:
        event.wait()
    log.info("esm2 serve: ready to take requests on %s", address)


def _watch_stdout(process: subprocess.Popen, ready_line: str, ready: threading.Event) -> None:
    """Sets `ready` when `process` prints `ready_line`; reads its stdout to the end."""
    for line in process.stdout:
        if line.strip() == ready_line:
            ready.set()


class CrashLoopGuard:
    """Allows a restart unless there were more than `max_restarts` deaths within the last
    `window_s` seconds, this one included."""

    def __init__(self, max_restarts: int, window_s: float):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._deaths: list[float] = []

    def allows_restart(self, died_at: float) -> bool:
        recent = [at for at in self._deaths if died_at - at < self.window_s]
        self._deaths = [*recent, died_at]
        return len(self._deaths) <= self.max_restarts


def _keep_redis_running(redis, guard: CrashLoopGuard) -> bool:
    """Restarts the embedded Redis if it died; False if serve should give up instead."""
    if redis.process.poll() is None:
        return True
    old_pid, code = redis.pid, redis.process.returncode
    if not guard.allows_restart(time.monotonic()):
        log.error(
            "the embedded Redis (pid %d) exited with %s: more than %d deaths within %.0f s; "
            "stopping (exit 1) for a process manager to restart esm2 serve",
            old_pid,
            code,
            guard.max_restarts,
            guard.window_s,
        )
        return False
    try:
        redis.restart()
    except RuntimeError as error:
        log.error("the embedded Redis (pid %d) exited with %s: %s; stopping", old_pid, code, error)
        return False
    log.warning(
        "the embedded Redis (pid %d) exited with %s; restarted it on port %d (pid %d). The "
        "queue was lost with it: requests in flight fail with UNAVAILABLE, which clients "
        "should retry",
        old_pid,
        code,
        redis.port,
        redis.pid,
    )
    return True


def _supervise(frontends, workers, args, env, stopping, redis=None) -> int:
    redis_guard = CrashLoopGuard(REDIS_MAX_RESTARTS, REDIS_RESTART_WINDOW_S)
    while not stopping:
        if redis is not None and not _keep_redis_running(redis, redis_guard):
            return 1
        for frontend in frontends:
            if frontend.poll() is not None:
                log.error("a frontend exited with %s; stopping", frontend.returncode)
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
    for name in ("workers", "frontends"):
        if getattr(args, name) < 1:
            print(f"esm2 serve: --{name} must be at least 1", file=sys.stderr)
            return 2
    if not 0 <= args.metrics_port <= 65535 - args.workers - args.frontends - 1:
        print(
            f"esm2 serve: --metrics-port {args.metrics_port} leaves no port for every worker",
            file=sys.stderr,
        )
        return 2
    busy = busy_ports(args)
    if busy:
        print(busy_ports_message(busy), file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)
    return run(args)


def busy_ports(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(port, flag) of each port this serve would listen on that something else holds;
    a flag's further ports (--metrics-port's) are left out once one of them is busy."""
    busy: dict[str, int] = {}
    for host, port, flag in _ports_to_listen_on(args):
        if flag not in busy and port_in_use(host, port):
            busy[flag] = port
    return [(port, flag) for flag, port in busy.items()]


def _ports_to_listen_on(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(host, port, flag that sets it) of every listening port; 0s (none, or any) left out."""
    ports = [(args.host, args.port, "--port"), (args.host, args.http_port, "--http-port")]
    if args.metrics_port:
        metrics = [frontend_metrics_port(args, k) for k in range(args.frontends)]
        metrics += [args.metrics_port + 1 + i for i in range(args.workers)]
        metrics += [args.metrics_port + 1 + args.workers] if args.http_port else []
        ports += [(args.metrics_host, port, "--metrics-port") for port in metrics]
    return [(host, port, flag) for host, port, flag in ports if port]


def port_in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails because another socket holds it (any other
    failure is left for the process that binds it to report)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror:
        return False
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def busy_ports_message(busy: list[tuple[int, str]]) -> str:
    ports = ", ".join(f"port {port} ({flag}, {_env_of(flag)})" for port, flag in busy)
    return (
        f"esm2 serve: already in use: {ports}. Is another esm2 serve running? Stop it, or "
        'give this one other ports with these flags (make serve ARGS="--port 50061 '
        '--http-port 8010 --metrics-port 9190") or variables; --http-port 0 and '
        "--metrics-port 0 turn those off."
    )


def _env_of(flag: str) -> str:
    return "ESM2_" + flag.removeprefix("--").replace("-", "_").upper()


if __name__ == "__main__":
    sys.exit(main())
